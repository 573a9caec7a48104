"""shared/wire/scan.py: the fast path's byte scans, in C (_scan.c) and in Python.

The C functions must give the Python reference's answer for every input, and
plain_queries must decide every query text as router.settings.may_change does (a
miss means a SET the client's next server does not get).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pgherd.router.settings import may_change
from pgherd.shared.wire import scan
from pgherd.tests.unit.test_session_hint import CHANGING

try:
    from pgherd.shared.wire import _scan
except ImportError:  # (the test below says why that fails the suite)
    _scan = None


def msg(t: bytes, body: bytes) -> bytes:
    return t + (len(body) + 4).to_bytes(4, "big") + body


def query(sql: str) -> bytes:
    return msg(b"Q", sql.encode() + b"\x00")


PGBENCH = query("SELECT abalance FROM pgbench_accounts WHERE aid = 12345;")
REPLY = (msg(b"T", bytes(25)) + msg(b"D", b"\x00\x01\x00\x00\x00\x010") + msg(b"C", b"SELECT 1\x00")
         + msg(b"Z", b"I"))
BIG = 1 << 30

IMPLS = [pytest.param(scan.plain_queries_py, scan.reply_end_py, id="python")]
if _scan is not None:
    IMPLS.append(pytest.param(_scan.plain_queries, _scan.reply_end, id="c"))


def test_the_c_scans_are_built_and_used():
    if os.environ.get("PGHERD_NO_SPEEDUPS"):
        assert not scan.ACCELERATED
        return
    assert _scan is not None, ("the C extension pgherd.shared.wire._scan was not built: install a C compiler "
                               "and Python's headers and reinstall, or set PGHERD_NO_SPEEDUPS=1")
    assert scan.ACCELERATED and scan.plain_queries is _scan.plain_queries and scan.reply_end is _scan.reply_end


@pytest.mark.parametrize("plain_queries, reply_end", IMPLS)
def test_known_requests_and_replies(plain_queries, reply_end):
    buf = bytearray(PGBENCH + query("select 2") + b"junk after the end")
    assert plain_queries(buf, len(PGBENCH), BIG) == 1
    assert plain_queries(buf, len(PGBENCH) + len(query("select 2")), BIG) == 2
    assert plain_queries(buf, len(PGBENCH) - 1, BIG) == -1  # a message cut short
    assert plain_queries(buf, 3, BIG) == -1  # a header cut short
    assert plain_queries(buf, len(PGBENCH), 10) == -1  # over max_message_size
    for sql in ["reset all", "select pg_advisory_lock(1)", "DISCARD ALL", "SeT x=1", "select 1;set x=1",
                "/* c */ SET x=1", "select 1\n  reset x", "select set_config('a', 'b', false)", " set"]:
        assert plain_queries(bytearray(query(sql)), len(query(sql)), BIG) == -1, sql
    for sql in ["UPDATE t SET a = 1", "select 1 offset 2", "select 1 as reset", "select 'preset'", "select settings"]:
        assert plain_queries(bytearray(query(sql)), len(query(sql)), BIG) == 1, sql
    for other in [msg(b"P", b"\x00select 1\x00\x00\x00") + msg(b"S", b""), msg(b"X", b"")]:
        assert plain_queries(other, len(other), BIG) == -1
    assert plain_queries(b"", 0, BIG) == -1

    rbuf = bytearray(b"xx" + REPLY + b"stale bytes")
    assert reply_end(rbuf, 2, 2 + len(REPLY)) == 2 + len(REPLY)
    assert reply_end(rbuf, 2, 1 + len(REPLY)) == -1  # ReadyForQuery cut short
    assert reply_end(rbuf, 2, len(REPLY) - 4) == -1  # its header cut short: stale bytes follow
    for odd in [msg(b"E", b"SERROR\x00\x00") + msg(b"Z", b"I"),
                msg(b"S", b"a\x00b\x00") + msg(b"Z", b"I"),
                msg(b"G", b"\x00\x00\x00") + msg(b"Z", b"I"),
                msg(b"Z", b"I") + msg(b"Z", b"I"),  # two ReadyForQuery: the scan must see both
                msg(b"Z", b"IX"),  # a ReadyForQuery of the wrong length
                msg(b"C", b"SELECT 1\x00")]:  # no ReadyForQuery yet
        assert reply_end(odd, 0, len(odd)) == -1, odd


@pytest.mark.skipif(_scan is None, reason="needs the C extension (test_the_c_scans_are_built_and_used fails)")
def test_the_c_scans_check_their_arguments():
    with pytest.raises(ValueError):
        _scan.plain_queries(bytearray(10), 11, BIG)
    with pytest.raises(ValueError):
        _scan.reply_end(bytearray(10), 5, 4)
    with pytest.raises(ValueError):
        _scan.reply_end(bytearray(10), -1, 4)
    with pytest.raises(TypeError):
        _scan.reply_end("text", 0, 1)
    with pytest.raises(TypeError):
        _scan.plain_queries(bytearray(10), 1)


WORDS = st.sampled_from(["set", "SeT", "reset", "RE", "advisory", "ADVISORY", "discard", "Discard", "select 1",
                         "se", "t", "advisor", "discar", "_config", "_x", "off", " ", "\t", "\x0b", ";", "\n",
                         "\r", "\x00", "*/", "/*", "*", "/", "update t ", "é", "1"])
SQL = st.lists(WORDS, max_size=6).map("".join)
TYPES = st.sampled_from(b"QPBEDSZCTGWHX1")
MESSAGE = st.one_of(
    SQL.map(query),
    st.sampled_from([msg(b"Z", b"I"), msg(b"Z", b"T"), msg(b"C", b"SELECT 1\x00"), msg(b"S", b"a\x00b\x00")]),
    st.tuples(TYPES, st.binary(max_size=12)).map(lambda tb: msg(bytes([tb[0]]), tb[1])),
    st.binary(min_size=1, max_size=8),  # garbage: lengths that do not fit
)


@settings(max_examples=600, deadline=None)
@given(st.lists(MESSAGE, max_size=5), st.integers(0, 8), st.integers(0, 8), st.integers(4, 64))
@example([PGBENCH], 0, 0, BIG)
@example([REPLY], 0, 0, BIG)
def test_c_and_python_agree(messages, cut_start, cut_end, max_size):
    buf = bytearray(b"".join(messages) + b"\x00Z\x00\x00\x00\x05I")  # stale bytes past end
    end = max(0, len(buf) - 7 - cut_end)
    start = min(cut_start, end)
    py = (scan.plain_queries_py(buf, end, max_size), scan.reply_end_py(buf, start, end))
    if _scan is not None:
        assert (_scan.plain_queries(buf, end, max_size), _scan.reply_end(buf, start, end)) == py
    assert py[0] == -1 or py[0] >= 1
    assert py[1] in (-1, end)


@settings(max_examples=1500, deadline=None)
@given(SQL)
@example("SET search_path = a")
@example("x\n set")
@example("x */ReSet")
@example("x\x00 set")
def test_plain_queries_decides_as_may_change(sql):
    """The C scan implements may_change's regular expressions by hand: it must agree on every text."""
    q = query(sql)
    expected = -1 if may_change(q, 5, len(q) - 1) else 1
    assert scan.plain_queries_py(q, len(q), BIG) == expected
    if _scan is not None:
        assert _scan.plain_queries(q, len(q), BIG) == expected


@pytest.mark.parametrize("sql", CHANGING)
def test_plain_queries_rejects_every_session_change(sql):
    q = query(sql)
    assert scan.plain_queries(q, len(q), BIG) == -1
    assert scan.plain_queries_py(q, len(q), BIG) == -1
