"""The data plane: everything between a protocol's codec and the model, written once for every door.

A door (sluice.v1 gRPC, KServe gRPC, KServe REST) turns its messages into an `InferRequest` of neutral
`WireTensor`s and hands it to `DataPlane.infer`, which looks the model up, checks and decodes the inputs
against its signature, runs the pipeline (preprocessing, the batcher, postprocessing) and returns the arrays
of an `InferResult` for the door to encode. Admission (the server's phase and its in-flight budget), timing
and counting live here too, so a door is a codec plus the shared handler skeleton of its transport. Nothing
here imports a protocol: statuses are `errors.Code`.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from sluice.batcher import CooArray
from sluice.server.errors import Code, clip, exhausted, invalid, unavailable
from sluice.server.metrics import Metrics
from sluice.server.pipeline import Servable
from sluice.server.plugins import TensorSpec
from sluice.server.repository import ModelRepository, State
from sluice.server.spin import Calls, LoneRuns, LoopSpin
from sluice.server.tensors import densify, sparse_parts
from sluice.v1 import inference_pb2 as pb
from sluice.wire import NUMERIC, VARIABLE, decode, element_count, format_shape, type_name

log = logging.getLogger("sluice.server")

_ANSWERED_BY: contextvars.ContextVar[str] = contextvars.ContextVar("answered_by", default="")
"""The version a call resolved, for `count`'s version label: each call (and stream message) runs in a task of
its own, so the door's skeleton need not carry it."""

_NAMES = {code: code.name for code in Code}
"""Each status's name, looked up rather than read from the enum per call."""

ANY_VARIABLE = -1
"""A `WireTensor.datatype` for KServe's BYTES: the input's own STRING or BYTES, whichever it declares."""


SHUTTING_DOWN = "the server is shutting down; retry on another replica"
"""What a call refused by a stopping server is told, on every door."""


class Stoppable(Protocol):
    """An open stream, as the data plane sees it."""

    def stop(self) -> None: ...


class Phase(enum.Enum):
    """Where the server is in its life."""

    STARTING = "starting"
    """Models are loading; requests for ready models are answered."""
    SERVING = "serving"
    DRAINING = "draining"
    """A stop was asked for: readiness probes fail, requests are still answered (the drain delay)."""
    CLOSING = "closing"
    """New calls get UNAVAILABLE; calls already accepted are finished within the grace period."""


@dataclass(slots=True)
class WireTensor:
    """One input as a door decoded it from its message, before any check against the model."""

    name: str
    datatype: int
    """A sluice.v1 DataType value, or ANY_VARIABLE."""
    shape: tuple[int, ...]
    label: str = ""
    """The data type as the caller named it, for messages ("FP64", "BYTES"); empty: `datatype`'s name."""
    raw: bytes | None = None
    """Raw little-endian contents (length-prefixed for STRING and BYTES)."""
    field: str = "raw_contents"
    """Where `raw` came from, for messages."""
    contents: Sequence[Any] | None = None
    """Typed values in row-major order instead of `raw` (KServe's typed contents, JSON data)."""
    contents_field: str = "contents"
    """Where `contents` came from, for messages."""
    contents_hint: str = ""
    """Appended to a message about `contents` (what else the request filled, say)."""
    contents_bytes: int = 0
    """What `contents` weighed on the wire, for the size limit."""
    sparse: tuple[bytes, bytes] | None = None
    """COO indices (INT64 [nnz, rank]) and values, instead of `raw`."""


@dataclass(slots=True)
class InferRequest:
    """One inference request, whatever door it came through."""

    model: str
    version: int | None
    id: str
    inputs: Sequence[WireTensor]
    outputs: Sequence[str] = ()
    """Outputs asked for, in order; empty for all of them."""
    priority: int = 0
    timeout: float | None = None
    """Seconds the caller allows, from a request parameter (the transport's deadline is separate)."""


@dataclass(slots=True)
class InferResult:
    """The answer to an InferRequest: the servable that answered and the outputs asked for, in order."""

    servable: Servable
    id: str
    outputs: list[tuple[str, npt.NDArray[Any]]]


@dataclass(frozen=True, slots=True)
class Limits:
    """The server's own bounds, checked before any work is done for a call."""

    max_bytes: int
    """max_message_bytes: the tensors of one request, and the outputs of one response."""
    max_inflight: int
    """Unary calls and stream messages being answered at once."""
    max_streams: int
    """Streams open at once."""
    stream_window: int = 256
    """Messages of one stream read but not yet answered and sent."""


