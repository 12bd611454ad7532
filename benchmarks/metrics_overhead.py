"""What metrics cost per request: the same batched calls with Sluice's observer and with none.

Timed in-process, interleaved over several rounds, so the figure is a ratio from one run: the server's full
per-request path (decode, batch, run the model, encode, count) with the Prometheus observer and request
counters, against the same path with a no-op observer and no counting.

Run: ``python benchmarks/metrics_overhead.py [--model examples/models/digits] [--callers 64]``
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from sluice.batcher import NullObserver
from sluice.server.app import SluiceServer
from sluice.server.errors import Code
from sluice.server.scheduling import make_scheduler
from sluice.server.settings import ServerSettings
from sluice.server.tensors import encode
from sluice.v1 import inference_pb2 as pb


async def _cost(server: SluiceServer, request: pb.PredictRequest, callers: int, count: int) -> float:
    """CPU µs per request through the sluice.v1 door's handler and the data plane's count, with `callers`
    concurrent tasks: what a gRPC call costs the server less gRPC itself.

    CPU time rather than wall time: on a shared machine it moves far less with the neighbours' load.
    """
    each = count // callers
    predict = server.service.predict
    count_call = server.plane.count
    model = request.model

    async def caller() -> None:
        for _ in range(each):
            started = time.monotonic()
            await predict(request, None)
            count_call(model, "Predict", Code.OK, started)

    started = time.process_time()
    await asyncio.gather(*(caller() for _ in range(callers)))
    return (time.process_time() - started) / (each * callers) * 1e6


async def main_async(args: argparse.Namespace) -> int:
    repo = args.model.resolve().parent
    server = SluiceServer(ServerSettings(model_repository=repo, port=0, metrics_port=-1, http_port=-1))
    await server.start()
    await server.loaded()
    servable = server.repository.resolve(args.model.name, None)
    spec = servable.model.inputs[0]
    rows = np.zeros((1, *(1 if d == -1 else d for d in spec.shape[1:])), dtype=spec.dtype)
    request = pb.PredictRequest(model=args.model.name, inputs=[encode(spec.name, rows)])
    with_metrics = servable.scheduler
    without = make_scheduler(servable.runner, NullObserver(), server.repository.loop_load)
    without.start()
    counting = server.metrics.count_request
    extra = []
    for _ in range(args.rounds):
        servable.scheduler = with_metrics
        server.metrics.count_request = counting  # type: ignore[method-assign]
        on = await _cost(server, request, args.callers, args.requests)
        servable.scheduler = without
        server.metrics.count_request = lambda *a: None  # type: ignore[method-assign]
        off = await _cost(server, request, args.callers, args.requests)
        extra.append(on - off)
        print(
            f"with metrics {on:6.1f} µs/request   without {off:6.1f} µs/request   metrics {on - off:+5.1f} µs"
        )
    print(f"median: metrics cost {statistics.median(extra):+.1f} CPU µs per request (in-process, no gRPC)")
    servable.scheduler = with_metrics
    await without.drain(0)
    await server.stop(0)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=Path("examples/models/digits"), help="model directory")
    parser.add_argument("--callers", type=int, default=64)
    parser.add_argument("--requests", type=int, default=20_000, help="requests per measurement")
    parser.add_argument("--rounds", type=int, default=7)
    return asyncio.run(main_async(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
