"""A worker's shared state: its pools, its clients by backend pid, its settings."""

from __future__ import annotations

import hmac
import logging
import secrets

import trio

from pgherd.router.plan import ShardingPlan
from pgherd.router.route import Router
from pgherd.router.rw import ReadWriteClassifier
from pgherd.shared import tls
from pgherd.shared.unique_id import generator_for
from pgherd.shared.backend_key import PID_COUNTER_MASK, make_pid, pid_owner
from pgherd.shared.wire import protocol as P

from .cluster import Cluster, Health, pool_key
from .pool import Pool, PoolSettings
from .prepared import StatementCache

log = logging.getLogger("pgherd.worker")

# Pool maintenance (idle_timeout, server_lifetime, min_pool_size) runs this often:
# idle_timeout has millisecond units but second-level precision is what users expect.
MAINTENANCE_INTERVAL = 1.0
# Cross-shard constructs the sharded relay combines (router/merge.py refuses what it cannot).
MERGEABLE = ("ORDER BY", "LIMIT", "OFFSET", "aggregate", "GROUP BY", "HAVING", "DISTINCT", "UNION")
# Every database (PAUSE / MAINTENANCE ON without a name).
ALL = "*"


def worker_share(total: int, index: int, workers: int) -> int:
    """This worker's part of an instance-wide pool size: an even split, at least 1.

    The sum over workers is max(total, workers): e.g. 10 over 3 workers is 4+3+3.
    """
    workers = max(1, workers)
    share = total // workers + (1 if index < total % workers else 0)
    return max(1, share)


def worker_min_share(total: int, index: int, workers: int) -> int:
    """min_pool_size split the same way, but 0 is allowed (min 1 over 3 workers: 1+0+0)."""
    workers = max(1, workers)
    return total // workers + (1 if index < total % workers else 0)


