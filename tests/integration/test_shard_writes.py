"""Writes across shards through the real pgherd (issue 7): split INSERTs, shard-key UPDATEs, ids
for an omitted primary key, and COPY into sharded tables.

The shards are databases sw_0 .. sw_2 on the session cluster. Each holds every sharded table as a
hash-partitioned parent with ONLY the partition that shard owns (MODULUS 3, REMAINDER shard), so a
row sent to the wrong shard is refused by Postgres itself. Which shard a key belongs to is always
asked of Postgres (`satisfies_hash_partition`), never computed with pgherd's code. sw_ref is the
reference: one plain Postgres database holding plain tables of the same shape, where the client's
statement runs unchanged so RETURNING rows, column names/types and command tags can be compared.

Tables (on every shard):
  t     (id bigint PRIMARY KEY, v text, n int CHECK (n >= 0))   sharded by id
  m     (k bigint, v text)                                      sharded by k (no key: duplicates)
  p     (id bigint PRIMARY KEY, v text)                         sharded by id (primary_key rewrite)
  big   (id bigint NOT NULL, i int NOT NULL, note text)         sharded by id (COPY); a plain table
        (Postgres cannot COPY a partitioned table TO STDOUT) guarded by a CHECK that the row
        satisfies_hash_partition of the empty hash-partitioned table big_hash
  omni  (id bigint, v text)                                     omnisharded (every shard, every row)

pgherd processes (module-scoped, workers = 1):
  proc         [rewrite] enabled, split_inserts / shard_key / primary_key = "rewrite"
  proc_strict  [rewrite] enabled with the defaults (split_inserts = "error")

The COPY data (COPY_ROWS rows, row i: id = 7 i - 3000000, i, note = NOTE_SQL(i) with NULLs,
quotes, commas, tabs, newlines, backslashes, a lone `\\.` and non-ASCII) is produced by Postgres
itself (COPY (SELECT … generate_series) TO STDOUT in each format) and written through pgherd in
large chunks; what lands on each shard is checked in SQL against the same formula.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import asyncpg
import psycopg
import pytest

from pgherd.shared.unique_id import decode

sys.path.insert(0, str(Path(__file__).resolve().parent))  # shard_conns.py (see its docstring)
from shard_conns import ALICE, ShardConns  # noqa: E402

pytestmark = pytest.mark.timeout(120)

TEST_DB = "pgherd_test"
SHARDS = 3
DBS = tuple(f"sw_{k}" for k in range(SHARDS))
REF = "sw_ref"
ASYNC_TIMEOUT = 60

COPY_ROWS = 1_000_000
# Where the bad row goes in the bad-input tests: this many rows before the end.
BAD_ROW_FROM_END = 100
COPY_COLUMNS = "id, i, note"
ID_SQL = "(i::bigint * 7 - 3000000)"
NOTE_SQL = ("CASE i % 5 WHEN 0 THEN NULL WHEN 1 THEN 'plain ' || i "
            "WHEN 2 THEN 'q\"uote, comma '' ' || i WHEN 3 THEN E'multi\\nline\\t' || i || E' back\\\\slash é' "
            "ELSE E'\\\\.' END")
# COPY options of each format, for TO (the data) and FROM (through pgherd).
COPY_FORMATS = {
    "text": "(FORMAT text)",
    "csv": "(FORMAT csv, HEADER true)",
    "binary": "(FORMAT binary)",
}
# Chunks the client writes (psycopg sends at most 128 KiB per CopyData anyway).
CHUNK = 1 << 20
BINARY_HEADER_LEN = 19  # PGCOPY\n\377\r\n\0 + flags (4) + extension length (4)
BINARY_TRAILER = b"\xff\xff"


# ---------------------------------------------------------------------------------------------
# Shard databases


def _shard_ddl(k: int) -> str:
    part = f"FOR VALUES WITH (MODULUS {SHARDS}, REMAINDER {k})"
    return f"""
        CREATE TABLE t (id bigint PRIMARY KEY, v text, n int CHECK (n >= 0)) PARTITION BY HASH (id);
        CREATE TABLE t_p{k} PARTITION OF t {part};
        CREATE TABLE m (k bigint, v text) PARTITION BY HASH (k);
        CREATE TABLE m_p{k} PARTITION OF m {part};
        CREATE TABLE p (id bigint PRIMARY KEY, v text) PARTITION BY HASH (id);
        CREATE TABLE p_p{k} PARTITION OF p {part};
        CREATE TABLE big_hash (id bigint) PARTITION BY HASH (id);
        CREATE TABLE big (id bigint NOT NULL, i int NOT NULL, note text,
            CONSTRAINT only_shard_{k} CHECK (satisfies_hash_partition('big_hash'::regclass, {SHARDS}, {k}, id)));
        CREATE TABLE omni (id bigint, v text);
    """


REF_DDL = """
    CREATE TABLE t (id bigint PRIMARY KEY, v text, n int CHECK (n >= 0));
    CREATE TABLE m (k bigint, v text);
