"""Which asyncio HTTP server should carry Sluice's REST door: aiohttp's low-level server or uvicorn.

Each candidate serves the same handler (parse a small KServe v2 JSON infer body, turn its data into a numpy
array, answer a v2 JSON response) in a process of its own on loopback, on uvloop like Sluice. One client
process posts with 64 concurrent callers over keep-alive connections for a fixed time; the candidates
alternate for a few rounds and the median requests/s of each is printed. This measures the HTTP layer only:
no model, no batcher.

    python benchmarks/rest_servers.py --rounds 3 --duration 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import socket
import statistics
import time
from typing import Any

import numpy as np

BODY = json.dumps(
    {"id": "1", "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": [0.5] * 64}]}
).encode()


def _answer(body: bytes) -> bytes:
    request = json.loads(body)
    tensor = request["inputs"][0]
    array = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
    out = {
        "model_name": "digits",
        "model_version": "1",
        "id": request.get("id", ""),
        "outputs": [{"name": "label", "datatype": "INT64", "shape": [1], "data": [int(array.sum()) % 10]}],
    }
    return json.dumps(out).encode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def serve_aiohttp(port: int) -> None:
    import uvloop
    from aiohttp import web

    async def infer(request: web.Request) -> web.Response:
        return web.Response(body=_answer(await request.read()), content_type="application/json")

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/v2/models/digits/infer", infer)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await asyncio.Event().wait()

    uvloop.run(main())


def serve_uvicorn(port: int) -> None:
    import uvicorn

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        answer = _answer(body)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(answer)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": answer})

    uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", log_level="warning",
                access_log=False, lifespan="off")  # fmt: skip


SERVERS = {"aiohttp": serve_aiohttp, "uvicorn": serve_uvicorn}


async def load(port: int, callers: int, seconds: float) -> tuple[int, int]:
    """(answered OK, failed) by `callers` posting for `seconds`."""
    import aiohttp

    url = f"http://127.0.0.1:{port}/v2/models/digits/infer"
    ok = failed = 0
    ends = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=callers)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def caller() -> None:
            nonlocal ok, failed
            while time.monotonic() < ends:
                async with session.post(url, data=BODY, headers={"content-type": "application/json"}) as r:
                    await r.read()
                    if r.status == 200:
                        ok += 1
                    else:
                        failed += 1

        await asyncio.gather(*(caller() for _ in range(callers)))
    return ok, failed


async def _wait_up(port: int) -> None:
    for _ in range(200):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return
    raise RuntimeError(f"nothing listens on {port}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--callers", type=int, default=64)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rates: dict[str, list[float]] = {name: [] for name in SERVERS}
    for _ in range(args.rounds):
        for name, serve in SERVERS.items():
            port = _free_port()
            proc = multiprocessing.Process(target=serve, args=(port,), daemon=True)
            proc.start()
            try:
                asyncio.run(_wait_up(port))
                asyncio.run(load(port, args.callers, 1.0))  # warm-up
                ok, failed = asyncio.run(load(port, args.callers, args.duration))
            finally:
                proc.terminate()
                proc.join(5)
            assert failed == 0, f"{name}: {failed} requests failed"
            rates[name].append(ok / args.duration)
            print(f"{name:8} {ok / args.duration:8.0f} req/s", flush=True)
    for name, values in rates.items():
        print(f"median {name:8} {statistics.median(values):8.0f} req/s over {len(values)} rounds")


if __name__ == "__main__":
    main()
