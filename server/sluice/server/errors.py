"""One exception type for every error a caller can act on, with a status that knows no protocol.

`Code` names the statuses the way gRPC does (every door maps them once: gRPC to its own codes, REST to HTTP
statuses); `to_status` is the one place any exception becomes a status and a message a caller may see.
"""

from __future__ import annotations

import enum
import logging
from typing import Protocol

from sluice.batcher import (
    BatcherClosedError,
    BatcherError,
    BatchInputError,
    BatchTooLargeError,
    DeadlineExpiredError,
    ModelRunError,
    QueueFullError,
)
from sluice.wire import WireError

log = logging.getLogger("sluice.server")

LOG_HINT = "the server log has the details"
INTERNAL_MESSAGE = f"internal server error; {LOG_HINT}"
CLIP = 128
"""The most characters of a caller-supplied string (a model name, an id) repeated in a message."""


class Code(enum.Enum):
    """A request's final status, named and numbered as gRPC's status codes."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class _Named(Protocol):
    @property
    def name(self) -> str: ...


class SluiceError(Exception):
    """An expected error: carries the status and a message meant for the caller.

    `code` may also be a `grpc.StatusCode` (plugins written against earlier versions pass one): it is read
    by name.
    """

    def __init__(self, code: Code | _Named, message: str) -> None:
        super().__init__(message)
        self.code = code if isinstance(code, Code) else Code[code.name]
        self.message = message


def clip(text: str, limit: int = CLIP) -> str:
    """A caller-supplied string cut to `limit` characters, so a message stays small whatever was sent."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def invalid(message: str) -> SluiceError:
    """The caller sent something that does not match the model."""
    return SluiceError(Code.INVALID_ARGUMENT, message)


def not_found(message: str) -> SluiceError:
    """The caller named a model or version the repository does not have."""
    return SluiceError(Code.NOT_FOUND, message)


def unavailable(message: str) -> SluiceError:
    """The model cannot answer now (failed to load, still loading, or the server is draining)."""
    return SluiceError(Code.UNAVAILABLE, message)


def exhausted(message: str) -> SluiceError:
    """A limit of the server's was reached; the message names the limit and its setting."""
    return SluiceError(Code.RESOURCE_EXHAUSTED, message)


_BATCHER_CODES: dict[type[BatcherError], Code] = {
    QueueFullError: Code.RESOURCE_EXHAUSTED,
    BatchTooLargeError: Code.INVALID_ARGUMENT,
    BatchInputError: Code.INVALID_ARGUMENT,
    DeadlineExpiredError: Code.DEADLINE_EXCEEDED,
    BatcherClosedError: Code.UNAVAILABLE,
    ModelRunError: Code.INTERNAL,
}


def to_status(exc: BaseException, context: str) -> tuple[Code, str]:
    """Maps any exception to the status and message a caller sees; logs what the caller must not see.

    `context` names the call (model and request id) for the log line of an unexpected error.
    """
    if isinstance(exc, SluiceError):
        return exc.code, exc.message
    if isinstance(exc, WireError):
        return Code.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, BatcherError):
        for kind in type(exc).__mro__:
            code = _BATCHER_CODES.get(kind)
            if code is not None:
                break
        else:
            code = Code.INTERNAL
        if isinstance(exc, ModelRunError):
            cause = exc.__cause__
            if isinstance(cause, SluiceError):
                # A runtime refusing this request's own rows (a schema it validates, say), with its status.
                return cause.code, cause.message
            # The model's own failure: say which model failed, keep its internals in the log, where the
            # scheduler wrote them once per failed run (not once per request of the batch).
            return code, f"model '{exc.model}' failed to run this request's batch; {LOG_HINT}"
        return code, str(exc)
    log.error("%s: unexpected error", context, exc_info=exc)
    return Code.INTERNAL, INTERNAL_MESSAGE
