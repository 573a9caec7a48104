"""The supervisor's health/LSN monitor (issue 5) against a real primary with two streaming
replicas: SHOW REPLICATION, bans from failed checks and from workers, ban_timeout, lag bans,
BAN/UNBAN/HEALTHCHECK from the admin console, and role = "auto" following a promotion.

Everything is observed from outside: the admin console, and Postgres itself (the monitor's
connections carry application_name "pgherd monitor"). Waits poll with deadlines; intervals in
the configs are short (200-300 ms) so a loaded machine still passes well within them.
"""

from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path

import psutil
import psycopg
import pytest
from psycopg import errors as pgerr

from pgherd.shared.localpg import free_port

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow, pytest.mark.destructive]

TEST_DB = "pgherd_test"
# Checks every 200-300 ms: a ban or a role change shows within a second on an idle machine;
# the deadlines below leave room for a loaded one.
FAST = {
    "idle_healthcheck_interval": 250,
    "idle_healthcheck_delay": 0,
    "healthcheck_timeout": 2000,
    "lsn_check_interval": 250,
    "lsn_check_timeout": 2000,
    "connect_timeout": 2000,
}
DEADLINE = 20.0
LSN_TEXT = re.compile(r"^[0-9A-F]+/[0-9A-F]+$")
MONITOR_APP = "pgherd monitor"


# ---------------------------------------------------------------------------------------------
# fixtures and helpers


def _new_dir() -> Path:
    # Same prefix as tests/conftest.py: a killed run's clusters are reaped by the next one.
    return Path(tempfile.mkdtemp(prefix="pgherd-test-"))


@pytest.fixture(scope="module")
def replicated(request, helpers):
    """(primary, replica1, replica2): a module's own primary with two streaming replicas."""
    base = helpers._base_conftest(request.config)
    primary = base.new_test_cluster(_new_dir())
    replicas = []
    try:
        for _ in range(2):
            replicas.append(primary.add_replica(_new_dir()))
        yield primary, *replicas
    finally:
        for cluster in [*replicas, primary]:
            cluster.destroy()


def host_entries(clusters, roles) -> list[dict]:
    return [{"name": TEST_DB, "host": c.host, "port": c.port, "role": role} for c, role in zip(clusters, roles)]


def admin_connect(proc) -> psycopg.Connection:
    return psycopg.connect(proc.admin_dsn(), autocommit=True, connect_timeout=10, prepare_threshold=None)


def rows(admin: psycopg.Connection, sql: str) -> list[dict]:
    cur = admin.execute(sql)
    cols = [d.name for d in cur.description]
    return [dict(zip(cols, r)) for r in cur.fetchall()]


def replication(admin) -> dict[int, dict]:
    """SHOW REPLICATION rows by port."""
    return {r["port"]: r for r in rows(admin, "SHOW REPLICATION")}


def bans(admin) -> dict[int, dict]:
    return {r["port"]: r for r in rows(admin, "SHOW BANS")}


def pool_banned(admin, port: int) -> list[int]:
    return [p["banned"] for p in rows(admin, "SHOW POOLS") if p["port"] == port]


def lsn_int(text: str) -> int:
    high, low = text.split("/")
    return (int(high, 16) << 32) + int(low, 16)


def wait_for(what: str, predicate, timeout: float = DEADLINE, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}; last: {last!r}")
        time.sleep(interval)


def monitor_backends(cluster) -> int:
    return int(cluster.sql(f"SELECT count(*) FROM pg_stat_activity WHERE application_name = '{MONITOR_APP}'")[0][0])


def supervisor_ports(proc, cluster) -> set[int]:
    """Local ports of the supervisor process's own connections to cluster (the monitor's)."""
    conns = psutil.Process(proc.pid).net_connections(kind="tcp")
    return {c.laddr.port for c in conns if c.raddr and c.raddr.port == cluster.port
            and c.status == psutil.CONN_ESTABLISHED}


def backends_on_ports(cluster, ports: set[int]) -> int:
    listed = ",".join(str(p) for p in ports)
    return int(cluster.sql(f"SELECT count(*) FROM pg_stat_activity WHERE client_port IN ({listed})")[0][0])


def bus_dir(proc) -> str:
    """The supervisor's private bus directory, from a worker's command line (--bus DIR)."""
    for child in psutil.Process(proc.pid).children(recursive=True):
        args = child.cmdline()
        if "--bus" in args:
            return args[args.index("--bus") + 1]
    pytest.fail("no pgherd worker with --bus found")


# ---------------------------------------------------------------------------------------------
# one pgherd for the read-mostly tests (ban_timeout long enough never to expire during them)


