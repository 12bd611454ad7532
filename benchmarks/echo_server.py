"""A bare grpc.aio server whose Predict (sluice.v1) and ModelInfer (KServe) echo their inputs back.

It is the yardstick for the real server: the same transport, the same messages, no model, no batching. The
ratio "Sluice requests/s : echo requests/s" at one concurrency says how much of the gRPC ceiling the server
keeps (see benchmarks/compare_echo.py).

Run: ``PYTHONPATH=proto python benchmarks/echo_server.py --port 0`` (prints ``listening on 127.0.0.1:PORT``).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import grpc

from sluice.kserve.v2 import grpc_service_pb2 as kserve_pb2
from sluice.kserve.v2 import grpc_service_pb2_grpc as kserve_pb2_grpc
from sluice.v1 import inference_pb2, inference_pb2_grpc

DATA_TYPES = {
    name.removeprefix("DATA_TYPE_"): value
    for name, value in inference_pb2.DataType.items()
    if name != "DATA_TYPE_UNSPECIFIED"
}


def parse_spec(text: str) -> inference_pb2.TensorSpec:
    """Parse ``name:FP32:-1x64`` into the TensorSpec that Health advertises, so loadgen can build inputs."""
    try:
        name, dtype, dims = text.split(":")
        shape = [int(d) for d in dims.lower().split("x")]
        return inference_pb2.TensorSpec(name=name, datatype=DATA_TYPES[dtype.upper()], shape=shape)
    except (ValueError, KeyError) as err:
        raise argparse.ArgumentTypeError(
            f"expected NAME:TYPE:DIMxDIM (e.g. pixels:FP32:-1x64), got {text!r}"
        ) from err


class EchoServicer(inference_pb2_grpc.InferenceServicer):
    """Answers every model name; Predict returns the request's tensors as outputs."""

    def __init__(self, inputs: list[inference_pb2.TensorSpec]) -> None:
        self._inputs = inputs

    async def Predict(  # noqa: N802 (the generated servicer's method names)
        self, request: inference_pb2.PredictRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> inference_pb2.PredictResponse:
        return inference_pb2.PredictResponse(
            id=request.id, model=request.model, model_version=1, outputs=request.inputs
        )

    async def StreamPredict(  # noqa: N802
        self,
        request_iterator: AsyncIterator[inference_pb2.PredictRequest],
        context: grpc.aio.ServicerContext[object, object],
    ) -> AsyncIterator[inference_pb2.StreamPredictResponse]:
        async for request in request_iterator:
            response = inference_pb2.PredictResponse(
                id=request.id, model=request.model, model_version=1, outputs=request.inputs
            )
            yield inference_pb2.StreamPredictResponse(id=request.id, code=0, response=response)

    async def Health(  # noqa: N802
        self, request: inference_pb2.HealthRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> inference_pb2.HealthResponse:
        version = inference_pb2.ModelVersionStatus(
            version=1,
            state=inference_pb2.MODEL_STATE_READY,
            inputs=self._inputs,
            outputs=self._inputs,
            providers=["echo"],
        )
        model = inference_pb2.ModelStatus(
            name=request.model or "echo", state=inference_pb2.MODEL_STATE_READY, versions=[version]
        )
        return inference_pb2.HealthResponse(state=inference_pb2.SERVING_STATE_SERVING, models=[model])


class KServeEchoServicer(kserve_pb2_grpc.GRPCInferenceServiceServicer):
    """ModelInfer answers with the request's tensors as outputs, raw contents included."""

    async def ModelInfer(  # noqa: N802
        self, request: kserve_pb2.ModelInferRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> kserve_pb2.ModelInferResponse:
        outputs = [
            kserve_pb2.ModelInferResponse.InferOutputTensor(name=t.name, datatype=t.datatype, shape=t.shape)
            for t in request.inputs
        ]
        return kserve_pb2.ModelInferResponse(
            model_name=request.model_name,
            model_version="1",
            id=request.id,
            outputs=outputs,
            raw_output_contents=request.raw_input_contents,
        )

    async def ModelStreamInfer(  # noqa: N802
        self,
        request_iterator: AsyncIterator[kserve_pb2.ModelInferRequest],
        context: grpc.aio.ServicerContext[object, object],
    ) -> AsyncIterator[kserve_pb2.ModelStreamInferResponse]:
        async for request in request_iterator:
            yield kserve_pb2.ModelStreamInferResponse(infer_response=await self.ModelInfer(request, context))


async def serve(
    port: int, inputs: list[inference_pb2.TensorSpec], max_message_mb: int, max_pending: int | None
) -> None:
    limit = max_message_mb * 1024 * 1024
    options: list[tuple[str, int]] = [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
    ]
    if max_pending is not None:
        # gRPC core cancels calls (CANCELLED) that wait beyond this many before the application takes them.
        options += [
            ("grpc.server.max_pending_requests", max_pending),
            ("grpc.server.max_pending_requests_hard_limit", max_pending),
        ]
    server = grpc.aio.server(options=options)
    inference_pb2_grpc.add_InferenceServicer_to_server(EchoServicer(inputs), server)
    kserve_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(KServeEchoServicer(), server)
    await run_until_signalled(server, port)


def run_loop(coro: Coroutine[Any, Any, None], *, uvloop: bool) -> None:
    """Runs `coro` on uvloop (as Sluice does) or on asyncio's own loop."""
    if uvloop:
        import uvloop as fast

        fast.run(coro)
    else:
        asyncio.run(coro)


async def run_until_signalled(server: grpc.aio.Server, port: int) -> None:
    """Binds 127.0.0.1:`port`, prints ``listening on 127.0.0.1:PORT`` (what compare_echo.py reads), and
    serves until SIGINT or SIGTERM."""
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"listening on 127.0.0.1:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1; 0 picks a free one")
    parser.add_argument(
        "--input",
        type=parse_spec,
        action="append",
        dest="inputs",
        metavar="NAME:TYPE:DIMS",
        help="input advertised by Health, e.g. pixels:FP32:-1x64 (repeatable; default pixels:FP32:-1x64)",
    )
    parser.add_argument("--max-message-mb", type=int, default=64, help="largest message in MiB")
    parser.add_argument(
        "--max-pending-requests",
        type=int,
        default=None,
        help="gRPC core's limit on calls queued before the servicer takes them "
        "(default: gRPC's own, about 1000); beyond it clients see CANCELLED",
    )
    parser.add_argument(
        "--uvloop",
        action="store_true",
        help="run on uvloop instead of asyncio's own loop (to compare with a Sluice that uses uvloop)",
    )
    args = parser.parse_args(argv)
    inputs = args.inputs or [parse_spec("pixels:FP32:-1x64")]
    coro = serve(args.port, inputs, args.max_message_mb, args.max_pending_requests)
    run_loop(coro, uvloop=args.uvloop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
