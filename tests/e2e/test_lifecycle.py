"""The `sluice serve` process: it answers on the bundled model, and drains on SIGTERM/SIGINT before exiting 0."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

from sluice.v1 import inference_pb2 as pb
from sluice.v1 import inference_pb2_grpc as pb_grpc
from support import outputs, request, save, slow_model

SLUICE = [sys.executable, "-m", "sluice.server.cli"]


class Process:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.log: list[str] = []
        self.port = 0
        self.metrics_port = 0

    async def wait_line(self, pattern: str) -> re.Match[str]:
        assert self.proc.stderr is not None
        while True:
            line = (await self.proc.stderr.readline()).decode()
            if not line:
                raise AssertionError("server exited; log:\n" + "".join(self.log))
            self.log.append(line)
            match = re.search(pattern, line)
            if match:
                return match

    async def rest(self) -> str:
        assert self.proc.stderr is not None
        self.log.append((await self.proc.stderr.read()).decode())
        return "".join(self.log)


async def start(*args: str) -> Process:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    env["SLUICE_HTTP_PORT"] = "0"
    proc = await asyncio.create_subprocess_exec(
        *SLUICE, "serve", "--port", "0", "--metrics-port", "0", *args,
        stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    p = Process(proc)
    match = await p.wait_line(r"grpc=127\.0\.0\.1:(\d+).*metrics=http://127\.0\.0\.1:(\d+)/metrics")
    p.port, p.metrics_port = int(match[1]), int(match[2])
    await p.wait_line(r"ready models=")
    return p


@pytest.fixture
def slow_repo(repo: Path) -> Path:
    save(slow_model(layers=96), repo / "slow" / "1" / "model.onnx")
    (repo / "slow" / "config.toml").write_text("[batching]\nmax_batch_size = 256\n")
    return repo


def _metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(name):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def _until_busy(port: int) -> None:
    """Waits until the model reports a batch running: the request is then truly in flight."""
    for _ in range(2000):
        if await asyncio.to_thread(_metric, port, 'sluice_instances_busy{model="slow",version="1"}') >= 1:
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the request never started running")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_in_flight_request_is_answered_before_exit(slow_repo: Path, sig: signal.Signals) -> None:
    server = await start(str(slow_repo), "--grace-period-s", "60")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.InferenceStub(channel)
        x = np.ones((256, 1024), np.float32)
        in_flight = asyncio.ensure_future(stub.Predict(request("slow", id="late", x=x)))
        await _until_busy(server.metrics_port)
        server.proc.send_signal(sig)
        await server.wait_line(r"signal received, draining")
        # Refused now, while the earlier request is still running:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Predict(request("slow", x=x[:1]))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in (info.value.details() or "")
        response = await in_flight
        assert response.id == "late"
        assert outputs(response)["y"].shape == (256, 1024)
    assert await server.proc.wait() == 0, await server.rest()


async def test_serves_the_bundled_repository_by_default() -> None:
    server = await start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.InferenceStub(channel)
            health = await stub.Health(pb.HealthRequest())
            assert "digits" in [m.name for m in health.models]
            assert all(m.state == pb.MODEL_STATE_READY for m in health.models), health
            response = await stub.Predict(request("digits", pixels=np.zeros((1, 64), np.float32)))
            assert outputs(response)["label"].shape == (1,)
        log = "".join(server.log)
        assert re.search(r"model loaded name=digits version=1 providers=CPUExecutionProvider", log), log
    finally:
        server.proc.send_signal(signal.SIGTERM)
        assert await server.proc.wait() == 0


async def test_invalid_setting_is_reported() -> None:
    proc = await asyncio.create_subprocess_exec(
        *SLUICE, "serve", "--port", "70000", stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    assert proc.returncode == 2
    assert "field 'port': Input should be less than or equal to 65535 (got 70000)" in err.decode()
