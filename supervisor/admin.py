"""Admin console answers, aggregated over every worker's snapshot (PgBouncer's columns)."""

from __future__ import annotations

import time
from collections import defaultdict

from pgherd import __version__

POOL_KEY = ("database", "user", "host", "port", "shard", "role")
# Counters summed over workers for a pool.
POOL_COUNTS = ("cl_active", "cl_waiting", "sv_active", "sv_idle", "sv_used", "sv_login", "errors")
STAT_COUNTS = ("xact_count", "query_count", "received", "sent", "xact_time", "query_time", "wait_time")


def merge_pools(snaps: list[dict]) -> list[dict]:
    """One row per pool, worker shares summed (SHOW POOLS reports instance totals)."""
    merged: dict[tuple, dict] = {}
    for snap in snaps:
        for p in snap["pools"]:
            key = tuple(p[k] for k in POOL_KEY)
            row = merged.get(key)
            if row is None:
                row = merged[key] = {k: p[k] for k in POOL_KEY}
                row.update({k: 0 for k in POOL_COUNTS + STAT_COUNTS})
                row.update(maxwait=0.0, pool_mode=p["pool_mode"], banned=False, paused=False,
                           pool_size=0, configured_size=p["configured_size"])
            for k in POOL_COUNTS + STAT_COUNTS:
                row[k] += p[k]
            row["pool_size"] += p["pool_size"]
            row["maxwait"] = max(row["maxwait"], p["maxwait"])
            row["banned"] = row["banned"] or p["banned"]
            row["paused"] = row["paused"] or p["paused"]
    return sorted(merged.values(), key=lambda r: (r["database"], r["user"], r["shard"], r["host"], r["port"]))


def show_pools(snaps):
    cols = ["database", "user", "cl_active", "cl_waiting", "cl_active_cancel_req", "cl_waiting_cancel_req",
            "sv_active", "sv_active_cancel", "sv_being_canceled", "sv_idle", "sv_used", "sv_tested",
            "sv_login", "maxwait", "maxwait_us", "pool_mode", "host", "port", "shard", "role", "banned",
            "paused", "pool_size", "errors"]
    rows = []
    for p in merge_pools(snaps):
        mw = p["maxwait"]
        rows.append([p["database"], p["user"], p["cl_active"], p["cl_waiting"], 0, 0, p["sv_active"], 0, 0,
                     p["sv_idle"], p["sv_used"], 0, p["sv_login"], int(mw), int((mw - int(mw)) * 1_000_000),
                     p["pool_mode"], p["host"], p["port"], p["shard"], p["role"], int(p["banned"]),
                     int(p["paused"]),
                     p["pool_size"], p["errors"]])
    return cols, rows


def _ts(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) + " " + time.strftime("%Z")


def show_clients(snaps):
    cols = ["type", "user", "database", "state", "addr", "port", "connect_time", "request_time", "wait",
            "wait_us", "close_needed", "ptr", "link", "remote_pid", "tls", "application_name", "worker", "id"]
    rows = []
    for snap in snaps:
        for c in snap["clients"]:
            rows.append(["C", c["user"], c["database"], c["state"], c["addr"], c["port"], _ts(c["connect_time"]),
                         _ts(c["connect_time"]), 0, 0, 0, f"{c['pid']:x}",
                         "" if c["server_pid"] is None else f"{c['server_pid']:x}",
                         c["server_pid"] or 0, "", c["application_name"], c["worker"], c["pid"]])
    return cols, rows


def show_servers(snaps):
    cols = ["type", "user", "database", "state", "addr", "port", "connect_time", "request_time", "wait",
            "wait_us", "close_needed", "ptr", "link", "remote_pid", "tls", "application_name", "worker",
            "shard", "role"]
    rows = []
    for snap in snaps:
        for s in snap["servers"]:
            rows.append(["S", s["user"], s["database"], s["state"], s["host"], s["port"], _ts(s["connect_time"]),
                         _ts(s["request_time"]), 0, 0, 0, f"{s['backend_pid']:x}", "", s["backend_pid"], "",
                         "pgherd", s["worker"], s["shard"], s["role"]])
    return cols, rows


def database_totals(snaps) -> dict[str, dict]:
    totals: dict[str, dict] = defaultdict(lambda: {k: 0 for k in STAT_COUNTS})
    for p in merge_pools(snaps):
        t = totals[p["database"]]
        for k in STAT_COUNTS:
            t[k] += p[k]
    return dict(totals)


def averages(prev: dict[str, dict], cur: dict[str, dict], seconds: float) -> dict[str, dict]:
    """PgBouncer's avg_* over one stats_period: rates per second, times per transaction/query (µs)."""
    out = {}
    for db, c in cur.items():
        p = prev.get(db, {k: 0 for k in STAT_COUNTS})
        d = {k: max(0, c[k] - p[k]) for k in STAT_COUNTS}
        secs = max(seconds, 1e-9)
        out[db] = {
            "avg_xact_count": d["xact_count"] / secs, "avg_query_count": d["query_count"] / secs,
            "avg_recv": d["received"] / secs, "avg_sent": d["sent"] / secs,
            "avg_xact_time": d["xact_time"] // d["xact_count"] if d["xact_count"] else 0,
            "avg_query_time": d["query_time"] // d["query_count"] if d["query_count"] else 0,
            "avg_wait_time": d["wait_time"] // d["xact_count"] if d["xact_count"] else 0,
        }
    return out


