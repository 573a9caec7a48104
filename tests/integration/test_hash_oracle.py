"""Hash oracle: pgherd's sharding functions put every value where PostgreSQL's PARTITION BY HASH does.

For each key type and shard count, one partitioned table with a partition per remainder is built
in a scratch schema of the session cluster; thousands of values (random and edge values) are
COPYed in, and the partition Postgres chose for each (tableoid) must be the shard pgherd computes.
Everything is batched into one connection and a handful of round trips.
"""

from __future__ import annotations

import random
import uuid
from typing import Any, Callable

import psycopg
import pytest

from pgherd.router.sharding import KeyFunction, shard_bigint, shard_text, shard_uuid

SHARD_COUNTS = (2, 3, 4, 7)
# Per type: enough random values that every remainder of every modulus is hit many times over.
RANDOM_VALUES = 2500
SEED = 20251126

INT8_MIN, INT8_MAX = -(1 << 63), (1 << 63) - 1
INT4_MIN, INT4_MAX = -(1 << 31), (1 << 31) - 1
INT2_MIN, INT2_MAX = -(1 << 15), (1 << 15) - 1

# Non-ASCII and tricky characters for text keys (no NUL: Postgres text cannot hold it).
ALPHABET = "abcXYZ019 _-'\"\\\t\n%éüß€日本語😀\u0301\u200b"


def _edge_ints(lo: int, hi: int) -> list[int]:
    edges = {lo, lo + 1, hi - 1, hi, 0, 1, -1, 2, -2, 42, -42, 255, 256, -256, 65535, 65536}
    for bits in (7, 8, 15, 16, 31, 32, 33, 47, 48, 62, 63):
        for v in (1 << bits, (1 << bits) - 1, -(1 << bits), -(1 << bits) + 1):
            edges.add(v)
    return sorted(v for v in edges if lo <= v <= hi)


def _ints(rng: random.Random, lo: int, hi: int) -> list[int]:
    values = _edge_ints(lo, hi)
    values += [rng.randint(lo, hi) for _ in range(RANDOM_VALUES)]
    values += [rng.randint(-1000, 1000) for _ in range(200)]
    return values


def _texts(rng: random.Random) -> list[str]:
    values = ["", " ", "a", "é", "日本", "😀", "abcdefghijk", "abcdefghijkl", "abcdefghijklm", "x" * 24, "y" * 100]
    # Every length around the 12-byte block boundaries of lookup3, in ASCII and multi-byte.
    values += ["a" * n for n in range(0, 40)] + ["é" * n for n in range(1, 20)]
    for _ in range(RANDOM_VALUES):
        n = rng.choice((rng.randint(0, 12), rng.randint(0, 40), rng.randint(0, 300)))
        values.append("".join(rng.choice(ALPHABET) for _ in range(n)))
    return values


def _uuids(rng: random.Random) -> list[uuid.UUID]:
    values = [uuid.UUID(int=0), uuid.UUID(int=(1 << 128) - 1), uuid.UUID(int=1), uuid.UUID(int=1 << 127)]
    values += [uuid.UUID(int=rng.getrandbits(128)) for _ in range(RANDOM_VALUES)]
    return values


def _expected(sql_type: str) -> Callable[[Any, int], int]:
    if sql_type in ("bigint", "integer", "smallint"):
        return shard_bigint
    if sql_type in ("text", "varchar"):
        return lambda v, n: shard_text(v, n)
    return lambda v, n: shard_uuid(v.bytes, n)


def _cases() -> dict[str, list[Any]]:
    rng = random.Random(SEED)
    texts = _texts(rng)
    return {
        "bigint": _ints(rng, INT8_MIN, INT8_MAX),
        "integer": _ints(rng, INT4_MIN, INT4_MAX),
        "smallint": _ints(rng, INT2_MIN, INT2_MAX),
        "text": texts,
        "varchar": texts,
        "uuid": _uuids(rng),
    }


