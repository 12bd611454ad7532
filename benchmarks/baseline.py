"""ONNX Runtime called in-process on one model at several batch sizes: the ceiling for a server.

No gRPC, no serialization, no queueing: only ``session.run`` on ready numpy arrays. The best rows/s here is
what a perfectly batching server could reach on the same hardware with the same session settings.

Run: ``python benchmarks/baseline.py examples/models/digits --batch-sizes 1,8,64 --threads 1``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ORT_TYPES: dict[str, type[np.generic]] = {
    "tensor(bool)": np.bool_,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(uint16)": np.uint16,
    "tensor(int16)": np.int16,
    "tensor(uint32)": np.uint32,
    "tensor(int32)": np.int32,
    "tensor(uint64)": np.uint64,
    "tensor(int64)": np.int64,
    "tensor(float16)": np.float16,
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
}


def resolve_model(path: Path) -> Path:
    """Accept a model.onnx, a model directory (highest numbered version) or a version directory."""
    if path.is_file():
        return path
    if (path / "model.onnx").is_file():
        return path / "model.onnx"
    versions = sorted(
        (int(p.name), p) for p in path.iterdir() if p.name.isdigit() and (p / "model.onnx").is_file()
    )
    if not versions:
        raise SystemExit(f"error: no model.onnx under {path}")
    return versions[-1][1] / "model.onnx"


def default_max_batch(model: Path) -> int:
    """max_batch_size from the model's config.toml, when there is one."""
    import tomllib

    for config in (model.parent.parent / "config.toml", model.parent / "config.toml"):
        if config.is_file():
            value = tomllib.loads(config.read_text()).get("batching", {}).get("max_batch_size")
            if isinstance(value, int) and value > 0:
                return value
    return 64


def batch_sizes(max_batch: int) -> list[int]:
    sizes = [1 << i for i in range(max_batch.bit_length()) if 1 << i <= max_batch]
    return sorted({*sizes, max_batch})


def providers_for(choice: str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if choice == "auto":
        preferred = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return [p for p in preferred if p in available]
    if choice == "cpu":
        return ["CPUExecutionProvider"]
    if choice == "cuda":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return [p.strip() for p in choice.split(",") if p.strip()]


def make_feeds(session: Any, batch: int, seed: int, other: int = 1) -> dict[str, np.ndarray[Any, Any]]:
    """Random inputs: the first dynamic dimension is the batch, other dynamic dimensions are `other`."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray[Any, Any]] = {}
    for spec in session.get_inputs():
        shape = [
            batch if i == 0 else (d if isinstance(d, int) and d > 0 else other)
            for i, d in enumerate(spec.shape)
        ]
        np_type = ORT_TYPES.get(spec.type)
        if np_type is None:
            raise SystemExit(f"error: input {spec.name!r} has unsupported type {spec.type}")
        if np.issubdtype(np_type, np.floating):
            feeds[spec.name] = rng.uniform(0.0, 16.0, size=shape).astype(np_type)
        else:
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(np_type)
    return feeds


def measure(
    session: Any, feeds: dict[str, np.ndarray[Any, Any]], seconds: float, min_runs: int
) -> list[float]:
    """Latencies (s) of back-to-back runs for at least ``seconds`` and ``min_runs``."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(latencies) < min_runs or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        session.run(None, feeds)
        latencies.append(time.perf_counter() - t0)
    return latencies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", type=Path, help="model.onnx, or a model directory of a model repository")
    parser.add_argument(
        "--batch-sizes", help="comma list (default: powers of two up to --max-batch, plus it)"
    )
    parser.add_argument("--max-batch", type=int, help="default: max_batch_size from config.toml, else 64")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: ONNX Runtime's default)")
    parser.add_argument(
        "--providers", default="auto", help="auto, cpu, cuda or a comma list of ORT providers"
    )
    parser.add_argument("--seconds", type=float, default=2.0, help="measured time per batch size")
    parser.add_argument("--min-runs", type=int, default=20, help="fewest measured runs per batch size")
    parser.add_argument("--warmup-runs", type=int, default=10, help="unmeasured runs per batch size")
    parser.add_argument(
        "--seq", type=int, default=1, help="size of the other dynamic dimensions (MiniLM's sequence length)"
    )
    parser.add_argument(
        "--strict", action="store_true",
        help="exit 1 unless the first provider asked for is the session's first: no silent CPU fallback",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results to this file")
    args = parser.parse_args(argv)

    import onnxruntime as ort

    model = resolve_model(args.model)
    if args.batch_sizes:
        sizes = sorted({int(b) for b in args.batch_sizes.split(",")})
    else:
        sizes = batch_sizes(args.max_batch or default_max_batch(model))
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    wanted = providers_for(args.providers)
    session = ort.InferenceSession(str(model), options, providers=wanted)
    print(f"model {model}  providers {session.get_providers()}  intra-op threads {args.threads or 'default'}")
    if args.strict and (not wanted or session.get_providers()[0] != wanted[0]):
        print(f"error: asked for {wanted[0] if wanted else 'nothing'}, got {session.get_providers()}")
        return 1

    rows: list[dict[str, Any]] = []
    print(f"{'batch':>6} {'runs':>7} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'rows/s':>12}")
    for batch in sizes:
        feeds = make_feeds(session, batch, args.seed, args.seq)
        for _ in range(args.warmup_runs):
            session.run(None, feeds)
        lat = np.asarray(measure(session, feeds, args.seconds, args.min_runs))
        p50, p90, p99 = (float(np.percentile(lat, q)) * 1e3 for q in (50, 90, 99))
        rows_per_s = batch * lat.size / float(lat.sum())
        rows.append(
            {
                "batch": batch,
                "runs": int(lat.size),
                "p50_ms": p50,
                "p90_ms": p90,
                "p99_ms": p99,
                "rows_per_s": rows_per_s,
            }
        )
        print(f"{batch:>6} {lat.size:>7} {p50:>9.3f} {p90:>9.3f} {p99:>9.3f} {rows_per_s:>12,.0f}")

    best = max(rows, key=lambda r: r["rows_per_s"])
    print(f"best: {best['rows_per_s']:,.0f} rows/s at batch {best['batch']}")
    if args.json:
        report = {
            "model": str(model),
            "providers": session.get_providers(),
            "threads": args.threads,
            "seq": args.seq,
            "results": rows,
            "best": best,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
