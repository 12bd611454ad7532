"""A sparse COO tensor that batches like a dense one: for models and plugins that take sparse inputs as such.

Dense inputs of a batch are concatenated along axis 0; COO inputs are concatenated by offsetting each
member's row indices, so a batch of sparse rows never becomes dense on its way to the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True, slots=True)
class CooArray:
    """Non-zero `values` at `indices` (INT64 [nnz, rank]) of a tensor of `shape`; the first axis is rows."""

    indices: npt.NDArray[np.int64]
    values: npt.NDArray[Any]
    shape: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype[Any]:
        return self.values.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        """Stored elements: what a run's cost grows with."""
        return int(self.values.size)

    @property
    def nbytes(self) -> int:
        return int(self.indices.nbytes + self.values.nbytes)

    @classmethod
    def from_dense(cls, array: npt.NDArray[Any]) -> CooArray:
        """The non-zero (for strings: non-empty) elements of a dense array."""
        mask = array != ("" if array.dtype == object else 0)
        indices = np.argwhere(mask).astype(np.int64, copy=False)
        return cls(indices, array[mask], tuple(array.shape))

    def todense(self) -> npt.NDArray[Any]:
        dense = np.zeros(self.shape, dtype=self.values.dtype)
        if self.values.size:
            dense[tuple(self.indices.T)] = self.values
        return dense

    @classmethod
    def concat(cls, parts: Sequence[CooArray]) -> CooArray:
        """Stacks members along the rows; every other dimension must agree (the batch groups ensure it)."""
        offsets = np.cumsum([0] + [part.shape[0] for part in parts[:-1]], dtype=np.int64)
        indices = []
        for offset, part in zip(offsets, parts, strict=True):
            shifted = part.indices.copy()
            shifted[:, 0] += offset
            indices.append(shifted)
        rows = sum(part.shape[0] for part in parts)
        return cls(
            np.concatenate(indices) if indices else np.empty((0, len(parts[0].shape)), dtype=np.int64),
            np.concatenate([part.values for part in parts]),
            (rows, *parts[0].shape[1:]),
        )
