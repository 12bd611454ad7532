"""A loaded model version as the server sees it: a runtime plugin, plus the batching facts derived from it.

The config's `inputs.NAME` and `outputs.NAME` tables rename and constrain what the runtime declares here, once
for every runtime (`onnx`, `python` or a third-party one), so a runtime only ever sees its own names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy.typing as npt

from sluice.server.config import ModelConfig, TensorConfig
from sluice.server.plugins import LoadError, PluginContext, Runtime, TensorSpec, build
from sluice.server.tensors import format_shape


class LoadedModel:
    """Wraps a runtime plugin: checks what it declares, applies the config's overrides to it, and decides the
    rows per run from the config."""

    def __init__(self, runtime: Runtime, context: PluginContext) -> None:
        self.runtime = runtime
        self.name = context.model
        self.version = context.version
        self.config: ModelConfig = context.config
        where = f"runtime '{context.config.runtime.name}'"
        declared_inputs = _checked(getattr(runtime, "inputs", None), f"{where} inputs")
        declared_outputs = _checked(getattr(runtime, "outputs", None), f"{where} outputs")
        self.inputs: tuple[TensorSpec, ...] = _overridden(declared_inputs, self.config.inputs, "inputs")
        """What the model takes under its public names; `graph_name` is the runtime's own name."""
        self.outputs: tuple[TensorSpec, ...] = _overridden(declared_outputs, self.config.outputs, "outputs")
        # Renaming costs a dict per run, so only models whose config renames something pay it.
        self._feed_names = _renames(self.inputs)
        self._result_names = _renames(self.outputs)
        sparse = [s.name for s in self.outputs if s.sparse]
        if sparse:
            raise LoadError(f"{where} outputs: {', '.join(sparse)} declared sparse; outputs are dense arrays")
        self._where = where
        self.instances = self.loaded_instances = self._instances()
        """Runs that may go at once; `loaded_instances` is the count before `tune` (elastic threads run more
        batches at once, not more rows per second, so the queue's default size stays based on it)."""
        providers = getattr(runtime, "providers", ["unknown"])
        self.providers: list[str] = [providers] if isinstance(providers, str) else [str(p) for p in providers]
        self._threads = context.threads
        self.spins_after_runs = self._spins_after_runs()
        """Whether the runtime's pool threads go on spinning for a while after a run ends (they keep a core
        busy then, so the event loop should not spin beside them); read once per run, so kept, not asked."""
        self.max_batch_size = _batch_size(self.inputs, self.outputs, context.config)
        self.labels: dict[str, list[str]] = _labels(self.outputs, self.config.outputs, context)
        """Class labels by public output name, from `outputs.NAME.labels` (Triton's classification)."""

    @property
    def threads(self) -> int:
        """Threads one instance computes with, as the runtime reports it (for the log)."""
        threads = getattr(self.runtime, "threads", self._threads)
        return threads if isinstance(threads, int) else self._threads

    @property
    def loop_safe(self) -> bool:
        """Whether the runtime's runs end on their own (no waiting on events, I/O or other requests), so a
        lone caller's run may compute on the event loop (see sluice.server.spin.LoneRuns)."""
        return bool(getattr(self.runtime, "loop_safe", False))

    @property
    def spinning(self) -> bool:
        """Whether the runtime's pool threads spin between parallel sections (for the log)."""
        return bool(getattr(self.runtime, "spinning", False))

    def _spins_after_runs(self) -> bool:
        return bool(getattr(self.runtime, "spins_after_runs", False))

    def _instances(self) -> int:
        instances = getattr(self.runtime, "instances", 1)
        if not isinstance(instances, int) or instances < 1:
            raise LoadError(f"{self._where}: instances must be an int >= 1, got {instances!r}")
        return instances

    def tune(self, inline: bool) -> bool:
        """Tells the runtime whether one-row batches run on the event loop (its optional `tune` hook).

        Called once at load, after calibration; True means the runtime changed how it runs (the `onnx`
        runtime stops spinning, or starts elastic threads), so the caller warms and measures the model
        again, and makes its scheduler again if `instances` changed.
        """
        tune = getattr(self.runtime, "tune", None)
        if tune is None or not tune(inline):
            return False
        self.instances = self._instances()
        self.spins_after_runs = self._spins_after_runs()
        return True

    def run(self, instance: int, feeds: Mapping[str, npt.NDArray[Any]]) -> Mapping[str, npt.NDArray[Any]]:
        if self._feed_names is not None:
            feeds = {graph: feeds[public] for public, graph in self._feed_names}
        results = self.runtime.run(instance, feeds)
        if self._result_names is not None:
            results = {public: results[graph] for public, graph in self._result_names}
        return results

    def close(self) -> None:
        close = getattr(self.runtime, "close", None)
        if close is not None:
            close()

    def describe(self) -> str:
        inputs = ", ".join(f"{s.name}:{s.describe()}" for s in self.inputs)
        outputs = ", ".join(f"{s.name}:{s.describe()}" for s in self.outputs)
        return f"inputs=[{inputs}] outputs=[{outputs}]"


