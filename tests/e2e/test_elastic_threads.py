"""Elastic threads: a CPU model that runs in worker threads runs a batch alone on all its threads, and under load
several batches at once on one thread each; every caller still gets its own rows."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort

from sluice.kserve.v2 import grpc_service_pb2 as kpb
from sluice.kserve.v2 import grpc_service_pb2_grpc as kpb_grpc
from sluice.server.config import ModelConfig
from sluice.server.plugins import PluginContext
from sluice.server.runtime import OnnxModel, OnnxOptions
from sluice.v1 import inference_pb2_grpc as pb_grpc
from support import add_digits, outputs, request, save, scrape, serving, slow_model

# Each request is its own run (policy none), always in a worker thread (inline_max_us = 0), on 2 threads
# whatever the machine has.
PLAIN = """
[batching]
max_batch_size = 256
policy = "none"

[execution]
intra_op_threads = 2
inline_max_us = 0
"""
ELASTIC = PLAIN + "elastic_threads = true\n"


def _slow(repo: Path, name: str, config: str) -> Path:
    model = save(slow_model(size=512, layers=24), repo / name / "1" / "model.onnx")
    (repo / name / "config.toml").write_text(config)
    return model


async def _instances(channel: grpc.aio.Channel, name: str) -> int:
    """The instance count a Triton client sees in the model's configuration."""
    config = await kpb_grpc.GRPCInferenceServiceStub(channel).ModelConfig(kpb.ModelConfigRequest(name=name))
    return int(config.config.instance_group[0].count)


async def test_two_batches_run_at_once_and_each_caller_gets_its_own_rows(repo: Path) -> None:
    path = _slow(repo, "slow", ELASTIC)
    rng = np.random.default_rng(3)
    inputs = [rng.standard_normal((256, 512)).astype(np.float32) for _ in range(4)]
    async with serving(repo, metrics=True) as (server, channel):
        assert await _instances(channel, "slow") == 2
        stub = pb_grpc.InferenceStub(channel)
        calls = [
            asyncio.ensure_future(stub.Predict(request("slow", id=str(i), x=x))) for i, x in enumerate(inputs)
        ]
        busy = 0.0
        while not all(call.done() for call in calls) and busy < 2:
            busy = max(busy, scrape(server).get('sluice_instances_busy{model="slow",version="1"}', 0.0))
            await asyncio.sleep(0.005)
        responses = await asyncio.gather(*calls)
    assert busy == 2, "the requests never ran two at a time"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for i, (x, response) in enumerate(zip(inputs, responses, strict=True)):
        assert response.id == str(i)
        (expected,) = session.run(None, {"x": x})
        np.testing.assert_allclose(outputs(response)["y"], expected, rtol=1e-4, atol=1e-4)


async def test_models_on_the_event_loop_or_without_elastic_threads_keep_one_instance(repo: Path) -> None:
    digits = add_digits(repo)  # fast enough to run on the event loop, where runs never overlap
    config = digits / "config.toml"
    # On CPU with two threads, so only its running on the event loop keeps it from elastic threads.
    text = config.read_text().replace('providers = "auto"', 'providers = "cpu"')
    config.write_text(text + "intra_op_threads = 2\nelastic_threads = true\n")
    _slow(repo, "plain", PLAIN)  # off unless asked for
    async with serving(repo) as (_, channel):
        assert await _instances(channel, "digits") == 1
        assert await _instances(channel, "plain") == 1


class _Held:
    """A session stand-in that records its runs and, while `hold` is clear, keeps them in flight."""

    def __init__(self, session: ort.InferenceSession, hold: threading.Event | None = None) -> None:
        self._sess = self
        self._core = session._sess
        self.hold = hold
        self.started = threading.Event()
        self.runs = 0

    def run(self, names: list[str], feeds: dict[str, Any], options: Any) -> Any:
        self.runs += 1
        self.started.set()
        if self.hold is not None:
            assert self.hold.wait(10)
        return self._core.run(names, feeds, options)


def _runtime(root: Path, **execution: int | bool) -> OnnxModel:
    """The `onnx` runtime on the slow model, loaded as the server loads it, with these execution settings."""
    if not (root / "slow").exists():
        _slow(root, "slow", "")
    config = ModelConfig.model_validate({"execution": execution})
    context = PluginContext(
        model="slow", version=1, model_dir=root / "slow", version_dir=root / "slow" / "1", config=config
    )
    return OnnxModel(OnnxOptions(), context)


def test_a_batch_alone_runs_on_every_thread_and_one_beside_it_on_one(tmp_path: Path) -> None:
    model = _runtime(tmp_path, intra_op_threads=2, elastic_threads=True)
    assert model.instances == 1
    assert model.tune(inline=False)
    assert model.instances == 2
    wide_hold, narrow_hold = threading.Event(), threading.Event()
    wide = _Held(model.sessions[0], wide_hold)
    narrow = _Held(model._narrow, narrow_hold)  # type: ignore[arg-type]
    model.sessions[0], model._narrow = wide, narrow  # type: ignore[assignment]
    feeds = {"x": np.ones((2, 512), np.float32)}

    def start(instance: int) -> threading.Thread:
        thread = threading.Thread(target=model.run, args=(instance, feeds))
        thread.start()
        return thread

    # Alone, instance 0 runs on the session with every thread; beside it, instance 1 on the one-thread one.
    first = start(0)
    assert wide.started.wait(10)
    second = start(1)
    assert narrow.started.wait(10)
    assert (wide.runs, narrow.runs) == (1, 1)
    # Instance 0 again while instance 1 still runs: not alone, so one thread too.
    wide_hold.set()
    first.join(10)
    third = start(0)
    for _ in range(1000):
        if narrow.runs == 2:
            break
        time.sleep(0.01)
    assert (wide.runs, narrow.runs) == (1, 2)
    narrow_hold.set()
    second.join(10)
    third.join(10)
    # Alone again: instance 0 is back on every thread; a warm-up of instance 1 alone warms the narrow one.
    model.run(0, feeds)
    model.run(1, feeds)
    assert (wide.runs, narrow.runs) == (2, 3)


def test_no_elastic_threads_unless_asked_with_one_instance_of_several_threads(tmp_path: Path) -> None:
    for execution in (
        {"intra_op_threads": 1, "elastic_threads": True},
        {"intra_op_threads": 2, "instances": 2, "elastic_threads": True},
        {"intra_op_threads": 2},
    ):
        model = _runtime(tmp_path, **execution)
        before = model.instances
        assert not model.tune(inline=False), execution
        assert model.instances == before


def test_a_model_on_the_event_loop_gets_no_second_session(tmp_path: Path) -> None:
    model = _runtime(tmp_path, intra_op_threads=2, elastic_threads=True)
    model.tune(inline=True)
    assert model.instances == 1
    assert model._narrow is None
