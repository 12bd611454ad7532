"""The Open Inference Protocol (KServe v2, `inference.GRPCInferenceService`) on Sluice's port.

Triton's own Python client drives a real server the way a Triton user would: it runs in
tests/kserve/.venv, in a subprocess, because it needs protobuf<7 and registers `inference.*` messages of
its own. Sluice's generated stubs cover the finer cases over a real channel in this process.
"""

from __future__ import annotations

import asyncio
import json
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pb2, json_format
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from onnx import TensorProto, helper

from sluice.kserve.v2 import grpc_service_pb2 as kpb
from sluice.kserve.v2 import grpc_service_pb2_grpc as kpb_grpc
from sluice.kserve.v2 import model_config_pb2 as mc
from sluice.server import classification
from sluice.server.app import SluiceServer
from sluice.server.settings import ServerSettings
from support import ROOT, add_model, save, string_bytes, strings_model, two_inputs_model

KSERVE_DIR = ROOT / "tests" / "kserve"
TRITON_PYTHON = KSERVE_DIR / ".venv" / "bin" / "python"
needs_tritonclient = pytest.mark.skipif(
    not (KSERVE_DIR / ".venv" / ".installed").exists(),
    reason="needs Triton's client in tests/kserve/.venv: run `make test`, which builds it from "
    "tests/kserve/requirements.txt",
)

# Every numeric type with a typed contents field, as (KServe name, ONNX type, values at its limits).
TYPED = [
    ("BOOL", TensorProto.BOOL, np.array([[True, False]])),
    ("UINT8", TensorProto.UINT8, np.array([[0, 255]], np.uint8)),
    ("UINT16", TensorProto.UINT16, np.array([[0, 65535]], np.uint16)),
    ("UINT32", TensorProto.UINT32, np.array([[0, 2**32 - 1]], np.uint32)),
    ("UINT64", TensorProto.UINT64, np.array([[0, 2**64 - 1]], np.uint64)),
    ("INT8", TensorProto.INT8, np.array([[-128, 127]], np.int8)),
    ("INT16", TensorProto.INT16, np.array([[-(2**15), 2**15 - 1]], np.int16)),
    ("INT32", TensorProto.INT32, np.array([[-(2**31), 2**31 - 1]], np.int32)),
    ("INT64", TensorProto.INT64, np.array([[-(2**63), 2**63 - 1]], np.int64)),
    ("FP32", TensorProto.FLOAT, np.array([[-1.5, 3.25e38]], np.float32)),
    ("FP64", TensorProto.DOUBLE, np.array([[-1.5, 1.0e300]], np.float64)),
]
# The fields of InferTensorContents a typed input fills, by the numpy kind and size of its elements.
FIELDS = {"b": "bool_contents", "u8": "uint64_contents", "i8": "int64_contents", "f4": "fp32_contents",
          "f8": "fp64_contents", "u": "uint_contents", "i": "int_contents"}  # fmt: skip

# A python-runtime model whose input is binary (BYTES, not STRING): it gives the length of each element,
# or -1 for one that did not arrive as bytes.
BLOB_CONFIG = """
[runtime]
name = "python"
inputs = [{ name = "data", datatype = "BYTES", shape = [-1] }]
outputs = [{ name = "length", datatype = "INT64", shape = [-1] }]
"""
BLOB = """
import numpy as np


class Model:
    def predict(self, batch):
        # The length of each bytes element; -1 for anything that arrived as another type.
        return {"length": np.array([len(d) if isinstance(d, bytes) else -1 for d in batch["data"]])}
"""


def _identity(name: str, elem: int) -> Any:
    return helper.make_tensor_value_info(name, elem, ["N", 2])


