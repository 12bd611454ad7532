"""Coming from Cluster Serving: its input forms and top-N answers, through Sluice's clients, to a real server.

The forms are checked against bytes written here by hand, so a mistake made the same way by the client and
the server cannot pass; then a ported image classifier and a sparse-input model answer over a real channel.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import sys
import textwrap
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
import scipy.sparse

from sluice.clients import AsyncClient, Client, QueueClient, SluiceError
from sluice.clients.forms import input_tensor, instances, top_n
from sluice.server.app import SluiceServer
from sluice.v1 import inference_pb2 as pb
from support import ROOT, serving

SEVEN = ROOT / "examples" / "models" / "digits_image" / "seven.png"


def _framed(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


# -- the forms, against hand-written wire bytes -------------------------------------------------------------


def test_file_forms_are_one_bytes_element(tmp_path: Path) -> None:
    picture = tmp_path / "a.jpg"
    picture.write_bytes(b"\xff\xd8jpeg")
    by_path = input_tensor("img", {"path": str(picture)})
    by_b64 = input_tensor("img", {"b64": base64.b64encode(b"\xff\xd8jpeg").decode()})
    for tensor in (by_path, by_b64):
        assert (tensor.datatype, list(tensor.shape)) == (pb.DATA_TYPE_BYTES, [1])
        assert tensor.raw_contents == b"\x06\x00\x00\x00\xff\xd8jpeg"


def test_a_list_of_str_is_a_string_tensor() -> None:
    tensor = input_tensor("user_define_key", ["hello", "world"])
    assert (tensor.datatype, list(tensor.shape)) == (pb.DATA_TYPE_STRING, [2])
    assert tensor.raw_contents == _framed(b"hello", b"world")


def test_sparse_list_takes_indices_rank_first() -> None:
    # Cluster Serving's layout: row 0 holds the rows of the non-zeros, row 1 their columns.
    indices = np.array([[0, 1, 1], [2, 0, 3]])
    tensor = input_tensor("x", [indices, np.array([1.5, 2.0, -1.0], dtype=np.float32), [2, 4]])
    assert (tensor.datatype, list(tensor.shape)) == (pb.DATA_TYPE_FP32, [2, 4])
    assert tensor.raw_contents == b""
    assert tensor.sparse.indices == struct.pack("<6q", 0, 2, 1, 0, 1, 3)  # the wire's [nnz, rank]
    assert tensor.sparse.values == struct.pack("<3f", 1.5, 2.0, -1.0)


def test_scipy_sparse_is_sent_as_coo() -> None:
    matrix = scipy.sparse.csr_matrix(np.array([[0, 0, 7], [5, 0, 0]], dtype=np.int64))
    tensor = input_tensor("x", matrix)
    assert (tensor.datatype, list(tensor.shape)) == (pb.DATA_TYPE_INT64, [2, 3])
    assert tensor.sparse.indices == struct.pack("<4q", 0, 2, 1, 0)
    assert tensor.sparse.values == struct.pack("<2q", 7, 5)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            [np.array([[0, 2], [1, 0], [1, 3]]), np.array([1.0, 2.0, 3.0]), [2, 4]],
            "indices must be [rank, nnz] = [2, 3] for shape [2, 4] and 3 values, got [3, 2] (that is [nnz, rank]: pass indices.T)",
        ),
        (
            [np.array([[0, 1], [2, 4]]), np.array([1.0, 2.0]), [2, 4]],
            "index 4 on axis 1 lies outside shape [2, 4]",
        ),
        ({"b64": "not base64!"}, "{'b64': ...} is not valid base64"),
        ({"path": "/no/such/picture.jpg"}, "{'path': '/no/such/picture.jpg'}: no such file"),
        ({"url": "x"}, "a dict must be {'path': FILE} or {'b64': TEXT}, got keys ['url']"),
    ],
    ids=["transposed", "outside", "bad-b64", "no-file", "unknown-dict"],
)
def test_a_malformed_form_is_named_before_sending(value: object, message: str) -> None:
    with pytest.raises(ValueError, match="input 'x'") as caught:
        input_tensor("x", value)
    assert message in str(caught.value)


def test_instances_stack_one_row_each_and_take_the_models_types() -> None:
    got = instances(
        {"instances": [{"a": [1, 2], "t": "hi"}, {"a": [3, 4], "t": "yo"}]}, {"a": pb.DATA_TYPE_FP32}
    )
    np.testing.assert_array_equal(got["a"], np.array([[1, 2], [3, 4]], dtype=np.float32))
    assert got["a"].dtype == np.float32
    assert got["t"].tolist() == ["hi", "yo"]


def test_top_n_is_sorted_best_first() -> None:
    outputs = {
        "labels": np.array([["cat", "dog", "fox"]], dtype=object),
        "scores": np.array([[0.2, 0.7, 0.1]], dtype=np.float32),
    }
    got = top_n(outputs)
    assert list(got) == ["dog", "cat", "fox"]
    assert got["dog"] == pytest.approx(0.7)


# -- a ported image classifier: QueueClient with path and base64 images, top-N dicts ------------------------


async def test_queue_client_classifies_path_and_b64_images_as_top_n(server: SluiceServer) -> None:
    b64 = base64.b64encode(SEVEN.read_bytes()).decode()

    def work() -> tuple[dict[str, float], dict[str, dict[str, float] | SluiceError]]:
        with QueueClient(server.address, "digits_image") as queue:
            queue.enqueue("my-image1", image={"path": str(SEVEN)})
            queue.enqueue("my-image2", image={"b64": b64})
            queue.enqueue("broken", image={"b64": base64.b64encode(b"not a picture").decode()})
            first = queue.query("my-image1", timeout=30, top_n=True)
            rest: dict[str, dict[str, float] | SluiceError] = {}
            pause = threading.Event()
            for _ in range(600):  # bounded: both answers arrive well within 30 s
                rest.update(queue.dequeue(top_n=True))
                if len(rest) == 2:
                    break
                pause.wait(0.05)
        return first, rest

    first, rest = await asyncio.to_thread(work)
    assert next(iter(first)) == "seven"
    assert len(first) == 3
    assert list(first.values()) == sorted(first.values(), reverse=True)
    second = rest["my-image2"]
    assert isinstance(second, dict)
    assert second == first  # the same picture, sent as base64
    broken = rest["broken"]
    assert isinstance(broken, SluiceError)
    assert broken.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a PNG or JPEG image" in broken.message


async def test_predict_takes_the_instances_json_form(server: SluiceServer) -> None:
    rows = np.random.default_rng(5).integers(0, 17, size=(3, 64))
    body = json.dumps({"instances": [{"pixels": row.tolist()} for row in rows]})

    def work() -> dict[str, np.ndarray]:
        with Client(server.address) as client:
            return client.predict("digits", body)

    got = await asyncio.to_thread(work)
    async with AsyncClient(server.address) as client:
        expected = await client.predict("digits", pixels=rows.astype(np.float32))
        again = await client.predict("digits", json.loads(body))
    np.testing.assert_array_equal(got["label"], expected["label"])
    np.testing.assert_array_equal(again["label"], expected["label"])


# -- a sparse-input model fed [indices, values, shape] and scipy.sparse -------------------------------------

SPARSE_CONFIG = """
[runtime]
name = "python"
inputs = [{ name = "features", datatype = "FP32", shape = [-1, 6] }]
outputs = [{ name = "score", datatype = "FP32", shape = [-1] }]
"""

SPARSE_MODEL = """
import numpy as np

