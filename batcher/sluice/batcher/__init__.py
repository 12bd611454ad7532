"""Adaptive batching for model inference: asyncio only, no gRPC or runtime imports.

Requests are queued with their own futures, grouped into batches that respect a row bound, a delay bound
and the measured load, run on a fixed number of model instances, and answered with their own rows.
"""

from sluice.batcher.config import BatcherConfig, PadSpec
from sluice.batcher.core import Batcher, LingerFn, RunFn
from sluice.batcher.errors import (
    BatcherClosedError,
    BatcherError,
    BatchInputError,
    BatchTooLargeError,
    DeadlineExpiredError,
    ModelRunError,
    OutputMismatchError,
    QueueFullError,
)
from sluice.batcher.observer import BatchObserver, NullObserver
from sluice.batcher.pending import Array, Arrays
from sluice.batcher.policy import Estimates
from sluice.batcher.sparse import CooArray

__all__ = [
    "Array",
    "Arrays",
    "BatchInputError",
    "BatchObserver",
    "BatchTooLargeError",
    "Batcher",
    "BatcherClosedError",
    "BatcherConfig",
    "BatcherError",
    "CooArray",
    "DeadlineExpiredError",
    "Estimates",
    "LingerFn",
    "ModelRunError",
    "NullObserver",
    "OutputMismatchError",
    "PadSpec",
    "QueueFullError",
    "RunFn",
]
