"""Server connection pools: one per (user, database, host), with a fair FIFO wait queue."""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

import trio

from pgherd.shared import net
from pgherd.shared.pgconn import ConnectError, PgConn, ServerError, quote_ident, quote_literal
from pgherd.shared.wire import errors as E
from pgherd.shared.wire import protocol as P

from .server import ServerConn

# An idle server is checked for a pending FATAL or EOF (one MSG_PEEK recv) before reuse only if
# it sat idle longer than this: under load a server is reused within a millisecond, and the extra
# syscall per transaction cost about a tenth of the relay's CPU; a server that died in the last
# few milliseconds is caught as a lost server instead (client_connection_recovery).
LIVENESS_CHECK_AFTER = 0.005

log = logging.getLogger("pgherd.pool")



@dataclass
class PoolSettings:
    """Effective settings of one pool (already resolved users > databases > general)."""
    host: str
    port: int
    database_name: str  # the database on the server
    server_user: str
    server_password: str | None
    pool_size: int
    min_pool_size: int
    pooler_mode: str
    checkout_timeout: float  # seconds
    connect_timeout: float  # seconds
    connect_attempts: int
    connect_attempt_delay: float  # seconds
    idle_timeout: float  # seconds; 0 = never
    server_lifetime: float  # seconds; 0 = never
    rollback_timeout: float  # seconds
    healthcheck_interval: float = 30.0  # seconds idle after which a server is checked before use
    healthcheck_timeout: float = 5.0  # seconds
    # ssl.SSLContext for server connections (None: plaintext). Compared by the settings
    # it was made from (tls_config), so a reload that keeps them keeps the pool.
    tls: object = field(default=None, compare=False)
    tls_required: bool = False  # tls_verify verify_ca / verify_full: refuse plaintext
    tls_config: tuple = ()


class _Waiter:
    """A client's place in a pool's FIFO (worker/fastpath.py has the reactor's kind)."""
    __slots__ = ("event", "server", "may_connect", "started")

    def __init__(self, started: float) -> None:
        self.event = trio.Event()
        self.server: ServerConn | None = None
        self.may_connect = False
        self.started = started