"""


class Shards(ShardConns):
    """ShardConns over this module's shard databases."""

    def each(self, query: str, params: Sequence | None = None) -> list[list[tuple]]:
        """query's rows on every shard, in shard order."""
        return [self.rows(db, query, params) for db in DBS]

    def shard_of(self, table: str, keys: Iterable[int]) -> dict[int, int]:
        """Which shard Postgres' hash partitioning puts each bigint key of table in."""
        return self.hash_shard(DBS, table, "bigint", keys)

    def keys_on(self, table: str, column: str = "id") -> list[set[int]]:
        """The keys each shard holds."""
        return [{r[0] for r in rows} for rows in self.each(f"SELECT {column} FROM {table}")]

    def reset(self) -> None:
        for db in DBS:
            self.exec(db, "TRUNCATE t, m, p, big, omni")
        self.exec(REF, "TRUNCATE t, m")



@pytest.fixture(scope="module")
def shards(pg: Any) -> Any:
    for db in (*DBS, REF):
        pg.sql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        pg.sql(f"CREATE DATABASE {db} OWNER alice")
    s = Shards(pg)
    try:
        for k, db in enumerate(DBS):
            s.exec(db, _shard_ddl(k))
        s.exec(REF, REF_DDL)
        # Keys 1..300 by shard, to pick rows from.
        s.small = s.shard_of("t", range(1, 301))
        s.by_shard = [[key for key in range(1, 301) if s.small[key] == k] for k in range(SHARDS)]
        yield s
    finally:
        s.close()
        for db in (*DBS, REF):
            try:
                pg.sql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
            except Exception:
                pass


@pytest.fixture
def clean(shards: Shards) -> Shards:
    """Every table empty on every shard and in the reference."""
    shards.reset()
    return shards


# ---------------------------------------------------------------------------------------------
# pgherd


REWRITE_ALL = """
[rewrite]
enabled = true
split_inserts = "rewrite"
shard_key = "rewrite"
primary_key = "rewrite"
"""

# split_inserts and shard_key at their default ("error"); primary_key set to "error".
REWRITE_STRICT = """
[rewrite]
enabled = true
primary_key = "error"
"""

SHARDING = "".join(f'\n[[sharded_tables]]\ndatabase = "sw"\nname = "{name}"\ncolumn = "{column}"\n'
                   f'data_type = "bigint"\n' for name, column in (("t", "id"), ("m", "k"), ("p", "id"), ("big", "id")))
SHARDING += '\n[[omnisharded_tables]]\ndatabase = "sw"\ntables = ["omni"]\n'


def _start(pgherd_module: Any, pg: Any, rewrite: str) -> Any:
    databases = [{"name": TEST_DB, "host": pg.host, "port": pg.port}]
    databases += [{"name": "sw", "host": pg.host, "port": pg.port, "shard": k, "database_name": db}
                  for k, db in enumerate(DBS)]
    return pgherd_module(
        general={"workers": 1, "default_pool_size": 4},
        databases=databases,
        users=[{"name": ALICE[0], "password": ALICE[1], "all_databases": True}],
        extra_toml=rewrite + SHARDING,
    )


@pytest.fixture(scope="module")
def proc(shards: Shards, pgherd_module: Any, pg: Any) -> Any:
    return _start(pgherd_module, pg, REWRITE_ALL)


@pytest.fixture(scope="module")
def proc_strict(shards: Shards, pgherd_module: Any, pg: Any) -> Any:
    return _start(pgherd_module, pg, REWRITE_STRICT)


def via(proc: Any, autocommit: bool = True, **kwargs: Any) -> psycopg.Connection:
    """psycopg to pgherd's sharded database `sw` as alice."""
    kwargs.setdefault("prepare_threshold", None)
    return psycopg.connect(proc.dsn(*ALICE, dbname="sw"), autocommit=autocommit, connect_timeout=10, **kwargs)


def ref(pg: Any, autocommit: bool = True) -> psycopg.Connection:
    """psycopg straight to the reference database."""
    return psycopg.connect(pg.dsn(REF, *ALICE), autocommit=autocommit, connect_timeout=10)


def arun(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, ASYNC_TIMEOUT))


async def aconnect(proc: Any, **kwargs: Any) -> asyncpg.Connection:
    return await asyncpg.connect(proc.dsn(*ALICE, dbname="sw"), timeout=10, **kwargs)


def described(cur: psycopg.Cursor) -> list[tuple[str, int]]:
    return [(c.name, c.type_code) for c in cur.description or []]


def interleaved(shards: Shards, per_shard: int, order: Sequence[int] | None = None) -> list[int]:
    """Keys taking turns over the shards (in `order`), per_shard keys from each."""
    order = order or (2, 0, 1)
    picks = {k: list(shards.by_shard[k][:per_shard]) for k in range(SHARDS)}
    out = []
    for _ in range(per_shard):
        for k in order:
            out.append(picks[k].pop(0))
    return out


def expected_placement(shards: Shards, table: str, keys: Iterable[int]) -> list[set[int]]:
    where = shards.shard_of(table, keys)
    return [{key for key, k in where.items() if k == shard} for shard in range(SHARDS)]


# ---------------------------------------------------------------------------------------------
# Multi-row INSERT split by shard


