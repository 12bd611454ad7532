"""Hostile sizes: a tiny request that declares a huge shape is refused before anything is allocated, on
both protocols and for sparse inputs; a rejected huge request does not outlive its call."""

from __future__ import annotations

import asyncio
import statistics
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest

from sluice.kserve.v2 import grpc_service_pb2 as kpb
from sluice.v1 import inference_pb2 as pb
from stress.harness import (
    MODEL_INFER,
    PREDICT,
    RAW,
    MiB,
    ServerProcess,
    code_of,
    echo_model,
    sluice_serve,
)

ONE_ELEMENT = struct.pack("<I", 1) + b"a"  # one STRING/BYTES element: its 4-byte length, then its byte
TRIES = 5
# The issue asks for an answer under 10 ms. A refusal takes about 1 ms here; on a shared 2-core machine a
# single try can take longer when another process has the CPU, so the median of 5 is compared with the
# median of cheap refusals (a raw tensor of 2**62 elements, refused from its byte count) timed in between.
MEDIAN_S = 0.010
# Peak RSS may move a little for the calls themselves; one element array of 2**23 objects is 64 MiB.
PEAK_GROWTH = 16 * MiB


@dataclass(frozen=True)
class Case:
    protocol: str  # "v1" or "kserve"
    kind: str  # how the contents come: raw, sparse (v1), contents (KServe typed contents)
    datatype: str  # BYTES, STRING or FP32
    shape: int

    def method(self) -> str:
        return PREDICT if self.protocol == "v1" else MODEL_INFER

    def body(self) -> bytes:
        model = self.datatype.lower()
        if self.protocol == "v1":
            return pb.PredictRequest(model=model, id="huge", inputs=[self._v1_tensor()]).SerializeToString()
        kind = "BYTES" if self.datatype in ("BYTES", "STRING") else self.datatype
        tensor = kpb.ModelInferRequest.InferInputTensor(name="x", datatype=kind, shape=[self.shape])
        request = kpb.ModelInferRequest(model_name=model, id="huge", inputs=[tensor])
        if self.kind == "raw":
            request.raw_input_contents.append(ONE_ELEMENT if kind == "BYTES" else b"\0\0\x80\x3f")
        elif kind == "BYTES":
            tensor = request.inputs[0]
            tensor.contents.bytes_contents.append(b"a")
        else:
            request.inputs[0].contents.fp32_contents.append(1.0)
        return request.SerializeToString()

    def _v1_tensor(self) -> pb.Tensor:
        datatype = pb.DataType.Value(f"DATA_TYPE_{self.datatype}")
        element = ONE_ELEMENT if self.datatype in ("BYTES", "STRING") else b"\0\0\x80\x3f"
        tensor = pb.Tensor(name="x", datatype=datatype, shape=[self.shape])
        if self.kind == "sparse":
            tensor.sparse.indices = struct.pack("<q", 0)
            tensor.sparse.values = element
        else:
            tensor.raw_contents = element
        return tensor

    def __str__(self) -> str:
        power = {2**63 - 1: "2**63-1", 2**62: "2**62", 2**40: "2**40", 2**23: "2**23"}[self.shape]
        return f"{self.protocol}-{self.kind}-{self.datatype}-[{power}]"


# Shapes are either huge (no allocation can succeed) or 2**23 (a 64 MiB object array, which today's server
# does allocate): nothing in between, where a bug would allocate gigabytes on a shared test machine.
HUGE = (2**63 - 1, 2**62, 2**40)
DENSE = (*HUGE, 2**23)


def _cases() -> Iterator[object]:
    for protocol, kind, datatype, shapes in [
        ("v1", "raw", "BYTES", DENSE),
        ("v1", "raw", "STRING", DENSE),
        ("v1", "raw", "FP32", DENSE),
        ("v1", "sparse", "BYTES", HUGE),  # a sparse shape of 2**23 may densify: it is within the limit
        ("v1", "sparse", "FP32", HUGE),
        ("kserve", "raw", "BYTES", DENSE),
        ("kserve", "raw", "FP32", DENSE),
        ("kserve", "contents", "BYTES", DENSE),
        ("kserve", "contents", "FP32", DENSE),
    ]:
        for shape in shapes:
            case = Case(protocol, kind, datatype, shape)
            yield pytest.param(case, id=str(case))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("sizes")
    repo = root / "models"
    repo.mkdir()
    for datatype in ("BYTES", "STRING", "FP32"):
        echo_model(repo, datatype.lower(), datatype)
    with sluice_serve(repo, root / "server.log") as running:
        yield running


