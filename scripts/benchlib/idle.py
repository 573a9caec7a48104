"""Idle clients: open N connections that log in and then sit idle; report the proxy's RSS per client.

The clients are raw sockets driven by asyncio (one bench process holds 10,000 of them cheaply):
each sends a StartupMessage (protocol 3.0), expects trust authentication (AuthenticationOk),
reads until ReadyForQuery, and then stays connected without sending anything.
Message formats: PostgreSQL documentation, "Message Formats" (StartupMessage, AuthenticationOk,
ErrorResponse, ReadyForQuery).
"""

from __future__ import annotations

import asyncio
import struct
import time

import psutil

from .procs import tree_rss_bytes, tree_uss_bytes

PROTOCOL_3_0 = 196608
# Logins in flight at once: the proxy's accept queue is 1024 deep; half of that keeps it busy
# without piling up retransmitted SYNs.
CONCURRENCY = 256
# One login may take this long (a 2-core machine logging in thousands of clients is slow, not stuck).
LOGIN_TIMEOUT = 60
# Let the proxy's allocator settle before reading RSS.
SETTLE = 1.0


def startup_message(user: str, database: str) -> bytes:
    body = struct.pack("!i", PROTOCOL_3_0)
    for k, v in (("user", user), ("database", database), ("application_name", "pgherd-bench-idle")):
        body += k.encode() + b"\0" + v.encode() + b"\0"
    body += b"\0"
    return struct.pack("!i", len(body) + 4) + body


def _error_text(body: bytes) -> str:
    fields = {}
    for part in body.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return f"{fields.get('S', 'ERROR')} {fields.get('C', '')}: {fields.get('M', '')}"


async def _login(host: str, port: int, startup: bytes) -> tuple[asyncio.StreamWriter | None, str | None]:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(startup)
    await writer.drain()
    while True:
        header = await reader.readexactly(5)
        kind, length = header[:1], struct.unpack("!i", header[1:])[0]
        body = await reader.readexactly(length - 4)
        if kind == b"R":
            code = struct.unpack("!i", body[:4])[0]
            if code != 0:
                writer.close()
                return None, f"the server asked for authentication (code {code}); the idle test needs trust"
        elif kind == b"E":
            writer.close()
            return None, _error_text(body)
        elif kind == b"Z":
            return writer, None


async def _open_clients(host: str, port: int, user: str, database: str, n: int) -> tuple[list, list[str]]:
    startup = startup_message(user, database)
    sem = asyncio.Semaphore(CONCURRENCY)
    writers: list[asyncio.StreamWriter] = []
    errors: list[str] = []

    async def one() -> None:
        async with sem:
            try:
                writer, error = await asyncio.wait_for(_login(host, port, startup), LOGIN_TIMEOUT)
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as e:
                writer, error = None, f"{type(e).__name__}: {e}"
            if writer is not None:
                writers.append(writer)
            elif len(errors) < 5 and error not in errors:
                errors.append(error)

    await asyncio.gather(*(one() for _ in range(n)))
    return writers, errors


async def _close(writers: list) -> None:
    for w in writers:
        w.write(b"X\0\0\0\4")  # Terminate
        w.close()
    await asyncio.sleep(0.5)


def _mb(n: int | None) -> float | None:
    return None if n is None else n / 2**20


def measure(root: psutil.Process, host: str, port: int, user: str, database: str, n: int) -> dict:
    """Connect n idle clients to the proxy whose process tree is root; return its memory figures."""

    async def main() -> dict:
        # One login first, so pools, caches and lazily imported code exist before the baseline.
        warm, warm_errors = await _open_clients(host, port, user, database, 1)
        if warm_errors:
            return {"status": f"failed: the first login failed: {warm_errors[0]}", "clients_requested": n}
        await _close(warm)
        await asyncio.sleep(SETTLE)
        rss0, procs = tree_rss_bytes(root)
        uss0 = tree_uss_bytes(root)
        t0 = time.monotonic()
        writers, errors = await _open_clients(host, port, user, database, n)
        login_s = time.monotonic() - t0
        await asyncio.sleep(SETTLE)
        rss1, _ = tree_rss_bytes(root)
        uss1 = tree_uss_bytes(root)
        connected = len(writers)
        await _close(writers)
        await asyncio.sleep(SETTLE)
        rss2, _ = tree_rss_bytes(root)
        result = {
            "status": "ok" if connected == n else f"{n - connected} of {n} clients failed to log in",
            "clients_requested": n,
            "clients_connected": connected,
            "errors": errors,
            "login_seconds": round(login_s, 2),
            "logins_per_second": connected / login_s if login_s > 0 else None,
            "processes": procs,
            "rss_before_mb": _mb(rss0),
            "rss_idle_mb": _mb(rss1),
            "rss_after_close_mb": _mb(rss2),
            "uss_before_mb": _mb(uss0),
            "uss_idle_mb": _mb(uss1),
            "rss_per_client_kb": (rss1 - rss0) / connected / 1024 if connected else None,
            "uss_per_client_kb": (uss1 - uss0) / connected / 1024 if connected and uss0 and uss1 else None,
        }
        return result

    return asyncio.run(main())