def _values_sql(keys: Sequence[int], bad_key: int | None = None) -> str:
    rows = ", ".join(f"({key}, 'v{key} ''q'' é', {-1 if key == bad_key else key % 5})" for key in keys)
    return f"INSERT INTO t (id, v, n) VALUES {rows} RETURNING id, v, n, n * 2 AS twice"


def test_split_insert_literals_simple_protocol(proc: Any, clean: Shards, pg: Any) -> None:
    keys = interleaved(clean, 3)
    sql = _values_sql(keys)
    with via(proc) as conn:
        cur = conn.execute(sql)  # no parameters: psycopg sends a simple Query
        got, tag, desc = cur.fetchall(), cur.statusmessage, described(cur)
    with ref(pg) as conn:
        cur = conn.execute(sql)
        want, want_tag, want_desc = cur.fetchall(), cur.statusmessage, described(cur)
    assert [r[0] for r in got] == keys, "RETURNING rows must come back in the VALUES order"
    assert got == want and tag == want_tag == f"INSERT 0 {len(keys)}" and desc == want_desc
    assert clean.keys_on("t") == expected_placement(clean, "t", keys)
    assert all(clean.keys_on("t")), "the statement must span every shard"


@pytest.mark.parametrize("placeholder, binary", [("%s", False), ("%b", True), ("%t", False)],
                         ids=["auto", "binary-params-and-results", "text-params"])
def test_split_insert_psycopg_parameters(proc: Any, clean: Shards, pg: Any, placeholder: str, binary: bool) -> None:
    keys = interleaved(clean, 2, order=(1, 2, 0))
    rows = ", ".join(f"({placeholder}, {placeholder}, {placeholder})" for _ in keys)
    sql = f"INSERT INTO t (id, v, n) VALUES {rows} RETURNING n, id, v"
    params: list[Any] = []
    for key in keys:
        params += [key, f"p{key} ,'\"\n", key % 3]
    with via(proc) as conn:
        cur = conn.cursor(binary=binary)
        cur.execute(sql, params)
        got, tag, desc = cur.fetchall(), cur.statusmessage, described(cur)
    with ref(pg) as conn:
        cur = conn.cursor(binary=binary)
        cur.execute(sql, params)
        want, want_tag, want_desc = cur.fetchall(), cur.statusmessage, described(cur)
    assert [r[1] for r in got] == keys
    assert got == want and tag == want_tag == f"INSERT 0 {len(keys)}" and desc == want_desc
    assert clean.keys_on("t") == expected_placement(clean, "t", keys)


def test_split_insert_asyncpg_binary_parameters(proc: Any, clean: Shards) -> None:
    keys = interleaved(clean, 3, order=(0, 2, 1))
    rows = ", ".join(f"(${3 * j + 1}, ${3 * j + 2}, ${3 * j + 3})" for j in range(len(keys)))
    args: list[Any] = []
    for key in keys:
        args += [key, f"a{key} é", key % 4]

    async def go() -> tuple[list, str]:
        conn = await aconnect(proc)
        try:
            got = await conn.fetch(f"INSERT INTO t (id, v, n) VALUES {rows} RETURNING id, v, n", *args)
            # Without RETURNING: just the tag.
            tag = await conn.execute("INSERT INTO t (id, v, n) VALUES ($1, $2, $3), ($4, $5, $6)",
                                     clean.by_shard[0][10], "x", 1, clean.by_shard[1][10], "y", 2)
            return [tuple(r) for r in got], tag
        finally:
            await conn.close()

    got, tag = arun(go())
    assert got == [(key, f"a{key} é", key % 4) for key in keys]
    assert tag == "INSERT 0 2"
    all_keys = [*keys, clean.by_shard[0][10], clean.by_shard[1][10]]
    assert clean.keys_on("t") == expected_placement(clean, "t", all_keys)


def test_split_insert_in_transaction_rolled_back(proc: Any, clean: Shards) -> None:
    keys = interleaved(clean, 2)
    with via(proc, autocommit=False) as conn:
        rows = conn.execute(_values_sql(keys)).fetchall()
        assert [r[0] for r in rows] == keys
        # The transaction sees its own rows, on every shard.
        seen = conn.execute("SELECT count(*) FROM t WHERE id = ANY(%s)", [keys]).fetchone()
        assert seen == (len(keys),)
        conn.rollback()
    assert clean.each("SELECT count(*) FROM t") == [[(0,)]] * SHARDS
    # The same statement committed in a transaction stays.
    with via(proc, autocommit=False) as conn:
        conn.execute(_values_sql(keys))
        conn.commit()
    assert clean.keys_on("t") == expected_placement(clean, "t", keys)


@pytest.mark.parametrize("bad_shard", range(SHARDS))
def test_split_insert_constraint_violation_on_one_shard_changes_nothing(proc: Any, clean: Shards,
                                                                        bad_shard: int) -> None:
    keys = interleaved(clean, 2)
    bad_key = next(key for key in reversed(keys) if clean.small[key] == bad_shard)
    with via(proc) as conn:
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute(_values_sql(keys, bad_key=bad_key))
        # The connection carries on, and nothing was written anywhere.
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (0,)
    assert clean.each("SELECT count(*) FROM t") == [[(0,)]] * SHARDS
    assert [db for db in DBS if clean.val(db, "SELECT count(*) FROM pg_stat_activity "
                                              "WHERE datname = current_database() AND state LIKE 'idle in%'")] == []


