"""Triton's own Python client (tritonclient.grpc) against a server, as a Triton user would drive it.

Runs in tests/kserve/.venv (see requirements.txt), never in Sluice's environment: tritonclient needs
protobuf<7 and registers its own `inference.*` messages. Usage:

    python triton_client.py HOST:PORT SCENARIO...

and prints one JSON object, a key per scenario. The models are those tests/e2e/test_kserve.py puts in
its repository: `add` (y = x + 1, FP32 [-1, 4]), `echo` (BYTES [-1, 2] echoed) and `pair` (sum = a + b,
FP32 [-1, 3], and ids INT64 [-1] passed through).
"""

from __future__ import annotations

import contextlib
import json
import queue
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import tritonclient.grpc as triton
from google.protobuf import descriptor_pb2, json_format
from tritonclient.grpc import model_config_pb2, service_pb2
from tritonclient.utils import InferenceServerException


def _input(name: str, array: np.ndarray, datatype: str) -> triton.InferInput:
    tensor = triton.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def _error(exc: InferenceServerException) -> dict[str, Any]:
    return {"status": exc.status(), "message": exc.message()}


def wire(client: triton.InferenceServerClient) -> dict[str, Any]:
    """tritonclient's own descriptors of the protocol, to compare with Sluice's .proto files."""
    files = {}
    for module in (service_pb2, model_config_pb2):
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        files[proto.name] = json_format.MessageToDict(proto, preserving_proto_field_name=True)
    return files


def metadata(client: triton.InferenceServerClient) -> dict[str, Any]:
    return {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "add_ready": client.is_model_ready("add"),
        "add_1_ready": client.is_model_ready("add", "1"),
        "add_7_ready": client.is_model_ready("add", "7"),
        "nope_ready": client.is_model_ready("nope"),
        "server": client.get_server_metadata(as_json=True),
        "add": client.get_model_metadata("add", as_json=True),
        "echo": client.get_model_metadata("echo", as_json=True),
        "index": client.get_model_repository_index(as_json=True),
    }


def config(client: triton.InferenceServerClient) -> dict[str, Any]:
    return {
        "add": client.get_model_config("add", as_json=True)["config"],
        "echo": client.get_model_config("echo", as_json=True)["config"],
    }


def infer(client: triton.InferenceServerClient) -> dict[str, Any]:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    added = client.infer("add", [_input("x", x, "FP32")], request_id="numeric-1")
    text = np.array([["hello", "wörld"], ["", "sluice"]], dtype=np.object_)
    echoed = client.infer("echo", [_input("text", text, "BYTES")], model_version="1")
    a = np.ones((3, 3), dtype=np.float32)
    ids = np.array([7, 8, 9], dtype=np.int64)
    pair = client.infer(
        "pair",
        [_input("a", a, "FP32"), _input("b", 2 * a, "FP32"), _input("ids", ids, "INT64")],
        outputs=[triton.InferRequestedOutput("ids_out")],
        parameters={"tenant": "blue", "trace_me": True},  # parameters Sluice does not know: ignored
    )
    return {
        "add": {
            "id": added.get_response().id,
            "model": added.get_response().model_name,
            "version": added.get_response().model_version,
            "y": added.as_numpy("y").tolist(),
            "y_dtype": str(added.as_numpy("y").dtype),
        },
        "echo": [[item.decode("utf-8") for item in row] for row in echoed.as_numpy("echo")],
        "echo_datatype": echoed.get_output("echo").datatype,
        "pair_outputs": [o.name for o in pair.get_response().outputs],
        "pair_ids": pair.as_numpy("ids_out").tolist(),
    }


def stream(client: triton.InferenceServerClient) -> dict[str, Any]:
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    sent = {f"s{i}": np.full((1, 4), float(i), dtype=np.float32) for i in range(4)}
    for request_id, x in list(sent.items())[:2]:
        client.async_stream_infer("add", [_input("x", x, "FP32")], request_id=request_id)
    bad = np.zeros((1, 3), dtype=np.float32)
    client.async_stream_infer("add", [_input("x", bad, "FP32")], request_id="bad")
    # Triton's own options: a priority, a server-side timeout (µs), and a flag on the last response.
    for request_id, x in list(sent.items())[2:]:
        client.async_stream_infer(
            "add", [_input("x", x, "FP32")], request_id=request_id, priority=3, timeout=60_000_000,
            enable_empty_final_response=True,
        )  # fmt: skip
    results: dict[str, Any] = {}
    final = []
    errors = []
    for _ in range(len(sent) + 1):
        result, error = answers.get(timeout=30)
        if error is not None:
            errors.append(str(error))
            continue
        response = result.get_response()
        results[response.id] = result.as_numpy("y").tolist()
        flag = response.parameters.get("triton_final_response")
        if flag is not None and flag.bool_param:
            final.append(response.id)
    client.stop_stream()
    return {"results": results, "errors": errors, "final": sorted(final)}


