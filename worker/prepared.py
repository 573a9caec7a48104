"""Prepared statements in transaction mode: renaming, re-preparing, response matching.

A client's named statements live on whichever server it happened to use. pgherd
keeps one cache per worker, keyed by (query text, parameter types), and prepares
each statement on servers under a global name (`pgherd_<n>`). Requests are
rewritten to global names; a Bind or Describe on a server that lacks the
statement gets a Parse injected first; a Parse of a statement the server already
has, and a Close of a client's name, are answered by pgherd.

Because some replies are synthesised and some are swallowed, the server's
replies are matched one by one against an action queue, in request order
("Extended Query" in the protocol chapter: each message's replies, and an
ErrorResponse makes the server skip to the next Sync).
"""

from __future__ import annotations

import struct
from collections import OrderedDict

from pgherd.shared.wire import messages as M
from pgherd.shared.wire import protocol as P

_I16 = struct.Struct("!h")

# Action kinds: the replies one forwarded message produces.
A_PARSE = ord("1")  # ParseComplete
A_BIND = ord("2")  # BindComplete
A_DESCRIBE_S = ord("t")  # ParameterDescription, then RowDescription or NoData
A_DESCRIBE_P = ord("T")  # RowDescription or NoData
A_EXECUTE = ord("E")  # rows..., then CommandComplete / EmptyQueryResponse / PortalSuspended
A_CLOSE = ord("3")  # CloseComplete
A_SYNC = ord("Z")  # ReadyForQuery
A_QUERY = ord("Q")  # everything up to ReadyForQuery
A_FUNCTION = ord("F")  # FunctionCallResponse ..., ReadyForQuery
A_SYNTH = 0  # not sent: pgherd emits `data` when the queue reaches it

_ASYNC = frozenset([P.B_NOTICE_RESPONSE, P.B_NOTIFICATION_RESPONSE, P.B_PARAMETER_STATUS])
_EXECUTE_END = frozenset([P.B_COMMAND_COMPLETE, P.B_EMPTY_QUERY_RESPONSE, P.B_PORTAL_SUSPENDED])


class Action:
    __slots__ = ("kind", "swallow", "data", "stmt", "client_name")

    def __init__(self, kind: int, swallow: bool = False, data: bytes = b"", stmt: str = "",
                 client_name: str = "") -> None:
        self.kind = kind
        self.swallow = swallow  # the reply belongs to a message pgherd injected
        self.data = data  # A_SYNTH: the bytes to emit
        self.stmt = stmt  # A_PARSE: the global name being prepared
        self.client_name = client_name  # A_PARSE: the client's name for it

    def __repr__(self) -> str:
        return f"<{chr(self.kind) if self.kind else 'synth'}{' swallow' if self.swallow else ''}>"


def take_synth(actions) -> bytes:
    """Pop the synthesised replies at the head of the queue and return their bytes."""
    out = b""
    while actions and actions[0].kind == A_SYNTH:
        out += actions.popleft().data
    return out


class StatementCache:
    """A worker's prepared statements: (query, param types) -> global name and Parse."""

    def __init__(self) -> None:
        self._by_key: dict[tuple, str] = {}
        self._parse: dict[str, bytes] = {}
        self._counter = 0
        # Names some server prepared successfully: a Parse of them cannot fail for
        # a syntax or catalog reason pgherd would have to report.
        self._validated: set[str] = set()
        # Names whose plans went stale after DDL ("cached plan must not change
        # result type"): clients move to a fresh name; servers drop the old one.
        self.retired: dict[str, str] = {}  # old name -> key's current name
        self.generation = 0  # bumped at each retirement

    def name_for(self, query: str, types: tuple[int, ...]) -> str:
        key = (query, types)
        name = self._by_key.get(key)
        if name is None:
            self._counter += 1
            name = f"pgherd_{self._counter}"
            self._by_key[key] = name
            self._parse[name] = M.parse(name, query, list(types))
        return name

    def retire(self, name: str) -> None:
        """Replace a statement whose plan is stale with a fresh global name."""
        for key, current in self._by_key.items():
            if current == name and len(key) == 2:
                del self._by_key[key]
                fresh = self.name_for(*key)
                self.retired[name] = fresh
                self.generation += 1
                return

    def current(self, name: str) -> str:
        """The live name for a possibly retired one."""
        while name in self.retired:
            name = self.retired[name]
        return name

    def validated(self, name: str) -> None:
        self._validated.add(name)

    def validated_name(self, query: str, types: tuple[int, ...]) -> str | None:
        name = self._by_key.get((query, types))
        return name if name in self._validated else None

    def sql_name_for(self, types: str, statement: str) -> str:
        """Global name for a SQL PREPARE ("full" mode); its message is the PREPARE itself."""
        key = ("sql", types, statement)  # 3-tuples never collide with (query, types) keys
        name = self._by_key.get(key)
        if name is None:
            self._counter += 1
            name = f"pgherd_{self._counter}"
            self._by_key[key] = name
            self._parse[name] = M.query(f"PREPARE {name}{types} AS {statement}")
        return name

    def parse_message(self, name: str) -> bytes:
        return self._parse[name]

    def query(self, name: str) -> str | None:
        """The query text of a global statement (None for SQL PREPAREs and unknown names)."""
        for key, current in self._by_key.items():
            if current == name:
                return key[0] if len(key) == 2 else None
        return None

    def __len__(self) -> int:
        return len(self._by_key)


def read_name(body: memoryview | bytes, pos: int = 0) -> tuple[str, int]:
    """A cstring at pos, and the position after it."""
    raw = bytes(body[pos:]) if isinstance(body, memoryview) else body[pos:]
    end = raw.find(b"\0")
    if end < 0:
        raise ValueError("unterminated string")
    return raw[:end].decode("utf-8", "replace"), pos + end + 1


def rename_bind(body: bytes, statement: str) -> bytes:
    """The Bind message with its statement name replaced."""
    portal, pos = read_name(body, 0)
    _, pos2 = read_name(body, pos)
    return M.message(P.F_BIND, M.cstr(portal) + M.cstr(statement) + body[pos2:])


class ServerStatements:
    """Which global statements a server holds, least recently used first."""

    __slots__ = ("names", "generation")

    def __init__(self) -> None:
        self.names: OrderedDict[str, None] = OrderedDict()
        self.generation = 0  # the StatementCache generation last reconciled with

    def has(self, name: str) -> bool:
        if name in self.names:
            self.names.move_to_end(name)
            return True
        return False

    def add(self, name: str) -> None:
        self.names[name] = None
        self.names.move_to_end(name)

    def discard(self, name: str) -> None:
        self.names.pop(name, None)

    def evict(self, limit: int) -> list[str]:
        """Names to close so that one more fits under limit (0 = unlimited)."""
        out = []
        while limit and len(self.names) >= limit:
            name, _ = self.names.popitem(last=False)
            out.append(name)
        return out

    def clear(self) -> None:
        self.names.clear()

    def stale(self, cache: "StatementCache") -> list[str]:
        """Retired names this server still holds (checked once per retirement)."""
        if self.generation == cache.generation:
            return []
        self.generation = cache.generation
        out = [n for n in self.names if n in cache.retired]
        for n in out:
            del self.names[n]
        return out
