"""The per-model scheduling seam: every inference goes through a `Scheduler`, batching or not."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np
import numpy.typing as npt

from sluice.batcher import (
    Batcher,
    BatcherClosedError,
    BatcherConfig,
    BatchObserver,
    DeadlineExpiredError,
    ModelRunError,
    PadSpec,
    QueueFullError,
)
from sluice.server.runtime import OnnxModel

Arrays = dict[str, npt.NDArray[np.generic]]


class Scheduler(Protocol):
    """Runs requests on a model; the servicer knows nothing more of how."""

    def start(self) -> None: ...

    async def submit(
        self,
        inputs: Mapping[str, npt.NDArray[np.generic]],
        *,
        priority: int = 0,
        deadline: float | None = None,
    ) -> Mapping[str, npt.NDArray[np.generic]]: ...

    async def drain(self, grace: float) -> None: ...


class ModelRunner:
    """Runs batches of one model version in worker threads, one thread per instance.

    ONNX Runtime releases the GIL while it computes, so the event loop keeps serving while a batch runs.
    """

    def __init__(self, model: OnnxModel) -> None:
        self.model = model
        self.executor = ThreadPoolExecutor(
            max_workers=len(model.sessions), thread_name_prefix=f"sluice-{model.name}-{model.version}"
        )

    async def run(self, instance: int, feeds: Mapping[str, npt.NDArray[np.generic]]) -> Arrays:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self.model.run, instance, feeds)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def make_scheduler(runner: ModelRunner, observer: BatchObserver) -> Scheduler:
    """A batcher for models with a batch dimension, a plain concurrency limit for the others."""
    model = runner.model
    config = model.config
    instances = len(model.sessions)
    if model.max_batch_size == 0:
        queue = config.batching.max_queue_rows or 32 * instances
        return DirectScheduler(runner, max_queued=queue, name=model.name)
    pad = {
        spec.name: (PadSpec(axis=o.pad.axis, dim=o.pad.dim, value=o.pad.value),)
        for spec in model.inputs
        if (o := config.inputs.get(spec.graph_name)) is not None and o.pad is not None
    }
    crop = {
        spec.name: ((o.crop.axis, o.crop.dim),)
        for spec in model.outputs
        if (o := config.outputs.get(spec.graph_name)) is not None and o.crop is not None
    }
    batching = BatcherConfig(
        max_batch_size=model.max_batch_size,
        max_delay=config.batching.max_delay_ms / 1000,
        max_queue_rows=config.batching.max_queue_rows or 32 * model.max_batch_size * instances,
        instances=instances,
        policy=config.batching.policy,
        pad=pad,
        crop=crop,
    )
    return Batcher(runner.run, batching, name=model.name, observer=observer)


class DirectScheduler:
    """For models without a batch dimension: each request is one run, at most one per instance at a time."""

    def __init__(self, runner: ModelRunner, *, max_queued: int, name: str) -> None:
        self._runner = runner
        self._name = name
        self._max_queued = max_queued
        self._free = list(range(len(runner.model.sessions)))
        self._ready = asyncio.Condition()
        self._waiting = 0
        self._running = 0
        self._closed = False

    def start(self) -> None:
        """Nothing to start: runs happen in the callers' tasks."""

    async def submit(
        self,
        inputs: Mapping[str, npt.NDArray[np.generic]],
        *,
        priority: int = 0,
        deadline: float | None = None,
    ) -> Mapping[str, npt.NDArray[np.generic]]:
        if self._closed:
            raise BatcherClosedError(f"model '{self._name}': the server is shutting down")
        if self._waiting >= self._max_queued:
            raise QueueFullError(
                f"model '{self._name}': queue full ({self._waiting} requests waiting, "
                f"limit max_queue_rows={self._max_queued})"
            )
        timeout = None if deadline is None else deadline - time.monotonic()
        self._waiting += 1
        try:
            async with asyncio.timeout(timeout), self._ready:
                await self._ready.wait_for(lambda: bool(self._free))
                instance = self._free.pop()
        except TimeoutError:
            raise DeadlineExpiredError(f"model '{self._name}': the deadline passed while queued") from None
        finally:
            self._waiting -= 1
        self._running += 1
        try:
            return await self._runner.run(instance, inputs)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise ModelRunError(f"model '{self._name}' failed: {type(exc).__name__}: {exc}") from exc
        finally:
            self._running -= 1
            self._free.append(instance)
            async with self._ready:
                self._ready.notify_all()

    async def drain(self, grace: float) -> None:
        self._closed = True
        try:
            async with asyncio.timeout(grace), self._ready:
                await self._ready.wait_for(lambda: self._running == 0 and self._waiting == 0)
        except TimeoutError:
            pass  # What is still running is cancelled with its RPC when the gRPC server stops.