def test_split_insert_unique_violation_in_transaction(proc: Any, clean: Shards) -> None:
    keys = interleaved(clean, 2)
    dup = keys[-1]
    clean.exec(DBS[clean.small[dup]], "INSERT INTO t (id, v, n) VALUES (%s, 'there', 0)", [dup])
    with via(proc, autocommit=False) as conn:
        conn.execute("INSERT INTO t (id, v, n) VALUES (%s, 'first', 0)", [clean.by_shard[0][20]])
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute(_values_sql(keys))
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.rollback()
    assert clean.each("SELECT id, v FROM t") == [[(dup, "there")] if k == clean.small[dup] else []
                                                 for k in range(SHARDS)]


def test_split_inserts_error_mode_refuses(proc_strict: Any, clean: Shards) -> None:
    keys = interleaved(clean, 1)
    with via(proc_strict) as conn:
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            conn.execute(_values_sql(keys))
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            conn.execute("INSERT INTO t (id, v, n) VALUES (%s, 'a', 1), (%s, 'b', 2)", keys[:2])
        # Rows all on one shard are one statement on that shard: allowed.
        same = clean.by_shard[1][:3]
        cur = conn.execute("INSERT INTO t (id, v, n) VALUES (%s, 'a', 1), (%s, 'b', 2), (%s, 'c', 3) RETURNING id",
                           same)
        assert cur.fetchall() == [(key,) for key in same] and cur.statusmessage == "INSERT 0 3"
    assert clean.keys_on("t") == [set(), set(same), set()]


# ---------------------------------------------------------------------------------------------
# UPDATE of the sharding key


def _two_keys(shards: Shards, offset: int = 0) -> tuple[int, int]:
    """A key on shard 0 and one on shard 2."""
    return shards.by_shard[0][offset], shards.by_shard[2][offset]


def _seed_t(shards: Shards, rows: Sequence[tuple[int, str, int]]) -> None:
    for key, v, n in rows:
        shards.exec(DBS[shards.small[key]], "INSERT INTO t (id, v, n) VALUES (%s, %s, %s)", [key, v, n])
        shards.exec(REF, "INSERT INTO t (id, v, n) VALUES (%s, %s, %s)", [key, v, n])


def _holders(shards: Shards, table: str, column: str, key: int) -> list[int]:
    return [k for k, db in enumerate(DBS) if shards.val(db, f"SELECT count(*) FROM {table} WHERE {column} = %s", [key])]


def test_shard_key_update_simple_protocol(proc: Any, clean: Shards, pg: Any) -> None:
    a, b = _two_keys(clean)
    _seed_t(clean, [(a, "old", 3), (clean.by_shard[1][0], "bystander", 4)])
    sql = f"UPDATE t SET id = {b}, v = 'new ''é''' WHERE id = {a} RETURNING id, v, n, n + 1 AS next"
    with via(proc) as conn:
        cur = conn.execute(sql)
        got, tag, desc = cur.fetchall(), cur.statusmessage, described(cur)
    with ref(pg) as conn:
        cur = conn.execute(sql)
        want, want_tag, want_desc = cur.fetchall(), cur.statusmessage, described(cur)
    assert got == want == [(b, "new 'é'", 3, 4)]
    assert tag == want_tag == "UPDATE 1" and desc == want_desc
    assert _holders(clean, "t", "id", a) == []
    assert _holders(clean, "t", "id", b) == [clean.small[b]] == [2]
    assert clean.rows(DBS[2], "SELECT id, v, n FROM t") == [(b, "new 'é'", 3)]
    assert clean.rows(DBS[1], "SELECT id, v, n FROM t") == [(clean.by_shard[1][0], "bystander", 4)]


def test_shard_key_update_extended_protocol(proc: Any, clean: Shards, pg: Any) -> None:
    a, b = _two_keys(clean, 1)
    _seed_t(clean, [(a, "old", 5)])
    sql = "UPDATE t SET id = %s, v = %s WHERE id = %s RETURNING v, id"
    with via(proc) as conn:
        cur = conn.cursor(binary=True)
        cur.execute(sql, [b, "moved", a])
        got, tag, desc = cur.fetchall(), cur.statusmessage, described(cur)
    with ref(pg) as conn:
        cur = conn.cursor(binary=True)
        cur.execute(sql, [b, "moved", a])
        want, want_tag, want_desc = cur.fetchall(), cur.statusmessage, described(cur)
    assert got == want == [("moved", b)] and tag == want_tag == "UPDATE 1" and desc == want_desc
    assert _holders(clean, "t", "id", a) == [] and _holders(clean, "t", "id", b) == [2]
    assert clean.rows(DBS[2], "SELECT id, v, n FROM t") == [(b, "moved", 5)]

    # And back, with asyncpg (binary parameters, a named prepared statement).
    async def go() -> tuple[list, str]:
        conn = await aconnect(proc)
        try:
            stmt = await conn.prepare("UPDATE t SET id = $1 WHERE id = $2 RETURNING id, v, n")
            rows = await stmt.fetch(a, b)
            return [tuple(r) for r in rows], stmt.get_statusmsg()
        finally:
            await conn.close()

    rows, tag = arun(go())
    assert rows == [(a, "moved", 5)] and tag == "UPDATE 1"
    assert _holders(clean, "t", "id", a) == [0] and _holders(clean, "t", "id", b) == []


