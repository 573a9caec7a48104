"""The admin console (issue 3): PgBouncer's SHOW columns with counts aggregated over every
worker, PAUSE/RESUME and MAINTENANCE under load, RECONNECT, SHUTDOWN, authentication, and
reachability through every worker. Counts are checked against Postgres itself.

The console speaks the simple query protocol only: psycopg sends a query without parameters as
a simple Query, as long as it does not prepare it (prepare_threshold=None).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from importlib.metadata import version

import psutil
import psycopg
import pytest
from psycopg import errors as pgerr

from pgherd.shared.localpg import pg_bin_dir
from pgherd.shared.wire import messages as M

pytestmark = pytest.mark.timeout(60)

TEST_DB = "pgherd_test"
WORKERS = 3
POOL_SIZE = 30  # alice and carol: 10 per worker
BOB_POOL_SIZE = 2  # 1 per worker (each worker gets at least 1: 3 in all)
COMMANDS = ("SHOW POOLS", "SHOW CLIENTS", "SHOW SERVERS", "SHOW STATS", "SHOW CONFIG", "SHOW VERSION",
            "SHOW LISTS", "SHOW WORKERS", "RELOAD", "PAUSE", "RESUME", "MAINTENANCE", "RECONNECT", "SHUTDOWN")

POOLS_COLUMNS = ["database", "user", "cl_active", "cl_waiting", "sv_active", "sv_idle", "sv_used", "sv_login",
                 "maxwait", "maxwait_us", "pool_mode", "host", "port", "shard", "role", "banned", "paused"]
CLIENTS_COLUMNS = ["type", "user", "database", "state", "addr", "port", "connect_time", "request_time", "wait",
                   "wait_us", "close_needed", "ptr", "link", "remote_pid", "tls", "application_name", "worker", "id"]
SERVERS_COLUMNS = ["type", "user", "database", "state", "addr", "port", "connect_time", "request_time", "wait",
                   "wait_us", "close_needed", "ptr", "link", "remote_pid", "tls", "application_name", "worker"]
STATS_COLUMNS = ["database", "total_xact_count", "total_query_count", "total_received", "total_sent",
                 "total_xact_time", "total_query_time", "total_wait_time", "avg_xact_count", "avg_query_count",
                 "avg_recv", "avg_sent", "avg_xact_time", "avg_query_time", "avg_wait_time"]
WORKERS_COLUMNS = ["index", "pid", "node", "uptime", "clients", "restarts", "cpu_seconds", "rss_bytes"]


# ---------------------------------------------------------------------------------------------
# helpers


def worker_of(pid: int) -> int:
    return (pid >> 22) - 1


def rows(cur: psycopg.Cursor) -> list[dict]:
    cols = [d.name for d in cur.description]
    return [dict(zip(cols, r)) for r in cur.fetchall()]


def admin_connect(proc, **kwargs) -> psycopg.Connection:
    return psycopg.connect(proc.admin_dsn(**kwargs), autocommit=True, connect_timeout=10, prepare_threshold=None)


def show(admin: psycopg.Connection, what: str) -> list[dict]:
    return rows(admin.execute(f"SHOW {what}"))


def pool_row(admin: psycopg.Connection, user: str, database: str = TEST_DB) -> dict:
    found = [p for p in show(admin, "POOLS") if p["user"] == user and p["database"] == database]
    assert len(found) == 1, f"SHOW POOLS has {len(found)} rows for {user}@{database}"
    return found[0]


def stats_row(admin: psycopg.Connection, database: str = TEST_DB) -> dict:
    found = [s for s in show(admin, "STATS") if s["database"] == database]
    assert len(found) == 1, f"SHOW STATS has {len(found)} rows for {database}"
    return found[0]


def truthy(value) -> bool:
    return value in (True, 1, "1", "t", "true", "yes", "on")


def maxwait(row: dict) -> float:
    return row["maxwait"] + row["maxwait_us"] / 1_000_000


def connect_on_workers(proc, helpers, wanted: dict[int, int], user: str = "alice", tries: int = 300,
                       admin: bool = False, **kwargs) -> dict[int, list[psycopg.Connection]]:
    """Connections placed on given workers ({worker index: how many}), by connecting until
    SO_REUSEPORT has put enough of them on each."""
    kept: dict[int, list[psycopg.Connection]] = {w: [] for w in wanted}
    for _ in range(tries):
        if all(len(kept[w]) >= n for w, n in wanted.items()):
            return kept
        conn = admin_connect(proc) if admin else helpers.connect(proc.dsn(user, helpers.PASSWORDS[user]), **kwargs)
        w = worker_of(conn.info.backend_pid)
        if w in kept and len(kept[w]) < wanted[w]:
            kept[w].append(conn)
        else:
            conn.close()
    for conns in kept.values():
        for c in conns:
            c.close()
    pytest.fail(f"could not place connections {wanted} on workers in {tries} attempts")


def close_all(placed: dict[int, list[psycopg.Connection]]) -> None:
    for conns in placed.values():
        for c in conns:
            c.close()


@pytest.fixture(scope="module")
def console(pgherd_module, helpers):
    proc = pgherd_module(
        general={"workers": WORKERS, "default_pool_size": POOL_SIZE, "min_pool_size": 0,
                 "checkout_timeout": 20_000, "stats_period": 1_000},
        users=[
            {"name": "alice", "password": "alice-secret", "database": TEST_DB},
            {"name": "bob", "password": "bob-secret", "database": TEST_DB, "pool_size": BOB_POOL_SIZE},
            {"name": "carol", "password": "carol-secret", "database": TEST_DB},
        ],
    )
    with admin_connect(proc) as admin:
        helpers.wait_for(lambda: [w["state"] for w in show(admin, "WORKERS")] == ["serving"] * WORKERS,
                         timeout=20, what="every worker serving")
    return proc


@pytest.fixture
def admin(console):
    with admin_connect(console) as conn:
        yield conn


@pytest.fixture
def table(pg_admin):
    """A fresh table t(writer int, n int) alice may write to; dropped after."""
    pg_admin.execute("drop table if exists admin_t")
    pg_admin.execute("create table admin_t (writer int, n int)")
    pg_admin.execute("grant all on admin_t to alice")
    yield "admin_t"
    pg_admin.execute("drop table if exists admin_t")


# ---------------------------------------------------------------------------------------------
# SHOW: columns and values


def test_show_returns_the_documented_columns(console, admin, helpers, pg, pg_admin):
    with helpers.connect(console.dsn()) as client:
        client.execute("select 1")
        pools = admin.execute("SHOW POOLS")
        names = [d.name for d in pools.description]
        assert set(POOLS_COLUMNS) <= set(names), set(POOLS_COLUMNS) - set(names)
        assert names[:4] == ["database", "user", "cl_active", "cl_waiting"]  # PgBouncer's order
        by_user = {p["user"]: p for p in rows(pools) if p["database"] == TEST_DB}
        assert set(by_user) == {"alice", "bob", "carol"}
        for p in by_user.values():
            assert (p["host"], int(p["port"]), int(p["shard"]), p["role"]) == (pg.host, pg.port, 0, "primary"), p
            assert p["pool_mode"] == "transaction" and not truthy(p["banned"]) and not truthy(p["paused"]), p
        # Instance-wide sizes: shares of 10 per worker; bob's 2 needs at least 1 per worker.
        assert by_user["alice"]["pool_size"] == POOL_SIZE
        assert by_user["bob"]["pool_size"] == max(BOB_POOL_SIZE, WORKERS)
        assert by_user["alice"]["cl_active"] >= 1

        clients = admin.execute("SHOW CLIENTS")
        names = [d.name for d in clients.description]
        assert set(CLIENTS_COLUMNS) <= set(names), set(CLIENTS_COLUMNS) - set(names)
        mine = [c for c in rows(clients) if c["id"] == client.info.backend_pid]
        assert len(mine) == 1 and mine[0]["user"] == "alice" and mine[0]["type"] == "C"
        sock = socket.socket(fileno=os.dup(client.pgconn.socket))
        try:
            assert (mine[0]["addr"], mine[0]["port"]) == sock.getsockname()[:2]
        finally:
            sock.close()

        servers = admin.execute("SHOW SERVERS")
        names = [d.name for d in servers.description]
        assert set(SERVERS_COLUMNS) <= set(names), set(SERVERS_COLUMNS) - set(names)
        # Every server pgherd lists is a backend on Postgres of that user, and vice versa.
        listed = {(s["user"], s["remote_pid"]) for s in rows(servers)}
        on_pg = {(b["usename"], b["pid"]) for b in helpers.server_backends(pg_admin, console, pg)}
        assert listed == on_pg

    stats = admin.execute("SHOW STATS")
    names = [d.name for d in stats.description]
    assert names == STATS_COLUMNS or set(STATS_COLUMNS) <= set(names), names
    assert [s["database"] for s in rows(stats)] == [TEST_DB]

    workers = admin.execute("SHOW WORKERS")
    names = [d.name for d in workers.description]
    assert set(WORKERS_COLUMNS) <= set(names), set(WORKERS_COLUMNS) - set(names)
    ws = rows(workers)
    assert [w["index"] for w in ws] == list(range(WORKERS))
    for w in ws:
        assert w["node"] == w["index"]  # node_id not set: 0 + index
        p = psutil.Process(w["pid"])
        assert p.ppid() == console.pid
        assert 0.5 * p.memory_info().rss <= w["rss_bytes"] <= 2 * p.memory_info().rss, w

    config = {r["key"]: r for r in show(admin, "CONFIG")}
    assert {"key", "value", "default", "changeable"} <= set(next(iter(config.values())))
    assert config["default_pool_size"]["value"] == str(POOL_SIZE)
    assert config["workers"]["value"] == str(WORKERS)
    assert config["checkout_timeout"]["value"] == "20000"

    assert show(admin, "VERSION") == [{"version": f"pgherd {version('pgherd')}"}]

    lists = {r["list"]: r["items"] for r in show(admin, "LISTS")}
    assert lists["databases"] == 1 and lists["users"] == 3 and lists["pools"] == 3
    assert lists["used_clients"] >= 1


def test_psql_reads_show_pools(console):
    """psql, as an operator would use it."""
    psql = shutil.which("psql") or str(pg_bin_dir() / "psql")
    done = subprocess.run(
        [psql, "-X", "-A", "-F", "|", "-h", console.host, "-p", str(console.port), "-U", "admin", "-d", "admin",
         "-c", "SHOW POOLS"],
        capture_output=True, text=True, timeout=30, env={**os.environ, "PGPASSWORD": "admin-secret"})
    assert done.returncode == 0, done.stderr
    header, *body = done.stdout.splitlines()
    cols = header.split("|")
    assert set(POOLS_COLUMNS) <= set(cols)
    users = {dict(zip(cols, line.split("|")))["user"] for line in body if "|" in line}
    assert {"alice", "bob", "carol"} <= users


def test_stats_count_every_query_once_across_workers(console, admin, helpers):
    placed = connect_on_workers(console, helpers, {w: 2 for w in range(WORKERS)})
    conns = [c for cs in placed.values() for c in cs]
    queries = 90
    try:
        before = stats_row(admin)
        for i in range(queries):
            assert conns[i % len(conns)].execute("select 1").fetchone() == (1,)
        # One explicit transaction of four queries: one more transaction, four more queries.
        conns[0].execute("begin")
        conns[0].execute("select 1")
        conns[0].execute("select 2")
        conns[0].execute("commit")

        def settled():
            s = stats_row(admin)
            return s if s["total_xact_count"] - before["total_xact_count"] >= queries + 1 else None

        after = helpers.wait_for(settled, timeout=5, what="SHOW STATS to count the transactions")
        d = {k: after[k] - before[k] for k in after if k.startswith("total_")}
        assert d["total_xact_count"] == queries + 1, d
        assert d["total_query_count"] == queries + 4, d
        # Query message for "select 1": 1 + 4 + 9 bytes; the reply at least RowDescription,
        # DataRow, CommandComplete and ReadyForQuery (> 30 bytes).
        assert d["total_received"] >= queries * 14, d
        assert d["total_sent"] >= queries * 30, d
        assert d["total_xact_time"] > 0 and d["total_query_time"] > 0, d
        assert d["total_wait_time"] >= 0, d
        # avg_* over the last stats_period (1 s) see this burst.
        helpers.wait_for(lambda: stats_row(admin)["avg_query_count"] > 0, timeout=5,
                         what="avg_query_count > 0 after the burst")
    finally:
        close_all(placed)


def test_open_transactions_show_as_active_servers(console, admin, helpers, pg, pg_admin):
    placed = connect_on_workers(console, helpers, {0: 2, 1: 1, 2: 1})
    conns = [c for cs in placed.values() for c in cs]
    try:
        pids = {}
        for conn in conns:
            conn.execute("begin")
            pids[conn.info.backend_pid] = helpers.backend_pid(conn)
        alice = pool_row(admin, "alice")
        assert alice["sv_active"] == 4, alice
        assert alice["cl_active"] >= 4 and alice["cl_waiting"] == 0, alice

        # Postgres sees exactly those four backends idle in transaction.
        in_tx = {b["pid"] for b in helpers.server_backends(pg_admin, console, pg, "alice")
                 if b["state"] == "idle in transaction"}
        assert in_tx == set(pids.values())

        servers = [s for s in show(admin, "SERVERS") if s["user"] == "alice" and s["state"] == "active"]
        assert {s["remote_pid"] for s in servers} == set(pids.values())
        clients = {c["id"]: c for c in show(admin, "CLIENTS")}
        for client_pid in pids:
            row = clients[client_pid]
            assert row["state"] == "active" and row["worker"] == worker_of(client_pid), row
        for s in servers:
            owner = [cp for cp, b in pids.items() if b == s["remote_pid"]][0]
            assert s["worker"] == worker_of(owner), s
        for conn in conns:
            conn.execute("commit")
        helpers.wait_for(lambda: pool_row(admin, "alice")["sv_active"] == 0, timeout=5, what="sv_active back to 0")
    finally:
        close_all(placed)
    # docs/operations.md: SHOW CLIENTS `remote_pid` is the client's server's backend pid.
    linked = {cp: clients[cp]["remote_pid"] for cp in pids}
    assert linked == pids, f"SHOW CLIENTS remote_pid {linked}, the clients' backends {pids}"


def test_waiting_clients_and_maxwait(console, admin, helpers, pg, pg_admin):
    """bob's pool_size 2 gives 1 server per worker: two bob clients on each of two workers,
    all wanting a server at once: 2 get one, 2 wait, maxwait grows."""
    placed = connect_on_workers(console, helpers, {0: 2, 1: 2}, user="bob")
    conns = [c for cs in placed.values() for c in cs]
    release = threading.Event()
    errors: list[BaseException] = []
    got: list[int] = []

    def client(conn: psycopg.Connection) -> None:
        try:
            conn.execute("begin")
            got.append(helpers.backend_pid(conn))
            release.wait(30)
            conn.execute("commit")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in conns]
    try:
        for t in threads:
            t.start()
        bob = helpers.wait_for(lambda: (lambda p: p if p["sv_active"] == 2 and p["cl_waiting"] == 2 else None)(
            pool_row(admin, "bob")), timeout=10, what="bob: sv_active 2, cl_waiting 2")
        assert bob["cl_active"] == 2, bob
        states = sorted(c["state"] for c in show(admin, "CLIENTS") if c["user"] == "bob")
        assert states == ["active", "active", "waiting", "waiting"]
        in_tx = [b for b in helpers.server_backends(pg_admin, console, pg, "bob") if b["state"] == "idle in transaction"]
        assert len(in_tx) == 2
        first = maxwait(pool_row(admin, "bob"))
        time.sleep(0.6)
        second = maxwait(pool_row(admin, "bob"))
        assert second >= first + 0.5, (first, second)
        assert len(got) == 2
    finally:
        release.set()
        for t in threads:
            t.join(20)
        close_all(placed)
    assert not errors, errors
    assert len(got) == 4
    bob = pool_row(admin, "bob")
    assert bob["cl_waiting"] == 0 and maxwait(bob) == 0, bob


# ---------------------------------------------------------------------------------------------
# PAUSE / RESUME, MAINTENANCE, RECONNECT


class Writer(threading.Thread):
    """Inserts rows (writer, 0..rows-1) one autocommit statement at a time."""

    def __init__(self, conn: psycopg.Connection, writer: int, rows: int, table: str) -> None:
        super().__init__(daemon=True)
        self.conn, self.writer, self.rows, self.table = conn, writer, rows, table
        self.errors: list[BaseException] = []
        self.done = 0

    def run(self) -> None:
        try:
            for n in range(self.rows):
                self.conn.execute(f"insert into {self.table} values (%s, %s)", (self.writer, n))
                self.done += 1
                time.sleep(0.005)
        except BaseException as exc:  # noqa: BLE001
            self.errors.append(exc)


def count_rows(pg_admin, table: str) -> int:
    return pg_admin.execute(f"select count(*) from {table}").fetchone()[0]


@pytest.mark.parametrize("target", ["", TEST_DB])
def test_pause_resume_under_load_loses_no_query(console, admin, helpers, pg_admin, table, target):
    rows_each = 60
    placed = connect_on_workers(console, helpers, {w: 2 for w in range(WORKERS)})
    writers = [Writer(c, i, rows_each, table) for i, c in enumerate(c for cs in placed.values() for c in cs)]
    try:
        for w in writers:
            w.start()
        helpers.wait_for(lambda: count_rows(pg_admin, table) >= 30, timeout=10, what="writers under way")
        admin.execute(f"PAUSE {target}".strip())  # returns once no server is in use
        paused_at = count_rows(pg_admin, table)
        assert paused_at < rows_each * len(writers), "the writers finished before PAUSE: make them slower"
        time.sleep(1.0)
        assert count_rows(pg_admin, table) == paused_at, "queries ran while paused"
        assert all(w.is_alive() for w in writers), "a writer stopped while paused"
        assert not any(w.errors for w in writers), [w.errors for w in writers]
        assert truthy(pool_row(admin, "alice")["paused"])
        waiting = [c for c in show(admin, "CLIENTS") if c["user"] == "alice" and c["state"] == "waiting"]
        assert len(waiting) == len(writers), waiting
        admin.execute(f"RESUME {target}".strip())
        for w in writers:
            w.join(30)
        assert not any(w.is_alive() for w in writers)
        assert not any(w.errors for w in writers), [w.errors for w in writers]
    finally:
        admin.execute("RESUME")
        close_all(placed)
    assert not truthy(pool_row(admin, "alice")["paused"])
    got = pg_admin.execute(f"select writer, count(*), count(distinct n) from {table} group by writer order by writer")
    assert got.fetchall() == [(i, rows_each, rows_each) for i in range(len(writers))]


def test_paused_clients_count_as_cl_waiting(console, admin, helpers):
    """PgBouncer counts a client that sent a query and has no server (paused) in cl_waiting."""
    placed = connect_on_workers(console, helpers, {0: 1, 1: 1})
    conns = [c for cs in placed.values() for c in cs]
    results: list = []
    admin.execute("PAUSE")
    try:
        threads = [threading.Thread(target=lambda c=c: results.append(c.execute("select 1").fetchone()), daemon=True)
                   for c in conns]
        for t in threads:
            t.start()
        helpers.wait_for(lambda: sum(1 for c in show(admin, "CLIENTS") if c["state"] == "waiting") == 2, timeout=5,
                         what="two clients waiting")
        alice = pool_row(admin, "alice")
        assert alice["cl_waiting"] == 2, f"2 paused clients wait for a server, SHOW POOLS says {alice}"
    finally:
        admin.execute("RESUME")
        for t in threads:
            t.join(10)
        close_all(placed)
    assert results == [(1,), (1,)]


def test_maintenance_holds_new_transactions_and_lets_open_ones_finish(console, admin, helpers, pg_admin, table):
    with helpers.connect(console.dsn(), autocommit=False) as inflight, helpers.connect(console.dsn()) as newcomer:
        inflight.execute(f"insert into {table} values (1, 1)")  # BEGIN + INSERT: in flight
        admin.execute(f"MAINTENANCE ON {TEST_DB}")
        try:
            done: list = []
            t = threading.Thread(target=lambda: done.append(
                newcomer.execute(f"insert into {table} values (2, 1)")), daemon=True)
            t.start()
            # The transaction in flight finishes...
            inflight.execute(f"insert into {table} values (1, 2)")
            inflight.commit()
            assert count_rows(pg_admin, table) == 2
            # ...while the new one waits (it does not fail).
            time.sleep(1.0)
            assert t.is_alive() and not done
            assert pg_admin.execute(f"select count(*) from {table} where writer = 2").fetchone() == (0,)
            # Once committed, the in-flight client's next transaction waits too.
            t2 = threading.Thread(target=lambda: done.append(
                inflight.execute(f"insert into {table} values (1, 3)") and inflight.commit()), daemon=True)
            t2.start()
            time.sleep(0.5)
            assert t2.is_alive()
        finally:
            admin.execute(f"MAINTENANCE OFF {TEST_DB}")
        t.join(10)
        t2.join(10)
        assert not t.is_alive() and not t2.is_alive()
    got = pg_admin.execute(f"select writer, n from {table} order by writer, n").fetchall()
    assert got == [(1, 1), (1, 2), (1, 3), (2, 1)]


def test_reconnect_replaces_server_connections_after_their_use(console, admin, helpers, pg, pg_admin):
    placed = connect_on_workers(console, helpers, {w: 1 for w in range(WORKERS)})
    conns = [c for cs in placed.values() for c in cs]
    try:
        for conn in conns:
            helpers.backend_pid(conn)
        holder = conns[0]
        holder.execute("begin")
        held = helpers.backend_pid(holder)
        old = {b["pid"] for b in helpers.server_backends(pg_admin, console, pg, "alice")}
        assert held in old and len(old) >= WORKERS
        admin.execute("RECONNECT")
        # The server in use stays with its transaction...
        assert helpers.backend_pid(holder) == held
        holder.execute("commit")
        # ...and after that every transaction gets a new server connection.
        for _ in range(3):
            for conn in conns:
                pid = helpers.backend_pid(conn)
                assert pid not in old, f"backend {pid} predates RECONNECT"
        alive = lambda: {r[0] for r in pg_admin.execute("select pid from pg_stat_activity").fetchall()}  # noqa: E731
        helpers.wait_for(lambda: not (old & alive()), timeout=5, what="the old server connections to close")
    finally:
        close_all(placed)


# ---------------------------------------------------------------------------------------------
# Access


def test_wrong_admin_password_is_refused(console, helpers):
    assert helpers.login_sqlstate(console.admin_dsn(password="not-the-password")) == "28P01"
    # A pool user's own credentials do not open the console.
    assert helpers.login_sqlstate(console.dsn("alice", "alice-secret", "admin")) == "28P01"
    with admin_connect(console) as conn:
        assert conn.execute("SHOW VERSION").fetchone()[0].startswith("pgherd ")


@pytest.mark.parametrize("admin_config", [False, {"password": None}], ids=["no-admin-section", "no-password"])
def test_admin_console_without_password_refuses_and_says_how(pgherd, helpers, admin_config):
    proc = pgherd(admin=admin_config)
    with helpers.RawClient(proc) as raw:
        raw.send(M.startup_message({"user": "admin", "database": "admin"}))
        fields = raw.expect_error_then_close()
    assert fields["C"] == "28000", fields
    text = fields["M"] + " " + fields.get("H", "")
    assert "password" in text and "[admin]" in text and "pgherd.toml" in text, fields
    with pytest.raises(psycopg.OperationalError, match="admin console is disabled"):
        psycopg.connect(proc.admin_dsn(), connect_timeout=10)
    helpers.assert_serving(proc)


def test_console_is_reachable_through_every_worker(console, helpers):
    placed = connect_on_workers(console, helpers, {w: 5 for w in range(WORKERS)}, admin=True)
    conns = [c for cs in placed.values() for c in cs]
    try:
        for conn in conns:
            assert conn.execute("SHOW VERSION").fetchone()[0] == f"pgherd {version('pgherd')}"
        clients = show(conns[0], "CLIENTS")
        mine = {c.info.backend_pid for c in conns}
        listed = {c["id"]: c for c in clients if c["user"] == "admin"}
        assert mine <= set(listed)
        for pid in mine:
            assert listed[pid]["worker"] == worker_of(pid) and listed[pid]["database"] == "admin"
        assert {listed[p]["worker"] for p in mine} == set(range(WORKERS))
        # Every worker's console answers for the whole instance.
        for w, cs in placed.items():
            assert len(show(cs[0], "WORKERS")) == WORKERS
            assert len([c for c in show(cs[0], "CLIENTS") if c["user"] == "admin"]) == len(conns)
    finally:
        close_all(placed)


def test_unknown_command_lists_the_commands(admin):
    for sql in ("SHOW NOTHING", "FROB", "select 1", "PAUSE a b c"):
        with pytest.raises(psycopg.Error) as info:
            admin.execute(sql)
        err = info.value
        assert err.sqlstate == "42601", (sql, err.sqlstate, str(err))
        text = f"{err.diag.message_primary} {err.diag.message_hint or ''} {err.diag.message_detail or ''}"
        for command in COMMANDS:
            assert command in text, f"{sql!r}: {command} missing from {text!r}"
    assert admin.execute("SHOW VERSION").fetchone()[0].startswith("pgherd ")


def test_extended_protocol_is_refused_cleanly(admin):
    with pytest.raises(pgerr.FeatureNotSupported):
        admin.execute("SHOW POOLS", binary=True)  # binary results need the extended protocol
    assert admin.execute("SHOW VERSION").fetchone()[0].startswith("pgherd ")


def test_admin_keys_are_not_reported_as_ignored(console):
    """The startup log names config keys pgherd does not act on; [admin] is acted on."""
    for key in ("admin.name", "admin.user", "admin.password", "general.stats_period", "general.workers"):
        assert f"config key {key} is accepted but not supported" not in console.log(), console.log_tail()


def test_shutdown_command_exits_0(pgherd, helpers):
    proc = pgherd(general={"workers": WORKERS})
    with admin_connect(proc) as conn:
        try:
            conn.execute("SHUTDOWN")
        except psycopg.OperationalError:
            pass  # the console may close before it answers
    assert proc.wait(20) == 0, proc.log_tail()
    assert "SHUTDOWN from the admin console" in proc.log()
