"""Pool behaviour, measured on Postgres itself (pg_stat_activity) and on pgherd's sockets.

A pgherd backend is recognised by its client port: the ports of pgherd's established TCP
connections to Postgres (see conftest.server_backends), so direct test connections never count.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import psycopg
import pytest
from psycopg import errors as pgerr

pytestmark = pytest.mark.timeout(60)

TEST_DB = "pgherd_test"


# ---------------------------------------------------------------------------------------------
# Pool sizes: general default 20, database 5 (alice inherits it), bob 2; carol in session mode.


@pytest.fixture(scope="module")
def sized(pgherd_module):
    return pgherd_module(
        general={"default_pool_size": 20, "min_pool_size": 0, "checkout_timeout": 10_000},
        databases={"pool_size": 5},
        users=[
            {"name": "alice", "password": "alice-secret", "database": TEST_DB},
            {"name": "bob", "password": "bob-secret", "database": TEST_DB, "pool_size": 2},
            {"name": "carol", "password": "carol-secret", "database": TEST_DB, "pooler_mode": "session",
             "pool_size": 3},
        ],
    )


def run_clients(proc, helpers, user: str, clients: int, transactions: int) -> list[BaseException]:
    """`clients` threads, each running short transactions through pgherd; returns their errors."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(clients)

    def client(n: int) -> None:
        try:
            with helpers.connect(proc.dsn(user, helpers.PASSWORDS[user])) as conn:
                barrier.wait(timeout=30)
                for i in range(transactions):
                    with conn.transaction():
                        conn.execute("select pg_sleep(0.01)")
                        assert conn.execute("select %s::int * 2", (n * 100 + i,)).fetchone() == (2 * (n * 100 + i),)
                    assert conn.execute("select %s::text", (f"c{n}",)).fetchone() == (f"c{n}",)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(45)
    assert not any(t.is_alive() for t in threads), "client threads hung"
    return errors


class Sampler:
    """Samples pgherd's backends for one user on Postgres while clients run."""

    def __init__(self, pg, helpers, proc, user: str) -> None:
        self.pg, self.helpers, self.proc, self.user = pg, helpers, proc, user
        self.max_pg = 0  # backends in pg_stat_activity
        self.max_sockets = 0  # pgherd's sockets to Postgres (all users)
        self.samples = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        with self.helpers.connect(self.pg.dsn(TEST_DB)) as admin:
            while not self.stop.is_set():
                n = len(self.helpers.server_backends(admin, self.proc, self.pg, user=self.user))
                n2 = admin.execute(
                    "select count(*) from pg_stat_activity where usename = %s and datname = %s"
                    " and backend_type = 'client backend'", (self.user, TEST_DB)).fetchone()[0]
                self.max_pg = max(self.max_pg, n, n2)
                self.max_sockets = max(self.max_sockets, len(self.helpers.pgherd_server_ports(self.proc, self.pg)))
                self.samples += 1
                time.sleep(0.005)

    def __enter__(self) -> "Sampler":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)


@pytest.mark.timeout(90)
def test_fifty_clients_share_five_servers(sized, pg, helpers):
    with Sampler(pg, helpers, sized, "alice") as sampler:
        errors = run_clients(sized, helpers, "alice", clients=50, transactions=8)
    assert errors == [], errors[:3]
    assert sampler.samples > 10
    assert sampler.max_pg <= 5, f"{sampler.max_pg} alice backends for a pool of 5"
    assert sampler.max_pg >= 2, "the clients never ran concurrently; the test proves nothing"
    assert sampler.max_sockets <= 5 + 2 + 3
    # Afterwards the servers are idle (no transaction left open).
    with helpers.connect(pg.dsn(TEST_DB)) as admin:
        backends = helpers.server_backends(admin, sized, pg, user="alice")
        assert 1 <= len(backends) <= 5
        assert all(b["state"] == "idle" for b in backends), backends


def test_user_pool_size_overrides_database(sized, pg, helpers):
    with Sampler(pg, helpers, sized, "bob") as sampler:
        errors = run_clients(sized, helpers, "bob", clients=8, transactions=3)
    assert errors == [], errors[:3]
    assert sampler.max_pg <= 2, f"{sampler.max_pg} bob backends for a pool of 2"
    assert sampler.max_pg >= 1


