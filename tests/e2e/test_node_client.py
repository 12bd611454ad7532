"""A Node.js client (@grpc/grpc-js with the .proto files) calls Predict and StreamPredict: nothing in the
contract is Python-only."""

from __future__ import annotations

import asyncio
import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest

from sluice.server.app import SluiceServer
from support import DIGITS_ONNX, ROOT

NODE_DIR = ROOT / "tests" / "node"
pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir(),
    reason="needs node and `npm install --prefix tests/node` (make test does it when npm is present)",
)


async def test_node_client_predicts_and_streams(server: SluiceServer) -> None:
    pixels = np.random.default_rng(11).integers(0, 17, size=64).astype(np.float32)
    proc = await asyncio.create_subprocess_exec(
        "node", str(NODE_DIR / "client.js"), server.address, json.dumps(pixels.tolist()),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    result = json.loads(out)
    expected = int(ort.InferenceSession(str(DIGITS_ONNX)).run(["label"], {"pixels": pixels[None]})[0][0])
    assert result["predict"] == {"id": "node-1", "version": 1, "label": expected}
    assert result["stream"]["s1"] == {"label": expected}
    assert result["stream"]["s2"] == {"label": expected}
    assert result["stream"]["bad"]["code"] == 3  # INVALID_ARGUMENT, and the stream went on
    assert "expected FP32 [-1, 64], got FP64 [1, 64]" in result["stream"]["bad"]["message"]
