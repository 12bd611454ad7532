"""The gRPC servicer of sluice.v1.Inference: the boundary where exceptions become statuses."""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

import grpc

from sluice.server.errors import SluiceError, to_status, unavailable
from sluice.server.metrics import Metrics
from sluice.server.repository import ModelRepository
from sluice.server.streams import STREAM_WINDOW, answer_each
from sluice.v1 import inference_pb2 as pb
from sluice.v1 import inference_pb2_grpc as pb_grpc


class Phase(enum.Enum):
    """Where the server is in its life, as Health reports it."""

    STARTING = pb.SERVING_STATE_STARTING
    SERVING = pb.SERVING_STATE_SERVING
    DRAINING = pb.SERVING_STATE_DRAINING


class InferenceService(pb_grpc.InferenceServicer):
    """Predict, StreamPredict and Health over one model repository."""

    def __init__(self, repository: ModelRepository, metrics: Metrics) -> None:
        self.repository = repository
        self.metrics = metrics
        self.phase = Phase.STARTING

    async def Predict(  # noqa: N802
        self, request: pb.PredictRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.PredictResponse:
        started = time.monotonic()
        remaining = context.time_remaining()
        deadline = None if remaining is None else started + remaining
        try:
            response = await self._predict(request, deadline)
        except asyncio.CancelledError:
            self._count(request, "Predict", "CANCELLED", started)
            raise
        except Exception as exc:
            code, message = to_status(exc, f"Predict model={request.model!r} id={request.id!r}")
            self._count(request, "Predict", code.name, started)
            await context.abort(code, message)
        self._count(request, "Predict", "OK", started)
        return response

    async def StreamPredict(  # noqa: N802
        self, request_iterator: AsyncIterable[pb.PredictRequest], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.StreamPredictResponse]:
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining

        async def answer(request: pb.PredictRequest) -> pb.StreamPredictResponse:
            started = time.monotonic()
            try:
                response = await self._predict(request, deadline)
            except Exception as exc:
                code, message = to_status(exc, f"StreamPredict model={request.model!r} id={request.id!r}")
                self._count(request, "StreamPredict", code.name, started)
                return pb.StreamPredictResponse(id=request.id, code=code.value[0], message=message)
            self._count(request, "StreamPredict", "OK", started)
            return pb.StreamPredictResponse(id=request.id, response=response)

        async for item in answer_each(request_iterator, answer, STREAM_WINDOW):
            yield item

    async def Health(  # noqa: N802
        self, request: pb.HealthRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.HealthResponse:
        try:
            models = self.repository.status(request.model or None)
        except SluiceError as exc:
            await context.abort(exc.code, exc.message)
        return pb.HealthResponse(state=self.state(), models=models)

    def state(self) -> pb.ServingState.ValueType:
        """SERVING once loading is over and some model is ready; NOT_SERVING when none could load."""
        if self.phase is not Phase.SERVING:
            return pb.ServingState.ValueType(self.phase.value)
        if any(entry.state == pb.MODEL_STATE_READY for entry in self.repository.models.values()):
            return pb.SERVING_STATE_SERVING
        return pb.SERVING_STATE_NOT_SERVING

    async def _predict(self, request: pb.PredictRequest, deadline: float | None) -> pb.PredictResponse:
        if self.phase is Phase.DRAINING:
            raise unavailable("the server is shutting down; retry on another replica")
        version = request.version if request.HasField("version") else None
        servable = self.repository.resolve(request.model, version)
        return await servable.predict(request, deadline)

    def _count(self, request: pb.PredictRequest, method: str, code: str, started: float) -> None:
        # Unknown model names are not used as labels: a caller must not be able to grow the metrics.
        model = request.model if request.model in self.repository.models else ""
        self.metrics.count_request(model, method, code, time.monotonic() - started)
