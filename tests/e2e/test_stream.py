"""StreamPredict: many requests on one stream, each answered once by id; a bad one never ends the stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import numpy as np
import onnxruntime as ort

from sluice.v1 import inference_pb2 as pb
from sluice.v1 import inference_pb2_grpc as pb_grpc
from support import DIGITS_ONNX, outputs, request


async def test_interleaved_ids_each_answered_once(stub: pb_grpc.InferenceStub) -> None:
    rng = np.random.default_rng(1)
    rows = {f"id-{i}": rng.integers(0, 17, size=(1 + i % 3, 64)).astype(np.float32) for i in range(60)}
    bad_ids = {"id-17", "id-42"}

    async def requests() -> AsyncIterator[pb.PredictRequest]:
        for rid, x in rows.items():
            if rid == "id-17":
                yield request("digits", id=rid, pixels=x.astype(np.float64))  # wrong type
            elif rid == "id-42":
                yield request("no-such-model", id=rid, pixels=x)
            else:
                yield request("digits", id=rid, pixels=x)
            if int(rid[3:]) % 10 == 0:
                await asyncio.sleep(0)  # let answers interleave with sending

    answers: dict[str, pb.StreamPredictResponse] = {}
    async for answer in stub.StreamPredict(requests()):
        assert answer.id not in answers, f"{answer.id} answered twice"
        answers[answer.id] = answer
    assert set(answers) == set(rows)

    session = ort.InferenceSession(str(DIGITS_ONNX), providers=["CPUExecutionProvider"])
    for rid, x in rows.items():
        answer = answers[rid]
        if rid in bad_ids:
            continue
        assert answer.code == 0, answer.message
        assert answer.response.id == rid
        np.testing.assert_array_equal(
            outputs(answer.response)["label"], session.run(["label"], {"pixels": x})[0]
        )
    assert answers["id-17"].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "expected FP32 [-1, 64], got FP64" in answers["id-17"].message
    assert answers["id-42"].code == grpc.StatusCode.NOT_FOUND.value[0]
    assert "no model named 'no-such-model'" in answers["id-42"].message


async def test_stream_answers_while_still_sending(stub: pb_grpc.InferenceStub) -> None:
    call = stub.StreamPredict()
    x = np.zeros((1, 64), np.float32)
    for i in range(3):
        await call.write(request("digits", id=str(i), pixels=x))
        answer = await call.read()
        assert isinstance(answer, pb.StreamPredictResponse)
        assert answer.id == str(i)
        assert answer.code == 0
    await call.done_writing()
    assert await call.read() == grpc.aio.EOF
