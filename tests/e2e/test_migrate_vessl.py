"""Coming from VESSL: a scikit-learn model registered from code with a runner class, served by a real server,
and new versions registered while it polls its repository going live without a restart."""

from __future__ import annotations

import asyncio
import sys
import textwrap
import time
from pathlib import Path
from typing import ClassVar

import grpc
import numpy as np
import pytest
from sklearn.datasets import load_iris

from sluice.clients import AsyncClient, ClientOptions, Retry, SluiceError
from sluice.server.app import SluiceServer
from sluice.server.registration import register, runner_source
from sluice.server.settings import ServerSettings
from sluice.v1 import inference_pb2 as pb

# A user's training script, run as a script is: the runner is defined in __main__ next to the training.
SCRIPT = '''
"""Trains an iris classifier and registers it, as a VESSL user's script does with register_model."""

import pickle
import sys

import numpy as np
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from sluice.server.registration import register, runner_source

LABELS = ["setosa", "versicolor", "virginica"]


class IrisRunner:
    @staticmethod
    def save_model(model):
        with open("clf.pkl", "wb") as f:
            pickle.dump(model, f)
        return {"classifier": "clf.pkl"}

    @staticmethod
    def load_model(props, artifacts):
        with open(artifacts[props["classifier"]], "rb") as f:
            return pickle.load(f)

    @staticmethod
    def preprocess_data(data):
        return data["features"]

    @staticmethod
    def predict(model, data):
        return model.predict_proba(np.asarray(data))

    @staticmethod
    def postprocess_data(data):
        best = int(np.argmax(data))
        return {"label": LABELS[best], "probability": float(data[best])}


iris = load_iris()
clf = LogisticRegression(max_iter=1000).fit(iris.data, iris.target)
path = register(
    sys.argv[1],
    "iris",
    runner=IrisRunner,
    model=clf,
    artifacts=["clf.pkl"],
    requirements=sys.argv[2:] or ["scikit-learn>=1.0", "numpy"],
    inputs=[{"name": "features", "datatype": "FP64", "shape": [-1, 4]}],
    outputs=[
        {"name": "label", "datatype": "STRING", "shape": [-1]},
        {"name": "probability", "datatype": "FP64", "shape": [-1]},
    ],
)
print(path.name)
'''

WAIT = 30.0
"""Seconds a registered version may take to be seen and loaded: polls, and a load on two busy cores."""


