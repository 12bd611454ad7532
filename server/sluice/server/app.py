"""The server process: binds the ports, loads the repository, and shuts down gracefully on a signal."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import time
from importlib import resources
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sluice.server import kserve, rest, service
from sluice.server.core import DataPlane, Limits, Phase
from sluice.server.metrics import Metrics
from sluice.server.probes import NOT_SERVING, Probes
from sluice.server.repository import ModelRepository, State
from sluice.server.scheduling import LoopLoad
from sluice.server.security import BearerToken, server_credentials
from sluice.server.service import InferenceService
from sluice.server.settings import ServerSettings
from sluice.server.spin import Calls, LoneRuns, LoopSpin
from sluice.v1 import inference_pb2 as pb

log = logging.getLogger("sluice.server")

QUIET_S = 0.2
"""How long a stopping server must see no new call before it closes its ports."""
PENDING_CALLS = 1 << 16
"""gRPC core's backlog of calls not yet handed to the server: far above Sluice's own limits, so that
overload is decided (and answered, and counted) by Sluice, not cancelled by gRPC core."""


def bundled_repository() -> Path:
    """The example repository: shipped inside the wheel, or at examples/models in a source checkout."""
    packaged = Path(str(resources.files("sluice.server"))) / "_examples" / "models"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[3] / "examples" / "models"


class SluiceServer:
    """One Sluice server: start it, await `loaded()`, and `stop()` it (or `serve()` until a signal)."""

    def __init__(self, settings: ServerSettings, *, reuse_port: bool = False) -> None:
        self.settings = settings
        self.reuse_port = reuse_port
        """Share the gRPC port with the other workers of `sluice serve --workers N` (SO_REUSEPORT)."""
        self.metrics = Metrics()
        root = settings.model_repository or bundled_repository()
        self.spin = LoopSpin(settings.loop_spin_us / 1e6) if settings.loop_spin_us else None
        if self.spin is not None:
            spin = self.spin
            self.metrics.loop_spun = lambda: spin.spun
        self.lone = LoneRuns()
        """When a lone caller's run may compute on the event loop (the data plane tells it about callers)."""
        self.calls = Calls()
        """The gRPC calls alive: whether callers crowd the server (the doors count them)."""
        self.loop_load = LoopLoad(spin=self.spin, lone=self.lone, calls=self.calls)
        """How busy the event loop is, spinning and lone runs left out, and whether a crowd makes it so: the
        adaptive batchers read it."""
        self.repository = ModelRepository(
            root,
            self.metrics,
            max_bytes=settings.max_message_bytes,
            inference_threads=settings.inference_threads,
            control=settings.model_control,
            grace=settings.grace_period_s,
            loop_load=self.loop_load,
        )
        self.plane = DataPlane(
            self.repository,
            self.metrics,
            Limits(
                max_bytes=settings.max_message_bytes,
                max_inflight=settings.max_inflight,
                max_streams=settings.max_streams,
                stream_window=settings.stream_window,
            ),
            self.spin,
            self.lone,
            self.calls,
        )
        self.service = InferenceService(self.plane)
        self.probes = Probes()
        self.port = 0
        self.metrics_port: int | None = None
        self.http_port: int | None = None
        self._rest: rest.RestServer | None = None
        self._loading: asyncio.Task[None] | None = None
        self._server: grpc.aio.Server | None = None

    @property
    def address(self) -> str:
        """Where a client on this machine dials the TCP port."""
        host = self.settings.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    async def start(self, *, load_first: bool = False) -> None:
        """Binds the ports and starts loading models; Health answers STARTING until loading ends.

        With `load_first`, the ports are bound only once every model has loaded: a worker of
        `--workers N` must not take connections (the kernel hands it new ones at once) before it can
        answer them."""
        self.repository.scan()
        limit = self.settings.max_message_bytes
        # gRPC itself refuses messages over twice the limit; between the two, the servicer answers with a
        # message naming the setting. The server is made here, inside the running loop it belongs to.
        token = self.settings.auth_token
        self._server = grpc.aio.server(
            interceptors=[BearerToken(token.get_secret_value())] if token is not None else None,
            options=[
                ("grpc.max_receive_message_length", min(2 * limit, 2**31 - 1)),
                ("grpc.max_send_message_length", limit),
                # Off unless several workers share the port on purpose: a second server started by mistake
                # on a taken port must fail to bind, not take half of its connections.
                ("grpc.so_reuseport", 1 if self.reuse_port else 0),
                # Calls one connection may have open: a client queues the rest, so a connection that
                # never reads its answers pins a bounded amount of memory.
                ("grpc.max_concurrent_streams", self.settings.max_streams_per_connection),
                # Count the streams HTTP/2 counts, as the client does: with gRPC's default "overload
                # protection", streams that ended but are not yet freed count too, and the server refuses
                # calls (REFUSED_STREAM, UNAVAILABLE) that a client sent well within the advertised limit.
                ("grpc.http.overload_protection", 0),
                ("grpc.server.max_pending_requests", PENDING_CALLS),
                ("grpc.server.max_pending_requests_hard_limit", PENDING_CALLS),
            ],
        )
        # Registered methods are matched inside gRPC core, with no Python lookup per call.
        self._server.add_registered_method_handlers(service.SERVICE_NAME, self.service.handlers())  # type: ignore[attr-defined]
        kserve_service = kserve.KServeService(self.plane)
        kserve.add_to_server(kserve_service, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.probes.servicer, self._server)
        await self.probes.starting(list(self.repository.models))
        if self.settings.reflection:
            names = (
                service.SERVICE_NAME,
                kserve.SERVICE_NAME,
                health.SERVICE_NAME,
                reflection.SERVICE_NAME,
            )
            reflection.enable_server_reflection(names, self._server)
        if load_first:
            self._loading = asyncio.create_task(self._load())
            await asyncio.shield(self._loading)
        host = self.settings.host
        bind = f"[{host}]:{self.settings.port}" if ":" in host else f"{host}:{self.settings.port}"
        credentials = server_credentials(self.settings)
        if credentials is None:
            self.port = self._server.add_insecure_port(bind)
        else:
            self.port = self._server.add_secure_port(bind, credentials)
        if self.port == 0:
            raise OSError(f"cannot bind the gRPC port {bind}")
        if self.settings.unix_socket:
            unix = f"unix:{self.settings.unix_socket}"
            if credentials is None:
                self._server.add_insecure_port(unix)
            else:
                self._server.add_secure_port(unix, credentials)
        if self.settings.metrics_port >= 0:
            try:
                self.metrics_port = self.metrics.serve(self.settings.metrics_host, self.settings.metrics_port)
            except OSError as exc:
                exc.setting = "metrics_port"  # type: ignore[attr-defined]  # says which port, for the CLI
                raise
        await self._server.start()
        if self.settings.http_port >= 0:
            self._rest = rest.RestServer(rest.ServerAdapter(kserve_service), self.settings)
            try:
                self.http_port = await self._rest.start(
                    self.settings.host, self.settings.http_port, reuse_port=self.reuse_port
                )
            except OSError as exc:
                exc.setting = "http_port"  # type: ignore[attr-defined]
                raise
        log.info(
            "serving repository=%s grpc=%s%s metrics=%s loop_spin_us=%d",
            self.repository.root,
            self.address,
            f" unix:{self.settings.unix_socket}" if self.settings.unix_socket else "",
            f"http://{self.settings.metrics_host}:{self.metrics_port}/metrics"
            if self.metrics_port
            else "off",
            self.settings.loop_spin_us,
        )
        if self._loading is None:
            self._loading = asyncio.create_task(self._load())

    async def _load(self) -> None:
        await self.repository.load()
        if self.plane.phase is Phase.STARTING:
            self.plane.phase = Phase.SERVING
        await self.probes.loaded({name: entry.state for name, entry in self.repository.models.items()})
        self.repository.on_change = self._models_changed
        if self.settings.model_control == "poll":
            self.repository.start_polling(self.settings.poll_interval_s)
        log.info(
            "ready models=%d versions_ready=%d state=%s",
            len(self.repository.models),
            len(self.repository.servables()),
            pb.ServingState.Name(self.service.state()).removeprefix("SERVING_STATE_"),
        )

    async def _models_changed(self) -> None:
        """grpc.health.v1 follows every load, reload and unload; unloaded models do not count."""
        states = self.repository.states()
        await self.probes.loaded({n: s for n, s in states.items() if s != State.UNLOADED})
        for name, state in states.items():
            if state == State.UNLOADED:
                await self.probes.servicer.set(name, NOT_SERVING)

    async def loaded(self) -> None:
        """Returns once every model has loaded or failed."""
        assert self._loading is not None, "start() first"
        await asyncio.shield(self._loading)

    async def stop(self, grace: float | None = None, drain_delay: float | None = None) -> None:
        """Stops without losing a call: readiness fails at once; after the drain delay new calls get
        UNAVAILABLE and open streams stop reading; every call and stream message already accepted is
        answered within the grace period; only then are the rest failed with UNAVAILABLE and the ports
        closed."""
        grace = self.settings.grace_period_s if grace is None else grace
        delay = self.settings.drain_delay_s if drain_delay is None else drain_delay
        plane = self.plane
        plane.phase = Phase.DRAINING
        await self.probes.draining()
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
        await self.repository.close()  # no more changes; versions being unloaded are freed
        if delay > 0:
            log.info("draining: still answering for %.1fs while load balancers take this replica out", delay)
            await asyncio.sleep(delay)
        deadline = time.monotonic() + grace
        plane.close()
        # Accepted calls wait in the batchers, which keep running at full speed until the grace is over.
        if not await plane.idle(grace):
            log.warning("grace period of %.1fs over with %d calls unanswered: failing them", grace,
                        plane.inflight)  # fmt: skip
        servables = self.repository.servables()
        await asyncio.gather(*(s.scheduler.drain(max(0.0, deadline - time.monotonic())) for s in servables))
        await plane.idle(1.0)  # the calls the batchers just failed send their UNAVAILABLE
        # Calls gRPC has received but not yet handed over would end CANCELLED when it stops, and a stream
        # ended while its client still writes reaches it as INTERNAL: refuse (streams in-band) until
        # callers have gone quiet, at most until the grace period is over; only then end the streams.
        await plane.quiet(QUIET_S, max(deadline, time.monotonic() + QUIET_S))
        plane.cut_streams()
        await plane.idle(1.0)
        if self._server is not None:
            # Every handler has returned: the grace here only lets the last answers leave.
            await self._server.stop(1.0)
        if self._rest is not None:
            await self._rest.stop()
        for servable in servables:
            servable.close()
        self.metrics.close()
        self.loop_load.close()
        log.info("stopped")

    async def _close_ports(self) -> None:
        if self._server is not None:
            await self._server.stop(0)
        if self._rest is not None:
            await self._rest.stop()
        self.metrics.close()
        self.loop_load.close()

    async def serve(self) -> None:
        """Runs until SIGTERM or SIGINT, then stops gracefully."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await self.start()
        except BaseException:
            # A port that would not bind, say: close what did start, inside the loop it belongs to.
            await self._close_ports()
            raise
        # For scripts that start the server on port 0: the one line on stdout says where it listens.
        print(f"listening on {self.address}", flush=True)
        if self.metrics_port is not None:
            print(f"metrics on http://{self.settings.metrics_host}:{self.metrics_port}/metrics", flush=True)
        if self.http_port is not None:
            print(f"rest on http://{self.address.rsplit(':', 1)[0]}:{self.http_port}/v2", flush=True)
        await stop.wait()
        log.info("signal received, draining for up to %.1fs", self.settings.grace_period_s)
        await self.stop()


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str, fmt: str) -> None:
    """Quiet, one line per event: Sluice's own lines at `level`, third-party chatter at WARNING."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("sluice").setLevel(level)
