"""KServe v2 tensors and numpy arrays: datatype names, request inputs to arrays, arrays to raw outputs.

Inputs come as `raw_input_contents` (one entry per input: little-endian, row-major; BYTES elements each a
4-byte little-endian length and the bytes, as Sluice's own STRING layout) or as typed `contents`. Outputs
always go back raw. KServe has one variable-length type, BYTES: it carries Sluice's STRING (UTF-8 text,
decoded to `str`) and BYTES (binary, kept as `bytes`), whichever the model's input is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt

from sluice.kserve.v2 import grpc_service_pb2 as kpb
from sluice.kserve.v2 import model_config_pb2 as mc
from sluice.server.errors import SluiceError, invalid
from sluice.server.plugins import TensorSpec
from sluice.server.tensors import (
    datatype_of,
    decode_strings,
    encode_strings,
    format_shape,
    numpy_dtype,
    type_name,
)
from sluice.v1 import inference_pb2 as pb

BYTES = "BYTES"
_VARIABLE = (pb.DATA_TYPE_STRING, pb.DATA_TYPE_BYTES)
# KServe's names of the numeric types are Sluice's own (FP32, INT64, ...); BYTES stands for both of ours.
_NUMERIC: dict[str, int] = {
    type_name(value): value
    for _, value in pb.DataType.items()
    if value not in (pb.DATA_TYPE_UNSPECIFIED, *_VARIABLE)
}
_TYPE_LIST = ", ".join([*_NUMERIC, BYTES])
# What typed contents are read as before the range check and the cast to the input's own dtype.
_WIDE = {
    "b": np.dtype(np.bool_),
    "i": np.dtype(np.int64),
    "u": np.dtype(np.uint64),
    "f": np.dtype(np.float64),
}


def kserve_type(datatype: int) -> str:
    """KServe's name of a Sluice data type: FP32, INT64, ... and BYTES for STRING and BYTES."""
    return BYTES if datatype in _VARIABLE else type_name(datatype)


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


def decode_inputs(
    request: kpb.ModelInferRequest, specs: Sequence[TensorSpec], model: str, max_bytes: int
) -> dict[str, npt.NDArray[Any]]:
    """The request's inputs as arrays, each checked against its spec (name, type, shape, byte count).

    What concerns the inputs together (none missing, rows that agree) is left to `Servable.check_inputs`.
    """
    by_name = {spec.name: spec for spec in specs}
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise invalid(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs: send one entry per "
            "input, in the order of `inputs`, or give every input its `contents`"
        )
    arrays: dict[str, npt.NDArray[Any]] = {}
    size = 0
    for index, tensor in enumerate(request.inputs):
        name = tensor.name
        spec = by_name.get(name)
        if spec is None:
            takes = ", ".join(f"'{s.name}' ({describe(s)})" for s in specs)
            raise invalid(
                f"model '{model}' has no input '{name}'; it takes {takes}"
                if name
                else f"an input tensor has no name; model '{model}' takes {takes}"
            )
        if name in arrays:
            raise invalid(f"input '{name}' is given twice")
        what = f"input '{name}'"
        if "shared_memory_region" in tensor.parameters:
            raise invalid(
                f"{what}: Sluice does not support shared memory; send the tensor in raw_input_contents or "
                "contents"
            )
        datatype = _datatype(tensor.datatype, spec, what)
        shape = tuple(tensor.shape)
        if not spec.takes(datatype) or not spec.accepts(shape):
            raise invalid(f"{what}: expected {describe(spec)}, got {tensor.datatype} {format_shape(shape)}")
        if min(shape, default=0) < 0:
            raise invalid(f"{what}: shape dimensions must be >= 0, got {format_shape(shape)}")
        if raw and tensor.HasField("contents"):
            raise invalid(f"{what}: give its data in raw_input_contents or in contents, not both")
        size += len(raw[index]) if raw else tensor.contents.ByteSize()
        if size > max_bytes:
            raise SluiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the request carries more than {max_bytes} bytes of tensors, over the server's "
                "max_message_bytes limit (SLUICE_MAX_MESSAGE_BYTES)",
            )
        if raw:
            arrays[name] = _from_raw(raw[index], datatype, shape, what)
        else:
            arrays[name] = _from_contents(tensor.contents, datatype, shape, what)
    return arrays


