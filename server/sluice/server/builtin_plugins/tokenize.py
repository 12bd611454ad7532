"""The `tokenize` preprocessor: text in, token ids out, with a Hugging Face `tokenizer.json`.

Callers send a STRING tensor of texts, one per row (or, with `pairs = true`, two per row); the model gets
`input_ids`, and `attention_mask` and `token_type_ids` when it takes them, as [rows, L] where L is the
longest text of the request. Configure padding of those inputs on axis 1 in the model's config.toml and
requests of different lengths batch together::

    preprocess = [{ name = "tokenize", max_length = 256, truncation = true }]

    [inputs.input_ids.pad]
    axis = 1
    dim = "seq"
    [inputs.attention_mask.pad]
    axis = 1
    dim = "seq"

Needs the `tokenizers` package: `pip install 'sluice-serving[text]'`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from sluice.server.plugins import Arrays, LoadError, PluginContext, PluginError, TensorSpec
from sluice.v1 import inference_pb2 as pb

if TYPE_CHECKING:
    from tokenizers import Encoding, Tokenizer

DEFAULT_MAX_LENGTH = 512
"""max_length when neither the options nor a fixed sequence dimension of the model give one."""

_IDS_TYPES = (pb.DATA_TYPE_INT64, pb.DATA_TYPE_INT32)


class TokenizeOptions(BaseModel):
    """Options of the `tokenize` preprocessor, inline in config.toml next to `name = "tokenize"`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tokenizer: str = Field(
        default="tokenizer.json",
        min_length=1,
        description="The Hugging Face tokenizer.json; a relative path is looked up in the version's "
        "directory, then in the model's.",
    )
    input: str = Field(default="text", min_length=1, description="Name of the STRING input callers send.")
    pairs: bool = Field(
        default=False,
        description="Callers send two texts per row (STRING [-1, 2]), encoded as a pair (sentence A, B).",
    )
    max_length: int | None = Field(
        default=None,
        gt=0,
        description="Most tokens per row, special tokens included; unset: the model's fixed sequence "
        f"length if it has one, else {DEFAULT_MAX_LENGTH}.",
    )
    truncation: bool = Field(
        default=False,
        description="Cut texts longer than max_length; off: such a request fails with INVALID_ARGUMENT.",
    )
    input_ids: str = Field(default="input_ids", min_length=1, description="Model input for the token ids.")
    attention_mask: str = Field(
        default="attention_mask",
        min_length=1,
        description="Model input for the attention mask (filled only if the model takes it).",
    )
    token_type_ids: str = Field(
        default="token_type_ids",
        min_length=1,
        description="Model input for the token type ids (filled only if the model takes it).",
    )


