"""config.toml's `inputs.NAME` / `outputs.NAME` rename and constrain every runtime's signature, not only ONNX's.

The core applies them to what a runtime declares, so a `python` model and a third-party runtime (`polynomial`
from tests/plugin_package) take the same tables as an ONNX model, and only ever see their own names.
"""

from __future__ import annotations

import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from sluice.v1 import inference_pb2 as pb
from sluice.v1 import inference_pb2_grpc as pb_grpc
from support import failure, outputs, request, serving, signature

# The python model checks the names it is given: a rename that leaked into predict() would fail the batch.
DOUBLE = """
class Model:
    def predict(self, batch):
        assert set(batch) == {"x"}, sorted(batch)
        return {"y": batch["x"] * 2}
"""
PYTHON_CONFIG = """
[runtime]
name = "python"
inputs = [{ name = "x", datatype = "FP32", shape = [-1, -1] }]
outputs = [{ name = "y", datatype = "FP32", shape = [-1, -1] }]
"""
POLYNOMIAL_CONFIG = """
[runtime]
name = "polynomial"
coefficients = [1.0, 0.0, 1.0]
width = 3
"""
# The same overrides for both: public names, and a fixed width (the python model declares it free).
OVERRIDES = """
[inputs.x]
name = "features"
shape = [-1, 3]

[outputs.y]
name = "score"
shape = [-1, 3]
"""


def _add(repo: Path, name: str, config: str, module: str | None = None) -> None:
    version = repo / name / "1"
    version.mkdir(parents=True)
    (repo / name / "config.toml").write_text(textwrap.dedent(config))
    if module is not None:
        (version / "model.py").write_text(module)


@pytest.fixture
async def stub(repo: Path) -> AsyncIterator[pb_grpc.InferenceStub]:
    _add(repo, "python", PYTHON_CONFIG + OVERRIDES, DOUBLE)
    _add(repo, "poly", POLYNOMIAL_CONFIG + OVERRIDES)
    async with serving(repo) as (_, channel):
        yield pb_grpc.InferenceStub(channel)


@pytest.mark.parametrize(
    ("model", "expected"),
    [("python", [[2.0, 4.0, 6.0]]), ("poly", [[2.0, 5.0, 10.0]])],
    ids=["python-runtime", "third-party-runtime"],
)
async def test_overrides_rename_and_constrain_the_signature(
    stub: pb_grpc.InferenceStub, model: str, expected: list[list[float]]
) -> None:
    health = await stub.Health(pb.HealthRequest(model=model))
    (status,) = health.models
    assert status.state == pb.MODEL_STATE_READY, status.reason
    (version,) = status.versions
    assert signature(version.inputs) == [("features", pb.DATA_TYPE_FP32, [-1, 3])]
    assert signature(version.outputs) == [("score", pb.DATA_TYPE_FP32, [-1, 3])]

    answer = await stub.Predict(request(model, features=np.array([[1, 2, 3]], np.float32)))
    assert outputs(answer)["score"].tolist() == expected

    # The runtime's own name is not what callers send any more.
    error = await failure(stub, request(model, x=np.array([[1, 2, 3]], np.float32)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "features" in (error.details() or "")


async def test_a_constrained_shape_is_checked_before_the_model_runs(stub: pb_grpc.InferenceStub) -> None:
    # The python model declares [-1, -1]; the config fixes the width at 3.
    error = await failure(stub, request("python", features=np.zeros((1, 4), np.float32)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "[-1, 3]" in (error.details() or "")


async def test_overrides_that_do_not_fit_fail_the_model_with_the_reason(repo: Path) -> None:
    _add(repo, "unknown", PYTHON_CONFIG + "[inputs.z]\nname = 'w'\n", DOUBLE)
    _add(repo, "rank", POLYNOMIAL_CONFIG + "[inputs.x]\nshape = [-1]\n")
    two_inputs = """
    [runtime]
    name = "python"
    inputs = [{ name = "x", datatype = "FP32", shape = [-1] }, { name = "w", datatype = "FP32", shape = [-1] }]
    outputs = [{ name = "y", datatype = "FP32", shape = [-1] }]
    [inputs.w]
    name = "x"
    """
    _add(repo, "clash", two_inputs, DOUBLE)
    _add(repo, "width", POLYNOMIAL_CONFIG + "[outputs.y]\nshape = [-1, 4]\n")
    async with serving(repo) as (_, channel):
        health = await pb_grpc.InferenceStub(channel).Health(pb.HealthRequest())
    reasons = {m.name: m.reason for m in health.models if m.state == pb.MODEL_STATE_FAILED}
    assert sorted(reasons) == ["clash", "rank", "unknown", "width"]
    assert "config inputs.z: the model has no input 'z' (it has: x)" in reasons["unknown"]
    assert "config inputs.x.shape: the model's shape [-1, 3] has rank 2, got [-1]" in reasons["rank"]
    assert "config outputs.y.shape: [-1, 4] does not fit the model's shape [-1, 3]" in reasons["width"]
    assert "config inputs: two inputs are named 'x'" in reasons["clash"]
