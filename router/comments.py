"""Manual routing hints in SQL comments: /* pgherd_shard: N */, /* pgherd_sharding_key: V */.

PgDog's spellings (pgdog_shard, pgdog_sharding_key, pgdog_role) are accepted too. A hint lives in
a C-style comment anywhere in the query (leading or trailing, as ORMs append them); `--` comments
and string literals never count, so the comments are found with PostgreSQL's own scanner
(pglast.parser.scan), and only when the text contains a hint word at all (a substring test first
keeps ordinary queries at the cost of one `in`).

The value of pgherd_sharding_key is a number, a bare word (letters, digits, _, ., -, enough for a
uuid) or a single- or double-quoted string. When a comment names both a shard and a key, the
shard wins (as in PgDog, which reads the shard last).
"""

from __future__ import annotations

import re
from typing import NamedTuple, Optional

from pglast.parser import scan

__all__ = ["Hints", "manual_hints"]

_MARKS = ("_shard", "_role")
_SHARD_RE = re.compile(r"\b(?:pgherd|pgdog)_shard\s*:\s*([0-9]+)")
_KEY_RE = re.compile(r"""\b(?:pgherd|pgdog)_sharding_key\s*:\s*(?:"([^"]*)"|'([^']*)'|([0-9A-Za-z_.\-]+))""")
_ROLE_RE = re.compile(r"\b(?:pgherd|pgdog)_role\s*:\s*(primary|replica)\b")


class Hints(NamedTuple):
    """What the comments of one query ask for (None where they say nothing)."""

    shard: Optional[int]
    sharding_key: Optional[str]
    role: Optional[str]


NO_HINTS = Hints(None, None, None)


def manual_hints(sql: str) -> Hints:
    """The routing hints in the C-style comments of sql (NO_HINTS if there are none)."""
    if not any(mark in sql for mark in _MARKS):
        return NO_HINTS
    try:
        tokens = scan(sql)
    except Exception:  # an unterminated literal or comment: Postgres will report it
        return NO_HINTS
    shard = key = role = None
    for token in tokens:
        if token.name != "C_COMMENT":
            continue
        text = sql[token.start : token.end + 1]
        m = _KEY_RE.search(text)
        if m:
            key = next(g for g in m.groups() if g is not None)
        m = _SHARD_RE.search(text)
        if m:
            shard = int(m.group(1))
        m = _ROLE_RE.search(text)
        if m:
            role = m.group(1)
    if shard is None and key is None and role is None:
        return NO_HINTS
    return Hints(shard, key, role)