def test_session_mode_keeps_the_backend(sized, helpers):
    """carol is in session mode: a client keeps its server; other clients get other servers."""
    dsn = sized.dsn("carol", "carol-secret")
    with helpers.connect(dsn) as c1, helpers.connect(dsn) as c2:
        pid1 = helpers.backend_pid(c1)
        pid2 = helpers.backend_pid(c2)
        assert pid1 != pid2
        for i in range(5):
            with c1.transaction():
                c1.execute("select 1")
            with c2.transaction():
                c2.execute("select 1")
            assert helpers.backend_pid(c1) == pid1
            assert helpers.backend_pid(c2) == pid2
        # Session state survives between transactions: a prepared statement and a temp table.
        c1.execute("prepare sess_stmt as select $1::int + 1")
        c1.execute("create temp table sess_t (a int)")
        c2.execute("select pg_sleep(0.01)")
        assert c1.execute("execute sess_stmt(41)").fetchone() == (42,)
        assert c1.execute("select count(*) from sess_t").fetchone() == (0,)
    # After the client left, its server is reset before the next client gets it.
    with helpers.connect(dsn) as c3:
        assert c3.execute("select count(*) from pg_prepared_statements").fetchone() == (0,)
        assert c3.execute("select count(*) from pg_class where relname = 'sess_t' and "
                          "relpersistence = 't'").fetchone() == (0,)


def test_transaction_mode_spreads_clients_when_busy(sized, helpers):
    """While one alice client holds a transaction, another alice client gets another server."""
    with helpers.connect(sized.dsn()) as c1, helpers.connect(sized.dsn()) as c2:
        c1.execute("begin")
        pid1 = helpers.backend_pid(c1)
        assert helpers.backend_pid(c2) != pid1
        assert helpers.backend_pid(c1) == pid1  # the transaction stays on its server
        c1.execute("commit")


# ---------------------------------------------------------------------------------------------
# One server per pool: sharing, checkout_timeout, clients vanishing, per-client parameters.


@pytest.fixture(scope="module")
def single(pgherd_module):
    return pgherd_module(general={"default_pool_size": 1, "checkout_timeout": 500, "min_pool_size": 1})


def test_transaction_mode_shares_one_server(single, helpers):
    with helpers.connect(single.dsn()) as c1, helpers.connect(single.dsn()) as c2:
        pid = helpers.backend_pid(c1)
        assert helpers.backend_pid(c2) == pid
        with c2.transaction():
            assert helpers.backend_pid(c2) == pid
        assert helpers.backend_pid(c1) == pid


def test_checkout_timeout(single, helpers):
    with helpers.connect(single.dsn()) as holder, helpers.connect(single.dsn()) as waiter:
        holder.execute("begin")
        holder.execute("select 1")
        start = time.monotonic()
        with pytest.raises(psycopg.Error) as info:
            waiter.execute("select 'waited'")
        elapsed = time.monotonic() - start
        assert info.value.sqlstate == "53300"
        assert "checkout_timeout" in str(info.value)
        assert 0.4 <= elapsed <= 2.5, elapsed
        # The holder is unaffected and still in its transaction.
        assert holder.execute("select 'holder ok'").fetchone() == ("holder ok",)
        assert holder.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        holder.execute("commit")
        # The waiter stayed connected and gets the server now.
        assert waiter.execute("select 'served'").fetchone() == ("served",)


def test_waiting_client_gets_server_when_released(single, helpers):
    """A client that waits less than checkout_timeout is served once the holder commits."""
    with helpers.connect(single.dsn()) as holder, helpers.connect(single.dsn()) as waiter:
        holder.execute("begin")
        pid = helpers.backend_pid(holder)
        result: list = []
        t = threading.Thread(target=lambda: result.append(helpers.backend_pid(waiter)))
        t.start()
        time.sleep(0.2)
        assert t.is_alive(), "the second client was served while the only server was busy"
        holder.execute("commit")
        t.join(5)
        assert result == [pid]


VANISHING_CLIENT = """
import sys, psycopg
conn = psycopg.connect(sys.argv[1], autocommit=True, connect_timeout=10)
conn.execute("begin")
conn.execute("insert into {table} values (424242)")
print(conn.execute("select pg_backend_pid()").fetchone()[0], flush=True)
sys.stdin.read()  # wait to be killed
"""


