"""The sluice.v1.Inference door: its messages to and from the data plane, on the shared gRPC skeleton."""

from __future__ import annotations

from typing import Any

import grpc

from sluice.server import grpc_door
from sluice.server.core import DataPlane, InferRequest, InferResult, Phase, WireTensor, integer_parameter
from sluice.server.errors import Code, SluiceError
from sluice.server.repository import State
from sluice.server.tensors import encode_into
from sluice.v1 import inference_pb2 as pb

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Inference"].full_name

_STATES = {
    Phase.STARTING: pb.SERVING_STATE_STARTING,
    Phase.SERVING: pb.SERVING_STATE_SERVING,
    Phase.DRAINING: pb.SERVING_STATE_DRAINING,
    Phase.CLOSING: pb.SERVING_STATE_DRAINING,
}


def to_request(message: pb.PredictRequest) -> InferRequest:
    """A PredictRequest as the data plane's request; each bytes field is read once (upb copies on read)."""
    inputs = []
    for tensor in message.inputs:
        if tensor.HasField("sparse"):
            sparse = tensor.sparse
            inputs.append(
                WireTensor(
                    tensor.name,
                    tensor.datatype,
                    tuple(tensor.shape),
                    raw=tensor.raw_contents,
                    sparse=(sparse.indices, sparse.values),
                )
            )
        else:
            # Positional: this runs for every tensor of every request.
            shape = tuple(tensor.shape)
            inputs.append(WireTensor(tensor.name, tensor.datatype, shape, "", tensor.raw_contents))
    return InferRequest(
        message.model,
        message.version if message.HasField("version") else None,
        message.id,
        inputs,
        message.outputs,
        _priority(message) if message.parameters else 0,
    )


def to_response(result: InferResult) -> pb.PredictResponse:
    response = pb.PredictResponse()
    fill_response(response, result)
    return response


def fill_response(response: pb.PredictResponse, result: InferResult) -> None:
    """Writes a result into an empty response, in place: a message built apart and then put in another
    (a tensor into a response, a response into a stream answer) is copied."""
    servable = result.servable
    response.id = result.id
    response.model = servable.name
    response.model_version = servable.version
    add = response.outputs.add
    for name, array in result.outputs:
        encode_into(add(), name, array)


def _priority(message: pb.PredictRequest) -> int:
    param = message.parameters.get("priority")
    if param is None:
        return 0
    kind = param.WhichOneof("value")
    return integer_parameter("priority", None if kind is None else getattr(param, kind))


class InferenceService:
    """Predict, StreamPredict and Health over the data plane."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane
        self.repository = plane.repository

    async def predict(self, message: pb.PredictRequest, deadline: float | None) -> pb.PredictResponse:
        return to_response(await self.plane.infer(to_request(message), deadline))

    @staticmethod
    def failed(message: pb.PredictRequest | None, code: Code, text: str) -> pb.StreamPredictResponse:
        request_id = "" if message is None else message.id
        return pb.StreamPredictResponse(id=request_id, code=code.value, message=text)

    async def stream_answer(
        self, message: pb.PredictRequest, deadline: float | None
    ) -> pb.StreamPredictResponse:
        result = await self.plane.infer(to_request(message), deadline)
        answer = pb.StreamPredictResponse(id=message.id)
        fill_response(answer.response, result)
        return answer

    async def health(self, request: pb.HealthRequest, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            models = self.repository.status(request.model or None)
        except SluiceError as exc:
            await context.abort(grpc_door.GRPC_CODES[exc.code], exc.message)
        return pb.HealthResponse(state=self.state(), models=models)

    def state(self) -> pb.ServingState.ValueType:
        """SERVING once loading is over and some model is ready; NOT_SERVING when none could load."""
        phase = self.plane.phase
        if phase is not Phase.SERVING:
            return _STATES[phase]
        if any(state == State.READY for state in self.repository.states().values()):
            return pb.SERVING_STATE_SERVING
        return pb.SERVING_STATE_NOT_SERVING

    def handlers(self) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
        """The service's methods, for `server.add_registered_method_handlers`."""
        plane = self.plane
        parse = grpc_door.parser(pb.PredictRequest.FromString, "sluice.v1.PredictRequest")

        def model_of(message: pb.PredictRequest) -> str:
            return message.model

        return {
            "Predict": grpc_door.unary(plane, "Predict", parse, self.predict, model_of),
            "StreamPredict": grpc_door.stream(
                plane, "StreamPredict", parse, self.stream_answer, model_of, self.failed
            ),
            "Health": grpc.unary_unary_rpc_method_handler(
                self.health,
                request_deserializer=pb.HealthRequest.FromString,
                response_serializer=grpc_door.serialize,
            ),
        }
