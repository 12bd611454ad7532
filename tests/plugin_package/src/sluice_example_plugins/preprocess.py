"""`scale`: multiplies one floating-point input by a constant before the model sees it."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from sluice.server.plugins import Arrays, LoadError, PluginContext, TensorSpec


class ScaleOptions(BaseModel):
    """`{ name = "scale", input = "x", factor = 2.0 }`; Sluice rejects unknown keys and bad values at load."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    factor: float = Field(gt=0, description="What the input is multiplied by.")
    input: str = Field(min_length=1, description="The model input to scale (a floating-point one).")
    alias: str | None = Field(
        default=None, min_length=1, description="The name callers send it under; unset: `input`."
    )


class Scale:
    """Preprocessor: callers send `alias` (or `input`); the model gets `input` = that tensor x `factor`."""

    Options = ScaleOptions

    def __init__(self, options: ScaleOptions, context: PluginContext) -> None:
        self.factor = options.factor
        self.input = options.input
        self.alias = options.alias or options.input

    def signature(self, downstream: Sequence[TensorSpec]) -> Sequence[TensorSpec]:
        """The model's inputs, with `input` renamed to `alias`: same type and shape."""
        target = next((spec for spec in downstream if spec.name == self.input), None)
        if target is None or target.dtype is None or target.dtype.kind != "f":
            takes = ", ".join(f"'{s.name}' ({s.describe()})" for s in downstream)
            raise LoadError(
                f"scale: option 'input': no floating-point input '{self.input}'; the next step takes {takes}"
            )
        if self.alias != self.input and any(spec.name == self.alias for spec in downstream):
            raise LoadError(f"scale: option 'alias': '{self.alias}' is already an input of the next step")
        return [TensorSpec(self.alias, s.datatype, s.shape) if s is target else s for s in downstream]

    def __call__(self, inputs: Arrays) -> Arrays:
        # Sluice has checked `inputs` against signature(): `alias` is there, with the right type and shape.
        out = dict(inputs)
        raw = out.pop(self.alias)
        out[self.input] = (raw * self.factor).astype(raw.dtype, copy=False)
        return out
