"""Two servers under the same load, alternating round by round: the ratio of B to A, before against after.

Both run at once on free loopback ports, so drift (thermal, neighbours) hits both alike; each round runs
`loadgen.py` against one then the other, the order alternating. Typical use: A is main, B is a branch, each
started from its own source tree:

    python benchmarks/compare_servers.py \\
        --a-cmd "env PYTHONPATH=/tmp/main/proto:/tmp/main/batcher:/tmp/main/server .venv/bin/python \\
                 -c 'import sys; from sluice.server.cli import main; sys.exit(main())' \\
                 serve --port 0 --metrics-port 0 --http-port -1" \\
        --b-cmd ".venv/bin/sluice serve --port 0 --metrics-port 0 --http-port -1" --concurrency 64 \\
        --processes 2 --rounds 6

Each command must print its port as `compare_echo.py` expects (`sluice serve --port 0` does). Each round
also reports each server's CPU (all its threads) per request, and the summary B's over A's: what a change
saves or costs in CPU shows there even where requests/s, moved by the neighbours, cannot tell it. Where a
server prints its metrics URL (`sluice serve --metrics-port 0` does), each round also says how it batched
(requests per batch) and how much its event loop spun per request: a server that falls into a state where
it stops batching shows there, round by round.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from compare_echo import measured, started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--a-cmd", required=True, help="command line of server A (before)")
    parser.add_argument("--b-cmd", required=True, help="command line of server B (after)")
    parser.add_argument("--model", default="digits")
    parser.add_argument("--input-shape", action="append", default=[], metavar="NAME:TYPE:DIMS")
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--protocol", choices=("sluice", "kserve"), default="sluice")
    parser.add_argument("--client", choices=("raw", "stub"), default="raw")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--startup-timeout", type=float, default=120.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    rounds: list[dict[str, Any]] = []
    shapes = [f"--input-shape={s}" for s in args.input_shape]
    pids: list[int] = []
    a_url: list[str] = []
    b_url: list[str] = []
    with (
        started(shlex.split(args.a_cmd), None, args.startup_timeout, False, pids, a_url) as a_port,
        started(shlex.split(args.b_cmd), None, args.startup_timeout, False, pids, b_url) as b_port,
    ):
        urls = {"a": a_url, "b": b_url}  # filled as each server prints its URL, after its port
        for index in range(args.rounds):
            order = [("a", a_port, pids[0]), ("b", b_port, pids[1])]
            if index % 2:
                order.reverse()
            result = {
                name: _measured(port, pid, next(iter(urls[name]), None), args, shapes)
                for name, port, pid in order
            }
            ratio = result["b"]["requests_per_s"] / result["a"]["requests_per_s"]
            cpu = _cpu_ratio(result["a"], result["b"])
            rounds.append({**result, "ratio": ratio, "cpu_ratio": cpu})
            print(
                f"round {index + 1}: A {_round(result['a'])}, B {_round(result['b'])}, B/A {ratio:.2f}"
                + ("" if cpu is None else f", CPU per request B/A {cpu:.2f}"),
                flush=True,
            )
    ratios = [r["ratio"] for r in rounds]
    median = statistics.median(ratios)
    cpus = [r["cpu_ratio"] for r in rounds if r["cpu_ratio"] is not None]
    cpu_median = statistics.median(cpus) if cpus else None
    print(
        f"B/A requests/s at concurrency {args.concurrency}: median {median:.2f} "
        f"(range {min(ratios):.2f}-{max(ratios):.2f})"
        + ("" if cpu_median is None else f"; server CPU per request B/A: median {cpu_median:.2f}")
    )
    if args.json:
        summary = {"rounds": rounds, "median_ratio": median, "median_cpu_ratio": cpu_median}
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


def _measured(
    port: int, pid: int, url: str | None, args: argparse.Namespace, shapes: list[str]
) -> dict[str, Any]:
    """`measured`, plus what the server's metrics say of the round, where it serves them: requests per
    batch and the event loop's spinning per request. They tell which state a server was in; one that
    batches in some rounds and not in others explains a ratio the median alone hides."""
    before = _scraped(url)
    report = measured(port, pid, args, shapes)
    after = _scraped(url)
    if before is not None and after is not None:
        requests = after["requests"] - before["requests"]
        batches = after["batches"] - before["batches"]
        if requests > 0 and batches > 0:
            report["mean_batch"] = requests / batches
            if "spun" in after:  # absent: the server does not spin (or predates the counter)
                report["spun_us_per_request"] = (after["spun"] - before.get("spun", 0.0)) / requests * 1e6
    return report


def _scraped(url: str | None) -> dict[str, float] | None:
    """`batching(url)`, or None when there is no URL or the scrape fails: a round without these figures
    is still a round."""
    if not url:
        return None
    try:
        return batching(url)
    except (OSError, ValueError) as exc:
        print(f"warning: could not read {url}: {exc}", file=sys.stderr)
        return None


def batching(url: str) -> dict[str, float]:
    """Requests batched, batches and seconds spun so far, summed over the server's models."""
    with urllib.request.urlopen(url, timeout=10) as response:
        return batching_totals(response.read().decode())


def batching_totals(text: str) -> dict[str, float]:
    """`batching` from Prometheus text: sluice_batch_requests' sum and count, sluice_loop_spin_seconds."""
    totals = {"requests": 0.0, "batches": 0.0}
    fields = {
        "sluice_batch_requests_sum": "requests",
        "sluice_batch_requests_count": "batches",
        "sluice_loop_spin_seconds_total": "spun",
    }
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            field = fields.get(sample.name)
            if field is not None:
                totals[field] = totals.get(field, 0.0) + sample.value
    return totals


def _round(report: dict[str, Any]) -> str:
    cpu = report.get("server_cpu_ms_per_request")
    spent = "" if cpu is None else f", server CPU {cpu * 1e3:.0f} µs/request"
    if "mean_batch" in report:
        spent += f", {report['mean_batch']:.2f} requests/batch"
    if "spun_us_per_request" in report:
        spent += f", spun {report['spun_us_per_request']:.1f} µs/request"
    return (
        f"{report['requests_per_s']:,.0f} req/s (p50 {report['latency_ms']['p50']:.2f} ms, "
        f"errors {report['errors'] or 0}{spent})"
    )


def _cpu_ratio(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    """B's server CPU per request over A's: what the servers spent, which the neighbours' load moves far
    less than requests/s; None where /proc cannot tell."""
    spent_a, spent_b = a.get("server_cpu_ms_per_request"), b.get("server_cpu_ms_per_request")
    return spent_b / spent_a if spent_a and spent_b else None


if __name__ == "__main__":
    sys.exit(main())
