"""One servable model version: checks a request against its signature, runs it, builds the response."""

from __future__ import annotations

import math
from collections.abc import Sequence

import grpc
import numpy as np
import numpy.typing as npt

from sluice.server.errors import SluiceError, invalid
from sluice.server.runtime import OnnxModel, TensorSpec
from sluice.server.scheduling import ModelRunner, Scheduler
from sluice.server.tensors import decode, encode, format_shape, numpy_dtype, type_name
from sluice.v1 import inference_pb2 as pb


class Servable:
    """A loaded model version with its scheduler; everything a request needs, computed once at load."""

    def __init__(self, model: OnnxModel, runner: ModelRunner, scheduler: Scheduler, max_bytes: int) -> None:
        self.model = model
        self.name = model.name
        self.version = model.version
        self.runner = runner
        self.scheduler = scheduler
        self.max_bytes = max_bytes
        self.batching = model.max_batch_size > 0
        self._inputs = {spec.name: spec for spec in model.inputs}
        self._output_names = tuple(spec.name for spec in model.outputs)
        self._input_list = ", ".join(f"'{s.name}' ({s.describe()})" for s in model.inputs)

    async def predict(self, request: pb.PredictRequest, deadline: float | None) -> pb.PredictResponse:
        """Validates, schedules and answers one request; raises SluiceError or a batcher error."""
        inputs = self.decode_inputs(request.inputs)
        names = self.output_names(request.outputs) if request.outputs else self._output_names
        priority = _priority(request) if request.parameters else 0
        outputs = await self.scheduler.submit(inputs, priority=priority, deadline=deadline)
        size = 0
        for name in names:
            size += outputs[name].nbytes
        if size > self.max_bytes:
            raise SluiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the response would carry {size} bytes of outputs, over the max_message_bytes limit of "
                f"{self.max_bytes}; ask for fewer rows or outputs",
            )
        return pb.PredictResponse(
            id=request.id,
            model=self.name,
            model_version=self.version,
            outputs=[encode(name, outputs[name]) for name in names],
        )

    def decode_inputs(self, tensors: Sequence[pb.Tensor]) -> dict[str, npt.NDArray[np.generic]]:
        """Checks every input against the signature and views it as an array.

        This runs for every request, so the common case (a dense numeric tensor) is checked inline and
        each bytes field is read once; anything unusual goes through `tensors.decode`, which also words
        the errors.
        """
        arrays: dict[str, npt.NDArray[np.generic]] = {}
        inputs = self._inputs
        limit = self.max_bytes
        size = 0
        for tensor in tensors:
            name = tensor.name
            spec = inputs.get(name)
            if spec is None:
                raise invalid(
                    f"model '{self.name}' has no input '{name}'; it takes {self._input_list}"
                    if name
                    else f"an input tensor has no name; model '{self.name}' takes {self._input_list}"
                )
            if name in arrays:
                raise invalid(f"input '{name}' is given twice")
            shape = tuple(tensor.shape)
            if tensor.datatype != spec.datatype or not spec.accepts(shape):
                raise invalid(
                    f"input '{name}': expected {spec.describe()}, got {type_name(tensor.datatype)} "
                    f"{format_shape(shape)}"
                )
            dtype = spec.dtype
            if dtype is not None and not tensor.HasField("sparse"):
                raw = tensor.raw_contents
                size += len(raw)
                if (
                    size <= limit
                    and len(raw) == math.prod(shape) * dtype.itemsize
                    and min(shape, default=0) >= 0
                ):
                    arrays[name] = np.frombuffer(raw, dtype=dtype).reshape(shape)
                    continue
            else:
                size += len(tensor.raw_contents) + len(tensor.sparse.indices) + len(tensor.sparse.values)
            if size > limit:
                raise SluiceError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the request carries more than {limit} bytes of tensors, over the server's "
                    "max_message_bytes limit (SLUICE_MAX_MESSAGE_BYTES)",
                )
            arrays[name] = decode(tensor, f"input '{name}'", limit)
        if len(arrays) != len(self._inputs):
            missing = [s for s in self._inputs.values() if s.name not in arrays]
            raise invalid(
                "missing input " + ", ".join(f"'{s.name}': expected {s.describe()}" for s in missing)
            )
        if self.batching:
            rows = {name: a.shape[0] for name, a in arrays.items()}
            first = next(iter(rows.values()))
            if first < 1:
                name = next(iter(rows))
                raise invalid(f"input '{name}': the batch (first) dimension must be at least 1, got 0")
            if any(r != first for r in rows.values()):
                detail = ", ".join(f"'{n}' has {r}" for n, r in rows.items())
                raise invalid(f"inputs disagree on the batch (first) dimension: {detail} rows")
        return arrays

    def output_names(self, wanted: Sequence[str]) -> tuple[str, ...]:
        """The outputs a request asked for, each once, in the order asked."""
        names = tuple(dict.fromkeys(wanted))
        for name in names:
            if name not in self._output_names:
                raise invalid(
                    f"model '{self.name}' has no output '{name}'; it gives "
                    + ", ".join(f"'{n}'" for n in self._output_names)
                )
        return names

    def status(self) -> pb.ModelVersionStatus:
        return pb.ModelVersionStatus(
            version=self.version,
            state=pb.MODEL_STATE_READY,
            inputs=[s.to_proto() for s in self.model.inputs],
            outputs=[s.to_proto() for s in self.model.outputs],
            max_batch_size=self.model.max_batch_size,
            providers=self.model.providers,
        )

    def warm_up(self) -> None:
        """Runs one synthesized request on every instance, so a model that cannot run fails at load, then
        measures the model's run time for the runner."""
        feeds = {spec.name: _example(spec) for spec in self.model.inputs}
        for instance in range(len(self.model.sessions)):
            self.model.run(instance, feeds)
        self.runner.calibrate(feeds)


def _priority(request: pb.PredictRequest) -> int:
    param = request.parameters.get("priority")
    if param is None:
        return 0
    kind = param.WhichOneof("value")
    if kind != "int64_value":
        raise invalid(f"parameter 'priority': expected an int64_value, got {kind or 'nothing'}")
    return param.int64_value


def _example(spec: TensorSpec) -> npt.NDArray[np.generic]:
    shape = tuple(1 if d == -1 else d for d in spec.shape)
    if spec.datatype == pb.DATA_TYPE_STRING:
        return np.full(shape, "", dtype=object)
    return np.zeros(shape, dtype=numpy_dtype(spec.datatype))
