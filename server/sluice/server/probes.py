"""The standard gRPC health service (grpc.health.v1), for Kubernetes probes and load balancers.

It is strict on purpose, unlike sluice.v1's Health, which reports SERVING while any model is ready: a probe
must not send traffic to a replica that cannot answer for every model it was deployed with.

- "" (the whole server) and "sluice.v1.Inference": SERVING once every model has loaded and warmed up; not
  while any failed, not with no models at all, and never again once draining starts.
- one entry per model name: SERVING while that model's default version is ready.
- "liveness": SERVING from start-up until draining starts, for a liveness probe that must not restart a
  replica whose models are still loading.
"""

from __future__ import annotations

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]  # set at import

from sluice.v1 import inference_pb2 as pb

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
INFERENCE_SERVICE = "sluice.v1.Inference"
LIVENESS = "liveness"


class Probes:
    """Keeps grpc.health.v1 statuses in step with the model repository's states."""

    def __init__(self) -> None:
        self.servicer = health_aio.HealthServicer()

    async def starting(self, models: list[str]) -> None:
        """Everything but liveness is NOT_SERVING while models load."""
        await self.servicer.set("", NOT_SERVING)
        await self.servicer.set(INFERENCE_SERVICE, NOT_SERVING)
        await self.servicer.set(LIVENESS, SERVING)
        for name in models:
            await self.servicer.set(name, NOT_SERVING)

    async def loaded(self, states: dict[str, int]) -> None:
        """Per model and overall readiness, from each model's state once loading is over."""
        for name, state in states.items():
            await self.servicer.set(name, SERVING if state == pb.MODEL_STATE_READY else NOT_SERVING)
        ready = bool(states) and all(s == pb.MODEL_STATE_READY for s in states.values())
        overall = SERVING if ready else NOT_SERVING
        await self.servicer.set("", overall)
        await self.servicer.set(INFERENCE_SERVICE, overall)

    async def draining(self) -> None:
        """Every entry goes NOT_SERVING and stays so (Watch streams see it at once)."""
        await self.servicer.enter_graceful_shutdown()
