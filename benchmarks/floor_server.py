"""The least a Python gRPC handler can do to serve an ONNX model: a second yardstick beside the echo server.

Predict (sluice.v1) parses the request, views each input's raw contents as an array, runs ONNX Runtime on the
calling thread (one intra-op thread, no spinning, no batching) and encodes the outputs. No admission, limits,
deadlines, metrics, error statuses or checks beyond what numpy does: it is not a server to use, it says how
much of the gap between Sluice and the echo server any Python handler on grpc.aio would pay anyway (parsing,
one model run per request, encoding). A bad request gets whatever gRPC makes of the exception.

With ``--skip-model`` it runs the model for the first request only and answers every later one with those
outputs: parsing and encoding without the run, so that set beside the floor it tells what one ONNX Runtime
call costs a served request (several times its cost in a loop in-process: see benchmarks/RESULTS.md).

Run: ``PYTHONPATH=proto python benchmarks/floor_server.py --port 0 --uvloop`` (prints
``listening on 127.0.0.1:PORT``); compare with ``compare_echo.py --server-cmd "python
benchmarks/floor_server.py --port 0 --uvloop"``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort

# A sibling script: its directory is first on sys.path.
from echo_server import EchoServicer, run_loop, run_until_signalled
from sluice.v1 import inference_pb2 as pb
from sluice.wire import NUMERIC, datatype_of

DIGITS = Path(__file__).resolve().parents[1] / "examples" / "models" / "digits" / "1" / "model.onnx"


class Floor:
    """One ONNX Runtime session and the Predict handler that runs it once per request."""

    def __init__(self, path: Path, name: str, *, skip_model: bool = False) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._run = session._sess.run  # the binding under InferenceSession.run, as Sluice calls it
        self.name = name
        self._skip_model = skip_model
        self._first: list[Any] | None = None  # the first run's outputs, with skip_model
        self._outputs = [o.name for o in session.get_outputs()]
        self.inputs = [
            pb.TensorSpec(
                name=node.name,
                datatype=datatype_of(np.empty(0, dtype=_dtype(node.type))),
                shape=[d if isinstance(d, int) else -1 for d in node.shape],
            )
            for node in session.get_inputs()
        ]

    async def predict(self, data: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        request = pb.PredictRequest.FromString(data)
        feeds = {
            t.name: np.frombuffer(t.raw_contents, NUMERIC[t.datatype]).reshape(tuple(t.shape))
            for t in request.inputs
        }
        results = self._first
        if results is None:
            results = self._run(self._outputs, feeds, None)
            if self._skip_model:
                self._first = results
        response = pb.PredictResponse(id=request.id, model=request.model, model_version=1)
        for name, array in zip(self._outputs, results, strict=True):
            out = response.outputs.add()
            out.name = name
            out.datatype = datatype_of(array)
            out.shape.extend(array.shape)
            out.raw_contents = array.tobytes()
        return response.SerializeToString()


def _dtype(onnx_type: str) -> np.dtype[Any]:
    """numpy's dtype for an ONNX Runtime type name such as ``tensor(float)``."""
    names = {"float": "float32", "double": "float64", "float16": "float16"}
    inner = onnx_type.removeprefix("tensor(").removesuffix(")")
    return np.dtype(names.get(inner, inner))


async def serve(port: int, floor: Floor) -> None:
    server = grpc.aio.server()
    echo = EchoServicer(floor.inputs)
    handlers = {
        "Predict": grpc.unary_unary_rpc_method_handler(floor.predict),
        "Health": grpc.unary_unary_rpc_method_handler(
            echo.Health,
            request_deserializer=pb.HealthRequest.FromString,
            response_serializer=pb.HealthResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("sluice.v1.Inference", handlers),))
    await run_until_signalled(server, port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1; 0 picks a free one")
    parser.add_argument("--model-file", type=Path, default=DIGITS, help="the ONNX file (default: digits)")
    parser.add_argument("--name", default="digits", help="the model name Health reports")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop, as Sluice does")
    parser.add_argument(
        "--skip-model",
        action="store_true",
        help="answer every request after the first with the first one's outputs, without running the model",
    )
    args = parser.parse_args(argv)
    coro = serve(args.port, Floor(args.model_file, args.name, skip_model=args.skip_model))
    run_loop(coro, uvloop=args.uvloop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
