"""numpy <-> `sluice.v1.Tensor`, on the one wire codec (`sluice.wire`) the server uses too."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from sluice.v1 import inference_pb2 as pb
from sluice.wire import decode, encode, numpy_dtype

__all__ = ["numpy_dtype", "to_array", "to_tensor"]


def to_tensor(name: str, array: npt.ArrayLike) -> pb.Tensor:
    """A wire tensor holding `array`: str arrays become STRING tensors, bytes arrays (dtype S, or object with
    bytes elements: encoded images, say) BYTES tensors."""
    a = np.asarray(array)
    try:
        datatype, raw = encode(a)
    except TypeError:
        raise TypeError(f"tensor '{name}': numpy dtype {a.dtype} has no Sluice data type") from None
    return pb.Tensor(name=name, datatype=datatype, shape=a.shape, raw_contents=raw)  # type: ignore[arg-type]


def to_array(tensor: pb.Tensor) -> npt.NDArray[Any]:
    """The array a wire tensor holds (numeric tensors share the message's memory, read-only); a tensor
    whose bytes do not match its header raises `sluice.wire.WireError`."""
    return decode(tensor.raw_contents, tensor.datatype, tuple(tensor.shape), f"output '{tensor.name}'")
