"""The per-model `config.toml`: validated at start-up so a mistake names its file, field and reason."""

from __future__ import annotations

import difflib
import json
import tomllib
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sluice.server.errors import invalid


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PadConfig(_Frozen):
    """An input axis whose length may differ between requests: shorter ones are padded to batch together."""

    axis: int = Field(ge=1, description="Axis of the input that is padded (0 is the batch axis).")
    dim: str = Field(
        min_length=1, description="Name of the dimension, shared with outputs that are cropped back."
    )
    value: float = Field(default=0, description="Value written into the padding.")


class CropConfig(_Frozen):
    """An output axis that follows a padded input dimension and is cut back to each request's own length."""

    axis: int = Field(ge=1, description="Axis of the output to crop.")
    dim: str = Field(min_length=1, description="Name of the padded input dimension it follows.")


class TensorConfig(_Frozen):
    """Overrides for one input or output found in the ONNX graph, keyed by its graph name (NAME).

    The same keys apply to `outputs.NAME`, except that outputs take `crop` where inputs take `pad`.
    """

    name: str | None = Field(
        default=None, min_length=1, description="Name callers use instead of the graph's."
    )
    shape: list[int] | None = Field(
        default=None,
        description="Constrains the graph's shape: a number fixes a dimension, -1 leaves it free. "
        "Includes the batch dimension.",
    )
    pad: PadConfig | None = Field(
        default=None,
        description="Inputs only: pad this axis so requests of different lengths batch together.",
    )
    crop: CropConfig | None = Field(
        default=None, description="Outputs only (`outputs.NAME.crop`): crop this axis per request."
    )
    labels: str | None = Field(
        default=None,
        min_length=1,
        description="Outputs only: a file of labels, one per line, class 0 first, relative to the model "
        "directory; Triton's classification strings of this output end in `:<label>` (its label_filename).",
    )


class BatchingConfig(_Frozen):
    """How requests to this model are packed into batches."""

    max_batch_size: int | None = Field(
        default=None,
        ge=0,
        description="Most rows in one run; 0 turns batching off; unset: 32 when the graph's first "
        "dimension is dynamic, else 0.",
    )
    max_delay_ms: float = Field(
        default=2.0, ge=0, le=60_000, description="Longest the first request of a batch waits for more rows."
    )
    max_queue_rows: int | None = Field(
        default=None,
        gt=0,
        description="Rows that may wait for this model before requests get RESOURCE_EXHAUSTED; "
        "unset: 32 x max_batch_size x instances.",
    )
    policy: Literal["adaptive", "fixed", "none"] = Field(
        default="adaptive",
        description="adaptive: wait only while it pays; fixed: always wait max_delay_ms or until full; "
        "none: one request per run.",
    )


class ExecutionConfig(_Frozen):
    """Where and how the model runs."""

    providers: Literal["auto", "cpu", "cuda"] = Field(
        default="auto",
        description="cuda: require a working CUDA device (fail to load otherwise); cpu; auto: CUDA when it "
        "works, else CPU.",
    )
    instances: int = Field(
        default=1, ge=1, le=64, description="Sessions of this model, each running batches."
    )
    intra_op_threads: int = Field(
        default=0, ge=0, description="Threads per session; 0 shares the server's inference_threads."
    )
    cuda_device: int = Field(default=0, ge=0, description="CUDA device id when running on CUDA.")
    spin: Literal["auto", "on", "off", "runs"] = Field(
        default="auto",
        description="Let ONNX Runtime's pool threads spin between parallel sections: faster runs, busier "
        "cores; auto: on, except for models fast enough to run on the event loop; runs: only while a run is "
        "in flight, not for the tens of ms after it (less CPU between sparse requests, docs/scale.md).",
    )
    elastic_threads: bool = Field(
        default=False,
        description="On CPU, with instances = 1 and 2 or more threads, for a model that runs in worker "
        "threads: a batch that runs alone uses every thread, and while one runs, more start at once on one "
        "thread each. More rows/s under a deep queue, fewer with few closed-loop callers of short runs "
        "(docs/scale.md); costs a second session (the weights again).",
    )
    lone_on_loop_max_ms: float = Field(
        default=5.0,
        ge=0,
        description="A lone caller's batch (no other request in flight in the server, for a while) expected "
        "to run within this many ms runs on the event loop instead of a worker thread, which saves the "
        "hand-off and the wake-up after it; a request that arrives meanwhile waits for it. For runtimes "
        "whose runs only compute (onnx); 0: never.",
    )
    inline_max_us: float | None = Field(
        default=None,
        ge=0,
        description="Batches predicted to run faster than this many µs run on the event loop, where handing "
        "them to a worker thread would cost more than the run; unset: the measured cost of that hand-off; "
        "0: always a worker thread.",
    )