WEIGHTS = np.arange(1, 7, dtype=np.float32)


class Model:
    def predict(self, batch):
        return {"score": batch["features"] @ WEIGHTS}
"""


async def test_sparse_model_takes_index_lists_and_scipy_matrices(repo: Path) -> None:
    (repo / "linear" / "1").mkdir(parents=True)
    (repo / "linear" / "config.toml").write_text(SPARSE_CONFIG)
    (repo / "linear" / "1" / "model.py").write_text(textwrap.dedent(SPARSE_MODEL))
    dense = np.array([[0, 2, 0, 0, 0, 1], [3, 0, 0, 0, 0, 0]], dtype=np.float32)
    expected = dense @ np.arange(1, 7, dtype=np.float32)
    indices = np.array([[0, 0, 1], [1, 5, 0]])  # [rank, nnz]
    values = np.array([2, 1, 3], dtype=np.float32)
    async with serving(repo) as (server, _), AsyncClient(server.address) as client:
        by_list = await client.predict("linear", features=[indices, values, [2, 6]])
        by_scipy = await client.predict("linear", features=scipy.sparse.csr_matrix(dense))
        with pytest.raises(SluiceError) as caught:  # FP64 values for an FP32 input: the server says so
            await client.predict("linear", features=[indices, values.astype(np.float64), [2, 6]])
    np.testing.assert_array_equal(by_list["score"], expected)
    np.testing.assert_array_equal(by_scipy["score"], expected)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "expected FP32 [-1, 6]" in caught.value.message


async def test_the_cli_takes_the_path_and_b64_forms(server: SluiceServer) -> None:
    b64 = base64.b64encode(SEVEN.read_bytes()).decode()
    labels = []
    for form in ({"path": str(SEVEN)}, {"b64": b64}):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sluice.server.cli", "predict", "digits_image",
            "--input", f"image={json.dumps(form)}", "--target", server.address, "--json",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        labels.append(json.loads(out)["labels"][0][0])
    assert labels == ["seven", "seven"]
