"""Triton's own HTTP client (tritonclient.http) against a server's REST port, as a Triton user would drive it.

Runs in tests/kserve/.venv (see requirements.txt), never in Sluice's environment. Usage:

    python triton_http_client.py HOST:PORT SCENARIO...

and prints one JSON object, a key per scenario. The models are those tests/e2e/test_rest_triton.py puts in
its repository: `add` (y = x + 1, FP32 [-1, 4]), `echo` (BYTES [-1, 2] echoed) and `pair` (sum = a + b,
FP32 [-1, 3], and ids INT64 [-1] passed through).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException


def _input(name: str, array: np.ndarray, datatype: str, binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def metadata(client: triton.InferenceServerClient) -> dict[str, Any]:
    return {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "add_ready": client.is_model_ready("add"),
        "add_1_ready": client.is_model_ready("add", "1"),
        "add_7_ready": client.is_model_ready("add", "7"),
        "nope_ready": client.is_model_ready("nope"),
        "server": client.get_server_metadata(),
        "add": client.get_model_metadata("add"),
        "echo": client.get_model_metadata("echo", "1"),
        "index": client.get_model_repository_index(),
    }


def config(client: triton.InferenceServerClient) -> dict[str, Any]:
    return {"add": client.get_model_config("add"), "echo": client.get_model_config("echo")}


def infer(client: triton.InferenceServerClient) -> dict[str, Any]:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    # Binary data both ways (tritonclient's default), and JSON both ways.
    binary = client.infer("add", [_input("x", x, "FP32")], request_id="bin-1", priority=2, timeout=60_000_000)
    as_json = client.infer(
        "add", [_input("x", x, "FP32", binary=False)], model_version="1",
        outputs=[triton.InferRequestedOutput("y", binary_data=False)],
    )  # fmt: skip
    text = np.array([["hello", "wörld"], ["", "sluice"]], dtype=np.object_)
    echoed = client.infer("echo", [_input("text", text, "BYTES")])
    echoed_json = client.infer(
        "echo", [_input("text", text, "BYTES", binary=False)],
        outputs=[triton.InferRequestedOutput("echo", binary_data=False)],
    )  # fmt: skip
    a = np.ones((3, 3), dtype=np.float32)
    ids = np.array([7, 8, 9], dtype=np.int64)
    pair = client.infer(
        "pair",
        [_input("a", a, "FP32"), _input("b", 2 * a, "FP32", binary=False), _input("ids", ids, "INT64")],
        outputs=[triton.InferRequestedOutput("ids_out")],
        parameters={"tenant": "blue"},  # a parameter Sluice does not know: ignored
    )
    return {
        "binary": {
            "response": binary.get_response(),
            "y": binary.as_numpy("y").tolist(),
            "y_dtype": str(binary.as_numpy("y").dtype),
        },
        "json": {"response": as_json.get_response(), "y": as_json.as_numpy("y").tolist()},
        "echo": [[item.decode("utf-8") for item in row] for row in echoed.as_numpy("echo")],
        "echo_json": [[str(item) for item in row] for row in echoed_json.as_numpy("echo")],
        "pair_outputs": [o["name"] for o in pair.get_response()["outputs"]],
        "pair_ids": pair.as_numpy("ids_out").tolist(),
    }


def errors(client: triton.InferenceServerClient) -> dict[str, Any]:
    out: dict[str, Any] = {}
    attempts: dict[str, Callable[[], Any]] = {
        "wrong_shape": lambda: client.infer("add", [_input("x", np.zeros((1, 3), np.float32), "FP32")]),
        "wrong_type": lambda: client.infer("add", [_input("x", np.zeros((1, 4), np.float64), "FP64")]),
        "unknown_model": lambda: client.infer("nope", [_input("x", np.zeros((1, 4), np.float32), "FP32")]),
        "bad_version": lambda: client.get_model_metadata("add", "latest"),
        "no_metadata": lambda: client.get_model_metadata("nope"),
    }
    for name, attempt in attempts.items():
        try:
            attempt()
        except InferenceServerException as exc:
            out[name] = {"status": exc.status(), "message": exc.message()}
        else:
            out[name] = None
    return out


def statistics(client: triton.InferenceServerClient) -> dict[str, Any]:
    return {"add": client.get_inference_statistics("add"), "all": client.get_inference_statistics()}


def classify(client: triton.InferenceServerClient) -> dict[str, Any]:
    """Triton's classification extension, asked for as its clients do (`class_count`)."""
    x = np.array([[0, 3, 1, 2], [5, 4, 7, 6]], dtype=np.float32)
    ranked = client.infer(
        "add",
        [_input("x", x, "FP32")],
        outputs=[triton.InferRequestedOutput("y", binary_data=False, class_count=2)],
    )
    out: dict[str, Any] = {
        "y": [
            [item.decode() if isinstance(item, bytes) else item for item in row]
            for row in ranked.as_numpy("y")
        ],
        "datatype": ranked.get_output("y")["datatype"],
    }
    text = np.array([["a", "b"]], dtype=np.object_)
    try:
        client.infer(
            "echo",
            [_input("text", text, "BYTES")],
            outputs=[triton.InferRequestedOutput("echo", class_count=1)],
        )
    except InferenceServerException as exc:
        out["strings"] = {"status": exc.status(), "message": exc.message()}
    else:
        out["strings"] = None
    return out


SCENARIOS: dict[str, Callable[[triton.InferenceServerClient], dict[str, Any]]] = {
    f.__name__: f for f in (metadata, config, infer, errors, statistics, classify)
}


def main(target: str, *names: str) -> None:
    client = triton.InferenceServerClient(target)
    try:
        print(json.dumps({name: SCENARIOS[name](client) for name in names}))
    finally:
        client.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
