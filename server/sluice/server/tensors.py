"""Conversions between wire tensors and numpy arrays.

Dense tensors are viewed in place with `numpy.frombuffer`: the request's bytes are the array's memory. Every
check names the tensor, what was expected and what came, because the message goes straight to the caller.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from sluice.batcher import CooArray
from sluice.server.errors import invalid
from sluice.v1 import inference_pb2 as pb

DataType = int  # a sluice.v1.DataType enum value

_NUMERIC: dict[int, np.dtype[np.generic]] = {
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
_BY_KIND: dict[tuple[str, int], int] = {(d.kind, d.itemsize): t for t, d in _NUMERIC.items()}
_LENGTH = struct.Struct("<I")


def type_name(datatype: DataType) -> str:
    """Short name of a data type for messages: FP32, INT64, STRING."""
    try:
        return pb.DataType.Name(datatype).removeprefix("DATA_TYPE_")  # type: ignore[arg-type]
    except ValueError:
        return f"unknown datatype {datatype}"


_BY_DTYPE: dict[np.dtype[np.generic], int] = {d: t for t, d in _NUMERIC.items()}


_VARIABLE = (pb.DATA_TYPE_STRING, pb.DATA_TYPE_BYTES)


def datatype_of(array: npt.NDArray[np.generic]) -> DataType:
    """Wire data type of a numpy array: U arrays, and object arrays of str, are STRING; S arrays, and
    object arrays whose first element is bytes, are BYTES."""
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
        raise TypeError(f"no wire data type for numpy dtype {array.dtype}")
    return datatype


def numpy_dtype(datatype: DataType) -> np.dtype[np.generic]:
    """numpy dtype that holds a wire data type (object for STRING and BYTES)."""
    if datatype in _VARIABLE:
        return np.dtype(object)
    return _NUMERIC[datatype]


def format_shape(shape: Sequence[int]) -> str:
    """Shape as callers write it: [-1, 64]."""
    return "[" + ", ".join(str(d) for d in shape) + "]"


def decode(tensor: pb.Tensor, what: str, max_bytes: int) -> npt.NDArray[np.generic]:
    """Turns a wire tensor into an array; dense numeric tensors share the message's memory.

    `what` names the tensor in messages ("input 'pixels'"); `max_bytes` bounds what a sparse tensor may
    densify to, so a tiny message cannot ask for a huge allocation.
    """
    datatype, shape = _header(tensor, what)
    count = math.prod(shape)
    if tensor.HasField("sparse"):
        if tensor.raw_contents:
            raise invalid(f"{what}: set either raw_contents or sparse, not both")
        return _decode_sparse(tensor.sparse, datatype, shape, count, what, max_bytes)
    if datatype in _VARIABLE:
        text = datatype == pb.DATA_TYPE_STRING
        return decode_strings(tensor.raw_contents, count, what, text=text).reshape(shape)
    dtype = _NUMERIC[datatype]
    raw = tensor.raw_contents
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise invalid(
            f"{what}: {type_name(datatype)} {format_shape(shape)} needs {expected} bytes of raw_contents, "
            f"got {len(raw)}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def decode_strings(raw: bytes, count: int, what: str, *, text: bool = True) -> npt.NDArray[np.object_]:
    """Parses `count` length-prefixed elements into an object array: str (UTF-8) when `text`, else bytes."""
    out = np.empty(count, dtype=object)
    view = memoryview(raw)
    offset = 0
    for i in range(count):
        if offset + 4 > len(raw):
            raise invalid(
                f"{what}: malformed STRING contents: element {i} of {count} needs a 4-byte length prefix at "
                f"byte {offset}, got {len(raw) - offset} bytes"
            )
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise invalid(
                f"{what}: malformed STRING contents: element {i} declares {length} bytes at byte {offset}, "
                f"only {len(raw) - offset} remain"
            )
        try:
            out[i] = str(view[offset : offset + length], "utf-8") if text else raw[offset : offset + length]
        except UnicodeDecodeError as exc:
            raise invalid(f"{what}: element {i} is not valid UTF-8 text ({exc.reason})") from None
        offset += length
    if offset != len(raw):
        raise invalid(
            f"{what}: malformed STRING contents: {count} elements end at byte {offset}, got {len(raw)} bytes"
        )
    return out


def encode_strings(array: npt.NDArray[np.generic]) -> bytes:
    """Length-prefixes every element (str as UTF-8, bytes as they are) in row-major order."""
    parts: list[bytes] = []
    for item in array.reshape(-1):
        data = bytes(item) if isinstance(item, bytes | bytearray) else str(item).encode("utf-8")
        parts.append(_LENGTH.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def encode(name: str, array: npt.NDArray[np.generic]) -> pb.Tensor:
    """Builds a wire tensor from an array (one copy, into the message's bytes)."""
    datatype = datatype_of(array)
    if datatype in _VARIABLE:
        raw = encode_strings(array)
    else:
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        raw = array.tobytes()
    return pb.Tensor(name=name, datatype=datatype, shape=array.shape, raw_contents=raw)  # type: ignore[arg-type]


def decode_coo(tensor: pb.Tensor, what: str, max_bytes: int) -> CooArray:
    """A wire tensor as a `CooArray`, for steps that take sparse inputs as such; a dense one is converted."""
    if not tensor.HasField("sparse"):
        return CooArray.from_dense(decode(tensor, what, max_bytes))
    if tensor.raw_contents:
        raise invalid(f"{what}: set either raw_contents or sparse, not both")
    datatype, shape = _header(tensor, what)
    indices, values = _sparse_parts(tensor.sparse, datatype, shape, what)
    return CooArray(indices, values, shape)


def _header(tensor: pb.Tensor, what: str) -> tuple[DataType, tuple[int, ...]]:
    """A tensor's data type and shape, once both are known to be valid."""
    datatype = tensor.datatype
    if datatype not in _VARIABLE and datatype not in _NUMERIC:
        raise invalid(f"{what}: datatype must be set to one of {_type_list()}, got {type_name(datatype)}")
    shape = tuple(tensor.shape)
    if any(d < 0 for d in shape):
        raise invalid(f"{what}: shape dimensions must be >= 0, got {format_shape(shape)}")
    return datatype, shape


def _sparse_parts(
    sparse: pb.SparseContents, datatype: DataType, shape: tuple[int, ...], what: str
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.generic]]:
    """Checked indices [nnz, rank] and values [nnz] of a sparse tensor."""
    rank = len(shape)
    if rank == 0:
        raise invalid(f"{what}: a sparse tensor needs a dense shape of rank >= 1, got []")
    row = 8 * rank
    if len(sparse.indices) % row:
        raise invalid(
            f"{what}: sparse indices must be INT64 [nnz, {rank}] ({row} bytes per non-zero), "
            f"got {len(sparse.indices)} bytes"
        )
    nnz = len(sparse.indices) // row
    indices = np.frombuffer(sparse.indices, dtype="<i8").reshape(nnz, rank)
    if nnz and ((indices < 0).any() or (indices >= np.asarray(shape)).any()):
        bad = int(np.flatnonzero(((indices < 0) | (indices >= np.asarray(shape))).any(axis=1))[0])
        raise invalid(
            f"{what}: sparse index {indices[bad].tolist()} (non-zero {bad}) lies outside the dense shape "
            f"{format_shape(shape)}"
        )
    if datatype in _VARIABLE:
        text = datatype == pb.DATA_TYPE_STRING
        return indices, decode_strings(sparse.values, nnz, f"{what} sparse values", text=text)
    dtype = _NUMERIC[datatype]
    if len(sparse.values) != nnz * dtype.itemsize:
        raise invalid(
            f"{what}: {nnz} sparse values of {type_name(datatype)} need {nnz * dtype.itemsize} bytes, "
            f"got {len(sparse.values)}"
        )
    return indices, np.frombuffer(sparse.values, dtype=dtype)


def _decode_sparse(
    sparse: pb.SparseContents,
    datatype: DataType,
    shape: tuple[int, ...],
    count: int,
    what: str,
    max_bytes: int,
) -> npt.NDArray[np.generic]:
    if len(shape) == 0:
        raise invalid(f"{what}: a sparse tensor needs a dense shape of rank >= 1, got []")
    itemsize = 8 if datatype in _VARIABLE else _NUMERIC[datatype].itemsize
    if count * itemsize > max_bytes:
        raise invalid(
            f"{what}: dense shape {format_shape(shape)} would take {count * itemsize} bytes, over the "
            f"max_message_bytes limit of {max_bytes}"
        )
    indices, values = _sparse_parts(sparse, datatype, shape, what)
    if datatype in _VARIABLE:
        empty = "" if datatype == pb.DATA_TYPE_STRING else b""
        dense: npt.NDArray[np.generic] = np.full(shape, empty, dtype=object)
    else:
        dense = np.zeros(shape, dtype=_NUMERIC[datatype])
    dense[tuple(indices.T)] = values
    return dense


def _type_list() -> str:
    names = [type_name(t) for t in (*_NUMERIC, *_VARIABLE)]
    return ", ".join(names)
