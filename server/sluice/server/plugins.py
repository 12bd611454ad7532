"""The plugin API: preprocessors, postprocessors and runtimes, found through Python entry points.

A plugin is a class registered under one of three entry-point groups by any installed distribution::

    [project.entry-points."sluice.preprocessors"]
    resize = "my_package.plugins:Resize"

A model's config.toml names its plugins, with their options inline next to the name::

    runtime = "onnx"                                  # or { name = "python", module = "model.py" }
    preprocess = [{ name = "image", input = "image", size = [8, 8] }]
    postprocess = [{ name = "topk", k = 3, labels = "labels.txt" }]

Each class may declare its options as a pydantic model in `Options`; Sluice validates them at start-up and
constructs the plugin once per model version as `Plugin(options, context)`. See `Preprocessor`,
`Postprocessor` and `Runtime` for what each kind provides; `docs/plugins.md` has a worked example.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import grpc
import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, ValidationError

from sluice.server.errors import SluiceError
from sluice.server.tensors import format_shape, numpy_dtype, type_name
from sluice.v1 import inference_pb2 as pb

if TYPE_CHECKING:
    from sluice.server.config import ModelConfig, PluginRef

log = logging.getLogger("sluice.server")

Arrays = dict[str, npt.NDArray[Any]]
"""Named tensors of one request (or, for a runtime, of one batch)."""

Kind = Literal["preprocessors", "postprocessors", "runtimes"]
GROUPS: dict[Kind, str] = {
    "preprocessors": "sluice.preprocessors",
    "postprocessors": "sluice.postprocessors",
    "runtimes": "sluice.runtimes",
}


class LoadError(Exception):
    """A model version that cannot be served; the message says why, for logs and Health.

    Plugins raise it from their constructor for a problem found at start-up (a missing labels file, a
    missing optional dependency): the model version fails to load with this message.
    """


class PluginError(SluiceError):
    """Raised by a plugin to fail one request with a status and a message meant for the caller.

    Anything else a plugin raises becomes INTERNAL with a generic message, and its traceback goes to the log.
    """

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> None:
        super().__init__(code, message)


_DATATYPES: dict[str, int] = {
    name.removeprefix("DATA_TYPE_"): value
    for name, value in pb.DataType.items()
    if value != pb.DATA_TYPE_UNSPECIFIED
}


def parse_datatype(name: str) -> int:
    """Wire data type from its short name: FP32, INT64, STRING, BYTES."""
    found = _DATATYPES.get(name.upper())
    if found is None:
        raise ValueError(f"unknown datatype '{name}'; expected one of {', '.join(_DATATYPES)}")
    return found


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """What a model or a plugin takes or gives under one name; -1 marks a free dimension.

    `graph_name` is the name inside the model file when a config renames it; plugins leave it out.
    """

    name: str
    datatype: int
    shape: tuple[int, ...]
    graph_name: str = ""
    sparse: bool = False
    """Whether the step takes this input as a `CooArray` (indices and values) instead of a dense array."""
    dtype: np.dtype[Any] | None = field(init=False)
    """numpy dtype of a numeric tensor; None for STRING and BYTES (object arrays of str and bytes)."""
    _fixed: tuple[tuple[int, int], ...] = field(init=False)

    def __post_init__(self) -> None:
        if not self.graph_name:
            object.__setattr__(self, "graph_name", self.name)
        object.__setattr__(self, "shape", tuple(self.shape))
        variable = self.datatype in (pb.DATA_TYPE_STRING, pb.DATA_TYPE_BYTES)
        dtype = None if variable else numpy_dtype(self.datatype)
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "_fixed", tuple((i, d) for i, d in enumerate(self.shape) if d != -1))

    @classmethod
    def of(cls, name: str, datatype: str, shape: Sequence[int], *, sparse: bool = False) -> TensorSpec:
        """Spec from readable parts: `TensorSpec.of("image", "BYTES", [-1])`."""
        return cls(name, parse_datatype(datatype), tuple(shape), sparse=sparse)

    def takes(self, datatype: int) -> bool:
        """Whether a tensor of `datatype` may be given for this one (BYTES also takes STRING)."""
        return datatype == self.datatype or (
            datatype == pb.DATA_TYPE_STRING and self.datatype == pb.DATA_TYPE_BYTES
        )

    def accepts(self, shape: tuple[int, ...]) -> bool:
        """Whether a tensor of `shape` fits: same rank, and every fixed dimension matches."""
        if len(shape) != len(self.shape):
            return False
        for axis, size in self._fixed:  # noqa: SIM110 (a plain loop: this runs per request, all() is slower)
            if shape[axis] != size:
                return False
        return True

    def describe(self) -> str:
        return f"{type_name(self.datatype)} {format_shape(self.shape)}{' (sparse)' if self.sparse else ''}"

    def to_proto(self) -> pb.TensorSpec:
        return pb.TensorSpec(name=self.name, datatype=self.datatype, shape=self.shape)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class PluginContext:
    """Where a plugin is used: the model version it belongs to, its files, and the server's neutral facts."""

    model: str
    version: int
    model_dir: Path
    """The model's directory (where config.toml is); relative paths in options are read from here."""
    version_dir: Path
    """The version's directory (`<model_dir>/<version>`), where the model's files are."""
    config: ModelConfig
    inference_threads: int = 0
    """The server's inference threads (`SLUICE_INFERENCE_THREADS`), shared by every model; 0: one per core."""
    sessions: int = 1
    """Instances of every model version the server loads, which share `inference_threads` between them."""

    @property
    def threads(self) -> int:
        """An even share of the inference threads for one instance, so that all models together do not
        oversubscribe the cores. A runtime may decide otherwise (the `onnx` runtime honours
        `execution.intra_op_threads`)."""
        cores = self.inference_threads or os.cpu_count() or 1
        return max(1, cores // max(1, self.sessions))

    @property
    def spinning(self) -> bool:
        """Whether `execution.spin` lets a runtime's pool threads spin between parallel sections (on, auto
        or runs; with runs only while a run is in flight).

        With auto, a runtime that spins learns from `Runtime.tune` whether the model runs on the event loop,
        where spinning threads would take the loop's core."""
        return self.config.execution.spin != "off"

    @property
    def repository(self) -> Path:
        """The model repository: the root that paths in load failures are named from."""
        return self.model_dir.parent

    def resolve(self, path: str | Path) -> Path:
        """A path from the options: absolute, or relative to the model's directory."""
        path = Path(path)
        return path if path.is_absolute() else self.model_dir / path

    def display(self, path: str | Path) -> str:
        """`path` as a load failure names it to callers: relative to the repository (`digits/1/model.onnx`).

        Load failures reach callers (Health, Predict's UNAVAILABLE, KServe metadata), who must not learn the
        server's directories; the server log names the version's directory in full next to the reason."""
        return display_path(path, self.repository)

    def public(self, text: str) -> str:
        """`text` (an exception's message, say) with every absolute path named as `display` names it."""
        return public_text(text, self.repository)


# An absolute POSIX path inside free text: a "/" that starts a word (not "a/b", "1/2" nor a URL's "//").
_ERRNO = re.compile(r"\[Errno -?\d+\] ")
_ABSOLUTE = re.compile(r"(?<![\w.:/~-])/[^\s'\"`,;:()\[\]{}<>]+")


def display_path(path: str | Path, root: Path) -> str:
    """`path` relative to `root` when it is inside it; else only its file name, behind `.../`."""
    normal = os.path.normpath(path)
    for base in dict.fromkeys((os.path.normpath(root), os.path.abspath(root), os.path.realpath(root))):
        if normal == base:
            return "."
        if normal.startswith(base.rstrip(os.sep) + os.sep):
            return normal[len(base.rstrip(os.sep)) + 1 :]
    if not os.path.isabs(normal):
        return str(path)
    return f".../{os.path.basename(normal.rstrip(os.sep)) or normal}"


def public_text(text: str, root: Path) -> str:
    """Free text with absolute paths replaced by what `display_path` shows (root-relative or a file name),
    and without OSError's "[Errno 2] " prefix, which tells callers nothing the words after it do not."""
    text = _ERRNO.sub("", text)
    return _ABSOLUTE.sub(lambda match: display_path(match.group(), root), text)


class NoOptions(BaseModel):
    """The options of a plugin that takes none: any key given is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@runtime_checkable
class Preprocessor(Protocol):
    """Turns one request's inputs into the inputs of the next step (the model's, for the last one).

    Runs per request, before batching, in a worker thread. It is constructed once per model version as
    `cls(options, context)`, where `options` is an instance of the class's `Options` pydantic model.
    """

    def signature(self, downstream: Sequence[TensorSpec]) -> Sequence[TensorSpec]:
        """The inputs callers send to this step, given the inputs of the next one.

        Called once at load; the server checks requests against the first step's answer, so `__call__`
        only ever sees inputs of these names, types and shapes.
        """
        ...

    def __call__(self, inputs: Arrays) -> Arrays:
        """One request's inputs in, the next step's inputs out; raise `PluginError` for a bad request."""
        ...


@runtime_checkable
class Postprocessor(Protocol):
    """Turns one request's outputs into what the caller gets (or what the next postprocessor takes).

    Runs per request, after the batch is split, in a worker thread.
    """

    def signature(self, upstream: Sequence[TensorSpec]) -> Sequence[TensorSpec]:
        """The outputs this step gives, given those of the step before (the model's, for the first)."""
        ...

    def __call__(self, outputs: Arrays, inputs: Arrays) -> Arrays:
        """One request's outputs in (with the model inputs it was run on), this step's outputs out."""
        ...


@runtime_checkable
class Runtime(Protocol):
    """A loaded model version: its signature and a way to run a batch on one of its instances.

    Constructed as `cls(options, context)` in a worker thread at start-up; raise `LoadError` when the model
    cannot be served. The server owns batching, queueing, threads, metrics and errors: `run` is called with
    a whole batch (concatenated along the first axis when the model batches), at most once at a time per
    instance, from a worker thread or (for runs shorter than a thread hand-off) the event loop.

    Names are the runtime's own: the core applies config.toml's `inputs.NAME` / `outputs.NAME` renames and
    shapes. Optional members: `threads` and `spinning` (for the log), and `tune(inline: bool) -> bool`, called
    once after warm-up with whether one-row batches run on the event loop; returning True (it changed how it
    runs: the `onnx` runtime stops spinning) makes the server warm and measure it again; `loop_safe = True`
    when a run only computes and ends (never waits on an event, I/O or another request), which lets a lone
    caller's run compute on the event loop (`execution.lone_on_loop_max_ms`); `spins_after_runs` when its
    threads keep spinning after a run (the event loop then does not spin beside them). See docs/plugins.md.
    """

    inputs: Sequence[TensorSpec]
    outputs: Sequence[TensorSpec]
    instances: int
    """How many runs may go at once (sessions, copies of the model)."""
    providers: Sequence[str]
    """Where it runs, for logs and Health: ["CPUExecutionProvider"], ["python"]."""

    def run(self, instance: int, feeds: Mapping[str, npt.NDArray[Any]]) -> Mapping[str, npt.NDArray[Any]]:
        """Runs one batch on instance `instance` (0 <= instance < instances); returns every output."""
        ...

    def close(self) -> None:
        """Frees what the model holds; called once at shutdown."""
        ...


@functools.cache
def installed(kind: Kind) -> dict[str, EntryPoint]:
    """The plugins of one kind that installed distributions register, by name."""
    found: dict[str, EntryPoint] = {}
    for point in entry_points(group=GROUPS[kind]):
        if point.name in found and found[point.name].value != point.value:
            log.warning(
                "two %s plugins are named '%s' (%s and %s); using the first",
                kind[:-1], point.name, found[point.name].value, point.value,
            )  # fmt: skip
            continue
        found[point.name] = point
    return found


def plugin_class(kind: Kind, name: str) -> type[Any]:
    """The class registered as `name`; LoadError naming the installed ones when there is none."""
    points = installed(kind)
    point = points.get(name)
    if point is None:
        have = ", ".join(sorted(points)) or "none"
        raise LoadError(
            f"no {kind[:-1]} plugin named '{name}' is installed (entry-point group {GROUPS[kind]}; "
            f"installed: {have})"
        )
    try:
        cls = point.load()
    except Exception as exc:
        raise LoadError(f"{kind[:-1]} plugin '{name}' ({point.value}) cannot be imported: {exc}") from exc
    if not isinstance(cls, type):
        raise LoadError(f"{kind[:-1]} plugin '{name}' ({point.value}) is not a class")
    return cls


def options_of(cls: type[Any], kind: Kind, where: str, values: Mapping[str, Any]) -> BaseModel:
    """Validates a plugin's options against its `Options` model; LoadError naming plugin, field, reason."""
    from sluice.server.config import describe_validation_error

    model: type[BaseModel] = getattr(cls, "Options", NoOptions)
    try:
        return model.model_validate(dict(values))
    except ValidationError as exc:
        raise LoadError(
            f"{where}: {kind[:-1]} plugin options: {describe_validation_error(exc, model)}"
        ) from None


def build(kind: Kind, ref: PluginRef, where: str, context: PluginContext) -> Any:
    """Finds, validates and constructs the plugin `ref` names; `where` locates it in config.toml."""
    where = f"{where} ('{ref.name}')"
    try:
        cls = plugin_class(kind, ref.name)
    except LoadError as exc:
        raise LoadError(f"{where}: {exc}") from exc.__cause__
    options = options_of(cls, kind, where, ref.options())
    try:
        return cls(options, context)
    except LoadError as exc:
        raise LoadError(f"{where}: {exc}") from None
    except Exception as exc:
        raise LoadError(f"{where}: {type(exc).__name__}: {exc}") from exc
