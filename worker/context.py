"""A worker's shared state: its pools, its clients by backend pid, its settings."""

from __future__ import annotations

import hmac
import logging
import secrets

import trio

from pgherd.shared.wire import protocol as P

from .pool import Pool, PoolSettings

log = logging.getLogger("pgherd.worker")

# Pool maintenance (idle_timeout, server_lifetime, min_pool_size) runs this often:
# idle_timeout has millisecond units but second-level precision is what users expect.
MAINTENANCE_INTERVAL = 1.0
# BackendKeyData pids handed to clients carry the worker index in their top bits
# so a CancelRequest can be routed to the owning worker: pid = (index+1) << 22 | n.
PID_INDEX_SHIFT = 22
PID_COUNTER_MASK = (1 << PID_INDEX_SHIFT) - 1


def pid_owner(pid: int) -> int:
    """Worker index encoded in a pid handed out by pgherd (-1 if not ours)."""
    return (pid >> PID_INDEX_SHIFT) - 1


class WorkerContext:
    def __init__(self, config, index: int = 0) -> None:
        self.index = index
        self.clients: dict[int, object] = {}
        self._counter = 0
        self.pools: dict[tuple[str, str], Pool] = {}
        self.apply_config(config)

    def apply_config(self, config) -> None:
        g = config.general
        self.config = config
        self.auth_type = g.auth_type
        self.client_login_timeout = g.client_login_timeout / 1000
        self.max_message_size = min(g.max_message_size, P.MAX_MESSAGE_SIZE_LIMIT)
        self.shutdown_timeout = g.shutdown_timeout / 1000
        self.pools = self._build_pools(config)

    def _build_pools(self, config) -> dict[tuple[str, str], Pool]:
        pools: dict[tuple[str, str], Pool] = {}
        for user in config.users:
            if user.database:
                pool = self._make_pool(config, user, user.database)
                if pool is not None:
                    pools[(user.name, user.database)] = pool
        return pools

    def _make_pool(self, config, user, database: str) -> Pool | None:
        g = config.general
        hosts = config.database_hosts(database)
        if not hosts:
            return None
        # One host per database in this slice: the primary of shard 0, else the first.
        primaries = [d for d in hosts if d.shard == 0 and d.role == "primary"]
        db = (primaries or hosts)[0]
        server_user, server_password = config.server_login(user, db)
        settings = PoolSettings(
            host=db.host, port=db.port, database_name=db.database_name or db.name,
            server_user=server_user, server_password=server_password,
            pool_size=config.pool_size(user, db), min_pool_size=config.min_pool_size(user, db),
            pooler_mode=config.pooler_mode(user, db),
            checkout_timeout=g.checkout_timeout / 1000, connect_timeout=g.connect_timeout / 1000,
            connect_attempts=g.connect_attempts, connect_attempt_delay=g.connect_attempt_delay / 1000,
            idle_timeout=config.idle_timeout(user, db) / 1000,
            server_lifetime=config.server_lifetime(user, db) / 1000,
            rollback_timeout=g.rollback_timeout / 1000)
        return Pool(user.name, database, settings, db.shard, db.role)

    def lookup(self, user: str, database: str):
        """(users.toml entry, pool) for a login; (None, None) when unknown."""
        user_cfg = self.config.find_user(user, database)
        if user_cfg is None:
            return None, None
        pool = self.pools.get((user, database))
        if pool is None:
            # users.databases / all_databases: pools for other databases are made on first use.
            pool = self._make_pool(self.config, user_cfg, database)
            if pool is not None:
                self.pools[(user, database)] = pool
        return user_cfg, pool

    def register(self, client) -> tuple[int, int]:
        while True:
            self._counter = (self._counter + 1) & PID_COUNTER_MASK
            pid = ((self.index + 1) << PID_INDEX_SHIFT) | self._counter
            if pid not in self.clients and self._counter:
                break
        self.clients[pid] = client
        return pid, secrets.randbits(31)

    async def cancel(self, pid: int, secret: int) -> None:
        client = self.clients.get(pid)
        # A wrong secret is ignored silently, as Postgres does.
        if client is None or not hmac.compare_digest(secret.to_bytes(4, "big", signed=True),
                                                     client.secret.to_bytes(4, "big", signed=True)):
            return
        await client.cancel_server_query()

    async def maintenance_loop(self) -> None:
        while True:
            for pool in list(self.pools.values()):
                try:
                    await pool.maintain()
                except Exception:  # never let maintenance kill the worker
                    log.exception("pool %s: maintenance failed", pool.name)
            await trio.sleep(MAINTENANCE_INTERVAL)

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close_all()
