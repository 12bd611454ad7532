"""The `topk` postprocessor end to end, and the bundled `digits_image` example that pairs it with `image`."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from sluice.server.tensors import type_name
from sluice.v1 import inference_pb2 as pb
from sluice.v1 import inference_pb2_grpc as pb_grpc
from support import DIGITS_ONNX, ROOT, outputs, request, save, train_digits_module
from support import serving_stub as serving

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
EXAMPLE = ROOT / "examples" / "models" / "digits_image"


def picture(digit: npt.NDArray[np.float32], fmt: str, zoom: int = 1) -> bytes:
    """A digit of the data set (8x8, 0..16, light ink on dark) as people draw it: dark ink on white, 0..255."""
    grey = np.rint(255 - digit.reshape(8, 8) * (255 / 16)).astype(np.uint8)
    grey = grey.repeat(zoom, axis=0).repeat(zoom, axis=1)
    buffer = io.BytesIO()
    if fmt == "JPEG":
        Image.fromarray(grey).save(buffer, "JPEG", quality=95)
    elif fmt == "RGBA":  # drawn in a browser: black strokes of varying opacity on a transparent canvas
        alpha = 255 - grey
        rgba = np.stack([np.zeros_like(grey)] * 3 + [alpha], axis=-1)
        Image.fromarray(rgba).save(buffer, "PNG")
    else:
        Image.fromarray(grey).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def held_out() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    _, x_test, _, y_test = train_digits_module().held_out_split()
    return x_test, y_test


def check_consistent(got: dict[str, npt.NDArray[np.generic]], k: int, rows: int) -> None:
    """What any caller may rely on: shapes, best first, distinct classes, labels naming the classes."""
    classes, scores, labels = got["classes"], got["scores"], got["labels"]
    assert classes.shape == scores.shape == labels.shape == (rows, k)
    assert classes.dtype == np.int64
    assert scores.dtype == np.float32
    assert (np.diff(scores, axis=1) <= 0).all()
    assert (scores >= 0).all()
    assert (scores.sum(axis=1) <= 1 + 1e-5).all()
    assert all(len(set(row)) == k for row in classes.tolist())
    assert labels.tolist() == [[NAMES[c] for c in row] for row in classes.tolist()]


async def test_bundled_digits_image_reads_its_signature_and_its_example(stub: pb_grpc.InferenceStub) -> None:
    (status,) = (await stub.Health(pb.HealthRequest(model="digits_image"))).models
    assert status.state == pb.MODEL_STATE_READY  # its warm-up ran seven.png through the whole pipeline
    (version,) = status.versions
    assert [(i.name, i.datatype, list(i.shape)) for i in version.inputs] == [
        ("image", pb.DATA_TYPE_BYTES, [-1])
    ]
    assert [(o.name, o.datatype, list(o.shape)) for o in version.outputs] == [
        ("classes", pb.DATA_TYPE_INT64, [-1, 3]),
        ("scores", pb.DATA_TYPE_FP32, [-1, 3]),
        ("labels", pb.DATA_TYPE_STRING, [-1, 3]),
    ]
    # The example serves a copy of the digits model: after retraining, copy it again.
    assert (EXAMPLE / "1" / "model.onnx").read_bytes() == DIGITS_ONNX.read_bytes()
    seven = (EXAMPLE / "seven.png").read_bytes()
    as_text = base64.b64encode(seven).decode()
    for rows in (np.array([seven], dtype=object), np.array([as_text], dtype=object)):
        got = outputs(await stub.Predict(request("digits_image", image=rows)))
        check_consistent(got, 3, 1)
        assert got["labels"][0, 0] == "seven"
        assert got["classes"][0, 0] == 7


async def test_held_out_digits_as_pictures(
    stub: pb_grpc.InferenceStub, held_out: tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]
) -> None:
    x, y = held_out[0][:192], held_out[1][:192]
    # The digits model itself, given the data set's numbers, gets about 97% of the held-out rows right.
    direct = np.concatenate(
        [
            outputs(await stub.Predict(request("digits", pixels=x[i : i + 64])))["label"]
            for i in range(0, 192, 64)
        ]
    )
    for fmt, zoom, min_accuracy in [("PNG", 1, 0.95), ("PNG", 4, 0.95), ("RGBA", 4, 0.95), ("JPEG", 4, 0.9)]:
        top1 = []
        for start in range(0, len(x), 64):
            rows = np.array([picture(d, fmt, zoom) for d in x[start : start + 64]], dtype=object)
            got = outputs(await stub.Predict(request("digits_image", image=rows)))
            check_consistent(got, 3, len(rows))
            top1.append(got["classes"][:, 0])
        accuracy = float((np.concatenate(top1) == y).mean())
        agreement = float((np.concatenate(top1) == direct).mean())
        assert accuracy >= min_accuracy, (fmt, zoom, accuracy)
        assert agreement >= min_accuracy, (fmt, zoom, agreement)


def identity(heads: dict[str, tuple[int, list[int | str]]]) -> onnx.ModelProto:
    """Input `x` (FP32, shaped like the first output); every output is x cast to its type, so the scores the
    postprocessor sees are exactly the request's."""
    nodes = [helper.make_node("Cast", ["x"], [name], to=elem) for name, (elem, _) in heads.items()]
    graph = helper.make_graph(
        nodes,
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, next(iter(heads.values()))[1])],
        [helper.make_tensor_value_info(name, elem, shape) for name, (elem, shape) in heads.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def add(repo: Path, name: str, model: onnx.ModelProto, options: str, labels: list[str] | None = None) -> None:
    save(model, repo / name / "1" / "model.onnx")
    config = f'postprocess = [{{ name = "topk", {options} }}]\n' if options else 'postprocess = ["topk"]\n'
    (repo / name / "config.toml").write_text(config, encoding="utf-8")
    if labels is not None:
        (repo / name / "labels.txt").write_text("\n".join(labels) + "\n", encoding="utf-8")


async def statuses(stub: pb_grpc.InferenceStub) -> dict[str, pb.ModelStatus]:
    return {m.name: m for m in (await stub.Health(pb.HealthRequest())).models}


def signature(status: pb.ModelStatus) -> list[tuple[str, str, list[int]]]:
    (version,) = status.versions
    return [(o.name, type_name(o.datatype), list(o.shape)) for o in version.outputs]


LOGITS = np.array([[2.0, -1.0, 0.5, 3.0, 0.5, -4.0], [0.0, 0.0, 1.0, 0.0, 0.0, 0.0]], dtype=np.float32)
SIX = ["cat", "dog", "owl", "fox", "elk", "ant"]


async def test_top_k_scores_classes_and_labels_match_numpy(repo: Path) -> None:
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    add(
        repo,
        "softmax",
        identity({"logits": (f32, ["N", 6])}),
        'k = 3, softmax = true, labels = "labels.txt"',
        SIX,
    )
    add(repo, "plain", identity({"logits": (f32, ["N", 6])}), "")
    add(repo, "kept", identity({"logits": (f32, ["N", 6]), "ids": (i64, ["N", 6])}),
        'k = 10, keep_outputs = true, prefix = "top_"')  # fmt: skip
    async with serving(repo) as stub:
        health = await statuses(stub)
        assert signature(health["softmax"]) == [("classes", "INT64", [-1, 3]), ("scores", "FP32", [-1, 3]),
                                                ("labels", "STRING", [-1, 3])]  # fmt: skip
        assert signature(health["plain"]) == [("classes", "INT64", [-1, 5]), ("scores", "FP32", [-1, 5])]
        # k = 10 of 6 classes gives all 6; the only floating-point output is chosen; the model's own stay.
        assert signature(health["kept"]) == [("logits", "FP32", [-1, 6]), ("ids", "INT64", [-1, 6]),
                                             ("top_classes", "INT64", [-1, 6]), ("top_scores", "FP32", [-1, 6])]  # fmt: skip

        got = outputs(await stub.Predict(request("softmax", x=LOGITS)))
        exp = np.exp(LOGITS.astype(np.float64) - LOGITS.max(axis=1, keepdims=True))
        probabilities = exp / exp.sum(axis=1, keepdims=True)
        np.testing.assert_array_equal(got["classes"], [[3, 0, 2], [2, 0, 1]])  # ties: the lower class first
        np.testing.assert_allclose(
            got["scores"], np.take_along_axis(probabilities, got["classes"], 1), rtol=1e-6
        )
        assert got["labels"].tolist() == [["fox", "cat", "owl"], ["owl", "cat", "dog"]]

        got = outputs(await stub.Predict(request("plain", x=LOGITS[:1])))
        np.testing.assert_array_equal(got["classes"], [[3, 0, 2, 4, 1]])
        np.testing.assert_array_equal(got["scores"], [[3.0, 2.0, 0.5, 0.5, -1.0]])

        got = outputs(await stub.Predict(request("kept", x=LOGITS)))
        assert set(got) == {"logits", "ids", "top_classes", "top_scores"}
        np.testing.assert_array_equal(got["logits"], LOGITS)
        np.testing.assert_array_equal(got["top_classes"][0], [3, 0, 2, 4, 1, 5])


async def test_labels_against_a_free_class_axis_are_checked_per_request(repo: Path) -> None:
    add(
        repo,
        "free",
        identity({"logits": (TensorProto.FLOAT, ["N", "C"])}),
        'k = 2, labels = "labels.txt"',
        SIX[:4],
    )
    async with serving(repo) as stub:
        assert signature((await statuses(stub))["free"])[0] == ("classes", "INT64", [-1, -1])
        got = outputs(await stub.Predict(request("free", x=LOGITS[:, :4])))
        assert got["labels"].tolist() == [["fox", "cat"], ["owl", "cat"]]
        got = outputs(await stub.Predict(request("free", x=LOGITS[:, :1])))  # one class: k is cut to 1
        assert got["labels"].tolist() == [["cat"], ["cat"]]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Predict(request("free", x=LOGITS))
        # The server's labels do not fit what the model gave: not the caller's mistake, not a retry's fix.
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "output 'logits' has 6 classes but the labels file labels.txt has only 4 labels" in (
            info.value.details() or ""
        )


async def test_bad_configs_fail_the_model_with_the_reason(repo: Path) -> None:
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    six = identity({"logits": (f32, ["N", 6])})
    two_floats = identity({"logits": (f32, ["N", 6]), "probabilities": (f32, ["N", 6])})
    cases = {
        "no_labels_file": (six, 'labels = "missing.txt"', None,
                           ["postprocess[0] ('topk'): labels file ", "missing.txt cannot be read: No such file or directory"]),
        "labels_short": (six, 'labels = "labels.txt"', SIX[:5],
                         ["topk postprocessor: output 'logits' (FP32 [-1, 6]): has 6 classes but the labels file labels.txt has 5 labels"]),
        "which_output": (two_floats, "", None,
                         ["topk postprocessor: found 2 floating-point outputs", "set `output` to one of 'logits' (FP32 [-1, 6]), 'probabilities' (FP32 [-1, 6])"]),
        "no_such_output": (two_floats, 'output = "probs"', None,
                           ["output = 'probs': there is no output of that name; the outputs are 'logits'"]),
        "name_taken": (identity({"scores": (f32, ["N", 6]), "classes": (i64, ["N", 6])}), "keep_outputs = true", None,
                       ["keep_outputs = true, but the model already gives classes, scores; set `prefix`"]),
        "text_scores": (identity({"logits": (TensorProto.STRING, ["N", 6])}), "", None,
                        ["output 'logits' (STRING [-1, 6]): expected numeric scores"]),
        "one_axis": (identity({"logits": (f32, ["N"])}), "", None,
                     ["output 'logits' (FP32 [-1]): its only axis is free, so it holds rows, not classes"]),
        "k_zero": (six, "k = 0", None, ["postprocess[0] ('topk'): postprocessor plugin options: field 'k': Input should be greater than 0 (got 0)"]),
        "unknown_key": (six, "top = 3", None, ["field 'top': Extra inputs are not permitted"]),
        "wrong_type": (six, 'k = "three"', None, ["field 'k': Input should be a valid integer"]),
    }  # fmt: skip
    for name, (model, options, labels, _) in cases.items():
        add(repo, name, model, options, labels)
    async with serving(repo) as stub:
        health = await statuses(stub)
        for name, (*_, fragments) in cases.items():
            status = health[name]
            assert status.state == pb.MODEL_STATE_FAILED, name
            for fragment in fragments:
                assert fragment in status.reason, (name, status.reason)
        assert "labels file no_labels_file/missing.txt cannot" in health["no_labels_file"].reason
        assert str(repo) not in health["no_labels_file"].reason
