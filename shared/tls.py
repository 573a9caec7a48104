"""TLS for both sides: SSL contexts from pgherd's settings and a non-blocking handshake."""

from __future__ import annotations

import socket
import ssl

import trio

# Modes of general.tls_verify (PgDog's names) that refuse a server without TLS.
REQUIRE_TLS = frozenset(["verify_ca", "verify_full"])


class TlsError(Exception):
    """TLS could not be set up (bad files, handshake failure, certificate rejected)."""


def server_context(certificate: str, private_key: str, client_ca: str | None = None) -> ssl.SSLContext:
    """Context for clients connecting to pgherd; client_ca makes client certificates mandatory."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(certificate, private_key)
        if client_ca:
            ctx.load_verify_locations(client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"cannot load TLS certificate {certificate!r} / key {private_key!r}: {exc}") from exc
    return ctx


def client_context(verify: str, ca: str | None, certificate: str | None = None,
                   private_key: str | None = None) -> ssl.SSLContext | None:
    """Context for pgherd connecting to Postgres per tls_verify; None when disabled."""
    if verify == "disabled":
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if verify in REQUIRE_TLS:
            if ca:
                ctx.load_verify_locations(ca)
            else:
                ctx.load_default_certs()
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.check_hostname = verify == "verify_full"
        else:  # prefer: encrypt if the server can, without verifying it
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if certificate and private_key:
            ctx.load_cert_chain(certificate, private_key)
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"cannot set up TLS to servers: {exc}") from exc
    return ctx


async def handshake(sock: ssl.SSLSocket) -> None:
    """Complete the TLS handshake on a non-blocking SSLSocket."""
    while True:
        try:
            sock.do_handshake()
            return
        except ssl.SSLWantReadError:
            await trio.lowlevel.wait_readable(sock)
        except ssl.SSLWantWriteError:
            await trio.lowlevel.wait_writable(sock)
        except (ssl.SSLError, ssl.CertificateError, OSError) as exc:
            raise TlsError(str(exc)) from exc


async def wrap_server_side(ctx: ssl.SSLContext, sock: socket.socket) -> ssl.SSLSocket:
    tls = ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    await handshake(tls)
    return tls


async def wrap_client_side(ctx: ssl.SSLContext, sock: socket.socket, host: str) -> ssl.SSLSocket:
    tls = ctx.wrap_socket(sock, server_hostname=host if ctx.check_hostname else None,
                          do_handshake_on_connect=False)
    await handshake(tls)
    return tls
