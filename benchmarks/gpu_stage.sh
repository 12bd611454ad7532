#!/usr/bin/env bash
# Packs what benchmarks/gpu.sh needs for a GPU machine that reaches no package registry (the device tool's
# H200: Python 3.12 with numpy, aiohttp, uvloop, tqdm, onnx, an onnxruntime and the CUDA 13 libraries, but
# not Sluice's other dependencies), into loads small enough for one device call each.
#
#   benchmarks/gpu_stage.sh            # run here, where pip reaches a registry; (re)writes .gpu-stage/
#
# .gpu-stage/1, 2, ... (git-ignored) each hold at most 56 MiB: the wheels (for PYVER, default 3.12) of onnxruntime-gpu
# and of every dependency the image lacks, at the versions this checkout's .venv runs, Sluice's own wheel,
# and MiniLM's model.onnx (examples/export_minilm.py builds it here). A file over the limit is cut into
# NAME.part-NNN pieces with a NAME.pieces manifest (count, sha256); gpu.sh checks and joins them.
# .gpu-stage/PLAN.txt lists the device calls:
# each load copied to /tmp/stage on the (warm) device machine, then
# `GPU_SH_STAGE=/tmp/stage benchmarks/gpu.sh "$OUT"`.
#
# If the image's own onnxruntime already has the CUDA provider, the loads holding onnxruntime-gpu's parts
# can be skipped: the first call prints its providers.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
LIMIT_MIB=${LIMIT_MIB:-56}
if ((LIMIT_MIB < 1 || LIMIT_MIB > 60)); then echo "gpu_stage.sh: LIMIT_MIB must be 1 to 60" >&2; exit 2; fi
PY=.venv/bin/python
STAGE=.gpu-stage
rm -rf "$STAGE"
mkdir -p "$STAGE/all"

# What the device image lacks (see /work/.library/device/KINDS.md), pinned to what CI tested here.
PACKAGES=(
    onnxruntime-gpu grpcio protobuf grpcio-health-checking grpcio-reflection prometheus-client
    pydantic pydantic-core pydantic-settings python-dotenv typing-inspection annotated-types typing-extensions
)
PLATFORMS=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    PLATFORMS+=(--platform "${tag}_x86_64")
done
for package in "${PACKAGES[@]}"; do
    version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$package")
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
        "${PLATFORMS[@]}" -d "$STAGE/all" "$package==$version"
done
# Sluice itself, as a wheel: its plugins are found through the entry points an installed one registers.
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$STAGE/all" .

ONNX=${MINILM_ONNX:-examples/models/minilm/1/model.onnx}
if [[ -f "$ONNX" ]]; then
    cp "$ONNX" "$STAGE/all/model.onnx"
else
    echo "gpu_stage.sh: no $ONNX (build it with examples/export_minilm.py): gpu.sh will export it" >&2
fi

"$PY" - "$STAGE" "$LIMIT_MIB" <<'PYEOF'
"""Cuts .gpu-stage/all into loads of at most LIMIT MiB (big files into pieces) and writes the plan. onnxruntime-gpu
goes in loads of its own, last: they can be skipped where the image's onnxruntime has CUDA already."""

import hashlib
import shutil
import sys
from pathlib import Path

stage, limit = Path(sys.argv[1]), int(sys.argv[2]) << 20
Piece = tuple[str, Path | bytes]


def cut(paths: list[Path]) -> list[Piece]:
    pieces: list[Piece] = []
    for path in paths:
        size = path.stat().st_size
        if size <= limit:
            pieces.append((path.name, path))
            continue
        count = -(-size // limit)
        digest = hashlib.sha256()
        with path.open("rb") as file:
            for n in range(count):
                data = file.read(limit)
                digest.update(data)
                pieces.append((f"{path.name}.part-{n:03d}", data))
        manifest = f"{count} {digest.hexdigest()}\n".encode()
        pieces.append((f"{path.name}.pieces", manifest))
    return pieces


def size(piece: Piece) -> int:
    data = piece[1]
    return data.stat().st_size if isinstance(data, Path) else len(data)


def pack(pieces: list[Piece]) -> list[list[Piece]]:
    """First fit, largest first."""
    loads: list[list[Piece]] = []
    for piece in sorted(pieces, key=size, reverse=True):
        for load in loads:
            if sum(size(p) for p in load) + size(piece) <= limit:
                load.append(piece)
                break
        else:
            loads.append([piece])
    return loads


def group(paths: list[Path]) -> list[list[Piece]]:
    """The loads of `paths`; the manifests of cut files (a few bytes) go in the first, so that gpu.sh can
    tell a piece that never arrived."""
    pieces = cut(paths)
    manifests = [p for p in pieces if p[0].endswith(".pieces")]
    loads = pack([p for p in pieces if p not in manifests])
    if loads:
        loads[0] += manifests
    return loads


files = sorted((stage / "all").iterdir())
runtime = [p for p in files if p.name.startswith("onnxruntime_gpu-")]
loads = group([p for p in files if p not in runtime])
optional = len(loads)  # loads after this one hold onnxruntime-gpu only
loads += group(runtime)
plan = [
    f"{len(loads)} calls that carry a load, then the run: {len(loads) + 1} device calls, each within 30 s of",
    "the last (the machine stays warm that long):",
    "",
]
for i, load in enumerate(loads, 1):
    folder = stage / str(i)
    folder.mkdir()
    for name, data in load:
        if isinstance(data, Path):
            shutil.copyfile(data, folder / name)
        else:
            (folder / name).write_bytes(data)
    check = " && python3 -c 'import onnxruntime as o; print(o.__version__, o.get_available_providers())'"
    plan.append(
        f'{i}. carry [".gpu-stage/{i}"]: mkdir -p /tmp/stage && cp .gpu-stage/{i}/* /tmp/stage/'
        + (check if i == 1 else "")
    )
    total = sum(size(p) for p in load) / 2**20
    note = " (onnxruntime-gpu: skip if call 1 listed CUDAExecutionProvider)" if i > optional else ""
    plan.append(f"   {total:.0f} MiB{note}: {', '.join(name for name, _ in load)}")
shutil.rmtree(stage / "all")
plan += [
    f"{len(loads) + 1}. timeout_s 540: GPU_SH_STAGE=/tmp/stage benchmarks/gpu.sh \"$OUT\"",
    "",
    "Then copy the table in $OUT/gpu-results.md into benchmarks/RESULTS.md, with the date.",
]
(stage / "PLAN.txt").write_text("\n".join(plan) + "\n")
print("\n".join(plan))
PYEOF
