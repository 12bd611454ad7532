"""`sluice predict`, `sluice health` and `sluice models` against a real server, as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from sluice.server.app import SluiceServer
from support import DIGITS_DIR, DIGITS_ONNX, sluice

ROWS = np.random.default_rng(5).integers(0, 17, size=(3, 64)).astype(np.float32)
# The bundled repository's models, as the server finds them (examples gain models over time).
BUNDLED = sorted(
    p.name for p in DIGITS_DIR.parent.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))
)


async def test_predict_from_npy_and_json(server: SluiceServer, tmp_path: Path) -> None:
    expected = ort.InferenceSession(str(DIGITS_ONNX), providers=["CPUExecutionProvider"]).run(
        ["label"], {"pixels": ROWS}
    )[0]
    path = tmp_path / "pixels.npy"
    np.save(path, ROWS)
    code, out, err = await sluice(
        "predict", "digits", "--input", f"pixels={path}", "--target", server.address, "--json"
    )
    assert code == 0, err
    assert json.loads(out)["label"] == expected.tolist()

    as_json = json.dumps(ROWS[:1].astype(int).tolist())  # integers, cast to the model's FP32
    code, out, err = await sluice(
        "predict", "digits", "-i", f"pixels={as_json}", "-o", "label", "--target", server.address
    )
    assert code == 0, err
    assert out.splitlines()[0] == "label int64 [1]"
    assert out.splitlines()[1] == f"[{expected[0]}]"


async def test_predict_error_is_reported(server: SluiceServer) -> None:
    code, _, err = await sluice("predict", "digits", "-i", "pixels=[[1, 2]]", "--target", server.address)
    assert code == 1
    assert "INVALID_ARGUMENT: input 'pixels': expected FP32 [-1, 64], got FP32 [1, 2]" in err


async def test_health_and_models(server: SluiceServer) -> None:
    code, out, err = await sluice("health", "--target", server.address)
    assert code == 0, err
    assert out.splitlines() == ["server SERVING", *(f"  {name}: READY" for name in BUNDLED)]
    code, out, err = await sluice("models", "--target", server.address, "--json")
    assert code == 0, err
    models = {m["name"]: m for m in json.loads(out)}
    assert sorted(models) == BUNDLED
    digits = models["digits"]
    assert digits["versions"][0]["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}]
    code, out, _ = await sluice("models", "--target", server.address)
    assert "    in  pixels: FP32 [-1, 64]" in out.splitlines()
    assert "    in  image: BYTES [-1]" in out.splitlines()
