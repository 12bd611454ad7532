"""Triton's own HTTP client (tritonclient.http) against Sluice's REST port, the way a Triton user drives it.

It runs in tests/kserve/.venv, in a subprocess (tests/kserve/triton_http_client.py), for the reason the gRPC
client does: tritonclient needs protobuf<7.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from sluice.server.app import SluiceServer
from sluice.server.settings import ServerSettings
from support import ROOT, add_model, save, strings_model, two_inputs_model

KSERVE_DIR = ROOT / "tests" / "kserve"
TRITON_PYTHON = KSERVE_DIR / ".venv" / "bin" / "python"
pytestmark = pytest.mark.skipif(
    not (KSERVE_DIR / ".venv" / ".installed").exists(),
    reason="needs Triton's client in tests/kserve/.venv: run `make test`, which builds it from "
    "tests/kserve/requirements.txt",
)
SCENARIOS = ("metadata", "config", "infer", "errors", "statistics", "classify")


async def _run(repo: Path) -> dict[str, Any]:
    save(add_model(1.0), repo / "add" / "1" / "model.onnx")
    save(strings_model(), repo / "echo" / "1" / "model.onnx")
    save(two_inputs_model(), repo / "pair" / "1" / "model.onnx")
    server = SluiceServer(ServerSettings(model_repository=repo, port=0, http_port=0, metrics_port=-1))
    await server.start()
    try:
        await server.loaded()
        proc = await asyncio.create_subprocess_exec(
            str(TRITON_PYTHON), str(KSERVE_DIR / "triton_http_client.py"), f"127.0.0.1:{server.http_port}",
            *SCENARIOS, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await proc.communicate()
    finally:
        await server.stop(0)
    assert proc.returncode == 0, err.decode()
    result: dict[str, Any] = json.loads(out)
    return result


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What tritonclient.http saw in every scenario, run in that order in one process against one server."""
    return asyncio.run(_run(tmp_path_factory.mktemp("models")))


def test_metadata_and_readiness(triton: dict[str, Any]) -> None:
    seen = triton["metadata"]
    assert (seen["live"], seen["ready"]) == (True, True)
    assert (seen["add_ready"], seen["add_1_ready"], seen["add_7_ready"], seen["nope_ready"]) == (
        True, True, False, False,
    )  # fmt: skip
    assert seen["server"]["name"] == "sluice"
    assert seen["add"] == {
        "name": "add",
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
    }
    assert seen["echo"]["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1, 2]}]
    assert [(m["name"], m["version"], m["state"]) for m in seen["index"]] == [
        ("add", "1", "READY"), ("echo", "1", "READY"), ("pair", "1", "READY"),
    ]  # fmt: skip


def test_model_config_in_tritons_json(triton: dict[str, Any]) -> None:
    add, echo = triton["config"]["add"], triton["config"]["echo"]
    assert (add["name"], add["platform"], add["backend"], add["max_batch_size"]) == (
        "add", "onnxruntime_onnx", "onnxruntime", 32,
    )  # fmt: skip
    assert add["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": [4], "format": "FORMAT_NONE"}]
    assert add["dynamic_batching"]["max_queue_delay_microseconds"] == 2000
    assert echo["input"][0]["data_type"] == "TYPE_STRING"


def test_infer_binary_and_json_numbers_and_strings(triton: dict[str, Any]) -> None:
    seen = triton["infer"]
    y = [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]
    assert seen["binary"]["y"] == y
    assert seen["binary"]["y_dtype"] == "float32"
    response = seen["binary"]["response"]
    assert (response["id"], response["model_name"], response["model_version"]) == ("bin-1", "add", "1")
    assert response["outputs"][0]["parameters"] == {"binary_data_size": 32}
    assert seen["json"]["y"] == y
    assert seen["json"]["response"]["outputs"][0]["data"] == [v for row in y for v in row]
    assert seen["echo"] == seen["echo_json"] == [["hello", "wörld"], ["", "sluice"]]
    assert seen["pair_outputs"] == ["ids_out"]
    assert seen["pair_ids"] == [7, 8, 9]


def test_errors_carry_the_http_status_and_sluices_message(triton: dict[str, Any]) -> None:
    seen = triton["errors"]
    assert seen["wrong_shape"] == {
        "status": "400",
        "message": "input 'x': expected FP32 [-1, 4], got FP32 [1, 3]",
    }
    assert seen["wrong_type"] == {
        "status": "400",
        "message": "input 'x': expected FP32 [-1, 4], got FP64 [1, 4]",
    }
    missing = {"status": "404", "message": "no model named 'nope'; the repository has 'add', 'echo', 'pair'"}
    assert seen["unknown_model"] == seen["no_metadata"] == missing
    assert seen["bad_version"] == {
        "status": "400",
        "message": "model version must be a version number, or empty for the default version; got 'latest'",
    }


def test_statistics_count_what_ran(triton: dict[str, Any]) -> None:
    (add,) = triton["statistics"]["add"]["model_stats"]
    # Before statistics: 2 infers of 2 rows answered, 2 refused (wrong shape, wrong type); the unknown
    # model's request counts against no model.
    stats = add["inference_stats"]
    assert (stats["success"]["count"], stats["fail"]["count"]) == (2, 2)
    assert add["inference_count"] == 4
    assert add["last_inference"] > 0
    assert [m["name"] for m in triton["statistics"]["all"]["model_stats"]] == ["add", "echo", "pair"]


def test_an_output_asked_for_as_a_classification_comes_back_ranked(triton: dict[str, Any]) -> None:
    # Triton's classification extension (class_count): y = x + 1, its two highest values per batch item,
    # as BYTES "<value>:<index>".
    seen = triton["classify"]
    assert seen["y"] == [["4.000000:1", "3.000000:3"], ["8.000000:2", "7.000000:3"]]
    assert seen["datatype"] == "BYTES"
    assert seen["strings"]["message"].startswith(
        "output 'echo': parameter 'classification' ranks numbers, and this output holds strings"
    )
