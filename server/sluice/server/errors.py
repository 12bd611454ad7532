"""One exception type for every error a caller can act on, and the one place it becomes a gRPC status."""

from __future__ import annotations

import logging

import grpc

from sluice.batcher import (
    BatcherClosedError,
    BatcherError,
    BatchInputError,
    BatchTooLargeError,
    DeadlineExpiredError,
    ModelRunError,
    QueueFullError,
)

log = logging.getLogger("sluice.server")

LOG_HINT = "the server log has the details"
INTERNAL_MESSAGE = f"internal server error; {LOG_HINT}"


class SluiceError(Exception):
    """An expected error: carries the status code and a message meant for the caller."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> SluiceError:
    """The caller sent something that does not match the model."""
    return SluiceError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> SluiceError:
    """The caller named a model or version the repository does not have."""
    return SluiceError(grpc.StatusCode.NOT_FOUND, message)


def unavailable(message: str) -> SluiceError:
    """The model cannot answer now (failed to load, still loading, or the server is draining)."""
    return SluiceError(grpc.StatusCode.UNAVAILABLE, message)


_BATCHER_CODES: dict[type[BatcherError], grpc.StatusCode] = {
    QueueFullError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    BatchTooLargeError: grpc.StatusCode.INVALID_ARGUMENT,
    BatchInputError: grpc.StatusCode.INVALID_ARGUMENT,
    DeadlineExpiredError: grpc.StatusCode.DEADLINE_EXCEEDED,
    BatcherClosedError: grpc.StatusCode.UNAVAILABLE,
    ModelRunError: grpc.StatusCode.INTERNAL,
}


def to_status(exc: BaseException, context: str) -> tuple[grpc.StatusCode, str]:
    """Maps any exception to the status and message a caller sees; logs what the caller must not see.

    `context` names the call (model and request id) for the log line.
    """
    if isinstance(exc, SluiceError):
        return exc.code, exc.message
    if isinstance(exc, BatcherError):
        for kind in type(exc).__mro__:
            code = _BATCHER_CODES.get(kind)
            if code is not None:
                break
        else:
            code = grpc.StatusCode.INTERNAL
        if isinstance(exc, ModelRunError):
            # The model's own failure: say which model failed, keep its internals in the log.
            log.error("%s: %s", context, exc, exc_info=exc.__cause__ or exc)
            return code, f"model '{exc.model}' failed to run this request's batch; {LOG_HINT}"
        return code, str(exc)
    log.error("%s: unexpected error", context, exc_info=exc)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE
