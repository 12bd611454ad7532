"""Versions swapped under load: 64 callers in closed loop on `digits` while versions 1 -> 2 -> 3 -> 2 -> 1 ...
are loaded and unloaded about once a second. Every call is counted by id and final status.

It runs SWAP_SECONDS (20 s, about twenty swaps; SLUICE_SWAP_SECONDS sets another length).
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sluice.kserve.v2 import grpc_service_pb2 as kpb
from sluice.kserve.v2 import grpc_service_pb2_grpc as kpb_grpc
from sluice.server.app import SluiceServer
from sluice.server.settings import ServerSettings
from sluice.v1 import inference_pb2_grpc as pb_grpc
from support import outputs, request, save

CALLERS = 64
SWAP_EVERY = 1.0
SWAP_SECONDS = float(os.environ.get("SLUICE_SWAP_SECONDS", "20"))
SEQUENCE = (2, 3, 2, 1)
"""What each swap loads, in turn, starting from version 1: 1 -> 2 -> 3 -> 2 -> 1 -> 2 ..."""


def versioned_digits(version: int) -> onnx.ModelProto:
    """digits' signature (pixels FP32 [N, 64]) answering its own version number in every row, so an answer
    says which version computed it."""
    weights = numpy_helper.from_array(np.zeros((64, 1), np.float32), "w")
    bias = numpy_helper.from_array(np.full((1,), float(version), np.float32), "b")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["pixels", "w"], ["zero"]),
            helper.make_node("Add", ["zero", "b"], ["version"]),
        ],
        "versioned_digits",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("version", TensorProto.FLOAT, ["N", 1])],
        [weights, bias],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@dataclass
class Call:
    id: str
    started: float
    ended: float = 0.0
    status: str = "PENDING"
    version: int = 0


@dataclass
class Swap:
    """One load: the version it made the default, when it was asked for and when it returned."""

    version: int
    asked: float
    done: float


async def test_versions_swap_under_load_with_no_error(repo: Path) -> None:
    for version in (1, 2, 3):
        save(versioned_digits(version), repo / "digits" / str(version) / "model.onnx")
    (repo / "digits" / "config.toml").write_text("versions = [1]\n")
    server = SluiceServer(
        ServerSettings(
            model_repository=repo, port=0, metrics_port=-1, grace_period_s=5, model_control="explicit"
        )
    )
    await server.start()
    await server.loaded()
    start = time.monotonic()
    swaps = [Swap(1, start, start)]
    # The runtimes of every version ever served, to check that the unloaded ones were freed.
    runtimes = [weakref.ref(s.model.runtime) for s in server.repository.servables()]
    calls: list[Call] = []
    stop = asyncio.Event()
    pixels = np.random.default_rng(0).random((1, 64), dtype=np.float32)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.InferenceStub(channel)
            kserve = kpb_grpc.GRPCInferenceServiceStub(channel)

            async def caller(index: int) -> None:
                for n in range(1_000_000):
                    if stop.is_set():
                        return
                    call = Call(f"{index}-{n}", time.monotonic())
                    calls.append(call)
                    try:
                        response = await stub.Predict(
                            request("digits", id=call.id, pixels=pixels), timeout=30
                        )
                    except grpc.aio.AioRpcError as error:
                        call.status = error.code().name
                    else:
                        call.status = "OK" if response.id == call.id else "WRONG_ID"
                        call.version = int(outputs(response)["version"][0, 0])
                        if response.model_version != call.version:
                            call.status = "WRONG_VERSION_FIELD"
                    call.ended = time.monotonic()

            callers = [asyncio.create_task(caller(i)) for i in range(CALLERS)]
            for turn in range(int(SWAP_SECONDS / SWAP_EVERY)):
                await asyncio.sleep(SWAP_EVERY)
                version = SEQUENCE[turn % len(SEQUENCE)]
                load = kpb.RepositoryModelLoadRequest(model_name="digits")
                load.parameters["config"].string_param = f"versions = [{version}]"
                asked = time.monotonic()
                await kserve.RepositoryModelLoad(load, timeout=60)
                swaps.append(Swap(version, asked, time.monotonic()))
                runtimes += [weakref.ref(s.model.runtime) for s in server.repository.servables()]
            stop.set()
            _, pending = await asyncio.wait(callers, timeout=60)
            assert not pending, f"{len(pending)} callers still waiting 60 s after the last swap"

            async def unloading() -> bool:
                index = await kserve.RepositoryIndex(kpb.RepositoryIndexRequest())
                return any(m.state == "UNLOADING" for m in index.models)

            for _ in range(200):
                if not await unloading():
                    break
                await asyncio.sleep(0.05)
            current = server.repository.servables()
            assert [s.version for s in current] == [swaps[-1].version]
            serving = weakref.ref(current[0].model.runtime)
            del current
    finally:
        await server.stop(0)

    statuses: dict[str, int] = {}
    for call in calls:
        statuses[call.status] = statuses.get(call.status, 0) + 1
    assert statuses.get("OK", 0) == len(calls), f"final statuses of {len(calls)} calls: {statuses}"
    assert len({c.id.split("-")[0] for c in calls}) == CALLERS  # every caller got calls through
    # Each answer came from a version that could have been ready while the call was in the server: made the
    # default before the call ended, and replaced no earlier than the call began.
    windows = [
        (s.version, s.asked, nxt.done if nxt else float("inf"))
        for s, nxt in zip(swaps, [*swaps[1:], None], strict=True)
    ]
    stray = [
        c for c in calls if not any(v == c.version and a <= c.ended and c.started <= e for v, a, e in windows)
    ]
    assert not stray, f"{len(stray)} answers from a version not ready while they ran, first: {stray[0]}"
    assert {c.version for c in calls} == {1, 2, 3}
    print(f"{len(calls)} calls in {SWAP_SECONDS} s across {len(swaps) - 1} swaps: {statuses}")

    # Unloaded versions' runtimes (and their ONNX Runtime sessions) are freed: nothing refers to them.
    gc.collect()
    alive = {ref for ref in runtimes if ref() is not None and ref is not serving}
    assert not alive, f"{len(alive)} runtimes of unloaded versions are still referenced"