@pytest.fixture
def scratch(pg: Any) -> Any:
    """A superuser connection with a fresh scratch schema, dropped afterwards."""
    schema = f"hash_oracle_{random.getrandbits(32):08x}"
    with psycopg.connect(pg.dsn("pgherd_test"), autocommit=True, connect_timeout=10) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
        try:
            yield conn, schema
        finally:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def test_partition_by_hash_matches(scratch: Any) -> None:
    conn, schema = scratch
    cases = _cases()
    ddl = []
    for sql_type in cases:
        for n in SHARD_COUNTS:
            parent = f"{schema}.t_{sql_type}_{n}"
            # COLLATE "C": a deterministic collation, so text hashes its bytes (the cluster is C anyway).
            collate = ' COLLATE "C"' if sql_type in ("text", "varchar") else ""
            ddl.append(f"CREATE TABLE {parent} (id int, v {sql_type}{collate}) PARTITION BY HASH (v)")
            for r in range(n):
                ddl.append(
                    f"CREATE TABLE {parent}_p{r} PARTITION OF {parent} FOR VALUES WITH (MODULUS {n}, REMAINDER {r})"
                )
    conn.execute(";".join(ddl))

    mismatches = []
    for sql_type, values in cases.items():
        expect = _expected(sql_type)
        rows = list(enumerate(values)) + [(len(values), None)]  # NULL keys go to remainder 0
        for n in SHARD_COUNTS:
            parent = f"{schema}.t_{sql_type}_{n}"
            with conn.cursor().copy(f"COPY {parent} (id, v) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            placed = conn.execute(f"SELECT id, tableoid::regclass::text FROM {parent}").fetchall()
            assert len(placed) == len(rows)
            for id_, partition in placed:
                got = int(partition.rsplit("_p", 1)[1])
                value = rows[id_][1]
                want = 0 if value is None else expect(value, n)
                if got != want:
                    mismatches.append((sql_type, n, value, got, want))
    assert not mismatches, f"{len(mismatches)} values land elsewhere than in Postgres, e.g. {mismatches[:5]}"


def test_key_functions_match_satisfies_hash_partition(scratch: Any) -> None:
    """The compiled KeyFunction (what routing uses, from text and binary parameters) agrees too."""
    conn, schema = scratch
    rng = random.Random(SEED + 1)
    conn.execute(
        f"CREATE TABLE {schema}.k8 (v bigint) PARTITION BY HASH (v);"
        f'CREATE TABLE {schema}.kt (v text COLLATE "C") PARTITION BY HASH (v);'
        f"CREATE TABLE {schema}.ku (v uuid) PARTITION BY HASH (v)"
    )
    ints = _ints(rng, INT8_MIN, INT8_MAX)[:600]
    texts = _texts(rng)[:600]
    uuids = _uuids(rng)[:600]
    for n in SHARD_COUNTS:
        for table, values, data_type, encode in (
            ("k8", ints, "bigint", lambda v: v.to_bytes(8, "big", signed=True)),
            ("kt", texts, "varchar", lambda v: v.encode()),
            ("ku", uuids, "uuid", lambda v: v.bytes),
        ):
            fn = KeyFunction(data_type, n)
            # Ask Postgres which remainder holds each value: satisfies_hash_partition(parent, modulus,
            # remainder, value) is what the partition constraint calls (partbounds.c).
            remainders = conn.execute(
                f"SELECT (SELECT r FROM generate_series(0, {n} - 1) r "
                f"        WHERE satisfies_hash_partition('{schema}.{table}'::regclass, {n}, r, v)) "
                f"FROM unnest(%s::{'bigint' if table == 'k8' else 'text' if table == 'kt' else 'uuid'}[]) v",
                ([str(v) if table == "ku" else v for v in values],),
            ).fetchall()
            for value, (want,) in zip(values, remainders):
                text_mask = fn.mask(fn.param_value(str(value).encode(), False, 0))
                binary_mask = fn.mask(fn.param_value(encode(value), True, 0))
                assert text_mask == binary_mask == 1 << want, (table, n, value)
