"""Write a compute-heavy ONNX model for benchmarks, offline.

The digits model is too cheap to show what batching buys: its run costs less than a gRPC call. The models
here do real work per row (about 2 ms at batch 1 on one CPU core) with random fixed-seed weights: the outputs
are meaningless, the cost is real.

- ``--kind mlp`` (default): a wide MLP, input ``features`` FP32 [N, WIDTH]. At batch 1 every layer is a
  matrix-vector product bound by reading the weights, so on a CPU batching pays off (about 7x more rows/s at
  batch 32 than at batch 1 on one core), which is the effect the server's batcher exists for.
- ``--kind transformer``: a small pre-norm transformer encoder, input ``tokens`` FP32 [N, SEQ, DIM]. Each row
  is already a SEQ-row matrix, so on a CPU it gains little from batching (about 1.2x); on a GPU it does.

Both output ``logits`` FP32 [N, CLASSES]. The result is a model repository directory:
``OUT/heavy/config.toml`` and ``OUT/heavy/1/model.onnx``.

Run: ``python benchmarks/make_heavy_model.py [--out benchmarks/models] [--kind mlp|transformer]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17  # LayerNormalization needs 17; onnxruntime 1.16+ runs it.
CONFIG = """\
# Benchmark-only model with random weights, written by benchmarks/make_heavy_model.py.
description = "{description}"

[batching]
max_batch_size = 32
max_delay_ms = 5.0

[execution]
providers = "auto"
instances = 1
"""


class GraphBuilder:
    """Collects nodes and initializers so each layer reads as a few lines of algebra."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, hint: str, value: np.ndarray[Any, Any]) -> str:
        name = self._name(hint)
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def weight(self, hint: str, fan_in: int, fan_out: int) -> str:
        scale = 1.0 / np.sqrt(fan_in)  # keeps activations O(1) through the layers
        return self.const(hint, (self.rng.standard_normal((fan_in, fan_out)) * scale).astype(np.float32))

    def op(self, op_type: str, *inputs: str, **attrs: Any) -> str:
        out = self._name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out

    def linear(self, x: str, fan_in: int, fan_out: int) -> str:
        w = self.weight("w", fan_in, fan_out)
        b = self.const("b", np.zeros(fan_out, dtype=np.float32))
        return self.op("Add", self.op("MatMul", x, w), b)

    def layer_norm(self, x: str, dim: int) -> str:
        gamma = self.const("gamma", np.ones(dim, dtype=np.float32))
        beta = self.const("beta", np.zeros(dim, dtype=np.float32))
        return self.op("LayerNormalization", x, gamma, beta, axis=-1, epsilon=1e-5)

    def gelu(self, x: str) -> str:
        # Exact GELU from Erf (the Gelu op needs opset 20); onnxruntime fuses this pattern.
        scaled = self.op("Div", x, self.const("sqrt2", np.array(np.sqrt(2.0), dtype=np.float32)))
        one = self.const("one", np.array(1.0, dtype=np.float32))
        half = self.const("half", np.array(0.5, dtype=np.float32))
        return self.op("Mul", self.op("Mul", x, half), self.op("Add", self.op("Erf", scaled), one))


def encoder_layer(g: GraphBuilder, x: str, seq: int, dim: int, heads: int, ffn: int) -> str:
    """Pre-norm encoder block: x + attention(norm(x)), then x + mlp(norm(x))."""
    head_dim = dim // heads
    split_shape = g.const("split_shape", np.array([0, seq, heads, head_dim], dtype=np.int64))
    merge_shape = g.const("merge_shape", np.array([0, seq, dim], dtype=np.int64))

    h = g.layer_norm(x, dim)
    qkv = []
    for _ in ("q", "k", "v"):
        projected = g.op("Reshape", g.linear(h, dim, dim), split_shape)
        qkv.append(g.op("Transpose", projected, perm=[0, 2, 1, 3]))  # [N, H, S, Dh]
    q, k, v = qkv
    scores = g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2]))  # [N, H, S, S]
    scale = g.const("scale", np.array(1.0 / np.sqrt(head_dim), dtype=np.float32))
    weights = g.op("Softmax", g.op("Mul", scores, scale), axis=-1)
    attended = g.op("Transpose", g.op("MatMul", weights, v), perm=[0, 2, 1, 3])  # [N, S, H, Dh]
    x = g.op("Add", x, g.linear(g.op("Reshape", attended, merge_shape), dim, dim))

    h = g.layer_norm(x, dim)
    return g.op("Add", x, g.linear(g.gelu(g.linear(h, dim, ffn)), ffn, dim))


