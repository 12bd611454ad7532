"""The Open Inference Protocol (KServe v2) servicer, `inference.GRPCInferenceService`, with the Triton
extensions Triton's clients use (ModelConfig, ModelStatistics, and model control: RepositoryIndex,
RepositoryModelLoad, RepositoryModelUnload).

A door of the data plane (`core.py`), like sluice.v1.Inference: `kserve_tensors` turns its requests into
the data plane's and its answers back, and the shared gRPC skeleton (`grpc_door.py`) admits, times, counts
and maps statuses. The RPCs Sluice does not serve (model loading, shared memory, trace and log settings)
answer UNIMPLEMENTED with a message saying why. Loading and unloading are the repository's
(`ModelRepository.load_model`, `unload_model`); this door only maps the calls.
"""

from __future__ import annotations

import functools
import time
from importlib import metadata as package_metadata
from typing import Any

import grpc

from sluice.kserve.v2 import grpc_service_pb2 as kpb
from sluice.server import classification, grpc_door, kserve_models
from sluice.server.config import parse_override
from sluice.server.core import DataPlane, InferResult
from sluice.server.errors import Code, SluiceError, clip, invalid, not_found
from sluice.server.kserve_tensors import (
    classifications,
    describe,
    encode_output_into,
    model_version,
    to_request,
)
from sluice.server.pipeline import Servable

SERVICE_NAME = kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
EXTENSIONS = (
    "classification",
    "model_configuration",
    "statistics",
    "model_repository",
    "model_repository(unload_dependents)",
)
"""The Triton extensions served in full (ServerMetadata lists them)."""

_NO_SHM = "Sluice does not support {} shared memory; send tensors in raw_input_contents or contents"
_UNSERVED = {
    **{
        f"SystemSharedMemory{verb}": _NO_SHM.format("system") for verb in ("Status", "Register", "Unregister")
    },
    **{f"CudaSharedMemory{verb}": _NO_SHM.format("CUDA") for verb in ("Status", "Register", "Unregister")},
    "TraceSetting": "Sluice has no request tracing; its Prometheus metrics endpoint has latencies",
    "LogSettings": "Sluice's log level is set at start-up (--log-level or SLUICE_LOG_LEVEL)",
}


