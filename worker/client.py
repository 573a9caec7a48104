"""A client session: startup, authentication, then the request/response relay.

One trio task per client takes turns (DESIGN.md, "Performance rules"): read a
request from the client, make sure a server is attached, forward the request,
relay the server's replies until it owes nothing more, then return the server
to its pool if the client is outside a transaction (transaction mode).
"""

from __future__ import annotations

import logging
import re
import secrets
import socket
import struct
from collections import deque
from types import SimpleNamespace

import trio

from pgherd.router.options import parse_options as _parse_options
from pgherd.router.settings import analyze, may_change
from pgherd.router.txstart import starts_transaction
from pgherd.shared import net, tls
from pgherd.shared.pgconn import ServerError, send_cancel
from pgherd.shared.wire import errors as E
from pgherd.shared.wire import messages as M
from pgherd.shared.wire import protocol as P
from pgherd.shared.wire.framing import HEADER, STARTUP_HEADER, iter_messages, startup_length
from pgherd.shared.wire.scan import plain_queries

from . import auth, fastpath, pubsub
from .admin import serve_admin
from .pool import Pool, sync_params
from .prepared import (A_BIND, A_CLOSE, A_DESCRIBE_P, A_DESCRIBE_S, A_EXECUTE, A_FUNCTION, A_PARSE,
                       A_QUERY, A_SYNC, A_SYNTH, Action, read_name, rename_bind, take_synth)
from .server import COPY_END, SETTLES, ServerConn
from .sharded import ShardedRelay

log = logging.getLogger("pgherd.client")

# Client receive buffer: large enough for typical requests in one read, small
# enough that 10,000 idle clients stay cheap (a request never has to fit: large
# messages stream through).
CLIENT_BUFFER = 16 * 1024
# Admin console queries are short commands; anything longer is refused.
ADMIN_MAX_MESSAGE = 64 * 1024
# ParameterStatus the admin console reports (it has no server behind it).
ADMIN_PARAMETERS = {"server_version": "16.0 (pgherd)", "server_encoding": "UTF8", "client_encoding": "UTF8",
                    "DateStyle": "ISO, MDY", "integer_datetimes": "on", "standard_conforming_strings": "on",
                    "TimeZone": "UTC", "IntervalStyle": "postgres", "is_superuser": "off",
                    "application_name": ""}
# Server messages whose body the relay must read before forwarding them.
_NEEDS_BODY = frozenset([P.B_READY_FOR_QUERY, P.B_COPY_IN_RESPONSE, P.B_COPY_BOTH_RESPONSE,
                         P.B_PARAMETER_STATUS])
# Startup parameters that are not session settings.
_NOT_SETTINGS = frozenset(["user", "database", "options", "replication"])
# Tracked (prepared statements): client messages rewritten whole, server replies
# that must be matched whole, and replies that never consume an action.
_WHOLE_TYPES = frozenset([P.F_PARSE, P.F_BIND, P.F_DESCRIBE, P.F_CLOSE, P.F_QUERY])
_TRACKED_WHOLE = frozenset([P.B_ERROR_RESPONSE, P.B_PARSE_COMPLETE, P.B_BIND_COMPLETE,
                            P.B_CLOSE_COMPLETE, P.B_NO_DATA, P.B_COMMAND_COMPLETE])
_ASYNC_REPLIES = frozenset([P.B_NOTICE_RESPONSE, P.B_NOTIFICATION_RESPONSE, P.B_PARAMETER_STATUS])
_EXECUTE_END = frozenset([P.B_COMMAND_COMPLETE, P.B_EMPTY_QUERY_RESPONSE, P.B_PORTAL_SUSPENDED])
_DEALLOCATE = re.compile(r"^\s*deallocate\s+(?:prepare\s+)?(\"[^\"]+\"|[A-Za-z_][A-Za-z0-9_$]*)\s*;?\s*$", re.I)
_LISTEN_START = re.compile(rb"\s*(?:un)?listen\s", re.I)
# A query that may be nothing but SET/RESET (checked at its start, so SELECTs fail fast).
_LONE_SET = re.compile(rb"\s*(?:re)?set\s", re.I)
# prepared_statements = "full": SQL-level PREPARE / EXECUTE of one statement.
_SQL_NAME = r'("(?:[^"]|"")+"|[A-Za-z_][A-Za-z0-9_$]*)'
_SQL_PREPARE = re.compile(r"^\s*prepare\s+" + _SQL_NAME + r"\s*(\([^)]*\))?\s+as\s+(.+?)\s*;?\s*$", re.I | re.S)
_SQL_EXECUTE = re.compile(r"^\s*execute\s+" + _SQL_NAME + r"\s*(\(.*\))?\s*;?\s*$", re.I | re.S)
_SQL_HINT = re.compile(rb"^\s*(prepare|execute|deallocate)\s", re.I)
_DISCARD_ALL = re.compile(r"^\s*discard\s+all\s*;?\s*$", re.I)
# Message types that end a request: the server will answer with ReadyForQuery.
_RFQ_TYPES = frozenset([P.F_QUERY, P.F_SYNC, P.F_FUNCTION_CALL])
_EXTENDED_TYPES = frozenset([P.F_PARSE, P.F_BIND, P.F_DESCRIBE, P.F_EXECUTE, P.F_CLOSE])
_VALID_REQUEST_TYPES = P.FRONTEND_TYPES - {P.F_PASSWORD}
# First message types of a request _answer_locally may answer (Parse, Close, Sync, Flush only).
_LOCAL_FIRST = frozenset([P.F_PARSE, P.F_CLOSE, P.F_SYNC, P.F_FLUSH])
# Extended-protocol messages the fast path forwards when prepared statements are not rewritten.
_UNTRACKED_EXTENDED = frozenset([P.F_PARSE, P.F_BIND, P.F_DESCRIBE, P.F_EXECUTE, P.F_SYNC, P.F_CLOSE])
_unpack_hdr = HEADER.unpack_from
# Connection errors that mean the host is down or going down: ban it and use another.
_HOST_DOWN = frozenset([E.CONNECTION_FAILURE, E.ADMIN_SHUTDOWN, E.CANNOT_CONNECT_NOW, "57P02", "08001"])


def _bad_header(t: int, length: int, max_size: int) -> None:
    """A client message header pgherd refuses ("Message Formats"): 08P01, then disconnect."""
    if t not in _VALID_REQUEST_TYPES:
        raise E.ProtocolViolation(f"invalid frontend message type {t}")
    raise E.ProtocolViolation(f"invalid message length {length} for message type {chr(t)!r} "
                              f"(allowed 4..{max_size})")


def _is_fatal(body) -> bool:
    """An ErrorResponse body of severity FATAL or PANIC (the non-localized V field, else S)."""
    data = bytes(body)
    return b"VFATAL\x00" in data or b"VPANIC\x00" in data or data.startswith((b"SFATAL\x00", b"SPANIC\x00"))


class ClientGone(Exception):
    """The client sent Terminate or closed its socket."""


def _unquote(name: str) -> str:
    """A SQL identifier as Postgres stores it: quoted kept as is, unquoted folded to lower case."""
    if name.startswith('"'):
        return name[1:-1].replace('""', '"')
    return name.lower()


class _Answered(Exception):
    """The request was already answered with an error (no server attached)."""


def parse_options(options: str) -> dict[str, str]:
    """Startup `options` settings (router/options.py) or a FATAL error the client sees."""
    try:
        return _parse_options(options)
    except ValueError as exc:
        raise E.PgError(E.PROTOCOL_VIOLATION, str(exc), hint='use "-c name=value"', fatal=True) from None


