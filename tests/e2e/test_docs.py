"""The README's and docs' promises: every shell and Python block runs as written, against a real server.

A block is run unless the line before it is `<!-- illustrative: REASON -->`. A block marked
`<!-- server: ... -->` is started in the background (on a fresh port) and the blocks after it talk to it;
on a page without one, the blocks talk to a server of the bundled repository. `127.0.0.1:8001` in a block
becomes the server's address, and SLUICE_TARGET points the `sluice` command at it. A `text` block right
after a block lists lines its output must contain. Each page runs in a directory of its own that links to
the checkout's files, so what the commands write (images.npy, models/) stays out of the checkout.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sluice.server.app import SluiceServer
from sluice.server.reference import BEGIN, END, render
from sluice.server.settings import ServerSettings
from support import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = {"sh", "bash", "shell", "console"}
PYTHON = {"python", "py"}
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)
MARK = re.compile(r"<!-- (illustrative|server): (.+?) -->")


@dataclass(frozen=True)
class Block:
    """One fenced block of a page, with what the page says about it."""

    where: str
    lang: str
    code: str
    mark: str  # "", "illustrative" or "server"
    output: tuple[str, ...]  # lines the `text` block after it promises


def blocks(page: Path) -> list[Block]:
    text = page.read_text(encoding="utf-8")
    fences = list(FENCE.finditer(text))
    found = []
    for i, fence in enumerate(fences):
        previous = text[: fence.start()].rstrip("\n").rsplit("\n", 1)[-1]
        mark = MARK.fullmatch(previous.strip())
        following = fences[i + 1] if i + 1 < len(fences) else None
        output: tuple[str, ...] = ()
        if (
            following is not None
            and following.group(1) == "text"
            and not text[fence.end() : following.start()].strip()
        ):
            output = tuple(line.strip() for line in following.group(2).splitlines() if line.strip())
        line = text.count("\n", 0, fence.start()) + 1
        where = f"{page.relative_to(ROOT)}:{line}"
        found.append(Block(where, fence.group(1), fence.group(2), mark.group(1) if mark else "", output))
    return found


def runnable(page: Path) -> list[Block]:
    return [b for b in blocks(page) if b.lang in SHELL | PYTHON and b.mark != "illustrative"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def workdir(tmp_path: Path) -> Path:
    """A directory that looks like the checkout (links to its files) but keeps what commands write."""
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in (".git", "models"):
            (checkout / entry.name).symlink_to(entry)
    return checkout


def environment(address: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    return {**env, "SLUICE_TARGET": address}


async def run_block(block: Block, cwd: Path, address: str, http: str = "127.0.0.1:8000") -> str:
    code = block.code.replace("127.0.0.1:8001", address)
    for default in ("127.0.0.1:8000", "localhost:8000"):  # the REST port (KServe v2 over HTTP)
        code = code.replace(default, http)
    command = [sys.executable, "-c", code] if block.lang in PYTHON else ["sh", "-e", "-c", code]
    proc = await asyncio.create_subprocess_exec(
        *command, cwd=cwd, env=environment(address),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, f"{block.where} failed:\n{out.decode()}\n{err.decode()}"
    return out.decode()


async def until_serving(address: str) -> None:
    """Waits, through the standard health Watch, until every model has loaded."""
    async with grpc.aio.insecure_channel(address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        async for answer in watch:
            if answer.status == health_pb2.HealthCheckResponse.SERVING:
                watch.cancel()
                return


@asynccontextmanager
async def background(block: Block, cwd: Path) -> AsyncIterator[str]:
    """The block's server, on a fresh port; stopped as Ctrl-C would, and it must exit 0."""
    (command,) = block.code.strip().splitlines()
    port = free_port()
    env = {**environment(""), "SLUICE_PORT": str(port), "SLUICE_METRICS_PORT": "0", "SLUICE_HTTP_PORT": "0"}
    proc = await asyncio.create_subprocess_exec(
        "sh", "-c", f"exec {command}", cwd=cwd, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        first = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert first.decode().strip() == f"listening on 127.0.0.1:{port}", f"{block.where}: {first!r}"
        address = f"127.0.0.1:{port}"
        await asyncio.wait_for(until_serving(address), 60)
        yield address
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, f"{block.where} exited {proc.returncode}:\n{err.decode()}"


def test_configuration_reference_is_current() -> None:
    start, end = README.index(BEGIN), README.index(END) + len(END)
    assert README[start:end] == render(), "run `python -m sluice.server.reference --write README.md`"


@pytest.mark.parametrize("page", [p for p in PAGES if runnable(p)], ids=lambda p: str(p.relative_to(ROOT)))
async def test_every_command_block_works_as_written(page: Path, tmp_path: Path) -> None:
    cwd = workdir(tmp_path)
    async with AsyncExitStack() as stack:
        address = ""
        http = f"127.0.0.1:{free_port()}"
        todo = runnable(page)
        if not any(block.mark == "server" for block in todo):
            settings = ServerSettings(
                port=0, metrics_port=-1, http_port=int(http.split(":")[1]), grace_period_s=5
            )
            server = SluiceServer(settings)
            await server.start()
            stack.push_async_callback(server.stop, 0)
            await server.loaded()
            address = server.address
        for block in todo:
            if block.mark == "server":
                address = await stack.enter_async_context(background(block, cwd))
                continue
            out = await run_block(block, cwd, address, http)
            lines = [line.strip() for line in out.splitlines()]
            missing = [line for line in block.output if line not in lines]
            assert not missing, f"{block.where}: output lacks {missing}; it was:\n{out}"


async def test_make_serve_serves_the_bundled_models(tmp_path: Path) -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    up_to_date = await asyncio.create_subprocess_exec("make", "-q", ".venv/bin/.installed", cwd=ROOT)
    if await up_to_date.wait() != 0:
        pytest.skip("make serve would reinstall .venv first; run `make .venv/bin/.installed`")
    port = free_port()
    env = {**environment(""), "SLUICE_PORT": str(port), "SLUICE_METRICS_PORT": "0", "SLUICE_HTTP_PORT": "0"}
    proc = await asyncio.create_subprocess_exec(
        "make", "--no-print-directory", "-s", "serve", cwd=ROOT, env=env, start_new_session=True,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        first = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert first.decode().strip() == f"listening on 127.0.0.1:{port}"
        await asyncio.wait_for(until_serving(f"127.0.0.1:{port}"), 60)
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal reaches make and the server alike
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert "sluice.server: stopped" in err.decode()
