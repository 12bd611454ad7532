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
`TensorSpec`s). One object is made per `execution.instances`, and each runs one batch at a time. `predict`
runs in a worker thread (numpy and most native libraries release the GIL), or on the event loop when it
measured faster at load than a thread hand-off (`execution.inline_max_us = 0` keeps it off the loop). Its
outputs are cast to the declared element types (FP64 scores declared FP32 come back FP32); an output of the
wrong kind or rank fails the batch with INTERNAL.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, field_validator

from sluice.server.plugins import LoadError, PluginContext, TensorSpec, parse_datatype
from sluice.server.tensors import format_shape
from sluice.v1 import inference_pb2 as pb


class SpecOption(BaseModel):
    """One input or output of a python model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    datatype: str
    shape: list[int]
    sparse: bool = Field(
        default=False, description="Inputs only: predict gets a sluice.batcher.CooArray instead of an array."
    )

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
        return TensorSpec.of(self.name, self.datatype, self.shape, sparse=self.sparse)


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


class PredictError(Exception):
    """A python model's `predict` returned something other than its declared outputs."""


class PythonModel:
    """The `python` runtime."""

    Options = PythonOptions

    def __init__(self, options: PythonOptions, context: PluginContext) -> None:
        cls = _load_class(options, context)
        self.inputs = _signature(options.inputs, getattr(cls, "inputs", None), "inputs", cls)
        self.outputs = _signature(options.outputs, getattr(cls, "outputs", None), "outputs", cls)
        self.instances = context.config.execution.instances
        self.providers = ["python"]
        self.threads = 1
        self._owner = f"{cls.__qualname__}.predict"
        self._objects: list[Any] = []
        try:
            for _ in range(self.instances):
                self._objects.append(_instantiate(cls, context))
        except Exception:
            self.close()  # the instances made before the one that failed
            raise

    def run(self, instance: int, feeds: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        result = self._objects[instance].predict(dict(feeds))
        if not isinstance(result, Mapping):
            raise PredictError(f"{self._owner} returned {type(result).__name__}, expected a dict of arrays")
        out: dict[str, npt.NDArray[Any]] = {}
        for spec in self.outputs:
            if spec.name not in result:
                got = ", ".join(f"'{name}'" for name in result) or "nothing"
                raise PredictError(f"{self._owner} returned no output '{spec.name}' (it returned {got})")
            out[spec.name] = _conform(np.asarray(result[spec.name]), spec, self._owner)
        return out

    def close(self) -> None:
        for obj in self._objects:
            close = getattr(obj, "close", None)
            if close is not None:
                close()
        self._objects.clear()


def _instantiate(cls: type[Any], context: PluginContext) -> Any:
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
    return obj


def _conform(array: npt.NDArray[Any], spec: TensorSpec, owner: str) -> npt.NDArray[Any]:
    """`array` as the declared output: numbers cast within their kind (FP64 to FP32, INT32 to INT64)."""
    if spec.dtype is None:  # str or object for STRING, bytes or object for BYTES
        fits = array.dtype.kind in ("OU" if spec.datatype == pb.DATA_TYPE_STRING else "OS")
    elif array.dtype != spec.dtype and np.can_cast(array.dtype, spec.dtype, "same_kind"):
        array = array.astype(spec.dtype)
        fits = True
    else:
        fits = array.dtype == spec.dtype
    if not fits or not spec.accepts(array.shape):
        raise PredictError(
            f"{owner} returned output '{spec.name}' as numpy {array.dtype} {format_shape(array.shape)}; "
            f"it is declared {spec.describe()}"
        )
    return array


def _module_name(context: PluginContext) -> str:
    """A top-level module name for a model's file: pickle and dataclasses look classes up in sys.modules by
    their `__module__`, and pickle imports a dotted name's parents, which would not exist."""
    name = f"sluice_model_{context.model}_v{context.version}"
    safe = re.sub(r"\W", "_", name, flags=re.ASCII)
    if safe != name:  # keep "a-b" and "a.b" apart
        safe += "_" + hashlib.sha256(name.encode()).hexdigest()[:8]
    return safe


def _load_class(options: PythonOptions, context: PluginContext) -> type[Any]:
    path = context.version_dir / options.module
    shown = context.display(path)
    if options.module.endswith(".py"):
        if not path.is_file():
            raise LoadError(f"{shown}: no such file (runtime option 'module')")
        name = _module_name(context)
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise LoadError(f"{shown}: cannot be imported")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # so that pickling and dataclasses inside it work
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(name, None)
            raise LoadError(f"{shown}: importing failed: {type(exc).__name__}: {exc}") from exc
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