@pytest.fixture(scope="module")
def herd(pgherd_module, replicated):
    primary, r1, r2 = replicated
    return pgherd_module(
        general={**FAST, "workers": 2, "lsn_check_delay": 0, "ban_timeout": 120_000},
        databases=host_entries(replicated, ["primary", "replica", "replica"])
        + [{"name": "single", "host": primary.host, "port": primary.port, "database_name": TEST_DB}],
        users=[{"name": "alice", "password": "alice-secret", "database": TEST_DB},
               {"name": "alice", "password": "alice-secret", "database": "single"}],
    )


def test_show_replication_reports_roles_recovery_and_lsns(herd, replicated):
    primary, r1, r2 = replicated
    with admin_connect(herd) as admin:
        def all_known():
            rep = replication(admin)
            return rep if len(rep) == 3 and all(r["lsn"] is not None for r in rep.values()) else None

        rep = wait_for("an LSN for every host", all_known)
        assert set(rep) == {primary.port, r1.port, r2.port}  # "single" has one host: not monitored
        cols = list(rows(admin, "SHOW REPLICATION")[0])
        assert cols == ["database", "shard", "host", "port", "role", "configured_role", "pg_is_in_recovery",
                        "lsn", "lag_bytes", "lag_ms", "banned", "healthy"]
        assert rep[primary.port]["role"] == "primary" and rep[primary.port]["pg_is_in_recovery"] == "false"
        for port in (r1.port, r2.port):
            assert rep[port]["role"] == "replica" and rep[port]["configured_role"] == "replica"
            assert rep[port]["pg_is_in_recovery"] == "true"
        for r in rep.values():
            assert LSN_TEXT.match(r["lsn"]), r
            assert r["database"] == TEST_DB and r["shard"] == 0
            assert r["healthy"] == "true" and r["banned"] == "false"
            assert r["lag_bytes"] is not None and r["lag_bytes"] >= 0

        # WAL written on the primary shows up: its reported LSN moves past the position before
        # the write, and the replicas follow until they report no lag.
        before = lsn_int(primary.sql("SELECT pg_current_wal_lsn()")[0][0])
        primary.sql("CREATE TABLE IF NOT EXISTS monitor_t (i int); INSERT INTO monitor_t SELECT generate_series(1, 1000)",
                    dbname=TEST_DB)
        after = lsn_int(primary.current_lsn())
        assert after > before

        def caught_up():
            rep = replication(admin)
            if lsn_int(rep[primary.port]["lsn"]) < after:
                return None
            reps = [rep[p] for p in (r1.port, r2.port)]
            ok = all(lsn_int(r["lsn"]) >= after and r["lag_bytes"] == 0 and r["lag_ms"] == 0 for r in reps)
            return rep if ok else None

        wait_for("replicas to report they caught up with the write", caught_up)


def test_one_monitor_connection_per_host_for_the_whole_instance(herd, replicated):
    # Two workers, one monitor: each server sees exactly one monitor connection.
    for cluster in replicated:
        wait_for(f"the monitor's connection to {cluster.port}", lambda c=cluster: monitor_backends(c) == 1)
    time.sleep(1.0)  # several check intervals: no second connection appears
    assert [monitor_backends(c) for c in replicated] == [1, 1, 1]


def test_healthcheck_runs_every_check_now(herd, replicated):
    primary, r1, r2 = replicated
    with admin_connect(herd) as admin:
        result = rows(admin, "HEALTHCHECK")
    by_port = {r["port"]: r for r in result}
    assert set(by_port) == {primary.port, r1.port, r2.port}
    for r in by_port.values():
        assert r["healthy"] == "true" and r["error"] is None, r
        assert r["check_ms"] >= 0
        assert LSN_TEXT.match(r["lsn"])
    assert by_port[primary.port]["role"] == "primary" and by_port[primary.port]["pg_is_in_recovery"] == "false"
    assert by_port[r1.port]["pg_is_in_recovery"] == "true"