def errors(client: triton.InferenceServerClient) -> dict[str, Any]:
    out: dict[str, Any] = {}
    attempts: dict[str, Callable[[], Any]] = {
        "wrong_shape": lambda: client.infer("add", [_input("x", np.zeros((1, 3), np.float32), "FP32")]),
        "wrong_type": lambda: client.infer("add", [_input("x", np.zeros((1, 4), np.float64), "FP64")]),
        "unknown_model": lambda: client.infer("nope", [_input("x", np.zeros((1, 4), np.float32), "FP32")]),
        "bad_version": lambda: client.get_model_metadata("add", "latest"),
        "shared_memory": lambda: client.register_system_shared_memory("region", "/key", 64),
    }
    for name, attempt in attempts.items():
        try:
            attempt()
        except InferenceServerException as exc:
            out[name] = _error(exc)
        else:
            out[name] = None
    return out


def statistics(client: triton.InferenceServerClient) -> dict[str, Any]:
    return {
        "add": client.get_inference_statistics("add", as_json=True),
        "all": client.get_inference_statistics(as_json=True),
    }


def statistics_load(client: triton.InferenceServerClient) -> dict[str, Any]:
    """A known load, then the statistics, on tests/e2e/test_statistics.py's repository: `add` (adaptive)
    gets one caller's requests of 1, 2, 3 and 3 rows and one of the wrong shape; `pack` (fixed window,
    batches of 4) gets groups of concurrent requests that fill exactly one batch each; `plain` (no batch
    dimension) gets two requests."""
    for rows in (1, 2, 3, 3):
        client.infer("add", [_input("x", np.ones((rows, 4), np.float32), "FP32")])
    with contextlib.suppress(InferenceServerException):
        client.infer("add", [_input("x", np.ones((1, 3), np.float32), "FP32")])
    answers: queue.Queue[Any] = queue.Queue()
    for group in ((1, 1, 1, 1), (2, 2), (3, 1), (4,)):
        for rows in group:
            x = np.ones((rows, 4), np.float32)
            client.async_infer("pack", [_input("x", x, "FP32")], lambda result, error: answers.put(error))
        # The next group starts once this one's batch has answered: each fills exactly one batch.
        failures = [answers.get(timeout=30) for _ in group]
        assert failures == [None] * len(group), failures
    for _ in range(2):
        client.infer("plain", [_input("x", np.ones((1, 4), np.float32), "FP32")])
    return {name: client.get_inference_statistics(name, as_json=True) for name in ("add", "pack", "plain")}


def control(client: triton.InferenceServerClient) -> dict[str, Any]:
    """Triton's model control against a server with model_control = explicit, on tests/e2e/
    test_lifecycle_triton.py's repository: `add` with versions 1 (y = x + 1) and 2 (y = x + 2)."""
    x = np.zeros((1, 4), dtype=np.float32)

    def added() -> float:
        return float(client.infer("add", [_input("x", x, "FP32")]).as_numpy("y")[0, 0])

    def index() -> list[list[str]]:
        models = client.get_model_repository_index(as_json=True).get("models", [])
        return [[m["name"], m.get("version", ""), m.get("state", ""), m.get("reason", "")] for m in models]

    def failure(attempt: Callable[[], Any]) -> dict[str, Any] | None:
        try:
            attempt()
        except InferenceServerException as exc:
            return _error(exc)
        return None

    out: dict[str, Any] = {"start": added(), "index_start": index()}
    client.load_model("add", config=json.dumps({"versions": [1]}))
    out["pinned_config"] = added()
    out["index_pinned"] = index()
    client.unload_model("add")
    out["ready_unloaded"] = client.is_model_ready("add")
    out["infer_unloaded"] = failure(added)
    out["index_unloaded"] = index()
    client.load_model("add")
    out["ready_reloaded"] = client.is_model_ready("add")
    out["reloaded"] = added()
    out["load_unknown"] = failure(lambda: client.load_model("nope"))
    out["load_bad_config"] = failure(
        lambda: client.load_model("add", config=json.dumps({"batching": {"max_batch_size": -1}}))
    )
    out["after_bad_config"] = added()
    return out


def classify(client: triton.InferenceServerClient) -> dict[str, Any]:
    """Triton's classification extension, asked for as its clients do (`class_count`)."""
    x = np.array([[0, 3, 1, 2], [5, 4, 7, 6]], dtype=np.float32)
    ranked = client.infer(
        "add", [_input("x", x, "FP32")], outputs=[triton.InferRequestedOutput("y", class_count=2)]
    )
    out: dict[str, Any] = {
        "y": [[item.decode() for item in row] for row in ranked.as_numpy("y")],
        "datatype": ranked.get_output("y").datatype,
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
    f.__name__: f
    for f in (wire, metadata, config, infer, stream, errors, statistics, statistics_load, control, classify)
}


def main(target: str, *names: str) -> None:
    client = triton.InferenceServerClient(target)
    try:
        print(json.dumps({name: SCENARIOS[name](client) for name in names}))
    finally:
        client.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