def test_shard_key_update_matching_no_row(proc: Any, clean: Shards, pg: Any) -> None:
    a, b = _two_keys(clean, 2)
    _seed_t(clean, [(b, "stays", 1)])
    for sql, params in ((f"UPDATE t SET id = {b + 1000} WHERE id = {a} RETURNING id, v", None),
                        ("UPDATE t SET id = %s WHERE id = %s RETURNING id, v", [b + 1000, a])):
        with via(proc) as conn:
            cur = conn.execute(sql, params)
            got, tag, desc = cur.fetchall(), cur.statusmessage, described(cur)
        with ref(pg) as conn:
            cur = conn.execute(sql, params)
            want, want_tag, want_desc = cur.fetchall(), cur.statusmessage, described(cur)
        assert got == want == [] and tag == want_tag == "UPDATE 0" and desc == want_desc
    assert clean.each("SELECT id, v FROM t") == [[], [], [(b, "stays")]]


def test_shard_key_update_matching_two_rows_is_refused(proc: Any, clean: Shards) -> None:
    w = clean.by_shard[0][3]
    x = clean.by_shard[1][3]
    clean.exec(DBS[0], "INSERT INTO m (k, v) VALUES (%s, 'one'), (%s, 'two')", [w, w])
    with via(proc) as conn:
        with pytest.raises(psycopg.errors.CardinalityViolation):
            conn.execute(f"UPDATE m SET k = {x} WHERE k = {w} RETURNING k, v")
        with pytest.raises(psycopg.errors.CardinalityViolation):
            conn.execute("UPDATE m SET k = %s, v = 'z' WHERE k = %s", [x, w])
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert clean.each("SELECT k, v FROM m ORDER BY v") == [[(w, "one"), (w, "two")], [], []]


def test_shard_key_update_in_transaction_rolled_back(proc: Any, clean: Shards, pg: Any) -> None:
    a, b = _two_keys(clean, 4)
    _seed_t(clean, [(a, "home", 2)])
    with via(proc, autocommit=False) as conn:
        cur = conn.execute("UPDATE t SET id = %s WHERE id = %s RETURNING id, v, n", [b, a])
        assert cur.fetchall() == [(b, "home", 2)] and cur.statusmessage == "UPDATE 1"
        # Inside the transaction the row has moved.
        assert conn.execute("SELECT id FROM t WHERE id = %s", [b]).fetchall() == [(b,)]
        assert conn.execute("SELECT id FROM t WHERE id = %s", [a]).fetchall() == []
        conn.rollback()
    assert clean.each("SELECT id, v, n FROM t") == [[(a, "home", 2)], [], []]
    # Committed, it moves.
    with via(proc, autocommit=False) as conn:
        conn.execute("UPDATE t SET id = %s WHERE id = %s", [b, a])
        conn.commit()
    assert clean.each("SELECT id, v, n FROM t") == [[], [], [(b, "home", 2)]]


# ---------------------------------------------------------------------------------------------
# Ids for an omitted primary key


def test_primary_key_rewrite_gives_unique_ids(proc: Any, clean: Shards) -> None:
    names = [f"r{j}" for j in range(12)]
    before = time.time() * 1000
    with via(proc) as conn:
        cur = conn.execute("INSERT INTO p (v) VALUES " + ", ".join(f"('{n}')" for n in names) + " RETURNING id, v")
        rows = cur.fetchall()
        assert cur.statusmessage == f"INSERT 0 {len(names)}"
        more = conn.execute("INSERT INTO p (v) VALUES (%s), (%s) RETURNING id", ["s0", "s1"]).fetchall()
        one = conn.execute("INSERT INTO p (v) VALUES ('solo') RETURNING id").fetchall()
    after = time.time() * 1000
    assert [r[1] for r in rows] == names
    ids = [r[0] for r in rows] + [r[0] for r in more] + [r[0] for r in one]
    assert len(set(ids)) == len(ids) == len(names) + 3
    for uid in ids:
        ms, _node, _seq = decode(uid)
        assert before - 5000 <= ms <= after + 5000, (uid, ms, before, after)
    placed = clean.keys_on("p")
    assert placed == expected_placement(clean, "p", ids)
    assert sum(1 for s in placed if s) >= 2, f"12 fresh ids all on one shard: {placed}"
    stored = sorted(v for shard_rows in clean.each("SELECT v FROM p") for (v,) in shard_rows)
    assert stored == sorted([*names, "s0", "s1", "solo"])