class WorkerContext:
    def __init__(self, config, index: int = 0, workers: int = 1, link=None, node: int = 0) -> None:
        self.index = index
        self.workers = workers
        self.link = link
        self.node = node
        self.clients: dict[int, object] = {}
        self._counter = 0
        # Every pool, by (user, database, host key); clusters group them per login.
        self.pools: dict[tuple[str, str, str], Pool] = {}
        self.clusters: dict[tuple[str, str], Cluster] = {}
        self.health = Health(link)
        self.unique_ids = None  # shared/unique_id.UniqueIdGenerator for pgherd.unique_id()
        self.draining: list[Pool] = []
        self.paused: set[str] = set()
        self.maintenance: set[str] = set()
        self._gate_changed = trio.Event()
        self.started = trio.current_time()
        self.pubsub = None  # worker/pubsub.PubSub when pub_sub_channel_size > 0 (set by serve)
        self.reactor = None  # worker/fastpath.Reactor (set by serve)
        self.statements = StatementCache()
        self.apply_config(config)

    # ------------------------------------------------------------ configuration
    def apply_config(self, config) -> None:
        g = config.general
        self.config = config
        self.auth_type = g.auth_type
        self.client_login_timeout = g.client_login_timeout / 1000
        self.max_message_size = min(g.max_message_size, P.MAX_MESSAGE_SIZE_LIMIT)
        self.shutdown_timeout = g.shutdown_timeout / 1000
        # Protocol-level prepared statements are renamed and re-prepared per server
        # in transaction/statement mode (worker/prepared.py); "full" also covers SQL
        # PREPARE/EXECUTE, which is not done yet and behaves like "extended".
        self.rewrite_prepared = g.prepared_statements != "disabled"
        self.rewrite_sql_prepared = g.prepared_statements == "full"
        # Timeouts in seconds; None when disabled (PgDog's "disabled" is a huge value).
        self.query_timeout = _seconds(g.query_timeout)
        self.client_idle_timeout = _seconds(g.client_idle_timeout)
        self.client_idle_in_transaction_timeout = _seconds(g.client_idle_in_transaction_timeout)
        # Timers the fast path does not keep (worker/fastpath.py): any set keeps clients off it.
        self.timed_clients = bool(self.query_timeout or self.client_idle_timeout
                                  or self.client_idle_in_transaction_timeout)
        self.connection_recovery = g.connection_recovery
        # TLS contexts are rebuilt on every reload, so RELOAD picks up new certificates.
        self.client_tls = (tls.server_context(g.tls_certificate, g.tls_private_key, g.tls_client_ca_certificate)
                           if g.tls_certificate and g.tls_private_key else None)
        self.tls_client_required = g.tls_client_required
        self.server_tls = tls.client_context(g.tls_verify, g.tls_server_ca_certificate,
                                             g.tls_server_certificate, g.tls_server_private_key)
        self.server_tls_required = g.tls_verify in tls.REQUIRE_TLS
        self.client_connection_recovery = g.client_connection_recovery
        limit = g.prepared_statements_limit
        self.prepared_limit = 0 if limit >= 2**62 else int(limit)
        self.health.ban_timeout = g.ban_timeout / 1000
        # Read/write classification for databases with replicas (router/rw.py).
        self.rw = ReadWriteClassifier(g.read_write_strategy)
        self.rw_aggressive = g.read_write_strategy == "aggressive"
        # Sharded databases: one Router (plan + route cache) per database, made on first use.
        self.routers: dict[str, Router] = {}
        if self.unique_ids is None or self.unique_ids.offset != (g.unique_id_min or 0):
            self.unique_ids = generator_for(config, self.node)
        old, self.pools, self.clusters = self.pools, {}, {}
        for user in config.users:
            if user.database:
                self.lookup(user.name, user.database)
        # Logins seen before (users.databases / all_databases) keep their clusters too.
        for user_name, database in {key[:2] for key in old}:
            if (user_name, database) not in self.clusters:
                self.lookup(user_name, database)
        # Pools whose settings did not change keep their server connections.
        for key, pool in old.items():
            new = self.pools.get(key)
            if new is not None and new.settings == pool.settings and new.configured_role == pool.configured_role:
                pool.weight = new.weight
                self._replace(key, new, pool)
            else:
                pool.close_all()  # drains: busy servers close when their client lets go
                if pool.active:
                    self.draining.append(pool)

    def reload(self, config_data: dict, workers: int) -> None:
        from pgherd.config import Config

        try:
            config = Config.model_validate(config_data)
        except Exception as exc:  # the supervisor validated it; never crash on it
            log.error("worker %d: cannot apply reloaded config: %s", self.index, exc)
            return
        self.workers = workers
        self.apply_config(config)
        log.info("worker %d: configuration reloaded", self.index)

    def _replace(self, key, new: Pool, old: Pool) -> None:
        """Put the surviving pool `old` where the freshly built `new` stands."""
        self.pools[key] = old
        cluster = self.clusters.get(key[:2])
        if cluster is None:
            return
        for shard in cluster.shards:
            shard.pools = [old if p is new else p for p in shard.pools]
        if cluster.main is new:
            cluster.main = old

    def _make_cluster(self, config, user, database: str) -> Cluster | None:
        shards = config.shards(database)
        if not shards or any(not hosts for hosts in shards):
            return None
        g = config.general
        pools = []
        for hosts in shards:
            pools.append([])
            for db in hosts:
                key = (user.name, database, pool_key(db))
                pool = self.pools.get(key)
                if pool is None:
                    pool = self.pools[key] = self._make_pool(config, user, db)
                pools[-1].append(pool)
        return Cluster(user.name, database, pools, self.health, g.load_balancing_strategy, g.read_write_split)

    def _make_pool(self, config, user, db) -> Pool:
        g = config.general
        database = db.name
        server_user, server_password = config.server_login(user, db)
        settings = PoolSettings(
            host=db.host, port=db.port, database_name=db.database_name or db.name,
            server_user=server_user, server_password=server_password,
            pool_size=worker_share(config.pool_size(user, db), self.index, self.workers),
            min_pool_size=worker_min_share(config.min_pool_size(user, db), self.index, self.workers),
            pooler_mode=config.pooler_mode(user, db),
            checkout_timeout=g.checkout_timeout / 1000, connect_timeout=g.connect_timeout / 1000,
            connect_attempts=g.connect_attempts, connect_attempt_delay=g.connect_attempt_delay / 1000,
            idle_timeout=config.idle_timeout(user, db) / 1000,
            server_lifetime=config.server_lifetime(user, db) / 1000,
            rollback_timeout=g.rollback_timeout / 1000,
            healthcheck_interval=g.healthcheck_interval / 1000,
            healthcheck_timeout=g.healthcheck_timeout / 1000,
            tls=self.server_tls, tls_required=self.server_tls_required,
            tls_config=(g.tls_verify, g.tls_server_ca_certificate, g.tls_server_certificate,
                        g.tls_server_private_key))
        pool = Pool(user.name, database, settings, db.shard, db.role)
        pool.configured_size = config.pool_size(user, db)
        pool.key = pool_key(db)
        pool.weight = db.lb_weight
        return pool

    def lookup(self, user: str, database: str):
        """(users.toml entry, cluster) for a login; (None, None) when unknown."""
        user_cfg = self.config.find_user(user, database)
        if user_cfg is None:
            return None, None
        cluster = self.clusters.get((user, database))
        if cluster is None:
            # users.databases / all_databases: pools for other databases are made on first use.
            cluster = self._make_cluster(self.config, user_cfg, database)
            if cluster is not None:
                self.clusters[(user, database)] = cluster
        return user_cfg, cluster

    def router_for(self, database: str) -> Router:
        router = self.routers.get(database)
        if router is None:
            rw = self.config.rewrite
            router = self.routers[database] = Router(
                ShardingPlan.from_config(self.config, database), mergeable=MERGEABLE, split_copy=True,
                split_inserts=rw.enabled and rw.split_inserts == "rewrite")
        return router

    # ------------------------------------------------------------ pause / maintenance
    def set_state(self, paused: list[str], maintenance: list[str]) -> None:
        self.paused, self.maintenance = set(paused), set(maintenance)
        self._gate_changed.set()
        self._gate_changed = trio.Event()

    def gated(self, database: str) -> bool:
        for s in (self.paused, self.maintenance):
            if ALL in s or database in s:
                return True
        return False

    async def wait_gate(self, database: str) -> None:
        """Hold a new transaction while its database is paused or in maintenance."""
        while self.gated(database):
            await self._gate_changed.wait()

    def reconnect(self) -> None:
        """RECONNECT: replace every server connection after its current use."""
        for pool in self.pools.values():
            pool.reconnect()

    # ------------------------------------------------------------ clients, cancel
    def register(self, client) -> tuple[int, int]:
        while True:
            self._counter = (self._counter + 1) & PID_COUNTER_MASK
            pid = make_pid(self.index, self._counter)
            if pid not in self.clients and self._counter:
                break
        self.clients[pid] = client
        return pid, secrets.randbits(31)

    async def cancel(self, pid: int, secret: int) -> None:
        owner = pid_owner(pid)
        if owner != self.index:
            if self.link is not None and 0 <= owner:
                from pgherd.shared.bus.messages import CancelForward
                self.link.send(CancelForward(pid=pid, secret=secret))
            return
        client = self.clients.get(pid)
        # A wrong secret is ignored silently, as Postgres does.
        if client is None or not hmac.compare_digest(secret.to_bytes(4, "big", signed=True),
                                                     client.secret.to_bytes(4, "big", signed=True)):
            return
        await client.cancel_server_query()

    # ------------------------------------------------------------ maintenance
    async def maintenance_loop(self) -> None:
        while True:
            for pool in list(self.pools.values()):
                try:
                    await pool.maintain()
                except Exception:  # never let maintenance kill the worker
                    log.exception("pool %s: maintenance failed", pool.name)
            self.draining = [p for p in self.draining if p.active]
            await trio.sleep(MAINTENANCE_INTERVAL)

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close_all()


def _seconds(ms: int) -> float | None:
    """A millisecond timeout in seconds, or None for 0 / PgDog's "disabled" value."""
    return None if not ms or ms >= 2**62 else ms / 1000