class DataPlane:
    """Model lookup, admission, input checks, the pipeline, and counting, for every door."""

    def __init__(
        self,
        repository: ModelRepository,
        metrics: Metrics,
        limits: Limits,
        spin: LoopSpin | None = None,
        lone: LoneRuns | None = None,
        calls: Calls | None = None,
    ) -> None:
        """`spin`, when given, keeps the event loop polling for the next request for a while after the
        last one in flight is answered. `lone`, when given, learns from it whether callers are lone.
        `calls` counts the gRPC calls alive (the doors tell it; the adaptive batchers read it)."""
        self.repository = repository
        self.metrics = metrics
        self.limits = limits
        self.phase = Phase.STARTING
        self.inflight = 0
        self.streams = 0
        self._idle: asyncio.Event | None = None
        self._open: set[Stoppable] = set()
        self._cutting = False
        self.last_arrival = 0.0
        """When the last call, stream or stream message arrived (time.monotonic())."""
        self._spin = spin
        self._lone = lone
        if lone is not None:
            lone.requests = lambda: self.inflight
        self.calls = calls if calls is not None else Calls()
        """gRPC calls alive: a crowd the count in flight does not see (see Calls)."""

    # -- the server's state ---------------------------------------------------------------------------

    def close(self) -> None:
        """Refuses new calls and stream messages from now on (UNAVAILABLE); open streams stay open, so a
        message sent on one is refused in-band, until `cut_streams`."""
        self.phase = Phase.CLOSING

    def cut_streams(self) -> None:
        """Stops reading every open stream: once the messages already read are answered, each ends with
        UNAVAILABLE (the last step of a shutdown)."""
        self._cutting = True
        for stream in list(self._open):
            stream.stop()

    def track(self, stream: Stoppable) -> None:
        """Registers an open stream, so that `close()` stops reading it."""
        self._open.add(stream)
        if self._cutting:
            stream.stop()

    def untrack(self, stream: Stoppable) -> None:
        self._open.discard(stream)

    def live(self) -> bool:
        """Whether the process should be left running (it is, until a stop was asked for)."""
        return self.phase in (Phase.STARTING, Phase.SERVING)

    def ready(self) -> bool:
        """Whether to send traffic here: serving, and every model of the repository ready (models unloaded
        on purpose do not count: nobody expects them to answer)."""
        states = [s for s in self.repository.states().values() if s != State.UNLOADED]
        return self.phase is Phase.SERVING and bool(states) and all(s == State.READY for s in states)

    # -- admission ------------------------------------------------------------------------------------

    def enter(self) -> None:
        """Admits one unary call or stream message, or refuses it before any of it is decoded."""
        self.last_arrival = now = time.monotonic()
        if self.phase is Phase.CLOSING:
            raise unavailable(SHUTTING_DOWN)
        if self.inflight >= self.limits.max_inflight:
            self.metrics.count_overload("max_inflight")
            raise exhausted(
                f"the server is answering its limit of {self.limits.max_inflight} requests at once "
                "(max_inflight, SLUICE_MAX_INFLIGHT); retry with backoff or on another replica"
            )
        self.inflight += 1
        if self.inflight == 1:
            if self._spin is not None:
                self._spin.arrived(now)
        elif self.inflight == 2:
            self.calls.crowd_at = now  # any door's: a stream's messages, REST requests
            if self._spin is not None:
                self._spin.crowded(now)
            if self._lone is not None:
                self._lone.crowded()

    def call_began(self, now: float) -> None:
        """A unary gRPC call started at `now`; the door tells `calls` when gRPC is done with it. (A stream
        is not counted: one left open would make every call beside it look crowded. Its messages count as
        requests in flight.)"""
        if self.calls.began(now) and self._spin is not None:
            self._spin.crowded(now)

    def leave(self) -> None:
        """One admitted call or stream message has its answer."""
        self.inflight -= 1
        if self.inflight == 0:
            if self._idle is not None:
                self._idle.set()
            if self._spin is not None:
                self._spin.idle(time.monotonic())

    def open_stream(self) -> None:
        """Admits one stream, or refuses it."""
        self.last_arrival = time.monotonic()
        if self.phase is Phase.CLOSING:
            raise unavailable(SHUTTING_DOWN)
        if self.streams >= self.limits.max_streams:
            self.metrics.count_overload("max_streams")
            raise exhausted(
                f"the server has its limit of {self.limits.max_streams} streams open "
                "(max_streams, SLUICE_MAX_STREAMS); retry with backoff or on another replica"
            )
        self.streams += 1

    def close_stream(self) -> None:
        self.streams -= 1

    async def idle(self, within: float) -> bool:
        """Waits up to `within` s until no admitted call or message is left unanswered."""
        if self.inflight == 0:
            return True
        self._idle = asyncio.Event()
        try:
            async with asyncio.timeout(max(0.0, within)):
                await self._idle.wait()
        except TimeoutError:
            return False
        finally:
            self._idle = None
        return True

    async def quiet(self, gap: float, until: float) -> None:
        """Waits until no call has arrived for `gap` s, or until `until` (time.monotonic()).

        A caller refused with UNAVAILABLE goes elsewhere; one whose call is still in flight inside gRPC
        when its server stops would see CANCELLED. So a stopping server goes on refusing until callers
        have gone quiet.
        """
        while (now := time.monotonic()) < until:
            left = self.last_arrival + gap - now
            if left <= 0:
                return
            await asyncio.sleep(min(left, until - now))

    # -- the request path -----------------------------------------------------------------------------

    def resolve(self, name: str, version: int | None) -> Servable:
        """The servable a request names; NOT_FOUND or UNAVAILABLE with a reason otherwise."""
        return self.repository.resolve(name, version)

    async def infer(
        self,
        request: InferRequest,
        deadline: float | None,
        describe: Callable[[TensorSpec], str] = TensorSpec.describe,
    ) -> InferResult:
        """Answers one request; raises SluiceError, WireError or a batcher error for `to_status`.

        `deadline` is the transport's (time.monotonic()); `describe` words a signature the door's way.
        """
        if self.phase is Phase.CLOSING:
            raise unavailable(SHUTTING_DOWN)
        repository = self.repository
        servable = repository.resolve(request.model, request.version)
        _ANSWERED_BY.set(servable.version_label)
        # Held from lookup to answer: a version being unloaded waits for this request before it is freed.
        repository.hold(servable)
        try:
            arrays = decode_inputs(servable, request.inputs, describe)
            names = servable.output_names(request.outputs) if request.outputs else servable.output_list
            if request.timeout is not None:
                ends = time.monotonic() + request.timeout
                deadline = ends if deadline is None else min(deadline, ends)
            outputs = await servable.infer(arrays, names, priority=request.priority, deadline=deadline)
        finally:
            repository.release(servable)
        return InferResult(servable, request.id, [(name, outputs[name]) for name in names])

    def count(self, model: str, method: str, code: Code, started: float) -> None:
        """Counts one answered call; unknown model names are not labels (a caller must not grow metrics)."""
        label = model if model in self.repository.models else ""
        version = _ANSWERED_BY.get()
        if version:
            _ANSWERED_BY.set("")
        self.metrics.count_request(label, version, method, _NAMES[code], time.monotonic() - started)


