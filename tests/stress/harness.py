"""Stress-test harness: a real `sluice serve` subprocess, a ledger of every call, and cheap held-back models.

The server runs in its own process so that its RSS, file descriptors and threads are its own, so that a
signal reaches it as it would in production, and so that a leak or a crash cannot take the test runner with
it. Requests are serialized once and sent as bytes over generic calls: the client stays cheap next to the
server it measures.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sluice.kserve.v2 import grpc_service_pb2 as kpb
from sluice.v1 import inference_pb2 as pb

MiB = 1024 * 1024

PREDICT = "/sluice.v1.Inference/Predict"
STREAM_PREDICT = "/sluice.v1.Inference/StreamPredict"
HEALTH = "/sluice.v1.Inference/Health"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"

# Generic calls carry bytes both ways: nothing is parsed on the client's side.
RAW: dict[str, Any] = {"request_serializer": None, "response_deserializer": None}


# --------------------------------------------------------------------------------------------------------
# The server process


@dataclass
class ServerProcess:
    """A running `sluice serve` subprocess: its address, its resources, and a way to signal it."""

    process: subprocess.Popen[bytes]
    address: str
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def _status(self, key: str) -> int:
        # /proc/PID/status lines read "VmRSS:\t  123456 kB" and "Threads:\t12".
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise KeyError(f"{key} not in /proc/{self.pid}/status")

    def rss(self) -> int:
        """Resident memory now, in bytes."""
        return self._status("VmRSS") * 1024

    def peak_rss(self) -> int:
        """The highest resident memory since start or since `reset_peak_rss`, in bytes: catches an
        allocation that was freed before anyone looked."""
        return self._status("VmHWM") * 1024

    def reset_peak_rss(self) -> None:
        """Sets the peak back to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
        with open(f"/proc/{self.pid}/clear_refs", "w") as refs:
            refs.write("5")

    def threads(self) -> int:
        return self._status("Threads")

    def fds(self) -> int:
        """Open file descriptors (sockets included)."""
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def alive(self) -> bool:
        return self.process.poll() is None

    def signal(self, sig: signal.Signals = signal.SIGTERM) -> float:
        """Sends `sig`; returns the monotonic time it was sent, for the ledger."""
        sent = time.monotonic()
        self.process.send_signal(sig)
        return sent

    def wait(self, timeout: float) -> int | None:
        """Exit code, or None if still running after `timeout` seconds."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def health(self, timeout: float = 5.0) -> str:
        """grpc.health.v1 state of the whole server ("" service), on a fresh channel."""
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def _read_lines(stream: IO[bytes], lines: queue.Queue[str]) -> None:
    for raw in stream:
        lines.put(raw.decode(errors="replace").rstrip("\n"))


@contextlib.contextmanager
def sluice_serve(
    repo: Path, log: Path, *, settings: Mapping[str, object] | None = None, ready_timeout: float = 60.0
) -> Iterator[ServerProcess]:
    """Starts `sluice serve repo` on port 0 with `SLUICE_*` settings, waits until it answers SERVING, and
    kills it on the way out whatever happened."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    env.update({"SLUICE_PORT": "0", "SLUICE_METRICS_PORT": "-1", "SLUICE_REFLECTION": "false"})
    env.update({f"SLUICE_{k.upper()}": str(v) for k, v in (settings or {}).items()})
    with open(log, "wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "sluice.server.cli", "serve", str(repo)],
            stdout=subprocess.PIPE,
            stderr=err,
            env=env,
        )
    assert process.stdout is not None
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=_read_lines, args=(process.stdout, lines), daemon=True)
    reader.start()
    try:
        address = _listening(process, lines, log, ready_timeout)
        server = ServerProcess(process, address, log)
        _wait_serving(server, ready_timeout)
        yield server
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)
        reader.join(5)  # the pipe is at its end once the process is gone
        process.stdout.close()


def _listening(process: subprocess.Popen[bytes], lines: queue.Queue[str], log: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=min(left, 0.5))
        except queue.Empty:
            if process.poll() is not None:
                break
            continue
        if line.startswith("listening on "):
            return line.removeprefix("listening on ")
    raise AssertionError(f"sluice serve did not say where it listens; its log:\n{log.read_text()[-3000:]}")


