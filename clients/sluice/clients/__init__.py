"""Client-side helpers for Sluice: numpy arrays to wire tensors and back.

Imports only the generated contract (`sluice.v1`), so a client machine needs no server dependencies.
"""

from sluice.clients.codec import to_array, to_tensor

__all__ = ["to_array", "to_tensor"]
