"""Timeouts and recovery: each timeout fires when it should and not when it should not.

Covers query_timeout, client_idle_timeout, client_idle_in_transaction_timeout,
healthcheck_interval/healthcheck_timeout and the liveness check of idle servers, rollback_timeout,
connection_recovery (a client vanishing) and client_connection_recovery (a server vanishing), and
Postgres restarting under load. Effects are checked on Postgres itself (pg_stat_activity, rows).

pgherds that raw clients talk to run with auth_type=trust, so a bare StartupMessage logs in. Pools
that tests compare backend pids on have pool_size 1 and min_pool_size 0, so "the next client got
the same server" is a plain pid comparison.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import threading
import time
import uuid

import psycopg
import pytest
from psycopg import errors as pgerr

from pgherd.shared.wire import messages as M

pytestmark = pytest.mark.timeout(60)

TEST_DB = "pgherd_test"
TABLE = "timeouts_rows"
QUERY_TIMEOUT_MS = 500
IDLE_MS = 700


def tag() -> str:
    return uuid.uuid4().hex[:12]


def first_value(msgs: list[tuple[str, bytes]]) -> str | None:
    """First column of the first DataRow in a list of backend messages."""
    for t, body in msgs:
        if t == "D":
            (length,) = struct.unpack_from("!i", body, 2)
            return None if length < 0 else body[6:6 + length].decode()
    raise AssertionError(f"no DataRow in {msgs!r}")


def vanish(raw) -> None:
    """Drop a raw client abruptly: shutdown both ways, then close with a reset (SO_LINGER 0)."""
    raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    try:
        raw.sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    raw.sock.close()


def sqlstate(exc: BaseException) -> str | None:
    return getattr(exc, "sqlstate", None)


def row_count(pg, helpers, note: str) -> int:
    with helpers.connect(helpers.direct_dsn(pg)) as conn:
        return conn.execute(f"select count(*) from {TABLE} where note = %s", (note,)).fetchone()[0]


@pytest.fixture(scope="module")
def table(pg, helpers):
    with helpers.connect(helpers.direct_dsn(pg)) as conn:
        conn.execute(f"create table if not exists {TABLE} (note text)")
    return TABLE


def general(**kw):
    return {"workers": 1, "min_pool_size": 0, **kw}


# ---------------------------------------------------------------------------------------------
# query_timeout


@pytest.fixture(scope="module")
def qt_proc(pgherd_module):
    return pgherd_module(general=general(query_timeout=QUERY_TIMEOUT_MS))


@pytest.mark.parametrize("protocol", ["simple", "extended"])
def test_query_timeout_cancels_long_query(qt_proc, helpers, protocol):
    with helpers.connect(qt_proc.dsn()) as conn:
        t0 = time.monotonic()
        with pytest.raises(pgerr.QueryCanceled) as info:
            if protocol == "simple":
                conn.execute("select pg_sleep(3)")
            else:
                conn.execute("select pg_sleep(%s)", (3,))
        elapsed = time.monotonic() - t0
        assert info.value.sqlstate == "57014"
        assert 0.45 <= elapsed <= 1.5, f"query_timeout {QUERY_TIMEOUT_MS} ms fired after {elapsed:.2f} s"
        # The connection stays usable.
        assert conn.execute("select 'after timeout'").fetchone() == ("after timeout",)
        assert conn.execute("select %s::int + 1", (41,)).fetchone() == (42,)


def test_query_timeout_cancels_query_on_postgres(qt_proc, helpers, pg_admin):
    """The sleeping query is really gone from Postgres after the timeout, not just abandoned."""
    marker = f"qt-probe-{tag()}"
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with helpers.connect(qt_proc.dsn()) as conn:
                conn.execute(f"select pg_sleep(3) /* {marker} */")
        except BaseException as exc:  # noqa: BLE001 - checked below
            errors.append(exc)

    def running() -> int:
        return pg_admin.execute(
            "select count(*) from pg_stat_activity where state = 'active' and query like %s"
            " and pid <> pg_backend_pid()", (f"%{marker}%",)).fetchone()[0]

    t0 = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    helpers.wait_for(running, 2, what="the sleeping query on Postgres")
    helpers.wait_for(lambda: running() == 0, 2, what="the query to be cancelled on Postgres")
    assert time.monotonic() - t0 < 2.0, "the query lasted long past query_timeout"
    thread.join(5)
    assert not thread.is_alive()
    assert len(errors) == 1 and sqlstate(errors[0]) == "57014", errors


def test_query_timeout_spares_short_queries(qt_proc, helpers):
    with helpers.connect(qt_proc.dsn()) as conn:
        conn.execute("select pg_sleep(0.2)")
        assert conn.execute("select 7 from pg_sleep(0.2)").fetchone() == (7,)
        # The limit is per request: three 0.2 s statements in one transaction (0.6 s in all) pass.
        with conn.transaction():
            for i in range(3):
                assert conn.execute("select %s::int from pg_sleep(0.2)", (i,)).fetchone() == (i,)


def test_query_timeout_not_while_client_idles_in_transaction(qt_proc, helpers, table, pg):
    note = f"qt-{tag()}"
    with helpers.connect(qt_proc.dsn()) as conn:
        with conn.transaction():
            conn.execute(f"insert into {TABLE} values (%s)", (note,))
            time.sleep(1.5)  # the client thinks; the server waits for it: not a slow query
            assert conn.execute("select 1").fetchone() == (1,)
            time.sleep(0.7)
        assert row_count(pg, helpers, note) == 1, "COMMIT after idling in the transaction failed"
        # Inside a transaction a slow query is still cancelled.
        conn.execute("begin")
        with pytest.raises(pgerr.QueryCanceled):
            conn.execute("select pg_sleep(3)")
        conn.execute("rollback")
        assert conn.execute("select 2").fetchone() == (2,)


# ---------------------------------------------------------------------------------------------
# client_idle_timeout


@pytest.fixture(scope="module")
def idle_proc(pgherd_module):
    return pgherd_module(general=general(auth_type="trust", client_idle_timeout=IDLE_MS))


def test_client_idle_timeout_disconnects_idle_client(idle_proc, helpers):
    with helpers.RawClient(idle_proc) as raw:
        raw.startup()
        assert first_value(raw.query("select 1")) == "1"
        t0 = time.monotonic()
        fields = raw.expect_error_then_close()
        elapsed = time.monotonic() - t0
    assert fields.get("C") == "57P05", fields
    assert fields.get("S") == "FATAL", fields
    assert 0.6 <= elapsed <= 2.0, f"client_idle_timeout {IDLE_MS} ms fired after {elapsed:.2f} s"


def test_client_idle_timeout_psycopg(idle_proc, helpers):
    conn = helpers.connect(idle_proc.dsn())
    try:
        assert conn.execute("select 1").fetchone() == (1,)
        time.sleep(1.5)
        with pytest.raises(psycopg.OperationalError):
            conn.execute("select 1")
    finally:
        conn.close()


def test_client_idle_timeout_spares_busy_client(idle_proc, helpers):
    with helpers.connect(idle_proc.dsn()) as conn:
        deadline = time.monotonic() + 2.0
        n = 0
        while time.monotonic() < deadline:
            assert conn.execute("select %s::int", (n,)).fetchone() == (n,)
            n += 1
            time.sleep(0.2)
        # Waiting for a slow query is not idling either.
        assert conn.execute("select 5 from pg_sleep(1.2)").fetchone() == (5,)
        # Nor is a client inside a transaction (that is client_idle_in_transaction_timeout's job,
        # disabled here).
        with conn.transaction():
            conn.execute("select 1")
            time.sleep(1.2)
            assert conn.execute("select 6").fetchone() == (6,)


# ---------------------------------------------------------------------------------------------
# client_idle_in_transaction_timeout


@pytest.fixture(scope="module")
def iit_proc(pgherd_module):
    return pgherd_module(general=general(auth_type="trust", client_idle_in_transaction_timeout=IDLE_MS))


def idle_in_transaction(admin, helpers, proc, pg) -> list[dict]:
    return [b for b in helpers.server_backends(admin, proc, pg) if b["state"].startswith("idle in transaction")]


def test_idle_in_transaction_timeout_disconnects_and_rolls_back(iit_proc, helpers, table, pg, pg_admin):
    note = f"iit-{tag()}"
    with helpers.RawClient(iit_proc) as raw:
        raw.startup()
        assert raw.query("begin")[-1] == ("Z", b"T")
        assert raw.query(f"insert into {TABLE} values ('{note}')")[-1] == ("Z", b"T")
        t0 = time.monotonic()
        assert idle_in_transaction(pg_admin, helpers, iit_proc, pg), "no transaction open on Postgres"
        fields = raw.expect_error_then_close()
        elapsed = time.monotonic() - t0
    assert fields.get("C") == "25P03", fields
    assert fields.get("S") == "FATAL", fields
    assert 0.6 <= elapsed <= 2.0, f"client_idle_in_transaction_timeout fired after {elapsed:.2f} s"
    helpers.wait_for(lambda: not idle_in_transaction(pg_admin, helpers, iit_proc, pg), 3,
                     what="the transaction to be rolled back on Postgres")
    assert row_count(pg, helpers, note) == 0


def test_idle_in_transaction_timeout_psycopg(iit_proc, helpers, table, pg):
    note = f"iit-{tag()}"
    conn = helpers.connect(iit_proc.dsn())
    try:
        conn.execute("begin")
        conn.execute(f"insert into {TABLE} values (%s)", (note,))
        time.sleep(1.5)
        # Postgres' own 25P03 maps to IdleInTransactionSessionTimeout (class 25, not an
        # OperationalError); either way the connection is gone.
        with pytest.raises(psycopg.Error) as info:
            conn.execute("commit")
        assert info.value.sqlstate in ("25P03", None), repr(info.value)
        assert conn.broken or conn.closed
        with pytest.raises(psycopg.OperationalError):
            conn.execute("select 1")
    finally:
        conn.close()
    assert row_count(pg, helpers, note) == 0


def test_idle_in_transaction_timeout_spares_idle_client_outside_transaction(iit_proc, helpers):
    with helpers.connect(iit_proc.dsn()) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        time.sleep(1.5)
        assert conn.execute("select 2").fetchone() == (2,)


def test_idle_in_transaction_timeout_spares_long_query_in_transaction(iit_proc, helpers, table, pg):
    note = f"iit-{tag()}"
    with helpers.connect(iit_proc.dsn()) as conn:
        with conn.transaction():
            conn.execute(f"insert into {TABLE} values (%s)", (note,))
            conn.execute("select pg_sleep(1.5)")
            assert conn.execute("select 3").fetchone() == (3,)
    assert row_count(pg, helpers, note) == 1


# ---------------------------------------------------------------------------------------------
# Health checks and the liveness check of idle servers


def backend_gone(admin, pid: int) -> bool:
    return admin.execute("select count(*) = 0 from pg_stat_activity where pid = %s", (pid,)).fetchone()[0]


@pytest.mark.parametrize("interval", [300, None], ids=["healthcheck_300ms", "liveness_only"])
def test_killed_idle_server_is_replaced_silently(pgherd, helpers, pg_admin, interval):
    """With healthcheck_interval 300 ms, and without it (default 30 s: the MSG_PEEK liveness check
    sees the FATAL Postgres sends a terminated backend), the client never sees the dead server."""
    proc = pgherd(general=general(healthcheck_interval=interval), databases={"pool_size": 1})
    with helpers.connect(proc.dsn()) as conn:
        old = helpers.backend_pid(conn)
        assert pg_admin.execute("select pg_terminate_backend(%s)", (old,)).fetchone() == (True,)
        helpers.wait_for(lambda: backend_gone(pg_admin, old), 5, what="the backend to exit")
        time.sleep(0.4)  # longer than the health-check interval
        new = helpers.backend_pid(conn)
        assert new != old
        assert conn.execute("select 'still here'").fetchone() == ("still here",)


def test_healthcheck_timeout_replaces_hung_server(pgherd, helpers, pg, pg_admin):
    """A server that stops answering (its backend SIGSTOPped: the socket stays open and silent, so
    the liveness check passes) fails the `;` health check within healthcheck_timeout and is
    replaced; the client sees no error."""
    if not hasattr(pg, "postmaster_pid"):
        pytest.skip("needs a local cluster to signal a backend")
    proc = pgherd(general=general(healthcheck_interval=300, healthcheck_timeout=300),
                  databases={"pool_size": 1})
    with helpers.connect(proc.dsn()) as conn:
        old = helpers.backend_pid(conn)
        os.kill(old, signal.SIGSTOP)
        try:
            time.sleep(0.5)
            t0 = time.monotonic()
            new = helpers.backend_pid(conn)
            elapsed = time.monotonic() - t0
        finally:
            os.kill(old, signal.SIGCONT)
        assert new != old
        assert elapsed < 2.5, f"replacing the hung server took {elapsed:.2f} s (healthcheck_timeout 300 ms)"
    helpers.wait_for(lambda: backend_gone(pg_admin, old), 5, what="the hung backend to be closed")


# ---------------------------------------------------------------------------------------------
# Postgres restarting under load


class LoadThread(threading.Thread):
    """Loops short queries through pgherd; on a lost connection reconnects (and counts it)."""

    def __init__(self, proc, helpers, n: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.proc, self.helpers, self.n, self.stop_event = proc, helpers, n, stop
        self.ok: list[float] = []  # monotonic time of each success
        self.errors: list[tuple[float, str, str | None, str]] = []  # (time, type, sqlstate, message)
        self.reconnects = 0
        self.fatal: BaseException | None = None

    def run(self) -> None:
        conn = None
        i = 0
        try:
            while not self.stop_event.is_set():
                try:
                    if conn is None or conn.closed or conn.broken:
                        if conn is not None:
                            conn.close()
                            self.reconnects += 1
                        conn = self.helpers.connect(self.proc.dsn())
                    i += 1
                    value = self.n * 100_000 + i
                    row = conn.execute("select %s::int, pg_sleep(0.02)", (value,)).fetchone()
                    assert row[0] == value, f"wrong reply {row!r} for {value}"
                    self.ok.append(time.monotonic())
                except psycopg.Error as exc:
                    self.errors.append((time.monotonic(), type(exc).__name__, sqlstate(exc), str(exc)[:200]))
                    time.sleep(0.1)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.fatal = exc
        finally:
            if conn is not None:
                conn.close()


# pgherd's 08006 (server lost / cannot connect), Postgres' 57P01 (admin shutdown), 57P03 (starting
# up / shutting down), and None: libpq's own "server closed the connection unexpectedly".
RESTART_SQLSTATES = {"08006", "57P01", "57P03", None}


@pytest.mark.slow
@pytest.mark.destructive
@pytest.mark.timeout(120)
def test_postgres_restart_under_load(pgherd, fresh_pg, helpers):
    db = [{"name": TEST_DB, "host": fresh_pg.host, "port": fresh_pg.port, "pool_size": 4}]
    procs = {
        "drop": pgherd(general=general(), databases=db),
        "recover": pgherd(general=general(client_connection_recovery="recover"), databases=db),
    }
    stop = threading.Event()
    threads = {mode: [LoadThread(proc, helpers, n, stop) for n in range(3)] for mode, proc in procs.items()}
    for ts in threads.values():
        for t in ts:
            t.start()
    try:
        time.sleep(0.8)
        restart_started = time.monotonic()
        fresh_pg.restart("fast")
        restarted = time.monotonic()
        time.sleep(2.0)
    finally:
        stop.set()
        for ts in threads.values():
            for t in ts:
                t.join(20)
    downtime = restarted - restart_started
    report = {mode: [(len(t.ok), t.reconnects, t.errors) for t in ts] for mode, ts in threads.items()}
    for mode, ts in threads.items():
        for t in ts:
            assert not t.is_alive(), f"{mode}: a client thread hung"
            assert t.fatal is None, f"{mode}: {t.fatal!r}"
            assert any(x < restart_started for x in t.ok), f"{mode}: no success before the restart: {report}"
            assert any(x > restarted for x in t.ok), f"{mode}: no success after the restart: {report}"
            # Failures are bounded: at most one per 0.1 s of downtime plus a few in flight.
            assert len(t.errors) <= downtime / 0.1 + 10, f"{mode}: too many failures: {report}"
            states = {e[2] for e in t.errors}
            assert states <= RESTART_SQLSTATES, f"{mode}: unexpected errors: {t.errors}"
    # With client_connection_recovery = recover, the clients' own connections survive.
    for t in threads["recover"]:
        assert t.reconnects == 0, f"recover: a client lost its connection: {report['recover']}"
    # New connections work, without restarting pgherd.
    for proc in procs.values():
        helpers.assert_serving(proc)


# ---------------------------------------------------------------------------------------------
# connection_recovery: the client vanishes


@pytest.fixture(scope="module")
def recovery_procs(pgherd_module):
    started = {}

    def get(mode: str):
        if mode not in started:
            started[mode] = pgherd_module(general=general(auth_type="trust", connection_recovery=mode),
                                          databases={"pool_size": 1})
        return started[mode]

    return get


def backend_state(admin, pid: int) -> str | None:
    row = admin.execute("select state from pg_stat_activity where pid = %s", (pid,)).fetchone()
    return row[0] if row else None


def vanish_mid_query(proc, helpers, seconds: float = 1.5) -> int:
    """A raw client starts `select pg_sleep(seconds)` and drops its socket; returns its backend pid."""
    raw = helpers.RawClient(proc)
    raw.startup()
    pid = int(first_value(raw.query("select pg_backend_pid()")))
    raw.send(M.query(f"select pg_sleep({seconds})"))
    time.sleep(0.3)  # pgherd forwards it; Postgres starts sleeping
    vanish(raw)
    return pid


def vanish_mid_transaction(proc, helpers, note: str) -> int:
    """A raw client opens a transaction, inserts a row and drops its socket; returns its pid."""
    raw = helpers.RawClient(proc)
    raw.startup()
    pid = int(first_value(raw.query("select pg_backend_pid()")))
    assert raw.query("begin")[-1] == ("Z", b"T")
    assert raw.query(f"insert into {TABLE} values ('{note}')")[-1] == ("Z", b"T")
    vanish(raw)
    return pid


def test_connection_recovery_recover_mid_query(recovery_procs, helpers, pg_admin):
    proc = recovery_procs("recover")
    old = vanish_mid_query(proc, helpers)
    with helpers.connect(proc.dsn()) as conn:
        assert helpers.backend_pid(conn) == old, "the drained server was not reused"
    assert backend_state(pg_admin, old) == "idle"


def test_connection_recovery_recover_mid_transaction(recovery_procs, helpers, pg_admin, table, pg):
    proc = recovery_procs("recover")
    note = f"cr-{tag()}"
    old = vanish_mid_transaction(proc, helpers, note)
    with helpers.connect(proc.dsn()) as conn:
        assert helpers.backend_pid(conn) == old, "the rolled-back server was not reused"
    assert backend_state(pg_admin, old) == "idle"
    assert row_count(pg, helpers, note) == 0


def test_connection_recovery_drop_mid_query(recovery_procs, helpers, pg_admin):
    proc = recovery_procs("drop")
    old = vanish_mid_query(proc, helpers)
    t0 = time.monotonic()
    with helpers.connect(proc.dsn()) as conn:
        new = helpers.backend_pid(conn)
    assert new != old, (f"connection_recovery=drop reused the server (the next client got it after "
                        f"{time.monotonic() - t0:.2f} s, when the abandoned query had ended)")
    helpers.wait_for(lambda: backend_gone(pg_admin, old), 5, what="the dropped backend to exit")


def test_connection_recovery_drop_mid_transaction(recovery_procs, helpers, pg_admin, table, pg):
    proc = recovery_procs("drop")
    note = f"cr-{tag()}"
    old = vanish_mid_transaction(proc, helpers, note)
    with helpers.connect(proc.dsn()) as conn:
        assert helpers.backend_pid(conn) != old, "connection_recovery=drop reused the server"
    helpers.wait_for(lambda: backend_gone(pg_admin, old), 5, what="the dropped backend to exit")
    assert row_count(pg, helpers, note) == 0


def test_connection_recovery_rollback_only_mid_query(recovery_procs, helpers, pg_admin):
    proc = recovery_procs("rollback_only")
    old = vanish_mid_query(proc, helpers)
    t0 = time.monotonic()
    with helpers.connect(proc.dsn()) as conn:
        new = helpers.backend_pid(conn)
    assert new != old, (f"rollback_only reused a server left mid-query (the next client got it after "
                        f"{time.monotonic() - t0:.2f} s, when the abandoned query had ended)")
    helpers.wait_for(lambda: backend_gone(pg_admin, old), 5, what="the dropped backend to exit")


def test_connection_recovery_rollback_only_mid_transaction(recovery_procs, helpers, pg_admin, table, pg):
    proc = recovery_procs("rollback_only")
    note = f"cr-{tag()}"
    old = vanish_mid_transaction(proc, helpers, note)
    with helpers.connect(proc.dsn()) as conn:
        assert helpers.backend_pid(conn) == old, "rollback_only did not reuse a server idle in transaction"
    assert backend_state(pg_admin, old) == "idle"
    assert row_count(pg, helpers, note) == 0


def vanish_mid_pipeline(proc, helpers, seconds: float = 1.0) -> int:
    """A raw client pipelines `pg_sleep(0.3)` and `pg_sleep(seconds)` and resets its socket.

    pgherd learns the client is gone when it fails to deliver the first reply, while the second
    query is certainly still in flight on the server. Returns the client's backend pid.
    """
    raw = helpers.RawClient(proc)
    raw.startup()
    pid = int(first_value(raw.query("select pg_backend_pid()")))
    raw.send(M.query("select pg_sleep(0.3)") + M.query(f"select pg_sleep({seconds})"))
    time.sleep(0.1)
    vanish(raw)
    return pid


@pytest.mark.parametrize("mode", ["recover", "rollback_only", "drop"])
def test_connection_recovery_noticed_mid_query(recovery_procs, helpers, pg_admin, mode):
    """The same three modes when pgherd notices the departure while a query is in flight."""
    proc = recovery_procs(mode)
    old = vanish_mid_pipeline(proc, helpers)
    t0 = time.monotonic()
    with helpers.connect(proc.dsn()) as conn:
        new = helpers.backend_pid(conn)
    elapsed = time.monotonic() - t0
    if mode == "recover":
        assert new == old, "the drained server was not reused"
        assert backend_state(pg_admin, old) == "idle"
    else:
        assert new != old, f"{mode} reused a server left mid-query"
        assert elapsed < 0.9, f"the next client waited {elapsed:.2f} s for a server that is being closed"
        helpers.wait_for(lambda: backend_gone(pg_admin, old), 5, what="the dropped backend to exit")


# ---------------------------------------------------------------------------------------------
# client_connection_recovery: the server vanishes


def kill_server_mid_query(proc, helpers, pg, pg_admin, conn) -> BaseException:
    """Run pg_sleep on conn, terminate its backend from Postgres meanwhile; return the error."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            conn.execute("select pg_sleep(5)")
        except BaseException as exc:  # noqa: BLE001 - checked by the caller
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    active = helpers.wait_for(
        lambda: [b for b in helpers.server_backends(pg_admin, proc, pg) if b["state"] == "active"], 3,
        what="the sleeping query on Postgres")
    pg_admin.execute("select pg_terminate_backend(%s)", (active[0]["pid"],))
    thread.join(5)
    assert not thread.is_alive(), "the client still waits after its server was terminated"
    assert len(errors) == 1, "the query did not fail"
    return errors[0]