def test_ban_and_unban_from_the_console_reach_every_worker(herd, replicated):
    primary, r1, r2 = replicated
    with admin_connect(herd) as admin:
        assert bans(admin) == {}
        # host:port
        admin.execute(f"BAN {r1.host}:{r1.port}")
        b = bans(admin)
        assert set(b) == {r1.port}
        assert "admin console" in b[r1.port]["reason"] and 100 < b[r1.port]["remaining"] <= 120
        assert list(rows(admin, "SHOW BANS")[0]) == ["database", "shard", "host", "port", "reason", "remaining"]
        # BAN returns once every worker applied it: the pools say so at once.
        assert pool_banned(admin, r1.port) and all(pool_banned(admin, r1.port))
        assert not any(pool_banned(admin, r2.port))
        assert replication(admin)[r1.port]["banned"] == "true"
        # a full host key
        admin.execute(f"UNBAN {TEST_DB}/0/{r1.host}:{r1.port}")
        assert bans(admin) == {}
        assert not any(pool_banned(admin, r1.port))
        # a host name matches every monitored entry on it
        admin.execute(f"BAN {r1.host}")
        assert set(bans(admin)) == {primary.port, r1.port, r2.port}
        admin.execute(f"UNBAN '{r1.host}'")
        assert bans(admin) == {}
        # an unknown host is an error naming the hosts there are
        with pytest.raises(pgerr.UndefinedObject) as err:
            admin.execute("BAN no-such-host:5432")
        assert f"{TEST_DB}/0/{r1.host}:{r1.port}" in str(err.value)
        with pytest.raises(pgerr.UndefinedObject):
            admin.execute("UNBAN nowhere")
        # the console keeps working after the errors
        assert len(replication(admin)) == 3


def test_bans_survive_reload(herd, replicated):
    _, r1, _ = replicated
    with admin_connect(herd) as admin:
        admin.execute(f"BAN {r1.host}:{r1.port}")
        try:
            admin.execute("RELOAD")
            assert set(bans(admin)) == {r1.port}
            assert all(pool_banned(admin, r1.port))
        finally:
            admin.execute(f"UNBAN {r1.host}:{r1.port}")
        assert bans(admin) == {}


def test_host_failed_from_a_worker_bans_it_everywhere(pgherd, replicated):
    """A worker's HostFailed (sent here over the bus as a worker would) bans the host in every
    worker, though the monitor's own checks pass."""
    zmq = pytest.importorskip("zmq")
    from pgherd.shared.bus import messages as B

    primary, r1, r2 = replicated
    proc = pgherd(general={"workers": 2, "idle_healthcheck_delay": 600_000, "ban_timeout": 120_000},
                  databases=host_entries(replicated, ["primary", "replica", "replica"]))
    ctx = zmq.Context()
    try:
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 1000)
        dealer.connect(f"ipc://{bus_dir(proc)}/router")
        key = f"{TEST_DB}/0/{r2.host}:{r2.port}"
        dealer.send(B.encode(B.HostFailed(key=key, reason="connection refused (test)")))
        with admin_connect(proc) as admin:
            b = wait_for("the ban from HostFailed", lambda: bans(admin))
            assert set(b) == {r2.port}
            assert "worker" in b[r2.port]["reason"] and "connection refused (test)" in b[r2.port]["reason"]
            wait_for("every worker's pool to show the ban", lambda: all(pool_banned(admin, r2.port) or [0]))
            # a key nobody configured is ignored
            dealer.send(B.encode(B.HostFailed(key="nope/0/127.0.0.1:1", reason="x")))
            admin.execute("SHOW VERSION")
            assert set(bans(admin)) == {r2.port}
        dealer.close()
    finally:
        ctx.term()


# ---------------------------------------------------------------------------------------------
# failures of real servers


def test_stopped_replica_is_banned_then_returns_after_ban_timeout(pgherd, replicated):
    primary, r1, r2 = replicated
    ban_timeout = 3.0
    proc = pgherd(general={**FAST, "ban_timeout": int(ban_timeout * 1000)},
                  databases=host_entries(replicated, ["primary", "replica", "replica"]))
    with admin_connect(proc) as admin:
        wait_for("the first health checks", lambda: len(replication(admin)) == 3)
        assert bans(admin) == {}
        r2.stop("fast")
        try:
            b = wait_for("the stopped replica's ban", lambda: bans(admin).get(r2.port))
            seen = time.monotonic()
            assert "health check failed" in b["reason"] or "check failed" in b["reason"], b
            assert 0 <= b["remaining"] <= ban_timeout
            ban_ends = seen + b["remaining"]  # the ban began before we saw it
            rep = replication(admin)
            assert rep[r2.port]["healthy"] == "false" and rep[r2.port]["banned"] == "true"
            assert rep[r1.port]["banned"] == "false" and rep[primary.port]["banned"] == "false"
            assert all(pool_banned(admin, r2.port))
        finally:
            r2.start()
        # Back up, but banned until ban_timeout has passed and a check passes.
        wait_for("the ban to be lifted", lambda: r2.port not in bans(admin), timeout=ban_timeout + DEADLINE)
        assert time.monotonic() >= ban_ends - 0.3
        rep = wait_for("the replica healthy again", lambda: (lambda r: r if r[r2.port]["healthy"] == "true" else None)(
            replication(admin)))
        assert rep[r2.port]["banned"] == "false"
        assert not any(pool_banned(admin, r2.port))
        r2.wait_for_replay()


