"""The KServe v2 REST wire: JSON tensors, Triton's binary tensor data extension, and Triton's JSON forms
of the protocol's messages.

An infer body is a JSON object, optionally followed by binary tensor data: then the request's
`Inference-Header-Content-Length` header says where the JSON ends, and each input that travels in binary
says how many bytes it takes with its `binary_data_size` parameter, in the order of `inputs`. Binary data is
raw tensor memory as in `raw_input_contents` (little-endian, row-major; BYTES elements each a 4-byte
little-endian length and the bytes). JSON `data` is flat or nested (only the element count must match the
shape); BYTES elements are strings, or base64 when the tensor's `content_type` parameter says `base64`.

Every size is checked from the numbers a caller sent before anything is allocated: a declared shape of
2**62 elements with three values is refused by arithmetic, not by trying.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from sluice.server.errors import SluiceError, invalid
from sluice.server.kserve_tensors import BYTES, describe, encode_output, kserve_type
from sluice.server.kserve_tensors import _datatype as kserve_datatype
from sluice.server.plugins import TensorSpec
from sluice.server.tensors import datatype_of, decode_strings, format_shape, numpy_dtype, type_name
from sluice.v1 import inference_pb2 as pb

HEADER_LENGTH = "Inference-Header-Content-Length"
"""Triton's header: the length of the JSON part of a body that carries binary tensor data."""
BASE64 = "base64"
_VARIABLE = (pb.DATA_TYPE_STRING, pb.DATA_TYPE_BYTES)
# JSON numbers, read by the kind of numpy array json's values make: which kinds each target kind takes.
_TAKES_KIND = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}
_KIND_WORDS = {"b": "true or false", "i": "integers", "u": "integers", "f": "numbers"}
_INT64 = frozenset(
    {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    }
)


