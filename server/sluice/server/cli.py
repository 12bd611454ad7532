"""The `sluice` command line."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from sluice.server.config import describe_validation_error
from sluice.server.settings import ServerSettings


def _serve_parser(sub: Any) -> None:
    fields = ServerSettings.model_fields
    p = sub.add_parser(
        "serve",
        help="serve a model repository over gRPC",
        description="Serve a model repository over gRPC. Every flag can also be set with the environment "
        "variable shown; flags win.",
    )

    def flag(name: str, *, type: Any = str, metavar: str | None = None, **kw: Any) -> None:
        field = fields[name]
        env = f"SLUICE_{name.upper()}"
        p.add_argument(
            "--" + name.replace("_", "-"), dest=name, type=type, default=None, metavar=metavar,
            help=f"{field.description} [{env}, default: {field.default}]", **kw,
        )  # fmt: skip

    p.add_argument(
        "model_repository", nargs="?", type=Path, default=None,
        help="directory of models; omitted: the bundled example repository [SLUICE_MODEL_REPOSITORY]",
    )  # fmt: skip
    flag("model_control", choices=["none", "explicit", "poll"])
    flag("poll_interval_s", type=float, metavar="SECONDS")
    flag("host", metavar="ADDR")
    flag("port", type=int, metavar="PORT")
    flag("unix_socket", metavar="PATH")
    flag("metrics_host", metavar="ADDR")
    flag("metrics_port", type=int, metavar="PORT")
    flag("tls_cert", type=Path, metavar="PEM")
    flag("tls_key", type=Path, metavar="PEM")
    flag("tls_client_ca", type=Path, metavar="PEM")
    flag("auth_token", metavar="TOKEN")
    flag("max_message_bytes", type=int, metavar="BYTES")
    flag("grace_period_s", type=float, metavar="SECONDS")
    flag("inference_threads", type=int, metavar="N")
    p.add_argument(
        "--reflection", action=argparse.BooleanOptionalAction, default=None,
        help=f"{fields['reflection'].description} [SLUICE_REFLECTION, default: True]",
    )  # fmt: skip
    flag("event_loop", choices=["auto", "uvloop", "asyncio"])
    flag("log_level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    flag("log_format", choices=["text", "json"])
    p.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    from sluice.server.app import SluiceServer, configure_logging

    overrides = {
        name: value
        for name, value in vars(args).items()
        if name in ServerSettings.model_fields and value is not None
    }
    try:
        settings = ServerSettings(**overrides)
    except ValidationError as exc:
        print(f"sluice serve: invalid settings: {describe_validation_error(exc)}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    server = SluiceServer(settings)
    try:
        run(server.serve(), settings.event_loop)
    except (FileNotFoundError, OSError) as exc:
        print(f"sluice serve: {exc}", file=sys.stderr)
        return 1
    return 0


def run(main: Coroutine[Any, Any, None], event_loop: str) -> None:
    """Runs the server's coroutine on the chosen event loop."""
    if event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if event_loop == "uvloop":
                raise SystemExit("sluice serve: event_loop = 'uvloop' but uvloop is not installed") from None
        else:
            uvloop.run(main)
            return
    asyncio.run(main)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `sluice` console script."""
    parser = argparse.ArgumentParser(
        prog="sluice",
        description="Sluice: an asyncio gRPC inference server for ONNX models with an adaptive batcher.",
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", dest="command", required=True)
    _serve_parser(sub)
    # The client commands live with the clients; the one console script offers both sides.
    from sluice.clients.cli import add_commands

    add_commands(sub)
    args = parser.parse_args(argv)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
