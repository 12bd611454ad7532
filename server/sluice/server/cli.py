"""The `sluice` command line: `sluice serve`, and the client commands handed to `sluice.clients.cli`.

The server never imports the clients package at module level: `predict`, `health`, `models`, `load` and
`unload` are only named here, and their module is imported when one of them runs.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import socket
import ssl
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import ValidationError

from sluice.server.config import describe_validation_error
from sluice.server.settings import ServerSettings

# One line each for `sluice --help`; their parsers live in sluice.clients.cli.
CLIENT_COMMANDS = {
    "predict": "run a model on inputs from .npy files or JSON",
    "health": "the server's state and its models' states",
    "models": "models with their versions, inputs, outputs and execution providers",
    "load": "load a model, or reload what changed in it (servers with --model-control explicit)",
    "unload": "unload every version of a model (servers with --model-control explicit)",
}


class StartupError(Exception):
    """A setting the server cannot start with; the message names the setting, its value and the fix."""


def _help(text: str) -> str:
    # argparse %-formats help strings; a description saying "10% more" must not be read as a format.
    return text.replace("%", "%%")


# Flags are made from ServerSettings, so a new setting gets its flag; these only read better than "VALUE".
_METAVARS = {
    "host": "ADDR", "metrics_host": "ADDR", "port": "PORT", "metrics_port": "PORT", "unix_socket": "PATH",
    "tls_cert": "PEM", "tls_key": "PEM", "tls_client_ca": "PEM", "auth_token": "TOKEN",
    "max_message_bytes": "BYTES", "workers": "N|auto",
}  # fmt: skip


def _serve_parser(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "serve",
        help="serve a model repository over gRPC (and the KServe v2 REST binding)",
        description="Serve a model repository over gRPC. Every flag can also be set with the environment "
        "variable shown; flags win.",
    )
    p.add_argument(
        "model_repository", nargs="?", type=Path, default=None,
        help="directory of models; omitted: the bundled example repository [SLUICE_MODEL_REPOSITORY]",
    )  # fmt: skip
    for name, field in ServerSettings.model_fields.items():
        if name == "model_repository":
            continue
        kind: Any = field.annotation
        members = [a for a in get_args(kind) if a is not type(None)]
        if get_origin(kind) is not Literal and len(members) == 1:
            kind = members[0]  # `Path | None` and the like
        default = "unset" if field.default is None else field.default
        help = _help(f"{field.description} [SLUICE_{name.upper()}, default: {default}]")
        option = "--" + name.replace("_", "-")
        if kind is bool:
            p.add_argument(option, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help)
        elif get_origin(kind) is Literal:
            choices = [str(c) for c in get_args(kind)]
            p.add_argument(option, dest=name, choices=choices, default=None, help=help)
        else:
            convert: Callable[[str], Any] = {int: int, float: float, Path: Path}.get(kind, str)
            metavar = _METAVARS.get(name) or (
                "SECONDS" if name.endswith("_s") else "N" if convert in (int, float) else "VALUE"
            )
            p.add_argument(option, dest=name, type=convert, default=None, metavar=metavar, help=help)
    p.set_defaults(handler=_serve)
    return p


def _serve(args: argparse.Namespace) -> int:
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
    try:
        preflight(settings)
    except StartupError as exc:
        print(f"sluice serve: {exc}", file=sys.stderr)
        return 2

    from sluice.server.app import SluiceServer, configure_logging
    from sluice.server.workers import worker_count

    configure_logging(settings.log_level, settings.log_format)
    if worker_count(settings) > 1:
        from sluice.server import workers

        return workers.serve(settings)
    server = SluiceServer(settings)
    try:
        run(server.serve(), settings.event_loop)
    except RuntimeError as exc:
        # grpc's bind failure. The preflight saw the TCP port free, so something took it since, or the
        # unix socket could not be made.
        if not str(exc).startswith("Failed to bind"):
            raise
        if settings.unix_socket and f"unix:{settings.unix_socket}" in str(exc):
            problem = (
                f"unix_socket={settings.unix_socket}: cannot bind it; check that its directory exists and "
                "is writable, and remove a socket file left by a server that is gone"
            )
        else:
            problem = _port_taken("port", settings.host, settings.port)
        print(f"sluice serve: {problem}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            setting = getattr(exc, "setting", "metrics_port")
            host = settings.metrics_host if setting == "metrics_port" else settings.host
            where = _port_taken(setting, host, getattr(settings, setting))
            print(f"sluice serve: {where}", file=sys.stderr)
            return 2
        print(f"sluice serve: {exc}", file=sys.stderr)
        return 1
    return 0


def preflight(settings: ServerSettings) -> None:
    """Checks what grpc would only report as "Failed to bind" (taken ports, unusable TLS files), and the
    repository, before any model loads."""
    repository = settings.model_repository
    if repository is not None and not repository.is_dir():
        raise StartupError(
            f"model_repository={repository}: not a directory; give the directory that holds your models "
            "(<repository>/<model>/<version>/model.onnx), or leave it out to serve the bundled examples"
        )
    _check_tls(settings)
    if settings.unix_socket and settings.workers != 1:
        raise StartupError(
            f"unix_socket={settings.unix_socket}: one socket path cannot be shared by several workers; "
            "serve it with --workers 1, or drop --unix-socket"
        )
    grpc_port = (settings.host, settings.port)
    if settings.metrics_port > 0 and (settings.metrics_host, settings.metrics_port) == grpc_port:
        raise StartupError(
            f"metrics_port={settings.metrics_port} is also the gRPC port; choose another with "
            "--metrics-port (0 picks a free one, -1 turns metrics off)"
        )
    if settings.http_port > 0 and settings.http_port == settings.port:
        # Under --workers every socket shares its port (SO_REUSEPORT), so nothing else would refuse this:
        # the kernel would hand half the connections to the wrong protocol.
        raise StartupError(
            f"http_port={settings.http_port} is also the gRPC port; choose another with --http-port "
            "(0 picks a free one, -1 turns the REST port off)"
        )
    if settings.http_port > 0 and (settings.metrics_host, settings.metrics_port) == (
        settings.host,
        settings.http_port,
    ):
        raise StartupError(
            f"metrics_port={settings.metrics_port} is also the REST port; choose another with "
            "--metrics-port (0 picks a free one, -1 turns metrics off)"
        )
    _check_port("port", settings.host, settings.port)
    _check_port("metrics_port", settings.metrics_host, settings.metrics_port)
    _check_port("http_port", settings.host, settings.http_port)


def _port_taken(setting: str, host: str, port: int) -> str:
    fix = {
        "port": "--port (SLUICE_PORT; 0 picks a free one)",
        "metrics_port": "--metrics-port (SLUICE_METRICS_PORT; 0 picks a free one, -1 turns metrics off)",
        "http_port": "--http-port (SLUICE_HTTP_PORT; 0 picks a free one, -1 turns the REST port off)",
    }[setting]
    return (
        f"{setting}={port}: {host}:{port} is already in use; stop what listens there or choose another "
        f"with {fix}"
    )


def _check_port(setting: str, host: str, port: int) -> None:
    if port <= 0:  # 0 picks a free port, -1 turns the endpoint off: nothing can clash
        return
    host_setting = "metrics_host" if setting == "metrics_port" else "host"
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(
            f"{host_setting}={host!r}: not a known address ({exc.strerror}); use an address of this "
            "machine, such as 127.0.0.1, or 0.0.0.0 for every interface"
        ) from None
    failures = []
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            # grpc binds with SO_REUSEADDR too: a port left in TIME_WAIT is free, one with a listener is not.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise StartupError(_port_taken(setting, host, port)) from None
                failures.append(exc)
    if failures and len(failures) == len(addresses):
        raise StartupError(
            f"{host_setting}={host!r}: cannot bind {host}:{port} ({failures[0].strerror}); use an address "
            "of this machine, such as 127.0.0.1, or 0.0.0.0 for every interface"
        )


def _read_pem(setting: str, path: Path, marker: str, what: str) -> None:
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise StartupError(f"{setting}={path}: cannot read it ({exc.strerror})") from None
    if b"-----BEGIN " not in text or marker.encode() not in text:
        raise StartupError(
            f"{setting}={path}: not a PEM {what} (no '-----BEGIN ...{marker}-----' line); "
            f"give the PEM file, or convert it (openssl x509 -inform der -in FILE -out FILE.pem)"
        )


def _check_tls(settings: ServerSettings) -> None:
    cert, key, ca = settings.tls_cert, settings.tls_key, settings.tls_client_ca
    if cert is None or key is None:
        return  # the settings themselves insist on both or neither
    _read_pem("tls_cert", cert, "CERTIFICATE", "certificate")
    _read_pem("tls_key", key, "PRIVATE KEY", "private key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # A callable password: OpenSSL must not stop to prompt for an encrypted key (grpc cannot use one).
        context.load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc):
            raise StartupError(
                f"tls_key={key}: does not match the certificate in tls_cert={cert}; give the key the "
                "certificate was issued for"
            ) from None
        raise StartupError(
            f"tls_cert={cert}, tls_key={key}: cannot be loaded ({exc.reason or exc}); give an unencrypted "
            "PEM key and its certificate chain"
        ) from None
    if ca is not None:
        _read_pem("tls_client_ca", ca, "CERTIFICATE", "CA bundle")
        try:
            context.load_verify_locations(cafile=ca)
        except ssl.SSLError as exc:
            raise StartupError(f"tls_client_ca={ca}: cannot be loaded ({exc.reason or exc})") from None


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


def _run_client_command(argv: list[str]) -> int:
    try:
        from sluice.clients import cli
    except ImportError:
        print(f"sluice {argv[0]}: the client package (sluice.clients) is not installed", file=sys.stderr)
        return 2
    return cli.main(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `sluice` console script."""
    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in and args_in[0] in CLIENT_COMMANDS:
        return _run_client_command(args_in)
    parser = argparse.ArgumentParser(
        prog="sluice",
        description="Sluice: an asyncio gRPC inference server for ONNX models with an adaptive batcher.",
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", dest="command", required=True)
    commands = {"serve": _serve_parser(sub)}
    for name, summary in CLIENT_COMMANDS.items():
        sub.add_parser(name, help=summary, add_help=False)  # listed here, parsed by sluice.clients.cli
    args, unknown = parser.parse_known_args(args_in)
    if unknown:
        # argparse would report these with the top-level usage; the subcommand's is the one that helps.
        commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
