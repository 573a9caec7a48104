"""The pools behind one (user, database): shards of hosts, and which host serves a request.

A database is one or more shards; each shard is one or more hosts (a primary and its replicas).
Writes go to the shard's primary; reads are spread over the hosts `read_write_split` allows with
the `load_balancing_strategy`, skipping banned hosts. Bans and detected roles come from the
supervisor's monitor over the bus (Health.update); a worker that cannot reach a host bans it at
once locally and reports it, so every worker bans it (PgDog's semantics, docs/features.md).
"""

from __future__ import annotations

import itertools
import logging
import random
import time

from pgherd.shared.hosts import host_key

log = logging.getLogger("pgherd.cluster")

# A ban this worker made itself survives broadcasts for this long: the supervisor's state may
# still predate the HostFailed report (it re-broadcasts every 2 s).
LOCAL_BAN_GRACE = 3.0

PRIMARY = "primary"
REPLICA = "replica"


class Health:
    """This worker's view of every host's ban state and role (keys: shared/hosts.host_key)."""

    def __init__(self, link=None) -> None:
        self.link = link
        self.roles: dict[str, str] = {}  # detected roles of role = "auto" hosts (and every monitored host)
        self.bans: dict[str, float] = {}  # key -> time.monotonic() deadline
        self.infos: dict[str, dict] = {}  # the monitor's last word per host (SHOW REPLICATION)
        self.ban_timeout = 300.0
        self.failed: dict[str, float] = {}  # key -> time.monotonic() of this worker's own ban

    def update(self, hosts) -> None:
        """Apply the monitor's broadcast (a list of HostInfo): it is the truth for every host it names."""
        now_wall, now = time.time(), time.monotonic()
        bans: dict[str, float] = {}
        for h in hosts:
            self.roles[h.key] = h.role
            self.infos[h.key] = h
            if h.banned:
                until = h.banned_until if h.banned_until is not None else now_wall + self.ban_timeout
                bans[h.key] = now + max(0.0, until - now_wall)
        for key, at in list(self.failed.items()):
            if now - at < LOCAL_BAN_GRACE:
                bans.setdefault(key, self.bans.get(key, now + self.ban_timeout))
            else:
                del self.failed[key]
        self.bans = bans

    def banned(self, key: str) -> bool:
        until = self.bans.get(key)
        if until is None:
            return False
        if time.monotonic() >= until:
            del self.bans[key]
            return False
        return True

    def fail(self, key: str, reason: str) -> None:
        """A connection to this host failed here: ban it now, and in every worker via the supervisor."""
        if not self.banned(key):
            log.warning("banning host %s for %.0f s: %s", key, self.ban_timeout, reason)
        self.bans[key] = time.monotonic() + self.ban_timeout
        self.failed[key] = time.monotonic()
        if self.link is not None:
            from pgherd.shared.bus.messages import HostFailed
            self.link.send(HostFailed(key=key, reason=reason))


class Shard:
    """The host pools of one shard and the load balancer over them."""

    def __init__(self, pools: list, health: Health, strategy: str, split: str) -> None:
        self.pools = pools
        self.health = health
        self.strategy = strategy
        self.split = split
        self._rr = itertools.count()
        # Smooth weighted round robin (nginx's algorithm): current weights per pool.
        self._current = [0] * len(pools)
        self.multi = len(pools) > 1

    def role(self, pool) -> str:
        """The pool's role now: configured, or detected by the monitor for role = "auto"."""
        if pool.configured_role == "auto":
            return self.health.roles.get(pool.key, REPLICA)
        return pool.configured_role

    def primary(self):
        """The pool writes go to: never banned out of writes; None when no host is primary."""
        for pool in self.pools:
            if self.role(pool) == PRIMARY:
                pool.role = PRIMARY
                return pool
        return None

    def candidates(self) -> list:
        """The pools a read may use under read_write_split, without banned hosts."""
        health = self.health
        primaries, replicas = [], []
        for pool in self.pools:
            role = self.role(pool)
            pool.role = role
            (primaries if role == PRIMARY else replicas).append(pool)
        healthy = [p for p in replicas if not health.banned(p.key)]
        if replicas and not healthy:
            healthy = replicas  # every replica is banned: the bans are lifted (PgDog)
        split = self.split
        if split == "exclude_primary":
            return healthy or primaries
        if split == "prefer_primary":
            up = [p for p in primaries if not health.banned(p.key)]
            return up or healthy or primaries
        if split == "include_primary_if_replica_banned":
            if len(healthy) < len(replicas) or not replicas or any(health.banned(p.key) for p in replicas):
                return healthy + primaries
            return healthy
        return healthy + [p for p in primaries if not health.banned(p.key) or not healthy]

    def pick_read(self, exclude=(), forced: bool = False):
        """A pool for a read; forced (the client asked for a replica) ignores read_write_split."""
        candidates = self.replicas() if forced else self.candidates()
        pools = [p for p in candidates if p not in exclude] or candidates
        if len(pools) == 1:
            return pools[0]
        strategy = self.strategy
        if strategy == "round_robin":
            return pools[next(self._rr) % len(pools)]
        if strategy == "least_active_connections":
            return min(pools, key=lambda p: (p.active + len(p.waiters), random.random()))
        if strategy == "weighted_round_robin":
            return self._weighted(pools)
        return random.choice(pools)

    def replicas(self) -> list:
        """Unbanned replicas (all replicas when every one is banned; the primary when there are none)."""
        replicas = [p for p in self.pools if self.role(p) != PRIMARY]
        return [p for p in replicas if not self.health.banned(p.key)] or replicas or self.pools

    def _weighted(self, pools: list):
        total = 0
        best, best_i = None, -1
        for pool in pools:
            i = self.pools.index(pool)
            weight = max(1, pool.weight)
            self._current[i] += weight
            total += weight
            if best is None or self._current[i] > self._current[best_i]:
                best, best_i = pool, i
        self._current[best_i] -= total
        return best


class Cluster:
    """Everything one (user, database) login can be served by."""

    def __init__(self, user: str, database: str, shards: list[list], health: Health, strategy: str = "random",
                 split: str = "include_primary") -> None:
        self.user = user
        self.database = database
        self.shards = [Shard(pools, health, strategy, split) for pools in shards]
        # The pool used for login parameters and as a client's default: shard 0's primary.
        first = self.shards[0]
        self.main = first.primary() or first.pools[0]
        self.replicated = any(s.multi for s in self.shards)
        self.sharded = len(self.shards) > 1

    def pools(self):
        for shard in self.shards:
            yield from shard.pools

    @property
    def closed(self) -> bool:
        return self.main.closed


def pool_key(db) -> str:
    return host_key(db.name, db.shard, db.host, db.port)
