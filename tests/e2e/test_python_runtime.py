"""The built-in `python` runtime: a class of yours with load/predict(batch), served and batched like ONNX."""

from __future__ import annotations

import asyncio
import logging
import pickle
import textwrap
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest

import support
from sluice.kserve.v2 import grpc_service_pb2 as kpb
from sluice.kserve.v2 import grpc_service_pb2_grpc as kpb_grpc
from sluice.server.app import SluiceServer
from sluice.server.settings import ServerSettings
from sluice.v1 import inference_pb2 as pb
from sluice.v1 import inference_pb2_grpc as pb_grpc
from support import failure, outputs, request, signature, train_digits_module

# Signature from the runtime options; the batch (first) dimension is free, so Sluice batches it. A fixed
# policy with a long window makes the batches certain: they run when 4 rows are queued.
BATCHED_CONFIG = """
[runtime]
name = "python"
inputs = [{ name = "x", datatype = "FP32", shape = [-1, 2] }]
outputs = [
    { name = "y", datatype = "FP32", shape = [-1, 2] },
    { name = "rows", datatype = "INT64", shape = [-1] },
]

[batching]
max_batch_size = 4
max_delay_ms = 10000
policy = "fixed"
"""
BATCHED = """
import numpy as np


class Model:
    def predict(self, batch):
        x = batch["x"]
        # Each row learns how many rows its batch had.
        return {"y": x * 3, "rows": np.full(len(x), len(x), dtype=np.int64)}
"""

# Signature from class attributes (tables or TensorSpecs), STRING tensors, and a class defined in model.py
# that pickle finds again by its module name.
SHOUT = """
import dataclasses
import pickle

from sluice.server.plugins import TensorSpec


@dataclasses.dataclass(frozen=True)
class Settings:
    suffix: str


class Shout:
    inputs = [{"name": "text", "datatype": "STRING", "shape": [-1]}]
    outputs = [TensorSpec.of("loud", "STRING", [-1]), {"name": "length", "datatype": "INT32", "shape": [-1]}]

    def load(self, path):
        self.settings = pickle.loads(pickle.dumps(Settings((path / "suffix.txt").read_text())))

    def predict(self, batch):
        text = batch["text"]
        # Plain lists: the runtime makes arrays of them, INT64 lengths become the declared INT32.
        return {"loud": [t.upper() + self.settings.suffix for t in text], "length": [len(t) for t in text]}
"""

FLAKY = """
class Model:
    inputs = [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}]
    outputs = [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}]

    def predict(self, batch):
        x = batch["x"]
        if (x == 13).any():
            raise ValueError("13 in the batch")
        if (x == 7).any():
            return {"z": x}
        if (x == 5).any():
            return {"y": x.astype(str)}
        return {"y": x + 1}
"""

SKLEARN = """
import pickle


class Model:
    def load(self, path):
        with open(path / "classifier.pkl", "rb") as file:
            self.classifier = pickle.load(file)

    def predict(self, batch):
        pixels = batch["pixels"]
        return {
            "label": self.classifier.predict(pixels),
            "probabilities": self.classifier.predict_proba(pixels),  # FP64, declared FP32
        }
"""
SKLEARN_CONFIG = """
[runtime]
name = "python"
inputs = [{ name = "pixels", datatype = "FP32", shape = [-1, 64] }]
outputs = [
    { name = "label", datatype = "INT64", shape = [-1] },
    { name = "probabilities", datatype = "FP32", shape = [-1, 10] },
]
"""

PYTHON = '[runtime]\nname = "python"\n'
SIGNATURE = """
    inputs = [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}]
    outputs = [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}]
"""


def add(repo: Path, name: str, config: str, code: str | None) -> Path:
    """A model directory: config.toml, and version 1 holding model.py (unless `code` is None)."""
    version = repo / name / "1"
    version.mkdir(parents=True)
    (repo / name / "config.toml").write_text(config)
    if code is not None:
        (version / "model.py").write_text(textwrap.dedent(code))
    return version


@asynccontextmanager
async def serving(repo: Path) -> AsyncIterator[tuple[pb_grpc.InferenceStub, dict[str, pb.ModelStatus]]]:
    """A server on `repo`: a stub, and every model's status once loading has ended."""
    async with support.serving(repo) as (_, channel):
        stub = pb_grpc.InferenceStub(channel)
        health = await stub.Health(pb.HealthRequest())
        yield stub, {m.name: m for m in health.models}


