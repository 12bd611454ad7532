"""Python clients for Sluice, and numpy <-> wire tensor helpers.

Imports only the generated contract (`sluice.v1`), so a client machine needs no server dependencies.
"""

from sluice.clients.client import (
    AsyncClient,
    Client,
    ClientOptions,
    Retry,
    SluiceError,
    StreamResult,
    build_request,
    read_outputs,
)
from sluice.clients.codec import to_array, to_tensor
from sluice.clients.queue import QueueClient

__all__ = [
    "AsyncClient",
    "Client",
    "ClientOptions",
    "QueueClient",
    "Retry",
    "SluiceError",
    "StreamResult",
    "build_request",
    "read_outputs",
    "to_array",
    "to_tensor",
]
