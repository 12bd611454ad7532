"""Python clients for Sluice: `Client` (blocking) and `AsyncClient` (asyncio), with the same API.

    with Client("127.0.0.1:8001") as client:
        outputs = client.predict("digits", pixels=images)      # numpy in, numpy out

Calls that only read (Predict, Health) are retried with exponential backoff when the server answers
UNAVAILABLE (a replica draining or restarting, a model still loading) or cancels them while stopping;
every failure surfaces as `SluiceError`, carrying the gRPC status code and the server's message.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import numpy.typing as npt

from sluice.clients.codec import to_array
from sluice.clients.forms import Input, input_tensor, instances, is_instances
from sluice.v1 import inference_pb2 as pb
from sluice.v1 import inference_pb2_grpc as pb_grpc

T = TypeVar("T")
Outputs = dict[str, npt.NDArray[Any]]


class SluiceError(Exception):
    """A call that failed: the gRPC status code and the server's message (or the transport's)."""

    def __init__(self, code: grpc.StatusCode, message: str, *, request_id: str = "") -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id


@dataclass(frozen=True)
class Retry:
    """Backoff for calls that are safe to repeat: attempts in all, first delay, growth, cap, jitter.

    The default waits up to about 7.5 s in all (0.05, 0.1, 0.2, 0.4, 0.8, then 1 s apart), enough to ride
    through a server restart of a few seconds; the call's deadline, when it has one, ends it sooner.
    """

    attempts: int = 12
    initial: float = 0.05
    multiplier: float = 2.0
    maximum: float = 1.0
    jitter: float = 0.1
    """Each delay is moved by up to this fraction, so that callers cut off together do not return together."""
    codes: frozenset[grpc.StatusCode] = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})
    """UNAVAILABLE: draining, loading, or not listening. CANCELLED: a stopping gRPC server cancels the calls
    it had received but not started. This client never cancels a call of its own with an RpcError (an
    asyncio caller's cancellation raises CancelledError instead), so either means the call did not run."""

    def delays(self) -> Iterator[float]:
        delay = self.initial
        for _ in range(self.attempts - 1):
            yield delay * (1 + self.jitter * (2 * random.random() - 1))
            delay = min(delay * self.multiplier, self.maximum)


@dataclass(frozen=True)
class ClientOptions:
    """How to reach a server: TLS, a bearer token, message size, default deadline, retries."""

    tls: bool = False
    """Use TLS; with no root certificates given, the system's are used."""
    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    """Client certificate (PEM) for mutual TLS."""
    private_key: bytes | None = None
    token: str | None = None
    """Sent as `authorization: Bearer <token>` on every call."""
    max_message_bytes: int = 64 * 1024 * 1024
    """Match the server's max_message_bytes, so large outputs are accepted."""
    timeout: float | None = None
    """Default deadline in seconds for each call; None waits as long as it takes."""
    retry: Retry = field(default_factory=Retry)
    load_balancing: str | None = None
    """gRPC load-balancing policy, e.g. "round_robin" to spread calls over every address of a target such as
    `ipv4:127.0.0.1:8101,127.0.0.1:8102`; None keeps gRPC's default (pick_first: one server at a time)."""

    def channel_options(self) -> list[tuple[str, int | str]]:
        options: list[tuple[str, int | str]] = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            # gRPC waits 1 s, then longer, before it reconnects to a server that went away; calls meanwhile
            # fail at once. Retrying sooner lets a restarted server be found within the retry budget.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        if self.load_balancing is not None:
            options.append(("grpc.lb_policy_name", self.load_balancing))
        return options

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


@dataclass(frozen=True)
class StreamResult:
    """One answer on a stream: the request's id and its outputs, or the error it failed with."""

    id: str
    outputs: Outputs | None
    error: SluiceError | None


def build_request(
    model: str,
    inputs: Mapping[str, Input],
    *,
    version: int | None = None,
    outputs: Iterable[str] = (),
    priority: int | None = None,
    request_id: str = "",
) -> pb.PredictRequest:
    """The wire request for one prediction; inputs take every form of `sluice.clients.forms` (arrays,
    strings, {"path"}/{"b64"} files, scipy.sparse matrices, [indices, values, shape])."""
    request = pb.PredictRequest(
        model=model, id=request_id, inputs=[input_tensor(name, value) for name, value in inputs.items()]
    )
    if version is not None:
        request.version = version
    request.outputs.extend(outputs)
    if priority is not None:
        request.parameters["priority"].int64_value = priority
    return request


def _merged(
    inputs: Mapping[str, Input] | str | None,
    named: Mapping[str, Input],
    status: pb.ModelStatus | None = None,
    version: int | None = None,
) -> dict[str, Input]:
    """Positional and keyword inputs as one mapping; Cluster Serving's {"instances": [...]} (a dict or its
    JSON text) becomes one row per instance, its numbers cast to the model's types (from `status`)."""
    if inputs is not None and is_instances(inputs):
        types: dict[str, int] = {}
        if status is not None:
            for served in status.versions:
                if version is None or served.version == version:
                    types = {spec.name: spec.datatype for spec in served.inputs}
                    break
        return {**instances(inputs, types), **named}
    if isinstance(inputs, str):
        raise TypeError(
            'inputs: a str must be the JSON text of {"instances": [...]}; pass arrays as name=array'
        )
    return {**(inputs or {}), **named}


def read_outputs(response: pb.PredictResponse) -> Outputs:
    """The response's tensors as arrays, by name."""
    return {tensor.name: to_array(tensor) for tensor in response.outputs}


def _error(exc: grpc.RpcError) -> SluiceError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return SluiceError(code, details or code.name)


def _with_ids(requests: Iterable[pb.PredictRequest]) -> Iterator[pb.PredictRequest]:
    for position, request in enumerate(requests):
        if not request.id:
            request.id = str(position)
        yield request


async def _with_ids_async(
    requests: AsyncIterable[pb.PredictRequest] | Iterable[pb.PredictRequest],
) -> AsyncIterator[pb.PredictRequest]:
    if not isinstance(requests, AsyncIterable):
        for request in _with_ids(requests):
            yield request
        return
    position = 0
    async for request in requests:
        if not request.id:
            request.id = str(position)
        position += 1
        yield request


def _stream_result(answer: pb.StreamPredictResponse) -> StreamResult:
    if answer.code:
        code = next((c for c in grpc.StatusCode if c.value[0] == answer.code), grpc.StatusCode.UNKNOWN)
        return StreamResult(answer.id, None, SluiceError(code, answer.message, request_id=answer.id))
    return StreamResult(answer.id, read_outputs(answer.response), None)


class _Attempts:
    """The deadline and backoff of one call, shared by both clients: only the sleeping differs."""

    def __init__(self, options: ClientOptions, timeout: float | None) -> None:
        timeout = options.timeout if timeout is None else timeout
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._delays = options.retry.delays()
        self._codes = options.retry.codes

    def left(self) -> float | None:
        """Seconds left for the next attempt (None: no deadline)."""
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def backoff(self, exc: grpc.RpcError) -> float:
        """Seconds to wait before retrying after `exc`; raises it as SluiceError when not to retry."""
        error = _error(exc)
        delay = next(self._delays, None)
        if error.code not in self._codes or delay is None:
            raise error from None
        if self._deadline is not None and time.monotonic() + delay >= self._deadline:
            raise error from None
        return delay


class Client:
    """Blocking client over one channel; use it as a context manager or call `close()`."""

    def __init__(self, target: str, options: ClientOptions | None = None) -> None:
        self.options = options or ClientOptions()
        opts = self.options
        if opts.tls:
            self._channel = grpc.secure_channel(target, opts.credentials(), options=opts.channel_options())
        else:
            self._channel = grpc.insecure_channel(target, options=opts.channel_options())
        self._stub = pb_grpc.InferenceStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Callable[..., T], request: Any, timeout: float | None) -> T:
        attempts = _Attempts(self.options, timeout)
        while True:
            try:
                return method(request, timeout=attempts.left(), metadata=self.options.metadata())
            except grpc.RpcError as exc:
                time.sleep(attempts.backoff(exc))

    def predict(
        self,
        model: str,
        inputs: Mapping[str, Input] | str | None = None,
        /,
        *,
        version: int | None = None,
        outputs: Iterable[str] = (),
        priority: int | None = None,
        timeout: float | None = None,
        **named: Input,
    ) -> Outputs:
        """Runs `model` on inputs (numpy arrays, rows first) and returns its outputs by name.

        Inputs come as keywords (`pixels=array`) or, for names that clash with the keywords here, as a
        mapping in the second argument, which may also be Cluster Serving's {"instances": [{...}, ...]}
        (a dict or its JSON text). Every form of `sluice.clients.forms` is taken.
        """
        status = self.metadata(model, timeout=timeout) if is_instances(inputs) else None
        request = build_request(
            model,
            _merged(inputs, named, status, version),
            version=version,
            outputs=outputs,
            priority=priority,
        )
        return read_outputs(self._call(self._stub.Predict, request, timeout))

    def health(self, model: str = "", *, timeout: float | None = None) -> pb.HealthResponse:
        """The server's state and every model's (or one model's) versions, states and signatures."""
        return self._call(self._stub.Health, pb.HealthRequest(model=model), timeout)

    def metadata(self, model: str, *, timeout: float | None = None) -> pb.ModelStatus:
        """One model's versions, states, inputs and outputs."""
        return self.health(model, timeout=timeout).models[0]

    def stream(
        self, requests: Iterable[pb.PredictRequest], *, timeout: float | None = None
    ) -> Iterator[StreamResult]:
        """Sends many requests on one StreamPredict call; yields each answer as it arrives (any order).

        Answers are matched to requests by id: a request without one gets its position in the stream,
        counted from 0, as its id ("0", "1", ...), set on the request itself.
        """
        timeout = self.options.timeout if timeout is None else timeout
        call = self._stub.StreamPredict(
            _with_ids(requests), timeout=timeout, metadata=self.options.metadata()
        )
        try:
            for answer in call:
                yield _stream_result(answer)
        except grpc.RpcError as exc:
            raise _error(exc) from None