async def test_a_class_is_served_and_batched(repo: Path) -> None:
    add(repo, "batched", BATCHED_CONFIG, BATCHED)
    shout = add(repo, "shout", PYTHON + 'class = "Shout"\n', SHOUT)
    (shout / "suffix.txt").write_text("!")
    async with serving(repo) as (stub, models):
        (batched,) = models["batched"].versions
        assert batched.state == pb.MODEL_STATE_READY
        assert signature(batched.inputs) == [("x", pb.DATA_TYPE_FP32, [-1, 2])]
        assert signature(batched.outputs) == [
            ("y", pb.DATA_TYPE_FP32, [-1, 2]),
            ("rows", pb.DATA_TYPE_INT64, [-1]),
        ]
        assert list(batched.providers) == ["python"]
        assert batched.max_batch_size == 4

        xs = [np.array([[i, -i]], dtype=np.float32) for i in range(8)]
        responses = await asyncio.gather(
            *(stub.Predict(request("batched", id=str(i), x=x)) for i, x in enumerate(xs))
        )
        for i, (x, response) in enumerate(zip(xs, responses, strict=True)):
            got = outputs(response)
            assert response.id == str(i)
            np.testing.assert_array_equal(got["y"], x * 3)
            assert got["rows"].tolist() == [4]  # 8 concurrent one-row requests ran as 2 batches of 4

        (shouted,) = models["shout"].versions
        assert signature(shouted.inputs) == [("text", pb.DATA_TYPE_STRING, [-1])]
        assert signature(shouted.outputs) == [
            ("loud", pb.DATA_TYPE_STRING, [-1]),
            ("length", pb.DATA_TYPE_INT32, [-1]),
        ]
        response = await stub.Predict(request("shout", text=np.array(["hey", "sluice"], dtype=object)))
        assert [(t.name, t.datatype) for t in response.outputs] == [
            ("loud", pb.DATA_TYPE_STRING),
            ("length", pb.DATA_TYPE_INT32),
        ]
        got = outputs(response)
        assert got["loud"].tolist() == ["HEY!", "SLUICE!"]
        assert got["length"].tolist() == [3, 6]


async def test_models_that_cannot_load_fail_with_the_reason(repo: Path) -> None:
    add(repo, "no_file", PYTHON, None)
    add(repo, "no_class", PYTHON, "class Other:\n    pass\n")
    add(repo, "no_signature", PYTHON, "class Model:\n    def predict(self, batch):\n        return batch\n")
    add(repo, "import_fails", PYTHON, "import sluice_no_such_module\n")
    load_raises = (
        "class Model:"
        + SIGNATURE
        + """
    def load(self, path):
        raise FileNotFoundError(f"{path.name}/weights.bin is missing")

    def predict(self, batch):
        return batch
"""
    )
    add(repo, "load_raises", PYTHON, load_raises)
    add(repo, "no_predict", PYTHON, "class Model:" + SIGNATURE)
    bad_table = 'inputs = [{ name = "x", datatype = "FP8", shape = [-1] }]\n'
    add(repo, "bad_table", PYTHON + bad_table, "class Model:" + SIGNATURE)
    add(repo, "ok", PYTHON, FLAKY)
    async with serving(repo) as (stub, models):
        expected = {
            "no_file": ["1/model.py: no such file (runtime option 'module')"],
            "no_class": ["model.py has no class 'Model' (runtime option 'class')"],
            "no_signature": [
                "the python model's inputs are not declared",
                "runtime option 'inputs'",
                "Model.inputs",
            ],
            "import_fails": ["model.py: importing failed: ModuleNotFoundError", "sluice_no_such_module"],
            "load_raises": ["Model: loading failed: FileNotFoundError: 1/weights.bin is missing"],
            "no_predict": ["Model has no predict(batch) method"],
            "bad_table": ["runtime ('python')", "field 'inputs.0.datatype'", "unknown datatype 'FP8'"],
        }
        for name, parts in expected.items():
            assert models[name].state == pb.MODEL_STATE_FAILED, name
            for part in parts:
                assert part in models[name].reason, (name, part, models[name].reason)
        assert models["ok"].state == pb.MODEL_STATE_READY
        error = await failure(stub, request("load_raises", x=np.zeros((1, 2), np.float32)))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "weights.bin is missing" in (error.details() or "")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (13, "ValueError: 13 in the batch"),
        (7, "Model.predict returned no output 'y' (it returned 'z')"),
        (5, "Model.predict returned output 'y' as numpy <U32 [1, 2]; it is declared FP32 [-1, 2]"),
    ],
    ids=["raises", "missing-output", "wrong-kind"],
)
async def test_a_failing_predict_is_internal_and_the_model_keeps_serving(
    repo: Path, caplog: pytest.LogCaptureFixture, value: int, message: str
) -> None:
    add(repo, "flaky", PYTHON, FLAKY)
    async with serving(repo) as (stub, _):
        with caplog.at_level(logging.ERROR, logger="sluice"):
            error = await failure(stub, request("flaky", x=np.array([[1, value]], np.float32)))
        assert error.code() == grpc.StatusCode.INTERNAL
        # The caller learns which model failed; what it raised stays in the server log.
        assert (
            error.details()
            == "model 'flaky' failed to run this request's batch; the server log has the details"
        )
        assert message in caplog.text
        assert "Traceback" in caplog.text
        if value == 13:
            assert "ValueError: 13 in the batch" in caplog.text
        responses = await asyncio.gather(
            *(stub.Predict(request("flaky", x=np.full((2, 2), i, np.float32))) for i in (1, 2, 3))
        )
        for i, response in zip((1, 2, 3), responses, strict=True):
            np.testing.assert_array_equal(outputs(response)["y"], np.full((2, 2), i + 1, np.float32))


