"""The health and LSN monitor: one check per host for the whole instance; bans and roles.

The supervisor runs one Monitor. It watches every host of a shard that has more than one host
(or any host with role = "auto"): a health check (`;`) every idle_healthcheck_interval, and
every lsn_check_interval pg_is_in_recovery() plus the LSN functions (only pg_is_in_recovery()
for role = "auto" hosts when lsn_check_delay is disabled). It owns each host's ban and detected
role and broadcasts them to every worker (HostStates) whenever they change, and every
BROADCAST_INTERVAL so a lost message costs little. Workers report failed connections
(HostFailed); the ban they cause reaches every worker at once.

A ban ends when ban_timeout has passed AND the host passes a check again; a lag ban
(ban_replica_lag, ban_replica_lag_bytes) ends as soon as the replica has caught up.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import trio

from pgherd.config.fields import DISABLED_MS, UNLIMITED
from pgherd.shared import tls as T
from pgherd.shared.bus import messages as B
from pgherd.shared.hosts import key_of
from pgherd.shared.pgconn import PgConn

log = logging.getLogger("pgherd.monitor")

PRIMARY, REPLICA, AUTO = "primary", "replica", "auto"
# Why a host is banned; a lag ban ends when the replica catches up, the others need
# ban_timeout to pass and a passed check.
HEALTH, WORKER, MANUAL, LAG = "health", "worker", "manual", "lag"

# Every host's state is broadcast this often even without a change: a worker that missed a
# message (or started between two) is right again within two seconds.
BROADCAST_INTERVAL = 2.0
# Workers hold a ban at least this long past the last broadcast that named it: several
# broadcasts must be lost before a worker lifts a ban the supervisor still holds.
BAN_HOLD = 5 * BROADCAST_INTERVAL
# An interval of 0 in the config means "as often as sensible", not a busy loop.
MIN_INTERVAL = 0.05
# A check needs at least this long, even with a timeout of 0 in the config.
MIN_TIMEOUT = 0.1
# After an unexpected error in a monitor loop, wait this long before going on.
ERROR_PAUSE = 1.0

# How the monitor's connections show in pg_stat_activity, so DBAs can tell them from clients.
APPLICATION_NAME = "pgherd monitor"
HEALTH_SQL = ";"
ROLE_SQL = "SELECT pg_is_in_recovery()"
# pg_current_wal_lsn() raises an error during recovery: ask for it only on a primary.
# The replay timestamp gives the time lag ("Monitoring" functions, PostgreSQL docs 9.27.4).
LSN_SQL = (
    "SELECT pg_is_in_recovery(),"
    " CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn() END,"
    " pg_last_wal_replay_lsn(), pg_last_wal_receive_lsn(),"
    " (extract(epoch FROM now() - pg_last_xact_replay_timestamp()) * 1000)::float8"
)


def parse_lsn(text: str | None) -> int | None:
    """pg_lsn text 'X/Y' (two hex numbers) as a byte position: (X << 32) + Y."""
    if not text:
        return None
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) + int(low, 16)


def format_lsn(lsn: int | None) -> str | None:
    """A byte position as pg_lsn text, e.g. 0/3000060."""
    if lsn is None:
        return None
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


@dataclass(eq=False)
class Host:
    """What the monitor knows about one [[databases]] entry."""
    key: str
    db: object  # config.Database
    login: tuple[str, str | None]
    configured_role: str
    role: str
    healthy: bool = True
    checked: bool = False  # at least one check has finished
    error: str | None = None
    in_recovery: bool | None = None
    lsn: int | None = None  # pg_current_wal_lsn() on a primary, replay (else receive) LSN on a replica
    receive_lsn: int | None = None
    replay_age_ms: float | None = None  # now() - pg_last_xact_replay_timestamp()
    lag_bytes: int | None = None
    lag_ms: float | None = None
    banned: bool = False
    ban_kind: str | None = None
    ban_reason: str | None = None
    ban_deadline: float | None = None  # trio clock; None for lag bans
    last_check: float = -math.inf  # trio clock at the start of the last health check
    next_health: float | None = None  # trio clock
    conn: PgConn | None = None
    lock: trio.Lock = field(default_factory=trio.Lock)
    wake: trio.Event = field(default_factory=trio.Event)

    @property
    def shard_key(self) -> tuple[str, int]:
        return self.db.name, self.db.shard

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def monitored_shards(config) -> dict[tuple[str, int], list]:
    """(database, shard) -> its [[databases]] entries, for shards that need a monitor:
    more than one host, or any host with role = "auto"."""
    out = {}
    for name in config.database_names():
        for shard, hosts in enumerate(config.shards(name)):
            if len(hosts) > 1 or any(db.role == AUTO for db in hosts):
                out[(name, shard)] = hosts
    return out


def login_for(config, db) -> tuple[str, str | None] | None:
    """(user, password) the monitor logs in with: the first [[users]] entry serving the database."""
    user = next((u for u in config.users if u.serves(db.name)), None)
    if user is None:
        return (db.user, db.password) if db.user else None
    return config.server_login(user, db)


class Monitor:
    """Health checks, LSN checks, bans and role detection for every monitored host."""

    def __init__(self, config, publish: Callable[[B.HostStates], None]) -> None:
        self.publish = publish
        self.hosts: dict[str, Host] = {}
        self.shards: dict[tuple[str, int], list[Host]] = {}
        self._started: float | None = None
        self._reconfigured = trio.Event()
        self._last_signature: tuple | None = None
        self.configure(config)

    # ------------------------------------------------------------ configuration
    def configure(self, config) -> None:
        """Take the settings and hosts of `config`; hosts that stay keep their state and bans."""
        g = config.general
        self.health_interval = max(MIN_INTERVAL, g.idle_healthcheck_interval / 1000)
        self.health_delay = g.idle_healthcheck_delay / 1000
        self.health_timeout = max(MIN_TIMEOUT, g.healthcheck_timeout / 1000)
        self.ban_timeout = g.ban_timeout / 1000
        self.lag_limit_ms = None if g.ban_replica_lag >= DISABLED_MS else g.ban_replica_lag
        self.lag_limit_bytes = None if g.ban_replica_lag_bytes >= UNLIMITED else g.ban_replica_lag_bytes
        self.lsn_interval = max(MIN_INTERVAL, g.lsn_check_interval / 1000)
        self.lsn_timeout = max(MIN_TIMEOUT, g.lsn_check_timeout / 1000)
        self.lsn_delay = None if g.lsn_check_delay >= DISABLED_MS else g.lsn_check_delay / 1000
        self.connect_timeout = g.connect_timeout / 1000
        try:
            self.tls = T.client_context(g.tls_verify, g.tls_server_ca_certificate, g.tls_server_certificate,
                                        g.tls_server_private_key)
        except T.TlsError as exc:
            log.error("monitor: %s; checking hosts without TLS", exc)
            self.tls = None
        self.tls_required = g.tls_verify in T.REQUIRE_TLS and self.tls is not None

        old = self.hosts
        hosts: dict[str, Host] = {}
        shards: dict[tuple[str, int], list[Host]] = {}
        for skey, entries in monitored_shards(config).items():
            for db in entries:
                key = key_of(db)
                if key in hosts:
                    continue  # the same server twice in one shard: checked once
                login = login_for(config, db)
                if login is None:
                    log.warning("monitor: no [[users]] entry serves database %s: %s is not checked", db.name, key)
                    continue
                host = old.get(key)
                if host is None:
                    role = db.role if db.role != AUTO else REPLICA
                    host = Host(key=key, db=db, login=login, configured_role=db.role, role=role)
                else:
                    if (login, db.server_database) != (host.login, host.db.server_database):
                        host.close()  # log in anew with the new credentials
                    host.db, host.login, host.configured_role = db, login, db.role
                    if db.role != AUTO:
                        host.role = db.role
                hosts[key] = host
                shards.setdefault(skey, []).append(host)
        for key, host in old.items():
            if key not in hosts:
                host.close()
        if self.lsn_delay is None:
            for host in hosts.values():
                host.lsn = host.receive_lsn = host.replay_age_ms = host.lag_bytes = host.lag_ms = None
                if host.banned and host.ban_kind == LAG:
                    self._unban(host, "replica lag checks are off")
        self.hosts, self.shards = hosts, shards
        for shard in shards.values():
            self._elect(shard)

    def reload(self, config) -> None:
        """Apply a new configuration: restart the check loops, keep bans and roles."""
        self.configure(config)
        self._reconfigured.set()
        self._publish(force=True)

    # ------------------------------------------------------------ running
    async def run(self) -> None:
        """Check hosts until cancelled; never raises because of one host."""
        self._started = trio.current_time()
        try:
            while True:
                try:
                    async with trio.open_nursery() as n:
                        for host in self.hosts.values():
                            n.start_soon(self._host_loop, host)
                        for skey, hosts in self.shards.items():
                            n.start_soon(self._shard_loop, skey, hosts)
                        n.start_soon(self._broadcast_loop)
                        await self._reconfigured.wait()
                        n.cancel_scope.cancel()
                except Exception:
                    log.exception("monitor: unexpected error; restarting the checks")
                    await trio.sleep(ERROR_PAUSE)
                self._reconfigured = trio.Event()
        finally:
            self.close()

    def close(self) -> None:
        for host in self.hosts.values():
            host.close()

    async def _broadcast_loop(self) -> None:
        while True:
            self._publish(force=True)
            await trio.sleep(BROADCAST_INTERVAL)

    async def _host_loop(self, host: Host) -> None:
        """Health checks of one host: every idle_healthcheck_interval, and when its ban expires."""
        if host.next_health is None:
            host.next_health = trio.current_time() + self.health_delay
        while True:
            due = host.next_health
            if host.banned and host.ban_deadline is not None and host.ban_deadline > host.last_check:
                due = min(due, host.ban_deadline)  # the ban may end: check whether the host is back
            host.wake = trio.Event()
            with trio.move_on_at(due):
                await host.wake.wait()
            if trio.current_time() < due:
                continue  # woken early (a new ban): work out when to check again
            try:
                await self._health_check(host)
            except Exception:
                log.exception("monitor: health check of %s failed unexpectedly", host.key)
            host.next_health = trio.current_time() + self.health_interval

    async def _shard_loop(self, skey: tuple[str, int], hosts: list[Host]) -> None:
        """Every lsn_check_interval: LSN checks (after lsn_check_delay), or role checks of auto hosts."""
        auto = any(h.configured_role == AUTO for h in hosts)
        lsn_from = None if self.lsn_delay is None else self._started + self.lsn_delay
        while True:
            now = trio.current_time()
            lsn_on = lsn_from is not None and now >= lsn_from
            if lsn_on or auto:
                try:
                    await self._lsn_round(skey, hosts, full=lsn_on)
                except Exception:
                    log.exception("monitor: LSN check of %s shard %d failed unexpectedly", *skey)
                    await trio.sleep(ERROR_PAUSE)
            now = trio.current_time()
            if lsn_on or auto:
                wake = now + self.lsn_interval
                if not lsn_on and lsn_from is not None:
                    wake = min(wake, lsn_from)
            elif lsn_from is not None:
                wake = lsn_from
            else:
                return  # nothing to do here until a reload
            await trio.sleep_until(wake)

    # ------------------------------------------------------------ checks
    async def _query(self, host: Host, sql: str, timeout: float) -> tuple[list | None, str | None]:
        """(first row, None) or (None, why it failed). One connection per host, made again when
        it broke; a broken kept connection gets one fresh try within the same timeout."""
        async with host.lock:
            try:
                with trio.fail_after(timeout):
                    while True:
                        fresh = host.conn is None
                        try:
                            if fresh:
                                user, password = host.login
                                db = host.db
                                host.conn = await PgConn.connect(
                                    db.host, db.port, user=user, database=db.server_database, password=password,
                                    params={"application_name": APPLICATION_NAME},
                                    timeout=max(MIN_TIMEOUT, min(timeout, self.connect_timeout or timeout)),
                                    tls=self.tls, tls_required=self.tls_required)
                            results = await host.conn.simple_query(sql)
                        except Exception:
                            host.close()
                            if fresh:
                                raise
                            continue
                        rows = next((r.rows for r in results if r.rows), [])
                        return (rows[0] if rows else []), None
            except trio.TooSlowError:
                host.close()
                return None, f"no answer within {timeout:g} s"
            except Exception as exc:
                host.close()
                return None, str(exc) or type(exc).__name__
            except BaseException:
                host.close()  # cancelled mid-query: the connection is out of step
                raise

    async def _health_check(self, host: Host) -> tuple[str | None, float]:
        """Run one health check and apply it; (error or None, milliseconds it took)."""
        start = trio.current_time()
        host.last_check = start
        _, error = await self._query(host, HEALTH_SQL, self.health_timeout)
        took = (trio.current_time() - start) * 1000
        if error is None:
            self._passed(host)
        else:
            self._failed(host, f"health check failed: {error}")
        self._evaluate(host.shard_key)
        return error, took

    async def _lsn_round(self, skey: tuple[str, int], hosts: list[Host], full: bool) -> None:
        """Query every host of the shard at once; each answer is applied as it arrives."""
        async with trio.open_nursery() as n:
            for host in hosts:
                if full or host.configured_role == AUTO:
                    n.start_soon(self._lsn_check, host, full)

    async def _lsn_check(self, host: Host, full: bool) -> None:
        row, error = await self._query(host, LSN_SQL if full else ROLE_SQL, self.lsn_timeout)
        if error is None and not row:
            error = "no row"
        if error is not None:
            self._failed(host, f"{'LSN' if full else 'role'} check failed: {error}")
        else:
            host.in_recovery = row[0] == "t"
            if full:
                primary_lsn, replay, receive = (parse_lsn(v) for v in row[1:4])
                host.lsn = primary_lsn if not host.in_recovery else (replay if replay is not None else receive)
                host.receive_lsn = receive
                host.replay_age_ms = float(row[4]) if row[4] is not None else None
            self._passed(host)
        self._evaluate(host.shard_key)

    # ------------------------------------------------------------ state changes
    def _passed(self, host: Host) -> None:
        if not host.healthy:
            log.info("monitor: %s is healthy again", host.key)
        host.healthy, host.error, host.checked = True, None, True
        if (host.banned and host.ban_kind != LAG and host.ban_deadline is not None
                and trio.current_time() >= host.ban_deadline):
            self._unban(host, "ban_timeout passed and the host passed a check")

    def _failed(self, host: Host, error: str) -> None:
        if host.healthy or not host.checked:
            log.warning("monitor: %s: %s", host.key, error)
        host.healthy, host.error, host.checked = False, error, True
        if not host.banned or host.ban_kind == LAG:
            self._ban(host, error, HEALTH)

    def _ban(self, host: Host, reason: str, kind: str) -> None:
        host.banned, host.ban_kind, host.ban_reason = True, kind, reason
        host.ban_deadline = None if kind == LAG else trio.current_time() + self.ban_timeout
        if kind == LAG:
            log.warning("monitor: banning %s until it catches up: %s", host.key, reason)
        else:
            log.warning("monitor: banning %s for %g s: %s", host.key, self.ban_timeout, reason)
        host.wake.set()

    def _unban(self, host: Host, why: str) -> None:
        log.info("monitor: %s is no longer banned (%s)", host.key, why)
        host.banned, host.ban_kind, host.ban_reason, host.ban_deadline = False, None, None, None
        host.wake.set()

    def _evaluate(self, skey: tuple[str, int]) -> None:
        """After any new fact about a shard's host: roles, lags, lag bans, then broadcast."""
        hosts = self.shards.get(skey)
        if hosts is not None:
            self._elect(hosts)
            self._lags(hosts)
        self._publish()

    def _elect(self, hosts: list[Host]) -> None:
        """role = "auto": a host in recovery is never primary; among the reachable hosts that are
        not in recovery keep the previous primary, else take the first. An unreachable host keeps
        its last known role unless another host became primary."""
        auto = [h for h in hosts if h.configured_role == AUTO]
        if not auto:
            return
        roles = {h.key: h.role for h in auto}
        for h in auto:
            if h.healthy and h.in_recovery:
                h.role = REPLICA
        candidates = [h for h in auto if h.healthy and h.checked and h.in_recovery is False]
        if candidates:
            chosen = next((h for h in candidates if h.role == PRIMARY), candidates[0])
            for h in auto:
                h.role = PRIMARY if h is chosen else REPLICA
        for h in auto:
            if roles[h.key] != h.role:
                log.warning("monitor: %s is now %s", h.key, h.role)

    def _lags(self, hosts: list[Host]) -> None:
        primary = next((h for h in hosts if h.role == PRIMARY and h.healthy and h.lsn is not None
                        and h.in_recovery is False), None)
        for h in hosts:
            if h.lsn is None or primary is None:
                h.lag_bytes = h.lag_ms = None
            elif h is primary or h.role == PRIMARY:
                h.lag_bytes, h.lag_ms = 0, 0.0
            else:
                h.lag_bytes = max(0, primary.lsn - h.lsn)
                caught_up = h.lsn >= primary.lsn and (h.receive_lsn is None or h.lsn >= h.receive_lsn)
                # An idle primary writes nothing: time since the last replayed transaction would
                # grow without any lag, so a replica that has everything counts 0 ms.
                h.lag_ms = 0.0 if caught_up else h.replay_age_ms
            if h.role == REPLICA:
                self._lag_ban(h)

    def _lag_ban(self, h: Host) -> None:
        over: list[str] = []
        known = False
        if self.lag_limit_ms is not None and h.lag_ms is not None:
            known = True
            if h.lag_ms > self.lag_limit_ms:
                over.append(f"replica lag {h.lag_ms:.0f} ms > ban_replica_lag {self.lag_limit_ms} ms")
        if self.lag_limit_bytes is not None and h.lag_bytes is not None:
            known = True
            if h.lag_bytes > self.lag_limit_bytes:
                over.append(f"replica lag {h.lag_bytes} bytes > ban_replica_lag_bytes {self.lag_limit_bytes}")
        if over and not h.banned:
            self._ban(h, "; ".join(over), LAG)
        elif known and not over and h.banned and h.ban_kind == LAG:
            self._unban(h, "caught up")

    # ------------------------------------------------------------ broadcasting
    def infos(self) -> list[B.HostInfo]:
        """Every monitored host's state as sent to workers (Welcome, HostStates)."""
        now, wall = trio.current_time(), time.time()
        hold = max(BAN_HOLD, self.health_timeout + 2 * BROADCAST_INTERVAL)
        out = []
        for h in self.hosts.values():
            until = None
            if h.banned:
                left = h.ban_deadline - now if h.ban_deadline is not None else 0.0
                until = wall + max(left, hold)
            out.append(B.HostInfo(key=h.key, role=h.role, banned=h.banned, ban_reason=h.ban_reason,
                                  banned_until=until, healthy=h.healthy, in_recovery=h.in_recovery, lsn=h.lsn,
                                  lag_bytes=h.lag_bytes, lag_ms=h.lag_ms))
        return out

    def _publish(self, force: bool = False) -> None:
        signature = tuple((h.key, h.role, h.banned, h.ban_reason, h.ban_deadline, h.healthy, h.in_recovery,
                           h.lsn, h.lag_bytes, h.lag_ms) for h in self.hosts.values())
        if not force and signature == self._last_signature:
            return
        self._last_signature = signature
        try:
            self.publish(B.HostStates(hosts=self.infos()))
        except Exception:
            log.exception("monitor: cannot broadcast host states")

    # ------------------------------------------------------------ admin console
    def snapshot(self) -> list[dict]:
        """One dict per monitored host, for SHOW REPLICATION / SHOW BANS."""
        now = trio.current_time()
        out = []
        for h in self.hosts.values():
            db = h.db
            left = None
            if h.banned:
                left = max(0.0, h.ban_deadline - now) if h.ban_deadline is not None else 0.0
            out.append({"key": h.key, "database": db.name, "shard": db.shard, "host": db.host, "port": db.port,
                        "role": h.role, "configured_role": h.configured_role, "in_recovery": h.in_recovery,
                        "lsn": format_lsn(h.lsn), "lag_bytes": h.lag_bytes,
                        "lag_ms": None if h.lag_ms is None else int(round(h.lag_ms)), "banned": h.banned,
                        "ban_reason": h.ban_reason, "ban_kind": h.ban_kind, "ban_left": left,
                        "healthy": h.healthy, "error": h.error})
        return sorted(out, key=lambda r: (r["database"], r["shard"], r["host"], r["port"]))

    def match(self, arg: str) -> list[Host]:
        """Hosts named by a host key, host:port, or a host name (every entry on it).

        Raises LookupError naming the monitored hosts when nothing matches."""
        arg = arg.strip()
        if arg in self.hosts:
            return [self.hosts[arg]]
        found = [h for h in self.hosts.values() if h.db.address == arg or f"{h.db.host}:{h.db.port}" == arg]
        if not found:
            found = [h for h in self.hosts.values() if h.db.host == arg]
        if not found:
            known = (", ".join(sorted(self.hosts)) if self.hosts
                     else 'none (only shards with several hosts, or a host with role = "auto", are monitored)')
            raise LookupError(f'no monitored host matches "{arg}"; monitored hosts: {known}')
        return found

    def ban(self, arg: str) -> list[str]:
        """BAN: ban the matching hosts for ban_timeout; broadcast at once."""
        hosts = self.match(arg)
        for h in hosts:
            self._ban(h, "banned from the admin console", MANUAL)
        self._publish(force=True)
        return [h.key for h in hosts]

    def unban(self, arg: str) -> list[str]:
        """UNBAN: lift the matching hosts' bans now (a failing check bans again); broadcast at once."""
        hosts = self.match(arg)
        for h in hosts:
            if h.banned:
                self._unban(h, "UNBAN from the admin console")
        self._publish(force=True)
        return [h.key for h in hosts]

    def host_failed(self, key: str, reason: str) -> None:
        """A worker could not connect to the host: ban it in every worker."""
        host = self.hosts.get(key)
        if host is None:
            log.debug("monitor: %s failed in a worker (%s) but is not monitored", key, reason)
            return
        if not host.banned or host.ban_kind == LAG:
            self._ban(host, f"connection from a worker failed: {reason}", WORKER)
            self._publish(force=True)

    async def check_now(self) -> list[dict]:
        """HEALTHCHECK: every check now (health, then LSN/role); one dict per host with the result."""
        results: dict[str, tuple[str | None, float]] = {}

        async def one(host: Host) -> None:
            try:
                results[host.key] = await self._health_check(host)
            except Exception as exc:
                log.exception("monitor: health check of %s failed unexpectedly", host.key)
                results[host.key] = (str(exc), 0.0)
            host.next_health = trio.current_time() + self.health_interval

        hosts = list(self.hosts.values())
        async with trio.open_nursery() as n:
            for host in hosts:
                n.start_soon(one, host)
        now = trio.current_time()
        lsn_on = self.lsn_delay is not None and self._started is not None and now >= self._started + self.lsn_delay
        async with trio.open_nursery() as n:
            for skey, shard in self.shards.items():
                if lsn_on or any(h.configured_role == AUTO for h in shard):
                    n.start_soon(self._lsn_round, skey, shard, lsn_on)
        self._publish(force=True)
        rows = []
        for row in self.snapshot():
            error, took = results.get(row["key"], (None, 0.0))
            rows.append({**row, "check_error": error, "check_ms": round(took, 1)})
        return rows
