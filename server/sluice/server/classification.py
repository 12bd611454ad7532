"""Triton's classification extension, on both KServe doors: an output requested with the parameter
`classification = N` comes back as its N highest values, best first, as BYTES strings "<value>:<index>".

Triton's clients ask for it with `InferRequestedOutput(name, class_count=N)`; their image classifier
examples read it. With a labels file (`outputs.NAME.labels` in config.toml) the strings end in ":<label>".
Shape [batch, N] for a model that batches (each batch item's values ranked on their own, whatever their
shape), [N] for one that does not; a model with fewer than N values gives them all. Values print as C++'s
std::to_string does in Triton (six decimals for floating point, integers as they are).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from sluice.server.errors import clip, invalid

PARAMETER = "classification"


def class_count(output: str, value: object) -> int:
    """The parameter's value as a class count; INVALID_ARGUMENT naming the output when it is not one."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        shown = clip(repr(value)) if not isinstance(value, str) else f"'{clip(value)}'"
        raise invalid(
            f"output '{clip(output)}': parameter '{PARAMETER}' must be a positive integer (how many classes "
            f"to return), got {shown}"
        )
    return value


def classify(
    output: str,
    array: npt.NDArray[Any],
    count: int,
    batched: bool,
    labels: Sequence[str] | None = None,
) -> npt.NDArray[np.object_]:
    """`array`'s `count` highest values per batch item (or in all, unbatched) as "<value>:<index>" strings,
    with ":<label>" where `labels` names the index."""
    kind = array.dtype.kind
    if kind not in "biuf":
        raise invalid(
            f"output '{clip(output)}': parameter '{PARAMETER}' ranks numbers, and this output holds "
            f"{'strings' if kind in 'OSU' else array.dtype.name}; ask for it without the parameter"
        )
    rows = array.reshape(len(array) if batched and array.ndim else 1, -1)
    if kind == "b":
        rows = rows.astype(np.int8)
    # Highest first, and the lower index first among equal values: a stable sort of the values turned
    # around (negated, or subtracted from the top of an unsigned type). NaN, never greater, comes last.
    keys = np.iinfo(rows.dtype).max - rows if rows.dtype.kind == "u" else -rows
    order = np.argsort(keys, axis=1, kind="stable")[:, : min(count, rows.shape[1])]
    values = np.take_along_axis(rows, order, axis=1)
    text = _float if kind == "f" else _integer
    ranked = np.empty(order.shape, dtype=object)
    named = labels or ()
    for r, (row_values, row_order) in enumerate(zip(values.tolist(), order.tolist(), strict=True)):
        ranked[r] = [
            f"{text(v)}:{i}:{named[i]}" if i < len(named) else f"{text(v)}:{i}"
            for v, i in zip(row_values, row_order, strict=True)
        ]
    return ranked if batched and array.ndim else ranked[0]


def _float(value: float) -> str:
    return f"{value:f}"


def _integer(value: int) -> str:
    return str(int(value))
