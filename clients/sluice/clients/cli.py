"""The client side of the `sluice` command: predict, health, models, load, unload.

`sluice` (in sluice.server.cli) hands these subcommands to `main` here; it needs only the client and the
contract. `python -m sluice.clients.cli` runs them on a machine with the clients alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt

from sluice.clients.client import Client, ClientOptions, SluiceError
from sluice.clients.codec import numpy_dtype
from sluice.clients.forms import file_bytes
from sluice.kserve.v2 import grpc_service_pb2 as kpb
from sluice.kserve.v2 import grpc_service_pb2_grpc as kpb_grpc
from sluice.v1 import inference_pb2 as pb


def _type(datatype: int) -> str:
    return pb.DataType.Name(datatype).removeprefix("DATA_TYPE_")  # type: ignore[arg-type]


def _shape(shape: Any) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


FORMS = (
    "NAME=FILE.npy, NAME=JSON, NAME=@FILE.json, NAME=@FILE (its bytes), or Cluster Serving's "
    'NAME={"path": FILE} or NAME={"b64": TEXT} (one BYTES element)'
)


def add_commands(sub: Any) -> dict[str, argparse.ArgumentParser]:
    """Adds `predict`, `health`, `models`, `load` and `unload` to the `sluice` command's subparsers; returns
    them by name."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--target", default=os.environ.get("SLUICE_TARGET", "127.0.0.1:8001"),
        help="server address, HOST:PORT or unix:PATH [SLUICE_TARGET, default: 127.0.0.1:8001]",
    )  # fmt: skip
    common.add_argument("--timeout", type=float, default=30.0, help="deadline in seconds (default: 30)")
    common.add_argument(
        "--token", default=os.environ.get("SLUICE_AUTH_TOKEN"),
        help="bearer token, for a server started with one [SLUICE_AUTH_TOKEN]",
    )  # fmt: skip
    common.add_argument(
        "--tls", action="store_true",
        help="connect over TLS, trusting the system's CA certificates unless --ca is given",
    )  # fmt: skip
    common.add_argument(
        "--ca", type=Path, metavar="FILE", help="PEM CA certificates to trust for the server (implies --tls)"
    )
    common.add_argument(
        "--cert", type=Path, metavar="FILE",
        help="PEM client certificate chain, for a server that asks for one (mutual TLS; with --key)",
    )  # fmt: skip
    common.add_argument("--key", type=Path, metavar="FILE", help="PEM private key of --cert")
    common.add_argument("--json", action="store_true", help="print JSON instead of readable text")

    p = sub.add_parser("predict", parents=[common], help="run a model on inputs from .npy files or JSON")
    p.add_argument("model", help="model name")
    p.add_argument(
        "--input", "-i", action="append", default=[], metavar="NAME=FILE.npy|JSON|@FILE",
        help="an input: a .npy file (cast to the model's type when the cast is exact), a JSON array (cast "
        "to the model's type), @FILE.json, or @FILE sent as one BYTES element (an image, say), as are "
        'Cluster Serving\'s {"path": FILE} and {"b64": TEXT} (repeatable)',
    )  # fmt: skip
    p.add_argument("--output", "-o", action="append", default=[], metavar="NAME", help="outputs to return")
    p.add_argument("--version", type=int, default=None, help="model version (default: the highest ready)")
    p.set_defaults(handler=_predict)

    h = sub.add_parser(
        "health", parents=[common], help="the server's state and its models' states; exits 1 when not ready"
    )
    h.add_argument("--model", default="", help="only this model")
    h.set_defaults(handler=_health)

    m = sub.add_parser(
        "models", parents=[common], help="models with their versions, inputs, outputs and execution providers"
    )
    m.set_defaults(handler=_models)

    lo = sub.add_parser(
        "load", parents=[common],
        help="load a model, or reload what changed in it (servers with --model-control explicit)",
    )  # fmt: skip
    lo.add_argument("model", help="model name (its directory in the server's repository)")
    lo.add_argument(
        "--config", metavar="TOML|@FILE",
        help="use this config instead of the model's config.toml until the next load: TOML text, or @FILE",
    )  # fmt: skip
    lo.set_defaults(handler=_load)

    un = sub.add_parser(
        "unload",
        parents=[common],
        help="unload every version of a model (servers with --model-control explicit)",
    )
    un.add_argument("model", help="model name")
    un.set_defaults(handler=_unload)
    return {"predict": p, "health": h, "models": m, "load": lo, "unload": un}


