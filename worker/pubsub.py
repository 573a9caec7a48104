"""LISTEN/NOTIFY in transaction mode: one listening server connection per pool.

Clients' LISTEN/UNLISTEN are answered by pgherd and recorded here; a dedicated
server connection per pool LISTENs once per channel and its notifications are
handed to every client listening on that channel. NOTIFY itself goes to
Postgres like any statement, so a NOTIFY inside a transaction is delivered only
after COMMIT and never after ROLLBACK (Postgres' own rule).
"""

from __future__ import annotations

import logging
import re
from collections import deque

import trio

from pgherd.shared.pgconn import PgConn, quote_ident
from pgherd.shared.wire import messages as M
from pgherd.shared.wire import protocol as P

log = logging.getLogger("pgherd.pubsub")

# LISTEN channel / UNLISTEN channel / UNLISTEN * (one statement, simple query).
STATEMENT = re.compile(r'^\s*(listen|unlisten)\s+(\*|"(?:[^"]|"")+"|[A-Za-z_][A-Za-z0-9_$]*)\s*;?\s*$', re.I)
# Wait before reconnecting a listening connection that failed.
RECONNECT_DELAY = 1.0


def parse(sql: str) -> tuple[str, str] | None:
    """("listen"|"unlisten", channel or "*") for a lone LISTEN/UNLISTEN, else None."""
    m = STATEMENT.match(sql)
    if m is None:
        return None
    name = m.group(2)
    if name.startswith('"'):
        name = name[1:-1].replace('""', '"')
    elif name != "*":
        name = name.lower()  # unquoted identifiers fold to lower case
    return m.group(1).lower(), name


class PoolListener:
    """The listening connection of one pool and the clients per channel."""

    def __init__(self, pool, nursery: trio.Nursery, queue_size: int) -> None:
        self.pool = pool
        self.nursery = nursery
        self.queue_size = queue_size
        self.channels: dict[str, set] = {}
        self.conn: PgConn | None = None
        self._commands: deque[trio.Event] = deque()
        self._ready = trio.Event()
        self._started = False

    async def _connect(self) -> None:
        s = self.pool.settings
        self.conn = await PgConn.connect(s.host, s.port, user=s.server_user, database=s.database_name,
                                         password=s.server_password, timeout=s.connect_timeout,
                                         tls=s.tls, tls_required=s.tls_required)

    async def _run(self) -> None:
        """Read the listening connection forever: notifications and command replies."""
        while True:
            try:
                if self.conn is None:
                    await self._connect()
                    # (Re)establish every channel after a reconnect.
                    for ch in self.channels:
                        await self.conn.send(M.query(f"LISTEN {quote_ident(ch)}"))
                        self._commands.append(trio.Event())
                    self._ready.set()
                while True:
                    t, body = await self.conn.read_message()
                    if t == P.B_NOTIFICATION_RESPONSE:
                        pid, channel, payload = M.read_notification(body)
                        self._deliver(channel, M.message(t, body))
                    elif t == P.B_READY_FOR_QUERY and self._commands:
                        self._commands.popleft().set()
                    elif t == P.B_ERROR_RESPONSE:
                        log.warning("pool %s: listening connection: %s", self.pool.name,
                                    M.read_error_fields(body).get("M"))
            except Exception as exc:
                log.warning("pool %s: listening connection lost (%s); reconnecting", self.pool.name, exc)
                if self.conn is not None:
                    self.conn.close()
                self.conn = None
                self._ready = trio.Event()
                while self._commands:
                    self._commands.popleft().set()
                await trio.sleep(RECONNECT_DELAY)

    async def _command(self, sql: str) -> None:
        if not self._started:
            self._started = True
            self.nursery.start_soon(self._run)
        await self._ready.wait()
        done = trio.Event()
        self._commands.append(done)
        await self.conn.send(M.query(sql))
        await done.wait()

    def _deliver(self, channel: str, message: bytes) -> None:
        for client in list(self.channels.get(channel, ())):
            client.push_notification(message, self.queue_size)

    async def listen(self, client, channel: str) -> None:
        clients = self.channels.get(channel)
        if clients is None:
            clients = self.channels[channel] = set()
            clients.add(client)
            await self._command(f"LISTEN {quote_ident(channel)}")
        clients.add(client)

    async def unlisten(self, client, channel: str) -> None:
        names = list(self.channels) if channel == "*" else [channel]
        for name in names:
            clients = self.channels.get(name)
            if clients is None:
                continue
            clients.discard(client)
            if not clients:
                del self.channels[name]
                if self.conn is not None:
                    await self._command(f"UNLISTEN {quote_ident(name)}")

    def forget(self, client) -> None:
        """The client left: drop it from every channel (the server keeps listening)."""
        for clients in self.channels.values():
            clients.discard(client)


class PubSub:
    """A worker's listeners, one per pool."""

    def __init__(self, nursery: trio.Nursery, queue_size: int) -> None:
        self.nursery = nursery
        self.queue_size = queue_size
        self.listeners: dict[int, PoolListener] = {}

    def for_pool(self, pool) -> PoolListener:
        listener = self.listeners.get(id(pool))
        if listener is None:
            listener = self.listeners[id(pool)] = PoolListener(pool, self.nursery, self.queue_size)
        return listener
