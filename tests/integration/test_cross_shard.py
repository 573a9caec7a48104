"""Cross-shard SELECTs through the real pgherd equal the same SELECTs on one Postgres holding all rows.

Three shard databases xs_0 .. xs_2 on the session cluster each hold `items` as a hash-partitioned
parent with only the partition that shard owns (`FOR VALUES WITH (MODULUS 3, REMAINDER k)`), so a
row in the wrong place is refused by Postgres itself; the reference database xs_ref holds all the
rows in one plain table. One pgherd serves the shards as database `xs` ([[sharded_tables]] items.id).

The corpus and the generated rows (NULLs, duplicates, negative and large numbers, NaN and
infinities, non-ASCII text; int2/4/8, numeric, float4/8, text, varchar, char, bool, date,
timestamp, timestamptz, uuid) are those of test_merge_oracle.py (merge_corpus.py). Every statement
runs through pgherd and straight on the reference three ways:
  simple    the simple Query protocol (psycopg sends a statement without parameters as a Query;
            statements with parameters go through a ClientCursor, which inlines them, as psql does)
  extended  Parse/Bind/Execute, text results: the statement's own parameters, or else a `WHERE %s`
            (true) added to each `FROM items`, so psycopg's default cursor uses the extended protocol
  binary    Parse/Bind/Execute with binary results (psycopg `cursor(binary=True)`)
and the two results must have the same columns (name, type OID, size, modifier, format), the same
command tag, and the same rows: every value is loaded as the raw bytes Postgres sent (text or
binary), compared in order where the ORDER BY determines it, as a multiset otherwise (the corpus
says which). Floats Postgres computes in an order-dependent way (the variance family, avg of
floats) are compared to a relative 1e-12; in GROUP BY / DISTINCT / UNION results a float -0 and 0
(equal values, either of which Postgres may return for the group) count as one. A statement pgherd refuses must fail with 0A000, and at
least MIN_CORPUS statements must be answered in every way, so refusals cannot hide differences.

The memory test loads 5 million rows into `big` (each shard its hash partition) and reads a
cross-shard ORDER BY … LIMIT 10 and a full ORDER BY id scan (row by row, psycopg's single-row
mode) while sampling the pgherd worker's RSS.
"""

from __future__ import annotations

import math
import random
import re
import struct
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple, Optional

import psutil
import psycopg
import pytest
from psycopg import postgres
from psycopg.adapt import Loader
from psycopg.pq import Format

from pgherd.router.merge import plan_merge

sys.path.insert(0, str(Path(__file__).resolve().parent))  # merge_corpus.py (see its docstring)
from merge_corpus import COLUMNS, MIN_CORPUS, SEED, corpus, generate_rows  # noqa: E402

pytestmark = pytest.mark.timeout(240)

SHARDS = 3
DBS = [f"xs_{i}" for i in range(SHARDS)]
REF = "xs_ref"
DB = "xs"  # the sharded database as pgherd serves it
ALICE = ("alice", "alice-secret")
# Both sides run with a non-UTC session time zone, so timestamptz output depends on the SET reaching
# every shard.
TIME_ZONE = "Asia/Kolkata"
MODES = ("simple", "extended", "binary")
FLOAT4_OID, FLOAT8_OID = 700, 701
# Relative tolerance for float aggregates Postgres computes in row order (as test_merge_oracle.py).
FLOAT_TOLERANCE = 1e-12
APPROX_FUNCS = frozenset(["stddev", "stddev_samp", "stddev_pop", "variance", "var_samp", "var_pop", "avg"])
# Mismatches shown when the corpus test fails (each one is long).
SHOW_FAILURES = 40

BIG_ROWS = 5_000_000
# The value column of `big`: about 50 ids share each value, so ORDER BY v needs the id tiebreaker.
BIG_V = "((g * 7919) % 100003 - 50000)::int"
BIG_LABEL = "'label-' || lpad(g::text, 12, '0')"
# How far the worker's RSS may grow while it merges 5 million rows (about 245 MB of DataRows on
# the wire). A streaming k-way merge holds one row per shard plus socket and output buffers
# (OUT_FLUSH_BYTES = 64 KiB) and parser caches: a few MiB. 64 MiB leaves room for the allocator
# and garbage-collection timing, and is still far below what buffering even a quarter of the
# result would take.
MIB = 2**20
RSS_GROWTH_BOUND = 64 * MIB
# How often the RSS sampler looks at the worker.
RSS_SAMPLE_INTERVAL = 0.02


