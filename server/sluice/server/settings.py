"""Server settings: environment variables `SLUICE_*`, overridden by command-line flags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
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
    host: str = Field(
        default="127.0.0.1",
        description="Interface the gRPC port binds to; 0.0.0.0 exposes it to the network.",
    )
    port: int = Field(default=8001, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
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
    inference_threads: int = Field(
        default=0,
        ge=0,
        description="Total ONNX Runtime intra-op threads shared by all sessions; 0 means one per CPU core.",
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
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Log level of the server's own log lines."
    )
    log_format: Literal["text", "json"] = Field(
        default="text", description="Log line format: readable text or one JSON object per line."
    )
