"""The Open Inference Protocol (KServe v2) servicer, `inference.GRPCInferenceService`, with the Triton
extensions Triton's clients use (ModelConfig, ModelStatistics, RepositoryIndex).

It is a second front end over the same repository, pipeline, batcher, metrics and error codes as
sluice.v1.Inference: requests are decoded here, then validated and run by `Servable`, and exceptions
become statuses through `to_status`, as in `service.py`. The RPCs Sluice does not serve (model loading,
shared memory, trace and log settings) answer UNIMPLEMENTED with a message saying why.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterable, AsyncIterator
from importlib import metadata as package_metadata
from typing import Any

import grpc

from sluice.batcher import CooArray
from sluice.kserve.v2 import grpc_service_pb2 as kpb
from sluice.kserve.v2 import grpc_service_pb2_grpc as kpb_grpc
from sluice.server import kserve_models
from sluice.server.errors import SluiceError, invalid, to_status, unavailable
from sluice.server.kserve_tensors import decode_inputs, encode_output, priority, timeout
from sluice.server.pipeline import Servable
from sluice.server.plugins import Arrays
from sluice.server.service import InferenceService, Phase
from sluice.server.streams import STREAM_WINDOW, answer_each
from sluice.v1 import inference_pb2 as pb

SERVICE_NAME = kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
EXTENSIONS = ("model_configuration", "statistics")
"""The Triton extensions served in full (ServerMetadata lists them)."""

_RESTART = "Sluice loads its model repository at start-up; restart the server to change its models"
_NO_SHM = "Sluice does not support {} shared memory; send tensors in raw_input_contents or contents"
_UNSERVED = {
    "RepositoryModelLoad": _RESTART,
    "RepositoryModelUnload": _RESTART,
    **{
        f"SystemSharedMemory{verb}": _NO_SHM.format("system") for verb in ("Status", "Register", "Unregister")
    },
    **{f"CudaSharedMemory{verb}": _NO_SHM.format("CUDA") for verb in ("Status", "Register", "Unregister")},
    "TraceSetting": "Sluice has no request tracing; its Prometheus metrics endpoint has latencies",
    "LogSettings": "Sluice's log level is set at start-up (--log-level or SLUICE_LOG_LEVEL)",
}


class KServeService(kpb_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService over the repository of a sluice.v1 InferenceService."""

    def __init__(self, service: InferenceService) -> None:
        self.service = service  # its phase says whether the server is starting, serving or draining
        self.repository = service.repository
        self.metrics = service.metrics
        self.last_inference: dict[str, int] = {}
        """Per model, the wall time in ms of the last request this servicer answered OK."""
        try:
            self.version = package_metadata.version("sluice")
        except package_metadata.PackageNotFoundError:
            self.version = "unknown"

    async def ServerLive(  # noqa: N802
        self, request: kpb.ServerLiveRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> kpb.ServerLiveResponse:
        return kpb.ServerLiveResponse(live=self.service.phase is not Phase.DRAINING)

    async def ServerReady(  # noqa: N802
        self, request: kpb.ServerReadyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> kpb.ServerReadyResponse:
        # As strict as grpc.health.v1's "": every model loaded, none failed, and not draining.
        entries = self.repository.models.values()
        ready = (
            self.service.phase is Phase.SERVING
            and bool(entries)
            and all(entry.state == pb.MODEL_STATE_READY for entry in entries)
        )
        return kpb.ServerReadyResponse(ready=ready)

    async def ModelReady(  # noqa: N802
        self, request: kpb.ModelReadyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> kpb.ModelReadyResponse:
        try:
            version = _version(request.version)
        except SluiceError as exc:
            await context.abort(exc.code, exc.message)
        if self.service.phase is Phase.DRAINING:
            return kpb.ModelReadyResponse(ready=False)
        try:
            self.repository.resolve(request.name, version)
        except SluiceError:
            return kpb.ModelReadyResponse(ready=False)  # unknown, loading or failed: not ready
        return kpb.ModelReadyResponse(ready=True)

    async def ServerMetadata(  # noqa: N802
        self, request: kpb.ServerMetadataRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> kpb.ServerMetadataResponse:
        return kpb.ServerMetadataResponse(name="sluice", version=self.version, extensions=EXTENSIONS)

    async def ModelMetadata(  # noqa: N802
        self, request: kpb.ModelMetadataRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> kpb.ModelMetadataResponse:
        servable = await self._found(request.name, request.version, context)
        return kserve_models.metadata(servable, self.repository.models[servable.name])

    async def ModelConfig(  # noqa: N802
        self, request: kpb.ModelConfigRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> kpb.ModelConfigResponse:
        servable = await self._found(request.name, request.version, context)
        return kpb.ModelConfigResponse(config=kserve_models.config(servable))

    async def ModelStatistics(  # noqa: N802
        self, request: kpb.ModelStatisticsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> kpb.ModelStatisticsResponse:
        try:
            if request.name:
                servables = [self._servable(request.name, request.version)]
            elif request.version:
                raise invalid(f"a version ('{request.version}') needs a model name")
            else:
                servables = [
                    entry.default.servable
                    for entry in self.repository.models.values()
                    if entry.default is not None and entry.default.servable is not None
                ]
        except SluiceError as exc:
            await context.abort(exc.code, exc.message)
        stats = [
            kserve_models.statistics(s, str(s.version), self.metrics, self.last_inference.get(s.name, 0))
            for s in servables
        ]
        return kpb.ModelStatisticsResponse(model_stats=stats)

    async def RepositoryIndex(  # noqa: N802
        self, request: kpb.RepositoryIndexRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> kpb.RepositoryIndexResponse:
        if request.repository_name:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"no repository named '{request.repository_name}'; Sluice serves one, named ''",
            )
        return kserve_models.index(list(self.repository.models.values()), request.ready)

    async def ModelInfer(  # noqa: N802
        self, request: kpb.ModelInferRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> kpb.ModelInferResponse:
        started = time.monotonic()
        remaining = context.time_remaining()
        try:
            response = await self._infer(request, None if remaining is None else started + remaining)
        except asyncio.CancelledError:
            self._count(request, "ModelInfer", "CANCELLED", started)
            raise
        except Exception as exc:
            code, message = to_status(exc, f"ModelInfer model={request.model_name!r} id={request.id!r}")
            self._count(request, "ModelInfer", code.name, started)
            await context.abort(code, message)
        self._count(request, "ModelInfer", "OK", started)
        return response

    async def ModelStreamInfer(  # noqa: N802
        self,
        request_iterator: AsyncIterable[kpb.ModelInferRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[kpb.ModelStreamInferResponse]:
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining

        async def answer(request: kpb.ModelInferRequest) -> kpb.ModelStreamInferResponse:
            started = time.monotonic()
            try:
                response = await self._infer(request, deadline)
            except Exception as exc:
                where = f"ModelStreamInfer model={request.model_name!r} id={request.id!r}"
                code, message = to_status(exc, where)
                self._count(request, "ModelStreamInfer", code.name, started)
                # infer_response.id says which request failed; Triton's clients hand only error_message
                # to their callback, so it also names the id, the way Triton words its own errors.
                failed = kpb.ModelInferResponse(
                    model_name=request.model_name, model_version=request.model_version, id=request.id
                )
                if request.id:
                    message = f"[request id: {request.id}] {message}"
                return kpb.ModelStreamInferResponse(error_message=message, infer_response=failed)
            self._count(request, "ModelStreamInfer", "OK", started)
            return kpb.ModelStreamInferResponse(infer_response=response)

        async for item in answer_each(request_iterator, answer, STREAM_WINDOW):
            yield item

    async def _found(self, name: str, version: str, context: grpc.aio.ServicerContext[Any, Any]) -> Servable:
        """The servable a metadata request names; the call ends with NOT_FOUND and the like otherwise."""
        try:
            return self._servable(name, version)
        except SluiceError as exc:
            await context.abort(exc.code, exc.message)

    def _servable(self, name: str, version: str) -> Servable:
        if not name:
            raise invalid("no model name given")
        return self.repository.resolve(name, _version(version))

    async def _infer(self, request: kpb.ModelInferRequest, deadline: float | None) -> kpb.ModelInferResponse:
        if self.service.phase is Phase.DRAINING:
            raise unavailable("the server is shutting down; retry on another replica")
        servable = self._servable(request.model_name, request.model_version)
        parameters = request.parameters
        level = priority(parameters) if parameters else 0
        seconds = timeout(parameters) if parameters else None
        if seconds is not None:
            ends = time.monotonic() + seconds
            deadline = ends if deadline is None else min(deadline, ends)
        arrays = _as_specified(
            servable, decode_inputs(request, servable.inputs, servable.name, servable.max_bytes)
        )
        servable.check_inputs(arrays)
        names = (
            servable.output_names([o.name for o in request.outputs])
            if request.outputs
            else tuple(spec.name for spec in servable.outputs)
        )
        outputs = await servable.infer(arrays, names, priority=level, deadline=deadline)
        response = kpb.ModelInferResponse(
            model_name=servable.name, model_version=str(servable.version), id=request.id
        )
        for name in names:
            tensor, raw = encode_output(name, outputs[name])
            response.outputs.append(tensor)
            response.raw_output_contents.append(raw)
        final = parameters.get("triton_enable_empty_final_response")
        if final is not None and final.bool_param:
            # Triton's streaming clients may ask to be told which response is a request's last: with one
            # response per request, it is always this one.
            response.parameters["triton_final_response"].bool_param = True
        self.last_inference[servable.name] = time.time_ns() // 1_000_000
        return response

    def _count(self, request: kpb.ModelInferRequest, method: str, code: str, started: float) -> None:
        # Unknown model names are not used as labels: a caller must not be able to grow the metrics.
        model = request.model_name if request.model_name in self.repository.models else ""
        self.metrics.count_request(model, method, code, time.monotonic() - started)


def _version(text: str) -> int | None:
    """KServe's model_version: "" is the default version, anything else a version number."""
    if not text:
        return None
    if text.isascii() and text.isdigit():
        return int(text)
    raise invalid(f"model version must be a version number, or empty for the default version; got '{text}'")


def _as_specified(servable: Servable, arrays: Arrays) -> Arrays:
    """Inputs a plugin takes in sparse form become CooArrays (KServe has no sparse tensors)."""
    sparse = {spec.name for spec in servable.inputs if spec.sparse}
    if not sparse:
        return arrays
    return {
        name: CooArray.from_dense(array) if name in sparse else array  # type: ignore[misc]
        for name, array in arrays.items()
    }


async def _refuse(message: str, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)


class _Unserved(grpc.GenericRpcHandler):  # type: ignore[type-arg]  # generic only in the stubs
    """Answers the GRPCInferenceService RPCs left out of Sluice's .proto with UNIMPLEMENTED and why."""

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[bytes, bytes] | None:
        service, _, method = handler_call_details.method.lstrip("/").partition("/")
        reason = _UNSERVED.get(method) if service == SERVICE_NAME else None
        if reason is None:
            return None
        return grpc.unary_unary_rpc_method_handler(functools.partial(_refuse, f"{method}: {reason}"))


def add_to_server(servicer: KServeService, server: grpc.aio.Server) -> None:
    """Serves `servicer`, and UNIMPLEMENTED with a reason for the RPCs it leaves out."""
    kpb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers((_Unserved(),))
