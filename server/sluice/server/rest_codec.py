"""The KServe v2 REST codec: JSON tensors and Triton's binary tensor data extension to the data plane's
request and back, and Triton's JSON forms of the protocol's messages.

An infer body is a JSON object, optionally followed by binary tensor data: then the request's
`Inference-Header-Content-Length` header says where the JSON ends, and each input that travels in binary
says how many bytes it takes with its `binary_data_size` parameter, in the order of `inputs`. Binary data is
raw tensor memory as in `raw_input_contents` (little-endian, row-major; BYTES elements each a 4-byte
little-endian length and the bytes). JSON `data` is flat or nested (only the element count must match the
shape); BYTES elements are strings, or base64 when the tensor's `content_type` parameter says `base64`.

What needs no model is checked here (JSON types, data type names, binary sizes); the rest is the data
plane's, as for every door, and every size is checked from the numbers a caller sent before anything is
allocated: a declared shape of 2**62 elements with three values is refused by arithmetic, not by trying.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from sluice.server import classification
from sluice.server.core import ANY_VARIABLE, InferRequest, WireTensor, integer_parameter, timeout_parameter
from sluice.server.errors import clip, invalid
from sluice.server.kserve_tensors import BYTES, encode_output, kserve_type, model_version, wire_datatype
from sluice.wire import datatype_of, numpy_dtype, type_name

HEADER_LENGTH = "Inference-Header-Content-Length"
"""Triton's header: the length of the JSON part of a body that carries binary tensor data."""
BASE64 = "base64"
BINARY_FIELD = "binary data"
"""What messages call the bytes of an input sent with the binary extension."""
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
            raise invalid(f"{HEADER_LENGTH} must be a byte count, got '{clip(header_length)}'")
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


def to_request(request: Mapping[str, Any], binary: memoryview, model: str, version: str) -> InferRequest:
    """An infer body as the data plane's request (the model and version come from the path)."""
    request_id = request.get("id", "")
    if not isinstance(request_id, str):
        raise invalid(f"'id' must be a string, got {_json_kind(request_id)}")
    parameters = field(request, "parameters", dict, "", {})
    names, _, _ = binary_outputs(request)
    return InferRequest(
        model=model,
        version=model_version(version),
        id=request_id,
        inputs=_inputs(request, binary),
        outputs=names,
        priority=integer_parameter("priority", parameters["priority"]) if "priority" in parameters else 0,
        timeout=timeout_parameter(parameters["timeout"]) if "timeout" in parameters else None,
    )


def _inputs(request: Mapping[str, Any], binary: memoryview) -> list[WireTensor]:
    tensors: list[WireTensor] = []
    offset = 0
    for tensor in field(request, "inputs", list, "", []):
        if not isinstance(tensor, dict):
            raise invalid(f"each entry of 'inputs' must be an object, got {_json_kind(tensor)}")
        name = field(tensor, "name", str, "an input's ", "")
        what = f"input '{clip(name)}'"
        parameters = field(tensor, "parameters", dict, f"{what}: ", {})
        if "shared_memory_region" in parameters:
            raise invalid(
                f"{what}: Sluice does not support shared memory; send the tensor in 'data' or as binary data"
            )
        label = field(tensor, "datatype", str, f"{what}: ", "")
        datatype = wire_datatype(label, what)
        shape = _shape(tensor.get("shape"), what)
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
            raw = binary[offset : offset + binary_size].tobytes()
            offset += binary_size
            tensors.append(WireTensor(name, datatype, shape, label, raw=raw, field=BINARY_FIELD))
            continue
        if "data" not in tensor:
            raise invalid(f"{what}: no 'data' and no binary_data_size parameter: send its values")
        values = _flatten(tensor["data"])
        if datatype == ANY_VARIABLE:
            base64_data = parameters.get("content_type") == BASE64
            values = _strings(values, base64_data, what)
            weight = sum(len(v) for v in values) + 4 * len(values)
        else:
            _check_numbers(values, datatype, what)
            weight = len(values) * numpy_dtype(datatype).itemsize
        tensors.append(
            WireTensor(
                name, datatype, shape, label, contents=values, contents_field="data", contents_bytes=weight
            )
        )
    if offset != len(binary):
        raise invalid(
            f"the request has {len(binary) - offset} bytes of binary data after the JSON header that no "
            "input claims (each binary input gives its binary_data_size)"
        )
    return tensors


def _shape(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        raise invalid(f"{what}: 'shape' must be a list of integers, got {_json_kind(value)}")
    return tuple(value)


def _flatten(data: Any) -> list[Any]:
    """`data`'s elements in row-major order, flat or nested (the data plane checks their number)."""
    if not isinstance(data, list):
        return [data]
    flat: list[Any] = []
    stack: list[Iterator[Any]] = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _check_numbers(values: list[Any], datatype: int, what: str) -> None:
    """JSON values of the right kind for a numeric type: no strings for numbers, no 1.5 for an integer.
    Ranges are the data plane's to check, as for typed contents."""
    if not values:
        return
    target = numpy_dtype(datatype).kind
    try:
        kind = np.array(values).dtype.kind
    except (OverflowError, ValueError):
        kind = "O"
    if kind in _TAKES_KIND[target]:
        return
    for i, v in enumerate(values):
        if (
            not isinstance(v, bool | int | float)
            or isinstance(v, bool) != (target == "b")
            or (target in "iu" and isinstance(v, float))
        ):
            raise invalid(
                f"{what}: {type_name(datatype)} data must be {_KIND_WORDS[target]}; element {i} is "
                f"{_json_kind(v)}"
            )
    # Integers past 64 bits: numpy keeps them as Python ints.
    big = max(values, key=abs)
    raise invalid(f"{what}: value {big} in data does not fit {type_name(datatype)}")


def _strings(values: list[Any], base64_data: bool, what: str) -> list[str | bytes]:
    """BYTES elements: strings, or the bytes their base64 stands for."""
    out: list[str | bytes] = []
    for i, item in enumerate(values):
        if not isinstance(item, str):
            raise invalid(f"{what}: BYTES data must be strings; element {i} is {_json_kind(item)}")
        if base64_data:
            try:
                out.append(base64.b64decode(item, validate=True))
            except binascii.Error:
                raise invalid(f"{what}: element {i} is not valid base64") from None
        else:
            out.append(item)
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


def classifications(request: Mapping[str, Any]) -> dict[str, int] | None:
    """The outputs asked for as classifications (Triton's extension: `"parameters": {"classification": N}`),
    N by name; None when there are none. Call after `binary_outputs`, which checks the entries' form."""
    found: dict[str, int] | None = None
    for output in field(request, "outputs", list, "", []):
        parameters = output.get("parameters")
        if isinstance(parameters, dict) and classification.PARAMETER in parameters:
            name = output.get("name", "")
            if found is None:
                found = {}
            found[name] = classification.class_count(name, parameters[classification.PARAMETER])
    return found


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
