"""Changing models on a live server, both ways: explicit control (RepositoryModelLoad/Unload) and a server
that polls its repository; the version policy, and what Health, probes and callers see meanwhile."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sluice.kserve.v2 import grpc_service_pb2 as kpb
from sluice.kserve.v2 import grpc_service_pb2_grpc as kpb_grpc
from sluice.server.app import SluiceServer
from sluice.server.settings import ServerSettings
from sluice.v1 import inference_pb2 as pb
from sluice.v1 import inference_pb2_grpc as pb_grpc
from support import add_model, failure, outputs, request, save, scrape

X = np.zeros((1, 4), np.float32)


@asynccontextmanager
async def controlled(
    repo: Path, control: str = "explicit", **settings: object
) -> AsyncIterator[tuple[SluiceServer, grpc.aio.Channel]]:
    """A server on `repo` with `control`, once loading has ended, and a channel; `settings` override."""
    chosen: dict[str, object] = {"port": 0, "metrics_port": -1, "grace_period_s": 5, **settings}
    server = SluiceServer(ServerSettings(model_repository=repo, model_control=control, **chosen))  # type: ignore[arg-type]
    await server.start()
    try:
        await server.loaded()
        async with grpc.aio.insecure_channel(server.address) as channel:
            yield server, channel
    finally:
        await server.stop(0)


def load(name: str, config: str | None = None) -> kpb.RepositoryModelLoadRequest:
    message = kpb.RepositoryModelLoadRequest(model_name=name)
    if config is not None:
        message.parameters["config"].string_param = config
    return message


async def answer(stub: pb_grpc.InferenceStub, model: str = "adder", version: int | None = None) -> float:
    """The constant the answering version adds: versions are told apart by their output."""
    response = await stub.Predict(request(model, version=version, x=X))
    return float(outputs(response)["y"][0, 0])


def index(response: kpb.RepositoryIndexResponse) -> list[tuple[str, str, str, str]]:
    return [(m.name, m.version, m.state, m.reason) for m in response.models]


async def test_load_unload_and_swap_versions_by_config_override(repo: Path) -> None:
    for version in (1, 2, 3):
        save(add_model(float(version)), repo / "adder" / str(version) / "model.onnx")
    (repo / "adder" / "config.toml").write_text("versions = { latest = 1 }\n")
    async with controlled(repo) as (_, channel):
        stub = pb_grpc.InferenceStub(channel)
        kserve = kpb_grpc.GRPCInferenceServiceStub(channel)
        assert await answer(stub) == 3.0
        error = await failure(stub, request("adder", version=1, x=X))
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert error.details() == "model 'adder' has no version 1; it has 3"

        await kserve.RepositoryModelLoad(load("adder", "versions = [1, 2]"))
        assert (await answer(stub), await answer(stub, version=1)) == (2.0, 1.0)
        seen = index(await kserve.RepositoryIndex(kpb.RepositoryIndexRequest()))
        assert seen[1:] == [("adder", "2", "READY", ""), ("adder", "1", "READY", "")]
        # Version 3 took no new request once 2 was ready; it may still be answering what it held.
        assert seen[0] in (("adder", "3", "UNLOADING", ""), ("adder", "3", "UNAVAILABLE", "unloaded"))

        # Triton's clients send the override as JSON.
        await kserve.RepositoryModelLoad(load("adder", '{"versions": {"latest": 1}}'))
        assert await answer(stub) == 3.0

        await kserve.RepositoryModelUnload(kpb.RepositoryModelUnloadRequest(model_name="adder"))
        error = await failure(stub, request("adder", x=X))
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert error.details() == "model 'adder' is not loaded: it was unloaded"
        health = await stub.Health(pb.HealthRequest())
        assert [m.name for m in health.models] == []  # unloaded on purpose: not a failure
        assert (await kserve.ServerReady(kpb.ServerReadyRequest())).ready is False  # no model at all
        assert {
            state for _, _, state, _ in index(await kserve.RepositoryIndex(kpb.RepositoryIndexRequest()))
        } == {"UNAVAILABLE"}

        # A load without an override goes back to config.toml.
        await kserve.RepositoryModelLoad(load("adder"))
        assert await answer(stub) == 3.0
        assert (await kserve.ServerReady(kpb.ServerReadyRequest())).ready is True


async def test_a_broken_override_or_version_never_replaces_a_working_one(repo: Path) -> None:
    save(add_model(1.0), repo / "adder" / "1" / "model.onnx")
    (repo / "adder" / "2").mkdir()
    (repo / "adder" / "2" / "model.onnx").write_bytes(b"not onnx")
    (repo / "adder" / "config.toml").write_text("versions = [1]\n")
    async with controlled(repo) as (_, channel):
        stub = pb_grpc.InferenceStub(channel)
        kserve = kpb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await kserve.RepositoryModelLoad(load("adder", "[batching]\nmax_batch_size = -1\n"))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details() == (
            "parameter 'config': field 'batching.max_batch_size': Input should be greater than or equal to 0 "
            "(got -1)"
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await kserve.RepositoryModelLoad(load("adder", "versions = { latest = 1 }"))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        message = info.value.details() or ""
        assert message.startswith("model 'adder' failed to load version 2: ")
        assert "not a valid ONNX model" in message
        assert message.endswith("serving version(s) 1")
        assert await answer(stub) == 1.0
        health = (await stub.Health(pb.HealthRequest(model="adder"))).models[0]
        assert health.state == pb.MODEL_STATE_READY
        assert [(v.version, v.state) for v in health.versions] == [
            (2, pb.MODEL_STATE_FAILED), (1, pb.MODEL_STATE_READY),
        ]  # fmt: skip
        assert health.reason == "not changed, still serving version(s) 1"


async def test_load_refuses_what_it_cannot_do(repo: Path) -> None:
    save(add_model(1.0), repo / "adder" / "1" / "model.onnx")
    async with controlled(repo) as (_, channel):
        kserve = kpb_grpc.GRPCInferenceServiceStub(channel)
        cases = [
            (load("nope"), grpc.StatusCode.NOT_FOUND,
             "the repository has no model directory 'nope'; it has 'adder'"),
            (load("../adder"), grpc.StatusCode.NOT_FOUND,
             "the repository has no model directory '../adder'; it has 'adder'"),
            (load(""), grpc.StatusCode.INVALID_ARGUMENT, "no model name given"),
            (kpb.RepositoryModelLoadRequest(repository_name="other", model_name="adder"),
             grpc.StatusCode.NOT_FOUND, "no repository named 'other'; Sluice serves one, named ''"),
            (load("adder", "versions = [1"), grpc.StatusCode.INVALID_ARGUMENT,
             "parameter 'config': invalid TOML: Unclosed array (at end of document)"),
        ]  # fmt: skip
        file = load("adder")
        file.parameters["file:1/model.onnx"].bytes_param = b"\x00"
        cases.append((file, grpc.StatusCode.INVALID_ARGUMENT,
                      "parameter 'file:1/model.onnx': Sluice loads model files from its repository, not from "
                      "the request; put them in the model's directory"))  # fmt: skip
        for message, code, details in cases:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await kserve.RepositoryModelLoad(message)
            assert (info.value.code(), info.value.details()) == (code, details)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await kserve.RepositoryModelUnload(kpb.RepositoryModelUnloadRequest(model_name="nope"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("control", "why"),
    [
        ("none", "its models change only with a restart (model_control = none); start it with "
                 "--model-control explicit to load and unload models"),
        ("poll", "it re-scans its repository (model_control = poll): change the files instead"),
    ],
)  # fmt: skip
async def test_control_calls_are_refused_unless_explicit(repo: Path, control: str, why: str) -> None:
    save(add_model(1.0), repo / "adder" / "1" / "model.onnx")
    async with controlled(repo, control) as (_, channel):
        kserve = kpb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await kserve.RepositoryModelUnload(kpb.RepositoryModelUnloadRequest(model_name="adder"))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert info.value.details() == f"RepositoryModelUnload: this server does not take it: {why}"
        assert await answer(pb_grpc.InferenceStub(channel)) == 1.0


async def test_control_calls_need_the_bearer_token(repo: Path) -> None:
    save(add_model(1.0), repo / "adder" / "1" / "model.onnx")
    async with controlled(repo, auth_token="s3cret") as (_, channel):
        kserve = kpb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await kserve.RepositoryModelUnload(kpb.RepositoryModelUnloadRequest(model_name="adder"))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        token = (("authorization", "Bearer s3cret"),)
        await kserve.RepositoryModelUnload(
            kpb.RepositoryModelUnloadRequest(model_name="adder"), metadata=token
        )
        error = await failure(pb_grpc.InferenceStub(channel), request("adder", x=X))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED  # still closed without the token


async def test_health_probes_follow_loads_and_unloads(repo: Path) -> None:
    save(add_model(1.0), repo / "adder" / "1" / "model.onnx")
    save(add_model(5.0), repo / "other" / "1" / "model.onnx")
    async with controlled(repo) as (_, channel):
        kserve = kpb_grpc.GRPCInferenceServiceStub(channel)
        probe = health_pb2_grpc.HealthStub(channel)

        async def probed(service: str) -> int:
            response = await probe.Check(health_pb2.HealthCheckRequest(service=service))
            return int(response.status)

        serving, not_serving = (
            health_pb2.HealthCheckResponse.SERVING,
            health_pb2.HealthCheckResponse.NOT_SERVING,
        )
        assert (await probed(""), await probed("adder")) == (serving, serving)
        await kserve.RepositoryModelUnload(kpb.RepositoryModelUnloadRequest(model_name="adder"))
        # An unloaded model is not served, and does not make the server unready: nobody expects it.
        assert (await probed(""), await probed("adder"), await probed("other")) == (
            serving,
            not_serving,
            serving,
        )
        (repo / "adder" / "1" / "model.onnx").write_bytes(b"broken")
        with pytest.raises(grpc.aio.AioRpcError):
            await kserve.RepositoryModelLoad(load("adder"))
        assert (await probed(""), await probed("adder")) == (not_serving, not_serving)
        save(add_model(1.0), repo / "adder" / "1" / "model.onnx")
        await kserve.RepositoryModelLoad(load("adder"))
        assert (await probed(""), await probed("adder")) == (serving, serving)


# ---- polling -------------------------------------------------------------------------------------------
POLL = 0.05
WAIT = 20.0
"""Seconds a change may take to be seen: many polls, and a load on two busy cores."""


async def until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Waits, bounded in time, until the poller has made `check` true."""
    deadline = time.monotonic() + WAIT
    while not await check():
        assert time.monotonic() < deadline, f"not within {WAIT}s: {what}"
        await asyncio.sleep(POLL)


