"""Unit tests of the cross-shard merge: planning (router/mergeplan.py), value codecs
(router/values.py) and the mergers (router/merge.py). Pure and fast; the comparison with real
Postgres is tests/integration/test_merge_oracle.py."""

from __future__ import annotations

import datetime
import math
import random
import struct
import uuid
from decimal import ROUND_HALF_UP, Context, Decimal, localcontext
from typing import Any, Optional, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgherd.router import merge as MG
from pgherd.router.merge import AggregateMerge, MergeError, MergeRefused, OrderedMerge, plan_merge, split_row
from pgherd.router.mergeplan import Param, SortKey, clear_cache
from pgherd.router.params import Bind
from pgherd.router.values import (BOOL, BPCHAR, DATE, FLOAT4, FLOAT8, INT2, INT4, INT8, NAME, NUMERIC, TEXTOID,
                                  TIMESTAMP, TIMESTAMPTZ, UUID, VARCHAR, collation_supported, decode, encode,
                                  float_text, key_function, to_float4)
from pgherd.shared.wire import messages as M

F = M.Field


def body(values: Sequence[Optional[bytes | str]]) -> bytes:
    return M.data_row(list(values))[5:]


def rows_of(messages: list[bytes]) -> list[list[Optional[bytes]]]:
    for m in messages:
        assert m[:1] == b"D" and struct.unpack("!I", m[1:5])[0] == len(m) - 1
    return [split_row(m[5:]) for m in messages]


def drive(m: Any, streams: dict[Any, list[bytes]], rng: Optional[random.Random] = None,
          max_queued: Optional[list] = None) -> list[list[Optional[bytes]]]:
    """Feed shard streams to a merger as the worker does: only shards in `waiting`, one row at a
    time in a random order; return the merged rows."""
    rng = rng or random.Random(0)
    pos = {s: 0 for s in streams}
    ended: set = set()
    out: list[bytes] = []
    while not m.done:
        waiting = sorted(s for s in m.waiting if s not in ended)
        if not waiting:
            break
        s = rng.choice(waiting)
        if pos[s] < len(streams[s]):
            m.push(s, streams[s][pos[s]])
            pos[s] += 1
        else:
            m.end(s)
            ended.add(s)
        out += m.pop_ready()
        if max_queued is not None and hasattr(m, "queues"):
            max_queued[0] = max(max_queued[0], sum(len(q) for q in m.queues.values()))
    out += m.pop_ready()
    return rows_of(out)


# ================================================================================================
# Planning


@pytest.mark.parametrize("sql, shard_sql", [
    ("SELECT a, b FROM t ORDER BY b DESC, a LIMIT 10 OFFSET 5",
     "SELECT a, b FROM t ORDER BY 2 DESC NULLS FIRST, 1 ASC NULLS LAST LIMIT 15"),
    ("SELECT a FROM t ORDER BY a LIMIT 3", "SELECT a FROM t ORDER BY 1 ASC NULLS LAST LIMIT 3"),
    ("SELECT a FROM t OFFSET 3", "SELECT a FROM t"),
    ("SELECT a FROM t ORDER BY b", "SELECT a, b AS pgherd_h1 FROM t ORDER BY 2 ASC NULLS LAST"),
    ("SELECT a AS x FROM t ORDER BY x DESC NULLS LAST", "SELECT a AS x FROM t ORDER BY 1 DESC NULLS LAST"),
    ("SELECT * FROM t ORDER BY name", "SELECT *, name AS pgherd_h1 FROM t ORDER BY name ASC NULLS LAST"),
    ("SELECT avg(x) FROM t",
     "SELECT avg(x), pg_catalog.count(x) AS pgherd_h1, pg_catalog.sum(x) AS pgherd_h2 FROM t"),
    ("SELECT g, stddev(x) FROM t GROUP BY g",
     "SELECT g, stddev(x), pg_catalog.count(x) AS pgherd_h1, pg_catalog.sum(x) AS pgherd_h2, "
     "pg_catalog.sum(CAST(x AS numeric) * CAST(x AS numeric)) AS pgherd_h3, pg_catalog.var_pop(x) AS pgherd_h4 "
     "FROM t GROUP BY g ORDER BY 1 ASC NULLS LAST"),
    ("SELECT g, count(*) FROM t GROUP BY g HAVING count(*) > 1 AND g <> 3 ORDER BY 2 DESC LIMIT 5",
     "SELECT g, count(*) FROM t GROUP BY g HAVING g <> 3"),
    ("SELECT g, count(*) FROM t GROUP BY g ORDER BY g LIMIT 5 OFFSET 1",
     "SELECT g, count(*) FROM t GROUP BY g ORDER BY 1 ASC NULLS LAST LIMIT 6"),
    ("SELECT count(*) FROM t GROUP BY g",
     "SELECT count(*), g AS pgherd_h1 FROM t GROUP BY g ORDER BY 2 ASC NULLS LAST"),
    ("SELECT sum(x) FILTER (WHERE y) FROM t", "SELECT sum(x) FILTER (WHERE y) FROM t"),
    ("SELECT avg(DISTINCT id) FROM t", "SELECT avg(DISTINCT id), pg_catalog.count(DISTINCT id) AS pgherd_h1, "
                                       "pg_catalog.sum(DISTINCT id) AS pgherd_h2 FROM t"),
    ("SELECT DISTINCT a, b FROM t", "SELECT DISTINCT a, b FROM t ORDER BY 1 ASC NULLS LAST, 2 ASC NULLS LAST"),
    ("SELECT DISTINCT ON (a) a, b FROM t ORDER BY a, b DESC",
     "SELECT DISTINCT ON (a) a, b FROM t ORDER BY 1 ASC NULLS LAST, 2 DESC NULLS FIRST"),
    ("SELECT DISTINCT ON (a) a, b FROM t", "SELECT DISTINCT ON (a) a, b FROM t ORDER BY 1 ASC NULLS LAST"),
    ("SELECT a FROM t UNION ALL SELECT a FROM u ORDER BY 1 LIMIT 4",
     "SELECT a FROM t UNION ALL SELECT a FROM u ORDER BY 1 ASC NULLS LAST LIMIT 4"),
    ("SELECT a FROM t UNION SELECT a FROM u", "SELECT a FROM t UNION SELECT a FROM u ORDER BY 1 ASC NULLS LAST"),
    ("SELECT a FROM t ORDER BY a LIMIT $1 OFFSET $2",
     "SELECT a FROM t ORDER BY 1 ASC NULLS LAST LIMIT (CAST($1 AS bigint) + COALESCE(CAST($2 AS bigint), 0))"),
    ("SELECT a FROM t ORDER BY a OFFSET $1",
     "SELECT a FROM t ORDER BY 1 ASC NULLS LAST LIMIT NULLIF(CAST($1 AS bigint), CAST($1 AS bigint))"),
    ("SELECT a FROM t ORDER BY a LIMIT -1 OFFSET 2", "SELECT a FROM t ORDER BY 1 ASC NULLS LAST LIMIT -1 OFFSET 2"),
    ("SELECT g, count(*) FROM t GROUP BY g HAVING count(*) > $1",
     "SELECT g, count(*) FROM t GROUP BY g HAVING count(*) > $1 OR TRUE ORDER BY 1 ASC NULLS LAST"),
    # GROUP BY the sharding key: every group is on one shard, merged as rows.
    ("SELECT id, string_agg(t, ',') FROM t GROUP BY id ORDER BY 2 LIMIT 2",
     "SELECT id, string_agg(t, ',') FROM t GROUP BY id ORDER BY 2 ASC NULLS LAST LIMIT 2"),
])
def test_shard_sql(sql: str, shard_sql: str) -> None:
    assert plan_merge(sql, {"id"}).shard_sql == shard_sql


