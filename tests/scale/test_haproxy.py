"""Three `sluice serve` replicas behind a load balancer, under 64 callers of the Python client: one replica
killed with SIGKILL, or all restarted one after another with SIGTERM, and no caller sees an error.

Two balancers: HAProxy (deploy/haproxy/haproxy.cfg, HTTP/2 to the replicas, a grpc.health.v1 check), and
gRPC's own client-side `round_robin` over the three addresses. Each call is counted by id and final status.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import runpy
import shutil
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from sluice.clients import AsyncClient, ClientOptions, SluiceError
from stress.harness import Ledger, ServerProcess, bounded, python_model, sluice_serve

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "haproxy"
HAPROXY = shutil.which("haproxy")
needs_haproxy = pytest.mark.skipif(
    HAPROXY is None, reason="needs HAProxy 2.6 or later: apt-get install -y haproxy"
)

REPLICAS = 3
CALLERS = 64
MODEL = "whoami"
ONES = np.ones((1, 4), dtype=np.float32)
PID_OUTPUT = '[{ name = "y", datatype = "FP32", shape = [-1, 1] }]'  # float32 holds any pid exactly
# Longer than HAProxy's check interval x fall (200 ms x 1): the balancer stops sending before a draining
# replica refuses new calls.
DRAIN_DELAY_S = 0.6
# A replica still connected to round_robin callers keeps getting (and refusing) calls until it stops, and
# it waits for quiet up to the grace period: short here, as in-flight calls take 20 ms.
SETTINGS = {"drain_delay_s": DRAIN_DELAY_S, "grace_period_s": 2.0}


def free_port() -> int:
    # A restarted replica must come back on the same port, which HAProxy's config names.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Replicas:
    """Three replicas on fixed ports that a test can kill, stop and start again."""

    def __init__(self, repo: Path, logs: Path) -> None:
        self.repo = repo
        self.logs = logs
        self.ports = [free_port() for _ in range(REPLICAS)]
        self.running: dict[int, tuple[contextlib.ExitStack, ServerProcess]] = {}

    def start(self, slot: int) -> None:
        stack = contextlib.ExitStack()
        log = self.logs / f"replica{slot}-{time.monotonic_ns()}.log"
        settings = {**SETTINGS, "port": self.ports[slot]}
        server = stack.enter_context(sluice_serve(self.repo, log, settings=settings))
        self.running[slot] = (stack, server)

    def server(self, slot: int) -> ServerProcess:
        return self.running[slot][1]

    def stop(self, slot: int) -> None:
        stack, _ = self.running.pop(slot)
        stack.close()

    def all_up(self) -> None:
        """Starts every replica that is not running, side by side: each start waits for SERVING."""
        for slot in list(self.running):
            if not self.server(slot).alive():
                self.stop(slot)
        missing = [slot for slot in range(REPLICAS) if slot not in self.running]
        with ThreadPoolExecutor(max_workers=REPLICAS) as pool:
            list(pool.map(self.start, missing))

    def close(self) -> None:
        for slot in list(self.running):
            self.stop(slot)

    def target(self) -> str:
        return "ipv4:" + ",".join(f"127.0.0.1:{port}" for port in self.ports)


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    base = tmp_path_factory.mktemp("replicas")
    repo = base / "repo"
    repo.mkdir()
    # Each answer carries the replica's pid, so a test sees that calls were spread. Slow enough batches
    # that 64 callers leave CPU for the replicas' restarts on a small machine.
    code = """
    import os
    import time

    import numpy as np


    class Model:
        def predict(self, batch):
            time.sleep(0.02)
            return {"y": np.full((len(batch["x"]), 1), os.getpid(), dtype=np.float32)}
    """
    python_model(repo, MODEL, code, outputs=PID_OUTPUT, max_batch_size=4)
    group = Replicas(repo, base)
    try:
        group.all_up()
        yield group
    finally:
        group.close()


class HAProxy:
    """HAProxy running deploy/haproxy/haproxy.cfg in the foreground, with its stats socket."""

    def __init__(self, replicas: Replicas, directory: Path) -> None:
        assert HAPROXY is not None
        self.port = free_port()
        self.socket = directory / "haproxy.sock"
        servers = "\n".join(f"    server r{i} 127.0.0.1:{p}" for i, p in enumerate(replicas.ports))
        config = (DEPLOY / "haproxy.cfg").read_text()
        frames = runpy.run_path(str(DEPLOY / "health_check_frames.py"))["health_check"]()
        assert f"tcp-check send-binary {frames.hex()}\n" in config, "regenerate the check's frames"
        for key, value in {
            "{stats_socket}": str(self.socket),
            "{bind}": f"127.0.0.1:{self.port}",
            "{servers}": servers,
        }.items():
            config = config.replace(key, value)
        self.config = directory / "haproxy.cfg"
        self.config.write_text(config)
        self.log = directory / "haproxy.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([HAPROXY, "-db", "-f", str(self.config)], stdout=log, stderr=log)

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX) as stats:
            stats.settimeout(5)
            stats.connect(str(self.socket))
            stats.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := stats.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def states(self) -> dict[str, str]:
        """Each replica's state as HAProxy sees it: UP, DOWN, ..."""
        rows = csv.DictReader(self.command("show stat").removeprefix("# ").splitlines())
        return {row["svname"]: row["status"] for row in rows if row["pxname"] == "sluice"}

    def wait_for(self, server: str, state: str, seconds: float = 20.0) -> None:
        within = bounded(seconds)
        seen = ""
        while within():
            if self.process.poll() is not None:
                raise AssertionError(f"HAProxy exited; its log:\n{self.log.read_text()[-3000:]}")
            with contextlib.suppress(OSError):
                seen = self.states().get(server, "")
                if seen.startswith(state):
                    return
            time.sleep(0.05)
        raise AssertionError(f"HAProxy never saw {server} {state} (last: {seen!r})")

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture(scope="module")
def haproxy(replicas: Replicas, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HAProxy]:
    proxy = HAProxy(replicas, tmp_path_factory.mktemp("haproxy"))
    try:
        for slot in range(REPLICAS):
            proxy.wait_for(f"r{slot}", "UP")
        yield proxy
    finally:
        proxy.close()


