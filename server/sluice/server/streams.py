"""Answering the requests of one bidirectional stream concurrently, with backpressure."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import TypeVar

Request = TypeVar("Request")
Answer = TypeVar("Answer")

# A stream reads no further requests while this many of its requests are unanswered, so a client that
# sends without reading pushes back through HTTP/2 flow control instead of growing server memory.
STREAM_WINDOW = 256


async def answer_each(
    requests: AsyncIterable[Request], answer: Callable[[Request], Awaitable[Answer]], window: int
) -> AsyncIterator[Answer]:
    """Answers each request of a stream in its own task and yields the answers as they are ready.

    No further request is read while `window` are unanswered, so a client that sends without reading
    pushes back through HTTP/2 flow control instead of growing server memory. `answer` must not raise.
    """
    answers: asyncio.Queue[Answer | None] = asyncio.Queue()
    slots = asyncio.Semaphore(window)
    pending: set[asyncio.Task[None]] = set()

    async def run(request: Request) -> None:
        try:
            answers.put_nowait(await answer(request))
        finally:
            slots.release()

    async def read() -> None:
        try:
            async for request in requests:
                await slots.acquire()
                task = asyncio.create_task(run(request))
                pending.add(task)
                task.add_done_callback(pending.discard)
            if pending:
                await asyncio.wait(set(pending))
        finally:
            answers.put_nowait(None)

    reader = asyncio.create_task(read())
    try:
        while (item := await answers.get()) is not None:
            yield item
        await reader  # surfaces a failure to read the stream
    finally:
        reader.cancel()
        for task in list(pending):
            task.cancel()
