"""`polynomial`: a runtime with no model file, y = c0 + c1 x + c2 x^2 + ... element-wise, batched.

The coefficients come from the options or, when the options give none, from `coefficients.json` in the
version directory (a JSON list of numbers), so that each version of a model can differ.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from sluice.server.plugins import LoadError, PluginContext, TensorSpec

COEFFICIENTS_FILE = "coefficients.json"


class PolynomialOptions(BaseModel):
    """`[runtime]` table: `name = "polynomial"`, then these keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    coefficients: list[float] | None = Field(
        default=None,
        min_length=1,
        description="c0, c1, c2, ...: lowest power first; unset: read from <version>/coefficients.json.",
    )
    input: str = Field(default="x", min_length=1, description="Name of the input.")
    output: str = Field(default="y", min_length=1, description="Name of the output.")
    width: int = Field(default=1, ge=1, description="Values per row: the signature is [-1, width].")
    datatype: Literal["FP32", "FP64"] = Field(default="FP32", description="Element type of both tensors.")


class Polynomial:
    """Runtime: evaluates a polynomial on every element. The first dimension is free, so Sluice batches it."""

    Options = PolynomialOptions

    def __init__(self, options: PolynomialOptions, context: PluginContext) -> None:
        coefficients = options.coefficients
        if coefficients is None:
            coefficients = _read_coefficients(context.version_dir / COEFFICIENTS_FILE)
        self._highest_first = np.array(coefficients[::-1], dtype=np.float64)
        self._input, self._output = options.input, options.output
        self._dtype = np.dtype(np.float32 if options.datatype == "FP32" else np.float64)
        # What Sluice reads from a runtime: its signature, how many runs may go at once, and where it runs.
        self.inputs = [TensorSpec.of(options.input, options.datatype, [-1, options.width])]
        self.outputs = [TensorSpec.of(options.output, options.datatype, [-1, options.width])]
        self.instances = context.config.execution.instances
        self.providers = ["numpy"]

    def run(self, instance: int, feeds: Mapping[str, npt.NDArray[Any]]) -> Mapping[str, npt.NDArray[Any]]:
        """One batch: every row of every request in it, concatenated along the first axis."""
        y = np.polyval(self._highest_first, feeds[self._input].astype(np.float64))
        return {self._output: y.astype(self._dtype)}

    def close(self) -> None:
        """Nothing to free: the coefficients are all it holds."""


def _read_coefficients(path: Path) -> list[float]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LoadError(
            f"{path}: no such file; give the runtime option 'coefficients' or write this file"
        ) from None
    except (OSError, ValueError) as exc:
        raise LoadError(f"{path}: cannot be read as JSON: {exc}") from None
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(c, int | float) and not isinstance(c, bool) for c in value)
    ):
        raise LoadError(f"{path}: expected a non-empty JSON list of numbers, got {value!r}")
    return [float(c) for c in value]
