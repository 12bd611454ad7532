"""Triton's classification extension: the ranking and the strings, as Triton's clients read them."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest

from sluice.server.classification import LOOP_MAX_VALUES, class_count, classify, rank_outputs
from sluice.server.errors import Code, SluiceError


def test_each_batch_item_ranks_its_own_values_best_first() -> None:
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]], dtype=np.float32)
    got = classify("probabilities", scores, 2, batched=True)
    assert got.shape == (2, 2)
    # Floats print as C++'s std::to_string (six decimals); among equal values the lower index comes first.
    assert got.tolist() == [["0.700000:1", "0.200000:2"], ["0.500000:0", "0.250000:1"]]


def test_integers_unsigned_and_booleans_print_as_numbers() -> None:
    assert classify("y", np.array([1, 5, 10, 4]), 2, batched=False).tolist() == ["10:2", "5:1"]
    assert classify("y", np.array([[3, 250, 7]], dtype=np.uint8), 3, batched=True).tolist() == [
        ["250:1", "7:2", "3:0"]
    ]
    assert classify("y", np.array([False, True]), 1, batched=False).tolist() == ["1:1"]


def test_a_batch_item_of_several_axes_is_ranked_whole_and_nan_comes_last() -> None:
    x = np.array([[[1.0, np.nan], [3.0, 2.0]]])  # one item, 2x2: flat indexes 0..3
    assert classify("y", x, 4, batched=True).tolist() == [["3.000000:2", "2.000000:3", "1.000000:0", "nan:1"]]


def test_asking_for_more_classes_than_there_are_gives_them_all() -> None:
    assert classify("y", np.array([[2.0, 1.0]]), 5, batched=True).shape == (1, 2)


def test_strings_and_bad_counts_are_the_callers_mistake() -> None:
    with pytest.raises(SluiceError) as strings:
        classify("text", np.array(["a", "b"], dtype=object), 1, batched=False)
    assert strings.value.code == Code.INVALID_ARGUMENT
    assert "output 'text': parameter 'classification' ranks numbers, and this output holds strings" in (
        strings.value.message
    )
    for bad in (0, -3, True, 2.5, "3"):
        with pytest.raises(SluiceError) as count:
            class_count("probabilities", bad)
        assert count.value.code == Code.INVALID_ARGUMENT
        assert "output 'probabilities': parameter 'classification' must be a positive integer" in (
            count.value.message
        )
    assert class_count("probabilities", 3) == 3


def test_labels_end_the_strings_of_the_classes_they_name() -> None:
    scores = np.array([[0.1, 0.7, 0.2]], dtype=np.float32)
    got = classify("probabilities", scores, 3, batched=True, labels=["cat", "dog"])
    # Class 2 has no line in the labels file: its string has no label.
    assert got.tolist() == [["0.700000:1:dog", "0.200000:2", "0.100000:0:cat"]]


def test_the_lowest_signed_integer_ranks_last() -> None:
    # -x wraps at a signed type's minimum (-(-128) is -128 in INT8): it must not rank first.
    assert classify("y", np.array([-128, 5, 0], dtype=np.int8), 3, batched=False).tolist() == [
        "5:1",
        "0:2",
        "-128:0",
    ]
    lowest = np.iinfo(np.int64).min
    assert classify("y", np.array([[lowest, -1]]), 1, batched=True).tolist() == [["-1:1"]]


def test_a_large_output_is_ranked_as_a_full_sort_would() -> None:
    rng = np.random.default_rng(7)
    for dtype in (np.float32, np.int16, np.uint8):
        x = rng.integers(0, 50, size=(3, 5000)).astype(dtype)  # many ties
        got = classify("y", x, 7, batched=True)
        for row, ranked in zip(x, got, strict=True):
            order = sorted(range(len(row)), key=lambda i: (-float(row[i]), i))[:7]
            assert [int(item.split(":")[1]) for item in ranked] == order


def test_nan_comes_last_even_when_it_is_asked_for() -> None:
    x = np.array([np.nan, 1.0, np.nan, 2.0])
    assert classify("y", x, 3, batched=False).tolist() == ["2.000000:3", "1.000000:1", "nan:0"]


def test_an_empty_label_is_no_label() -> None:
    got = classify("y", np.array([1.0, 2.0]), 2, batched=False, labels=["", "two"])
    assert got.tolist() == ["2.000000:1:two", "1.000000:0"]


async def test_a_big_output_is_ranked_while_the_event_loop_goes_on() -> None:
    # Ranking costs about 30 ns a value: a segmentation map of millions would stop every other caller.
    servable = SimpleNamespace(
        model=SimpleNamespace(max_batch_size=8), labels={}, runner=SimpleNamespace(spin=None)
    )
    small = np.arange(8, dtype=np.float32).reshape(2, 4)
    big = np.random.default_rng(3).random((2, LOOP_MAX_VALUES), dtype=np.float32)
    passes = 0
    ranking = True

    async def loop_passes() -> None:
        nonlocal passes
        while ranking:
            passes += 1
            await asyncio.sleep(0)

    counter = asyncio.create_task(loop_passes())
    try:
        await asyncio.sleep(0)
        before = passes
        outputs = [("s", small), ("b", big), ("other", small)]
        got = await rank_outputs(servable, outputs, {"s": 1, "b": 2})  # type: ignore[arg-type]
        during = passes - before
    finally:
        ranking = False
        await counter
    assert during > 0  # the loop ran other work while the big output was ranked
    assert [name for name, _ in got] == ["s", "b", "other"]
    assert got[0][1].tolist() == [["3.000000:3"], ["7.000000:3"]]
    for row, ranked in zip(big, got[1][1], strict=True):
        best = np.argsort(-row, kind="stable")[:2]
        assert [int(item.split(":")[1]) for item in ranked] == best.tolist()
    assert got[2][1] is small  # not asked for as a classification: untouched