def test_replica_on_a_dead_port_is_banned_by_the_monitor(pgherd, replicated):
    primary, r1, _ = replicated
    dead = free_port()
    proc = pgherd(general={**FAST, "ban_timeout": 60_000},
                  databases=host_entries([primary, r1], ["primary", "replica"])
                  + [{"name": TEST_DB, "host": "127.0.0.1", "port": dead, "role": "replica"}])
    with admin_connect(proc) as admin:
        b = wait_for("the dead replica's ban", lambda: bans(admin).get(dead))
        assert "failed" in b["reason"]
        assert set(bans(admin)) == {dead}
        rep = replication(admin)
        assert rep[dead]["healthy"] == "false"
        assert rep[primary.port]["healthy"] == "true" and rep[r1.port]["healthy"] == "true"
        check = {r["port"]: r for r in rows(admin, "HEALTHCHECK")}
        assert check[dead]["healthy"] == "false" and check[dead]["error"]
        assert check[r1.port]["healthy"] == "true" and check[r1.port]["error"] is None
    # The monitor (in the supervisor process) stops with pgherd and leaves no connection behind.
    ports = supervisor_ports(proc, primary)
    assert len(ports) == 1, ports
    assert proc.stop() == 0
    wait_for("the monitor's connection to close", lambda: not backends_on_ports(primary, ports), timeout=10)


def test_lagging_replica_is_banned_until_it_catches_up(pgherd, replicated):
    primary, r1, r2 = replicated
    proc = pgherd(general={**FAST, "lsn_check_delay": 0, "ban_replica_lag_bytes": 256 * 1024,
                           "ban_timeout": 120_000},
                  databases=host_entries(replicated, ["primary", "replica", "replica"]))
    with admin_connect(proc) as admin:
        wait_for("LSNs", lambda: all(r["lsn"] for r in replication(admin).values()) and len(replication(admin)) == 3)
        r1.sql("SELECT pg_wal_replay_pause()")
        try:
            primary.sql("CREATE TABLE IF NOT EXISTS monitor_lag (i int, pad text);"
                        " INSERT INTO monitor_lag SELECT g, repeat('x', 200) FROM generate_series(1, 20000) g",
                        dbname=TEST_DB)
            b = wait_for("the lag ban", lambda: bans(admin).get(r1.port))
            assert "ban_replica_lag_bytes" in b["reason"], b
            rep = replication(admin)
            assert rep[r1.port]["lag_bytes"] > 256 * 1024
            # r2 may lag for a moment while it replays the write too; then only r1 stays banned.
            wait_for("only the paused replica banned",
                     lambda: (lambda b: r1.port in b and r2.port not in b)(bans(admin)))
        finally:
            r1.sql("SELECT pg_wal_replay_resume()")
        wait_for("the lag ban to end once the replica caught up", lambda: r1.port not in bans(admin))
        wait_for("no lag", lambda: replication(admin)[r1.port]["lag_bytes"] == 0)


# ---------------------------------------------------------------------------------------------
# role = "auto"


def test_role_auto_follows_a_promotion(pgherd, fresh_pg, cluster_dir):
    """Both hosts auto, LSN checks off (role checks still run). A promoted replica does not take
    over while the old primary is still up and not in recovery; once that stops, it does."""
    old = fresh_pg
    new = old.add_replica(cluster_dir())
    interval_ms = 300
    proc = pgherd(general={**FAST, "lsn_check_interval": interval_ms, "ban_timeout": 60_000},
                  databases=host_entries([old, new], ["auto", "auto"]))
    with admin_connect(proc) as admin:
        def roles():
            rep = replication(admin)
            return {port: (r["role"], r["pg_is_in_recovery"]) for port, r in rep.items()}

        wait_for("the roles to be detected", lambda: roles() == {old.port: ("primary", "false"),
                                                                new.port: ("replica", "true")})
        rep = replication(admin)
        assert rep[old.port]["configured_role"] == "auto" and rep[old.port]["lsn"] is None  # LSN checks are off

        new.promote()
        rows(admin, "HEALTHCHECK")  # runs the role checks now
        # Both are out of recovery now; the previous primary stays primary while it is up.
        assert roles() == {old.port: ("primary", "false"), new.port: ("replica", "false")}

        old.stop("fast")
        stopped = time.monotonic()
        wait_for("the promoted host to become primary",
                 lambda: replication(admin)[new.port]["role"] == "primary")
        took = time.monotonic() - stopped
        rep = replication(admin)
        assert rep[old.port]["role"] == "replica" and rep[old.port]["banned"] == "true"
        assert rep[new.port]["pg_is_in_recovery"] == "false" and rep[new.port]["banned"] == "false"
        # interval + one second, with room for a loaded machine
        assert took < interval_ms / 1000 + 1 + 5, f"role moved after {took:.2f} s"
