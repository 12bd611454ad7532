"""The Open Inference Protocol's REST binding on its own port, against a real server, with aiohttp's client.

Every answer is compared with what a user would see: status, JSON, binary tensor data, and where the gRPC
door answers the same question, the same answer as that door.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import gzip
import ipaddress
import json
import ssl
import textwrap
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sluice.kserve.v2 import grpc_service_pb2 as kpb
from sluice.kserve.v2 import grpc_service_pb2_grpc as kpb_grpc
from sluice.server import classification
from sluice.server.app import SluiceServer
from sluice.server.rest_codec import message_json
from sluice.server.settings import ServerSettings
from support import add_model, save, scrape, string_bytes, strings_model, two_inputs_model

HEADER = "Inference-Header-Content-Length"

# A python-runtime model with a binary (BYTES, not STRING) input: the length of each element.
BLOB_CONFIG = """
[runtime]
name = "python"
inputs = [{ name = "data", datatype = "BYTES", shape = [-1] }]
outputs = [{ name = "length", datatype = "INT64", shape = [-1] }, { name = "same", datatype = "BYTES", shape = [-1] }]
"""
BLOB = """
import numpy as np


class Model:
    def predict(self, batch):
        data = batch["data"]
        return {"length": np.array([len(d) if isinstance(d, bytes) else -1 for d in data]), "same": data}
"""

# A python-runtime model that holds a request whose x is 1 until a file appears: a request in flight on
# purpose, released by the test. It says it started by writing another file.
GATE_CONFIG = """
[runtime]
name = "python"
inputs = [{ name = "x", datatype = "FP32", shape = [-1, 4] }]
outputs = [{ name = "y", datatype = "FP32", shape = [-1, 4] }]

[execution]
inline_max_us = 0
"""
GATE = """
import time
from pathlib import Path

HERE = Path(__file__).parent


class Model:
    def predict(self, batch):
        x = batch["x"]
        if (x == 1).any():
            (HERE / "started").touch()
            for _ in range(2000):  # at most 20 s
                if (HERE / "release").exists():
                    break
                time.sleep(0.01)
        return {"y": x}