def test_plan_fields() -> None:
    p = plan_merge("SELECT a, b AS y, c FROM t ORDER BY y, 3 DESC, c + 1 NULLS FIRST LIMIT 5")
    assert p.mode == "rows"
    assert p.sort == (SortKey(1), SortKey(2, True, True), SortKey(-1, False, True))
    assert p.hidden == 1 and p.limit == 5 and p.offset is None and p.shard_limited
    assert p.client_fields([F("a"), F("y"), F("c"), F("h")]) == [F("a"), F("y"), F("c")]
    assert p.shard_formats([]) == [] and p.shard_formats([1]) == [1]
    assert p.shard_formats([0, 1, 0]) == [0, 1, 0, 1]

    p = plan_merge("SELECT g, avg(x), count(*) FROM t GROUP BY g HAVING max(y) > 3 ORDER BY 2 DESC")
    assert p.mode == "groups" and not p.streaming and p.sort == ()
    assert p.order == (SortKey(1, True, True),)
    assert [a.func for a in p.aggregates] == ["avg", "count", "max"]
    assert p.aggregates[0].helpers == (-3, -2) and p.aggregates[2].column == -1
    assert p.having == ("cmp", ">", ("col", -1), ("const", "int", "3"))
    assert p.group_by == (0,)

    p = plan_merge("SELECT *, a + 1 AS z FROM t ORDER BY z, 2")
    assert p.sort == (SortKey(-1), SortKey(1)) and p.hidden == 0

    p = plan_merge("SELECT a, b FROM t ORDER BY a FETCH FIRST 3 ROWS WITH TIES")
    assert p.with_ties and p.limit == 3
    assert plan_merge("SELECT a FROM t LIMIT $2 OFFSET $1").limit == Param(2)
    assert plan_merge("SELECT a FROM t LIMIT 2.5").limit == 3
    assert plan_merge("SELECT a FROM t LIMIT ALL").limit is None


def test_group_by_names() -> None:
    # An alias whose expression reads a column of the same name: GROUP BY means the input column.
    p = plan_merge("SELECT coalesce(city, 'none') AS city, count(*) FROM t GROUP BY city")
    assert p.group_by == (-1,) and "city AS pgherd_h1" in p.shard_sql
    # An alias of another expression: the output column.
    p = plan_merge("SELECT date_trunc('day', ts) AS day, count(*) FROM t GROUP BY day")
    assert p.group_by == (0,) and p.hidden == 0
    p = plan_merge("SELECT x % 3, count(*) FROM t GROUP BY x % 3")
    assert p.group_by == (0,)
    p = plan_merge("SELECT count(*) FROM t GROUP BY 1 + 1, g")
    assert len(p.group_by) == 2


@pytest.mark.parametrize("sql, words, code", [
    ("SELECT string_agg(t, ',') FROM t", "string_agg", "0A000"),
    ("SELECT array_agg(x) FROM t GROUP BY g", "array_agg", "0A000"),
    ("SELECT sum(x) + 1 FROM t", "inside an expression", "0A000"),
    ("SELECT g FROM t GROUP BY g ORDER BY sum(x) / count(*)", "expression over aggregates", "0A000"),
    ("SELECT count(DISTINCT x) FROM t", "sharding key", "0A000"),
    ("SELECT stddev(DISTINCT id) FROM t", "sharding key", "0A000"),
    ("SELECT rank() OVER (ORDER BY a) FROM t", "window function rank", "0A000"),
    ("SELECT a FROM t WINDOW w AS (ORDER BY a)", "window function", "0A000"),
    ("SELECT a FROM t INTERSECT SELECT a FROM u", "INTERSECT", "0A000"),
    ("SELECT a FROM t EXCEPT SELECT a FROM u", "EXCEPT", "0A000"),
    ("SELECT a FROM t UNION ALL (SELECT a FROM u UNION SELECT a FROM v)", "UNION", "0A000"),
    ("SELECT a FROM t ORDER BY a LIMIT 1 FOR UPDATE", "FOR UPDATE", "0A000"),
    ("SELECT a FROM t ORDER BY a COLLATE \"en_US\"", "en_US", "0A000"),
    ("SELECT a FROM t ORDER BY a USING ~<~", "USING", "0A000"),
    ("SELECT a FROM t LIMIT (SELECT 1)", "LIMIT", "0A000"),
    ("SELECT a, count(*) FROM t GROUP BY ROLLUP (a)", "ROLLUP", "0A000"),
    ("SELECT g FROM t GROUP BY g HAVING sum(x) + 1 > 3", "expression over aggregates", "0A000"),
    ("SELECT g FROM t GROUP BY g HAVING sum(x) > (SELECT 1)", "HAVING", "0A000"),
    ("SELECT g FROM t GROUP BY g HAVING sum(x) LIKE 'a'", "HAVING", "0A000"),
    ("SELECT DISTINCT ON (g) g, count(*) FROM t GROUP BY g", "DISTINCT ON", "0A000"),
    ("SELECT *, count(*) FROM t GROUP BY id2", "*", "0A000"),
    ("SELECT a FROM t ORDER BY 3", "position 3", "42P10"),
    ("SELECT a, b FROM t ORDER BY a DESC, b DISTINCT", "syntax error", "42601"),
    ("INSERT INTO t VALUES (1)", "only SELECT", "0A000"),
    ("SELECT 1; SELECT 2", "several statements", "0A000"),
    ("VALUES (1), (2) ORDER BY 1", "VALUES", "0A000"),
    ("SELECT DISTINCT ON (a) a, b FROM t ORDER BY b", "DISTINCT ON", "42P10"),
    ("SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY x) FROM t", "percentile_cont", "0A000"),
])
def test_refusals(sql: str, words: str, code: str) -> None:
    with pytest.raises(MergeRefused) as e:
        plan_merge(sql, {"id"})
    assert words in e.value.message and e.value.code == code


