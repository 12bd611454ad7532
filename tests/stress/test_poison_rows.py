"""Poison rows under load: requests that make the model raise fail alone, and no other request is lost.

64 callers in closed loop send one row each to a `python`-runtime model that raises whenever a batch holds a
row carrying the poison marker. About 1% of the calls carry it. Every call is counted by id and final status.
"""

from __future__ import annotations

import asyncio
import logging
import re
import textwrap
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest

import support
from sluice.v1 import inference_pb2_grpc as pb_grpc
from support import outputs, request

CALLERS = 64
CALLS_PER_CALLER = 20
MARKED = 1.0  # x[:, 1] of a poison row; other rows carry 0

CONFIG = """
[runtime]
name = "python"

[batching]
max_batch_size = 16
max_delay_ms = 5
policy = "fixed"        # batches as full as the load allows, so poison rows share them with good ones

[execution]
instances = 2
"""
MODEL = """
class Model:
    inputs = [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}]
    outputs = [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}]

    def predict(self, batch):
        x = batch["x"]
        marked = x[:, 1] == 1
        if marked.any():
            raise ValueError(f"calls {x[marked, 0].astype(int).tolist()} carry the poison marker")
        return {"y": x * 2}  # [2 * call id, 0]: each answer names the call it belongs to
"""


def is_marked(call: int) -> bool:
    return call % 100 == 37  # 13 of the 1280 calls, spread over the callers and the run


async def test_poison_rows_fail_alone_and_no_other_call_fails(
    repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    version = repo / "poison" / "1"
    version.mkdir(parents=True)
    (repo / "poison" / "config.toml").write_text(CONFIG)
    (version / "model.py").write_text(textwrap.dedent(MODEL))
    statuses: dict[int, grpc.StatusCode] = {}
    wrong_answers: list[int] = []

    async def caller(stub: pb_grpc.InferenceStub, first: int) -> None:
        for call in range(first, first + CALLS_PER_CALLER):
            x = np.array([[call, MARKED if is_marked(call) else 0.0]], dtype=np.float32)
            try:
                response = await stub.Predict(request("poison", id=str(call), x=x), timeout=30)
            except grpc.aio.AioRpcError as error:
                statuses[call] = error.code()
                continue
            statuses[call] = grpc.StatusCode.OK
            if response.id != str(call) or outputs(response)["y"].tolist() != [[2.0 * call, 0.0]]:
                wrong_answers.append(call)

    with caplog.at_level(logging.WARNING, logger="sluice"):
        async with support.serving(repo) as (_, channel):
            stub = pb_grpc.InferenceStub(channel)
            await asyncio.wait_for(
                asyncio.gather(*(caller(stub, c * CALLS_PER_CALLER) for c in range(CALLERS))), 60
            )

    calls = CALLERS * CALLS_PER_CALLER
    marked = {call for call in range(calls) if is_marked(call)}
    assert len(statuses) == calls  # every call ended, with a status
    assert {statuses[call] for call in marked} == {grpc.StatusCode.INTERNAL}
    good = Counter(statuses[call].name for call in range(calls) if call not in marked)
    assert good == {"OK": calls - len(marked)}  # 0 unmarked calls failed
    assert wrong_answers == []
    # The poison rows did share batches with good ones, which re-running answered.
    rescued = [
        int(found.group(1))
        for record in caplog.records
        if record.name == "sluice.batcher" and (found := re.search(r"(\d+) rescued", record.getMessage()))
    ]
    assert sum(rescued) > 0
