"""Batching through the real server: concurrent callers share runs, each gets exactly its own rows back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from sluice.server.app import SluiceServer
from sluice.server.settings import ServerSettings
from sluice.v1 import inference_pb2_grpc as pb_grpc
from support import DIGITS_ONNX, add_digits, doubler_model, outputs, request, save, scrape, slow_model


@pytest.fixture
async def served(repo: Path) -> AsyncIterator[SluiceServer]:
    model = add_digits(repo)
    # A fixed window makes batching certain whatever the machine's speed; adaptive is covered by unit tests
    # and the benchmark.
    (model / "config.toml").write_text(
        '[batching]\nmax_batch_size = 64\nmax_delay_ms = 50\npolicy = "fixed"\n'
    )
    save(slow_model(layers=96), repo / "slow" / "1" / "model.onnx")
    # One instance, whatever the cores: the test holds it busy with one request and queues the next.
    (repo / "slow" / "config.toml").write_text(
        "[batching]\nmax_batch_size = 256\nmax_queue_rows = 300\n\n[execution]\nelastic_threads = false\n"
    )
    server = SluiceServer(ServerSettings(model_repository=repo, port=0, metrics_port=0, http_port=-1))
    await server.start()
    await server.loaded()
    yield server
    await server.stop(0)


async def test_concurrent_callers_are_batched_and_get_their_own_rows(served: SluiceServer) -> None:
    rng = np.random.default_rng(7)
    inputs = [rng.integers(0, 17, size=(1 + i % 4, 64)).astype(np.float32) for i in range(96)]
    async with grpc.aio.insecure_channel(served.address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        responses = await asyncio.gather(
            *(stub.Predict(request("digits", id=str(i), pixels=x)) for i, x in enumerate(inputs))
        )
    session = ort.InferenceSession(str(DIGITS_ONNX), providers=["CPUExecutionProvider"])
    for i, (x, response) in enumerate(zip(inputs, responses, strict=True)):
        assert response.id == str(i)
        label, probabilities = session.run(None, {"pixels": x})
        got = outputs(response)
        np.testing.assert_array_equal(got["label"], label)
        np.testing.assert_allclose(got["probabilities"], probabilities, rtol=1e-5, atol=1e-6)

    metrics = scrape(served)
    rows = metrics['sluice_batch_rows_sum{model="digits",version="1"}']
    batches = metrics['sluice_batch_rows_count{model="digits",version="1"}']
    assert rows == sum(len(x) for x in inputs)
    assert batches < len(inputs), f"{batches} batches for {len(inputs)} requests: nothing was batched"
    assert metrics['sluice_requests_total{code="OK",method="Predict",model="digits",version="1"}'] == len(
        inputs
    )
    assert metrics['sluice_queue_rows{model="digits",version="1"}'] == 0
    # The batch size the measured cost curve allows: within the model's max_batch_size (64).
    assert 1 <= metrics['sluice_batch_limit_rows{model="digits",version="1"}'] <= 64
    # How long a batch may wait for company on a saturated loop: a fixed window's is its max_delay_ms.
    assert metrics['sluice_batch_wait_cap_seconds{model="digits",version="1"}'] == pytest.approx(0.05)


async def _until(server: SluiceServer, sample: str, at_least: float) -> None:
    """Polls the metrics endpoint (another thread's view, so there is no event to await) until a sample
    reaches a value."""
    for _ in range(2000):
        if scrape(server).get(sample, 0) >= at_least:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"{sample} never reached {at_least}")


async def test_queue_full_and_deadline_while_the_model_is_busy(served: SluiceServer) -> None:
    big = np.ones((256, 1024), np.float32)
    async with grpc.aio.insecure_channel(served.address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        running = asyncio.ensure_future(stub.Predict(request("slow", id="running", x=big)))
        await _until(served, 'sluice_instances_busy{model="slow",version="1"}', 1)
        queued = asyncio.ensure_future(stub.Predict(request("slow", id="queued", x=big)))
        # The queue holds 300 rows: 256 are waiting, so 64 more do not fit.
        await _until(served, 'sluice_queue_rows{model="slow",version="1"}', 256)
        with pytest.raises(grpc.aio.AioRpcError) as full:
            await stub.Predict(request("slow", x=big[:64]))
        assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_queue_rows=300" in (full.value.details() or "")

        with pytest.raises(grpc.aio.AioRpcError) as late:
            await stub.Predict(request("slow", id="late", x=big[:1]), timeout=0.3)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

        assert (await running).id == "running"
        assert (await queued).id == "queued"
    metrics = scrape(served)
    # Only the two accepted requests ever ran; the late one was dropped before its batch formed.
    assert metrics['sluice_batch_rows_sum{model="slow",version="1"}'] == 512
    assert metrics['sluice_rejected_total{model="slow",reason="queue_full",version="1"}'] == 1
    dropped = sum(v for k, v in metrics.items() if k.startswith('sluice_dropped_total{model="slow"'))
    assert dropped == 1
    assert metrics['sluice_queue_rows{model="slow",version="1"}'] == 0
    assert metrics['sluice_instances_busy{model="slow",version="1"}'] == 0


async def test_padded_requests_batch_together_and_get_their_own_lengths(repo: Path) -> None:
    save(doubler_model(), repo / "doubler" / "1" / "model.onnx")
    (repo / "doubler" / "config.toml").write_text(
        '[batching]\nmax_batch_size = 16\nmax_delay_ms = 50\npolicy = "fixed"\n'
        '[inputs.x]\npad = { axis = 1, dim = "length", value = 0 }\n'
        '[outputs.y]\ncrop = { axis = 1, dim = "length" }\n'
    )
    server = SluiceServer(ServerSettings(model_repository=repo, port=0, metrics_port=0, http_port=-1))
    await server.start()
    await server.loaded()
    try:
        inputs = [np.arange(1, 1 + length, dtype=np.float32)[None, :] for length in (3, 7, 1, 5)]
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.InferenceStub(channel)
            responses = await asyncio.gather(*(stub.Predict(request("doubler", x=x)) for x in inputs))
        for x, response in zip(inputs, responses, strict=True):
            np.testing.assert_array_equal(outputs(response)["y"], 2 * x)
        metrics = scrape(server)
        assert metrics['sluice_batch_rows_count{model="doubler",version="1"}'] < len(inputs), (
            "lengths were not batched"
        )
    finally:
        await server.stop(0)
