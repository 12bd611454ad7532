"""Prints, as hex for HAProxy's `tcp-check send-binary`, the HTTP/2 frames of one grpc.health.v1 Check of
the whole server (service ""): what HAProxy 2.6 cannot build itself. Run: `python health_check_frames.py`."""

from __future__ import annotations

PATH = b"/grpc.health.v1.Health/Check"
AUTHORITY = b"localhost"


def literal(index: int, value: bytes) -> bytes:
    """HPACK literal without indexing, name from the static table (`index` < 15 + 128), no Huffman."""
    prefix = bytes([index]) if index < 15 else bytes([0x0F, index - 15])
    return prefix + bytes([len(value)]) + value


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def health_check() -> bytes:
    headers = (
        bytes([0x83, 0x86])  # :method POST, :scheme http (static table 3 and 6)
        + literal(4, PATH)  # :path
        + literal(1, AUTHORITY)  # :authority
        + literal(31, b"application/grpc")  # content-type
        + b"\x00\x02te\x08trailers"  # a name not in the static table
    )
    empty_request = b"\x00" + (0).to_bytes(4, "big")  # not compressed, 0 bytes: HealthCheckRequest()
    return (
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        + frame(0x4, 0, 0, b"")  # SETTINGS, none changed
        + frame(0x1, 0x4, 1, headers)  # HEADERS, END_HEADERS
        + frame(0x0, 0x1, 1, empty_request)  # DATA, END_STREAM
    )


if __name__ == "__main__":
    print(health_check().hex())
