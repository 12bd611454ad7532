"""Soak test: open-loop load for a long time, with the server's memory, file descriptors, threads and latency
sampled per interval, to see what drifts.

Requests arrive at a fixed target rate (Poisson or evenly spaced) whatever the server does, and latency
counts from each request's planned send time, so a server that slows down shows it instead of slowing the
client. Every interval the script reads the server's RSS, open file descriptors and threads from
/proc/PID/status and /proc/PID/fd, and the p50/p99 latency and outcomes of the calls that ended in it; it
writes one CSV row per interval and, at the end, a PNG with one panel per quantity.

    python benchmarks/soak.py --serve --model digits --rate 400 --duration 300       # starts sluice serve
    python benchmarks/soak.py --target 127.0.0.1:8001 --pid 12345 --model digits     # a running server

Linux only (/proc). Traffic goes only to loopback. Needs the `bench` extra for the plot (matplotlib).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from loadgen import check_loopback, make_request, specs_from_health

FIELDS = [
    "t_s",
    "sent",
    "ok",
    "errors",
    "behind",
    "in_flight",
    "p50_ms",
    "p99_ms",
    "rss_mib",
    "fds",
    "threads",
    "error_codes",
]
PREDICT = "/sluice.v1.Inference/Predict"


@dataclass
class Interval:
    """What happened since the last sample: calls ended, their latencies and codes, sends that were late."""

    sent: int = 0
    behind: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    codes: Counter[str] = field(default_factory=Counter)


def read_proc(pid: int) -> tuple[float, int, int]:
    """(RSS in MiB, open file descriptors, threads) of process `pid`."""
    rss_kib = threads = 0
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss_kib = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    return rss_kib / 1024, len(os.listdir(f"/proc/{pid}/fd")), threads


def start_server(repo: Path | None, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`sluice serve` on port 0 (metrics off); returns the process and the address it printed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    env.update({"SLUICE_PORT": "0", "SLUICE_METRICS_PORT": "-1", "SLUICE_HTTP_PORT": "-1"})
    command = [sys.executable, "-m", "sluice.server.cli", "serve", *([str(repo)] if repo else [])]
    with open(log, "wb") as err:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, env=env)
    assert process.stdout is not None
    for raw in process.stdout:  # the first line says where it listens
        line = raw.decode().strip()
        if line.startswith("listening on "):
            return process, line.removeprefix("listening on ")
    process.kill()
    raise SystemExit(f"error: sluice serve exited without listening; see {log}")


def wait_ready(target: str, model: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            specs_from_health(target, model, 5.0)
            return
        except (grpc.RpcError, SystemExit):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


async def soak(
    args: argparse.Namespace, target: str, pid: int, body: bytes, writer: Any
) -> list[dict[str, Any]]:
    """Sends at `args.rate` for `args.duration` seconds; returns the sampled rows."""
    rows: list[dict[str, Any]] = []
    now = Interval()
    in_flight = 0
    rng = random.Random(args.seed)
    start = time.monotonic()
    end = start + args.duration
    tasks: set[asyncio.Task[None]] = set()

    async with grpc.aio.insecure_channel(target) as channel:
        predict = channel.unary_unary(PREDICT, request_serializer=None, response_deserializer=None)

        async def one(planned: float) -> None:
            nonlocal in_flight
            in_flight += 1
            try:
                await predict(body, timeout=args.timeout)
                code = "OK"
            except grpc.aio.AioRpcError as error:
                code = error.code().name
            finally:
                in_flight -= 1
            now.latencies_ms.append((time.monotonic() - planned) * 1e3)
            now.codes[code] += 1

        async def sample() -> None:
            nonlocal now
            next_at = start + args.interval
            while next_at <= end + 1e-9:
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                done, now = now, Interval()
                rss, fds, threads = read_proc(pid)
                latencies = np.asarray(done.latencies_ms)
                errors = sum(n for code, n in done.codes.items() if code != "OK")
                row = {
                    "t_s": round(next_at - start, 1),
                    "sent": done.sent,
                    "ok": done.codes["OK"],
                    "errors": errors,
                    "behind": done.behind,
                    "in_flight": in_flight,
                    "p50_ms": round(float(np.percentile(latencies, 50)), 3) if latencies.size else "",
                    "p99_ms": round(float(np.percentile(latencies, 99)), 3) if latencies.size else "",
                    "rss_mib": round(rss, 1),
                    "fds": fds,
                    "threads": threads,
                    "error_codes": " ".join(f"{c}={n}" for c, n in done.codes.items() if c != "OK"),
                }
                rows.append(row)
                writer.writerow(row)
                if not args.quiet:
                    print(
                        f"{row['t_s']:>7}s sent={row['sent']} ok={row['ok']} err={errors} "
                        f"p50={row['p50_ms']}ms p99={row['p99_ms']}ms rss={row['rss_mib']}MiB fds={fds} "
                        f"threads={threads}",
                        flush=True,
                    )
                next_at += args.interval

        sampler = asyncio.create_task(sample())
        planned = start
        while planned < end:
            gap = rng.expovariate(args.rate) if args.arrivals == "poisson" else 1.0 / args.rate
            planned += gap
            delay = planned - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -0.010:
                now.behind += 1  # the client could not keep to the schedule: the rate is too high for it
            if in_flight >= args.max_in_flight:
                now.codes["CLIENT_DROPPED"] += 1
                continue
            now.sent += 1
            task = asyncio.create_task(one(planned))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await sampler
        for task in list(tasks):
            task.cancel()
    return rows


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t_s"] / 60 for r in rows]

    def series(key: str) -> list[float]:
        return [float(r[key]) if r[key] != "" else float("nan") for r in rows]

    fig, (lat, mem, res, rate) = plt.subplots(4, 1, figsize=(8, 8), sharex=True)
    lat.plot(t, series("p50_ms"), label="p50")
    lat.plot(t, series("p99_ms"), label="p99")
    lat.set_ylabel("latency ms")
    lat.legend(loc="upper left")
    mem.plot(t, series("rss_mib"), color="tab:red")
    mem.set_ylabel("server RSS MiB")
    res.plot(t, series("fds"), label="open fds")
    res.plot(t, series("threads"), label="threads")
    res.set_ylabel("count")
    res.legend(loc="upper left")
    interval = rows[1]["t_s"] - rows[0]["t_s"] if len(rows) > 1 else 1.0
    rate.plot(t, [r["ok"] / interval for r in rows], label="OK/s")
    rate.plot(t, [r["errors"] / interval for r in rows], label="errors/s")
    rate.set_ylabel("calls/s")
    rate.set_xlabel("minutes")
    rate.legend(loc="upper left")
    for axis in (lat, mem, res, rate):
        axis.grid(alpha=0.3)
        axis.set_ylim(bottom=0)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=72)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Open-loop soak test of a Sluice server: a target rate for a given time, with the "
        "server's RSS, open file descriptors, threads and p50/p99 latency sampled per interval into a CSV "
        "and a PNG plot.",
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--target", type=check_loopback, help="a running server, HOST:PORT (loopback only)")
    where.add_argument(
        "--serve",
        nargs="?",
        const="",
        metavar="REPO",
        help="start `sluice serve [REPO]` on port 0 (the bundled repository without REPO) and stop it after",
    )
    parser.add_argument(
        "--pid", type=int, help="with --target: the server's process id, whose /proc is sampled"
    )
    parser.add_argument("--model", default="digits", help="model to call (default: digits)")
    parser.add_argument("--rows", type=int, default=1, help="rows per request (default: 1)")
    parser.add_argument("--rate", type=float, default=200.0, help="target requests/s (default: 200)")
    parser.add_argument(
        "--arrivals",
        choices=["poisson", "fixed"],
        default="poisson",
        help="Poisson arrivals at --rate, or evenly spaced ones (default: poisson)",
    )
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (default: 60)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds per sample (default: 5)")
    parser.add_argument(
        "--timeout", type=float, default=10.0, help="deadline of each call in s (default: 10)"
    )
    parser.add_argument(
        "--max-in-flight",
        type=int,
        default=10_000,
        help="calls in flight at most; arrivals beyond are counted as CLIENT_DROPPED (default: 10000)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the arrival times and inputs")
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/out/soak"), help="writes OUT.csv and OUT.png"
    )
    parser.add_argument("--title", default="", help="title of the plot (default: what was run)")
    parser.add_argument("--quiet", action="store_true", help="no line per interval")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.rate <= 0 or args.duration <= 0 or args.interval <= 0:
        raise SystemExit("error: --rate, --duration and --interval must be > 0")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    process = None
    if args.serve is not None:
        process, target = start_server(Path(args.serve) if args.serve else None, args.out.with_suffix(".log"))
        pid = process.pid
    else:
        if args.pid is None:
            raise SystemExit("error: --target needs --pid, the server process to sample")
        target, pid = args.target, args.pid
    try:
        wait_ready(target, args.model, 60.0)
        specs = specs_from_health(target, args.model, 5.0)
        body = make_request(args.model, specs, args.rows, args.seed).SerializeToString()
        csv_path = args.out.with_suffix(".csv")
        with open(csv_path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=FIELDS)
            writer.writeheader()
            rows = asyncio.run(soak(args, target, pid, body, writer))
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
    title = args.title or (
        f"soak: {args.model}, {args.arrivals} arrivals at {args.rate:g}/s for {args.duration:g} s, "
        f"{args.interval:g} s samples"
    )
    png_path = args.out.with_suffix(".png")
    plot(rows, png_path, title)
    first, last = rows[0], rows[-1]
    errors = sum(r["errors"] for r in rows)
    behind = sum(r["behind"] for r in rows)
    print(
        f"{sum(r['ok'] for r in rows)} OK, {errors} errors, {behind} sends behind schedule; RSS "
        f"{first['rss_mib']} -> {last['rss_mib']} MiB (max {max(r['rss_mib'] for r in rows)}), fds "
        f"{first['fds']} -> {last['fds']}, threads {first['threads']} -> {last['threads']}"
    )
    print(f"wrote {csv_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
