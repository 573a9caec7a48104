"""Bind parameters as the router sees them: values, formats and types, and array values.

A Bind message carries parameter values (NULL as None) and format codes; Parse declared the
parameter types (OID 0 = let the server infer). Format codes follow the protocol's rule
(protocol-message-formats, Bind): no codes means all text, one code applies to every parameter,
otherwise one code per parameter.
"""

from __future__ import annotations

import struct
from typing import Optional, Sequence

__all__ = ["Bind", "parse_text_array", "parse_binary_array"]

TEXT, BINARY = 0, 1


class Bind:
    """The parameters of one Bind: values (bytes-like or None), formats, declared type OIDs."""

    __slots__ = ("values", "formats", "oids")

    def __init__(
        self,
        values: Sequence[Optional[bytes]],
        formats: Sequence[int] = (),
        oids: Sequence[int] = (),
    ) -> None:
        self.values = values
        self.formats = formats
        self.oids = oids

    def param(self, number: int) -> tuple[Optional[bytes], bool, int]:
        """($n's value, is it binary, its declared type OID); a missing $n reads as NULL text."""
        i = number - 1
        values = self.values
        if not 0 <= i < len(values):
            return None, False, 0
        formats = self.formats
        nf = len(formats)
        binary = (formats[0] if nf == 1 else formats[i] if nf > i else TEXT) == BINARY if nf else False
        oids = self.oids
        return values[i], binary, oids[i] if i < len(oids) else 0

    def __repr__(self) -> str:
        return f"Bind({list(self.values)!r}, formats={list(self.formats)!r}, oids={list(self.oids)!r})"


def parse_text_array(text: str) -> Optional[list[Optional[str]]]:
    """The elements of a one-dimensional array in text form ('{1,2,"a b",NULL}'), or None if it
    is not one (array_in, src/backend/utils/adt/arrayfuncs.c: quotes, backslash escapes, NULL)."""
    s = text.strip()
    if s.startswith("["):  # explicit bounds: [1:3]={...}
        eq = s.find("=")
        if eq < 0:
            return None
        s = s[eq + 1 :].strip()
    if len(s) < 2 or s[0] != "{" or s[-1] != "}":
        return None
    body = s[1:-1]
    out: list[Optional[str]] = []
    i, n = 0, len(body)
    if not body.strip():
        return out
    while i <= n:
        while i < n and body[i].isspace():
            i += 1
        if i < n and body[i] == "{":
            return None  # more than one dimension
        if i < n and body[i] == '"':
            i += 1
            buf = []
            while i < n and body[i] != '"':
                if body[i] == "\\" and i + 1 < n:
                    i += 1
                buf.append(body[i])
                i += 1
            if i >= n:
                return None
            i += 1
            out.append("".join(buf))
            while i < n and body[i].isspace():
                i += 1
        else:
            buf = []
            while i < n and body[i] != ",":
                if body[i] == "\\" and i + 1 < n:
                    i += 1
                buf.append(body[i])
                i += 1
            word = "".join(buf).strip()
            out.append(None if word.upper() == "NULL" else word)
        if i < n and body[i] != ",":
            return None
        i += 1
    return out


_HEADER = struct.Struct("!iiI")
_DIM = struct.Struct("!ii")
_LEN = struct.Struct("!i")


def parse_binary_array(data: bytes) -> Optional[tuple[int, list[Optional[bytes]]]]:
    """(element type OID, element values) of a one-dimensional array in binary form (array_send:
    ndim, has-nulls flag, element type, then per dimension size and lower bound, then each
    element as a length (-1 for NULL) and bytes), or None if it is not one."""
    try:
        ndim, _flags, elemtype = _HEADER.unpack_from(data, 0)
        if ndim == 0:
            return elemtype, []
        if ndim != 1:
            return None
        size, _lower = _DIM.unpack_from(data, 12)
        off = 20
        out: list[Optional[bytes]] = []
        for _ in range(size):
            (length,) = _LEN.unpack_from(data, off)
            off += 4
            if length < 0:
                out.append(None)
            else:
                out.append(bytes(data[off : off + length]))
                off += length
        return elemtype, out
    except struct.error:
        return None
