"""The `topk` postprocessor: the k likeliest classes of a classifier, with their scores and labels.

This is Analytics Zoo Cluster Serving's top-N answer. From one model output holding a score per class along
its last axis (FP32 [-1, 1000]), it gives `classes` (INT64 [-1, k], best first), `scores` (FP32 [-1, k]) and,
with a labels file, `labels` (STRING [-1, k])::

    postprocess = [{ name = "topk", k = 5, softmax = true, labels = "labels.txt" }]

The labels file has one label per line, class 0 first; its path is relative to the model directory.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from sluice.server.builtin_plugins._specs import choose
from sluice.server.plugins import Arrays, LoadError, PluginContext, PluginError, TensorSpec
from sluice.v1 import inference_pb2 as pb

log = logging.getLogger("sluice.server")

PLUGIN = "topk postprocessor"


class TopKOptions(BaseModel):
    """Options of the `topk` postprocessor."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    output: str | None = Field(
        default=None,
        min_length=1,
        description="Output of the step before (the model's) with one score per class on its last axis; "
        "unset: the only output, or the only floating-point one.",
    )
    k: int = Field(
        default=5,
        gt=0,
        description="Classes given per row, best first; a model with fewer classes gives all of them.",
    )
    softmax: bool = Field(
        default=False, description="Turn the scores into probabilities first (for a model giving logits)."
    )
    labels: str | None = Field(
        default=None,
        min_length=1,
        description="Labels file, one per line, class 0 first, relative to the model directory; adds the "
        "`labels` output. One label per class (at least as many, when the class axis is free).",
    )
    keep_outputs: bool = Field(
        default=False, description="Give the step before's outputs too, next to the top-k ones."
    )
    prefix: str = Field(
        default="",
        description="Prepended to the output names (classes, scores, labels): two heads, two prefixes.",
    )


class TopK:
    """The `topk` postprocessor."""

    Options = TopKOptions

    def __init__(self, options: TopKOptions, context: PluginContext) -> None:
        self.options = options
        self._labels: npt.NDArray[np.object_] | None = None
        if options.labels is not None:
            self._labels = np.array(_read_labels(context.resolve(options.labels)), dtype=object)
        prefix = options.prefix
        self._names = (f"{prefix}classes", f"{prefix}scores", f"{prefix}labels")
        self._source = ""

    def signature(self, upstream: Sequence[TensorSpec]) -> list[TensorSpec]:
        options = self.options
        floats = [s for s in upstream if s.dtype is not None and s.dtype.kind == "f"]
        spec = choose(
            upstream,
            options.output,
            plugin=PLUGIN,
            option="output",
            kind="output",
            candidates=upstream if len(upstream) == 1 else floats,
            candidate_kind="" if len(upstream) == 1 else "floating-point ",
        )
        where = f"{PLUGIN}: output '{spec.name}' ({spec.describe()})"
        if spec.dtype is None or spec.dtype.kind not in "iuf" or not spec.shape:
            raise LoadError(f"{where}: expected numeric scores with the classes on the last axis")
        if spec.shape == (-1,):
            raise LoadError(
                f"{where}: its only axis is free, so it holds rows, not classes; expected [-1, classes]"
            )
        self._source = spec.name
        classes = spec.shape[-1]
        k = options.k
        if classes != -1:
            if self._labels is not None and len(self._labels) != classes:
                raise LoadError(
                    f"{where}: has {classes} classes but the labels file {options.labels} has "
                    f"{len(self._labels)} labels"
                )
            if k > classes:
                log.warning("%s: k = %d, but there are only %d classes; giving them all", where, k, classes)
                k = classes
        else:
            k = -1  # a request gets min(k, its number of classes)
        rows = spec.shape[:-1]
        given = [
            TensorSpec(self._names[0], pb.DATA_TYPE_INT64, (*rows, k)),
            TensorSpec(self._names[1], pb.DATA_TYPE_FP32, (*rows, k)),
        ]
        if self._labels is not None:
            given.append(TensorSpec(self._names[2], pb.DATA_TYPE_STRING, (*rows, k)))
        if not options.keep_outputs:
            return given
        taken = {s.name for s in upstream} & {s.name for s in given}
        if taken:
            raise LoadError(
                f"{PLUGIN}: keep_outputs = true, but the model already gives {', '.join(sorted(taken))}; "
                "set `prefix` to tell the top-k outputs apart"
            )
        return [*upstream, *given]

    def __call__(self, outputs: Arrays, inputs: Arrays) -> Arrays:
        scores: npt.NDArray[Any] = outputs[self._source]
        classes = scores.shape[-1]
        labels = self._labels
        if labels is not None and classes > len(labels):
            # Only a model whose class axis is free gets here (a fixed one is checked at load, for equality).
            # The server's labels file does not fit what the model gave: no fault of the caller's, and
            # nothing a retry fixes.
            raise PluginError(
                f"{PLUGIN}: output '{self._source}' has {classes} classes but the labels file "
                f"{self.options.labels} has only {len(labels)} labels",
                code=grpc.StatusCode.FAILED_PRECONDITION,
            )
        if self.options.softmax:
            scores = _softmax(scores)
        elif scores.dtype.kind != "f":
            scores = scores.astype(np.float64)
        # Best first; ties keep the lower class first, and NaN scores sort last.
        order = np.argsort(-scores, axis=-1, kind="stable")[..., : self.options.k].astype(np.int64)
        given = dict(outputs) if self.options.keep_outputs else {}
        given[self._names[0]] = order
        given[self._names[1]] = np.take_along_axis(scores, order, axis=-1).astype(np.float32)
        if labels is not None:
            given[self._names[2]] = labels[order]
        return given


def _softmax(logits: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)  # type: ignore[no-any-return]


def _read_labels(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise LoadError(f"labels file {path} cannot be read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise LoadError(f"labels file {path} is not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    labels = [line.strip() for line in text.splitlines()]
    while labels and not labels[-1]:
        labels.pop()
    if not labels:
        raise LoadError(f"labels file {path} has no labels (one per line, class 0 first)")
    return labels
