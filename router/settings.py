"""Statements that change a session's settings or pin it to its server.

Transaction pooling hands a client a different server for each transaction, so
pgherd tracks what the client expects its session to look like (worker/client.py
applies it to each server). This module only reads SQL: it turns a query string
into the list of session changes it makes. Semantics follow PostgreSQL's "SET",
"RESET", "DISCARD" and "Advisory Lock Functions" documentation.
"""

from __future__ import annotations

import re
from typing import NamedTuple, Optional

from .parse import ByteLRU, ParseError, node_type, parse_statements, text_bytes

# Only query texts may_change() finds can change session state; the rest are never parsed.
# A statement that changes it starts with SET, RESET or DISCARD (at the start of the text, or
# after a ';', a comment, or the NUL between a Parse message's statement name and its query),
# or calls set_config() or an advisory lock function. "UPDATE t SET ..." on one line is
# neither, so simple-protocol writes with inlined values are not parsed once per text.
_HINT_START = re.compile(rb"\s*(?:re)?set\b", re.I)
_HINT_INSIDE = re.compile(rb"set_config|advisory|discard|(?:[;\n\r\x00]|\*/)\s*(?:re)?set\b", re.I)
_PREFILTER_MAX = 8192  # bytes: longer texts go straight to the regex (no copy)
# Analyses cached per query text (bytes, not entries: see router/parse.py).
CACHE_BYTES = 4 * 1024 * 1024
# Settings whose value is a list of identifiers: elements are quoted as SET does
# (GUC_LIST_QUOTE in guc_tables.c).
LIST_QUOTE = frozenset(["search_path", "temp_tablespaces"])
# Settings that make the session a different user: the server stays with the client.
PINNING = frozenset(["role", "session_authorization"])
# Routing variables handled by router/session.py, never sent to servers.
OWN_PREFIXES = ("pgherd.", "pgdog.")
LOCKS = frozenset(["pg_advisory_lock", "pg_advisory_lock_shared", "pg_try_advisory_lock",
                   "pg_try_advisory_lock_shared"])
UNLOCKS = frozenset(["pg_advisory_unlock", "pg_advisory_unlock_shared"])
_PLAIN_IDENT = re.compile(r"^[a-z_][a-z0-9_$]*$")


class Change(NamedTuple):
    """kind: set | reset | reset_all | discard_all | pin | unpin | lock | unlock | unlock_all | untracked"""
    kind: str
    name: Optional[str] = None
    value: Optional[str] = None
    local: bool = False


_cache: ByteLRU[str, tuple[tuple[Change, ...], bool]] = ByteLRU(CACHE_BYTES)


def may_change(text, start: int = 0, end: int | None = None) -> bool:
    """Might text[start:end] (bytes: a query, or a Parse body) change session state?

    A cheap superset of what analyze() finds: False means it certainly does not.
    """
    if end is None:
        end = len(text)
    if end - start <= _PREFILTER_MAX:
        # Every pattern below holds one of these words: three substring searches on a
        # lower-cased copy rule out most queries at a fraction of a regex's cost. (find, not
        # `in`: bytes.__contains__ first tries its argument as an int, and builds and drops
        # a TypeError for every bytes argument.)
        low = text[start:end].lower()
        if low.find(b"set") < 0 and low.find(b"advisory") < 0 and low.find(b"discard") < 0:
            return False
    return bool(_HINT_START.match(text, start, end) or _HINT_INSIDE.search(text, start, end))


def analyze(sql: str) -> tuple[tuple[Change, ...], bool]:
    """(every session change sql makes, in order; whether sql is nothing but SET/RESET statements)."""
    if not may_change(sql.encode()):
        return (), False
    hit = _cache.get(sql)
    if hit is not None:
        return hit
    try:
        stmts = parse_statements(sql)
    except ParseError:
        out: tuple[tuple[Change, ...], bool] = ((), False)  # Postgres will reject it
    else:
        changes = tuple(c for stmt in stmts for c in _changes(stmt))
        only_set = bool(stmts) and all(node_type(s) == "VariableSetStmt" for s in stmts)
        out = (changes, only_set)
    _cache.put(sql, out, text_bytes(sql) + 64 * len(out[0]))
    return out