def test_plan_cache() -> None:
    clear_cache()
    a = plan_merge("SELECT a FROM t ORDER BY a")
    assert plan_merge("SELECT a FROM t ORDER BY a") is a
    assert plan_merge("SELECT a FROM t ORDER BY a", {"a"}) is not a
    for _ in range(2):  # a cached refusal is raised again, as a fresh exception
        with pytest.raises(MergeRefused, match="string_agg"):
            plan_merge("SELECT string_agg(t, ',') FROM t")


def test_limits_from_bind() -> None:
    p = plan_merge("SELECT a FROM t ORDER BY a LIMIT $1 OFFSET $2")
    assert p.limits(Bind([b"5", b"2"])) == (5, 2)
    assert p.limits(Bind([None, None])) == (None, 0)
    assert p.limits(Bind([struct.pack("!q", 7), struct.pack("!i", 1)], [1])) == (7, 1)
    with pytest.raises(MergeError) as e:
        p.limits(Bind([b"-1", b"0"]))
    assert e.value.code == "2201W"
    with pytest.raises(MergeError) as e:
        p.limits(Bind([b"1", b"-3"]))
    assert e.value.code == "2201X"
    with pytest.raises(MergeError) as e:
        p.limits(Bind([b"x", b"1"]))
    assert e.value.code == "22P02"


# ================================================================================================
# Values

INTS = {INT2: (-(1 << 15), (1 << 15) - 1), INT4: (-(1 << 31), (1 << 31) - 1), INT8: (-(1 << 63), (1 << 63) - 1)}


@given(st.data())
def test_int_codecs(data: Any) -> None:
    oid = data.draw(st.sampled_from(sorted(INTS)))
    v = data.draw(st.integers(*INTS[oid]))
    for fmt in (0, 1):
        raw = encode(oid, fmt, v)
        assert decode(oid, fmt, raw) == v and key_function(oid, fmt)(raw) == v
    assert encode(oid, 0, v) == str(v).encode()
    with pytest.raises(ValueError):
        encode(oid, 0, INTS[oid][1] + 1)


NUMERICS = st.builds(lambda u, s: Decimal(f"{u}E-{s}") if s else Decimal(u), st.integers(-10 ** 40, 10 ** 40),
                     st.integers(0, 30))


@given(NUMERICS)
def test_numeric_codecs(d: Decimal) -> None:
    text = encode(NUMERIC, 0, d)
    assert Decimal(text.decode()) == d
    scale = max(0, -d.as_tuple().exponent)
    assert len(text.split(b".")[1]) == scale if scale else b"." not in text
    for fmt in (0, 1):
        back = decode(NUMERIC, fmt, encode(NUMERIC, fmt, d))
        assert back == d and back.as_tuple().exponent == d.as_tuple().exponent or (d == 0 and back == 0)
    assert decode(NUMERIC, 1, encode(NUMERIC, 1, d)) == decode(NUMERIC, 0, text)


def test_numeric_specials_and_layout() -> None:
    for fmt in (0, 1):
        for s in ("NaN", "Infinity", "-Infinity"):
            assert str(decode(NUMERIC, fmt, encode(NUMERIC, fmt, Decimal(s)))) == s
    assert encode(NUMERIC, 0, Decimal("-0.00")) == b"0.00"
    assert encode(NUMERIC, 0, Decimal("0.0050")) == b"0.0050"
    # numeric_send: ndigits, weight, sign, dscale, base-10000 digits without zero ends.
    assert encode(NUMERIC, 1, Decimal("12345.6700")) == struct.pack("!hhHH3h", 3, 1, 0, 4, 1, 2345, 6700)
    assert encode(NUMERIC, 1, Decimal("-0.0001")) == struct.pack("!hhHHh", 1, -1, 0x4000, 4, 1)
    assert encode(NUMERIC, 1, Decimal("100000000")) == struct.pack("!hhHHh", 1, 2, 0, 0, 1)
    assert encode(NUMERIC, 1, Decimal("Infinity")) == struct.pack("!hhHH", 0, 0, 0xD000, 32)


@given(st.lists(st.one_of(NUMERICS, st.sampled_from([Decimal("NaN"), Decimal("Infinity"), Decimal("-Infinity")])),
                min_size=2, max_size=8))
def test_numeric_order(values: list[Decimal]) -> None:
    """numeric order: by value (1.0 = 1.00), -Infinity < finite < Infinity < NaN."""
    def rank(d: Decimal) -> tuple:
        return (3,) if d.is_nan() else (1, d) if d.is_finite() else ((0,) if d < 0 else (2,))

    for fmt in (0, 1):
        keys = [key_function(NUMERIC, fmt)(encode(NUMERIC, fmt, d)) for d in values]
        for a, ka in zip(values, keys):
            for b, kb in zip(values, keys):
                assert (ka < kb) == (rank(a) < rank(b)) and (ka == kb) == (rank(a) == rank(b))
                if ka == kb:
                    assert hash(ka) == hash(kb)


@given(st.floats(allow_nan=False, allow_infinity=True))
def test_float8_text(x: float) -> None:
    text = float_text(x)
    assert float(text) == x and math.copysign(1, float(text)) == math.copysign(1, x)
    assert decode(FLOAT8, 1, encode(FLOAT8, 1, x)) == x
    assert decode(FLOAT8, 0, encode(FLOAT8, 0, x)) == x