def split_body(body: bytes, header_length: str | None) -> tuple[Any, memoryview]:
    """The JSON object of an infer body and the binary data after it."""
    view = memoryview(body)
    end = len(body)
    if header_length is not None:
        if not header_length.isascii() or not header_length.isdigit():
            raise invalid(f"{HEADER_LENGTH} must be a byte count, got '{header_length}'")
        end = int(header_length)
        if end > len(body):
            raise invalid(f"{HEADER_LENGTH} is {end}, but the body has only {len(body)} bytes")
    try:
        request = json.loads(view[:end].tobytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise invalid(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(request, dict):
        raise invalid(f"the request body must be a JSON object, got {_json_kind(request)}")
    return request, view[end:]


_WORDS: dict[type, str] = {str: "a string", list: "a list", dict: "an object"}


def field(obj: Mapping[str, Any], name: str, kind: type, what: str, default: Any) -> Any:
    """`obj[name]` if it has the JSON type a protocol field needs; `default` when absent."""
    if name not in obj:
        return default
    value = obj[name]
    if not isinstance(value, kind):
        raise invalid(f"{what}'{name}' must be {_WORDS[kind]}, got {_json_kind(value)}")
    return value


def decode_inputs(
    request: Mapping[str, Any], binary: memoryview, specs: Sequence[TensorSpec], model: str, max_bytes: int
) -> dict[str, npt.NDArray[Any]]:
    """The request's inputs as arrays, each checked against its spec (name, type, shape, element count).

    What concerns the inputs together (none missing, rows that agree) is left to the server's own checks, as
    for the gRPC doors.
    """
    by_name = {spec.name: spec for spec in specs}
    tensors = field(request, "inputs", list, "", [])
    arrays: dict[str, npt.NDArray[Any]] = {}
    size = 0
    offset = 0
    for tensor in tensors:
        if not isinstance(tensor, dict):
            raise invalid(f"each entry of 'inputs' must be an object, got {_json_kind(tensor)}")
        name = field(tensor, "name", str, "an input's ", "")
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
        parameters = field(tensor, "parameters", dict, f"{what}: ", {})
        if "shared_memory_region" in parameters:
            raise invalid(
                f"{what}: Sluice does not support shared memory; send the tensor in 'data' or as binary data"
            )
        datatype = kserve_datatype(field(tensor, "datatype", str, f"{what}: ", ""), spec, what)
        shape = _shape(tensor.get("shape"), what)
        if not spec.takes(datatype) or not spec.accepts(shape):
            got = f"{tensor['datatype']} {format_shape(shape)}"
            raise invalid(f"{what}: expected {describe(spec)}, got {got}")
        if min(shape, default=0) < 0:
            raise invalid(f"{what}: shape dimensions must be >= 0, got {format_shape(shape)}")
        count = math.prod(shape)
        binary_size = parameters.get("binary_data_size")
        if binary_size is not None:
            if "data" in tensor:
                raise invalid(
                    f"{what}: give its data in 'data' or as binary data (binary_data_size), not both"
                )
            if not isinstance(binary_size, int) or isinstance(binary_size, bool) or binary_size < 0:
                raise invalid(f"{what}: binary_data_size must be a byte count, got {_json_kind(binary_size)}")
            if offset + binary_size > len(binary):
                raise invalid(
                    f"{what}: binary_data_size is {binary_size}, but only {len(binary) - offset} bytes of "
                    "binary data remain after the JSON header"
                )
            size += binary_size
            _check_size(size, max_bytes)
            arrays[name] = _from_binary(binary[offset : offset + binary_size], datatype, shape, count, what)
            offset += binary_size
            continue
        if "data" not in tensor:
            raise invalid(f"{what}: no 'data' and no binary_data_size parameter: send its values")
        values = _flatten(tensor["data"], count, datatype, shape, what)
        itemsize = 4 if datatype in _VARIABLE else numpy_dtype(datatype).itemsize
        size += count * itemsize
        _check_size(size, max_bytes)
        if datatype in _VARIABLE:
            base64_data = parameters.get("content_type") == BASE64
            arrays[name] = _from_strings(values, datatype, base64_data, what).reshape(shape)
        else:
            arrays[name] = _from_numbers(values, datatype, what).reshape(shape)
    if offset != len(binary):
        raise invalid(
            f"the request has {len(binary) - offset} bytes of binary data after the JSON header that no "
            "input claims (each binary input gives its binary_data_size)"
        )
    return arrays


def _shape(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        raise invalid(f"{what}: 'shape' must be a list of integers, got {_json_kind(value)}")
    return tuple(value)


def _check_size(size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise SluiceError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"the request carries more than {max_bytes} bytes of tensors, over the server's "
            "max_message_bytes limit (SLUICE_MAX_MESSAGE_BYTES)",
        )


def _from_binary(
    raw: memoryview, datatype: int, shape: tuple[int, ...], count: int, what: str
) -> npt.NDArray[Any]:
    kind = f"{type_name(datatype) if datatype not in _VARIABLE else BYTES} {format_shape(shape)}"
    if datatype in _VARIABLE:
        if count * 4 > len(raw):  # every element has its 4-byte length, before any allocation
            raise invalid(
                f"{what}: {kind} needs at least {count * 4} bytes of binary data (a 4-byte length per "
                f"element), got {len(raw)}"
            )
        text = datatype == pb.DATA_TYPE_STRING
        return decode_strings(raw.tobytes(), count, what, text=text).reshape(shape)
    dtype = numpy_dtype(datatype)
    if len(raw) != count * dtype.itemsize:
        raise invalid(f"{what}: {kind} needs {count * dtype.itemsize} bytes of binary data, got {len(raw)}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _flatten(data: Any, count: int, datatype: int, shape: tuple[int, ...], what: str) -> list[Any]:
    """`data`'s elements in row-major order, flat or nested; refused when their number is not `count`."""
    flat: list[Any] = []
    if isinstance(data, list):
        stack: list[Iterator[Any]] = [iter(data)]
        while stack:
            for item in stack[-1]:
                if isinstance(item, list):
                    stack.append(iter(item))
                    break
                flat.append(item)
            else:
                stack.pop()
    else:
        flat.append(data)
    if len(flat) != count:
        name = BYTES if datatype in _VARIABLE else type_name(datatype)
        raise invalid(f"{what}: {name} {format_shape(shape)} needs {count} values in 'data', got {len(flat)}")
    return flat


def _from_numbers(values: list[Any], datatype: int, what: str) -> npt.NDArray[Any]:
    dtype = numpy_dtype(datatype)
    target = dtype.kind
    if not values:
        return np.empty(0, dtype)
    try:
        read = np.array(values)
    except (OverflowError, ValueError):
        read = np.array(values, dtype=object)
    if read.dtype.kind not in _TAKES_KIND[target]:
        bad = next(
            (
                i
                for i, v in enumerate(values)
                if not isinstance(v, bool | int | float)
                or (isinstance(v, bool) != (target == "b"))
                or (target in "iu" and isinstance(v, float))
            ),
            None,
        )
        if bad is not None:
            raise invalid(
                f"{what}: {type_name(datatype)} data must be {_KIND_WORDS[target]}; element {bad} is "
                f"{json.dumps(values[bad])}"
            )
        # Integers past int64 and uint64 both: numpy keeps them as Python ints.
        big = max(values, key=abs)
        raise invalid(f"{what}: value {big} in data does not fit {type_name(datatype)}")
    if target in "iu":
        info = np.iinfo(dtype.str)
        low, high = read.min(), read.max()
        if low < info.min or high > info.max:
            bad_value = low if low < info.min else high
            raise invalid(f"{what}: value {bad_value} in data does not fit {type_name(datatype)}")
    return read.astype(dtype)


def _from_strings(values: list[Any], datatype: int, base64_data: bool, what: str) -> npt.NDArray[np.object_]:
    out = np.empty(len(values), dtype=object)
    text = datatype == pb.DATA_TYPE_STRING
    for i, item in enumerate(values):
        if not isinstance(item, str):
            raise invalid(f"{what}: BYTES data must be strings; element {i} is {json.dumps(item)}")
        if base64_data:
            try:
                raw = base64.b64decode(item, validate=True)
            except binascii.Error:
                raise invalid(f"{what}: element {i} is not valid base64") from None
            if text:
                try:
                    out[i] = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise invalid(f"{what}: element {i} is not valid UTF-8 text ({exc.reason})") from None
            else:
                out[i] = raw
        else:
            out[i] = item if text else item.encode("utf-8")
    return out


def binary_outputs(request: Mapping[str, Any]) -> tuple[list[str], dict[str, bool], bool]:
    """The outputs asked for (names, in order), which of them asked for binary data, and the default."""
    parameters = field(request, "parameters", dict, "", {})
    default = parameters.get("binary_data_output", False)
    if not isinstance(default, bool):
        raise invalid(f"parameter 'binary_data_output': expected true or false, got {json.dumps(default)}")
    names: list[str] = []
    binary: dict[str, bool] = {}
    for output in field(request, "outputs", list, "", []):
        if not isinstance(output, dict):
            raise invalid(f"each entry of 'outputs' must be an object, got {_json_kind(output)}")
        name = field(output, "name", str, "an output's ", "")
        names.append(name)
        wants = field(output, "parameters", dict, f"output '{name}': ", {}).get("binary_data")
        if wants is not None:
            if not isinstance(wants, bool):
                raise invalid(f"output '{name}': binary_data must be true or false, got {json.dumps(wants)}")
            binary[name] = wants
    return names, binary, default


def integer_parameter(parameters: Mapping[str, Any], name: str) -> int | None:
    """An integer request parameter (priority, timeout); None when absent."""
    value = parameters.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise invalid(f"parameter '{name}': expected an integer, got {json.dumps(value)}")
    return value


def encode_outputs(
    outputs: Mapping[str, npt.NDArray[Any]], binary: Mapping[str, bool], default: bool
) -> tuple[list[dict[str, Any]], list[bytes]]:
    """Each output as a JSON tensor, or (asked for) its description with the binary data to follow it."""
    tensors: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, array in outputs.items():
        if binary.get(name, default):
            described, raw = encode_output(name, array)
            tensors.append(
                {
                    "name": name,
                    "datatype": described.datatype,
                    "shape": list(array.shape),
                    "parameters": {"binary_data_size": len(raw)},
                }
            )
            chunks.append(raw)
            continue
        tensor: dict[str, Any] = {"name": name, "shape": list(array.shape)}
        flat = array.reshape(-1)
        if flat.dtype.kind in "OSU":
            items = flat.tolist()
            if any(isinstance(item, bytes | bytearray) for item in items):
                # Binary elements have no JSON form of their own: base64, and the tensor says so.
                tensor["datatype"] = BYTES
                tensor["parameters"] = {"content_type": BASE64}
                tensor["data"] = [
                    base64.b64encode(item if isinstance(item, bytes) else str(item).encode()).decode()
                    for item in items
                ]
            else:
                tensor["datatype"] = BYTES
                tensor["data"] = [str(item) for item in items]
        else:
            tensor["datatype"] = kserve_type(datatype_of(array))
            tensor["data"] = flat.tolist()
        tensors.append(tensor)
    return tensors, chunks


def message_json(message: Message) -> Any:
    """A protocol message as Triton's HTTP endpoints print it: protobuf's JSON with the field names of the
    .proto, every field present, and 64-bit integers as numbers (protobuf's JSON prints them as strings;
    Triton and tritonclient.http use numbers)."""
    out = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return _numbers(message.DESCRIPTOR, out)


def _numbers(descriptor: Any, value: dict[str, Any]) -> dict[str, Any]:
    for fd in descriptor.fields:
        if fd.name not in value:
            continue
        item = value[fd.name]
        if fd.type in _INT64:
            value[fd.name] = [int(v) for v in item] if isinstance(item, list) else int(item)
        elif fd.type == FieldDescriptor.TYPE_MESSAGE:
            kind = fd.message_type
            if kind.GetOptions().map_entry:
                inner = kind.fields_by_name["value"]
                if inner.type == FieldDescriptor.TYPE_MESSAGE:
                    value[fd.name] = {k: _numbers(inner.message_type, v) for k, v in item.items()}
                elif inner.type in _INT64:
                    value[fd.name] = {k: int(v) for k, v in item.items()}
            elif isinstance(item, list):
                value[fd.name] = [_numbers(kind, v) for v in item]
            elif isinstance(item, dict):
                value[fd.name] = _numbers(kind, item)
    return value


def _json_kind(value: Any) -> str:
    """A JSON value as a message names it: the value itself when short, else its type."""
    text = json.dumps(value)
    return text if len(text) <= 40 else f"a JSON {type(value).__name__} of {len(text)} characters"