def _wait_serving(server: ServerProcess, timeout: float) -> None:
    # Watch answers at once with the current state and again on every change: no polling.
    with grpc.insecure_channel(server.address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=timeout
        )
        try:
            for reply in watch:
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError as error:
            raise AssertionError(
                f"the server never became SERVING ({error}); its log:\n{server.log_text()[-3000:]}"
            ) from None
        finally:
            watch.cancel()
    raise AssertionError(f"the server's health watch ended early; its log:\n{server.log_text()[-3000:]}")


# --------------------------------------------------------------------------------------------------------
# The ledger: every call by id, when it started, and how it ended


UNFINISHED = "UNFINISHED"


@dataclass
class Call:
    id: str
    started: float
    code: str = UNFINISHED
    message: str = ""


@dataclass
class Ledger:
    """Every call by id with its start time and final status; marks name moments such as a signal."""

    calls: dict[str, Call] = field(default_factory=dict)
    marks: dict[str, float] = field(default_factory=dict)

    def start(self, call_id: str) -> Call:
        assert call_id not in self.calls, f"call id {call_id!r} used twice"
        call = self.calls[call_id] = Call(call_id, time.monotonic())
        return call

    def end(self, call_id: str, code: grpc.StatusCode | str, message: str = "") -> None:
        call = self.calls[call_id]
        assert call.code == UNFINISHED, f"call {call_id!r} ended twice ({call.code}, then {code})"
        call.code = code if isinstance(code, str) else code.name
        call.message = message

    def end_with(self, call_id: str, error: BaseException) -> None:
        """Records how a call failed: its gRPC status, or the Python exception if it never got one."""
        if isinstance(error, grpc.RpcError):
            self.end(call_id, error.code(), error.details() or "")  # type: ignore[attr-defined]
        else:
            self.end(call_id, f"{type(error).__name__}", str(error))

    def mark(self, name: str, at: float | None = None) -> float:
        self.marks[name] = time.monotonic() if at is None else at
        return self.marks[name]

    def select(self, *, before: str | None = None, after: str | None = None) -> list[Call]:
        """Calls started before the mark `before` and/or at or after the mark `after`."""
        chosen = list(self.calls.values())
        if before is not None:
            chosen = [c for c in chosen if c.started < self.marks[before]]
        if after is not None:
            chosen = [c for c in chosen if c.started >= self.marks[after]]
        return chosen

    def statuses(self, *, before: str | None = None, after: str | None = None) -> Counter[str]:
        return Counter(c.code for c in self.select(before=before, after=after))

    def report(self, calls: Collection[Call] | None = None, examples: int = 3) -> str:
        """The Counter of statuses and a few messages of each, for a failure message."""
        calls = list(self.calls.values()) if calls is None else list(calls)
        counts = Counter(c.code for c in calls)
        lines = [f"{len(calls)} calls: {dict(counts.most_common())}"]
        for code in counts:
            seen = [c for c in calls if c.code == code][:examples]
            for call in seen:
                if call.message:
                    lines.append(f"  {code} {call.id}: {call.message[:200]}")
        return "\n".join(lines)

    def assert_none(
        self, codes: Collection[str], *, before: str | None = None, after: str | None = None, what: str = ""
    ) -> None:
        """0 calls (of those selected) ended with any of `codes`."""
        chosen = self.select(before=before, after=after)
        bad = [c for c in chosen if c.code in codes]
        assert not bad, f"{len(bad)} {what or 'calls'} ended {sorted(set(codes))}:\n{self.report(chosen)}"

    def assert_only(
        self, codes: Collection[str], *, before: str | None = None, after: str | None = None, what: str = ""
    ) -> None:
        """Every call (of those selected) ended with one of `codes`: none other, none unfinished."""
        chosen = self.select(before=before, after=after)
        bad = [c for c in chosen if c.code not in codes]
        assert not bad, (
            f"{len(bad)} {what or 'calls'} ended other than {sorted(set(codes))}:\n{self.report(chosen)}"
        )


# --------------------------------------------------------------------------------------------------------
# Models and requests


def python_model(
    repo: Path,
    name: str,
    code: str,
    *,
    inputs: str = '[{ name = "x", datatype = "FP32", shape = [-1, 4] }]',
    outputs: str = '[{ name = "y", datatype = "FP32", shape = [-1, 4] }]',
    max_batch_size: int = 64,
    max_queue_rows: int | None = None,
    max_delay_ms: float = 1.0,
) -> Path:
    """A `python`-runtime model `name` in `repo` whose class `Model` is `code`; run off the event loop so
    that a model that waits never stalls the server."""
    version = repo / name / "1"
    version.mkdir(parents=True)
    (version / "model.py").write_text(textwrap.dedent(code))
    queue_rows = "" if max_queue_rows is None else f"max_queue_rows = {max_queue_rows}\n"
    (repo / name / "config.toml").write_text(
        f'[runtime]\nname = "python"\ninputs = {inputs}\noutputs = {outputs}\n\n'
        f'[batching]\nmax_batch_size = {max_batch_size}\nmax_delay_ms = {max_delay_ms}\npolicy = "fixed"\n'
        f"{queue_rows}\n[execution]\ninline_max_us = 0\n"
    )
    return repo / name


