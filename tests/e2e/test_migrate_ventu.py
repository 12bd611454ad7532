"""Coming from Ventu: a class with pydantic request/response schemas and preprocess / batch_inference /
postprocess, dropped into a repository as it is and served with batching by a real server."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path

import grpc
import numpy as np
import pytest

from sluice.clients import AsyncClient, ClientOptions, Retry, SluiceError
from sluice.v1 import inference_pb2 as pb
from support import serving, signature

CONFIG = """
runtime = "python"
"""
# A fixed policy with a long window makes the batch certain: it runs when 4 requests are queued.
BATCHED = (
    CONFIG
    + """
[batching]
max_batch_size = 4
max_delay_ms = 10000
policy = "fixed"
"""
)

# Written as a Ventu user writes it (Ventu's base class passed the schemas to __init__ the same way).
MODEL = """
from pydantic import BaseModel, ConfigDict, Field


class Req(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"text": "warm up", "repeat": 2}]})

    text: str = Field(min_length=1)
    repeat: int = Field(default=1, ge=1, le=5)


class Resp(BaseModel):
    words: int
    shout: str
    batch: int
    first: str


class Model:
    def __init__(self):
        self.req_schema = Req
        self.resp_schema = Resp
        self.first = None  # the first text this object ever saw: the schema's example, at warm-up

    def preprocess(self, x: Req):
        self.first = self.first or x.text
        return (x.text.split(), x.repeat)

    def batch_inference(self, batch):
        return [(len(words) * repeat, " ".join(words).upper(), len(batch)) for words, repeat in batch]

    def postprocess(self, y):
        words, shout, size = y
        if shout == "BOOM":  # a bug in the class: an answer its own schema refuses
            return {"words": None, "shout": shout, "batch": size, "first": self.first}
        return Resp(words=words, shout=shout + "!", batch=size, first=self.first)
"""


def _repository(repo: Path, config: str = CONFIG) -> None:
    (repo / "shout" / "1").mkdir(parents=True)
    (repo / "shout" / "config.toml").write_text(config)
    (repo / "shout" / "1" / "model.py").write_text(textwrap.dedent(MODEL))


async def test_a_ventu_class_is_served_with_batching(repo: Path) -> None:
    _repository(repo, BATCHED)
    async with serving(repo) as (server, _), AsyncClient(server.address) as client:
        meta = await client.metadata("shout")
        texts = ["a b c", "hello", "one two", "x"]
        answers = await asyncio.gather(
            *(client.predict("shout", text=[t], repeat=np.array([2], dtype=np.int64)) for t in texts)
        )
    # The schemas are the signature: one row per request, a tensor per field.
    assert signature(meta.versions[0].inputs) == [
        ("text", pb.DATA_TYPE_STRING, [-1]),
        ("repeat", pb.DATA_TYPE_INT64, [-1]),
    ]
    assert signature(meta.versions[0].outputs) == [
        ("words", pb.DATA_TYPE_INT64, [-1]),
        ("shout", pb.DATA_TYPE_STRING, [-1]),
        ("batch", pb.DATA_TYPE_INT64, [-1]),
        ("first", pb.DATA_TYPE_STRING, [-1]),
    ]
    assert [a["words"].tolist() for a in answers] == [[6], [2], [4], [2]]
    assert [a["shout"].tolist() for a in answers] == [["A B C!"], ["HELLO!"], ["ONE TWO!"], ["X!"]]
    assert [a["batch"].tolist() for a in answers] == [[4]] * 4  # one batch_inference call for all four
    assert [a["first"].tolist() for a in answers] == [["warm up"]] * 4


async def test_the_schemas_example_warms_the_model_up(repo: Path) -> None:
    _repository(repo)
    async with serving(repo) as (server, _), AsyncClient(server.address) as client:
        health = await client.health("shout")
        answer = await client.predict("shout", text=["after"], repeat=np.array([1]))
    assert health.models[0].versions[0].state == pb.MODEL_STATE_READY
    assert answer["first"].tolist() == ["warm up"]


async def test_an_example_the_class_cannot_answer_fails_the_model_at_load(repo: Path) -> None:
    _repository(repo)
    model = repo / "shout" / "1" / "model.py"
    model.write_text(model.read_text().replace("return (x.text.split(), x.repeat)", "return 1 / 0"))
    once = ClientOptions(retry=Retry(attempts=1))  # UNAVAILABLE would be retried for seconds otherwise
    async with serving(repo) as (server, _), AsyncClient(server.address, once) as client:
        health = await client.health("shout")
        with pytest.raises(SluiceError) as caught:
            await client.predict("shout", text=["hello"], repeat=np.array([1]))
    version = health.models[0].versions[0]
    assert version.state == pb.MODEL_STATE_FAILED
    assert "Req example 0 (warm-up): ZeroDivisionError: division by zero" in version.reason
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


async def test_a_response_the_schema_refuses_fails_only_its_request(repo: Path) -> None:
    _repository(repo)
    async with serving(repo) as (server, _), AsyncClient(server.address) as client:
        good = await client.predict("shout", text=["fine"], repeat=np.array([1]))
        with pytest.raises(SluiceError) as caught:
            await client.predict("shout", text=["boom"], repeat=np.array([1]))
    assert good["shout"].tolist() == ["FINE!"]
    assert caught.value.code == grpc.StatusCode.INTERNAL
    assert "model 'shout'" in caught.value.message
    assert "Traceback" not in caught.value.message
