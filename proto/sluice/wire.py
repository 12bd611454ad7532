"""The byte layout of tensors on the wire, written once for the server, the clients and the tests.

Numeric tensors are raw little-endian row-major bytes; STRING and BYTES tensors hold each element as a 4-byte
little-endian length followed by its bytes (UTF-8 text for STRING). Every decoder checks what a header
declares against the bytes that came *before* it allocates or loops, so a 32-byte message cannot ask for
gigabytes: a numeric tensor's size is exact, and a STRING/BYTES element needs at least its 4-byte prefix.
Errors are `WireError` with a message meant for the caller ("input 'x': FP32 [2, 3] needs 24 bytes of
raw_contents, got 20"); the server turns them into INVALID_ARGUMENT.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from sluice.v1 import inference_pb2 as pb

__all__ = [
    "NUMERIC",
    "VARIABLE",
    "WireError",
    "datatype_of",
    "decode",
    "decode_numeric",
    "decode_strings",
    "element_count",
    "encode",
    "encode_strings",
    "format_shape",
    "numpy_dtype",
    "type_name",
]

NUMERIC: dict[int, np.dtype[Any]] = {
    pb.DATA_TYPE_BOOL: np.dtype(np.bool_),
    pb.DATA_TYPE_UINT8: np.dtype("<u1"),
    pb.DATA_TYPE_INT8: np.dtype("<i1"),
    pb.DATA_TYPE_UINT16: np.dtype("<u2"),
    pb.DATA_TYPE_INT16: np.dtype("<i2"),
    pb.DATA_TYPE_UINT32: np.dtype("<u4"),
    pb.DATA_TYPE_INT32: np.dtype("<i4"),
    pb.DATA_TYPE_UINT64: np.dtype("<u8"),
    pb.DATA_TYPE_INT64: np.dtype("<i8"),
    pb.DATA_TYPE_FP16: np.dtype("<f2"),
    pb.DATA_TYPE_FP32: np.dtype("<f4"),
    pb.DATA_TYPE_FP64: np.dtype("<f8"),
}
"""numpy dtype of each fixed-size data type, little-endian."""

VARIABLE = (pb.DATA_TYPE_STRING, pb.DATA_TYPE_BYTES)
"""The length-prefixed data types."""

_BY_DTYPE: dict[np.dtype[Any], int] = {d: t for t, d in NUMERIC.items()}
_BY_KIND: dict[tuple[str, int], int] = {(d.kind, d.itemsize): t for t, d in NUMERIC.items()}
_LENGTH = struct.Struct("<I")
_PREFIX = _LENGTH.size


class WireError(ValueError):
    """A tensor's header and bytes disagree, or are malformed; `str()` is the caller's message."""


def type_name(datatype: int) -> str:
    """Short name of a data type for messages: FP32, INT64, STRING."""
    try:
        return pb.DataType.Name(datatype).removeprefix("DATA_TYPE_")  # type: ignore[arg-type]
    except ValueError:
        return f"unknown datatype {datatype}"


def format_shape(shape: Sequence[int]) -> str:
    """A shape as callers write it: [-1, 64]."""
    return "[" + ", ".join(str(d) for d in shape) + "]"


def numpy_dtype(datatype: int) -> np.dtype[Any]:
    """The numpy dtype that holds a data type (object for STRING and BYTES); KeyError for unknown ones."""
    if datatype in VARIABLE:
        return np.dtype(object)
    return NUMERIC[datatype]


def datatype_of(array: npt.NDArray[Any]) -> int:
    """Data type of a numpy array: U arrays, and object arrays of str, are STRING; S arrays, and object
    arrays whose first element is bytes, are BYTES. TypeError for dtypes the wire has no type for."""
    found = _BY_DTYPE.get(array.dtype)
    if found is not None:
        return found
    kind = array.dtype.kind
    if kind == "U":
        return pb.DATA_TYPE_STRING
    if kind == "S":
        return pb.DATA_TYPE_BYTES
    if kind == "O":
        first = array.flat[0] if array.size else ""
        return pb.DATA_TYPE_BYTES if isinstance(first, bytes | bytearray) else pb.DATA_TYPE_STRING
    datatype = _BY_KIND.get((kind, array.dtype.itemsize))
    if datatype is None:
        raise TypeError(f"numpy dtype {array.dtype} has no wire data type")
    return datatype


def element_count(shape: Sequence[int], what: str) -> int:
    """The number of elements a shape declares; WireError for a negative dimension."""
    for dim in shape:
        if dim < 0:
            raise WireError(f"{what}: shape dimensions must be >= 0, got {format_shape(shape)}")
    return math.prod(shape)


def decode_numeric(
    raw: bytes, datatype: int, shape: Sequence[int], what: str, field: str = "raw_contents"
) -> npt.NDArray[Any]:
    """A read-only view of `raw` as a numeric tensor; its length must be exactly what the shape needs."""
    dtype = NUMERIC[datatype]
    count = element_count(shape, what)
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise WireError(
            f"{what}: {type_name(datatype)} {format_shape(shape)} needs {expected} bytes of {field}, "
            f"got {len(raw)}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def decode_strings(raw: bytes, count: int, what: str, *, text: bool = True) -> npt.NDArray[np.object_]:
    """`count` length-prefixed elements as an object array: str (UTF-8) when `text`, else bytes.

    Each element needs at least its 4-byte prefix, so `count` is checked against the bytes before anything
    is allocated.
    """
    size = len(raw)
    kind = "STRING" if text else "BYTES"
    if count * _PREFIX > size:
        raise WireError(
            f"{what}: malformed {kind} contents: {count} elements need at least {count * _PREFIX} bytes "
            f"(a 4-byte length each), got {size}"
        )
    out = np.empty(count, dtype=object)
    view = memoryview(raw)
    offset = 0
    for i in range(count):
        if offset + _PREFIX > size:
            raise WireError(
                f"{what}: malformed {kind} contents: element {i} of {count} needs a 4-byte length prefix "
                f"at byte {offset}, got {size - offset} bytes"
            )
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += _PREFIX
        if offset + length > size:
            raise WireError(
                f"{what}: malformed {kind} contents: element {i} declares {length} bytes at byte {offset}, "
                f"only {size - offset} remain"
            )
        if text:
            try:
                out[i] = str(view[offset : offset + length], "utf-8")
            except UnicodeDecodeError as exc:
                raise WireError(f"{what}: element {i} is not valid UTF-8 text ({exc.reason})") from None
        else:
            out[i] = raw[offset : offset + length]
        offset += length
    if offset != size:
        raise WireError(
            f"{what}: malformed {kind} contents: {count} elements end at byte {offset}, got {size} bytes"
        )
    return out


def encode_strings(array: npt.NDArray[Any]) -> bytes:
    """Length-prefixes every element (str as UTF-8, bytes as they are) in row-major order."""
    parts: list[bytes] = []
    for item in array.reshape(-1):
        data = bytes(item) if isinstance(item, bytes | bytearray) else str(item).encode("utf-8")
        parts.append(_LENGTH.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def decode(
    raw: bytes, datatype: int, shape: Sequence[int], what: str, field: str = "raw_contents"
) -> npt.NDArray[Any]:
    """A tensor's bytes as an array of its shape: numeric ones viewed in place, STRING/BYTES parsed.

    `what` names the tensor and `field` where its bytes came from, in messages."""
    if datatype in VARIABLE:
        count = element_count(shape, what)
        return decode_strings(raw, count, what, text=datatype == pb.DATA_TYPE_STRING).reshape(shape)
    if datatype not in NUMERIC:
        names = ", ".join(type_name(t) for t in (*NUMERIC, *VARIABLE))
        raise WireError(f"{what}: datatype must be one of {names}, got {type_name(datatype)}")
    return decode_numeric(raw, datatype, shape, what, field)


def encode(array: npt.NDArray[Any]) -> tuple[int, bytes]:
    """An array's data type and bytes: one copy of a numeric array (little-endian), STRING/BYTES framed."""
    datatype = datatype_of(array)
    if datatype in VARIABLE:
        return datatype, encode_strings(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return datatype, array.tobytes()
