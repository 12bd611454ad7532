"""Plugins from another installed distribution (tests/plugin_package), end to end through a real server.

The package registers `scale` (preprocessor), `round` and `label` (postprocessors), `polynomial` (runtime),
and, for these tests, `faulty` and `record_thread` (both kinds); see its `sluice_example_plugins` modules.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt
import onnx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto, helper, numpy_helper
from sluice_example_plugins import testing
from sluice_example_plugins.testing import SECRET

from sluice.kserve.v2 import grpc_service_pb2 as kpb
from sluice.kserve.v2 import grpc_service_pb2_grpc as kpb_grpc
from sluice.v1 import inference_pb2 as pb
from sluice.v1 import inference_pb2_grpc as pb_grpc
from support import add_model, failure, outputs, request, save, serving, signature

LABELS = ["a", "b", "c", "d"]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

PIPELINE = """
preprocess = [{ name = "scale", input = "x", alias = "raw", factor = 2.0 }]
postprocess = [
    { name = "round", output = "y", decimals = 1 },
    { name = "label", output = "y", labels = ["a", "b", "c", "d"] },
]
"""
# y = x: each value sets off one failure, so a test picks the failure by the value it sends.
FAULTY = """
preprocess = [
    { name = "faulty", mode = "plugin_error", trigger = 13, code = "FAILED_PRECONDITION", message = "13 is unlucky" },
    { name = "faulty", mode = "crash", trigger = 66 },
]
postprocess = [
    { name = "faulty", mode = "crash", trigger = 99 },
    { name = "faulty", mode = "plugin_error", trigger = 42, code = "OUT_OF_RANGE", message = "42 is too big" },
]
"""


def tagged_model() -> onnx.ModelProto:
    """y = x + 1 (FP32 [N, 4]), and a STRING [N] input `tag` passed through as `tag_out`."""
    one = numpy_helper.from_array(np.ones((4,), dtype=np.float32), "one")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["y"]), helper.make_node("Identity", ["tag"], ["tag_out"])],
        "tagged",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("tag", TensorProto.STRING, ["N"]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("tag_out", TensorProto.STRING, ["N"]),
        ],
        [one],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def add(repo: Path, name: str, config: str, model: onnx.ModelProto | None = None) -> Path:
    """A model directory with config.toml and version 1 (an ONNX file, or empty for other runtimes)."""
    path = repo / name
    (path / "1").mkdir(parents=True)
    (path / "config.toml").write_text(config)
    if model is not None:
        save(model, path / "1" / "model.onnx")
    return path


async def health(channel: grpc.aio.Channel) -> dict[str, pb.ModelStatus]:
    response = await pb_grpc.InferenceStub(channel).Health(pb.HealthRequest())
    return {m.name: m for m in response.models}


async def readiness(channel: grpc.aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return int((await stub.Check(health_pb2.HealthCheckRequest(service=service))).status)


def rows(*values: float) -> npt.NDArray[np.float32]:
    """One FP32 [1, 4] row: the values given, then zeros."""
    row = np.zeros((1, 4), dtype=np.float32)
    row[0, : len(values)] = values
    return row


@pytest.fixture
async def plugin_channel(repo: Path) -> AsyncIterator[grpc.aio.Channel]:
    add(repo, "pipeline", PIPELINE, add_model(1.0))
    add(repo, "faulty", FAULTY, add_model(0.0))
    add(repo, "poly", '[runtime]\nname = "polynomial"\ncoefficients = [1.0, 0.0, 2.0]\nwidth = 3\n')
    tagged = """
