"""Triton's classification extension, on both KServe doors: an output requested with the parameter
`classification = N` comes back as its N highest values, best first, as BYTES strings "<value>:<index>".

Triton's clients ask for it with `InferRequestedOutput(name, class_count=N)`; their image classifier
examples read it. With a labels file (`outputs.NAME.labels` in config.toml) the strings end in ":<label>".
Shape [batch, N] for a model that batches (each batch item's values ranked on their own, whatever their
shape), [N] for one that does not; a model with fewer than N values gives them all. Values print as C++'s
std::to_string does in Triton (six decimals for floating point, integers as they are).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from sluice.server.errors import SluiceError, clip, invalid
from sluice.server.plugins import TensorSpec
from sluice.server.spin import in_worker

if TYPE_CHECKING:
    from sluice.server.pipeline import Servable

PARAMETER = "classification"

LOOP_MAX_VALUES = 1 << 16
"""Outputs with more values than this are ranked in a worker thread. Ranking costs about 30 ns a value here
(176 ms for a 1x21x512x512 segmentation map): on the event loop that would hold up every other caller."""

_RANKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sluice-classify")
"""One ranking at a time, in a pool of its own: most of it (the strings) holds the GIL, so more threads would
only contend, and a burst of big ones must not queue model loads behind them in the default executor."""


def class_count(output: str, value: object) -> int:
    """The parameter's value as a class count; INVALID_ARGUMENT naming the output when it is not one."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        shown = clip(repr(value)) if not isinstance(value, str) else f"'{clip(value)}'"
        raise invalid(
            f"output '{clip(output)}': parameter '{PARAMETER}' must be a positive integer (how many classes "
            f"to return), got {shown}"
        )
    return value


def check(output: str, spec: TensorSpec | None) -> None:
    """Refuses, before the model runs, a classification of an output that holds strings (`spec` None: an
    output the request names but the model lacks, which the request's own check reports)."""
    if spec is not None and spec.dtype is None:
        raise _strings(output)


def check_outputs(servable: Servable, classes: Mapping[str, int]) -> None:
    """`check` for every output a request asks for as a classification."""
    for name in classes:
        check(name, servable.outputs_by_name.get(name))


def rank(servable: Servable, name: str, array: npt.NDArray[Any], count: int) -> npt.NDArray[np.object_]:
    """`classify` for one output of `servable`'s answer, with its batching and its labels."""
    return classify(name, array, count, servable.model.max_batch_size > 0, servable.labels.get(name))


async def rank_outputs(
    servable: Servable, outputs: Sequence[tuple[str, npt.NDArray[Any]]], classes: Mapping[str, int]
) -> list[tuple[str, npt.NDArray[Any]]]:
    """`outputs` with those named in `classes` ranked (`rank`); big ones in a worker thread."""
    ranked: list[tuple[str, npt.NDArray[Any]]] = []
    for name, array in outputs:
        count = classes.get(name)
        if count is not None:
            if array.size > LOOP_MAX_VALUES:
                array = await in_worker(_RANKER, servable.runner.spin, rank, servable, name, array, count)
            else:
                array = rank(servable, name, array, count)
        ranked.append((name, array))
    return ranked


def _strings(output: str) -> SluiceError:
    return invalid(
        f"output '{clip(output)}': parameter '{PARAMETER}' ranks numbers, and this output holds strings; "
        "ask for it without the parameter"
    )


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
        raise (
            _strings(output)
            if kind in "OSU"
            else invalid(f"output '{clip(output)}': cannot rank {array.dtype}")
        )
    rows = array.reshape(len(array) if batched and array.ndim else 1, -1)
    if kind == "b":
        rows = rows.astype(np.int8)
    # Highest first, and the lower index first among equal values: a stable sort of keys that reverse the
    # order (~x for integers, which cannot overflow as -x does at a signed type's minimum; -x for floating
    # point, where NaN stays NaN and sorts last).
    keys = -rows if rows.dtype.kind == "f" else ~rows
    take = min(count, rows.shape[1])
    order = np.stack([_best(row, take) for row in keys]) if len(keys) else np.empty((0, take), np.intp)
    values = np.take_along_axis(rows, order, axis=1)
    text = _float if kind == "f" else _integer
    named = labels or ()
    ranked = np.empty(order.shape, dtype=object)
    for r, (row_values, row_order) in enumerate(zip(values.tolist(), order.tolist(), strict=True)):
        ranked[r] = [
            f"{text(v)}:{i}:{named[i]}" if i < len(named) and named[i] else f"{text(v)}:{i}"
            for v, i in zip(row_values, row_order, strict=True)
        ]
    return ranked if batched and array.ndim else ranked[0]


def _best(keys: npt.NDArray[Any], take: int) -> npt.NDArray[np.intp]:
    """Indexes of the `take` smallest keys, in order, the lower index first among equal keys. Only the
    candidates (the `take` smallest and every key equal to the last of them) are sorted: an output of
    millions of values takes milliseconds, not a second."""
    if take == 0:
        return np.empty(0, np.intp)
    if take < len(keys):
        boundary = keys[np.argpartition(keys, take - 1)[take - 1]]
        if not (isinstance(boundary, float | np.floating) and np.isnan(boundary)):
            candidates = np.flatnonzero(keys <= boundary)  # ascending indexes, so ties stay in index order
            return candidates[np.argsort(keys[candidates], kind="stable")[:take]]
    return np.argsort(keys, kind="stable")[:take]


def _float(value: float) -> str:
    return f"{value:f}"


def _integer(value: int) -> str:
    return str(int(value))
