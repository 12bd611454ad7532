"""The `onnx` runtime: ONNX Runtime sessions, choosing providers, sharing cores, and a graph's signature."""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy.typing as npt
import onnxruntime as ort
from pydantic import BaseModel, ConfigDict, Field

from sluice.server.config import ModelConfig, other_model_files
from sluice.server.plugins import LoadError, PluginContext, TensorSpec
from sluice.server.tensors import format_shape
from sluice.v1 import inference_pb2 as pb

__all__ = ["LoadError", "OnnxModel", "TensorSpec", "cuda_unavailable_reason", "resolve_providers"]

log = logging.getLogger("sluice.server")

_ORT_TYPES: dict[str, int] = {
    "tensor(bool)": pb.DATA_TYPE_BOOL,
    "tensor(uint8)": pb.DATA_TYPE_UINT8,
    "tensor(int8)": pb.DATA_TYPE_INT8,
    "tensor(uint16)": pb.DATA_TYPE_UINT16,
    "tensor(int16)": pb.DATA_TYPE_INT16,
    "tensor(uint32)": pb.DATA_TYPE_UINT32,
    "tensor(int32)": pb.DATA_TYPE_INT32,
    "tensor(uint64)": pb.DATA_TYPE_UINT64,
    "tensor(int64)": pb.DATA_TYPE_INT64,
    "tensor(float16)": pb.DATA_TYPE_FP16,
    "tensor(float)": pb.DATA_TYPE_FP32,
    "tensor(double)": pb.DATA_TYPE_FP64,
    "tensor(string)": pb.DATA_TYPE_STRING,
}


@functools.cache
def cuda_unavailable_reason() -> str | None:
    """Why CUDA cannot be used in this process, or None when it can.

    Loading ONNX Runtime's CUDA provider library ourselves gives the precise reason (a missing libcublas,
    say) in one line, instead of the error spam ONNX Runtime prints when a session falls back to CPU.
    """
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "this onnxruntime build has no CUDA execution provider (install onnxruntime-gpu)"
    capi = Path(ort.__file__).parent / "capi"
    try:
        ctypes.CDLL(str(capi / "libonnxruntime_providers_shared.so"), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(capi / "libonnxruntime_providers_cuda.so"))
    except OSError as exc:
        return f"the CUDA provider cannot load: {exc}"
    return None


def resolve_providers(choice: str, model: str) -> list[str]:
    """ONNX Runtime provider list for a config's `providers` choice."""
    if choice == "cpu":
        return ["CPUExecutionProvider"]
    reason = cuda_unavailable_reason()
    if choice == "cuda":
        if reason is not None:
            raise LoadError(f"execution.providers = 'cuda' but CUDA is unavailable: {reason}")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if reason is not None:
        _log_cpu_fallback(reason)
        return ["CPUExecutionProvider"]
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


@functools.cache
def _log_cpu_fallback(reason: str) -> None:
    log.info("CUDA unavailable, models with providers='auto' run on CPU: %s", reason)


