"""The Python clients against a real server: numpy in and out, errors, retries, streams."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from sluice.clients import AsyncClient, Client, ClientOptions, QueueClient, Retry, SluiceError, build_request
from sluice.server.app import SluiceServer
from sluice.server.settings import ServerSettings
from support import DIGITS_ONNX, add_digits, add_model, save

ROWS = np.random.default_rng(3).integers(0, 17, size=(5, 64)).astype(np.float32)


def _expected(rows: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(DIGITS_ONNX), providers=["CPUExecutionProvider"])
    label, probabilities = session.run(None, {"pixels": rows})
    return {"label": label, "probabilities": probabilities}


async def test_async_client_predicts_numpy(server: SluiceServer) -> None:
    async with AsyncClient(server.address) as client:
        got = await client.predict("digits", pixels=ROWS)
        only = await client.predict("digits", pixels=ROWS[:1], outputs=["label"], priority=3, timeout=10)
        meta = await client.metadata("digits")
    expected = _expected(ROWS)
    np.testing.assert_array_equal(got["label"], expected["label"])
    np.testing.assert_allclose(got["probabilities"], expected["probabilities"], rtol=1e-6)
    assert list(only) == ["label"]
    assert [i.name for i in meta.versions[0].inputs] == ["pixels"]


async def test_blocking_client_predicts_and_streams(server: SluiceServer) -> None:
    def work() -> tuple[dict[str, np.ndarray], list[tuple[str, bool]]]:
        with Client(server.address) as client:
            got = client.predict("digits", pixels=ROWS)
            requests = [
                build_request("digits", {"pixels": ROWS[i : i + 1]}, request_id=str(i)) for i in range(5)
            ]
            requests.insert(2, build_request("nope", {"pixels": ROWS[:1]}, request_id="bad"))
            answers = [(r.id, r.error is None) for r in client.stream(requests)]
        return got, answers

    got, answers = await asyncio.to_thread(work)
    np.testing.assert_array_equal(got["label"], _expected(ROWS)["label"])
    assert sorted(answers) == sorted([(str(i), True) for i in range(5)] + [("bad", False)])


async def test_async_stream_matches_answers_to_requests(server: SluiceServer) -> None:
    async with AsyncClient(server.address) as client:
        requests = [
            build_request("digits", {"pixels": ROWS[i : i + 1]}, request_id=f"r{i}") for i in range(5)
        ]
        results = {r.id: r async for r in client.stream(requests)}
    expected = _expected(ROWS)["label"]
    for i in range(5):
        result = results[f"r{i}"]
        assert result.outputs is not None
        assert result.outputs["label"][0] == expected[i]


async def test_errors_carry_status_and_message(server: SluiceServer) -> None:
    async with AsyncClient(server.address) as client:
        with pytest.raises(SluiceError) as info:
            await client.predict("digits", pixels=ROWS.astype(np.float64))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "expected FP32 [-1, 64], got FP64 [5, 64]" in info.value.message


async def test_unavailable_is_retried_then_reported(repo: Path) -> None:
    add_digits(repo)
    save(add_model(1.0), repo / "adder" / "2" / "model.onnx")
    (repo / "adder" / "config.toml").write_text("versions = [1]\n")  # no directory 1: the model fails
    server = SluiceServer(ServerSettings(model_repository=repo, port=0, metrics_port=0, http_port=-1))
    await server.start()
    await server.loaded()
    try:
        options = ClientOptions(retry=Retry(attempts=3, initial=0.001))
        async with AsyncClient(server.address, options) as client:
            with pytest.raises(SluiceError) as info:
                await client.predict("adder", x=np.zeros((1, 4), np.float32))
            pinned = await client.predict("digits", version=1, pixels=ROWS[:1])
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        assert "no directory for version(s) [1]" in info.value.message
        assert server.metrics.requests[("adder", "", "Predict", "UNAVAILABLE")] == 3
        assert pinned["label"].shape == (1,)
    finally:
        await server.stop(0)


async def test_queue_client_enqueue_query_dequeue(server: SluiceServer) -> None:
    def work() -> tuple[np.ndarray, dict[str, bool], str]:
        with QueueClient(server.address, "digits") as queue:
            for i in range(5):
                queue.enqueue(f"img-{i}", pixels=ROWS[i : i + 1])
            queue.enqueue("bad", pixels=ROWS[:1].astype(np.float64))
            first = queue.query("img-0", timeout=10)["label"]
            with pytest.raises(SluiceError) as info:
                queue.query("bad", timeout=10)
            for i in range(1, 5):
                queue.query(f"img-{i}", timeout=10)
            queue.enqueue("late", pixels=ROWS[:1])
            queue.query("late", timeout=10)
            queue.enqueue("last", pixels=ROWS[:1])
        with QueueClient(server.address, "digits") as again:
            again.enqueue("x", pixels=ROWS[:1])
            again.query("x", timeout=10)
            again.enqueue("y", pixels=ROWS[:1])
        left = again.dequeue()
        return first, {uri: r.error is None for uri, r in left.items()}, info.value.code.name

    first, left, bad_code = await asyncio.to_thread(work)
    assert first[0] == _expected(ROWS[:1])["label"][0]
    assert bad_code == "INVALID_ARGUMENT"
    assert left == {"y": True}  # answered before close returned, kept until dequeued