class Pool:
    """Server connections for one (user, database, host) with a bounded size."""

    def __init__(self, user: str, database: str, settings: PoolSettings, shard: int = 0,
                 role: str = "primary") -> None:
        self.user = user
        self.database = database
        self.settings = settings
        self.shard = shard
        self.configured_role = role  # "primary" | "replica" | "auto" (config)
        self.role = "replica" if role == "auto" else role  # the role now (worker/cluster.py keeps it current)
        self.key = f"{database}/{shard}/{settings.host}:{settings.port}"  # shared/hosts.host_key
        self.weight = 255  # lb_weight
        self.idle: deque[ServerConn] = deque()
        self.waiters: deque[_Waiter] = deque()
        self.total = 0  # open + opening connections
        self.active = 0  # checked out
        self.opening = 0
        # ParameterStatus set of the first server login, shown to clients at login.
        self.server_params: dict[str, str] | None = None
        # (GUC name, client's value) -> the value Postgres reports for it, e.g.
        # ("datestyle", "SQL,DMY") -> "SQL, DMY"; learnt once per distinct value.
        self.canonical: dict[tuple[str, str], str] = {}
        # (setting, value) pairs a server accepted: a later lone SET of them can be
        # answered without a server.
        self.validated_settings: set[tuple[str, str]] = set()
        self.closed = False
        self.errors = 0
        self.configured_size = settings.pool_size  # instance-wide size before the worker split
        # Bumped by RECONNECT: servers from an older generation are closed at checkin.
        self.generation = 0
        # Counters for SHOW STATS / metrics (times in microseconds).
        self.xact_count = 0
        self.query_count = 0
        self.received = 0
        self.sent = 0
        # Seconds (trio's clock), summed as floats: no rounding per transaction.
        self.xact_time = 0.0
        self.query_time = 0.0
        self.wait_time = 0.0

    @property
    def name(self) -> str:
        s = self.settings
        return f"{self.user}@{self.database} ({s.host}:{s.port})"

    # ------------------------------------------------------------ checkout
    def try_checkout(self, now: float | None = None) -> ServerConn | None:
        """An idle server ready for use right now, without awaiting (the common case).

        None when the pool has no idle server, or the next one has been idle longer
        than healthcheck_interval and must be checked first (checkout does that).
        now: the caller's clock reading (trio's clock), if it has one.
        """
        if now is None:
            now = trio.current_time()
        while self.idle:
            srv = self.idle[-1]  # LIFO: the most recently used connection is warmest
            if now - srv.last_used > self.settings.healthcheck_interval:
                return None
            self.idle.pop()
            if self._expired(srv, now) or (now - srv.last_used > LIVENESS_CHECK_AFTER and not srv.looks_alive()):
                # Dead while idle (e.g. Postgres restarted and sent FATAL): a fresh
                # connection replaces it and the client never sees the dead one.
                self._discard(srv)
                continue
            self.active += 1
            return srv
        return None

    async def checkout(self) -> ServerConn:
        """A server for a client: idle one, new one, or wait (FIFO) up to checkout_timeout."""
        while self.idle:
            srv = self.try_checkout()
            if srv is not None:
                return srv
            if not self.idle:
                break
            srv = self.idle.pop()  # idle past healthcheck_interval: check it with ';'
            self.active += 1
            if await self._healthy(srv):
                return srv
            self.active -= 1
            self._discard(srv)
        if self.total < self.settings.pool_size and not self.waiters:
            self.total += 1
            return await self.open_for_checkout()
        return await self._wait()

    async def _wait(self) -> ServerConn:
        started = trio.current_time()
        waiter = _Waiter(started)
        self.waiters.append(waiter)
        try:
            with trio.move_on_after(self.settings.checkout_timeout):
                await waiter.event.wait()
        except BaseException:
            # Cancelled (client cancel request, shutdown): leave the queue cleanly and
            # give back whatever was handed to us meanwhile.
            if not waiter.event.is_set():
                self.waiters.remove(waiter)
            elif waiter.server is not None:
                self.checkin(waiter.server)
            elif waiter.may_connect:
                self.total -= 1
                self._wake_one()
            raise
        finally:
            self.wait_time += trio.current_time() - started
        if not waiter.event.is_set():
            self.waiters.remove(waiter)
            raise self.timeout_error()
        if waiter.server is not None:
            return waiter.server
        # Woken with a free slot (a connection closed): open one ourselves.
        return await self.open_for_checkout()

    def timeout_error(self) -> E.PgError:
        return E.PgError(E.TOO_MANY_CONNECTIONS,
                         f"no server connection available in checkout_timeout "
                         f"({self.settings.checkout_timeout * 1000:.0f} ms) for {self.name}",
                         hint="raise pool_size or checkout_timeout, or shorten transactions")

    async def open_for_checkout(self) -> ServerConn:
        """Open a connection in a slot already counted in self.total."""
        try:
            srv = await self._open()
        except BaseException:
            self.total -= 1
            self._wake_one()
            raise
        self.active += 1
        return srv

    async def _open(self) -> ServerConn:
        s = self.settings
        last: Exception | None = None
        self.opening += 1
        try:
            for attempt in range(max(1, s.connect_attempts)):
                if attempt:
                    await trio.sleep(s.connect_attempt_delay)
                try:
                    conn = await PgConn.connect(
                        s.host, s.port, user=s.server_user, database=s.database_name,
                        password=s.server_password, timeout=s.connect_timeout,
                        tls=s.tls, tls_required=s.tls_required)
                except ServerError as exc:
                    self.errors += 1
                    # Postgres refused us (auth, unknown database, too many clients):
                    # the client sees Postgres' own error.
                    raise E.PgError(exc.code, exc.fields.get("M", str(exc)),
                                    detail=f"server {s.host}:{s.port}") from exc
                except ConnectError as exc:
                    self.errors += 1
                    last = exc
                    log.warning("pool %s: %s (attempt %d/%d)", self.name, exc, attempt + 1,
                                s.connect_attempts)
                    continue
                if self.server_params is None:
                    self.server_params = dict(conn.params)
                srv = ServerConn(conn, self)
                srv.generation = self.generation
                return srv
        finally:
            self.opening -= 1
        raise E.PgError(E.CONNECTION_FAILURE, f"could not connect to server {s.host}:{s.port}: {last}",
                        hint="check that Postgres is running and reachable from pgherd")

    # ------------------------------------------------------------ checkin
    def checkin(self, srv: ServerConn, now: float | None = None) -> None:
        """Return a server from a client. Dirty or expired servers are closed.

        A server handed straight to a waiting client stays counted in `active`: no
        moment shows it unused (PAUSE returns once no server is active).
        """
        srv.client = None
        srv.last_used = now = trio.current_time() if now is None else now
        if not srv.idle or self.closed or self._expired(srv, now) or srv.generation != self.generation:
            self.active -= 1
            self._discard(srv)
            return
        srv.expect.clear()  # only stray COPY_END markers can be left here
        if self.waiters:
            waiter = self.waiters.popleft()
            waiter.server = srv
            waiter.event.set()
            return
        self.active -= 1
        self.idle.append(srv)

    async def _healthy(self, srv: ServerConn) -> bool:
        """healthcheck_interval: run `;` on a server idle that long before handing it out."""
        with trio.move_on_after(self.settings.healthcheck_timeout):
            try:
                await srv.conn.simple_query(";")
                return srv.conn.tx_status == P.TX_IDLE
            except (ServerError, OSError, net.PeerClosed, E.PgError):
                return False
        log.warning("pool %s: health check timed out; replacing the connection", self.name)
        return False

    def _discard(self, srv: ServerConn) -> None:
        srv.close()
        self.total -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        if self.waiters and self.total < self.settings.pool_size:
            waiter = self.waiters.popleft()
            waiter.may_connect = True
            self.total += 1
            waiter.event.set()

    def _expired(self, srv: ServerConn, now: float | None = None) -> bool:
        return 0 < self.settings.server_lifetime < (trio.current_time() if now is None else now) - srv.created

    # ------------------------------------------------------------ client params
    async def login_params(self, settings: dict[str, str]) -> dict[str, str]:
        """ParameterStatus values for a client logging in with these settings.

        The server's login values, with the client's own settings as Postgres would
        report them.  A setting value not seen before is applied once on a server
        to learn its canonical form (and to reject invalid values at login, as
        Postgres does).
        """
        if self.server_params is None or any(
                (k, v) not in self.canonical for k, v in settings.items() if k in self._reported()):
            srv = await self.checkout()
            try:
                await sync_params(srv, settings)
            except ServerError:
                self.checkin(srv)  # the SETs ran in one implicit transaction, rolled back
                raise
            except BaseException:
                srv.close()
                self.checkin(srv)
                raise
            reported = {k.lower(): k for k in srv.conn.params}
            for k, v in settings.items():
                if k in reported:
                    self.canonical[(k, v)] = srv.conn.params[reported[k]]
            self.checkin(srv)
        shown = dict(self.server_params or {})
        names = self._reported()
        for k, v in settings.items():
            if k in names:
                shown[names[k]] = self.canonical.get((k, v), v)
        return shown

    def _reported(self) -> dict[str, str]:
        """Lower-case name -> Postgres' spelling of each GUC reported via ParameterStatus."""
        return {k.lower(): k for k in (self.server_params or {})}

    # ------------------------------------------------------------ maintenance
    async def maintain(self) -> None:
        """Close idle/expired servers and keep min_pool_size open (called periodically)."""
        now = trio.current_time()
        s = self.settings
        keep: deque[ServerConn] = deque()
        for srv in self.idle:
            too_idle = s.idle_timeout and now - srv.last_used > s.idle_timeout
            if self._expired(srv) or (too_idle and self.total > s.min_pool_size):
                srv.close()
                self.total -= 1
            else:
                keep.append(srv)
        self.idle = keep
        self._wake_one()
        while not self.closed and self.total < min(s.min_pool_size, s.pool_size) and not self.waiters:
            self.total += 1
            try:
                srv = await self._open()
            except E.PgError as exc:
                self.total -= 1
                log.warning("pool %s: cannot open min_pool_size connection: %s", self.name, exc.message)
                return
            self.idle.append(srv)
            self._wake_idle_waiter()

    def _wake_idle_waiter(self) -> None:
        if self.waiters and self.idle:
            srv = self.idle.pop()
            waiter = self.waiters.popleft()
            waiter.server = srv
            self.active += 1  # (see checkin)
            waiter.event.set()

    def reconnect(self) -> None:
        """Replace every connection after its current use (admin RECONNECT)."""
        self.generation += 1
        while self.idle:
            self.idle.pop().close()
            self.total -= 1
        self._wake_one()

    def maxwait(self) -> float:
        """Seconds the oldest waiting client has waited (PgBouncer's maxwait)."""
        if not self.waiters:
            return 0.0
        return trio.current_time() - self.waiters[0].started

    def close_all(self) -> None:
        self.closed = True
        while self.idle:
            self.idle.pop().close()
            self.total -= 1



async def sync_params(srv: ServerConn, wanted: dict[str, str]) -> None:
    """Make the server's session parameters equal the client's, sending only the difference.

    wanted maps lower-case GUC names to the client's values.  Values go through
    set_config(), which parses them as a startup packet or postgresql.conf value
    would (so `search_path=a,b` is a list, not one quoted name).  Parameters an
    earlier client set and this one did not are RESET to the server's login default.
    """
    current = srv.set_params
    if current == wanted:
        return  # the common case: nothing to send
    changed = [(n, v) for n, v in wanted.items() if current.get(n) != v]
    resets = [n for n in current if n not in wanted]
    if not changed and not resets:
        return
    stmts = [f"RESET {quote_ident(n)}" for n in resets]
    if changed:
        stmts.append("SELECT " + ", ".join(f"pg_catalog.set_config({quote_literal(n)}, {quote_literal(v)}, false)"
                                           for n, v in changed))
    await srv.conn.simple_query(";".join(stmts))
    srv.set_params = dict(wanted)
    srv.tx = srv.conn.tx_status
