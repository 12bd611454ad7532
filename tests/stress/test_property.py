"""Any mutated request, on either protocol, gets OK, INVALID_ARGUMENT, NOT_FOUND or RESOURCE_EXHAUSTED:
never INTERNAL or UNKNOWN, which would mean the server mistook a caller's mistake for its own, and the
server stays up."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sluice.kserve.v2 import grpc_service_pb2 as kpb
from sluice.v1 import inference_pb2 as pb
from stress.harness import MODEL_INFER, PREDICT, RAW, ServerProcess, echo_model, sleepy_model, sluice_serve
from support import add_digits

ALLOWED = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED"}

# The models and what a valid request to each looks like: (input name, KServe datatype, shape, one row).
MODELS = {
    "digits": ("pixels", "FP32", [1, 64], b"\0\0\x80\x3f" * 64),
    "m": ("x", "FP32", [1, 4], b"\0\0\x80\x3f" * 4),
    "bytes": ("x", "BYTES", [1], struct.pack("<I", 3) + b"\x00\xff\x10"),
    "string": ("x", "BYTES", [1], struct.pack("<I", 2) + b"hi"),
}
V1_TYPES = {"FP32": pb.DATA_TYPE_FP32, "BYTES": pb.DATA_TYPE_BYTES}

# Dimensions are small (their products stay under 2**18 elements) or huge (no allocation of that size can
# succeed): nothing in between, where a bug would allocate gigabytes on a shared test machine.
DIMS = st.sampled_from([0, 1, 2, 3, 4, 64, -1, -(2**63), 2**40, 2**62, 2**63 - 1])
SHAPES = st.lists(DIMS, max_size=3)
NAMES = st.sampled_from(["x", "pixels", "", "y", "label", "X" * 1000, "é\u0000"])
MODEL_NAMES = st.sampled_from([*MODELS, "", "nope", "m" * 5000, "digits/../m"])
SMALL_BYTES = st.binary(max_size=64)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("property")
    repo = root / "models"
    repo.mkdir()
    add_digits(repo)
    sleepy_model(repo, "m", sleep_s=0.0)
    echo_model(repo, "bytes", "BYTES")
    echo_model(repo, "string", "STRING")
    with sluice_serve(repo, root / "server.log") as running:
        yield running


@pytest.fixture(scope="module")
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as ch:
        yield ch


@st.composite
def v1_requests(draw: st.DrawFn) -> bytes:
    model = draw(st.sampled_from(list(MODELS)))
    name, datatype, shape, row = MODELS[model]
    tensor = pb.Tensor(name=name, datatype=V1_TYPES[datatype], shape=shape, raw_contents=row)
    request = pb.PredictRequest(model=model, id="p", inputs=[tensor])
    for mutation in draw(st.lists(st.integers(0, 9), max_size=4)):
        if mutation == 0:
            request.model = draw(MODEL_NAMES)
        elif mutation == 1:
            request.version = draw(st.sampled_from([0, 1, 2, -1, 2**63 - 1]))
        elif mutation == 2:
            tensor = request.inputs[0] if request.inputs else request.inputs.add()
            tensor.name = draw(NAMES)
        elif mutation == 3 and request.inputs:
            request.inputs[0].datatype = draw(st.integers(-1, 20))  # type: ignore[assignment]
        elif mutation == 4 and request.inputs:
            del request.inputs[0].shape[:]
            request.inputs[0].shape.extend(draw(SHAPES))
        elif mutation == 5 and request.inputs:
            request.inputs[0].raw_contents = draw(_resized(request.inputs[0].raw_contents))
        elif mutation == 6 and request.inputs:
            request.inputs[0].sparse.indices = draw(SMALL_BYTES)
            request.inputs[0].sparse.values = draw(SMALL_BYTES)
        elif mutation == 7:
            request.inputs.append(request.inputs[0] if request.inputs else pb.Tensor(name="x"))
        elif mutation == 8:
            request.outputs.append(draw(NAMES))
        else:
            value = draw(
                st.sampled_from([pb.Parameter(int64_value=2**63 - 1), pb.Parameter(string_value="hi")])
            )
            request.parameters[draw(st.sampled_from(["priority", "timeout", ""]))].CopyFrom(value)
    return draw(_wire_mutated(request.SerializeToString()))


@st.composite
def kserve_requests(draw: st.DrawFn) -> bytes:
    model = draw(st.sampled_from(list(MODELS)))
    name, datatype, shape, row = MODELS[model]
    tensor = kpb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)
    request = kpb.ModelInferRequest(model_name=model, id="k", inputs=[tensor], raw_input_contents=[row])
    for mutation in draw(st.lists(st.integers(0, 9), max_size=4)):
        if mutation == 0:
            request.model_name = draw(MODEL_NAMES)
        elif mutation == 1:
            request.model_version = draw(st.sampled_from(["", "1", "2", "-1", "one", "9" * 30]))
        elif mutation == 2 and request.inputs:
            request.inputs[0].name = draw(NAMES)
        elif mutation == 3 and request.inputs:
            request.inputs[0].datatype = draw(
                st.sampled_from(["FP32", "BYTES", "INT64", "FP16", "BOOL", "UINT8", "", "FP8", "fp32"])
            )
        elif mutation == 4 and request.inputs:
            del request.inputs[0].shape[:]
            request.inputs[0].shape.extend(draw(SHAPES))
        elif mutation == 5 and request.raw_input_contents:
            request.raw_input_contents[0] = draw(_resized(request.raw_input_contents[0]))
        elif mutation == 6 and request.inputs:
            # Typed contents instead of raw ones (or as well: also a mistake to be named).
            if draw(st.booleans()):
                del request.raw_input_contents[:]
            contents = request.inputs[0].contents
            contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=70)))
            contents.bytes_contents.extend(draw(st.lists(SMALL_BYTES, max_size=3)))
            contents.int64_contents.extend(draw(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3)))
        elif mutation == 7:
            request.raw_input_contents.append(draw(SMALL_BYTES))
        elif mutation == 8:
            request.outputs.add(name=draw(NAMES))
        else:
            key = draw(st.sampled_from(["priority", "timeout", "binary_data_output", ""]))
            request.parameters[key].CopyFrom(
                draw(
                    st.sampled_from(
                        [kpb.InferParameter(int64_param=-1), kpb.InferParameter(string_param="x")]
                    )
                )
            )
    return draw(_wire_mutated(request.SerializeToString()))


def _resized(data: bytes) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.just(data[: len(data) // 2]),
        st.just(data + data),
        st.just(b""),
        SMALL_BYTES,
    )


@st.composite
def _wire_mutated(draw: st.DrawFn, wire: bytes) -> bytes:
    """The serialized request as it is, truncated, or with bits flipped."""
    how = draw(st.sampled_from(["as is", "as is", "truncated", "flipped"]))
    if how == "truncated" and wire:
        return wire[: draw(st.integers(0, len(wire) - 1))]
    if how == "flipped" and wire:
        data = bytearray(wire)
        for _ in range(draw(st.integers(1, 3))):
            at = draw(st.integers(0, len(data) - 1))
            data[at] ^= 1 << draw(st.integers(0, 7))
        return bytes(data)
    return wire


def _status(channel: grpc.Channel, method: str, body: bytes) -> tuple[str, str]:
    try:
        channel.unary_unary(method, **RAW)(body, timeout=20)
    except grpc.RpcError as error:
        return error.code().name, error.details() or ""
    return "OK", ""


PROPERTY = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)


@pytest.mark.xfail(
    strict=False,
    reason="issue 10: unparseable (truncated or bit-flipped) requests end UNKNOWN; huge BYTES shapes INTERNAL",
)
@PROPERTY
@given(body=v1_requests())
def test_any_mutated_predict_gets_a_caller_status(
    server: ServerProcess, channel: grpc.Channel, body: bytes
) -> None:
    code, message = _status(channel, PREDICT, body)
    assert code in ALLOWED, f"{code}: {message[:300]} for request bytes {body[:200]!r}"
    assert server.alive()


@pytest.mark.xfail(
    strict=False,
    reason="issue 10: unparseable (truncated or bit-flipped) requests end UNKNOWN; huge BYTES shapes INTERNAL",
)
@PROPERTY
@given(body=kserve_requests())
def test_any_mutated_model_infer_gets_a_caller_status(
    server: ServerProcess, channel: grpc.Channel, body: bytes
) -> None:
    code, message = _status(channel, MODEL_INFER, body)
    assert code in ALLOWED, f"{code}: {message[:300]} for request bytes {body[:200]!r}"
    assert server.alive()


def test_the_server_is_up_and_serving_after_the_mutated_requests(server: ServerProcess) -> None:
    # Runs after the property tests in this module (file order): whatever they sent, the server still serves.
    assert server.alive()
    assert server.health() == "SERVING"
