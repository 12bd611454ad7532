"""Sparse COO inputs: densified for models that take dense arrays, delivered as COO to steps that ask for it."""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest

from sluice.v1 import inference_pb2 as pb
from sluice.v1 import inference_pb2_grpc as pb_grpc
from support import outputs, serving_stub, tensor

WIDTH = 50_000_000  # 200 MB dense in FP32: only a COO input can take a row this wide

CONFIG = """
[runtime]
name = "python"
inputs = [{{ name = "features", datatype = "FP32", shape = [-1, {width}], sparse = true }}]
outputs = [
    {{ name = "nnz", datatype = "INT64", shape = [-1] }},
    {{ name = "total", datatype = "FP32", shape = [-1] }},
    {{ name = "rows", datatype = "INT64", shape = [-1] }},
]

[batching]
max_batch_size = 3
max_delay_ms = 10000
policy = "fixed"
"""

MODEL = """
import numpy as np

from sluice.batcher import CooArray


class Model:
    def predict(self, batch):
        coo = batch["features"]
        assert isinstance(coo, CooArray), type(coo)
        rows = coo.shape[0]
        row = coo.indices[:, 0]
        return {
            "nnz": np.bincount(row, minlength=rows).astype(np.int64),
            "total": np.bincount(row, weights=coo.values, minlength=rows).astype(np.float32),
            "rows": np.full(rows, rows, dtype=np.int64),
        }
"""


def sparse_tensor(
    name: str, shape: tuple[int, ...], indices: list[list[int]], values: list[float]
) -> pb.Tensor:
    return pb.Tensor(
        name=name,
        datatype=pb.DATA_TYPE_FP32,
        shape=shape,
        sparse=pb.SparseContents(
            indices=np.asarray(indices, dtype="<i8").tobytes(),
            values=np.asarray(values, dtype="<f4").tobytes(),
        ),
    )


@asynccontextmanager
async def serving(repo: Path, width: int = WIDTH) -> AsyncIterator[pb_grpc.InferenceStub]:
    version = repo / "bag" / "1"
    version.mkdir(parents=True)
    (repo / "bag" / "config.toml").write_text(CONFIG.format(width=width))
    (version / "model.py").write_text(textwrap.dedent(MODEL))
    async with serving_stub(repo) as stub:
        yield stub


async def test_coo_requests_batch_without_being_densified(repo: Path) -> None:
    async with serving(repo) as stub:
        health = await stub.Health(pb.HealthRequest(model="bag"))
        (spec,) = health.models[0].versions[0].inputs
        assert (spec.name, list(spec.shape)) == ("features", [-1, WIDTH])
        one = sparse_tensor("features", (1, WIDTH), [[0, 7], [0, WIDTH - 1]], [1.5, 2.0])
        two = sparse_tensor("features", (2, WIDTH), [[1, 3]], [4.0])
        first, second = await asyncio.gather(
            stub.Predict(pb.PredictRequest(model="bag", id="a", inputs=[one])),
            stub.Predict(pb.PredictRequest(model="bag", id="b", inputs=[two])),
        )
    a, b = outputs(first), outputs(second)
    assert a["rows"].tolist() == [3]
    assert b["rows"].tolist() == [3, 3]
    assert a["nnz"].tolist() == [2]
    assert a["total"].tolist() == [3.5]
    assert b["nnz"].tolist() == [0, 1]
    assert b["total"].tolist() == [0.0, 4.0]


async def test_a_dense_request_reaches_a_coo_step_as_coo(repo: Path) -> None:
    async with serving(repo, width=4) as stub:
        dense = np.array([[0, 0, 5, 0], [1, 0, 0, 2], [0, 0, 0, 0]], dtype=np.float32)  # a full batch
        response = await stub.Predict(pb.PredictRequest(model="bag", inputs=[tensor("features", dense)]))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Predict(pb.PredictRequest(model="bag", inputs=[tensor("features", dense[:, :3])]))
    got = outputs(response)
    assert got["nnz"].tolist() == [1, 2, 0]  # zeros were dropped
    assert got["total"].tolist() == [5.0, 3.0, 0.0]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "expected FP32 [-1, 4] (sparse), got FP32 [3, 3]" in (info.value.details() or "")


async def test_coo_indices_are_checked(repo: Path) -> None:
    async with serving(repo) as stub:
        bad = sparse_tensor("features", (1, WIDTH), [[0, WIDTH]], [1.0])
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Predict(pb.PredictRequest(model="bag", inputs=[bad]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"sparse index [0, {WIDTH}] (non-zero 0) lies outside the dense shape [1, {WIDTH}]" in (
        info.value.details() or ""
    )
