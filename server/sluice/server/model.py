"""A loaded model version as the server sees it: a runtime plugin, plus the batching facts derived from it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy.typing as npt

from sluice.server.config import ModelConfig
from sluice.server.plugins import LoadError, PluginContext, Runtime, TensorSpec, build


class LoadedModel:
    """Wraps a runtime plugin: checks what it declares, and decides the rows per run from the config."""

    def __init__(self, runtime: Runtime, context: PluginContext) -> None:
        self.runtime = runtime
        self.name = context.model
        self.version = context.version
        self.config: ModelConfig = context.config
        where = f"runtime '{context.config.runtime.name}'"
        self.inputs: tuple[TensorSpec, ...] = _checked(getattr(runtime, "inputs", None), f"{where} inputs")
        self.outputs: tuple[TensorSpec, ...] = _checked(getattr(runtime, "outputs", None), f"{where} outputs")
        sparse = [s.name for s in self.outputs if s.sparse]
        if sparse:
            raise LoadError(f"{where} outputs: {', '.join(sparse)} declared sparse; outputs are dense arrays")
        instances = getattr(runtime, "instances", 1)
        if not isinstance(instances, int) or instances < 1:
            raise LoadError(f"{where}: instances must be an int >= 1, got {instances!r}")
        self.instances = instances
        providers = getattr(runtime, "providers", ["unknown"])
        self.providers: list[str] = [providers] if isinstance(providers, str) else [str(p) for p in providers]
        self.threads: int = getattr(runtime, "threads", context.threads)
        self.spinning: bool = bool(getattr(runtime, "spinning", False))
        self.max_batch_size = _batch_size(self.inputs, self.outputs, context.config)

    def run(self, instance: int, feeds: Mapping[str, npt.NDArray[Any]]) -> Mapping[str, npt.NDArray[Any]]:
        return self.runtime.run(instance, feeds)

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
