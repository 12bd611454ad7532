"""The curl examples of docs/kserve.md work: each is run against a real server and its answer checked."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from collections.abc import AsyncIterator

import pytest

from sluice.server.app import SluiceServer
from sluice.server.settings import ServerSettings
from support import ROOT

DOC = (ROOT / "docs" / "kserve.md").read_text(encoding="utf-8")
# A ```sh block that runs curl, then the block that shows its answer (```json compared as JSON).
EXAMPLES = re.findall(r"```sh\n(curl .*?)```\n\n```(json|text)\n(.*?)```", DOC, flags=re.S)


@pytest.fixture
async def server() -> AsyncIterator[SluiceServer]:
    srv = SluiceServer(ServerSettings(port=0, http_port=0, metrics_port=-1))
    await srv.start()
    try:
        await srv.loaded()
        yield srv
    finally:
        await srv.stop(0)


def test_the_doc_has_its_examples() -> None:
    assert len(EXAMPLES) == 4  # health, metadata, infer, an error


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
@pytest.mark.parametrize(
    ("command", "kind", "expected"), EXAMPLES, ids=["health", "metadata", "infer", "error"]
)
async def test_curl_example(server: SluiceServer, command: str, kind: str, expected: str) -> None:
    command = command.replace("localhost:8000", f"127.0.0.1:{server.http_port}")
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    if kind == "json":
        assert json.loads(out) == json.loads(expected)
    else:
        assert out.decode().strip() == expected.strip()
