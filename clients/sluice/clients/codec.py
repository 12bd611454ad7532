"""numpy <-> `sluice.v1.Tensor`: raw little-endian row-major bytes, one copy each way at most."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import numpy.typing as npt

from sluice.v1 import inference_pb2 as pb

_DTYPES: dict[pb.DataType.ValueType, np.dtype[Any]] = {
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
_BY_KIND = {(d.kind, d.itemsize): t for t, d in _DTYPES.items()}
_LENGTH = struct.Struct("<I")


def numpy_dtype(datatype: int) -> np.dtype[Any]:
    """The numpy dtype that holds a wire data type (object for STRING and BYTES)."""
    if datatype in (pb.DATA_TYPE_STRING, pb.DATA_TYPE_BYTES):
        return np.dtype(object)
    return _DTYPES[datatype]  # type: ignore[index]


def to_tensor(name: str, array: npt.ArrayLike) -> pb.Tensor:
    """A wire tensor holding `array`: str arrays become STRING tensors, bytes arrays (dtype S, or object with
    bytes elements: encoded images, say) BYTES tensors."""
    a = np.asarray(array)
    if a.dtype.kind in "OUS":
        parts = []
        for item in a.reshape(-1):
            data = bytes(item) if isinstance(item, bytes | bytearray) else str(item).encode("utf-8")
            parts.append(_LENGTH.pack(len(data)) + data)
        binary = a.dtype.kind == "S" or (a.dtype.kind == "O" and a.size > 0 and isinstance(a.flat[0], bytes))
        variable = pb.DATA_TYPE_BYTES if binary else pb.DATA_TYPE_STRING
        return pb.Tensor(name=name, datatype=variable, shape=a.shape, raw_contents=b"".join(parts))
    datatype = _BY_KIND.get((a.dtype.kind, a.dtype.itemsize))
    if datatype is None:
        raise TypeError(f"tensor '{name}': numpy dtype {a.dtype} has no Sluice data type")
    raw = a.astype(_DTYPES[datatype], copy=False).tobytes()
    return pb.Tensor(name=name, datatype=datatype, shape=a.shape, raw_contents=raw)


def to_array(tensor: pb.Tensor) -> npt.NDArray[Any]:
    """The array a wire tensor holds (numeric tensors share the message's memory, read-only)."""
    shape = tuple(tensor.shape)
    if tensor.datatype in (pb.DATA_TYPE_STRING, pb.DATA_TYPE_BYTES):
        text = tensor.datatype == pb.DATA_TYPE_STRING
        raw = tensor.raw_contents
        out = np.empty(int(np.prod(shape)), dtype=object)
        offset = 0
        for i in range(out.size):
            (length,) = _LENGTH.unpack_from(raw, offset)
            item = raw[offset + 4 : offset + 4 + length]
            out[i] = item.decode("utf-8") if text else item
            offset += 4 + length
        return out.reshape(shape)
    return np.frombuffer(tensor.raw_contents, dtype=_DTYPES[tensor.datatype]).reshape(shape)
