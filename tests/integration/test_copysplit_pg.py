"""COPY splitting checked by PostgreSQL itself (router/copysplit.py).

Real COPY data comes from Postgres (COPY ... TO STDOUT in text, CSV with various options, and
binary) over a table of awkward values; the splitter cuts it by shard, and each shard's part is
loaded with COPY ... FROM STDIN into a guard table: a hash-partitioned table holding only that
shard's partition, so a row sent to the wrong shard fails in Postgres ("no partition of relation
... found for row"). The guards together must then hold exactly the source rows. Bad inputs must
fail in the splitter with the SQLSTATE Postgres gives for them (or, when the splitter does not
read the bad part, on the shards that get it).
"""

from __future__ import annotations

import random
import uuid
from typing import Any, Iterator

import psycopg
import pytest

from pgherd.config.model import Config
from pgherd.router.copysplit import CopySplitError, copy_plan
from pgherd.router.plan import ShardingPlan

SHARDS = 3
ROWS = 2500
SEED = 20240607
# Awkward characters for text values: delimiters, quotes, escapes, line ends, the end-of-copy
# marker's pieces and non-ASCII; whole values that look like markers are added separately. (A text
# value equal to the NULL string does not survive COPY TO in text format, so those NULL strings are
# spelled with letters the values never use.)
ALPHABET = "ab \t\n\r\\\"',.;|N0é日😀\u0301"
SPECIAL_VALUES = ["", "\\.", "\\N", "NULL", '"', "'", ",", "\t", "\\", "\\.\n", " 1 "]
COLUMNS = "id, name, note, u, n, ts, tags, blob, j"
# (label, COPY options for TO and FROM)
FORMATS = [
    ("text", "(FORMAT text)"),
    ("text-custom", "(FORMAT text, DELIMITER '|', NULL 'NIL')"),
    ("csv", "(FORMAT csv)"),
    ("csv-header", "(FORMAT csv, HEADER true)"),
    ("csv-custom", "(FORMAT csv, DELIMITER ';', QUOTE '''', ESCAPE '\\', NULL 'NIL')"),
    ("binary", "(FORMAT binary)"),
]
KEYS = [("id", "bigint"), ("name", "varchar"), ("u", "uuid")]


def _text(rng: random.Random) -> str | None:
    r = rng.random()
    if r < 0.08:
        return None
    if r < 0.2:
        return rng.choice(SPECIAL_VALUES)
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 20)))


def _rows(rng: random.Random) -> list[tuple]:
    rows = []
    for i in range(ROWS):
        key = None if i % 97 == 5 else rng.choice((i, -i * 7919, rng.randint(-(1 << 63), (1 << 63) - 1)))
        rows.append((
            key,
            _text(rng),
            _text(rng),
            None if i % 89 == 3 else uuid.UUID(int=rng.getrandbits(128)),
            rng.choice((None, "0", "-1.5", "123456789012345678901234567890.0001", "NaN")),
            rng.choice((None, "2024-02-29 12:34:56.789+00", "infinity", "1999-12-31 23:59:59-08")),
            rng.choice((None, [], ["a", None, 'q"uote', "back\\slash", "new\nline"])),
            rng.choice((None, b"", b"\x00\x01\\\xff", bytes(range(256)))),
            rng.choice((None, '{"a": [1, "\\t", null]}', '"text"', "[]")),
        ))
    return rows


@pytest.fixture(scope="module")
def scratch(pg: Any) -> Iterator[tuple[psycopg.Connection, str]]:
    """A connection with a scratch schema holding the source table `src`."""
    schema = f"copysplit_{random.getrandbits(32):08x}"
    with psycopg.connect(pg.dsn("pgherd_test"), autocommit=True, connect_timeout=10) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
        try:
            conn.execute(f"SET search_path = {schema}")
            conn.execute("CREATE TABLE src (id bigint, name text COLLATE \"C\", note text, u uuid, n numeric, "
                         "ts timestamptz, tags text[], blob bytea, j jsonb)")
            with conn.cursor().copy(f"COPY src ({COLUMNS}) FROM STDIN") as copy:
                for row in _rows(random.Random(SEED)):
                    copy.write_row(row)
            yield conn, schema
        finally:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def _plan(column: str, data_type: str) -> ShardingPlan:
    doc = {
        "databases": [{"name": "db", "host": "127.0.0.1", "shard": i} for i in range(SHARDS)],
        "sharded_tables": [{"database": "db", "name": "guard", "column": column, "data_type": data_type}],
    }
    return ShardingPlan.from_config(Config.model_validate(doc), "db")


def _export(conn: psycopg.Connection, options: str) -> list[bytes]:
    chunks = []
    with conn.cursor().copy(f"COPY (SELECT {COLUMNS} FROM src ORDER BY id, name) TO STDOUT {options}") as copy:
        for data in copy:
            chunks.append(bytes(data))
    return chunks


