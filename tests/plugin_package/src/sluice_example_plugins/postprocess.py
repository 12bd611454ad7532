"""`round` rounds a floating-point output; `label` names each row's highest score from a list of labels."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from sluice.server.plugins import Arrays, LoadError, PluginContext, TensorSpec


def _find(upstream: Sequence[TensorSpec], name: str, plugin: str) -> TensorSpec:
    """The floating-point output `name`; LoadError naming the plugin and what there is otherwise."""
    for spec in upstream:
        if spec.name == name and spec.dtype is not None and spec.dtype.kind == "f":
            return spec
    gives = ", ".join(f"'{s.name}' ({s.describe()})" for s in upstream)
    raise LoadError(
        f"{plugin}: option 'output': no floating-point output '{name}'; the step before gives {gives}"
    )


class RoundOptions(BaseModel):
    """`{ name = "round", output = "y", decimals = 1 }`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    output: str = Field(min_length=1, description="The output to round.")
    decimals: int = Field(default=0, ge=0, le=15, description="Digits kept after the decimal point.")


class Round:
    """Postprocessor: rounds `output` to `decimals` digits; the signature is unchanged."""

    Options = RoundOptions

    def __init__(self, options: RoundOptions, context: PluginContext) -> None:
        self.output = options.output
        self.decimals = options.decimals

    def signature(self, upstream: Sequence[TensorSpec]) -> Sequence[TensorSpec]:
        _find(upstream, self.output, "round")
        return upstream

    def __call__(self, outputs: Arrays, inputs: Arrays) -> Arrays:
        return {**outputs, self.output: np.round(outputs[self.output], self.decimals)}


class LabelOptions(BaseModel):
    """`{ name = "label", output = "scores", labels = ["cat", "dog"] }`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    output: str = Field(min_length=1, description="The scores output, [rows, classes].")
    labels: list[str] = Field(min_length=1, description="One label per class, in the scores' order.")
    into: str = Field(default="label", min_length=1, description="Name of the STRING [rows] output added.")


class Label:
    """Postprocessor: adds `into`, the label of each row's highest score; the other outputs stay."""

    Options = LabelOptions

    def __init__(self, options: LabelOptions, context: PluginContext) -> None:
        self.output = options.output
        self.labels = np.array(options.labels, dtype=object)
        self.into = options.into

    def signature(self, upstream: Sequence[TensorSpec]) -> Sequence[TensorSpec]:
        scores = _find(upstream, self.output, "label")
        if len(scores.shape) != 2 or scores.shape[1] not in (-1, len(self.labels)):
            raise LoadError(
                f"label: output '{self.output}' is {scores.describe()}; expected [rows, {len(self.labels)}], "
                f"one score per label"
            )
        if any(spec.name == self.into for spec in upstream):
            raise LoadError(f"label: option 'into': the step before already gives an output '{self.into}'")
        return [*upstream, TensorSpec.of(self.into, "STRING", scores.shape[:1])]

    def __call__(self, outputs: Arrays, inputs: Arrays) -> Arrays:
        # A class count the signature could not check (a free dimension) that turns out wrong is a bug of the
        # model's, not the caller's: IndexError becomes INTERNAL, with the traceback in the server log.
        best = np.argmax(outputs[self.output], axis=1)
        return {**outputs, self.into: self.labels[best]}
