"""One behaviour table, run against all three doors: sluice.v1 Predict, KServe gRPC ModelInfer and KServe
REST infer, on one server.

Each case is written once, in neutral terms (model, version, raw little-endian input tensors, outputs asked
for, priority), and says what every door must answer: the gRPC status code name, the HTTP status, and one
message text (a door names its own protocol's fields where a message is about one). Where the doors disagree
today, the case marks the door that does with a strict xfail and the reason, so the disagreement is on record
and a fix shows up as an unexpected pass.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import grpc
import numpy as np
import pytest
import pytest_asyncio

from sluice.kserve.v2 import grpc_service_pb2 as kpb
from sluice.kserve.v2 import grpc_service_pb2_grpc as kpb_grpc
from sluice.server.app import SluiceServer
from sluice.server.settings import ServerSettings
from sluice.v1 import inference_pb2 as pb
from sluice.v1 import inference_pb2_grpc as pb_grpc
from support import add_model, save, two_inputs_model

pytestmark = pytest.mark.asyncio(loop_scope="module")

DOORS = ("v1", "kserve-grpc", "kserve-rest")


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str  # KServe's name: FP32, INT64, ...
    shape: tuple[int, ...]
    raw: bytes  # little-endian, row-major


def tensor(name: str, array: Any, *, raw: bytes | None = None) -> Tensor:
    a = np.asarray(array)
    datatype = {"f4": "FP32", "f8": "FP64", "i8": "INT64"}[f"{a.dtype.kind}{a.dtype.itemsize}"]
    return Tensor(
        name, datatype, a.shape, a.astype(a.dtype.newbyteorder("<")).tobytes() if raw is None else raw
    )


@dataclass(frozen=True)
class Case:
    id: str
    model: str
    inputs: tuple[Tensor, ...]
    code: str
    http: int
    message: str
    version: int | None = None
    outputs: tuple[str, ...] = ()
    priority: int | str | None = None
    disagree: dict[str, str] = field(default_factory=dict)
    """Door -> why it answers otherwise today."""
    own_words: dict[str, str] = field(default_factory=dict)
    """Door -> its message, where it rightly names something of its own protocol (a field)."""


X = tensor("x", np.zeros((1, 4), np.float32))
A = tensor("a", np.ones((2, 3), np.float32))
B = tensor("b", np.ones((2, 3), np.float32))
IDS = tensor("ids", np.arange(2, dtype=np.int64))

CASES = [
    Case("good", "add", (X,), "OK", 200, ""),
    Case("good-pinned-version-and-output", "add", (X,), "OK", 200, "", version=1, outputs=("y",), priority=3),
    Case("unknown-model", "nope", (X,), "NOT_FOUND", 404, "no model named 'nope'; the repository has 'add', 'pair'"),
    Case("unknown-version", "add", (X,), "NOT_FOUND", 404, "model 'add' has no version 7; it has 1", version=7),
    Case("wrong-datatype", "add", (tensor("x", np.zeros((1, 4))),), "INVALID_ARGUMENT", 400,
         "input 'x': expected FP32 [-1, 4], got FP64 [1, 4]"),
    Case("wrong-rank", "add", (tensor("x", np.zeros(4, np.float32)),), "INVALID_ARGUMENT", 400,
         "input 'x': expected FP32 [-1, 4], got FP32 [4]"),
    Case("wrong-dimension", "add", (tensor("x", np.zeros((1, 3), np.float32)),), "INVALID_ARGUMENT", 400,
         "input 'x': expected FP32 [-1, 4], got FP32 [1, 3]"),
    Case("missing-input", "pair", (A, IDS), "INVALID_ARGUMENT", 400, "missing input 'b': expected FP32 [-1, 3]"),
    Case("unknown-input", "add", (X, tensor("z", np.zeros((1, 4), np.float32))), "INVALID_ARGUMENT", 400,
         "model 'add' has no input 'z'; it takes 'x' (FP32 [-1, 4])"),
    Case("input-given-twice", "pair", (A, B, A, IDS), "INVALID_ARGUMENT", 400, "input 'a' is given twice"),
    Case("byte-count-not-the-shape", "add", (tensor("x", np.zeros((1, 4), np.float32), raw=b"\0" * 15),),
         "INVALID_ARGUMENT", 400, "input 'x': FP32 [1, 4] needs 16 bytes of binary data, got 15",
         own_words={"v1": "input 'x': FP32 [1, 4] needs 16 bytes of raw_contents, got 15",
                    "kserve-grpc": "input 'x': FP32 [1, 4] needs 16 bytes of raw_input_contents, got 15"}),
    Case("unknown-output", "add", (X,), "INVALID_ARGUMENT", 400, "model 'add' has no output 'z'; it gives 'y'",
         outputs=("z",)),
    Case("more-rows-than-max-batch-size", "add", (tensor("x", np.zeros((33, 4), np.float32)),),
         "INVALID_ARGUMENT", 400,
         "model 'add': request has 33 rows, more than max_batch_size=32; send at most 32 rows per request"),
    Case("malformed-priority", "add", (X,), "INVALID_ARGUMENT", 400,
         "parameter 'priority': expected an integer, got \"high\"", priority="high"),
]  # fmt: skip


@dataclass
class Doors:
    server: SluiceServer
    v1: pb_grpc.InferenceStub
    kserve: kpb_grpc.GRPCInferenceServiceAsyncStub
    http: aiohttp.ClientSession


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def doors(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Doors]:
    """add (y = x + 1, FP32 [-1, 4], max_batch_size 32) and pair (sum = a + b, ids passed through)."""
    repo = tmp_path_factory.mktemp("models")
    save(add_model(1.0), repo / "add" / "1" / "model.onnx")
    save(two_inputs_model(), repo / "pair" / "1" / "model.onnx")
    server = SluiceServer(ServerSettings(model_repository=repo, port=0, http_port=0, metrics_port=-1))
    await server.start()
    try:
        await server.loaded()
        async with (
            grpc.aio.insecure_channel(server.address) as channel,
            aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as http,
        ):
            yield Doors(
                server, pb_grpc.InferenceStub(channel), kpb_grpc.GRPCInferenceServiceStub(channel), http
            )
    finally:
        await server.stop(0)


Answer = tuple[str, int | None, str]
"""(gRPC status code name or "OK", HTTP status or None for the gRPC doors, message)."""


async def _v1(doors: Doors, case: Case) -> Answer:
    request = pb.PredictRequest(model=case.model, outputs=case.outputs)
    for t in case.inputs:
        request.inputs.add(name=t.name, datatype=pb.DataType.Value(f"DATA_TYPE_{t.datatype}"), shape=t.shape,
                           raw_contents=t.raw)  # fmt: skip
    if case.version is not None:
        request.version = case.version
    if isinstance(case.priority, int):
        request.parameters["priority"].int64_value = case.priority
    elif case.priority is not None:
        request.parameters["priority"].string_value = case.priority
    try:
        await doors.v1.Predict(request)
    except grpc.aio.AioRpcError as error:
        return error.code().name, None, error.details() or ""
    return "OK", None, ""


async def _kserve_grpc(doors: Doors, case: Case) -> Answer:
    request = kpb.ModelInferRequest(
        model_name=case.model, model_version="" if case.version is None else str(case.version)
    )
    for t in case.inputs:
        request.inputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        request.raw_input_contents.append(t.raw)
    for name in case.outputs:
        request.outputs.add(name=name)
    if isinstance(case.priority, int):
        request.parameters["priority"].int64_param = case.priority
    elif case.priority is not None:
        request.parameters["priority"].string_param = case.priority
    try:
        await doors.kserve.ModelInfer(request)
    except grpc.aio.AioRpcError as error:
        return error.code().name, None, error.details() or ""
    return "OK", None, ""


_CODES = {200: "OK", 400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 413: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE"}


async def _kserve_rest(doors: Doors, case: Case) -> Answer:
    body: dict[str, Any] = {
        "inputs": [
            {"name": t.name, "datatype": t.datatype, "shape": list(t.shape),
             "parameters": {"binary_data_size": len(t.raw)}}
            for t in case.inputs
        ],
    }  # fmt: skip
    if case.outputs:
        body["outputs"] = [{"name": name} for name in case.outputs]
    if case.priority is not None:
        body["parameters"] = {"priority": case.priority}
    header = json.dumps(body).encode()
    path = (
        f"/v2/models/{case.model}" + ("" if case.version is None else f"/versions/{case.version}") + "/infer"
    )
    data = header + b"".join(t.raw for t in case.inputs)
    async with doors.http.post(
        path, data=data, headers={"Inference-Header-Content-Length": str(len(header))}
    ) as r:
        answer = json.loads(await r.read())
        return (
            _CODES.get(r.status, str(r.status)),
            r.status,
            answer.get("error", "") if r.status != 200 else "",
        )


CALLS: dict[str, Callable[[Doors, Case], Coroutine[Any, Any, Answer]]] = {
    "v1": _v1, "kserve-grpc": _kserve_grpc, "kserve-rest": _kserve_rest,
}  # fmt: skip


def _params() -> list[Any]:
    params = []
    for case in CASES:
        for door in DOORS:
            marks = []
            if door in case.disagree:
                marks.append(pytest.mark.xfail(strict=True, reason=f"{door}: {case.disagree[door]}"))
            params.append(pytest.param(case, door, id=f"{case.id}-{door}", marks=marks))
    return params


@pytest.mark.parametrize(("case", "door"), _params())
async def test_every_door_answers_alike(doors: Doors, case: Case, door: str) -> None:
    code, http, message = await CALLS[door](doors, case)
    assert code == case.code
    if http is not None:
        assert http == case.http
    assert message == case.own_words.get(door, case.message)