def test_primary_key_error_mode_refuses_an_insert_without_its_key(proc_strict: Any, clean: Shards) -> None:
    with via(proc_strict) as conn:
        with pytest.raises(psycopg.errors.FeatureNotSupported) as err:
            conn.execute("INSERT INTO p (v) VALUES ('no key')")
        assert "primary key" in str(err.value)
        conn.execute("INSERT INTO p (id, v) VALUES (%s, 'with key')", [42])
    assert sum(len(rows) for rows in clean.each("SELECT v FROM p WHERE v = 'no key'")) == 0


# ---------------------------------------------------------------------------------------------
# COPY FROM STDIN into sharded tables


def _export(pg: Any, fmt: str, start: int, stop: int, header: bool = True) -> bytes:
    """Rows start..stop-1 of the COPY data set, written by Postgres in format fmt."""
    options = COPY_FORMATS[fmt]
    if not header:
        options = options.replace(", HEADER true", "")
    sql = (f"COPY (SELECT {ID_SQL} AS id, i, {NOTE_SQL} AS note FROM generate_series({start}, {stop - 1}) AS i) "
           f"TO STDOUT {options}")
    out = bytearray()
    with psycopg.connect(pg.dsn(TEST_DB), autocommit=True, connect_timeout=10) as conn:
        with conn.cursor().copy(sql) as copy:
            for data in copy:
                out += data
    return bytes(out)


class CopyData:
    """The COPY data set in every format (made once, lazily) and the per-shard counts Postgres expects."""

    def __init__(self, pg: Any, shards: Shards) -> None:
        self.pg = pg
        self.full: dict[str, bytes] = {}
        q = ", ".join(f"count(*) FILTER (WHERE satisfies_hash_partition('big_hash'::regclass, {SHARDS}, {k}, {ID_SQL}))"
                      for k in range(SHARDS))
        self.expected = list(shards.rows(DBS[0], f"SELECT {q} FROM generate_series(0, {COPY_ROWS - 1}) AS i")[0])
        assert sum(self.expected) == COPY_ROWS and all(self.expected)

    def data(self, fmt: str) -> bytes:
        if fmt not in self.full:
            self.full[fmt] = _export(self.pg, fmt, 0, COPY_ROWS)
        return self.full[fmt]

    def with_bad_row(self, fmt: str, bad: bytes, from_end: int = BAD_ROW_FROM_END) -> bytes:
        """All the rows with `bad` (one row in format fmt) inserted from_end rows before the end."""
        cut = COPY_ROWS - from_end
        head = _export(self.pg, fmt, 0, cut)
        tail = _export(self.pg, fmt, cut, COPY_ROWS, header=False)
        if fmt == "binary":
            return head[:-len(BINARY_TRAILER)] + bad + tail[BINARY_HEADER_LEN:]
        return head + bad + tail


@pytest.fixture(scope="module")
def copy_data(pg: Any, shards: Shards) -> CopyData:
    return CopyData(pg, shards)


def _write(copy: Any, data: bytes) -> None:
    view = memoryview(data)
    for at in range(0, len(data), CHUNK):
        copy.write(view[at:at + CHUNK])


def _check_big(shards: Shards, expected: Sequence[int]) -> None:
    """Every shard holds exactly its rows of the data set, each row intact."""
    got = shards.each(f"SELECT count(*), count(*) FILTER (WHERE id <> {ID_SQL} OR note IS DISTINCT FROM {NOTE_SQL}), "
                      "coalesce(sum(i), 0), count(DISTINCT i) FROM big")
    counts = [rows[0][0] for rows in got]
    assert counts == list(expected), f"rows per shard {counts}, Postgres' hash says {list(expected)}"
    assert [rows[0][1] for rows in got] == [0] * SHARDS, "rows whose values changed on the way"
    total = sum(rows[0][3] for rows in got)
    assert total == sum(expected) and sum(rows[0][2] for rows in got) == sum(range(sum(expected)))


def _empty(shards: Shards, table: str = "big") -> None:
    assert shards.each(f"SELECT count(*) FROM {table}") == [[(0,)]] * SHARDS


@pytest.mark.slow
@pytest.mark.parametrize("fmt", list(COPY_FORMATS))
def test_copy_million_rows(proc: Any, clean: Shards, copy_data: CopyData, fmt: str) -> None:
    data = copy_data.data(fmt)
    started = time.monotonic()
    with via(proc) as conn:
        cur = conn.cursor()
        with cur.copy(f"COPY big ({COPY_COLUMNS}) FROM STDIN {COPY_FORMATS[fmt]}") as copy:
            _write(copy, data)
        assert cur.statusmessage == f"COPY {COPY_ROWS}" and cur.rowcount == COPY_ROWS
    elapsed = time.monotonic() - started
    print(f"COPY {COPY_ROWS} rows ({fmt}, {len(data) / 1e6:.0f} MB) through pgherd: {elapsed:.1f} s")
    _check_big(clean, copy_data.expected)


