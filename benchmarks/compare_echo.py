"""Run the same load against a server and against the echo server, alternating, and print the ratio.

Both run as subprocesses on free loopback ports on the same machine in the same run, so drift (thermal,
neighbours, other processes) hits both alike. The ratio server/echo requests/s says how much of the bare
gRPC ceiling the server keeps at that concurrency.

The server command must print its port on stdout, as ``listening on HOST:PORT`` or a bare ``PORT`` line (the
echo server and ``sluice serve --port 0`` do), or take ``--server-port`` for a port it was told to use.

Run: ``PYTHONPATH=proto python benchmarks/compare_echo.py --server-cmd "sluice serve --port 0 ..." \\
--model digits --concurrency 8``
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PORT_LINE = re.compile(r"listening on \S*:(\d+)|^\s*(\d+)\s*$")
METRICS_LINE = re.compile(r"metrics on (http://\S+/metrics)")


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) the process has used so far; 0 where /proc is missing."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # Fields 14 and 15 of proc(5) (utime, stime), counted after the command name's closing parenthesis.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(port: int, pid: int, args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    """`run_loadgen`'s report plus the server's own CPU per request (ms): a figure the neighbours' load
    moves far less than requests/s, since it counts what the server spent, not what it was given."""
    before = cpu_seconds(pid)
    report = run_loadgen(port, args, extra)
    spent = cpu_seconds(pid) - before
    # Requests answered while the CPU was counted: the load generator's warm-up and measured seconds (its
    # own start and exit, when the server idles, are not requests).
    answered = report["requests_per_s"] * (args.warmup + args.duration)
    report["server_cpu_ms_per_request"] = spent / answered * 1e3 if answered else None
    return report


@contextmanager
def started(
    cmd: list[str],
    port: int | None,
    startup_s: float,
    echo_output: bool,
    pid: list[int] | None = None,
    metrics: list[str] | None = None,
) -> Iterator[int]:
    """Start ``cmd``, wait for its port, keep draining its output, and stop it on exit; its process id is
    appended to ``pid`` when given, and the metrics URL it prints (``sluice serve`` does, just after its
    port: read it when needed, not on return) to ``metrics``."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    try:
        found: list[int] = [] if port is None else [port]
        seen = threading.Event()
        if port is not None:
            seen.set()

        def drain() -> None:
            # Read every line, forever: a full pipe would block the server mid-benchmark.
            assert proc.stdout is not None
            for line in proc.stdout:
                if echo_output:
                    sys.stderr.write(f"[{Path(cmd[0]).name}] {line}")
                url = METRICS_LINE.search(line)
                if url and metrics is not None:
                    metrics.append(url.group(1))
                match = PORT_LINE.search(line)
                if match and not seen.is_set():
                    found.append(int(match.group(1) or match.group(2)))
                    seen.set()

        if pid is not None:
            pid.append(proc.pid)
        threading.Thread(target=drain, daemon=True).start()
        deadline = time.monotonic() + startup_s
        while not seen.wait(0.1):
            if proc.poll() is not None:
                raise SystemExit(f"error: {shlex.join(cmd)} exited with {proc.returncode} before listening")
            if time.monotonic() > deadline:
                raise SystemExit(f"error: {shlex.join(cmd)} printed no port within {startup_s:.0f} s")
        yield found[0]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_loadgen(port: int, args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        cmd = [
            sys.executable,
            str(HERE / "loadgen.py"),
            f"--target=127.0.0.1:{port}",
            f"--model={args.model}",
            f"--concurrency={args.concurrency}",
            f"--processes={args.processes}",
            f"--duration={args.duration}",
            f"--warmup={args.warmup}",
            f"--rows={args.rows}",
            f"--protocol={args.protocol}",
            f"--client={args.client}",
            f"--json={out}",
            "--no-progress",
            *extra,
        ]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        report: dict[str, Any] = json.loads(out.read_text())
        return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--server-cmd", required=True, help="command line that starts the server to measure")
    parser.add_argument(
        "--echo-uvloop", action="store_true", help="run the echo server on uvloop instead of asyncio's loop"
    )
    parser.add_argument("--server-port", type=int, help="port the server listens on, if it does not print it")
    parser.add_argument("--model", default="digits")
    parser.add_argument(
        "--input-shape",
        action="append",
        default=[],
        metavar="NAME:TYPE:DIMS",
        help="inputs for both targets (passed to loadgen); default: the server's Health, reused for echo",
    )
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument(
        "--protocol", choices=("sluice", "kserve"), default="sluice",
        help="sluice.v1 Predict or KServe ModelInfer, on both servers (default: sluice)",
    )  # fmt: skip
    parser.add_argument(
        "--client", choices=("raw", "stub"), default="raw",
        help="loadgen's client: raw (pre-serialized bytes, the default for ratios: it leaves the most CPU to "
        "the servers) or stub (the generated stubs)",
    )  # fmt: skip
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per round and target")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--startup-timeout", type=float, default=120.0, help="seconds to wait for a port")
    parser.add_argument("--show-output", action="store_true", help="copy the servers' output to stderr")
    parser.add_argument("--json", type=Path, help="write all rounds and the ratio to this file")
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also measure benchmarks/floor_server.py (the least a Python handler can do: parse, one ONNX "
        "Runtime run of the digits model, encode) in each round; sluice.v1 and the digits model only",
    )
    args = parser.parse_args(argv)
    if args.floor and (args.protocol != "sluice" or args.model != "digits"):
        parser.error("--floor serves the digits model over sluice.v1 only")

    installed = "PYTHONPATH" in os.environ or importlib.util.find_spec("sluice.v1") is not None
    env_note = "" if installed else " (set PYTHONPATH=proto: sluice is not installed)"
    echo_cmd = [
        sys.executable,
        str(HERE / "echo_server.py"),
        "--port",
        "0",
        *(["--uvloop"] if args.echo_uvloop else []),
    ]
    server_cmd = shlex.split(args.server_cmd)
    floor_cmd = [sys.executable, str(HERE / "floor_server.py"), "--port", "0", "--uvloop"]
    rounds: list[dict[str, Any]] = []
    pids: dict[str, list[int]] = {"server": [], "echo": [], "floor": []}
    with contextlib.ExitStack() as stack:
        ports = {
            "server": stack.enter_context(
                started(server_cmd, args.server_port, args.startup_timeout, args.show_output, pids["server"])
            ),
            "echo": stack.enter_context(
                started(echo_cmd, None, args.startup_timeout, args.show_output, pids["echo"])
            ),
        }
        if args.floor:
            ports["floor"] = stack.enter_context(
                started(floor_cmd, None, args.startup_timeout, args.show_output, pids["floor"])
            )
        shapes = [f"--input-shape={s}" for s in args.input_shape]
        if not shapes:
            # The echo server advertises a fixed input; send it exactly what the server is sent.
            first = run_loadgen(
                ports["server"], argparse.Namespace(**{**vars(args), "duration": 0.5, "warmup": 0}), []
            )
            shapes = [
                f"--input-shape={i['name']}:{i['dtype']}:{'x'.join(str(d) for d in i['shape'])}"
                for i in first["inputs"]
            ]
        for index in range(args.rounds):
            # Alternate which goes first so that a warm cache or a slow start does not favour one side.
            order = list(ports.items())
            if index % 2:
                order.reverse()
            result: dict[str, Any] = {}
            for name, port in order:
                result[name] = measured(port, pids[name][0], args, shapes)
            ratio = result["server"]["requests_per_s"] / result["echo"]["requests_per_s"]
            rounds.append({**result, "ratio": ratio})
            floor = ""
            if "floor" in result:
                rounds[-1]["floor_ratio"] = (
                    result["floor"]["requests_per_s"] / result["echo"]["requests_per_s"]
                )
                floor = (
                    f"; floor {result['floor']['requests_per_s']:,.0f} req/s "
                    f"(ratio {rounds[-1]['floor_ratio']:.2f}, CPU per request {_ms(result['floor'])})"
                )
            print(
                f"round {index + 1}: server {result['server']['requests_per_s']:,.0f} req/s "
                f"(p50 {result['server']['latency_ms']['p50']:.2f} ms, "
                f"errors {result['server']['errors'] or 0}), "
                f"echo {result['echo']['requests_per_s']:,.0f} req/s "
                f"(p50 {result['echo']['latency_ms']['p50']:.2f} ms), ratio {ratio:.2f}; "
                f"server CPU per request {_ms(result['server'])} vs echo {_ms(result['echo'])}{floor}",
                flush=True,
            )
    median = statistics.median(r["ratio"] for r in rounds)
    low, high = min(r["ratio"] for r in rounds), max(r["ratio"] for r in rounds)
    print(
        f"server/echo requests/s, {args.protocol} ({args.client} client), concurrency {args.concurrency}: "
        f"median ratio {median:.2f} (range {low:.2f}-{high:.2f}){env_note}"
    )
    floors = [r["floor_ratio"] for r in rounds if "floor_ratio" in r]
    if floors:
        print(
            f"floor/echo requests/s: median ratio {statistics.median(floors):.2f} "
            f"(range {min(floors):.2f}-{max(floors):.2f})"
        )
    if args.json:
        summary: dict[str, Any] = {"rounds": rounds, "median_ratio": median}
        if floors:
            summary["median_floor_ratio"] = statistics.median(floors)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


def _ms(report: dict[str, Any]) -> str:
    value = report.get("server_cpu_ms_per_request")
    return "?" if value is None else f"{value * 1e3:.0f} µs"


if __name__ == "__main__":
    sys.exit(main())
