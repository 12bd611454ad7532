"""Requests/s of `sluice serve --workers 1` against `--workers 2` at 64 closed-loop callers (a benchmark, not a
test: pytest does not collect it).

Run: `.venv/bin/python tests/scale/bench_workers.py [--model digits] [--rounds 3] [--seconds 5]`

The kernel spreads connections, not calls, over the workers, so the callers use 16 connections (a local
subchannel pool per channel) from 2 client processes. Rounds alternate 1 and 2 workers so that drift in a
shared machine's load hits both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np

from sluice.clients.codec import to_tensor
from sluice.v1 import inference_pb2 as pb
from sluice.v1 import inference_pb2_grpc as pb_grpc

CALLERS = 64
PROCESSES = 2
CONNECTIONS_PER_PROCESS = 8


def inputs(model: str) -> list[pb.Tensor]:
    if model == "minilm":
        return [to_tensor("text", np.array(["a sentence to embed, of a dozen words or so"], dtype=object))]
    return [to_tensor("pixels", np.zeros((1, 64), dtype=np.float32))]


async def _client(address: str, model: str, seconds: float) -> tuple[int, int]:
    channels = [
        grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(CONNECTIONS_PER_PROCESS)
    ]
    request = pb.PredictRequest(model=model, inputs=inputs(model))
    ok = failed = 0
    end = time.monotonic() + seconds

    async def caller(i: int) -> None:
        nonlocal ok, failed
        stub = pb_grpc.InferenceStub(channels[i % len(channels)])
        while time.monotonic() < end:
            try:
                await stub.Predict(request, timeout=10)
                ok += 1
            except grpc.aio.AioRpcError:
                failed += 1

    await asyncio.gather(*(caller(i) for i in range(CALLERS // PROCESSES)))
    for channel in channels:
        await channel.close()
    return ok, failed


def client(address: str, model: str, seconds: float, results: multiprocessing.Queue[tuple[int, int]]) -> None:
    results.put(asyncio.run(_client(address, model, seconds)))


def measure(workers: int, model: str, seconds: float) -> tuple[float, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    command = [sys.executable, "-m", "sluice.server.cli", "serve", "--port", "0", "--http-port", "-1",
               "--metrics-port", "-1", "--workers", str(workers), "--log-level", "WARNING"]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.PIPE, env=env, text=True)
    assert server.stdout is not None
    try:
        address = server.stdout.readline().strip().removeprefix("listening on ")
        asyncio.run(_client(address, model, 2.0))  # warm-up: every worker ready and warm
        results: multiprocessing.Queue[tuple[int, int]] = multiprocessing.Queue()
        procs = [
            multiprocessing.Process(target=client, args=(address, model, seconds, results))
            for _ in range(PROCESSES)
        ]
        for p in procs:
            p.start()
        counts = [results.get(timeout=seconds + 60) for _ in procs]
        for p in procs:
            p.join(30)
    finally:
        server.terminate()
        server.wait(30)
    return sum(c[0] for c in counts) / seconds, sum(c[1] for c in counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    ratios = []
    for r in range(args.rounds):
        one, errors_one = measure(1, args.model, args.seconds)
        two, errors_two = measure(2, args.model, args.seconds)
        ratios.append(two / one)
        print(f"round {r + 1}: 1 worker {one:,.0f} req/s, 2 workers {two:,.0f} req/s, ratio {two / one:.2f}, "
              f"errors {errors_one} and {errors_two}", flush=True)  # fmt: skip
    print(f"{args.model}: median ratio 2 workers / 1 worker = {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