def _split(sql: str, plan: ShardingPlan, chunks: list[bytes]) -> dict[int, bytes]:
    cp = copy_plan(sql, plan)
    assert cp is not None
    splitter = cp.splitter()
    out: dict[int, bytearray] = {}
    for chunk in chunks:
        for shard, data in splitter.feed(chunk).items():
            out.setdefault(shard, bytearray()).extend(data)
    for shard, data in splitter.finish().items():
        out.setdefault(shard, bytearray()).extend(data)
    assert splitter.rows == ROWS and splitter.duplicates == 0
    return {s: bytes(b) for s, b in out.items()}


def _rechunk(chunks: list[bytes], rng: random.Random) -> list[bytes]:
    data = b"".join(chunks)
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, 400)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]


@pytest.mark.parametrize("label, options", FORMATS, ids=[f[0] for f in FORMATS])
@pytest.mark.parametrize("key, data_type", KEYS, ids=[k[0] for k in KEYS])
def test_each_shard_gets_exactly_its_rows(scratch: tuple[psycopg.Connection, str], label: str, options: str,
                                          key: str, data_type: str) -> None:
    conn, _schema = scratch
    plan = _plan(key, data_type)
    chunks = _export(conn, options)
    statement = f"COPY guard ({COLUMNS}) FROM STDIN {options}"
    parts = _split(statement, plan, chunks)
    assert parts == _split(statement, plan, _rechunk(chunks, random.Random(label + key)))
    guards = []
    for shard in range(SHARDS):
        guard = f"guard_{shard}"
        guards.append(guard)
        conn.execute(f"DROP TABLE IF EXISTS {guard}")
        conn.execute(f"CREATE TABLE {guard} (LIKE src) PARTITION BY HASH ({key})")
        conn.execute(f"CREATE TABLE {guard}_only PARTITION OF {guard} "
                     f"FOR VALUES WITH (MODULUS {SHARDS}, REMAINDER {shard})")
        with conn.cursor().copy(statement.replace("guard", guard, 1)) as copy:
            copy.write(parts.get(shard, b""))
    union = " UNION ALL ".join(f"SELECT * FROM {g}" for g in guards)
    counts = [conn.execute(f"SELECT count(*) FROM {g}").fetchone()[0] for g in guards]  # type: ignore[index]
    assert sum(counts) == ROWS and all(counts), counts
    missing = conn.execute(f"SELECT count(*) FROM (SELECT * FROM src EXCEPT ALL ({union})) d").fetchone()
    extra = conn.execute(f"SELECT count(*) FROM (({union}) EXCEPT ALL SELECT * FROM src) d").fetchone()
    assert missing == (0,) and extra == (0,)


BAD_INPUTS = [
    ("(FORMAT text)", b"1\tx\nnot a number\ty\n"),
    ("(FORMAT text)", b"1\tx\n2\n"),
    ("(FORMAT text)", b"1\tx\r\n2\tx\n"),
    ("(FORMAT text)", b"1\tx\n\\.junk\n"),
    ("(FORMAT text)", b"99999999999999999999\tx\n"),
    ("(FORMAT csv)", b'1,x\n"2,x\n'),
    ("(FORMAT csv)", b"1,x\r2,x\n"),
    ("(FORMAT binary)", b"PGCOPY\n\xff\r\n\x01" + bytes(8)),
    ("(FORMAT binary)", b"PGCOPY\n\xff\r\n\x00" + bytes(8) + b"\x00\x02\x00\x00\x00\x08\x00"),
    ("(FORMAT binary)", b"PGCOPY\n\xff\r\n\x00" + bytes(8) + b"\xff\xff\x00"),
]


@pytest.mark.parametrize("options, data", BAD_INPUTS)
def test_bad_input_fails_like_postgres(scratch: tuple[psycopg.Connection, str], options: str, data: bytes) -> None:
    conn, _schema = scratch
    conn.execute("DROP TABLE IF EXISTS bad")
    conn.execute("CREATE TABLE bad (id bigint, v text)")
    statement = f"COPY bad (id, v) FROM STDIN {options}"
    with pytest.raises(psycopg.Error) as pg_error:
        with conn.cursor().copy(statement) as copy:
            copy.write(data)
    cp = copy_plan(statement.replace("bad", "guard", 1), _plan("id", "bigint"))
    assert cp is not None
    splitter = cp.splitter()
    try:
        parts = splitter.feed(data)
        for shard, tail in splitter.finish().items():
            parts[shard] = parts.get(shard, b"") + tail
    except CopySplitError as e:
        assert e.code == pg_error.value.sqlstate, (e.message, str(pg_error.value))
        return
    # What the splitter lets through (it reads only the key field), the shards' Postgres rejects.
    codes = set()
    for shard in range(SHARDS):
        conn.execute("TRUNCATE bad")
        try:
            with conn.cursor().copy(statement) as copy:
                copy.write(parts.get(shard, b""))
        except psycopg.Error as e:
            codes.add(e.sqlstate)
    assert codes == {pg_error.value.sqlstate}
