"""Sharding through the real pgherd (issue 6): every statement reaches the right shard, or all of them.

The shards are separate databases on the session cluster `pg`. Each shard database holds every
sharded table as a partitioned parent with ONLY the partition that shard owns (hash:
`FOR VALUES WITH (MODULUS n, REMAINDER shard)`; list / range: that shard's values; the default
shard: a DEFAULT partition with a CHECK that excludes the other shards' values), so a row sent to
the wrong shard is refused by Postgres itself (SQLSTATE 23514). Schema-sharded schemas exist only
on their shard (a mis-route fails with 42P01). Which shard a key belongs to is always asked of
Postgres (`satisfies_hash_partition`), never computed with pgherd's code.

Shard databases (owned by alice):
  shd2_0, shd2_1          a 2-shard set: items (static data set), wr (writes), t_text, t_varchar,
                          t_uuid, events/visits (sharded by a column rule), omnisharded countries /
                          prefs (a per-shard marker column shard_name) / notes, schema customer_a
                          (shd2_0 only) / customer_b (shd2_1 only)
  shd3_0 .. shd3_2        a 3-shard set: by_list (list + default), by_range (range, no default),
                          h3 (hash over 3 shards)
  shd_ref                 the reference: one plain Postgres database holding all of items' rows

pgherd databases (one pgherd `proc`, workers = 1, node_id = 7):
  sharded    -> shd2_*: items.id, wr.id (bigint); countries omnisharded (round robin), prefs
                omnisharded sticky, notes / markers / touches in no rule (implicitly omnisharded)
  typed      -> shd2_*: t_text.k, t_varchar.k (varchar), t_uuid.k (uuid)
  bycol      -> shd2_*: [[sharded_tables]] without name, column tenant_id
  byschema   -> shd2_*: [[sharded_schemas]] customer_a -> 0, customer_b -> 1
  listrange  -> shd3_*: by_list (list mapping with default), by_range (range mapping), h3 (hash)
A second pgherd (`proc_strict`) serves `sharded` with cross_shard_disabled and omnisharded_sticky.

Statement-level triggers on wr record every UPDATE / DELETE / INSERT statement that reaches a
shard in its `touches` table, so "touched only the right shard" is measured on the shards.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

import asyncpg
import psycopg
import pytest
from psycopg import sql as psql_sql

from pgherd.shared.localpg import pg_bin_dir
from pgherd.shared.unique_id import decode
from pgherd.shared.wire import messages as M
from pgherd.shared.wire import protocol as P

sys.path.insert(0, str(Path(__file__).resolve().parent))  # shard_conns.py (see its docstring)
from shard_conns import ALICE, ShardConns  # noqa: E402

pytestmark = pytest.mark.timeout(60)

TEST_DB = "pgherd_test"
SH2 = ("shd2_0", "shd2_1")
SH3 = ("shd3_0", "shd3_1", "shd3_2")
REF = "shd_ref"
NODE_ID = 7
# The static data set of items: enough rows for every shard, plus edge keys.
ITEM_IDS = list(range(1, 201)) + [0, -1, -5, 2**62, -(2**62), 2**63 - 1, -(2**63)]
# Keys of wr written by tests (directly or through pgherd) are drawn from here.
WR_CANDIDATES = list(range(1000, 1100))
TEXT_CANDIDATES = ["", " ", "a", "b", "c", "alice", "bob", "carol", "O'Brien", "x y z", "é", "日本語", "😀",
                   "tab\there", "back\\slash", "abcdefghijklm", "k" * 40]
UUID_CANDIDATES = [uuid.UUID(int=0), uuid.UUID(int=1), uuid.UUID(int=(1 << 128) - 1)] + [
    uuid.UUID(f"00000000-0000-4000-8000-{i:012x}") for i in range(1, 20)]
LIST_SHARD = {"eu": 0, "uk": 0, "us": 1, "ca": 1}  # everything else: the default, shard 2
ASYNC_TIMEOUT = 20


# ---------------------------------------------------------------------------------------------
# Shard databases


def _hash_tables(k: int, modulus: int) -> str:
    """DDL of the 2-shard set on shard k."""
    part = f"FOR VALUES WITH (MODULUS {modulus}, REMAINDER {k})"
    schema = ("CREATE SCHEMA customer_a; CREATE TABLE customer_a.accounts (id bigint PRIMARY KEY, owner text);"
              if k == 0 else
              "CREATE SCHEMA customer_b; CREATE TABLE customer_b.accounts (id bigint PRIMARY KEY, owner text);")
    return f"""
        CREATE TABLE items (id bigint PRIMARY KEY, v text, n int, grp text) PARTITION BY HASH (id);
        CREATE TABLE items_p{k} PARTITION OF items {part};
        CREATE TABLE wr (id bigint PRIMARY KEY, v text) PARTITION BY HASH (id);
        CREATE TABLE wr_p{k} PARTITION OF wr {part};
        CREATE TABLE touches (tbl text, op text);
        CREATE FUNCTION note_touch() RETURNS trigger LANGUAGE plpgsql AS
            $$ BEGIN INSERT INTO touches VALUES (TG_TABLE_NAME, TG_OP); RETURN NULL; END $$;
        CREATE TRIGGER wr_touch AFTER INSERT OR UPDATE OR DELETE ON wr
            FOR EACH STATEMENT EXECUTE FUNCTION note_touch();
        CREATE TABLE t_text (k text COLLATE "C" PRIMARY KEY, v text) PARTITION BY HASH (k);
        CREATE TABLE t_text_p{k} PARTITION OF t_text {part};
        CREATE TABLE t_varchar (k varchar(100) COLLATE "C" PRIMARY KEY, v text) PARTITION BY HASH (k);
        CREATE TABLE t_varchar_p{k} PARTITION OF t_varchar {part};
        CREATE TABLE t_uuid (k uuid PRIMARY KEY, v text) PARTITION BY HASH (k);
        CREATE TABLE t_uuid_p{k} PARTITION OF t_uuid {part};
        CREATE TABLE events (tenant_id bigint, seq int, v text) PARTITION BY HASH (tenant_id);
        CREATE TABLE events_p{k} PARTITION OF events {part};
        CREATE TABLE visits (tenant_id bigint, v text) PARTITION BY HASH (tenant_id);
        CREATE TABLE visits_p{k} PARTITION OF visits {part};
        CREATE TABLE countries (code text PRIMARY KEY, name text, shard_name text);
        INSERT INTO countries VALUES ('fr', 'France', 's{k}'), ('jp', 'Japan', 's{k}');
        CREATE TABLE prefs (k text PRIMARY KEY, shard_name text);
        INSERT INTO prefs VALUES ('theme', 's{k}');
        CREATE TABLE notes (id bigint PRIMARY KEY, body text);
        CREATE TABLE markers (shard_name text);
        INSERT INTO markers VALUES ('s{k}');
        {schema}
    """


def _list_range_tables(k: int) -> str:
    """DDL of the 3-shard set on shard k."""
    if k == 2:
        others = ", ".join(f"'{v}'" for v in LIST_SHARD)
        by_list = (f"CREATE TABLE by_list_p2 PARTITION OF by_list DEFAULT;"
                   f"ALTER TABLE by_list_p2 ADD CONSTRAINT only_unlisted CHECK (region NOT IN ({others}));")
    else:
        values = ", ".join(f"'{v}'" for v, s in LIST_SHARD.items() if s == k)
        by_list = f"CREATE TABLE by_list_p{k} PARTITION OF by_list FOR VALUES IN ({values});"
    bounds = {0: "(MINVALUE) TO (100)", 1: "(100) TO (200)", 2: "(200) TO (300)"}[k]
    return f"""
        CREATE TABLE by_list (region text COLLATE "C", v text) PARTITION BY LIST (region);
        {by_list}
        CREATE TABLE by_range (n bigint, v text) PARTITION BY RANGE (n);
        CREATE TABLE by_range_p{k} PARTITION OF by_range FOR VALUES FROM {bounds};
        CREATE TABLE h3 (id bigint PRIMARY KEY, v text) PARTITION BY HASH (id);
        CREATE TABLE h3_p{k} PARTITION OF h3 FOR VALUES WITH (MODULUS 3, REMAINDER {k});
    """


ITEM_ROWS_SQL = """
    SELECT id, 'v' || id, CASE WHEN mod(id, 13) = 0 THEN NULL ELSE abs(mod(id, 23))::int END, 'g' || abs(mod(id, 5))
    FROM unnest(%s::bigint[]) AS id
"""


class Shards(ShardConns):
    """ShardConns with this module's checks on its shard databases."""

    def holders(self, dbs: Sequence[str], table: str, column: str, value: Any, cast: str = "") -> list[int]:
        """Indexes of the shard databases holding a row with column = value."""
        q = f"SELECT count(*) FROM {table} WHERE {column} = %s{cast}"
        return [i for i, db in enumerate(dbs) if self.val(db, q, [value])]

    def counts(self, dbs: Sequence[str], query: str, params: Sequence | None = None) -> list[int]:
        return [self.val(db, query, params) for db in dbs]

    def touches(self) -> list[int]:
        """Statements that reached wr on each 2-shard database since the last reset."""
        return self.counts(SH2, "SELECT count(*) FROM touches WHERE tbl = 'wr'")

    def reset_wr(self) -> None:
        for db in SH2:
            self.exec(db, "TRUNCATE wr; TRUNCATE touches; DELETE FROM notes")


def _recreate(pg: Any, db: str) -> None:
    pg.sql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
    pg.sql(f"CREATE DATABASE {db} OWNER alice")


@pytest.fixture(scope="module")
def shards(pg: Any) -> Any:
    """Create and load every shard database (and the reference); dropped after the module."""
    for db in (*SH2, *SH3, REF):
        _recreate(pg, db)
    s = Shards(pg)
    try:
        for k, db in enumerate(SH2):
            s.exec(db, _hash_tables(k, 2))
            s.exec(db, f"INSERT INTO items (id, v, n, grp) SELECT * FROM ({ITEM_ROWS_SQL}) AS r(id, v, n, grp) "
                       f"WHERE satisfies_hash_partition('items'::regclass, 2, {k}, r.id)", [ITEM_IDS])
        for k, db in enumerate(SH3):
            s.exec(db, _list_range_tables(k))
        s.exec(REF, "CREATE TABLE items (id bigint PRIMARY KEY, v text, n int, grp text)")
        s.exec(REF, f"INSERT INTO items (id, v, n, grp) {ITEM_ROWS_SQL}", [ITEM_IDS])
        s.items_shard = s.hash_shard(SH2, "items", "bigint", ITEM_IDS)
        s.wr_shard = s.hash_shard(SH2, "wr", "bigint", WR_CANDIDATES)
        s.wr_keys = {k: [v for v in WR_CANDIDATES if s.wr_shard[v] == k] for k in (0, 1)}
        s.item_keys = {k: [v for v in range(1, 201) if s.items_shard[v] == k] for k in (0, 1)}
        s.text_shard = s.hash_shard(SH2, "t_text", "text", TEXT_CANDIDATES)
        s.varchar_shard = s.hash_shard(SH2, "t_varchar", "varchar", TEXT_CANDIDATES)
        s.uuid_shard = s.hash_shard(SH2, "t_uuid", "uuid", UUID_CANDIDATES)
        s.h3_shard = s.hash_shard(SH3, "h3", "bigint", range(1, 61))
        yield s
    finally:
        s.close()
        for db in (*SH2, *SH3, REF):
            try:
                pg.sql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
            except Exception:
                pass


