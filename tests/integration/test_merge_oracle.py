"""Merge oracle: a cross-shard SELECT merged by router/merge.py equals the same SELECT on all rows.

One generated table (NULLs, duplicates, negative and large numbers, non-ASCII text, NaN and
infinities, every type the merge decodes) is split over three "shard" schemas and also kept whole
in a fourth. For each statement of a corpus of several hundred, plan_merge gives the shard text;
it runs on each shard schema through libpq's extended protocol (raw values, text and binary result
formats, the exact RowDescription), the rows go through the merger, and the merged rows must be,
byte for byte, what Postgres sends for the statement over all rows, with the same RowDescription
(names, types, type modifiers, formats). Float results that Postgres itself computes in an
order-dependent way (the variance family on float input, avg of float4) are compared to a relative
1e-12 instead. Ties: statements order by a unique key unless marked to compare as a multiset, or
only by their ORDER BY key columns.
"""

from __future__ import annotations

import math
import random
import struct
import uuid
from collections import Counter
from decimal import Decimal
from typing import Any, Optional

import psycopg
import pytest
from psycopg import pq

from pgherd.router.merge import MergeError, MergeRefused, plan_merge, split_row
from pgherd.router.params import Bind
from pgherd.router.values import FLOAT4, FLOAT8, NUMERIC, decode, encode, key_function
from pgherd.shared.wire import messages as M

TEST_DB = "pgherd_test"
SHARDS = 3
SEED = 20260509
ROWS = 1500
SCHEMAS = [f"merge_s{i}" for i in range(SHARDS)]
WHOLE = "merge_all"
# Relative tolerance for floats Postgres computes in row order (variance family of floats, avg(float4)).
FLOAT_TOLERANCE = 1e-12
# Random value sets for the numeric avg / variance scale check (about 3 ms each).
NUMERIC_CASES = 400
# The corpus must be at least this large (issue 7: at least 150 cross-shard SELECTs).
MIN_CORPUS = 150

COLUMNS = """
    id bigint primary key, g int, h text, i2 smallint, i4 int, i8 bigint, n numeric, f4 real,
    f8 double precision, t text, vc varchar(20), bc char(4), b bool, d date, ts timestamp,
    tz timestamptz, u uuid, fs double precision, ns numeric
"""
WORDS = ["", "a", "A", "b", "ab", "abc", "Zebra", "zebra", "é", "ß", "日本", "日本語", "😀", "a b", "a\tb", "x" * 30,
         "ünïcödé", "Ω", "-", "0", "10", "9"]


def _rows(rng: random.Random) -> list[tuple]:
    rows = []
    for id_ in range(1, ROWS + 1):
        def maybe(v: Any, p: float = 0.1) -> Any:
            return None if rng.random() < p else v

        scale = rng.choice((0, 1, 2, 3, 5))
        n = Decimal(rng.randint(-10 ** 6, 10 ** 6)).scaleb(-scale)
        d = rng.choice(("2024-02-29", "1999-12-31", "2000-01-01", "0044-03-15 BC", "infinity", "-infinity",
                        f"{rng.randint(1, 9999):04d}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"))
        ts = f"{rng.randint(1900, 2100)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} " \
             f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}" + \
             rng.choice(("", ".5", ".123456", ".000001"))
        tz = ts + rng.choice(("+00", "+05:30", "-08", "+01"))
        rows.append((
            id_,
            maybe(rng.randint(0, 9)),
            maybe(rng.choice(("red", "green", "blue", "ünï", "日本", ""))),
            maybe(rng.randint(-32768, 32767)),
            maybe(rng.choice((rng.randint(-2 ** 31, 2 ** 31 - 1), rng.randint(-100, 100)))),
            maybe(rng.choice((rng.randint(-2 ** 62, 2 ** 62), rng.randint(-1000, 1000), 2 ** 63 - 1, -2 ** 63))),
            maybe(n),
            maybe(rng.randint(-4000, 4000) / 4),
            maybe(rng.randint(-8 * 10 ** 6, 8 * 10 ** 6) / 8),
            maybe(rng.choice(WORDS) + rng.choice(WORDS)),
            maybe(rng.choice(WORDS)[:20]),
            maybe(rng.choice(("a", "ab ", "é", "abcd", "", "Z"))),
            maybe(rng.random() < 0.5),
            maybe(d),
            maybe(rng.choice((ts, "infinity", "-infinity", "2000-01-01 00:00:00")), 0.15),
            maybe(rng.choice((tz, "infinity", "1999-12-31 23:00:00-01"))),
            maybe(uuid.UUID(int=rng.choice((rng.getrandbits(128), 0, (1 << 128) - 1, rng.getrandbits(8))))),
            maybe(rng.choice((float("nan"), float("inf"), float("-inf"), -0.0, 0.0, 1.5, -2.25))),
            maybe(rng.choice((Decimal("NaN"), Decimal("Infinity"), Decimal("-Infinity"), Decimal("1.5"),
                              Decimal("-0.001")))),
        ))
    return rows


