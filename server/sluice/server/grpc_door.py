"""The handler skeleton every gRPC door shares: raw bytes in, admission, parsing, status out, counting.

A door registers its methods with `unary` or `stream` and supplies three small functions: parse the
request bytes (`FromString`), answer a parsed request through the data plane, and, for streams, turn a
failure into an in-band answer. Requests arrive as bytes (no deserializer in gRPC's handler) so that a
message that does not parse is the caller's mistake, INVALID_ARGUMENT, and on a stream only that message
fails. Statuses are set outside `except` blocks, so a rejected request does not live on in a reference
cycle through the exception that carried its status.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf.message import DecodeError

from sluice.server import memory
from sluice.server.core import SHUTTING_DOWN, DataPlane
from sluice.server.errors import Code, SluiceError, clip, to_status
from sluice.server.streams import AnswerStream

log = logging.getLogger("sluice.server")

Request = TypeVar("Request")
Response = TypeVar("Response")
Context = grpc.aio.ServicerContext[Any, Any]

GRPC_CODES: dict[Code, grpc.StatusCode] = {code: grpc.StatusCode[code.name] for code in Code}
"""Each neutral status as gRPC's: the names and numbers are gRPC's own."""

LARGE = 1 << 20
"""A request this large makes the server give freed memory back to the system once it is over."""


class _Message(Protocol):
    def SerializeToString(self, **kwargs: Any) -> bytes: ...  # noqa: N802


class _RateLimitedLog:
    """Logs one line per `every` seconds at most, with how many were left out since."""

    def __init__(self, every: float = 10.0) -> None:
        self._every = every
        self._last = -every
        self._skipped = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < self._every:
            self._skipped += 1
            return
        skipped, self._skipped, self._last = self._skipped, 0, now
        suffix = f" ({skipped} more since the last such line)" if skipped else ""
        log.warning(message + suffix, *args)


_unparseable = _RateLimitedLog()


def parser(message_type: Callable[[bytes], Request], name: str) -> Callable[[bytes], Request]:
    """`FromString` of a message type, with unparseable bytes as INVALID_ARGUMENT and one log line."""

    def parse(data: bytes) -> Request:
        try:
            return message_type(data)
        except DecodeError as exc:
            _unparseable.warning("a request did not parse as %s (%d bytes): %s", name, len(data), exc)
            raise SluiceError(
                Code.INVALID_ARGUMENT, f"the request is not a valid {name} message ({len(data)} bytes)"
            ) from None

    return parse


def _deadline(context: Context, started: float) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else started + remaining


def unary(
    plane: DataPlane,
    method: str,
    parse: Callable[[bytes], Request],
    answer: Callable[[Request, float | None], Awaitable[Response]],
    model_of: Callable[[Request], str],
) -> grpc.RpcMethodHandler[bytes, Response]:
    """A unary method: admitted, parsed, answered, counted; every failure a status with a message."""

    calls = plane.calls

    async def handle(data: bytes, context: Context) -> Response | _Empty:
        started = time.monotonic()
        # Counted until gRPC is done with the call (see Calls); the stubs ask for their own DoneCallback
        # class, gRPC calls any callable with the context.
        context.add_done_callback(calls.ended)  # type: ignore[arg-type]
        plane.call_began(started)
        large = len(data) >= LARGE
        if large:
            memory.large_request()
        model = ""
        try:
            try:
                plane.enter()
            except SluiceError as exc:
                code, message = exc.code, exc.message
            else:
                request: Request | None = None
                try:
                    request = parse(data)
                    model = model_of(request)
                    response = await answer(request, _deadline(context, started))
                except asyncio.CancelledError:
                    plane.count(model, method, Code.CANCELLED, started)
                    raise
                except Exception as exc:
                    code, message = to_status(exc, f"{method} model={clip(model)!r}")
                else:
                    plane.count(model, method, Code.OK, started)
                    return response
                finally:
                    plane.leave()
                    # Not kept alive by this frame while gRPC holds on to a failed call.
                    request = None
            plane.count(model, method, code, started)
            # The status is set, not raised (context.abort): an exception would keep this call's frames,
            # and with them its request, alive for as long as gRPC holds on to it.
            context.set_code(GRPC_CODES[code])
            context.set_details(message)
            return EMPTY
        finally:
            if large:
                memory.large_request()

    return grpc.unary_unary_rpc_method_handler(handle, response_serializer=serialize)


def stream(
    plane: DataPlane,
    method: str,
    parse: Callable[[bytes], Request],
    answer: Callable[[Request, float | None], Awaitable[Response]],
    model_of: Callable[[Request], str],
    failed: Callable[[Request | None, Code, str], Response],
) -> grpc.RpcMethodHandler[bytes, Response]:
    """A bidirectional method: each message is admitted, answered and counted like a unary call, and a
    failed one is answered in-band by `failed(request or None, code, message)`; the stream goes on."""

    async def handle(requests: AsyncIterable[bytes], context: Context) -> AsyncIterator[Response]:
        try:
            plane.open_stream()
        except SluiceError as exc:
            # A refused stream still reads what its client sends and refuses each message in-band: ending
            # it while the client writes would reach the client as gRPC's "Internal error from Core".
            refusal: SluiceError | None = exc
        else:
            refusal = None
        deadline = _deadline(context, time.monotonic())

        async def one(data: bytes) -> Response:
            large = len(data) >= LARGE
            if large:
                memory.large_request()
            try:
                return await answer_one(data)
            finally:
                if large:
                    memory.large_request()

        async def answer_one(data: bytes) -> Response:
            # Parsed before admission: even a refused message's answer must carry its id.
            started = time.monotonic()
            request: Request | None = None
            model = ""
            try:
                request = parse(data)
                model = model_of(request)
                if refusal is None:
                    plane.enter()
            except SluiceError as exc:
                code, message = exc.code, exc.message
            else:
                if refusal is not None:
                    plane.count(model, method, refusal.code, started)
                    return failed(request, refusal.code, refusal.message)
                try:
                    response = await answer(request, deadline)
                except Exception as exc:
                    code, message = to_status(exc, f"{method} model={clip(model)!r}")
                else:
                    plane.count(model, method, Code.OK, started)
                    return response
                finally:
                    plane.leave()
            plane.count(model, method, code, started)
            return failed(request, code, message)

        answers = AnswerStream(requests, one, plane.limits.stream_window)
        plane.track(answers)
        try:
            async for item in answers:
                yield item
        finally:
            plane.untrack(answers)
            if refusal is None:
                plane.close_stream()
        if answers.cut:
            await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        if refusal is not None:
            await context.abort(GRPC_CODES[refusal.code], refusal.message)

    return grpc.stream_stream_rpc_method_handler(handle, response_serializer=serialize)


class _Empty:
    """What a failed unary call returns: its status is set on the context, and nothing is sent."""

    def SerializeToString(self, **kwargs: Any) -> bytes:  # noqa: N802
        return b""


EMPTY = _Empty()


def serialize(message: _Message) -> bytes:
    """A response message's bytes (gRPC calls this as the handler's response serializer)."""
    return message.SerializeToString()