def decode_inputs(
    servable: Servable, tensors: Sequence[WireTensor], describe: Callable[[TensorSpec], str]
) -> dict[str, npt.NDArray[Any]]:
    """Checks every input against the servable's signature and views it as an array.

    This runs for every request, so the common case (a dense numeric tensor with raw contents) is checked
    inline; anything unusual goes through `sluice.wire`, which also words the errors. The request's bytes
    are counted against max_message_bytes before anything is decoded.
    """
    arrays: dict[str, npt.NDArray[Any]] = {}
    specs = servable.inputs_by_name
    limit = servable.max_bytes
    size = 0
    for tensor in tensors:
        name = tensor.name
        spec = specs.get(name)
        if spec is None:
            takes = ", ".join(f"'{s.name}' ({describe(s)})" for s in servable.inputs)
            raise invalid(
                f"model '{servable.name}' has no input '{clip(name)}'; it takes {takes}"
                if name
                else f"an input tensor has no name; model '{servable.name}' takes {takes}"
            )
        if name in arrays:
            raise invalid(f"input '{name}' is given twice")
        datatype = tensor.datatype
        if datatype == ANY_VARIABLE:
            datatype = spec.datatype if spec.datatype in VARIABLE else pb.DATA_TYPE_BYTES
        shape = tensor.shape
        if (datatype != spec.datatype and not spec.takes(datatype)) or not spec.accepts(shape):
            got = tensor.label or type_name(tensor.datatype)
            raise invalid(f"input '{name}': expected {describe(spec)}, got {got} {format_shape(shape)}")
        raw = tensor.raw
        sparse = tensor.sparse
        dtype = spec.dtype
        if sparse is not None:
            size += len(sparse[0]) + len(sparse[1])
        elif raw is not None:
            size += len(raw)
            if (
                dtype is not None
                and size <= limit
                and not spec.sparse
                and len(raw) == math.prod(shape) * dtype.itemsize
                and min(shape, default=0) >= 0
            ):
                arrays[name] = np.frombuffer(raw, dtype=dtype).reshape(shape)
                continue
        else:
            size += tensor.contents_bytes
        if size > limit:
            raise exhausted(
                f"the request carries more than {limit} bytes of tensors, over the server's "
                "max_message_bytes limit (SLUICE_MAX_MESSAGE_BYTES)"
            )
        what = f"input '{name}'"
        array: npt.NDArray[Any]
        if sparse is not None:
            if raw:
                raise invalid(f"{what}: set either raw_contents or sparse, not both")
            indices, values = sparse_parts(*sparse, datatype, shape, what)
            if spec.sparse:
                arrays[name] = CooArray(indices, values, shape)  # type: ignore[assignment]
                continue
            array = densify(indices, values, datatype, shape, what, limit)
        elif raw is not None:
            array = decode(raw, datatype, shape, what, tensor.field)
        elif tensor.contents is not None:
            array = from_contents(
                tensor.contents,
                tensor.contents_field,
                datatype,
                shape,
                what,
                hint=tensor.contents_hint,
                label=tensor.label,
            )
        else:
            array = decode(b"", datatype, shape, what)
        arrays[name] = CooArray.from_dense(array) if spec.sparse else array  # type: ignore[assignment]
    if len(arrays) != len(specs) or servable.batching:
        servable.check_complete(arrays, specs, "")
    return arrays