# A row with an invalid key in each format, and the SQLSTATE the client must get (None: whatever
# Postgres itself answers to that row; it is always asked, directly, for comparison).
BAD_KEY_ROWS = {
    "text": (b"x\t1\tbad key\n", "22P02"),
    "csv": (b'x,1,"bad, key"\n', "22P02"),
    # A 9-byte value where a bigint (8 bytes) must be.
    "binary": (b"\x00\x03" + b"\x00\x00\x00\x09" + bytes(9) + b"\x00\x00\x00\x04\x00\x00\x00\x01"
               + b"\xff\xff\xff\xff", None),
}


def _direct_sqlstate(pg: Any, fmt: str, bad: bytes) -> str:
    """What Postgres answers to the bad row alone, COPYed straight into a plain table."""
    data = bad
    if fmt == "csv":
        data = b"id,i,note\n" + bad  # the HEADER line
    if fmt == "binary":
        data = _export(pg, fmt, 0, 0)[:BINARY_HEADER_LEN] + bad + BINARY_TRAILER
    with psycopg.connect(pg.dsn(REF, *ALICE), autocommit=True, connect_timeout=10) as conn:
        conn.execute("CREATE TEMP TABLE big (id bigint NOT NULL, i int NOT NULL, note text)")
        with pytest.raises(psycopg.Error) as failed:
            with conn.cursor().copy(f"COPY big ({COPY_COLUMNS}) FROM STDIN {COPY_FORMATS[fmt]}") as copy:
                copy.write(data)
    return failed.value.sqlstate  # type: ignore[return-value]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", list(COPY_FORMATS))
def test_copy_bad_key_near_the_end_changes_nothing(proc: Any, clean: Shards, copy_data: CopyData, fmt: str) -> None:
    bad, sqlstate = BAD_KEY_ROWS[fmt]
    direct = _direct_sqlstate(clean.pg, fmt, bad)
    assert sqlstate in (None, direct), f"Postgres itself answers {direct}"
    data = copy_data.with_bad_row(fmt, bad)
    with via(proc) as conn:
        with pytest.raises(psycopg.Error) as failed:
            with conn.cursor().copy(f"COPY big ({COPY_COLUMNS}) FROM STDIN {COPY_FORMATS[fmt]}") as copy:
                _write(copy, data)
        assert failed.value.sqlstate == direct, str(failed.value)
        assert conn.execute("SELECT count(*) FROM big").fetchone() == (0,)
    _empty(clean)


@pytest.mark.slow
def test_copy_bad_value_rejected_by_a_shard_changes_nothing(proc: Any, clean: Shards, copy_data: CopyData) -> None:
    """A bad non-key field passes pgherd's splitter; the shard that gets it fails the COPY."""
    data = copy_data.with_bad_row("text", b"12345\tnot a number\tbad value\n")
    with via(proc) as conn:
        with pytest.raises(psycopg.errors.InvalidTextRepresentation):
            with conn.cursor().copy(f"COPY big ({COPY_COLUMNS}) FROM STDIN") as copy:
                _write(copy, data)
        assert conn.execute("SELECT 1").fetchone() == (1,)
    _empty(clean)


@pytest.mark.slow
def test_copy_fail_from_the_client_changes_nothing(proc: Any, clean: Shards, copy_data: CopyData) -> None:
    data = copy_data.data("csv")
    with via(proc) as conn:
        with pytest.raises(RuntimeError, match="client gave up"):
            with conn.cursor().copy(f"COPY big ({COPY_COLUMNS}) FROM STDIN {COPY_FORMATS['csv']}") as copy:
                _write(copy, data[:len(data) - 1000])
                raise RuntimeError("client gave up")  # psycopg sends CopyFail
        assert conn.execute("SELECT count(*) FROM big").fetchone() == (0,)
    _empty(clean)


def test_copy_in_transaction_rolled_back(proc: Any, clean: Shards, pg: Any) -> None:
    data = _export(pg, "text", 0, 3000)
    with via(proc, autocommit=False) as conn:
        cur = conn.cursor()
        with cur.copy(f"COPY big ({COPY_COLUMNS}) FROM STDIN") as copy:
            copy.write(data)
        assert cur.statusmessage == "COPY 3000"
        assert conn.execute("SELECT count(*) FROM big").fetchone() == (3000,)
        conn.rollback()
    _empty(clean)


@pytest.mark.parametrize("options, sample", [
    ("(FORMAT csv, NULL 'NIL', HEADER true)", b'id,i,note\n"7",1,NIL\n14,2,"NIL"\n21,3,""\n'),
    ("(FORMAT csv, DELIMITER ';', QUOTE '''', ESCAPE '\\')", b"7;1;'a;\\'b\\'\\\\'\n14;2;\n'21';3;'x\ny'\n"),
    ("(FORMAT text, DELIMITER '|', NULL 'nil')", b"7|1|nil\n14|2|a\\|b\\\\\n21|3|\\N\n"),
], ids=["csv-null-quoted-key", "csv-delimiter-quote-escape", "text-delimiter-null"])
def test_copy_options_match_postgres(proc: Any, clean: Shards, pg: Any, options: str, sample: bytes) -> None:
    """The same COPY straight into a plain table and through pgherd: the same rows, each on its shard."""
    sql = f"COPY big ({COPY_COLUMNS}) FROM STDIN {options}"
    with psycopg.connect(pg.dsn(REF, *ALICE), autocommit=True) as conn:
        conn.execute("CREATE TEMP TABLE big (id bigint NOT NULL, i int NOT NULL, note text)")
        with conn.cursor().copy(sql) as copy:
            copy.write(sample)
        want = conn.execute("SELECT id, i, note FROM big ORDER BY i").fetchall()
    with via(proc) as conn:
        cur = conn.cursor()
        with cur.copy(sql) as copy:
            copy.write(sample)
        assert cur.statusmessage == f"COPY {len(want)}"
    got = sorted((row for rows in clean.each("SELECT id, i, note FROM big") for row in rows), key=lambda r: r[1])
    assert got == want
    assert clean.keys_on("big") == expected_placement(clean, "big_hash", [r[0] for r in want])


