"""Direct connections to shard databases, shared by the sharding tests.

Import it from a test module with `from shard_conns import ShardConns` after putting this directory
on sys.path (the test modules are imported with --import-mode=importlib, so it is not there already).
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import psycopg

ALICE = ("alice", "alice-secret")


class ShardConns:
    """Direct (autocommit) connections to shard databases (and a reference one), as alice."""

    def __init__(self, pg: Any) -> None:
        self.pg = pg
        self.conns: dict[str, psycopg.Connection] = {}

    def conn(self, db: str) -> psycopg.Connection:
        c = self.conns.get(db)
        if c is None or c.closed or c.broken:
            c = self.conns[db] = psycopg.connect(self.pg.dsn(db, *ALICE), autocommit=True, connect_timeout=10)
        return c

    def rows(self, db: str, query: str, params: Sequence | None = None) -> list[tuple]:
        return self.conn(db).execute(query, params).fetchall()

    def val(self, db: str, query: str, params: Sequence | None = None) -> Any:
        return self.rows(db, query, params)[0][0]

    def exec(self, db: str, query: str, params: Sequence | None = None) -> None:
        self.conn(db).execute(query, params)

    def close(self) -> None:
        for c in self.conns.values():
            c.close()

    def hash_shard(self, dbs: Sequence[str], table: str, sqltype: str, values: Iterable[Any]) -> dict[Any, int]:
        """Which shard Postgres' hash partitioning puts each value in (asked of the shard's parent)."""
        n = len(dbs)
        got = self.rows(dbs[0], f"SELECT v, r FROM unnest(%s::{sqltype}[]) AS v, generate_series(0, {n - 1}) AS r "
                                f"WHERE satisfies_hash_partition('{table}'::regclass, {n}, r, v)", [list(values)])
        return {v: r for v, r in got}
