"""The [rewrite] statement rewrites run on PostgreSQL (router/rewrite.py).

One cluster plays every shard: schema `s<N>` is shard N and holds guard tables, hash-partitioned
with only that shard's partition, so a row sent to the wrong shard fails in Postgres; schema `ref`
holds plain tables where the client's original statement runs. The rewritten statements are run
with the extended protocol ($n parameters, psycopg's RawCursor) with the parameters part_bind
picks, and the shards together must end up like the reference, RETURNING rows included.
"""

from __future__ import annotations

import random
from typing import Any, Iterator

import psycopg
import pytest

from pgherd.config.model import Config
from pgherd.router.params import Bind
from pgherd.router.plan import ShardingPlan
from pgherd.router.rewrite import (
    PRIMARY_KEY_QUERY, add_primary_key, merge_returning, part_bind, rewrite_shard_key_update, split_insert,
)
from pgherd.router.sharding import shard_bigint

SHARDS = 3
TABLE = ("(id bigint PRIMARY KEY, name text, n int DEFAULT 7, seq int GENERATED ALWAYS AS IDENTITY, "
         "twice int GENERATED ALWAYS AS (n * 2) STORED)")
SCHEMAS = [f"s{i}" for i in range(SHARDS)]


def _plan() -> ShardingPlan:
    doc = {
        "databases": [{"name": "db", "host": "127.0.0.1", "shard": i} for i in range(SHARDS)],
        "sharded_tables": [{"database": "db", "name": "users", "column": "id"}],
    }
    return ShardingPlan.from_config(Config.model_validate(doc), "db")


class Db:
    """A connection and the real names of the schemas ref, s0..s2 (unique per test)."""

    def __init__(self, conn: psycopg.Connection, names: dict[str, str]) -> None:
        self.conn, self.names = conn, names

    def execute(self, sql: str) -> None:
        self.conn.execute(sql)


@pytest.fixture
def db(pg: Any) -> Iterator[Db]:
    """Schemas ref, s0..s2 each holding a `users` table (guards in s<N>)."""
    suffix = f"{random.getrandbits(32):08x}"
    names = {"ref": f"ref_{suffix}", **{s: f"{s}_{suffix}" for s in SCHEMAS}}
    with psycopg.connect(pg.dsn("pgherd_test"), autocommit=True, connect_timeout=10) as conn:
        try:
            conn.execute(f"CREATE SCHEMA {names['ref']}; CREATE TABLE {names['ref']}.users {TABLE}")
            for shard, s in enumerate(SCHEMAS):
                schema = names[s]
                conn.execute(f"CREATE SCHEMA {schema}; CREATE TABLE {schema}.users {TABLE} PARTITION BY HASH (id);"
                             f"CREATE TABLE {schema}.users_only PARTITION OF {schema}.users "
                             f"FOR VALUES WITH (MODULUS {SHARDS}, REMAINDER {shard})")
            yield Db(conn, names)
        finally:
            conn.execute("; ".join(f"DROP SCHEMA IF EXISTS {n} CASCADE" for n in names.values()))


def on(db: Db, where: str, sql: str, params: list | None = None) -> tuple[list, str]:
    """Run sql with search_path set to schema `where` (ref or s<N>); (rows, command tag)."""
    db.execute(f"SET search_path = {db.names[where]}")
    with psycopg.RawCursor(db.conn) as cur:
        cur.execute(sql, params or None)  # type: ignore[arg-type]
        rows = cur.fetchall() if cur.description else []
        return rows, cur.statusmessage or ""


def table(db: Db, where: str) -> list:
    return on(db, where, "SELECT id, name, n, twice FROM users ORDER BY id")[0]


def all_shards(db: Db) -> list:
    return sorted(row for s in SCHEMAS for row in table(db, s))


def keys(count: int, rng: random.Random) -> list[int]:
    return [rng.randint(-(1 << 40), 1 << 40) for _ in range(count)]


def test_split_insert_parts_run_on_their_shards(db: Db) -> None:
    rng = random.Random(7)
    plan = _plan()
    for round_ in range(5):
        ids = keys(12, rng)
        params: list[Any] = []
        rows = []
        for i, key in enumerate(ids):
            if i % 3 == 0:
                params.append(key)
                rows.append(f"(${len(params)}, 'lit ''{i}'' (,)', DEFAULT)")
            else:
                params.append(f"name {i} é")
                rows.append(f"({key}, ${len(params)}, {i})")
        params.append(round_)
        sql = (f"/* batch */ INSERT INTO users AS u (id, name, n) VALUES {', '.join(rows)} "
               f"ON CONFLICT (id) DO UPDATE SET n = ${len(params)} RETURNING u.id, u.name, u.twice;")
        bind = Bind([str(p).encode() for p in params])
        split = split_insert(sql, plan, bind)
        assert {p.shard for p in split.parts} == {shard_bigint(k, SHARDS) for k in ids}
        want, want_tag = on(db, "ref", sql, params)
        results, count = [], 0
        for part in split.parts:
            values = [params[i] for i in part.param_indexes]
            got, tag = on(db, SCHEMAS[part.shard], part.sql, values)
            assert part_bind(bind, part.param_indexes).values == [str(v).encode() for v in values]
            results.append(got)
            count += int(tag.split()[-1])
        assert f"INSERT 0 {count - split.duplicates}" == want_tag
        assert merge_returning(split, results) == want
        assert all_shards(db) == table(db, "ref")


