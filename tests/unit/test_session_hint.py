"""router.settings.may_change: the cheap check that keeps most queries away from the parser.

It must never miss a statement analyze() would find a session change in (a miss means a SET
pgherd does not carry to the client's next server), and it should not send ordinary writes
like "UPDATE t SET ..." to the parser.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgherd.router.settings import analyze, may_change

CHANGING = [
    "SET search_path = a, b",
    "set statement_timeout to 5",
    "SET LOCAL work_mem = '64MB'",
    "SET SESSION AUTHORIZATION alice",
    "SET ROLE alice",
    'SET"search_path"TO x',
    "RESET ALL",
    "reset work_mem",
    "DISCARD ALL",
    "SELECT set_config('application_name', 'x', false)",
    "select pg_catalog.set_config('work_mem', '1MB', false)",
    "SELECT pg_advisory_lock(1)",
    "SELECT pg_try_advisory_lock_shared(1, 2)",
    "select pg_advisory_unlock_all()",
    "UPDATE t SET a = set_config('x.y', 'z', false)",
]
PREFIXES = ["", "  ", "\n\t", "/* note */ ", "/* a /* nested */ comment */\n", "-- line\n", "-- line\r",
            "SELECT 1; ", "select 1;\n", "BEGIN;", "DO $$ BEGIN NULL; END $$; "]
PLAIN = [
    "SELECT abalance FROM pgbench_accounts WHERE aid = 12345;",
    "UPDATE pgbench_accounts SET abalance = abalance + -2990 WHERE aid = 64542;",
    "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (7, 1, 70185, 4466, CURRENT_TIMESTAMP);",
    "update t set a = 1, b = 2 where id in (select id from u where x = 'settings')",
    "SELECT * FROM settings",
    "BEGIN",
    "END",
]


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("sql", CHANGING)
def test_finds_every_change_analyze_finds(prefix: str, sql: str) -> None:
    text = prefix + sql
    assert analyze(text)[0], text  # the statement really changes session state
    assert may_change(text.encode()), text


@pytest.mark.parametrize("sql", PLAIN)
def test_leaves_ordinary_statements_alone(sql: str) -> None:
    assert not may_change(sql.encode())
    assert analyze(sql) == ((), False)


def test_parse_message_bodies() -> None:
    """A Parse body is name NUL query NUL types: the query is found after the name."""
    for name in (b"", b"stmt_1"):
        assert may_change(name + b"\x00SET work_mem = '1MB'\x00\x00\x00")
        assert not may_change(name + b"\x00UPDATE t SET a = $1\x00\x00\x01\x00\x00\x00\x17")


def test_bounds() -> None:
    """Only text[start:end] is looked at (a message inside the client's buffer)."""
    buf = b"Q\x00\x00\x00\x0dSELECT 1\x00Q\x00\x00\x00\x0eSET x = 1\x00"
    assert not may_change(buf, 5, 14)
    assert may_change(buf, 19, 29)


@given(st.sampled_from(PREFIXES), st.sampled_from(CHANGING), st.sampled_from(["", ";", "; SELECT 2"]))
def test_any_prefix_and_suffix(prefix: str, sql: str, suffix: str) -> None:
    text = prefix + sql + suffix
    if analyze(text)[0]:
        assert may_change(text.encode()), text
