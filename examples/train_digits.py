"""Train the example digits classifier and export it as the ONNX model the example repository serves.

The model is small and real: a scaled multi-layer perceptron on scikit-learn's bundled 8x8 digits data set
(offline, no downloads). Its graph takes ``pixels`` (FP32 [N, 64], values 0..16) and returns ``label``
(INT64 [N]) and ``probabilities`` (FP32 [N, 10]), so that tests and demos can check real accuracy through the
server. The held-out split lives in ``held_out_split()`` so the test suite can rebuild exactly the same rows.

Run: ``python examples/train_digits.py [--out examples/models/digits/1/model.onnx]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from numpy.typing import NDArray

DEFAULT_OUT = Path(__file__).resolve().parent / "models" / "digits" / "1" / "model.onnx"
INPUT_NAME = "pixels"
OUTPUT_NAMES = ("label", "probabilities")
# Opsets that every onnxruntime release since 1.14 runs; the ML domain holds the scaler and argmax helpers.
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}
MIN_ACCURACY = 0.95


def held_out_split() -> tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.int64], NDArray[np.int64]]:
    """Return (X_train, X_test, y_train, y_test): the one split both training and the accuracy test use."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x.astype(np.float32), y.astype(np.int64), test_size=0.25, random_state=0, stratify=y
    )
    return x_train, x_test, y_train, y_test


def train(x_train: NDArray[np.float32], y_train: NDArray[np.int64]) -> Any:
    """Fit a scaled MLP with weights that are the same on every run.

    The fixed random_state fixes the initial weights; one BLAS thread fixes the order of the float sums, which
    otherwise varies from run to run and changes the last bits of the exported weights.
    """
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

    clf = MLPClassifier(hidden_layer_sizes=(128,), alpha=1e-3, max_iter=1000, random_state=0)
    pipeline = Pipeline([("scale", StandardScaler()), ("mlp", clf)])
    with threadpool_limits(limits=1):
        pipeline.fit(x_train, y_train)
    return pipeline


def to_onnx(pipeline: Any) -> bytes:
    """Convert to ONNX with plain tensor outputs (no ZipMap) named as the model's contract says."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    clf = pipeline.named_steps["mlp"]
    model = convert_sklearn(
        pipeline,
        name="digits",
        initial_types=[(INPUT_NAME, FloatTensorType([None, 64]))],
        options={id(clf): {"zipmap": False}},
        target_opset=TARGET_OPSET,
    )
    names = [out.name for out in model.graph.output]
    if tuple(names) != OUTPUT_NAMES:
        raise RuntimeError(f"skl2onnx named the outputs {names}, expected {list(OUTPUT_NAMES)}")
    model.doc_string = "Digits classifier (8x8, values 0..16) trained by examples/train_digits.py"
    data: bytes = model.SerializeToString()
    return data


def check_with_onnxruntime(model_bytes: bytes, pipeline: Any, x_test: NDArray[np.float32]) -> float:
    """Run the exported graph and return the share of test rows where it agrees with scikit-learn."""
    import onnxruntime as ort

    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    label, probabilities = session.run(list(OUTPUT_NAMES), {INPUT_NAME: x_test})
    if label.dtype != np.int64 or label.shape != (len(x_test),):
        raise RuntimeError(f"label: expected INT64 [{len(x_test)}], got {label.dtype} {list(label.shape)}")
    if probabilities.dtype != np.float32 or probabilities.shape != (len(x_test), 10):
        raise RuntimeError(f"probabilities: unexpected {probabilities.dtype} {list(probabilities.shape)}")
    expected_proba = pipeline.predict_proba(x_test)
    if not np.allclose(probabilities, expected_proba, atol=1e-4):
        raise RuntimeError("probabilities differ between ONNX Runtime and scikit-learn")
    return float(np.mean(label == pipeline.predict(x_test)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write model.onnx")
    args = parser.parse_args(argv)

    x_train, x_test, y_train, y_test = held_out_split()
    pipeline = train(x_train, y_train)
    accuracy = float(pipeline.score(x_test, y_test))
    model_bytes = to_onnx(pipeline)
    agreement = check_with_onnxruntime(model_bytes, pipeline, x_test)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(model_bytes)
    print(f"held-out accuracy: {accuracy:.4f} on {len(y_test)} rows")
    print(f"onnxruntime agrees with scikit-learn on {agreement:.2%} of held-out rows")
    print(f"wrote {args.out} ({len(model_bytes)} bytes)")
    if accuracy < MIN_ACCURACY or agreement < 1.0:
        print(f"error: accuracy must be >= {MIN_ACCURACY} with full agreement", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