def load_model(context: PluginContext) -> LoadedModel:
    """Builds the runtime the config names (in the calling thread: loading may take long)."""
    runtime = build("runtimes", context.config.runtime, "runtime", context)
    try:
        return LoadedModel(runtime, context)
    except Exception:
        close = getattr(runtime, "close", None)
        if close is not None:
            close()
        raise


def _checked(specs: Any, where: str) -> tuple[TensorSpec, ...]:
    if not specs or not all(isinstance(s, TensorSpec) for s in specs):
        raise LoadError(f"{where}: expected a non-empty sequence of sluice.server.plugins.TensorSpec")
    names = [s.name for s in specs]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise LoadError(f"{where}: names must be unique, got {', '.join(duplicated)} more than once")
    return tuple(specs)


def _overridden(
    declared: tuple[TensorSpec, ...], overrides: Mapping[str, TensorConfig], kind: str
) -> tuple[TensorSpec, ...]:
    """The runtime's specs under the config's `inputs.NAME` / `outputs.NAME` names and shapes."""
    names = [spec.name for spec in declared]
    for key in overrides:
        if key not in names:
            raise LoadError(
                f"config {kind}.{key}: the model has no {kind[:-1]} '{key}' "
                f"(it has: {', '.join(sorted(names))})"
            )
    specs = []
    for spec in declared:
        override = overrides.get(spec.name)
        name, shape = spec.name, spec.shape
        if override is not None:
            name = override.name or spec.name
            if override.shape is not None:
                shape = _constrain(shape, override.shape, f"config {kind}.{spec.name}.shape")
        if (name, shape, spec.graph_name) == (spec.name, spec.shape, spec.name):
            specs.append(spec)
        else:
            specs.append(TensorSpec(name, spec.datatype, shape, spec.name, sparse=spec.sparse))
    public = [spec.name for spec in specs]
    for name in dict.fromkeys(public):
        if public.count(name) > 1:
            raise LoadError(f"config {kind}: two {kind} are named '{name}'")
    return tuple(specs)


def _constrain(declared: tuple[int, ...], wanted: list[int], where: str) -> tuple[int, ...]:
    """`declared` with the config's fixed dimensions: each must be free there or the same size."""
    if len(wanted) != len(declared):
        raise LoadError(
            f"{where}: the model's shape {format_shape(declared)} has rank {len(declared)}, "
            f"got {format_shape(wanted)}"
        )
    out = []
    for d, w in zip(declared, wanted, strict=True):
        if w < -1 or (d != -1 and w not in (-1, d)):
            raise LoadError(
                f"{where}: {format_shape(wanted)} does not fit the model's shape {format_shape(declared)}"
            )
        out.append(d if w == -1 else w)
    return tuple(out)


def _renames(specs: tuple[TensorSpec, ...]) -> tuple[tuple[str, str], ...] | None:
    """(public name, runtime's name) for every spec when the config renamed any; None when it renamed none."""
    if all(spec.name == spec.graph_name for spec in specs):
        return None
    return tuple((spec.name, spec.graph_name) for spec in specs)


def _batch_size(inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...], config: ModelConfig) -> int:
    """Rows per run: batching needs every input and output to have a free first dimension."""
    fixed = [s.name for s in (*inputs, *outputs) if not s.shape or s.shape[0] != -1]
    wanted = config.batching.max_batch_size
    if wanted is None:
        return 0 if fixed else 32
    if wanted > 0 and fixed:
        raise LoadError(
            f"config batching.max_batch_size = {wanted}, but {', '.join(fixed)} has no free first (batch) "
            "dimension; set it to 0 or export the model with a dynamic batch axis"
        )
    return wanted


def _labels(
    outputs: tuple[TensorSpec, ...], configs: Mapping[str, TensorConfig], context: PluginContext
) -> dict[str, list[str]]:
    """The labels files of `outputs.NAME.labels`, read once at load; LoadError when one cannot be read."""
    found: dict[str, list[str]] = {}
    for spec in outputs:
        config = configs.get(spec.graph_name)
        if config is None or config.labels is None:
            continue
        path = context.resolve(config.labels)
        try:
            # As the topk postprocessor reads its labels: a byte-order mark and spaces around a line go.
            found[spec.name] = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            shown = context.display(path)
            raise LoadError(f"outputs.{spec.graph_name}.labels: cannot read {shown}: {why}") from None
    return found
