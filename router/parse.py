"""Parsing SQL into plain dicts (libpg_query JSON) and a cache bounded by bytes, not entries.

`pglast.parser.parse_sql_json` + `orjson.loads` is the fast way to get facts out of a statement
(about 4 us for a short query, against about 35 us for pglast's node objects); the router only
reads the result, never rewrites it. The JSON is libpg_query's protobuf-JSON form of PostgreSQL's
raw parse tree (src/include/nodes/parsenodes.h): fields at their default value are omitted, e.g.
an integer constant 0 reads {"A_Const": {"ival": {}}}.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from typing import Generic, Optional, TypeVar

import orjson
from pglast.parser import ParseError, parse_sql_json

__all__ = ["ByteLRU", "ParseError", "node_type", "parse_statements", "text_bytes"]


def parse_statements(sql: str) -> list[dict]:
    """The raw statements of sql as dicts ({"SelectStmt": {...}}); raises ParseError on bad SQL."""
    return [s["stmt"] for s in orjson.loads(parse_sql_json(sql))["stmts"] if "stmt" in s]


def node_type(node: dict) -> str:
    """The node tag of a one-key node dict ("SelectStmt", "A_Const", ...)."""
    return next(iter(node))


K = TypeVar("K")
V = TypeVar("V")


class ByteLRU(Generic[K, V]):
    """A least-recently-used map whose total size (as estimated by the caller) stays under a limit.

    Sizes are the caller's estimate of what an entry keeps alive; an entry larger than
    max_entry_bytes is not stored at all (one-off giant statements, like a 10,000-row INSERT,
    would only push out the statements that repeat).
    """

    __slots__ = ("limit", "max_entry", "_data", "bytes", "hits", "misses", "evictions")

    def __init__(self, limit_bytes: int, max_entry_bytes: Optional[int] = None) -> None:
        self.limit = limit_bytes
        self.max_entry = max_entry_bytes if max_entry_bytes is not None else limit_bytes
        self._data: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    def get(self, key: K) -> Optional[V]:
        item = self._data.get(key)
        if item is None:
            self.misses += 1
            return None
        self.hits += 1
        self._data.move_to_end(key)
        return item[0]

    def put(self, key: K, value: V, size: int) -> bool:
        """Store value; returns False when it is too big to cache."""
        if size > self.max_entry or size > self.limit:
            return False
        old = self._data.pop(key, None)
        if old is not None:
            self.bytes -= old[1]
        self._data[key] = (value, size)
        self.bytes += size
        while self.bytes > self.limit:
            _, (_, freed) = self._data.popitem(last=False)
            self.bytes -= freed
            self.evictions += 1
        return True

    def clear(self) -> None:
        self._data.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def items(self) -> list[tuple[K, V]]:
        """Entries from least to most recently used (for SHOW QUERY_CACHE)."""
        return [(k, v) for k, (v, _) in self._data.items()]


def text_bytes(sql: str) -> int:
    """Memory a cached query text keeps alive (the str object itself)."""
    return sys.getsizeof(sql)