def session_changes(sql: str) -> tuple[Change, ...]:
    """Every session change sql makes, in order (empty for most queries)."""
    return analyze(sql)[0]


def _changes(stmt: dict) -> list[Change]:
    kind = node_type(stmt)
    node = stmt[kind]
    if kind == "VariableSetStmt":
        return _variable_set(node)
    if kind == "DiscardStmt":
        return [Change("discard_all")] if node.get("target") == "DISCARD_ALL" else []
    out: list[Change] = []
    _walk_calls(node, out)
    return out


def _variable_set(node: dict) -> list[Change]:
    vkind = node.get("kind")
    name = (node.get("name") or "").lower()
    local = bool(node.get("is_local"))
    if name.startswith(OWN_PREFIXES):
        return []
    if vkind == "VAR_RESET_ALL":
        return [Change("reset_all", local=local)]
    if vkind in ("VAR_RESET", "VAR_SET_DEFAULT"):
        return [Change("unpin" if name in PINNING else "reset", name, local=local)]
    if vkind == "VAR_SET_VALUE":
        value = _value(name, node.get("args") or [])
        if name in PINNING:
            if value is not None and value.lower() == "none":
                return [Change("unpin", name, local=local)]
            return [Change("pin", name, value, local=local)]
        if value is None:
            return [Change("untracked", name, local=local)]
        return [Change("set", name, value, local=local)]
    if vkind == "VAR_SET_MULTI":  # SET TRANSACTION / SESSION CHARACTERISTICS
        if name == "session characteristics":
            return [Change("untracked", name, local=local)]
        return []
    return [Change("untracked", name or None, local=local)]  # e.g. SET ... FROM CURRENT


def _const(arg: dict) -> Optional[str]:
    if node_type(arg) != "A_Const":
        return None
    c = arg["A_Const"]
    if "ival" in c:
        return str(c["ival"].get("ival", 0))
    if "fval" in c:
        return c["fval"].get("fval", "0")
    if "sval" in c:
        return c["sval"].get("sval", "")
    if "boolval" in c:
        return "on" if c["boolval"].get("boolval") else "off"
    return None


def _value(name: str, args: list[dict]) -> Optional[str]:
    """The setting's value as set_config() would take it (None if not a plain constant)."""
    parts = [_const(a) for a in args]
    if not parts or any(p is None for p in parts):
        return None
    if name in LIST_QUOTE:
        return ", ".join(p if _PLAIN_IDENT.match(p) else '"' + p.replace('"', '""') + '"' for p in parts)
    return ", ".join(parts)


def _walk_calls(node, out: list[Change]) -> None:
    """Find set_config() and advisory lock calls anywhere in a statement."""
    if isinstance(node, dict):
        call = node.get("FuncCall")
        if call is not None:
            _call(call, out)
        for v in node.values():
            _walk_calls(v, out)
    elif isinstance(node, list):
        for v in node:
            _walk_calls(v, out)


def _call(call: dict, out: list[Change]) -> None:
    names = [n["String"]["sval"].lower() for n in call.get("funcname", []) if "String" in n]
    fname = names[-1] if names else ""
    args = call.get("args") or []
    if fname == "set_config":
        consts = [_const(a) for a in args]
        if len(consts) == 3 and None not in consts:
            name, value, is_local = consts[0].lower(), consts[1], consts[2] in ("on", "true", "t")
            if not name.startswith(OWN_PREFIXES):
                if name in PINNING:
                    out.append(Change("pin", name, value, local=is_local))
                else:
                    out.append(Change("set", name, value, local=is_local))
        else:
            out.append(Change("untracked", "set_config"))
    elif fname in LOCKS:
        out.append(Change("lock"))
    elif fname in UNLOCKS:
        out.append(Change("unlock"))
    elif fname == "pg_advisory_unlock_all":
        out.append(Change("unlock_all"))
