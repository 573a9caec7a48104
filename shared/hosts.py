"""Names for the Postgres hosts of a database, shared by the supervisor's monitor and the workers."""

from __future__ import annotations


def host_key(database: str, shard: int, host: str, port: int) -> str:
    """The key one [[databases]] entry is known by on the bus and in SHOW BANS / BAN / UNBAN.

    Bans and roles belong to a (database, shard, host:port): the same server can serve several
    databases, and a failing database does not make the others fail.
    """
    address = f"[{host}]" if ":" in host else host
    return f"{database}/{shard}/{address}:{port}"


def key_of(db) -> str:
    """host_key of a config.Database entry."""
    return host_key(db.name, db.shard, db.host, db.port)
