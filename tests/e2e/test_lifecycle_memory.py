"""Unloading gives a model's memory back: the resident set of a `sluice serve` process, before a big model
is loaded, with it loaded, and after it is unloaded.

RSS, not the runtime's own accounting: ONNX Runtime reports no allocator statistics through its Python API,
and what an operator sees (and what Kubernetes evicts on) is the process's resident memory. The model's
weights are one 96 MiB tensor, so the measure stands far above what Python's and glibc's allocators keep.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import grpc
import numpy as np
from onnx import TensorProto, helper, numpy_helper

from sluice.kserve.v2 import grpc_service_pb2 as kpb
from sluice.kserve.v2 import grpc_service_pb2_grpc as kpb_grpc
from support import add_model, save

MiB = 1024 * 1024
WEIGHTS = 96 * MiB


def rss(pid: int) -> int:
    """Resident bytes of a process, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    assert match is not None, status
    return int(match[1]) * 1024


def heavy_model() -> object:
    """y = x @ w with w FP32 [64, WEIGHTS / 256]: big weights, a cheap run."""
    columns = WEIGHTS // (64 * 4)
    w = numpy_helper.from_array(np.full((64, columns), 0.5, np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "heavy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", columns])],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


async def test_unloading_returns_the_models_memory(repo: Path) -> None:
    save(add_model(1.0), repo / "adder" / "1" / "model.onnx")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sluice.server.cli", "serve", str(repo), "--port", "0", "--metrics-port", "-1",
        "--model-control", "explicit", "--inference-threads", "1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        match = re.match(r"listening on (\S+)", line)
        assert match is not None, line
        save(heavy_model(), repo / "heavy" / "1" / "model.onnx")  # after start-up: loaded only when asked
        (repo / "heavy" / "config.toml").write_text('[execution]\nproviders = "cpu"\n')  # weights in RSS
        async with grpc.aio.insecure_channel(match[1]) as channel:
            kserve = kpb_grpc.GRPCInferenceServiceStub(channel)
            await kserve.ServerReady(kpb.ServerReadyRequest(), wait_for_ready=True)
            before = rss(proc.pid)
            await kserve.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name="heavy"), timeout=120)
            loaded = rss(proc.pid)
            await kserve.RepositoryModelUnload(
                kpb.RepositoryModelUnloadRequest(model_name="heavy"), timeout=60
            )
            after = rss(proc.pid)
    finally:
        proc.terminate()
        await proc.wait()
    grew, kept = (loaded - before) / MiB, (after - before) / MiB
    assert grew > 0.9 * WEIGHTS / MiB, f"loading grew the process by only {grew:.0f} MiB"
    assert kept < 0.25 * WEIGHTS / MiB, f"after unloading, {kept:.0f} of {grew:.0f} MiB are still resident"
