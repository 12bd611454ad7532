"""The `python` runtime: serves a class of yours with `load` and `predict(batch)`, batched like any model.

This is the model-runner style of Ventu and VESSL: a scikit-learn pipeline, a rules engine or any Python code
is served without exporting it to ONNX, with the same batching, queue limits, metrics and errors::

    # models/churn/1/model.py
    class Model:
        def load(self, path):             # optional; path is the version directory
            self.clf = joblib.load(path / "clf.joblib")

        def predict(self, batch):         # a dict of arrays, every one with the batch's rows first
            return {"score": self.clf.predict_proba(batch["features"])[:, 1]}

    # models/churn/config.toml
    [runtime]
    name = "python"
    inputs = [{ name = "features", datatype = "FP64", shape = [-1, 12] }]
    outputs = [{ name = "score", datatype = "FP64", shape = [-1] }]

The signature may instead be class attributes `inputs` and `outputs` holding the same tables (or
`TensorSpec`s). `predict` runs in a worker thread (numpy and most native libraries release the GIL); one
object is made per `execution.instances`, and each instance runs one batch at a time.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, field_validator

from sluice.server.plugins import LoadError, PluginContext, TensorSpec, parse_datatype


class SpecOption(BaseModel):
    """One input or output of a python model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    datatype: str
    shape: list[int]

    @field_validator("datatype")
    @classmethod
    def _known(cls, value: str) -> str:
        parse_datatype(value)
        return value.upper()

    @field_validator("shape")
    @classmethod
    def _dims(cls, value: list[int]) -> list[int]:
        if any(d < -1 for d in value):
            raise ValueError(f"dimensions are sizes or -1 (free), got {value}")
        return value

    def spec(self) -> TensorSpec:
        return TensorSpec.of(self.name, self.datatype, self.shape)


class PythonOptions(BaseModel):
    """Options of the `python` runtime."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    module: str = Field(
        default="model.py",
        min_length=1,
        description="Python file in the version directory, or an importable module name (`my_pkg.models`).",
    )
    class_name: str = Field(default="Model", alias="class", min_length=1, description="Class in that module.")
    inputs: list[SpecOption] | None = None
    outputs: list[SpecOption] | None = None


class PythonModel:
    """The `python` runtime."""

    Options = PythonOptions

    def __init__(self, options: PythonOptions, context: PluginContext) -> None:
        cls = _load_class(options, context)
        self.inputs = _signature(options.inputs, getattr(cls, "inputs", None), "inputs", cls)
        self.outputs = _signature(options.outputs, getattr(cls, "outputs", None), "outputs", cls)
        self._output_names = [s.name for s in self.outputs]
        self.instances = context.config.execution.instances
        self.providers = ["python"]
        self.threads = 1
        self._objects: list[Any] = []
        for _ in range(self.instances):
            try:
                obj = cls()
                load = getattr(obj, "load", None)
                if load is not None:
                    load(context.version_dir)
            except LoadError:
                raise
            except Exception as exc:
                raise LoadError(f"{cls.__qualname__}: loading failed: {type(exc).__name__}: {exc}") from exc
            if not callable(getattr(obj, "predict", None)):
                raise LoadError(f"{cls.__qualname__} has no predict(batch) method")
            self._objects.append(obj)

    def run(self, instance: int, feeds: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        result = self._objects[instance].predict(dict(feeds))
        if not isinstance(result, Mapping):
            raise TypeError(f"predict returned {type(result).__name__}, expected a dict of arrays")
        out: dict[str, npt.NDArray[Any]] = {}
        for name in self._output_names:
            if name not in result:
                raise KeyError(
                    f"predict returned no output '{name}' (it returned {', '.join(map(str, result))})"
                )
            out[name] = np.asarray(result[name])
        return out

    def close(self) -> None:
        for obj in self._objects:
            close = getattr(obj, "close", None)
            if close is not None:
                close()
        self._objects.clear()


def _load_class(options: PythonOptions, context: PluginContext) -> type[Any]:
    path = context.version_dir / options.module
    if options.module.endswith(".py"):
        if not path.is_file():
            raise LoadError(f"{path}: no such file (runtime option 'module')")
        name = f"sluice_models.{context.model}.v{context.version}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise LoadError(f"{path}: cannot be imported")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # so that pickling and dataclasses inside it work
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(name, None)
            raise LoadError(f"{path}: importing failed: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(options.module)
        except Exception as exc:
            raise LoadError(f"module '{options.module}' cannot be imported: {exc}") from exc
    cls = getattr(module, options.class_name, None)
    if not isinstance(cls, type):
        raise LoadError(f"{options.module} has no class '{options.class_name}' (runtime option 'class')")
    return cls


def _signature(
    option: list[SpecOption] | None, attribute: Any, kind: str, cls: type[Any]
) -> list[TensorSpec]:
    if option is not None:
        return [s.spec() for s in option]
    if attribute is None:
        raise LoadError(
            f"the python model's {kind} are not declared: give runtime option '{kind}' "
            f"([{{ name, datatype, shape }}, ...]) or a class attribute {cls.__qualname__}.{kind}"
        )
    specs: list[TensorSpec] = []
    items: Sequence[Any] = attribute
    for item in items:
        if isinstance(item, TensorSpec):
            specs.append(item)
        else:
            try:
                specs.append(SpecOption.model_validate(item).spec())
            except Exception as exc:
                raise LoadError(f"{cls.__qualname__}.{kind}: {exc}") from None
    return specs
