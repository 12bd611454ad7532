"""The `image` preprocessor: callers send encoded pictures, the model gets the pixel tensor it was trained on.

Each row of the public input is one PNG or JPEG file (BYTES), or its base64 text (STRING), as Analytics Zoo
Cluster Serving accepts. Every picture is decoded with Pillow, composited onto a background when it has
transparency, converted to grey or RGB/BGR, resized, scaled and normalised per channel, and laid out as the
model input wants it (NCHW, NHWC, NHW or flat rows)::

    [[preprocess]]
    name = "image"                    # an ImageNet classifier taking FP32 [-1, 3, 224, 224]
    mean = [0.485, 0.456, 0.406]
    std = [0.229, 0.224, 0.225]

Most options default to what the model input's spec says (its layout, channel count, size and dtype), so a
config names only what the spec cannot tell. Pillow is the optional extra `sluice-serving[image]`.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, field_validator

from sluice.server.builtin_plugins._specs import choose
from sluice.server.plugins import Arrays, LoadError, PluginContext, PluginError, TensorSpec
from sluice.v1 import inference_pb2 as pb

if TYPE_CHECKING:
    from PIL import Image as PILImage

PLUGIN = "image preprocessor"
Layout = Literal["NCHW", "NHWC", "NHW", "flat"]
Colour = Literal["grey", "rgb", "bgr"]
Resample = Literal["nearest", "box", "bilinear", "hamming", "bicubic", "lanczos"]
_RANKS: dict[str, int] = {"NCHW": 4, "NHWC": 4, "NHW": 3, "flat": 2}


class ImageOptions(BaseModel):
    """Options of the `image` preprocessor; unset ones are read from the model input's spec."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: str = Field(
        default="image",
        min_length=1,
        description="Name of the input callers send: BYTES [-1], one PNG or JPEG file per row; STRING rows "
        "are read as base64 text (a data: URL too).",
    )
    feeds: str | None = Field(
        default=None,
        min_length=1,
        description="Input of the next step (the model's) that receives the pixels; unset: its only input.",
    )
    size: tuple[int, int] | None = Field(
        default=None,
        description="[height, width] every picture is resized to (a single number: a square); unset: the "
        "model input's fixed dimensions (for flat rows, the square that fits them).",
    )
    fit: Literal["stretch", "crop"] = Field(
        default="stretch",
        description="stretch: resize to `size`, whatever the aspect ratio; crop: scale to cover `size` and "
        "cut the centre out, keeping the aspect ratio.",
    )
    resample: Resample = Field(
        default="bilinear",
        description="Pillow's resampling filter; box averages areas (best to shrink by whole factors).",
    )
    layout: Layout | None = Field(
        default=None,
        description="NCHW, NHWC, NHW (grey, no channel axis) or flat ([N, H*W*C], rows of HWC pixels); "
        "unset: from the model input's rank and which axis has 1 or 3 entries.",
    )
    colour: Colour | None = Field(
        default=None,
        description="grey (Pillow's ITU-R 601-2 luma), rgb or bgr; unset: from the model input's channel "
        "count (1: grey, 3: rgb; rgb when it cannot be told).",
    )
    invert: bool = Field(
        default=False,
        description="Use 255 - value: dark-on-light pictures for a model trained on light-on-dark ones.",
    )
    background: int = Field(
        default=255,
        ge=0,
        le=255,
        description="Grey level (0..255) transparent pixels are composited onto, before `invert`.",
    )
    scale: float | None = Field(
        default=None,
        gt=0,
        description="Multiplies the 0..255 pixel values; unset: 1/255 for a floating-point model input "
        "(values 0..1), 1 for an integer one.",
    )
    mean: float | list[float] = Field(
        default=0.0,
        description="Subtracted after `scale`: one value, or one per channel in the order the model gets "
        "them (B, G, R for bgr).",
    )
    std: float | list[float] = Field(
        default=1.0, description="Divides after `mean`: one value, or one per channel; each above 0."
    )
    max_pixels: int = Field(
        default=4096 * 4096,
        gt=0,
        description="Largest picture (width x height) accepted, checked before decoding so a small file "
        "cannot expand to gigabytes; Pillow's own limit (Image.MAX_IMAGE_PIXELS) applies too.",
    )
    formats: list[str] = Field(
        default=["PNG", "JPEG"],
        min_length=1,
        description="Pillow formats accepted (WEBP, GIF, BMP, TIFF...); fewer formats, fewer parsers "
        "exposed to callers.",
    )

    @field_validator("size", mode="before")
    @classmethod
    def _square(cls, value: Any) -> Any:
        return (value, value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("size")
    @classmethod
    def _positive(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None and min(value) < 1:
            raise ValueError("height and width must be at least 1")
        return value

    @field_validator("mean", "std")
    @classmethod
    def _per_channel(cls, value: float | list[float]) -> float | list[float]:
        if isinstance(value, list) and len(value) not in (1, 3):
            raise ValueError(f"expected one value, or one per channel (3); got {len(value)}")
        return value

    @field_validator("std")
    @classmethod
    def _above_zero(cls, value: float | list[float]) -> float | list[float]:
        values = value if isinstance(value, list) else [value]
        if any(not v > 0 for v in values):
            raise ValueError("every std must be above 0")
        return value

    @field_validator("formats")
    @classmethod
    def _upper(cls, value: list[str]) -> list[str]:
        return [name.upper() for name in value]


@dataclass(frozen=True, slots=True)
class _Plan:
    """What every request does, worked out once from the options and the model input's spec."""

    feeds: str
    height: int
    width: int
    channels: int
    layout: str
    bgr: bool
    dtype: np.dtype[Any]
    gain: npt.NDArray[np.float32]
    """Per channel: value = pixel * gain + offset folds invert, scale, mean and std into one step."""
    offset: npt.NDArray[np.float32]


class Image:
    """The `image` preprocessor."""

    Options = ImageOptions

    def __init__(self, options: ImageOptions, context: PluginContext) -> None:
        try:
            from PIL import Image as PILImage
            from PIL import ImageOps
        except ImportError:
            raise LoadError(
                "the image preprocessor needs Pillow: pip install 'sluice-serving[image]'"
            ) from None
        self.options = options
        self._pil = pil = PILImage
        self._ops = ImageOps
        pil.init()
        unknown = [name for name in options.formats if name not in pil.OPEN]
        if unknown:
            raise LoadError(
                f"formats: Pillow cannot read {', '.join(unknown)}; it reads {', '.join(sorted(pil.OPEN))}"
            )
        self._formats = list(options.formats)
        names = options.formats
        self._kinds = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
        self._resample = pil.Resampling[options.resample.upper()]
        self._plan: _Plan | None = None

    def signature(self, downstream: Sequence[TensorSpec]) -> list[TensorSpec]:
        target = choose(downstream, self.options.feeds, plugin=PLUGIN, option="feeds", kind="input")
        self._plan = _plan(self.options, target)
        public = TensorSpec(self.options.input, pb.DATA_TYPE_BYTES, target.shape[:1])
        specs = []
        for spec in downstream:
            if spec is target:
                specs.append(public)
            elif spec.name == public.name:
                raise LoadError(
                    f"{PLUGIN}: input = '{public.name}' would hide the next step's own input of that name; "
                    "choose another name"
                )
            else:
                specs.append(spec)
        return specs

    def __call__(self, inputs: Arrays) -> Arrays:
        plan = self._plan
        if plan is None:
            raise RuntimeError("the image preprocessor was called before signature()")
        out = dict(inputs)
        rows = out.pop(self.options.input)
        pixels = np.stack([self._decode(value, row) for row, value in enumerate(rows)])
        if plan.channels == 1:
            pixels = pixels[..., np.newaxis]
        elif plan.bgr:
            pixels = pixels[..., ::-1]
        values = pixels.astype(np.float32) * plan.gain + plan.offset
        if plan.layout == "NCHW":
            values = np.ascontiguousarray(values.transpose(0, 3, 1, 2))
        elif plan.layout == "NHW":
            values = values[..., 0]
        elif plan.layout == "flat":
            values = values.reshape(len(values), -1)
        out[plan.feeds] = _cast(values, plan.dtype)
        return out

    def _decode(self, value: Any, row: int) -> npt.NDArray[np.uint8]:
        """One picture as uint8 [H, W] (grey) or [H, W, 3] (RGB), at the planned size."""
        assert self._plan is not None
        plan, options, pil = self._plan, self.options, self._pil
        what = f"input '{options.input}' row {row}"
        data = _from_base64(value, what) if isinstance(value, str) else value
        try:
            image = pil.open(io.BytesIO(data), formats=self._formats)
        except pil.UnidentifiedImageError:
            raise PluginError(f"{what}: not a {self._kinds} image (cannot identify image file)") from None
        except (pil.DecompressionBombError, pil.DecompressionBombWarning) as exc:
            # Pillow refuses (or, where warnings are errors, warns about) a huge size before decoding.
            raise PluginError(f"{what}: the image is too large to decode: {_reason(exc)}") from None
        except Exception as exc:
            raise PluginError(f"{what}: not a {self._kinds} image ({_reason(exc)})") from None
        with image:
            width, height = image.size
            if width * height > options.max_pixels:
                raise PluginError(
                    f"{what}: the image is {width}x{height} = {width * height} pixels, over the limit of "
                    f"{options.max_pixels} (option max_pixels)"
                )
            try:
                return np.asarray(self._convert(image, plan))
            except MemoryError:
                raise
            except Exception as exc:
                raise PluginError(f"{what}: cannot decode this {image.format} ({_reason(exc)})") from None

    def _convert(self, image: PILImage.Image, plan: _Plan) -> PILImage.Image:
        pil = self._pil
        mode = "L" if plan.channels == 1 else "RGB"
        if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
            shade = self.options.background
            image = pil.alpha_composite(
                pil.new("RGBA", image.size, (shade, shade, shade, 255)), image.convert("RGBA")
            )
        if image.mode != mode:
            image = image.convert(mode)
        size = (plan.width, plan.height)
        if self.options.fit == "crop":
            return self._ops.fit(image, size, method=self._resample)
        if image.size != size:
            return image.resize(size, self._resample)
        image.load()
        return image


def _plan(options: ImageOptions, target: TensorSpec) -> _Plan:
    """Layout, channels, size and arithmetic from the options, with the gaps filled from the model input."""
    where = f"{PLUGIN}: model input '{target.name}' ({target.describe()})"
    if target.dtype is None or target.dtype.kind not in "iuf":
        raise LoadError(f"{where}: takes no pixel values; set `feeds` to a numeric input")
    shape = target.shape
    layout = options.layout or _layout(shape, where)
    if len(shape) != _RANKS[layout]:
        raise LoadError(f"{where}: layout {layout} needs a rank-{_RANKS[layout]} input")
    channels = _channels(options.colour, layout, shape, options.size, where)
    if options.size is not None:
        height, width = options.size
    elif layout == "flat":
        height = width = _square(shape[1], channels, where)
    else:
        height, width = (shape[2], shape[3]) if layout == "NCHW" else (shape[1], shape[2])
        if height == -1 or width == -1:
            raise LoadError(f"{where}: has no fixed height and width; set `size = [height, width]`")
    given = {
        "NCHW": (channels, height, width),
        "NHWC": (height, width, channels),
        "NHW": (height, width),
        "flat": (height * width * channels,),
    }[layout]
    if any(want not in (-1, got) for want, got in zip(shape[1:], given, strict=True)):
        raise LoadError(
            f"{where}: {height}x{width} {'grey' if channels == 1 else 'colour'} pixels in layout {layout} "
            f"make [-1, {', '.join(map(str, given))}], which it does not take"
        )
    scale = options.scale
    if scale is None:
        scale = 1 / 255 if target.dtype.kind == "f" else 1.0
    mean = _per_channel(options.mean, channels, "mean", where)
    std = _per_channel(options.std, channels, "std", where)
    gain = scale / std
    offset = -mean / std
    if options.invert:  # (255 - p) * gain + offset
        offset = offset + 255 * gain
        gain = -gain
    return _Plan(
        feeds=target.name,
        height=height,
        width=width,
        channels=channels,
        layout=layout,
        bgr=options.colour == "bgr",
        dtype=target.dtype,
        gain=gain.astype(np.float32),
        offset=offset.astype(np.float32),
    )


def _layout(shape: tuple[int, ...], where: str) -> Layout:
    if len(shape) == 2:
        return "flat"
    if len(shape) == 3:
        return "NHW"
    if len(shape) == 4:
        first, last = shape[1] in (1, 3), shape[3] in (1, 3)
        if first != last:
            return "NCHW" if first else "NHWC"
        raise LoadError(f"{where}: cannot tell NCHW from NHWC; set `layout`")
    raise LoadError(f"{where}: expected a rank 2 (flat), 3 (NHW) or 4 (NCHW, NHWC) input")


def _channels(
    colour: Colour | None, layout: str, shape: tuple[int, ...], size: tuple[int, int] | None, where: str
) -> int:
    """1 for grey, 3 for colour: the option when given, else what the model input's spec implies."""
    wanted = None if colour is None else (1 if colour == "grey" else 3)
    if layout == "NHW":
        if wanted == 3:
            raise LoadError(f"{where}: layout NHW has no channel axis, so colour must be grey")
        return 1
    if layout == "flat":
        if wanted is not None or shape[1] == -1:
            return wanted or 3
        if size is not None:
            found = shape[1] // (size[0] * size[1]) if shape[1] % (size[0] * size[1]) == 0 else 0
            return found if found in (1, 3) else 1  # a mismatch is reported with the whole shape
        return 1 if math.isqrt(shape[1]) ** 2 == shape[1] else 3
    dim = shape[1] if layout == "NCHW" else shape[3]
    if dim not in (-1, 1, 3):
        raise LoadError(f"{where}: has {dim} channels; the image preprocessor gives 1 (grey) or 3 (rgb, bgr)")
    if wanted is not None:
        if dim not in (-1, wanted):
            raise LoadError(f"{where}: has {dim} channel(s), but colour '{colour}' gives {wanted}")
        return wanted
    return 1 if dim == 1 else 3


def _square(values: int, channels: int, where: str) -> int:
    pixels, extra = divmod(values, channels) if values > 0 else (0, 1)
    side = math.isqrt(pixels)
    if extra or side * side != pixels:
        raise LoadError(f"{where}: its rows are not a square picture; set `size = [height, width]`")
    return side


def _per_channel(value: float | list[float], channels: int, name: str, where: str) -> npt.NDArray[np.float64]:
    values = np.asarray(value if isinstance(value, list) else [value], dtype=np.float64)
    if len(values) not in (1, channels):
        raise LoadError(f"{where}: `{name}` has {len(values)} values for {channels} channel(s)")
    return values


def _cast(values: npt.NDArray[np.float32], dtype: np.dtype[Any]) -> npt.NDArray[Any]:
    if dtype.kind == "f":
        return values.astype(dtype, copy=False)
    info = np.iinfo(dtype)
    return np.clip(np.rint(values), info.min, info.max).astype(dtype)


def _from_base64(text: str, what: str) -> bytes:
    """Standard or URL-safe base64, padded or not, with line breaks or not, or a data: URL holding it."""
    if text.startswith("data:"):
        head, comma, text = text.partition(",")
        if not comma or not head.endswith(";base64"):
            raise PluginError(f"{what}: a data: URL must hold base64 (data:image/png;base64,...)")
    text = "".join(text.split()).translate(_URL_SAFE)
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as exc:  # binascii.Error is a ValueError
        raise PluginError(f"{what}: not base64 text ({exc})") from None


_URL_SAFE = str.maketrans("-_", "+/")


def _reason(exc: Exception) -> str:
    return str(exc) or type(exc).__name__