def sleepy_model(
    repo: Path, name: str = "sleepy", *, sleep_s: float = 0.005, width: int = 4, **kw: Any
) -> Path:
    """x FP32 [-1, 4] -> y FP32 [-1, width] (zeros): each batch sleeps `sleep_s`, so calls stay in flight
    without using the CPU."""
    code = f"""
    import time

    import numpy as np


    class Model:
        def predict(self, batch):
            time.sleep({sleep_s!r})
            return {{"y": np.zeros((len(batch["x"]), {width}), dtype=np.float32)}}
    """
    outputs = f'[{{ name = "y", datatype = "FP32", shape = [-1, {width}] }}]'
    return python_model(repo, name, code, outputs=outputs, **kw)


def gated_model(repo: Path, gate: Path, name: str = "gated", *, limit_s: float = 60.0, **kw: Any) -> Path:
    """x FP32 [-1, 4] -> y: a batch holding a non-zero row waits until the file `gate` exists (at most
    `limit_s`), so a test holds any number of calls in flight and releases them by creating the file. The
    server's own warm-up sends zeros, which pass."""
    code = f"""
    import pathlib
    import time

    import numpy as np

    GATE = pathlib.Path({str(gate)!r})


    class Model:
        def predict(self, batch):
            end = time.monotonic() + {limit_s!r}
            while batch["x"].any() and not GATE.exists():
                if time.monotonic() > end:
                    raise TimeoutError("the test never opened the gate")
                time.sleep(0.002)
            return {{"y": np.asarray(batch["x"], dtype=np.float32)}}
    """
    return python_model(repo, name, code, **kw)


def echo_model(repo: Path, name: str, datatype: str) -> Path:
    """One input `x` of `datatype` [-1] -> `n` INT64 [-1]: a model that any well-formed tensor reaches."""
    code = """
    import numpy as np


    class Model:
        def predict(self, batch):
            return {"n": np.arange(len(batch["x"]), dtype=np.int64)}
    """
    inputs = f'[{{ name = "x", datatype = "{datatype}", shape = [-1] }}]'
    outputs = '[{ name = "n", datatype = "INT64", shape = [-1] }]'
    return python_model(repo, name, code, inputs=inputs, outputs=outputs)


ONE = b"\x00\x00\x80\x3f"  # 1.0 as little-endian FP32


def predict_bytes(model: str, call_id: str, rows: int = 1, width: int = 4) -> bytes:
    """A serialized Predict of `rows` rows of FP32 ones [rows, width] as input `x` (ones: a gated model
    holds them)."""
    raw = ONE * (rows * width)
    x = pb.Tensor(name="x", datatype=pb.DATA_TYPE_FP32, shape=[rows, width], raw_contents=raw)
    return pb.PredictRequest(model=model, id=call_id, inputs=[x]).SerializeToString()


def infer_bytes(model: str, call_id: str, rows: int = 1, width: int = 4) -> bytes:
    """The KServe ModelInfer equivalent of `predict_bytes`."""
    x = kpb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[rows, width])
    raw = [ONE * (rows * width)]
    request = kpb.ModelInferRequest(model_name=model, id=call_id, inputs=[x], raw_input_contents=raw)
    return request.SerializeToString()


def code_of(error: grpc.RpcError) -> str:
    return str(error.code().name)  # type: ignore[attr-defined]


def stream_answer(raw: bytes) -> tuple[str, str, str]:
    """(id, status name, message) of one serialized StreamPredictResponse."""
    answer = pb.StreamPredictResponse.FromString(raw)
    return answer.id, grpc.StatusCode.OK.name if answer.code == 0 else _code_name(answer.code), answer.message


def _code_name(value: int) -> str:
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return str(code.name)
    return f"code {value}"


def bounded(seconds: float) -> Callable[[], bool]:
    """A clock for loops: returns True until `seconds` have passed."""
    end = time.monotonic() + seconds
    return lambda: time.monotonic() < end