# --------------------------------------------------------------------------------------------------------
# Traffic


class Traffic:
    """64 callers of one AsyncClient, each calling Predict again as soon as its last call ends."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self.ledger = Ledger()
        self.stop = asyncio.Event()
        self.done = 0
        self.answered_by: Counter[int] = Counter()
        """Calls answered by each replica's pid."""
        self.tasks: list[asyncio.Task[None]] = []

    async def _caller(self, caller: int) -> None:
        within = bounded(120.0)
        for n in range(100_000):
            if self.stop.is_set() or not within():
                return
            call_id = f"{caller}-{n}"
            self.ledger.start(call_id)
            try:
                outputs = await self.client.predict(MODEL, x=ONES, timeout=20.0)
            except SluiceError as error:
                self.ledger.end(call_id, error.code, error.message)
            else:
                self.ledger.end(call_id, "OK")
                self.answered_by[int(outputs["y"][0, 0])] += 1
            self.done += 1

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._caller(c)) for c in range(CALLERS)]

    async def calls(self, count: int, seconds: float = 30.0) -> None:
        """Waits until `count` more calls have ended: the test goes on only once traffic flows."""
        target = self.done + count
        within = bounded(seconds)
        while self.done < target:
            assert within(), f"only {self.done} of {target} calls ended in {seconds} s"
            await asyncio.sleep(0.01)

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.wait_for(asyncio.gather(*self.tasks), 60)


@contextlib.asynccontextmanager
async def traffic(target: str, options: ClientOptions) -> AsyncIterator[Traffic]:
    async with AsyncClient(target, options) as client:
        load = Traffic(client)
        load.start()
        try:
            await load.calls(2 * CALLERS)
            yield load
        finally:
            await load.finish()


