"""sluice.v1 tensors and numpy arrays, on top of the one wire codec (`sluice.wire`), plus sparse COO inputs.

Dense tensors are viewed in place with `numpy.frombuffer`: the request's bytes are the array's memory. Every
check names the tensor, what was expected and what came, because the message goes straight to the caller;
every size a header declares is checked against the bytes that came before anything is allocated.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from sluice.server.errors import invalid
from sluice.v1 import inference_pb2 as pb
from sluice.wire import (
    NUMERIC,
    VARIABLE,
    WireError,
    datatype_of,
    decode_numeric,
    decode_strings,
    element_count,
    format_shape,
    numpy_dtype,
    type_name,
)
from sluice.wire import encode as encode_raw

__all__ = [
    "datatype_of",
    "densify",
    "encode",
    "encode_into",
    "format_shape",
    "numpy_dtype",
    "sparse_parts",
    "type_name",
]

DataType = int  # a sluice.v1.DataType enum value


def encode(name: str, array: npt.NDArray[np.generic]) -> pb.Tensor:
    """Builds a wire tensor from an array (one copy, into the message's bytes)."""
    tensor = pb.Tensor()
    encode_into(tensor, name, array)
    return tensor


def encode_into(tensor: pb.Tensor, name: str, array: npt.NDArray[np.generic]) -> None:
    """Fills an empty wire tensor, one already in its message (`outputs.add()`), from an array."""
    datatype, tensor.raw_contents = encode_raw(array)
    tensor.datatype = datatype  # type: ignore[assignment]  # a DataType value, as sluice.wire returns it
    tensor.name = name
    tensor.shape.extend(array.shape)


def sparse_parts(
    indices_raw: bytes, values_raw: bytes, datatype: DataType, shape: tuple[int, ...], what: str
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.generic]]:
    """Checked indices [nnz, rank] and values [nnz] of a sparse tensor; nnz comes from the bytes."""
    element_count(shape, what)
    rank = len(shape)
    if rank == 0:
        raise invalid(f"{what}: a sparse tensor needs a dense shape of rank >= 1, got []")
    if datatype not in NUMERIC and datatype not in VARIABLE:
        names = ", ".join(type_name(t) for t in (*NUMERIC, *VARIABLE))
        raise invalid(f"{what}: datatype must be one of {names}, got {type_name(datatype)}")
    row = 8 * rank
    if len(indices_raw) % row:
        raise invalid(
            f"{what}: sparse indices must be INT64 [nnz, {rank}] ({row} bytes per non-zero), "
            f"got {len(indices_raw)} bytes"
        )
    nnz = len(indices_raw) // row
    indices = np.frombuffer(indices_raw, dtype="<i8").reshape(nnz, rank)
    if nnz:
        outside = (indices < 0) | (indices >= np.asarray(shape, dtype=np.int64))
        if outside.any():
            bad = int(np.flatnonzero(outside.any(axis=1))[0])
            raise invalid(
                f"{what}: sparse index {indices[bad].tolist()} (non-zero {bad}) lies outside the dense "
                f"shape {format_shape(shape)}"
            )
    if datatype in VARIABLE:
        text = datatype == pb.DATA_TYPE_STRING
        return indices, decode_strings(values_raw, nnz, f"{what} sparse values", text=text)
    try:
        values = decode_numeric(values_raw, datatype, (nnz,), f"{what} sparse values", "sparse.values")
    except WireError as exc:
        raise invalid(str(exc)) from None
    return indices, values


def densify(
    indices: npt.NDArray[np.int64],
    values: npt.NDArray[np.generic],
    datatype: DataType,
    shape: tuple[int, ...],
    what: str,
    max_bytes: int,
) -> npt.NDArray[np.generic]:
    """The dense array of a sparse tensor, refused before allocating when it would exceed `max_bytes`."""
    itemsize = 8 if datatype in VARIABLE else NUMERIC[datatype].itemsize
    size = element_count(shape, what) * itemsize
    if size > max_bytes:
        raise invalid(
            f"{what}: dense shape {format_shape(shape)} would take {size} bytes, over the "
            f"max_message_bytes limit of {max_bytes}"
        )
    if datatype in VARIABLE:
        empty = "" if datatype == pb.DATA_TYPE_STRING else b""
        dense: npt.NDArray[np.generic] = np.full(shape, empty, dtype=object)
    else:
        dense = np.zeros(shape, dtype=NUMERIC[datatype])
    dense[tuple(indices.T)] = values
    return dense