def integer_parameter(name: str, value: object) -> int:
    """A request parameter that must be an integer (priority, timeout), as any door decoded it; the
    message quotes the value sent, whatever the protocol's way of typing it."""
    if not isinstance(value, int) or isinstance(value, bool):
        shown = json.dumps(value) if isinstance(value, str | float | bool) or value is None else repr(value)
        raise invalid(f"parameter '{name}': expected an integer, got {clip(shown)}")
    return value


def timeout_parameter(value: object) -> float:
    """The `timeout` parameter (microseconds, as Triton's clients send it) in seconds."""
    micros = integer_parameter("timeout", value)
    if micros < 0:
        raise invalid(f"parameter 'timeout': expected microseconds >= 0, got {micros}")
    return micros / 1e6


# What typed contents are read as before the range check and the cast to the input's own dtype.
_WIDE = {
    "b": np.dtype(np.bool_),
    "i": np.dtype(np.int64),
    "u": np.dtype(np.uint64),
    "f": np.dtype(np.float64),
}


def from_contents(
    values: Sequence[Any],
    where: str,
    datatype: int,
    shape: tuple[int, ...],
    what: str,
    *,
    hint: str = "",
    label: str = "",
) -> npt.NDArray[Any]:
    """Typed values (flat, row-major) as an array; their count is checked before anything is converted.

    `label` is the data type as the caller named it, for messages."""
    count = element_count(shape, what)
    kind = f"{label or type_name(datatype)} {format_shape(shape)}"
    if len(values) != count:
        raise invalid(f"{what}: {kind} needs {count} values in {where}, got {len(values)}{hint}")
    if datatype in VARIABLE:
        text = datatype == pb.DATA_TYPE_STRING
        out = np.empty(count, dtype=object)
        for i, item in enumerate(values):
            if text and isinstance(item, bytes):
                try:
                    item = item.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise invalid(f"{what}: element {i} is not valid UTF-8 text ({exc.reason})") from None
            elif not text and isinstance(item, str):
                item = item.encode("utf-8")
            if not isinstance(item, str | bytes):
                raise invalid(f"{what}: element {i} must be a string, got {type(item).__name__}")
            out[i] = item
        return out.reshape(shape)
    dtype = NUMERIC[datatype]
    try:
        wide = np.asarray(values, dtype=_WIDE[dtype.kind])
    except (TypeError, ValueError, OverflowError):
        raise invalid(f"{what}: the values in {where} are not all {type_name(datatype)} numbers") from None
    if wide.ndim != 1:
        raise invalid(f"{what}: the values in {where} must be a flat list of numbers")
    # 8- and 16-bit types travel in wider fields: refuse what does not fit.
    if dtype.kind in "iu" and wide.size:
        info = np.iinfo(dtype.str)
        low, high = wide.min(), wide.max()
        if low < info.min or high > info.max:
            bad = low if low < info.min else high
            raise invalid(f"{what}: value {bad} in {where} does not fit {type_name(datatype)}")
    return wide.astype(dtype).reshape(shape)
