"""The floor server and the handler-cost benchmark measure what they claim: the floor answers a Predict as
Sluice does (same model, same outputs), and handler_cost drives the real handler to completion."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest

from sluice.v1 import inference_pb2 as pb
from sluice.v1 import inference_pb2_grpc as pb_grpc
from support import add_digits, outputs, request, serving_stub

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT / "proto"), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


@asynccontextmanager
async def floor_server(*flags: str) -> AsyncIterator[pb_grpc.InferenceStub]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(BENCHMARKS / "floor_server.py"), "--port", "0", *flags,
        stdout=asyncio.subprocess.PIPE, env=_env(),
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        assert line.startswith("listening on "), line
        async with grpc.aio.insecure_channel(line.split()[-1]) as channel:
            yield pb_grpc.InferenceStub(channel)
    finally:
        proc.terminate()
        await proc.wait()


async def test_the_floor_answers_as_sluice_does(tmp_path: Path) -> None:
    add_digits(tmp_path)
    pixels = np.arange(3 * 64, dtype=np.float32).reshape(3, 64) % 17
    req = request("digits", id="r1", pixels=pixels)
    async with serving_stub(tmp_path) as sluice, floor_server() as floor:
        health = await floor.Health(pb.HealthRequest(model="digits"))
        (spec,) = health.models[0].versions[0].inputs
        assert (spec.name, spec.datatype, list(spec.shape)) == ("pixels", pb.DATA_TYPE_FP32, [-1, 64])
        expected = outputs(await sluice.Predict(req))
        got = await floor.Predict(req)
        assert got.id == "r1"
        answer = outputs(got)
        assert answer.keys() == expected.keys()
        for name, array in expected.items():
            np.testing.assert_allclose(answer[name], array, rtol=1e-6)


async def test_the_floor_without_the_model_answers_every_request_with_the_first_answer() -> None:
    first = request("digits", id="a", pixels=np.zeros((1, 64), np.float32))
    other = request("digits", id="b", pixels=np.full((1, 64), 16, np.float32))
    async with floor_server() as floor, floor_server("--skip-model") as skipping:
        ran = outputs(await floor.Predict(other))
        expected = outputs(await skipping.Predict(first))
        got = await skipping.Predict(other)
        assert got.id == "b"
        answer = outputs(got)
        # The second request was parsed and answered without a run: it got the first request's outputs.
        assert not np.array_equal(ran["probabilities"], expected["probabilities"])
        for name, array in expected.items():
            np.testing.assert_array_equal(answer[name], array)


async def test_handler_cost_runs_the_real_handler() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(BENCHMARKS / "handler_cost.py"),
        "--calls", "64", "--rounds", "1", "--concurrency", "8", "--no-uvloop",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=_env(),
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert [line.split(":")[0].strip() for line in lines] == [
        "floor x1",
        "sluice x1",
        "floor x8",
        "sluice x8",
    ]
    assert all("µs CPU per request" in line for line in lines)


@pytest.mark.skipif(shutil.which("callgrind_control") is None, reason="needs valgrind")
async def test_handler_instructions_counts_only_the_measured_calls() -> None:
    # Start-up runs uninstrumented; a count of 0 (instrumentation never on) or of the whole start-up (never
    # off) would make every comparison meaningless.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(BENCHMARKS / "handler_instructions.py"),
        "--calls", "200", "--concurrency", "1", "--handler", "floor",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=_env(),
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 300)
    assert proc.returncode == 0, err.decode()
    (line,) = out.decode().splitlines()
    label, figure = line.split(":")
    assert label.strip() == "floor x1"
    per_call = int(figure.split()[0].replace(",", ""))
    # Parsing, one ONNX Runtime run and encoding: ~140,000 instructions here; start-up is billions.
    assert 20_000 < per_call < 2_000_000, line


async def test_compare_servers_reports_cpu_and_batching_of_each_server(tmp_path: Path) -> None:
    # A ratio of requests/s alone hides which state each server was in; each round also says what the
    # server spent per request and how it batched (from its own metrics endpoint).
    add_digits(tmp_path / "repo")
    serve = f"{sys.executable} -m sluice.server.cli serve {tmp_path / 'repo'} --port 0 --metrics-port 0 --http-port -1"
    report = tmp_path / "report.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(BENCHMARKS / "compare_servers.py"), "--a-cmd", serve, "--b-cmd", serve,
        "--concurrency", "2", "--processes", "1", "--rounds", "1", "--duration", "0.5", "--warmup", "0.2",
        "--json", str(report),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=_env(),
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 180)
    assert proc.returncode == 0, err.decode()
    assert "server CPU per request B/A" in out.decode()
    (result,) = json.loads(report.read_text())["rounds"]
    for name in ("a", "b"):
        assert result[name]["server_cpu_ms_per_request"] > 0
        assert result[name]["mean_batch"] >= 1.0
        assert result[name]["spun_us_per_request"] >= 0.0
    assert result["cpu_ratio"] > 0