def _shard_of(id_: int) -> int:
    return (id_ * 7919) % SHARDS


@pytest.fixture(scope="module")
def oracle(pg: Any):
    conn = psycopg.connect(pg.dsn(TEST_DB), autocommit=True)
    rows = _rows(random.Random(SEED))
    with conn.cursor() as cur:
        for schema in SCHEMAS + [WHOLE]:
            cur.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            cur.execute(f"CREATE SCHEMA {schema}")
            cur.execute(f"CREATE TABLE {schema}.items ({COLUMNS})")
        cols = [c.split()[0] for c in COLUMNS.split(",")]
        for schema, part in [(WHOLE, rows)] + [(SCHEMAS[i], [r for r in rows if _shard_of(r[0]) == i])
                                                for i in range(SHARDS)]:
            with cur.copy(f"COPY {schema}.items ({', '.join(cols)}) FROM STDIN") as copy:
                for r in part:
                    copy.write_row(r)
            cur.execute(f"ANALYZE {schema}.items")
        cur.execute("SET TimeZone = 'Asia/Kolkata'")
    yield Oracle(conn)
    with conn.cursor() as cur:
        for schema in SCHEMAS + [WHOLE]:
            cur.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    conn.close()


class Result:
    def __init__(self, fields: list[M.Field], rows: list[list[Optional[bytes]]]) -> None:
        self.fields, self.rows = fields, rows


