"""Plugins for Sluice's own tests: ones that fail on purpose, and ones that report the thread they ran in.

- `faulty` (a preprocessor and a postprocessor): passes tensors through, until one holds the `trigger`
  value; then it raises `PluginError` (mode "plugin_error": the caller gets `code` and `message`) or a
  plain exception (mode "crash": the caller gets INTERNAL, the log gets the traceback), or waits for a test
  to set `HOLD` (mode "hold": a slow step).
- `record_thread` (a preprocessor and a postprocessor): writes the name of the thread it runs in into a
  STRING [rows] tensor, so a test can see that plugins do not run on the event loop.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Literal

import grpc
import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, field_validator

from sluice.server.plugins import Arrays, LoadError, PluginContext, PluginError, TensorSpec

SECRET = "do-not-show-callers-this"
"""Part of the message of a crash: a test checks that it reaches the log and never a caller."""

HOLD = threading.Event()
"""What a `faulty` step in mode "hold" waits for (at most 30 s) once its trigger shows; tests set it."""


class FaultyOptions(BaseModel):
    """`{ name = "faulty", mode = "crash", trigger = 13 }`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["plugin_error", "crash", "hold"]
    trigger: float = Field(description="The value that sets it off, anywhere in a tensor it is given.")
    code: str = Field(default="INVALID_ARGUMENT", description="gRPC status name for mode plugin_error.")
    message: str = Field(default="the faulty plugin was triggered", min_length=1)

    @field_validator("code")
    @classmethod
    def _status(cls, value: str) -> str:
        if value not in grpc.StatusCode.__members__ or value == "OK":
            raise ValueError(f"not a gRPC error status: {value}")
        return value


class _Faulty:
    Options = FaultyOptions

    def __init__(self, options: FaultyOptions, context: PluginContext) -> None:
        self.options = options

    def _check(self, arrays: Arrays) -> None:
        for array in arrays.values():
            if array.dtype.kind in "biuf" and bool(np.any(array == self.options.trigger)):
                if self.options.mode == "hold":
                    HOLD.wait(30)
                    return
                if self.options.mode == "plugin_error":
                    raise PluginError(self.options.message, grpc.StatusCode[self.options.code])
                _crash()


def _crash() -> None:
    raise RuntimeError(f"faulty plugin crashed ({SECRET})")


class FaultyPreprocessor(_Faulty):
    """Preprocessor: the inputs of the next step, unchanged, unless one holds `trigger`."""

    def signature(self, downstream: Sequence[TensorSpec]) -> Sequence[TensorSpec]:
        return downstream

    def __call__(self, inputs: Arrays) -> Arrays:
        self._check(inputs)
        return inputs


class FaultyPostprocessor(_Faulty):
    """Postprocessor: the outputs of the step before, unchanged, unless one holds `trigger`."""

    def signature(self, upstream: Sequence[TensorSpec]) -> Sequence[TensorSpec]:
        return upstream

    def __call__(self, outputs: Arrays, inputs: Arrays) -> Arrays:
        self._check(outputs)
        return outputs


class RecordThreadOptions(BaseModel):
    """`{ name = "record_thread", into = "thread" }`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    into: str = Field(default="thread", min_length=1, description="The STRING [rows] tensor to write.")


def _thread_names(arrays: Arrays) -> npt.NDArray[np.object_]:
    rows = next(iter(arrays.values())).shape[0]
    return np.full(rows, threading.current_thread().name, dtype=object)


class RecordThreadPreprocessor:
    """Preprocessor: fills the model's STRING [rows] input `into`, which callers then do not send."""

    Options = RecordThreadOptions

    def __init__(self, options: RecordThreadOptions, context: PluginContext) -> None:
        self.into = options.into

    def signature(self, downstream: Sequence[TensorSpec]) -> Sequence[TensorSpec]:
        rest = [spec for spec in downstream if spec.name != self.into]
        if len(rest) == len(downstream) or not rest:
            raise LoadError(
                f"record_thread: the next step must take '{self.into}' and at least one more input"
            )
        return rest

    def __call__(self, inputs: Arrays) -> Arrays:
        return {**inputs, self.into: _thread_names(inputs)}


class RecordThreadPostprocessor:
    """Postprocessor: adds the STRING [rows] output `into`."""

    Options = RecordThreadOptions

    def __init__(self, options: RecordThreadOptions, context: PluginContext) -> None:
        self.into = options.into

    def signature(self, upstream: Sequence[TensorSpec]) -> Sequence[TensorSpec]:
        return [*upstream, TensorSpec.of(self.into, "STRING", [-1])]

    def __call__(self, outputs: Arrays, inputs: Arrays) -> Arrays:
        return {**outputs, self.into: _thread_names(outputs)}