def test_shard_key_update_moves_the_row(db: Db) -> None:
    plan = _plan()
    a = 11
    b = next(k for k in range(12, 1000) if shard_bigint(k, SHARDS) != shard_bigint(a, SHARDS))
    for key, name, n, seq in ((a, "moving", 3, 41), (b + 1, "other", 4, 42)):
        row = f"INSERT INTO users (id, name, n, seq) OVERRIDING SYSTEM VALUE VALUES ({key}, '{name}', {n}, {seq})"
        on(db, "ref", row)
        on(db, SCHEMAS[shard_bigint(key, SHARDS)], row)
    sql = "UPDATE users AS x SET id = $1, name = $2 WHERE x.id = $3 RETURNING x.id, x.name, x.twice, $2 AS echo"
    params: list[Any] = [b, "moved 'é'", a]
    bind = Bind([str(p).encode() for p in params])
    move = rewrite_shard_key_update(sql, plan, bind)
    assert move is not None and move.old_shard == shard_bigint(a, SHARDS) and move.new_shard == shard_bigint(b, SHARDS)
    want, want_tag = on(db, "ref", sql, params)

    old, new = SCHEMAS[move.old_shard], SCHEMAS[move.new_shard]  # type: ignore[index]
    db.execute("BEGIN")
    db.execute(f"SET search_path = {db.names[old]}")
    with psycopg.RawCursor(db.conn) as cur:
        # What the worker does (see KeyMove): read the row with text results, insert, delete.
        cur.execute(move.select_sql, [params[i] for i in move.select_params])
        names = [c.name for c in cur.description]  # type: ignore[union-attr]
        selected = cur.fetchall()
    assert len(selected) == 1
    # The worker has the text values of the DataRow; str() of what psycopg decoded gives them here.
    texts = [None if v is None else str(v).encode() for v in selected[0]]
    assert names[:2] == ["tableoid", "ctid"]
    insert_sql, insert_bind = move.insert_for_row(names[2:], texts[2:], bind, generated=["twice"])
    got, tag = on(db, new, insert_sql, [None if v is None else v.decode() for v in insert_bind.values])
    assert tag == "INSERT 0 1"
    _, deleted = on(db, old, move.delete_sql, [texts[0].decode(), texts[1].decode()])  # type: ignore[union-attr]
    assert deleted == "DELETE 1"
    db.execute("COMMIT")
    assert want_tag == "UPDATE 1" and got == want
    assert all_shards(db) == table(db, "ref")
    # The identity column kept its value (OVERRIDING SYSTEM VALUE).
    assert on(db, new, f"SELECT seq FROM users WHERE id = {b}")[0] == [(41,)]


def test_overriding_system_value_is_accepted_without_identity_columns(db: Db) -> None:
    on(db, "ref", "CREATE TABLE plain (id bigint, v text)")
    _, tag = on(db, "ref", 'INSERT INTO plain ("id", "v") OVERRIDING SYSTEM VALUE VALUES ($1, $2)', ["1", "x"])
    assert tag == "INSERT 0 1"


def test_primary_key_rewrite(db: Db) -> None:
    rows, _ = on(db, "ref", PRIMARY_KEY_QUERY, ["users"])
    assert rows == [("id",)]
    on(db, "ref", "CREATE TABLE two_keys (a bigint, b bigint, PRIMARY KEY (a, b)); "
                  "CREATE TABLE int_key (a int PRIMARY KEY)")
    assert on(db, "ref", PRIMARY_KEY_QUERY, ["two_keys"])[0] == []
    assert on(db, "ref", PRIMARY_KEY_QUERY, ["int_key"])[0] == []
    sql = "INSERT INTO users (name, n) VALUES ($1, 1), ('b', 2) RETURNING id, name"
    out = add_primary_key(sql, "id", [1001, "$2"])
    assert out is not None
    got, _ = on(db, "ref", out, ["a", "1002"])
    assert got == [(1001, "a"), (1002, "b")]
    out = add_primary_key("INSERT INTO users DEFAULT VALUES RETURNING id, n", "id", [1003])
    assert out is not None and on(db, "ref", out)[0] == [(1003, 7)]
