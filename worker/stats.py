"""A worker's snapshot of its pools, clients and servers, for SHOW commands and metrics."""

from __future__ import annotations

import os
import time

import trio


def _addr(addr) -> tuple[str, int]:
    if isinstance(addr, tuple) and len(addr) >= 2:
        return str(addr[0]), int(addr[1])
    return str(addr), 0


def snapshot(ctx) -> dict:
    """Plain data (orjson-serialisable) describing everything this worker holds."""
    now = trio.current_time()
    wall = time.time()
    pools = []
    clients_by_pool: dict[int, list] = {}
    clients = []
    for c in ctx.clients.values():
        pool = c.pool
        state = "waiting" if c.state == "waiting" else ("active" if c.server is not None else "idle")
        host, port = _addr(c.addr)
        clients.append({
            "user": c.user, "database": c.database, "state": state, "addr": host, "port": port,
            "connect_time": wall - (now - c.connect_time), "pid": c.pid, "worker": ctx.index,
            "server_pid": c.server.conn.pid if c.server is not None else None,
            "application_name": c.settings.get("application_name", ""),
        })
        if pool is not None:
            clients_by_pool.setdefault(id(pool), []).append(state)
    servers = []
    for pool in list(ctx.pools.values()) + ctx.draining:
        states = clients_by_pool.get(id(pool), [])
        pools.append({
            "database": pool.database, "user": pool.user, "host": pool.settings.host,
            "port": pool.settings.port, "shard": pool.shard, "role": pool.role,
            "pool_mode": pool.settings.pooler_mode, "pool_size": pool.settings.pool_size,
            "configured_size": pool.configured_size,
            "cl_active": sum(1 for s in states if s != "waiting"),
            # Waiting for a server: in the pool's queue or held by PAUSE/MAINTENANCE.
            "cl_waiting": sum(1 for s in states if s == "waiting"),
            "sv_active": pool.active, "sv_idle": len(pool.idle), "sv_used": 0,
            "sv_login": pool.opening, "maxwait": pool.maxwait(),
            "paused": ctx.gated(pool.database), "banned": ctx.health.banned(pool.key), "errors": pool.errors,
            "xact_count": pool.xact_count, "query_count": pool.query_count,
            "received": pool.received, "sent": pool.sent,
            # Microseconds, as PgBouncer's SHOW STATS.
            "xact_time": int(pool.xact_time * 1_000_000), "query_time": int(pool.query_time * 1_000_000),
            "wait_time": int(pool.wait_time * 1_000_000),
        })
        for srv in pool.idle:
            servers.append(_server_row(ctx, pool, srv, "idle", now, wall))
    for c in ctx.clients.values():
        if c.server is not None:
            servers.append(_server_row(ctx, c.server.pool, c.server, "active", now, wall))
    query_cache = {db: r.stats()._asdict() for db, r in ctx.routers.items()}
    return {"index": ctx.index, "pid": os.getpid(), "node": ctx.node, "pools": pools, "query_cache": query_cache,
            "clients": clients, "servers": servers, "started": wall - (now - ctx.started)}


def _server_row(ctx, pool, srv, state: str, now: float, wall: float) -> dict:
    return {"user": pool.user, "database": pool.database, "state": state,
            "host": srv.conn.host, "port": srv.conn.port, "backend_pid": srv.conn.pid,
            "connect_time": wall - (now - srv.created), "request_time": wall - (now - srv.last_used),
            "worker": ctx.index, "shard": pool.shard, "role": pool.role}
