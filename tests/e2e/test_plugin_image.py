"""The `image` preprocessor end to end: pictures in, exactly the planned pixel tensor into the model.

Most models here are Identity graphs, so the response shows what reached the model; it is compared with a
numpy reference computed from the same pixels.
"""

from __future__ import annotations

import base64
import io
import struct
import sys
import zlib
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from sluice.v1 import inference_pb2 as pb
from sluice.v1 import inference_pb2_grpc as pb_grpc
from support import add_model, outputs, request, save
from support import serving_stub as serving

RNG = np.random.default_rng(7)
# Two 4x5 RGB pictures (height 4, width 5): every pixel different, so a transposition would show.
PICTURES = RNG.integers(0, 256, size=(2, 4, 5, 3), dtype=np.uint8)


def identity_model(elem_type: int, shape: list[int | str]) -> onnx.ModelProto:
    """y = x: what the preprocessor gave is what the caller gets back."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", elem_type, shape)],
        [helper.make_tensor_value_info("y", elem_type, shape)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def add(repo: Path, name: str, model: onnx.ModelProto, config: str) -> Path:
    save(model, repo / name / "1" / "model.onnx")
    (repo / name / "config.toml").write_text(config, encoding="utf-8")
    return repo / name


def encoded(array: npt.NDArray[np.uint8], fmt: str = "PNG", **params: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt, **params)
    return buffer.getvalue()


def images(*items: bytes | str) -> npt.NDArray[np.object_]:
    return np.array(items, dtype=object)


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares a size and holds no pixels: the size is all that is read before the checks."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def luma(rgb: npt.NDArray[np.uint8]) -> npt.NDArray[np.float64]:
    """ITU-R 601-2 luma, as Pillow converts RGB to grey (to within one level of its integer rounding)."""
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


async def statuses(stub: pb_grpc.InferenceStub) -> dict[str, pb.ModelStatus]:
    return {m.name: m for m in (await stub.Health(pb.HealthRequest())).models}


async def predict(stub: pb_grpc.InferenceStub, model: str, *rows: bytes | str) -> npt.NDArray[np.generic]:
    return outputs(await stub.Predict(request(model, image=images(*rows))))["y"]


async def rpc_error(stub: pb_grpc.InferenceStub, req: pb.PredictRequest) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Predict(req)
    return info.value


def preprocess(options: str) -> str:
    options = f", {options}" if options else ""
    return f'preprocess = [{{ name = "image"{options} }}]\n'


async def test_layouts_colours_and_normalisation_reach_the_model_exactly(repo: Path) -> None:
    f32, u8 = TensorProto.FLOAT, TensorProto.UINT8
    add(repo, "nchw", identity_model(f32, ["N", 3, 4, 5]),
        preprocess("mean = [0.5, 0.4, 0.3], std = [0.2, 0.3, 0.4]"))  # fmt: skip
    add(repo, "nhwc_bgr", identity_model(f32, ["N", 4, 5, 3]),
        preprocess('colour = "bgr", scale = 1.0, mean = [10.0, 20.0, 30.0], std = 2.0'))  # fmt: skip
    add(repo, "nhw_inverted", identity_model(f32, ["N", 4, 5]), preprocess("invert = true"))
    add(repo, "flat_uint8", identity_model(u8, ["N", 60]), preprocess("size = [4, 5]"))
    add(repo, "nearest_x2", identity_model(f32, ["N", 1, 8, 10]),
        preprocess('resample = "nearest", scale = 1.0'))  # fmt: skip
    add(repo, "crop", identity_model(f32, ["N", 1, 4, 4]),
        preprocess('fit = "crop", resample = "nearest", scale = 1.0'))  # fmt: skip
    rows = [encoded(p) for p in PICTURES]
    rgb = PICTURES.astype(np.float64)
    grey = luma(PICTURES)
    async with serving(repo) as stub:
        health = await statuses(stub)
        assert all(m.state == pb.MODEL_STATE_READY for m in health.values()), health
        (version,) = health["nchw"].versions
        assert [(i.name, i.datatype, list(i.shape)) for i in version.inputs] == [
            ("image", pb.DATA_TYPE_BYTES, [-1])
        ]

        got = await predict(stub, "nchw", *rows)
        want = ((rgb / 255 - [0.5, 0.4, 0.3]) / [0.2, 0.3, 0.4]).transpose(0, 3, 1, 2)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

        got = await predict(stub, "nhwc_bgr", *rows)
        np.testing.assert_allclose(got, (rgb[..., ::-1] - [10, 20, 30]) / 2, rtol=1e-6, atol=1e-5)

        got = await predict(stub, "nhw_inverted", *rows)
        np.testing.assert_allclose(got, (255 - grey) / 255, atol=1.01 / 255)

        got = await predict(stub, "flat_uint8", *rows)
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, PICTURES.reshape(2, 60))

        got = await predict(stub, "nearest_x2", *rows)
        doubled = grey.repeat(2, axis=1).repeat(2, axis=2)
        np.testing.assert_allclose(got[:, 0], doubled, atol=1.01)

        # 4x5 cut to a 4x4 square around the centre: the odd column out is the first one.
        got = await predict(stub, "crop", *rows)
        np.testing.assert_allclose(got[:, 0], grey[:, :, 1:], atol=1.01)


async def test_transparency_grey_input_and_jpeg(repo: Path) -> None:
    add(repo, "grey", identity_model(TensorProto.FLOAT, ["N", 4, 5]), preprocess("scale = 1.0"))
    add(
        repo,
        "on_black",
        identity_model(TensorProto.FLOAT, ["N", 4, 5]),
        preprocess("scale = 1.0, background = 0"),
    )
    rgba = np.concatenate([PICTURES[0], np.full((4, 5, 1), 255, np.uint8)], axis=-1)
    rgba[:, :2, 3] = 0  # the two left columns are transparent
    plain_grey = PICTURES[1, ..., 0]
    async with serving(repo) as stub:
        got = await predict(stub, "grey", encoded(rgba), encoded(plain_grey))
        np.testing.assert_array_equal(got[0, :, :2], 255)
        np.testing.assert_allclose(got[0, :, 2:], luma(PICTURES[0])[:, 2:], atol=1.01)
        np.testing.assert_array_equal(got[1], plain_grey)
        got = await predict(stub, "on_black", encoded(rgba))
        np.testing.assert_array_equal(got[0, :, :2], 0)
        # A lossy JPEG comes back close to its pixels, not equal to them.
        smooth = np.tile(np.linspace(0, 255, 5, dtype=np.uint8), (4, 1))
        got = await predict(stub, "grey", encoded(smooth, "JPEG", quality=95))
        np.testing.assert_allclose(got[0], smooth, atol=12)


async def test_base64_text_and_data_urls_equal_the_bytes(repo: Path) -> None:
    add(repo, "nhwc", identity_model(TensorProto.UINT8, ["N", 4, 5, 3]), preprocess(""))
    png = encoded(PICTURES[0])
    text = base64.b64encode(png).decode()
    variants = [
        text,
        base64.encodebytes(png).decode(),  # MIME style, with line breaks
        base64.urlsafe_b64encode(png).decode().rstrip("="),
        "data:image/png;base64," + text,
    ]
    async with serving(repo) as stub:
        want = await predict(stub, "nhwc", png)
        np.testing.assert_array_equal(want[0], PICTURES[0])
        for variant in variants:
            np.testing.assert_array_equal(await predict(stub, "nhwc", variant), want)


async def test_bad_pictures_are_invalid_argument_naming_the_row(repo: Path) -> None:
    add(repo, "pictures", identity_model(TensorProto.UINT8, ["N", 4, 5, 3]), preprocess(""))
    add(repo, "small_only", identity_model(TensorProto.UINT8, ["N", 4, 5, 3]), preprocess("max_pixels = 100"))
    good = encoded(PICTURES[0])
    gif = encoded(PICTURES[0], "GIF")
    cases = [
        ("pictures", images(good, b"hello"),
         "input 'image' row 1: not a PNG or JPEG image (cannot identify image file)"),
        ("pictures", images(gif), "input 'image' row 0: not a PNG or JPEG image (cannot identify image file)"),
        ("pictures", images(b""), "input 'image' row 0: not a PNG or JPEG image (cannot identify image file)"),
        ("pictures", images(good[: len(good) - 40]), "input 'image' row 0: cannot decode this PNG ("),
        ("pictures", images("not base64!"), "input 'image' row 0: not base64 text ("),
        ("pictures", images("data:image/png,rawbytes"), "input 'image' row 0: a data: URL must hold base64"),
        ("pictures", images(png_header(5000, 5000)),
         "input 'image' row 0: the image is 5000x5000 = 25000000 pixels, over the limit of 16777216 (option max_pixels)"),
        ("pictures", images(png_header(40000, 40000)), "input 'image' row 0: the image is too large to decode: "),
        ("small_only", images(encoded(np.zeros((20, 20), np.uint8))),
         "input 'image' row 0: the image is 20x20 = 400 pixels, over the limit of 100 (option max_pixels)"),
    ]  # fmt: skip
    async with serving(repo) as stub:
        for model, rows, message in cases:
            error = await rpc_error(stub, request(model, image=rows))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (message, error.details())
            assert message in (error.details() or ""), (message, error.details())
        # The public signature is checked before the plugin runs: pixels are not pictures.
        error = await rpc_error(stub, request("pictures", image=np.zeros((1, 4, 5, 3), np.uint8)))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "input 'image': expected BYTES [-1], got UINT8 [1, 4, 5, 3]" in (error.details() or "")
        # The model still answers after all of that.
        np.testing.assert_array_equal((await predict(stub, "pictures", good))[0], PICTURES[0])


async def test_missing_pillow_fails_the_model_and_names_the_extra(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "PIL", None)  # `from PIL import Image` now fails as if not installed
    add(repo, "pictures", identity_model(TensorProto.UINT8, ["N", 4, 5, 3]), preprocess(""))
    save(add_model(1.0), repo / "plain" / "1" / "model.onnx")
    async with serving(repo) as stub:
        health = await statuses(stub)
        assert health["plain"].state == pb.MODEL_STATE_READY
        failed = health["pictures"]
        assert failed.state == pb.MODEL_STATE_FAILED
        assert (
            "preprocess[0] ('image'): the image preprocessor needs Pillow: pip install 'sluice-serving[image]'"
            in failed.reason
        )
        error = await rpc_error(stub, request("pictures", image=images(b"")))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "pip install 'sluice-serving[image]'" in (error.details() or "")


async def test_bad_options_fail_the_model_with_plugin_field_and_reason(repo: Path) -> None:
    f32 = TensorProto.FLOAT
    pair = helper.make_model(
        helper.make_graph(
            [helper.make_node("Add", ["a", "b"], ["y"])],
            "pair",
            [helper.make_tensor_value_info(n, f32, ["N", 3, 4, 5]) for n in ("a", "b")],
            [helper.make_tensor_value_info("y", f32, ["N", 3, 4, 5])],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    nchw = identity_model(f32, ["N", 3, 4, 5])
    cases = {
        "unknown_key": (nchw, preprocess('colur = "rgb"'),
                        ["preprocess[0] ('image')", "field 'colur': Extra inputs are not permitted"]),
        "wrong_type": (nchw, preprocess('size = "big"'), ["preprocess[0] ('image')", "field 'size'", "'big'"]),
        "zero_std": (nchw, preprocess("std = [0.5, 0.0, 0.5]"), ["field 'std'", "every std must be above 0"]),
        "bad_layout": (nchw, preprocess('layout = "CHW"'), ["field 'layout'", "'NCHW', 'NHWC', 'NHW' or 'flat'"]),
        "bad_format": (nchw, preprocess('formats = ["PNG", "XYZ"]'),
                       ["preprocess[0] ('image'): formats: Pillow cannot read XYZ"]),
        "which_input": (pair, preprocess(""),
                        ["image preprocessor: found 2 inputs", "set `feeds` to one of 'a' (FP32 [-1, 3, 4, 5]), 'b'"]),
        "no_such_input": (pair, preprocess('feeds = "c"'),
                          ["image preprocessor: feeds = 'c': there is no input of that name; the inputs are 'a'"]),
        "not_square": (identity_model(f32, ["N", 63]), preprocess(""),
                       ["model input 'x' (FP32 [-1, 63]): its rows are not a square picture; set `size"]),
        "wrong_size": (nchw, preprocess("size = [8, 8]"),
                       ["8x8 colour pixels in layout NCHW make [-1, 3, 8, 8], which it does not take"]),
        "mean_for_grey": (identity_model(f32, ["N", 1, 4, 5]), preprocess("mean = [0.1, 0.2, 0.3]"),
                          ["`mean` has 3 values for 1 channel(s)"]),
        "four_channels": (identity_model(f32, ["N", 4, 5, 4]), preprocess('layout = "NHWC"'),
                          ["has 4 channels; the image preprocessor gives 1 (grey) or 3 (rgb, bgr)"]),
        "bad_warmup": (nchw, preprocess("") + 'warmup = [{ image = { file = "notes.txt" } }]\n',
                       ["warmup[0]: input 'image' row 0: not a PNG or JPEG image (cannot identify image file)"]),
    }  # fmt: skip
    for name, (model, config, _) in cases.items():
        add(repo, name, model, config)
    (repo / "bad_warmup" / "notes.txt").write_text("not a picture", encoding="utf-8")
    async with serving(repo) as stub:
        health = await statuses(stub)
        for name, (_, _, fragments) in cases.items():
            status = health[name]
            assert status.state == pb.MODEL_STATE_FAILED, name
            for fragment in fragments:
                assert fragment in status.reason, (name, status.reason)