def assert_no_errors(load: Traffic, after: str) -> None:
    """Every call ended OK, none unfinished, and traffic went on after the replicas changed."""
    ledger = load.ledger
    ledger.assert_only({"OK"}, what="calls")
    assert len(ledger.select(after=after)) >= CALLERS, ledger.report(ledger.select(after=after))


async def kill_one(replicas: Replicas, load: Traffic) -> None:
    pids = {replicas.server(slot).pid for slot in range(REPLICAS)}
    assert set(load.answered_by) == pids, f"calls reached {dict(load.answered_by)}, not each of {pids}"
    load.ledger.mark("killed", replicas.server(1).signal(signal.SIGKILL))
    await load.calls(4 * CALLERS)


async def roll(replicas: Replicas, load: Traffic, proxy: HAProxy | None) -> None:
    for slot in range(REPLICAS):
        server = replicas.server(slot)
        load.ledger.mark(f"stopped {slot}", server.signal(signal.SIGTERM))
        assert await asyncio.to_thread(server.wait, 30) == 0, server.log_text()[-3000:]
        await asyncio.to_thread(replicas.stop, slot)
        await asyncio.to_thread(replicas.start, slot)
        if proxy is not None:
            # One replica out at a time, as a rollout with maxUnavailable 1 does.
            await asyncio.to_thread(proxy.wait_for, f"r{slot}", "UP")
        await load.calls(2 * CALLERS)
    load.ledger.mark("rolled")
    await load.calls(2 * CALLERS)


def record(name: str, load: Traffic) -> None:
    print(f"{name}: {load.ledger.report()}")


# --------------------------------------------------------------------------------------------------------
# HAProxy


@needs_haproxy
async def test_haproxy_sigkill_of_one_replica_loses_no_call(replicas: Replicas, haproxy: HAProxy) -> None:
    await asyncio.to_thread(replicas.all_up)
    async with traffic(f"127.0.0.1:{haproxy.port}", ClientOptions()) as load:
        await kill_one(replicas, load)
        # The check, not only the retries, took the dead replica out.
        await asyncio.to_thread(haproxy.wait_for, "r1", "DOWN")
    record("haproxy, SIGKILL", load)
    assert_no_errors(load, after="killed")


@needs_haproxy
async def test_haproxy_rolling_restart_loses_no_call(replicas: Replicas, haproxy: HAProxy) -> None:
    await asyncio.to_thread(replicas.all_up)
    for slot in range(REPLICAS):
        await asyncio.to_thread(haproxy.wait_for, f"r{slot}", "UP")
    async with traffic(f"127.0.0.1:{haproxy.port}", ClientOptions()) as load:
        await roll(replicas, load, haproxy)
    record("haproxy, rolling SIGTERM", load)
    assert_no_errors(load, after="rolled")
    load.ledger.assert_none({"CANCELLED"}, what="calls")


# --------------------------------------------------------------------------------------------------------
# gRPC's client-side round_robin


ROUND_ROBIN = ClientOptions(load_balancing="round_robin")


async def test_round_robin_sigkill_of_one_replica_loses_no_call(replicas: Replicas) -> None:
    await asyncio.to_thread(replicas.all_up)
    async with traffic(replicas.target(), ROUND_ROBIN) as load:
        await kill_one(replicas, load)
    record("round_robin, SIGKILL", load)
    assert_no_errors(load, after="killed")


async def test_round_robin_rolling_restart_loses_no_call(replicas: Replicas) -> None:
    await asyncio.to_thread(replicas.all_up)
    async with traffic(replicas.target(), ROUND_ROBIN) as load:
        await roll(replicas, load, None)
    record("round_robin, rolling SIGTERM", load)
    assert_no_errors(load, after="rolled")
    load.ledger.assert_none({"CANCELLED"}, what="calls")