def types_model() -> Any:
    """Every typed numeric type, each input passed through to an output named after it plus '_out'."""
    names = [kind.lower() for kind, _, _ in TYPED]
    return helper.make_model(
        helper.make_graph(
            [helper.make_node("Identity", [n], [f"{n}_out"]) for n in names],
            "types",
            [_identity(n, elem) for n, (_, elem, _) in zip(names, TYPED, strict=True)],
            [_identity(f"{n}_out", elem) for n, (_, elem, _) in zip(names, TYPED, strict=True)],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )


def half_model() -> Any:
    """FP16 [N, 2] passed through: a type with no typed contents field."""
    return helper.make_model(
        helper.make_graph(
            [helper.make_node("Identity", ["h"], ["h_out"])],
            "half",
            [_identity("h", TensorProto.FLOAT16)],
            [_identity("h_out", TensorProto.FLOAT16)],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )


def _repository(repo: Path) -> Path:
    """add (y = x + 1, FP32 [-1, 4]), echo (STRING [-1, 2]) and pair (a + b, and ids passed through)."""
    save(add_model(1.0), repo / "add" / "1" / "model.onnx")
    save(strings_model(), repo / "echo" / "1" / "model.onnx")
    save(two_inputs_model(), repo / "pair" / "1" / "model.onnx")
    return repo


async def _serve(repo: Path) -> SluiceServer:
    server = SluiceServer(ServerSettings(model_repository=repo, port=0, metrics_port=-1, http_port=-1))
    await server.start()
    await server.loaded()
    return server


# ---- Triton's client, in its own virtualenv --------------------------------------------------------------

SCENARIOS = ("wire", "metadata", "config", "infer", "stream", "errors", "statistics", "classify")


async def _run_triton_client(repo: Path) -> dict[str, Any]:
    server = await _serve(repo)
    try:
        proc = await asyncio.create_subprocess_exec(
            str(TRITON_PYTHON), str(KSERVE_DIR / "triton_client.py"), server.address, *SCENARIOS,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await proc.communicate()
    finally:
        await server.stop(0)
    assert proc.returncode == 0, err.decode()
    result: dict[str, Any] = json.loads(out)
    return result


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What tritonclient saw in every scenario of tests/kserve/triton_client.py, run in that order in one
    process against one server (one launch: each costs about a second)."""
    return asyncio.run(_run_triton_client(_repository(tmp_path_factory.mktemp("models"))))


def _shapes(descriptor: dict[str, Any]) -> dict[str, Any]:
    """Every message (its fields: number, type, label, type name, oneof) and enum of a FileDescriptorProto
    as JSON, by qualified name."""
    out: dict[str, Any] = {}

    def message(m: dict[str, Any], prefix: str) -> None:
        name = f"{prefix}.{m['name']}"
        oneofs = [o["name"] for o in m.get("oneof_decl", [])]
        out[name] = {
            f["name"]: (f["number"], f["type"], f["label"], f.get("type_name"),
                        oneofs[f["oneof_index"]] if "oneof_index" in f else None)
            for f in m.get("field", [])
        }  # fmt: skip
        for nested in m.get("nested_type", []):
            message(nested, name)
        for e in m.get("enum_type", []):
            out[f"{name}.{e['name']}"] = {v["name"]: v.get("number", 0) for v in e["value"]}

    package = descriptor["package"]
    for m in descriptor.get("message_type", []):
        message(m, package)
    for e in descriptor.get("enum_type", []):
        out[f"{package}.{e['name']}"] = {v["name"]: v.get("number", 0) for v in e["value"]}
    for s in descriptor.get("service", []):
        out[f"{package}.{s['name']}"] = {
            r["name"]: (r["input_type"], r["output_type"], r.get("client_streaming", False),
                        r.get("server_streaming", False))
            for r in s["method"]
        }  # fmt: skip
    return out


@needs_tritonclient
def test_every_message_kept_has_tritons_names_and_numbers(triton: dict[str, Any]) -> None:
    theirs = {name.rsplit("/", 1)[-1]: _shapes(d) for name, d in triton["wire"].items()}
    for module in (kpb, mc):
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        ours = _shapes(json_format.MessageToDict(proto, preserving_proto_field_name=True))
        published = theirs[proto.name.rsplit("/", 1)[-1]]
        assert ours, proto.name
        for name, members in ours.items():
            assert name in published, f"{name} is not in Triton's {proto.name}"
            for member, shape in members.items():
                assert published[name].get(member) == shape, f"{name}.{member}: {shape} != Triton's"


@needs_tritonclient
def test_metadata_and_readiness(triton: dict[str, Any]) -> None:
    seen = triton["metadata"]
    assert seen["live"] is True
    assert seen["ready"] is True
    assert (seen["add_ready"], seen["add_1_ready"], seen["add_7_ready"], seen["nope_ready"]) == (
        True, True, False, False,
    )  # fmt: skip
    assert seen["server"]["name"] == "sluice"
    assert set(seen["server"]["extensions"]) >= {"classification", "model_configuration", "statistics"}
    # The batch dimension is in the shape, as -1 (int64 fields are strings in protobuf's JSON).
    assert seen["add"] == {
        "name": "add",
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": ["-1", "4"]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": ["-1", "4"]}],
    }
    assert seen["echo"]["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": ["-1", "2"]}]
    assert [(m["name"], m["version"], m["state"]) for m in seen["index"]["models"]] == [
        ("add", "1", "READY"), ("echo", "1", "READY"), ("pair", "1", "READY"),
    ]  # fmt: skip


@needs_tritonclient
def test_model_config(triton: dict[str, Any]) -> None:
    add, echo = triton["config"]["add"], triton["config"]["echo"]
    assert (add["name"], add["platform"], add["backend"]) == ("add", "onnxruntime_onnx", "onnxruntime")
    assert add["max_batch_size"] == 32
    # Triton's convention: with max_batch_size > 0 the dims leave the batch dimension out.
    assert add["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": ["4"]}]
    assert add["output"] == [{"name": "y", "data_type": "TYPE_FP32", "dims": ["4"]}]
    assert add["dynamic_batching"] == {"max_queue_delay_microseconds": "2000"}  # batching.max_delay_ms = 2
    assert add["instance_group"][0]["count"] == 1
    assert echo["input"] == [{"name": "text", "data_type": "TYPE_STRING", "dims": ["2"]}]


@needs_tritonclient
def test_infer_numbers_and_strings(triton: dict[str, Any]) -> None:
    seen = triton["infer"]
    assert seen["add"] == {
        "id": "numeric-1",
        "model": "add",
        "version": "1",
        "y": [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]],
        "y_dtype": "float32",
    }
    assert seen["echo"] == [["hello", "wörld"], ["", "sluice"]]
    assert seen["echo_datatype"] == "BYTES"
    # Only the output asked for, and the unknown request parameters did not get in the way.
    assert seen["pair_outputs"] == ["ids_out"]
    assert seen["pair_ids"] == [7, 8, 9]


@needs_tritonclient
def test_stream_answers_by_id_and_goes_on_after_an_error(triton: dict[str, Any]) -> None:
    seen = triton["stream"]
    assert seen["results"] == {f"s{i}": [[i + 1.0] * 4] for i in range(4)}
    assert seen["errors"] == ["[request id: bad] input 'x': expected FP32 [-1, 4], got FP32 [1, 3]"]
    assert seen["final"] == ["s2", "s3"]  # the requests that asked to be told their last response


@needs_tritonclient
def test_errors_carry_sluices_status_and_message(triton: dict[str, Any]) -> None:
    seen = triton["errors"]
    assert seen["wrong_shape"] == {
        "status": "StatusCode.INVALID_ARGUMENT",
        "message": "input 'x': expected FP32 [-1, 4], got FP32 [1, 3]",
    }
    assert seen["wrong_type"] == {
        "status": "StatusCode.INVALID_ARGUMENT",
        "message": "input 'x': expected FP32 [-1, 4], got FP64 [1, 4]",
    }
    assert seen["unknown_model"]["status"] == "StatusCode.NOT_FOUND"
    assert "no model named 'nope'" in seen["unknown_model"]["message"]
    assert seen["bad_version"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "got 'latest'" in seen["bad_version"]["message"]
    assert seen["shared_memory"]["status"] == "StatusCode.UNIMPLEMENTED"
    assert "does not support system shared memory" in seen["shared_memory"]["message"]


@needs_tritonclient
def test_statistics_count_what_ran(triton: dict[str, Any]) -> None:
    (add,) = triton["statistics"]["add"]["model_stats"]
    assert (add["name"], add["version"]) == ("add", "1")
    # Before statistics: 1 infer of 2 rows and 4 streamed rows answered; 3 requests failed (1 streamed).
    stats = add["inference_stats"]
    assert stats["success"]["count"] == "5"
    assert stats["fail"]["count"] == "3"
    assert stats["queue"]["count"] == "5"
    assert stats["compute_infer"]["count"] == "5"
    assert add["inference_count"] == "6"
    runs = int(add["execution_count"])
    assert 1 <= runs <= 5  # streamed requests may share a batch
    assert sum(int(b["compute_infer"]["count"]) for b in add["batch_stats"]) == runs
    assert int(add["last_inference"]) > 0
    everything = triton["statistics"]["all"]["model_stats"]
    assert [m["name"] for m in everything] == ["add", "echo", "pair"]


# ---- Sluice's own stubs, in this process ---------------------------------------------------------------


@pytest.fixture
async def kserve_channel(repo: Path) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to a server with the models above, and: types (every typed numeric type), half (FP16),
    blob (a BYTES input), fixed (add without batching), labeled (add, its output's classes named)."""
    _repository(repo)
    save(types_model(), repo / "types" / "1" / "model.onnx")
    save(half_model(), repo / "half" / "1" / "model.onnx")
    (repo / "blob" / "1").mkdir(parents=True)
    (repo / "blob" / "config.toml").write_text(BLOB_CONFIG)
    (repo / "blob" / "1" / "model.py").write_text(textwrap.dedent(BLOB))
    save(add_model(1.0), repo / "fixed" / "1" / "model.onnx")
    (repo / "fixed" / "config.toml").write_text("[batching]\nmax_batch_size = 0\n")
    save(add_model(1.0), repo / "labeled" / "1" / "model.onnx")
    (repo / "labeled" / "config.toml").write_text('[outputs.y]\nlabels = "labels.txt"\n')
    (repo / "labeled" / "labels.txt").write_text("zero\none\ntwo\nthree\n")
    # The same, its output renamed `scores` and replaced by the topk postprocessor's `scores`.
    save(add_model(1.0), repo / "ranked" / "1" / "model.onnx")
    (repo / "ranked" / "config.toml").write_text(
        'postprocess = [{ name = "topk", k = 2 }]\n\n[outputs.y]\nname = "scores"\nlabels = "labels.txt"\n'
    )
    (repo / "ranked" / "labels.txt").write_text("zero\none\ntwo\nthree\n")
    server = await _serve(repo)
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield channel
    await server.stop(0)


@pytest.fixture
def kserve(kserve_channel: grpc.aio.Channel) -> kpb_grpc.GRPCInferenceServiceAsyncStub:
    return kpb_grpc.GRPCInferenceServiceStub(kserve_channel)  # an AsyncStub over an aio channel


def _field(array: np.ndarray) -> str:
    kind = array.dtype.kind
    return FIELDS.get(f"{kind}{array.dtype.itemsize}", FIELDS.get(kind, ""))


def _typed(name: str, datatype: str, array: np.ndarray) -> kpb.ModelInferRequest.InferInputTensor:
    tensor = kpb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=array.shape)
    getattr(tensor.contents, _field(array)).extend(array.reshape(-1).tolist())
    return tensor


def _raw(name: str, datatype: str, shape: tuple[int, ...]) -> kpb.ModelInferRequest.InferInputTensor:
    return kpb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)


def _outputs(response: kpb.ModelInferResponse) -> dict[str, tuple[str, list[int], bytes]]:
    return {
        t.name: (t.datatype, list(t.shape), raw)
        for t, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }


@pytest.mark.parametrize("form", ["contents", "raw_input_contents"])
async def test_every_numeric_type_round_trips(
    kserve: kpb_grpc.GRPCInferenceServiceAsyncStub, form: str
) -> None:
    request = kpb.ModelInferRequest(model_name="types", id="all-types")
    for kind, _, values in TYPED:
        if form == "contents":
            request.inputs.append(_typed(kind.lower(), kind, values))
        else:
            request.inputs.append(_raw(kind.lower(), kind, values.shape))
            request.raw_input_contents.append(values.astype(values.dtype.newbyteorder("<")).tobytes())
    response = await kserve.ModelInfer(request)
    assert (response.id, response.model_name, response.model_version) == ("all-types", "types", "1")
    got = _outputs(response)
    assert list(got) == [f"{kind.lower()}_out" for kind, _, _ in TYPED]  # outputs are always raw
    for kind, _, values in TYPED:
        datatype, shape, raw = got[f"{kind.lower()}_out"]
        assert (datatype, shape) == (kind, [1, 2])
        np.testing.assert_array_equal(
            np.frombuffer(raw, values.dtype.newbyteorder("<")).reshape(1, 2), values
        )


async def test_fp16_goes_raw(kserve: kpb_grpc.GRPCInferenceServiceAsyncStub) -> None:
    half = np.array([[0.5, -2.0]], np.float16)
    request = kpb.ModelInferRequest(model_name="half", inputs=[_raw("h", "FP16", (1, 2))])
    request.raw_input_contents.append(half.astype("<f2").tobytes())
    (datatype, shape, raw), = _outputs(await kserve.ModelInfer(request)).values()  # fmt: skip
    assert (datatype, shape) == ("FP16", [1, 2])
    np.testing.assert_array_equal(np.frombuffer(raw, "<f2").reshape(1, 2), half)
    typed = kpb.ModelInferRequest(model_name="half", inputs=[_raw("h", "FP16", (1, 2))])
    typed.inputs[0].contents.fp32_contents.extend([0.5, -2.0])
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await kserve.ModelInfer(typed)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == (
        "input 'h': FP16 [1, 2] has no typed contents field; send it in raw_input_contents"
    )


async def test_strings_are_text_and_bytes_stay_binary(kserve: kpb_grpc.GRPCInferenceServiceAsyncStub) -> None:
    # A STRING input gets str (UTF-8 decoded); a BYTES input gets the bytes as they came, UTF-8 or not.
    text = kpb.ModelInferRequest(model_name="echo", inputs=[_raw("text", "BYTES", (1, 2))])
    text.inputs[0].contents.bytes_contents.extend(["žluť".encode(), b""])
    (datatype, shape, raw), = _outputs(await kserve.ModelInfer(text)).values()  # fmt: skip
    assert (datatype, shape, raw) == ("BYTES", [1, 2], string_bytes("žluť".encode(), b""))
    blobs = [b"\xff\xfe\x00", b"", b"plain"]
    binary = kpb.ModelInferRequest(model_name="blob", inputs=[_raw("data", "BYTES", (3,))])
    binary.raw_input_contents.append(string_bytes(*blobs))
    (datatype, shape, raw), = _outputs(await kserve.ModelInfer(binary)).values()  # fmt: skip
    assert (datatype, shape) == ("INT64", [3])
    assert np.frombuffer(raw, "<i8").tolist() == [3, 0, 5]


async def test_parameters(kserve: kpb_grpc.GRPCInferenceServiceAsyncStub) -> None:
    x = np.zeros((1, 4), np.float32)
    request = kpb.ModelInferRequest(model_name="add", inputs=[_typed("x", "FP32", x)])
    # Parameters Sluice does not know are ignored, on the request and on its tensors.
    request.parameters["sequence_id"].int64_param = 42
    request.parameters["tenant"].string_param = "blue"
    request.parameters["priority"].int64_param = 5
    request.parameters["timeout"].int64_param = 60_000_000
    request.inputs[0].parameters["binary_data_size"].int64_param = 16
    response = await kserve.ModelInfer(request)
    assert np.frombuffer(response.raw_output_contents[0], "<f4").tolist() == [1.0] * 4
    request.parameters["priority"].string_param = "high"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await kserve.ModelInfer(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == ("parameter 'priority': expected an integer, got \"high\"")


def _infer(model: str, *tensors: kpb.ModelInferRequest.InferInputTensor, version: str = "",
           raw: tuple[bytes, ...] = ()) -> kpb.ModelInferRequest:  # fmt: skip
    return kpb.ModelInferRequest(
        model_name=model, model_version=version, inputs=tensors, raw_input_contents=raw
    )


F32 = np.zeros((1, 4), np.float32)
PAIR = (_typed("a", "FP32", np.zeros((2, 3), np.float32)), _typed("ids", "INT64", np.zeros(2, np.int64)))


@pytest.mark.parametrize(
    ("request_", "code", "message"),
    [
        pytest.param(_infer("nope", _typed("x", "FP32", F32)), grpc.StatusCode.NOT_FOUND,
                     "no model named 'nope'; the repository has ", id="unknown-model"),
        pytest.param(_infer("add", _typed("x", "FP32", F32), version="7"), grpc.StatusCode.NOT_FOUND,
                     "model 'add' has no version 7; it has 1", id="unknown-version"),
        pytest.param(_infer("add", _typed("x", "FP32", F32), version="v1"), grpc.StatusCode.INVALID_ARGUMENT,
                     "model version must be a version number, or empty for the default version; got 'v1'",
                     id="version-not-a-number"),
        pytest.param(_infer("add", _typed("x", "FP64", F32.astype(np.float64))), grpc.StatusCode.INVALID_ARGUMENT,
                     "input 'x': expected FP32 [-1, 4], got FP64 [1, 4]", id="wrong-type"),
        pytest.param(_infer("add", _typed("x", "FP32", np.zeros((1, 3), np.float32))), grpc.StatusCode.INVALID_ARGUMENT,
                     "input 'x': expected FP32 [-1, 4], got FP32 [1, 3]", id="wrong-shape"),
        pytest.param(_infer("add", _raw("x", "FLOAT", (1, 4))), grpc.StatusCode.INVALID_ARGUMENT,
                     "input 'x': datatype must be one of BOOL, UINT8, INT8, UINT16, INT16, UINT32, INT32, UINT64, "
                     "INT64, FP16, FP32, FP64, BYTES, got 'FLOAT'", id="unknown-datatype"),
        pytest.param(_infer("echo", _typed("text", "FP32", np.zeros((1, 2), np.float32))),
                     grpc.StatusCode.INVALID_ARGUMENT, "input 'text': expected BYTES [-1, 2], got FP32 [1, 2]",
                     id="string-input-wants-bytes"),
        pytest.param(_infer("add", _typed("z", "FP32", F32)), grpc.StatusCode.INVALID_ARGUMENT,
                     "model 'add' has no input 'z'; it takes 'x' (FP32 [-1, 4])", id="unknown-input"),
        pytest.param(_infer("pair", *PAIR), grpc.StatusCode.INVALID_ARGUMENT,
                     "missing input 'b': expected FP32 [-1, 3]", id="missing-input"),
        pytest.param(_infer("add", _raw("x", "FP32", (1, 4)), raw=(b"\0" * 15,)), grpc.StatusCode.INVALID_ARGUMENT,
                     "input 'x': FP32 [1, 4] needs 16 bytes of raw_input_contents, got 15", id="raw-length"),
        pytest.param(_infer("pair", *PAIR, raw=(b"",)), grpc.StatusCode.INVALID_ARGUMENT,
                     "raw_input_contents has 1 entries for 2 inputs", id="raw-count"),
        pytest.param(_infer("add", _typed("x", "FP32", F32.astype(np.float64))),
                     grpc.StatusCode.INVALID_ARGUMENT,
                     "input 'x': FP32 [1, 4] needs 4 values in contents.fp32_contents, got 0 (the request fills "
                     "fp64_contents)", id="wrong-contents-field"),
        pytest.param(_infer("types", _typed("int8", "INT8", np.array([[1, 300]], np.int16))),
                     grpc.StatusCode.INVALID_ARGUMENT, "input 'int8': value 300 in contents.int_contents does not fit INT8",
                     id="out-of-range"),
        pytest.param(_infer("add", _typed("x", "FP32", F32), raw=(F32.tobytes(),)), grpc.StatusCode.INVALID_ARGUMENT,
                     "input 'x': give its data in raw_input_contents or in contents, not both", id="raw-and-contents"),
        pytest.param(_infer("types", _raw("int8", "INT8", (1, 2))), grpc.StatusCode.INVALID_ARGUMENT,
                     "input 'int8': INT8 [1, 2] needs 2 values in contents.int_contents, got 0", id="no-data"),
        pytest.param(_infer("echo", _raw("text", "BYTES", (1, 2)), raw=(string_bytes(b"ok", b"\xff"),)),
                     grpc.StatusCode.INVALID_ARGUMENT, "input 'text': element 1 is not valid UTF-8 text",
                     id="string-not-utf8"),
        pytest.param(_infer("add", _typed("x", "FP32", np.zeros((0, 4), np.float32))), grpc.StatusCode.INVALID_ARGUMENT,
                     "input 'x': the batch (first) dimension must be at least 1, got 0", id="zero-rows"),
    ],
)  # fmt: skip
async def test_caller_mistakes(
    kserve: kpb_grpc.GRPCInferenceServiceAsyncStub, request_: kpb.ModelInferRequest, code: grpc.StatusCode,
    message: str,
) -> None:  # fmt: skip
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await kserve.ModelInfer(request_)
    assert info.value.code() == code
    assert message in (info.value.details() or "")


async def test_stream_reports_an_error_for_its_request_and_goes_on(
    kserve: kpb_grpc.GRPCInferenceServiceAsyncStub,
) -> None:
    async def requests() -> AsyncIterator[kpb.ModelInferRequest]:
        for i in range(6):
            x = np.full((1, 3 if i == 2 else 4), float(i), np.float32)  # the third has the wrong shape
            yield kpb.ModelInferRequest(model_name="add", id=f"r{i}", inputs=[_typed("x", "FP32", x)])
        yield kpb.ModelInferRequest(model_name="nope", id="lost", inputs=[_typed("x", "FP32", F32)])

    answers = {a.infer_response.id: a async for a in kserve.ModelStreamInfer(requests())}
    assert set(answers) == {"r0", "r1", "r2", "r3", "r4", "r5", "lost"}
    assert answers["r2"].error_message == "[request id: r2] input 'x': expected FP32 [-1, 4], got FP32 [1, 3]"
    assert answers["lost"].error_message.startswith("[request id: lost] no model named 'nope'")
    for i in (0, 1, 3, 4, 5):
        answer = answers[f"r{i}"]
        assert answer.error_message == ""
        assert np.frombuffer(answer.infer_response.raw_output_contents[0], "<f4").tolist() == [i + 1.0] * 4


def _classes(raw: bytes) -> list[str]:
    """A raw BYTES tensor's elements (4-byte little-endian length, then the bytes) as text."""
    items, at = [], 0
    while at < len(raw):
        size = int.from_bytes(raw[at : at + 4], "little")
        items.append(raw[at + 4 : at + 4 + size].decode())
        at += 4 + size
    return items


@pytest.mark.parametrize("in_thread", [False, True])
async def test_classification_ranks_a_stream_answer_and_an_unbatched_model(
    kserve: kpb_grpc.GRPCInferenceServiceAsyncStub, monkeypatch: pytest.MonkeyPatch, in_thread: bool
) -> None:
    if in_thread:  # every output counts as big: ranked in a worker thread, off the event loop
        monkeypatch.setattr(classification, "LOOP_MAX_VALUES", 0)
    x = np.array([[0, 3, 1, 2], [5, 4, 7, 6]], np.float32)

    def wanted(count: int) -> list[kpb.ModelInferRequest.InferRequestedOutputTensor]:
        output = kpb.ModelInferRequest.InferRequestedOutputTensor(name="y")
        output.parameters["classification"].int64_param = count
        return [output]

    async def requests() -> AsyncIterator[kpb.ModelInferRequest]:
        yield kpb.ModelInferRequest(
            model_name="add", id="s", inputs=[_typed("x", "FP32", x)], outputs=wanted(1)
        )

    (answer,) = [a async for a in kserve.ModelStreamInfer(requests())]
    assert answer.error_message == ""
    (tensor,) = answer.infer_response.outputs
    assert (tensor.datatype, list(tensor.shape)) == ("BYTES", [2, 1])
    assert _classes(answer.infer_response.raw_output_contents[0]) == ["4.000000:1", "8.000000:2"]
    # Without a batch dimension the whole output is one ranking.
    request = kpb.ModelInferRequest(model_name="fixed", inputs=[_typed("x", "FP32", x)], outputs=wanted(3))
    response = await kserve.ModelInfer(request)
    assert (response.outputs[0].datatype, list(response.outputs[0].shape)) == ("BYTES", [3])
    assert _classes(response.raw_output_contents[0]) == ["8.000000:6", "7.000000:7", "6.000000:4"]
    del request.outputs[:]
    request.outputs.extend(wanted(0))
    with pytest.raises(grpc.aio.AioRpcError) as zero:
        await kserve.ModelInfer(request)
    assert zero.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert zero.value.details() == (
        "output 'y': parameter 'classification' must be a positive integer (how many classes to return), got 0"
    )


async def test_classification_strings_end_in_the_labels_of_the_output(
    kserve: kpb_grpc.GRPCInferenceServiceAsyncStub,
) -> None:
    config = (await kserve.ModelConfig(kpb.ModelConfigRequest(name="labeled"))).config
    assert [(o.name, o.label_filename) for o in config.output] == [("y", "labels.txt")]
    output = kpb.ModelInferRequest.InferRequestedOutputTensor(name="y")
    output.parameters["classification"].int64_param = 2
    x = np.array([[0, 3, 1, 2]], np.float32)
    request = kpb.ModelInferRequest(model_name="labeled", inputs=[_typed("x", "FP32", x)], outputs=[output])
    response = await kserve.ModelInfer(request)
    assert _classes(response.raw_output_contents[0]) == ["4.000000:1:one", "3.000000:3:three"]
    # A postprocessor's output of the same name is another tensor: the model's labels do not name it.
    config = (await kserve.ModelConfig(kpb.ModelConfigRequest(name="ranked"))).config
    assert [(o.name, o.label_filename) for o in config.output] == [("classes", ""), ("scores", "")]
    output.name = "scores"
    request = kpb.ModelInferRequest(model_name="ranked", inputs=[_typed("x", "FP32", x)], outputs=[output])
    response = await kserve.ModelInfer(request)
    assert _classes(response.raw_output_contents[0]) == ["4.000000:0", "3.000000:1"]


async def test_metadata_and_config_of_a_model_that_does_not_batch(
    kserve: kpb_grpc.GRPCInferenceServiceAsyncStub,
) -> None:
    metadata = await kserve.ModelMetadata(kpb.ModelMetadataRequest(name="fixed"))
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("x", "FP32", [-1, 4])]
    config = (await kserve.ModelConfig(kpb.ModelConfigRequest(name="fixed", version="1"))).config
    assert config.max_batch_size == 0
    # Without batching the dims are the whole shape, and requests are not combined.
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [("x", mc.TYPE_FP32, [-1, 4])]
    assert not config.HasField("dynamic_batching")
    blob = (await kserve.ModelConfig(kpb.ModelConfigRequest(name="blob"))).config
    assert (blob.platform, blob.backend) == ("python", "python")
    assert [(i.name, i.data_type, list(i.dims)) for i in blob.input] == [("data", mc.TYPE_STRING, [])]


async def test_statistics_of_one_model(kserve: kpb_grpc.GRPCInferenceServiceAsyncStub) -> None:
    for rows in (1, 2, 3):
        x = np.zeros((rows, 4), np.float32)
        await kserve.ModelInfer(kpb.ModelInferRequest(model_name="add", inputs=[_typed("x", "FP32", x)]))
    with pytest.raises(grpc.aio.AioRpcError):
        await kserve.ModelInfer(
            kpb.ModelInferRequest(model_name="add", inputs=[_typed("x", "FP32", F32[:, :3])])
        )
    (stats,) = (await kserve.ModelStatistics(kpb.ModelStatisticsRequest(name="add"))).model_stats
    assert (stats.name, stats.version) == ("add", "1")
    assert (stats.inference_stats.success.count, stats.inference_stats.fail.count) == (3, 1)
    assert stats.inference_count == 6  # rows
    assert stats.inference_stats.queue.count == 3
    assert sum(b.compute_infer.count for b in stats.batch_stats) == stats.execution_count
    assert stats.last_inference > 0


async def test_rpcs_sluice_does_not_serve_say_why(kserve_channel: grpc.aio.Channel) -> None:
    trace = kserve_channel.unary_unary("/inference.GRPCInferenceService/TraceSetting")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await trace(b"")
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert info.value.details() == (
        "TraceSetting: Sluice has no request tracing; its Prometheus metrics endpoint has latencies"
    )


async def test_readiness_follows_the_repository(repo: Path) -> None:
    save(add_model(1.0), repo / "add" / "1" / "model.onnx")
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"not onnx")
    server = await _serve(repo)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = kpb_grpc.GRPCInferenceServiceStub(channel)
            assert (await stub.ServerLive(kpb.ServerLiveRequest())).live
            # Not ready while any model failed, like grpc.health.v1's "" (a probe must not route here).
            assert not (await stub.ServerReady(kpb.ServerReadyRequest())).ready
            assert (await stub.ModelReady(kpb.ModelReadyRequest(name="add"))).ready
            assert not (await stub.ModelReady(kpb.ModelReadyRequest(name="broken"))).ready
            index = await stub.RepositoryIndex(kpb.RepositoryIndexRequest())
            states = {(m.name, m.version): (m.state, m.reason) for m in index.models}
            assert states[("add", "1")] == ("READY", "")
            assert states[("broken", "1")][0] == "UNAVAILABLE"
            assert states[("broken", "1")][1]  # the reason it failed
            ready = await stub.RepositoryIndex(kpb.RepositoryIndexRequest(ready=True))
            assert [m.name for m in ready.models] == ["add"]
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ModelInfer(
                    kpb.ModelInferRequest(model_name="broken", inputs=[_typed("x", "FP32", F32)])
                )
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "model 'broken' has no version ready" in (info.value.details() or "")
    finally:
        await server.stop(0)


