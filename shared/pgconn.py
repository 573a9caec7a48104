"""A small trio PostgreSQL client: connect, authenticate, run simple queries.

Used by worker pools (server connections), the supervisor's monitor and 2PC
recovery.  It speaks the v3 protocol through shared.wire on a raw non-blocking
socket, which the worker's relay later drives directly.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass, field

import trio

from . import net
from .tls import TlsError, wrap_client_side
from .wire import messages as M
from .wire import protocol as P
from .wire.framing import HEADER, check_length
from .wire.md5 import md5_response
from .wire.scram import MECHANISM as SCRAM_MECHANISM
from .wire.scram import ScramClient, ScramError

# Enough for the login exchange and small query results without resizing.
RECV_BUFFER = 64 * 1024
# A server message larger than this while we decode it (not relay) is refused:
# pgconn only runs small control queries.
MAX_DECODED_MESSAGE = 256 * 1024 * 1024


class ServerError(Exception):
    """Postgres answered with an ErrorResponse."""

    def __init__(self, fields: dict[str, str]):
        self.fields = fields
        self.code = fields.get("C", "XX000")
        self.severity = fields.get("V") or fields.get("S", "ERROR")
        super().__init__(f"{self.severity}: {fields.get('M', 'unknown error')} (SQLSTATE {self.code})")


class ConnectError(Exception):
    """The connection to Postgres could not be established or authenticated."""


@dataclass
class Result:
    """One statement's result from a simple query."""
    columns: list[str] = field(default_factory=list)
    rows: list[list[str | None]] = field(default_factory=list)
    tag: str = ""


