"""Every caller mistake gets a precise status and a message naming what was expected and what came."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from sluice.server.app import SluiceServer
from sluice.server.settings import ServerSettings
from sluice.v1 import inference_pb2 as pb
from sluice.v1 import inference_pb2_grpc as pb_grpc
from support import add_digits, request, save, string_bytes, strings_model, tensor, two_inputs_model

PIXELS = np.zeros((1, 64), dtype=np.float32)


@pytest.fixture
async def error_stub(repo: Path) -> AsyncIterator[pb_grpc.InferenceStub]:
    add_digits(repo)
    save(strings_model(), repo / "echo" / "1" / "model.onnx")
    save(two_inputs_model(), repo / "pair" / "1" / "model.onnx")
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"this is not an onnx file")
    settings = ServerSettings(
        model_repository=repo, port=0, metrics_port=-1, http_port=-1, max_message_bytes=1 << 20
    )
    server = SluiceServer(settings)
    await server.start()
    await server.loaded()
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield pb_grpc.InferenceStub(channel)
    await server.stop(0)


async def _error(stub: pb_grpc.InferenceStub, req: pb.PredictRequest) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Predict(req)
    return info.value


def _raw(name: str, datatype: int, shape: list[int], raw: bytes) -> pb.Tensor:
    return pb.Tensor(name=name, datatype=datatype, shape=shape, raw_contents=raw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("req", "code", "fragments"),
    [
        pytest.param(request("nope", pixels=PIXELS), grpc.StatusCode.NOT_FOUND, ["no model named 'nope'", "'digits'"],
                     id="unknown-model"),
        pytest.param(request("digits", version=7, pixels=PIXELS), grpc.StatusCode.NOT_FOUND,
                     ["no version 7", "it has 1"], id="unknown-version"),
        pytest.param(request("pair", a=np.zeros((1, 3), np.float32), ids=np.zeros(1, np.int64)),
                     grpc.StatusCode.INVALID_ARGUMENT, ["missing input 'b'", "expected FP32 [-1, 3]"], id="missing-input"),
        pytest.param(request("digits", pixels=PIXELS, extra=PIXELS), grpc.StatusCode.INVALID_ARGUMENT,
                     ["no input 'extra'", "'pixels' (FP32 [-1, 64])"], id="unknown-input"),
        pytest.param(request("digits", pixels=PIXELS.astype(np.float64)), grpc.StatusCode.INVALID_ARGUMENT,
                     ["input 'pixels': expected FP32 [-1, 64], got FP64 [1, 64]"], id="wrong-type"),
        pytest.param(request("digits", pixels=np.zeros(64, np.float32)), grpc.StatusCode.INVALID_ARGUMENT,
                     ["input 'pixels': expected FP32 [-1, 64], got FP32 [64]"], id="wrong-rank"),
        pytest.param(request("digits", pixels=np.zeros((1, 63), np.float32)), grpc.StatusCode.INVALID_ARGUMENT,
                     ["input 'pixels': expected FP32 [-1, 64], got FP32 [1, 63]"], id="wrong-dimension"),
        pytest.param(pb.PredictRequest(model="digits", inputs=[_raw("pixels", pb.DATA_TYPE_FP32, [1, 64], b"\0" * 255)]),
                     grpc.StatusCode.INVALID_ARGUMENT, ["FP32 [1, 64] needs 256 bytes", "got 255"], id="byte-length"),
        pytest.param(pb.PredictRequest(model="digits", inputs=[_raw("pixels", pb.DATA_TYPE_FP32, [0, 64], b"")]),
                     grpc.StatusCode.INVALID_ARGUMENT, ["batch (first) dimension must be at least 1, got 0"],
                     id="zero-rows"),
        pytest.param(pb.PredictRequest(model="echo", inputs=[_raw("text", pb.DATA_TYPE_STRING, [1, 2],
                                                                  string_bytes(b"ok") + b"\x09\0\0\0ab")]),
                     grpc.StatusCode.INVALID_ARGUMENT, ["input 'text': malformed STRING", "element 1 declares 9 bytes"],
                     id="malformed-string"),
        pytest.param(pb.PredictRequest(model="echo", inputs=[_raw("text", pb.DATA_TYPE_STRING, [1, 2],
                                                                  string_bytes(b"ok", b"\xff\xfe"))]),
                     grpc.StatusCode.INVALID_ARGUMENT, ["input 'text': element 1 is not valid UTF-8"], id="bad-utf8"),
        pytest.param(pb.PredictRequest(model="digits", inputs=[_raw("pixels", 0, [1, 64], b"")]),
                     grpc.StatusCode.INVALID_ARGUMENT, ["expected FP32 [-1, 64], got UNSPECIFIED [1, 64]"],
                     id="no-datatype"),
        pytest.param(request("pair", a=np.zeros((2, 3), np.float32), b=np.zeros((3, 3), np.float32),
                             ids=np.zeros(2, np.int64)),
                     grpc.StatusCode.INVALID_ARGUMENT, ["disagree on the batch", "'b' has 3"], id="rows-disagree"),
        pytest.param(request("broken", x=PIXELS), grpc.StatusCode.UNAVAILABLE,
                     ["model 'broken'", "not a valid ONNX model"], id="failed-model"),
        pytest.param(request("digits", pixels=np.zeros((65, 64), np.float32)), grpc.StatusCode.INVALID_ARGUMENT,
                     ["65 rows", "max_batch_size=64"], id="over-max-batch"),
    ],
)  # fmt: skip
async def test_caller_mistakes(
    error_stub: pb_grpc.InferenceStub, req: pb.PredictRequest, code: grpc.StatusCode, fragments: list[str]
) -> None:
    error = await _error(error_stub, req)
    assert error.code() == code, error.details()
    for fragment in fragments:
        assert fragment in (error.details() or ""), error.details()
    assert "Traceback" not in (error.details() or "")


async def test_unknown_output(error_stub: pb_grpc.InferenceStub) -> None:
    req = request("digits", pixels=PIXELS)
    req.outputs.append("logits")
    error = await _error(error_stub, req)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no output 'logits'; it gives 'label', 'probabilities'" in (error.details() or "")


async def test_bad_priority_parameter(error_stub: pb_grpc.InferenceStub) -> None:
    req = request("digits", pixels=PIXELS)
    req.parameters["priority"].string_value = "high"
    error = await _error(error_stub, req)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "parameter 'priority': expected an integer, got \"high\""


async def test_unknown_parameters_are_ignored(error_stub: pb_grpc.InferenceStub) -> None:
    req = request("digits", pixels=PIXELS)
    req.parameters["trace"].bool_value = True
    response = await error_stub.Predict(req)
    assert len(response.outputs) == 2


async def test_message_over_the_limit_names_the_setting(error_stub: pb_grpc.InferenceStub) -> None:
    rows = (1 << 20) // 256 + 1  # just over 1 MiB of FP32 [N, 64]
    error = await _error(error_stub, request("digits", pixels=np.zeros((rows, 64), np.float32)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_message_bytes" in (error.details() or "")


async def test_sparse_index_outside_shape(error_stub: pb_grpc.InferenceStub) -> None:
    sparse = pb.Tensor(
        name="pixels", datatype=pb.DATA_TYPE_FP32, shape=[1, 64],
        sparse=pb.SparseContents(indices=np.array([[0, 64]], "<i8").tobytes(), values=np.ones(1, "<f4").tobytes()),
    )  # fmt: skip
    error = await _error(error_stub, pb.PredictRequest(model="digits", inputs=[sparse]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sparse index [0, 64] (non-zero 0) lies outside the dense shape [1, 64]" in (error.details() or "")


async def test_server_survives_every_mistake(error_stub: pb_grpc.InferenceStub) -> None:
    garbage = [tensor("pixels", np.zeros((1, 64), np.float32))]
    garbage[0].shape[:] = [-5, 64]
    error = await _error(error_stub, pb.PredictRequest(model="digits", inputs=garbage))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    response = await error_stub.Predict(request("digits", pixels=PIXELS))
    assert len(response.outputs) == 2