# ---------------------------------------------------------------------------------------------
# Databases


def _alice(pg: Any, db: str) -> psycopg.Connection:
    return psycopg.connect(pg.dsn(db, *ALICE), autocommit=True, connect_timeout=10)


def _recreate(pg: Any, db: str) -> None:
    pg.sql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
    pg.sql(f"CREATE DATABASE {db} OWNER alice")


@pytest.fixture(scope="module")
def databases(pg: Any) -> Any:
    """The shard databases with their part of `items` (and an empty `big`), and the reference."""
    for db in (*DBS, REF):
        _recreate(pg, db)
    rows = generate_rows(random.Random(SEED))
    cols = ", ".join(c.split()[0] for c in COLUMNS.split(","))
    try:
        for k, db in enumerate(DBS):
            with _alice(pg, db) as conn:
                conn.execute(f"CREATE TABLE items ({COLUMNS}) PARTITION BY HASH (id)")
                conn.execute(f"CREATE TABLE items_p{k} PARTITION OF items "
                             f"FOR VALUES WITH (MODULUS {SHARDS}, REMAINDER {k})")
                # Every row goes to a staging table; the shard keeps those Postgres' hash puts there.
                conn.execute("CREATE TEMP TABLE items_load (LIKE items)")
                with conn.cursor().copy(f"COPY items_load ({cols}) FROM STDIN") as copy:
                    for r in rows:
                        copy.write_row(r)
                conn.execute(f"INSERT INTO items SELECT * FROM items_load "
                             f"WHERE satisfies_hash_partition('items'::regclass, {SHARDS}, {k}, id)")
                conn.execute("ANALYZE items")
                conn.execute("CREATE TABLE big (id bigint NOT NULL, v int NOT NULL, label text NOT NULL) "
                             "PARTITION BY HASH (id)")
                # Unlogged: the 5 million rows load in seconds and are thrown away.
                conn.execute(f"CREATE UNLOGGED TABLE big_p{k} PARTITION OF big "
                             f"FOR VALUES WITH (MODULUS {SHARDS}, REMAINDER {k})")
        with _alice(pg, REF) as conn:
            conn.execute(f"CREATE TABLE items ({COLUMNS})")
            with conn.cursor().copy(f"COPY items ({cols}) FROM STDIN") as copy:
                for r in rows:
                    copy.write_row(r)
            conn.execute("ANALYZE items")
        counts = []
        for db in DBS:
            with _alice(pg, db) as conn:
                counts.append(conn.execute("SELECT count(*) FROM items").fetchone()[0])
        assert sum(counts) == len(rows) and all(counts), counts
        yield pg
    finally:
        for db in (*DBS, REF):
            try:
                pg.sql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
            except Exception:
                pass


@pytest.fixture(scope="module")
def proc(databases: Any, pgherd_module: Any) -> Any:
    pg = databases
    dbs = [{"name": DB, "host": pg.host, "port": pg.port, "database_name": db, "shard": i}
           for i, db in enumerate(DBS)]
    extra = "".join(f'[[sharded_tables]]\ndatabase = "{DB}"\nname = "{t}"\ncolumn = "id"\ndata_type = "bigint"\n\n'
                    for t in ("items", "big"))
    return pgherd_module(general={"workers": 1}, databases=dbs,
                         users=[{"name": "alice", "password": ALICE[1], "database": DB}], extra_toml=extra)


# ---------------------------------------------------------------------------------------------
# Clients: every value is loaded as the bytes Postgres sent


class _RawText(Loader):
    def load(self, data: Any) -> bytes:
        return bytes(data)


class _RawBinary(Loader):
    format = Format.BINARY

    def load(self, data: Any) -> bytes:
        return bytes(data)


def _raw_values(conn: psycopg.Connection) -> None:
    for info in postgres.types:
        for oid in (info.oid, info.array_oid):
            if oid:
                conn.adapters.register_loader(oid, _RawText)
                conn.adapters.register_loader(oid, _RawBinary)


def _client(dsn: str) -> psycopg.Connection:
    conn = psycopg.connect(dsn, autocommit=True, prepare_threshold=None, connect_timeout=10)
    _raw_values(conn)
    conn.execute(f"SET TimeZone = '{TIME_ZONE}'")
    return conn


def _pgherd_dsn(proc: Any) -> str:
    return f"host={proc.host} port={proc.port} dbname={DB} user={ALICE[0]} password={ALICE[1]}"