preprocess = [{ name = "record_thread", into = "tag" }]
postprocess = [{ name = "record_thread", into = "post_thread" }]
"""
    add(repo, "tagged", tagged, tagged_model())
    async with serving(repo) as (_, channel):
        yield channel


async def test_third_party_pre_and_postprocessors_around_an_onnx_model(
    plugin_channel: grpc.aio.Channel,
) -> None:
    stub = pb_grpc.InferenceStub(plugin_channel)
    raw = np.array([[0.1, 0.22, 3.0, -1.0], [1.0, 2.0, 3.0, 4.0]], dtype=np.float32)
    response = await stub.Predict(request("pipeline", id="p1", raw=raw))
    got = outputs(response)
    assert response.id == "p1"
    # scale (x = 2 raw), the model (y = x + 1), round (1 decimal), label (argmax over a, b, c, d).
    np.testing.assert_allclose(got["y"], np.round(raw * 2 + 1, 1), rtol=1e-6)
    np.testing.assert_allclose(got["y"][0], [1.2, 1.4, 7.0, -1.0], rtol=1e-6)
    assert got["label"].tolist() == ["c", "d"]

    req = request("pipeline", raw=raw)
    req.outputs.append("label")
    only = await stub.Predict(req)
    assert [t.name for t in only.outputs] == ["label"]

    # Health shows what callers send and get, not the ONNX graph's own signature.
    (version,) = (await health(plugin_channel))["pipeline"].versions
    assert version.state == pb.MODEL_STATE_READY
    assert signature(version.inputs) == [("raw", pb.DATA_TYPE_FP32, [-1, 4])]
    assert signature(version.outputs) == [
        ("y", pb.DATA_TYPE_FP32, [-1, 4]),
        ("label", pb.DATA_TYPE_STRING, [-1]),
    ]
    # And requests are checked against it: the graph's own input name is not part of the public signature.
    error = await failure(stub, request("pipeline", x=raw))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model 'pipeline' has no input 'x'; it takes 'raw' (FP32 [-1, 4])" in (error.details() or "")


async def test_third_party_runtime_serves_without_a_model_file(plugin_channel: grpc.aio.Channel) -> None:
    stub = pb_grpc.InferenceStub(plugin_channel)
    xs = [np.array([[0.0, 1.0, 2.0]] * (1 + i % 3), dtype=np.float32) * (i - 5) for i in range(24)]
    responses = await asyncio.gather(
        *(stub.Predict(request("poly", id=str(i), x=x)) for i, x in enumerate(xs))
    )
    for i, (x, response) in enumerate(zip(xs, responses, strict=True)):
        assert response.id == str(i)
        np.testing.assert_allclose(outputs(response)["y"], 1 + 2 * x.astype(np.float64) ** 2, rtol=1e-6)

    (version,) = (await health(plugin_channel))["poly"].versions
    assert signature(version.inputs) == [("x", pb.DATA_TYPE_FP32, [-1, 3])]
    assert signature(version.outputs) == [("y", pb.DATA_TYPE_FP32, [-1, 3])]
    assert list(version.providers) == ["numpy"]
    assert version.max_batch_size == 32  # a free first dimension: Sluice batches it


async def test_runtime_versions_read_their_own_files(repo: Path) -> None:
    path = add(repo, "poly", 'versions = "all"\n[runtime]\nname = "polynomial"\ndatatype = "FP64"\n')
    (path / "1" / "coefficients.json").write_text("[0, 1]")  # y = x
    (path / "2").mkdir()
    (path / "2" / "coefficients.json").write_text("[0, 0, 1]")  # y = x^2
    # The package's pre- and postprocessors work around its runtime too: here y = x.
    add(repo, "rounded", PIPELINE + '[runtime]\nname = "polynomial"\ncoefficients = [0.0, 1.0]\nwidth = 4\n')
    async with serving(repo) as (_, channel):
        stub = pb_grpc.InferenceStub(channel)
        x = np.array([[3.0], [-0.5]])
        latest = await stub.Predict(request("poly", x=x))
        assert latest.model_version == 2
        np.testing.assert_array_equal(outputs(latest)["y"], x**2)
        pinned = await stub.Predict(request("poly", version=1, x=x))
        np.testing.assert_array_equal(outputs(pinned)["y"], x)

        got = outputs(await stub.Predict(request("rounded", raw=rows(0.26, 0.5, 0.01))))
        np.testing.assert_allclose(got["y"], [[0.5, 1.0, 0.0, 0.0]], rtol=1e-6)
        assert got["label"].tolist() == ["b"]


async def test_unknown_plugins_fail_the_model_and_list_the_installed_ones(repo: Path) -> None:
    add(repo, "ok", PIPELINE, add_model(1.0))
    add(repo, "unknown_pre", 'preprocess = [{ name = "resize" }]\n', add_model(1.0))
    add(repo, "unknown_post", 'postprocess = [{ name = "softmax" }]\n', add_model(1.0))
    add(repo, "unknown_runtime", 'runtime = "tensorrt"\n', add_model(1.0))
    async with serving(repo) as (_, channel):
        models = await health(channel)
        assert models["ok"].state == pb.MODEL_STATE_READY
        expected = {
            "unknown_pre": ["no preprocessor plugin named 'resize'", "sluice.preprocessors", "image", "tokenize", "scale", "faulty"],
            "unknown_post": ["no postprocessor plugin named 'softmax'", "sluice.postprocessors", "topk", "round", "label"],
            "unknown_runtime": ["no runtime plugin named 'tensorrt'", "sluice.runtimes", "onnx", "python", "polynomial"],
        }  # fmt: skip
        for name, parts in expected.items():
            model = models[name]
            assert model.state == pb.MODEL_STATE_FAILED, name
            for part in parts:
                assert part in model.reason, (name, part, model.reason)
            assert parts[0] in model.versions[0].reason
        assert await readiness(channel) == NOT_SERVING
        assert await readiness(channel, "ok") == SERVING
        assert await readiness(channel, "unknown_pre") == NOT_SERVING
        error = await failure(pb_grpc.InferenceStub(channel), request("unknown_pre", x=rows()))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "no preprocessor plugin named 'resize'" in (error.details() or "")


@pytest.mark.parametrize(
    ("config", "parts"),
    [
        ('preprocess = [{ name = "scale", input = "x", factor = 2.0, colour = "red" }]', ["preprocess[0] ('scale')", "field 'colour'", "Extra inputs are not permitted"]),
        ('preprocess = [{ name = "scale", input = "x", factor = "big" }]', ["preprocess[0] ('scale')", "field 'factor'", "valid number", "'big'"]),
        ('preprocess = [{ name = "scale", input = "x", factor = -1.0 }]', ["preprocess[0] ('scale')", "field 'factor'", "greater than 0", "(got -1.0)"]),
        ('preprocess = [{ name = "scale", input = "x" }]', ["preprocess[0] ('scale')", "field 'factor'", "Field required"]),
        ('postprocess = [{ name = "round", output = "y" }, { name = "label", output = "y", labels = [] }]', ["postprocess[1] ('label')", "field 'labels'", "at least 1 item"]),
        ('[runtime]\nname = "polynomial"\nwidth = 0\ncoefficients = [1.0]', ["runtime ('polynomial')", "field 'width'", "greater than or equal to 1", "(got 0)"]),
        ('[runtime]\nname = "polynomial"\ncoefficients = [1.0]\ndatatype = "FP16"', ["runtime ('polynomial')", "field 'datatype'", "'FP32' or 'FP64'"]),
        # A plugin's own check at load, worded by the plugin (LoadError). Framework note: a LoadError raised
        # from signature() gets no "preprocess[0] ('scale')" prefix (pipeline.py:59/62 does not wrap the
        # call), so these assert the plugin's own wording; any other exception there loses the plugin's name.
        ('[runtime]\nname = "polynomial"', ["runtime ('polynomial')", "coefficients.json: no such file", "option 'coefficients'"]),
        ('preprocess = [{ name = "scale", input = "nope", factor = 2.0 }]', ["scale: option 'input'", "no floating-point input 'nope'", "'x' (FP32 [-1, 4])"]),
        ('postprocess = [{ name = "label", output = "y", labels = ["a", "b"] }]', ["label: output 'y' is FP32 [-1, 4]", "expected [rows, 2]"]),
    ],
    ids=["unknown-key", "wrong-type", "out-of-range", "missing", "second-step", "runtime-range", "runtime-choice", "runtime-file", "pre-signature", "post-signature"],
)  # fmt: skip
async def test_bad_plugin_options_name_the_plugin_field_and_reason(
    repo: Path, config: str, parts: list[str]
) -> None:
    add(repo, "bad", config + "\n", add_model(1.0))
    async with serving(repo) as (_, channel):
        model = (await health(channel))["bad"]
        assert model.state == pb.MODEL_STATE_FAILED
        for part in parts:
            assert part in model.reason, (part, model.reason)
        assert await readiness(channel) == NOT_SERVING


async def test_plugin_error_reaches_the_caller_with_its_status_and_message(
    plugin_channel: grpc.aio.Channel,
) -> None:
    stub = pb_grpc.InferenceStub(plugin_channel)
    error = await failure(stub, request("faulty", x=rows(1, 13)))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details() == "13 is unlucky"
    error = await failure(stub, request("faulty", x=rows(42)))  # raised by a postprocessor
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE
    assert error.details() == "42 is too big"
    got = outputs(await stub.Predict(request("faulty", x=rows(1, 2, 3))))
    np.testing.assert_array_equal(got["y"], rows(1, 2, 3))


@pytest.mark.parametrize(("value", "where"), [(66, "preprocess[1]"), (99, "postprocess[0]")])
async def test_crashing_plugin_is_internal_logged_and_survived(
    plugin_channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture, value: int, where: str
) -> None:
    stub = pb_grpc.InferenceStub(plugin_channel)
    with caplog.at_level(logging.ERROR, logger="sluice"):
        error = await failure(stub, request("faulty", x=rows(value)))
    assert error.code() == grpc.StatusCode.INTERNAL
    details = error.details() or ""
    assert details == f"model 'faulty': {where} ('faulty') failed; the server log has the details"
    assert SECRET not in details
    assert "RuntimeError" not in details

    (logged,) = [r for r in caplog.records if r.exc_info is not None]
    assert logged.exc_info is not None
    assert isinstance(logged.exc_info[1], RuntimeError)
    assert SECRET in caplog.text
    assert "Traceback" in caplog.text
    assert "in _crash" in caplog.text  # the plugin's own frame

    # The server, the model and its plugins carry on.
    responses = await asyncio.gather(*(stub.Predict(request("faulty", x=rows(i))) for i in range(1, 6)))
    for i, response in enumerate(responses, start=1):
        np.testing.assert_array_equal(outputs(response)["y"], rows(i))
    assert (
        await pb_grpc.InferenceStub(plugin_channel).Health(pb.HealthRequest())
    ).state == pb.SERVING_STATE_SERVING


@pytest.mark.parametrize(("where", "trigger"), [("preprocess", 7), ("postprocess", 8)])
async def test_a_timeout_parameter_that_passes_in_a_slow_plugin_ends_the_call_then(
    repo: Path, where: str, trigger: int
) -> None:
    # KServe's `timeout` parameter bounds the whole request, plugin steps included: the caller hears
    # DEADLINE_EXCEEDED when it passes, not when a slow step ends. (y = x + 1: x = 7 holds either step.)
    add(
        repo,
        "slow",
        f'{where} = [{{ name = "faulty", mode = "hold", trigger = {trigger} }}]\n',
        add_model(1.0),
    )
    testing.HOLD.clear()
    try:
        async with serving(repo) as (_, channel):
            held = kpb.ModelInferRequest(model_name="slow")
            held.inputs.add(name="x", datatype="FP32", shape=[1, 4]).contents.fp32_contents.extend(rows(7)[0])
            held.parameters["timeout"].int64_param = 300_000
            with pytest.raises(grpc.aio.AioRpcError) as late:
                await kpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(held, timeout=20)
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert f"ms into {where}ing (the result is discarded)" in (late.value.details() or "")
            assert not testing.HOLD.is_set(), "the answer waited for the step to end"
            testing.HOLD.set()
            response = await pb_grpc.InferenceStub(channel).Predict(request("slow", x=rows(1)))
            np.testing.assert_array_equal(outputs(response)["y"], rows(1) + 1)
    finally:
        testing.HOLD.set()


async def test_plugins_run_off_the_event_loop(plugin_channel: grpc.aio.Channel) -> None:
    stub = pb_grpc.InferenceStub(plugin_channel)
    (version,) = (await health(plugin_channel))["tagged"].versions
    assert [s.name for s in version.inputs] == ["x"]  # the preprocessor fills `tag`
    assert [s.name for s in version.outputs] == ["y", "tag_out", "post_thread"]

    loop_thread = threading.current_thread().name  # the server runs on this test's event loop
    responses = await asyncio.gather(
        *(stub.Predict(request("tagged", x=np.ones((2, 4), np.float32))) for _ in range(4))
    )
    for response in responses:
        got = outputs(response)
        np.testing.assert_array_equal(got["y"], np.full((2, 4), 2.0, np.float32))
        for name in ("tag_out", "post_thread"):  # where the preprocessor and the postprocessor ran
            assert got[name].shape == (2,)
            assert loop_thread not in got[name].tolist(), (name, got[name])
            assert all(got[name]), (name, got[name])


async def test_stream_predict_through_plugins(plugin_channel: grpc.aio.Channel) -> None:
    stub = pb_grpc.InferenceStub(plugin_channel)
    raws = {f"ok-{i}": rows(i, 0.5) for i in range(6)}
    sent = [request("pipeline", id=rid, raw=raw) for rid, raw in raws.items()]
    sent.insert(2, request("faulty", id="unlucky", x=rows(13)))
    sent.insert(4, request("faulty", id="crash", x=rows(66)))
    sent.insert(5, request("pipeline", id="graph-name", x=rows(1)))

    async def requests() -> AsyncIterator[pb.PredictRequest]:
        for req in sent:
            yield req

    answers: dict[str, pb.StreamPredictResponse] = {}
    async for answer in stub.StreamPredict(requests()):
        assert answer.id not in answers, f"{answer.id} answered twice"
        answers[answer.id] = answer
    assert set(answers) == {req.id for req in sent}
    for rid, raw in raws.items():
        assert answers[rid].code == 0, answers[rid].message
        got = outputs(answers[rid].response)
        y = np.round(raw * 2 + 1, 1)
        np.testing.assert_allclose(got["y"], y, rtol=1e-6)
        assert got["label"].tolist() == [LABELS[int(np.argmax(y))]]
    assert answers["unlucky"].code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert answers["unlucky"].message == "13 is unlucky"
    assert answers["crash"].code == grpc.StatusCode.INTERNAL.value[0]
    assert SECRET not in answers["crash"].message
    assert answers["graph-name"].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]


async def test_warmup_examples_run_through_the_whole_pipeline(repo: Path) -> None:
    # scale (x 2), y = x + 1, then a postprocessor that refuses 7: raw = 3 fails only after all three steps.
    config = """
