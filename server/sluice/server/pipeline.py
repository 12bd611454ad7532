"""One servable model version: checks a request against its signature, runs it, builds the response."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from sluice.batcher import CooArray, DeadlineExpiredError
from sluice.server.errors import Code, SluiceError, clip, invalid
from sluice.server.model import LoadedModel
from sluice.server.plugins import Arrays, LoadError, PluginContext, Postprocessor, Preprocessor, TensorSpec
from sluice.server.scheduling import ModelRunner, Scheduler, loop_time
from sluice.server.spin import in_worker
from sluice.v1 import inference_pb2 as pb
from sluice.wire import datatype_of, format_shape, numpy_dtype, type_name

_T = TypeVar("_T")

log = logging.getLogger("sluice.server")


class Servable:
    """A loaded model version with its plugins and scheduler; everything a request needs, computed once."""

    def __init__(
        self,
        model: LoadedModel,
        runner: ModelRunner,
        scheduler: Scheduler,
        max_bytes: int,
        preprocessors: Sequence[tuple[str, Preprocessor]] = (),
        postprocessors: Sequence[tuple[str, Postprocessor]] = (),
    ) -> None:
        self.model = model
        self.name = model.name
        self.version = model.version
        self.version_label = str(model.version)
        """The version as metrics label it."""
        self.runner = runner
        self.scheduler = scheduler
        self.max_bytes = max_bytes
        self.batching = model.max_batch_size > 0
        self.preprocessors = tuple(preprocessors)
        self.postprocessors = tuple(postprocessors)
        inputs: Sequence[TensorSpec] = model.inputs
        for where, pre in reversed(self.preprocessors):
            inputs = _signature(pre.signature, inputs, where)
        outputs: Sequence[TensorSpec] = model.outputs
        for where, post in self.postprocessors:
            outputs = _signature(post.signature, outputs, where)
        self.inputs: tuple[TensorSpec, ...] = tuple(inputs)
        """What callers send: the first preprocessor's inputs, or the model's."""
        self.outputs: tuple[TensorSpec, ...] = tuple(outputs)
        """What callers get: the last postprocessor's outputs, or the model's."""
        self.inputs_by_name = {spec.name: spec for spec in self.inputs}
        self.outputs_by_name = {spec.name: spec for spec in self.outputs}
        own = {spec.name: spec for spec in model.outputs}
        self.labels: dict[str, list[str]] = {
            name: labels
            for name, labels in model.labels.items()
            if self.outputs_by_name.get(name) is own.get(name)
        }
        """Class labels of the outputs that reach callers as the model gave them (a postprocessor's output
        of the same name is another tensor, which the model's labels do not name)."""
        self.output_list = tuple(spec.name for spec in self.outputs)
        """Every output's name, in the signature's order: what a request that names none gets."""
        self._input_list = ", ".join(f"'{s.name}' ({s.describe()})" for s in self.inputs)
        self._plugins = (
            ThreadPoolExecutor(
                max_workers=os.cpu_count() or 2, thread_name_prefix=f"sluice-{self.name}-plugins"
            )
            if self.preprocessors or self.postprocessors
            else None
        )

    async def _in_thread(self, step: Callable[..., _T], deadline: float | None, where: str, *args: Any) -> _T:
        """Runs a plugin step in the plugin pool; the event loop does not spin meanwhile (the step's
        thread needs the core, and the GIL for its Python parts). The request's deadline holds here too:
        a caller whose `timeout` parameter passes while a plugin step is slow is answered then (the step
        goes on in its thread, and its result is discarded)."""
        assert self._plugins is not None
        if deadline is None:
            return await in_worker(self._plugins, self.runner.spin, step, *args)
        started = time.monotonic()
        if deadline <= started:
            raise DeadlineExpiredError(
                f"model '{self.name}': deadline passed {(started - deadline) * 1e3:.1f} ms before {where}"
            )
        try:
            async with asyncio.timeout_at(loop_time(deadline)):
                return await in_worker(self._plugins, self.runner.spin, step, *args)
        except TimeoutError:  # a step's own exceptions reach here as SluiceError (`_call`)
            raise DeadlineExpiredError(
                f"model '{self.name}': deadline expired {(time.monotonic() - started) * 1e3:.1f} ms into "
                f"{where} (the result is discarded)"
            ) from None

    async def infer(
        self,
        inputs: Arrays,
        names: Sequence[str],
        *,
        priority: int = 0,
        deadline: float | None = None,
    ) -> Mapping[str, npt.NDArray[Any]]:
        """Runs one request whose inputs passed `decode_inputs` or `check_inputs`: preprocessing, the batched
        model run and postprocessing; every protocol the server speaks comes through here."""
        if self._plugins is None:
            outputs = await self.scheduler.submit(inputs, priority=priority, deadline=deadline)
        else:
            feeds = inputs
            if self.preprocessors:
                feeds = await self._in_thread(self._preprocess, deadline, "preprocessing", inputs)
            outputs = await self.scheduler.submit(feeds, priority=priority, deadline=deadline)
            if self.postprocessors:
                outputs = await self._in_thread(
                    self._postprocess, deadline, "postprocessing", dict(outputs), feeds
                )
        size = 0
        for name in names:
            size += outputs[name].nbytes
        if size > self.max_bytes:
            raise SluiceError(
                Code.RESOURCE_EXHAUSTED,
                f"the response would carry {size} bytes of outputs, over the max_message_bytes limit of "
                f"{self.max_bytes}; ask for fewer rows or outputs",
            )
        return outputs

    def _preprocess(self, inputs: Arrays) -> Arrays:
        for where, step in self.preprocessors:
            inputs = _call(where, self.name, step, inputs)
        self.check_inputs(inputs, self.model.inputs, "after preprocessing: ")
        return inputs

    def _postprocess(self, outputs: Arrays, feeds: Arrays) -> Arrays:
        for where, step in self.postprocessors:
            outputs = _call(where, self.name, step, outputs, feeds)
        missing = [name for name in self.output_list if name not in outputs]
        if missing:
            log.error("model %s: the postprocessors gave no output %s", self.name, ", ".join(missing))
            raise SluiceError(Code.INTERNAL, f"model '{self.name}': postprocessing gave no {missing[0]!r}")
        return outputs

    def check_inputs(
        self,
        arrays: Mapping[str, npt.NDArray[Any]],
        specs: Sequence[TensorSpec] | None = None,
        prefix: str = "",
    ) -> None:
        """Checks arrays decoded by another protocol front end (or a preprocessor) against a signature:
        the callers' (`self.inputs`) unless `specs` says otherwise. Messages are `decode_inputs`'s."""
        by_name = self.inputs_by_name if specs is None else {s.name: s for s in specs}
        listed = (
            self._input_list if specs is None else ", ".join(f"'{s.name}' ({s.describe()})" for s in specs)
        )
        for name, array in arrays.items():
            spec = by_name.get(name)
            if spec is None:
                raise invalid(f"{prefix}model '{self.name}' has no input '{clip(name)}'; it takes {listed}")
            if isinstance(array, CooArray) != spec.sparse:
                form = "a sparse CooArray" if spec.sparse else "a dense array"
                raise invalid(f"{prefix}input '{name}': expected {form}, got {type(array).__name__}")
            try:
                datatype = datatype_of(array.values if isinstance(array, CooArray) else array)
            except TypeError:
                raise invalid(
                    f"{prefix}input '{name}': expected {spec.describe()}, got numpy {array.dtype}"
                ) from None
            if not spec.takes(datatype) or not spec.accepts(array.shape):
                raise invalid(
                    f"{prefix}input '{name}': expected {spec.describe()}, got {type_name(datatype)} "
                    f"{format_shape(array.shape)}"
                )
        self.check_complete(arrays, by_name, prefix)

    def check_complete(
        self, arrays: Mapping[str, npt.NDArray[Any]], specs: Mapping[str, TensorSpec], prefix: str
    ) -> None:
        if len(arrays) != len(specs):
            missing = [s for s in specs.values() if s.name not in arrays]
            raise invalid(
                prefix + "missing input " + ", ".join(f"'{s.name}': expected {s.describe()}" for s in missing)
            )
        if self.batching:
            if len(arrays) == 1 and next(iter(arrays.values())).shape[0] >= 1:
                return  # the usual case, checked without building anything
            rows = {name: a.shape[0] for name, a in arrays.items()}
            first = next(iter(rows.values()))
            if first < 1:
                name = next(iter(rows))
                raise invalid(
                    f"{prefix}input '{name}': the batch (first) dimension must be at least 1, got 0"
                )
            if any(r != first for r in rows.values()):
                detail = ", ".join(f"'{n}' has {r}" for n, r in rows.items())
                raise invalid(f"{prefix}inputs disagree on the batch (first) dimension: {detail} rows")

    def output_names(self, wanted: Sequence[str]) -> tuple[str, ...]:
        """The outputs a request asked for, each once, in the order asked."""
        names = tuple(dict.fromkeys(wanted))
        for name in names:
            if name not in self.output_list:
                raise invalid(
                    f"model '{self.name}' has no output '{clip(name)}'; it gives "
                    + ", ".join(f"'{n}'" for n in self.output_list)
                )
        return names

    def status(self) -> pb.ModelVersionStatus:
        return pb.ModelVersionStatus(
            version=self.version,
            state=pb.MODEL_STATE_READY,
            inputs=[s.to_proto() for s in self.inputs],
            outputs=[s.to_proto() for s in self.outputs],
            max_batch_size=self.model.max_batch_size,
            providers=self.model.providers,
        )

    def warm_up(self, context: PluginContext, *, calibrate: bool = True) -> None:
        """Runs the config's example requests through the whole pipeline on every instance (or, with none
        listed, inputs synthesized from the model's signature), so a model that cannot run fails at load;
        then, unless told not to, measures the model's run time for the runner."""
        synthesized = {spec.name: _example(spec) for spec in self.model.inputs}
        examples = context.config.warmup
        for index, example in enumerate(examples):
            where = f"warmup[{index}]"
            arrays = {name: _warmup_value(value, self.inputs_by_name.get(name), context, f"{where}.{name}")
                      for name, value in example.items()}  # fmt: skip
            try:
                self.check_inputs(arrays)
                feeds = self._preprocess(arrays)
            except SluiceError as exc:
                raise LoadError(f"{where}: {exc.message}") from None
            self._warm(feeds, where)
        if not examples:
            self._warm(synthesized, "warm-up")
        if calibrate:
            self.runner.calibrate(synthesized)

    def _warm(self, feeds: Arrays, where: str) -> None:
        for instance in range(self.model.instances):
            try:
                outputs = dict(self.model.run(instance, feeds))
            except Exception as exc:
                raise LoadError(f"{where}: the model failed on instance {instance}: {exc}") from exc
            try:
                self._postprocess(outputs, feeds)
            except SluiceError as exc:
                raise LoadError(f"{where}: postprocessing failed: {exc.message}") from None

    def close(self) -> None:
        self.runner.close()
        self.model.close()
        if self._plugins is not None:
            self._plugins.shutdown(wait=False, cancel_futures=True)


def _call(where: str, model: str, step: Any, *args: Arrays) -> Arrays:
    """Runs one plugin step: its PluginError reaches the caller, anything else is logged and INTERNAL."""
    try:
        result = step(*args)
    except SluiceError:
        raise
    except Exception:
        log.exception("model %s: %s failed", model, where)
        raise SluiceError(
            Code.INTERNAL, f"model '{model}': {where} failed; the server log has the details"
        ) from None
    if not isinstance(result, dict):
        log.error("model %s: %s returned %s, not a dict of arrays", model, where, type(result).__name__)
        raise SluiceError(Code.INTERNAL, f"model '{model}': {where} failed; the server log has the details")
    return result


def _signature(
    signature: Callable[[Sequence[TensorSpec]], Sequence[TensorSpec]], given: Sequence[TensorSpec], where: str
) -> tuple[TensorSpec, ...]:
    """Asks one plugin for its signature; its failures name it, as constructor failures do."""
    try:
        specs = signature(given)
    except LoadError as exc:
        raise LoadError(f"{where}: {exc}") from None
    except Exception as exc:
        raise LoadError(f"{where}: signature() raised {type(exc).__name__}: {exc}") from exc
    if not specs or not all(isinstance(s, TensorSpec) for s in specs):
        raise LoadError(f"{where}: signature() must return a non-empty sequence of TensorSpec, got {specs!r}")
    return tuple(specs)


def _warmup_value(
    value: Any, spec: TensorSpec | None, context: PluginContext, where: str
) -> npt.NDArray[Any]:
    """An example input from config.toml as an array shaped like `spec` (a batch of one when it batches)."""
    if spec is None:
        raise LoadError(f"{where}: the model takes no input of that name")
    if isinstance(value, dict):
        if set(value) == {"file"}:
            path = context.resolve(value["file"])
            try:
                value = np.array([path.read_bytes()], dtype=object)
            except OSError as exc:
                raise LoadError(
                    f"{where}: cannot read {context.display(path)}: {exc.strerror or exc}"
                ) from None
        elif set(value) == {"npy"}:
            path = context.resolve(value["npy"])
            try:
                value = np.load(path, allow_pickle=False)
            except OSError as exc:
                raise LoadError(
                    f"{where}: cannot read {context.display(path)}: {exc.strerror or exc}"
                ) from None
            except ValueError as exc:
                raise LoadError(f"{where}: cannot read {context.display(path)}: {exc}") from None
        else:
            raise LoadError(f"{where}: expected a value, {{ file = PATH }} or {{ npy = PATH }}, got {value}")
    dtype = object if spec.dtype is None else spec.dtype
    try:
        array = np.asarray(value, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise LoadError(f"{where}: cannot be read as {spec.describe()}: {exc}") from None
    while array.ndim < len(spec.shape):
        array = array[np.newaxis]
    return array


def _example(spec: TensorSpec) -> npt.NDArray[np.generic]:
    shape = tuple(1 if d == -1 else d for d in spec.shape)
    if spec.sparse:
        dtype = object if spec.dtype is None else spec.dtype
        empty = CooArray(np.empty((0, len(shape)), dtype=np.int64), np.empty(0, dtype=dtype), shape)
        return empty  # type: ignore[return-value]
    if spec.datatype == pb.DATA_TYPE_STRING:
        return np.full(shape, "", dtype=object)
    if spec.datatype == pb.DATA_TYPE_BYTES:
        return np.full(shape, b"", dtype=object)
    return np.zeros(shape, dtype=numpy_dtype(spec.datatype))