@pytest.fixture(scope="module")
def clients(proc: Any, databases: Any) -> Any:
    through = _client(_pgherd_dsn(proc))
    direct = _client(databases.dsn(REF, *ALICE))
    yield through, direct
    through.close()
    direct.close()


# ---------------------------------------------------------------------------------------------
# Running a statement


class Outcome(NamedTuple):
    columns: list[tuple] = []  # (name, type OID, size, modifier, format)
    tag: Optional[str] = None
    rows: list[tuple] = []
    error: Optional[tuple[str, str]] = None  # (SQLSTATE, message)


def _pyformat(sql: str) -> str:
    """$1, $2 … as psycopg's %s placeholders (the corpus numbers them in order)."""
    return re.sub(r"\$\d+", "%s", sql.replace("%", "%%"))


_FROM_ITEMS = re.compile(r"\bFROM items( WHERE)?\b")


def _with_where_param(sql: str) -> tuple[str, tuple]:
    """sql with a `WHERE %s` (bound to true) on each `FROM items`: the same rows, asked with a parameter."""
    out, n = _FROM_ITEMS.subn(lambda m: "FROM items WHERE %s AND" if m.group(1) else "FROM items WHERE %s",
                              sql.replace("%", "%%"))
    assert n, sql
    return out, (True,) * n


def run(conn: psycopg.Connection, mode: str, sql: str, params: tuple) -> Outcome:
    try:
        if mode == "simple":
            # No parameters: psycopg sends a Query message. A ClientCursor inlines them (and also
            # sends a Query).
            cur = psycopg.ClientCursor(conn) if params else conn.cursor()
            cur.execute(_pyformat(sql) if params else sql, params or None)
        elif mode == "extended":
            cur = conn.cursor()
            text, args = (_pyformat(sql), params) if params else _with_where_param(sql)
            cur.execute(text, args)
        else:
            cur = conn.cursor(binary=True)
            cur.execute(_pyformat(sql) if params else sql, params or None)
        rows = cur.fetchall()
    except psycopg.Error as exc:
        return Outcome(error=(exc.sqlstate or "", str(exc)))
    res = cur.pgresult
    assert res is not None
    columns = [(res.fname(i).decode(), res.ftype(i), res.fsize(i), res.fmod(i), res.fformat(i))
               for i in range(res.nfields)]
    return Outcome(columns, cur.statusmessage, rows)


# ---------------------------------------------------------------------------------------------
# Comparing


def _approx_columns(columns: list[tuple]) -> set[int]:
    return {i for i, c in enumerate(columns) if c[1] == FLOAT8_OID and c[0] in APPROX_FUNCS}


def _float(value: bytes, fmt: int) -> float:
    return struct.unpack("!d", value)[0] if fmt else float(value.decode())


def _same(a: Optional[bytes], b: Optional[bytes], fmt: int, approx: bool) -> bool:
    if a == b:
        return True
    if not approx or a is None or b is None:
        return False
    x, y = _float(a, fmt), _float(b, fmt)
    if math.isnan(x) or math.isnan(y):
        return math.isnan(x) and math.isnan(y)
    return math.isclose(x, y, rel_tol=FLOAT_TOLERANCE, abs_tol=1e-300)


# Statements that pick one value to stand for several equal ones (GROUP BY, DISTINCT, UNION).
_GROUPING = re.compile(r"\b(GROUP BY|DISTINCT|UNION)\b(?! ALL)")
# -0 and 0 are equal floats: which of them stands for the group depends on which row comes first,
# in Postgres as in pgherd, so grouping statements compare them as one value.
_NEGATIVE_ZERO = {(FLOAT8_OID, 0): b"-0", (FLOAT4_OID, 0): b"-0",
                  (FLOAT8_OID, 1): b"\x80" + bytes(7), (FLOAT4_OID, 1): b"\x80" + bytes(3)}
_ZERO = {b"-0": b"0", b"\x80" + bytes(7): bytes(8), b"\x80" + bytes(3): bytes(4)}


def _zeros_as_one(rows: list[tuple], columns: list[tuple]) -> list[tuple]:
    """rows with every float -0 written as 0."""
    neg = {i: _NEGATIVE_ZERO[c[1], c[4]] for i, c in enumerate(columns) if (c[1], c[4]) in _NEGATIVE_ZERO}
    if not neg:
        return rows
    return [tuple(_ZERO[v] if i in neg and v == neg[i] else v for i, v in enumerate(r)) for r in rows]


