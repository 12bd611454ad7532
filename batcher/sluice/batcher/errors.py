"""The errors a batcher raises to callers.

Every message names the model and the numbers involved, because the server shows it to the end user
as-is (the gRPC layer maps each type to one status code).
"""

from __future__ import annotations


class BatcherError(Exception):
    """Base class: a request the batcher could not answer."""


class QueueFullError(BatcherError):
    """Admitting the request would exceed max_queue_rows; raised at once, submit never blocks."""


class BatchTooLargeError(BatcherError):
    """The request alone has more rows than max_batch_size (rejected, not split)."""


class BatchInputError(BatcherError):
    """The inputs cannot be batched: rows disagree, a scalar input, or too low a rank for padding."""


class DeadlineExpiredError(BatcherError):
    """The caller's deadline passed before the request's batch ran."""


class BatcherClosedError(BatcherError):
    """The batcher is draining or drained: it no longer accepts or finishes requests."""


class ModelRunError(BatcherError):
    """The model's run function raised; `__cause__` is what it raised. Only the requests that make the
    model raise get it (BatcherConfig.isolate_failures), or, with isolation off, that batch's requests.

    The message is for the log: it may quote the model's own exception. A server shows callers only that
    `model` failed.
    """

    def __init__(self, message: str, *, model: str = "") -> None:
        super().__init__(message)
        self.model = model


class OutputMismatchError(ModelRunError):
    """The model returned outputs that cannot be split back: not one output row per input row."""