preprocess = [{ name = "scale", input = "x", alias = "raw", factor = 2.0 }]
postprocess = [{ name = "faulty", mode = "plugin_error", trigger = 7, message = "seven is not allowed" }]
"""
    ok = add(
        repo,
        "warm_ok",
        config + 'warmup = [{ raw = [1.0, 2.0, 0.0, 0.0] }, { raw = { npy = "example.npy" } }]\n',
        add_model(1.0),
    )
    np.save(ok / "example.npy", np.full((2, 4), 0.5, np.float32))
    add(
        repo,
        "warm_post_fails",
        config + "warmup = [{ raw = [1.0, 2.0, 0.0, 0.0] }, { raw = [3.0, 0.0, 0.0, 0.0] }]\n",
        add_model(1.0),
    )
    crash = 'preprocess = [{ name = "faulty", mode = "crash", trigger = 5 }]\n'
    add(repo, "warm_pre_crashes", crash + "warmup = [{ x = [5.0, 5.0, 5.0, 5.0] }]\n", add_model(1.0))
    add(repo, "warm_bad_shape", "warmup = [{ x = [1.0, 2.0] }]\n", add_model(1.0))
    add(repo, "warm_unknown_input", "warmup = [{ nope = 1 }]\n", add_model(1.0))
    add(repo, "warm_missing_file", 'warmup = [{ x = { npy = "missing.npy" } }]\n', add_model(1.0))
    async with serving(repo) as (_, channel):
        models = await health(channel)
        assert models["warm_ok"].state == pb.MODEL_STATE_READY
        expected = {
            "warm_post_fails": "warmup[1]: postprocessing failed: seven is not allowed",
            "warm_pre_crashes": "warmup[0]: model 'warm_pre_crashes': preprocess[0] ('faulty') failed; the server log has the details",
            "warm_bad_shape": "warmup[0]: input 'x': expected FP32 [-1, 4], got FP32 [1, 2]",
            "warm_unknown_input": "warmup[0].nope: the model takes no input of that name",
            "warm_missing_file": "warmup[0].x: cannot read",
        }
        for name, reason in expected.items():
            assert models[name].state == pb.MODEL_STATE_FAILED, name
            assert reason in models[name].reason, (name, models[name].reason)
            assert await readiness(channel, name) == NOT_SERVING
        assert await readiness(channel, "warm_ok") == SERVING
        assert await readiness(channel) == NOT_SERVING

        stub = pb_grpc.InferenceStub(channel)
        error = await failure(stub, request("warm_post_fails", raw=rows(1)))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "seven is not allowed" in (error.details() or "")
        # The model that warmed up serves, and its postprocessor refuses 7 at request time as it did at load.
        np.testing.assert_array_equal(
            outputs(await stub.Predict(request("warm_ok", raw=rows(1))))["y"], rows(3, 1, 1, 1)
        )
        error = await failure(stub, request("warm_ok", raw=rows(3)))
        assert (error.code(), error.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "seven is not allowed")


async def test_warmup_is_synthesized_when_none_is_listed(repo: Path) -> None:
    # y = x + 5, and a postprocessor that refuses 5: the synthesized example (zeros) sets it off.
    config = 'postprocess = [{ name = "faulty", mode = "plugin_error", trigger = 5, message = "five" }]\n'
    add(repo, "synthesized", config, add_model(5.0))
    add(repo, "listed", config + "warmup = [{ x = [1.0, 1.0, 1.0, 1.0] }]\n", add_model(5.0))
    async with serving(repo) as (_, channel):
        models = await health(channel)
        assert models["synthesized"].state == pb.MODEL_STATE_FAILED
        assert "warm-up: postprocessing failed: five" in models["synthesized"].reason
        assert models["listed"].state == pb.MODEL_STATE_READY  # listed examples replace the synthesized one
        assert await readiness(channel) == NOT_SERVING