async def served(stub: pb_grpc.InferenceStub, model: str = "adder") -> float | str:
    """The constant the default version adds, or the status code name of the failure."""
    try:
        response = await stub.Predict(request(model, x=X))
    except grpc.aio.AioRpcError as error:
        return error.code().name
    return float(outputs(response)["y"][0, 0])


async def model_health(stub: pb_grpc.InferenceStub, name: str = "adder") -> pb.ModelStatus:
    return (await stub.Health(pb.HealthRequest(model=name))).models[0]


async def _pinned(stub: pb_grpc.InferenceStub, version: int) -> str:
    try:
        await stub.Predict(request("adder", version=version, x=X))
    except grpc.aio.AioRpcError as error:
        return error.code().name
    return "OK"


async def test_new_models_and_versions_load_and_removed_ones_unload(repo: Path) -> None:
    save(add_model(5.0), repo / "other" / "1" / "model.onnx")
    async with controlled(repo, "poll", poll_interval_s=POLL) as (_, channel):
        stub = pb_grpc.InferenceStub(channel)
        assert await served(stub) == "NOT_FOUND"

        save(add_model(1.0), repo / "adder" / "1" / "model.onnx")
        await until(lambda: _is(stub, 1.0), "the new model answers")

        save(add_model(2.0), repo / "adder" / "2" / "model.onnx")
        await until(lambda: _is(stub, 2.0), "the new version answers requests that pin none")
        # Only the highest version is served by default (`versions = { latest = 1 }`, as Triton does).
        assert await _pinned(stub, 1) == "NOT_FOUND"

        shutil.rmtree(repo / "adder" / "2")
        await until(lambda: _is(stub, 1.0), "the removed version no longer answers")

        shutil.rmtree(repo / "adder")
        await until(lambda: _is(stub, "NOT_FOUND"), "the removed model no longer answers")
        assert [m.name for m in (await stub.Health(pb.HealthRequest())).models] == ["other"]
        assert await served(stub, "other") == 5.0