class Oracle:
    """Runs statements on a schema and returns raw values and the RowDescription."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn
        self.pgconn = conn.pgconn

    def run(self, schema: str, sql: str, fmt: int, params: tuple = (), simple: bool = False) -> Result:
        pc = self.pgconn
        r = pc.exec_(f"SET search_path = {schema}".encode())
        assert r.status == pq.ExecStatus.COMMAND_OK, r.get_error_message()
        if simple:
            res = pc.exec_(sql.encode())
        else:
            res = pc.exec_params(sql.encode(), [None if p is None else str(p).encode() for p in params],
                                 result_format=fmt)
        if res.status != pq.ExecStatus.TUPLES_OK:
            raise RuntimeError(f"{sql!r} on {schema}: {res.get_error_message()}")
        fields = [M.Field(res.fname(i).decode(), res.ftable(i), res.ftablecol(i), res.ftype(i), res.fsize(i),
                          res.fmod(i), res.fformat(i)) for i in range(res.nfields)]
        rows = [[res.get_value(r, c) for c in range(res.nfields)] for r in range(res.ntuples)]
        return Result(fields, rows)


# ------------------------------------------------------------------------------------------------
# The corpus: (sql, compare, params). compare: "exact" (same rows in the same order), "multiset"
# (same rows, any order), "keys" (same ORDER BY key values in order, same rows when no LIMIT),
# "count" (as many rows: LIMIT / OFFSET without ORDER BY may return any rows).

ORDER_COLUMNS = ["i2", "i4", "i8", "n", "f4", "f8", "t", "vc", "bc", "b", "d", "ts", "tz", "u", "fs", "ns", "h", "g"]
NUMBER_COLUMNS = ["i2", "i4", "i8", "n", "f4", "f8", "fs", "ns"]


def corpus() -> list[tuple[str, str, tuple]]:
    q: list[tuple[str, str, tuple]] = []

    def add(sql: str, compare: str = "exact", params: tuple = ()) -> None:
        q.append((sql, compare, params))

    # ORDER BY each type, both directions, NULLS placement, with a unique tiebreaker.
    for c in ORDER_COLUMNS:
        add(f"SELECT id, {c} FROM items ORDER BY {c}, id")
        add(f"SELECT id, {c} FROM items ORDER BY {c} DESC, id DESC")
        add(f"SELECT {c}, id FROM items ORDER BY 1 NULLS FIRST, 2 LIMIT 40")
        add(f"SELECT {c} AS v, id FROM items ORDER BY v DESC NULLS LAST, id LIMIT 25 OFFSET 10")
    # Several keys, names, aliases, positions, hidden keys, * lists.
    add("SELECT id, g, h, t FROM items ORDER BY g DESC, h NULLS FIRST, t, id")
    add("SELECT id FROM items ORDER BY b, d DESC, id")
    add("SELECT id, i4 FROM items ORDER BY i4 % 7, id", "exact")
    add("SELECT * FROM items ORDER BY i8 DESC NULLS LAST, id LIMIT 30")
    add("SELECT *, i4 AS x FROM items ORDER BY x, id OFFSET 1490")
    add("SELECT t FROM items ORDER BY t COLLATE \"C\" DESC, id")
    add("SELECT id FROM items ORDER BY u USING >, id LIMIT 15")
    add("SELECT id, n FROM items ORDER BY n USING <, id OFFSET 5 LIMIT 5")
    add("SELECT g FROM items ORDER BY g", "keys")
    add("SELECT g, h FROM items ORDER BY g, h LIMIT 100", "keys")
    # LIMIT / OFFSET without ORDER BY (any rows: only the count is defined), FETCH, parameters.
    add("SELECT id FROM items LIMIT 10", "count")
    add("SELECT id, t FROM items OFFSET 1490", "count")
    add("SELECT id, i4 FROM items ORDER BY i4 DESC, id LIMIT $1 OFFSET $2", "exact", (7, 3))
    add("SELECT id, i4 FROM items ORDER BY i4, id LIMIT $1", "exact", (12,))
    add("SELECT id FROM items ORDER BY id OFFSET $1", "exact", (1490,))
    add("SELECT id FROM items ORDER BY id LIMIT $1 OFFSET $2", "exact", (None, 1495))
    add("SELECT id FROM items ORDER BY id LIMIT 0")
    add("SELECT id FROM items ORDER BY id OFFSET 5000")
    add("SELECT id, g FROM items ORDER BY g FETCH FIRST 5 ROWS WITH TIES", "keys")
    add("SELECT id, g FROM items ORDER BY g DESC NULLS LAST OFFSET 3 FETCH FIRST 200 ROWS WITH TIES", "keys")
    add("SELECT id, d FROM items ORDER BY d OFFSET 2 ROWS FETCH NEXT 4 ROWS ONLY", "keys")
    add("SELECT id FROM items ORDER BY id LIMIT ALL OFFSET 1497")
    add("SELECT id FROM items ORDER BY id LIMIT 2.5")
    # DISTINCT, DISTINCT ON.
    for c in ["g", "h", "b", "bc", "n", "f8", "t", "d", "tz", "fs", "ns"]:
        add(f"SELECT DISTINCT {c} FROM items", "multiset")
        add(f"SELECT DISTINCT {c} FROM items ORDER BY {c} DESC")
    add("SELECT DISTINCT g, h FROM items ORDER BY h, g")
    add("SELECT DISTINCT g, b FROM items ORDER BY g LIMIT 7", "keys")
    add("SELECT DISTINCT * FROM items ORDER BY id LIMIT 20")
    add("SELECT DISTINCT g, h FROM items", "multiset")
    add("SELECT DISTINCT ON (g) g, id, i4 FROM items ORDER BY g, i4 DESC NULLS LAST, id")
    add("SELECT DISTINCT ON (h, b) h, b, id FROM items ORDER BY h, b, id DESC")
    add("SELECT DISTINCT ON (g) g, id FROM items ORDER BY g, id LIMIT 3 OFFSET 2")
    add("SELECT DISTINCT ON (b) b FROM items", "multiset")
    # UNION ALL / UNION.
    add("SELECT id, g FROM items WHERE g = 1 UNION ALL SELECT id, g FROM items WHERE g = 2 ORDER BY 1 LIMIT 50")
    add("SELECT g FROM items UNION SELECT i2 % 3 FROM items ORDER BY 1")
    add("SELECT h AS x FROM items UNION SELECT t FROM items WHERE id < 100 ORDER BY x DESC LIMIT 10")
    add("SELECT g FROM items UNION ALL SELECT g FROM items ORDER BY g NULLS FIRST OFFSET 2990", "keys")
    # Aggregates over everything, per type.
    for c in NUMBER_COLUMNS:
        add(f"SELECT count({c}), sum({c}), min({c}), max({c}), avg({c}) FROM items")
        add(f"SELECT stddev({c}), stddev_samp({c}), stddev_pop({c}), variance({c}), var_samp({c}), var_pop({c}) "
            f"FROM items")
        add(f"SELECT g, sum({c}), avg({c}), count(*) FROM items GROUP BY g ORDER BY g")
        add(f"SELECT h, variance({c}), stddev_pop({c}) FROM items GROUP BY h", "multiset")
        add(f"SELECT b, min({c}), max({c}), avg({c}) FROM items GROUP BY b ORDER BY b DESC")
    for c in ["t", "vc", "bc", "d", "ts", "tz", "h"]:
        add(f"SELECT min({c}), max({c}), count({c}), count(DISTINCT id) FROM items")
        add(f"SELECT g, min({c}), max({c}) FROM items GROUP BY g ORDER BY 1")
    add("SELECT bool_and(b), bool_or(b), every(b), count(*) FROM items")
    add("SELECT g, bool_and(b), bool_or(b) FROM items GROUP BY g ORDER BY g NULLS FIRST")
    add("SELECT count(*), count(DISTINCT id), sum(DISTINCT id), avg(DISTINCT id) FROM items")
    add("SELECT count(*) FILTER (WHERE i4 > 0), sum(i8) FILTER (WHERE b), avg(n) FILTER (WHERE g < 5) FROM items")
    add("SELECT g, count(*) FILTER (WHERE b), stddev(i4) FILTER (WHERE h <> '') FROM items GROUP BY g ORDER BY g")
    add("SELECT count(*) FROM items WHERE false")
    add("SELECT sum(i4), avg(n), stddev(i2), min(t), bool_and(b) FROM items WHERE id < 0")
    add("SELECT sum(i4), avg(i4), stddev(n) FROM items WHERE id IN (1, 2)")
    add("SELECT var_samp(n), stddev_samp(i8), var_pop(i2) FROM items WHERE id = 1")
    add("SELECT sum(x), avg(x), stddev(x), var_pop(x) FROM (SELECT n * 1000000000000 AS x FROM items) s")
    add("SELECT avg(x), stddev(x) FROM (SELECT n / 1000000 AS x FROM items) s")
    add("SELECT avg(i8), stddev(i8), sum(i8) FROM items WHERE i8 BETWEEN -1000 AND 1000")
    add("SELECT avg(i2::numeric / 7), variance(i2::numeric / 7) FROM items")
    add("SELECT sum(x), avg(x), stddev(x), max(x) FROM (SELECT n + ('0.' || repeat('3', 1200))::numeric AS x "
        "FROM items) s")
    add("SELECT g, sum(x), avg(x) FROM (SELECT g, i8::numeric * i8 * i8 * i8 AS x FROM items) s GROUP BY g ORDER BY g")
    # GROUP BY: keys, expressions, aliases, hidden keys, positions, streaming and hashing.
    add("SELECT g, h, count(*), sum(i4) FROM items GROUP BY g, h ORDER BY g, h")
    add("SELECT g, h, count(*) FROM items GROUP BY g, h ORDER BY h DESC, g")
    add("SELECT h, g, count(*) FROM items GROUP BY g, h ORDER BY h", "keys")
    add("SELECT count(*) FROM items GROUP BY g", "multiset")
    add("SELECT count(*), sum(i2) FROM items GROUP BY g, b ORDER BY 1, 2", "keys")
    add("SELECT i4 % 3 AS m, count(*) FROM items GROUP BY m ORDER BY m")
    add("SELECT i4 % 3, count(*) FROM items GROUP BY i4 % 3 ORDER BY 1")
    add("SELECT date_trunc('year', ts) AS y, count(*), min(ts) FROM items GROUP BY y ORDER BY y DESC NULLS LAST")
    add("SELECT extract(year FROM d) AS y, count(*) FROM items GROUP BY 1 ORDER BY 1 LIMIT 10")
    add("SELECT b, d, count(*) FROM items GROUP BY b, d ORDER BY d, b LIMIT 20 OFFSET 3")
    add("SELECT u, count(*) FROM items GROUP BY u ORDER BY u LIMIT 5")
    add("SELECT tz, count(*) FROM items GROUP BY tz ORDER BY tz DESC LIMIT 5")
    add("SELECT n, count(*) FROM items GROUP BY n ORDER BY n LIMIT 50")
    add("SELECT f8, count(*) FROM items GROUP BY f8 ORDER BY f8 DESC LIMIT 50")
    add("SELECT fs, count(*), sum(i4) FROM items GROUP BY fs ORDER BY fs")
    add("SELECT ns, count(*) FROM items GROUP BY ns ORDER BY ns NULLS FIRST")
    add("SELECT bc, count(*) FROM items GROUP BY bc ORDER BY bc")
    add("SELECT g, count(*) FROM items GROUP BY g ORDER BY count(*) DESC, g")
    add("SELECT g, sum(i4) FROM items GROUP BY g ORDER BY sum(i8), g")
    add("SELECT g, avg(n) FROM items GROUP BY g ORDER BY 2 DESC LIMIT 3")
    add("SELECT g, count(*) FROM items GROUP BY g ORDER BY max(t), g")
    add("SELECT h, count(*) FROM items GROUP BY h ORDER BY h LIMIT 2 OFFSET 1")
    add("SELECT id, count(*) FROM items GROUP BY id ORDER BY id LIMIT 10")
    add("SELECT id % 10 AS k, sum(n) FROM items GROUP BY k ORDER BY k")
    add("SELECT g, count(*) FROM items GROUP BY g ORDER BY count(*) DESC FETCH FIRST 2 ROWS WITH TIES", "keys")
    add("SELECT 1 AS one, g, count(*) FROM items GROUP BY g ORDER BY g")
    add("SELECT count(*) FROM items GROUP BY ()")
    # HAVING.
    add("SELECT g, count(*) FROM items GROUP BY g HAVING count(*) > 140 ORDER BY g")
    add("SELECT g, sum(i4) FROM items GROUP BY g HAVING avg(n) > 0 ORDER BY g")
    add("SELECT g FROM items GROUP BY g HAVING sum(i2) BETWEEN -100000 AND 100000 OR count(*) < 140 ORDER BY g")
    add("SELECT g, count(*) FROM items GROUP BY g HAVING NOT (max(t) >= 'x') AND g > 2 ORDER BY g")
    add("SELECT h, count(*) FROM items GROUP BY h HAVING min(d) < '1000-01-01' ORDER BY h")
    add("SELECT h FROM items GROUP BY h HAVING bool_or(b) = true AND stddev(i4) IS NOT NULL ORDER BY h")
    add("SELECT g, max(f8) FROM items GROUP BY g HAVING max(f8) > 990000.5 ORDER BY g")
    add("SELECT g, avg(n) FROM items GROUP BY g HAVING avg(n) <> 0.5 AND sum(n) IS NULL ORDER BY g")
    add("SELECT count(*) FROM items HAVING count(*) > 10")
    add("SELECT count(*) FROM items HAVING count(*) > 1000000")
    add("SELECT g, count(*) FROM items GROUP BY g HAVING count(*) > 130 ORDER BY g LIMIT 3")
    add("SELECT b, count(*) FROM items GROUP BY b HAVING max(ts) > '2099-06-01 00:00:00' ORDER BY b")
    add("SELECT g, count(*) FROM items GROUP BY g HAVING count(*) > $1 ORDER BY g", "exact", (140,))
    add("SELECT h, avg(n) FROM items GROUP BY h HAVING avg(n) < $1 AND max(t) > $2 ORDER BY h LIMIT $3", "exact",
        ("1000.5", "b", 4))
    add("SELECT g, sum(f8) FROM items GROUP BY g HAVING sum(f8) >= $1 OR min(d) = $2 ORDER BY g", "exact",
        ("-1e6", "2024-02-29"))
    # DISTINCT with aggregates.
    add("SELECT DISTINCT count(*) FROM items GROUP BY g", "multiset")
    add("SELECT DISTINCT b, count(*) FROM items GROUP BY b, g ORDER BY 1, 2")
    # GROUP BY the sharding key keeps groups on one shard: merged as rows (any aggregate).
    add("SELECT id, string_agg(t, ',' ORDER BY t), count(*) FROM items GROUP BY id ORDER BY id LIMIT 20")
    add("SELECT id, array_agg(g) FROM items GROUP BY id HAVING count(*) = 1 ORDER BY id DESC LIMIT 5")
    return q


# Functions whose float results Postgres computes in row order (see the module docstring).
_APPROX = ("stddev", "stddev_samp", "stddev_pop", "variance", "var_samp", "var_pop")


def _approx_columns(plan: Any, fields: list[M.Field]) -> set[int]:
    """Client columns holding order-dependent float aggregates."""
    out = set()
    n = len(fields)
    for a in plan.aggregates:
        i = a.column if a.column >= 0 else n + a.column
        if fields[i].type_oid != FLOAT8:
            continue
        if a.func.startswith(("var", "stddev")):
            out.add(i)
        if a.func == "avg":
            helper = a.helpers[1] if a.helpers[1] >= 0 else n + a.helpers[1]
            if fields[helper].type_oid == FLOAT4:
                out.add(i)
    return out


def _same(a: Optional[bytes], b: Optional[bytes], fmt: int, approx: bool) -> bool:
    if a == b:
        return True
    if not approx or a is None or b is None:
        return False
    x, y = decode(FLOAT8, fmt, a), decode(FLOAT8, fmt, b)
    if math.isnan(x) or math.isnan(y):
        return math.isnan(x) and math.isnan(y)
    return math.isclose(x, y, rel_tol=FLOAT_TOLERANCE, abs_tol=1e-300)


def _merge(oracle: Oracle, sql: str, fmt: int, params: tuple, simple: bool = False, **kw: Any
           ) -> tuple[Any, Result, list[M.Field], Any]:
    plan = plan_merge(sql, {"id"})
    results = [oracle.run(s, plan.shard_sql, fmt, params, simple) for s in SCHEMAS]
    fields = results[0].fields
    for r in results[1:]:
        assert [f.type_oid for f in r.fields] == [f.type_oid for f in fields]
    bind = Bind([None if p is None else str(p).encode() for p in params])
    shard_fields = fields
    m = plan.merger(fields, SHARDS, bind=bind, **kw)
    out: list[bytes] = []
    # Feed the shards in a rotating interleave, honouring `waiting` as the worker does.
    cursors = [0] * SHARDS
    ended = [False] * SHARDS
    while not m.done:
        progressed = False
        for s in sorted(m.waiting):
            if ended[s]:
                continue
            rows = results[s].rows
            if cursors[s] < len(rows):
                m.push(s, M.data_row(rows[cursors[s]])[5:])
                cursors[s] += 1
            else:
                m.end(s)
                ended[s] = True
            progressed = True
        out += m.pop_ready()
        if not progressed:
            break
    out += m.pop_ready()
    merged = [split_row(msg[5:]) for msg in out]
    assert m.rows == len(merged)
    return plan, Result(plan.client_fields(fields), merged), shard_fields, m


def _check(oracle: Oracle, sql: str, compare: str, params: tuple, fmt: int, simple: bool = False,
           **kw: Any) -> Any:
    expected = oracle.run(WHOLE, sql, fmt, params, simple)
    plan, got, shard_fields, merger = _merge(oracle, sql, fmt, params, simple, **kw)
    desc = [(f.name, f.type_oid, f.type_size, f.type_modifier, f.format) for f in expected.fields]
    assert [(f.name, f.type_oid, f.type_size, f.type_modifier, f.format) for f in got.fields] == desc, sql
    approx = _approx_columns(plan, shard_fields)
    ctx = f"{sql} (format {fmt}{', simple' if simple else ''}; shard sql: {plan.shard_sql})"
    assert len(got.rows) == len(expected.rows), f"{ctx}: {len(got.rows)} rows, expected {len(expected.rows)}"
    _compare_rows(plan, got, expected, compare, fmt, approx, ctx)
    return merger


def _compare_rows(plan: Any, got: Result, expected: Result, compare: str, fmt: int, approx: set, ctx: str) -> None:
    if compare == "count":
        return
    if compare == "exact" or (compare == "multiset" and not approx):
        if compare == "multiset":
            assert Counter(map(tuple, got.rows)) == Counter(map(tuple, expected.rows)), ctx
            return
        for i, (g, e) in enumerate(zip(got.rows, expected.rows)):
            ok = all(_same(a, b, fmt, c in approx) for c, (a, b) in enumerate(zip(g, e)))
            assert ok, f"{ctx}: row {i}: {g!r} != {e!r}"
        return
    if compare == "multiset":
        def norm(row: list) -> tuple:
            return tuple(None if v is None else (f"{decode(FLOAT8, fmt, v):.10g}" if c in approx else v)
                         for c, v in enumerate(row))

        assert Counter(map(norm, got.rows)) == Counter(map(norm, expected.rows)), ctx
        return
    # "keys": the ORDER BY key columns agree row by row; without LIMIT the rows agree as a multiset.
    n = len(got.fields) + plan.hidden
    key_cols = [k.column if k.column >= 0 else n + k.column for k in plan.order]
    key_cols = [c for c in key_cols if c < len(got.fields)]
    assert [[r[c] for c in key_cols] for r in got.rows] == [[r[c] for c in key_cols] for r in expected.rows], ctx
    if plan.limit is None and not plan.offset:
        assert Counter(map(tuple, got.rows)) == Counter(map(tuple, expected.rows)), ctx


def test_corpus_is_large_enough() -> None:
    assert len(corpus()) >= MIN_CORPUS


@pytest.mark.parametrize("fmt", [0, 1], ids=["text", "binary"])
def test_merge_equals_postgres(oracle: Oracle, fmt: int) -> None:
    failures = []
    for sql, compare, params in corpus():
        try:
            _check(oracle, sql, compare, params, fmt)
        except (AssertionError, RuntimeError, MergeRefused, MergeError) as e:
            failures.append(f"{type(e).__name__}: {e}")
    shown = "\n\n".join(f[:700] for f in failures[:60])
    assert not failures, f"{len(failures)} of {len(corpus())} statements differ:\n{shown}"


def test_simple_protocol(oracle: Oracle) -> None:
    """The simple Query protocol (text values) over the same corpus, without parameters."""
    failures = []
    for sql, compare, params in corpus():
        if params:
            continue
        try:
            _check(oracle, sql, compare, params, 0, simple=True)
        except (AssertionError, RuntimeError, MergeRefused, MergeError) as e:
            failures.append(f"{type(e).__name__}: {e}")
    assert not failures, "\n\n".join(f[:700] for f in failures[:60])


def test_other_database_collation(oracle: Oracle) -> None:
    """With a database collation that is not C, text ORDER BY / min / max are refused, groups and
    DISTINCT keyed by text are merged by hashing (not by the shards' order), and everything that is
    merged still equals Postgres."""
    refused = hashed = merged = 0
    failures = []
    for sql, compare, params in corpus():
        try:
            m = _check(oracle, sql, compare, params, 1, collation="en_US.utf8")
        except MergeRefused:
            refused += 1
            continue
        except (AssertionError, RuntimeError, MergeError) as e:
            failures.append(f"{type(e).__name__}: {e}")
            continue
        merged += 1
        if m.plan.mode == "groups" and m.plan.streaming and not m.streaming:
            hashed += 1
    assert not failures, "\n\n".join(f[:700] for f in failures[:20])
    assert refused > 20 and hashed > 5 and merged > 100, (refused, hashed, merged)


def test_float_and_numeric_text_output(oracle: Oracle) -> None:
    """values.encode writes floats and numerics exactly as float8out / float4out / numeric_out
    (and the binary send functions) do, for thousands of values read back from Postgres."""
    rng = random.Random(SEED)
    floats = [0.0, -0.0, 1e15, 1e16, 123456789012345.6, 1e-4, 1e-5, 5e-324, 1.7976931348623157e308, 0.1, 1 / 3,
              2 ** 53 + 1.0, 1e22, 1e21, 100.0, 123456.0, 1234567.0]
    floats += [struct.unpack("!d", struct.pack("!Q", rng.getrandbits(64)))[0] for _ in range(1500)]
    floats += [rng.uniform(-1e6, 1e6) for _ in range(500)]
    floats = [f for f in floats if math.isfinite(f)]
    numerics = [Decimal(rng.randint(-10 ** 30, 10 ** 30)).scaleb(-rng.randint(0, 40)) for _ in range(500)]
    numerics += [Decimal("0.0000"), Decimal("-0.001"), Decimal("1e-20"), Decimal("123456789.123456789"),
                 Decimal("NaN"), Decimal("Infinity"), Decimal("-Infinity"), Decimal(10) ** 200]
    singles = [struct.unpack("!f", struct.pack("!f", f))[0] for f in floats if abs(f) < 3.4e38]
    singles += [struct.unpack("!f", struct.pack("!I", rng.getrandbits(32)))[0] for _ in range(1500)]
    singles = [f for f in singles if math.isfinite(f)]

    def array(values: list) -> bytes:
        return ("{" + ",".join(map(repr if values and isinstance(values[0], float) else str, values)) + "}").encode()

    for efd in (1, 0, -3, 3):
        oracle.pgconn.exec_(f"SET extra_float_digits = {efd}".encode())
        for fmt in ((0, 1) if efd == 1 else (0,)):
            for oid, cast, values in ((FLOAT8, "float8", floats), (FLOAT4, "float4", singles),
                                      (NUMERIC, "numeric", numerics)):
                res = oracle.pgconn.exec_params(f"SELECT unnest($1::{cast}[])".encode(), [array(values)],
                                                result_format=fmt)
                assert res.status == pq.ExecStatus.TUPLES_OK, res.get_error_message()
                assert res.ntuples == len(values)
                for r in range(res.ntuples):
                    raw = res.get_value(r, 0)
                    got = encode(oid, fmt, decode(oid, 1 if oid != NUMERIC else fmt, encode(oid, 1, values[r]))
                                 if oid != NUMERIC else decode(oid, fmt, raw), efd)
                    assert got == raw, (values[r], raw, got, oid, fmt, efd)
    oracle.pgconn.exec_(b"RESET extra_float_digits")


def test_sort_keys_match_postgres_order(oracle: Oracle) -> None:
    """key_function orders every type as Postgres's ORDER BY does (C collation)."""
    for c in ORDER_COLUMNS:
        for fmt in (0, 1):
            res = oracle.run(WHOLE, f"SELECT {c} FROM items WHERE {c} IS NOT NULL ORDER BY {c}", fmt)
            fn = key_function(res.fields[0].type_oid, fmt)
            keys = [fn(r[0]) for r in res.rows]
            assert all(not keys[i + 1] < keys[i] for i in range(len(keys) - 1)), c
            distinct = oracle.run(WHOLE, f"SELECT count(DISTINCT {c}) FROM items", 0).rows[0][0]
            assert len(set(keys)) == int(distinct), c


def test_numeric_division_scale(oracle: Oracle) -> None:
    """avg and the variance family on numeric: select_div_scale and the rounding, for many sizes."""
    rng = random.Random(SEED + 1)
    failures = []
    for _ in range(NUMERIC_CASES):
        count = rng.randint(1, 6)
        scale = rng.choice((0, 1, 2, 4, 8, 15, 25))
        magnitude = rng.choice((1, 3, 10 ** 4, 10 ** 9, 10 ** 20))
        values = [Decimal(rng.randint(-magnitude, magnitude)).scaleb(-scale) for _ in range(count)]
        arr = "{" + ",".join(str(v) for v in values) + "}"
        sql = ("SELECT avg(x), var_samp(x), var_pop(x), stddev_samp(x), stddev_pop(x), sum(x) "
               "FROM unnest($1::numeric[]) x")
        whole = oracle.pgconn.exec_params(sql.encode(), [arr.encode()])
        plan = plan_merge("SELECT avg(x), var_samp(x), var_pop(x), stddev_samp(x), stddev_pop(x), sum(x) FROM t")
        shard_sql = plan.shard_sql.replace("FROM t", "FROM unnest($1::numeric[]) x")
        split = rng.randint(0, count)
        parts = [values[:split], values[split:]]
        m = None
        for s, part in enumerate(parts):
            res = oracle.pgconn.exec_params(shard_sql.encode(), [("{" + ",".join(map(str, part)) + "}").encode()])
            fields = [M.Field(res.fname(i).decode(), 0, 0, res.ftype(i)) for i in range(res.nfields)]
            if m is None:
                m = plan.merger(fields, 2)
            m.push(s, M.data_row([res.get_value(0, c) for c in range(res.nfields)])[5:])
            m.end(s)
        got = split_row(m.pop_ready()[0][5:])
        want = [whole.get_value(0, c) for c in range(whole.nfields)]
        if got != want:
            failures.append((values, got, want))
    assert not failures, failures[:5]


def test_refusals_are_real(oracle: Oracle) -> None:
    """Statements plan_merge refuses really are outside what it merges (and run on Postgres)."""
    for sql in ["SELECT string_agg(t, ',') FROM items", "SELECT sum(i4) + 1 FROM items",
                "SELECT count(DISTINCT g) FROM items", "SELECT g, rank() OVER (ORDER BY g) FROM items",
                "SELECT g FROM items INTERSECT SELECT g FROM items"]:
        oracle.run(WHOLE, sql, 0)
        with pytest.raises(MergeRefused) as e:
            plan_merge(sql, {"id"})
        assert e.value.code == "0A000"
