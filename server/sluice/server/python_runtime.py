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

Runner-shaped classes are served as they are (see `_Runner`):

- VESSL's: `load_model(props, artifacts)`, `preprocess_data(data)`, `predict(model, data)`,
  `postprocess_data(data)` (what `sluice.server.registration.register` writes);
- Ventu's: `preprocess(item)`, `batch_inference(items)`, `postprocess(result)`, with pydantic `req_schema` and
  `resp_schema` that validate each request and answer, give the signature, and whose examples warm it up.

A version directory's `requirements.txt` (and the `requirements` option) is checked before the module is
imported: a missing or too old distribution fails the model with the `pip install` line that fixes it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import pickle
import re
import shlex
import sys
import typing
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import numpy.typing as npt
from packaging.requirements import InvalidRequirement, Requirement
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sluice.server.config import describe_validation_error
from sluice.server.plugins import LoadError, PluginContext, PluginError, TensorSpec, parse_datatype
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
    requirements: list[str] = Field(
        default_factory=list,
        description="Distributions the class needs (`scikit-learn>=1.4`), checked as requirements.txt is.",
    )


class PredictError(Exception):
    """A python model's `predict` returned something other than its declared outputs."""


class PythonModel:
    """The `python` runtime."""

    Options = PythonOptions

    def __init__(self, options: PythonOptions, context: PluginContext) -> None:
        check_requirements(options.requirements, context)
        cls = _load_class(options, context)
        self.instances = context.config.execution.instances
        self.providers = ["python"]
        self.threads = 1
        self._owner = f"{cls.__qualname__}.predict"
        self._objects: list[Any] = []
        self._hooks: ThreadPoolExecutor | None = None
        try:
            for _ in range(self.instances):
                self._objects.append(_instantiate(cls, context))
            first = self._objects[0]
            schemas = first.schemas() if isinstance(first, _Runner) else (None, None)
            self.inputs = _signature(options.inputs, _declared(cls, "inputs", schemas[0]), "inputs", cls)
            self.outputs = _signature(options.outputs, _declared(cls, "outputs", schemas[1]), "outputs", cls)
            # A class that says its predict only computes (no waiting on events, I/O or other requests)
            # lets a lone caller's run compute on the event loop (execution.lone_on_loop_max_ms).
            self.loop_safe = not isinstance(first, _Runner) and getattr(cls, "loop_safe", False) is True
            if isinstance(first, _Runner):
                self._owner = f"{cls.__qualname__}.{first.batch_hook}"
                self._hooks = ThreadPoolExecutor(
                    max_workers=os.cpu_count() or 2, thread_name_prefix=f"sluice-{context.model}-hooks"
                )
                for runner in self._objects:
                    runner.bind(self.inputs, self.outputs, self._hooks, self._owner)
                    runner.warm_up()
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

    def tune(self, inline: bool) -> bool:
        """Called once the server's warm-up and timing runs are over: from now on every row is a caller's."""
        for obj in self._objects:
            if isinstance(obj, _Runner):
                obj.loading = False
        return False

    def close(self) -> None:
        for obj in self._objects:
            close = getattr(obj, "close", None)
            if close is not None:
                close()
        self._objects.clear()
        if self._hooks is not None:
            self._hooks.shutdown(wait=False, cancel_futures=True)


def check_requirements(extra: Sequence[str], context: PluginContext) -> None:
    """Fails the model, before its code is imported, when a required distribution is missing or does not
    satisfy its specifier; the message is the `pip install` line to run, not an ImportError traceback."""
    lines = [("runtime option 'requirements'", line) for line in extra]
    path = context.version_dir / "requirements.txt"
    if path.is_file():
        shown = context.display(path)
        lines += [(shown, line) for line in path.read_text(encoding="utf-8").splitlines()]
    unmet: list[str] = []
    wanted: list[str] = []
    for where, raw in lines:
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            requirement = Requirement(line)
        except InvalidRequirement as exc:
            raise LoadError(f"{where}: '{line}' is not a requirement ({exc})") from None
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        try:
            have = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            unmet.append(f"{requirement} (not installed)")
            wanted.append(str(requirement))
            continue
        if requirement.specifier and not requirement.specifier.contains(have, prereleases=True):
            unmet.append(f"{requirement} ({have} installed)")
            wanted.append(str(requirement))
    if unmet:
        command = "pip install " + " ".join(shlex.quote(w) for w in wanted)
        raise LoadError(f"requirements not met: {', '.join(unmet)}; run: {command}")


def _instantiate(cls: type[Any], context: PluginContext) -> Any:
    kind = _runner_kind(cls)
    try:
        obj = cls()
        if kind == "vessl":
            return _Runner.vessl(obj, context)
        if kind == "ventu":
            return _Runner.ventu(obj)
        load = getattr(obj, "load", None)
        if load is not None:
            load(context.version_dir)
    except LoadError:
        raise
    except Exception as exc:
        raise LoadError(f"{cls.__qualname__}: loading failed: {type(exc).__name__}: {exc}") from exc
    if not callable(getattr(obj, "predict", None)):
        raise LoadError(
            f"{cls.__qualname__} has no predict(batch) method (nor VESSL's load_model/predict(model, data) "
            "or Ventu's batch_inference(items))"
        )
    return obj