def show_stats(snaps, avgs: dict[str, dict]):
    cols = ["database", "total_xact_count", "total_query_count", "total_received", "total_sent",
            "total_xact_time", "total_query_time", "total_wait_time", "avg_xact_count", "avg_query_count",
            "avg_recv", "avg_sent", "avg_xact_time", "avg_query_time", "avg_wait_time"]
    rows = []
    for db, t in sorted(database_totals(snaps).items()):
        a = avgs.get(db, {})
        rows.append([db, t["xact_count"], t["query_count"], t["received"], t["sent"], t["xact_time"],
                     t["query_time"], t["wait_time"], int(a.get("avg_xact_count", 0)),
                     int(a.get("avg_query_count", 0)), int(a.get("avg_recv", 0)), int(a.get("avg_sent", 0)),
                     int(a.get("avg_xact_time", 0)), int(a.get("avg_query_time", 0)),
                     int(a.get("avg_wait_time", 0))])
    return cols, rows


def show_config(config):
    cols = ["key", "value", "default", "changeable"]
    g = config.general
    rows = []
    for name, field in type(g).model_fields.items():
        value = getattr(g, name)
        default = field.default if field.default is not None else ""
        rows.append([name, "" if value is None else str(value), str(default), "yes" if name not in
                     ("host", "port", "workers") else "no"])
    return cols, rows


def show_version():
    return ["version"], [[f"pgherd {__version__}"]]


def show_lists(snaps, config):
    pools = merge_pools(snaps)
    clients = [c for s in snaps for c in s["clients"]]
    servers = [x for s in snaps for x in s["servers"]]
    rows = [["databases", len(config.database_names())], ["users", len(config.users)], ["pools", len(pools)],
            ["free_clients", 0], ["used_clients", len(clients)],
            ["login_clients", sum(1 for c in clients if c["state"] == "login")], ["free_servers", 0],
            ["used_servers", len(servers)], ["dns_names", 0], ["dns_zones", 0], ["dns_queries", 0],
            ["dns_pending", 0]]
    return ["list", "items"], rows


def show_workers(workers: dict):
    cols = ["index", "pid", "node", "state", "uptime", "clients", "restarts", "cpu_seconds", "rss_bytes"]
    rows = []
    for index in sorted(workers):
        w = workers[index]
        rows.append([index, w["pid"], w["node"], w["state"], int(w["uptime"]), w["clients"], w["restarts"],
                     round(w["cpu_seconds"], 3), w["rss_bytes"]])
    return cols, rows


def show_replication(hosts: list[dict]):
    """One row per monitored host (supervisor/monitor.Monitor.snapshot)."""
    cols = ["database", "shard", "host", "port", "role", "configured_role", "pg_is_in_recovery", "lsn",
            "lag_bytes", "lag_ms", "banned", "healthy"]
    rows = [[h["database"], h["shard"], h["host"], h["port"], h["role"], h["configured_role"], h["in_recovery"],
             h["lsn"], h["lag_bytes"], h["lag_ms"], h["banned"], h["healthy"]] for h in hosts]
    return cols, rows


def show_bans(hosts: list[dict]):
    """One row per banned host; `remaining` is seconds left of ban_timeout (0: held until the
    host passes a check, or for a lag ban until the replica catches up)."""
    cols = ["database", "shard", "host", "port", "reason", "remaining"]
    rows = [[h["database"], h["shard"], h["host"], h["port"], h["ban_reason"], round(h["ban_left"], 1)]
            for h in hosts if h["banned"]]
    return cols, rows


def show_healthcheck(hosts: list[dict]):
    """HEALTHCHECK: the result of the check just run on every monitored host."""
    cols = ["database", "shard", "host", "port", "healthy", "role", "pg_is_in_recovery", "lsn", "lag_bytes",
            "banned", "check_ms", "error"]
    rows = [[h["database"], h["shard"], h["host"], h["port"], h["healthy"], h["role"], h["in_recovery"], h["lsn"],
             h["lag_bytes"], h["banned"], h["check_ms"], h["check_error"] or h["error"]] for h in hosts]
    return cols, rows


QUERY_CACHE_COUNTS = ("hits", "misses", "entries", "bytes", "evictions", "direct", "cross_shard", "refused")


def show_query_cache(snaps):
    """The route caches of sharded databases, summed over workers (each worker has its own)."""
    merged: dict[str, dict] = {}
    for snap in snaps:
        for database, counts in snap.get("query_cache", {}).items():
            row = merged.setdefault(database, dict.fromkeys(QUERY_CACHE_COUNTS, 0))
            for k in QUERY_CACHE_COUNTS:
                row[k] += counts.get(k, 0)
    cols = ["database", *QUERY_CACHE_COUNTS]
    return cols, [[db, *(row[k] for k in QUERY_CACHE_COUNTS)] for db, row in sorted(merged.items())]
