"""The KServe v2 codec: its requests to the data plane's, datatype names, arrays to raw outputs.

Inputs come as `raw_input_contents` (one entry per input: little-endian, row-major; BYTES elements each a
4-byte little-endian length and the bytes, as Sluice's own STRING layout) or as typed `contents`. Outputs
always go back raw. KServe has one variable-length type, BYTES: it carries Sluice's STRING (UTF-8 text,
decoded to `str`) and BYTES (binary, kept as `bytes`), whichever the model's input is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy.typing as npt

from sluice.kserve.v2 import grpc_service_pb2 as kpb
from sluice.kserve.v2 import model_config_pb2 as mc
from sluice.server import classification
from sluice.server.core import ANY_VARIABLE, InferRequest, WireTensor, integer_parameter, timeout_parameter
from sluice.server.errors import clip, invalid
from sluice.server.plugins import TensorSpec
from sluice.v1 import inference_pb2 as pb
from sluice.wire import encode, format_shape, numpy_dtype, type_name

BYTES = "BYTES"
_VARIABLE = (pb.DATA_TYPE_STRING, pb.DATA_TYPE_BYTES)
# KServe's names of the numeric types are Sluice's own (FP32, INT64, ...); BYTES stands for both of ours.
_NUMERIC: dict[str, int] = {
    type_name(value): value
    for _, value in pb.DataType.items()
    if value not in (pb.DATA_TYPE_UNSPECIFIED, *_VARIABLE)
}
_TYPE_LIST = ", ".join([*_NUMERIC, BYTES])
_KSERVE_NAMES: dict[int, str] = {
    **{value: name for name, value in _NUMERIC.items()},
    **dict.fromkeys(_VARIABLE, BYTES),
}
"""kserve_type's answers, looked up: it runs for every output of every response."""


def kserve_type(datatype: int) -> str:
    """KServe's name of a Sluice data type: FP32, INT64, ... and BYTES for STRING and BYTES."""
    name = _KSERVE_NAMES.get(datatype)
    return name if name is not None else type_name(datatype)


def triton_type(datatype: int) -> mc.DataType.ValueType:
    """Triton's model-config enum of a Sluice data type (TYPE_STRING is KServe's BYTES)."""
    name = "STRING" if datatype in _VARIABLE else type_name(datatype)
    return mc.DataType.Value(f"TYPE_{name}")


def describe(spec: TensorSpec) -> str:
    """A signature as KServe callers write it: FP32 [-1, 64], BYTES [-1]."""
    return f"{kserve_type(spec.datatype)} {format_shape(spec.shape)}"


def tensor_metadata(spec: TensorSpec) -> kpb.ModelMetadataResponse.TensorMetadata:
    return kpb.ModelMetadataResponse.TensorMetadata(
        name=spec.name, datatype=kserve_type(spec.datatype), shape=spec.shape
    )