async def test_an_edited_config_reloads_the_model(repo: Path) -> None:
    for version in (1, 2):
        save(add_model(float(version)), repo / "adder" / str(version) / "model.onnx")
    config = repo / "adder" / "config.toml"
    async with controlled(repo, "poll", poll_interval_s=POLL) as (_, channel):
        stub = pb_grpc.InferenceStub(channel)
        assert await served(stub) == 2.0
        config.write_text("versions = [1]\n")
        await until(lambda: _is(stub, 1.0), "the config's version list is followed")
        config.write_text("versions = { latest = 1 }\n")
        await until(lambda: _is(stub, 2.0), "the config's latest policy is followed")
        health = await model_health(stub)
        assert [(v.version, v.state) for v in health.versions] == [(2, pb.MODEL_STATE_READY)]


async def test_a_broken_change_never_replaces_a_working_model(repo: Path) -> None:
    save(add_model(1.0), repo / "adder" / "1" / "model.onnx")
    config = repo / "adder" / "config.toml"
    config.write_text("versions = { latest = 1 }\n")
    async with controlled(repo, "poll", poll_interval_s=POLL) as (_, channel):
        stub = pb_grpc.InferenceStub(channel)
        assert await served(stub) == 1.0

        # A new version that cannot load: version 1 keeps serving, and Health says why.
        (repo / "adder" / "2").mkdir()
        (repo / "adder" / "2" / "model.onnx").write_bytes(b"not onnx")

        async def version_2_failed() -> bool:
            versions = {v.version: v for v in (await model_health(stub)).versions}
            return 2 in versions and versions[2].state == pb.MODEL_STATE_FAILED

        await until(version_2_failed, "the broken version is reported")
        health = await model_health(stub)
        assert health.state == pb.MODEL_STATE_READY
        assert health.reason == "not changed, still serving version(s) 1"
        assert "not a valid ONNX model" in health.versions[0].reason
        assert await served(stub) == 1.0

        # A config that does not validate: the previous one keeps serving.
        config.write_text("[batching]\nmax_batch_size = -1\n")

        async def config_reported() -> bool:
            return "field 'batching.max_batch_size'" in (await model_health(stub)).reason

        await until(config_reported, "the broken config is reported")
        health = await model_health(stub)
        assert health.state == pb.MODEL_STATE_READY
        assert health.reason.startswith("not changed: adder/config.toml: field 'batching.max_batch_size'")
        assert health.reason.endswith("still serving version(s) 1")
        assert await served(stub) == 1.0

        # Fixed: the new version replaces the old one.
        save(add_model(2.0), repo / "adder" / "2" / "model.onnx")
        config.write_text("versions = { latest = 1 }\n")
        await until(lambda: _is(stub, 2.0), "the fixed version answers")
        assert (await model_health(stub)).reason == ""


