"""Unit tests of the router's helpers: the byte-bounded cache, comment hints, session state, Bind values."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgherd.router.comments import NO_HINTS, manual_hints
from pgherd.router.params import Bind, parse_binary_array, parse_text_array
from pgherd.router.parse import ByteLRU, ParseError, parse_statements
from pgherd.router.session import RoutingSession, parse_search_path, session_change


# -- parsing and the cache ------------------------------------------------------------------------


def test_parse_statements_gives_raw_nodes():
    stmts = parse_statements("SELECT 1; UPDATE t SET a = 1")
    assert [next(iter(s)) for s in stmts] == ["SelectStmt", "UpdateStmt"]
    assert parse_statements("") == []
    with pytest.raises(ParseError):
        parse_statements("SELEC 1")


def test_byte_lru_evicts_least_recently_used_by_size():
    cache: ByteLRU[str, int] = ByteLRU(100, max_entry_bytes=60)
    cache.put("a", 1, 40)
    cache.put("b", 2, 40)
    assert cache.get("a") == 1  # a is now the most recent
    cache.put("c", 3, 40)  # over 100 bytes: b goes
    assert "b" not in cache and "a" in cache and "c" in cache
    assert cache.bytes == 80 and cache.evictions == 1
    assert not cache.put("huge", 4, 61)  # larger than one entry may be
    assert cache.get("huge") is None
    cache.put("a", 5, 10)  # replacing an entry frees its old size
    assert cache.bytes == 50 and cache.get("a") == 5
    assert (cache.hits, cache.misses) == (2, 1)


@given(st.lists(st.tuples(st.text(max_size=3), st.integers(1, 50)), max_size=200))
def test_byte_lru_never_exceeds_its_limit(puts):
    cache: ByteLRU[str, int] = ByteLRU(120)
    for key, size in puts:
        cache.put(key, size, size)
        assert cache.bytes <= 120
        assert cache.bytes == sum(v for _, v in cache.items())


# -- comment hints -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sql, shard, key, role",
    [
        ("SELECT 1", None, None, None),
        ("/* pgherd_shard: 3 */ SELECT 1", 3, None, None),
        ("SELECT 1 /*pgdog_shard:12*/", 12, None, None),
        ("SELECT 1 /* pgherd_sharding_key: 42 */", None, "42", None),
        ("SELECT 1 /* pgdog_sharding_key: 'a b' */", None, "a b", None),
        ('SELECT 1 /* pgdog_sharding_key: "x\'y" */', None, "x'y", None),
        ("SELECT 1 /* pgherd_sharding_key: a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11 */", None,
         "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", None),
        ("SELECT 1 /* pgdog_role: replica pgdog_shard: 2 */", 2, None, "replica"),
        ("SELECT 1 /* pgherd_sharding_key: 5 pgherd_shard: 1 */", 1, "5", None),
        ("SELECT '/* pgherd_shard: 3 */'", None, None, None),
        ("SELECT 1 -- pgherd_shard: 3", None, None, None),
        ("SELECT $$ /* pgherd_shard: 3 */ $$", None, None, None),
        ("SELECT 1 /* unterminated pgherd_shard: 3", None, None, None),
        ("SELECT my_shard: 1", None, None, None),
    ],
)
def test_manual_hints(sql, shard, key, role):
    hints = manual_hints(sql)
    assert (hints.shard, hints.sharding_key, hints.role) == (shard, key, role)


def test_no_hints_is_one_shared_value():
    assert manual_hints("SELECT * FROM t WHERE id = 5") is NO_HINTS


# -- session state ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, path",
    [
        ('"$user", public', ("$user", "public")),
        ("App, public", ("app", "public")),
        ('"My Schema",x', ("My Schema", "x")),
        ('"a""b"', ('a"b',)),
        ("", ()),
    ],
)
def test_parse_search_path(text, path):
    assert parse_search_path(text) == path


def test_session_change_recognises_routing_sets():
    assert session_change("SELECT 1") is None
    assert session_change("SET work_mem = '1MB'") is None
    c = session_change("set local PGDOG.SHARD to 2")
    assert (c.variable, c.value, c.local, c.forward) == ("shard", 2, True, False)
    c = session_change("RESET pgherd.sharding_key")
    assert (c.variable, c.value) == ("sharding_key", None)
    c = session_change("SET search_path = DEFAULT")
    assert (c.variable, c.value, c.forward) == ("search_path", None, True)
    assert session_change("RESET ALL").variable == "all"
    assert session_change("SET pgherd.shard = 'one'").error
    assert session_change("SET pgherd.shard = 1; SELECT 1") is None  # not a lone SET


def test_routing_session_reset_and_startup():
    session = RoutingSession.from_startup_options(
        {"options": r"-c pgherd.shard=2 --pgdog.sharding_key=abc -c search_path=a\,b", "application_name": "x"}
    )
    assert (session.shard, session.sharding_key, session.search_path) == (2, "abc", ("a", "b"))
    session.apply(session_change("SET pgherd.shard = 1"), in_transaction=False)
    assert session.shard == 1
    session.apply(session_change("RESET pgherd.shard"), in_transaction=False)
    assert session.shard == 2  # back to the startup value
    session.apply(session_change("SET search_path TO x"), in_transaction=False)
    session.apply(session_change("RESET ALL"), in_transaction=False)
    assert session.search_path == ("a", "b")
    session.apply(session_change("SET pgherd.shard = 'bad'"), in_transaction=False)  # errors change nothing
    assert session.shard == 2


# -- Bind values -----------------------------------------------------------------------------------


def test_bind_format_codes_follow_the_protocol():
    # no codes: all text; one code: applies to all; otherwise one per parameter
    assert Bind([b"1", b"2"]).param(2) == (b"2", False, 0)
    assert Bind([b"1", b"2"], [1]).param(2) == (b"2", True, 0)
    assert Bind([b"1", b"2"], [1, 0], [20, 25]).param(2) == (b"2", False, 25)
    assert Bind([b"1"]).param(5) == (None, False, 0)


@given(st.lists(st.one_of(st.none(), st.text(alphabet=st.characters(blacklist_categories=("Cs",))))))
def test_text_array_roundtrip(values):
    def quote(v):
        if v is None:
            return "NULL"
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'

    assert parse_text_array("{" + ",".join(quote(v) for v in values) + "}") == values


def test_text_array_forms():
    assert parse_text_array("{1, 2 ,3}") == ["1", "2", "3"]
    assert parse_text_array("{}") == []
    assert parse_text_array("{a,NULL,null}") == ["a", None, None]
    assert parse_text_array("[1:2]={7,8}") == ["7", "8"]
    assert parse_text_array("{{1,2},{3,4}}") is None
    assert parse_text_array("1,2") is None


@given(st.lists(st.one_of(st.none(), st.binary(max_size=20))))
def test_binary_array(values):
    data = struct.pack("!iiI", 1, int(None in values), 25) + struct.pack("!ii", len(values), 1)
    for v in values:
        data += struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v
    assert parse_binary_array(data) == (25, values)
    assert parse_binary_array(data[:7]) is None  # truncated header
    assert parse_binary_array(struct.pack("!iiI", 2, 0, 23)) is None  # two dimensions