def threads_per_session(total: int, sessions: int) -> int:
    """Splits the inference threads between all sessions so they do not oversubscribe the cores."""
    cores = total or os.cpu_count() or 1
    return max(1, cores // max(1, sessions))


class OnnxOptions(BaseModel):
    """Options of the `onnx` runtime."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str = Field(default="model.onnx", min_length=1, description="Model file in the version directory.")


class OnnxModel:
    """The `onnx` runtime: one model version, one ONNX Runtime session per instance."""

    Options = OnnxOptions

    def __init__(self, options: OnnxOptions, context: PluginContext) -> None:
        name, version, config = context.model, context.version, context.config
        path = context.version_dir / options.file
        threads, spinning = context.threads, context.spinning
        if not path.is_file():
            raise LoadError(f"{path}: no such file{other_model_files(path)}")
        self.name = name
        self.version = version
        self.config = config
        execution = config.execution
        self.providers_requested = resolve_providers(execution.providers, name)
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = execution.intra_op_threads or threads
        session_options.inter_op_num_threads = 1
        session_options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        session_options.log_severity_level = 3
        # Spinning pool threads answer a parallel section at once instead of being woken (about 1 ms saved
        # per run of a 50-op transformer here), but they burn a core between sections, which starves the
        # event loop when the model is small enough to run on it (see repository._build).
        session_options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        self.spinning = spinning
        provider_options: list[dict[str, str]] = [
            {"device_id": str(execution.cuda_device)} if p == "CUDAExecutionProvider" else {}
            for p in self.providers_requested
        ]
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise LoadError(f"{path}: cannot read: {exc.strerror or exc}") from None
        self.sessions: list[ort.InferenceSession] = []
        for _ in range(execution.instances):
            try:
                session = ort.InferenceSession(
                    data,
                    sess_options=session_options,
                    providers=self.providers_requested,
                    provider_options=provider_options,
                )
            except Exception as exc:  # ONNX Runtime raises several unrelated types for a bad file.
                raise LoadError(f"{path}: not a valid ONNX model: {_first_line(exc)}") from None
            # A provider failing at run time must fail the batch, not silently move the model to CPU.
            session.disable_fallback()
            self.sessions.append(session)
        self.providers: list[str] = list(self.sessions[0].get_providers())
        if execution.providers == "cuda" and "CUDAExecutionProvider" not in self.providers:
            raise LoadError("execution.providers = 'cuda' but ONNX Runtime could not create a CUDA session")
        self.inputs = _specs(self.sessions[0].get_inputs(), config, "inputs", path)
        self.outputs = _specs(self.sessions[0].get_outputs(), config, "outputs", path)
        self.instances = len(self.sessions)
        self.threads = session_options.intra_op_num_threads
        self._renamed_inputs = any(s.name != s.graph_name for s in self.inputs)
        self._graph_outputs = [s.graph_name for s in self.outputs]
        self._output_names = [s.name for s in self.outputs]

    def run(self, instance: int, feeds: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        """Runs one batch on one session; called in a worker thread (ONNX Runtime releases the GIL)."""
        session = self.sessions[instance]
        if self._renamed_inputs:
            feeds = {spec.graph_name: feeds[spec.name] for spec in self.inputs}
        results = session.run(self._graph_outputs, feeds)
        return dict(zip(self._output_names, results, strict=True))

    def close(self) -> None:
        """Nothing to do: the sessions are freed with the model."""

    def describe(self) -> str:
        inputs = ", ".join(f"{s.name}:{s.describe()}" for s in self.inputs)
        outputs = ", ".join(f"{s.name}:{s.describe()}" for s in self.outputs)
        return f"inputs=[{inputs}] outputs=[{outputs}]"


def _specs(nodes: Sequence[ort.NodeArg], config: ModelConfig, kind: str, path: Path) -> list[TensorSpec]:
    overrides = config.inputs if kind == "inputs" else config.outputs
    names = {node.name for node in nodes}
    for key in overrides:
        if key not in names:
            raise LoadError(
                f"config {kind}.{key}: the graph has no {kind[:-1]} '{key}' "
                f"(it has: {', '.join(sorted(names))})"
            )
    specs = []
    for node in nodes:
        datatype = _ORT_TYPES.get(node.type)
        if datatype is None:
            raise LoadError(
                f"{path}: {kind[:-1]} '{node.name}' has type {node.type}, which Sluice cannot serve"
                + (
                    "; this is the ZipMap of a scikit-learn classifier: export it without one, "
                    "skl2onnx.to_onnx(model, X, options={id(model): {'zipmap': False}}), to get a "
                    "probabilities tensor"
                    if node.type.startswith("seq(map(")
                    else ""
                )
            )
        shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in node.shape)
        override = overrides.get(node.name)
        public = node.name
        if override is not None:
            public = override.name or node.name
            if override.shape is not None:
                shape = _constrain(shape, override.shape, f"config {kind}.{node.name}.shape")
        specs.append(TensorSpec(public, datatype, shape, node.name))
    seen = set()
    for spec in specs:
        if spec.name in seen:
            raise LoadError(f"config {kind}: two {kind} are named '{spec.name}'")
        seen.add(spec.name)
    return specs


def _constrain(graph: tuple[int, ...], wanted: list[int], where: str) -> tuple[int, ...]:
    if len(wanted) != len(graph):
        raise LoadError(
            f"{where}: the graph's shape {format_shape(graph)} has rank {len(graph)}, "
            f"got {format_shape(wanted)}"
        )
    out = []
    for g, w in zip(graph, wanted, strict=True):
        if w < -1 or (g != -1 and w not in (-1, g)):
            raise LoadError(
                f"{where}: {format_shape(wanted)} does not fit the graph's shape {format_shape(graph)}"
            )
        out.append(g if w == -1 else w)
    return tuple(out)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
