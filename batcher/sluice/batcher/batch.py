"""A collected batch: how its members' inputs become one tensor per input, and how outputs go back.

Members share a group key, so their inputs concatenate along axis 0 except on padded axes, which are
filled up to the batch's longest member. Results are views into the batched outputs (no copies), cropped
back on padded dims to each member's own length.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np

from sluice.batcher.config import PadSpec
from sluice.batcher.pending import Array, Pending
from sluice.batcher.sparse import CooArray

T = TypeVar("T")


def _set_result_if_pending(future: asyncio.Future[T], result: T) -> None:
    # A caller that gave up (cancelled, deadline) has a done future; its answer is simply discarded.
    if not future.done():
        future.set_result(result)


def _set_exception_if_pending(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


class Batch:
    """The members of one run and the bookkeeping to split its outputs back to them."""

    __slots__ = ("members", "rows")

    def __init__(self, members: list[Pending]) -> None:
        self.members = members
        self.rows = sum(member.rows for member in members)

    def inputs(self, pad: Mapping[str, tuple[PadSpec, ...]]) -> dict[str, Array]:
        """One array per input, rows in member order."""
        members = self.members
        if len(members) == 1:
            return dict(members[0].inputs)  # a new dict, the same arrays: nothing copied
        batched: dict[str, Array] = {}
        for name, first in members[0].inputs.items():
            specs = pad.get(name)
            if isinstance(first, CooArray):
                batched[name] = CooArray.concat([member.inputs[name] for member in members])  # type: ignore[assignment, misc]
            elif specs is None:
                batched[name] = np.concatenate([member.inputs[name] for member in members])
            else:
                batched[name] = self._padded(name, first, specs)
        return batched

    def _padded(self, name: str, first: Array, specs: tuple[PadSpec, ...]) -> Array:
        members = self.members
        shape = list(first.shape)
        shape[0] = self.rows
        ragged = False
        for spec in specs:
            lengths = [member.inputs[name].shape[spec.axis] for member in members]
            longest = max(lengths)
            shape[spec.axis] = longest
            ragged = ragged or min(lengths) != longest
        if not ragged:
            return np.concatenate([member.inputs[name] for member in members])
        # One allocation; each member is copied in once and only its pad region is filled.
        out = np.empty(shape, dtype=first.dtype)
        everything = [slice(None)] * len(shape)
        start = 0
        for member in members:
            array = member.inputs[name]
            stop = start + member.rows
            out[(slice(start, stop), *(slice(0, n) for n in array.shape[1:]))] = array
            for spec in specs:
                length = array.shape[spec.axis]
                if length < shape[spec.axis]:
                    region = everything.copy()
                    region[0] = slice(start, stop)
                    region[spec.axis] = slice(length, None)
                    out[tuple(region)] = spec.value
            start = stop
        return out

    def mismatch(self, outputs: object, crop: Mapping[str, tuple[tuple[int, str], ...]]) -> str | None:
        """Why the outputs cannot be split back one row per input row, or None when they can."""
        if not isinstance(outputs, Mapping):
            return (
                f"the run function returned {type(outputs).__name__}, not a mapping of output name to array"
            )
        for name, array in outputs.items():
            if not isinstance(array, np.ndarray) or array.ndim == 0:
                got = type(array).__name__ if not isinstance(array, np.ndarray) else "a scalar array"
                return (
                    f"output '{name}' must be an array with a batch dimension of {self.rows} rows, got {got}"
                )
            if array.shape[0] != self.rows:
                return (
                    f"output '{name}' has {array.shape[0]} rows, expected {self.rows} "
                    f"(one per input row in the batch)"
                )
            for axis, dim in crop.get(name, ()):
                if axis >= array.ndim:
                    return f"output '{name}' has rank {array.ndim}, too low to crop axis {axis} (dim '{dim}')"
        return None

    def deliver(self, outputs: Mapping[str, Array], crop: Mapping[str, tuple[tuple[int, str], ...]]) -> None:
        """Sets each member's result; call only after `mismatch` returned None."""
        members = self.members
        if len(members) == 1:
            # Nothing was padded beyond this member's own length, so there is nothing to crop either.
            _set_result_if_pending(members[0].future, dict(outputs))
            return
        items = list(outputs.items())
        start = 0
        for member in members:
            stop = start + member.rows
            result: dict[str, Array] = {}
            for name, array in items:
                part = array[start:stop]
                pairs = crop.get(name)
                if pairs:
                    part = _crop(part, pairs, member.lengths)
                result[name] = part
            _set_result_if_pending(member.future, result)
            start = stop

    def fail(self, make: Callable[[], BaseException]) -> None:
        """Fails every member, each with its own exception (a shared one would collect every traceback)."""
        for member in self.members:
            _set_exception_if_pending(member.future, make())


def _crop(part: Array, pairs: tuple[tuple[int, str], ...], lengths: Mapping[str, int]) -> Array:
    region: list[slice] | None = None
    for axis, dim in pairs:
        length = lengths.get(dim)
        if length is not None and length < part.shape[axis]:
            if region is None:
                region = [slice(None)] * part.ndim
            region[axis] = slice(0, length)
    return part if region is None else part[tuple(region)]
