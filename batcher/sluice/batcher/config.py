"""Batcher settings, checked once at construction so a bad model config fails at load, not per request."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

Policy = Literal["adaptive", "fixed", "none"]
POLICIES: tuple[Policy, ...] = ("adaptive", "fixed", "none")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class PadSpec:
    """An input axis that may be padded so that requests of different lengths batch together."""

    axis: int
    """Axis in the full tensor, >= 1 (axis 0 is the batch)."""
    dim: str
    """Symbolic dimension name shared by inputs and outputs, e.g. "seq"; outputs are cropped back by it."""
    value: float | int = 0
    """What the padded positions hold (cast to the input's dtype)."""

    def __post_init__(self) -> None:
        if not _is_int(self.axis) or self.axis < 1:
            raise ValueError(f"PadSpec.axis must be an int >= 1 (axis 0 is the batch), got {self.axis!r}")
        if not isinstance(self.dim, str) or not self.dim:
            raise ValueError(
                f"PadSpec.dim must be a non-empty dimension name such as 'seq', got {self.dim!r}"
            )


@dataclass(frozen=True)
class BatcherConfig:
    """How one model's requests are batched."""

    max_batch_size: int = 32
    """Most rows in one batch, >= 1."""
    max_delay: float = 0.002
    """Seconds the first request of a batch may wait for company, from its arrival."""
    max_queue_rows: int = 1024
    """Admission bound in rows across all priorities; beyond it submit raises QueueFullError."""
    instances: int = 1
    """Batches run concurrently (one per model instance)."""
    policy: Policy = "adaptive"
    """"adaptive" sizes batches from measured load, "fixed" waits for a full batch or max_delay, "none"
    runs every request alone."""
    pad: Mapping[str, tuple[PadSpec, ...]] = field(default_factory=dict)
    """Input name -> axes that may differ between requests and are padded to the batch's longest."""
    crop: Mapping[str, tuple[tuple[int, str], ...]] = field(default_factory=dict)
    """Output name -> ((axis, dim), ...) cut back to each request's own length of `dim`."""
    isolate_failures: bool = True
    """When a run of several requests raises, re-run halves of them on the same instance until the
    requests that make the model raise are found, so that only those fail. Turn it off for a model whose
    runs must not repeat (side effects), or one that fails for whole batches rather than for particular
    rows (a lost device, a dependency that is down): there every failed batch of n requests costs up to
    2n - 1 runs instead of one, and the instance stays busy all the while."""

    def __post_init__(self) -> None:
        if not _is_int(self.max_batch_size) or self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an int >= 1, got {self.max_batch_size!r}")
        if (
            not isinstance(self.max_delay, int | float)
            or not math.isfinite(self.max_delay)
            or self.max_delay < 0
        ):
            raise ValueError(f"max_delay must be a finite number of seconds >= 0, got {self.max_delay!r}")
        if not _is_int(self.max_queue_rows) or self.max_queue_rows < self.max_batch_size:
            # A smaller queue could never admit a full batch (and one equal to it blocks senders as soon as
            # one batch waits), so it is refused rather than silently starving.
            raise ValueError(
                f"max_queue_rows must be an int >= max_batch_size={self.max_batch_size}, "
                f"got {self.max_queue_rows!r}"
            )
        if not _is_int(self.instances) or self.instances < 1:
            raise ValueError(f"instances must be an int >= 1, got {self.instances!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if not isinstance(self.isolate_failures, bool):
            raise ValueError(f"isolate_failures must be True or False, got {self.isolate_failures!r}")

        pad: dict[str, tuple[PadSpec, ...]] = {}
        for name, specs in self.pad.items():
            specs = tuple(specs)
            if not specs or not all(isinstance(spec, PadSpec) for spec in specs):
                raise ValueError(f"pad[{name!r}] must be a non-empty tuple of PadSpec, got {specs!r}")
            axes = [spec.axis for spec in specs]
            if len(set(axes)) != len(axes):
                raise ValueError(f"pad[{name!r}] names an axis twice: {axes}")
            pad[name] = specs
        dims = {spec.dim for specs in pad.values() for spec in specs}

        crop: dict[str, tuple[tuple[int, str], ...]] = {}
        for name, pairs in self.crop.items():
            pairs = tuple((axis, dim) for axis, dim in pairs)
            for axis, dim in pairs:
                if not _is_int(axis) or axis < 1:
                    raise ValueError(f"crop[{name!r}]: axis must be an int >= 1, got {axis!r}")
                if dim not in dims:
                    raise ValueError(
                        f"crop[{name!r}]: dim {dim!r} is not padded on any input "
                        f"(padded dims: {sorted(dims) or 'none'}), so there is no length to crop back to"
                    )
            if pairs:
                crop[name] = pairs
        # Read-only copies: the batcher reads these per batch and a caller's later edits must not leak in.
        object.__setattr__(self, "pad", MappingProxyType(pad))
        object.__setattr__(self, "crop", MappingProxyType(crop))