async def run_script(work: Path, repo: Path, *requirements: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "train.py", str(repo), *requirements, cwd=work,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    return out.decode().strip()


async def version_state(client: AsyncClient, version: int) -> pb.ModelVersionStatus | None:
    for status in (await client.health("iris")).models[0].versions:
        if status.version == version:
            return status
    return None


async def until_settled(client: AsyncClient, version: int) -> pb.ModelVersionStatus:
    """Waits, bounded in time, until the poller has loaded `version` or failed it."""
    deadline = time.monotonic() + WAIT
    while True:
        status = await version_state(client, version)
        if status is not None and status.state in (pb.MODEL_STATE_READY, pb.MODEL_STATE_FAILED):
            return status
        assert time.monotonic() < deadline, f"version {version} not loaded within {WAIT} s"
        await asyncio.sleep(0.05)


async def test_a_registered_scikit_learn_model_serves_and_new_versions_go_live(tmp_path: Path) -> None:
    work, repo = tmp_path / "work", tmp_path / "models"
    work.mkdir()
    repo.mkdir()
    (work / "train.py").write_text(textwrap.dedent(SCRIPT))
    assert await run_script(work, repo) == "1"
    version = repo / "iris" / "1"
    assert sorted(p.name for p in version.iterdir()) == [
        "artifacts",
        "model.py",
        "props.json",
        "requirements.txt",
    ]
    assert "clf = LogisticRegression" not in (version / "model.py").read_text()  # defs, not the training

    iris = load_iris()
    rows = iris.data[[0, 50, 100]]
    settings = ServerSettings(
        model_repository=repo, model_control="poll", poll_interval_s=0.05,
        port=0, metrics_port=-1, http_port=-1, grace_period_s=5,
    )  # fmt: skip
    server = SluiceServer(settings)
    await server.start()
    try:
        await server.loaded()
        once = ClientOptions(retry=Retry(attempts=1))
        async with AsyncClient(server.address, once) as client:
            first = await client.predict("iris", features=rows)

            assert await run_script(work, repo) == "2"  # while the server runs
            assert (await until_settled(client, 2)).state == pb.MODEL_STATE_READY
            second = await client.predict("iris", features=rows, version=2)

            # A version whose requirements this machine lacks fails with the command that fixes it;
            # the versions before it keep serving.
            assert await run_script(work, repo, "scikit-learn>=999", "no-such-distribution-here") == "3"
            failed = await until_settled(client, 3)
            still = await client.predict("iris", features=rows[:1])
    finally:
        await server.stop(0)
    assert first["label"].tolist() == ["setosa", "versicolor", "virginica"]
    assert np.all(first["probability"] > 0.5)
    assert second["label"].tolist() == first["label"].tolist()
    assert failed.state == pb.MODEL_STATE_FAILED
    assert "run: pip install 'scikit-learn>=999' no-such-distribution-here" in failed.reason
    assert "Traceback" not in failed.reason
    assert still["label"].tolist() == ["setosa"]


class Doubler:
    """A runner in Sluice's own shape, for registering in-process."""

    inputs: ClassVar = [{"name": "x", "datatype": "FP32", "shape": [-1]}]
    outputs: ClassVar = [{"name": "y", "datatype": "FP32", "shape": [-1]}]

    def predict(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": batch["x"] * 2}


def test_a_version_is_never_overwritten_and_nothing_half_written_stays(tmp_path: Path) -> None:
    assert register(tmp_path, "double", runner=Doubler, version=1) == tmp_path / "double" / "1"
    before = (tmp_path / "double" / "1" / "model.py").read_text()
    with pytest.raises(FileExistsError, match="a version is never overwritten"):
        register(tmp_path, "double", runner=Doubler, version=1)
    with pytest.raises(ValueError, match=r"artifact 'missing\.bin': no such file or directory"):
        register(tmp_path, "double", runner=Doubler, artifacts=["missing.bin"])
    assert register(tmp_path, "double", runner=Doubler) == tmp_path / "double" / "2"
    assert (tmp_path / "double" / "1" / "model.py").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["double"]  # no staging directory left behind
    assert sorted(p.name for p in (tmp_path / "double").iterdir()) == ["1", "2", "config.toml"]


async def test_a_registered_plain_runner_serves(repo: Path) -> None:
    register(repo, "double", runner=Doubler)
    settings = ServerSettings(model_repository=repo, port=0, metrics_port=-1, http_port=-1, grace_period_s=5)
    server = SluiceServer(settings)
    await server.start()
    try:
        await server.loaded()
        async with AsyncClient(server.address) as client:
            got = await client.predict("double", x=np.array([1.5, -2], dtype=np.float32))
            with pytest.raises(SluiceError) as caught:
                await client.predict("double", x=np.array([[1.5]], dtype=np.float32))
    finally:
        await server.stop(0)
    assert got["y"].tolist() == [3.0, -4.0]
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("requirements", "reason"),
    [
        ('["numpy>=1"]', ""),
        ('["numpy<1"]', "requirements not met: numpy<1 ({numpy} installed); run: pip install 'numpy<1'"),
        (
            '["not a requirement!"]',
            "runtime option 'requirements': 'not a requirement!' is not a requirement",
        ),
    ],
    ids=["met", "too-new", "malformed"],
)
async def test_the_requirements_option_is_checked_at_load(repo: Path, requirements: str, reason: str) -> None:
    (repo / "double" / "1").mkdir(parents=True)
    (repo / "double" / "config.toml").write_text(
        f'[runtime]\nname = "python"\nclass = "Doubler"\nrequirements = {requirements}\n'
    )
    (repo / "double" / "1" / "model.py").write_text(runner_source(Doubler))
    settings = ServerSettings(model_repository=repo, port=0, metrics_port=-1, http_port=-1, grace_period_s=5)
    server = SluiceServer(settings)
    await server.start()
    try:
        await server.loaded()
        async with AsyncClient(server.address) as client:
            (version,) = (await client.health("double")).models[0].versions
    finally:
        await server.stop(0)
    if not reason:
        assert version.state == pb.MODEL_STATE_READY
    else:
        assert version.state == pb.MODEL_STATE_FAILED
        assert reason.format(numpy=np.__version__) in version.reason
