"""The released artefact: the wheel `python -m build` makes installs into a fresh venv, under its own name,
and `sluice serve` from that venv serves the bundled models. The Dockerfiles under deploy/docker/ install it
the same way: this machine cannot pull their base images, so the test runs their install step here (the
same wheel path and extras), and checks what else they promise (a non-root user, the server's ports).

The fresh venv gets no registry: its dependencies are those already installed in the test's environment,
made visible through a .pth file, without this checkout's editable install (its .pth, its metadata and
the bundled models it puts in site-packages). So `pip install --no-index` still checks the wheel's
requirements against what is there, and the server can only import the `sluice` the wheel installed.
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sluice.clients.codec import to_array, to_tensor
from sluice.server.settings import ServerSettings
from sluice.v1 import inference_pb2 as pb
from sluice.v1 import inference_pb2_grpc as pb_grpc
from support import ROOT

DISTRIBUTION = "sluice-serving"
# What the checkout's own install adds to site-packages; the fresh venv must not see it.
CHECKOUT_ENTRIES = ("sluice", "_sluice_serving.pth", "sluice_serving-", "sluice_example_plugins")
DOCKERFILES = [ROOT / "deploy" / "docker" / name for name in ("Dockerfile", "Dockerfile.cuda")]
# The Dockerfiles' install step: the wheel found by its file name, with extras.
INSTALL = re.compile(
    r'wheel=\$\(echo /dist/(\S+)\)\s*\\\n\s*&& pip install --no-cache-dir "\$\{wheel\}(\[[\w,]+\])"'
)


def install_step(dockerfile: Path) -> tuple[str, str]:
    """The wheel file pattern and the extras that a Dockerfile installs."""
    match = INSTALL.search(dockerfile.read_text(encoding="utf-8"))
    assert match is not None, f"{dockerfile.name}: no wheel install step"
    return match.group(1), match.group(2)


def run(*command: str | Path, cwd: Path | None = None) -> str:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", dist, ROOT)
    (built,) = dist.glob("*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("wheel-venv")
    deps = base / "deps"
    deps.mkdir()
    site = Path(sysconfig.get_paths()["purelib"])
    for entry in site.iterdir():
        if not entry.name.startswith(CHECKOUT_ENTRIES):
            (deps / entry.name).symlink_to(entry)
    env = base / "venv"
    run(sys._base_executable, "-m", "venv", "--without-pip", env)  # type: ignore[attr-defined]
    python = env / "bin" / "python"
    fresh_site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    (fresh_site / "dependencies.pth").write_text(f"{deps}\n")
    pattern, extras = install_step(DOCKERFILES[0])
    (found,) = wheel.parent.glob(pattern)
    run(
        sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-index",
        f"{found}{extras}",
    )  # fmt: skip
    return env


def test_the_wheel_carries_its_name_and_the_bundled_models_only(wheel: Path) -> None:
    assert wheel.name.startswith("sluice_serving-"), wheel.name
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        header = archive.read(metadata).decode()
    assert f"Name: {DISTRIBUTION}\n" in header
    assert "sluice/server/_examples/models/digits/1/model.onnx" in names
    assert "sluice/server/_examples/models/digits_image/1/model.onnx" in names
    assert not [n for n in names if "minilm" in n], "the 90 MB MiniLM export must never ship in a wheel"
    assert not [n for n in names if n.startswith("sluice/__init__")], "sluice is a namespace package"


def test_the_installed_wheel_imports_its_own_code(venv: Path) -> None:
    where = run(venv / "bin" / "python", "-c", "import sluice.server.app as m; print(m.__file__)").strip()
    assert Path(where).is_relative_to(venv), f"the venv imported the checkout's sluice: {where}"
    version = run(
        venv / "bin" / "python", "-c", f"import importlib.metadata as m; print(m.version({DISTRIBUTION!r}))"
    )
    assert version.strip() == "0.1.0"


async def test_sluice_serve_from_the_wheel_answers_a_predict(venv: Path, tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        venv / "bin" / "sluice", "serve", "--port", "0", "--http-port", "-1", "--metrics-port", "-1",
        cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        first = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode().strip()
        assert first.startswith("listening on 127.0.0.1:"), first
        address = first.removeprefix("listening on ")
        async with grpc.aio.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
            async for answer in watch:
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    break
            watch.cancel()
            stub = pb_grpc.InferenceStub(channel)
            pixels = np.zeros((2, 64), dtype=np.float32)
            request = pb.PredictRequest(model="digits", id="wheel", inputs=[to_tensor("pixels", pixels)])
            response = await stub.Predict(request, timeout=30)
            state = await stub.Health(pb.HealthRequest(), timeout=30)
        assert response.id == "wheel"
        labels = {t.name: to_array(t) for t in response.outputs}["label"]
        assert labels.shape == (2,)
        assert {m.name for m in state.models} == {"digits", "digits_image"}
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_the_images_install_the_wheel_and_run_as_a_user_on_the_servers_ports(dockerfile: Path) -> None:
    text = dockerfile.read_text(encoding="utf-8")
    assert install_step(dockerfile) == install_step(DOCKERFILES[0]), "both images install the same way"
    assert "python -m build --wheel --outdir /dist" in text
    (user,) = re.findall(r"^USER (\S+)$", text, re.M)
    uid = user.split(":")[0]
    assert uid.isdigit(), "numeric, so that runAsNonRoot can check it"
    assert int(uid) != 0
    assert text.rstrip().endswith('ENTRYPOINT ["sluice"]\nCMD ["serve", "/models"]')
    defaults = {name: f.default for name, f in ServerSettings.model_fields.items()}
    (exposed,) = re.findall(r"^EXPOSE (.+)$", text, re.M)
    assert sorted(int(p) for p in exposed.split()) == sorted(
        defaults[name] for name in ("port", "http_port", "metrics_port")
    )
    assert "SLUICE_HOST=0.0.0.0" in text
