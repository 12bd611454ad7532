"""CPU per request of Sluice's Predict handler in-process, without gRPC, beside the floor server's handler.

The served ratios (compare_echo.py) move by ±20% from run to run on a shared 2-core machine: client and server
take the same cores, and a change worth 5 µs per request is lost in that. This drives the very handler gRPC
calls (`InferenceService.handlers()["Predict"]`, admission, counting and the batcher included) with a
serialized PredictRequest on the server's own event loop, and counts the process's CPU per call. Alone (one
call at a time: the batcher runs each request in its caller's task) and with `--concurrency` calls at once
(they batch). The floor handler (benchmarks/floor_server.py: parse, one ONNX Runtime run, encode) runs in the
same process, so "sluice - floor" is what Sluice's own layers cost per request.

Run: ``PYTHONPATH=proto python benchmarks/handler_cost.py [--repository examples/models] [--model digits]``
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

from echo_server import run_loop
from floor_server import DIGITS, Floor
from sluice.server.app import SluiceServer
from sluice.server.service import InferenceService
from sluice.server.settings import ServerSettings
from sluice.v1 import inference_pb2 as pb
from sluice.wire import NUMERIC

HERE = Path(__file__).resolve().parent
Handler = Callable[[bytes, Any], Awaitable[Any]]


class _Context:
    """What the handler reads of gRPC's context: the call's deadline, and a status only on failure."""

    def __init__(self, deadline: float | None) -> None:
        self._deadline = deadline
        self._done: list[Callable[[Any], object]] = []

    def add_done_callback(self, callback: Callable[[Any], object]) -> None:
        self._done.append(callback)

    def done(self) -> None:
        """One call ended, as gRPC ends it after the handler returned (callers share this context)."""
        if self._done:  # the floor's handler registers none
            self._done.pop()(self)

    def time_remaining(self) -> float | None:
        return self._deadline

    def set_code(self, code: object) -> None:
        raise SystemExit(f"error: the handler failed with {code}")

    def set_details(self, details: str) -> None:
        print(details, file=sys.stderr)


def request_bytes(name: str, inputs: list[pb.TensorSpec], rows: int) -> bytes:
    """A serialized PredictRequest of random inputs of the advertised shapes (free dimensions: 1)."""
    request = pb.PredictRequest(model=name, id="bench")
    for spec in inputs:
        shape = [rows, *(d if d > 0 else 1 for d in spec.shape[1:])]
        tensor = request.inputs.add(name=spec.name, datatype=spec.datatype, shape=shape)
        tensor.raw_contents = np.ones(shape, dtype=NUMERIC[spec.datatype]).tobytes()
    return request.SerializeToString()


async def cpu_per_call(
    handler: Handler, data: bytes, context: _Context, calls: int, concurrency: int
) -> float:
    """µs of this process's CPU per call, `concurrency` callers each making calls / concurrency calls."""

    async def caller() -> None:
        for _ in range(calls // concurrency):
            await handler(data, context)
            context.done()

    await caller()  # warm
    started = time.process_time()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return (time.process_time() - started) / (calls // concurrency * concurrency) * 1e6


async def measure(args: argparse.Namespace) -> None:
    logging.disable(logging.INFO)
    # Metrics on (a free port), as served; no REST port: only the handler is measured.
    settings = ServerSettings(
        model_repository=args.repository,
        port=0,
        metrics_port=0,
        http_port=-1,
        loop_spin_us=args.loop_spin_us,
    )
    server = SluiceServer(settings)
    await server.start()
    await server.loaded()
    try:
        sluice = InferenceService(server.plane).handlers()["Predict"].unary_unary
        assert sluice is not None
        floor = Floor(args.model_file, args.model)
        data = request_bytes(args.model, floor.inputs, args.rows)
        context = _Context(args.timeout or None)
        rounds: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            for concurrency in (1, args.concurrency):
                for name, handler in (("floor", floor.predict), ("sluice", sluice)):
                    cost = await cpu_per_call(handler, data, context, args.calls, concurrency)
                    rounds.setdefault(f"{name} x{concurrency}", []).append(cost)
        for key, costs in rounds.items():
            spread = f"{min(costs):.1f}-{max(costs):.1f}"
            print(f"{key:>12}: {statistics.median(costs):6.1f} µs CPU per request (rounds {spread})")
    finally:
        await server.stop(grace=1.0, drain_delay=0.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repository", type=Path, help="model repository (default: digits alone)")
    parser.add_argument("--model", default="digits")
    parser.add_argument("--model-file", type=Path, default=DIGITS, help="the floor's ONNX file")
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--calls", type=int, default=20000, help="calls per round and handler")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=10.0, help="the call's deadline in s (0: none)")
    parser.add_argument("--loop-spin-us", type=int, default=1000, help="SLUICE_LOOP_SPIN_US")
    parser.add_argument("--uvloop", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        if args.repository is None:
            # Digits alone, as the served benchmarks run it: other models would share its threads.
            args.repository = Path(scratch)
            (args.repository / "digits").symlink_to(HERE.parent / "examples" / "models" / "digits")
        run_loop(measure(args), uvloop=args.uvloop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
