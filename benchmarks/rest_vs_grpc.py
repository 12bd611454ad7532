"""REST infer against KServe gRPC ModelInfer on one Sluice server, same run: requests/s and the ratio.

One `sluice serve` (the bundled repository) runs in a subprocess with both ports on loopback. Client
processes (`--processes`, each its own event loop on uvloop) send one digits image per request from
`--callers` concurrent callers in all, closed loop, for `--duration` seconds; the three forms alternate for
`--rounds`: gRPC ModelInfer with raw_input_contents, REST with a JSON body, and REST with Triton's binary
tensor data extension (input and outputs). Every call is counted by final status; any failure fails the
run. Prints requests/s and the server's CPU time per request (from /proc, Linux only: the clients share the
machine, so requests/s also measures the clients' own cost) per round and form, and the median ratios.

    python benchmarks/rest_vs_grpc.py --callers 64 --rounds 3 --duration 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

IMAGE = np.linspace(0, 16, 64, dtype=np.float32).reshape(1, 64)
FORMS = ("grpc", "rest-json", "rest-binary")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _load(form: str, grpc_port: int, http_port: int, callers: int, seconds: float) -> Counter[str]:
    """Final statuses of every call `callers` closed-loop callers made in `seconds`."""
    import aiohttp
    import grpc

    from sluice.kserve.v2 import grpc_service_pb2 as kpb
    from sluice.kserve.v2 import grpc_service_pb2_grpc as kpb_grpc

    seen: Counter[str] = Counter()
    ends = time.monotonic() + seconds
    if form == "grpc":
        request = kpb.ModelInferRequest(model_name="digits")
        request.inputs.add(name="pixels", datatype="FP32", shape=[1, 64])
        request.raw_input_contents.append(IMAGE.astype("<f4").tobytes())
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = kpb_grpc.GRPCInferenceServiceStub(channel)

            async def grpc_caller() -> None:
                while time.monotonic() < ends:
                    try:
                        await stub.ModelInfer(request)
                        seen["OK"] += 1
                    except grpc.aio.AioRpcError as error:
                        seen[error.code().name] += 1

            await asyncio.gather(*(grpc_caller() for _ in range(callers)))
        return seen
    url = f"http://127.0.0.1:{http_port}/v2/models/digits/infer"
    if form == "rest-json":
        tensor = {"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": IMAGE.reshape(-1).tolist()}
        body = json.dumps({"inputs": [tensor]}).encode()
        headers = {"Content-Type": "application/json"}
    else:
        header = json.dumps(
            {
                "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64],
                            "parameters": {"binary_data_size": 256}}],
                "parameters": {"binary_data_output": True},
            }
        ).encode()  # fmt: skip
        body = header + IMAGE.astype("<f4").tobytes()
        headers = {"Inference-Header-Content-Length": str(len(header))}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=callers)) as session:

        async def rest_caller() -> None:
            while time.monotonic() < ends:
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    seen["OK" if response.status == 200 else str(response.status)] += 1

        await asyncio.gather(*(rest_caller() for _ in range(callers)))
    return seen


def _worker(form: str, grpc_port: int, http_port: int, callers: int, seconds: float, out: Any) -> None:
    import uvloop

    out.put(dict(uvloop.run(_load(form, grpc_port, http_port, callers, seconds))))


def measure(form: str, grpc_port: int, http_port: int, callers: int, processes: int, seconds: float) -> float:
    """Requests/s answered OK; raises if any call failed."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    share = [callers // processes + (i < callers % processes) for i in range(processes)]
    workers = [ctx.Process(target=_worker, args=(form, grpc_port, http_port, n, seconds, out)) for n in share]
    for w in workers:
        w.start()
    total: Counter[str] = Counter()
    for _ in workers:
        total.update(out.get(timeout=seconds + 60))
    for w in workers:
        w.join(10)
    failed = sum(n for code, n in total.items() if code != "OK")
    if failed:
        raise RuntimeError(f"{form}: {failed} calls failed: {dict(total)}")
    return total["OK"] / seconds


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--callers", type=int, default=64)
    parser.add_argument("--processes", type=int, default=2, help="client processes sharing the callers")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    http_port = _free_port()
    env = {**os.environ, "SLUICE_HTTP_PORT": str(http_port), "SLUICE_METRICS_PORT": "-1", "SLUICE_PORT": "0"}
    server = subprocess.Popen(
        [sys.executable, "-m", "sluice.server.cli", "serve", "--log-level", "WARNING"],
        stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        match = re.search(r"listening on \S*:(\d+)", line)
        if match is None:
            raise RuntimeError(f"the server did not say where it listens: {line!r}")
        grpc_port = int(match.group(1))
        time.sleep(2)  # loading: the ports answer before the model is ready
        for form in FORMS:  # warm-up
            measure(form, grpc_port, http_port, args.callers, args.processes, 1.0)
        rates: dict[str, list[float]] = {form: [] for form in FORMS}
        cpu_us: dict[str, list[float]] = {form: [] for form in FORMS}
        for round_ in range(args.rounds):
            for form in FORMS:
                before = _cpu_seconds(server.pid)
                rate = measure(form, grpc_port, http_port, args.callers, args.processes, args.duration)
                per_request = (_cpu_seconds(server.pid) - before) / (rate * args.duration) * 1e6
                rates[form].append(rate)
                cpu_us[form].append(per_request)
                print(f"round {round_ + 1} {form:12} {rate:8.0f} req/s  "
                      f"server {per_request:5.0f} CPU µs/request", flush=True)  # fmt: skip
    finally:
        server.terminate()
        server.wait(30)
    grpc_rates = rates["grpc"]
    for form in FORMS:
        print(f"median {form:12} {statistics.median(rates[form]):8.0f} req/s  "
              f"server {statistics.median(cpu_us[form]):5.0f} CPU µs/request")  # fmt: skip
    for form in FORMS[1:]:
        ratios = [r / g for r, g in zip(rates[form], grpc_rates, strict=True)]
        print(f"{form}/grpc per round: {', '.join(f'{r:.2f}' for r in ratios)}; "
              f"median {statistics.median(ratios):.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