def to_request(request: kpb.ModelInferRequest) -> InferRequest:
    """A ModelInferRequest as the data plane's request. Checks that need no model are made here (data type
    names, raw entries against inputs); the rest is the data plane's, as for every door."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise invalid(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs: send one entry per "
            "input, in the order of `inputs`, or give every input its `contents`"
        )
    inputs = []
    for index, tensor in enumerate(request.inputs):
        name = tensor.name
        if tensor.parameters and "shared_memory_region" in tensor.parameters:
            raise invalid(
                f"input '{clip(name)}': Sluice does not support shared memory; send the tensor in "
                "raw_input_contents or contents"
            )
        label = tensor.datatype
        datatype = ANY_VARIABLE if label == BYTES else _NUMERIC.get(label)
        if datatype is None:
            datatype = wire_datatype(label, f"input '{clip(name)}'")  # raises, naming what is accepted
        shape = tuple(tensor.shape)
        if raw:
            if tensor.HasField("contents"):
                raise invalid(
                    f"input '{clip(name)}': give its data in raw_input_contents or in contents, not both"
                )
            inputs.append(WireTensor(name, datatype, shape, label, raw[index], "raw_input_contents"))
            continue
        what = f"input '{clip(name)}'"
        field = "bytes_contents" if datatype == ANY_VARIABLE else _contents_field(datatype)
        if field is None:
            kind = f"{label} {format_shape(shape)}"
            raise invalid(f"{what}: {kind} has no typed contents field; send it in raw_input_contents")
        contents = tensor.contents
        values: Sequence[Any] = getattr(contents, field)
        others = [f.name for f, v in contents.ListFields() if f.name != field and v]
        inputs.append(
            WireTensor(
                name,
                datatype,
                shape,
                label,
                contents=values,
                contents_field=f"contents.{field}",
                contents_hint=f" (the request fills {', '.join(others)})" if others else "",
                contents_bytes=contents.ByteSize(),
            )
        )
    parameters = request.parameters
    return InferRequest(
        model=request.model_name,
        version=model_version(request.model_version),
        id=request.id,
        inputs=inputs,
        outputs=[o.name for o in wanted] if (wanted := request.outputs) else (),
        priority=priority(parameters) if parameters else 0,
        timeout=timeout(parameters) if parameters else None,
    )


def wire_datatype(label: str, what: str) -> int:
    """Sluice's data type for a KServe datatype name; BYTES is ANY_VARIABLE (the input's STRING or BYTES)."""
    datatype = ANY_VARIABLE if label == BYTES else _NUMERIC.get(label)
    if datatype is None:
        raise invalid(f"{what}: datatype must be one of {_TYPE_LIST}, got '{clip(label)}'")
    return datatype


def model_version(text: str) -> int | None:
    """KServe's model_version: "" is the default version, anything else a version number."""
    if not text:
        return None
    if text.isascii() and text.isdigit():
        return int(text)
    raise invalid(
        f"model version must be a version number, or empty for the default version; got '{clip(text)}'"
    )


def encode_output(
    name: str, array: npt.NDArray[Any]
) -> tuple[kpb.ModelInferResponse.InferOutputTensor, bytes]:
    """An output's tensor description and its raw_output_contents entry."""
    tensor = kpb.ModelInferResponse.InferOutputTensor()
    return tensor, encode_output_into(tensor, name, array)


def encode_output_into(
    tensor: kpb.ModelInferResponse.InferOutputTensor, name: str, array: npt.NDArray[Any]
) -> bytes:
    """Fills an empty output description already in its response (`outputs.add()`); returns the output's
    raw_output_contents entry."""
    datatype, raw = encode(array)
    tensor.name = name
    tensor.datatype = kserve_type(datatype)
    tensor.shape.extend(array.shape)
    return raw


def _contents_field(datatype: int) -> str | None:
    """The InferTensorContents field that carries a data type (None for FP16, which has none)."""
    if datatype in _VARIABLE:
        return "bytes_contents"
    dtype = numpy_dtype(datatype)
    if dtype.kind == "b":
        return "bool_contents"
    if dtype.kind == "f":
        return {4: "fp32_contents", 8: "fp64_contents"}.get(dtype.itemsize)
    prefix = "int" if dtype.kind == "i" else "uint"
    return f"{prefix}64_contents" if dtype.itemsize == 8 else f"{prefix}_contents"


def classifications(request: kpb.ModelInferRequest) -> dict[str, int] | None:
    """The outputs asked for as classifications (Triton's extension: parameter `classification` = N), N by
    name; None when there are none, as for most requests."""
    found: dict[str, int] | None = None
    for output in request.outputs:
        if output.parameters and (param := output.parameters.get(classification.PARAMETER)) is not None:
            if found is None:
                found = {}
            found[output.name] = classification.class_count(output.name, _value(param))
    return found


def priority(parameters: Mapping[str, kpb.InferParameter]) -> int:
    """The request's `priority` parameter as Sluice's priority (higher runs first); 0 when absent."""
    param = parameters.get("priority")
    return 0 if param is None else integer_parameter("priority", _value(param))


def timeout(parameters: Mapping[str, kpb.InferParameter]) -> float | None:
    """The request's `timeout` parameter (microseconds, as Triton's clients send it) in seconds."""
    param = parameters.get("timeout")
    return None if param is None else timeout_parameter(_value(param))


def _value(param: kpb.InferParameter) -> object:
    kind = param.WhichOneof("parameter_choice")
    return None if kind is None else getattr(param, kind)