@given(st.floats(width=32, allow_nan=False, allow_infinity=False))
def test_float4_text(x: float) -> None:
    text = float_text(x, single=True)
    assert to_float4(float(text)) == x
    assert len(text.lstrip("-").split("e")[0].replace(".", "").strip("0")) <= 9
    assert decode(FLOAT4, 1, encode(FLOAT4, 1, x)) == x


def test_float_text_cases() -> None:
    # Cases checked against Postgres 16 (extra_float_digits = 1; and 0 for the last ones).
    assert [float_text(x) for x in (1e15, 1e14, 123456789012345.6, 1e-4, 1e-5, 0.00012345, 1.5e300, 1e16,
                                    9007199254740993.0, -0.0, 1e23, float("nan"), float("-inf"))] == [
        "1e+15", "100000000000000", "123456789012345.6", "0.0001", "1e-05", "0.00012345", "1.5e+300", "1e+16",
        "9.007199254740992e+15", "-0", "9.999999999999999e+22", "NaN", "-Infinity"]
    assert [float_text(x, True) for x in (1e6, 1e5, 123456.0, 1234567.0, 3.4e38, 0.1)] == [
        "1e+06", "100000", "123456", "1.234567e+06", "3.4e+38", "0.1"]
    assert float_text(-63281352.0, True) == "-6.3281352e+07"  # on an interval bound: not shortest
    assert float_text(1 / 3, extra_float_digits=0) == "0.333333333333333"
    assert float_text(1e15, extra_float_digits=0) == "1e+15"


def test_float_order() -> None:
    values = [float("-inf"), -1.5, -0.0, 0.0, 2.0, float("inf"), float("nan")]
    for oid, fmt in ((FLOAT8, 0), (FLOAT8, 1), (FLOAT4, 0), (FLOAT4, 1)):
        k = key_function(oid, fmt)
        keys = [k(encode(oid, fmt, v)) for v in values]
        assert keys == sorted(keys)
        assert keys[2] == keys[3] and hash(keys[2]) == hash(keys[3])  # -0 = 0
        assert keys[-1] == k(encode(oid, fmt, float("nan"))) and keys[-2] < keys[-1]  # NaN = NaN, > inf


@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")),
                min_size=2, max_size=6))
def test_text_order_is_code_point_order(values: list[str]) -> None:
    for oid in (TEXTOID, VARCHAR, NAME):
        k = key_function(oid, 0)
        assert sorted(values, key=lambda s: k(s.encode())) == sorted(values)


def test_bpchar_ignores_trailing_spaces() -> None:
    k = key_function(BPCHAR, 0)
    assert k(b"ab  ") == k(b"ab") and k(b"a") < k(b"a\t") and k(b"a ") < k(b"ab")


@given(st.dates(), st.dates())
def test_date_keys(a: datetime.date, b: datetime.date) -> None:
    ka, kb = (key_function(DATE, 0)(d.isoformat().rjust(10, "0").encode()) for d in (a, b))
    assert (ka < kb) == (a < b) and (ka == kb) == (a == b)
    assert ka == (a - datetime.date(2000, 1, 1)).days
    assert key_function(DATE, 1)(struct.pack("!i", ka)) == ka


def test_date_and_timestamp_specials() -> None:
    k = key_function(DATE, 0)
    assert k(b"-infinity") < k(b"4713-01-01 BC") < k(b"0001-12-31 BC") < k(b"0001-01-01") < k(b"5874897-12-31") \
        < k(b"infinity")
    assert k(b"0001-01-01") - k(b"0001-12-31 BC") == 1
    t = key_function(TIMESTAMP, 0)
    assert t(b"2000-01-01 00:00:00") == 0 and t(b"2000-01-01 00:00:00.5") == 500000
    assert t(b"1999-12-31 23:59:59.999999") == -1 and t(b"infinity") == (1 << 63) - 1
    assert t(b"294276-12-31 23:59:59.999999") > t(b"2000-01-01 00:00:00") > t(b"4713-11-24 00:00:00 BC")
    z = key_function(TIMESTAMPTZ, 0)
    assert z(b"2024-01-01 15:30:00.5+05:30") == z(b"2024-01-01 10:00:00.5+00")
    assert z(b"1900-01-01 05:21:10+05:21:10") == z(b"1900-01-01 00:00:00+00")
    assert z(b"0044-03-15 10:00:00+05:53:28 BC") < z(b"0001-01-01 00:00:00+00")
    assert key_function(TIMESTAMPTZ, 1)(struct.pack("!q", 86_400_000_000)) == z(b"2000-01-02 00:00:00+00")
    with pytest.raises(ValueError):
        k(b"01/02/2024")  # DateStyle SQL: not read


@given(st.uuids(), st.uuids())
def test_uuid_keys(a: uuid.UUID, b: uuid.UUID) -> None:
    kt, kb = key_function(UUID, 0), key_function(UUID, 1)
    assert kt(str(a).encode()) == kb(a.bytes) == a.bytes
    assert (kt(str(a).encode()) < kt(str(b).encode())) == (a.bytes < b.bytes)


def test_bool_and_collations() -> None:
    assert key_function(BOOL, 0)(b"f") < key_function(BOOL, 0)(b"t")
    assert key_function(BOOL, 1)(b"\x00") < key_function(BOOL, 1)(b"\x01")
    assert encode(BOOL, 0, True) == b"t" and encode(BOOL, 1, False) == b"\x00"
    assert key_function(1186, 0) is None  # interval: not merged
    for c in ("C", "POSIX", "C.UTF-8", "C.utf8", '"C"', "ucs_basic"):
        assert collation_supported(c)
    for c in ("en_US.UTF-8", "de_DE", "und-x-icu", ""):
        assert not collation_supported(c)


# ================================================================================================
# Ordered merge

