"""The tokenize preprocessor through the real server: texts in, exactly the right token ids into the model.

A tiny word-level tokenizer and tiny ONNX models that report what reached them (token counts, sums, the ids
themselves) check the plugin exactly; the MiniLM example, when it has been built, checks a real text model.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import support
from sluice.server.app import SluiceServer
from sluice.v1 import inference_pb2 as pb
from sluice.v1 import inference_pb2_grpc as pb_grpc
from support import ROOT, outputs, request, save, scrape

WORDS = ["[UNK]", "[PAD]", "[CLS]", "[SEP]", "the", "cat", "sat", "on", "mat", "a", "dog", "ran"]
VOCAB = {word: index for index, word in enumerate(WORDS)}
UNK, PAD, CLS, SEP = 0, 1, 2, 3

PADDED = """
[inputs.input_ids.pad]
axis = 1
dim = "seq"
[inputs.attention_mask.pad]
axis = 1
dim = "seq"
[outputs.ids.crop]
axis = 1
dim = "seq"
"""


def make_tokenizer(path: Path, words: Sequence[str] = WORDS) -> Path:
    """A BERT-shaped word-level tokenizer: lower-cased words, [CLS] A [SEP] (B [SEP]), [PAD] = 1.

    Saved with padding on, as Hugging Face tokenizers often are: the plugin takes the pad id from it.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {word: index for index, word in enumerate(words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tokenizer.enable_padding(pad_id=vocab["[PAD]"], pad_token="[PAD]")
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return path


def expected_ids(text: str) -> list[int]:
    """What the tokenizer above makes of one text, worked out without it."""
    return [CLS, *(VOCAB.get(word, UNK) for word in text.lower().split()), SEP]


def token_model(
    elem: int = TensorProto.INT64, seq: str | int = "L", token_types: bool = False
) -> onnx.ModelProto:
    """Reports what reached it, per row: `tokens` (mask sum), `ids_sum` (sum of unmasked ids), `ids` (the ids
    as given) and, with token_types, `types_sum` (sum of unmasked token type ids)."""
    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")
    nodes = [
        helper.make_node("ReduceSum", ["attention_mask", "axes"], ["tokens"], keepdims=0),
        helper.make_node("Mul", ["input_ids", "attention_mask"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axes"], ["ids_sum"], keepdims=0),
        helper.make_node("Identity", ["input_ids"], ["ids"]),
    ]
    names = ["input_ids", "attention_mask"]
    outs = [
        helper.make_tensor_value_info("tokens", elem, ["N"]),
        helper.make_tensor_value_info("ids_sum", elem, ["N"]),
        helper.make_tensor_value_info("ids", elem, ["N", seq]),
    ]
    if token_types:
        names.append("token_type_ids")
        nodes += [
            helper.make_node("Mul", ["token_type_ids", "attention_mask"], ["masked_types"]),
            helper.make_node("ReduceSum", ["masked_types", "axes"], ["types_sum"], keepdims=0),
        ]
        outs.append(helper.make_tensor_value_info("types_sum", elem, ["N"]))
    graph = helper.make_graph(
        nodes, "tokens", [helper.make_tensor_value_info(n, elem, ["N", seq]) for n in names], outs, [axes]
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def add_model(
    repo: Path, name: str, config: str, model: onnx.ModelProto | None = None, tokenizer: bool = True
) -> Path:
    """<repo>/<name>/config.toml and 1/model.onnx, with the test tokenizer next to the model."""
    save(model or token_model(), repo / name / "1" / "model.onnx")
    (repo / name / "config.toml").write_text(config)
    if tokenizer:
        make_tokenizer(repo / name / "1" / "tokenizer.json")
    return repo / name


def texts(*items: str | Sequence[str]) -> npt.NDArray[np.object_]:
    return np.array(items, dtype=object)


@asynccontextmanager
async def serving(
    repo: Path, metrics: bool = False
) -> AsyncIterator[tuple[SluiceServer, pb_grpc.InferenceStub]]:
    async with support.serving(repo, metrics=metrics) as (server, channel):
        yield server, pb_grpc.InferenceStub(channel)


async def failure(stub: pb_grpc.InferenceStub, model: str) -> str:
    """Health's reason for a model that failed to load."""
    (status,) = (await stub.Health(pb.HealthRequest(model=model))).models
    assert status.state == pb.MODEL_STATE_FAILED, f"{model} loaded"
    return status.reason


async def refused(stub: pb_grpc.InferenceStub, req: pb.PredictRequest) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Predict(req)
    return info.value


async def test_texts_of_different_lengths_batch_together_and_each_gets_its_own_rows(repo: Path) -> None:
    requests = [
        ["the cat"],
        ["the cat sat on the mat", "a dog"],
        ["Dog"],
        ["the mat", "a cat ran", "on zebra"],
    ]
    rows = sum(len(r) for r in requests)
    # A fixed policy waiting for exactly every row makes one batch certain, if and only if the requests'
    # different lengths are padded into one group.
    add_model(
        repo,
        "words",
        'preprocess = [{ name = "tokenize" }]\nwarmup = [{ text = "the cat sat" }]\n'
        f'[batching]\nmax_batch_size = {rows}\nmax_delay_ms = 10000\npolicy = "fixed"\n{PADDED}',
    )
    async with serving(repo, metrics=True) as (server, stub):
        (status,) = (await stub.Health(pb.HealthRequest(model="words"))).models
        (text,) = status.versions[0].inputs
        assert (text.name, text.datatype, list(text.shape)) == ("text", pb.DATA_TYPE_STRING, [-1])

        responses = await asyncio.gather(
            *(stub.Predict(request("words", id=str(i), text=texts(*r))) for i, r in enumerate(requests))
        )
        for i, (sent, response) in enumerate(zip(requests, responses, strict=True)):
            assert response.id == str(i)
            got = outputs(response)
            ids = [expected_ids(t) for t in sent]
            longest = max(len(row) for row in ids)
            # Padded within the request with the tokenizer's [PAD], to the request's own longest text:
            padded = [row + [PAD] * (longest - len(row)) for row in ids]
            np.testing.assert_array_equal(got["ids"], padded)
            assert got["ids"].dtype == np.int64
            np.testing.assert_array_equal(got["tokens"], [len(row) for row in ids])
            np.testing.assert_array_equal(got["ids_sum"], [sum(row) for row in ids])
        metrics = scrape(server)
        assert metrics['sluice_batch_rows_sum{model="words",version="1"}'] == rows
        assert metrics['sluice_batch_rows_count{model="words",version="1"}'] == 1, (
            "texts of different lengths did not batch"
        )


async def test_text_over_max_length_is_refused_or_truncated(repo: Path) -> None:
    add_model(repo, "strict", 'preprocess = [{ name = "tokenize", max_length = 6 }]\n' + PADDED)
    add_model(
        repo, "cut", 'preprocess = [{ name = "tokenize", max_length = 6, truncation = true }]\n' + PADDED
    )
    long = "the cat sat on the mat"  # 8 tokens with [CLS] and [SEP]
    async with serving(repo) as (_, stub):
        error = await refused(stub, request("strict", text=texts("the cat", "a dog", "dog", long)))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.details() == (
            "input 'text' row 3: 8 tokens, over max_length 6; shorten it or enable truncation"
        )
        # Exactly max_length tokens is fine.
        fits = outputs(await stub.Predict(request("strict", text=texts("the cat sat on"))))
        np.testing.assert_array_equal(fits["ids"], [expected_ids("the cat sat on")])

        got = outputs(await stub.Predict(request("cut", text=texts("the cat", long))))
        np.testing.assert_array_equal(got["ids"], [[CLS, 4, 5, SEP, PAD, PAD], [CLS, 4, 5, 6, 7, SEP]])
        np.testing.assert_array_equal(got["tokens"], [4, 6])

        wrong = await refused(stub, request("cut", text=np.zeros(2, np.float32)))
        assert wrong.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert wrong.details() == "input 'text': expected STRING [-1], got FP32 [2]"


async def test_sentence_pairs_fill_token_type_ids_when_the_model_takes_them(repo: Path) -> None:
    add_model(
        repo, "pairs", 'preprocess = [{ name = "tokenize", pairs = true }]\n', token_model(token_types=True)
    )
    add_model(repo, "single", 'preprocess = [{ name = "tokenize" }]\n', token_model(token_types=True))
    async with serving(repo) as (_, stub):
        (status,) = (await stub.Health(pb.HealthRequest(model="pairs"))).models
        (text,) = status.versions[0].inputs
        assert (text.name, list(text.shape)) == ("text", [-1, 2])

        sent = texts(["the cat", "sat on the mat"], ["a dog", "ran"])
        got = outputs(await stub.Predict(request("pairs", text=sent)))
        first = [CLS, 4, 5, SEP, 6, 7, 4, 8, SEP]
        second = [CLS, 9, 10, SEP, 11, SEP]
        np.testing.assert_array_equal(got["ids"], [first, second + [PAD] * 3])
        # Sentence B and its [SEP] are type 1.
        np.testing.assert_array_equal(got["types_sum"], [5, 2])
        np.testing.assert_array_equal(got["tokens"], [9, 6])

        one = outputs(await stub.Predict(request("single", text=texts("a dog ran"))))
        np.testing.assert_array_equal(one["types_sum"], [0])
        np.testing.assert_array_equal(one["ids"], [expected_ids("a dog ran")])


async def test_a_fixed_sequence_length_sets_max_length_and_int32_ids(repo: Path) -> None:
    add_model(repo, "fixed", 'preprocess = [{ name = "tokenize" }]\n', token_model(TensorProto.INT32, seq=6))
    async with serving(repo) as (_, stub):
        got = outputs(await stub.Predict(request("fixed", text=texts("the cat", "dog"))))
        assert got["ids"].dtype == np.int32
        np.testing.assert_array_equal(got["ids"], [[CLS, 4, 5, SEP, PAD, PAD], [CLS, 10, SEP, PAD, PAD, PAD]])
        error = await refused(stub, request("fixed", text=texts("the cat sat on the mat")))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "8 tokens, over max_length 6" in (error.details() or "")


async def test_the_version_directory_tokenizer_comes_before_the_models(repo: Path) -> None:
    model = add_model(
        repo, "layered", 'versions = "all"\npreprocess = [{ name = "tokenize" }]\n', tokenizer=False
    )
    save(token_model(), model / "2" / "model.onnx")
    make_tokenizer(model / "tokenizer.json")  # shared: version 1 has none of its own
    make_tokenizer(model / "2" / "tokenizer.json", [*WORDS[:4], "dog", "cat"])  # dog = 4, cat = 5
    async with serving(repo) as (_, stub):
        one = outputs(await stub.Predict(request("layered", version=1, text=texts("dog"))))
        two = outputs(await stub.Predict(request("layered", version=2, text=texts("dog"))))
        np.testing.assert_array_equal(one["ids"], [[CLS, VOCAB["dog"], SEP]])
        np.testing.assert_array_equal(two["ids"], [[CLS, 4, SEP]])


async def test_configuration_mistakes_fail_the_model_with_the_reason(repo: Path) -> None:
    add_model(repo, "nofile", 'preprocess = [{ name = "tokenize" }]\n', tokenizer=False)
    add_model(repo, "typo", 'preprocess = [{ name = "tokenize", max_len = 8 }]\n')
    add_model(repo, "no_ids", 'preprocess = [{ name = "tokenize", input_ids = "tokens" }]\n')
    add_model(
        repo,
        "over",
        'preprocess = [{ name = "tokenize", max_length = 10 }]\n',
        token_model(seq=6),
    )
    async with serving(repo) as (_, stub):
        reason = await failure(stub, "nofile")
        assert "looked for nofile/1/tokenizer.json and nofile/tokenizer.json" in reason
        assert str(repo) not in reason
        error = await refused(stub, request("nofile", text=texts("the cat")))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "tokenizer.json" in (error.details() or "")

        assert "field 'max_len'" in await failure(stub, "typo")
        assert "the model has no input 'tokens'" in await failure(stub, "no_ids")
        assert "max_length 10 is over the model's fixed sequence length 6" in await failure(stub, "over")


async def test_without_the_tokenizers_package_health_names_the_extra(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_model(repo, "words", 'preprocess = [{ name = "tokenize" }]\n')
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # `import tokenizers` now raises ImportError
    async with serving(repo) as (_, stub):
        reason = await failure(stub, "words")
        assert (
            "the tokenize preprocessor needs the tokenizers package: pip install 'sluice-serving[text]'"
            in reason
        )


# The MiniLM example is about 90 MB and built on demand, so these run only where it has been built.

MINILM = ROOT / "examples" / "models" / "minilm"
needs_minilm = pytest.mark.skipif(
    not (MINILM / "1" / "model.onnx").is_file(),
    reason="the MiniLM example is not built: run python examples/export_minilm.py to build it",
)


def reference_embeddings(sentences: Sequence[str]) -> npt.NDArray[np.float32]:
    """Each sentence alone through onnxruntime and tokenizers in this process, with no server and no padding."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(MINILM / "1" / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    session = ort.InferenceSession(str(MINILM / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    rows = []
    for sentence in sentences:
        encoding = tokenizer.encode(sentence)
        feeds = {
            "input_ids": np.array([encoding.ids], np.int64),
            "attention_mask": np.array([encoding.attention_mask], np.int64),
        }
        rows.append(session.run(["embedding"], feeds)[0][0])
    return np.array(rows, dtype=np.float32)


async def embed(stub: pb_grpc.InferenceStub, *sentences: str) -> npt.NDArray[np.float32]:
    got = outputs(await stub.Predict(request("minilm", text=texts(*sentences))))["embedding"]
    return np.asarray(got, dtype=np.float32)


@needs_minilm
async def test_minilm_embeddings_are_unit_vectors_that_rank_meaning(stub: pb_grpc.InferenceStub) -> None:
    query = "A man is eating food."
    similar = "A man is eating a piece of bread."
    unrelated = "The stock market fell sharply on Monday."
    vectors = await embed(stub, query, similar, unrelated)
    assert vectors.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    close, far = vectors[1] @ vectors[0], vectors[2] @ vectors[0]
    assert close > 0.6 > far, f"cosine to a similar sentence {close:.3f}, to an unrelated one {far:.3f}"


@needs_minilm
async def test_minilm_through_the_server_equals_onnxruntime_in_process(stub: pb_grpc.InferenceStub) -> None:
    sentences = [
        "Hi",
        "A kitten is sleeping on the warm windowsill.",
        "Sluice pads shorter texts so that requests of different lengths can share one batch on the model.",
        "Dogs bark.",
        "¿Dónde está la biblioteca? The library is closed on Sundays and on public holidays.",
    ]
    expected = reference_embeddings(sentences)
    # One request of texts of different lengths, and the same texts as concurrent one-text requests.
    together = await embed(stub, *sentences)
    alone = await asyncio.gather(*(embed(stub, s) for s in sentences))
    np.testing.assert_allclose(together, expected, atol=2e-5)
    np.testing.assert_allclose(np.concatenate(alone), expected, atol=2e-5)
