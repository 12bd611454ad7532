"""The wire codec against bytes written by hand, so a mistake made the same way on both sides cannot pass."""

from __future__ import annotations

import numpy as np
import pytest

from sluice.clients.codec import to_array, to_tensor
from sluice.v1 import inference_pb2 as pb
from sluice.wire import WireError, datatype_of, decode, decode_strings, encode, encode_strings

# Two STRING elements, "hi" and "", each a 4-byte little-endian length and its UTF-8 bytes.
HI_EMPTY = b"\x02\x00\x00\x00hi\x00\x00\x00\x00"


def test_strings_are_length_prefixed_little_endian() -> None:
    assert encode_strings(np.array(["hi", ""], dtype=object)) == HI_EMPTY
    assert encode_strings(np.array(["é"], dtype=object)) == b"\x02\x00\x00\x00\xc3\xa9"
    assert encode_strings(np.array([b"\x00\xff"], dtype=object)) == b"\x02\x00\x00\x00\x00\xff"


def test_strings_decode_from_hand_written_bytes() -> None:
    assert decode_strings(HI_EMPTY, 2, "input 't'").tolist() == ["hi", ""]
    assert decode_strings(b"\x01\x00\x00\x00\xff", 1, "input 'b'", text=False).tolist() == [b"\xff"]


def test_numbers_are_little_endian_row_major() -> None:
    array = np.array([[1, 2], [3, 256]], dtype=np.int32)
    assert encode(array) == (pb.DATA_TYPE_INT32, b"\x01\0\0\0\x02\0\0\0\x03\0\0\0\x00\x01\0\0")
    big = array.astype(">i4")
    assert encode(big) == encode(array)
    assert encode(np.array([1.0], dtype=np.float32)) == (pb.DATA_TYPE_FP32, b"\x00\x00\x80\x3f")
    raw = b"\x00\x00\x80\x3f\x00\x00\x00\x40"
    assert decode(raw, pb.DATA_TYPE_FP32, (1, 2), "x").tolist() == [[1.0, 2.0]]


def test_data_types_of_arrays() -> None:
    assert datatype_of(np.array(["a"])) == pb.DATA_TYPE_STRING
    assert datatype_of(np.array([b"a"])) == pb.DATA_TYPE_BYTES
    assert datatype_of(np.array([b"a"], dtype=object)) == pb.DATA_TYPE_BYTES
    assert datatype_of(np.array([True])) == pb.DATA_TYPE_BOOL
    with pytest.raises(TypeError, match="complex128"):
        datatype_of(np.array([1j]))


@pytest.mark.parametrize(
    ("raw", "datatype", "shape", "message"),
    [
        (
            b"\0" * 20,
            pb.DATA_TYPE_FP32,
            (2, 3),
            "input 'x': FP32 [2, 3] needs 24 bytes of raw_contents, got 20",
        ),
        (b"", pb.DATA_TYPE_FP32, (2**62, 2**62), "needs 85070591730234615865843651857942052864 bytes"),
        (b"", pb.DATA_TYPE_FP32, (1, -3), "input 'x': shape dimensions must be >= 0, got [1, -3]"),
        (
            b"\0" * 32,
            pb.DATA_TYPE_BYTES,
            (400_000_000,),
            "input 'x': malformed BYTES contents: 400000000 elements need at least 1600000000 bytes "
            "(a 4-byte length each), got 32",
        ),
        (
            b"",
            pb.DATA_TYPE_STRING,
            (2**63 - 1,),
            "elements need at least 36893488147419103228 bytes",
        ),
        (
            b"\x05\x00\x00\x00hi",
            pb.DATA_TYPE_STRING,
            (1,),
            "input 'x': malformed STRING contents: element 0 declares 5 bytes at byte 4, only 2 remain",
        ),
        (
            HI_EMPTY + b"!",
            pb.DATA_TYPE_STRING,
            (2,),
            "input 'x': malformed STRING contents: 2 elements end at byte 10, got 11 bytes",
        ),
        (b"\x01\x00\x00\x00\xff", pb.DATA_TYPE_STRING, (1,), "input 'x': element 0 is not valid UTF-8 text"),
        (b"", 0, (1,), "input 'x': datatype must be one of BOOL, "),
    ],
    ids=[
        "short",
        "huge-shape",
        "negative",
        "bytes-huge-count",
        "string-2**63",
        "overrun",
        "trailing",
        "utf8",
        "unset",
    ],
)
def test_malformed_tensors_are_refused_before_anything_is_allocated(
    raw: bytes, datatype: int, shape: tuple[int, ...], message: str
) -> None:
    with pytest.raises(WireError) as info:
        decode(raw, datatype, shape, "input 'x'")
    assert message in str(info.value)


def test_the_client_codec_round_trips_through_the_same_layout() -> None:
    tensor = to_tensor("t", np.array([["hi", ""]]))
    assert (tensor.datatype, list(tensor.shape), tensor.raw_contents) == (
        pb.DATA_TYPE_STRING,
        [1, 2],
        HI_EMPTY,
    )
    assert to_array(tensor).tolist() == [["hi", ""]]
    images = to_tensor("b", np.array([b"\x89PNG"], dtype=object))
    assert images.datatype == pb.DATA_TYPE_BYTES
    assert to_array(images).tolist() == [b"\x89PNG"]
