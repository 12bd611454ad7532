"""The standard gRPC health service and server reflection: what Kubernetes probes and grpcurl talk to."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from sluice.server.app import SluiceServer
from sluice.server.settings import ServerSettings
from support import add_digits

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _check(channel: grpc.aio.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=service))
    return int(response.status)


async def _serve(repo: Path, **kw: object) -> SluiceServer:
    server = SluiceServer(ServerSettings(model_repository=repo, port=0, metrics_port=-1, http_port=-1, **kw))  # type: ignore[arg-type]
    await server.start()
    await server.loaded()
    return server


async def test_ready_server_and_models_are_serving(channel: grpc.aio.Channel) -> None:
    for service in ("", "sluice.v1.Inference", "digits", "liveness"):
        assert await _check(channel, service) == SERVING, service
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _check(channel, "no-such-model")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_failed_model_keeps_the_server_not_ready(repo: Path) -> None:
    add_digits(repo)
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"not onnx")
    server = await _serve(repo)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            assert await _check(channel, "") == NOT_SERVING
            assert await _check(channel, "digits") == SERVING
            assert await _check(channel, "broken") == NOT_SERVING
            assert await _check(channel, "liveness") == SERVING
    finally:
        await server.stop(0)


async def test_no_models_is_not_ready(repo: Path) -> None:
    server = await _serve(repo)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            assert await _check(channel, "") == NOT_SERVING
    finally:
        await server.stop(0)


async def test_watch_sees_draining(repo: Path) -> None:
    add_digits(repo)
    server = await _serve(repo)
    async with grpc.aio.insecure_channel(server.address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        first = await watch.read()
        assert isinstance(first, health_pb2.HealthCheckResponse)
        assert first.status == SERVING
        stopping = asyncio.ensure_future(server.stop(1))
        second = await watch.read()
        assert isinstance(second, health_pb2.HealthCheckResponse)
        assert second.status == NOT_SERVING
        watch.cancel()
        await stopping


async def _reflected_services(channel: grpc.aio.Channel) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = []
    async for response in call:
        names += [s.name for s in response.list_services_response.service]
    return names


async def test_reflection_lists_the_services(channel: grpc.aio.Channel) -> None:
    names = await _reflected_services(channel)
    assert {"sluice.v1.Inference", "grpc.health.v1.Health"} <= set(names)


async def test_reflection_can_be_turned_off(repo: Path) -> None:
    add_digits(repo)
    server = await _serve(repo, reflection=False)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _reflected_services(channel)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop(0)