class Tokenize:
    """Turns texts into token ids, attention mask and token type ids, padded to the request's longest."""

    Options = TokenizeOptions

    def __init__(self, options: TokenizeOptions, context: PluginContext) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise LoadError(
                "the tokenize preprocessor needs the tokenizers package: pip install 'sluice-serving[text]'"
            ) from None
        self.options = options
        path = _find(options.tokenizer, context)
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:
            raise LoadError(f"cannot read the tokenizer {path}: {exc}") from None
        self.path = path
        padding = tokenizer.padding
        self.pad_id = int(padding["pad_id"]) if padding else 0
        """Fills a row shorter than the request's longest: the tokenizer file's pad id, else 0."""
        # The file's own padding and truncation settings are those of whoever saved it; this plugin pads
        # per request and truncates (or refuses) at max_length.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self.tokenizer: Tokenizer = tokenizer
        self.max_length = options.max_length or DEFAULT_MAX_LENGTH
        self.length: int | None = None
        """The model's fixed sequence length, when it has one: every request is padded to it."""
        self._ids: TensorSpec | None = None
        self._mask: TensorSpec | None = None
        self._types: TensorSpec | None = None

    def signature(self, downstream: Sequence[TensorSpec]) -> Sequence[TensorSpec]:
        options = self.options
        by_name = {spec.name: spec for spec in downstream}
        ids = by_name.get(options.input_ids)
        if ids is None:
            takes = ", ".join(f"'{s.name}'" for s in downstream)
            raise LoadError(
                f"the model has no input '{options.input_ids}' for the token ids (it takes {takes}); "
                "name it with the input_ids option"
            )
        mask = by_name.get(options.attention_mask)
        types = by_name.get(options.token_type_ids)
        produced = [spec for spec in (ids, mask, types) if spec is not None]
        for spec in produced:
            if spec.datatype not in _IDS_TYPES or len(spec.shape) != 2:
                raise LoadError(
                    f"model input '{spec.name}' is {spec.describe()}; the tokenize preprocessor fills "
                    "INT64 or INT32 [rows, sequence] inputs"
                )
        rows = {spec.shape[0] for spec in produced}
        lengths = {spec.shape[1] for spec in produced} - {-1}
        if len(rows) > 1 or len(lengths) > 1:
            described = ", ".join(f"'{s.name}' {s.describe()}" for s in produced)
            raise LoadError(f"the model's token inputs disagree on their shapes: {described}")
        if options.input in by_name and options.input not in (s.name for s in produced):
            raise LoadError(
                f"the model itself takes an input named '{options.input}'; give the text input another "
                "name with the input option"
            )
        self.length = next(iter(lengths), None)
        if self.length is not None and options.max_length is not None and options.max_length > self.length:
            raise LoadError(
                f"max_length {options.max_length} is over the model's fixed sequence length {self.length}"
            )
        self.max_length = options.max_length or self.length or DEFAULT_MAX_LENGTH
        specials = self.tokenizer.num_special_tokens_to_add(options.pairs)
        if self.max_length <= specials + int(options.pairs):
            raise LoadError(
                f"max_length {self.max_length} leaves no room for text next to the tokenizer's {specials} "
                "special tokens"
            )
        if options.truncation:
            self.tokenizer.enable_truncation(self.max_length)
        self._ids, self._mask, self._types = ids, mask, types
        shape = (ids.shape[0], 2) if options.pairs else (ids.shape[0],)
        text = TensorSpec(options.input, pb.DATA_TYPE_STRING, shape)
        filled = {spec.name for spec in produced}
        return [text, *(spec for spec in downstream if spec.name not in filled)]

    def __call__(self, inputs: Arrays) -> Arrays:
        name = self.options.input
        texts = inputs[name]
        batch: list[Any] = [tuple(row) for row in texts.tolist()] if self.options.pairs else texts.tolist()
        encodings = self._encode(batch)
        counts = [len(encoding.ids) for encoding in encodings]
        for row, count in enumerate(counts):
            if count > self.max_length:
                raise PluginError(
                    f"input '{name}' row {row}: {count} tokens, over max_length {self.max_length}; "
                    "shorten it or enable truncation"
                )
            if count == 0:
                raise PluginError(f"input '{name}' row {row}: the text has no tokens")
        length = self.length or max(counts, default=0)
        feeds = {key: value for key, value in inputs.items() if key != name}
        assert self._ids is not None, "signature() runs at load, before any request"
        feeds[self._ids.name] = _pad(encodings, "ids", length, self.pad_id, self._ids)
        if self._mask is not None:
            feeds[self._mask.name] = _pad(encodings, "attention_mask", length, 0, self._mask)
        if self._types is not None:
            feeds[self._types.name] = _pad(encodings, "type_ids", length, 0, self._types)
        return feeds

    def _encode(self, batch: list[Any]) -> list[Encoding]:
        if len(batch) == 1:
            # One text, the common request: no hand-off to the tokenizer's thread pool.
            one = batch[0]
            return [self.tokenizer.encode(*one) if self.options.pairs else self.tokenizer.encode(one)]
        return self.tokenizer.encode_batch(batch)


def _find(name: str, context: PluginContext) -> Path:
    """The tokenizer file: an absolute path as given; a relative one in the version's directory, else in the
    model's, so that versions may have tokenizers of their own and share one otherwise."""
    path = Path(name)
    candidates = [path] if path.is_absolute() else [context.version_dir / path, context.resolve(path)]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise LoadError(f"no tokenizer file: looked for {' and '.join(str(c) for c in candidates)}")


def _pad(
    encodings: Sequence[Encoding], field: str, length: int, value: int, spec: TensorSpec
) -> npt.NDArray[Any]:
    """One field of every encoding as a [rows, length] array of the model's dtype, padded on the right."""
    array = np.full((len(encodings), length), value, dtype=spec.dtype)
    for row, encoding in enumerate(encodings):
        values = getattr(encoding, field)
        array[row, : len(values)] = values
    return array
