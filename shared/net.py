"""Non-blocking raw socket I/O for trio: the shape DESIGN.md's hot-path rules ask for.

Each helper waits with trio.lowlevel.wait_readable/wait_writable and then does one
syscall on a plain non-blocking socket, avoiding SocketStream's per-call overhead.
"""

from __future__ import annotations

import os
import socket
import ssl

import trio

wait_readable = trio.lowlevel.wait_readable
wait_writable = trio.lowlevel.wait_writable


class PeerClosed(Exception):
    """The other end closed the connection (or reset it)."""


def make_nonblocking(sock: socket.socket) -> socket.socket:
    sock.setblocking(False)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        # Requests and replies are small and latency-bound: never wait for Nagle.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


_PLAIN = socket.socket
_TLS_CLOSED = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionResetError, BrokenPipeError, TimeoutError)


def _closed(exc: Exception) -> PeerClosed:
    if isinstance(exc, ssl.SSLError) and not isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return PeerClosed(f"TLS error: {exc}")
    return PeerClosed(str(exc))


async def recv_into(sock: socket.socket, view: memoryview) -> int:
    """Wait until readable, then read into view. Returns >0 or raises PeerClosed."""
    if type(sock) is not _PLAIN:
        return await _tls_recv_into(sock, view)
    while True:
        await wait_readable(sock)
        try:
            n = sock.recv_into(view)
        except BlockingIOError:
            continue
        except (ConnectionResetError, BrokenPipeError, TimeoutError) as exc:
            raise PeerClosed(str(exc)) from exc
        if n == 0:
            raise PeerClosed("connection closed by peer")
        return n


async def _tls_recv_into(sock: ssl.SSLSocket, view: memoryview) -> int:
    # Decrypted bytes may already sit in OpenSSL's buffer with nothing left on
    # the fd: read those first, wait on the fd only when there are none.
    while True:
        if not sock.pending():
            await wait_readable(sock)
        try:
            n = sock.recv_into(view)
        except ssl.SSLWantReadError:
            continue
        except ssl.SSLWantWriteError:
            await wait_writable(sock)
            continue
        except (*_TLS_CLOSED, ssl.SSLError) as exc:
            raise _closed(exc) from exc
        if n == 0:
            raise PeerClosed("connection closed by peer")
        return n


def try_recv_into(sock: socket.socket, view: memoryview) -> int:
    """Read without waiting: >0 bytes, -1 when nothing is available; PeerClosed on EOF."""
    try:
        n = sock.recv_into(view)
    except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
        return -1
    except (*_TLS_CLOSED, ssl.SSLError) as exc:
        raise _closed(exc) from exc
    if n == 0:
        raise PeerClosed("connection closed by peer")
    return n


async def send_all(sock: socket.socket, data: bytes | bytearray | memoryview) -> None:
    """Send every byte, waiting for writability only on a short send."""
    try:
        n = sock.send(data)
    except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
        n = 0
    except (*_TLS_CLOSED, ssl.SSLError) as exc:
        raise _closed(exc) from exc
    if n == len(data):
        return
    view = memoryview(data)[n:]
    while view:
        await wait_writable(sock)
        try:
            n = sock.send(view)
        except (BlockingIOError, ssl.SSLWantWriteError):
            continue
        except ssl.SSLWantReadError:
            await wait_readable(sock)
            continue
        except (*_TLS_CLOSED, ssl.SSLError) as exc:
            raise _closed(exc) from exc
        view = view[n:]


async def connect_tcp(host: str, port: int) -> socket.socket:
    """Open a non-blocking TCP connection (trio resolves the name without blocking)."""
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    last: Exception | None = None
    for family, type_, proto, _, addr in infos:
        sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        try:
            try:
                sock.connect(addr)
            except BlockingIOError:
                await wait_writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, f"connect to {host}:{port}: {os.strerror(err)}")
            return make_nonblocking(sock)
        except BaseException as exc:
            sock.close()
            if not isinstance(exc, OSError):
                raise
            last = exc
    raise last or OSError(f"cannot resolve {host}:{port}")


def close_quietly(sock: socket.socket | None) -> None:
    if sock is None:
        return
    try:
        trio.lowlevel.notify_closing(sock)
    except Exception:
        pass
    try:
        sock.close()
    except OSError:
        pass