def encode_output(
    name: str, array: npt.NDArray[Any]
) -> tuple[kpb.ModelInferResponse.InferOutputTensor, bytes]:
    """An output's tensor description and its raw_output_contents entry."""
    datatype = datatype_of(array)
    if datatype in _VARIABLE:
        raw = encode_strings(array)
    else:
        raw = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    tensor = kpb.ModelInferResponse.InferOutputTensor(
        name=name, datatype=kserve_type(datatype), shape=array.shape
    )
    return tensor, raw


def _datatype(name: str, spec: TensorSpec, what: str) -> int:
    """Sluice's data type for a KServe datatype name; BYTES is the spec's own STRING or BYTES."""
    if name == BYTES:
        return spec.datatype if spec.datatype in _VARIABLE else pb.DATA_TYPE_BYTES
    found = _NUMERIC.get(name)
    if found is None:
        raise invalid(f"{what}: datatype must be one of {_TYPE_LIST}, got '{name}'")
    return found


def _from_raw(raw: bytes, datatype: int, shape: tuple[int, ...], what: str) -> npt.NDArray[Any]:
    count = math.prod(shape)
    if datatype in _VARIABLE:
        return decode_strings(raw, count, what, text=datatype == pb.DATA_TYPE_STRING).reshape(shape)
    dtype = numpy_dtype(datatype)
    if len(raw) != count * dtype.itemsize:
        raise invalid(
            f"{what}: {type_name(datatype)} {format_shape(shape)} needs {count * dtype.itemsize} bytes of "
            f"raw_input_contents, got {len(raw)}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


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


def _from_contents(
    contents: kpb.InferTensorContents, datatype: int, shape: tuple[int, ...], what: str
) -> npt.NDArray[Any]:
    count = math.prod(shape)
    field = _contents_field(datatype)
    kind = f"{type_name(datatype)} {format_shape(shape)}"
    if field is None:
        raise invalid(f"{what}: {kind} has no typed contents field; send it in raw_input_contents")
    values: Sequence[Any] = getattr(contents, field)
    if len(values) != count:
        others = [f.name for f, v in contents.ListFields() if f.name != field and v]
        hint = f" (the request fills {', '.join(others)})" if others else ""
        raise invalid(f"{what}: {kind} needs {count} values in contents.{field}, got {len(values)}{hint}")
    if datatype in _VARIABLE:
        return _from_bytes(values, datatype == pb.DATA_TYPE_STRING, what).reshape(shape)
    dtype = numpy_dtype(datatype)
    # int_contents and uint_contents carry 8- and 16-bit types in 32 bits: refuse what does not fit.
    wide = np.asarray(values, dtype=_WIDE[dtype.kind])
    if dtype.kind in "iu" and wide.size:
        info = np.iinfo(dtype.str)
        low, high = wide.min(), wide.max()
        if low < info.min or high > info.max:
            bad = low if low < info.min else high
            raise invalid(f"{what}: value {bad} in contents.{field} does not fit {type_name(datatype)}")
    return wide.astype(dtype).reshape(shape)


def _from_bytes(values: Sequence[bytes], text: bool, what: str) -> npt.NDArray[np.object_]:
    out = np.empty(len(values), dtype=object)
    for i, item in enumerate(values):
        if text:
            try:
                out[i] = item.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise invalid(f"{what}: element {i} is not valid UTF-8 text ({exc.reason})") from None
        else:
            out[i] = item
    return out


def priority(parameters: Mapping[str, kpb.InferParameter]) -> int:
    """The request's `priority` parameter as Sluice's priority (higher runs first); 0 when absent."""
    param = parameters.get("priority")
    if param is None:
        return 0
    value = _integer(param)
    if value is None:
        raise invalid(f"parameter 'priority': expected an int64_param or uint64_param, got {_text(param)}")
    return value


def timeout(parameters: Mapping[str, kpb.InferParameter]) -> float | None:
    """The request's `timeout` parameter (microseconds, as Triton's clients send it) in seconds."""
    param = parameters.get("timeout")
    if param is None:
        return None
    value = _integer(param)
    if value is None or value < 0:
        raise invalid(
            f"parameter 'timeout': expected microseconds >= 0 as an int64_param, got {_text(param)}"
        )
    return value / 1e6


def _integer(param: kpb.InferParameter) -> int | None:
    kind = param.WhichOneof("parameter_choice")
    return int(getattr(param, kind)) if kind in ("int64_param", "uint64_param") else None


def _text(param: kpb.InferParameter) -> str:
    kind = param.WhichOneof("parameter_choice")
    return f"{kind} {getattr(param, kind)!r}" if kind else "no value"