KEYS = st.one_of(st.none(), st.integers(-50, 50))


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_ordered_merge_equals_sorted(data: Any) -> None:
    """Random sorted shard streams merged equal sorted() of all rows, with NULL placement,
    directions, LIMIT/OFFSET, text and binary formats, and O(shards) queued rows."""
    shards = data.draw(st.integers(1, 5))
    rows = data.draw(st.lists(st.tuples(KEYS, st.text(max_size=3)), max_size=60))
    desc = data.draw(st.booleans())
    nulls_first = data.draw(st.sampled_from([None, True, False]))
    limit = data.draw(st.one_of(st.none(), st.integers(0, 70)))
    offset = data.draw(st.one_of(st.none(), st.integers(0, 70)))
    fmt = data.draw(st.sampled_from([0, 1]))
    order = "DESC" if desc else "ASC"
    nulls = "" if nulls_first is None else (" NULLS FIRST" if nulls_first else " NULLS LAST")
    tail = (f" LIMIT {limit}" if limit is not None else "") + (f" OFFSET {offset}" if offset is not None else "")
    plan = plan_merge(f"SELECT k, v FROM t ORDER BY k {order}{nulls}, v{tail}")
    nf = desc if nulls_first is None else nulls_first

    def sort_key(r: tuple) -> tuple:
        k, v = r
        major = (0 if nf else 2,) if k is None else (1, -k if desc else k)
        return (major, v.encode())

    def enc(r: tuple) -> bytes:
        k, v = r
        return body([None if k is None else (struct.pack("!i", k) if fmt else str(k).encode()), v])

    parts: dict[int, list] = {s: [] for s in range(shards)}
    for i, r in enumerate(rows):
        parts[data.draw(st.integers(0, shards - 1), label=f"shard of row {i}")].append(r)
    streams = {s: [enc(r) for r in sorted(p, key=sort_key)] for s, p in parts.items()}
    fields = [F("k", type_oid=INT4, format=fmt), F("v", type_oid=TEXTOID, format=fmt)]
    m = plan.merger(fields, shards)
    queued = [0]
    got = drive(m, streams, random.Random(data.draw(st.integers(0, 1000))), queued)
    expected = [enc(r) for r in sorted(rows, key=sort_key)]
    start = offset or 0
    expected = expected[start:start + limit if limit is not None else None]
    assert [body(r) for r in got] == expected
    assert m.rows == len(got)
    assert queued[0] <= shards


def test_ordered_merge_stops_early() -> None:
    plan = plan_merge("SELECT a FROM t ORDER BY a LIMIT 3 OFFSET 1")
    m = plan.merger([F("a", type_oid=INT8)], [10, 20])
    assert isinstance(m, OrderedMerge)
    assert isinstance(plan_merge("SELECT count(*) FROM t").merger([F("count", type_oid=INT8)], 1), AggregateMerge)
    assert m.waiting == {10, 20}
    m.push(10, body([b"1"]))
    assert m.pop_ready() == [] and m.waiting == {20}
    m.push(20, body([b"2"]))
    m.push(20, body([b"3"]))
    m.push(10, body([b"4"]))
    m.push(10, body([b"5"]))
    m.push(20, body([b"6"]))
    assert rows_of(m.pop_ready()) == [[b"2"], [b"3"], [b"4"]]
    assert m.done and m.waiting == set() and m.rows == 3
    m.push(10, body([b"7"]))  # ignored after done
    assert m.pop_ready() == []


def test_ordered_merge_without_order_and_hidden_columns() -> None:
    plan = plan_merge("SELECT a FROM t LIMIT 2")
    m = plan.merger([F("a", type_oid=INT8)], 2)
    m.push(1, body([b"9"]))
    assert rows_of(m.pop_ready()) == [[b"9"]] and not m.done
    m.push(0, body([b"8"]))
    assert rows_of(m.pop_ready()) == [[b"8"]] and m.done

    plan = plan_merge("SELECT a FROM t ORDER BY b DESC")
    fields = [F("a", type_oid=TEXTOID), F("pgherd_h1", type_oid=INT8)]
    m = plan.merger(fields, 2)
    got = drive(m, {0: [body([b"x", b"5"]), body([b"y", b"1"])], 1: [body([b"z", b"3"])]})
    assert got == [[b"x"], [b"z"], [b"y"]]
    assert plan.client_fields(fields) == fields[:1]


def test_distinct_and_distinct_on() -> None:
    plan = plan_merge("SELECT DISTINCT a, b FROM t")
    fields = [F("a", type_oid=INT8), F("b", type_oid=NUMERIC)]
    streams = {0: [body([b"1", b"1.0"]), body([b"1", b"2"]), body([None, None])],
               1: [body([b"1", b"1.00"]), body([b"2", b"0"]), body([None, None])]}
    got = drive(plan.merger(fields, 2), streams)
    assert [r[0] for r in got] == [b"1", b"1", b"2", None] and len(got) == 4  # 1.0 = 1.00

    plan = plan_merge("SELECT DISTINCT ON (a) a, b FROM t ORDER BY a, b DESC")
    streams = {0: [body([b"1", b"5"]), body([b"2", b"1"])], 1: [body([b"1", b"7"]), body([b"3", b"0"])]}
    got = drive(plan.merger(fields, 2), streams)
    assert got == [[b"1", b"7"], [b"2", b"1"], [b"3", b"0"]]

    plan = plan_merge("SELECT DISTINCT * FROM t")  # no full sort possible: deduplicated by hashing
    got = drive(plan.merger(fields, 2), {0: [body([b"1", b"1"]), body([b"2", b"2"])], 1: [body([b"1", b"1.0"])]})
    assert sorted(r[0] for r in got) == [b"1", b"2"]


def test_with_ties() -> None:
    plan = plan_merge("SELECT a, b FROM t ORDER BY a FETCH FIRST 2 ROWS WITH TIES")
    fields = [F("a", type_oid=INT8), F("b", type_oid=INT8)]
    streams = {0: [body([b"1", b"1"]), body([b"2", b"2"]), body([b"3", b"3"])],
               1: [body([b"2", b"4"]), body([b"2", b"5"]), body([b"3", b"6"])]}
    got = drive(plan.merger(fields, 2), streams)
    assert [r[0] for r in got] == [b"1", b"2", b"2", b"2"]