async def _is(stub: pb_grpc.InferenceStub, expected: float | str) -> bool:
    return await served(stub) == expected


async def test_metrics_show_each_versions_state(repo: Path) -> None:
    for version in (1, 2):
        save(add_model(float(version)), repo / "adder" / str(version) / "model.onnx")
    (repo / "adder" / "config.toml").write_text('versions = "all"\n')
    (repo / "broken").mkdir()
    async with controlled(repo, metrics_port=0) as (server, channel):
        kserve = kpb_grpc.GRPCInferenceServiceStub(channel)

        def states() -> dict[tuple[str, str], str]:
            found = {}
            for sample, value in scrape(server).items():
                if sample.startswith("sluice_model_state{") and value == 1.0:
                    labels = dict(part.split("=") for part in sample[19:-1].split(","))
                    found[(labels["model"].strip('"'), labels["version"].strip('"'))] = labels["state"].strip(
                        '"'
                    )
            return found

        assert states() == {("adder", "2"): "READY", ("adder", "1"): "READY", ("broken", ""): "FAILED"}
        stub = pb_grpc.InferenceStub(channel)
        await answer(stub)
        await kserve.RepositoryModelLoad(load("adder", "versions = [1]"))
        await answer(stub)
        await answer(stub)
        await failure(stub, request("adder", version=2, x=X))
        # Request, batch and run metrics say which version answered; a refused call names none.
        samples = scrape(server)
        ok = 'sluice_requests_total{code="OK",method="Predict",model="adder",version="%s"}'
        assert (samples[ok % "2"], samples[ok % "1"]) == (1, 2)
        assert (
            samples['sluice_requests_total{code="NOT_FOUND",method="Predict",model="adder",version=""}'] == 1
        )
        assert samples['sluice_batch_rows_sum{model="adder",version="2"}'] == 1
        assert samples['sluice_run_duration_seconds_count{model="adder",version="1"}'] == 2

        await kserve.RepositoryModelUnload(kpb.RepositoryModelUnloadRequest(model_name="adder"))
        assert states() == {("adder", "2"): "UNLOADED", ("adder", "1"): "UNLOADED", ("broken", ""): "FAILED"}
