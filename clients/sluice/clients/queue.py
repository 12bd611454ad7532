"""A queue-style client for bulk jobs, as Analytics Zoo Cluster Serving users know it.

    with QueueClient("127.0.0.1:8001", "digits") as queue:
        for uri, image in images.items():
            queue.enqueue(uri, pixels=image)      # returns at once
        first = queue.query("img-0")             # waits for that one answer
        rest = queue.dequeue()                   # every answer that has arrived, removed from the queue

Inputs take Cluster Serving's forms (`image={"path": "cat.jpg"}`, `{"b64": ...}`, lists of str, sparse
`[indices, values, shape]`; see `sluice.clients.forms`), and for a model behind the `topk` postprocessor
`query(uri, top_n=True)` and `dequeue(top_n=True)` answer `{label: score}`, best first, as it did.

Built on one StreamPredict call: a feeder sends what is enqueued, a reader files each answer under its
request's id (the uri), so submitting never waits for an answer.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any, Literal, overload

from sluice.clients.client import Client, ClientOptions, Outputs, SluiceError, StreamResult, build_request
from sluice.clients.forms import Input, top_n
from sluice.v1 import inference_pb2 as pb

_END = object()


class QueueClient:
    """Enqueue requests for one model; query or dequeue their answers by uri."""

    def __init__(self, target: str, model: str, options: ClientOptions | None = None) -> None:
        self.model = model
        self._client = Client(target, options)
        self._outbox: queue.Queue[Any] = queue.Queue()
        self._answers: dict[str, StreamResult] = {}
        self._arrived = threading.Condition()
        self._failure: SluiceError | None = None
        self._closed = False
        self._reader = threading.Thread(target=self._read, name=f"sluice-queue-{model}", daemon=True)
        self._reader.start()

    def __enter__(self) -> QueueClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def enqueue(self, uri: str, **inputs: Input) -> None:
        """Submits one request under `uri` (its id); returns without waiting for the answer."""
        if self._closed:
            raise RuntimeError("the queue is closed")
        if not uri:
            raise ValueError("enqueue: uri must not be empty: answers are filed under it")
        self._outbox.put(build_request(self.model, inputs, request_id=uri))

    @overload
    def query(self, uri: str, timeout: float | None = None, *, top_n: Literal[False] = False) -> Outputs: ...

    @overload
    def query(self, uri: str, timeout: float | None = None, *, top_n: Literal[True]) -> dict[str, float]: ...

    def query(
        self, uri: str, timeout: float | None = None, *, top_n: bool = False
    ) -> Outputs | dict[str, float]:
        """Waits for the answer to `uri`, removes it, and returns its outputs (or raises its error); with
        `top_n`, a top-N answer's first row as `{label: score}`, best first."""
        with self._arrived:
            if not self._arrived.wait_for(lambda: uri in self._answers or self._failure is not None, timeout):
                raise TimeoutError(f"no answer for '{uri}' within {timeout} s")
            if uri not in self._answers:
                assert self._failure is not None
                raise self._failure
            result = self._answers.pop(uri)
        if result.error is not None:
            raise result.error
        assert result.outputs is not None
        return _top_n(result.outputs) if top_n else result.outputs

    @overload
    def dequeue(self, *, top_n: Literal[False] = False) -> dict[str, StreamResult]: ...

    @overload
    def dequeue(self, *, top_n: Literal[True]) -> dict[str, dict[str, float] | SluiceError]: ...

    def dequeue(
        self, *, top_n: bool = False
    ) -> dict[str, StreamResult] | dict[str, dict[str, float] | SluiceError]:
        """Every answer that has arrived so far, by uri, removed from the queue; with `top_n`, each as
        `{label: score}` best first, or the SluiceError its request failed with."""
        with self._arrived:
            answers, self._answers = self._answers, {}
        if not top_n:
            return answers
        return {
            uri: _top_n(result.outputs) if result.outputs is not None else _failed(result)
            for uri, result in answers.items()
        }

    def close(self) -> None:
        """Ends the stream once everything enqueued is answered, then closes the channel."""
        if not self._closed:
            self._closed = True
            self._outbox.put(_END)
            self._reader.join()
            self._client.close()

    def _requests(self) -> Iterator[pb.PredictRequest]:
        while (item := self._outbox.get()) is not _END:
            yield item

    def _read(self) -> None:
        try:
            for result in self._client.stream(self._requests()):
                with self._arrived:
                    self._answers[result.id] = result
                    self._arrived.notify_all()
        except SluiceError as exc:
            with self._arrived:
                self._failure = exc
                self._arrived.notify_all()


def _top_n(outputs: Outputs) -> dict[str, float]:
    return top_n(outputs)


def _failed(result: StreamResult) -> SluiceError:
    assert result.error is not None
    return result.error
