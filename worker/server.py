"""A pooled server connection and the protocol state the relay keeps for it."""

from __future__ import annotations

import select
import socket
from collections import deque

import trio

from pgherd.shared.pgconn import PgConn
from pgherd.shared.wire import protocol as P

from .prepared import ServerStatements

_TX_IDLE = P.TX_IDLE

# recv flags of the liveness check, as a plain int (OR-ing the enum flags costs more than the syscall).
_PEEK = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)


# Marker in ServerConn.expect: the client's CopyDone/CopyFail, forwarded before
# the server's CopyInResponse arrived (the client pipelined its COPY data).
COPY_END = -1
# Marker in ServerConn.expect: a Query/Sync whose ReadyForQuery settles session
# changes (SET, RESET, ...) the client queued (worker/client.py).
SETTLES = 0x100


class ServerConn:
    """One authenticated connection to Postgres, owned by a Pool.

    The relay tracks where the server is in the protocol, so a server is only
    handed to another client when it owes nobody anything:
    - expect: one entry per Query/Sync/FunctionCall sent whose ReadyForQuery has
      not arrived yet ("Message Flow": each of them ends with ReadyForQuery), and
      COPY_END markers for CopyDone/CopyFail sent ahead of a CopyInResponse;
    - unsynced: extended-protocol messages were sent after the last Sync, so the
      server holds an unfinished extended query (e.g. a Flush-terminated request);
    - copy_in: the server is in COPY IN and waits for CopyData/CopyDone/CopyFail;
    - tx: the transaction status of the last ReadyForQuery.
    """

    __slots__ = ("conn", "sock", "pool", "created", "last_used", "expect", "unsynced",
                 "copy_in", "tx", "set_params", "broken", "skip", "id", "client", "generation",
                 "req_start", "xact_start", "actions", "statements", "fatal")

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
        self.fatal = False  # a FATAL ErrorResponse was relayed to the client: the server is closing
        # Relay: bytes of a passed-through message body still to arrive.
        self.skip = 0
        self.generation = 0
        # Prepared statements (worker/prepared.py): reply matching and what it holds.
        self.actions: deque = deque()
        self.statements = ServerStatements()
        # Timing of the request / transaction in progress (trio clock), for stats.
        self.req_start = 0.0
        self.xact_start = 0.0
        ServerConn._next_id += 1
        self.id = ServerConn._next_id
        self.client = None

    def owes_reply(self) -> bool:
        """True while a ReadyForQuery is due and the server is not waiting for COPY data."""
        if self.copy_in:
            return False
        for x in self.expect:
            if x != COPY_END:
                return True
        return False

    def count_reply(self, now: float) -> None:
        """Statistics for a ReadyForQuery just accounted: a query done, maybe a transaction."""
        pool = self.pool
        pool.query_count += 1
        pool.query_time += now - self.req_start
        self.req_start = now
        if self.tx == _TX_IDLE:
            pool.xact_count += 1
            pool.xact_time += now - self.xact_start

    def ready_for_query(self) -> int | None:
        """Account for one ReadyForQuery: the expectation it answers, None if none was expected."""
        expect = self.expect
        while expect and expect[0] == COPY_END:
            expect.popleft()  # a stray CopyDone outside COPY: Postgres ignores it
        if not expect:
            return None
        return expect.popleft()

    def start_copy_in(self) -> None:
        """The server sent CopyInResponse/CopyBothResponse ("COPY Operations").

        The COPY belongs to the Query at the head of `expect`, or to an Execute
        before the head Sync.  Until the COPY ends, Postgres ignores Sync (and
        Flush), so Syncs queued between its start and the client's CopyDone will
        never be answered; they are dropped.  If the client already sent its
        CopyDone (pipelined), the COPY is over as far as the client's bytes go.
        """
        items = list(self.expect)
        keep_head = 1 if items and items[0] & 0xFF == P.F_QUERY else 0
        out = items[:keep_head]
        ended = False
        i = keep_head
        while i < len(items):
            x = items[i]
            i += 1
            if x == COPY_END:
                ended = True
                break
            if x & 0xFF != P.F_SYNC:
                out.append(x)
        out.extend(items[i:])
        self.expect.clear()
        self.expect.extend(out)
        self.copy_in = not ended
        if not keep_head and not any(x & 0xFF == P.F_SYNC for x in out):
            # Extended-protocol COPY: Postgres needs a new Sync after CopyDone.
            self.unsynced = True

    @property
    def idle(self) -> bool:
        """True when the server owes no client anything and is outside a transaction."""
        return (self.tx == _TX_IDLE and not self.unsynced and not self.actions and not self.copy_in
                and not self.broken and self.skip == 0 and self.conn.rstart == self.conn.rend
                and (not self.expect or not self.owes_reply()))

    def looks_alive(self) -> bool:
        """An idle server has nothing to say: data or EOF waiting means it is gone.

        One non-blocking MSG_PEEK recv (a Postgres shutting down sends FATAL 57P01
        to idle backends before closing them).
        """
        sock = self.sock
        if type(sock) is not socket.socket:  # TLS: no MSG_PEEK; ask the kernel instead
            if sock.pending():
                return False
            readable, _, _ = select.select([sock], [], [], 0)
            return not readable
        try:
            sock.recv(1, _PEEK)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False  # EOF, or bytes nobody asked for

    def close(self) -> None:
        self.broken = True
        self.conn.close()

    def __repr__(self) -> str:
        return f"<server {self.id} {self.conn.host}:{self.conn.port} pid={self.conn.pid}>"
