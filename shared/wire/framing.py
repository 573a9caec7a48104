"""Message framing of the PostgreSQL protocol over byte buffers (sans-IO).

Startup packets have no type byte: Int32 length (counting itself) then an Int32
code ("Message Formats": StartupMessage, SSLRequest, GSSENCRequest, CancelRequest).
Every later message is Byte1 type + Int32 length (counting itself, so >= 4).
"""

from __future__ import annotations

import struct
from typing import Iterator

from . import protocol as P
from .errors import ProtocolViolation

HEADER = struct.Struct("!BI")
STARTUP_HEADER = struct.Struct("!ii")
INT32 = struct.Struct("!i")


def startup_length(buf: bytes | bytearray | memoryview, end: int) -> int | None:
    """Total length of the startup packet at buf[0:], or None if fewer than 8 bytes.

    Raises ProtocolViolation when the length is outside [8, MAX_STARTUP_PACKET]
    (PostgreSQL's ProcessStartupPacket applies the same bounds).
    """
    if end < 4:
        return None
    (length,) = INT32.unpack_from(buf, 0)
    if length < 8 or length > P.MAX_STARTUP_PACKET:
        raise ProtocolViolation(f"invalid length of startup packet: {length}")
    return length


def check_length(type_byte: int, length: int, max_size: int) -> None:
    """Validate a regular message's length field; raise ProtocolViolation if bad."""
    if length < 4 or length > max_size:
        raise ProtocolViolation(
            f"invalid message length {length} for message type {chr(type_byte)!r} "
            f"(allowed 4..{max_size})")


def iter_messages(buf: bytes | bytearray | memoryview, start: int, end: int,
                  max_size: int = P.MAX_MESSAGE_SIZE_LIMIT) -> Iterator[tuple[int, int, int]]:
    """Yield (type, body_start, body_end) for each complete message in buf[start:end].

    Stops before an incomplete message; the caller learns where from the last
    body_end (or start when none).  Raises ProtocolViolation on a bad length.
    """
    pos = start
    unpack = HEADER.unpack_from
    while end - pos >= 5:
        t, length = unpack(buf, pos)
        if length < 4 or length > max_size:
            check_length(t, length, max_size)
        stop = pos + 1 + length
        if stop > end:
            return
        yield t, pos + 5, stop
        pos = stop


def split_messages(data: bytes) -> list[tuple[int, bytes]]:
    """All messages of a complete byte string as (type, body); for tests and tools."""
    out = []
    last = 0
    for t, b0, b1 in iter_messages(data, 0, len(data)):
        out.append((t, bytes(data[b0:b1])))
        last = b1
    if last != len(data):
        raise ValueError("trailing partial message")
    return out
