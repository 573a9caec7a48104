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
import sys
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any, Optional

import psycopg
import pytest
from psycopg import pq

from pgherd.router.merge import MergeError, MergeRefused, plan_merge, split_row
from pgherd.router.params import Bind
from pgherd.router.values import FLOAT4, FLOAT8, NUMERIC, decode, encode, key_function
from pgherd.shared.wire import messages as M

# The generated rows and the corpus live in merge_corpus.py beside this file (shared with
# test_cross_shard.py); this directory is not on sys.path under --import-mode=importlib.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_corpus import (COLUMNS, MIN_CORPUS, NUMBER_COLUMNS, ORDER_COLUMNS, SEED, corpus,  # noqa: E402
                          generate_rows)

TEST_DB = "pgherd_test"
SHARDS = 3
SCHEMAS = [f"merge_s{i}" for i in range(SHARDS)]
WHOLE = "merge_all"
# Relative tolerance for floats Postgres computes in row order (variance family of floats, avg(float4)).
FLOAT_TOLERANCE = 1e-12
# Random value sets for the numeric avg / variance scale check (about 3 ms each).
NUMERIC_CASES = 400

def _shard_of(id_: int) -> int:
    return (id_ * 7919) % SHARDS


@pytest.fixture(scope="module")
def oracle(pg: Any):
    conn = psycopg.connect(pg.dsn(TEST_DB), autocommit=True)
    rows = generate_rows(random.Random(SEED))
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