@pytest.mark.parametrize("case", list(_cases()))
async def test_a_huge_declared_shape_with_a_tiny_body_is_refused_at_once(
    server: ServerProcess, case: Case
) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        call = channel.unary_unary(case.method(), **RAW)
        await _refusal(call, _small(case))  # the channel is up and warm before anything is timed
        server.reset_peak_rss()
        before = server.rss()
        seconds, baseline = [], []
        for _ in range(TRIES):
            # Interleaved with a refusal that is cheap by construction, so that what the machine's other
            # load costs both alike cancels out of the comparison.
            started = time.perf_counter()
            code, message = await _refusal(call, case.body())
            seconds.append(time.perf_counter() - started)
            assert code == "INVALID_ARGUMENT", f"{case}: {code} {message!r}"
            started = time.perf_counter()
            await _refusal(call, _small(case))
            baseline.append(time.perf_counter() - started)
        peak = server.peak_rss()
    assert server.alive()
    median, usual = statistics.median(seconds), statistics.median(baseline)
    assert peak - before < PEAK_GROWTH, f"{case}: peak RSS {(peak - before) / MiB:.0f} MiB over the start"
    assert median < usual + MEDIAN_S, (
        f"{case}: median answer {median * 1e3:.1f} ms against {usual * 1e3:.1f} ms for a cheap refusal "
        f"({[round(s * 1e3, 1) for s in seconds]})"
    )


def _small(case: Case) -> bytes:
    return Case(case.protocol, "raw", case.datatype, 2**62).body()


async def _refusal(call: Callable[..., object], body: bytes) -> tuple[str, str]:
    try:
        await call(body, timeout=30)  # type: ignore[misc]
    except grpc.aio.AioRpcError as error:
        return code_of(error), error.details() or ""
    return "OK", ""


HUNDRED_MIB = 100 * MiB
# The issue measured 15 requests and asks for 20; each costs about 0.75 s of transfer and parsing on 2 cores,
# so 6 keep the test at a few seconds, and 6 already hold over 1 GB today.
BIG_REQUESTS = 6


async def test_rejected_100_mib_requests_leave_rss_where_it_was(server: ServerProcess) -> None:
    rows = HUNDRED_MIB // 4
    x = pb.Tensor(name="x", datatype=pb.DATA_TYPE_FP32, shape=[rows], raw_contents=bytes(HUNDRED_MIB))
    body = pb.PredictRequest(model="fp32", id="big", inputs=[x]).SerializeToString()
    del x
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    async with grpc.aio.insecure_channel(server.address, options=options) as channel:
        predict = channel.unary_unary(PREDICT, **RAW)
        await _refusal(predict, _small(Case("v1", "raw", "FP32", 2**62)))
        before = await _settled(server)
        codes = [await _refusal(predict, body) for _ in range(BIG_REQUESTS)]
        after = await _settled(server)
    refused = [c for c, _ in codes if c == "RESOURCE_EXHAUSTED"]
    assert len(refused) == BIG_REQUESTS, f"expected {BIG_REQUESTS} RESOURCE_EXHAUSTED, got {codes[:3]}..."
    assert "max_message_bytes" in codes[0][1], codes[0]
    assert after < before * 1.10, (
        f"server RSS {before / MiB:.0f} -> {after / MiB:.0f} MiB after {BIG_REQUESTS} rejected 100 MiB requests "
        "(more than 10% over the start)"
    )


async def _settled(server: ServerProcess, limit_s: float = 5.0) -> int:
    """RSS once two samples 0.2 s apart agree within 1 MiB (at most `limit_s`): the server is idle."""
    end = time.monotonic() + limit_s
    last = server.rss()
    while time.monotonic() < end:
        await asyncio.sleep(0.2)
        now = server.rss()
        if abs(now - last) < MiB:
            return now
        last = now
    return last


def test_cases_cover_both_protocols_and_sparse() -> None:
    ids = {str(p.values[0]) for p in _cases()}  # type: ignore[attr-defined]
    assert {i.split("-")[0] for i in ids} == {"v1", "kserve"}
    assert any("sparse" in i for i in ids)
    assert any("contents" in i for i in ids)
