"""Health tells the truth: ready models with their signatures, failed ones with the reason."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from sluice.server.app import SluiceServer
from sluice.server.runtime import cuda_unavailable_reason
from sluice.server.settings import ServerSettings
from sluice.v1 import inference_pb2 as pb
from sluice.v1 import inference_pb2_grpc as pb_grpc
from support import add_digits, add_model, request, save


async def test_bundled_model_is_ready(stub: pb_grpc.InferenceStub) -> None:
    health = await stub.Health(pb.HealthRequest())
    assert health.state == pb.SERVING_STATE_SERVING
    (digits,) = [m for m in health.models if m.name == "digits"]
    assert digits.state == pb.MODEL_STATE_READY
    (version,) = digits.versions
    assert version.version == 1
    assert version.state == pb.MODEL_STATE_READY
    assert [(i.name, i.datatype, list(i.shape)) for i in version.inputs] == [
        ("pixels", pb.DATA_TYPE_FP32, [-1, 64])
    ]
    assert [o.name for o in version.outputs] == ["label", "probabilities"]
    assert version.max_batch_size == 64
    assert "CPUExecutionProvider" in version.providers


async def _serve(repo: Path) -> SluiceServer:
    server = SluiceServer(ServerSettings(model_repository=repo, port=0, metrics_port=-1, http_port=-1))
    await server.start()
    await server.loaded()
    return server


def _statuses(health: pb.HealthResponse) -> dict[str, pb.ModelStatus]:
    return {m.name: m for m in health.models}


async def test_broken_models_fail_alone_with_their_reason(repo: Path) -> None:
    add_digits(repo)
    bad_config = add_digits(repo, "bad_config")
    (bad_config / "config.toml").write_text("[batching]\nmax_batch_size = -1\n")
    bad_toml = add_digits(repo, "bad_toml")
    (bad_toml / "config.toml").write_text("[batching\n")
    (repo / "not_onnx" / "1").mkdir(parents=True)
    (repo / "not_onnx" / "1" / "model.onnx").write_bytes(b"\x00garbage")
    (repo / "empty").mkdir()
    save(add_model(1.0), repo / "half" / "1" / "model.onnx")
    (repo / "half" / "config.toml").write_text('versions = "all"\n')
    (repo / "half" / "2").mkdir()
    (repo / "half" / "2" / "model.onnx").write_bytes(b"broken")
    server = await _serve(repo)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.InferenceStub(channel)
            health = await stub.Health(pb.HealthRequest())
            assert health.state == pb.SERVING_STATE_SERVING
            models = _statuses(health)
            assert models["digits"].state == pb.MODEL_STATE_READY

            failed = models["bad_config"]
            assert failed.state == pb.MODEL_STATE_FAILED
            assert "bad_config/config.toml" in failed.reason
            assert str(repo) not in failed.reason
            assert "field 'batching.max_batch_size'" in failed.reason
            assert "greater than or equal to 0" in failed.reason
            assert "invalid TOML" in models["bad_toml"].reason
            assert "not a valid ONNX model" in models["not_onnx"].reason
            assert models["not_onnx"].versions[0].state == pb.MODEL_STATE_FAILED
            assert "no version directory" in models["empty"].reason

            # A broken newer version: the older one serves, Health shows both.
            half = models["half"]
            assert half.state == pb.MODEL_STATE_READY
            assert [(v.version, v.state) for v in half.versions] == [
                (2, pb.MODEL_STATE_FAILED), (1, pb.MODEL_STATE_READY)
            ]  # fmt: skip
            assert "not a valid ONNX model" in half.versions[0].reason
            answer = await stub.Predict(request("half", x=np.zeros((1, 4), np.float32)))
            assert answer.model_version == 1

            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Predict(request("bad_config", pixels=np.zeros((1, 64), np.float32)))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "field 'batching.max_batch_size'" in (info.value.details() or "")

            one = await stub.Health(pb.HealthRequest(model="digits"))
            assert [m.name for m in one.models] == ["digits"]
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Health(pb.HealthRequest(model="nope"))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await server.stop(0)


async def test_nothing_loads_is_not_serving(repo: Path) -> None:
    (repo / "empty").mkdir()
    server = await _serve(repo)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            health = await pb_grpc.InferenceStub(channel).Health(pb.HealthRequest())
            assert health.state == pb.SERVING_STATE_NOT_SERVING
    finally:
        await server.stop(0)


@pytest.mark.skipif(
    cuda_unavailable_reason() is None, reason="CUDA works here; this checks the CPU-only case"
)
async def test_model_requiring_cuda_fails_without_it(repo: Path) -> None:
    model = add_digits(repo)
    (model / "config.toml").write_text('[execution]\nproviders = "cuda"\n')
    server = await _serve(repo)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            health = await pb_grpc.InferenceStub(channel).Health(pb.HealthRequest())
            (digits,) = health.models
            assert digits.state == pb.MODEL_STATE_FAILED
            assert "execution.providers = 'cuda' but CUDA is unavailable" in digits.reason
    finally:
        await server.stop(0)


async def test_config_renames_and_constrains(repo: Path) -> None:
    model = add_digits(repo)
    (model / "config.toml").write_text(
        '[inputs.pixels]\nname = "image"\nshape = [-1, 64]\n[outputs.label]\nname = "digit"\n'
    )
    server = await _serve(repo)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.InferenceStub(channel)
            response = await stub.Predict(request("digits", image=np.zeros((2, 64), np.float32)))
            assert [t.name for t in response.outputs] == ["digit", "probabilities"]
    finally:
        await server.stop(0)
