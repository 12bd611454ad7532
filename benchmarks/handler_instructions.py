"""Instructions per request of Sluice's Predict handler and the floor's, counted by valgrind's callgrind.

`handler_cost.py` times the same handlers in µs of CPU, and on a shared 2-core VM those µs move by half from
one run to the next (the floor's own handler took 18 to 43 µs on one afternoon): a change worth a few µs per
request cannot be seen. An instruction count does not depend on what else the machine runs. This starts
the server's data plane in a child process under `valgrind --tool=callgrind --instr-atstart=no` (start-up
runs uninstrumented, so it takes seconds, not minutes), warms the handler up, switches instrumentation on
with `callgrind_control` for `--calls` calls only, and reads the total. Instructions are not time (a cache
miss costs more than an add), but the Python work a change adds or removes shows in them. Nothing that reads
the clock is in the count by default: the loop does not spin for the next request (`loop_spin_us = 0`), and
digits batches with a fixed window of 0 ms (`--policy adaptive` for the served default, whose waits for
company poll for as long as the clock says: under valgrind the loop is always saturated) on one ONNX Runtime
thread. So run to run the counts agree within 0.3% (benchmarks/RESULTS.md, wave 2, fifteenth session).

Run: ``PYTHONPATH=proto python benchmarks/handler_instructions.py [--calls 2000] [--concurrency 1 64]``
Needs valgrind (Debian's package) on Linux.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


async def _child(args: argparse.Namespace) -> None:
    """Serves `args.handler` in-process and makes its calls when the driver says go (one line on stdin)."""
    from floor_server import DIGITS, Floor
    from handler_cost import _Context, request_bytes
    from sluice.server.app import SluiceServer
    from sluice.server.service import InferenceService
    from sluice.server.settings import ServerSettings

    logging.disable(logging.INFO)
    server = SluiceServer(
        # No spinning for the next request: what it costs depends on the clock, not on the code measured.
        ServerSettings(model_repository=args.repository, port=0, metrics_port=0, http_port=-1, loop_spin_us=0)
    )
    await server.start()
    await server.loaded()
    try:
        floor = Floor(DIGITS, "digits")
        if args.handler == "floor":
            handler: Any = floor.predict
        else:
            handler = InferenceService(server.plane).handlers()["Predict"].unary_unary
        data = request_bytes("digits", floor.inputs, 1)
        context = _Context(10.0)
        per_caller = args.calls // args.concurrency

        async def caller(calls: int) -> None:
            for _ in range(calls):
                await handler(data, context)
                context.done()

        await asyncio.gather(*(caller(per_caller) for _ in range(args.concurrency)))  # warm
        loop = asyncio.get_running_loop()
        print("ready", flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)
        await asyncio.gather(*(caller(per_caller) for _ in range(args.concurrency)))
        print("done", flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)
    finally:
        await server.stop(grace=1.0, drain_delay=0.0)


def count(handler: str, concurrency: int, calls: int, repository: Path, scratch: Path) -> float:
    """Instructions per call of `handler` ("sluice" or "floor") with `concurrency` callers at once."""
    out = scratch / f"callgrind.{handler}.{concurrency}.out"
    child = subprocess.Popen(
        [
            "valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
            sys.executable, str(Path(__file__)), "--child", "--handler", handler,
            "--concurrency", str(concurrency), "--calls", str(calls), "--repository", str(repository),
        ],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONHASHSEED": "0"},  # the same dict and set layouts in every run
    )  # fmt: skip
    assert child.stdin is not None
    assert child.stdout is not None
    try:
        for expected, switch in (("ready", "on"), ("done", "off")):
            line = child.stdout.readline().strip()
            if line != expected:
                raise SystemExit(f"error: the measured process said {line!r}, not {expected!r}")
            subprocess.run(
                ["callgrind_control", "-i", switch, str(child.pid)], check=True, capture_output=True
            )
            child.stdin.write("\n")
            child.stdin.flush()
        child.wait(timeout=600)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    # "totals" counts what ran instrumented; "summary" can stay 0 when instrumentation started off.
    match = re.search(r"^totals: (\d+)", out.read_text(), re.MULTILINE)
    if match is None:
        raise SystemExit(f"error: no instruction total in {out}")
    return int(match.group(1)) / (calls // concurrency * concurrency)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=2000, help="measured calls per handler and concurrency")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--handler", choices=("sluice", "floor"), nargs="+", default=["floor", "sluice"])
    parser.add_argument(
        "--repository", type=Path, help="model repository (default: digits alone, with --policy)"
    )
    parser.add_argument(
        "--policy",
        choices=("fixed0", "adaptive"),
        default="fixed0",
        help="digits' batching: a fixed window of 0 ms (the default: no clock in the count) or adaptive",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        from echo_server import run_loop

        args.handler = args.handler[0]
        args.concurrency = args.concurrency[0]
        run_loop(_child(args), uvloop=True)
        return 0
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("error: needs valgrind and callgrind_control (apt-get install valgrind)")
    with tempfile.TemporaryDirectory() as scratch:
        repository = args.repository
        if repository is None:
            repository = Path(scratch) / "repo"
            entry = repository / "digits"
            entry.mkdir(parents=True)
            (entry / "1").symlink_to(HERE.parent / "examples" / "models" / "digits" / "1")
            # The adaptive policy reads the loop's load and the clock, and under valgrind the loop is always
            # saturated: it waits for company, polling, for as long as the clock says. A window of 0 ms runs
            # what is queued at once, the same way in every run.
            policy = '"fixed"\nmax_delay_ms = 0.0' if args.policy == "fixed0" else '"adaptive"'
            # One ONNX Runtime thread: handing a run to a second one costs a varying number of instructions.
            (entry / "config.toml").write_text(
                f"[batching]\nmax_batch_size = 64\npolicy = {policy}\n\n"
                "[execution]\ninstances = 1\nintra_op_threads = 1\n"
            )
        for concurrency in args.concurrency:
            for handler in args.handler:
                per_call = count(handler, concurrency, args.calls, repository, Path(scratch))
                print(f"{handler:>7} x{concurrency}: {per_call:10,.0f} instructions per request", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
