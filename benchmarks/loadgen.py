"""Load generator for a Sluice server (or benchmarks/echo_server.py) over grpc.aio.

Closed loop (``--concurrency C``: C requests always in flight) or open loop (``--rate R``: Poisson arrivals
at R requests/s, latency counted from the planned send time so a slow server cannot hide queueing). The load
comes from ``--processes P`` client processes, each with its own event loop and channel(s), because one Python
process tops out well below what a server can take. Reports requests/s, rows/s, latency percentiles, errors by
status code, the client's own CPU cost per request and, with ``--metrics-url``, the batch sizes the server
actually formed (from its ``sluice_batch_rows`` histogram).

Calls speak ``--protocol sluice`` (``sluice.v1`` Predict) or ``kserve`` (``ModelInfer`` on the same port). By
default (``--client raw``) each call sends the request serialized once, over a generic unary-unary call with
identity serializers, and does not parse the answer: the cheapest client Python has, so the client takes as
little as it can of the CPU it shares with the server. ``--client stub`` uses the generated stubs instead
(serialize and parse on every call), as a typical Python caller would.

Run: ``PYTHONPATH=proto python benchmarks/loadgen.py --target 127.0.0.1:PORT --model digits --concurrency 8``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import math
import multiprocessing as mp
import random
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from sluice.kserve.v2 import grpc_service_pb2 as kserve_pb2
from sluice.v1 import inference_pb2, inference_pb2_grpc

METHODS = {"sluice": "/sluice.v1.Inference/Predict", "kserve": "/inference.GRPCInferenceService/ModelInfer"}
STREAMS = {
    "sluice": "/sluice.v1.Inference/StreamPredict",
    "kserve": "/inference.GRPCInferenceService/ModelStreamInfer",
}
MESSAGES: dict[str, tuple[Any, Any]] = {
    "sluice": (inference_pb2.PredictRequest, inference_pb2.PredictResponse),
    "kserve": (kserve_pb2.ModelInferRequest, kserve_pb2.ModelInferResponse),
}

NUMPY_TYPES: dict[str, type[np.generic]] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "INT8": np.int8,
    "UINT16": np.uint16,
    "INT16": np.int16,
    "UINT32": np.uint32,
    "INT32": np.int32,
    "UINT64": np.uint64,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
BATCH_METRIC = "sluice_batch_rows"
LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


@dataclass(frozen=True)
class InputSpec:
    """One input tensor to send: the shape has the batch (rows) dimension first."""

    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class WorkerPlan:
    """What one client process does; everything is picklable so it crosses the process boundary."""

    index: int
    target: str
    model: str
    request_bytes: bytes
    protocol: str
    raw: bool
    stream: bool
    concurrency: int
    rate: float
    max_in_flight: int
    channels: int
    warmup_s: float
    duration_s: float | None
    requests: int | None
    timeout_s: float
    seed: int


@dataclass
class WorkerResult:
    """Counts and latencies of one client process, for the measured window only."""

    latencies_ms: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    window_s: float = 0.0
    cpu_s: float = 0.0
    late_starts: int = 0


# ---------------------------------------------------------------------------------------------- inputs


def parse_input_shape(text: str) -> InputSpec:
    """Parse ``name:FP32:1x64``; the first dimension is the batch and ``--rows`` replaces it."""
    try:
        name, dtype, dims = text.split(":")
        shape = tuple(int(d) for d in dims.lower().split("x"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"expected NAME:TYPE:DIMxDIM (e.g. pixels:FP32:1x64), got {text!r}"
        ) from err
    dtype = dtype.upper().removeprefix("DATA_TYPE_")
    if dtype not in NUMPY_TYPES:
        raise argparse.ArgumentTypeError(f"type {dtype!r} is not one of {', '.join(NUMPY_TYPES)}")
    return InputSpec(name, dtype, shape)


def specs_from_health(target: str, model: str, timeout_s: float) -> list[InputSpec]:
    """Read the model's inputs from the server's Health answer (highest ready version)."""

    async def ask() -> inference_pb2.HealthResponse:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            return await stub.Health(inference_pb2.HealthRequest(model=model), timeout=timeout_s or 10.0)

    health = asyncio.run(ask())
    for status in health.models:
        if status.name != model:
            continue
        for version in status.versions:  # highest first
            if version.state == inference_pb2.MODEL_STATE_READY and version.inputs:
                return [
                    InputSpec(
                        spec.name,
                        inference_pb2.DataType.Name(spec.datatype).removeprefix("DATA_TYPE_"),
                        tuple(spec.shape),
                    )
                    for spec in version.inputs
                ]
    raise SystemExit(f"error: Health of {target} lists no ready version of {model!r} with inputs")


def make_request(
    model: str, specs: list[InputSpec], rows: int, seed: int, protocol: str = "sluice"
) -> inference_pb2.PredictRequest | kserve_pb2.ModelInferRequest:
    """Build the one request every call reuses; dynamic dimensions become ``rows`` (batch) or 1."""
    rng = np.random.default_rng(seed)
    tensors = []
    kserve = kserve_pb2.ModelInferRequest(model_name=model)
    for spec in specs:
        shape = [rows if i == 0 else (d if d > 0 else 1) for i, d in enumerate(spec.shape)]
        np_type = NUMPY_TYPES[spec.dtype]
        if np.issubdtype(np_type, np.floating):
            # 0..16 covers the digits model's pixel range and is harmless for any other float model.
            array: np.ndarray[Any, Any] = rng.uniform(0.0, 16.0, size=shape).astype(np_type)
        elif np_type is np.bool_:
            array = rng.integers(0, 2, size=shape).astype(np.bool_)
        else:
            array = rng.integers(0, 16, size=shape).astype(np_type)
        raw = array.astype(array.dtype.newbyteorder("<")).tobytes(order="C")
        kserve.inputs.add(name=spec.name, datatype=spec.dtype, shape=shape)
        kserve.raw_input_contents.append(raw)
        tensors.append(
            inference_pb2.Tensor(
                name=spec.name,
                datatype=inference_pb2.DataType.Value(f"DATA_TYPE_{spec.dtype}"),
                shape=shape,
                raw_contents=raw,
            )
        )
    if protocol == "kserve":
        return kserve
    return inference_pb2.PredictRequest(model=model, inputs=tensors)


# ---------------------------------------------------------------------------------------------- metrics


def scrape_batch_rows(url: str, model: str) -> tuple[float, float, dict[float, float]] | None:
    """Return (sum, count, cumulative buckets) of ``sluice_batch_rows`` for the model; None if unavailable."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url, timeout=5.0) as answer:
            text = answer.read().decode("utf-8")
    except (OSError, urllib.error.URLError) as err:
        print(f"warning: cannot read metrics from {url}: {err}", file=sys.stderr)
        return None
    total = count = 0.0
    buckets: dict[float, float] = {}
    found = False
    for family in text_string_to_metric_families(text):
        if family.name != BATCH_METRIC:
            continue
        for sample in family.samples:
            if sample.labels.get("model", model) != model:
                continue
            found = True
            if sample.name.endswith("_sum"):
                total += sample.value
            elif sample.name.endswith("_count"):
                count += sample.value
            elif sample.name.endswith("_bucket"):
                bound = float(sample.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
    if not found:
        print(f"warning: {url} has no {BATCH_METRIC} samples for model {model!r}", file=sys.stderr)
        return None
    return total, count, buckets


def batch_report(
    before: tuple[float, float, dict[float, float]] | None,
    after: tuple[float, float, dict[float, float]] | None,
) -> dict[str, Any] | None:
    """Mean rows per batch over the run, from the difference of two scrapes."""
    if before is None or after is None:
        return None
    batches = after[1] - before[1]
    rows = after[0] - before[0]
    buckets = {
        ("+Inf" if math.isinf(le) else f"{le:g}"): after[2][le] - before[2].get(le, 0.0)
        for le in sorted(after[2])
    }
    return {
        "batches": batches,
        "rows": rows,
        "mean_rows_per_batch": rows / batches if batches else None,
        "cumulative_buckets": buckets,
    }


# ---------------------------------------------------------------------------------------------- worker


class Recorder:
    """Collects outcomes; only calls that start inside the measured window count."""

    def __init__(self, progress: Any) -> None:
        self.latencies_ms: list[float] = []
        self.errors: Counter[str] = Counter()
        self.measure_from = math.inf
        self.progress = progress

    def record(self, started: float, code: str | None) -> None:
        self.progress.value += 1  # one writer per counter, so no lock
        if started < self.measure_from:
            return
        if code is None:
            self.latencies_ms.append((time.perf_counter() - started) * 1e3)
        else:
            self.errors[code] += 1


async def call(
    method: Any,
    request: Any,
    timeout_s: float,
    started: float,
    recorder: Recorder,
) -> None:
    try:
        await method(request, timeout=timeout_s or None)
    except grpc.aio.AioRpcError as err:
        recorder.record(started, err.code().name)
    except Exception as err:  # a client-side failure still has to be counted, not crash the worker
        recorder.record(started, f"CLIENT_{type(err).__name__}")
    else:
        recorder.record(started, None)


def _stream_answer_id(protocol: str) -> Any:
    """Parses a stream answer into (id, failed): answers come back in any order, matched by id."""
    if protocol == "kserve":

        def kserve(data: bytes) -> tuple[str, bool]:
            answer = kserve_pb2.ModelStreamInferResponse.FromString(data)
            return answer.infer_response.id, bool(answer.error_message)

        return kserve

    def sluice(data: bytes) -> tuple[str, bool]:
        answer = inference_pb2.StreamPredictResponse.FromString(data)
        return answer.id, answer.code != 0

    return sluice


async def stream_loop(
    channel: grpc.aio.Channel, plan: WorkerPlan, in_flight: int, end: float, recorder: Recorder
) -> None:
    """One stream with `in_flight` messages always outstanding, until `end` or the request budget.

    Each message is the pre-serialized request with its own id appended: protobuf keeps the last value of a
    field, so the concatenation is the same request under a new id, for the cost of a few bytes.
    """
    open_stream = channel.stream_stream(
        STREAMS[plan.protocol], response_deserializer=_stream_answer_id(plan.protocol)
    )
    call = open_stream()
    kind = kserve_pb2.ModelInferRequest if plan.protocol == "kserve" else inference_pb2.PredictRequest
    sent_at: dict[str, float] = {}
    slots = asyncio.Semaphore(in_flight)
    budget = plan.requests if plan.requests is not None else math.inf
    count = 0

    async def write() -> None:
        nonlocal count
        while count < budget:
            await slots.acquire()
            now = time.perf_counter()
            if now >= end:
                break
            key = f"{plan.index}-{count}"
            count += 1
            sent_at[key] = now
            await call.write(plan.request_bytes + kind(id=key).SerializeToString())
        await call.done_writing()

    writer = asyncio.create_task(write())
    try:
        async for key, failed in call:
            started = sent_at.pop(key, None)
            if started is not None:
                recorder.record(started, "STREAM_ANSWER_ERROR" if failed else None)
            slots.release()
    except grpc.aio.AioRpcError as err:
        for started in sent_at.values():
            recorder.record(started, err.code().name)
        sent_at.clear()
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
    for started in sent_at.values():  # sent, never answered: counted, not lost
        recorder.record(started, "NO_ANSWER")


async def run_worker(plan: WorkerPlan, ready: Any, go: Any, progress: Any) -> WorkerResult:
    path = METHODS[plan.protocol]
    channels = [grpc.aio.insecure_channel(plan.target) for _ in range(plan.channels)]
    request: Any
    if plan.raw:
        # No serializers: gRPC sends the bytes as they are and hands back the answer's bytes unparsed.
        request = plan.request_bytes
        stubs = [ch.unary_unary(path) for ch in channels]
    else:
        message, answer = MESSAGES[plan.protocol]
        request = message.FromString(plan.request_bytes)
        stubs = [
            ch.unary_unary(
                path, request_serializer=message.SerializeToString, response_deserializer=answer.FromString
            )
            for ch in channels
        ]
    for channel in channels:
        await asyncio.wait_for(channel.channel_ready(), timeout=30.0)
    # Everyone connects before anyone sends, so the processes start the load together.
    ready.wait()
    go.wait()

    recorder = Recorder(progress)
    start = time.perf_counter()
    recorder.measure_from = start + plan.warmup_s
    end = start + plan.warmup_s + plan.duration_s if plan.duration_s is not None else math.inf
    budget = plan.requests if plan.requests is not None else math.inf
    sent = 0
    late = 0

    cpu_start = wall_start = 0.0

    async def mark_window() -> None:
        nonlocal cpu_start, wall_start
        await asyncio.sleep(plan.warmup_s)
        cpu_start, wall_start = time.process_time(), time.perf_counter()

    marker = asyncio.create_task(mark_window())

    if plan.stream:
        await asyncio.gather(
            *(
                stream_loop(channels[i], plan, share, end, recorder)
                for i, share in enumerate(split(plan.concurrency, len(channels)))
                if share
            )
        )
    elif plan.rate <= 0:

        async def closed_loop(stub: Any) -> None:
            nonlocal sent
            while sent < budget:
                now = time.perf_counter()
                if now >= end:
                    return
                sent += 1
                await call(stub, request, plan.timeout_s, now, recorder)

        await asyncio.gather(*(closed_loop(stubs[i % len(stubs)]) for i in range(plan.concurrency)))
    else:
        rng = random.Random(plan.seed)
        tasks: set[asyncio.Task[None]] = set()
        in_flight = asyncio.Semaphore(plan.max_in_flight)
        planned = start
        while sent < budget:
            planned += rng.expovariate(plan.rate)
            if planned >= end:
                break
            delay = planned - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -0.001:
                late += 1  # the client fell behind its schedule: its numbers understate the offered load
            await in_flight.acquire()
            task = asyncio.create_task(
                call(stubs[sent % len(stubs)], request, plan.timeout_s, planned, recorder)
            )
            task.add_done_callback(tasks.discard)
            task.add_done_callback(lambda _: in_flight.release())
            tasks.add(task)
            sent += 1
        if tasks:
            await asyncio.gather(*tasks)

    cpu_end, wall_end = time.process_time(), time.perf_counter()
    if not marker.done():  # the run ended inside the warmup: nothing was measured
        marker.cancel()
        cpu_start, wall_start = cpu_end, wall_end
    for channel in channels:
        await channel.close(grace=None)
    return WorkerResult(
        latencies_ms=recorder.latencies_ms,
        errors=dict(recorder.errors),
        window_s=wall_end - wall_start,
        cpu_s=cpu_end - cpu_start,
        late_starts=late,
    )


def worker_main(plan: WorkerPlan, ready: Any, go: Any, progress: Any, results: Any) -> None:
    try:
        result = asyncio.run(run_worker(plan, ready, go, progress))
    except BaseException as err:
        results.put((plan.index, None, f"{type(err).__name__}: {err}"))
        raise
    results.put((plan.index, asdict(result), None))


# ---------------------------------------------------------------------------------------------- driver


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def check_loopback(target: str) -> str:
    """Refuse any target that is not this machine: this tool generates load, not traffic to others."""
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {target!r}")
    bare = host.strip("[]")
    loopback = bare.lower() in LOOPBACK_NAMES
    if not loopback:
        try:
            loopback = ipaddress.ip_address(bare).is_loopback
        except ValueError:
            loopback = False
    if not loopback:
        raise argparse.ArgumentTypeError(f"only loopback targets are allowed, got {host!r}")
    return target


def check_metrics_url(url: str) -> str:
    host = urllib.parse.urlsplit(url).hostname or ""
    check_loopback(f"{host}:0")
    return url


def percentile(sorted_ms: np.ndarray[Any, Any], q: float) -> float | None:
    return float(np.percentile(sorted_ms, q)) if sorted_ms.size else None


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the whole load test and return the report (also what ``--json`` writes)."""
    specs = args.input_shape or specs_from_health(args.target, args.model, args.timeout)
    request = make_request(args.model, specs, args.rows, args.seed, args.protocol)
    processes = args.processes
    concurrency = split(args.concurrency, processes)
    requests = split(args.requests, processes) if args.requests is not None else [None] * processes
    plans = [
        WorkerPlan(
            index=i,
            target=args.target,
            model=args.model,
            request_bytes=request.SerializeToString(),
            protocol=args.protocol,
            raw=args.client == "raw",
            stream=args.stream,
            concurrency=max(1, concurrency[i]),
            rate=args.rate / processes if args.rate else 0.0,
            max_in_flight=max(1, args.max_in_flight // processes),
            channels=args.channels,
            warmup_s=args.warmup,
            duration_s=args.duration,
            requests=requests[i],
            timeout_s=args.timeout,
            seed=args.seed + i,
        )
        for i in range(processes)
    ]

    before = scrape_batch_rows(args.metrics_url, args.model) if args.metrics_url else None
    ctx = mp.get_context("spawn")  # grpc does not survive fork once a channel exists
    ready = ctx.Barrier(processes + 1)
    go = ctx.Event()
    results = ctx.Queue()
    counters = [ctx.RawValue("q", 0) for _ in range(processes)]
    procs = [
        ctx.Process(target=worker_main, args=(plan, ready, go, counters[i], results), daemon=True)
        for i, plan in enumerate(plans)
    ]
    for proc in procs:
        proc.start()
    # If a worker fails to connect the barrier breaks; its error arrives on the results queue.
    with contextlib.suppress(threading.BrokenBarrierError):
        ready.wait(timeout=60.0)
    go.set()
    started = time.perf_counter()

    total = args.requests if args.duration is None else None
    with _progress(args, total) as bar:
        collected: dict[int, dict[str, Any]] = {}
        failures: list[str] = []
        while len(collected) + len(failures) < processes:
            try:
                index, result, error = results.get(timeout=0.2)
            except Exception:  # queue.Empty: time to refresh the bar
                if not any(p.is_alive() for p in procs) and results.empty():
                    failures.append("a client process exited without a result")
            else:
                if error is not None:
                    failures.append(f"process {index}: {error}")
                else:
                    collected[index] = result
            if bar is not None:
                done = sum(c.value for c in counters)
                if total is not None:
                    bar.update(done - bar.n)
                else:
                    bar.update(min(time.perf_counter() - started, bar.total) - bar.n)
                bar.set_postfix(requests=done, refresh=False)
    for proc in procs:
        proc.join(timeout=5.0)
    if failures:
        raise SystemExit("error: " + "; ".join(failures))
    after = scrape_batch_rows(args.metrics_url, args.model) if args.metrics_url else None
    return summarize(args, specs, request, list(collected.values()), batch_report(before, after))


class _NoBar:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _progress(args: argparse.Namespace, total: int | None) -> Any:
    if args.no_progress:
        return _NoBar()
    from tqdm import tqdm  # type: ignore[import-untyped]

    if total is not None:
        return tqdm(total=total, unit="req", file=sys.stderr)
    return tqdm(
        total=round(args.warmup + args.duration, 1),
        unit="s",
        file=sys.stderr,
        bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} s {postfix}",
    )


def summarize(
    args: argparse.Namespace,
    specs: list[InputSpec],
    request: inference_pb2.PredictRequest | kserve_pb2.ModelInferRequest,
    results: list[dict[str, Any]],
    batches: dict[str, Any] | None,
) -> dict[str, Any]:
    latencies = np.sort(np.concatenate([np.asarray(r["latencies_ms"], dtype=np.float64) for r in results]))
    errors: Counter[str] = Counter()
    for r in results:
        errors.update(r["errors"])
    ok = int(latencies.size)
    calls = ok + sum(errors.values())
    # Processes run side by side: the window is the longest of them, which errs towards lower throughput.
    window = max((r["window_s"] for r in results), default=0.0)
    cpu = sum(r["cpu_s"] for r in results)
    return {
        "target": args.target,
        "model": args.model,
        "mode": "open" if args.rate else "closed",
        "protocol": args.protocol,
        "client": args.client,
        "stream": args.stream,
        "concurrency": None if args.rate else args.concurrency,
        "rate": args.rate or None,
        "processes": args.processes,
        "channels_per_process": args.channels,
        "rows_per_request": args.rows,
        "request_bytes": request.ByteSize(),
        "inputs": [asdict(s) for s in specs],
        "window_s": window,
        "requests_ok": ok,
        "errors": dict(errors),
        "requests_per_s": ok / window if window else None,
        "rows_per_s": ok * args.rows / window if window else None,
        "latency_ms": {
            "mean": float(latencies.mean()) if ok else None,
            "p50": percentile(latencies, 50),
            "p90": percentile(latencies, 90),
            "p99": percentile(latencies, 99),
            "max": float(latencies[-1]) if ok else None,
        },
        "client_cpu_s": cpu,
        "client_cpu_ms_per_request": cpu / calls * 1e3 if calls else None,
        # Near 1.0 per process means the client, not the server, set the pace.
        "client_cpu_utilization_per_process": cpu / window / args.processes if window else None,
        "late_starts": sum(r["late_starts"] for r in results),
        "server_batches": batches,
    }


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_report(report: dict[str, Any]) -> None:
    lat = report["latency_ms"]
    load = (
        f"open loop at {report['rate']:g} req/s"
        if report["mode"] == "open"
        else f"closed loop, concurrency {report['concurrency']}"
    )
    print(
        f"target {report['target']}  model {report['model']}  {report['protocol']} ({report['client']} "
        f"client{', one stream per channel' if report['stream'] else ''})  {load}  "
        f"processes {report['processes']}"
    )
    print(f"  window         {report['window_s']:.2f} s, {report['requests_ok']} ok")
    print(
        f"  throughput     {_fmt(report['requests_per_s'], ',.0f')} req/s, "
        f"{_fmt(report['rows_per_s'], ',.0f')} rows/s"
    )
    print(
        f"  latency (ms)   p50 {_fmt(lat['p50'], '.3f')}  p90 {_fmt(lat['p90'], '.3f')}  "
        f"p99 {_fmt(lat['p99'], '.3f')}  max {_fmt(lat['max'], '.3f')}"
    )
    print(f"  errors         {report['errors'] or 'none'}")
    print(
        f"  client         {_fmt(report['client_cpu_ms_per_request'], '.3f')} CPU ms/request, "
        f"{_fmt(report['client_cpu_utilization_per_process'], '.0%')} CPU per process"
    )
    if report["late_starts"]:
        print(f"  warning        {report['late_starts']} sends fell >1 ms behind schedule (client-bound)")
    batches = report["server_batches"]
    if batches is not None:
        print(
            f"  server batches {batches['batches']:.0f} batches, "
            f"mean {_fmt(batches['mean_rows_per_batch'], '.2f')} rows/batch"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", type=check_loopback, required=True, help="HOST:PORT, loopback only")
    parser.add_argument("--model", default="digits", help="model name to call (default: digits)")
    parser.add_argument(
        "--input-shape",
        type=parse_input_shape,
        action="append",
        metavar="NAME:TYPE:DIMS",
        help="input to send, e.g. pixels:FP32:1x64 (repeatable); default: read from the server's Health",
    )
    parser.add_argument("--rows", type=int, default=1, help="rows per request (the batch dimension)")
    parser.add_argument(
        "--protocol", choices=sorted(METHODS), default="sluice",
        help="sluice: sluice.v1 Predict; kserve: ModelInfer of the Open Inference Protocol (default: sluice)",
    )  # fmt: skip
    parser.add_argument(
        "--client", choices=("raw", "stub"), default="raw",
        help="raw: the request serialized once, answers not parsed (the cheapest client; the default); "
        "stub: the generated stub serializes and parses every call",
    )  # fmt: skip
    load = parser.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, default=1, help="closed loop: requests in flight (total)")
    load.add_argument(
        "--rate", type=float, default=0.0, help="open loop: Poisson arrivals per second (total)"
    )
    parser.add_argument(
        "--max-in-flight", type=int, default=10_000, help="open loop: cap on outstanding calls"
    )
    parser.add_argument(
        "--stream", action="store_true",
        help="closed loop over one stream per channel (StreamPredict or ModelStreamInfer): --concurrency "
        "messages in flight in all, instead of that many unary calls",
    )  # fmt: skip
    parser.add_argument("--processes", type=int, default=1, help="client processes sharing the load")
    parser.add_argument("--channels", type=int, default=1, help="grpc.aio channels per process")
    parser.add_argument("--duration", type=float, default=None, help="measured seconds (after warmup)")
    parser.add_argument("--requests", type=int, default=None, help="stop after this many requests (total)")
    parser.add_argument(
        "--warmup", type=float, default=1.0, help="seconds at the start left out of the stats"
    )
    parser.add_argument(
        "--timeout", type=float, default=10.0, help="per-request deadline in seconds; 0 sends none"
    )
    parser.add_argument(
        "--metrics-url", type=check_metrics_url, help="server's Prometheus endpoint (loopback)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for input data and arrival times")
    parser.add_argument("--json", type=Path, help="write the report to this file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.duration is None and args.requests is None:
        args.duration = 10.0
    if args.concurrency < 1 or args.processes < 1 or args.channels < 1 or args.rows < 1 or args.rate < 0:
        parser.error("--concurrency, --processes, --channels and --rows must be >= 1; --rate must be >= 0")
    if args.stream and args.rate:
        parser.error("--stream is a closed loop: use --concurrency, not --rate")
    if not args.rate and args.concurrency < args.processes:
        parser.error("--concurrency must be at least --processes")
    report = run(args)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