def _runner_kind(cls: type[Any]) -> str:
    """Which shape a class has: Ventu's (batch_inference), VESSL's (load_model) or Sluice's own (predict)."""
    if callable(getattr(cls, "batch_inference", None)):
        return "ventu"
    if callable(getattr(cls, "load_model", None)):
        return "vessl"
    return "model"


def _declared(cls: type[Any], kind: str, schema: type[BaseModel] | None) -> Any:
    """The class's own `inputs`/`outputs` attribute, else the signature its pydantic schema implies."""
    attribute = getattr(cls, kind, None)
    if attribute is not None or schema is None:
        return attribute
    return schema_specs(schema, f"{cls.__qualname__}.{'req_schema' if kind == 'inputs' else 'resp_schema'}")


_SCALARS: dict[Any, str] = {str: "STRING", bytes: "BYTES", bool: "BOOL", int: "INT64", float: "FP64"}


def schema_specs(schema: type[BaseModel], where: str) -> list[TensorSpec]:
    """One tensor per field of a pydantic model, one row per request: `str` is STRING [-1], `int` INT64 [-1],
    `float` FP64 [-1], `bool` BOOL [-1], `bytes` BYTES [-1], and `list[...]` of those [-1, -1]."""
    specs = []
    for name, field in schema.model_fields.items():
        annotation = field.annotation
        shape = [-1]
        if typing.get_origin(annotation) in (list, Sequence):
            (annotation,) = typing.get_args(annotation) or (None,)
            shape = [-1, -1]
        datatype = _SCALARS.get(annotation)
        if datatype is None:
            raise LoadError(
                f"{where}: field '{name}' is {field.annotation}; a field maps to a tensor when it is str, "
                "bytes, bool, int, float or a list of one of them"
            )
        specs.append(TensorSpec.of(name, datatype, shape))
    return specs


def _examples(schema: type[BaseModel]) -> list[dict[str, Any]]:
    """The examples a pydantic request model declares: `examples`/`example` in its JSON schema (model_config's
    json_schema_extra, or Ventu's pydantic-1 `schema_extra`), else one made of every field's first example."""
    extra = schema.model_json_schema()
    found = extra.get("examples") or ([extra["example"]] if "example" in extra else [])
    if found:
        return [dict(example) for example in found]
    fields = schema.model_fields
    if fields and all(f.examples for f in fields.values()):
        return [{name: f.examples[0] for name, f in fields.items() if f.examples}]
    return []