async def test_a_scikit_learn_model_is_served_without_onnx(repo: Path) -> None:
    from sklearn.linear_model import LogisticRegression  # imported here: slow, and only this test needs it
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import MinMaxScaler

    x_train, x_test, y_train, y_test = train_digits_module().held_out_split()
    classifier = make_pipeline(MinMaxScaler(), LogisticRegression(solver="newton-cg", tol=1e-3))
    classifier.fit(x_train.astype(np.float64), y_train)  # trained in FP64: predict_proba then gives FP64
    version = add(repo, "digits", SKLEARN_CONFIG, SKLEARN)
    (version / "classifier.pkl").write_bytes(pickle.dumps(classifier))
    async with serving(repo) as (stub, models):
        assert models["digits"].state == pb.MODEL_STATE_READY, models["digits"].reason
        chunks = np.array_split(np.arange(len(x_test)), 18)
        responses = await asyncio.gather(
            *(stub.Predict(request("digits", pixels=x_test[rows])) for rows in chunks)
        )
    label = np.concatenate([outputs(r)["label"] for r in responses])
    probabilities = np.concatenate([outputs(r)["probabilities"] for r in responses])
    assert (label == y_test).mean() >= 0.93
    np.testing.assert_array_equal(label, classifier.predict(x_test))
    assert probabilities.dtype == np.float32  # as declared, though predict_proba gives FP64
    np.testing.assert_allclose(probabilities, classifier.predict_proba(x_test), rtol=1e-5, atol=1e-6)


GATED = """
import support


class Model:
    inputs = [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}]
    outputs = [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}]

    def predict(self, batch):
        with support.GATE.inside(self):
            return {"y": batch["x"] + 1}

    def close(self):
        support.GATE.closed += 1
"""