class KServeService:
    """inference.GRPCInferenceService over the data plane."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane
        self.repository = plane.repository
        self.metrics = plane.metrics
        self.last_inference: dict[str, int] = {}
        """Per model, the wall time in ms of the last request this servicer answered OK."""
        try:
            self.version = package_metadata.version("sluice-serving")
        except package_metadata.PackageNotFoundError:
            self.version = "unknown"

    async def ServerLive(  # noqa: N802
        self, request: kpb.ServerLiveRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> kpb.ServerLiveResponse:
        return kpb.ServerLiveResponse(live=self.plane.live())

    async def ServerReady(  # noqa: N802
        self, request: kpb.ServerReadyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> kpb.ServerReadyResponse:
        # As strict as grpc.health.v1's "": every model loaded, none failed, and not draining.
        return kpb.ServerReadyResponse(ready=self.plane.ready())

    async def ModelReady(  # noqa: N802
        self, request: kpb.ModelReadyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> kpb.ModelReadyResponse:
        try:
            version = model_version(request.version)
        except SluiceError as exc:
            await context.abort(grpc_door.GRPC_CODES[exc.code], exc.message)
        if not self.plane.live():
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
                raise invalid(f"a version ('{clip(request.version)}') needs a model name")
            else:
                servables = [
                    entry.default.servable
                    for entry in self.repository.models.values()
                    if entry.default is not None and entry.default.servable is not None
                ]
        except SluiceError as exc:
            await context.abort(grpc_door.GRPC_CODES[exc.code], exc.message)
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
                f"no repository named '{clip(request.repository_name)}'; Sluice serves one, named ''",
            )
        return kserve_models.index(list(self.repository.models.values()), request.ready)

    async def RepositoryModelLoad(  # noqa: N802
        self, request: kpb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> kpb.RepositoryModelLoadResponse:
        try:
            self._controlled(request.repository_name, request.model_name, "RepositoryModelLoad")
            override = None
            for key, value in request.parameters.items():
                if key == "config":
                    if value.WhichOneof("parameter_choice") != "string_param":
                        kind = value.WhichOneof("parameter_choice") or "nothing"
                        raise invalid(f"parameter 'config': expected a string_param, got {kind}")
                    override = parse_override(value.string_param)
                elif key.startswith("file:"):
                    raise invalid(
                        f"parameter '{clip(key)}': Sluice loads model files from its repository, not from "
                        "the request; put them in the model's directory"
                    )
                else:
                    raise invalid(f"unknown parameter '{clip(key)}'; RepositoryModelLoad takes 'config'")
            await self.repository.load_model(request.model_name, override)
        except SluiceError as exc:
            await context.abort(grpc_door.GRPC_CODES[exc.code], exc.message)
        return kpb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(  # noqa: N802
        self, request: kpb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> kpb.RepositoryModelUnloadResponse:
        try:
            self._controlled(request.repository_name, request.model_name, "RepositoryModelUnload")
            for key in request.parameters:
                # Sluice models have no dependents (no ensembles): Triton's client sends this flag.
                if key != "unload_dependents":
                    raise invalid(
                        f"unknown parameter '{clip(key)}'; RepositoryModelUnload takes 'unload_dependents'"
                    )
            await self.repository.unload_model(request.model_name)
        except SluiceError as exc:
            await context.abort(grpc_door.GRPC_CODES[exc.code], exc.message)
        return kpb.RepositoryModelUnloadResponse()

    def _controlled(self, repository: str, model: str, method: str) -> None:
        """Refuses a load or unload the server's model_control does not allow, or that names nothing."""
        control = self.repository.control
        if control != "explicit":
            why = (
                "it re-scans its repository (model_control = poll): change the files instead"
                if control == "poll"
                else "its models change only with a restart (model_control = none); start it with "
                "--model-control explicit to load and unload models"
            )
            raise SluiceError(Code.FAILED_PRECONDITION, f"{method}: this server does not take it: {why}")
        if repository:
            raise not_found(f"no repository named '{clip(repository)}'; Sluice serves one, named ''")
        if not model:
            raise invalid("no model name given")

    async def infer(self, request: kpb.ModelInferRequest, deadline: float | None) -> kpb.ModelInferResponse:
        result = await self._result(request, deadline)
        response = kpb.ModelInferResponse()
        self._fill(response, request, result)
        return response

    async def stream_answer(
        self, request: kpb.ModelInferRequest, deadline: float | None
    ) -> kpb.ModelStreamInferResponse:
        result = await self._result(request, deadline)
        answer = kpb.ModelStreamInferResponse()
        # Filled in place: a response built apart would be copied into the stream answer.
        self._fill(answer.infer_response, request, result)
        return answer

    async def _result(self, request: kpb.ModelInferRequest, deadline: float | None) -> InferResult:
        """The data plane's answer, with the outputs asked for as classifications ranked."""
        infer = to_request(request)
        classes = self._classes(request)
        result = await self.plane.infer(infer, deadline, describe)
        if classes is not None:
            result.outputs = await classification.rank_outputs(result.servable, result.outputs, classes)
        return result

    def _classes(self, request: kpb.ModelInferRequest) -> dict[str, int] | None:
        """The outputs asked for as classifications, checked before the model runs."""
        classes = classifications(request)
        if classes is not None:
            classification.check_outputs(self._servable(request.model_name, request.model_version), classes)
        return classes

    @staticmethod
    def failed(
        request: kpb.ModelInferRequest | None, code: Code, message: str
    ) -> kpb.ModelStreamInferResponse:
        """A failed stream request's answer. infer_response.id says which request failed; Triton's clients
        hand only error_message to their callback, so it also names the id, as Triton words its errors."""
        if request is None:
            return kpb.ModelStreamInferResponse(error_message=message)
        failed = kpb.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version, id=request.id
        )
        if request.id:
            message = f"[request id: {clip(request.id)}] {message}"
        return kpb.ModelStreamInferResponse(error_message=message, infer_response=failed)

    def _fill(
        self, response: kpb.ModelInferResponse, request: kpb.ModelInferRequest, result: InferResult
    ) -> None:
        """Writes a result into an empty response, in place."""
        servable = result.servable
        response.model_name = servable.name
        response.model_version = servable.version_label
        response.id = request.id
        add = response.outputs.add
        raws = response.raw_output_contents
        for name, array in result.outputs:
            # Made in place: a tensor built apart would be copied into the response.
            raws.append(encode_output_into(add(), name, array))
        final = request.parameters.get("triton_enable_empty_final_response")
        if final is not None and final.bool_param:
            # Triton's streaming clients may ask to be told which response is a request's last: with one
            # response per request, it is always this one.
            response.parameters["triton_final_response"].bool_param = True
        self.last_inference[servable.name] = time.time_ns() // 1_000_000

    async def _found(self, name: str, version: str, context: grpc.aio.ServicerContext[Any, Any]) -> Servable:
        """The servable a metadata request names; the call ends with NOT_FOUND and the like otherwise."""
        try:
            return self._servable(name, version)
        except SluiceError as exc:
            await context.abort(grpc_door.GRPC_CODES[exc.code], exc.message)

    def _servable(self, name: str, version: str) -> Servable:
        if not name:
            raise invalid("no model name given")
        return self.repository.resolve(name, model_version(version))

    def handlers(self) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
        """Every method of the service: inference on the shared skeleton, the rest as plain unary RPCs."""
        plane = self.plane
        parse = grpc_door.parser(kpb.ModelInferRequest.FromString, "inference.ModelInferRequest")

        def model_of(request: kpb.ModelInferRequest) -> str:
            return request.model_name

        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            "ModelInfer": grpc_door.unary(plane, "ModelInfer", parse, self.infer, model_of),
            "ModelStreamInfer": grpc_door.stream(
                plane, "ModelStreamInfer", parse, self.stream_answer, model_of, self.failed
            ),
        }
        for method in kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
            name = method.name
            if name in handlers:
                continue
            handlers[name] = grpc.unary_unary_rpc_method_handler(
                getattr(self, name),
                request_deserializer=getattr(kpb, method.input_type.name).FromString,
                response_serializer=grpc_door.serialize,
            )
        return handlers


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
    server.add_registered_method_handlers(SERVICE_NAME, servicer.handlers())  # type: ignore[attr-defined]
    server.add_generic_rpc_handlers((_Unserved(),))