async def test_draining_refuses_new_requests(repo: Path) -> None:
    save(add_model(1.0), repo / "add" / "1" / "model.onnx")
    server = await _serve(repo)
    async with grpc.aio.insecure_channel(server.address) as channel:
        call = kpb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer()
        await call.write(
            kpb.ModelInferRequest(model_name="add", id="before", inputs=[_typed("x", "FP32", F32)])
        )
        before = await call.read()
        assert isinstance(before, kpb.ModelStreamInferResponse)
        assert before.error_message == ""
        stopping = asyncio.ensure_future(server.stop(5))
        # What the stream carries now is refused: in-band while the stream is still open, or with the
        # stream's own status once the server has ended it. Either way the caller is told to go elsewhere.
        await call.write(
            kpb.ModelInferRequest(model_name="add", id="after", inputs=[_typed("x", "FP32", F32)])
        )
        try:
            after = await call.read()
        except grpc.aio.AioRpcError as error:
            cut = (error.code(), error.details())
            assert cut == (
                grpc.StatusCode.UNAVAILABLE,
                "the server is shutting down; retry on another replica",
            )
        else:
            assert isinstance(after, kpb.ModelStreamInferResponse)
            assert after.infer_response.id == "after"
            assert after.error_message == (
                "[request id: after] the server is shutting down; retry on another replica"
            )
            await call.done_writing()
        await stopping


async def test_reflection_describes_the_service(kserve_channel: grpc.aio.Channel) -> None:
    # grpcurl and similar tools find the service, and its .proto with the one it imports, by name.
    stub = reflection_pb2_grpc.ServerReflectionStub(kserve_channel)
    asks = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService"),
    ]
    listed, described = [r async for r in stub.ServerReflectionInfo(iter(asks))]
    assert "inference.GRPCInferenceService" in [s.name for s in listed.list_services_response.service]
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in described.file_descriptor_response.file_descriptor_proto
    ]
    assert {f.name for f in files} == {
        "sluice/kserve/v2/grpc_service.proto",
        "sluice/kserve/v2/model_config.proto",
    }


def test_an_output_asked_for_as_a_classification_comes_back_ranked(triton: dict[str, Any]) -> None:
    # Triton's classification extension (class_count): y = x + 1, its two highest values per batch item,
    # as BYTES "<value>:<index>".
    seen = triton["classify"]
    assert seen["y"] == [["4.000000:1", "3.000000:3"], ["8.000000:2", "7.000000:3"]]
    assert seen["datatype"] == "BYTES"
    assert seen["strings"]["message"].startswith(
        "output 'echo': parameter 'classification' ranks numbers, and this output holds strings"
    )