def test_copy_into_omnisharded_table_reaches_every_shard(proc: Any, clean: Shards) -> None:
    data = "".join(f"{j}\tomni {j}\n" for j in range(1000)).encode()
    with via(proc) as conn:
        with conn.cursor().copy("COPY omni (id, v) FROM STDIN") as copy:
            copy.write(data)
        assert conn.execute("SELECT count(*) FROM omni").fetchone() == (1000,)
    assert clean.each("SELECT count(*), sum(id), count(DISTINCT v) FROM omni") == [[(1000, 499500, 1000)]] * SHARDS


def test_omnisharded_write_tags_count_the_clients_rows(proc: Any, clean: Shards) -> None:
    """One Postgres holding all the rows answers COPY 1000 / INSERT 0 2, whatever the shard count."""
    data = "".join(f"{j}\tomni {j}\n" for j in range(1000)).encode()
    with via(proc) as conn:
        cur = conn.cursor()
        with cur.copy("COPY omni (id, v) FROM STDIN") as copy:
            copy.write(data)
        copy_tag = cur.statusmessage
        insert_tag = conn.execute("INSERT INTO omni (id, v) VALUES (-1, 'a'), (-2, 'b')").statusmessage
    assert clean.each("SELECT count(*) FROM omni") == [[(1002,)]] * SHARDS
    assert (copy_tag, insert_tag) == ("COPY 1000", "INSERT 0 2")


def test_copy_records_to_table_asyncpg(proc: Any, clean: Shards) -> None:
    records = [(7 * j - 3000000, j, None if j % 5 == 0 else f"r{j} ,\"\n\t\\ é") for j in range(10_000)]

    async def go() -> str:
        conn = await aconnect(proc)
        try:
            return await conn.copy_records_to_table("big", records=records, columns=["id", "i", "note"])
        finally:
            await conn.close()

    assert arun(go()) == "COPY 10000"
    got = sorted(row for rows in clean.each("SELECT id, i, note FROM big") for row in rows)
    assert got == sorted(records)
    assert clean.keys_on("big") == expected_placement(clean, "big_hash", [r[0] for r in records])


# ---------------------------------------------------------------------------------------------
# COPY TO STDOUT


@pytest.mark.parametrize("options", ["", "(FORMAT csv, HEADER true)", "(FORMAT binary)"],
                         ids=["text", "csv-header", "binary"])
def test_copy_to_stdout_returns_every_shard(proc: Any, clean: Shards, options: str) -> None:
    for k, db in enumerate(DBS):
        clean.exec(db, f"INSERT INTO big (id, i, note) SELECT {ID_SQL}, i, {NOTE_SQL} FROM generate_series(0, 19999) i "
                       f"WHERE satisfies_hash_partition('big_hash'::regclass, {SHARDS}, {k}, {ID_SQL})")
    want = sorted(row for rows in clean.each("SELECT id, i, note FROM big") for row in rows)
    assert len(want) == 20000
    with via(proc) as conn:
        cur = conn.cursor()
        with cur.copy(f"COPY big ({COPY_COLUMNS}) TO STDOUT {options}") as copy:
            raw = b"".join(bytes(chunk) for chunk in copy)
        assert cur.rowcount == 20000  # psycopg keeps only the count of a COPY TO's tag
        assert conn.execute("SELECT 1").fetchone() == (1,)
    # One stream, as one Postgres sends it: one CSV header, one binary file header and trailer.
    if "HEADER" in options:
        assert raw.startswith(b"id,i,note\n") and raw.count(b"id,i,note\n") == 1, \
            f"{raw.count(b'id,i,note' + bytes([10]))} CSV header lines"
    if "binary" in options:
        signature = raw[:11]
        assert signature == b"PGCOPY\n\xff\r\n\x00" and raw.count(signature) == 1, \
            f"{raw.count(signature)} binary file headers"
    # Parse what pgherd sent with Postgres itself: load it into a plain table.
    with psycopg.connect(clean.pg.dsn(REF, *ALICE), autocommit=True) as direct:
        direct.execute("CREATE TEMP TABLE back (id bigint, i int, note text)")
        with direct.cursor().copy(f"COPY back FROM STDIN {options}") as copy:
            copy.write(raw)
        got = sorted(direct.execute("SELECT id, i, note FROM back").fetchall())
    assert got == want