"""


def _repository(repo: Path) -> Path:
    """add (y = x + 1, FP32 [-1, 4]), echo (STRING [-1, 2]), pair (a + b, and ids), blob (BYTES [-1])."""
    save(add_model(1.0), repo / "add" / "1" / "model.onnx")
    save(add_model(2.0), repo / "add" / "2" / "model.onnx")
    (repo / "add" / "config.toml").write_text('versions = "all"\n')
    save(strings_model(), repo / "echo" / "1" / "model.onnx")
    save(two_inputs_model(), repo / "pair" / "1" / "model.onnx")
    (repo / "blob" / "1").mkdir(parents=True)
    (repo / "blob" / "config.toml").write_text(BLOB_CONFIG)
    (repo / "blob" / "1" / "model.py").write_text(textwrap.dedent(BLOB))
    return repo


@dataclass
class Rest:
    server: SluiceServer
    session: aiohttp.ClientSession

    async def get(self, path: str, **kw: Any) -> tuple[int, Any]:
        async with self.session.get(path, **kw) as response:
            body = await response.read()
            return response.status, json.loads(body) if body else None

    async def post(self, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        data = kw.pop("data", None)
        if data is None and body is not None:
            data = json.dumps(body).encode()
        async with self.session.post(path, data=data, **kw) as response:
            raw = await response.read()
            return response.status, json.loads(raw) if raw else None


async def _serve(repo: Path, **settings: Any) -> SluiceServer:
    defaults: dict[str, Any] = {"port": 0, "http_port": 0, "metrics_port": -1, "grace_period_s": 5}
    server = SluiceServer(ServerSettings(model_repository=repo, **{**defaults, **settings}))
    await server.start()
    await server.loaded()
    return server


@pytest.fixture
async def rest(repo: Path) -> AsyncIterator[Rest]:
    server = await _serve(_repository(repo), metrics_port=0)
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as session:
            yield Rest(server, session)
    finally:
        await server.stop(0)


def _infer(*inputs: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {**fields, "inputs": list(inputs)}


def _fp32(name: str, array: Any) -> dict[str, Any]:
    a = np.asarray(array, np.float32)
    return {"name": name, "datatype": "FP32", "shape": list(a.shape), "data": a.tolist()}


# ---- health, metadata, config, statistics, index -------------------------------------------------------


async def test_health_and_server_metadata(rest: Rest) -> None:
    assert (await rest.get("/v2/health/live")) == (200, None)
    assert (await rest.get("/v2/health/ready")) == (200, None)
    status, server = await rest.get("/v2")
    assert status == 200
    assert server["name"] == "sluice"
    assert server["extensions"] == [
        "classification",
        "model_configuration",
        "statistics",
        "model_repository",
        "model_repository(unload_dependents)",
    ]


async def test_model_readiness(rest: Rest) -> None:
    assert (await rest.get("/v2/models/add/ready"))[0] == 200
    assert (await rest.get("/v2/models/add/versions/2/ready"))[0] == 200
    assert (await rest.get("/v2/models/add/versions/7/ready"))[0] == 400
    assert (await rest.get("/v2/models/nope/ready"))[0] == 400
    # A version that is not a number is the caller's mistake, as on the gRPC door.
    assert (await rest.get("/v2/models/add/versions/latest/ready")) == (
        400,
        {"error": "model version must be a version number, or empty for the default version; got 'latest'"},
    )


async def test_metadata_config_and_index_say_what_the_grpc_door_says(rest: Rest) -> None:
    status, add = await rest.get("/v2/models/add")
    assert status == 200
    assert add == {
        "name": "add",
        "versions": ["2", "1"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
    }
    status, config = await rest.get("/v2/models/add/versions/1/config")
    assert status == 200
    # Triton's JSON: the ModelConfig itself, 64-bit integers as numbers.
    assert (config["name"], config["max_batch_size"], config["backend"]) == ("add", 32, "onnxruntime")
    assert config["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": [4], "format": "FORMAT_NONE"}]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 2000
    status, index = await rest.post("/v2/repository/index", {"ready": True})
    assert status == 200
    assert [(m["name"], m["version"], m["state"]) for m in index] == [
        ("add", "2", "READY"), ("add", "1", "READY"), ("blob", "1", "READY"), ("echo", "1", "READY"),
        ("pair", "1", "READY"),
    ]  # fmt: skip
    async with grpc.aio.insecure_channel(rest.server.address) as channel:
        stub = kpb_grpc.GRPCInferenceServiceStub(channel)
        for name in ("add", "echo", "pair", "blob"):
            grpc_answer = await stub.ModelMetadata(kpb.ModelMetadataRequest(name=name))
            assert (await rest.get(f"/v2/models/{name}"))[1] == message_json(grpc_answer)
            grpc_config = await stub.ModelConfig(kpb.ModelConfigRequest(name=name))
            assert (await rest.get(f"/v2/models/{name}/config"))[1] == message_json(grpc_config.config)
        grpc_index = await stub.RepositoryIndex(kpb.RepositoryIndexRequest())
        assert (await rest.post("/v2/repository/index"))[1] == message_json(grpc_index)["models"]


async def test_statistics_count_rest_and_grpc_requests_alike(rest: Rest) -> None:
    for rows in (1, 2):
        status, _ = await rest.post("/v2/models/add/infer", _infer(_fp32("x", np.zeros((rows, 4)))))
        assert status == 200
    assert (await rest.post("/v2/models/add/infer", _infer(_fp32("x", np.zeros((1, 3))))))[0] == 400
    status, stats = await rest.get("/v2/models/add/stats")
    assert status == 200
    (add,) = stats["model_stats"]
    assert (add["name"], add["version"]) == ("add", "2")
    assert add["inference_stats"]["success"]["count"] == 2
    assert add["inference_stats"]["fail"]["count"] == 1
    assert add["inference_count"] == 3  # rows
    assert add["last_inference"] > 0
    status, everything = await rest.get("/v2/models/stats")
    assert status == 200
    assert [m["name"] for m in everything["model_stats"]] == ["add", "blob", "echo", "pair"]
    samples = scrape(rest.server)
    assert samples['sluice_requests_total{code="OK",method="REST ModelInfer",model="add",version="2"}'] == 2
    assert (
        samples[
            'sluice_requests_total{code="INVALID_ARGUMENT",method="REST ModelInfer",model="add",version="2"}'
        ]
        == 1
    )


# ---- infer: JSON, binary, BYTES --------------------------------------------------------------------


async def test_json_infer_with_flat_or_nested_data(rest: Rest) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    nested = _infer(_fp32("x", x), id="n-1")
    flat = _infer({**_fp32("x", x), "data": x.reshape(-1).tolist()})
    status, answer = await rest.post("/v2/models/add/infer", nested)
    assert status == 200
    assert answer == {
        "model_name": "add",
        "model_version": "2",
        "id": "n-1",
        "outputs": [{"name": "y", "shape": [2, 4], "datatype": "FP32", "data": (x + 2).reshape(-1).tolist()}],
    }
    status, answer = await rest.post("/v2/models/add/versions/1/infer", flat)
    assert (status, answer["model_version"], "id" in answer) == (200, "1", False)
    assert answer["outputs"][0]["data"] == (x + 1).reshape(-1).tolist()


async def test_only_the_outputs_asked_for_in_the_order_asked(rest: Rest) -> None:
    a = np.ones((3, 3), np.float32)
    ids = {"name": "ids", "datatype": "INT64", "shape": [3], "data": [7, 8, 9]}
    body = _infer(_fp32("a", a), _fp32("b", 2 * a), ids, outputs=[{"name": "ids_out"}, {"name": "sum"}])
    status, answer = await rest.post("/v2/models/pair/infer", body)
    assert status == 200
    assert [(o["name"], o["datatype"], o["data"][:3]) for o in answer["outputs"]] == [
        ("ids_out", "INT64", [7, 8, 9]), ("sum", "FP32", [3.0, 3.0, 3.0]),
    ]  # fmt: skip


def _split(body: bytes, header_length: str) -> tuple[dict[str, Any], bytes]:
    end = int(header_length)
    return json.loads(body[:end]), body[end:]


async def test_binary_inputs_and_outputs(rest: Rest) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    header = json.dumps(
        {
            "id": "bin",
            "inputs": [
                {"name": "x", "datatype": "FP32", "shape": [2, 4], "parameters": {"binary_data_size": 32}}
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    body = header + x.astype("<f4").tobytes()
    headers = {HEADER: str(len(header)), "Content-Type": "application/octet-stream"}
    async with rest.session.post("/v2/models/add/infer", data=body, headers=headers) as response:
        assert response.status == 200
        assert response.content_type == "application/octet-stream"
        answer, raw = _split(await response.read(), response.headers[HEADER])
    (y,) = answer["outputs"]
    assert y == {"name": "y", "datatype": "FP32", "shape": [2, 4], "parameters": {"binary_data_size": 32}}
    np.testing.assert_array_equal(np.frombuffer(raw, "<f4").reshape(2, 4), x + 2)
    # An output may ask for binary data on its own; the others stay JSON.
    mixed = _infer(
        _fp32("a", np.ones((1, 3))), _fp32("b", np.ones((1, 3))),
        {"name": "ids", "datatype": "INT64", "shape": [1], "data": [5]},
        outputs=[{"name": "sum"}, {"name": "ids_out", "parameters": {"binary_data": True}}],
    )  # fmt: skip
    async with rest.session.post("/v2/models/pair/infer", json=mixed) as response:
        answer, raw = _split(await response.read(), response.headers[HEADER])
    assert answer["outputs"][0]["data"] == [2.0, 2.0, 2.0]
    assert answer["outputs"][1]["parameters"] == {"binary_data_size": 8}
    assert np.frombuffer(raw, "<i8").tolist() == [5]


async def test_strings_and_bytes(rest: Rest) -> None:
    text = {"name": "text", "datatype": "BYTES", "shape": [2, 2], "data": [["hello", "wörld"], ["", "žluť"]]}
    status, answer = await rest.post("/v2/models/echo/infer", _infer(text))
    assert status == 200
    assert answer["outputs"] == [
        {"name": "echo", "shape": [2, 2], "datatype": "BYTES", "data": ["hello", "wörld", "", "žluť"]}
    ]
    # A BYTES input takes base64 in JSON; binary outputs go back as base64, and say so.
    blobs = [b"\xff\xfe\x00", b"", b"plain"]
    data = {
        "name": "data", "datatype": "BYTES", "shape": [3], "parameters": {"content_type": "base64"},
        "data": [base64.b64encode(b).decode() for b in blobs],
    }  # fmt: skip
    status, answer = await rest.post("/v2/models/blob/infer", _infer(data))
    assert status == 200
    length, same = answer["outputs"]
    assert length["data"] == [3, 0, 5]
    assert same["parameters"] == {"content_type": "base64"}
    assert [base64.b64decode(s) for s in same["data"]] == blobs
    # The binary extension carries BYTES length-prefixed, as raw_input_contents does.
    raw = string_bytes(*blobs)
    header = json.dumps(
        {"inputs": [{"name": "data", "datatype": "BYTES", "shape": [3], "parameters": {"binary_data_size": len(raw)}}],
         "outputs": [{"name": "same", "parameters": {"binary_data": True}}]}
    ).encode()  # fmt: skip
    async with rest.session.post(
        "/v2/models/blob/infer", data=header + raw, headers={HEADER: str(len(header))}
    ) as response:
        assert response.status == 200
        answer, tail = _split(await response.read(), response.headers[HEADER])
    assert answer["outputs"] == [
        {"name": "same", "datatype": "BYTES", "shape": [3], "parameters": {"binary_data_size": len(raw)}}
    ]
    assert tail == raw


# ---- caller mistakes -------------------------------------------------------------------------------

X = _fp32("x", np.zeros((1, 4)))


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        pytest.param("/v2/models/nope/infer", _infer(X), 404,
                     "no model named 'nope'; the repository has 'add', 'blob', 'echo', 'pair'", id="unknown-model"),
        pytest.param("/v2/models/add/versions/7/infer", _infer(X), 404, "model 'add' has no version 7; it has 2, 1",
                     id="unknown-version"),
        pytest.param("/v2/models/add/versions/v1/infer", _infer(X), 400,
                     "model version must be a version number, or empty for the default version; got 'v1'",
                     id="version-not-a-number"),
        pytest.param("/v2/models/add/infer", _infer({**X, "datatype": "FP64"}), 400,
                     "input 'x': expected FP32 [-1, 4], got FP64 [1, 4]", id="wrong-type"),
        pytest.param("/v2/models/add/infer", _infer({**X, "datatype": "FLOAT"}), 400,
                     "input 'x': datatype must be one of BOOL, UINT8, INT8, UINT16, INT16, UINT32, INT32, UINT64, "
                     "INT64, FP16, FP32, FP64, BYTES, got 'FLOAT'", id="unknown-datatype"),
        pytest.param("/v2/models/add/infer", _infer(_fp32("x", np.zeros((1, 3)))), 400,
                     "input 'x': expected FP32 [-1, 4], got FP32 [1, 3]", id="wrong-shape"),
        pytest.param("/v2/models/add/infer", _infer({**X, "shape": [2**62, 4], "data": [1, 2, 3]}), 400,
                     "input 'x': FP32 [4611686018427387904, 4] needs 18446744073709551616 values in data, got 3",
                     id="huge-declared-shape"),
        pytest.param("/v2/models/add/infer", _infer({**X, "data": [1, 2, 3]}), 400,
                     "input 'x': FP32 [1, 4] needs 4 values in data, got 3", id="too-few-values"),
        pytest.param("/v2/models/add/infer", _infer({**X, "data": [1, 2, "three", 4]}), 400,
                     "input 'x': FP32 data must be numbers; element 2 is \"three\"", id="not-a-number"),
        pytest.param("/v2/models/pair/infer",
                     _infer(_fp32("a", np.ones((1, 3))), _fp32("b", np.ones((1, 3))),
                            {"name": "ids", "datatype": "INT64", "shape": [1], "data": [2**64]}), 400,
                     "input 'ids': value 18446744073709551616 in data does not fit INT64", id="does-not-fit"),
        pytest.param("/v2/models/pair/infer",
                     _infer(_fp32("a", np.ones((1, 3))), _fp32("b", np.ones((1, 3))),
                            {"name": "ids", "datatype": "INT64", "shape": [1], "data": [1.5]}), 400,
                     "input 'ids': INT64 data must be integers; element 0 is 1.5", id="float-for-int"),
        pytest.param("/v2/models/add/infer", _infer({k: v for k, v in X.items() if k != "data"}), 400,
                     "input 'x': no 'data' and no binary_data_size parameter: send its values", id="no-data"),
        pytest.param("/v2/models/add/infer", _infer({**X, "name": "z"}), 400,
                     "model 'add' has no input 'z'; it takes 'x' (FP32 [-1, 4])", id="unknown-input"),
        pytest.param("/v2/models/add/infer", _infer(X, X), 400, "input 'x' is given twice", id="given-twice"),
        pytest.param("/v2/models/pair/infer", _infer(_fp32("a", np.ones((1, 3)))), 400,
                     "missing input 'b': expected FP32 [-1, 3], 'ids': expected INT64 [-1]", id="missing-input"),
        pytest.param("/v2/models/add/infer", _infer(X, outputs=[{"name": "z"}]), 400,
                     "model 'add' has no output 'z'; it gives 'y'", id="unknown-output"),
        pytest.param("/v2/models/add/infer", _infer(X, parameters={"priority": "high"}), 400,
                     "parameter 'priority': expected an integer, got \"high\"", id="priority"),
        pytest.param("/v2/models/add/infer", _infer(X, parameters={"timeout": -1}), 400,
                     "parameter 'timeout': expected microseconds >= 0, got -1", id="timeout"),
        pytest.param("/v2/models/add/infer", _infer({**X, "parameters": {"shared_memory_region": "r"}}), 400,
                     "input 'x': Sluice does not support shared memory; send the tensor in 'data' or as binary data",
                     id="shared-memory"),
        pytest.param("/v2/models/echo/infer",
                     _infer({"name": "text", "datatype": "BYTES", "shape": [1, 2], "data": ["ok", 3]}), 400,
                     "input 'text': BYTES data must be strings; element 1 is 3", id="bytes-not-string"),
        pytest.param("/v2/models/add/infer", [1, 2], 400, "the request body must be a JSON object, got [1, 2]",
                     id="not-an-object"),
        pytest.param("/v2/models/add/infer", {"inputs": {"x": 1}}, 400,
                     "'inputs' must be a list, got {\"x\": 1}", id="inputs-not-a-list"),
    ],
)  # fmt: skip
async def test_caller_mistakes(rest: Rest, path: str, body: Any, status: int, message: str) -> None:
    assert (await rest.post(path, body)) == (status, {"error": message})


async def test_malformed_bodies_and_binary_sizes(rest: Rest) -> None:
    assert (await rest.post("/v2/models/add/infer", data=b"{not json")) == (
        400, {"error": "the request body is not valid JSON: Expecting property name enclosed in double quotes: "
                       "line 1 column 2 (char 1)"},
    )  # fmt: skip
    header = json.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "parameters": {"binary_data_size": 15}}]}
    ).encode()  # fmt: skip
    short = await rest.post(
        "/v2/models/add/infer", data=header + b"\0" * 15, headers={HEADER: str(len(header))}
    )
    assert short == (400, {"error": "input 'x': FP32 [1, 4] needs 16 bytes of binary data, got 15"})
    header = header.replace(b'"binary_data_size": 15', b'"binary_data_size": 16')
    extra = await rest.post(
        "/v2/models/add/infer", data=header + b"\0" * 21, headers={HEADER: str(len(header))}
    )
    assert extra == (400, {"error": "the request has 5 bytes of binary data after the JSON header that no input "
                                    "claims (each binary input gives its binary_data_size)"})  # fmt: skip
    beyond = await rest.post("/v2/models/add/infer", data=header, headers={HEADER: str(len(header) + 1)})
    assert beyond == (
        400,
        {"error": f"{HEADER} is {len(header) + 1}, but the body has only {len(header)} bytes"},
    )
    # A BYTES tensor of 2**62 elements cannot fit in 8 bytes: refused from the numbers.
    huge = json.dumps(
        {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2**61, 2], "parameters": {"binary_data_size": 8}}]}
    ).encode()  # fmt: skip
    answer = await rest.post("/v2/models/echo/infer", data=huge + b"\0" * 8, headers={HEADER: str(len(huge))})
    assert answer == (400, {"error": "input 'text': malformed STRING contents: 4611686018427387904 elements "
                                     "need at least 18446744073709551616 bytes (a 4-byte length each), got 8"})  # fmt: skip


async def test_unknown_routes_and_methods(rest: Rest) -> None:
    assert (await rest.get("/v2/nothing")) == (404, {"error": "no route GET /v2/nothing; see docs/kserve.md"})
    assert (await rest.get("/v2/models/add/infer")) == (
        405, {"error": "Method Not Allowed: GET /v2/models/add/infer"},
    )  # fmt: skip
    assert (await rest.post("/v2/repository/index", {"repository_name": "other"})) == (
        404, {"error": "no repository named 'other'; Sluice serves one, named ''"},
    )  # fmt: skip


# ---- limits, auth, TLS, drain ------------------------------------------------------------------------


async def test_body_over_the_limit_is_refused_before_it_is_read(repo: Path) -> None:
    server = await _serve(_repository(repo), max_message_bytes=4096)
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as session:
            body = json.dumps(_infer(_fp32("x", np.zeros((200, 4))))).encode()
            assert len(body) > 4096
            async with session.post("/v2/models/add/infer", data=body) as response:
                assert response.status == 413
                assert await response.json() == {
                    "error": f"the request body has {len(body)} bytes, over the server's max_message_bytes "
                    "limit of 4096 (SLUICE_MAX_MESSAGE_BYTES)"
                }

            async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it comes
                for start in range(0, len(body), 1000):
                    yield body[start : start + 1000]

            over = {
                "error": "the request body is over the server's max_message_bytes limit of 4096 bytes "
                "(SLUICE_MAX_MESSAGE_BYTES)"
            }
            async with session.post("/v2/models/add/infer", data=chunks()) as response:
                assert (response.status, await response.json()) == (413, over)
            # A compressed body is counted as it inflates: a small gzip cannot carry a large body past it.
            packed = gzip.compress(body)
            assert len(packed) < 4096
            headers = {"Content-Encoding": "gzip"}
            async with session.post("/v2/models/add/infer", data=packed, headers=headers) as response:
                assert (response.status, await response.json()) == (413, over)
    finally:
        await server.stop(0)


async def test_bearer_token_guards_all_but_health(repo: Path) -> None:
    server = await _serve(_repository(repo), auth_token="s3cret")
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as session:
            rest = Rest(server, session)
            assert (await rest.get("/v2/health/ready"))[0] == 200  # probes carry no token
            refused = {
                "error": "missing or invalid bearer token: send the header 'Authorization: Bearer <token>'"
            }
            assert (await rest.get("/v2/models/add")) == (401, refused)
            assert (await rest.post("/v2/models/add/infer", _infer(X), headers={"Authorization": "Bearer nope"})) == (
                401, refused,
            )  # fmt: skip
            status, answer = await rest.post(
                "/v2/models/add/infer", _infer(X), headers={"Authorization": "Bearer s3cret"}
            )
            assert (status, answer["outputs"][0]["data"]) == (200, [2.0] * 4)
    finally:
        await server.stop(0)


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


async def test_tls_uses_the_grpc_ports_certificate(repo: Path, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    server = await _serve(_repository(repo), tls_cert=cert, tls_key=key)
    try:
        trusted = ssl.create_default_context(cafile=str(cert))
        async with aiohttp.ClientSession(f"https://127.0.0.1:{server.http_port}") as session:
            async with session.get("/v2/models/add", ssl=trusted) as response:
                assert response.status == 200
                assert (await response.json())["name"] == "add"
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                async with session.get("/v2/models/add"):  # the system's CAs do not know this one
                    pass
    finally:
        await server.stop(0)


async def test_mutual_tls_requires_a_client_certificate(repo: Path, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)  # a CA of its own: it signs itself, and so vouches for the client
    server = await _serve(_repository(repo), tls_cert=cert, tls_key=key, tls_client_ca=cert)
    try:
        anonymous = ssl.create_default_context(cafile=str(cert))
        known = ssl.create_default_context(cafile=str(cert))
        known.load_cert_chain(cert, key)
        async with aiohttp.ClientSession(f"https://127.0.0.1:{server.http_port}") as session:
            async with session.get("/v2/models/add", ssl=known) as response:
                assert response.status == 200
            with pytest.raises(aiohttp.ClientError):
                async with session.get("/v2/models/add", ssl=anonymous) as response:
                    await response.read()
    finally:
        await server.stop(0)


async def test_draining_refuses_new_requests_and_answers_those_in_flight(repo: Path) -> None:
    (repo / "gate" / "1").mkdir(parents=True)
    (repo / "gate" / "config.toml").write_text(GATE_CONFIG)
    (repo / "gate" / "1" / "model.py").write_text(textwrap.dedent(GATE))
    version = repo / "gate" / "1"
    server = await _serve(repo)
    async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as session:
        rest = Rest(server, session)
        held = asyncio.ensure_future(rest.post("/v2/models/gate/infer", _infer(_fp32("x", np.ones((1, 4))))))
        started = await asyncio.to_thread(_wait_for, version / "started")
        assert started, "the held request never reached the model"
        stopping = asyncio.ensure_future(server.stop(10, drain_delay=0))
        # Requests are answered until the server closes its doors, a few steps into stop(); then refused.
        statuses = []
        for _ in range(200):
            status, answer = await rest.post("/v2/models/gate/infer", _infer(_fp32("x", np.zeros((1, 4)))))
            statuses.append(status)
            if status != 200:
                break
        assert statuses[-1] == 503, statuses
        assert answer == {"error": "the server is shutting down; retry on another replica"}
        assert (await rest.get("/v2/health/live"))[0] == 400
        (version / "release").touch()
        status, answer = await held
        assert (status, answer["outputs"][0]["data"]) == (200, [1.0] * 4)
        await stopping


def _wait_for(path: Path) -> bool:
    """Whether `path` appears within 20 s (a blocking wait, run in a thread)."""
    ends = time.monotonic() + 20
    while time.monotonic() < ends:
        if path.exists():
            return True
        time.sleep(0.01)
    return False


async def test_a_model_that_failed_to_load(repo: Path) -> None:
    save(add_model(1.0), repo / "add" / "1" / "model.onnx")
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"not onnx")
    server = await _serve(repo)
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as session:
            rest = Rest(server, session)
            assert (await rest.get("/v2/health/live"))[0] == 200
            assert (await rest.get("/v2/health/ready"))[0] == 400  # as strict as grpc.health.v1's ""
            assert (await rest.get("/v2/models/broken/ready"))[0] == 400
            status, answer = await rest.post("/v2/models/broken/infer", _infer(X))
            assert status == 503
            assert answer["error"].startswith("model 'broken' has no version ready")
            status, index = await rest.post("/v2/repository/index")
            states = {(m["name"], m["version"]): m["state"] for m in index}
            assert states == {("add", "1"): "READY", ("broken", "1"): "UNAVAILABLE"}
    finally:
        await server.stop(0)


async def test_http_port_off(repo: Path) -> None:
    server = await _serve(_repository(repo), http_port=-1)
    try:
        assert server.http_port is None
    finally:
        await server.stop(0)


@pytest.fixture
async def labeled(tmp_path: Path) -> AsyncIterator[Rest]:
    """A server with `labeled` (add, its output's classes named) and `echo` (STRING)."""
    save(add_model(1.0), tmp_path / "labeled" / "1" / "model.onnx")
    (tmp_path / "labeled" / "config.toml").write_text('[outputs.y]\nlabels = "labels.txt"\n')
    # A byte-order mark and spaces around a label go, as the topk postprocessor reads its labels.
    (tmp_path / "labeled" / "labels.txt").write_text("\ufeffzero\none \ntwo\nthree\n", encoding="utf-8")
    save(strings_model(), tmp_path / "echo" / "1" / "model.onnx")
    server = await _serve(tmp_path, metrics_port=0)
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as session:
            yield Rest(server, session)
    finally:
        await server.stop(0)


@pytest.mark.parametrize("in_thread", [False, True])
async def test_classification_over_http_with_labels_and_binary_data(
    labeled: Rest, monkeypatch: pytest.MonkeyPatch, in_thread: bool
) -> None:
    if in_thread:  # every output counts as big: ranked in a worker thread, off the event loop
        monkeypatch.setattr(classification, "LOOP_MAX_VALUES", 0)
    rest = labeled
    x = _fp32("x", [[0, 3, 1, 2]])
    wanted = {"name": "y", "parameters": {"classification": 2}}
    status, body = await rest.post("/v2/models/labeled/infer", _infer(x, outputs=[wanted]))
    assert status == 200, body
    (y,) = body["outputs"]
    assert (y["datatype"], y["shape"], y["data"]) == ("BYTES", [1, 2], ["4.000000:1:one", "3.000000:3:three"])
    # As binary data: the strings raw, each after its 4-byte length.
    binary = {"name": "y", "parameters": {"classification": 1, "binary_data": True}}
    async with rest.session.post("/v2/models/labeled/infer", json=_infer(x, outputs=[binary])) as response:
        raw = await response.read()
        header = int(response.headers["Inference-Header-Content-Length"])
    assert json.loads(raw[:header])["outputs"][0]["parameters"] == {"binary_data_size": 18}
    assert raw[header:] == (14).to_bytes(4, "little") + b"4.000000:1:one"
    # A string output is refused before the model runs.
    text = {"name": "text", "datatype": "BYTES", "shape": [1, 2], "data": ["a", "b"]}
    status, body = await rest.post(
        "/v2/models/echo/infer", _infer(text, outputs=[{"name": "echo", "parameters": {"classification": 1}}])
    )
    assert status == 400
    assert body["error"].startswith("output 'echo': parameter 'classification' ranks numbers")
    assert rest.server.metrics.model("echo", 1).batch_rows.counts[0] == 0
