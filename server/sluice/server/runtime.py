"""The `onnx` runtime: ONNX Runtime sessions, choosing providers, sharing cores, and a graph's signature.

Sluice loads it through its entry point (`sluice.runtimes`: `onnx`), like any third-party runtime: nothing
else in the server imports this module or onnxruntime. Its thread budget and spin policy live here, decided
from the neutral facts of `PluginContext` and the `tune` hook; the core applies the config's renames and shape
constraints to the graph's signature, as for every runtime.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy.typing as npt
import onnxruntime as ort
from pydantic import BaseModel, ConfigDict, Field

from sluice.server.config import other_model_files
from sluice.server.plugins import LoadError, PluginContext, TensorSpec
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


class OnnxOptions(BaseModel):
    """Options of the `onnx` runtime."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str = Field(default="model.onnx", min_length=1, description="Model file in the version directory.")


class OnnxModel:
    """The `onnx` runtime: one model version, one ONNX Runtime session per instance.

    With `execution.elastic_threads` (CPU, one instance, two or more threads, a model that runs in worker
    threads), the model has two sessions: a wide one with every thread, for a batch that runs alone, and a
    narrow one with one thread, which any number of runs share at once (a session without a thread pool can
    run concurrently). The instance count becomes the thread count. Under a deep queue, runs on one thread
    each beat one run on all of them: a run's threads meet at the end of every parallel section, and on a
    machine that also runs the event loop and the network one pre-empted thread holds up the others (MiniLM
    at 64 callers on 2 cores: +3 to +13% rows/s). With few callers of short runs it loses (8 callers at
    sequence length 16: -16%), hence off by default (docs/scale.md). One caller keeps the wide session, so
    its latency is that of all the threads.
    """

    Options = OnnxOptions

    def __init__(self, options: OnnxOptions, context: PluginContext) -> None:
        name, version, config = context.model, context.version, context.config
        self._path = context.version_dir / options.file
        self._shown = path = context.display(self._path)
        if not self._path.is_file():
            raise LoadError(f"{path}: no such file{other_model_files(self._path)}")
        self.name = name
        self.version = version
        self.config = config
        execution = config.execution
        self.providers_requested = resolve_providers(execution.providers, name)
        # The config's count, or an even share of the server's inference threads between all sessions.
        self.threads = execution.intra_op_threads or context.threads
        self._spin = execution.spin
        self.spinning = self._spin != "off"
        self.loop_safe = True  # a run computes and ends: a lone caller's may run on the event loop
        self.sessions = self._open(path)
        self._narrow: ort.InferenceSession | None = None
        """The one-thread session of elastic threads; None when the model is not elastic."""
        self._running = 0
        self._lock = threading.Lock()
        self.providers: list[str] = list(self.sessions[0].get_providers())
        if execution.providers == "cuda" and "CUDAExecutionProvider" not in self.providers:
            raise LoadError("execution.providers = 'cuda' but ONNX Runtime could not create a CUDA session")
        self.inputs = _specs(self.sessions[0].get_inputs(), "inputs", path)
        self.outputs = _specs(self.sessions[0].get_outputs(), "outputs", path)
        self.instances = len(self.sessions)
        self._output_names = [s.name for s in self.outputs]

    def _open(self, path: str, threads: int = 0, count: int = 0) -> list[ort.InferenceSession]:
        """`count` sessions (default: one per instance) of `threads` threads (default: this runtime's), with
        its spinning; `path` as reasons show it."""
        execution = self.config.execution
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = threads or self.threads
        session_options.inter_op_num_threads = 1
        session_options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        session_options.log_severity_level = 3
        # Spinning pool threads answer a parallel section at once instead of being woken (about 1 ms saved
        # per run of a 50-op transformer here), but they burn a core between sections, which starves the
        # event loop when the model is small enough to run on it (see `tune`).
        allow = "1" if self.spinning else "0"
        session_options.add_session_config_entry("session.intra_op.allow_spinning", allow)
        # Pool threads otherwise go on spinning for tens of ms after a run ends (about 30 ms of CPU after
        # each sparse request here); with "runs" they stop as the last run in flight returns.
        stop = "1" if self._spin == "runs" else "0"
        session_options.add_session_config_entry("session.force_spinning_stop", stop)
        provider_options: list[dict[str, str]] = [
            {"device_id": str(execution.cuda_device)} if p == "CUDAExecutionProvider" else {}
            for p in self.providers_requested
        ]
        try:
            data = self._path.read_bytes()
        except OSError as exc:
            raise LoadError(f"{path}: cannot read: {exc.strerror or exc}") from None
        sessions: list[ort.InferenceSession] = []
        for _ in range(count or execution.instances):
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
            sessions.append(session)
        return sessions

    @property
    def spins_after_runs(self) -> bool:
        """Whether the pool threads go on spinning after a run ends (for tens of ms; not with "runs")."""
        return self.spinning and self._spin != "runs" and self.threads > 1

    def tune(self, inline: bool) -> bool:
        """Told whether one-row batches run on the event loop: `execution.spin = "auto"` stops spinning
        there, and elastic threads start where they do not.

        Spinning pool threads would take the loop's core. Session options are fixed once a session is made,
        so the sessions are made again; such a model is small, so that costs little. Runs on the event loop
        never overlap, so elastic threads only pay for models that run in worker threads. Returns whether it
        changed anything, so that the server warms and measures the new sessions (and, with elastic
        threads, runs more batches at once).
        """
        changed = False
        if self._spin == "auto" and self.spinning and inline:
            self.spinning = False
            self.sessions = self._open(self._shown)
            changed = True
        execution = self.config.execution
        if (
            not inline
            and execution.elastic_threads
            and execution.instances == 1
            and self.threads >= 2
            and self._narrow is None
            and self.providers == ["CPUExecutionProvider"]
        ):
            self._narrow = self._open(self._shown, threads=1, count=1)[0]
            self.instances = self.threads
            log.info(
                "model %s version %d: elastic threads: a batch alone runs on %d threads; under load up to %d "
                "run at once on one thread each (execution.elastic_threads)",
                self.name, self.version, self.threads, self.threads,
            )  # fmt: skip
            changed = True
        return changed

    def run(self, instance: int, feeds: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        """Runs one batch on one session; called in a worker thread (ONNX Runtime releases the GIL).

        With elastic threads, instance 0 runs on the wide session while no other run is in flight (the
        batcher gives a batch the lowest free instance, so a batch alone is always instance 0), and every
        other run on the narrow one; warming each instance up warms both.
        """
        narrow = self._narrow
        if narrow is None:
            return self._run(self.sessions[instance], feeds)
        with self._lock:
            alone = instance == 0 and self._running == 0
            self._running += 1
        try:
            return self._run(self.sessions[0] if alone else narrow, feeds)
        finally:
            with self._lock:
                self._running -= 1

    def _run(self, session: ort.InferenceSession, feeds: Mapping[str, npt.NDArray[Any]]) -> dict[str, Any]:
        # The binding under InferenceSession.run: its Python wrapper re-checks the input names (done here
        # once per request by the data plane) and costs about 3 us per run, most of a small model's run.
        core = getattr(session, "_sess", None)
        if core is not None:
            results = core.run(self._output_names, feeds, None)
        else:
            results = session.run(self._output_names, feeds)
        return dict(zip(self._output_names, results, strict=True))

    def close(self) -> None:
        """Lets go of the sessions, so an unloaded version's memory is freed even if something still holds
        this runtime."""
        self.sessions = []
        self._narrow = None

    def describe(self) -> str:
        inputs = ", ".join(f"{s.name}:{s.describe()}" for s in self.inputs)
        outputs = ", ".join(f"{s.name}:{s.describe()}" for s in self.outputs)
        return f"inputs=[{inputs}] outputs=[{outputs}]"


def _specs(nodes: Sequence[ort.NodeArg], kind: str, path: str) -> list[TensorSpec]:
    """The graph's own names and shapes; the core applies the config's overrides to them."""
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
        specs.append(TensorSpec(node.name, datatype, shape))
    return specs


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
