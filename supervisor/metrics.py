"""The OpenMetrics endpoint: pool and process metrics from every worker, on one port.

Exposition is prometheus_client's (custom collectors, OpenMetrics text format);
this module only gathers the numbers and serves HTTP GET /metrics.
"""

from __future__ import annotations

import logging

import trio
from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST, generate_latest

from . import admin as A

log = logging.getLogger("pgherd.metrics")

# A scrape request line and headers must arrive within this time and size.
REQUEST_TIMEOUT = 5.0
MAX_REQUEST = 16 * 1024
POOL_LABELS = ["user", "database", "host", "port", "shard", "role"]
POOL_GAUGES = [("cl_active", "Clients attached to a server or ready to run"),
               ("cl_waiting", "Clients waiting for a server connection"),
               ("sv_active", "Server connections in use by a client"),
               ("sv_idle", "Server connections idle in the pool"),
               ("sv_login", "Server connections being opened"),
               ("maxwait", "Seconds the oldest waiting client has waited"),
               ("pool_size", "Pool size over all workers")]
# Cumulative totals are exposed as gauges on purpose: OpenMetrics appends
# "_total" to counter names, and dashboards read PgDog's exact names
# (total_xact_count, not total_xact_count_total). rate() works on them as usual.
POOL_TOTALS = [("errors", "errors", "Server connection errors"),
                 ("total_xact_count", "xact_count", "Transactions completed"),
                 ("total_query_count", "query_count", "Queries completed"),
                 ("total_received", "received", "Bytes received from clients"),
                 ("total_sent", "sent", "Bytes sent to clients"),
                 ("total_xact_time", "xact_time", "Microseconds spent in transactions"),
                 ("total_query_time", "query_time", "Microseconds spent in queries"),
                 ("total_wait_time", "wait_time", "Microseconds clients waited for a server")]


class _Snapshot:
    """A collector over data gathered before the scrape (collect() must not await)."""

    def __init__(self, namespace: str, pools: list[dict], clients: int, workers: dict) -> None:
        self.ns = namespace
        self.pools = pools
        self.clients = clients
        self.workers = workers

    def collect(self):
        ns = self.ns
        for name, doc in POOL_GAUGES:
            g = GaugeMetricFamily(ns + name, doc, labels=POOL_LABELS)
            for p in self.pools:
                g.add_metric(_labels(p), float(p[name]))
            yield g
        for name, key, doc in POOL_TOTALS:
            c = GaugeMetricFamily(ns + name, doc, labels=POOL_LABELS)
            for p in self.pools:
                c.add_metric(_labels(p), float(p[key]))
            yield c
        g = GaugeMetricFamily(ns + "clients", "Client connections over all workers")
        g.add_metric([], float(self.clients))
        yield g
        wl = ["worker", "node"]
        families = {
            "worker_cpu_seconds": CounterMetricFamily(ns + "worker_cpu_seconds", "Worker CPU time", labels=wl),
            "worker_rss_bytes": GaugeMetricFamily(ns + "worker_rss_bytes", "Worker resident memory", labels=wl),
            "worker_clients": GaugeMetricFamily(ns + "worker_clients", "Clients of this worker", labels=wl),
            "worker_restarts": CounterMetricFamily(ns + "worker_restarts", "Times the worker was restarted",
                                                   labels=wl),
        }
        for index, w in self.workers.items():
            labels = [str(index), str(w["node"])]
            families["worker_cpu_seconds"].add_metric(labels, float(w["cpu_seconds"]))
            families["worker_rss_bytes"].add_metric(labels, float(w["rss_bytes"]))
            families["worker_clients"].add_metric(labels, float(w["clients"]))
            families["worker_restarts"].add_metric(labels, float(w["restarts"]))
        yield from families.values()


def _labels(p: dict) -> list[str]:
    return [p["user"], p["database"], p["host"], str(p["port"]), str(p["shard"]), p["role"]]


async def render(sup) -> bytes:
    snaps = await sup.collect()
    workers = await sup.worker_table()
    namespace = sup.config.general.openmetrics_namespace or ""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(namespace, A.merge_pools(snaps), sum(len(s["clients"]) for s in snaps), workers))
    return generate_latest(registry)


async def _handle(stream: trio.SocketStream, sup) -> None:
    try:
        with trio.fail_after(REQUEST_TIMEOUT):
            data = b""
            while b"\r\n\r\n" not in data and len(data) < MAX_REQUEST:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                data += chunk
        line = data.split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(line) < 2 or line[0] != "GET":
            await _respond(stream, 405, "text/plain", b"only GET is supported\n")
        elif line[1].split("?")[0] not in ("/metrics", "/"):
            await _respond(stream, 404, "text/plain", b"try /metrics\n")
        else:
            await _respond(stream, 200, CONTENT_TYPE_LATEST, await render(sup))
    except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    except Exception:
        log.exception("metrics request failed")
    finally:
        await stream.aclose()


async def _respond(stream, code: int, ctype: str, body: bytes) -> None:
    reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed"}[code]
    head = (f"HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode()
    await stream.send_all(head + body)


async def serve_metrics(sup) -> None:
    g = sup.config.general
    log.info("OpenMetrics on http://%s:%d/metrics", g.openmetrics_host, g.openmetrics_port)
    await trio.serve_tcp(lambda s: _handle(s, sup), g.openmetrics_port, host=g.openmetrics_host)
