"""Two-phase commit across shards: commit, phase-one failure, automatic 2PC, and recovery.

Shards are databases tp_0 / tp_1 on the session cluster; each holds its part of `acct` as the
one matching hash partition, so a mis-routed row fails in Postgres.
"""

from __future__ import annotations

import time

import psycopg
import pytest

from pgherd.shared.twophase import Gid

SHARDS = 2
DBS = [f"tp_{i}" for i in range(SHARDS)]


def _sql(pg, db, query):
    return pg.sql(query, dbname=db)


@pytest.fixture(scope="module")
def shards(pg):
    for i, db in enumerate(DBS):
        pg.sql(f'DROP DATABASE IF EXISTS {db}')
        pg.sql(f'CREATE DATABASE {db} OWNER alice')
        _sql(pg, db, "CREATE TABLE acct (id bigint NOT NULL, v text) PARTITION BY HASH (id)")
        _sql(pg, db, f"CREATE TABLE acct_{i} PARTITION OF acct FOR VALUES WITH (MODULUS {SHARDS}, REMAINDER {i})")
        _sql(pg, db, "CREATE TABLE uniq (id bigint, v int, UNIQUE (v) DEFERRABLE INITIALLY DEFERRED)")
        _sql(pg, db, "ALTER TABLE acct OWNER TO alice; ALTER TABLE uniq OWNER TO alice; "
                     "GRANT CREATE ON SCHEMA public TO alice")
    yield pg


def _shard_of(pg, key: int) -> int:
    for i, db in enumerate(DBS):
        rows = _sql(pg, db, f"SELECT satisfies_hash_partition('acct'::regclass, {SHARDS}, {i}, {key}::bigint)")
        if rows[0][0] == "t":
            return i
    raise AssertionError(key)


def _keys(pg):
    """Two keys on different shards."""
    found = {}
    k = 1
    while len(found) < SHARDS:
        found.setdefault(_shard_of(pg, k), k)
        k += 1
    return [found[i] for i in range(SHARDS)]


def _config(pg, **general):
    dbs = [{"name": "tp", "host": pg.host, "port": pg.port, "database_name": db, "shard": i}
           for i, db in enumerate(DBS)]
    extra = '[[sharded_tables]]\ndatabase = "tp"\nname = "acct"\ncolumn = "id"\n' \
            '[[sharded_tables]]\ndatabase = "tp"\nname = "uniq"\ncolumn = "id"\n'
    return dict(general={"two_phase_commit": True, **general}, databases=dbs,
                users=[{"name": "alice", "password": "alice-secret", "database": "tp"}], extra_toml=extra)


def _dsn(proc):
    return f"host={proc.host} port={proc.port} dbname=tp user=alice password=alice-secret"


def _count(pg, db, where="true"):
    return int(_sql(pg, db, f"SELECT count(*) FROM acct WHERE {where}")[0][0])


def _prepared(pg):
    return [int(_sql(pg, db, "SELECT count(*) FROM pg_prepared_xacts")[0][0]) for db in DBS]


@pytest.fixture(scope="module")
def proc(shards, pgherd_module):
    return pgherd_module(**_config(shards))


def test_cross_shard_transaction_commits_on_every_shard(proc, shards):
    a, b = _keys(shards)
    with psycopg.connect(_dsn(proc)) as conn:
        conn.execute("INSERT INTO acct (id, v) VALUES (%s, 'commit')", (a,))
        conn.execute("INSERT INTO acct (id, v) VALUES (%s, 'commit')", (b,))
        conn.commit()
    assert [_count(shards, db, "v = 'commit'") for db in DBS] == [1, 1]
    assert _prepared(shards) == [0, 0]
    # The decision record is deleted once every shard committed.
    assert _sql(shards, DBS[0], "SELECT count(*) FROM pgherd_transactions")[0][0] == "0"


def test_phase_one_failure_rolls_back_everywhere(proc, shards):
    a, b = _keys(shards)
    with psycopg.connect(_dsn(proc)) as conn:
        conn.execute("INSERT INTO acct (id, v) VALUES (%s, 'phase1')", (a,))
        conn.execute("INSERT INTO acct (id, v) VALUES (%s, 'phase1')", (b,))
        # A deferred unique violation on shard 1: PREPARE TRANSACTION fails there.
        conn.execute("INSERT INTO uniq (id, v) VALUES (%s, 7)", (b,))
        conn.execute("INSERT INTO uniq (id, v) VALUES (%s, 7)", (b,))
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.commit()
        # The client carries on.
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert [_count(shards, db, "v = 'phase1'") for db in DBS] == [0, 0]
    assert _prepared(shards) == [0, 0]


def test_single_statement_across_shards_is_atomic(proc, shards):
    a, b = _keys(shards)
    with psycopg.connect(_dsn(proc), autocommit=True) as conn:
        conn.execute("INSERT INTO acct (id, v) VALUES (%s, 'auto')", (a,))
        conn.execute("INSERT INTO acct (id, v) VALUES (%s, 'auto')", (b,))
        cur = conn.execute("UPDATE acct SET v = 'auto2' WHERE v = 'auto'")
        assert cur.rowcount == 2
        # An unkeyed statement that fails on one shard changes nothing on the other.
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute(f"UPDATE acct SET v = 'never' || (1 / (id - {b}))::text WHERE v = 'auto2'")
    assert [_count(shards, db, "v = 'auto2'") for db in DBS] == [1, 1]
    assert _prepared(shards) == [0, 0]


def test_recovery_commits_decided_and_rolls_back_abandoned(shards, pgherd, monkeypatch):
    """What a worker that died between the phases leaves behind is settled by the supervisor."""
    monkeypatch.setenv("PGHERD_2PC_RECOVERY_INTERVAL", "0.5")
    monkeypatch.setenv("PGHERD_2PC_RECOVERY_GRACE", "1")
    a, b = _keys(shards)
    decided, abandoned = Gid(9_000_001, 0, 1), Gid(9_000_002, 0, 1)
    _sql(shards, DBS[0], "CREATE TABLE IF NOT EXISTS public.pgherd_transactions "
                         "(txid bigint PRIMARY KEY, created timestamptz NOT NULL DEFAULT now())")
    _sql(shards, DBS[0], f"INSERT INTO pgherd_transactions (txid) VALUES ({decided.txid})")
    for gid, value in ((decided, "decided"), (abandoned, "abandoned")):
        _sql(shards, DBS[1], f"SET ROLE alice; BEGIN; INSERT INTO acct (id, v) VALUES ({b}, '{value}'); "
                             f"PREPARE TRANSACTION '{gid}'")
    assert _prepared(shards)[1] == 2
    pgherd(**_config(shards))
    deadline = time.monotonic() + 20
    while _prepared(shards)[1] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _prepared(shards) == [0, 0]
    assert _count(shards, DBS[1], "v = 'decided'") == 1
    assert _count(shards, DBS[1], "v = 'abandoned'") == 0
    # The decision record is cleaned up once nothing refers to it.
    while _sql(shards, DBS[0], "SELECT count(*) FROM pgherd_transactions")[0][0] != "0" \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _sql(shards, DBS[0], "SELECT count(*) FROM pgherd_transactions")[0][0] == "0"
