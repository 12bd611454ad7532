"""Answering the requests of one bidirectional stream concurrently, with backpressure, and cutting it short.

A stream's window counts requests read and not yet *sent* back: while it is full no further request is
read, so a client that sends without reading pushes back through HTTP/2 flow control instead of growing
server memory (at most `window` requests and answers per stream, plus what gRPC buffers itself).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Generic, TypeVar

Request = TypeVar("Request")
Answer = TypeVar("Answer")

STREAM_WINDOW = 256
"""Requests of one stream read but not yet answered and sent."""

_DONE = object()


class AnswerStream(Generic[Request, Answer]):
    """Answers each request of a stream in its own task and yields the answers as they are ready.

    `answer` must not raise. `stop()` stops reading (a server shutting down): the requests already read
    are still answered, then iteration ends and `cut` is True.
    """

    def __init__(
        self,
        requests: AsyncIterable[Request],
        answer: Callable[[Request], Awaitable[Answer]],
        window: int = STREAM_WINDOW,
    ) -> None:
        self._requests = requests
        self._answer = answer
        self._window = window
        self._reader: asyncio.Task[None] | None = None
        self._stopping = False
        self.cut = False
        """Whether reading was stopped before the client closed its side."""

    def stop(self) -> None:
        """Reads no further request; those already read are answered."""
        self._stopping = True
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()

    async def __aiter__(self) -> AsyncIterator[Answer]:
        answers: asyncio.Queue[object] = asyncio.Queue()
        slots = asyncio.Semaphore(self._window)
        pending: set[asyncio.Task[None]] = set()
        answer = self._answer

        async def run(request: Request) -> None:
            answers.put_nowait(await answer(request))

        async def read() -> None:
            try:
                iterator = aiter(self._requests)
                while not self._stopping:
                    await slots.acquire()
                    try:
                        request = await anext(iterator)
                    except StopAsyncIteration:
                        break
                    task = asyncio.create_task(run(request))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
            except asyncio.CancelledError:
                if not self._stopping:
                    raise
                self.cut = True
            finally:
                if pending:
                    await asyncio.wait(set(pending))
                answers.put_nowait(_DONE)

        reader = self._reader = asyncio.create_task(read())
        if self._stopping:
            reader.cancel()
        try:
            while (item := await answers.get()) is not _DONE:
                yield item  # type: ignore[misc]
                slots.release()  # the answer was taken by the transport: its slot is free
            await reader  # surfaces a failure to read the stream
        finally:
            reader.cancel()
            for task in list(pending):
                task.cancel()