def test_client_vanishing_inside_transaction(single, pg, helpers, pg_admin):
    pg_admin.execute("drop table if exists vanish_t")
    pg_admin.execute("create table vanish_t (a int)")
    pg_admin.execute("grant all on vanish_t to alice")
    with helpers.connect(single.dsn()) as conn:
        pid_before = helpers.backend_pid(conn)
    backends_before = helpers.server_backends(pg_admin, single, pg, user="alice")
    child = subprocess.Popen([sys.executable, "-c", VANISHING_CLIENT.format(table="vanish_t"), single.dsn()],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        assert line.strip().isdigit(), f"client did not get going: {line!r}"
        assert int(line) == pid_before
        busy = helpers.server_backends(pg_admin, single, pg, user="alice")
        assert [b["state"] for b in busy if b["pid"] == pid_before] == ["idle in transaction"]
    finally:
        child.kill()  # SIGKILL: the kernel closes its socket, no Terminate message
        child.wait(10)

    def settled():
        rows = helpers.server_backends(pg_admin, single, pg, user="alice")
        return rows if rows and all(r["state"] == "idle" for r in rows) else None

    rows = helpers.wait_for(settled, timeout=5, what="the abandoned transaction to be rolled back")
    assert pg_admin.execute("select count(*) from vanish_t").fetchone() == (0,)
    assert len(rows) == len(backends_before)
    # The same server connection serves the next client.
    with helpers.connect(single.dsn()) as conn:
        assert helpers.backend_pid(conn) == pid_before
        assert conn.execute("select count(*) from vanish_t").fetchone() == (0,)
        conn.execute("insert into vanish_t values (1)")
    assert pg_admin.execute("select count(*) from vanish_t").fetchone() == (1,)
    pg_admin.execute("drop table vanish_t")


def test_client_closing_socket_inside_transaction(single, pg, helpers, pg_admin):
    """Same, but the client shuts its socket down itself (FIN) in the middle of a transaction."""
    import socket

    conn = helpers.connect(single.dsn())
    pid = helpers.backend_pid(conn)
    conn.execute("begin")
    conn.execute("create temp table vanished_tmp (a int)")
    sock = socket.socket(fileno=conn.pgconn.socket)
    try:
        sock.shutdown(socket.SHUT_RDWR)
    finally:
        sock.detach()
    helpers.wait_for(lambda: all(r["state"] == "idle" for r in
                                 helpers.server_backends(pg_admin, single, pg, user="alice")),
                     timeout=5, what="the server to be released")
    conn.close()
    with helpers.connect(single.dsn()) as c2:
        assert helpers.backend_pid(c2) == pid
        assert c2.execute("select count(*) from pg_class where relname = 'vanished_tmp'").fetchone() == (0,)


def startup_values(conn: psycopg.Connection) -> tuple:
    return tuple(conn.execute(f"show {name}").fetchone()[0]
                 for name in ("application_name", "search_path", "statement_timeout", "timezone", "datestyle"))


# Values as Postgres itself reports them for these startup options (checked directly:
# a startup `search_path=foo,public` shows as "foo,public", DateStyle as "SQL, DMY").
C1_OPTS = "-c search_path=foo,public -c statement_timeout=1234 -c TimeZone=Asia/Tokyo -c DateStyle=SQL,DMY"
C2_OPTS = "-c search_path=bar -c statement_timeout=5s -c TimeZone=America/New_York"


def test_startup_parameters_follow_the_client(single, helpers):
    with helpers.connect(single.dsn(), application_name="xyz", options=C1_OPTS) as c1, \
            helpers.connect(single.dsn(), application_name="abc", options=C2_OPTS) as c2, \
            helpers.connect(single.dsn()) as c3:
        defaults = startup_values(c3)
        pid = helpers.backend_pid(c1)
        for _ in range(3):
            assert startup_values(c1) == ("xyz", "foo,public", "1234ms", "Asia/Tokyo", "SQL, DMY")
            assert startup_values(c2) == ("abc", "bar", "5s", "America/New_York", defaults[4])
            assert startup_values(c3) == defaults
            with c1.transaction():
                assert startup_values(c1)[:2] == ("xyz", "foo,public")
            with c2.transaction():
                assert startup_values(c2)[:2] == ("abc", "bar")
        assert helpers.backend_pid(c2) == pid == helpers.backend_pid(c3)  # one server for all
        assert defaults[0] not in ("xyz", "abc") and defaults[1] == '"$user", public'
        assert defaults[2] == "0" and defaults[4] == "ISO, MDY"
        # A session-level SET by a client in transaction mode stays with the server, but the
        # startup parameters of the next client are reapplied on top of it.
        c2.execute("set search_path = public")
        assert startup_values(c1)[1] == "foo,public"


def test_login_parameter_status_matches_direct(single, pg, helpers):
    """ParameterStatus at login shows the client's own startup values as Postgres would."""
    names = ("application_name", "TimeZone", "DateStyle", "client_encoding", "server_version",
             "integer_datetimes", "standard_conforming_strings", "server_encoding", "is_superuser",
             "session_authorization", "IntervalStyle")
    kwargs = {"application_name": "xyz", "options": C1_OPTS}
    with helpers.connect(single.dsn(), **kwargs) as via, helpers.connect(helpers.direct_dsn(pg), **kwargs) as direct:
        for name in names:
            assert via.info.parameter_status(name) == direct.info.parameter_status(name), name
        assert via.info.parameter_status("TimeZone") == "Asia/Tokyo"


def test_list_valued_startup_parameter_matches_direct(single, pg, helpers, pg_admin):
    """options='-c search_path=foo,public' means the list (foo, public), as Postgres reads it."""
    pg_admin.execute("create schema if not exists foo authorization alice")
    pg_admin.execute("create table if not exists foo.only_in_foo (a int)")
    pg_admin.execute("grant all on foo.only_in_foo to alice")
    opts = "-c search_path=foo,public -c DateStyle=SQL,DMY"
    query = ("select current_setting('search_path'), current_schemas(false)::text, "
             "current_setting('datestyle'), (select count(*) from only_in_foo)")
    try:
        with helpers.connect(single.dsn(), options=opts) as via, \
                helpers.connect(helpers.direct_dsn(pg), options=opts) as direct:
            expected = direct.execute(query).fetchone()
            assert expected == ("foo,public", "{foo,public}", "SQL, DMY", 0)
            with helpers.connect(single.dsn()) as other:  # another client in between, same server
                assert other.execute("show search_path").fetchone() == ('"$user", public',)
            assert via.execute(query).fetchone() == expected
    finally:
        pg_admin.execute("drop schema foo cascade")


def test_statement_timeout_from_options_applies(single, helpers):
    with helpers.connect(single.dsn(), options="-c statement_timeout=200") as c1, \
            helpers.connect(single.dsn()) as c2:
        with pytest.raises(pgerr.QueryCanceled) as info:
            c1.execute("select pg_sleep(3)")
        assert info.value.sqlstate == "57014"
        # The other client on the same server is not limited.
        assert c2.execute("select 'slept' from pg_sleep(0.3)").fetchone() == ("slept",)


def test_statement_mode_forbids_transactions(pgherd, pg, helpers):
    """pooler_mode from [[databases]] (statement), overridden per user (bob: transaction)."""
    proc = pgherd(general={"default_pool_size": 2}, databases={"pooler_mode": "statement"},
                  users=[{"name": "alice", "password": "alice-secret", "database": TEST_DB},
                         {"name": "bob", "password": "bob-secret", "database": TEST_DB,
                          "pooler_mode": "transaction"}])
    with helpers.connect(proc.dsn()) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        assert conn.execute("select 'single statements work'").fetchone() == ("single statements work",)
    # The BEGIN itself gets the error. (Were the error sent only after BEGIN's ReadyForQuery,
    # the client would see it, or just a closed connection, at some later statement: a race.)
    with helpers.connect(proc.dsn()) as conn:
        with pytest.raises(psycopg.Error) as info:
            conn.execute("begin")
    assert info.value.sqlstate == "0A000", info.value
    assert "statement" in str(info.value)
    with helpers.connect(proc.dsn(), autocommit=False) as conn:
        with pytest.raises(psycopg.Error) as info:
            conn.execute("select 1")  # psycopg sends BEGIN first
    assert info.value.sqlstate == "0A000", info.value
    with helpers.connect(pg.dsn(TEST_DB)) as admin:
        def idle():
            rows = helpers.server_backends(admin, proc, pg, user="alice")
            return all(r["state"] == "idle" for r in rows)
        helpers.wait_for(idle, timeout=5, what="no transaction left open on the servers")
    helpers.assert_serving(proc)
    # bob's own pooler_mode wins over the database's.
    with helpers.connect(proc.dsn("bob", "bob-secret"), autocommit=False) as conn:
        assert conn.execute("select 'bob in a transaction'").fetchone() == ("bob in a transaction",)
        conn.commit()


def test_session_mode_from_general(pgherd, helpers):
    proc = pgherd(general={"pooler_mode": "session", "default_pool_size": 3})
    with helpers.connect(proc.dsn()) as c1, helpers.connect(proc.dsn()) as c2:
        pids = {helpers.backend_pid(c1), helpers.backend_pid(c2)}
        assert len(pids) == 2
        for _ in range(3):
            with c1.transaction():
                c1.execute("select 1")
            assert {helpers.backend_pid(c1), helpers.backend_pid(c2)} == pids
        c1.execute("set work_mem = '7MB'")  # session state is the client's own
        c2.execute("select 1")
        assert c1.execute("show work_mem").fetchone() == ("7MB",)
        assert c2.execute("show work_mem").fetchone() != ("7MB",)


def test_server_connect_timeout_and_attempts(pgherd, helpers):
    """A "Postgres" that accepts TCP but never answers: pgherd gives up after connect_timeout,
    connect_attempts times, and the client gets an error instead of hanging."""
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    accepted: list = []
    stop = threading.Event()

    def accept_all():
        silent.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(silent.accept()[0])
            except OSError:
                pass

    t = threading.Thread(target=accept_all, daemon=True)
    t.start()
    try:
        proc = pgherd(general={"connect_timeout": 400, "connect_attempts": 2, "min_pool_size": 0},
                      databases=[{"name": TEST_DB, "host": "127.0.0.1", "port": silent.getsockname()[1]}])
        start = time.monotonic()
        with pytest.raises(psycopg.OperationalError) as info:
            helpers.connect(proc.dsn()).close()
        elapsed = time.monotonic() - start
        assert 0.7 <= elapsed <= 4, elapsed
        assert len(accepted) == 2, accepted
        assert "connect" in str(info.value)
        assert proc.returncode is None
    finally:
        stop.set()
        t.join(2)
        for s in accepted:
            s.close()
        silent.close()


def test_min_pool_size_opens_servers_without_clients(pgherd, pg, helpers):
    proc = pgherd(general={"min_pool_size": 2, "default_pool_size": 5})
    with helpers.connect(pg.dsn(TEST_DB)) as admin:
        rows = helpers.wait_for(lambda: len(helpers.server_backends(admin, proc, pg, user="alice")) >= 2
                                and helpers.server_backends(admin, proc, pg, user="alice"),
                                timeout=6, what="min_pool_size servers for alice")
        time.sleep(1.5)  # maintenance runs again: it must not open more
        rows = helpers.server_backends(admin, proc, pg, user="alice")
        assert len(rows) == 2, rows
        # Server connections log in without an application_name, so a client that sets none
        # sees '' (and RESET gives '') exactly as on a direct connection.
        assert all(r["state"] == "idle" and r["application_name"] == "" for r in rows), rows
        # Also for bob and carol (min_pool_size is a general default).
        for user in ("bob", "carol"):
            assert len(helpers.server_backends(admin, proc, pg, user=user)) == 2


def test_idle_timeout_closes_servers_above_min(pgherd, pg, helpers):
    proc = pgherd(general={"min_pool_size": 1, "default_pool_size": 5, "idle_timeout": 1000})
    conns = [helpers.connect(proc.dsn()) for _ in range(4)]
    try:
        for c in conns:
            c.execute("begin")
            c.execute("select 1")
        with helpers.connect(pg.dsn(TEST_DB)) as admin:
            assert len(helpers.server_backends(admin, proc, pg, user="alice")) == 4
            for c in conns:
                c.execute("commit")
            helpers.wait_for(lambda: len(helpers.server_backends(admin, proc, pg, user="alice")) == 1,
                             timeout=6, what="idle servers above min_pool_size to be closed")
    finally:
        for c in conns:
            c.close()
    helpers.assert_serving(proc)


def test_server_lifetime_recycles_servers(pgherd, helpers):
    proc = pgherd(general={"server_lifetime": 800, "default_pool_size": 1, "min_pool_size": 0})
    with helpers.connect(proc.dsn()) as conn:
        pid1 = helpers.backend_pid(conn)
        assert helpers.backend_pid(conn) == pid1
        time.sleep(1.2)
        pid2 = helpers.backend_pid(conn)
        assert pid2 != pid1
