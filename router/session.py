"""Session routing state: SET [LOCAL] pgherd.shard / pgherd.sharding_key / search_path, tracked per client.

`session_change(sql)` recognises the statements that change how later statements route and
returns the change; `RoutingSession` applies changes with PostgreSQL's transaction semantics
(src/backend/utils/misc/guc.c; docs "SET"):
- SET outside a transaction block sets the session value;
- SET inside a transaction block takes effect at once and survives COMMIT, but ROLLBACK undoes it;
- SET LOCAL lasts until the end of the current transaction, whatever its outcome (outside a block
  it has no effect, as Postgres warns);
- RESET (or SET ... TO DEFAULT) returns to the startup value; RESET ALL resets every one.

pgherd.shard / pgherd.sharding_key (and PgDog's pgdog.*) are pgherd's own: the worker answers SET
for them itself and never forwards them. search_path is a real setting, forwarded as usual, and
tracked here because schema sharding resolves unqualified table names with it. The same names
given as startup options (`options=-c pgherd.shard=1`) seed the startup values.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Optional, Union

from .options import parse_options
from .parse import ParseError, node_type, parse_statements

__all__ = ["RoutingSession", "SessionChange", "change_from_stmt", "parse_search_path", "session_change"]

# Setting names (lower case) -> the routing variable they control.
VARIABLES = {
    "pgherd.shard": "shard",
    "pgdog.shard": "shard",
    "pgherd.sharding_key": "sharding_key",
    "pgdog.sharding_key": "sharding_key",
    "search_path": "search_path",
}
# Variables pgherd answers itself (not forwarded to servers).
PGHERD_VARIABLES = frozenset(("shard", "sharding_key"))

Value = Union[None, int, str, tuple[str, ...]]


class SessionChange(NamedTuple):
    """One SET/RESET of a routing variable.

    variable: "shard" | "sharding_key" | "search_path" | "all" (RESET ALL)
    value: shard number (int), sharding key (str), search_path (tuple of schema names), or None
           for RESET / DEFAULT
    local: SET LOCAL
    forward: whether the statement must still go to the servers (search_path, RESET ALL)
    error: a message when the value is unusable (e.g. SET pgherd.shard = 'x'); the worker answers
           with SQLSTATE 22023 and changes nothing
    """

    variable: str
    value: Value
    local: bool = False
    forward: bool = False
    error: Optional[str] = None


def _const_text(node: dict) -> Optional[str]:
    """The text of a constant SET argument (string, number or identifier), else None."""
    t = node_type(node)
    body = node[t]
    if t == "A_Const":
        for key in ("sval", "ival", "fval", "boolval"):
            if key in body:
                inner = body[key]
                v = inner.get(key, "" if key == "sval" else 0 if key == "ival" else False)
                return str(v).lower() if key == "boolval" else str(v)
        return None
    if t == "TypeCast":
        return _const_text(body["arg"])
    return None


def change_from_stmt(stmt: dict) -> Optional[SessionChange]:
    """The SessionChange a parsed statement makes, or None if it touches no routing variable."""
    if node_type(stmt) != "VariableSetStmt":
        return None
    body = stmt["VariableSetStmt"]
    kind = body.get("kind", "")
    local = bool(body.get("is_local"))
    if kind == "VAR_RESET_ALL":
        return SessionChange("all", None, local, forward=True)
    name = (body.get("name") or "").lower()
    variable = VARIABLES.get(name)
    if variable is None:
        return None
    forward = variable not in PGHERD_VARIABLES
    if kind in ("VAR_RESET", "VAR_SET_DEFAULT"):
        return SessionChange(variable, None, local, forward)
    if kind != "VAR_SET_VALUE":
        # SET ... FROM CURRENT and the like: pgherd cannot know the value.
        return SessionChange(variable, None, local, forward, error=f"SET {name} FROM CURRENT is not supported")
    args = [_const_text(a) for a in body.get("args", [])]
    if any(a is None for a in args) or not args:
        return SessionChange(variable, None, local, forward, error=f"SET {name} needs a constant value")
    if variable == "search_path":
        return SessionChange(variable, tuple(a for a in args), local, forward)  # type: ignore[misc]
    if len(args) != 1:
        return SessionChange(variable, None, local, forward, error=f"SET {name} takes one value")
    value = args[0]
    if variable == "shard":
        if not value.strip().isdigit():
            error = f'invalid value for {name}: "{value}" (a shard number)'
            return SessionChange(variable, None, local, forward, error=error)
        return SessionChange(variable, int(value), local, forward)
    return SessionChange(variable, value, local, forward)


def session_change(sql: str) -> Optional[SessionChange]:
    """The routing change made by sql if it is a single SET/RESET of a routing variable, else None."""
    low = sql.lower()
    if "set" not in low:  # SET and RESET both contain it; most queries are neither
        return None
    try:
        stmts = parse_statements(sql)
    except ParseError:
        return None
    if len(stmts) != 1:
        return None
    return change_from_stmt(stmts[0])


def parse_search_path(text: str) -> tuple[str, ...]:
    """A search_path setting's text ("$user", public, "My Schema") as a tuple of schema names.

    Unquoted names fold to lower case and double quotes keep case, as PostgreSQL's
    SplitIdentifierString does for this setting (src/backend/utils/adt/varlena.c).
    """
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        while i < n and (text[i].isspace() or text[i] == ","):
            i += 1
        if i >= n:
            break
        if text[i] == '"':
            j = i + 1
            name = []
            while j < n:
                if text[j] == '"':
                    if j + 1 < n and text[j + 1] == '"':
                        name.append('"')
                        j += 2
                        continue
                    break
                name.append(text[j])
                j += 1
            out.append("".join(name))
            i = j + 1
        else:
            j = i
            while j < n and text[j] != "," and not text[j].isspace():
                j += 1
            out.append(text[i:j].lower())
            i = j
    return tuple(out)


_NAMES = ("shard", "sharding_key", "search_path")


class RoutingSession:
    """One client's routing variables, with SET / SET LOCAL / RESET and transaction semantics.

    The worker calls apply() for each SessionChange, end_transaction(committed) when a
    transaction block ends, and reads shard / sharding_key / search_path (the effective values).
    """

    __slots__ = ("_startup", "_session", "_tx", "_local")

    def __init__(self, startup: Optional[Mapping[str, Value]] = None) -> None:
        self._startup: dict[str, Value] = {n: None for n in _NAMES}
        for name, value in (startup or {}).items():
            self._startup[name] = value
        self._session: dict[str, Value] = dict(self._startup)
        self._tx: dict[str, Value] = {}  # SET inside the current transaction block
        self._local: dict[str, Value] = {}  # SET LOCAL inside the current transaction block

    @classmethod
    def from_startup_options(cls, params: Mapping[str, str]) -> "RoutingSession":
        """From StartupMessage parameters: search_path, and -c pgherd.shard=... inside options."""
        startup: dict[str, Value] = {}
        settings: dict[str, str] = {}
        try:
            settings.update(parse_options(params.get("options", "")))
        except ValueError:
            pass  # the worker refuses such a login before routing matters
        settings.update((k.lower(), v) for k, v in params.items() if k != "options")
        for name, value in settings.items():
            variable = VARIABLES.get(name)
            if variable == "shard" and value.strip().isdigit():
                startup["shard"] = int(value)
            elif variable == "sharding_key":
                startup["sharding_key"] = value
            elif variable == "search_path":
                startup["search_path"] = parse_search_path(value)
        return cls(startup)

    def apply(self, change: SessionChange, in_transaction: bool) -> None:
        """Apply a SET/RESET; in_transaction: the client is inside a transaction block."""
        if change.error is not None:
            return
        names = _NAMES if change.variable == "all" else (change.variable,)
        for name in names:
            value = self._startup[name] if change.value is None else change.value
            if change.local:
                if in_transaction:
                    self._local[name] = value
            elif in_transaction:
                self._tx[name] = value
                self._local.pop(name, None)
            else:
                self._session[name] = value

    def end_transaction(self, committed: bool) -> None:
        """COMMIT keeps plain SETs made in the block; ROLLBACK drops them; SET LOCAL ends either way."""
        if committed:
            self._session.update(self._tx)
        self._tx.clear()
        self._local.clear()

    def _get(self, name: str) -> Value:
        if name in self._local:
            return self._local[name]
        if name in self._tx:
            return self._tx[name]
        return self._session[name]

    @property
    def shard(self) -> Optional[int]:
        return self._get("shard")  # type: ignore[return-value]

    @property
    def sharding_key(self) -> Optional[str]:
        return self._get("sharding_key")  # type: ignore[return-value]

    @property
    def search_path(self) -> Optional[tuple[str, ...]]:
        return self._get("search_path")  # type: ignore[return-value]


