"""`sluice health`'s exit code, `sluice load`/`sluice unload`, and `sluice models --json`'s providers, run as
a user runs them, against a real server."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sluice.server.app import SluiceServer
from sluice.server.settings import ServerSettings
from support import add_model, save


async def sluice(*args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sluice.server.cli", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _serve(repo: Path, **settings: object) -> SluiceServer:
    server = SluiceServer(ServerSettings(model_repository=repo, port=0, metrics_port=-1, **settings))  # type: ignore[arg-type]
    await server.start()
    await server.loaded()
    return server


async def test_health_exits_1_when_not_ready_as_the_grpc_probe_says(repo: Path) -> None:
    save(add_model(1.0), repo / "adder" / "1" / "model.onnx")
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"not onnx")
    server = await _serve(repo)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            probe = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert probe.status == health_pb2.HealthCheckResponse.NOT_SERVING
        code, out, err = await sluice("health", "--target", server.address)
        assert code == 1, err
        lines = out.splitlines()
        assert lines[:2] == ["server SERVING", "  adder: READY"]  # some models answer...
        assert lines[-1] == "not ready: model broken is FAILED"  # ...but a probe must not route here
        code, out, _ = await sluice("health", "--target", server.address, "--json")
        assert (code, json.loads(out)["ready"]) == (1, False)
        code, out, _ = await sluice("health", "--target", server.address, "--model", "adder")
        assert (code, out.splitlines()) == (0, ["server SERVING", "  adder: READY"])
    finally:
        await server.stop(0)


async def test_load_and_unload_with_the_token(repo: Path) -> None:
    save(add_model(1.0), repo / "adder" / "1" / "model.onnx")
    save(add_model(2.0), repo / "adder" / "2" / "model.onnx")
    (repo / "adder" / "config.toml").write_text('[execution]\nproviders = "cpu"\n')
    server = await _serve(repo, model_control="explicit", auth_token="s3cret")
    try:
        target = ("--target", server.address)
        code, _, err = await sluice("unload", "adder", *target)
        assert code == 1
        assert err.startswith("sluice unload: UNAUTHENTICATED: missing or invalid bearer token")

        code, out, err = await sluice("unload", "adder", *target, "--token", "s3cret")
        assert (code, out, err) == (0, "unloaded adder\n", "")
        code, out, _ = await sluice("health", *target, "--token", "s3cret")
        assert (code, out.splitlines()) == (
            1, ["server NOT_SERVING", "not ready: the server is NOT_SERVING; it serves no model"],
        )  # fmt: skip

        config = repo / "one.toml"
        config.write_text('versions = [1]\n[execution]\nproviders = "cpu"\n')
        code, out, err = await sluice("load", "adder", *target, "--token", "s3cret", "--config", f"@{config}")
        assert (code, out, err) == (0, "loaded adder\n", "")
        code, out, _ = await sluice("models", *target, "--token", "s3cret", "--json")
        versions = json.loads(out)[0]["versions"]
        assert [(v["version"], v["state"], v["providers"]) for v in versions] == [
            (1, "READY", ["CPUExecutionProvider"])
        ]

        code, _, err = await sluice(
            "load", "adder", *target, "--token", "s3cret", "--config", "versions = [7]"
        )
        assert code == 1
        assert err == (
            "sluice load: INVALID_ARGUMENT: model 'adder': parameter 'config': field 'versions': no "
            "directory for version(s) [7] (found: [1, 2])\n"
        )
    finally:
        await server.stop(0)
