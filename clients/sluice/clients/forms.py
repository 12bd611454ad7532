"""The input and answer forms callers bring from Analytics Zoo Cluster Serving, turned into wire tensors.

One module for the sync and async clients, `QueueClient` and the CLI, so each form means the same everywhere:

| value | sent as |
| --- | --- |
| numpy array, nested lists, a number | a dense tensor of its dtype (`sluice.wire`) |
| `str`, list of `str` | STRING |
| `{"path": "a.jpg"}` | the file's bytes: BYTES [1] |
| `{"b64": "..."}` | the decoded bytes: BYTES [1] (bad base64 is refused here, naming the input) |
| a `scipy.sparse` matrix or array | sparse COO (`Tensor.sparse`) |
| `[indices, values, shape]` | sparse COO; indices `[rank, nnz]`, Cluster Serving's layout |

`scipy` is imported only when a value is one of its sparse types: the clients never need it installed.
"""

from __future__ import annotations

import base64
import binascii
import importlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from sluice.clients.codec import to_tensor
from sluice.v1 import inference_pb2 as pb
from sluice.wire import NUMERIC, encode, format_shape

__all__ = ["Input", "file_bytes", "input_tensor", "instances", "is_instances", "sparse_tensor", "top_n"]

Input = Any
"""What an input may be: an array-like, a str or list of str, {"path": ...}, {"b64": ...}, a scipy.sparse
matrix or array, or [indices, values, shape]."""


def input_tensor(name: str, value: Input) -> pb.Tensor:
    """The wire tensor for one input given in any of the forms above; ValueError or TypeError naming the
    input when a value is malformed."""
    if isinstance(value, Mapping):
        return _file_form(name, value)
    if _is_scipy_sparse(value):
        coo = value.tocoo()
        indices = np.stack([np.asarray(coo.row), np.asarray(coo.col)])
        return sparse_tensor(name, indices, np.asarray(coo.data), tuple(int(d) for d in coo.shape))
    if _is_sparse_list(value):
        indices, values, shape = value
        return sparse_tensor(name, np.asarray(indices), np.asarray(values), tuple(int(d) for d in shape))
    return to_tensor(name, value)


def sparse_tensor(
    name: str, indices: npt.ArrayLike, values: npt.ArrayLike, shape: Sequence[int]
) -> pb.Tensor:
    """A sparse COO tensor from indices laid out `[rank, nnz]` (Cluster Serving's and scipy's row/col),
    checked here so that a transposed or out-of-range index is named before anything is sent."""
    idx = np.asarray(indices)
    vals = np.asarray(values).reshape(-1)
    rank, nnz = len(shape), vals.size
    where = f"input '{name}': sparse [indices, values, shape]"
    if any(d < 0 for d in shape):
        raise ValueError(f"{where}: shape dimensions must be >= 0, got {format_shape(shape)}")
    if idx.size == 0 and nnz == 0:
        idx = np.empty((rank, 0), dtype=np.int64)
    if idx.dtype.kind not in "iu":
        raise TypeError(f"{where}: indices must be integers, got numpy {idx.dtype}")
    if idx.shape != (rank, nnz):
        hint = " (that is [nnz, rank]: pass indices.T)" if idx.shape == (nnz, rank) else ""
        raise ValueError(
            f"{where}: indices must be [rank, nnz] = {format_shape((rank, nnz))} for shape "
            f"{format_shape(shape)} and {nnz} values, got {format_shape(idx.shape)}{hint}"
        )
    if nnz:
        low, high = idx.min(axis=1), idx.max(axis=1)
        for axis in range(rank):
            if low[axis] < 0 or high[axis] >= shape[axis]:
                bad = int(low[axis] if low[axis] < 0 else high[axis])
                raise ValueError(
                    f"{where}: index {bad} on axis {axis} lies outside shape {format_shape(shape)}"
                )
    try:
        datatype, raw_values = encode(vals)
    except TypeError:
        raise TypeError(f"{where}: numpy dtype {vals.dtype} of the values has no Sluice data type") from None
    return pb.Tensor(
        name=name,
        datatype=datatype,  # type: ignore[arg-type]
        shape=shape,
        sparse=pb.SparseContents(
            indices=np.ascontiguousarray(idx.T, dtype="<i8").tobytes(), values=raw_values
        ),
    )


def is_instances(value: object) -> bool:
    """Whether `value` is Cluster Serving's `{"instances": [{...}, ...]}` form (a dict, or its JSON text)."""
    if isinstance(value, str):
        return value.lstrip().startswith("{") and '"instances"' in value
    return (
        isinstance(value, Mapping)
        and set(value) == {"instances"}
        and isinstance(value["instances"], list)
        and all(isinstance(item, Mapping) for item in value["instances"])
    )