def test_ordered_merge_errors() -> None:
    plan = plan_merge("SELECT a FROM t ORDER BY a")
    m = plan.merger([F("a", type_oid=INT8)], 2)
    m.push(0, body([b"5"]))
    with pytest.raises(MergeError, match="out of the order"):
        m.push(0, body([b"4"]))
    with pytest.raises(MergeRefused, match="interval"):
        plan.merger([F("a", type_oid=1186)], 2)
    with pytest.raises(MergeRefused, match="collation"):
        plan.merger([F("a", type_oid=TEXTOID)], 2, collation="en_US.UTF-8")
    plan.merger([F("a", type_oid=INT8)], 2, collation="en_US.UTF-8")  # not text: fine
    with pytest.raises(MergeError) as e:
        plan_merge("SELECT a FROM t ORDER BY a LIMIT $1").merger([F("a", type_oid=INT8)], 2, bind=Bind([b"-2"]))
    assert e.value.code == "2201W"


# ================================================================================================
# Aggregate merge


def _f(name: str, oid: int, fmt: int = 0) -> M.Field:
    return F(name, type_oid=oid, format=fmt)


def test_combine_count_sum_min_max_bool() -> None:
    plan = plan_merge("SELECT count(*), sum(a), sum(b), min(c), max(c), bool_and(d), bool_or(d), sum(e), sum(f) FROM t")
    fields = [_f("count", INT8), _f("sum", INT8), _f("sum", NUMERIC), _f("min", TEXTOID), _f("max", TEXTOID),
              _f("bool_and", BOOL), _f("bool_or", BOOL), _f("sum", FLOAT8), _f("sum", FLOAT4)]
    streams = {
        0: [body([b"3", b"10", b"1.50", b"b", b"y", b"t", b"f", b"0.5", b"1.25"])],
        1: [body([b"0", None, None, None, None, None, None, None, None])],
        2: [body([b"2", b"-4", b"2.125", b"a", b"z", b"f", b"f", b"-0.25", b"2"])],
    }
    got = drive(plan.merger(fields, 3), streams)
    assert got == [[b"5", b"6", b"3.625", b"a", b"z", b"f", b"f", b"0.25", b"3.25"]]
    # Nothing anywhere: count 0, the rest NULL.
    got = drive(plan.merger(fields, 2), {s: [body([b"0"] + [None] * 8)] for s in range(2)})
    assert got == [[b"0"] + [None] * 8]


def test_avg_and_variance_numeric() -> None:
    """avg / variance family of numeric: values 1.5, 2.25, 3 (Postgres 16 gives these texts)."""
    plan = plan_merge("SELECT avg(x), var_pop(x), stddev_pop(x), var_samp(x), stddev(x) FROM t")
    assert plan.hidden == 4  # count, sum, sum of squares, var_pop: shared by all five
    fields = [_f("avg", NUMERIC), _f("var_pop", NUMERIC), _f("stddev_pop", NUMERIC), _f("var_samp", NUMERIC),
              _f("stddev", NUMERIC), _f("h1", INT8), _f("h2", NUMERIC), _f("h3", NUMERIC), _f("h4", NUMERIC)]
    junk = [b"0"] * 5  # the shards' own values are not used for numeric
    streams = {0: [body(junk + [b"2", b"3.75", b"7.3125", b"0"])], 1: [body(junk + [b"1", b"3.00", b"9.0000", b"0"])]}
    got = drive(plan.merger(fields, 2), streams)
    assert got == [[b"2.2500000000000000", b"0.37500000000000000000", b"0.61237243569579452455",
                    b"0.56250000000000000000", b"0.75000000000000000000"]]
    # Binary output of the same.
    fields_b = [F(f.name, type_oid=f.type_oid, format=1) for f in fields]
    streams_b = {s: [body([encode(f.type_oid, 1, decode(f.type_oid, 0, v)) if v is not None else None
                           for f, v in zip(fields, split_row(b))]) for b in rows] for s, rows in streams.items()}
    got_b = drive(plan.merger(fields_b, 2), streams_b)
    assert [decode(NUMERIC, 1, v) for v in got_b[0]] == [Decimal(v.decode()) for v in got[0]]
    assert got_b[0][0] == encode(NUMERIC, 1, Decimal("2.2500000000000000"))
    # One value: samples are NULL, population variance is 0 (numeric_stddev_internal); NaN poisons.
    one = {0: [body(junk + [b"1", b"5", b"25", b"0"])], 1: [body(junk + [b"0", None, None, None])]}
    assert drive(plan.merger(fields, 2), one) == [[b"5.0000000000000000", b"0", b"0", None, None]]
    nan = {0: [body(junk + [b"2", b"NaN", b"NaN", b"NaN"])], 1: [body(junk + [b"1", b"1", b"1", b"0"])]}
    assert drive(plan.merger(fields, 2), nan) == [[b"NaN"] * 5]
    inf = {0: [body(junk + [b"1", b"Infinity", b"Infinity", b"NaN"])], 1: [body(junk + [b"1", b"1", b"1", b"0"])]}
    assert drive(plan.merger(fields, 2), inf)[0][:2] == [b"Infinity", b"NaN"]


def test_avg_integer_and_float() -> None:
    plan = plan_merge("SELECT avg(x) FROM t")
    fields = [_f("avg", NUMERIC), _f("h1", INT8), _f("h2", INT8)]  # avg(int4): sum is int8
    got = drive(plan.merger(fields, 2), {0: [body([b"0", b"2", b"3"])], 1: [body([b"0", b"1", b"1"])]})
    assert got == [[b"1.3333333333333333"]]
    fields = [_f("avg", FLOAT8), _f("h1", INT8), _f("h2", FLOAT8)]
    got = drive(plan.merger(fields, 2), {0: [body([b"0", b"2", b"0.5"])], 1: [body([b"0", b"1", b"0.25"])]})
    assert got == [[b"0.25"]]
    # float4 input: the shards' float8 averages are used, not their float4 sums.
    fields = [_f("avg", FLOAT8), _f("h1", INT8), _f("h2", FLOAT4)]
    got = drive(plan.merger(fields, 2), {0: [body([b"0.1", b"3", b"0"])], 1: [body([b"0.4", b"1", b"0"])]})
    assert float(got[0][0]) == pytest.approx((0.1 * 3 + 0.4) / 4, rel=1e-15)


