"""Shared test helpers: tiny ONNX models made on the fly, repositories, and request builders."""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
import struct
import sys
import threading
import urllib.request
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from types import ModuleType

import grpc
import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from sluice.clients.codec import to_array as decode_tensor
from sluice.clients.codec import to_tensor
from sluice.server.app import SluiceServer
from sluice.server.settings import ServerSettings
from sluice.v1 import inference_pb2 as pb
from sluice.v1 import inference_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
DIGITS_DIR = ROOT / "examples" / "models" / "digits"
DIGITS_ONNX = DIGITS_DIR / "1" / "model.onnx"


def train_digits_module() -> ModuleType:
    """examples/train_digits.py, imported by path (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location("train_digits", ROOT / "examples" / "train_digits.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _graph(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    initializers: Sequence[onnx.TensorProto] = (),
) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "test", list(inputs), list(outputs), list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def add_model(constant: float) -> onnx.ModelProto:
    """y = x + constant, FP32 [N, 4]: tells versions apart by their output."""
    c = numpy_helper.from_array(np.full((4,), constant, dtype=np.float32), "c")
    return _graph(
        [helper.make_node("Add", ["x", "c"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [c],
    )


def strings_model() -> onnx.ModelProto:
    """Echoes a STRING [N, 2] input, and counts its rows as an INT64 output."""
    return _graph(
        [helper.make_node("Identity", ["text"], ["echo"])],
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["N", 2])],
        [helper.make_tensor_value_info("echo", TensorProto.STRING, ["N", 2])],
    )


def two_inputs_model() -> onnx.ModelProto:
    """sum = a + b (FP32 [N, 3]) and ids passed through (INT64 [N]): for missing/unknown input checks."""
    return _graph(
        [helper.make_node("Add", ["a", "b"], ["sum"]), helper.make_node("Identity", ["ids"], ["ids_out"])],
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["N"]),
        ],
        [
            helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("ids_out", TensorProto.INT64, ["N"]),
        ],
    )


def slow_model(size: int = 1024, layers: int = 24) -> onnx.ModelProto:
    """A chain of square MatMuls sharing one weight: a run takes long enough to be in flight on purpose.

    256 rows through 96 layers is about 50 GFLOP: most of a second on a 2-core machine.
    """
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((size, size)) / np.sqrt(size)).astype(np.float32), "w")
    nodes = []
    prev = "x"
    for i in range(layers):
        out = "y" if i == layers - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, "w"], [out]))
        prev = out
    return _graph(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", size])],
        [w],
    )


def add_digits(repo: Path, name: str = "digits") -> Path:
    """Copies the bundled digits model (config and version 1) into a test repository."""
    target = repo / name
    shutil.copytree(DIGITS_DIR, target)
    return target


def tensor(name: str, array: npt.ArrayLike) -> pb.Tensor:
    return to_tensor(name, array)


def request(
    model: str, id: str = "", version: int | None = None, **inputs: npt.ArrayLike
) -> pb.PredictRequest:
    req = pb.PredictRequest(model=model, id=id, inputs=[tensor(n, a) for n, a in inputs.items()])
    if version is not None:
        req.version = version
    return req


def to_array(t: pb.Tensor) -> npt.NDArray[np.generic]:
    """Decodes a response tensor the way a client would."""
    return decode_tensor(t)


def outputs(response: pb.PredictResponse) -> dict[str, npt.NDArray[np.generic]]:
    return {t.name: to_array(t) for t in response.outputs}


def string_bytes(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(i)) + i for i in items)


def doubler_model() -> onnx.ModelProto:
    """y = 2 * x for x FP32 [N, L] with L free: rows of different lengths can be padded into one batch."""
    two = numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two")
    return _graph(
        [helper.make_node("Mul", ["x", "two"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "L"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "L"])],
        [two],
    )


@asynccontextmanager
async def serving(
    repo: Path, *, metrics: bool = False
) -> AsyncIterator[tuple[SluiceServer, grpc.aio.Channel]]:
    """A server on `repo` (ephemeral port; metrics only when asked), once loading has ended, and a channel."""
    server = SluiceServer(
        ServerSettings(
            model_repository=repo, port=0, metrics_port=0 if metrics else -1, http_port=-1, grace_period_s=5
        )
    )
    await server.start()
    try:
        await server.loaded()
        async with grpc.aio.insecure_channel(server.address) as channel:
            yield server, channel
    finally:
        await server.stop(0)


@asynccontextmanager
async def serving_stub(repo: Path) -> AsyncIterator[pb_grpc.InferenceStub]:
    """`serving`, for a test that needs only an Inference stub."""
    async with serving(repo) as (_, channel):
        yield pb_grpc.InferenceStub(channel)


def signature(specs: Sequence[pb.TensorSpec]) -> list[tuple[str, int, list[int]]]:
    """A signature as (name, datatype, shape) tuples, for comparing with a literal."""
    return [(s.name, s.datatype, list(s.shape)) for s in specs]


async def failure(stub: pb_grpc.InferenceStub, req: pb.PredictRequest) -> grpc.aio.AioRpcError:
    """The error a Predict call must end with."""
    try:
        await stub.Predict(req)
    except grpc.aio.AioRpcError as error:
        return error
    raise AssertionError(f"Predict {req.model!r} succeeded; an error was expected")


def scrape(server: SluiceServer) -> dict[str, float]:
    """The server's metrics endpoint as {sample with labels: value}."""
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


async def sluice(*args: str, cwd: Path | None = None) -> tuple[int, str, str]:
    """Runs the `sluice` command as the console script does; returns its exit code, stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sluice.server.cli", *args, cwd=cwd,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


class RunGate:
    """Holds the runs of a test's python-runtime model in flight and counts them, per model object.

    The model's `predict` (or `load`) runs `with support.GATE.inside(self):` (tests/ is on the server's
    sys.path in process); runs pass while `go` is set and wait while it is clear.
    """

    def __init__(self) -> None:
        self.go = threading.Event()
        self.go.set()
        self.entered = 0
        self.most = 0  # the most runs seen at once on one object
        self.closed = 0  # calls of the model objects' close()
        self._running: dict[int, int] = {}
        self._lock = threading.Lock()

    @contextmanager
    def inside(self, owner: object) -> Iterator[None]:
        with self._lock:
            self.entered += 1
            now = self._running[id(owner)] = self._running.get(id(owner), 0) + 1
            self.most = max(self.most, now)
        try:
            if not self.go.wait(30):
                raise TimeoutError("the test never let the run go")
            yield
        finally:
            with self._lock:
                self._running[id(owner)] -= 1


GATE = RunGate()
"""The gate a test model's runs pass; a test that holds runs makes a fresh one first."""