async def _settled(condition: Callable[[], object]) -> None:
    """Lets the server work until `condition` holds, for up to 10 s; the caller asserts."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)


def _ended_early(samples: dict[str, float], model: str) -> float:
    """Requests of `model` the server answered DEADLINE_EXCEEDED or counted CANCELLED."""
    return sum(
        value
        for sample, value in samples.items()
        if sample.startswith("sluice_requests_total{")
        and f'model="{model}"' in sample
        and ('code="DEADLINE_EXCEEDED"' in sample or 'code="CANCELLED"' in sample)
    )


@pytest.mark.parametrize("batching", ['max_batch_size = 4\npolicy = "none"', "max_batch_size = 0"])
async def test_a_run_its_caller_left_keeps_its_instance_until_it_ends(repo: Path, batching: str) -> None:
    # A worker thread's run cannot be stopped: after its caller gives up it goes on, and its model object
    # must not be handed the next request meanwhile (each object runs one batch at a time).
    config = f"{PYTHON}\n[batching]\n{batching}\n\n[execution]\ninstances = 2\ninline_max_us = 0\n"
    add(repo, "gated", config, GATED)
    support.GATE = gate = support.RunGate()
    busy = 'sluice_instances_busy{model="gated",version="1"}'
    async with support.serving(repo, metrics=True) as (server, channel):
        stub = pb_grpc.InferenceStub(channel)
        x = np.array([[1, 2]], dtype=np.float32)
        gate.go.clear()
        before = gate.entered
        with pytest.raises(grpc.aio.AioRpcError) as left:
            await stub.Predict(request("gated", x=x), timeout=0.5)
        assert left.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert gate.entered == before + 1
        # The server has seen the caller go (its deadline, or the RPC cancelled).
        await _settled(lambda: _ended_early(support.scrape(server), "gated"))
        assert _ended_early(support.scrape(server), "gated") == 1
        assert support.scrape(server)[busy] == 1, "the run still computes, but its instance reads as free"

        waiting = asyncio.ensure_future(stub.Predict(request("gated", id="next", x=x * 10)))
        await _settled(lambda: gate.entered == before + 2)
        assert gate.entered == before + 2
        assert gate.most == 1, "the next request ran on the model object whose run its caller had left"
        assert support.scrape(server)[busy] == 2
        gate.go.set()
        response = await waiting
        assert response.id == "next"
        np.testing.assert_array_equal(outputs(response)["y"], x * 10 + 1)
        await _settled(lambda: support.scrape(server)[busy] == 0)
        assert support.scrape(server)[busy] == 0


@pytest.mark.parametrize("batching", ['max_batch_size = 4\npolicy = "none"', "max_batch_size = 0"])
async def test_a_timeout_parameter_that_passes_mid_run_ends_the_call_then(repo: Path, batching: str) -> None:
    # The request's own `timeout` (KServe, microseconds) holds while its run computes, not only while it is
    # queued, for a model without a batch dimension as for a batched one: the caller hears DEADLINE_EXCEEDED
    # when it passes, not when a long run ends, and the instance stays taken until the run is over.
    config = f"{PYTHON}\n[batching]\n{batching}\n\n[execution]\ninline_max_us = 0\n"
    add(repo, "gated", config, GATED)
    support.GATE = gate = support.RunGate()
    busy = 'sluice_instances_busy{model="gated",version="1"}'
    async with support.serving(repo, metrics=True) as (server, channel):
        kserve = kpb_grpc.GRPCInferenceServiceStub(channel)
        x = np.array([[1, 2]], dtype=np.float32)
        held = kpb.ModelInferRequest(model_name="gated", id="held")
        held.inputs.add(name="x", datatype="FP32", shape=[1, 2]).contents.fp32_contents.extend([1, 2])
        held.parameters["timeout"].int64_param = 300_000
        gate.go.clear()
        before = gate.entered
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await kserve.ModelInfer(held, timeout=20)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "deadline expired after" in (late.value.details() or "")
        assert "ran (the result is discarded)" in (late.value.details() or "")
        assert gate.entered == before + 1
        assert not gate.go.is_set(), "the answer waited for the run to end"
        assert support.scrape(server)[busy] == 1, "the run still computes, but its instance reads as free"
        gate.go.set()
        response = await pb_grpc.InferenceStub(channel).Predict(request("gated", id="next", x=x))
        np.testing.assert_array_equal(outputs(response)["y"], x + 1)
        await _settled(lambda: support.scrape(server)[busy] == 0)
        assert support.scrape(server)[busy] == 0


RAISES_TIMEOUT = """
class Model:
    inputs = [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}]
    outputs = [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}]

    def predict(self, batch):
        if (batch["x"] == 7).any():
            raise TimeoutError("the model's own backend timed out")
        return {"y": batch["x"] + 1}
