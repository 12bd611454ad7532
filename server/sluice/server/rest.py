"""The Open Inference Protocol's REST binding (KServe v2 over HTTP/1.1), with the Triton extensions its
tools call: an aiohttp server on the server's own event loop, on a port of its own.

A door of the data plane (`core.py`), like the gRPC ones: it routes, reads bodies (refusing one over
max_message_bytes before it is read whole), checks the bearer token, lets `rest_codec` turn JSON and binary
tensor data into the plane's request and its answer back, and runs the same skeleton as `grpc_door.unary`
(admit, answer, count) with statuses mapped to HTTP once (`HTTP_STATUS`). Everything it asks of the server
goes through `ServerAdapter`; the answers are those of the KServe gRPC door.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from sluice.kserve.v2 import grpc_service_pb2 as kpb
from sluice.kserve.v2 import model_config_pb2 as mc
from sluice.server import classification, kserve_models, rest_codec
from sluice.server.core import InferRequest, InferResult
from sluice.server.errors import Code, SluiceError, clip, invalid, not_found, to_status
from sluice.server.kserve import EXTENSIONS, KServeService
from sluice.server.kserve_tensors import describe, model_version
from sluice.server.pipeline import Servable
from sluice.server.settings import ServerSettings

log = logging.getLogger("sluice.server")

HTTP_STATUS: dict[Code, int] = {
    Code.OK: 200,
    Code.CANCELLED: 499,
    Code.UNKNOWN: 500,
    Code.INVALID_ARGUMENT: 400,
    Code.DEADLINE_EXCEEDED: 504,
    Code.NOT_FOUND: 404,
    Code.ALREADY_EXISTS: 409,
    Code.PERMISSION_DENIED: 403,
    Code.UNAUTHENTICATED: 401,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.FAILED_PRECONDITION: 400,
    Code.ABORTED: 409,
    Code.OUT_OF_RANGE: 400,
    Code.UNIMPLEMENTED: 501,
    Code.INTERNAL: 500,
    Code.UNAVAILABLE: 503,
    Code.DATA_LOSS: 500,
}
"""Sluice's statuses as HTTP statuses: Google's mapping of gRPC codes (google/rpc/code.proto), which
agrees with Triton's HTTP server on every code Triton has (400, 404, 500, 501, 503)."""

OPEN_PATHS = ("/v2/health/",)
"""Paths that need no token: Kubernetes probes carry none (as grpc.health.v1 on the gRPC port)."""
TOKEN_MESSAGE = "missing or invalid bearer token: send the header 'Authorization: Bearer <token>'"
JSON = "application/json"
BINARY = "application/octet-stream"
METHOD = "REST ModelInfer"
_READ_CHUNK = 1 << 16


class ServerAdapter:
    """Every call the REST door makes into the server: the data plane and what the KServe gRPC door keeps
    (its version, last_inference), so both bindings of the protocol answer alike."""

    def __init__(self, kserve: KServeService) -> None:
        self._kserve = kserve  # shares last_inference with the gRPC door: one API, two bindings
        self._plane = kserve.plane
        self._repository = kserve.plane.repository
        self.version = kserve.version

    def live(self) -> bool:
        return self._plane.live()

    def ready(self) -> bool:
        return self._plane.ready()

    def model_ready(self, name: str, version: str) -> bool:
        number = model_version(version)  # a malformed version is the caller's mistake, not "not ready"
        if not self._plane.live():
            return False
        try:
            self._repository.resolve(name, number)
        except SluiceError:
            return False
        return True

    def servable(self, name: str, version: str) -> Servable:
        """The version a request names (the default one for "")."""
        return self._servable(name, version)

    def metadata(self, name: str, version: str) -> kpb.ModelMetadataResponse:
        servable = self._servable(name, version)
        return kserve_models.metadata(servable, self._repository.models[servable.name])

    def config(self, name: str, version: str) -> mc.ModelConfig:
        return kserve_models.config(self._servable(name, version))

    def statistics(self, name: str, version: str) -> kpb.ModelStatisticsResponse:
        if name:
            servables = [self._servable(name, version)]
        elif version:
            raise invalid(f"a version ('{clip(version)}') needs a model name")
        else:
            servables = [
                entry.default.servable
                for entry in self._repository.models.values()
                if entry.default is not None and entry.default.servable is not None
            ]
        last = self._kserve.last_inference
        metrics = self._plane.metrics
        stats = [kserve_models.statistics(s, str(s.version), metrics, last.get(s.name, 0)) for s in servables]
        return kpb.ModelStatisticsResponse(model_stats=stats)

    def index(self, ready: bool, repository: str = "") -> kpb.RepositoryIndexResponse:
        if repository:
            raise not_found(f"no repository named '{clip(repository)}'; Sluice serves one, named ''")
        return kserve_models.index(list(self._repository.models.values()), ready)

    def admit(self) -> None:
        """Admits one infer request (the server's phase and in-flight budget), or refuses it."""
        self._plane.enter()

    def release(self) -> None:
        """One admitted request has its answer."""
        self._plane.leave()

    async def infer(self, request: InferRequest) -> InferResult:
        """Looks the model up, checks and decodes the inputs, and runs the pipeline (HTTP has no deadline
        of its own: the request's `timeout` parameter is the only one)."""
        result = await self._plane.infer(request, None, describe)
        self._kserve.last_inference[result.servable.name] = time.time_ns() // 1_000_000
        return result

    def count(self, model: str, code: Code, started: float) -> None:
        self._plane.count(model, METHOD, code, started)

    def _servable(self, name: str, version: str) -> Servable:
        if not name:
            raise invalid("no model name given")
        return self._repository.resolve(name, model_version(version))


