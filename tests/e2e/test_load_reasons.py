"""A model that fails to load tells callers why, naming files relative to the model repository.

Health, Predict's UNAVAILABLE and the Open Inference Protocol's metadata and repository index all carry the
reason; none may show the server's directories (nor errno's "[Errno 2]" text), while each still names the file
at fault, `broken/1/model.onnx`, so the operator can find it.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import grpc
import numpy as np
import pytest

from sluice.kserve.v2 import grpc_service_pb2 as kpb
from sluice.kserve.v2 import grpc_service_pb2_grpc as kpb_grpc
from sluice.v1 import inference_pb2 as pb
from sluice.v1 import inference_pb2_grpc as pb_grpc
from support import failure, request, serving

# Importing it raises with an absolute path in the message: Python's own FileNotFoundError text.
RAISES_ON_IMPORT = """
from pathlib import Path

WEIGHTS = (Path(__file__).parent / "weights.bin").read_bytes()
"""
PYTHON_CONFIG = """
[runtime]
name = "python"
inputs = [{ name = "x", datatype = "FP32", shape = [-1, 2] }]
outputs = [{ name = "y", datatype = "FP32", shape = [-1, 2] }]
"""
ECHO = """
class Model:
    def predict(self, batch):
        return {"y": batch["x"]}
"""

# Model name -> what its reason must say, with the file named relative to the repository.
EXPECTED = {
    "no_file": "no_file/1/model.onnx: no such file",
    "bad_config": "bad_config/config.toml: field 'batching.max_batch_size'",
    "import_raises": (
        "import_raises/1/model.py: importing failed: FileNotFoundError: "
        "No such file or directory: 'import_raises/1/weights.bin'"
    ),
    "plugin_path": "plugin_path/1/coefficients.json: no such file",
    "warmup_file": "warmup[0].x: cannot read warmup_file/missing.bin: No such file or directory",
    "labels_file": "outputs.y.labels: cannot read labels_file/labels.txt: No such file or directory",
}


def _add(repo: Path, name: str, config: str = "", module: str | None = None) -> None:
    version = repo / name / "1"
    version.mkdir(parents=True)
    if config:
        (repo / name / "config.toml").write_text(textwrap.dedent(config))
    if module is not None:
        (version / "model.py").write_text(module)


@pytest.fixture
def broken(repo: Path) -> Path:
    """A repository of models that each fail to load for a reason that involves a file."""
    _add(repo, "no_file")
    _add(repo, "bad_config", "[batching]\nmax_batch_size = -1\n")
    _add(repo, "import_raises", PYTHON_CONFIG, RAISES_ON_IMPORT)
    # A third-party runtime (tests/plugin_package) whose own message names the absolute path.
    _add(repo, "plugin_path", '[runtime]\nname = "polynomial"\n')
    _add(repo, "warmup_file", 'warmup = [{ x = { file = "missing.bin" } }]\n' + PYTHON_CONFIG, ECHO)
    _add(repo, "labels_file", PYTHON_CONFIG + '\n[outputs.y]\nlabels = "labels.txt"\n', ECHO)
    return repo


def _assert_public(reason: str, repo: Path, expected: str) -> None:
    assert expected in reason, reason
    for root in {str(repo), str(repo.resolve())}:
        assert root not in reason, reason
    assert "[Errno" not in reason, reason


async def test_health_and_predict_name_files_relative_to_the_repository(broken: Path) -> None:
    async with serving(broken) as (_, channel):
        stub = pb_grpc.InferenceStub(channel)
        health = await stub.Health(pb.HealthRequest())
        models = {m.name: m for m in health.models}
        assert sorted(models) == sorted(EXPECTED)
        for name, expected in EXPECTED.items():
            status = models[name]
            assert status.state == pb.MODEL_STATE_FAILED, name
            _assert_public(status.reason, broken, expected)
            for version in status.versions:
                _assert_public(version.reason, broken, expected)

            error = await failure(stub, request(name, x=np.zeros((1, 2), np.float32)))
            assert error.code() == grpc.StatusCode.UNAVAILABLE, name
            _assert_public(error.details() or "", broken, expected)


async def test_kserve_metadata_and_index_name_files_relative_to_the_repository(broken: Path) -> None:
    async with serving(broken) as (_, channel):
        kserve = kpb_grpc.GRPCInferenceServiceStub(channel)
        index = await kserve.RepositoryIndex(kpb.RepositoryIndexRequest())
        reasons = {m.name: m.reason for m in index.models}
        assert sorted(reasons) == sorted(EXPECTED)
        for name, expected in EXPECTED.items():
            _assert_public(reasons[name], broken, expected)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await kserve.ModelMetadata(kpb.ModelMetadataRequest(name=name))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, name
            _assert_public(info.value.details() or "", broken, expected)


async def test_the_log_keeps_the_full_path(broken: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with serving(broken):
        pass
    failures = [r.getMessage() for r in caplog.records if "no_file" in r.getMessage()]
    assert any(str(broken / "no_file") in line for line in failures), failures
