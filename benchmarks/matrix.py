"""Runs the batching benchmark matrix: models x policies x concurrencies, plus the in-process baseline.

For each model and batching policy (none, fixed, adaptive) it starts ``sluice serve`` on a copy of the
model's repository entry whose config.toml names that policy, runs ``loadgen.py`` at each concurrency, and
stops the server; then ``baseline.py`` measures ONNX Runtime in-process on the same model with the same
thread count. It prints a markdown table, writes everything to ``--json`` and plots latency against
throughput to ``--plot``.

Run: ``python benchmarks/matrix.py --model examples/models/digits --model benchmarks/models/encoder``
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
POLICIES = ("none", "fixed", "adaptive")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def _dump(config: dict[str, Any]) -> str:
    """Writes the simple two-level config.toml shape back (scalars, then one table per section)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in config.items() if not isinstance(v, dict)]
    for section, table in config.items():
        if isinstance(table, dict):
            lines.append(f"\n[{section}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in table.items() if not isinstance(v, dict)]
    return "\n".join(lines) + "\n"


def repository_for(model_dir: Path, policy: str, delay_ms: float | None, root: Path) -> Path:
    """A one-model repository whose config.toml runs `policy` (and `delay_ms`, when given); version files
    are linked, not copied."""
    repo = root / f"{policy}-{delay_ms}"
    target = repo / model_dir.name
    target.mkdir(parents=True)
    config_path = model_dir / "config.toml"
    config = tomllib.loads(config_path.read_text()) if config_path.exists() else {}
    config.setdefault("batching", {})["policy"] = policy
    if delay_ms is not None:
        config["batching"]["max_delay_ms"] = delay_ms
    (target / "config.toml").write_text(_dump(config))
    for version in model_dir.iterdir():
        if version.is_dir() and version.name.isdigit():
            (target / version.name).mkdir()
            os.symlink((version / "model.onnx").resolve(), target / version.name / "model.onnx")
    return repo


def _wait_ready(port: int, timeout: float = 120.0) -> None:
    """Waits until Health says every model finished loading (a big model takes a while)."""
    import grpc

    from sluice.v1 import inference_pb2, inference_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        while time.monotonic() < deadline:
            health = stub.Health(inference_pb2.HealthRequest())
            if health.state != inference_pb2.SERVING_STATE_STARTING:
                return
            time.sleep(0.1)
    raise SystemExit("the server's models did not finish loading")


@contextmanager
def serving(repo: Path, sluice: str) -> Iterator[tuple[int, int]]:
    """Starts `sluice serve` on free ports; yields (grpc port, metrics port)."""
    proc = subprocess.Popen(
        [
            sluice,
            "serve",
            str(repo),
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--http-port",
            "-1",
            "--log-level",
            "WARNING",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"listening on .*:(\d+)", line)
        if not match:
            raise SystemExit(f"sluice serve did not start: {line!r}")
        port = int(match[1])
        found = re.search(r"metrics on \S+:(\d+)/metrics", proc.stdout.readline())
        if not found:
            raise SystemExit("sluice serve printed no metrics port")
        metrics = int(found[1])
        _wait_ready(port)
        yield port, metrics
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _run_json(script: str, *args: str) -> dict[str, Any]:
    """Runs one of the benchmark scripts with `--json` and returns what it wrote."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [sys.executable, str(HERE / script), *args, "--json", out.name]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        result: dict[str, Any] = json.loads(Path(out.name).read_text())
        return result


def loadgen(
    port: int, metrics: int, model: str, concurrency: int, args: argparse.Namespace
) -> dict[str, Any]:
    processes = 1 if concurrency == 1 else args.processes
    return _run_json(
        "loadgen.py",
        f"--target=127.0.0.1:{port}",
        f"--model={model}",
        f"--concurrency={concurrency}",
        f"--processes={processes}",
        f"--duration={args.duration}",
        f"--warmup={args.warmup}",
        "--no-progress",
        f"--metrics-url=http://127.0.0.1:{metrics}/metrics",
    )


def baseline(model_dir: Path, threads: int, args: argparse.Namespace) -> dict[str, Any]:
    return _run_json(
        "baseline.py",
        str(model_dir),
        f"--threads={threads}",
        f"--providers={args.providers}",
        f"--seconds={args.baseline_seconds}",
    )


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for policy in dict.fromkeys(r["policy"] for r in rows):
            points = sorted(
                (r for r in rows if r["model"] == model and r["policy"] == policy),
                key=lambda r: r["concurrency"],
            )
            if not points:
                continue
            ax.plot(
                [p["rows_per_s"] for p in points], [p["p50_ms"] for p in points], marker="o", label=policy
            )
            for p in points:
                ax.annotate(
                    f"c={p['concurrency']}",
                    (p["rows_per_s"], p["p50_ms"]),
                    fontsize=7,
                    textcoords="offset points",
                    xytext=(4, 4),
                )
        best = next((r["baseline_best_rows_per_s"] for r in rows if r["model"] == model), None)
        top = max(r["rows_per_s"] for r in rows if r["model"] == model)
        title = model
        if best and best <= 3 * top:
            ax.axvline(best, color="grey", linestyle="--", label="ONNX Runtime in-process best")
        elif best:
            title += f" (ONNX Runtime in-process best: {best:,.0f} rows/s, off the scale)"
        ax.set_title(title)
        ax.set_xlabel("throughput (rows/s)")
        ax.set_ylabel("p50 latency (ms)")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", type=Path, action="append", required=True, help="model directory (repeatable)"
    )
    parser.add_argument("--policy", action="append", choices=POLICIES, help="default: all three")
    parser.add_argument("--concurrency", type=int, action="append", help="default: 1, 8, 64")
    parser.add_argument(
        "--fixed-window",
        type=float,
        action="append",
        help="max_delay_ms for the fixed policy (repeatable); default: the model's own",
    )
    parser.add_argument("--processes", type=int, default=2, help="client processes above concurrency 1")
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="baseline intra-op threads")
    parser.add_argument("--providers", default="cpu", help="baseline providers")
    parser.add_argument("--baseline-seconds", type=float, default=1.5)
    parser.add_argument("--json", type=Path, default=HERE / "out" / "matrix.json")
    parser.add_argument("--plot", type=Path, default=HERE / "out" / "matrix.png")
    args = parser.parse_args(argv)
    sluice = shutil.which("sluice") or str(Path(sys.executable).parent / "sluice")
    policies = args.policy or list(POLICIES)
    concurrencies = args.concurrency or [1, 8, 64]
    rows: list[dict[str, Any]] = []
    baselines: dict[str, Any] = {}
    for model_dir in args.model:
        name = model_dir.name
        base = baseline(model_dir, args.threads, args)
        baselines[name] = base
        best = max(r["rows_per_s"] for r in base["results"])
        b1 = next(r for r in base["results"] if r["batch"] == 1)
        print(
            f"{name}: ONNX Runtime in-process best {best:,.0f} rows/s, batch 1 p50 {b1['p50_ms']:.3f} ms",
            file=sys.stderr,
        )
        with tempfile.TemporaryDirectory() as tmp:
            runs: list[tuple[str, float | None]] = [(p, None) for p in policies if p != "fixed"]
            if "fixed" in policies:
                runs[1:1] = [("fixed", w) for w in (args.fixed_window or [None])]
            for policy, window in runs:
                repo = repository_for(model_dir, policy, window, Path(tmp))
                label = policy if window is None else f"{policy} {window:g} ms"
                with serving(repo, sluice) as (port, metrics):
                    for concurrency in concurrencies:
                        r = loadgen(port, metrics, name, concurrency, args)
                        batches = r.get("server_batches") or {}
                        row = {
                            "model": name,
                            "policy": label,
                            "concurrency": concurrency,
                            "requests_per_s": r["requests_per_s"],
                            "rows_per_s": r["rows_per_s"],
                            "p50_ms": r["latency_ms"]["p50"],
                            "p90_ms": r["latency_ms"]["p90"],
                            "p99_ms": r["latency_ms"]["p99"],
                            "errors": r["errors"],
                            "mean_batch": batches.get("mean_rows_per_batch"),
                            "baseline_best_rows_per_s": best,
                            "baseline_b1_p50_ms": b1["p50_ms"],
                        }
                        rows.append(row)
                        print(
                            f"  {label:14s} c={concurrency:<3d} {row['rows_per_s']:8,.0f} rows/s  "
                            f"p50 {row['p50_ms']:7.2f} ms  p99 {row['p99_ms']:7.2f} ms  "
                            f"batch {row['mean_batch'] or 0:5.1f}",
                            file=sys.stderr,
                        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": rows, "baselines": baselines}, indent=2) + "\n")
    plot(rows, args.plot)
    print("| model | policy | callers | rows/s | vs ORT best | p50 ms | p90 ms | p99 ms | mean batch |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        share = r["rows_per_s"] / r["baseline_best_rows_per_s"]
        print(
            f"| {r['model']} | {r['policy']} | {r['concurrency']} | {r['rows_per_s']:,.0f} | {share:.2f} | "
            f"{r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['p99_ms']:.2f} | {r['mean_batch'] or 0:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
