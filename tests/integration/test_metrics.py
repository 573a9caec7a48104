"""The OpenMetrics endpoint (issue 3), scraped over HTTP and parsed with prometheus_client's
OpenMetrics parser: per-pool gauges and totals with PgDog's names and labels, the global
`clients` gauge, per-worker process metrics, all prefixed by openmetrics_namespace. Values are
checked against a known workload and against SHOW STATS / Postgres.
"""

from __future__ import annotations

import threading
import urllib.error
import urllib.request

import psutil
import psycopg
import pytest

from prometheus_client.openmetrics import parser as prometheus_parser

from pgherd.shared.localpg import free_port

pytestmark = pytest.mark.timeout(60)

TEST_DB = "pgherd_test"
WORKERS = 3
NAMESPACE = "pgherd_"
POOL_LABELS = {"user", "database", "host", "port", "shard", "role"}
POOL_GAUGES = ("cl_waiting", "sv_active", "sv_idle", "maxwait", "errors")
POOL_TOTALS = ("total_xact_count", "total_query_count", "total_received", "total_sent", "total_xact_time",
               "total_query_time")
WORKER_METRICS = ("worker_cpu_seconds", "worker_rss_bytes", "worker_clients", "worker_restarts")


def worker_of(pid: int) -> int:
    return (pid >> 22) - 1


def admin_connect(proc) -> psycopg.Connection:
    return psycopg.connect(proc.admin_dsn(), autocommit=True, connect_timeout=10, prepare_threshold=None)


def connect_on_workers(proc, helpers, wanted: dict[int, int], user: str = "alice", tries: int = 300
                       ) -> list[psycopg.Connection]:
    kept: dict[int, list[psycopg.Connection]] = {w: [] for w in wanted}
    for _ in range(tries):
        if all(len(kept[w]) >= n for w, n in wanted.items()):
            return [c for cs in kept.values() for c in cs]
        conn = helpers.connect(proc.dsn(user, helpers.PASSWORDS[user]))
        w = worker_of(conn.info.backend_pid)
        if w in kept and len(kept[w]) < wanted[w]:
            kept[w].append(conn)
        else:
            conn.close()
    pytest.fail(f"could not place connections {wanted} on workers in {tries} attempts")


class Scrape:
    """One parsed scrape: families by name, and sample lookup by name and labels."""

    def __init__(self, url: str) -> None:
        with urllib.request.urlopen(url, timeout=10) as resp:
            self.status = resp.status
            self.content_type = resp.headers.get("Content-Type", "")
            self.text = resp.read().decode()
        # Raises ValueError on anything that is not valid OpenMetrics text.
        self.families = {f.name: f for f in prometheus_parser.text_string_to_metric_families(self.text)}

    def family(self, name: str):
        full = NAMESPACE + name
        assert full in self.families, f"no metric family {full}; have {sorted(self.families)}"
        return self.families[full]

    def samples(self, name: str, **labels: str) -> list:
        fam = self.family(name)
        return [s for s in fam.samples if all(s.labels.get(k) == v for k, v in labels.items())]

    def value(self, name: str, **labels: str) -> float:
        found = [s for s in self.samples(name, **labels) if not s.name.endswith("_created")]
        assert len(found) == 1, f"{name}{labels}: {found}"
        return found[0].value


@pytest.fixture(scope="module")
def metrics(pgherd_module, helpers):
    port = free_port()
    proc = pgherd_module(
        general={"workers": WORKERS, "default_pool_size": 30, "min_pool_size": 0, "checkout_timeout": 20_000,
                 "openmetrics_host": "127.0.0.1", "openmetrics_port": port, "openmetrics_namespace": NAMESPACE},
        users=[
            {"name": "alice", "password": "alice-secret", "database": TEST_DB},
            {"name": "bob", "password": "bob-secret", "database": TEST_DB, "pool_size": 2},
        ],
    )
    with admin_connect(proc) as admin:
        helpers.wait_for(lambda: [r[3] for r in admin.execute("SHOW WORKERS").fetchall()] == ["serving"] * WORKERS,
                         timeout=20, what="every worker serving")
    proc.metrics_url = f"http://127.0.0.1:{port}/metrics"
    return proc