def test_client_connection_recovery_drop(pgherd, helpers, pg, pg_admin):
    proc = pgherd(general=general())
    conn = helpers.connect(proc.dsn())
    try:
        helpers.backend_pid(conn)
        err = kill_server_mid_query(proc, helpers, pg, pg_admin, conn)
        assert isinstance(err, psycopg.OperationalError), repr(err)
        with pytest.raises(psycopg.OperationalError):
            conn.execute("select 1")
    finally:
        conn.close()
    helpers.assert_serving(proc)


def test_client_connection_recovery_recover(pgherd, helpers, pg, pg_admin):
    proc = pgherd(general=general(client_connection_recovery="recover"))
    with helpers.connect(proc.dsn()) as conn:
        old = helpers.backend_pid(conn)
        err = kill_server_mid_query(proc, helpers, pg, pg_admin, conn)
        assert sqlstate(err) in ("57P01", "08006"), repr(err)
        assert not conn.closed and not conn.broken
        assert helpers.backend_pid(conn) != old
        assert conn.execute("select 'recovered'").fetchone() == ("recovered",)


# ---------------------------------------------------------------------------------------------
# rollback_timeout


def test_vanished_client_leaves_no_transaction_open(pgherd, helpers, pg, pg_admin, table):
    proc = pgherd(general=general(auth_type="trust", rollback_timeout=1000))
    note = f"rt-{tag()}"
    old = vanish_mid_transaction(proc, helpers, note)
    helpers.wait_for(lambda: backend_state(pg_admin, old) in (None, "idle"), 3,
                     what="the vanished client's transaction to end")
    assert not idle_in_transaction(pg_admin, helpers, proc, pg)
    assert row_count(pg, helpers, note) == 0


def test_rollback_timeout_gives_up_on_slow_cleanup(pgherd, helpers, pg_admin):
    """The client pipelines a 0.5 s query and a 3 s one, then resets its socket: pgherd learns it is
    gone when the first reply cannot be delivered, and must drain the second query before reusing
    the server. rollback_timeout (300 ms) cuts that short: the server is closed, and the next
    client (pool_size 1) gets a fresh one long before the 3 s query would have ended."""
    proc = pgherd(general=general(auth_type="trust", rollback_timeout=300), databases={"pool_size": 1})
    raw = helpers.RawClient(proc)
    raw.startup()
    old = int(first_value(raw.query("select pg_backend_pid()")))
    raw.send(M.query("select pg_sleep(0.5)") + M.query("select pg_sleep(3)"))
    time.sleep(0.2)
    vanish(raw)
    t0 = time.monotonic()
    with helpers.connect(proc.dsn()) as conn:
        new = helpers.backend_pid(conn)
    elapsed = time.monotonic() - t0
    assert new != old, "the server was drained and reused instead of closed after rollback_timeout"
    assert elapsed < 2.0, f"the next client waited {elapsed:.2f} s"