def main(argv: Sequence[str] | None = None) -> int:
    """`sluice predict|health|models|load|unload ...`: called by the `sluice` command for these."""
    parser = argparse.ArgumentParser(prog="sluice", description="Sluice's client commands.")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", dest="command", required=True)
    commands = add_commands(sub)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # argparse would report these with the top-level usage; the subcommand's is the one that helps.
        commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    code: int = args.handler(args)
    return code


def _options(args: argparse.Namespace) -> ClientOptions:
    """The connection the flags ask for; ValueError or OSError names a flag that cannot be used."""
    if (args.cert is None) != (args.key is None):
        raise ValueError("--cert and --key go together: give both or neither")
    tls = args.tls or any(path is not None for path in (args.ca, args.cert, args.key))
    return ClientOptions(
        timeout=args.timeout,
        token=args.token,
        tls=tls,
        root_certificates=_pem(args.ca, "--ca"),
        certificate_chain=_pem(args.cert, "--cert"),
        private_key=_pem(args.key, "--key"),
    )


def _pem(path: Path | None, flag: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise OSError(f"{flag} {path}: {exc.strerror or exc}") from None


def _run(args: argparse.Namespace, work: Any) -> int:
    try:
        with Client(args.target, _options(args)) as client:
            work(client)
    except SluiceError as exc:
        hint = ""
        if exc.code == grpc.StatusCode.UNAVAILABLE and "failed to connect" in exc.message:
            hint = (
                f" (is a server running at {args.target}? Start one with `sluice serve`, or point --target "
                "or SLUICE_TARGET at it"
            )
            if args.tls or args.ca or args.cert:
                # A refused handshake reads the same as no server.
                hint += (
                    "; over TLS, check that --ca trusts its certificate and that --cert and --key are given "
                )
                hint += "if it asks for a client certificate"
            hint += ")"
        print(f"sluice {args.command}: {exc.code.name}: {exc.message}{hint}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"sluice {args.command}: {exc}", file=sys.stderr)
        return 2
    return 0


def _read(path: Path, where: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{where}: no such file") from None
    except OSError as exc:
        raise ValueError(f"{where}: cannot read it ({exc.strerror})") from None


def _parse_input(text: str, specs: dict[str, pb.TensorSpec]) -> tuple[str, npt.NDArray[Any]]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise ValueError(f"--input {text!r}: expected {FORMS}")
    where = f"--input {name}={value}"
    spec = specs.get(name)
    dtype = numpy_dtype(spec.datatype) if spec is not None else None
    if value.endswith(".npy"):
        return name, _load_npy(Path(value.removeprefix("@")), where, dtype)
    if value.startswith("@") and not value.endswith(".json"):
        # Any other file is sent as it is: one BYTES element (an encoded image, say) per --input.
        data = _read(Path(value[1:]), where)
        rank = len(spec.shape) if spec is not None else 1
        return name, np.array([data], dtype=object).reshape((1,) * max(rank, 1))
    if value.startswith("@"):
        source = _read(Path(value[1:]), where).decode("utf-8", errors="replace")
    else:
        source = value
    try:
        data = json.loads(source)
    except json.JSONDecodeError as exc:
        reason = f"{exc.msg} at line {exc.lineno} column {exc.colno}"
        if not value.startswith("@") and Path(value).is_file():
            raise ValueError(
                f"{where}: not JSON, but a file of that name exists: write {name}=@{value}"
            ) from None
        if value.startswith("@"):
            raise ValueError(f"{where}: not valid JSON ({reason})") from None
        raise ValueError(
            f"{where}: not valid JSON ({reason}); expected a JSON array such as [[0, 3]], or a file: "
            f"{name}=FILE.npy, {name}=@FILE.json or {name}=@FILE"
        ) from None
    if isinstance(data, dict) and set(data) in ({"path"}, {"b64"}):
        # Cluster Serving's file forms: one BYTES element, as NAME=@FILE sends.
        rank = len(spec.shape) if spec is not None else 1
        return name, np.array([file_bytes(name, data)], dtype=object).reshape((1,) * max(rank, 1))
    return name, _json_array(data, f"--input {name}", dtype, spec)


def _json_array(
    data: Any, where: str, dtype: np.dtype[Any] | None, spec: pb.TensorSpec | None
) -> npt.NDArray[Any]:
    if isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON array (nested lists), got a JSON object")
    if dtype is not None and dtype.kind != "O" and spec is not None:
        found = _first_non_number(data, "")
        if found is not None:
            what, at = found
            raise ValueError(
                f"{where}: expected numbers (the model takes {_type(spec.datatype)}), got {what} at {at}"
            )
    _rectangular(data, where, "")
    try:
        return np.asarray(data, dtype=dtype)
    except (OverflowError, TypeError, ValueError) as exc:  # a number too large for the model's type, say
        wanted = f" as {_type(spec.datatype)}" if spec is not None else ""
        raise ValueError(f"{where}: cannot be read{wanted}: {exc}") from None


def _first_non_number(data: Any, at: str) -> tuple[str, str] | None:
    if isinstance(data, list):
        for i, item in enumerate(data):
            found = _first_non_number(item, f"{at}[{i}]")
            if found is not None:
                return found
        return None
    if isinstance(data, bool | int | float):
        return None
    what = {dict: "a JSON object", str: f"the string {data!r}", type(None): "null"}.get(
        type(data), repr(data)
    )
    return what, at or "the top level"


def _rectangular(data: Any, where: str, at: str) -> list[int]:
    """The shape of nested lists; raises naming the first row whose shape differs from its first sibling's."""
    if not isinstance(data, list):
        return []
    shapes = [_rectangular(item, where, f"{at}[{i}]") for i, item in enumerate(data)]
    for i, shape in enumerate(shapes[1:], 1):
        if shape != shapes[0]:
            raise ValueError(
                f"{where}: the nested lists are ragged: {at}[{i}] has shape {shape}, {at}[0] has shape "
                f"{shapes[0]}; every row needs the same shape"
            )
    return [len(data), *(shapes[0] if shapes else [])]


def _load_npy(path: Path, where: str, dtype: np.dtype[Any] | None) -> npt.NDArray[Any]:
    if not path.is_file():
        raise ValueError(f"{where}: no such file")
    try:
        array: npt.NDArray[Any] = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{where}: not a .npy array file ({exc})") from None
    if dtype is None or dtype.kind not in "biuf" or array.dtype.kind not in "biuf" or array.dtype == dtype:
        return array
    # JSON is cast to the model's type; a .npy file is too, when no value changes on the way.
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cast = array.astype(dtype)
        exact = bool(np.array_equal(cast.astype(array.dtype), array, equal_nan=array.dtype.kind == "f"))
    if not exact:
        raise ValueError(
            f"{where}: the model takes {dtype.name} and the file holds {array.dtype.name} values that "
            f"{dtype.name} cannot hold exactly; save the array as {dtype.name} "
            f'(np.save(path, array.astype("{dtype.name}"))) to send it'
        )
    return cast


def _predict(args: argparse.Namespace) -> int:
    def work(client: Client) -> None:
        status = client.metadata(args.model)
        version = next((v for v in status.versions if v.state == pb.MODEL_STATE_READY), None)
        specs = {s.name: s for s in version.inputs} if version is not None else {}
        inputs = dict(_parse_input(text, specs) for text in args.input)
        outputs = client.predict(args.model, inputs, version=args.version, outputs=args.output)
        if args.json:
            print(json.dumps({name: array.tolist() for name, array in outputs.items()}))
            return
        for name, array in outputs.items():
            print(f"{name} {array.dtype} {_shape(array.shape)}")
            print(np.array2string(array, threshold=200, precision=4))

    return _run(args, work)


def _health(args: argparse.Namespace) -> int:
    unready: list[str] = []

    def work(client: Client) -> None:
        health = client.health(args.model)
        unready.extend(_unready(health))
        if args.json:
            print(json.dumps({**_health_dict(health), "ready": not unready}))
            return
        print(f"server {pb.ServingState.Name(health.state).removeprefix('SERVING_STATE_')}")
        for model in health.models:
            state = pb.ModelState.Name(model.state).removeprefix("MODEL_STATE_")
            print(f"  {model.name}: {state}" + (f" ({model.reason})" if model.reason else ""))
        if unready:
            print(f"not ready: {'; '.join(unready)}")

    code = _run(args, work)
    # Exit 1 when not ready, as grpc.health.v1's "" answers NOT_SERVING: scripts and probes agree.
    return code or (1 if unready else 0)


def _unready(health: pb.HealthResponse) -> list[str]:
    """Why the server (or the model asked about) is not ready to take traffic; empty when it is."""
    why = []
    if health.state != pb.SERVING_STATE_SERVING:
        why.append(f"the server is {pb.ServingState.Name(health.state).removeprefix('SERVING_STATE_')}")
    if not health.models:
        why.append("it serves no model")
    why += [
        f"model {m.name} is {pb.ModelState.Name(m.state).removeprefix('MODEL_STATE_')}"
        for m in health.models
        if m.state != pb.MODEL_STATE_READY
    ]
    return why


def _models(args: argparse.Namespace) -> int:
    def work(client: Client) -> None:
        health = client.health()
        if args.json:
            print(json.dumps(_health_dict(health)["models"]))
            return
        for model in health.models:
            state = pb.ModelState.Name(model.state).removeprefix("MODEL_STATE_")
            print(f"{model.name}  {state}" + (f"  {model.reason}" if model.reason else ""))
            for v in model.versions:
                vstate = pb.ModelState.Name(v.state).removeprefix("MODEL_STATE_")
                providers = f"  providers={','.join(v.providers)}" if v.providers else ""
                print(f"  version {v.version}  {vstate}  max_batch_size={v.max_batch_size}{providers}")
                for kind, specs in (("in ", v.inputs), ("out", v.outputs)):
                    for s in specs:
                        print(f"    {kind} {s.name}: {_type(s.datatype)} {_shape(s.shape)}")

    return _run(args, work)


def _health_dict(health: pb.HealthResponse) -> dict[str, Any]:
    def spec(s: pb.TensorSpec) -> dict[str, Any]:
        return {"name": s.name, "datatype": _type(s.datatype), "shape": list(s.shape)}

    return {
        "state": pb.ServingState.Name(health.state).removeprefix("SERVING_STATE_"),
        "models": [
            {
                "name": m.name,
                "state": pb.ModelState.Name(m.state).removeprefix("MODEL_STATE_"),
                "reason": m.reason,
                "versions": [
                    {
                        "version": v.version,
                        "state": pb.ModelState.Name(v.state).removeprefix("MODEL_STATE_"),
                        "reason": v.reason,
                        "max_batch_size": v.max_batch_size,
                        "providers": list(v.providers),
                        "inputs": [spec(s) for s in v.inputs],
                        "outputs": [spec(s) for s in v.outputs],
                    }
                    for v in m.versions
                ],
            }
            for m in health.models
        ],
    }


def _control(args: argparse.Namespace, call: Any) -> int:
    """Runs one KServe model-control call, with the token; the server's status and message on failure."""
    metadata = (("authorization", f"Bearer {args.token}"),) if args.token else ()
    try:
        options = _options(args)
        channel = (
            grpc.secure_channel(args.target, options.credentials(), options=options.channel_options())
            if options.tls
            else grpc.insecure_channel(args.target, options=options.channel_options())
        )
        with channel:
            call(kpb_grpc.GRPCInferenceServiceStub(channel), metadata)
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        print(f"sluice {args.command}: {code.name}: {exc.details()}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"sluice {args.command}: {exc}", file=sys.stderr)
        return 2
    return 0


def _load(args: argparse.Namespace) -> int:
    request = kpb.RepositoryModelLoadRequest(model_name=args.model)
    if args.config is not None:
        text = args.config
        if text.startswith("@"):
            try:
                text = Path(text[1:]).read_text(encoding="utf-8")
            except OSError as exc:
                print(f"sluice load: --config {args.config}: {exc.strerror or exc}", file=sys.stderr)
                return 2
        request.parameters["config"].string_param = text

    def call(stub: kpb_grpc.GRPCInferenceServiceStub, metadata: Any) -> None:
        stub.RepositoryModelLoad(request, timeout=args.timeout, metadata=metadata)
        print(f"loaded {args.model}")

    return _control(args, call)


def _unload(args: argparse.Namespace) -> int:
    def call(stub: kpb_grpc.GRPCInferenceServiceStub, metadata: Any) -> None:
        stub.RepositoryModelUnload(
            kpb.RepositoryModelUnloadRequest(model_name=args.model), timeout=args.timeout, metadata=metadata
        )
        print(f"unloaded {args.model}")

    return _control(args, call)


if __name__ == "__main__":
    sys.exit(main())
