"""The client side of the `sluice` command: predict, health, models.

Registered by the console script next to `sluice serve`; it needs only the client and the contract.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from sluice.clients.client import Client, ClientOptions, SluiceError
from sluice.clients.codec import numpy_dtype
from sluice.v1 import inference_pb2 as pb


def _type(datatype: int) -> str:
    return pb.DataType.Name(datatype).removeprefix("DATA_TYPE_")  # type: ignore[arg-type]


def _shape(shape: Any) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def add_commands(sub: Any) -> None:
    """Adds `predict`, `health` and `models` to the `sluice` command's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--target", default=os.environ.get("SLUICE_TARGET", "127.0.0.1:8001"),
        help="server address, HOST:PORT or unix:PATH [SLUICE_TARGET, default: 127.0.0.1:8001]",
    )  # fmt: skip
    common.add_argument("--timeout", type=float, default=30.0, help="deadline in seconds (default: 30)")
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

    h = sub.add_parser("health", parents=[common], help="the server's state and its models' states")
    h.add_argument("--model", default="", help="only this model")
    h.set_defaults(handler=_health)

    m = sub.add_parser("models", parents=[common], help="models with their versions, inputs and outputs")
    m.set_defaults(handler=_models)


def _client(args: argparse.Namespace) -> Client:
    return Client(args.target, ClientOptions(timeout=args.timeout))


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
    def work(client: Client) -> None:
        health = client.health(args.model)
        if args.json:
            print(json.dumps(_health_dict(health)))
            return
        print(f"server {pb.ServingState.Name(health.state).removeprefix('SERVING_STATE_')}")
        for model in health.models:
            state = pb.ModelState.Name(model.state).removeprefix("MODEL_STATE_")
            print(f"  {model.name}: {state}" + (f" ({model.reason})" if model.reason else ""))

    return _run(args, work)


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
                print(f"  version {v.version}  {vstate}  max_batch_size={v.max_batch_size}")
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
                        "inputs": [spec(s) for s in v.inputs],
                        "outputs": [spec(s) for s in v.outputs],
                    }
                    for v in m.versions
                ],
            }
            for m in health.models
        ],
    }
