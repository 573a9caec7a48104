"""A pooled server connection and the protocol state the relay keeps for it."""

from __future__ import annotations

from collections import deque

import trio

from pgherd.shared.pgconn import PgConn
from pgherd.shared.wire import protocol as P


class ServerConn:
    """One authenticated connection to Postgres, owned by a Pool.

    The relay tracks where the server is in the protocol, so a server is only
    handed to another client when it owes nobody anything:
    - expect: one entry per Query/Sync/FunctionCall sent whose ReadyForQuery has
      not arrived yet ("Message Flow": each of them ends with ReadyForQuery);
    - unsynced: extended-protocol messages were sent after the last Sync, so the
      server holds an unfinished extended query (e.g. a Flush-terminated request);
    - copy_in: the server is in COPY IN and waits for CopyData/CopyDone/CopyFail;
    - tx: the transaction status of the last ReadyForQuery.
    """

    __slots__ = ("conn", "sock", "pool", "created", "last_used", "expect", "unsynced",
                 "copy_in", "tx", "set_params", "broken", "skip", "id", "client")

    _next_id = 0

    def __init__(self, conn: PgConn, pool) -> None:
        self.conn = conn
        self.sock = conn.sock
        self.pool = pool
        self.created = self.last_used = trio.current_time()
        self.expect: deque[int] = deque()
        self.unsynced = False
        self.copy_in = False
        self.tx = conn.tx_status
        # Session parameters pgherd SET on this server for a client, by lower-case name.
        self.set_params: dict[str, str] = {}
        self.broken = False
        # Relay: bytes of a passed-through message body still to arrive.
        self.skip = 0
        ServerConn._next_id += 1
        self.id = ServerConn._next_id
        self.client = None

    @property
    def idle(self) -> bool:
        """True when the server owes no client anything and is outside a transaction."""
        return (not self.expect and not self.unsynced and not self.copy_in
                and self.tx == P.TX_IDLE and not self.broken and self.skip == 0
                and self.conn.rstart == self.conn.rend)

    def close(self) -> None:
        self.broken = True
        self.conn.close()

    def __repr__(self) -> str:
        return f"<server {self.id} {self.conn.host}:{self.conn.port} pid={self.conn.pid}>"