class PgConn:
    """One authenticated connection to a Postgres server."""

    def __init__(self, sock: socket.socket, host: str, port: int):
        self.sock = sock
        self.host = host
        self.port = port
        self.params: dict[str, str] = {}
        self.pid = 0
        self.secret = 0
        self.tx_status = P.TX_IDLE
        self.notices: list[dict[str, str]] = []
        self.rbuf = bytearray(RECV_BUFFER)
        self.rstart = 0
        self.rend = 0
        self.closed = False

    # ---------------------------------------------------------------- connect
    @classmethod
    async def connect(cls, host: str, port: int, *, user: str, database: str,
                      password: str | None = None, params: dict[str, str] | None = None,
                      timeout: float = 5.0, tls: ssl.SSLContext | None = None,
                      tls_required: bool = False) -> "PgConn":
        """Open, (TLS,) start up and authenticate; raises ConnectError or ServerError."""
        sock = None
        try:
            with trio.fail_after(timeout):
                sock = await net.connect_tcp(host, port)
                if tls is not None:
                    sock = await _negotiate_tls(sock, tls, host, tls_required)
                conn = cls(sock, host, port)
                startup = {"user": user, "database": database}
                startup.update(params or {})
                await net.send_all(sock, M.startup_message(startup))
                await conn._authenticate(user, password)
                await conn._finish_startup()
                return conn
        except trio.TooSlowError:
            net.close_quietly(sock)
            raise ConnectError(f"timed out connecting to {host}:{port} after {timeout:g}s") from None
        except (OSError, net.PeerClosed, TlsError) as exc:
            net.close_quietly(sock)
            raise ConnectError(f"cannot connect to {host}:{port}: {exc}") from exc
        except BaseException:
            net.close_quietly(sock)
            raise

    async def _authenticate(self, user: str, password: str | None) -> None:
        # "Message Flow: Start-up": the server sends Authentication* requests
        # until AuthenticationOk or an ErrorResponse.
        scram: ScramClient | None = None
        while True:
            t, body = await self.read_message()
            if t == P.B_ERROR_RESPONSE:
                raise ServerError(M.read_error_fields(body))
            if t == P.B_NEGOTIATE_PROTOCOL_VERSION:
                continue
            if t != P.B_AUTHENTICATION:
                raise ConnectError(f"unexpected message {chr(t)!r} during authentication")
            code, data = M.read_authentication(body)
            if code == P.AUTH_OK:
                return
            if code in (P.AUTH_CLEARTEXT, P.AUTH_MD5, P.AUTH_SASL) and password is None:
                raise ConnectError(f"server {self.host}:{self.port} asks for a password for user "
                                   f"\"{user}\" but none is configured (users.toml password or server_password)")
            if code == P.AUTH_CLEARTEXT:
                await self.send(M.password_message(password))
            elif code == P.AUTH_MD5:
                await self.send(M.password_message(md5_response(user, password, data[:4])))
            elif code == P.AUTH_SASL:
                mechs = M.read_sasl_mechanisms(data)
                if SCRAM_MECHANISM not in mechs:
                    raise ConnectError(f"server offers unsupported SASL mechanisms {mechs}")
                scram = ScramClient(user, password)
                await self.send(M.sasl_initial_response(SCRAM_MECHANISM, scram.client_first()))
            elif code == P.AUTH_SASL_CONTINUE and scram is not None:
                try:
                    await self.send(M.sasl_response(scram.client_final(data)))
                except ScramError as exc:
                    raise ConnectError(f"SCRAM authentication with server failed: {exc}") from exc
            elif code == P.AUTH_SASL_FINAL and scram is not None:
                try:
                    scram.verify_server_final(data)
                except ScramError as exc:
                    raise ConnectError(f"server's SCRAM signature is invalid: {exc}") from exc
            else:
                raise ConnectError(f"unsupported authentication request {code} from server")

    async def _finish_startup(self) -> None:
        while True:
            t, body = await self.read_message()
            if t == P.B_PARAMETER_STATUS:
                k, v = M.read_parameter_status(body)
                self.params[k] = v
            elif t == P.B_BACKEND_KEY_DATA:
                self.pid, self.secret = M.read_backend_key_data(body)
            elif t == P.B_READY_FOR_QUERY:
                self.tx_status = body[0]
                return
            elif t == P.B_ERROR_RESPONSE:
                raise ServerError(M.read_error_fields(body))
            elif t == P.B_NOTICE_RESPONSE:
                self.notices.append(M.read_error_fields(body))

    # ---------------------------------------------------------------- I/O
    async def send(self, data: bytes) -> None:
        await net.send_all(self.sock, data)

    async def read_message(self) -> tuple[int, bytes]:
        """Next complete message as (type, body)."""
        while True:
            avail = self.rend - self.rstart
            if avail >= 5:
                t, length = HEADER.unpack_from(self.rbuf, self.rstart)
                check_length(t, length, MAX_DECODED_MESSAGE)
                total = length + 1
                if avail >= total:
                    body = bytes(self.rbuf[self.rstart + 5:self.rstart + total])
                    self.rstart += total
                    return t, body
                if total > len(self.rbuf):
                    self._grow(total)
            if self.rstart and self.rend == self.rstart:
                self.rstart = self.rend = 0
            if self.rend == len(self.rbuf):
                self._compact()
            n = await net.recv_into(self.sock, memoryview(self.rbuf)[self.rend:])
            self.rend += n

    def _compact(self) -> None:
        if self.rstart:
            rest = self.rend - self.rstart
            self.rbuf[0:rest] = self.rbuf[self.rstart:self.rend]
            self.rstart, self.rend = 0, rest
        if self.rend == len(self.rbuf):
            self._grow(len(self.rbuf) * 2)

    def _grow(self, size: int) -> None:
        new = bytearray(max(size, len(self.rbuf)))
        rest = self.rend - self.rstart
        new[0:rest] = self.rbuf[self.rstart:self.rend]
        self.rbuf, self.rstart, self.rend = new, 0, rest

    def take_buffered(self) -> bytes:
        """Bytes received but not yet consumed (handed to the relay)."""
        data = bytes(self.rbuf[self.rstart:self.rend])
        self.rstart = self.rend = 0
        return data

    # ---------------------------------------------------------------- queries
    async def simple_query(self, sql: str) -> list[Result]:
        """Run a simple query; return each statement's result.

        Reads through ReadyForQuery even on error, then raises ServerError, so
        the connection stays in sync and usable.
        """
        await self.send(M.query(sql))
        return await self.read_results()

    async def read_results(self) -> list[Result]:
        results: list[Result] = []
        cur = Result()
        error: ServerError | None = None
        while True:
            t, body = await self.read_message()
            if t == P.B_ROW_DESCRIPTION:
                cur.columns = [f.name for f in M.read_row_description(body)]
            elif t == P.B_DATA_ROW:
                cur.rows.append([None if v is None else v.decode() for v in M.read_data_row(body)])
            elif t == P.B_COMMAND_COMPLETE:
                cur.tag = M.read_command_complete(body)
                results.append(cur)
                cur = Result()
            elif t == P.B_EMPTY_QUERY_RESPONSE:
                results.append(cur)
                cur = Result()
            elif t == P.B_ERROR_RESPONSE:
                error = ServerError(M.read_error_fields(body))
            elif t == P.B_PARAMETER_STATUS:
                k, v = M.read_parameter_status(body)
                self.params[k] = v
            elif t == P.B_NOTICE_RESPONSE:
                self.notices.append(M.read_error_fields(body))
            elif t == P.B_COPY_IN_RESPONSE:
                await self.send(M.copy_fail("pgconn does not support COPY FROM STDIN"))
            elif t == P.B_READY_FOR_QUERY:
                self.tx_status = body[0]
                if error is not None:
                    raise error
                return results

    async def fetch_value(self, sql: str) -> str | None:
        res = await self.simple_query(sql)
        for r in res:
            if r.rows:
                return r.rows[0][0]
        return None

    def close(self) -> None:
        """Send Terminate if possible and close the socket (never blocks)."""
        if self.closed:
            return
        self.closed = True
        try:
            self.sock.send(M.terminate())
        except OSError:
            pass
        net.close_quietly(self.sock)


async def _negotiate_tls(sock, ctx: ssl.SSLContext, host: str, required: bool):
    """SSLRequest, then TLS if the server answers 'S' ("SSL Session Encryption")."""
    await net.send_all(sock, M.ssl_request())
    answer = bytearray(1)
    await net.recv_into(sock, memoryview(answer))
    if answer == b"S":
        return await wrap_client_side(ctx, sock, host)
    if answer != b"N":
        raise ConnectError(f"server answered SSLRequest with {bytes(answer)!r}")
    if required:
        raise ConnectError(f"server {host} does not support TLS, and tls_verify requires it")
    return sock


async def send_cancel(host: str, port: int, pid: int, secret: int, timeout: float = 5.0) -> None:
    """Send a CancelRequest on a new connection ("Canceling Requests in Progress")."""
    sock = None
    with trio.move_on_after(timeout):
        try:
            sock = await net.connect_tcp(host, port)
            await net.send_all(sock, M.cancel_request(pid, secret))
            # The server closes the connection after processing the request.
            buf = bytearray(16)
            try:
                await net.recv_into(sock, memoryview(buf))
            except net.PeerClosed:
                pass
        except OSError:
            pass
        finally:
            net.close_quietly(sock)


def quote_literal(value: str) -> str:
    """A SQL string literal (standard_conforming_strings on): double the quotes."""
    if "\\" in value:
        return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"
    return "'" + value.replace("'", "''") + "'"


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


