"""Server settings: environment variables `SLUICE_*`, overridden by command-line flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024


class ServerSettings(BaseSettings):
    """Everything the server process is told from outside; model settings live in each config.toml."""

    model_config = SettingsConfigDict(env_prefix="SLUICE_", frozen=True, extra="forbid")

    model_repository: Path | None = Field(
        default=None,
        description="Directory of models (<repo>/<model>/config.toml, <repo>/<model>/<version>/model.onnx); "
        "unset serves the bundled example repository.",
    )
    model_control: Literal["none", "explicit", "poll"] = Field(
        default="none",
        description="How models change while serving: none (load the repository at start, never change), "
        "explicit (also load and unload on RepositoryModelLoad/Unload calls), poll (re-scan the "
        "repository every poll_interval_s).",
    )
    poll_interval_s: float = Field(
        default=5.0,
        gt=0,
        description="Seconds between scans of the repository with model_control = poll.",
    )
    host: str = Field(
        default="127.0.0.1",
        description="Interface the gRPC port binds to; 0.0.0.0 exposes it to the network.",
    )
    port: int = Field(default=8001, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    http_port: int = Field(
        default=8000,
        ge=-1,
        le=65535,
        description="KServe v2 REST port (HTTP, on `host`); 0 picks a free one, -1 turns it off.",
    )
    unix_socket: str | None = Field(
        default=None, description="Also serve on this unix socket path (clients dial unix:PATH)."
    )
    metrics_host: str = Field(default="127.0.0.1", description="Interface the metrics endpoint binds to.")
    metrics_port: int = Field(
        default=8002,
        ge=-1,
        le=65535,
        description="Prometheus metrics port, served at /metrics; 0 picks a free one, -1 turns metrics off.",
    )
    tls_cert: Path | None = Field(
        default=None, description="PEM certificate chain: serve the gRPC port over TLS (with tls_key)."
    )
    tls_key: Path | None = Field(default=None, description="PEM private key of tls_cert.")
    tls_client_ca: Path | None = Field(
        default=None,
        description="PEM CA bundle: require clients to present a certificate it signed (mutual TLS).",
    )
    auth_token: SecretStr | None = Field(
        default=None,
        description="Require `authorization: Bearer <token>` on every call except grpc.health.v1 (probes); "
        "others get UNAUTHENTICATED.",
    )
    max_message_bytes: int = Field(
        default=64 * MiB,
        gt=0,
        le=2**31 - 1,
        description="Largest request or response message in bytes; larger requests get RESOURCE_EXHAUSTED.",
    )
    grace_period_s: float = Field(
        default=10.0,
        ge=0,
        description="Seconds in-flight and queued requests get to finish after SIGTERM/SIGINT.",
    )
    drain_delay_s: float = Field(
        default=0.0,
        ge=0,
        description="Seconds the server keeps answering after SIGTERM/SIGINT with readiness already failing, "
        "before it refuses new calls; a few seconds let Kubernetes take the pod out of its endpoints first.",
    )
    max_inflight: int = Field(
        default=4096,
        gt=0,
        description="Unary calls and stream messages answered at once; more get RESOURCE_EXHAUSTED before "
        "their tensors are decoded.",
    )
    max_streams: int = Field(
        default=1024,
        gt=0,
        description="Streams open at once; more get RESOURCE_EXHAUSTED.",
    )
    stream_window: int = Field(
        default=256,
        gt=0,
        description="Messages of one stream read but not yet answered and sent; while that many are out, the "
        "server reads no more of the stream and HTTP/2 flow control pushes back on the client.",
    )
    max_streams_per_connection: int = Field(
        default=1024,
        gt=0,
        description="HTTP/2 streams (calls) one connection may have open; a client queues calls beyond it.",
    )
    inference_threads: int = Field(
        default=0,
        ge=0,
        description="Total ONNX Runtime intra-op threads shared by all sessions; 0 means one per CPU core.",
    )
    workers: int | Literal["auto"] = Field(
        default=1,
        description="Server processes sharing the gRPC port (SO_REUSEPORT, Linux only), each with its own "
        "models and an equal share of inference_threads, restarted when one dies; auto: one per CPU core.",
    )
    loop_spin_us: int = Field(
        default=1000,
        ge=0,
        le=1_000_000,
        description=(
            "Microseconds the event loop keeps polling for a lone caller's next request, instead of "
            "sleeping, once its last one is answered, so that it finds the CPU's caches warm (on a VM about "
            "0.3 ms less per request at one caller). Not with concurrent callers, not for callers further "
            "apart than this, never while a worker thread computes; costs up to one core per process while "
            "one caller sends back to back. 0 turns it off (under a tight CPU quota, or where CPU use drives "
            "autoscaling)."
        ),
    )
    reflection: bool = Field(
        default=True,
        description="Serve gRPC server reflection, so grpcurl and similar tools work without the .proto "
        "files.",
    )
    event_loop: Literal["auto", "uvloop", "asyncio"] = Field(
        default="auto",
        description="Event loop: uvloop (a faster loop, about 10% more requests/s here), asyncio, or auto "
        "(uvloop when installed).",
    )

    @field_validator("workers", mode="before")
    @classmethod
    def _check_workers(cls, value: Any) -> int | str:
        # One message for the two forms, rather than one per member of the union.
        if value == "auto":
            return "auto"
        try:
            count = int(value)
        except (TypeError, ValueError):
            count = 0
        if count < 1 or isinstance(value, float | bool):
            raise ValueError("expected a number of processes (1 or more) or 'auto'")
        return count

    @model_validator(mode="after")
    def _check_tls(self) -> ServerSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: set both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        return self

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Log level of the server's own log lines."
    )
    log_format: Literal["text", "json"] = Field(
        default="text", description="Log line format: readable text or one JSON object per line."
    )