class LatestVersions(_Frozen):
    """The highest N version directories, as Triton's `version_policy: { latest: { num_versions: N } }`."""

    latest: int = Field(ge=1, description="How many of the highest version directories to serve.")


VersionPolicy = Literal["all"] | list[int] | LatestVersions


def choose_versions(policy: VersionPolicy, found: list[int]) -> list[int]:
    """The versions a policy serves out of the version directories found, highest first."""
    ordered = sorted(set(found), reverse=True)
    if policy == "all":
        return ordered
    if isinstance(policy, LatestVersions):
        return ordered[: policy.latest]
    return sorted(set(policy), reverse=True)


class PluginRef(BaseModel):
    """A plugin named in config.toml, with its options inline: `{ name = "topk", k = 3 }`."""

    model_config = ConfigDict(frozen=True, extra="allow")

    name: str = Field(min_length=1, description="Name the plugin is registered under (its entry point).")

    def options(self) -> dict[str, Any]:
        """Every key but `name`: validated against the plugin's own options model at load."""
        return dict(self.model_extra or {})

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data


WarmupValue = bool | int | float | str | list[Any] | dict[str, str]


class ModelConfig(_Frozen):
    """Everything a model directory's config.toml may hold; every part is optional."""

    description: str = Field(default="", description="Free text shown in logs and metadata.")
    runtime: PluginRef = Field(
        default=PluginRef(name="onnx"),
        description='Runtime that loads and runs the model: "onnx" (reads <version>/model.onnx), "python" '
        '(a class of yours), or an installed plugin; options inline: { name = "python", class = "Model" }.',
    )
    versions: VersionPolicy = Field(
        default=LatestVersions(latest=1),
        description="Versions to serve: the highest N version directories ({ latest = N }, by default the "
        'highest one, as Triton does), "all" of them, or a list ([1, 3]); requests that name no version go '
        "to the highest ready one.",
    )
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)
    inputs: dict[str, TensorConfig] = Field(
        default_factory=dict, description="Input overrides keyed by graph input name."
    )
    outputs: dict[str, TensorConfig] = Field(
        default_factory=dict, description="Output overrides keyed by graph output name."
    )
    preprocess: list[PluginRef] = Field(
        default_factory=list,
        description='Preprocessors run on each request in order, before batching: [{ name = "image", ... }].',
    )
    postprocess: list[PluginRef] = Field(
        default_factory=list,
        description='Postprocessors run on each request\'s outputs in order: [{ name = "topk", k = 5 }].',
    )
    warmup: list[dict[str, WarmupValue]] = Field(
        default_factory=list,
        description="Example requests run through the whole pipeline before the model reports ready: "
        'input name to a value (nested lists, a string) or { file = "x.png" } (its bytes) or '
        '{ npy = "x.npy" }, paths relative to the model directory; unset: inputs synthesized from the '
        "model's signature.",
    )

    @model_validator(mode="after")
    def _check_tensors(self) -> ModelConfig:
        for key, tensor in self.inputs.items():
            if tensor.crop is not None:
                raise ValueError(f"inputs.{key}.crop: crop applies to outputs; inputs are padded with `pad`")
            if tensor.labels is not None:
                raise ValueError(f"inputs.{key}.labels: labels name the classes of an output")
        for key, tensor in self.outputs.items():
            if tensor.pad is not None:
                raise ValueError(
                    f"outputs.{key}.pad: pad applies to inputs; outputs are cut back with `crop`"
                )
        dims = {t.pad.dim for t in self.inputs.values() if t.pad is not None}
        for key, tensor in self.outputs.items():
            if tensor.crop is not None and tensor.crop.dim not in dims:
                raise ValueError(
                    f"outputs.{key}.crop.dim: '{tensor.crop.dim}' is not the dim of any padded input "
                    f"(padded dims: {sorted(dims) or 'none'})"
                )
        return self