class AsyncClient:
    """asyncio client over one grpc.aio channel; `async with` it, or await `close()`."""

    def __init__(self, target: str, options: ClientOptions | None = None) -> None:
        self.options = options or ClientOptions()
        opts = self.options
        if opts.tls:
            self._channel = grpc.aio.secure_channel(
                target, opts.credentials(), options=opts.channel_options()
            )
        else:
            self._channel = grpc.aio.insecure_channel(target, options=opts.channel_options())
        self._stub = pb_grpc.InferenceStub(self._channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close(None)

    async def _call(self, method: Callable[..., Awaitable[T]], request: Any, timeout: float | None) -> T:
        attempts = _Attempts(self.options, timeout)
        while True:
            try:
                return await method(request, timeout=attempts.left(), metadata=self.options.metadata())
            except grpc.RpcError as exc:
                await asyncio.sleep(attempts.backoff(exc))

    async def predict(
        self,
        model: str,
        inputs: Mapping[str, Input] | str | None = None,
        /,
        *,
        version: int | None = None,
        outputs: Iterable[str] = (),
        priority: int | None = None,
        timeout: float | None = None,
        **named: Input,
    ) -> Outputs:
        """Runs `model` on inputs (numpy arrays, rows first) and returns its outputs by name.

        Inputs come as keywords (`pixels=array`) or, for names that clash with the keywords here, as a
        mapping in the second argument, which may also be Cluster Serving's {"instances": [{...}, ...]}
        (a dict or its JSON text). Every form of `sluice.clients.forms` is taken.
        """
        status = await self.metadata(model, timeout=timeout) if is_instances(inputs) else None
        request = build_request(
            model,
            _merged(inputs, named, status, version),
            version=version,
            outputs=outputs,
            priority=priority,
        )
        return read_outputs(await self._call(self._stub.Predict, request, timeout))

    async def health(self, model: str = "", *, timeout: float | None = None) -> pb.HealthResponse:
        """The server's state and every model's (or one model's) versions, states and signatures."""
        return await self._call(self._stub.Health, pb.HealthRequest(model=model), timeout)

    async def metadata(self, model: str, *, timeout: float | None = None) -> pb.ModelStatus:
        """One model's versions, states, inputs and outputs."""
        return (await self.health(model, timeout=timeout)).models[0]

    async def stream(
        self,
        requests: AsyncIterable[pb.PredictRequest] | Iterable[pb.PredictRequest],
        *,
        timeout: float | None = None,
    ) -> AsyncIterator[StreamResult]:
        """Sends many requests on one StreamPredict call; yields each answer as it arrives (any order).

        Answers are matched to requests by id: a request without one gets its position in the stream,
        counted from 0, as its id ("0", "1", ...), set on the request itself.
        """
        timeout = self.options.timeout if timeout is None else timeout
        call = self._stub.StreamPredict(
            _with_ids_async(requests),
            timeout=timeout,
            metadata=self.options.metadata(),
        )
        try:
            async for answer in call:
                yield _stream_result(answer)
        except grpc.RpcError as exc:
            raise _error(exc) from None
