"""ModelStatistics as Triton's tooling reads it: after a known load, every count agrees and is exact.

Triton's own client (tests/kserve/.venv, in a subprocess) sends the load and reads the statistics, so what
is checked is what `perf_analyzer` and Triton's dashboards would see.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from sluice.kserve.v2 import grpc_service_pb2 as kpb
from sluice.kserve.v2 import grpc_service_pb2_grpc as kpb_grpc
from sluice.server.app import SluiceServer
from sluice.server.settings import ServerSettings
from support import ROOT, add_model, save

KSERVE_DIR = ROOT / "tests" / "kserve"
TRITON_PYTHON = KSERVE_DIR / ".venv" / "bin" / "python"
needs_tritonclient = pytest.mark.skipif(
    not (KSERVE_DIR / ".venv" / ".installed").exists(),
    reason="needs Triton's client in tests/kserve/.venv: run `make test`, which builds it from "
    "tests/kserve/requirements.txt",
)

STEPS = ("queue", "compute_input", "compute_infer", "compute_output")


def _repository(repo: Path) -> Path:
    """`add` batches adaptively; `pack` runs only full batches of 4 rows (a window far longer than the
    test, so the batch sizes do not depend on the machine's speed); `plain` has no batch dimension."""
    for name, batching in (
        ("add", ""),
        ("pack", "max_batch_size = 4\nmax_delay_ms = 60000\npolicy = 'fixed'\n"),
        ("plain", "max_batch_size = 0\n"),
    ):
        save(add_model(1.0), repo / name / "1" / "model.onnx")
        (repo / name / "config.toml").write_text(f"[batching]\n{batching}")
    return repo


async def _load(repo: Path) -> dict[str, Any]:
    server = SluiceServer(ServerSettings(model_repository=repo, port=0, metrics_port=-1, http_port=-1))
    await server.start()
    await server.loaded()
    try:
        proc = await asyncio.create_subprocess_exec(
            str(TRITON_PYTHON), str(KSERVE_DIR / "triton_client.py"), server.address, "statistics_load",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    finally:
        await server.stop(0)
    assert proc.returncode == 0, err.decode()
    result: dict[str, Any] = json.loads(out)["statistics_load"]
    return {name: stats["model_stats"][0] for name, stats in result.items()}


@pytest.fixture(scope="module")
def seen(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return asyncio.run(_load(_repository(tmp_path_factory.mktemp("models"))))


def _count(stats: dict[str, Any], key: str) -> int:
    return int(stats.get(key, {}).get("count", 0))


def _ns(stats: dict[str, Any], key: str) -> int:
    return int(stats.get(key, {}).get("ns", 0))


def _batches(model: dict[str, Any]) -> dict[int, dict[str, int]]:
    """batch size -> count of each compute step (they must agree, so one is enough once checked)."""
    out = {}
    for entry in model.get("batch_stats", []):
        counts = {step: _count(entry, step) for step in STEPS[1:]}
        assert len(set(counts.values())) == 1, f"batch size {entry['batch_size']}: {counts}"
        out[int(entry["batch_size"])] = counts["compute_infer"]
    return out


@needs_tritonclient
@pytest.mark.parametrize(("name", "ok", "failed"), [("add", 4, 1), ("pack", 9, 0), ("plain", 2, 0)])
def test_every_successful_request_counts_once_in_every_step(
    seen: dict[str, Any], name: str, ok: int, failed: int
) -> None:
    stats = seen[name]["inference_stats"]
    assert _count(stats, "success") == ok
    assert _count(stats, "fail") == failed
    assert {step: _count(stats, step) for step in STEPS} == dict.fromkeys(STEPS, ok)
    # Each step is part of the request's time in the server, so together they cannot exceed it.
    assert sum(_ns(stats, step) for step in STEPS) <= _ns(stats, "success")
    assert _ns(stats, "compute_infer") > 0 or name == "plain"
    if failed:
        assert _ns(stats, "fail") > 0


@needs_tritonclient
def test_batch_sizes_runs_and_rows_are_exact(seen: dict[str, Any]) -> None:
    add, pack, plain = seen["add"], seen["pack"], seen["plain"]
    # One caller alone: each request is its own run, of its own rows.
    assert _batches(add) == {1: 1, 2: 1, 3: 2}
    assert (int(add["execution_count"]), int(add["inference_count"])) == (4, 9)
    # Groups that fill a batch of 4 each: 9 requests, 16 rows, 4 runs.
    assert _batches(pack) == {4: 4}
    assert (int(pack["execution_count"]), int(pack["inference_count"])) == (4, 16)
    # Without a batch dimension each request is one run of one inference.
    assert _batches(plain) == {1: 2}
    assert (int(plain["execution_count"]), int(plain["inference_count"])) == (2, 2)


@needs_tritonclient
def test_a_run_counts_once_per_batch_and_once_per_member(seen: dict[str, Any]) -> None:
    pack = seen["pack"]
    (four,) = pack["batch_stats"]
    per_batch = _ns(four, "compute_infer")
    per_request = _ns(pack["inference_stats"], "compute_infer")
    # Every member of a batch waited for its whole run: 9 requests in 4 runs; the sums are floored to ns.
    assert per_batch > 0
    assert per_request >= 2 * per_batch
    assert per_request <= 4 * per_batch + 4
    # The first requests of each group waited in the queue for the rest.
    assert _ns(pack["inference_stats"], "queue") > 0


def _tile_model() -> Any:
    """y = x tiled 8 times along its row: FP32 [N, 4] in, [N, 32] out (an answer 8 times its request)."""
    repeats = numpy_helper.from_array(np.array([1, 8], dtype=np.int64), "repeats")
    graph = helper.make_graph(
        [helper.make_node("Tile", ["x", "repeats"], ["y"])],
        "tile",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])],
        [repeats],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


async def test_a_request_that_fails_after_its_run_counts_only_as_a_failure(repo: Path) -> None:
    save(_tile_model(), repo / "tile" / "1" / "model.onnx")
    settings = ServerSettings(
        model_repository=repo, port=0, metrics_port=-1, http_port=-1, max_message_bytes=1024
    )
    server = SluiceServer(settings)
    await server.start()
    await server.loaded()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = kpb_grpc.GRPCInferenceServiceStub(channel)

            async def infer(rows: int) -> None:
                x = np.ones((rows, 4), np.float32)
                tensor = kpb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=x.shape)
                await stub.ModelInfer(
                    kpb.ModelInferRequest(
                        model_name="tile", inputs=[tensor], raw_input_contents=[x.tobytes()]
                    )
                )

            await infer(2)  # 256 bytes of outputs: answered
            # 16 rows: 256 bytes in, 2048 out, over the limit only once the model has run.
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await infer(16)
            assert failed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            request = kpb.ModelStatisticsRequest(name="tile")
            (stats,) = (await stub.ModelStatistics(request)).model_stats
    finally:
        await server.stop(0)
    infer_stats = stats.inference_stats
    assert (infer_stats.success.count, infer_stats.fail.count) == (1, 1)
    for step in STEPS:
        assert getattr(infer_stats, step).count == 1, step
    # Both requests ran, each alone; only the one answered counts its rows.
    assert stats.execution_count == 2
    assert sorted((b.batch_size, b.compute_infer.count) for b in stats.batch_stats) == [(2, 1), (16, 1)]
    assert stats.inference_count == 2