# ---------------------------------------------------------------------------------------------
# pgherd configs


def _databases(pg: Any, names: Iterable[str]) -> list[dict]:
    sets = {"sharded": SH2, "typed": SH2, "bycol": SH2, "byschema": SH2, "listrange": SH3}
    out = [{"name": TEST_DB, "host": pg.host, "port": pg.port}]
    for name in names:
        for i, db in enumerate(sets[name]):
            out.append({"name": name, "host": pg.host, "port": pg.port, "shard": i, "database_name": db})
    return out


def _sharding_doc(names: Iterable[str]) -> dict:
    names = set(names)
    tables = [
        {"database": "sharded", "name": "items", "column": "id", "data_type": "bigint"},
        {"database": "sharded", "name": "wr", "column": "id", "data_type": "bigint"},
        {"database": "typed", "name": "t_text", "column": "k", "data_type": "varchar"},
        {"database": "typed", "name": "t_varchar", "column": "k", "data_type": "varchar"},
        {"database": "typed", "name": "t_uuid", "column": "k", "data_type": "uuid"},
        {"database": "bycol", "column": "tenant_id", "data_type": "bigint"},
        {"database": "listrange", "name": "by_list", "column": "region", "data_type": "varchar",
         "mapping": [{"shard": 0, "values": ["eu", "uk"]}, {"shard": 1, "values": ["us", "ca"]}, {"shard": 2}]},
        {"database": "listrange", "name": "by_range", "column": "n", "data_type": "bigint",
         "mapping": [{"shard": 0, "end": 100}, {"shard": 1, "start": 100, "end": 200},
                     {"shard": 2, "start": 200, "end": 300}]},
        {"database": "listrange", "name": "h3", "column": "id", "data_type": "bigint"},
    ]
    schemas = [{"database": "byschema", "name": "customer_a", "shard": 0},
               {"database": "byschema", "name": "customer_b", "shard": 1}]
    omni = [{"database": "sharded", "tables": ["countries"]},
            {"database": "sharded", "tables": ["prefs"], "sticky": True}]
    return {
        "sharded_tables": [t for t in tables if t["database"] in names],
        "sharded_schemas": [t for t in schemas if t["database"] in names],
        "omnisharded_tables": [t for t in omni if t["database"] in names],
    }


def _start(pgherd_module: Any, pg: Any, helpers: Any, request: Any, names: Sequence[str], general: dict) -> Any:
    doc = {k: v for k, v in _sharding_doc(names).items() if v}
    toml = helpers._base_conftest(request.config).toml_dumps(doc)
    return pgherd_module(
        general={"workers": 1, "default_pool_size": 4, **general},
        databases=_databases(pg, names),
        users=[{"name": ALICE[0], "password": ALICE[1], "all_databases": True}],
        extra_toml=toml,
    )


@pytest.fixture(scope="module")
def proc(shards: Shards, pgherd_module: Any, pg: Any, helpers: Any, request: Any) -> Any:
    """The main pgherd: every sharded database, node_id 7."""
    return _start(pgherd_module, pg, helpers, request, ("sharded", "typed", "bycol", "byschema", "listrange"),
                  {"node_id": NODE_ID})


@pytest.fixture(scope="module")
def proc_strict(shards: Shards, pgherd_module: Any, pg: Any, helpers: Any, request: Any) -> Any:
    """A second pgherd: cross_shard_disabled and omnisharded_sticky."""
    return _start(pgherd_module, pg, helpers, request, ("sharded",),
                  {"cross_shard_disabled": True, "omnisharded_sticky": True})


@pytest.fixture
def wr(shards: Shards) -> Shards:
    """Empty wr, touches and notes on both shards."""
    shards.reset_wr()
    return shards


def via(proc: Any, db: str = "sharded", autocommit: bool = True, **kwargs: Any) -> psycopg.Connection:
    """psycopg to pgherd as alice."""
    kwargs.setdefault("prepare_threshold", None)
    return psycopg.connect(proc.dsn(*ALICE, dbname=db), autocommit=autocommit, connect_timeout=10, **kwargs)


def arun(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, ASYNC_TIMEOUT))


async def aconnect(proc: Any, db: str = "sharded", **kwargs: Any) -> asyncpg.Connection:
    return await asyncpg.connect(proc.dsn(*ALICE, dbname=db), timeout=10, **kwargs)


def _psql_bin() -> str:
    return shutil.which("psql") or str(pg_bin_dir() / "psql")