def test_variance_float() -> None:
    """float input: per-shard (N, Sx, var_pop) combined as float8_combine."""
    values = [1.5, 2.0, -3.25, 8.0, 0.125]
    plan = plan_merge("SELECT var_samp(x), stddev_pop(x) FROM t")
    fields = [_f("var_samp", FLOAT8), _f("stddev_pop", FLOAT8), _f("h1", INT8), _f("h2", FLOAT8),
              _f("h3", NUMERIC), _f("h4", FLOAT8)]

    def partial(vs: list[float]) -> bytes:
        n = len(vs)
        mean = sum(vs) / n
        vp = sum((v - mean) ** 2 for v in vs) / n
        return body([b"0", b"0", str(n).encode(), repr(sum(vs)).encode(), b"0", repr(vp).encode()])

    got = drive(plan.merger(fields, 2), {0: [partial(values[:2])], 1: [partial(values[2:])]})
    mean = sum(values) / 5
    ss = sum((v - mean) ** 2 for v in values)
    assert float(got[0][0]) == pytest.approx(ss / 4, rel=1e-14)
    assert float(got[0][1]) == pytest.approx(math.sqrt(ss / 5), rel=1e-14)


def test_numeric_division_rules() -> None:
    # select_div_scale: at least 16 significant digits and the inputs' scales.
    assert MG._select_div_scale(675, 2, 3, 0) == 16
    assert MG._select_div_scale(33750, 4, 9, 0) == 20
    assert MG._select_div_scale(1, 0, 3, 0) == 20
    assert MG._select_div_scale(0, 0, 7, 0) == 20
    assert MG._select_div_scale(10 ** 30, 0, 7, 0) == 0
    assert MG._div_round(2, 0, 3, 0, 4) == 6667 and MG._div_round(-2, 0, 3, 0, 4) == -6667
    assert MG._div_round(1, 0, 8, 0, 2) == 13 and MG._div_round(-1, 0, 8, 0, 2) == -13  # half away from zero
    assert MG._sqrt_round(2, 0, 10) == 14142135624 and MG._sqrt_round(375, 3, 20) == 61237243569579452455


def test_sum_overflow() -> None:
    plan = plan_merge("SELECT count(*), sum(x) FROM t")
    fields = [_f("count", INT8), _f("sum", INT8)]
    big = str((1 << 63) - 10).encode()
    with pytest.raises(MergeError) as e:
        drive(plan.merger(fields, 2), {0: [body([b"1", big])], 1: [body([b"1", big])]})
    assert e.value.code == "22003"
    fields = [_f("count", INT8), _f("sum", FLOAT8)]
    with pytest.raises(MergeError) as e:
        drive(plan.merger(fields, 2), {0: [body([b"1", b"1.7e308"])], 1: [body([b"1", b"1.7e308"])]})
    assert e.value.code == "22003"
    got = drive(plan.merger(fields, 2), {0: [body([b"1", b"Infinity"])], 1: [body([b"1", b"1"])]})
    assert got == [[b"2", b"Infinity"]]


GROUPED = "SELECT g, count(*), sum(x) FROM t GROUP BY g"


def _group_streams(rng: random.Random, shards: int, sort: bool) -> tuple[dict, dict]:
    """Random partial rows of (g, count, sum) per shard, and the expected totals per g."""
    totals: dict = {}
    streams = {}
    for s in range(shards):
        groups = rng.sample([None] + list(range(10)), rng.randint(0, 8))
        rows = []
        for g in groups:
            c, x = rng.randint(1, 5), rng.randint(-100, 100)
            t = totals.setdefault(g, [0, 0])
            t[0] += c
            t[1] += x
            rows.append((g, c, x))
        if sort:
            rows.sort(key=lambda r: (r[0] is None, r[0] or 0))
        streams[s] = [body([None if g is None else str(g).encode(), str(c).encode(), str(x).encode()])
                      for g, c, x in rows]
    return streams, totals


@pytest.mark.parametrize("seed", range(30))
def test_group_merge_streaming_and_hashing(seed: int) -> None:
    rng = random.Random(seed)
    fields = [_f("g", INT4), _f("count", INT8), _f("sum", INT8)]
    plan = plan_merge(GROUPED)  # no ORDER BY: the shards sort by g, the merge streams
    assert plan.streaming and "ORDER BY 1" in plan.shard_sql
    streams, totals = _group_streams(rng, 3, sort=True)
    got = drive(plan.merger(fields, 3), streams, rng)
    expected = sorted(totals.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))
    assert got == [[None if g is None else str(g).encode(), str(c).encode(), str(x).encode()]
                   for g, (c, x) in expected]
    plan = plan_merge(GROUPED + " ORDER BY 3 DESC, 1 LIMIT 4 OFFSET 1")  # by an aggregate: held until the end
    assert not plan.streaming
    streams, totals = _group_streams(rng, 3, sort=False)
    m = plan.merger(fields, 3)
    got = drive(m, streams, rng)
    expected = sorted(totals.items(), key=lambda kv: (-kv[1][1], kv[0] is None, kv[0] or 0))[1:5]
    assert [[r[0], r[2]] for r in got] == [[None if g is None else str(g).encode(), str(x).encode()]
                                           for g, (c, x) in expected]


def test_streaming_groups_stop_early() -> None:
    plan = plan_merge(GROUPED + " ORDER BY g LIMIT 2")
    assert plan.streaming and plan.shard_limited
    m = plan.merger([_f("g", INT4), _f("count", INT8), _f("sum", INT8)], 2)
    m.push(0, body([b"1", b"1", b"1"]))
    m.push(1, body([b"1", b"2", b"2"]))
    m.push(1, body([b"3", b"1", b"1"]))
    assert m.pop_ready() == []  # group 1 may still grow on shard 0
    m.push(0, body([b"2", b"1", b"5"]))
    assert rows_of(m.pop_ready()) == [[b"1", b"3", b"3"]]
    m.push(0, body([b"4", b"1", b"5"]))
    assert rows_of(m.pop_ready()) == [[b"2", b"1", b"5"]] and m.done


def test_text_groups_under_another_collation_hash() -> None:
    plan = plan_merge("SELECT h, count(*) FROM t GROUP BY h")
    fields = [_f("h", TEXTOID), _f("count", INT8)]
    m = plan.merger(fields, 2, collation="en_US.UTF-8")
    assert not m.streaming
    # Shards ordered by a locale ("a" < "B"): merged by hashing, every group once.
    got = drive(m, {0: [body([b"a", b"1"]), body([b"B", b"1"])], 1: [body([b"B", b"2"]), body([b"c", b"1"])]})
    assert sorted(got) == [[b"B", b"3"], [b"a", b"1"], [b"c", b"1"]]
    with pytest.raises(MergeRefused):
        plan_merge("SELECT h, count(*) FROM t GROUP BY h ORDER BY h").merger(fields, 2, collation="de_DE")
    with pytest.raises(MergeRefused):
        plan_merge("SELECT h, count(*) FROM t GROUP BY h LIMIT 3").merger(fields, 2, collation="de_DE")
    with pytest.raises(MergeRefused):
        plan_merge("SELECT max(h) FROM t").merger([_f("max", TEXTOID)], 2, collation="de_DE")