class _Runner:
    """A runner-shaped class served as it is: per-request hooks, run for every request of a batch in a
    thread pool, around one batch hook per batch.

    VESSL: `preprocess_data(data)` per request (data: the request's inputs by name), `predict(model, items)`
    per batch (a list, one item per request), `postprocess_data(result)` per request. Ventu:
    `preprocess(request)` per request (a `req_schema` instance when declared), `batch_inference(items)` per
    batch, `postprocess(result)` per request, validated against `resp_schema`. Each answer is a dict of
    outputs (or a pydantic model; a bare value when there is one output).
    """

    def __init__(
        self,
        obj: Any,
        *,
        pre: str,
        batch: str,
        post: str,
        model: Any = None,
        request: type[BaseModel] | None = None,
        response: type[BaseModel] | None = None,
    ) -> None:
        self.obj = obj
        self.batch_hook = batch
        self._pre = getattr(obj, pre, None)
        self._batch = getattr(obj, batch)
        self._post = getattr(obj, post, None)
        self._model = model
        self._vessl = batch == "predict"
        self._request = request
        self._response = response
        self._inputs: Sequence[TensorSpec] = ()
        self._outputs: Sequence[TensorSpec] = ()
        self._pool: ThreadPoolExecutor | None = None
        self._owner = ""
        self._example: dict[str, Any] | None = None
        self.loading = True
        """While the server warms the model up and times it, on rows of zeros and empty strings that a
        schema may refuse (min_length=1): those rows are replaced by the schema's first example."""

    @classmethod
    def vessl(cls, obj: Any, context: PluginContext) -> _Runner:
        """VESSL's runner: the model is `model.pkl` when register pickled it, else `load_model(props,
        artifacts)` with props.json and the files under `artifacts/` (relative path -> absolute path)."""
        version = context.version_dir
        pickled = version / "model.pkl"
        if pickled.is_file():
            with pickled.open("rb") as f:
                model = pickle.load(f)
        else:
            props_file = version / "props.json"
            props = json.loads(props_file.read_text(encoding="utf-8")) if props_file.is_file() else {}
            root = version / "artifacts"
            artifacts = {
                str(p.relative_to(root)): str(p) for p in sorted(root.rglob("*")) if p.is_file()
            } if root.is_dir() else {}  # fmt: skip
            model = obj.load_model(props, artifacts)
        return cls(obj, pre="preprocess_data", batch="predict", post="postprocess_data", model=model)

    @classmethod
    def ventu(cls, obj: Any) -> _Runner:
        request = _schema(getattr(obj, "req_schema", None), type(obj), "req_schema")
        response = _schema(getattr(obj, "resp_schema", None), type(obj), "resp_schema")
        return cls(obj, pre="preprocess", batch="batch_inference", post="postprocess",
                   request=request, response=response)  # fmt: skip

    def schemas(self) -> tuple[type[BaseModel] | None, type[BaseModel] | None]:
        return self._request, self._response

    def bind(
        self,
        inputs: Sequence[TensorSpec],
        outputs: Sequence[TensorSpec],
        pool: ThreadPoolExecutor,
        owner: str,
    ) -> None:
        self._inputs, self._outputs, self._pool, self._owner = inputs, outputs, pool, owner

    def warm_up(self) -> None:
        """Runs the request schema's examples through every hook, so a model that cannot answer them fails
        at load (Ventu used them as its health check)."""
        if self._request is None:
            return
        examples = _examples(self._request)
        if examples:
            self._example = self._request.model_validate(examples[0]).model_dump()
        for index, example in enumerate(examples):
            try:
                full = self._request.model_validate(example).model_dump()  # defaults filled in
                batch = {spec.name: _column([full.get(spec.name)], spec) for spec in self._inputs}
                self.predict(batch)
            except Exception as exc:
                raise LoadError(
                    f"{self._request.__qualname__} example {index} (warm-up): {type(exc).__name__}: {exc}"
                ) from exc

    def predict(self, batch: dict[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        assert self._pool is not None
        rows = len(next(iter(batch.values())))
        items = list(self._pool.map(self._before, [
            {name: _python(array[i]) for name, array in batch.items()} for i in range(rows)
        ]))  # fmt: skip
        results = self._batch(self._model, items) if self._vessl else self._batch(items)
        results = list(results) if results is not None else []
        if len(results) != rows:
            raise PredictError(f"{self._owner} returned {len(results)} results for {rows} requests")
        answers = list(self._pool.map(self._after, results))
        return {spec.name: _column([a[spec.name] for a in answers], spec) for spec in self._outputs}

    def _before(self, row: dict[str, Any]) -> Any:
        data: Any = row
        if self._request is not None:
            try:
                data = self._request.model_validate(row)
            except ValidationError as exc:
                if not (self.loading and self._example is not None):
                    raise PluginError(f"request: {describe_validation_error(exc)}") from None
                data = self._request.model_validate(self._example)
        return data if self._pre is None else self._pre(data)

    def _after(self, result: Any) -> dict[str, Any]:
        answer = result if self._post is None else self._post(result)
        if self._response is not None:
            try:
                answer = self._response.model_validate(answer)
            except ValidationError as exc:
                where = f"{type(self.obj).__qualname__}.postprocess"
                raise PredictError(f"{where}: answer: {describe_validation_error(exc)}") from None
        if isinstance(answer, BaseModel):
            answer = answer.model_dump()
        if not isinstance(answer, Mapping):
            if len(self._outputs) != 1:
                raise PredictError(
                    f"{self._owner}: an answer must be a dict of outputs "
                    f"({', '.join(s.name for s in self._outputs)}), got {type(answer).__name__}"
                )
            answer = {self._outputs[0].name: answer}
        missing = [s.name for s in self._outputs if s.name not in answer]
        if missing:
            raise PredictError(f"{self._owner}: an answer has no output '{missing[0]}'")
        return dict(answer)

    def close(self) -> None:
        close = getattr(self.obj, "close", None)
        if close is not None:
            close()


def _schema(value: Any, cls: type[Any], name: str) -> type[BaseModel] | None:
    if value is None:
        return None
    if isinstance(value, type) and issubclass(value, BaseModel):
        return value
    raise LoadError(f"{cls.__qualname__}.{name} must be a pydantic model class, got {value!r}")


def _python(value: Any) -> Any:
    """A numpy element or row as plain Python (lists, str, int, float), as a pydantic model or JSON has it."""
    return value.tolist() if isinstance(value, np.ndarray | np.generic) else value


def _column(values: list[Any], spec: TensorSpec) -> npt.NDArray[Any]:
    """Per-request values stacked into one tensor of `spec`'s type."""
    if spec.dtype is not None:
        return np.asarray(values, dtype=spec.dtype)
    if len(spec.shape) > 1:
        return np.array(values, dtype=object)
    array = np.empty(len(values), dtype=object)  # str or bytes elements, whole
    array[:] = values
    return array


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