def _key_columns(sql: str, ncols: int) -> tuple[list[int], bool]:
    """The result columns the ORDER BY names, and whether the statement has LIMIT or OFFSET."""
    plan = plan_merge(sql, {"id"})
    n = ncols + plan.hidden
    cols = [k.column if k.column >= 0 else n + k.column for k in plan.order]
    return [c for c in cols if c < ncols], plan.limit is not None or bool(plan.offset)


def differences(sql: str, compare: str, got: Outcome, want: Outcome) -> Optional[str]:
    """Why got (through pgherd) differs from want (the reference), or None."""
    if want.error:
        return f"the reference failed: {want.error}"
    if got.columns != want.columns:
        return f"columns {got.columns} != {want.columns}"
    if got.tag != want.tag:
        return f"command tag {got.tag!r} != {want.tag!r}"
    if len(got.rows) != len(want.rows):
        return f"{len(got.rows)} rows, expected {len(want.rows)}"
    fmt = want.columns[0][4] if want.columns else 0
    approx = _approx_columns(want.columns)
    if _GROUPING.search(sql):
        got = got._replace(rows=_zeros_as_one(got.rows, got.columns))
        want = want._replace(rows=_zeros_as_one(want.rows, want.columns))
    if compare == "count":
        return None
    if compare == "exact":
        for i, (g, w) in enumerate(zip(got.rows, want.rows)):
            if not all(_same(a, b, fmt, c in approx) for c, (a, b) in enumerate(zip(g, w))):
                return f"row {i}: {g!r} != {w!r}"
        return None
    if compare == "multiset":
        def norm(row: tuple) -> tuple:
            return tuple(f"{_float(v, fmt):.10g}" if c in approx and v is not None else v for c, v in enumerate(row))

        g, w = Counter(map(norm, got.rows)), Counter(map(norm, want.rows))
        return None if g == w else f"rows differ as multisets: extra {list((g - w).items())[:5]}, " \
                                   f"missing {list((w - g).items())[:5]}"
    assert compare == "keys", compare
    keys, limited = _key_columns(sql, len(want.columns))
    if [[r[c] for c in keys] for r in got.rows] != [[r[c] for c in keys] for r in want.rows]:
        return f"ORDER BY key columns {keys} differ: {[[r[c] for c in keys] for r in got.rows][:10]!r} …"
    if not limited and Counter(got.rows) != Counter(want.rows):
        return "rows differ as multisets"
    return None


# ---------------------------------------------------------------------------------------------
# The corpus


def test_corpus_through_pgherd_equals_postgres(clients: Any) -> None:
    through, direct = clients
    statements = corpus()
    assert len(statements) >= MIN_CORPUS
    failures: list[str] = []
    refused: Counter = Counter()
    answered = 0
    for sql, compare, params in statements:
        ok = True
        for mode in MODES:
            got = run(through, mode, sql, params)
            if got.error and got.error[0] == "0A000":
                refused[mode] += 1
                ok = False
                continue
            if got.error:
                failures.append(f"[{mode}] {sql} {params or ''}\n  pgherd failed: {got.error}")
                ok = False
                continue
            why = differences(sql, compare, got, run(direct, mode, sql, params))
            if why:
                failures.append(f"[{mode}] {sql} {params or ''}\n  {why}"[:1200])
                ok = False
        answered += ok
    print(f"\n{len(statements)} statements; answered the same in every mode: {answered}; "
          f"refused (0A000) per mode: {dict(refused)}; differences: {len(failures)}")
    assert not failures, f"{len(failures)} results differ from Postgres:\n\n" + "\n\n".join(failures[:SHOW_FAILURES])
    assert answered >= MIN_CORPUS, f"only {answered} statements answered (refused per mode: {dict(refused)})"


def test_where_param_rewrite_keeps_results(clients: Any) -> None:
    """The `WHERE %s` the extended mode adds leaves Postgres' answer unchanged (checked on the reference)."""
    _, direct = clients
    checked = 0
    for sql, compare, params in corpus():
        if params or compare != "exact":
            continue
        plain = run(direct, "binary", sql, ())
        text, args = _with_where_param(sql)
        cur = direct.cursor(binary=True)
        cur.execute(text, args)
        assert cur.fetchall() == plain.rows, sql
        checked += 1
    assert checked > 100


