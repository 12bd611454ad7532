"""Fixtures: a real Sluice server on an ephemeral port and a real channel to it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from sluice.server.app import SluiceServer
from sluice.server.settings import ServerSettings
from sluice.v1 import inference_pb2_grpc as pb_grpc


@pytest.fixture
def settings() -> ServerSettings:
    """Settings for an in-process server: the bundled repository, ephemeral ports, no grace."""
    return ServerSettings(port=0, metrics_port=0, http_port=0, grace_period_s=5)


@pytest.fixture
async def server(settings: ServerSettings) -> AsyncIterator[SluiceServer]:
    srv = SluiceServer(settings)
    await srv.start()
    await srv.loaded()
    yield srv
    await srv.stop(0)


@pytest.fixture
async def channel(server: SluiceServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> pb_grpc.InferenceStub:
    return pb_grpc.InferenceStub(channel)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """An empty model repository for a test to fill."""
    path = tmp_path / "models"
    path.mkdir()
    return path