def scrape(proc) -> Scrape:
    return Scrape(proc.metrics_url)


def pool_labels(pg, user: str) -> dict[str, str]:
    return {"user": user, "database": TEST_DB, "host": pg.host, "port": str(pg.port), "shard": "0", "role": "primary"}


def test_scrape_is_valid_openmetrics_with_the_namespace(metrics):
    s = scrape(metrics)
    assert s.status == 200
    assert s.content_type.startswith("application/openmetrics-text"), s.content_type
    assert s.text.rstrip("\n").endswith("# EOF")
    assert s.families
    outside = [name for name in s.families if not name.startswith(NAMESPACE)]
    assert not outside, f"metrics without the {NAMESPACE!r} prefix: {outside}"
    for name in POOL_GAUGES + POOL_TOTALS + ("clients",) + WORKER_METRICS:
        s.family(name)
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(metrics.metrics_url.replace("/metrics", "/nothing"), timeout=10)
    assert info.value.code == 404


def test_pool_metrics_carry_pgdog_labels(metrics, pg):
    s = scrape(metrics)
    for name in POOL_GAUGES + POOL_TOTALS:
        fam = s.family(name)
        assert fam.samples, name
        for sample in fam.samples:
            assert set(sample.labels) == POOL_LABELS, (name, sample.labels)
        users = {sample.labels["user"] for sample in fam.samples}
        assert users == {"alice", "bob"}, (name, users)
        for user in ("alice", "bob"):
            assert len(s.samples(name, **pool_labels(pg, user))) >= 1, (name, user, fam.samples)


def test_pool_gauges_follow_the_clients(metrics, helpers, pg, pg_admin):
    # alice: 3 open transactions on three workers; bob (1 server per worker): 2 clients on one worker.
    alice = connect_on_workers(metrics, helpers, {0: 1, 1: 1, 2: 1})
    bob = connect_on_workers(metrics, helpers, {0: 2}, user="bob")
    release = threading.Event()
    errors: list[BaseException] = []

    def bob_client(conn):
        try:
            conn.execute("begin")
            conn.execute("select 1")
            release.wait(30)
            conn.execute("commit")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=bob_client, args=(c,), daemon=True) for c in bob]
    try:
        for conn in alice:
            conn.execute("begin")
            conn.execute("select 1")
        for t in threads:
            t.start()
        s = helpers.wait_for(lambda: (lambda s: s if s.value("cl_waiting", **pool_labels(pg, "bob")) == 1 else None)(
            scrape(metrics)), timeout=10, what="bob's waiting client in the metrics")
        a, b = pool_labels(pg, "alice"), pool_labels(pg, "bob")
        assert s.value("sv_active", **a) == 3
        assert s.value("cl_waiting", **a) == 0
        assert s.value("sv_active", **b) == 1
        in_tx = [x for x in helpers.server_backends(pg_admin, metrics, pg) if x["state"] == "idle in transaction"]
        assert len(in_tx) == 4, in_tx
        assert s.value("errors", **a) == 0 and s.value("errors", **b) == 0
        assert s.value("sv_idle", **a) >= 0
        first = s.value("maxwait", **b)
        helpers.wait_for(lambda: scrape(metrics).value("maxwait", **b) >= first + 0.3, timeout=5,
                         what="bob's maxwait to grow")
        # Global: every client connection (no admin connection is open now).
        assert s.value("clients") == len(alice) + len(bob)
    finally:
        release.set()
        for t in threads:
            t.join(20)
        for conn in alice + bob:
            conn.close()
    assert not errors, errors
    # alice's clients left mid-transaction: their servers are rolled back, then idle again.
    a, b = pool_labels(pg, "alice"), pool_labels(pg, "bob")
    helpers.wait_for(lambda: (lambda s: s.value("clients") == 0 and s.value("sv_active", **a) == 0
                              and s.value("sv_active", **b) == 0)(scrape(metrics)),
                     timeout=5, what="clients and active servers back to 0")
    s = scrape(metrics)
    assert s.value("cl_waiting", **b) == 0
    assert s.value("maxwait", **b) == 0