class BodyTooLargeError(SluiceError):
    """A request body over max_message_bytes: 413, refused before it is read whole."""

    def __init__(self, message: str) -> None:
        super().__init__(Code.RESOURCE_EXHAUSTED, message)


def ssl_context(settings: ServerSettings) -> ssl.SSLContext | None:
    """TLS for the HTTP port from the gRPC port's PEM files (and mutual TLS with tls_client_ca)."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    if settings.tls_client_ca is not None:
        context.load_verify_locations(cafile=str(settings.tls_client_ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def error_response(status: int, message: str) -> web.Response:
    """The v2 error body, `{"error": "..."}`."""
    return web.Response(status=status, text=json.dumps({"error": message}), content_type=JSON)


def _json(value: Any) -> web.Response:
    return web.Response(text=json.dumps(value), content_type=JSON)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class RestServer:
    """The HTTP port: start it inside the running loop, stop it once the server has drained."""

    def __init__(self, adapter: ServerAdapter, settings: ServerSettings) -> None:
        self.adapter = adapter
        self.settings = settings
        self.max_bytes = settings.max_message_bytes
        token = settings.auth_token
        self._expected = None if token is None else f"Bearer {token.get_secret_value()}".encode()
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    def application(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=self.max_bytes)
        add = app.router.add_route
        add("GET", "/v2/models/stats", self.all_statistics)  # before /v2/models/{model} would take it
        add("GET", "/v2", self.server_metadata)
        add("GET", "/v2/health/live", self.live)
        add("GET", "/v2/health/ready", self.ready)
        add("POST", "/v2/repository/index", self.repository_index)
        for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            add("GET", base, self.model_metadata)
            add("GET", f"{base}/ready", self.model_ready)
            add("GET", f"{base}/config", self.model_config)
            add("GET", f"{base}/stats", self.model_statistics)
            add("POST", f"{base}/infer", self.infer)
        return app

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> int:
        """Binds the port (0 picks a free one) and serves; returns the port bound. With `reuse_port` the
        port is shared (SO_REUSEPORT) with the other workers of `--workers N`."""
        runner = web.AppRunner(
            self.application(), access_log=None, shutdown_timeout=self.settings.grace_period_s
        )
        await runner.setup()
        site = web.TCPSite(
            runner, host, port, ssl_context=ssl_context(self.settings), reuse_port=reuse_port or None
        )
        await site.start()
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        """Closes the port and ends idle connections; requests still being answered get the grace period."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ---- the routes ---------------------------------------------------------------------------------

    async def server_metadata(self, request: web.Request) -> web.Response:
        return _json({"name": "sluice", "version": self.adapter.version, "extensions": list(EXTENSIONS)})

    async def live(self, request: web.Request) -> web.Response:
        # The protocol's health answers are the status alone: 200 for true, 400 for false (as Triton).
        return web.Response(status=200 if self.adapter.live() else 400)

    async def ready(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.adapter.ready() else 400)

    async def model_ready(self, request: web.Request) -> web.Response:
        model, version = _names(request)
        return web.Response(status=200 if self.adapter.model_ready(model, version) else 400)

    async def model_metadata(self, request: web.Request) -> web.Response:
        return _json(rest_codec.message_json(self.adapter.metadata(*_names(request))))

    async def model_config(self, request: web.Request) -> web.Response:
        # Triton's HTTP endpoint answers the ModelConfig itself, not ModelConfigResponse's {"config": ...}.
        return _json(rest_codec.message_json(self.adapter.config(*_names(request))))

    async def model_statistics(self, request: web.Request) -> web.Response:
        return _json(rest_codec.message_json(self.adapter.statistics(*_names(request))))

    async def all_statistics(self, request: web.Request) -> web.Response:
        return _json(rest_codec.message_json(self.adapter.statistics("", "")))

    async def repository_index(self, request: web.Request) -> web.Response:
        body = await self._read(request)
        ready = False
        repository = ""
        if body.strip():
            try:
                asked = json.loads(body)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise invalid(f"the request body is not valid JSON: {exc}") from None
            if not isinstance(asked, dict):
                raise invalid('the request body must be a JSON object, such as {"ready": true}')
            repository = str(asked.get("repository_name") or "")
            ready = asked.get("ready", False)
            if not isinstance(ready, bool):
                raise invalid(f"'ready' must be true or false, got {json.dumps(ready)}")
        # Triton answers the list itself, not RepositoryIndexResponse's {"models": [...]}.
        index = rest_codec.message_json(self.adapter.index(ready, repository))
        return _json(index["models"])

    async def infer(self, request: web.Request) -> web.Response:
        """The shared skeleton of a door: admitted, parsed, answered, counted; every failure a status."""
        started = time.monotonic()
        model, version = _names(request)
        try:
            self.adapter.admit()
        except SluiceError as exc:
            code, message, too_large = exc.code, exc.message, False
        else:
            try:
                response = await self._infer(request, model, version)
            except asyncio.CancelledError:
                self.adapter.count(model, Code.CANCELLED, started)
                raise
            except Exception as exc:
                code, message = to_status(exc, f"{METHOD} model={clip(model)!r}")
                too_large = isinstance(exc, BodyTooLargeError)
            else:
                self.adapter.count(model, Code.OK, started)
                return response
            finally:
                self.adapter.release()
        self.adapter.count(model, code, started)
        return error_response(413 if too_large else HTTP_STATUS[code], message)

    async def _infer(self, request: web.Request, model: str, version: str) -> web.Response:
        body = await self._read(request)
        parsed, binary = rest_codec.split_body(body, request.headers.get(rest_codec.HEADER_LENGTH))
        del body
        infer = rest_codec.to_request(parsed, binary, model, version)
        _, binary_outputs, binary_default = rest_codec.binary_outputs(parsed)
        classes = rest_codec.classifications(parsed)
        if classes is not None:
            classification.check_outputs(self.adapter.servable(model, version), classes)
        result = await self.adapter.infer(infer)
        servable = result.servable
        if classes is not None:
            result.outputs = await classification.rank_outputs(servable, result.outputs, classes)
        outputs = dict(result.outputs)
        tensors, chunks = rest_codec.encode_outputs(outputs, binary_outputs, binary_default)
        answer: dict[str, Any] = {"model_name": servable.name, "model_version": str(servable.version)}
        if infer.id:
            answer["id"] = infer.id
        answer["outputs"] = tensors
        header = json.dumps(answer).encode()
        if not chunks:
            return web.Response(body=header, content_type=JSON)
        return web.Response(
            body=b"".join([header, *chunks]),
            content_type=BINARY,
            headers={rest_codec.HEADER_LENGTH: str(len(header))},
        )

    async def _read(self, request: web.Request) -> bytes:
        """The whole body, refused as soon as it is known to be over max_message_bytes."""
        limit = self.max_bytes
        declared = request.content_length
        if declared is not None and declared > limit:
            raise BodyTooLargeError(
                f"the request body has {declared} bytes, over the server's max_message_bytes limit of "
                f"{limit} (SLUICE_MAX_MESSAGE_BYTES)"
            )
        chunks: list[bytes] = []
        size = 0
        while chunk := await request.content.read(_READ_CHUNK):
            size += len(chunk)
            if size > limit:
                raise BodyTooLargeError(
                    f"the request body is over the server's max_message_bytes limit of {limit} bytes "
                    "(SLUICE_MAX_MESSAGE_BYTES)"
                )
            chunks.append(chunk)
        return b"".join(chunks)

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """The bearer token, and errors as the v2 error body: one place for every route."""
        if self._expected is not None and not request.path.startswith(OPEN_PATHS):
            given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(given, self._expected):
                response = error_response(401, TOKEN_MESSAGE)
                response.headers["WWW-Authenticate"] = "Bearer"
                return response
        try:
            return await handler(request)
        except web.HTTPException as exc:  # no such route, or a method the route does not take
            if exc.status == 404:
                return error_response(404, f"no route {request.method} {request.path}; see docs/kserve.md")
            return error_response(exc.status, f"{exc.reason}: {request.method} {request.path}")
        except Exception as exc:
            code, message = to_status(exc, f"REST {request.method} {request.path}")
            return error_response(413 if isinstance(exc, BodyTooLargeError) else HTTP_STATUS[code], message)


def _names(request: web.Request) -> tuple[str, str]:
    return request.match_info["model"], request.match_info.get("version", "")
