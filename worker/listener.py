"""The listening socket (SO_REUSEPORT) and the accept loop."""

from __future__ import annotations

import errno
import logging
import socket

import trio

from pgherd.shared import net

log = logging.getLogger("pgherd.listener")

# Kernel accept queue: bursts of new clients (e.g. 500 pgbench clients) wait
# here instead of getting ECONNREFUSED.
LISTEN_BACKLOG = 1024
# How long to back off when accept() fails for lack of file descriptors.
EMFILE_BACKOFF = 0.1


def bind_listener(host: str, port: int) -> list[socket.socket]:
    """Bind host:port with SO_REUSEPORT so several workers can share the port."""
    socks = []
    hosts = [h.strip() for h in host.split(",")] if host else ["0.0.0.0"]
    for h in hosts:
        for family, type_, proto, _, addr in socket.getaddrinfo(h or None, port, type=socket.SOCK_STREAM,
                                                               flags=socket.AI_PASSIVE):
            sock = socket.socket(family, type_, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(addr)
                sock.listen(LISTEN_BACKLOG)
                sock.setblocking(False)
            except OSError as exc:
                sock.close()
                for s in socks:
                    s.close()
                raise OSError(exc.errno, f"cannot listen on {h}:{port}: {exc.strerror}") from exc
            socks.append(sock)
            break
    return socks


async def accept_loop(sock: socket.socket, nursery: trio.Nursery, handle) -> None:
    """Accept clients forever and start `handle(sock, addr)` for each in nursery."""
    while True:
        await net.wait_readable(sock)
        while True:
            try:
                client, addr = sock.accept()
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("accept failed: %s; backing off", exc)
                    await trio.sleep(EMFILE_BACKOFF)
                    break
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                raise
            net.make_nonblocking(client)
            nursery.start_soon(handle, client, addr)
