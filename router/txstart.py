"""Recognising statements that open a transaction block, without the full parser.

Used where a parse would be wasted (statement pooling checks every request):
skip leading whitespace and SQL comments (-- to end of line, nested /* */, as
PostgreSQL's scanner does), then look for BEGIN or START (TRANSACTION).
"""

from __future__ import annotations

_WORDS = ("begin", "start")


def _skip_space_and_comments(sql: str, i: int) -> int:
    n = len(sql)
    while i < n:
        ch = sql[i]
        if ch.isspace() or ch == ";":
            i += 1
        elif sql.startswith("--", i):
            j = sql.find("\n", i)
            i = n if j < 0 else j + 1
        elif sql.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if sql.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif sql.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
        else:
            return i
    return i


def starts_transaction(sql: str) -> bool:
    """True if the first statement of sql is BEGIN or START TRANSACTION."""
    i = _skip_space_and_comments(sql, 0)
    for word in _WORDS:
        end = i + len(word)
        if sql[i:end].lower() == word and (end == len(sql) or not (sql[end].isalnum() or sql[end] in "_$")):
            return True
    return False
