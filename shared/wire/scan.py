"""The fast path's two byte scans (worker/fastpath.py): in C when the extension is built.

`plain_queries` and `reply_end` are the C functions from `_scan.c` when that
extension was compiled at install (it needs a C compiler and Python's headers),
and the Python functions below otherwise: the same answers, at 11-24 % more CPU
per pgbench transaction (docs/benchmarks.md). ACCELERATED says which;
tests/unit/test_scan.py checks that the two agree.
"""

from __future__ import annotations

import os

from pgherd.router.settings import may_change

from . import protocol as P
from .framing import HEADER

_unpack_hdr = HEADER.unpack_from
_Q = P.F_QUERY
_Z = P.B_READY_FOR_QUERY
# Replies ClientSession._scan_server must act on (_scan.c tests the same five).
_SCANNED = frozenset([P.B_ERROR_RESPONSE, P.B_READY_FOR_QUERY, P.B_COPY_IN_RESPONSE,
                      P.B_COPY_BOTH_RESPONSE, P.B_PARAMETER_STATUS])


def plain_queries_py(buf, end: int, max_size: int) -> int:
    """The number of Query messages in buf[:end] if it holds nothing else and leaves session state alone.

    Whole messages only, each length between 4 and max_size, and may_change false
    for every query text (without its terminating NUL). Else -1.
    """
    p = count = 0
    while p < end:
        if end - p < 5:
            return -1
        t, length = _unpack_hdr(buf, p)
        if t != _Q or length < 4 or length > max_size or length > end - p - 1:
            return -1
        if may_change(buf, p + 5, p + length):
            return -1
        count += 1
        p += 1 + length
    return count if count else -1


def reply_end_py(buf, start: int, end: int) -> int:
    """end if buf[start:end] is whole messages ending in the one ReadyForQuery, with nothing to act on.

    The last message a ReadyForQuery (length 5) that ends at end, and none before
    it in _SCANNED. Else -1.
    """
    p = start
    while end - p >= 5:
        t, length = _unpack_hdr(buf, p)
        if length < 4 or length > end - p - 1:
            return -1
        p += 1 + length
        if t == _Z:
            return end if length == 5 and p == end else -1
        if t in _SCANNED:
            return -1
    return -1


plain_queries = plain_queries_py
reply_end = reply_end_py
ACCELERATED = False
if not os.environ.get("PGHERD_NO_SPEEDUPS"):
    try:
        from ._scan import plain_queries, reply_end  # noqa: F811
        ACCELERATED = True
    except ImportError:
        pass