def test_pool_totals_count_a_known_workload(metrics, helpers, pg):
    conns = connect_on_workers(metrics, helpers, {w: 2 for w in range(WORKERS)})
    a = pool_labels(pg, "alice")
    queries = 60
    try:
        before = scrape(metrics)
        for i in range(queries):
            assert conns[i % len(conns)].execute("select 1").fetchone() == (1,)

        after = helpers.wait_for(
            lambda: (lambda s: s if s.value("total_xact_count", **a) - before.value("total_xact_count", **a) >= queries
                     else None)(scrape(metrics)), timeout=5, what="the metrics to count the queries")
        d = {name: after.value(name, **a) - before.value(name, **a) for name in POOL_TOTALS}
        assert d["total_xact_count"] == queries, d
        assert d["total_query_count"] >= queries, d
        assert d["total_received"] >= queries * 14, d
        assert d["total_sent"] >= queries * 30, d
        assert d["total_xact_time"] > 0 and d["total_query_time"] > 0, d
        # The same numbers as SHOW STATS (alice is the only user with traffic now).
        with admin_connect(metrics) as admin:
            cur = admin.execute("SHOW STATS")
            cols = [c.name for c in cur.description]
            stats = [dict(zip(cols, r)) for r in cur.fetchall() if r[0] == TEST_DB][0]
        s = scrape(metrics)
        b = pool_labels(pg, "bob")
        for name in ("total_xact_count", "total_query_count", "total_received", "total_sent"):
            assert s.value(name, **a) + s.value(name, **b) == stats[name], (name, stats)
    finally:
        for conn in conns:
            conn.close()


def test_per_worker_process_metrics(metrics, helpers):
    conns = connect_on_workers(metrics, helpers, {0: 2, 1: 1})
    try:
        s = scrape(metrics)
        with admin_connect(metrics) as admin:
            cur = admin.execute("SHOW WORKERS")
            cols = [c.name for c in cur.description]
            workers = {r[0]: dict(zip(cols, r)) for r in cur.fetchall()}
        for name in WORKER_METRICS:
            by_worker = {}
            for sample in s.family(name).samples:
                if sample.name.endswith("_created"):
                    continue
                assert set(sample.labels) == {"worker", "node"}, sample
                by_worker[int(sample.labels["worker"])] = sample
            assert set(by_worker) == set(range(WORKERS)), (name, by_worker)
            for w, sample in by_worker.items():
                assert sample.labels["node"] == str(workers[w]["node"])
        for w in range(WORKERS):
            rss = s.value("worker_rss_bytes", worker=str(w))
            real = psutil.Process(workers[w]["pid"]).memory_info().rss
            assert 0.5 * real <= rss <= 2 * real, (w, rss, real)
            assert s.value("worker_cpu_seconds", worker=str(w)) > 0
            assert s.value("worker_restarts", worker=str(w)) == 0
        assert s.value("worker_clients", worker="0") == 2
        assert s.value("worker_clients", worker="1") == 1
        assert s.value("worker_clients", worker="2") == 0
    finally:
        for conn in conns:
            conn.close()


def test_metrics_keys_are_not_reported_as_ignored(metrics):
    for key in ("general.openmetrics_port", "general.openmetrics_host", "general.openmetrics_namespace"):
        assert f"config key {key} is accepted but not supported" not in metrics.log(), metrics.log_tail()