"""


@pytest.mark.parametrize("batching", ['max_batch_size = 4\npolicy = "none"', "max_batch_size = 0"])
async def test_a_request_whose_time_is_up_is_not_run_and_a_models_timeout_is_its_failure(
    repo: Path, batching: str
) -> None:
    # `timeout = 0`: the caller gives the request no time, so the model never sees it (for a model without a
    # batch dimension it used to run, and succeed). A TimeoutError the model raises itself is the model's
    # failure (INTERNAL, details in the log), not the caller's deadline.
    add(repo, "gated", f"{PYTHON}\n[batching]\n{batching}\n", GATED)
    add(repo, "raises", f"{PYTHON}\n[batching]\n{batching}\n", RAISES_TIMEOUT)
    support.GATE = gate = support.RunGate()
    async with support.serving(repo) as (_, channel):
        kserve = kpb_grpc.GRPCInferenceServiceStub(channel)

        def infer(model: str, value: float, timeout_us: int) -> kpb.ModelInferRequest:
            message = kpb.ModelInferRequest(model_name=model)
            message.inputs.add(name="x", datatype="FP32", shape=[1, 2]).contents.fp32_contents.extend(
                [value] * 2
            )
            message.parameters["timeout"].int64_param = timeout_us
            return message

        before = gate.entered
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await kserve.ModelInfer(infer("gated", 1, 0), timeout=20)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "deadline already passed" in (late.value.details() or "")
        assert gate.entered == before, "a request with no time left was run"

        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await kserve.ModelInfer(infer("raises", 7, 10_000_000), timeout=20)
        assert failed.value.code() == grpc.StatusCode.INTERNAL
        answer = await kserve.ModelInfer(infer("raises", 1, 10_000_000), timeout=20)
        assert np.frombuffer(answer.raw_output_contents[0], "<f4").tolist() == [2.0, 2.0]


@pytest.mark.parametrize("batching", ['max_batch_size = 4\npolicy = "none"', "max_batch_size = 0"])
async def test_a_stop_waits_for_a_run_its_caller_left(repo: Path, batching: str) -> None:
    # The drain's grace covers a run that still computes after its caller gave up: the model is closed only
    # once that run has ended, not under it.
    config = f"{PYTHON}\n[batching]\n{batching}\n\n[execution]\ninline_max_us = 0\n"
    add(repo, "gated", config, GATED)
    support.GATE = gate = support.RunGate()
    async with support.serving(repo) as (server, channel):
        stub = pb_grpc.InferenceStub(channel)
        gate.go.clear()
        with pytest.raises(grpc.aio.AioRpcError) as left:
            await stub.Predict(request("gated", x=np.ones((1, 2), np.float32)), timeout=0.5)
        assert left.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        stopping = asyncio.ensure_future(server.stop(10, 0))
        await asyncio.sleep(0.5)
        assert gate.closed == 0, "the model was closed while a run still computed in it"
        assert not stopping.done()
        gate.go.set()
        await stopping
        assert gate.closed == 1


LOAD_GATED = """
import support


class Model:
    inputs = [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}]
    outputs = [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}]

    def load(self, path):
        if path.name in HELD:  # these versions' loads wait for the test
            with support.GATE.inside(self):
                pass

    def predict(self, batch):
        return {"y": batch["x"] + 1}

    def close(self):
        support.GATE.closed += 1
"""
SLOW_LOAD = LOAD_GATED.replace("HELD", '("1",)')


async def test_a_model_still_loading_when_the_server_stops_is_closed_once_loaded(repo: Path) -> None:
    # The load runs in a thread that cannot be stopped; what it builds after the server stopped must still
    # be let go of (the plugin contract: close() frees what it holds, once).
    add(repo, "loading", PYTHON, SLOW_LOAD)
    support.GATE = gate = support.RunGate()
    gate.go.clear()
    server = SluiceServer(ServerSettings(model_repository=repo, port=0, metrics_port=-1, http_port=-1))
    await server.start()
    try:
        await _settled(lambda: gate.entered)
        assert gate.entered == 1
    finally:
        await server.stop(0, 0)
    assert gate.closed == 0
    gate.go.set()
    await _settled(lambda: gate.closed)
    assert gate.closed == 1


TWO_VERSIONS = LOAD_GATED.replace("HELD", '("2",)')  # version 1 loads at once


async def test_every_version_built_for_a_stopped_server_is_closed(repo: Path) -> None:
    # Version 1 finished loading, version 2 was still loading when the server stopped: both are closed.
    add(repo, "two", 'versions = "all"\n' + PYTHON, TWO_VERSIONS)
    second = repo / "two" / "2"
    second.mkdir()
    (second / "model.py").write_text(textwrap.dedent(TWO_VERSIONS))
    support.GATE = gate = support.RunGate()
    gate.go.clear()
    server = SluiceServer(ServerSettings(model_repository=repo, port=0, metrics_port=-1, http_port=-1))
    await server.start()
    try:
        await _settled(lambda: gate.entered)
        assert gate.entered == 1
        await asyncio.sleep(0.5)  # version 1, a few milliseconds of work, is built meanwhile
    finally:
        await server.stop(0, 0)
    gate.go.set()
    await _settled(lambda: gate.closed == 2)
    assert gate.closed == 2
    # Nor do the metrics keep the scheduler of the version that never served (and the model with it).
    assert server.metrics.model("two", 1).schedulers == []