class ConfigError(Exception):
    """A config.toml that cannot be used; the message names the file, the field and the reason."""


def load_config(path: Path, shown: str | None = None) -> ModelConfig:
    """Reads and validates a config.toml; a missing file means every default.

    `shown` names the file in errors (relative to the model repository: callers must not see server paths).
    """
    if not path.exists():
        return ModelConfig()
    where = path if shown is None else shown
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read: {exc.strerror or type(exc).__name__}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where}: cannot read: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: invalid TOML: {exc}") from None
    try:
        return ModelConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {describe_validation_error(exc, ModelConfig)}") from None


def parse_override(text: str, where: str = "parameter 'config'") -> ModelConfig:
    """A config sent with a load request, validated like a config.toml: TOML, or JSON (what Triton's clients
    send) when it starts with '{'. INVALID_ARGUMENT names the field and the reason."""
    try:
        data = json.loads(text) if text.lstrip().startswith("{") else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        kind = "JSON" if text.lstrip().startswith("{") else "TOML"
        raise invalid(f"{where}: invalid {kind}: {exc}") from None
    if not isinstance(data, dict):
        raise invalid(f"{where}: expected a table of settings, got {type(data).__name__}")
    try:
        return ModelConfig.model_validate(data)
    except ValidationError as exc:
        raise invalid(f"{where}: {describe_validation_error(exc, ModelConfig)}") from None


def describe_validation_error(exc: ValidationError, model: type[BaseModel] | None = None) -> str:
    """One line per problem: `field 'batching.max_batch_size': reason (got -1)`.

    Given the model that was validated, an unknown key also gets the likeliest key meant ("did you mean").
    """
    parts = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(p) for p in error["loc"])
        got = f" (got {error['input']!r})" if error["type"] != "missing" and "input" in error else ""
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden" and model is not None:
            got += _did_you_mean(model, error["loc"])
        if where:
            parts.append(f"field '{where}': {message}{got}")
        else:
            parts.append(message)
    return "; ".join(parts)


def _did_you_mean(model: type[BaseModel], loc: tuple[int | str, ...]) -> str:
    """`; did you mean 'max_batch_size'?` for a misspelt key, or where a key of that name belongs."""
    key = str(loc[-1])
    section = _model_at(model, loc[:-1])
    if section is None:
        return ""
    close = difflib.get_close_matches(key, list(section.model_fields), n=1)
    if close:
        return f"; did you mean '{close[0]}'?"
    # A right key in the wrong table (max_batch_size at the top instead of under [batching]).
    nested = {
        f"{name}.{inner}": inner
        for name, field in section.model_fields.items()
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        for inner in field.annotation.model_fields
    }
    close = difflib.get_close_matches(key, list(nested.values()), n=1)
    if close:
        table = next(p for p, inner in nested.items() if inner == close[0]).rsplit(".", 1)[0]
        return f"; did you mean '{close[0]}' under [{table}]?"
    return ""


def _model_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The pydantic model that validates the value at `loc` (through nested models, dicts and lists)."""
    current: Any = model
    for part in loc:
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return None
            current = field.annotation
        elif get_origin(current) in (dict, list):
            current = get_args(current)[-1]
        else:
            return None
        # `TensorConfig | None` and the like: the model is the one non-None member.
        members = [a for a in get_args(current) if a is not type(None)] if get_origin(current) else []
        if get_origin(current) not in (dict, list) and len(members) == 1:
            current = members[0]
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def other_model_files(missing: Path) -> str:
    """For `<version>/model.onnx: no such file`: the other .onnx files in that directory, and the fix."""
    try:
        others = sorted(p.name for p in missing.parent.glob("*.onnx") if p.is_file())
    except OSError:
        return ""
    if not others:
        return ""
    found = ", ".join(others)
    return (
        f"; the directory has {found}: rename it to {missing.name}, or name it in config.toml: "
        f'runtime = {{ name = "onnx", file = "{others[0]}" }}'
    )