def instances(value: Mapping[str, Any] | str, types: Mapping[str, int] | None = None) -> dict[str, Input]:
    """`{"instances": [{"a": ..., "b": ...}, ...]}` as inputs: one row per instance, stacked by name.

    Numbers are cast to `types` (input name to wire data type: the model's, as the CLI casts JSON), since
    JSON does not say FP32 or FP64. A row that is a file form ({"path"}/{"b64"}) is read and sent as
    BYTES, one element per instance."""
    data: Any = value
    if isinstance(value, str):
        try:
            data = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"instances: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not is_instances(data):
        raise ValueError('instances: expected {"instances": [{"input": value, ...}, ...]}')
    rows: list[Mapping[str, Any]] = data["instances"]
    if not rows:
        raise ValueError("instances: the list is empty; expected at least one instance")
    names = list(rows[0])
    for i, row in enumerate(rows):
        if list(row) != names and set(row) != set(names):
            raise ValueError(f"instances[{i}]: has inputs {sorted(row)}, instances[0] has {sorted(names)}")
    out: dict[str, Input] = {}
    for name in names:
        column = [row[name] for row in rows]
        if all(isinstance(item, Mapping) for item in column):
            column = [file_bytes(name, item) for item in column]
            array = np.empty(len(column), dtype=object)  # bytes elements kept whole, not as S arrays
            array[:] = column
            out[name] = array
        else:
            try:
                array = np.asarray(column)
                datatype = (types or {}).get(name)
                if datatype in NUMERIC and array.dtype.kind in "biuf":
                    array = array.astype(NUMERIC[datatype])
                out[name] = array
            except (OverflowError, ValueError) as exc:
                raise ValueError(
                    f"instances: input '{name}' is not rectangular across instances ({exc})"
                ) from None
    return out


def top_n(outputs: Mapping[str, npt.NDArray[Any]], row: int = 0) -> dict[str, float]:
    """One row of a top-N answer (the `topk` postprocessor's `labels` or `classes`, and `scores`) as
    `{label: score}`, best first: what Cluster Serving's query and dequeue return."""
    scores_name = next((n for n in outputs if n.endswith("scores")), None)
    if scores_name is None:
        got = ", ".join(f"'{n}'" for n in outputs) or "nothing"
        raise ValueError(
            f"not a top-N answer: expected outputs 'scores' and 'labels' or 'classes', got {got}"
        )
    prefix = scores_name.removesuffix("scores")
    keys = outputs.get(prefix + "labels")
    if keys is None:
        keys = outputs.get(prefix + "classes")
    if keys is None:
        raise ValueError(
            f"not a top-N answer: '{scores_name}' comes with no '{prefix}labels' or '{prefix}classes'"
        )
    scores = np.asarray(outputs[scores_name])
    keys = np.asarray(keys)
    if scores.ndim != 2 or keys.shape != scores.shape:
        raise ValueError(
            f"not a top-N answer: '{scores_name}' {format_shape(scores.shape)} and labels "
            f"{format_shape(keys.shape)} should both be [rows, k]"
        )
    pairs = sorted(zip(keys[row].tolist(), scores[row].tolist(), strict=True), key=lambda p: -p[1])
    return {str(key): float(score) for key, score in pairs}


def _file_form(name: str, value: Mapping[str, Any]) -> pb.Tensor:
    data = file_bytes(name, value)
    return pb.Tensor(name=name, datatype=pb.DATA_TYPE_BYTES, shape=[1], raw_contents=encode(_one(data))[1])


def _one(data: bytes) -> npt.NDArray[Any]:
    array = np.empty(1, dtype=object)
    array[0] = data
    return array


def file_bytes(name: str, value: Mapping[str, Any]) -> bytes:
    """The bytes a `{"path": ...}` or `{"b64": ...}` value of input `name` stands for."""
    if set(value) == {"path"}:
        path = Path(value["path"])
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise ValueError(f"input '{name}': {{'path': '{path}'}}: no such file") from None
        except OSError as exc:
            raise ValueError(
                f"input '{name}': {{'path': '{path}'}}: cannot read it ({exc.strerror})"
            ) from None
    if set(value) == {"b64"}:
        text = value["b64"]
        if not isinstance(text, str | bytes):
            raise TypeError(
                f"input '{name}': {{'b64': ...}} must hold base64 text, got {type(text).__name__}"
            )
        try:
            return base64.b64decode(text, validate=True)
        except binascii.Error as exc:
            raise ValueError(f"input '{name}': {{'b64': ...}} is not valid base64 ({exc})") from None
    raise ValueError(
        f"input '{name}': a dict must be {{'path': FILE}} or {{'b64': TEXT}}, got keys {sorted(value)}"
    )


def _is_scipy_sparse(value: object) -> bool:
    module = type(value).__module__
    if not module.startswith("scipy.sparse"):
        return False
    sparse = importlib.import_module("scipy.sparse")  # only now: scipy is optional for the clients
    return bool(sparse.issparse(value))


def _is_sparse_list(value: object) -> bool:
    """[indices, values, shape]: a 2-D integer array, a 1-D array and a sequence of ints. No dense tensor
    is ragged like that, so a dense nested list is never taken for one."""
    if not isinstance(value, list | tuple) or len(value) != 3:
        return False
    indices, values, shape = value
    if not isinstance(indices, np.ndarray) or not isinstance(values, np.ndarray):
        return False
    shape_array = np.asarray(shape)
    return (
        indices.ndim == 2
        and indices.dtype.kind in "iu"
        and values.ndim == 1
        and shape_array.ndim == 1
        and shape_array.dtype.kind in "iu"
    )