def run_psql(proc: Any, db: str, *args: str, env: dict | None = None, tuples: bool = True,
             check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess:
    """psql through pgherd as alice (-A -t unless tuples=False); with stdin, runs it as a script."""
    environ = {**os.environ, "PGPASSWORD": ALICE[1], "PGCONNECT_TIMEOUT": "10", **(env or {})}
    environ.pop("PGAPPNAME", None)
    argv = [_psql_bin(), "-X", "-v", "ON_ERROR_STOP=1", "-h", proc.host, "-p", str(proc.port), "-U", ALICE[0],
            "-d", db, *(("-A", "-t") if tuples else ()), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=environ, input=stdin)
    if check:
        assert done.returncode == 0, f"psql {args} failed ({done.returncode}): {done.stderr}"
    return done


def sqlstate_of(fn: Any) -> str | None:
    """Run fn(); the SQLSTATE of the psycopg error it raises, or None when it succeeds."""
    try:
        fn()
    except psycopg.Error as exc:
        return exc.sqlstate
    return None


def literal(conn: psycopg.Connection, value: Any) -> str:
    return psql_sql.Literal(value).as_string(conn)


# ---------------------------------------------------------------------------------------------
# The set-up itself (these pass against any pgherd that starts)


def test_every_shard_holds_only_its_own_partition(shards):
    for dbs in (SH2, SH3):
        for k, db in enumerate(dbs):
            parts = shards.rows(db, "SELECT p.relname::text, pg_get_expr(c.relpartbound, c.oid) "
                                    "FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                                    "JOIN pg_class p ON p.oid = i.inhparent WHERE c.relkind = 'r' ORDER BY 1")
            by_parent = Counter(p for p, _ in parts)
            assert all(n == 1 for n in by_parent.values()), (db, parts)
            for parent, bound in parts:
                if dbs is SH2 or parent == "h3":
                    assert bound == f"FOR VALUES WITH (modulus {len(dbs)}, remainder {k})", (db, parent, bound)
    assert shards.counts(SH2, "SELECT count(*) FROM items") == [
        sum(1 for v in ITEM_IDS if shards.items_shard[v] == k) for k in (0, 1)]
    assert all(shards.counts(SH2, "SELECT count(*) FROM items")), "both shards hold part of items"
    assert shards.val(REF, "SELECT count(*) FROM items") == len(ITEM_IDS)
    assert all(len(shards.wr_keys[k]) >= 10 for k in (0, 1))
    assert set(shards.text_shard.values()) == {0, 1} and set(shards.uuid_shard.values()) == {0, 1}
    assert set(shards.h3_shard.values()) == {0, 1, 2}


@pytest.mark.parametrize("table, sqltype, mapping", [
    ("wr", "bigint", "wr_shard"), ("t_text", "text", "text_shard"), ("t_varchar", "varchar", "varchar_shard"),
    ("t_uuid", "uuid", "uuid_shard"), ("events", "bigint", None),
])
def test_hash_guard_refuses_a_misrouted_row(shards, table, sqltype, mapping):
    """Postgres itself rejects a row inserted on the wrong shard (the guard every routing test relies on)."""
    if mapping is None:
        where = shards.hash_shard(SH2, table, sqltype, range(1, 20))
    else:
        where = getattr(shards, mapping)
    column = "tenant_id" if table == "events" else ("id" if table == "wr" else "k")
    for key, home in list(where.items())[:6]:
        for k, db in enumerate(SH2):
            conn = shards.conn(db)
            with conn.transaction(force_rollback=True):
                state = sqlstate_of(lambda: conn.execute(
                    f"INSERT INTO {table} ({column}) VALUES (%s::{sqltype})", [key]))
            assert state == (None if k == home else "23514"), (table, key, db)


def test_list_range_guards_refuse_misrouted_rows(shards):
    cases = [("by_list", "region", v, LIST_SHARD.get(v, 2)) for v in ("eu", "uk", "us", "ca", "zz", "mx")]
    cases += [("by_range", "n", n, s) for n, s in ((-10**12, 0), (0, 0), (99, 0), (100, 1), (199, 1), (200, 2),
                                                      (299, 2))]
    for table, column, value, home in cases:
        for k, db in enumerate(SH3):
            conn = shards.conn(db)
            with conn.transaction(force_rollback=True):
                state = sqlstate_of(lambda: conn.execute(f"INSERT INTO {table} ({column}) VALUES (%s)", [value]))
            assert state == (None if k == home else "23514"), (table, value, db)
    for db in SH3:  # 300 and above belong to no shard
        assert sqlstate_of(lambda: shards.exec(db, "INSERT INTO by_range (n) VALUES (300)")) == "23514"


def test_schema_guard_each_schema_lives_on_one_shard(shards):
    assert shards.val(SH2[0], "SELECT count(*) FROM customer_a.accounts") == 0
    assert shards.val(SH2[1], "SELECT count(*) FROM customer_b.accounts") == 0
    assert sqlstate_of(lambda: shards.exec(SH2[1], "SELECT * FROM customer_a.accounts")) == "42P01"
    assert sqlstate_of(lambda: shards.exec(SH2[0], "SELECT * FROM customer_b.accounts")) == "42P01"


def test_pgherd_starts_and_answers_on_every_sharded_database(proc):
    for db in ("sharded", "typed", "bycol", "byschema", "listrange"):
        with via(proc, db) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            assert conn.execute("SELECT %s::int + 1", [41]).fetchone() == (42,)
            assert conn.execute("SELECT now() IS NOT NULL").fetchone() == (True,)


def test_psql_describe_works(proc):
    out = run_psql(proc, "sharded", "-c", r"\d").stdout
    for table in ("items", "wr", "countries", "notes"):
        assert table in out, out
    detail = run_psql(proc, "sharded", "-c", r"\d items", tuples=False).stdout
    assert "Partitioned table" in detail and "id" in detail, detail
    assert "countries" in run_psql(proc, "sharded", "-c", r"\dt").stdout


# ---------------------------------------------------------------------------------------------
# Hash sharding by key (bigint)


def test_insert_by_literal_key_lands_on_its_shard(proc, wr):
    keys = wr.wr_keys[0][:3] + wr.wr_keys[1][:3]
    with via(proc) as conn:
        for key in keys:
            cur = conn.execute(f"INSERT INTO wr (id, v) VALUES ({key}, 'lit-{key}')")
            assert cur.rowcount == 1 and cur.statusmessage == "INSERT 0 1"
    for key in keys:
        assert wr.holders(SH2, "wr", "id", key) == [wr.wr_shard[key]], key
    assert wr.touches() == [3, 3], "each INSERT reached only its shard"


def test_insert_by_bind_parameter_text_binary_and_prepared(proc, wr):
    k0, k1 = wr.wr_keys[0], wr.wr_keys[1]
    with via(proc) as conn:
        conn.execute("INSERT INTO wr (id, v) VALUES (%s, %s)", [k0[0], "text-param"])
        conn.execute("INSERT INTO wr (id, v) VALUES (%s, %s)", [k1[0], "text-param"])
        conn.execute("INSERT INTO wr (id, v) VALUES (%b, %b)", [k0[1], "binary-param"])
        conn.execute("INSERT INTO wr (id, v) VALUES (%b, %b)", [k1[1], "binary-param"])
        # One named prepared statement, executed for keys on both shards.
        for key in (k0[2], k1[2], k0[3], k1[3]):
            conn.execute("INSERT INTO wr (id, v) VALUES (%s, 'prepared')", [key], prepare=True)
        # Key cast in the statement, parameter typed int4 / int8 by psycopg.
        conn.execute("INSERT INTO wr (v, id) VALUES ('cast', %s::bigint)", [k1[4]])
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO wr (id, v) VALUES (%s, 'many')", [(k,) for k in (k0[5], k1[5], k1[6])])
    for key in (*k0[:4], *k1[:5], k0[5], k1[5], k1[6]):
        assert wr.holders(SH2, "wr", "id", key) == [wr.wr_shard[key]], key


def test_psycopg_pipeline_mode_routes_each_statement(proc, wr):
    keys = wr.wr_keys[0][:2] + wr.wr_keys[1][:2]
    with via(proc) as conn:
        with conn.pipeline():
            for key in keys:
                conn.execute("INSERT INTO wr (id, v) VALUES (%s, 'pipe')", [key])
            curs = [conn.execute("SELECT id, v FROM wr WHERE id = %s", [key]) for key in keys]
        assert [c.fetchall() for c in curs] == [[(key, "pipe")] for key in keys]
    for key in keys:
        assert wr.holders(SH2, "wr", "id", key) == [wr.wr_shard[key]]


def test_select_by_key_returns_the_row_from_its_shard(proc, shards):
    keys = shards.item_keys[0][:4] + shards.item_keys[1][:4] + [0, -5, 2**62, -(2**63), 2**63 - 1]
    expected = {r[0]: r for r in shards.rows(REF, "SELECT id, v, n, grp FROM items")}
    with via(proc) as conn:
        for key in keys:
            want = [expected[key]]
            assert conn.execute(f"SELECT id, v, n, grp FROM items WHERE id = {key}").fetchall() == want, key
            assert conn.execute(f"SELECT id, v, n, grp FROM items WHERE {key} = id").fetchall() == want, key
            assert conn.execute("SELECT id, v, n, grp FROM items WHERE id = %s", [key]).fetchall() == want
            assert conn.execute("SELECT id, v, n, grp FROM items WHERE id = %b", [key]).fetchall() == want
            assert conn.execute("SELECT id, v, n, grp FROM items WHERE id = %s", [key],
                                prepare=True).fetchall() == want
            # Aliases and schema-qualified names.
            assert conn.execute("SELECT i.id, i.v, i.n, i.grp FROM public.items AS i WHERE i.id = %s AND i.v IS "
                                "NOT NULL", [key]).fetchall() == want
        # A key no row has, on either shard.
        assert conn.execute("SELECT * FROM items WHERE id = 999999").fetchall() == []


def test_update_and_delete_by_key_touch_only_its_shard(proc, wr):
    k0, k1 = wr.wr_keys[0][:3], wr.wr_keys[1][:3]
    for key in (*k0, *k1):
        wr.exec(SH2[wr.wr_shard[key]], "INSERT INTO wr (id, v) VALUES (%s, 'orig')", [key])
    wr.exec(SH2[0], "TRUNCATE touches")
    wr.exec(SH2[1], "TRUNCATE touches")
    with via(proc) as conn:
        cur = conn.execute(f"UPDATE wr SET v = 'upd' WHERE id = {k1[0]}")
        assert cur.rowcount == 1 and cur.statusmessage == "UPDATE 1"
        assert wr.touches() == [0, 1]
        assert conn.execute("UPDATE wr SET v = 'upd' WHERE id = %s", [k0[0]]).rowcount == 1
        assert wr.touches() == [1, 1]
        assert conn.execute("UPDATE wr SET v = 'upd' WHERE id = %s", [k1[1]], prepare=True).rowcount == 1
        assert conn.execute("UPDATE wr SET v = 'upd' WHERE id = %s", [k0[1]], prepare=True).rowcount == 1
        assert wr.touches() == [2, 2]
        cur = conn.execute(f"DELETE FROM wr WHERE id = {k0[2]}")
        assert cur.rowcount == 1 and cur.statusmessage == "DELETE 1"
        assert wr.touches() == [3, 2]
        assert conn.execute("DELETE FROM wr WHERE id = %b", [k1[2]]).rowcount == 1
        assert wr.touches() == [3, 3]
        assert conn.execute("DELETE FROM wr WHERE id = %s", [k1[2]]).rowcount == 0  # gone
        assert wr.touches() == [3, 4]
    assert wr.rows(SH2[0], "SELECT id, v FROM wr ORDER BY id") == [(k0[0], "upd"), (k0[1], "upd")]
    assert wr.rows(SH2[1], "SELECT id, v FROM wr ORDER BY id") == [(k1[0], "upd"), (k1[1], "upd")]


def test_asyncpg_prepared_binary_parameters_route_by_key(proc, wr):
    k0, k1 = wr.wr_keys[0][:4], wr.wr_keys[1][:4]

    async def main() -> list:
        conn = await aconnect(proc)
        try:
            ins = await conn.prepare("INSERT INTO wr (id, v) VALUES ($1, $2)")
            for key in (*k0, *k1):
                await ins.fetch(key, f"a{key}")
            sel = await conn.prepare("SELECT id, v FROM wr WHERE id = $1")
            got = [tuple(await sel.fetchrow(key)) for key in (*k0, *k1)]
            status = [await conn.execute("UPDATE wr SET v = 'au' WHERE id = $1", k1[0]),
                      await conn.execute("UPDATE wr SET v = 'au' WHERE id = $1", k0[0]),
                      await conn.execute("DELETE FROM wr WHERE id = $1", k0[3]),
                      await conn.execute("DELETE FROM wr WHERE id = $1", k1[3])]
            many = await conn.fetch("SELECT id FROM wr WHERE id = ANY($1::bigint[])", [k0[1], k1[1], k1[2]])
            return [got, status, sorted(r[0] for r in many)]
        finally:
            await conn.close()

    got, status, many = arun(main())
    assert got == [(key, f"a{key}") for key in (*k0, *k1)]
    assert status == ["UPDATE 1", "UPDATE 1", "DELETE 1", "DELETE 1"]
    assert many == sorted([k0[1], k1[1], k1[2]])
    for key in (*k0[:3], *k1[:3]):
        assert wr.holders(SH2, "wr", "id", key) == [wr.wr_shard[key]]
    assert wr.holders(SH2, "wr", "id", k0[3]) == [] and wr.holders(SH2, "wr", "id", k1[3]) == []


def test_in_lists_spanning_shards_return_every_row(proc, shards):
    keys = shards.item_keys[0][:5] + shards.item_keys[1][:5] + [424242]
    expected = Counter(shards.rows(REF, "SELECT id, v FROM items WHERE id = ANY(%s)", [keys]))
    assert sum(expected.values()) == 10
    in_list = ", ".join(map(str, keys))
    with via(proc) as conn:
        assert Counter(conn.execute(f"SELECT id, v FROM items WHERE id IN ({in_list})").fetchall()) == expected
        assert Counter(conn.execute("SELECT id, v FROM items WHERE id = ANY(%s)", [keys]).fetchall()) == expected
        assert Counter(conn.execute("SELECT id, v FROM items WHERE id = ANY(%s)", [keys],
                                    prepare=True).fetchall()) == expected
        assert Counter(conn.execute(f"SELECT id, v FROM items WHERE id = ANY('{{{in_list}}}')").fetchall()) == expected
        ors = " OR ".join(f"id = {k}" for k in keys)
        assert Counter(conn.execute(f"SELECT id, v FROM items WHERE {ors}").fetchall()) == expected
        placeholders = ", ".join(["%s"] * len(keys))
        assert Counter(conn.execute(f"SELECT id, v FROM items WHERE id IN ({placeholders})",
                                    keys).fetchall()) == expected
    one_shard = shards.item_keys[1][:6]
    with via(proc) as conn:
        got = conn.execute("SELECT id FROM items WHERE id IN (%s, %s, %s, %s, %s, %s)", one_shard).fetchall()
    assert sorted(r[0] for r in got) == sorted(one_shard)

    async def apg() -> Counter:
        conn = await aconnect(proc)
        try:
            return Counter(tuple(r) for r in await conn.fetch("SELECT id, v FROM items WHERE id = ANY($1)", keys))
        finally:
            await conn.close()

    assert arun(apg()) == expected


def test_unkeyed_update_and_delete_reach_every_shard_with_summed_tags(proc, wr):
    k0, k1 = wr.wr_keys[0][:3], wr.wr_keys[1][:4]
    for key in (*k0, *k1):
        wr.exec(SH2[wr.wr_shard[key]], "INSERT INTO wr (id, v) VALUES (%s, 'orig')", [key])
    wr.exec(SH2[0], "TRUNCATE touches")
    wr.exec(SH2[1], "TRUNCATE touches")
    with via(proc) as conn:
        cur = conn.execute("UPDATE wr SET v = 'all'")
        assert cur.rowcount == 7 and cur.statusmessage == "UPDATE 7"
        assert wr.touches() == [1, 1]
        cur = conn.execute("UPDATE wr SET v = %s WHERE v = %s", ["again", "all"])
        assert cur.rowcount == 7
        cur = conn.execute("UPDATE wr SET v = 'psy' WHERE v <> 'nothing'", prepare=True)
        assert cur.rowcount == 7
        assert conn.execute("UPDATE wr SET v = 'none' WHERE v = 'nothing'").rowcount == 0
    assert wr.counts(SH2, "SELECT count(*) FROM wr WHERE v = 'psy'") == [3, 4]

    async def apg() -> list[str]:
        conn = await aconnect(proc)
        try:
            return [await conn.execute("UPDATE wr SET v = 'apg'"),
                    await conn.execute("UPDATE wr SET v = $1 WHERE id > $2", "apg2", 0),
                    await conn.execute("DELETE FROM wr WHERE id >= $1", min(k1[3], k0[2])),
                    ]
        finally:
            await conn.close()

    upd, upd2, dele = arun(apg())
    assert upd == "UPDATE 7" and upd2 == "UPDATE 7"
    gone = sum(1 for k in (*k0, *k1) if k >= min(k1[3], k0[2]))
    assert dele == f"DELETE {gone}"
    left = wr.counts(SH2, "SELECT count(*) FROM wr")
    assert sum(left) == 7 - gone
    out = run_psql(proc, "sharded", "-c", "UPDATE wr SET v = 'psql'", "-c", "DELETE FROM wr", tuples=False).stdout
    assert f"UPDATE {7 - gone}" in out and f"DELETE {7 - gone}" in out, out
    assert wr.counts(SH2, "SELECT count(*) FROM wr") == [0, 0]


def test_unkeyed_select_returns_the_union_of_the_shards(proc, shards):
    queries = [
        ("SELECT id, v, n, grp FROM items", None),
        ("SELECT id, v FROM items WHERE n > 10", None),
        ("SELECT id, v FROM items WHERE n > %s", [10]),
        ("SELECT grp, id FROM items WHERE id > 0 AND v LIKE %s", ["v1%"]),
        ("SELECT id FROM items WHERE id = 3 OR n = 5", None),  # OR with a non-key: every shard
        ("SELECT id, count(*) FROM items GROUP BY id", None),  # grouped by the sharding key
    ]
    with via(proc) as conn:
        for query, params in queries:
            ref = shards.conn(REF).execute(query, params)
            expected = Counter(ref.fetchall())
            for prepare in (False, True):
                cur = conn.execute(query, params, prepare=prepare)
                got = Counter(cur.fetchall())
                assert got == expected, (query, prepare, got - expected, expected - got)
                assert [(d.name, d.type_code) for d in cur.description] == \
                    [(d.name, d.type_code) for d in ref.description]
    union = Counter()
    for db in SH2:
        union.update(shards.rows(db, "SELECT id, v, n, grp FROM items"))

    async def apg() -> Counter:
        conn = await aconnect(proc)
        try:
            return Counter(tuple(r) for r in await conn.fetch("SELECT id, v, n, grp FROM items"))
        finally:
            await conn.close()

    assert arun(apg()) == union
    lines = run_psql(proc, "sharded", "-c", "SELECT id FROM items").stdout.split()
    assert sorted(map(int, lines)) == sorted(ITEM_IDS)


def test_multi_row_insert(proc, wr):
    k0, k1 = wr.wr_keys[0], wr.wr_keys[1]
    with via(proc) as conn:
        # Rows of one shard: a single-shard statement.
        cur = conn.execute(f"INSERT INTO wr (id, v) VALUES ({k1[0]}, 'm'), ({k1[1]}, 'm'), ({k1[2]}, 'm')")
        assert cur.rowcount == 3
        # Rows of both shards: split by pgherd, or refused with 0A000 -- never sent whole.
        state = sqlstate_of(lambda: conn.execute("INSERT INTO wr (id, v) VALUES (%s, 'x'), (%s, 'x')",
                                                 [k0[0], k1[3]]))
    assert state in (None, "0A000"), state
    assert wr.counts(SH2, "SELECT count(*) FROM wr WHERE v = 'm'") == [0, 3]
    if state is None:
        assert wr.holders(SH2, "wr", "id", k0[0]) == [0] and wr.holders(SH2, "wr", "id", k1[3]) == [1]
    else:
        assert wr.counts(SH2, "SELECT count(*) FROM wr WHERE v = 'x'") == [0, 0]


def test_ddl_goes_to_every_shard(proc, shards):
    with via(proc) as conn:
        conn.execute("CREATE TABLE ddl_probe (id int)")
        assert shards.counts(SH2, "SELECT count(*) FROM pg_class WHERE relname = 'ddl_probe'") == [1, 1]
        conn.execute("DROP TABLE ddl_probe")
    assert shards.counts(SH2, "SELECT count(*) FROM pg_class WHERE relname = 'ddl_probe'") == [0, 0]


# ---------------------------------------------------------------------------------------------
# Key types: text, varchar, uuid


@pytest.mark.parametrize("table, mapping, cast", [
    ("t_text", "text_shard", "::text"), ("t_varchar", "varchar_shard", "::varchar"), ("t_uuid", "uuid_shard", "::uuid"),
])
def test_text_varchar_and_uuid_keys(proc, shards, table, mapping, cast):
    where: dict = getattr(shards, mapping)
    keys = list(where)
    for db in SH2:
        shards.exec(db, f"TRUNCATE {table}")
    chunks = [keys[i::4] for i in range(4)]
    with via(proc, "typed") as conn:
        for key in chunks[0]:  # literals (simple protocol)
            conn.execute(f"INSERT INTO {table} (k, v) VALUES ({literal(conn, key)}, 'lit')")
        for key in chunks[1]:  # text-format parameters
            conn.execute(f"INSERT INTO {table} (k, v) VALUES (%s, 'txt')", [key])
        for key in chunks[2]:  # binary-format parameters, prepared
            conn.execute(f"INSERT INTO {table} (k, v) VALUES (%b, 'bin')", [key], prepare=True)

    async def apg() -> list:
        conn = await aconnect(proc, "typed")
        try:
            for key in chunks[3]:
                await conn.execute(f"INSERT INTO {table} (k, v) VALUES ($1, 'apg')", key)
            return [await conn.fetchval(f"SELECT v FROM {table} WHERE k = $1", key) for key in keys]
        finally:
            await conn.close()

    expected_v = {k: v for chunk, v in zip(chunks, ("lit", "txt", "bin", "apg")) for k in chunk}
    assert arun(apg()) == [expected_v[k] for k in keys]
    for key in keys:
        assert shards.holders(SH2, table, "k", key, cast) == [where[key]], key
    with via(proc, "typed") as conn:
        for key in keys:
            assert conn.execute(f"SELECT v FROM {table} WHERE k = {literal(conn, key)}").fetchall() == \
                [(expected_v[key],)], key
            assert conn.execute(f"SELECT v FROM {table} WHERE k = %s", [key]).fetchall() == [(expected_v[key],)]
        got = conn.execute(f"SELECT k FROM {table} WHERE k = ANY(%s)", [keys]).fetchall()
        assert Counter(r[0] for r in got) == Counter(keys)
        cur = conn.execute(f"UPDATE {table} SET v = 'u' WHERE k IN ({', '.join(literal(conn, k) for k in keys[:4])})")
        assert cur.rowcount == 4
        assert conn.execute(f"DELETE FROM {table} WHERE k = %s", [keys[0]]).rowcount == 1
    assert shards.holders(SH2, table, "k", keys[0], cast) == []


def test_uuid_key_spellings(proc, shards):
    """A uuid key is read as Postgres reads it: upper case, braces, no hyphens."""
    key = next(k for k, s in shards.uuid_shard.items() if s == 1)
    for db in SH2:
        shards.exec(db, "TRUNCATE t_uuid")
    shards.exec(SH2[1], "INSERT INTO t_uuid VALUES (%s, 'spelled')", [key])
    spellings = [str(key), str(key).upper(), "{" + str(key) + "}", key.hex]
    with via(proc, "typed") as conn:
        for s in spellings:
            assert conn.execute(f"SELECT v FROM t_uuid WHERE k = '{s}'").fetchall() == [("spelled",)], s
            assert conn.execute("SELECT v FROM t_uuid WHERE k = %s::uuid", [s]).fetchall() == [("spelled",)], s


# ---------------------------------------------------------------------------------------------
# Column rules, list, range, schema sharding


def test_sharded_table_rule_without_name_applies_to_every_table_with_the_column(proc, shards):
    where = shards.hash_shard(SH2, "events", "bigint", range(1, 30))
    tenants = [t for t in where if where[t] == 0][:3] + [t for t in where if where[t] == 1][:3]
    for db in SH2:
        shards.exec(db, "TRUNCATE events; TRUNCATE visits")
    with via(proc, "bycol") as conn:
        for i, t in enumerate(tenants):
            conn.execute(f"INSERT INTO events (tenant_id, seq, v) VALUES ({t}, {i}, 'e')")
            conn.execute("INSERT INTO visits (v, tenant_id) VALUES (%s, %s)", ["visit", t])
            conn.execute("INSERT INTO events (tenant_id, seq, v) VALUES (%s, %s, 'p')", [t, 100 + i], prepare=True)
        for t in tenants:
            assert conn.execute("SELECT count(*) FROM events WHERE tenant_id = %s", [t]).fetchone() == (2,)
            assert conn.execute(f"SELECT v FROM visits WHERE tenant_id = {t}").fetchall() == [("visit",)]
            assert conn.execute("SELECT e.seq FROM events e JOIN visits v ON v.tenant_id = e.tenant_id "
                                "WHERE e.tenant_id = %s ORDER BY e.seq", [t]).fetchall() == \
                [(tenants.index(t),), (100 + tenants.index(t),)]
        assert conn.execute("UPDATE visits SET v = 'seen' WHERE tenant_id = %s", [tenants[-1]]).rowcount == 1
    for t in tenants:
        assert shards.holders(SH2, "events", "tenant_id", t) == [where[t]]
        assert shards.holders(SH2, "visits", "tenant_id", t) == [where[t]]


def test_list_sharding_with_default(proc, shards):
    for db in SH3:
        shards.exec(db, "TRUNCATE by_list")
    regions = ["eu", "uk", "us", "ca", "zz", "mx", "de"]
    with via(proc, "listrange") as conn:
        for r in regions[:4]:
            conn.execute(f"INSERT INTO by_list (region, v) VALUES ('{r}', 'lit')")
        for r in regions[4:6]:
            conn.execute("INSERT INTO by_list (region, v) VALUES (%s, 'param')", [r])
        conn.execute("INSERT INTO by_list (region, v) VALUES (%s, 'prep')", [regions[6]], prepare=True)
        for r in regions:
            assert conn.execute("SELECT count(*) FROM by_list WHERE region = %s", [r]).fetchone() == (1,), r
        assert conn.execute("UPDATE by_list SET v = 'u' WHERE region = 'ca'").rowcount == 1
        got = conn.execute("SELECT region FROM by_list WHERE region IN ('eu', 'us', 'zz')").fetchall()
        assert sorted(r[0] for r in got) == ["eu", "us", "zz"]

    async def apg() -> list:
        conn = await aconnect(proc, "listrange")
        try:
            await conn.execute("INSERT INTO by_list (region, v) VALUES ($1, 'apg')", "fr")
            return [await conn.fetchval("SELECT v FROM by_list WHERE region = $1", r) for r in ("fr", "uk")]
        finally:
            await conn.close()

    assert arun(apg()) == ["apg", "lit"]
    for r in (*regions, "fr"):
        assert shards.holders(SH3, "by_list", "region", r) == [LIST_SHARD.get(r, 2)], r


def test_range_sharding(proc, shards):
    for db in SH3:
        shards.exec(db, "TRUNCATE by_range")
    values = {-10**12: 0, -1: 0, 0: 0, 99: 0, 100: 1, 150: 1, 199: 1, 200: 2, 250: 2, 299: 2}
    with via(proc, "listrange") as conn:
        for i, n in enumerate(values):
            if i % 3 == 0:
                conn.execute(f"INSERT INTO by_range (n, v) VALUES ({n}, 'r')")
            elif i % 3 == 1:
                conn.execute("INSERT INTO by_range (n, v) VALUES (%s, 'r')", [n])
            else:
                conn.execute("INSERT INTO by_range (n, v) VALUES (%b, 'r')", [n], prepare=True)
        for n in values:
            assert conn.execute("SELECT n FROM by_range WHERE n = %s", [n]).fetchall() == [(n,)], n
        assert conn.execute("DELETE FROM by_range WHERE n = 150").rowcount == 1
    for n, s in values.items():
        assert shards.holders(SH3, "by_range", "n", n) == ([] if n == 150 else [s]), n


def test_hash_sharding_over_three_shards(proc, shards):
    for db in SH3:
        shards.exec(db, "TRUNCATE h3")
    keys = [k for s in range(3) for k in [v for v, r in shards.h3_shard.items() if r == s][:8]]
    with via(proc, "listrange") as conn:
        for key in keys:
            conn.execute("INSERT INTO h3 (id, v) VALUES (%s, 'h3')", [key])
        got = conn.execute("SELECT id FROM h3 WHERE id = ANY(%s)", [keys]).fetchall()
        assert sorted(r[0] for r in got) == sorted(keys)
    for key in keys:
        assert shards.holders(SH3, "h3", "id", key) == [shards.h3_shard[key]]
    assert all(shards.counts(SH3, "SELECT count(*) FROM h3"))


def test_insert_with_a_key_no_rule_accepts_is_refused_23514(proc):
    with via(proc, "listrange") as conn:
        assert sqlstate_of(lambda: conn.execute("INSERT INTO by_range (n, v) VALUES (500, 'x')")) == "23514"
        assert sqlstate_of(lambda: conn.execute("INSERT INTO by_range (n, v) VALUES (%s, 'x')", [500])) == "23514"
        assert sqlstate_of(lambda: conn.execute("INSERT INTO by_range (n, v) VALUES (%s, 'x')", [300],
                                                prepare=True)) == "23514"
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_schema_sharding(proc, shards):
    shards.exec(SH2[0], "TRUNCATE customer_a.accounts")
    shards.exec(SH2[1], "TRUNCATE customer_b.accounts")
    with via(proc, "byschema") as conn:
        conn.execute("INSERT INTO customer_a.accounts (id, owner) VALUES (1, 'ann')")
        conn.execute("INSERT INTO customer_b.accounts (id, owner) VALUES (%s, %s)", [1, "bea"])
        conn.execute("INSERT INTO customer_b.accounts (id, owner) VALUES (%s, 'bob')", [2], prepare=True)
        assert conn.execute("SELECT owner FROM customer_a.accounts").fetchall() == [("ann",)]
        assert sorted(conn.execute("SELECT owner FROM customer_b.accounts").fetchall()) == [("bea",), ("bob",)]
        # Unqualified names follow the session's search_path.
        conn.execute("SET search_path TO customer_b, public")
        assert conn.execute("SELECT count(*) FROM accounts").fetchone() == (2,)
        conn.execute("INSERT INTO accounts (id, owner) VALUES (3, 'bil')")
        with conn.transaction():
            conn.execute("SET LOCAL search_path TO customer_a")
            assert conn.execute("SELECT owner FROM accounts").fetchall() == [("ann",)]
        assert conn.execute("SELECT count(*) FROM accounts").fetchone() == (3,)
        # The schema name as a manual sharding key.
        assert conn.execute("/* pgherd_sharding_key: customer_a */ SELECT current_database()").fetchone() == \
            (SH2[0],)
    with via(proc, "byschema", options="-c search_path=customer_a") as conn:
        assert conn.execute("SELECT owner FROM accounts").fetchall() == [("ann",)]
    assert shards.val(SH2[0], "SELECT count(*) FROM customer_a.accounts") == 1
    assert shards.val(SH2[1], "SELECT count(*) FROM customer_b.accounts") == 3


# ---------------------------------------------------------------------------------------------
# Manual routing


def _key_on(shards: Shards, shard: int) -> int:
    return shards.item_keys[shard][0]


def _count_on(shards: Shards, shard: int) -> int:
    return shards.val(SH2[shard], "SELECT count(*) FROM items")


COMMENT_FORMS = [
    "/* pgherd_shard: {s} */ {q}",
    "{q} /* pgherd_shard: {s} */",
    "/* pgdog_shard: {s} */ {q}",
    "{q} /* pgdog_shard:{s} */",
    "/* pgherd_sharding_key: {k} */ {q}",
    "{q} /* pgdog_sharding_key: '{k}' */",
]


@pytest.mark.parametrize("form", COMMENT_FORMS)
def test_manual_routing_by_comment_psycopg(proc, shards, form):
    with via(proc) as conn:
        for s in (1, 0, 1):
            k = _key_on(shards, s)
            q = form.format(s=s, k=k, q="SELECT current_database()")
            assert conn.execute(q).fetchone() == (SH2[s],), q
            assert conn.execute(q, prepare=True).fetchone() == (SH2[s],), q
            # Manual routing lifts the cross-shard refusals: the aggregate runs on that shard only.
            q = form.format(s=s, k=k, q="SELECT count(*) FROM items")
            assert conn.execute(q).fetchone() == (_count_on(shards, s),), q
            q = form.format(s=s, k=k, q="SELECT count(*) FROM items WHERE n > %s")
            assert conn.execute(q, [-1]).fetchone()[0] == shards.val(SH2[s], "SELECT count(*) FROM items WHERE n > -1")


def test_manual_routing_by_set_psycopg(proc, shards):
    with via(proc) as conn:
        for variable in ("pgherd.shard", "pgdog.shard"):
            for s in (1, 0):
                conn.execute(f"SET {variable} TO {s}")
                assert conn.execute("SELECT current_database()").fetchone() == (SH2[s],)
                assert conn.execute("SELECT count(*) FROM items").fetchone() == (_count_on(shards, s),)
                assert conn.execute("SELECT current_database()", prepare=True).fetchone() == (SH2[s],)
        conn.execute("SET pgherd.shard = 1")
        # A comment is more specific than the session setting.
        assert conn.execute("/* pgherd_shard: 0 */ SELECT current_database()").fetchone() == (SH2[0],)
        conn.execute("RESET pgherd.shard")
        for variable in ("pgherd.sharding_key", "pgdog.sharding_key"):
            for s in (1, 0):
                conn.execute(f"SET {variable} TO '{_key_on(shards, s)}'")
                assert conn.execute("SELECT current_database()").fetchone() == (SH2[s],)
                assert conn.execute("SELECT count(*) FROM items").fetchone() == (_count_on(shards, s),)
            conn.execute(f"RESET {variable}")
        # SET LOCAL lasts for the transaction only.
        conn.execute("SET pgherd.shard TO 0")
        with conn.transaction():
            conn.execute("SET LOCAL pgherd.shard TO 1")
            assert conn.execute("SELECT current_database()").fetchone() == (SH2[1],)
        assert conn.execute("SELECT current_database()").fetchone() == (SH2[0],)
        # A shard number wins over a sharding key; with the shard reset, the key routes.
        conn.execute("RESET pgherd.shard")
        conn.execute(f"SET pgherd.sharding_key TO '{_key_on(shards, 0)}'")
        with conn.transaction():
            conn.execute(f"SET LOCAL pgherd.sharding_key TO '{_key_on(shards, 1)}'")
            assert conn.execute("SELECT count(*) FROM items").fetchone() == (_count_on(shards, 1),)
        assert conn.execute("SELECT current_database()").fetchone() == (SH2[0],)
        with conn.transaction():
            conn.execute("SET LOCAL pgherd.shard TO 1")  # the shard wins over the session's key
            assert conn.execute("SELECT current_database()").fetchone() == (SH2[1],)
        assert conn.execute("SELECT count(*) FROM items").fetchone() == (_count_on(shards, 0),)


def test_manual_routing_by_startup_option_psycopg(proc, shards):
    for s in (1, 0):
        with via(proc, options=f"-c pgherd.shard={s}") as conn:
            assert conn.execute("SELECT current_database()").fetchone() == (SH2[s],)
            assert conn.execute("SELECT count(*) FROM items").fetchone() == (_count_on(shards, s),)
    with via(proc, options=f"-c pgherd.sharding_key={_key_on(shards, 1)}") as conn:
        assert conn.execute("SELECT current_database()").fetchone() == (SH2[1],)


def test_manual_routing_asyncpg(proc, shards):
    k0, k1 = _key_on(shards, 0), _key_on(shards, 1)

    async def main() -> dict:
        out: dict = {}
        conn = await aconnect(proc)
        try:
            q = "SELECT current_database()"
            out["comment"] = [await conn.fetchval(f"/* pgherd_shard: {s} */ {q}") for s in (1, 0)]
            out["trailing"] = [await conn.fetchval(f"{q} /* pgdog_shard: {s} */") for s in (1, 0)]
            out["key"] = [await conn.fetchval(f"/* pgherd_sharding_key: {k} */ {q}") for k in (k1, k0)]
            out["count"] = await conn.fetchval("/* pgherd_shard: 1 */ SELECT count(*) FROM items WHERE n > $1", -1)
            await conn.execute("SET pgherd.shard TO 1")
            out["set"] = await conn.fetchval(q)
            await conn.execute("SET pgdog.shard TO 0")
            out["set_pgdog"] = await conn.fetchval(q)
            await conn.execute("RESET pgdog.shard")  # a shard number would win over the key
            await conn.execute(f"SET pgherd.sharding_key TO '{k1}'")
            out["set_key"] = await conn.fetchval(q)
            async with conn.transaction():
                await conn.execute("SET LOCAL pgherd.shard TO 0")
                out["local"] = await conn.fetchval(q)
            out["after_local"] = await conn.fetchval(q)
        finally:
            await conn.close()
        conn = await aconnect(proc, server_settings={"options": "-c pgherd.shard=1"})
        try:
            out["startup"] = await conn.fetchval("SELECT current_database()")
        finally:
            await conn.close()
        return out

    out = arun(main())
    assert out == {
        "comment": [SH2[1], SH2[0]], "trailing": [SH2[1], SH2[0]], "key": [SH2[1], SH2[0]],
        "count": shards.val(SH2[1], "SELECT count(*) FROM items WHERE n > -1"),
        "set": SH2[1], "set_pgdog": SH2[0], "set_key": SH2[1], "local": SH2[0], "after_local": SH2[1],
        "startup": SH2[1],
    }


def test_manual_routing_psql(proc, shards):
    q = "SELECT current_database()"
    for s in (1, 0):
        assert run_psql(proc, "sharded", "-c", f"/* pgherd_shard: {s} */ {q}").stdout.strip() == SH2[s]
        assert run_psql(proc, "sharded", "-c", f"{q} /* pgdog_shard: {s} */").stdout.strip() == SH2[s]
        key = _key_on(shards, s)
        assert run_psql(proc, "sharded", "-c", f"/* pgherd_sharding_key: {key} */ {q}").stdout.strip() == SH2[s]
        out = run_psql(proc, "sharded", "-q", "-c", f"SET pgherd.shard TO {s}", "-c", q,
                       "-c", "SELECT count(*) FROM items").stdout.split()
        assert out == [SH2[s], str(_count_on(shards, s))]
        out = run_psql(proc, "sharded", "-q", "-c", f"SET pgherd.sharding_key TO '{key}'", "-c", q).stdout.split()
        assert out == [SH2[s]]
        out = run_psql(proc, "sharded", "-c", q, env={"PGOPTIONS": f"-c pgherd.shard={s}"}).stdout.split()
        assert out == [SH2[s]]
    script = f"SET pgherd.shard TO 0;\nBEGIN;\nSET LOCAL pgherd.shard TO 1;\n{q};\nCOMMIT;\n{q};\n"
    out = run_psql(proc, "sharded", "-q", stdin=script).stdout.split()
    assert out == [SH2[1], SH2[0]]


def test_show_pgherd_shards(proc):
    with via(proc) as conn:
        assert int(conn.execute("SHOW pgherd.shards").fetchone()[0]) == 2
        assert int(conn.execute("SHOW pgdog.shards").fetchone()[0]) == 2
    with via(proc, "listrange") as conn:
        assert int(conn.execute("SHOW pgherd.shards").fetchone()[0]) == 3

    async def apg() -> Any:
        conn = await aconnect(proc)
        try:
            return (await conn.fetch("SHOW pgherd.shards"))[0][0]
        finally:
            await conn.close()

    assert int(arun(apg())) == 2
    assert run_psql(proc, "sharded", "-c", "SHOW pgherd.shards").stdout.strip() == "2"


# ---------------------------------------------------------------------------------------------
# Omnisharded tables


def test_omnisharded_writes_reach_every_shard(proc, wr):
    with via(proc) as conn:
        conn.execute("INSERT INTO notes (id, body) VALUES (1, 'lit')")  # not in any rule: omnisharded
        conn.execute("INSERT INTO notes (id, body) VALUES (%s, %s)", [2, "param"])
        conn.execute("INSERT INTO notes (id, body) VALUES (%s, 'prep')", [3], prepare=True)
        conn.execute("UPDATE notes SET body = 'upd' WHERE id = 2")
        conn.execute("DELETE FROM notes WHERE id = %s", [3])
        conn.execute("INSERT INTO countries (code, name, shard_name) VALUES ('zz', 'Zed', 'both')")  # listed
    try:
        for db in SH2:
            assert wr.rows(db, "SELECT id, body FROM notes ORDER BY id") == [(1, "lit"), (2, "upd")], db
            assert wr.rows(db, "SELECT name, shard_name FROM countries WHERE code = 'zz'") == [("Zed", "both")]
        with via(proc) as conn:
            conn.execute("DELETE FROM countries WHERE code = 'zz'")
        assert wr.counts(SH2, "SELECT count(*) FROM countries WHERE code = 'zz'") == [0, 0]
    finally:
        for db in SH2:
            wr.exec(db, "DELETE FROM countries WHERE code = 'zz'")

    async def apg() -> None:
        conn = await aconnect(proc)
        try:
            await conn.execute("INSERT INTO notes (id, body) VALUES ($1, $2)", 10, "apg")
        finally:
            await conn.close()

    arun(apg())
    assert wr.counts(SH2, "SELECT count(*) FROM notes WHERE id = 10") == [1, 1]


def test_omnisharded_reads_are_spread(proc, shards):
    seen: Counter = Counter()
    with via(proc) as conn:
        for _ in range(10):
            rows = conn.execute("SELECT code, name, shard_name FROM countries ORDER BY code").fetchall()
            assert [r[:2] for r in rows] == [("fr", "France"), ("jp", "Japan")]
            assert len({r[2] for r in rows}) == 1, "one shard answers a read"
            seen[rows[0][2]] += 1
    for _ in range(6):
        with via(proc) as conn:
            seen[conn.execute("SELECT shard_name FROM countries WHERE code = %s", ["fr"]).fetchone()[0]] += 1
    assert set(seen) == {"s0", "s1"}, f"round robin over the shards, got {seen}"
    # A table in no rule at all is omnisharded too.
    with via(proc) as conn:
        implicit = Counter(conn.execute("SELECT shard_name FROM markers").fetchone()[0] for _ in range(10))
    assert set(implicit) == {"s0", "s1"}, implicit


def test_omnisharded_sticky_table_reads_stay_on_one_shard(proc):
    for _ in range(3):
        with via(proc) as conn:
            answers = {conn.execute("SELECT shard_name FROM prefs WHERE k = 'theme'").fetchone()[0]
                       for _ in range(8)}
            answers |= {conn.execute("SELECT shard_name FROM prefs", prepare=True).fetchone()[0] for _ in range(4)}
            assert len(answers) == 1 and answers <= {"s0", "s1"}, answers


def test_omnisharded_sticky_setting_makes_reads_sticky(proc_strict):
    for _ in range(3):
        with via(proc_strict) as conn:
            answers = {conn.execute("SELECT shard_name FROM countries WHERE code = 'jp'").fetchone()[0]
                       for _ in range(8)}
            assert len(answers) == 1 and answers <= {"s0", "s1"}, answers
            implicit = {conn.execute("SELECT shard_name FROM markers").fetchone()[0] for _ in range(8)}
            assert len(implicit) == 1 and implicit <= {"s0", "s1"}, implicit


def test_statements_without_a_table_go_to_one_shard(proc):
    with via(proc) as conn:
        assert conn.execute("SELECT 1").fetchall() == [(1,)]
        assert conn.execute("SELECT %s::int * 2", [21]).fetchall() == [(42,)]
        assert conn.execute("SELECT 1", prepare=True).fetchall() == [(1,)]
        assert conn.execute("SELECT current_database()").fetchone()[0] in SH2
        assert conn.execute("SELECT count(*) FROM pg_class WHERE relname = 'items'").fetchone() == (1,)
        assert conn.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'wr'"
                            ).fetchone() == (1,)

    async def apg() -> list:
        conn = await aconnect(proc)
        try:
            return [await conn.fetchval("SELECT 1"), await conn.fetchval("SELECT $1::int + 1", 1)]
        finally:
            await conn.close()

    assert arun(apg()) == [1, 2]


# ---------------------------------------------------------------------------------------------
# Transactions across shards


def test_transaction_rollback_undoes_both_shards(proc, wr):
    k0, k1 = wr.wr_keys[0][0], wr.wr_keys[1][0]
    with via(proc, autocommit=False) as conn:
        conn.execute("INSERT INTO wr (id, v) VALUES (%s, 'tx')", [k0])
        conn.execute(f"INSERT INTO wr (id, v) VALUES ({k1}, 'tx')")
        # Inside the transaction each shard's server sees its own writes.
        assert conn.execute("SELECT v FROM wr WHERE id = %s", [k0]).fetchall() == [("tx",)]
        assert conn.execute("SELECT v FROM wr WHERE id = %s", [k1]).fetchall() == [("tx",)]
        assert Counter(conn.execute("SELECT id FROM wr").fetchall()) == Counter([(k0,), (k1,)])
        # Not visible from outside before COMMIT.
        assert wr.counts(SH2, "SELECT count(*) FROM wr") == [0, 0]
        conn.rollback()
    assert wr.counts(SH2, "SELECT count(*) FROM wr") == [0, 0]


def test_transaction_commit_reaches_both_shards(proc, wr):
    k0, k1 = wr.wr_keys[0], wr.wr_keys[1]
    with via(proc) as conn:
        with conn.transaction():
            conn.execute("INSERT INTO wr (id, v) VALUES (%s, 'c')", [k0[0]])
            conn.execute("INSERT INTO wr (id, v) VALUES (%s, 'c')", [k1[0]])
            conn.execute("UPDATE wr SET v = 'c2'")
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert wr.rows(SH2[0], "SELECT id, v FROM wr") == [(k0[0], "c2")]
    assert wr.rows(SH2[1], "SELECT id, v FROM wr") == [(k1[0], "c2")]

    async def apg() -> None:
        conn = await aconnect(proc)
        try:
            async with conn.transaction():
                await conn.execute("INSERT INTO wr (id, v) VALUES ($1, 'a')", k0[1])
                await conn.execute("INSERT INTO wr (id, v) VALUES ($1, 'a')", k1[1])
            try:
                async with conn.transaction():
                    await conn.execute("INSERT INTO wr (id, v) VALUES ($1, 'gone')", k0[2])
                    await conn.execute("INSERT INTO wr (id, v) VALUES ($1, 'gone')", k1[2])
                    raise RuntimeError("roll back")
            except RuntimeError:
                pass
        finally:
            await conn.close()

    arun(apg())
    assert wr.counts(SH2, "SELECT count(*) FROM wr WHERE v = 'a'") == [1, 1]
    assert wr.counts(SH2, "SELECT count(*) FROM wr WHERE v = 'gone'") == [0, 0]
    # psql sends each statement of a script as its own Query.
    script = (f"BEGIN;\nINSERT INTO wr (id, v) VALUES ({k0[4]}, 'psql');\n"
              f"INSERT INTO wr (id, v) VALUES ({k1[4]}, 'psql');\nCOMMIT;\n")
    run_psql(proc, "sharded", "-q", stdin=script)
    assert wr.counts(SH2, "SELECT count(*) FROM wr WHERE v = 'psql'") == [1, 1]


def test_transaction_block_in_one_query_string(proc, wr):
    """BEGIN; <statement on one shard>; COMMIT sent as one simple Query: the row is committed on its shard
    (or the string is refused) -- a COMMIT tag with the row nowhere is silent data loss."""
    k0, k1 = wr.wr_keys[0], wr.wr_keys[1]
    with via(proc) as conn:
        for key in (k1[0], k0[0]):
            q = f"BEGIN; INSERT INTO wr (id, v) VALUES ({key}, 'one'); COMMIT"
            state = sqlstate_of(lambda: conn.execute(q))
            assert state in (None, "0A000"), state
            assert wr.holders(SH2, "wr", "id", key) == ([wr.wr_shard[key]] if state is None else []), q
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        q = f"INSERT INTO wr (id, v) VALUES ({k1[1]}, 'two'); SELECT 1"
        cur = conn.execute(q)
        assert cur.statusmessage == "INSERT 0 1" and cur.nextset() and cur.fetchall() == [(1,)]
    assert wr.holders(SH2, "wr", "id", k1[1]) == [1]
    run_psql(proc, "sharded", "-q", "-c", f"BEGIN; INSERT INTO wr (id, v) VALUES ({k1[5]}, 'psql'); COMMIT")
    assert wr.holders(SH2, "wr", "id", k1[5]) == [1]


def test_error_in_a_transaction_aborts_it_on_every_shard(proc, wr):
    k0, k1 = wr.wr_keys[0], wr.wr_keys[1]
    wr.exec(SH2[1], "INSERT INTO wr (id, v) VALUES (%s, 'existing')", [k1[0]])
    with via(proc, autocommit=False) as conn:
        conn.execute("INSERT INTO wr (id, v) VALUES (%s, 'tx')", [k0[0]])
        state = sqlstate_of(lambda: conn.execute("INSERT INTO wr (id, v) VALUES (%s, 'dup')", [k1[0]]))
        assert state == "23505"
        for query, params in (("SELECT v FROM wr WHERE id = %s", [k0[0]]),  # the other shard
                              ("INSERT INTO wr (id, v) VALUES (%s, 'more')", [k0[1]]),
                              ("SELECT 1", None),
                              ("SELECT id FROM wr", None)):
            assert sqlstate_of(lambda: conn.execute(query, params)) == "25P02", query
        conn.rollback()
        assert conn.execute("SELECT v FROM wr WHERE id = %s", [k1[0]]).fetchall() == [("existing",)]
        conn.rollback()
    assert wr.rows(SH2[0], "SELECT count(*) FROM wr") == [(0,)]
    assert wr.rows(SH2[1], "SELECT id, v FROM wr") == [(k1[0], "existing")]


# ---------------------------------------------------------------------------------------------
# Cross-shard ORDER BY, aggregates, LIMIT, GROUP BY, DISTINCT: right, or refused with 0A000

# (query, params, how to compare: "ordered" | "multiset")
MERGE_QUERIES = [
    ("SELECT id, v FROM items ORDER BY id", None, "ordered"),
    ("SELECT id, n FROM items ORDER BY n DESC NULLS LAST, id", None, "ordered"),
    ("SELECT id FROM items WHERE n > %s ORDER BY id DESC", [5], "ordered"),
    ("SELECT count(*) FROM items", None, "ordered"),
    ("SELECT count(*), count(n), sum(n), min(n), max(n), min(v), max(id) FROM items", None, "ordered"),
    ("SELECT avg(n) FROM items", None, "ordered"),
    ("SELECT sum(n) FROM items WHERE id > %s", [100], "ordered"),
    ("SELECT grp, count(*), sum(n) FROM items GROUP BY grp", None, "multiset"),
    ("SELECT grp, count(*) FROM items GROUP BY grp ORDER BY grp", None, "ordered"),
    ("SELECT grp, max(n) FROM items GROUP BY grp HAVING count(*) > 30 ORDER BY 1", None, "ordered"),
    ("SELECT DISTINCT grp FROM items", None, "multiset"),
    ("SELECT DISTINCT grp FROM items ORDER BY grp", None, "ordered"),
    ("SELECT count(DISTINCT grp) FROM items", None, "ordered"),
    ("SELECT id FROM items ORDER BY id LIMIT 7", None, "ordered"),
    ("SELECT id, v FROM items ORDER BY id DESC LIMIT 5 OFFSET 3", None, "ordered"),
    ("SELECT id FROM items ORDER BY id LIMIT %s", [4], "ordered"),
    ("SELECT id FROM items ORDER BY id OFFSET 200", None, "ordered"),
    ("SELECT id, v FROM items WHERE id IN (1, 2, 3, 4, 5, 6) ORDER BY id", None, "ordered"),
    ("SELECT count(*) FROM items WHERE id IN (1, 2, 3, 4, 5, 6)", None, "ordered"),
    ("SELECT grp FROM items UNION SELECT v FROM items WHERE id < 3", None, "multiset"),
]


def _check_merge(conn: Any, ref: psycopg.Connection, query: str, params: Any, how: str, prepare: bool) -> str:
    ref_cur = ref.execute(query, params)
    expected = ref_cur.fetchall()
    try:
        cur = conn.execute(query, params, prepare=prepare)
        got = cur.fetchall()
    except psycopg.Error as exc:
        assert exc.sqlstate == "0A000", f"{query}: refused with {exc.sqlstate} {exc}"
        return "refused"
    assert [(d.name, d.type_code) for d in cur.description] == [(d.name, d.type_code) for d in ref_cur.description]
    if how == "ordered":
        assert got == expected, query
    else:
        assert Counter(got) == Counter(expected), query
    return "merged"


@pytest.mark.parametrize("query, params, how", MERGE_QUERIES, ids=[q[0][:60] for q in MERGE_QUERIES])
def test_cross_shard_result_is_exact_or_refused(proc, shards, query, params, how):
    ref = shards.conn(REF)
    with via(proc) as conn:
        outcome = _check_merge(conn, ref, query, params, how, prepare=False)
        print(f"{outcome}: {query}")
        assert _check_merge(conn, ref, query, params, how, prepare=True) == outcome
        assert conn.execute("SELECT 1").fetchone() == (1,), "the connection stays usable"


def test_order_by_aggregates_and_limit_on_one_shard_are_answered(proc, shards):
    """The same constructs are never refused when the keys put the statement on one shard."""
    keys = shards.item_keys[1][:6]
    in_list = ", ".join(map(str, keys))
    ref = shards.conn(REF)
    with via(proc) as conn:
        for query in (f"SELECT id, v FROM items WHERE id IN ({in_list}) ORDER BY id DESC",
                      f"SELECT count(*), sum(n), avg(n) FROM items WHERE id IN ({in_list})",
                      f"SELECT grp, count(*) FROM items WHERE id IN ({in_list}) GROUP BY grp ORDER BY grp",
                      f"SELECT DISTINCT grp FROM items WHERE id IN ({in_list}) ORDER BY grp",
                      f"SELECT id FROM items WHERE id IN ({in_list}) ORDER BY id LIMIT 2 OFFSET 1",
                      f"SELECT count(*) FROM items WHERE id = {keys[0]}"):
            assert conn.execute(query).fetchall() == ref.execute(query).fetchall(), query
        query = "SELECT count(*), max(v) FROM items WHERE id = %s"
        assert conn.execute(query, [keys[1]], prepare=True).fetchall() == ref.execute(query, [keys[1]]).fetchall()


def test_cross_shard_limit_without_order_by(proc, shards):
    with via(proc) as conn:
        try:
            got = conn.execute("SELECT id FROM items LIMIT 5").fetchall()
        except psycopg.Error as exc:
            assert exc.sqlstate == "0A000"
            return
    ids = [r[0] for r in got]
    assert len(ids) == 5 and len(set(ids)) == 5 and set(ids) <= set(ITEM_IDS)


def test_cross_shard_aggregates_asyncpg_and_psql(proc, shards):
    queries = ["SELECT count(*) FROM items", "SELECT grp, count(*) FROM items GROUP BY grp ORDER BY grp",
               "SELECT id FROM items ORDER BY id LIMIT 3"]

    async def apg() -> list:
        conn = await aconnect(proc)
        out = []
        try:
            for q in queries:
                try:
                    out.append([tuple(r) for r in await conn.fetch(q)])
                except asyncpg.PostgresError as exc:
                    out.append(exc.sqlstate)
            return out
        finally:
            await conn.close()

    for q, got in zip(queries, arun(apg())):
        assert got == "0A000" or got == shards.rows(REF, q), (q, got)
    for q in queries:
        done = run_psql(proc, "sharded", "-c", q, check=False)
        if done.returncode != 0:
            assert "0A000" in run_psql(proc, "sharded", "-v", "VERBOSITY=verbose", "-c", q, check=False).stderr
        else:
            lines = done.stdout.strip().splitlines()
            assert lines == ["|".join("" if x is None else str(x) for x in r) for r in shards.rows(REF, q)], q


# ---------------------------------------------------------------------------------------------
# cross_shard_disabled


def test_cross_shard_disabled_refuses_multi_shard_statements(proc_strict, wr):
    k0, k1 = wr.wr_keys[0], wr.wr_keys[1]
    i0, i1 = wr.item_keys[0][0], wr.item_keys[1][0]
    with via(proc_strict) as conn:
        for query, params in (("SELECT id, v FROM items", None),
                              ("SELECT v FROM items WHERE id IN (%s, %s)", [i0, i1]),
                              ("SELECT v FROM items WHERE n > %s", [3]),
                              ("UPDATE wr SET v = 'x'", None),
                              ("DELETE FROM wr WHERE v = %s", ["x"])):
            assert sqlstate_of(lambda: conn.execute(query, params)) == "0A000", query
            assert sqlstate_of(lambda: conn.execute(query, params, prepare=True)) == "0A000", query
        assert wr.touches() == [0, 0], "refused statements never reached a shard"
        # Single-shard statements pass.
        assert conn.execute("SELECT v FROM items WHERE id = %s", [i1]).fetchall() == [(f"v{i1}",)]
        assert conn.execute(f"SELECT v FROM items WHERE id = {i0}").fetchall() == [(f"v{i0}",)]
        assert conn.execute("SELECT v FROM items WHERE id IN (%s, %s)", [i1, wr.item_keys[1][1]]).rowcount == 2
        conn.execute("INSERT INTO wr (id, v) VALUES (%s, 'ok')", [k1[0]])
        conn.execute("INSERT INTO wr (id, v) VALUES (%s, 'ok')", [k0[0]], prepare=True)
        assert conn.execute("UPDATE wr SET v = 'ok2' WHERE id = %s", [k1[0]]).rowcount == 1
        # Manual routing, statements without tables and omnisharded writes are not cross-shard queries.
        assert conn.execute("/* pgherd_shard: 1 */ SELECT count(*) FROM items").fetchone() == \
            (wr.val(SH2[1], "SELECT count(*) FROM items"),)
        assert conn.execute("SELECT 1").fetchone() == (1,)
        conn.execute("INSERT INTO notes (id, body) VALUES (77, 'omni')")
    assert wr.holders(SH2, "wr", "id", k1[0]) == [1] and wr.holders(SH2, "wr", "id", k0[0]) == [0]
    assert wr.counts(SH2, "SELECT count(*) FROM notes WHERE id = 77") == [1, 1]


# ---------------------------------------------------------------------------------------------
# unique_id


def _check_ids(ids: Iterable[Any], before_ms: int, after_ms: int, node: int = NODE_ID) -> None:
    ids = [int(i) for i in ids]
    assert len(set(ids)) == len(ids), ids
    for uid in ids:
        assert 0 < uid < 2**63
        ms, got_node, _seq = decode(uid)
        assert got_node == node, (uid, got_node)
        assert before_ms - 1000 <= ms <= after_ms + 1000, (uid, ms, before_ms, after_ms)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def test_unique_id_in_select(proc):
    before = _now_ms()
    ids = []
    with via(proc) as conn:
        row = conn.execute("SELECT pgherd.unique_id(), pgherd.unique_id(), pgdog.unique_id()").fetchone()
        ids += row
        ids += conn.execute("SELECT pgherd.unique_id() AS id", prepare=True).fetchone()
        ids += conn.execute("SELECT pgdog.unique_id(), %s::int", [1]).fetchone()[:1]
        assert all(isinstance(i, int) for i in ids), ids

    async def apg() -> list:
        conn = await aconnect(proc)
        try:
            return list(await conn.fetchrow("SELECT pgherd.unique_id(), pgdog.unique_id()"))
        finally:
            await conn.close()

    ids += arun(apg())
    ids += run_psql(proc, "sharded", "-c", "SELECT pgherd.unique_id()").stdout.split()
    _check_ids(ids, before, _now_ms())
    first_three = [int(i) for i in ids[:3]]
    assert first_three == sorted(first_three), "ids of one node increase"


def test_unique_id_per_row_is_distinct_or_refused(proc):
    """A call in a query that makes several rows: a new id per row (as Postgres calls a volatile function
    per row), or refused -- never one "unique" id repeated on every row."""
    with via(proc) as conn:
        for query in ("SELECT pgherd.unique_id() FROM generate_series(1, 5)",
                      "SELECT pgherd.unique_id(), v FROM items WHERE id IN (1, 2, 3)"):
            try:
                ids = [r[0] for r in conn.execute(query).fetchall()]
            except psycopg.Error as exc:
                assert exc.sqlstate == "0A000", (query, exc)
                continue
            assert len(ids) >= 3 and len(set(ids)) == len(ids), (query, ids)


def test_show_unique_id(proc):
    before = _now_ms()
    with via(proc) as conn:
        ids = [conn.execute("SHOW pgherd.unique_id").fetchone()[0], conn.execute("SHOW pgdog.unique_id").fetchone()[0]]
    ids += run_psql(proc, "sharded", "-c", "SHOW pgherd.unique_id").stdout.split()
    _check_ids(ids, before, _now_ms())


def test_unique_id_in_insert(proc, wr):
    before = _now_ms()
    with via(proc) as conn:
        # Omnisharded: pgherd evaluates the call once, so every shard gets the same id.
        conn.execute("INSERT INTO notes (id, body) VALUES (pgherd.unique_id(), 'uid')")
        conn.execute("INSERT INTO notes (id, body) VALUES (pgdog.unique_id(), %s)", ["uid"])
        # Sharded key: routed by the generated value, or refused (0A000) until calls are rewritten.
        try:
            returned = conn.execute("INSERT INTO wr (id, v) VALUES (pgherd.unique_id(), 'uid') RETURNING id").fetchone()
        except psycopg.Error as exc:
            assert exc.sqlstate == "0A000", exc
            returned = None
    per_shard = [sorted(r[0] for r in wr.rows(db, "SELECT id FROM notes WHERE body = 'uid'")) for db in SH2]
    assert len(per_shard[0]) == 2 and per_shard[0] == per_shard[1], per_shard
    _check_ids(per_shard[0], before, _now_ms())
    if returned is not None:
        uid = returned[0]
        _check_ids([uid], before, _now_ms())
        home = wr.hash_shard(SH2, "wr", "bigint", [uid])[uid]
        assert wr.holders(SH2, "wr", "id", uid) == [home]


# ---------------------------------------------------------------------------------------------
# SHOW QUERY_CACHE


def _cache_totals(proc: Any) -> dict[str, int]:
    with psycopg.connect(proc.admin_dsn(), autocommit=True, connect_timeout=10, prepare_threshold=None) as admin:
        cur = admin.execute("SHOW QUERY_CACHE")
        cols = [d.name for d in cur.description]
        rows = [dict(zip(cols, r)) for r in cur.fetchall()]
    if rows and "database" in cols:
        rows = [r for r in rows if r["database"] == "sharded"] or rows
    cross = next((c for c in cols if c.startswith("cross")), None)
    assert cross is not None, f"SHOW QUERY_CACHE has no cross-shard count: {cols}"
    out = {}
    for name, col in (("hits", "hits"), ("misses", "misses"), ("entries", "entries"), ("bytes", "bytes"),
                      ("direct", "direct"), ("cross", cross)):
        assert col in cols, f"SHOW QUERY_CACHE has no {col} column: {cols}"
        out[name] = sum(int(r[col] or 0) for r in rows)
    return out


def test_show_query_cache_counts_grow(proc, shards):
    before = _cache_totals(proc)
    probe = uuid.uuid4().hex
    key = shards.item_keys[1][0]
    with via(proc) as conn:
        for _ in range(3):
            conn.execute(f"SELECT v FROM items WHERE id = {key} AND v <> 'direct-{probe}'").fetchall()
        conn.execute(f"SELECT id FROM items WHERE v <> 'cross-{probe}'").fetchall()
        conn.execute(f"SELECT id FROM items WHERE v <> 'cross-{probe}'").fetchall()
    after = _cache_totals(proc)
    assert after["misses"] >= before["misses"] + 2, (before, after)
    assert after["hits"] >= before["hits"] + 3, (before, after)
    assert after["direct"] >= before["direct"] + 3, (before, after)
    assert after["cross"] >= before["cross"] + 2, (before, after)
    assert after["entries"] >= 2 and after["entries"] >= before["entries"]
    assert after["bytes"] > before["bytes"] or after["bytes"] > 0


# ---------------------------------------------------------------------------------------------
# Bad input


def test_unknown_shard_is_refused_22023(proc):
    with via(proc) as conn:
        assert sqlstate_of(lambda: conn.execute("SET pgherd.shard TO 99")) == "22023"
        assert sqlstate_of(lambda: conn.execute("SET pgdog.shard = 2")) == "22023"
        assert sqlstate_of(lambda: conn.execute("SET pgherd.shard TO 'abc'")) == "22023"
        assert sqlstate_of(lambda: conn.execute("/* pgherd_shard: 99 */ SELECT 1")) == "22023"
        assert sqlstate_of(lambda: conn.execute("/* pgherd_shard: 5 */ SELECT id FROM items")) == "22023"
        # The failed SET changed nothing: statements still route normally.
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert conn.execute("SELECT v FROM items WHERE id = 1").fetchall() == [("v1",)]
    with via(proc, "listrange") as conn:
        assert sqlstate_of(lambda: conn.execute("SET pgherd.shard TO 3")) == "22023"
        conn.execute("SET pgherd.shard TO 2")
        assert conn.execute("SELECT current_database()").fetchone() == (SH3[2],)

    async def apg() -> str | None:
        conn = await aconnect(proc)
        try:
            try:
                await conn.execute("SET pgherd.shard TO 99")
            except asyncpg.PostgresError as exc:
                return exc.sqlstate
            return None
        finally:
            await conn.close()

    assert arun(apg()) == "22023"
    done = run_psql(proc, "sharded", "-c", "SET pgherd.shard TO 99", check=False)
    assert done.returncode != 0 and "does not exist" in done.stderr, done.stderr


def test_invalid_manual_sharding_key_is_refused(proc):
    with via(proc) as conn:
        assert sqlstate_of(lambda: conn.execute("/* pgherd_sharding_key: abc */ SELECT 1")) == "22P02"
        assert conn.execute("SELECT 2").fetchone() == (2,)
    with via(proc, "listrange") as conn:  # tables with different functions: the key is ambiguous
        assert sqlstate_of(lambda: conn.execute("/* pgherd_sharding_key: 5 */ SELECT 1")) == "22023"


def test_pgherd_keeps_serving_after_bad_input(proc):
    assert proc.returncode is None, proc.log_tail()
    for db in ("sharded", "listrange", "typed"):
        with via(proc, db) as conn:
            assert conn.execute("SELECT 40 + 2").fetchone() == (42,)



# ---------------------------------------------------------------------------------------------
# Malformed messages on a sharded database


@pytest.fixture(scope="module")
def proc_trust(shards: Shards, pgherd_module: Any, pg: Any, helpers: Any, request: Any) -> Any:
    """A pgherd with trust auth, so a hand-written client can log in."""
    return _start(pgherd_module, pg, helpers, request, ("sharded",), {"auth_type": "trust"})


@pytest.mark.parametrize("message", [
    M.message(P.F_BIND, b"\x00"),  # cut short inside the portal name
    M.message(P.F_PARSE, b"s\x00SELECT 1\x00\x00"),  # parameter count cut in half
    M.message(P.F_EXECUTE, b"\x00\x00\x00"),  # row limit cut short
    M.message(ord("k"), b""),  # not a frontend message type
], ids=["bind", "parse", "execute", "unknown-type"])
def test_malformed_message_gets_08P01_and_the_worker_keeps_serving(proc_trust: Any, helpers: Any, message: bytes):
    with helpers.RawClient(proc_trust) as c:
        c.startup(user=ALICE[0], database="sharded")
        c.send(message + M.sync())
        fields = c.expect_error_then_close()
        assert fields["C"] == "08P01", fields
    with helpers.RawClient(proc_trust) as c:
        c.startup(user=ALICE[0], database="sharded")
        assert [t for t, _ in c.query("SELECT 1")][-1] == "Z"
