"""The client side of the `sluice` command: predict, health, models, load, unload.

Registered by the console script next to `sluice serve`; it needs only the client and the contract.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt

from sluice.clients.client import Client, ClientOptions, SluiceError
from sluice.clients.codec import numpy_dtype
from sluice.kserve.v2 import grpc_service_pb2 as kpb
from sluice.kserve.v2 import grpc_service_pb2_grpc as kpb_grpc
from sluice.v1 import inference_pb2 as pb


def _type(datatype: int) -> str:
    return pb.DataType.Name(datatype).removeprefix("DATA_TYPE_")  # type: ignore[arg-type]


def _shape(shape: Any) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def add_commands(sub: Any) -> None:
    """Adds `predict`, `health`, `models`, `load` and `unload` to the `sluice` command's subparsers."""
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
    common.add_argument("--json", action="store_true", help="print JSON instead of readable text")

    p = sub.add_parser("predict", parents=[common], help="run a model on inputs from .npy files or JSON")
    p.add_argument("model", help="model name")
    p.add_argument(
        "--input", "-i", action="append", default=[], metavar="NAME=FILE.npy|JSON|@FILE",
        help="an input: a .npy file, a JSON array (cast to the model's type), @FILE.json, or @FILE sent "
        "as one BYTES element (an image, say) (repeatable)",
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


def _client(args: argparse.Namespace) -> Client:
    return Client(args.target, ClientOptions(timeout=args.timeout, token=args.token))


def _run(args: argparse.Namespace, work: Any) -> int:
    try:
        with _client(args) as client:
            work(client)
    except SluiceError as exc:
        print(f"sluice {args.command}: {exc.code.name}: {exc.message}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"sluice {args.command}: {exc}", file=sys.stderr)
        return 2
    return 0


def _parse_input(text: str, specs: dict[str, pb.TensorSpec]) -> tuple[str, npt.NDArray[Any]]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise ValueError(
            f"--input {text!r}: expected NAME=FILE.npy, NAME=JSON, NAME=@FILE.json or NAME=@FILE (its bytes)"
        )
    if value.endswith(".npy"):
        return name, np.load(value, allow_pickle=False)
    spec = specs.get(name)
    if value.startswith("@") and not value.endswith(".json"):
        # Any other file is sent as it is: one BYTES element (an encoded image, say) per --input.
        rank = len(spec.shape) if spec is not None else 1
        return name, np.array([Path(value[1:]).read_bytes()], dtype=object).reshape((1,) * max(rank, 1))
    data = json.loads(Path(value[1:]).read_text() if value.startswith("@") else value)
    dtype = numpy_dtype(spec.datatype) if spec is not None else None
    return name, np.asarray(data, dtype=dtype)


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
        with grpc.insecure_channel(args.target) as channel:
            call(kpb_grpc.GRPCInferenceServiceStub(channel), metadata)
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        print(f"sluice {args.command}: {code.name}: {exc.details()}", file=sys.stderr)
        return 1
    except OSError as exc:
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