class ClientSession:
    """One client connection from accept to close."""

    def __init__(self, ctx, sock: socket.socket, addr) -> None:
        self.ctx = ctx
        self.sock = sock
        self.addr = addr
        self.buf = bytearray(CLIENT_BUFFER)
        self.view = memoryview(self.buf)
        self.end = 0  # bytes of self.buf holding unprocessed client data
        self.skip = 0  # bytes of a forwarded message body still to come from the client
        self.user = ""
        self.database = ""
        self.settings: dict[str, str] = {}  # lower-case GUC name -> value
        self.pool: Pool | None = None  # the pool of the attached server, else the cluster's main pool
        self.cluster = None  # worker/cluster.Cluster of this login
        self.sharded: ShardedRelay | None = None  # the relay of a sharded database's client
        self.server: ServerConn | None = None
        self.pid = 0
        self.secret = 0
        self.mode = "transaction"
        self.connect_time = trio.current_time()
        self.state = "login"
        self.tls = False
        self.lost_mid_reply = False  # the client vanished while a reply was on its way
        # Set while the client waits for a server; a CancelRequest cancels the wait.
        self._wait_scope: trio.CancelScope | None = None
        # Prepared statements (worker/prepared.py): the client's names -> global
        # names; `tracked` once the client speaks the extended protocol in a
        # pooled mode, after which every request and reply goes through actions.
        self.statements: dict[str, str] = {}
        self.sql_statements: dict[str, str] = {}  # SQL PREPARE names -> global names ("full")
        self.tracked = False
        self.skip_to_sync = False
        # Session state (router/settings.py): changes waiting for their ReadyForQuery,
        # the values before an open transaction changed them, and what pins the server.
        self.startup: dict[str, str] = {}
        self.change_queue: deque = deque()
        self.tx_backup: tuple[dict, dict] | None = None
        self.reply_error = False  # an ErrorResponse in the current reply (while watching)
        self.last_tag = ""
        self.needs_sync = False
        self.pinned_role = False
        self.pinned_untracked = False
        self.locks = 0
        self.pending_parse_changes: tuple = ()
        # LISTEN in transaction mode (worker/pubsub.py): channels, queued notifications,
        # and the scope of an idle wait a notification may interrupt.
        self.channels: set[str] = set()
        self.notify_queue: list[bytes] = []
        self._idle_scope: trio.CancelScope | None = None
        # Load balancing: a BEGIN held until the next statement picks the host ("rw" / "ro").
        self.begun: str | None = None
        self.begin_sql = ""
        # SET pgherd.role / pgdog.role (or the startup option): "primary", "replica" or "auto".
        self.role_override: str | None = None
        self.startup_role: str | None = None
        # The fast path (worker/fastpath.py): where the reactor has this client, and what
        # it hands back to the task (see ClientSession._fast_resume).
        self.fast_state = fastpath.TASK
        self.fast_task = None
        self.fast_fd = self.fast_sfd = -1
        self.fast_more = self.fast_abort = self.fast_hup = False
        self.fast_out: tuple[int, int] | None = None
        self.fast_reply_end = 0
        self.fast_queries = 0  # _plain_request's count for the request the reactor has
        self.fast_srv: ServerConn | None = None
        self.fast_waiter = None
        self.refuse_at = -1  # _scan_server: offset of a ReadyForQuery statement mode refuses

    # ================================================================ I/O helpers
    async def send(self, data: bytes) -> None:
        await net.send_all(self.sock, data)

    async def _fill(self) -> None:
        if self.end == len(self.buf):
            raise E.ProtocolViolation("message too large for the startup phase")
        self.end += await net.recv_into(self.sock, self.view[self.end:])

    async def read_admin_message(self) -> tuple[int, bytes]:
        """Admin console: whole messages, bounded by ADMIN_MAX_MESSAGE."""
        t, body = await self.read_message(ADMIN_MAX_MESSAGE)
        if t not in _VALID_REQUEST_TYPES:
            raise E.ProtocolViolation(f"invalid frontend message type {t}")
        return t, body

    def _grow(self, size: int) -> None:
        """Make room for one whole message of `size` bytes (bounded by max_message_size)."""
        self.view.release()
        self.buf.extend(bytes(size - len(self.buf)))
        self.view = memoryview(self.buf)

    def _consume(self, n: int) -> None:
        rest = self.end - n
        if rest:
            self.buf[0:rest] = self.buf[n:self.end]
        self.end = rest

    async def read_message(self, limit: int = P.MAX_STARTUP_PACKET) -> tuple[int, bytes]:
        """One whole regular message of at most `limit` bytes (login and admin console)."""
        while True:
            if self.end >= 5:
                t, length = _unpack_hdr(self.buf, 0)
                if length < 4 or length > limit:
                    raise E.ProtocolViolation(f"invalid message length {length} (allowed 4..{limit})")
                if length + 1 > len(self.buf):
                    self._grow(length + 1)
                if self.end >= length + 1:
                    body = bytes(self.buf[5:length + 1])
                    self._consume(length + 1)
                    return t, body
            await self._fill()

    # ================================================================ lifecycle
    async def run(self) -> None:
        try:
            login_timeout = self.ctx.client_login_timeout
            with trio.move_on_after(login_timeout) as scope:
                ok = await self._startup()
            if scope.cancelled_caught:
                log.info("client %s: login timed out after %.1fs", self.addr, login_timeout)
                await self._send_quietly(E.fatal(E.PROTOCOL_VIOLATION,
                                                 "client_login_timeout: startup not completed in time"))
                return
            if not ok:
                return
            self.state = "active"
            await self._relay()
        except (ClientGone, net.PeerClosed):
            pass
        except E.PgError as exc:
            if exc.code == E.PROTOCOL_VIOLATION and self.server is not None:
                self.server.broken = True  # its request accounting may be off: never reuse
            if exc.code == E.PROTOCOL_VIOLATION:
                log.info("client %s user=%s db=%s: protocol violation: %s", self.addr, self.user,
                         self.database, exc.message)
            await self._send_quietly(E.error_response(exc.code, exc.message, severity="FATAL",
                                                      detail=exc.detail, hint=exc.hint))
        finally:
            await self._close()

    async def _send_quietly(self, data: bytes) -> None:
        with trio.move_on_after(1):
            try:
                await self.send(data)
            except (net.PeerClosed, OSError):
                pass

    async def _close(self) -> None:
        self.state = "closing"
        if self.pid:
            self.ctx.clients.pop(self.pid, None)
        if self.channels and self.ctx.pubsub is not None and self.cluster is not None:
            self.ctx.pubsub.for_pool(self.cluster.main).forget(self)
        srv, self.server = self.server, None
        if srv is not None:
            # Shielded: even a cancelled session (shutdown) must return its server.
            with trio.CancelScope(shield=True):
                await self._release_dirty(srv)
        net.close_quietly(self.sock)

    # ================================================================ startup
    async def _startup(self) -> bool:
        """Startup packets until a StartupMessage; returns False for cancel requests."""
        while True:
            length = startup_length(self.buf, self.end)
            while length is None or self.end < length:
                await self._fill()
                length = startup_length(self.buf, self.end)
            _, code = STARTUP_HEADER.unpack_from(self.buf, 0)
            body = bytes(self.buf[8:length])
            self._consume(length)
            if code == P.SSL_REQUEST_CODE and self.ctx.client_tls is not None and not self.tls:
                if self.end:
                    # Bytes after SSLRequest before the handshake could be injected by
                    # a man in the middle (CVE-2021-23214): refuse, as Postgres does.
                    raise E.ProtocolViolation("received unencrypted data after SSL request")
                await self.send(b"S")
                try:
                    self.sock = await tls.wrap_server_side(self.ctx.client_tls, self.sock)
                except tls.TlsError as exc:
                    log.info("client %s: TLS handshake failed: %s", self.addr, exc)
                    raise ClientGone() from None
                self.tls = True
                continue
            if code == P.SSL_REQUEST_CODE or code == P.GSSENC_REQUEST_CODE:
                # 'N' means "continue in plaintext" (no TLS configured, or GSSAPI).
                await self.send(b"N")
                continue
            if code == P.CANCEL_REQUEST_CODE:
                if len(body) == 8:
                    pid, secret = struct.unpack("!ii", body)
                    await self.ctx.cancel(pid, secret)
                return False
            if code >> 16 != 3:
                raise E.PgError(E.FEATURE_NOT_SUPPORTED,
                                f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: "
                                "server supports 3.0", fatal=True)
            try:
                params = M.read_startup_params(body)
            except ValueError as exc:
                raise E.ProtocolViolation(f"invalid startup packet: {exc}") from None
            if self.ctx.tls_client_required and not self.tls:
                raise E.PgError(E.INVALID_AUTHORIZATION, "TLS is required to connect to pgherd",
                                hint="connect with sslmode=require (or verify-ca / verify-full)", fatal=True)
            await self._login(code, params)
            return True

    async def _login(self, version: int, params: dict[str, str]) -> None:
        user = params.get("user")
        if not user:
            raise E.PgError(E.INVALID_AUTHORIZATION, "no PostgreSQL user name specified in startup packet",
                            fatal=True)
        self.user = user
        self.database = params.get("database") or user
        if params.get("replication", "false").lower() not in ("false", "off", "no", "0"):
            raise E.PgError(E.FEATURE_NOT_SUPPORTED, "replication connections are not supported by pgherd",
                            fatal=True)
        unrecognized = [k for k in params if k.startswith("_pq_.")]
        if (version & 0xFFFF) > 0 or unrecognized:
            # "Protocol versioning": tell the client we speak 3.0 and which options we ignore.
            await self.send(M.negotiate_protocol_version(0, unrecognized))
        settings = {k.lower(): v for k, v in params.items()
                    if k not in _NOT_SETTINGS and not k.startswith("_pq_.")}
        if params.get("options"):
            settings.update(parse_options(params["options"]))
        self.settings = settings
        self.startup = dict(settings)
        self.startup_params = params
        self.startup_role = self.role_override = settings.get("pgherd.role") or settings.get("pgdog.role")

        if self.database == self.ctx.config.admin.name:
            await self._admin_login(user)
            return
        user_cfg, cluster = self.ctx.lookup(user, self.database)
        await auth.authenticate(self, user, user_cfg, self.ctx.auth_type)
        if cluster is None:
            raise auth.auth_failed(user)
        self.cluster = cluster
        self.pool = pool = cluster.main
        self.mode = pool.settings.pooler_mode
        await self.send(M.auth_ok())

        try:
            shown = await pool.login_params(settings)
        except ServerError as exc:
            raise E.PgError(exc.code, exc.fields.get("M", str(exc)), detail=exc.fields.get("D"),
                            hint=exc.fields.get("H"), fatal=True) from None
        self.pid, self.secret = self.ctx.register(self)
        out = [M.parameter_status(k, v) for k, v in shown.items()]
        out.append(M.backend_key_data(self.pid, self.secret))
        out.append(M.ready_for_query(P.TX_IDLE))
        await self.send(b"".join(out))
        log.debug("client %s logged in as %s to %s", self.addr, user, self.database)

    async def _admin_login(self, user: str) -> None:
        admin = self.ctx.config.admin
        if not admin.password:
            raise auth.admin_disabled()
        user_cfg = SimpleNamespace(password=admin.password, password_hash=None) if user == admin.user else None
        await auth.authenticate(self, user, user_cfg, self.ctx.auth_type)
        self.mode = "admin"
        self.pid, self.secret = self.ctx.register(self)
        out = [M.auth_ok()]
        out += [M.parameter_status(k, v) for k, v in ADMIN_PARAMETERS.items()]
        out.append(M.backend_key_data(self.pid, self.secret))
        out.append(M.ready_for_query(P.TX_IDLE))
        await self.send(b"".join(out))
        self.state = "active"
        await serve_admin(self)
        raise ClientGone()

    # ================================================================ relay
    async def _relay(self) -> None:
        if self.cluster is not None and self.cluster.sharded:
            self.sharded = ShardedRelay(self)
            await self.sharded.run()
            raise ClientGone()
        while True:
            try:
                await self._relay_loop()
            except _Answered:
                continue  # the request was answered with an error; the client carries on

    async def _relay_loop(self) -> None:
        reactor = self.ctx.reactor
        while True:
            if self.notify_queue:
                # Between messages: deliver NotificationResponses waiting for this client.
                queued, self.notify_queue = self.notify_queue, []
                await self.send(b"".join(queued))
            srv = self.server
            if srv is not None and (srv.unsynced or self.mode == "session") and not srv.owes_reply():
                # The server may speak without being asked (Flush-terminated
                # request, session-mode notices): watch both sides.
                if await self._wait_either(srv) == "server":
                    await self._pump_once(srv)
                    continue
            if self.channels:
                n = 0
                with trio.CancelScope() as self._idle_scope:  # a notification may wake us
                    n = await self._recv_request(srv)
                self._idle_scope = None
                if not n:
                    continue
            elif reactor is not None and not reactor.closed and self._fast_ok(srv):
                # worker/fastpath.py serves plain requests without waking this task;
                # it comes back with what is left to do.
                n = await reactor.park(self)
                if n < 0:
                    await self._fast_resume(n)
                    continue
                if n == 0:
                    n = await self._recv_request(srv)
            else:
                n = await self._recv_request(srv)
            self.end += n
            self.pool.received += n
            if self.ctx.pubsub is not None and self.mode != "session" and await self._pubsub_statement():
                continue
            if self.server is None:
                if self.skip == 0 and self.end < 5:
                    continue  # not even one header yet
                if self.skip == 0 and self.buf[0] == P.F_TERMINATE:
                    raise ClientGone()
                if self.begun is None and self.mode != "session":
                    # (Cheap checks first: most requests are neither, and an await costs.)
                    first = self.buf[0] if not self.skip else 0
                    if first in _LOCAL_FIRST and self.ctx.rewrite_prepared and await self._answer_locally():
                        continue
                    if first == P.F_QUERY and await self._answer_set_locally():
                        continue
                try:
                    attached = await self._attach()
                except _Answered:
                    attached = False
                if not attached:
                    continue
            await self._forward_request()

    async def _forward_request(self) -> None:
        """Send the buffered request to the attached server and relay its reply."""
        srv = self.server
        if not self.tracked and self.ctx.rewrite_prepared and self.mode != "session" \
                and (self._has_extended() or (self.ctx.rewrite_sql_prepared and self.end > 5
                                             and self.buf[0] == P.F_QUERY
                                             and _SQL_HINT.search(self.buf[5:40]))):
            self.tracked = True
        if self.mode == "statement" and self._opens_transaction():
            await self._fail_request(E.PgError(
                E.FEATURE_NOT_SUPPORTED, "transaction blocks are not allowed in statement pooling mode",
                hint="use pooler_mode transaction or session for this user or database"))
            self._maybe_release()
            return
        self._start_request(srv)
        if self.needs_sync and srv.tx == P.TX_IDLE and not srv.owes_reply():
            self.needs_sync = False
            try:
                await sync_params(srv, self.settings)
            except (ServerError, net.PeerClosed, OSError) as exc:
                log.info("client %s: cannot re-apply settings: %s", self.addr, exc)
        if self.tracked:
            out, fwd, terminate = self._scan_tracked(srv)
        else:
            fwd, terminate = self._scan_client(srv)
            out = self.view[:fwd]
        if out:
            try:
                await net.send_all(srv.sock, out)
            except net.PeerClosed:
                await self._server_lost(srv)
        if fwd:
            self._consume(fwd)
        if srv.actions and srv.actions[0].kind == A_SYNTH:
            await self.send(take_synth(srv.actions))
        if terminate:
            raise ClientGone()
        if self.skip or self.end:
            return  # the rest of a message is still on its way
        await self._finish_reply(srv)

    @staticmethod
    def _start_request(srv: ServerConn) -> None:
        if not srv.owes_reply():
            srv.req_start = now = trio.current_time()
            if srv.tx == P.TX_IDLE:
                srv.xact_start = now

    async def _finish_reply(self, srv: ServerConn) -> None:
        if srv.copy_in:
            await self._poll_server(srv)
            return
        await self._pump(srv)
        self._maybe_release()

    # ---------------------------------------------------------------- fast path (worker/fastpath.py)
    def _fast_ok(self, srv: ServerConn | None) -> bool:
        """May the reactor wait for this client's next request (and serve it if plain)?"""
        ctx = self.ctx
        return (not self.end and not self.tracked and self.mode == "transaction" and not self.skip
                and not self.needs_sync and self.begun is None and not self.notify_queue
                and not ctx.timed_clients and not self.cluster.replicated and type(self.sock) is socket.socket
                and (srv is None or (type(srv.sock) is socket.socket and not srv.owes_reply()
                                     and not srv.unsynced and not srv.copy_in and not srv.skip
                                     and not srv.actions)))

    def _plain_request(self, end: int) -> int:
        """Does buf[:end] hold whole messages the reactor may forward as they are?

        Query messages (or, without prepared-statement rewriting, unnamed extended
        ones) ending in Query or Sync, none of which this task must see itself: a
        lone SET it may answer, a LISTEN, an SQL PREPARE / EXECUTE it tracks.
        Returns -1 if not; else the number of Queries when they are all the request
        holds and none may change session state (router.settings.may_change), so that
        _scan_client's bookkeeping comes down to one expected ReadyForQuery each;
        else 0 (the reactor runs _scan_client).
        """
        buf, ctx = self.buf, self.ctx
        max_size = ctx.max_message_size
        if not ctx.rewrite_sql_prepared and ctx.pubsub is None:
            # The common request in one scan (C, shared/wire/scan.py): only Queries, none
            # of which may_change finds anything in (so no lone SET either). LISTEN matters
            # only with pubsub, and SQL PREPARE only with "full": both take the loop below.
            queries = plain_queries(buf, end, max_size)
            if queries > 0:
                return queries
        extended = not ctx.rewrite_prepared
        p = t = queries = 0
        simple = True
        while p < end:
            if end - p < 5:
                return -1
            t, length = _unpack_hdr(buf, p)
            if length < 4 or length > max_size:
                return -1
            if t == P.F_QUERY:
                if may_change(buf, p + 5, p + length):
                    # (A lone SET is one of these: most queries pay one check here.)
                    if p == 0 and self.server is None and _LONE_SET.match(buf, 5):
                        return -1
                    simple = False
                if p == 0 and ctx.rewrite_sql_prepared and _SQL_HINT.search(buf[5:40]):
                    return -1
                if ctx.pubsub is not None and _LISTEN_START.match(buf, p + 5):
                    return -1
                queries += 1
            elif extended and t in _UNTRACKED_EXTENDED:
                simple = False
            else:
                return -1
            p += 1 + length
        if p != end or (t != P.F_QUERY and t != P.F_SYNC):
            return -1
        return queries if simple else 0

    async def _fast_resume(self, code: int) -> None:
        """Carry on from where the reactor handed this client back (codes in fastpath.py)."""
        if code == fastpath.SENT:
            srv = self.server
            if self.fast_out is not None:  # the part of the request the server socket did not take
                sent, fwd = self.fast_out
                self.fast_out = None
                try:
                    await net.send_all(srv.sock, self.view[sent:fwd])
                except net.PeerClosed:
                    await self._server_lost(srv)
                self._consume(fwd)
            if self.fast_reply_end:  # the part of the reply the client socket did not take
                p, self.fast_reply_end = self.fast_reply_end, 0
                await self._send_reply(srv, p)
            await self._finish_reply(srv)
        elif code == fastpath.LOST:
            await self._server_lost(self.server)
        elif code == fastpath.ATTACHED:
            srv, self.fast_srv = self.fast_srv, None
            if await self._prepare_server(srv):
                await self._forward_request()
        else:  # WAIT_TIMEOUT, WAIT_CANCELLED, WAIT_SLOT: the reactor queued the request for a server
            self.state = "active"
            if code == fastpath.WAIT_SLOT:
                try:
                    srv = await self.pool.open_for_checkout()
                except E.PgError as exc:
                    await self._fail_request(exc)
                    return
                if await self._prepare_server(srv):
                    await self._forward_request()
                return
            await self._fail_request(self.pool.timeout_error() if code == fastpath.WAIT_TIMEOUT else
                                     E.PgError(E.QUERY_CANCELED, "canceling statement due to user request"))

    def _scan_client(self, srv: ServerConn) -> tuple[int, bool]:
        """Account for the client messages in self.buf; return (bytes to forward, terminate).

        Protocol bookkeeping happens at each message header (the type is enough),
        so large messages stream through without being buffered whole.
        """
        buf, end, p = self.buf, self.end, 0
        if self.skip:
            p = min(self.skip, end)
            self.skip -= p
        max_size = self.ctx.max_message_size
        while end - p >= 5:
            t, length = _unpack_hdr(buf, p)
            if t not in _VALID_REQUEST_TYPES or length < 4 or length > max_size:
                _bad_header(t, length, max_size)
            if t == P.F_TERMINATE:
                return p, True
            if t in _RFQ_TYPES:
                if t == P.F_QUERY and end >= p + 1 + length and may_change(buf, p + 5, p + length):
                    t = self._note_changes(t, buf[p + 5:p + length])
                elif t == P.F_SYNC and self.pending_parse_changes:
                    t = self._settle_parse_changes(t)
                srv.expect.append(t)
                # A Query or FunctionCall ends the implicit transaction of earlier
                # extended messages just as Sync does (postgres.c, finish_xact_command).
                srv.unsynced = False
            elif t in _EXTENDED_TYPES:
                srv.unsynced = True
                if t == P.F_PARSE and end >= p + 1 + length and may_change(buf, p + 5, p + 1 + length):
                    self._note_parse(M.read_parse(buf[p + 5:p + 1 + length]).query)
            elif t == P.F_COPY_DONE or t == P.F_COPY_FAIL:
                if srv.copy_in:
                    srv.copy_in = False
                else:
                    # Sent ahead of the server's CopyInResponse (asyncpg pipelines
                    # COPY data): remember where the COPY ends in the request stream.
                    srv.expect.append(COPY_END)
            stop = p + 1 + length
            if stop > end:
                self.skip = stop - end
                return end, False
            p = stop
        return p, False

    def _has_extended(self) -> bool:
        """Does the buffer start an extended-protocol exchange? (cheap header walk)"""
        p, buf, end = 0, self.buf, self.end
        if self.skip:
            return False
        while end - p >= 5:
            t, length = _unpack_hdr(buf, p)
            if t in _EXTENDED_TYPES:
                return True
            p += 1 + length
        return False

    async def _answer_locally(self) -> bool:
        """Answer a request that needs no server, without checking one out.

        A request made only of Parse (of statements already prepared successfully
        on some server), Close of statements, Flush and Sync, from a client outside
        a transaction, is answered by pgherd. Clients that prepare with a blocking
        call (pgbench -M prepared uses PQprepare) would otherwise stall while every
        server is busy with another of their connections.
        """
        messages = self._whole_messages()
        if not messages:
            return False
        plan: list[tuple[int, object]] = []
        for t, b0, b1 in messages:
            body = bytes(self.buf[b0:b1])
            try:
                if t == P.F_PARSE:
                    msg = M.read_parse(body)
                    name = self.ctx.statements.validated_name(msg.query, tuple(msg.param_types))
                    if not msg.name or name is None or msg.name in self.statements:
                        return False
                    plan.append((t, (msg.name, name)))
                elif t == P.F_CLOSE:
                    kind, stmt = M.read_describe_or_close(body)
                    if kind != "S" or not stmt:
                        return False
                    plan.append((t, stmt))
                elif t in (P.F_SYNC, P.F_FLUSH):
                    plan.append((t, None))
                else:
                    return False
            except ValueError:
                return False
        out = []
        for t, arg in plan:
            if t == P.F_PARSE:
                self.statements[arg[0]] = arg[1]
                out.append(M.parse_complete())
            elif t == P.F_CLOSE:
                self.statements.pop(arg, None)
                out.append(M.close_complete())
            elif t == P.F_SYNC:
                out.append(M.ready_for_query(P.TX_IDLE))
        self.tracked = True
        self.end = 0
        await self.send(b"".join(out))
        return True

    def _scan_tracked(self, srv: ServerConn) -> tuple[bytes, int, bool]:
        """Rewrite the client's messages for prepared statements and queue their actions.

        Returns (bytes for the server, client bytes consumed, terminate). Parse,
        Bind, Describe, Close and Query are handled whole; other messages stream.
        """
        buf, end, p = self.buf, self.end, 0
        out: list[bytes] = []
        acts = srv.actions
        if not self.skip:
            for old in srv.statements.stale(self.ctx.statements):
                out.append(M.close("S", old))
                acts.append(Action(A_CLOSE, swallow=True))
        if self.skip:
            take = min(self.skip, end)
            out.append(bytes(buf[:take]))
            self.skip -= take
            p = take
        max_size = self.ctx.max_message_size
        while not self.skip and end - p >= 5:
            t, length = _unpack_hdr(buf, p)
            if t not in _VALID_REQUEST_TYPES or length < 4 or length > max_size:
                _bad_header(t, length, max_size)
            stop = p + 1 + length
            if t == P.F_TERMINATE:
                return b"".join(out), p, True
            if stop > end and (t in _WHOLE_TYPES or self.skip_to_sync):
                if 1 + length > len(buf):
                    self._grow(1 + length)
                break  # wait for the rest of the message
            if self.skip_to_sync and t != P.F_SYNC:
                p = stop  # Postgres would skip it after the error: so do we
                continue
            if t in _WHOLE_TYPES:
                self._tracked_message(srv, t, bytes(buf[p + 5:stop]), bytes(buf[p:stop]), out)
                p = stop
                continue
            # Streamed messages: Execute, Sync, Flush, FunctionCall and COPY data.
            if t == P.F_EXECUTE:
                acts.append(Action(A_EXECUTE))
                srv.unsynced = True
            elif t == P.F_SYNC:
                acts.append(Action(A_SYNC))
                srv.expect.append(self._settle_parse_changes(t) if self.pending_parse_changes else t)
                srv.unsynced = False
                self.skip_to_sync = False
            elif t == P.F_FUNCTION_CALL:
                acts.append(Action(A_FUNCTION))
                srv.expect.append(t)
                srv.unsynced = False
            elif t == P.F_COPY_DONE or t == P.F_COPY_FAIL:
                if srv.copy_in:
                    srv.copy_in = False
                else:
                    srv.expect.append(COPY_END)
            if stop > end:
                out.append(bytes(buf[p:end]))
                self.skip = stop - end
                p = end
                break
            out.append(bytes(buf[p:stop]))
            p = stop
        return b"".join(out), p, False

    def _tracked_message(self, srv: ServerConn, t: int, body: bytes, raw: bytes, out: list) -> None:
        acts = srv.actions
        try:
            if t == P.F_QUERY:
                self._tracked_query(srv, body, raw, out)
            elif t == P.F_PARSE:
                msg = M.read_parse(body)
                if may_change(body):
                    self._note_parse(msg.query)
                if not msg.name:
                    out.append(raw)
                    acts.append(Action(A_PARSE))
                elif msg.name in self.statements:
                    # Postgres' own error for a duplicate name; it then skips to Sync.
                    acts.append(Action(A_SYNTH, data=E.error_response(
                        "42P05", f'prepared statement "{msg.name}" already exists')))
                    self.skip_to_sync = True
                else:
                    name = self.ctx.statements.name_for(msg.query, tuple(msg.param_types))
                    self.statements[msg.name] = name
                    if srv.statements.has(name):
                        acts.append(Action(A_SYNTH, data=M.parse_complete(), client_name=msg.name))
                    else:
                        self._prepare_on(srv, name, out, swallow=False, client_name=msg.name)
                srv.unsynced = True
            elif t == P.F_BIND:
                portal, pos = read_name(body, 0)
                stmt, _ = read_name(body, pos)
                name = self._global(stmt) if stmt else None
                if name is None:
                    out.append(raw)
                else:
                    self._ensure_prepared(srv, name, out)
                    out.append(rename_bind(body, name))
                acts.append(Action(A_BIND, stmt=name or ""))
                srv.unsynced = True
            elif t == P.F_DESCRIBE:
                kind, stmt = M.read_describe_or_close(body)
                name = self._global(stmt) if kind == "S" and stmt else None
                if name is None:
                    out.append(raw)
                else:
                    self._ensure_prepared(srv, name, out)
                    out.append(M.describe("S", name))
                acts.append(Action(A_DESCRIBE_S if kind == "S" else A_DESCRIBE_P))
                srv.unsynced = True
            else:  # Close
                kind, stmt = M.read_describe_or_close(body)
                if kind == "S" and stmt:
                    # Only this client's name goes; the server keeps the statement for others.
                    self.statements.pop(stmt, None)
                    acts.append(Action(A_SYNTH, data=M.close_complete()))
                else:
                    out.append(raw)
                    acts.append(Action(A_CLOSE))
                srv.unsynced = True
        except ValueError as exc:
            raise E.ProtocolViolation(f"malformed {chr(t)!r} message: {exc}") from None

    def _tracked_query(self, srv: ServerConn, body: bytes, raw: bytes, out: list) -> None:
        acts = srv.actions
        sql = M.read_query(body)
        m = _DEALLOCATE.match(sql)
        srv.unsynced = False
        if self.ctx.rewrite_sql_prepared and self._sql_prepared(srv, sql, out):
            return
        if m and m.group(1).upper() != "ALL":
            # DEALLOCATE of one of the client's statements: only the client's name goes.
            name = _unquote(m.group(1))
            if name in self.statements or name in self.sql_statements:
                self.statements.pop(name, None)
                self.sql_statements.pop(name, None)
                acts.append(Action(A_SYNTH, data=M.command_complete("DEALLOCATE")))
                out.append(M.sync())  # yields the ReadyForQuery with the real status
                acts.append(Action(A_SYNC))
                srv.expect.append(P.F_SYNC)
                return
        elif m or _DISCARD_ALL.match(sql):
            # The server drops every prepared statement, ours included.
            self.statements.clear()
            self.sql_statements.clear()
            srv.statements.clear()
        out.append(raw)
        acts.append(Action(A_QUERY))
        srv.expect.append(self._note_changes(P.F_QUERY, body[:-1]) if may_change(body) else P.F_QUERY)

    def _global(self, client_name: str) -> str | None:
        """The live global name for one of the client's statements (None if unknown)."""
        name = self.statements.get(client_name)
        if name is not None and name in self.ctx.statements.retired:
            name = self.statements[client_name] = self.ctx.statements.current(name)
        return name

    def _sql_prepared(self, srv: ServerConn, sql: str, out: list) -> bool:
        """prepared_statements = "full": rewrite SQL PREPARE/EXECUTE to global names."""
        acts = srv.actions
        m = _SQL_PREPARE.match(sql)
        if m:
            name, types, stmt = _unquote(m.group(1)), m.group(2) or "", m.group(3)
            if name in self.sql_statements or name in self.statements:
                acts.append(Action(A_SYNTH, data=E.error_response(
                    "42P05", f'prepared statement "{name}" already exists')))
            else:
                glob = self.ctx.statements.sql_name_for(types, stmt)
                self.sql_statements[name] = glob
                if srv.statements.has(glob):
                    acts.append(Action(A_SYNTH, data=M.command_complete("PREPARE")))
                else:
                    out.append(self.ctx.statements.parse_message(glob))
                    srv.statements.add(glob)
                    srv.expect.append(P.F_QUERY)
                    acts.append(Action(A_QUERY, stmt=glob, client_name=name))
                    return True
            out.append(M.sync())  # the ReadyForQuery, with the real transaction status
            srv.expect.append(P.F_SYNC)
            acts.append(Action(A_SYNC))
            return True
        m = _SQL_EXECUTE.match(sql)
        if m and _unquote(m.group(1)) in self.sql_statements:
            glob = self.sql_statements[_unquote(m.group(1))]
            if glob in self.ctx.statements.retired:
                glob = self.sql_statements[_unquote(m.group(1))] = self.ctx.statements.current(glob)
            if not srv.statements.has(glob):
                out.append(self.ctx.statements.parse_message(glob))  # PREPARE first, replies swallowed
                srv.statements.add(glob)
                srv.expect.append(P.F_QUERY)
                acts.append(Action(A_QUERY, swallow=True, stmt=glob))
            out.append(M.query(f"EXECUTE {glob}{m.group(2) or ''}"))
            srv.expect.append(P.F_QUERY)
            acts.append(Action(A_QUERY))
            return True
        return False

    def _ensure_prepared(self, srv: ServerConn, name: str, out: list) -> None:
        if not srv.statements.has(name):
            self._prepare_on(srv, name, out, swallow=True)

    def _prepare_on(self, srv: ServerConn, name: str, out: list, *, swallow: bool,
                    client_name: str = "") -> None:
        for old in srv.statements.evict(self.ctx.prepared_limit):
            out.append(M.close("S", old))
            srv.actions.append(Action(A_CLOSE, swallow=True))
        out.append(self.ctx.statements.parse_message(name))
        srv.statements.add(name)
        srv.actions.append(Action(A_PARSE, swallow=swallow, stmt=name, client_name=client_name))

    @staticmethod
    def _stale_plan(body) -> bool:
        fields = M.read_error_fields(body)
        return fields.get("C") == E.FEATURE_NOT_SUPPORTED and "cached plan" in fields.get("M", "")

    def _match_reply(self, srv: ServerConn, t: int, body=b"") -> tuple[bool, bytes]:
        """Match one server message against the action queue: (forward it?, bytes to emit after)."""
        acts = srv.actions
        if t in _ASYNC_REPLIES or not acts:
            return True, b""
        head = acts[0]
        k = head.kind
        if k == A_QUERY and head.swallow:
            # An injected PREPARE: its replies are pgherd's, except an error the client
            # must see (its EXECUTE cannot run then either).
            if t == P.B_ERROR_RESPONSE:
                self._undo(srv, head)
                return True, b""
            if t == P.B_READY_FOR_QUERY:
                acts.popleft()
                return False, take_synth(acts)
            return False, b""
        if t == P.B_ERROR_RESPONSE:
            if k in (A_QUERY, A_FUNCTION, A_SYNC):
                if k == A_QUERY and head.stmt:
                    self._undo(srv, head)  # a SQL PREPARE that failed
                return True, b""
            # This message failed; Postgres skips every message up to the next Sync.
            acts.popleft()
            self._undo(srv, head)
            if head.kind == A_BIND and head.stmt and self._stale_plan(body):
                # After DDL: the next Parse of this text gets a fresh statement.
                self.ctx.statements.retire(head.stmt)
            while acts and acts[0].kind not in (A_SYNC, A_QUERY, A_FUNCTION):
                self._undo(srv, acts.popleft())
            if not acts:
                # The client's Sync has not been sent yet: what it sends until then
                # is skipped by Postgres, so pgherd must not act on it either.
                self.skip_to_sync = True
            return True, b""
        if t == P.B_READY_FOR_QUERY:
            while acts and acts[0].kind not in (A_SYNC, A_QUERY, A_FUNCTION):
                self._undo(srv, acts.popleft())  # messages Postgres skipped after an error
            if acts:
                acts.popleft()
            return True, take_synth(acts)
        done = ((k == A_PARSE and t == P.B_PARSE_COMPLETE) or (k == A_BIND and t == P.B_BIND_COMPLETE)
                or (k == A_CLOSE and t == P.B_CLOSE_COMPLETE)
                or (k in (A_DESCRIBE_S, A_DESCRIBE_P) and t in (P.B_ROW_DESCRIPTION, P.B_NO_DATA))
                or (k == A_EXECUTE and t in _EXECUTE_END))
        if done:
            acts.popleft()
            if k == A_PARSE:
                self.ctx.statements.validated(head.stmt)
            return not head.swallow, take_synth(acts)
        return True, b""  # rows, ParameterDescription, COPY data...: part of the head's replies

    def _undo(self, srv: ServerConn, action: Action) -> None:
        """A Parse or PREPARE that failed or was skipped: its statement does not exist."""
        if action.kind in (A_PARSE, A_QUERY) and action.stmt:
            srv.statements.discard(action.stmt)
        if action.client_name:
            self.statements.pop(action.client_name, None)
            self.sql_statements.pop(action.client_name, None)

    def _whole_messages(self) -> list[tuple[int, int, int]] | None:
        """(type, body start, body end) of every message in the buffer, or None unless the
        buffer holds only whole, well-formed client messages."""
        if self.skip:
            return None
        out, last = [], 0
        try:
            for t, b0, b1 in iter_messages(self.buf, 0, self.end, self.ctx.max_message_size):
                if t not in _VALID_REQUEST_TYPES:
                    return None
                out.append((t, b0, b1))
                last = b1
        except E.ProtocolViolation:
            return None
        return out if last == self.end else None

    def _opens_transaction(self) -> bool:
        """Statement mode: does a complete Query or Parse in the buffer open a transaction?"""
        buf = self.buf
        try:
            for t, b0, b1 in iter_messages(buf, 0, self.end, self.ctx.max_message_size):
                if t == P.F_QUERY and starts_transaction(M.read_query(buf[b0:b1])):
                    return True
                if t == P.F_PARSE and starts_transaction(M.read_parse(buf[b0:b1]).query):
                    return True
        except (E.ProtocolViolation, ValueError):
            pass  # the scan that follows reports malformed input
        return False

    # ---------------------------------------------------------------- session state
    def _note_changes(self, t: int, sql_bytes) -> int:
        """If a Query changes session state, queue the changes for its ReadyForQuery.

        Callers check router.settings.may_change first, so most queries never get here.
        """
        changes, _ = analyze(bytes(sql_bytes).decode("utf-8", "replace"))
        if not changes:
            return t
        if not self.change_queue and self.tx_backup is None:
            self.reply_error = False
        self.change_queue.append(changes)
        return t | SETTLES

    def _note_parse(self, query: str) -> None:
        """A Parse of a statement that changes session state settles at the next Sync."""
        changes, _ = analyze(query)
        if changes:
            self.pending_parse_changes += changes

    def _settle_parse_changes(self, t: int) -> int:
        if not self.change_queue and self.tx_backup is None:
            self.reply_error = False
        self.change_queue.append(self.pending_parse_changes)
        self.pending_parse_changes = ()
        return t | SETTLES

    def _settle(self, srv: ServerConn, changes: tuple, before: int) -> None:
        """A request that changed session state finished: apply it as Postgres did.

        Outside a transaction the changes stand unless the request failed or rolled
        back; inside one they stand tentatively until COMMIT, and ROLLBACK (or a
        failed transaction) undoes them ("SET": effects of SET inside a transaction
        block are undone by ROLLBACK).
        """
        error, self.reply_error = self.reply_error, False
        if srv.tx == P.TX_IDLE:
            if self.tx_backup is not None or before != P.TX_IDLE:
                self._end_transaction(srv, before, changes)
            elif not error and not self.last_tag.startswith("ROLLBACK"):
                self._apply(srv, changes)
            return
        if self.tx_backup is None:
            self.tx_backup = (dict(self.settings), dict(srv.set_params))
        if srv.tx != P.TX_FAILED:
            self._apply(srv, changes)

    def _end_transaction(self, srv: ServerConn, before: int, changes: tuple = ()) -> None:
        committed = before != P.TX_FAILED and not self.last_tag.startswith("ROLLBACK")
        if committed:
            self._apply(srv, changes)
        elif self.tx_backup is not None:
            settings, server = self.tx_backup
            self.settings, srv.set_params = dict(settings), dict(server)
        self.tx_backup = None
        self.reply_error = False

    def _apply(self, srv: ServerConn, changes: tuple) -> None:
        for c in changes:
            kind = c.kind
            if c.local and kind in ("set", "reset", "pin", "unpin"):
                continue  # SET LOCAL ends with the transaction on the server by itself
            if kind == "set":
                self.settings[c.name] = c.value
                srv.set_params[c.name] = c.value
                self.pool.validated_settings.add((c.name, c.value))
            elif kind == "reset":
                srv.set_params.pop(c.name, None)  # the server is back at its own default
                if c.name in self.startup:
                    self.settings[c.name] = self.startup[c.name]
                    self.needs_sync = True
                else:
                    self.settings.pop(c.name, None)
            elif kind in ("reset_all", "discard_all"):
                self.settings = dict(self.startup)
                srv.set_params = {}
                self.needs_sync = bool(self.startup)
                self.pinned_role = self.pinned_untracked = False
                if kind == "discard_all":
                    self.locks = 0
                    srv.statements.clear()
            elif kind == "pin":
                self.pinned_role = True
            elif kind == "unpin":
                self.pinned_role = False
            elif kind == "lock":
                self.locks += 1
            elif kind == "unlock":
                self.locks = max(0, self.locks - 1)
            elif kind == "unlock_all":
                self.locks = 0
            else:  # a change pgherd cannot follow: keep the server with this client
                self.pinned_untracked = True

    @property
    def pinned(self) -> bool:
        """SET ROLE / SESSION AUTHORIZATION, session advisory locks or untracked state."""
        return self.pinned_role or self.locks > 0 or self.pinned_untracked

    async def _answer_set_locally(self) -> bool:
        """A lone SET of values already seen to work, from a client without a server."""
        buf, end = self.buf, self.end
        if end < 5 or self.skip:
            return False
        t, length = _unpack_hdr(buf, 0)
        if t != P.F_QUERY or length + 1 != end or not _LONE_SET.match(buf, 5):
            return False
        changes, only_set = analyze(bytes(buf[5:end - 1]).decode("utf-8", "replace"))
        valid = self.pool.validated_settings
        if not only_set or not changes or any(
                c.local or c.kind not in ("set", "reset") or (c.kind == "set" and (c.name, c.value) not in valid)
                for c in changes):
            return False
        out = []
        for c in changes:
            if c.kind == "set":
                self.settings[c.name] = c.value
            elif c.name in self.startup:
                self.settings[c.name] = self.startup[c.name]
            else:
                self.settings.pop(c.name, None)
            out.append(M.command_complete("SET" if c.kind == "set" else "RESET"))
        out.append(M.ready_for_query(P.TX_IDLE))
        self.end = 0
        await self.send(b"".join(out))
        return True

    async def _recv_request(self, srv: ServerConn | None) -> int:
        if self.ctx.client_idle_timeout or self.ctx.client_idle_in_transaction_timeout:
            return await self._recv_with_idle_timeouts(srv)
        return await net.recv_into(self.sock, self.view[self.end:])

    def push_notification(self, message: bytes, limit: int) -> None:
        """A NotificationResponse for this client (from its pool's listening connection)."""
        if len(self.notify_queue) >= limit:
            log.warning("client %s: %d notifications queued (pub_sub_channel_size); dropping the oldest",
                        self.addr, limit)
            del self.notify_queue[0]
        self.notify_queue.append(message)
        if self._idle_scope is not None:
            self._idle_scope.cancel()

    async def _pubsub_statement(self) -> bool:
        """Answer a lone LISTEN/UNLISTEN in a pooled mode through the pool's listener."""
        buf, end = self.buf, self.end
        if self.skip or end < 6:
            return False
        t, length = _unpack_hdr(buf, 0)
        if t != P.F_QUERY or length + 1 != end or not _LISTEN_START.match(buf, 5):
            return False
        parsed = pubsub.parse(bytes(buf[5:end - 1]).decode("utf-8", "replace"))
        if parsed is None:
            return False
        verb, channel = parsed
        self.end = 0
        listener = self.ctx.pubsub.for_pool(self.cluster.main)
        try:
            if verb == "listen":
                await listener.listen(self, channel)
                self.channels.add(channel)
            else:
                await listener.unlisten(self, channel)
                if channel == "*":
                    self.channels.clear()
                else:
                    self.channels.discard(channel)
        except Exception as exc:
            await self.send(E.error_response(E.CONNECTION_FAILURE, f"{verb.upper()} failed: {exc}")
                            + M.ready_for_query(self._tx_status()))
            return True
        await self.send(M.command_complete(verb.upper()) + M.ready_for_query(self._tx_status()))
        return True

    def _tx_status(self) -> int:
        return self.server.tx if self.server is not None else P.TX_IDLE

    async def _recv_with_idle_timeouts(self, srv: ServerConn | None) -> int:
        """Read the client's next request, enforcing the client idle timeouts.

        client_idle_in_transaction_timeout applies while the client holds a server
        inside a transaction (the transaction is rolled back on the way out);
        client_idle_timeout while it has no transaction open.
        """
        in_tx = srv is not None and srv.tx != P.TX_IDLE
        limit = self.ctx.client_idle_in_transaction_timeout if in_tx else self.ctx.client_idle_timeout
        if not limit:
            return await net.recv_into(self.sock, self.view[self.end:])
        with trio.move_on_after(limit):
            return await net.recv_into(self.sock, self.view[self.end:])
        if in_tx:
            raise E.PgError("25P03", "terminating connection due to idle-in-transaction timeout "
                            f"(client_idle_in_transaction_timeout {limit * 1000:.0f} ms)", fatal=True)
        raise E.PgError("57P05", f"terminating connection due to idle-session timeout "
                        f"(client_idle_timeout {limit * 1000:.0f} ms)", fatal=True)

    async def _pump(self, srv: ServerConn) -> None:
        """Relay server replies until every expected ReadyForQuery arrived or COPY IN starts."""
        timeout = self.ctx.query_timeout
        if timeout and srv.owes_reply():
            # query_timeout counts only time spent waiting for the server, never
            # time the client spends idle inside a transaction.
            with trio.move_on_after(timeout) as scope:
                while srv.owes_reply():
                    await self._pump_once(srv, shield_send=True)
            if scope.cancelled_caught:
                log.info("client %s user=%s db=%s: query_timeout after %.0f ms: cancelling", self.addr,
                         self.user, self.database, timeout * 1000)
                await self.cancel_server_query()  # Postgres answers 57014
        while srv.owes_reply():
            await self._pump_once(srv)

    async def _pump_once(self, srv: ServerConn, shield_send: bool = False) -> None:
        conn = srv.conn
        if conn.rstart == conn.rend:
            conn.rstart = conn.rend = 0
        elif conn.rend == len(conn.rbuf):
            conn._compact()
        try:
            conn.rend += await net.recv_into(srv.sock, memoryview(conn.rbuf)[conn.rend:])
        except net.PeerClosed:
            await self._server_lost(srv)
        if shield_send:
            # A timeout must never cut a message to the client in half.
            with trio.CancelScope(shield=True):
                await self._forward_server(srv)
        else:
            await self._forward_server(srv)

    async def _poll_server(self, srv: ServerConn) -> None:
        """During COPY IN, forward whatever the server already sent (e.g. an error), without waiting."""
        conn = srv.conn
        if conn.rend == len(conn.rbuf):
            conn._compact()
        try:
            n = net.try_recv_into(srv.sock, memoryview(conn.rbuf)[conn.rend:])
        except net.PeerClosed:
            await self._server_lost(srv)
        if n > 0:
            conn.rend += n
            await self._forward_server(srv)

    async def _forward_server(self, srv: ServerConn) -> None:
        if srv.actions:
            return await self._forward_tracked(srv, self._skip_server_body(srv))
        p = self._scan_server(srv)
        if self.refuse_at >= 0:
            await self._refuse_transaction(srv, self.refuse_at, p)
        if p > srv.conn.rstart:
            srv.pool.sent += p - srv.conn.rstart
            await self._send_reply(srv, p)

    async def _send_reply(self, srv: ServerConn, p: int) -> None:
        """Send the server's buffered bytes up to p to the client."""
        conn = srv.conn
        try:
            await net.send_all(self.sock, memoryview(conn.rbuf)[conn.rstart:p])
        except net.PeerClosed:
            conn.rstart = p
            self.lost_mid_reply = True
            raise
        conn.rstart = p

    @staticmethod
    def _skip_server_body(srv: ServerConn) -> int:
        """Pass over the rest of a message body already forwarded; the scan's start."""
        conn = srv.conn
        p = conn.rstart
        if srv.skip:
            take = min(srv.skip, conn.rend - p)
            p += take
            srv.skip -= take
        return p

    def _scan_server(self, srv: ServerConn) -> int:
        """Account for the server messages buffered for an untracked client (no I/O).

        Returns the end of the bytes ready to go to the client.  In statement mode a
        ReadyForQuery that opens a transaction stops the scan: refuse_at is then its
        offset and the return value the end of that message.
        """
        conn = srv.conn
        p = self._skip_server_body(srv)
        buf, end = conn.rbuf, conn.rend
        self.refuse_at = -1
        statement = self.mode == "statement"
        while end - p >= 5:
            t, length = _unpack_hdr(buf, p)
            if length < 4:
                srv.broken = True
                raise E.PgError(E.PROTOCOL_VIOLATION, "server sent an invalid message length", fatal=True)
            stop = p + 1 + length
            if t == P.B_ERROR_RESPONSE and stop <= end and _is_fatal(buf[p + 5:stop]):
                srv.fatal = True
            if (self.change_queue or self.tx_backup is not None) and stop <= end:
                if t == P.B_ERROR_RESPONSE:
                    self.reply_error = True
                elif t == P.B_COMMAND_COMPLETE:
                    self.last_tag = bytes(buf[p + 5:stop - 1]).decode("ascii", "replace")
            if statement and t == P.B_READY_FOR_QUERY and stop <= end and buf[p + 5] != P.TX_IDLE:
                self.refuse_at = p
                return stop
            if t in _NEEDS_BODY:
                if stop > end:
                    if 1 + length > len(buf):
                        conn._grow(1 + length)  # keeps bytes from rstart on
                        shift = conn.rstart
                        p -= shift
                        conn.rstart = 0
                        conn.rend -= shift
                    break
                self._on_server_message(srv, t, buf, p + 5, stop)
            elif stop > end:
                srv.skip = stop - end
                p = end
                break
            p = stop
        return p

    async def _refuse_transaction(self, srv: ServerConn, rfq: int, stop: int) -> None:
        """Statement mode forbids transactions (as PgBouncer): the client gets an error
        in place of the ReadyForQuery that would open one, and is disconnected; the
        server is rolled back on the way out."""
        conn = srv.conn
        await net.send_all(self.sock, memoryview(conn.rbuf)[conn.rstart:rfq])
        srv.tx = conn.rbuf[rfq + 5]
        srv.ready_for_query()
        conn.rstart = stop
        raise E.PgError(E.FEATURE_NOT_SUPPORTED,
                        "transaction blocks are not allowed in statement pooling mode",
                        hint="use pooler_mode transaction or session for this user or database",
                        fatal=True)

    async def _forward_tracked(self, srv: ServerConn, p: int) -> None:
        """_forward_server for a tracked client: replies matched against srv.actions."""
        conn = srv.conn
        buf, end = conn.rbuf, conn.rend
        out: list[bytes] = []
        seg = conn.rstart  # start of the bytes to forward as they are
        while end - p >= 5:
            t, length = _unpack_hdr(buf, p)
            if length < 4:
                srv.broken = True
                raise E.PgError(E.PROTOCOL_VIOLATION, "server sent an invalid message length", fatal=True)
            stop = p + 1 + length
            if stop > end:
                if t in _NEEDS_BODY or t in _TRACKED_WHOLE:
                    if 1 + length > len(buf):
                        if seg < p:
                            out.append(bytes(buf[seg:p]))
                        conn.rstart = seg = p
                        conn._compact()
                        conn._grow(1 + length)
                        buf, p, end = conn.rbuf, 0, conn.rend
                        seg = 0
                    break
                # A long row or COPY chunk: pass what we have, skip the rest later.
                forward, synth = self._match_reply(srv, t)
                srv.skip = stop - end
                p = end
                break
            if (self.change_queue or self.tx_backup is not None) and t == P.B_COMMAND_COMPLETE:
                self.last_tag = bytes(buf[p + 5:stop - 1]).decode("ascii", "replace")
            elif t == P.B_ERROR_RESPONSE:
                self.reply_error = True
                srv.fatal = srv.fatal or _is_fatal(buf[p + 5:stop])
            if t in _NEEDS_BODY:
                self._on_server_message(srv, t, buf, p + 5, stop)
            forward, synth = self._match_reply(
                srv, t, bytes(buf[p + 5:stop]) if t == P.B_ERROR_RESPONSE else b"")
            if not forward:
                if seg < p:
                    out.append(bytes(buf[seg:p]))
                seg = stop
            if synth:
                if seg < stop:
                    out.append(bytes(buf[seg:stop]))
                out.append(synth)
                seg = stop
            p = stop
        if seg < p:
            out.append(bytes(buf[seg:p]))
        conn.rstart = p
        if out:
            data = b"".join(out)
            srv.pool.sent += len(data)
            try:
                await net.send_all(self.sock, data)
            except net.PeerClosed:
                self.lost_mid_reply = True
                raise

    def _on_server_message(self, srv: ServerConn, t: int, buf, b0: int, b1: int) -> None:
        if t == P.B_READY_FOR_QUERY:
            before = srv.tx
            srv.tx = buf[b0]
            answered = srv.ready_for_query()
            if answered is None:
                srv.broken = True  # a ReadyForQuery nobody asked for: out of sync
            elif answered & SETTLES:
                self._settle(srv, self.change_queue.popleft(), before)
            elif self.tx_backup is not None and srv.tx == P.TX_IDLE:
                self._end_transaction(srv, before)
            srv.count_reply(trio.current_time())
        elif t == P.B_PARAMETER_STATUS:
            name, value = M.read_parameter_status(buf[b0:b1])
            srv.conn.params[name] = value
        else:  # CopyInResponse / CopyBothResponse
            srv.start_copy_in()

    async def _wait_either(self, srv: ServerConn) -> str:
        """Wait until the client or the server socket is readable."""
        which = "client"
        async with trio.open_nursery() as nursery:
            async def wait_server():
                nonlocal which
                await net.wait_readable(srv.sock)
                which = "server"
                nursery.cancel_scope.cancel()

            async def wait_client():
                await net.wait_readable(self.sock)
                nursery.cancel_scope.cancel()

            nursery.start_soon(wait_server)
            nursery.start_soon(wait_client)
        return which

    # ================================================================ servers
    async def _attach(self) -> bool:
        """Check out a server for the request at the head of the buffer.

        On failure the client gets the error in place of each reply it expects
        and stays connected, or is disconnected if the request is incomplete.
        """
        ctx = self.ctx
        if self.cluster.replicated:
            return await self._attach_balanced()
        srv = None
        if not (ctx.paused or ctx.maintenance) and not self.pool.closed:
            srv = self.pool.try_checkout()  # an idle server at hand: no waiting, no scope
        if srv is None:
            srv = await self._wait_for_server()
            if srv is None:
                return False
        return await self._prepare_server(srv)

    async def _wait_for_server(self) -> ServerConn | None:
        """_checkout inside a scope a CancelRequest can cancel; None (answered) if cancelled."""
        self.state = "waiting"
        try:
            with trio.CancelScope() as self._wait_scope:
                srv = await self._checkout()
        finally:
            self._wait_scope = None
        if srv is None:
            # Cancelled while waiting: the request never reached a server.
            self.state = "active"
            await self._fail_request(E.PgError(E.QUERY_CANCELED, "canceling statement due to user request"))
        return srv

    async def _checkout(self) -> ServerConn | None:
        """Wait for the gates and a server of the client's pool (None if cancelled)."""
        ctx = self.ctx
        if ctx.paused or ctx.maintenance:
            await ctx.wait_gate(self.database)
        if self.cluster.closed:
            # The configuration was reloaded: use the pools that now serve this login.
            _, cluster = ctx.lookup(self.user, self.database)
            if cluster is None:
                raise E.PgError(E.INVALID_CATALOG_NAME,
                                f'database "{self.database}" is no longer served for user "{self.user}"',
                                fatal=True)
            self.cluster = cluster
            self.pool = cluster.main if not cluster.replicated else self._balanced_pool(cluster)
        try:
            return await self.pool.checkout()
        except E.PgError as exc:
            self.state = "active"
            if self.cluster.replicated and exc.code in _HOST_DOWN:
                raise  # _attach_balanced bans the host and tries another
            await self._fail_request(exc)
            raise _Answered() from None

    # ---------------------------------------------------------------- load balancing (worker/cluster.py)
    async def _attach_balanced(self) -> bool:
        """Pick the host for this request (primary for writes, a replica for reads), then a server.

        A host whose connections fail is banned (here at once, everywhere via the supervisor)
        and a read moves on to the next host without the client seeing an error.
        """
        if await self._answer_begin_locally():
            return False
        rw = self._head_rw() if self.mode != "session" else None
        wanted = self._wanted_role(rw)
        read = self._reads_only(rw, wanted)
        forced = read and wanted == "replica"  # asked for: a replica even under prefer_primary
        begin = self._take_begin()
        shard = self.cluster.shards[0]
        tried: list = []
        while True:
            pool = shard.pick_read(tried, forced) if read else (shard.primary() or shard.pools[0])
            self.pool = pool
            try:
                srv = None
                if not (self.ctx.paused or self.ctx.maintenance):
                    srv = pool.try_checkout()
                if srv is None:
                    srv = await self._wait_for_server()
                    if srv is None:
                        return False
            except E.PgError as exc:
                self.ctx.health.fail(pool.key, exc.message)
                tried.append(pool)
                if read and len(tried) < len(shard.pools):
                    continue
                await self._fail_request(exc)
                return False
            break
        if not await self._prepare_server(srv):
            return False
        if begin:
            try:
                await srv.conn.simple_query(begin)
                srv.tx = srv.conn.tx_status
            except ServerError as exc:
                self._maybe_release()
                await self._fail_request(E.PgError(exc.code, exc.fields.get("M", str(exc))))
                return False
            except (net.PeerClosed, OSError):
                await self._server_lost(srv)
        return True

    def _balanced_pool(self, cluster):
        shard = cluster.shards[0]
        return shard.primary() or shard.pools[0]

    def _head_query(self) -> str | None:
        """The SQL of the request at the head of the buffer (Query, Parse, or Bind of a known statement)."""
        if self.end < 5 or self.skip:
            return None
        t, length = _unpack_hdr(self.buf, 0)
        if self.end < length + 1:
            return None  # a long message still arriving: treat as a write
        if t == P.F_QUERY:
            return bytes(self.buf[5:length]).decode("utf-8", "replace")
        if t == P.F_PARSE:
            return M.read_parse(self.view[5:length + 1]).query
        if t == P.F_BIND:
            name = M.read_bind(self.view[5:length + 1]).statement
            glob = self.statements.get(name)
            return self.ctx.statements.query(glob) if glob else None
        return None

    def _head_rw(self):
        sql = self._head_query()
        return self.ctx.rw.classify(sql) if sql is not None else None

    def _wanted_role(self, rw) -> str | None:
        """The role the client asked for: this statement's comment, else its session setting."""
        if rw is not None and rw.role in ("primary", "replica"):
            return rw.role
        return self.role_override

    def _reads_only(self, rw, wanted: str | None) -> bool:
        """Whether this request (and, inside a deferred transaction, its transaction) may use a replica.

        rw: the request's classification (None when unknown, or in session mode); wanted: the
        role the client asked for (_wanted_role)."""
        if wanted in ("primary", "replica"):
            return wanted == "replica"
        if rw is None:
            return False
        if self.begun is not None:
            # The first statement after a held BEGIN decides the transaction's host.
            if self.begun == "ro" or rw.set_tx_read_only:
                return True
            return self.ctx.rw_aggressive and not rw.write and rw.begin is None
        if rw.begin is not None:
            return not rw.write and (rw.begin == "ro" or rw.set_tx_read_only)
        return not rw.write

    async def _answer_begin_locally(self) -> bool:
        """Statements the load balancer answers itself; True when answered.

        BEGIN is held until the next statement shows whether the transaction only reads: a lone
        BEGIN is answered by pgherd and remembered, and COMMIT or ROLLBACK of a transaction that
        never reached a server is answered too. SET / RESET pgherd.role (pgdog.role) changes the
        client's role override. Both as a simple Query, or an unnamed Parse/Bind/Execute/Sync.
        """
        if self.mode == "session" or self.end < 5:
            return False
        messages = self._whole_messages()
        if not messages:
            return False
        types = [t for t, _, _ in messages]
        if types == [P.F_QUERY]:
            sql, extended = bytes(self.buf[messages[0][1]:messages[0][2] - 1]).decode("utf-8", "replace"), b""
        elif types[0] == P.F_PARSE and types[-1] == P.F_SYNC and types[1:-1] in (
                [P.F_BIND, P.F_EXECUTE], [P.F_BIND, P.F_DESCRIBE, P.F_EXECUTE]):
            parse = M.read_parse(self.view[messages[0][1]:messages[0][2]])
            if parse.name or parse.param_types:
                return False
            sql = parse.query
            extended = M.parse_complete() + M.bind_complete() + (M.no_data() if len(types) == 5 else b"")
        else:
            return False
        rw = self.ctx.rw.classify(sql)
        if rw.set_role is not None and rw.statements == 1:
            self.role_override = self.startup_role if rw.set_role == "reset" else rw.set_role
            tag, status = ("RESET" if rw.set_role == "reset" else "SET"), (
                P.TX_IN_TRANSACTION if self.begun is not None else self._tx_status())
        elif self.mode != "transaction" or self.server is not None:
            return False
        elif self.begun is None and rw.begin is not None and rw.statements == 1:
            self.begun = rw.begin
            self.begin_sql = sql
            tag, status = "BEGIN", P.TX_IN_TRANSACTION
        elif self.begun is not None and rw.tx_end:
            word = sql.split(None, 1)[0].rstrip(";").upper() if sql.strip() else ""
            self.begun = None
            tag, status = ("COMMIT" if word in ("COMMIT", "END") else "ROLLBACK"), P.TX_IDLE
        else:
            return False
        self.end = 0
        await self.send(extended + M.command_complete(tag) + M.ready_for_query(status))
        return True

    def _take_begin(self) -> str:
        if self.begun is None:
            return ""
        self.begun = None
        return self.begin_sql

    async def _prepare_server(self, srv: ServerConn) -> bool:
        pool = self.pool
        srv.client = self
        self.state = "active"
        self.server = srv
        if srv.set_params == self.settings:
            return True  # the common case: nothing to sync, no await
        try:
            await sync_params(srv, self.settings)
        except ServerError as exc:
            self.server = None
            pool.checkin(srv)
            await self._fail_request(E.PgError(exc.code, exc.fields.get("M", str(exc)),
                                               detail=exc.fields.get("D"), hint=exc.fields.get("H")))
            return False
        except (net.PeerClosed, OSError):
            self.server = None
            srv.close()
            pool.checkin(srv)
            await self._fail_request(E.PgError(E.CONNECTION_FAILURE, "server connection lost"))
            return False
        return True

    async def _fail_request(self, exc: E.PgError) -> None:
        """Answer every request in the buffer with exc; keep the client if we can stay in sync."""
        messages = self._whole_messages()
        if messages is None or any(t in (P.F_COPY_DATA, P.F_COPY_DONE, P.F_COPY_FAIL) for t, _, _ in messages):
            exc.fatal = True
            raise exc
        count = sum(1 for t, _, _ in messages if t in _RFQ_TYPES)
        self.end = 0
        out = []
        for _ in range(count):
            out.append(exc.to_bytes())
            out.append(M.ready_for_query(P.TX_IDLE))
        if out:
            await self.send(b"".join(out))

    def _maybe_release(self, now: float | None = None) -> None:
        srv = self.server
        if srv is None or self.mode == "session":
            return
        if srv.broken:
            self.server = None
            srv.pool.checkin(srv, now)
            return
        if srv.tx != P.TX_IDLE or srv.unsynced or srv.copy_in or srv.skip or (srv.expect and srv.owes_reply()):
            return  # (owes_reply() is needed only when expect holds something: a call saved per release)
        if not self.pinned:
            self.server = None
            srv.pool.checkin(srv, now)

    async def _server_lost(self, srv: ServerConn) -> None:
        """The server went away mid-request.

        client_connection_recovery "drop" (PgDog's default) disconnects the client;
        otherwise, if no reply was left half-sent, the client gets the error in
        place of each ReadyForQuery it waits for and keeps its connection.
        """
        srv.broken = True
        self.server = None
        owed = sum(1 for x in srv.expect if x != COPY_END)
        clean = srv.skip == 0 and srv.conn.rstart == srv.conn.rend and self.skip == 0
        srv.pool.checkin(srv)
        self.tx_backup = None
        self.change_queue.clear()
        err = E.PgError(E.CONNECTION_FAILURE, "server closed the connection unexpectedly",
                        hint="the query may or may not have run; retry it")
        if self.ctx.client_connection_recovery == "drop" or not clean or owed == 0:
            if srv.fatal:
                raise ClientGone()  # the client already has the server's FATAL error, as from Postgres
            err.hint = "the query may or may not have run; reconnect and retry"
            err.fatal = True
            raise err
        self.end = 0  # whatever else the client sent belonged to the lost session
        await self.send(err.to_bytes() + M.ready_for_query(P.TX_IDLE) * owed)
        raise _Answered()

    async def _release_dirty(self, srv: ServerConn) -> None:
        """The client left: bring the server back to idle (rollback) or close it."""
        pool = srv.pool
        if srv.broken or self.skip:
            # A message the client left half-sent cannot be completed: close the server.
            srv.broken = True
            pool.checkin(srv)
            return
        needs_reset = self.mode == "session" or srv.set_params or self.pinned
        if srv.idle and not needs_reset and not self.lost_mid_reply:
            pool.checkin(srv)
            return
        recovery = self.ctx.connection_recovery
        in_flight = srv.owes_reply() or srv.copy_in or self.lost_mid_reply
        if recovery != "recover" and self.lost_mid_reply:
            srv.broken = True  # it ran a query for a client that was already gone
            pool.checkin(srv)
            return
        if recovery == "drop" or (recovery == "rollback_only" and in_flight):
            # PgDog's connection_recovery: "drop" never saves a dirty server;
            # "rollback_only" saves it only if no query was left in flight.
            srv.broken = True
            pool.checkin(srv)
            return
        ok = False
        with trio.move_on_after(pool.settings.rollback_timeout):
            try:
                await self._resync(srv)
                if srv.tx != P.TX_IDLE:
                    await srv.conn.simple_query("ROLLBACK")
                    srv.tx = srv.conn.tx_status
                if self.mode == "session" or self.pinned:
                    # Role, advisory locks, prepared statements, settings: all gone.
                    await srv.conn.simple_query("DISCARD ALL")
                    srv.set_params = {}
                    srv.statements.clear()
                ok = srv.tx == P.TX_IDLE
            except (ServerError, net.PeerClosed, OSError, E.PgError) as exc:
                log.info("server %r: cleanup after client %s failed: %s", srv, self.addr, exc)
        if not ok:
            srv.broken = True
        pool.checkin(srv)

    async def _resync(self, srv: ServerConn) -> None:
        """Finish whatever the server was doing for a departed client."""
        conn = srv.conn
        if srv.copy_in:
            await conn.send(M.copy_fail("client disconnected"))
            srv.copy_in = False
        if srv.unsynced:
            await conn.send(M.sync())
            srv.expect.append(P.F_SYNC)
            srv.unsynced = False
        # Skip a half-read reply, then read whole messages until ReadyForQuery.
        while srv.skip:
            if conn.rstart == conn.rend:
                conn.rstart = conn.rend = 0
                conn.rend += await net.recv_into(srv.sock, memoryview(conn.rbuf))
            take = min(srv.skip, conn.rend - conn.rstart)
            conn.rstart += take
            srv.skip -= take
        while srv.owes_reply() or srv.copy_in:
            if srv.copy_in:
                await conn.send(M.copy_fail("client disconnected"))
                srv.copy_in = False
            t, body = await conn.read_message()
            if t == P.B_READY_FOR_QUERY:
                srv.ready_for_query()
                srv.tx = body[0]
            elif t in (P.B_COPY_IN_RESPONSE, P.B_COPY_BOTH_RESPONSE):
                srv.start_copy_in()
        conn.tx_status = srv.tx
        srv.actions.clear()

    # ================================================================ cancel
    async def cancel_server_query(self) -> None:
        if self._wait_scope is not None:
            self._wait_scope.cancel()  # still waiting for a server: the query never runs
            return
        if self.fast_waiter is not None and self.ctx.reactor.cancel_wait(self):
            return
        servers = list(self.sharded.servers.values()) if self.sharded is not None else [self.server]
        for srv in servers:
            if srv is not None and not srv.broken:
                await send_cancel(srv.conn.host, srv.conn.port, srv.conn.pid, srv.conn.secret)


def new_secret() -> int:
    return secrets.randbits(31)
