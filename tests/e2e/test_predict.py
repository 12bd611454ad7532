"""Predictions through a real server equal the ONNX session's own, and the example model is accurate."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from sluice.server.app import SluiceServer
from sluice.server.settings import ServerSettings
from sluice.v1 import inference_pb2 as pb
from sluice.v1 import inference_pb2_grpc as pb_grpc
from support import (
    DIGITS_ONNX,
    add_digits,
    add_model,
    outputs,
    request,
    save,
    strings_model,
    tensor,
    train_digits_module,
)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    _, x_test, _, y_test = train_digits_module().held_out_split()
    return x_test, y_test


async def test_outputs_equal_the_onnx_session(
    stub: pb_grpc.InferenceStub, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = digits
    session = ort.InferenceSession(str(DIGITS_ONNX), providers=["CPUExecutionProvider"])
    for rows in (x[:1], x[1:4], x[4:68]):
        response = await stub.Predict(request("digits", id="r1", pixels=rows))
        label, probabilities = session.run(None, {"pixels": rows})
        got = outputs(response)
        assert response.id == "r1"
        assert response.model == "digits"
        assert response.model_version == 1
        assert [t.name for t in response.outputs] == ["label", "probabilities"]
        np.testing.assert_array_equal(got["label"], label)
        np.testing.assert_allclose(got["probabilities"], probabilities, rtol=1e-6, atol=1e-7)


async def test_held_out_accuracy_through_the_server(
    stub: pb_grpc.InferenceStub, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = digits
    predicted = []
    for start in range(0, len(x), 64):
        response = await stub.Predict(request("digits", pixels=x[start : start + 64]))
        predicted.append(outputs(response)["label"])
    accuracy = float((np.concatenate(predicted) == y).mean())
    assert accuracy >= 0.95, f"held-out accuracy {accuracy:.3f}"


async def test_selected_outputs_only(
    stub: pb_grpc.InferenceStub, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    req = request("digits", pixels=digits[0][:2])
    req.outputs.extend(["probabilities"])
    response = await stub.Predict(req)
    assert [t.name for t in response.outputs] == ["probabilities"]
    assert list(response.outputs[0].shape) == [2, 10]


async def test_sparse_input_is_densified(
    stub: pb_grpc.InferenceStub, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    rows = digits[0][:3]
    dense = await stub.Predict(request("digits", pixels=rows))
    indices = np.argwhere(rows != 0).astype("<i8")
    sparse = pb.Tensor(
        name="pixels",
        datatype=pb.DATA_TYPE_FP32,
        shape=rows.shape,
        sparse=pb.SparseContents(indices=indices.tobytes(), values=rows[rows != 0].astype("<f4").tobytes()),
    )
    response = await stub.Predict(pb.PredictRequest(model="digits", inputs=[sparse]))
    np.testing.assert_array_equal(outputs(response)["probabilities"], outputs(dense)["probabilities"])


async def _serve(repo: Path, **kw: object) -> SluiceServer:
    server = SluiceServer(ServerSettings(model_repository=repo, port=0, metrics_port=-1, http_port=-1, **kw))  # type: ignore[arg-type]
    await server.start()
    await server.loaded()
    return server


async def test_version_pinning(repo: Path) -> None:
    save(add_model(1.0), repo / "adder" / "1" / "model.onnx")
    save(add_model(2.0), repo / "adder" / "2" / "model.onnx")
    (repo / "adder" / "config.toml").write_text('versions = "all"\n')
    server = await _serve(repo)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.InferenceStub(channel)
            x = np.zeros((1, 4), dtype=np.float32)
            latest = await stub.Predict(request("adder", x=x))
            pinned = await stub.Predict(request("adder", version=1, x=x))
            assert latest.model_version == 2
            np.testing.assert_array_equal(outputs(latest)["y"], np.full((1, 4), 2.0, dtype=np.float32))
            assert pinned.model_version == 1
            np.testing.assert_array_equal(outputs(pinned)["y"], np.full((1, 4), 1.0, dtype=np.float32))
    finally:
        await server.stop(0)


async def test_strings_round_trip(repo: Path) -> None:
    save(strings_model(), repo / "echo" / "1" / "model.onnx")
    server = await _serve(repo)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.InferenceStub(channel)
            text = np.array([["héllo", ""], ["wörld", "x" * 300]], dtype=object)
            response = await stub.Predict(pb.PredictRequest(model="echo", inputs=[tensor("text", text)]))
            echo = outputs(response)["echo"]
            assert echo.shape == (2, 2)
            assert echo.tolist() == text.tolist()
    finally:
        await server.stop(0)


async def test_unix_socket(repo: Path, tmp_path: Path) -> None:
    add_digits(repo)
    socket = tmp_path / "sluice.sock"
    server = await _serve(repo, unix_socket=str(socket))
    try:
        async with grpc.aio.insecure_channel(f"unix:{socket}") as channel:
            stub = pb_grpc.InferenceStub(channel)
            response = await stub.Predict(request("digits", pixels=np.zeros((1, 64), dtype=np.float32)))
            assert outputs(response)["label"].shape == (1,)
    finally:
        await server.stop(0)
