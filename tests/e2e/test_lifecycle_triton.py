"""Triton's own client (tritonclient.grpc) changing models on a live server: load_model with a config
override, unload_model and get_model_repository_index, as a Triton user drives them.

tritonclient runs in tests/kserve/.venv, in a subprocess (it needs protobuf<7); see tests/kserve/
triton_client.py, scenario `control`.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from sluice.server.app import SluiceServer
from sluice.server.settings import ServerSettings
from support import ROOT, add_model, save

KSERVE_DIR = ROOT / "tests" / "kserve"
TRITON_PYTHON = KSERVE_DIR / ".venv" / "bin" / "python"


@pytest.mark.skipif(
    not (KSERVE_DIR / ".venv" / ".installed").exists(),
    reason="needs Triton's client in tests/kserve/.venv: run `make test`, which builds it from "
    "tests/kserve/requirements.txt",
)
async def test_tritonclient_loads_and_unloads_models(repo: Path) -> None:
    save(add_model(1.0), repo / "add" / "1" / "model.onnx")
    save(add_model(2.0), repo / "add" / "2" / "model.onnx")
    (repo / "add" / "config.toml").write_text('versions = "all"\n')
    server = SluiceServer(
        ServerSettings(model_repository=repo, port=0, metrics_port=-1, model_control="explicit")
    )
    await server.start()
    await server.loaded()
    try:
        proc = await asyncio.create_subprocess_exec(
            str(TRITON_PYTHON), str(KSERVE_DIR / "triton_client.py"), server.address, "control",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await proc.communicate()
    finally:
        await server.stop(0)
    assert proc.returncode == 0, err.decode()
    seen: dict[str, Any] = json.loads(out)["control"]

    assert seen["start"] == 2.0  # every version loads ("all"); the highest answers
    assert seen["index_start"] == [["add", "2", "READY", ""], ["add", "1", "READY", ""]]
    assert seen["pinned_config"] == 1.0  # the override (JSON, as tritonclient sends it) served version 1
    assert seen["index_pinned"][1] == ["add", "1", "READY", ""]
    assert seen["index_pinned"][0][:2] == ["add", "2"]
    assert seen["index_pinned"][0][2:] in (["UNLOADING", ""], ["UNAVAILABLE", "unloaded"])

    assert seen["ready_unloaded"] is False
    assert seen["infer_unloaded"] == {
        "status": "StatusCode.NOT_FOUND", "message": "model 'add' is not loaded: it was unloaded",
    }  # fmt: skip
    assert {(v, state, reason) for _, v, state, reason in seen["index_unloaded"]} == {
        ("2", "UNAVAILABLE", "unloaded"), ("1", "UNAVAILABLE", "unloaded"),
    }  # fmt: skip

    assert seen["ready_reloaded"] is True
    assert seen["reloaded"] == 2.0  # back to config.toml: every version
    assert seen["load_unknown"] == {
        "status": "StatusCode.NOT_FOUND",
        "message": "the repository has no model directory 'nope'; it has 'add'",
    }
    assert seen["load_bad_config"] == {
        "status": "StatusCode.INVALID_ARGUMENT",
        "message": "parameter 'config': field 'batching.max_batch_size': Input should be greater than or "
        "equal to 0 (got -1)",
    }
    assert seen["after_bad_config"] == 2.0