def build_transformer(
    layers: int, seq: int, dim: int, heads: int, ffn: int, classes: int, seed: int
) -> onnx.ModelProto:
    g = GraphBuilder(seed)
    x = "tokens"
    for _ in range(layers):
        x = encoder_layer(g, x, seq, dim, heads, ffn)
    pooled = g.op("ReduceMean", g.layer_norm(x, dim), axes=[1], keepdims=0)  # [N, DIM]
    return finish(g, g.linear(pooled, dim, classes), ("tokens", ["N", seq, dim]), classes)


def build_mlp(layers: int, width: int, classes: int, seed: int) -> onnx.ModelProto:
    g = GraphBuilder(seed)
    x = "features"
    for _ in range(layers):
        x = g.op("Relu", g.linear(x, width, width))
    return finish(g, g.linear(x, width, classes), ("features", ["N", width]), classes)


def finish(g: GraphBuilder, logits: str, model_input: tuple[str, list[Any]], classes: int) -> onnx.ModelProto:
    """Name the output, wrap the graph in a checked model."""
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="logits"))
    graph = helper.make_graph(
        g.nodes,
        "heavy",
        [helper.make_tensor_value_info(model_input[0], TensorProto.FLOAT, model_input[1])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        initializer=g.initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="sluice-bench"
    )
    model.ir_version = 8  # readable by every onnxruntime that supports opset 17
    onnx.checker.check_model(model, full_check=True)
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "models")
    parser.add_argument("--name", default="heavy", help="model name (directory under --out)")
    parser.add_argument("--kind", choices=["mlp", "transformer"], default="mlp")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=1536, help="mlp: input and hidden width")
    parser.add_argument("--seq", type=int, default=64, help="transformer: tokens per row")
    parser.add_argument("--dim", type=int, default=128, help="transformer: model width")
    parser.add_argument("--heads", type=int, default=4, help="transformer: attention heads")
    parser.add_argument("--ffn", type=int, default=512, help="transformer: hidden width of the MLP block")
    parser.add_argument("--classes", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.dim % args.heads:
        parser.error("--dim must be a multiple of --heads")

    if args.kind == "mlp":
        model = build_mlp(args.layers, args.width, args.classes, args.seed)
        description = f"Synthetic {args.layers}-layer MLP ({args.width} wide) for load tests"
        signature = f"input features FP32 [N, {args.width}]"
    else:
        model = build_transformer(
            args.layers, args.seq, args.dim, args.heads, args.ffn, args.classes, args.seed
        )
        description = (
            f"Synthetic {args.layers}-layer transformer encoder ({args.seq}x{args.dim}) for load tests"
        )
        signature = f"input tokens FP32 [N, {args.seq}, {args.dim}]"
    model_dir = args.out / args.name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    onnx.save(model, model_dir / "1" / "model.onnx")
    (model_dir / "config.toml").write_text(CONFIG.format(description=description))
    size = (model_dir / "1" / "model.onnx").stat().st_size
    print(f"wrote {model_dir}/config.toml and {model_dir}/1/model.onnx ({size / 1e6:.1f} MB)")
    print(f"{signature}, output logits FP32 [N, {args.classes}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