def test_having() -> None:
    plan = plan_merge("SELECT g FROM t GROUP BY g HAVING (count(*) > 2 OR max(x) IS NULL) AND NOT sum(y) "
                      "BETWEEN 0.5 AND 1.5 AND min(d) >= '2000-01-01'")
    fields = [_f("g", INT4), _f("count", INT8), _f("max", INT4), _f("sum", NUMERIC), _f("min", DATE)]
    assert [a.func for a in plan.aggregates] == ["count", "max", "sum", "min"]
    rows = {
        0: [body([b"1", b"2", b"5", b"0.25", b"2001-01-01"]), body([b"2", b"1", None, b"2", b"2001-01-01"]),
            body([b"3", b"9", b"1", b"1.0", b"2001-01-01"]), body([b"4", b"9", b"1", None, b"2001-01-01"]),
            body([b"5", b"9", b"1", b"7", b"1999-01-01"])],
        1: [body([b"1", b"1", b"1", b"0.25", b"2001-01-01"])],
    }
    got = drive(plan.merger(fields, 2), rows)
    # g=1: count 3, sum 0.5 (in range); g=2: max NULL, sum 2; g=3: sum 1.0 in range; g=4: sum NULL
    # (NOT NULL is NULL); g=5: date too early.
    assert got == [[b"2"]]


def test_having_parameters() -> None:
    plan = plan_merge("SELECT g, count(*) FROM t GROUP BY g HAVING count(*) >= $1 AND avg(x) < $2")
    fields = [_f("g", INT4), _f("count", INT8), _f("avg", FLOAT8), _f("h1", INT8), _f("h2", FLOAT8)]
    rows = {0: [body([b"1", b"3", b"0", b"3", b"3"]), body([b"2", b"1", b"0", b"1", b"10"])],
            1: [body([b"2", b"2", b"0", b"2", b"0"])]}
    assert drive(plan.merger(fields, 2, bind=Bind([b"3", b"2.5"])), rows) == [[b"1", b"3"]]
    bind = Bind([struct.pack("!q", 3), struct.pack("!d", 4.0)], [1])
    assert drive(plan.merger(fields, 2, bind=bind), rows) == [[b"1", b"3"], [b"2", b"3"]]
    assert drive(plan.merger(fields, 2, bind=Bind([None, b"1"])), rows) == []


def test_aggregate_type_refusals() -> None:
    with pytest.raises(MergeRefused, match="interval"):
        plan_merge("SELECT sum(x) FROM t").merger([_f("sum", 1186)], 2)
    with pytest.raises(MergeRefused, match="GROUP BY"):
        plan_merge(GROUPED).merger([_f("g", 3802), _f("count", INT8), _f("sum", INT8)], 2)


def test_unreadable_values() -> None:
    plan = plan_merge("SELECT d FROM t ORDER BY d")
    m = plan.merger([_f("d", DATE)], 2)
    with pytest.raises(MergeError) as e:
        m.push(0, body([b"01/02/2024"]))  # DateStyle SQL
    assert e.value.code == "0A000" and "DateStyle ISO" in e.value.message
    plan = plan_merge("SELECT sum(x) FROM t")
    with pytest.raises(MergeError) as e:
        drive(plan.merger([_f("sum", FLOAT4)], 2), {0: [body([b"3e38"])], 1: [body([b"3e38"])]})
    assert e.value.code == "22003"


def test_push_values_or_bodies() -> None:
    plan = plan_merge("SELECT a, b FROM t ORDER BY a")
    m = plan.merger([_f("a", INT8), _f("b", TEXTOID)], 2)
    m.push(0, [b"2", b"x"])
    m.push(1, memoryview(body([b"1", None])))
    m.end(0)
    m.end(1)
    assert rows_of(m.pop_ready()) == [[b"1", None], [b"2", b"x"]] and m.done
    plan = plan_merge("SELECT count(*) FROM t")
    m = plan.merger([_f("count", INT8)], 2)
    m.push(0, [b"2"])
    m.push(1, body([b"3"]))
    m.end(0)
    m.end(1)
    assert rows_of(m.pop_ready()) == [[b"5"]]


def test_same_aggregate_twice() -> None:
    plan = plan_merge("SELECT count(*), count(*) AS again FROM t HAVING count(*) > 0 ORDER BY count(*)")
    assert [a.column for a in plan.aggregates] == [0, 1] and plan.hidden == 0
    m = plan.merger([_f("count", INT8), _f("again", INT8)], 2)
    assert drive(m, {0: [body([b"2", b"2"])], 1: [body([b"3", b"3"])]}) == [[b"5", b"5"]]


def test_numeric_beyond_python_int_string_limit() -> None:
    """numeric has up to 147455 digits; Python refuses int <-> str beyond 4300 digits."""
    d = Decimal("9" * 6000 + "." + "1" * 5000)
    for fmt in (0, 1):
        assert decode(NUMERIC, fmt, encode(NUMERIC, fmt, d)) == d
    plan = plan_merge("SELECT sum(x), avg(x) FROM t")
    fields = [_f("sum", NUMERIC), _f("avg", NUMERIC), _f("h1", INT8), _f("h2", NUMERIC)]
    raw = encode(NUMERIC, 0, d)
    got = drive(plan.merger(fields, 2), {0: [body([raw, b"0", b"1", raw])], 1: [body([raw, b"0", b"1", raw])]})
    with localcontext(Context(prec=20000)):
        assert Decimal(got[0][0].decode()) == 2 * d
        # avg's scale is capped at NUMERIC_MAX_DISPLAY_SCALE (1000), as Postgres does.
        assert got[0][1] == encode(NUMERIC, 0, d.quantize(Decimal("1E-1000"), rounding=ROUND_HALF_UP))