# ---------------------------------------------------------------------------------------------
# Five million rows: bounded worker memory


@pytest.fixture(scope="module")
def big(databases: Any) -> Any:
    """Load BIG_ROWS rows of `big`, each shard only the ids Postgres' hash puts there (in parallel)."""
    pg = databases
    errors: list[BaseException] = []

    def load(k: int, db: str) -> None:
        try:
            with _alice(pg, db) as conn:
                conn.execute(f"INSERT INTO big SELECT g, {BIG_V}, {BIG_LABEL} "
                             f"FROM generate_series(1::bigint, {BIG_ROWS}) g "
                             f"WHERE satisfies_hash_partition('big'::regclass, {SHARDS}, {k}, g)")
                conn.execute("ALTER TABLE big ADD PRIMARY KEY (id)")
                conn.execute("VACUUM ANALYZE big")
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=load, args=(k, db)) for k, db in enumerate(DBS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return pg


class RssSampler:
    """Samples the summed RSS of pgherd's worker processes in a thread until stopped."""

    def __init__(self, proc: Any) -> None:
        root = psutil.Process(proc.pid)
        self.workers = [p for p in root.children(recursive=True) if "pgherd.worker" in " ".join(p.cmdline())]
        assert self.workers, f"no worker processes under pgherd pid {proc.pid}"
        self.start = self.peak = self.sample()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        return sum(p.memory_info().rss for p in self.workers)

    def _run(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_INTERVAL):
            self.peak = max(self.peak, self.sample())
            self.samples += 1

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.sample())

    @property
    def growth(self) -> int:
        return self.peak - self.start



@pytest.mark.slow
def test_five_million_rows_in_bounded_memory(proc: Any, big: Any) -> None:
    pg = big
    with psycopg.connect(_pgherd_dsn(proc), autocommit=True, prepare_threshold=None, connect_timeout=10) as conn, \
            psycopg.connect(pg.dsn(REF, *ALICE), autocommit=True, connect_timeout=10) as ref:
        assert conn.execute("SELECT count(*) FROM big").fetchone() == (BIG_ROWS,)
        conn.execute("SELECT id FROM big ORDER BY id LIMIT 1").fetchall()  # warm the worker's caches

        # ORDER BY … LIMIT 10 over all 5 million rows; the expected rows computed straight from
        # the generating expressions.
        expected = ref.execute(f"SELECT g, {BIG_V} AS v, {BIG_LABEL} FROM generate_series(1::bigint, {BIG_ROWS}) g "
                               f"ORDER BY v DESC, g LIMIT 10").fetchall()
        with RssSampler(proc) as limit_rss:
            cur = conn.execute("SELECT id, v, label FROM big ORDER BY v DESC, id LIMIT 10")
            top = cur.fetchall()
        assert top == expected
        assert cur.statusmessage == "SELECT 10"

        # The full ordered scan, read row by row (single-row mode: the client never holds more
        # than one row, so pgherd must not read the shards faster than the client reads it).
        started = time.monotonic()
        with RssSampler(proc) as scan_rss:
            cur = conn.cursor()
            n = 0
            for row in cur.stream("SELECT id, v, label FROM big ORDER BY id"):
                n += 1
                if row[0] != n:
                    pytest.fail(f"row {n} has id {row[0]}: the merged stream is out of order or lost rows")
            elapsed = time.monotonic() - started
        assert n == BIG_ROWS
        assert conn.execute("SELECT 1").fetchone() == (1,)  # the session is still good
    print(f"\nworker RSS: LIMIT 10 from {limit_rss.start / MIB:.1f} MiB, peak {limit_rss.peak / MIB:.1f} MiB "
          f"(+{limit_rss.growth / MIB:.1f}); full scan of {BIG_ROWS} rows in {elapsed:.1f} s from "
          f"{scan_rss.start / MIB:.1f} MiB, peak {scan_rss.peak / MIB:.1f} MiB (+{scan_rss.growth / MIB:.1f}) "
          f"over {scan_rss.samples} samples; bound +{RSS_GROWTH_BOUND / MIB:.0f} MiB")
    assert limit_rss.growth <= RSS_GROWTH_BOUND, f"LIMIT 10: worker RSS grew by {limit_rss.growth / MIB:.1f} MiB"
    assert scan_rss.growth <= RSS_GROWTH_BOUND, f"full scan: worker RSS grew by {scan_rss.growth / MIB:.1f} MiB"
