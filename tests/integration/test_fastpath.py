"""The worker's fast path (worker/fastpath.py): plain requests served by the per-worker reactor.

A plain client in transaction pooling mode parks its task in the reactor between requests; the
reactor reads whole Query messages (or unnamed extended ones when prepared statements are not
rewritten), checks out a server or queues for one, relays the reply and hands anything unusual
back to the client's task. These tests drive real clients through a real pgherd and check the
results against Postgres itself.

That a client really is parked is checked on the worker: the reactor registers its sockets in its
own epoll set edge-triggered (EPOLLET), which trio never does, so /proc/<worker>/fdinfo shows
which client sockets the reactor holds (see parked_ports).

Some races are made deterministic by pausing pgherd's worker (SIGSTOP) while the peer acts, so
that everything it does reaches the worker's sockets before the worker looks (one epoll event),
as happens on a busy worker.

pgherds run with auth_type=trust, so raw clients log in with a bare StartupMessage.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import threading
import time
import uuid

import psutil
import psycopg
import pytest

from pgherd.shared.wire import messages as M

pytestmark = pytest.mark.timeout(60)

TEST_DB = "pgherd_test"
TABLE = "fastpath_t"
EPOLLET = 1 << 31


def general(**kw) -> dict:
    return {"workers": 1, "auth_type": "trust", "min_pool_size": 0, **kw}


@pytest.fixture(scope="module")
def fp(pgherd_module):
    """alice: 2 servers; bob: 1 server; queued clients wait up to 10 s."""
    return pgherd_module(general=general(default_pool_size=2, checkout_timeout=10_000), users=[
        {"name": "alice", "password": "alice-secret", "database": TEST_DB},
        {"name": "bob", "password": "bob-secret", "database": TEST_DB, "pool_size": 1}])


@pytest.fixture(scope="module")
def tight(pgherd_module):
    return pgherd_module(general=general(default_pool_size=1, checkout_timeout=300))


@pytest.fixture(scope="module")
def noprep(pgherd_module):
    return pgherd_module(general=general(default_pool_size=2, checkout_timeout=10_000,
                                         prepared_statements="disabled"))


@pytest.fixture
def client(helpers):
    """client(proc, user="alice", simple=True): psycopg autocommit connection, closed after the test.

    simple=True uses a ClientCursor: parameters are inlined and every statement goes as a
    simple-protocol Query message."""
    conns = []

    def make(proc, user: str = "alice", simple: bool = True) -> psycopg.Connection:
        kw = {"cursor_factory": psycopg.ClientCursor} if simple else {}
        conns.append(helpers.connect(proc.dsn(user, None), **kw))
        return conns[-1]

    yield make
    for c in conns:
        c.close()


@pytest.fixture(scope="module")
def table(pg, helpers):
    with helpers.connect(helpers.direct_dsn(pg)) as conn:
        conn.execute(f"create table if not exists {TABLE} (note text, n int)")
    return TABLE


def tag() -> str:
    return "fp-" + uuid.uuid4().hex[:10]


def sqlstate(exc: BaseException | None) -> str | None:
    return getattr(exc, "sqlstate", None)


# ---------------------------------------------------------------------------------------------
# Watching pgherd


def parked_ports(proc) -> set[int]:
    """Remote ports of the client sockets registered in a worker's fast-path epoll set."""
    ports: set[int] = set()
    for p in psutil.Process(proc.pid).children(recursive=True):
        edge: set[int] = set()
        try:
            for fd in os.listdir(f"/proc/{p.pid}/fd"):
                if os.readlink(f"/proc/{p.pid}/fd/{fd}") != "anon_inode:[eventpoll]":
                    continue
                with open(f"/proc/{p.pid}/fdinfo/{fd}") as f:
                    for line in f:  # "tfd:       23 events: 80000019 data: ..."
                        parts = line.split()
                        if parts[:1] == ["tfd:"] and int(parts[3], 16) & EPOLLET:
                            edge.add(int(parts[1]))
            conns = p.net_connections("tcp")
        except (OSError, psutil.Error):
            continue
        ports |= {c.raddr.port for c in conns if c.fd in edge and c.raddr and c.laddr.port == proc.port}
    return ports


def port_of(conn) -> int:
    """The local port of a psycopg connection or a raw client."""
    if isinstance(conn, psycopg.Connection):
        with socket.fromfd(conn.pgconn.socket, socket.AF_INET, socket.SOCK_STREAM) as s:
            return s.getsockname()[1]
    return conn.sock.getsockname()[1]


def wait_parked(proc, helpers, conns) -> None:
    ports = {port_of(c) for c in conns}
    helpers.wait_for(lambda: ports <= parked_ports(proc), 10,
                     what=f"clients {sorted(ports)} to park in the fast path")


@contextlib.contextmanager
def worker_paused(proc):
    """SIGSTOP pgherd's workers for the duration of the block."""
    workers = psutil.Process(proc.pid).children()
    assert workers
    for w in workers:
        w.suspend()
    try:
        yield
    finally:
        for w in workers:
            w.resume()


def pool_row(proc, user: str) -> dict:
    """SHOW POOLS row of user@pgherd_test (admin console)."""
    with psycopg.connect(proc.admin_dsn(), autocommit=True, connect_timeout=10, prepare_threshold=None) as a:
        cur = a.execute("SHOW POOLS")
        cols = [d.name for d in cur.description]
        found = [dict(zip(cols, r)) for r in cur.fetchall()]
    found = [r for r in found if r["user"] == user and r["database"] == TEST_DB]
    assert len(found) == 1, found
    return found[0]


def active_on_pg(pg_admin, marker: str) -> list[int]:
    """Pids of backends running a query that contains marker (excluding this lookup)."""
    return [r[0] for r in pg_admin.execute(
        "select pid from pg_stat_activity where state = 'active' and query like %s and pid <> pg_backend_pid()",
        (f"%{marker}%",)).fetchall()]


class Call(threading.Thread):
    """Run fn() in a thread; .result or .error afterwards."""

    def __init__(self, fn) -> None:
        super().__init__(daemon=True)
        self.fn, self.result, self.error = fn, None, None
        self.start()

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:  # noqa: BLE001 - checked by the test
            self.error = exc

    def outcome(self, timeout: float = 10):
        self.join(timeout)
        assert not self.is_alive(), "the client still waits"
        return self.result, self.error


def run_threads(n: int, fn) -> list[BaseException]:
    """fn(i) in n threads started together; returns their errors."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)

    def body(i: int) -> None:
        try:
            barrier.wait(30)
            fn(i)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(45)
    assert not any(t.is_alive() for t in threads), "client threads hung"
    return errors


# ---------------------------------------------------------------------------------------------
# Raw protocol


def values(body: bytes) -> list[bytes | None]:
    """The columns of a DataRow body."""
    (n,), p, out = struct.unpack_from("!h", body), 2, []
    for _ in range(n):
        (length,) = struct.unpack_from("!i", body, p)
        p += 4
        out.append(None if length < 0 else body[p:p + length])
        p += max(length, 0)
    return out


def replies(msgs: list[tuple[str, bytes]]) -> list[list[tuple[str, bytes]]]:
    """Backend messages split after each ReadyForQuery."""
    out, cur = [], []
    for m in msgs:
        cur.append(m)
        if m[0] == "Z":
            out.append(cur)
            cur = []
    assert not cur, f"messages after the last ReadyForQuery: {cur!r}"
    return out


def logged_in(helpers, proc, user: str = "alice"):
    raw = helpers.RawClient(proc, timeout=10)
    raw.startup(user=user)
    return raw


# ---------------------------------------------------------------------------------------------
# 1. Many clients, few servers


def test_many_clients_share_two_servers(fp, client, helpers, pg, pg_admin):
    conns = [client(fp) for _ in range(20)]
    answers: list[int] = []

    def work(i: int) -> None:
        for j in range(200):
            v = i * 1000 + j
            got = conns[i].execute("select %s::int, %s::text, pg_backend_pid()", (v, f"c{i}")).fetchone()
            assert got[:2] == (v, f"c{i}"), (i, j, got)
            answers.append(got[2])

    errors = run_threads(20, work)
    assert errors == [], errors[:3]
    assert len(answers) == 20 * 200
    pids = set(answers)
    backends = helpers.server_backends(pg_admin, fp, pg, "alice")
    assert 1 <= len(pids) <= 2, f"alice's answers came from {len(pids)} backends for a pool of 2"
    assert pids <= {b["pid"] for b in backends}, (pids, backends)
    assert len(backends) <= 2 and all(b["state"] == "idle" for b in backends), backends
    row = pool_row(fp, "alice")
    assert row["sv_active"] == 0 and row["sv_idle"] <= 2 and row["cl_waiting"] == 0, row
    # All 20 idle clients are parked in the reactor, not in their own tasks.
    wait_parked(fp, helpers, conns)


# ---------------------------------------------------------------------------------------------
# 2./3. Queued in the pool's FIFO: checkout_timeout, cancel


def test_checkout_timeout_while_queued(tight, client, helpers):
    holder, w1, w2 = client(tight), client(tight), client(tight)
    for c in (holder, w1, w2):
        c.execute("select 1")
    holder.execute("begin")
    holder.execute("select 'holding'")
    wait_parked(tight, helpers, [w1, w2])
    t0 = time.monotonic()
    calls = [Call(lambda c=c: c.execute("select 'waited'").fetchone()) for c in (w1, w2)]
    for call in calls:
        _, err = call.outcome()
        assert sqlstate(err) == "53300", repr(err)
        assert "checkout_timeout" in str(err)
    elapsed = time.monotonic() - t0
    assert 0.25 <= elapsed < 5, elapsed
    row = pool_row(tight, "alice")
    assert row["cl_waiting"] == 0 and row["maxwait"] == 0 and row["maxwait_us"] == 0, row
    assert holder.execute("select 'holder ok'").fetchone() == ("holder ok",)
    assert holder.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
    holder.execute("commit")
    assert w1.execute("select 'served'").fetchone() == ("served",)
    assert w2.execute("select 'served too'").fetchone() == ("served too",)


def test_cancel_while_queued_and_in_flight(fp, client, helpers, pg_admin):
    holder, waiter = client(fp, "bob"), client(fp, "bob")  # bob: one server
    waiter.execute("select 1")
    holder.execute("begin")
    holder.execute("select 'holding'")
    wait_parked(fp, helpers, [waiter])
    call = Call(lambda: waiter.execute("select 'queued'").fetchone())
    helpers.wait_for(lambda: pool_row(fp, "bob")["cl_waiting"] == 1, 5, what="the waiter to queue")
    waiter.cancel_safe()
    _, err = call.outcome(5)
    assert sqlstate(err) == "57014", repr(err)
    assert pool_row(fp, "bob")["cl_waiting"] == 0
    holder.execute("commit")
    assert waiter.execute("select 'usable'").fetchone() == ("usable",)

    # The same request in flight: the cancel reaches Postgres.
    marker = tag()
    call = Call(lambda: waiter.execute(f"select pg_sleep(10), '{marker}'").fetchone())
    helpers.wait_for(lambda: active_on_pg(pg_admin, marker), 5, what="the query to run on Postgres")
    waiter.cancel_safe()
    _, err = call.outcome(5)
    assert sqlstate(err) == "57014", repr(err)
    assert waiter.execute("select 'still usable'").fetchone() == ("still usable",)
    assert holder.execute("select 'holder too'").fetchone() == ("holder too",)


# ---------------------------------------------------------------------------------------------
# 4. Transactions


def test_transactions_commit_and_rollback(fp, client, helpers, pg, table):
    note = tag()
    c, other = client(fp), client(fp)
    with helpers.connect(helpers.direct_dsn(pg)) as direct:
        def rows() -> list[int]:
            return [r[0] for r in direct.execute(f"select n from {table} where note = %s order by n",
                                                 (note,)).fetchall()]

        c.execute("begin")
        pid = c.execute("select pg_backend_pid()").fetchone()[0]
        c.execute(f"insert into {table} values (%s, 1)", (note,))
        assert other.execute("select 'meanwhile'").fetchone() == ("meanwhile",)  # the other server
        c.execute(f"insert into {table} values (%s, 2)", (note,))
        assert c.execute(f"select count(*) from {table} where note = %s", (note,)).fetchone() == (2,)
        assert rows() == [], "uncommitted rows visible on Postgres"
        assert c.execute("select pg_backend_pid()").fetchone() == (pid,)
        c.execute("commit")
        assert rows() == [1, 2]

        c.execute("begin")
        c.execute(f"insert into {table} values (%s, 3)", (note,))
        assert c.execute(f"select count(*) from {table} where note = %s", (note,)).fetchone() == (3,)
        c.execute("rollback")
        assert rows() == [1, 2]

        # One Query message holding a whole transaction; then one that fails inside it (the
        # transaction is left failed, as on Postgres directly) and is rolled back.
        c.execute(f"begin; insert into {table} values ('{note}', 4); insert into {table} values ('{note}', 5); commit")
        for conn in (c, direct):
            with pytest.raises(psycopg.errors.DivisionByZero):
                conn.execute(f"begin; insert into {table} values ('{note}', 6); select 1/0; commit")
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
            conn.execute("rollback")
        assert c.execute(f"select count(*) from {table} where note = %s", (note,)).fetchone() == (4,)
        assert rows() == [1, 2, 4, 5]


# ---------------------------------------------------------------------------------------------
# 5. Pipelined simple queries


def test_pipelined_queries(fp, helpers):
    raw = logged_in(helpers, fp)
    wait_parked(fp, helpers, [raw])
    raw.send(M.query("select 1") + M.query("select 1/0") + M.query("select 'three', pg_backend_pid()"))
    first, second, third = replies(raw.read_until("Z") + raw.read_until("Z") + raw.read_until("Z"))
    assert [t for t, _ in first] == ["T", "D", "C", "Z"] and values(first[1][1]) == [b"1"], first
    assert [t for t, _ in second] == ["E", "Z"], second
    assert helpers.error_fields(second[0][1])["C"] == "22012"
    assert [t for t, _ in third] == ["T", "D", "C", "Z"] and values(third[1][1])[0] == b"three", third
    assert all(r[-1][1] == b"I" for r in (first, second, third))

    # The next query arrives while the first is still in flight (read after its reply).
    raw.send(M.query("select pg_sleep(0.3), 'slow'"))
    time.sleep(0.1)
    raw.send(M.query("select 'next'"))
    slow, nxt = replies(raw.read_until("Z") + raw.read_until("Z"))
    assert values(slow[1][1]) == [b"", b"slow"] and values(nxt[1][1]) == [b"next"], (slow, nxt)
    assert values(raw.query("select 'still here'")[1][1]) == [b"still here"]
    raw.close()


# ---------------------------------------------------------------------------------------------
# 6. A big result for a slow reader

BIG_SQL = "select repeat('x', 1000) from generate_series(1, 20000)"
BIG_ROW = struct.pack("!hi", 1, 1000) + b"x" * 1000


def read_replies(sock: socket.socket, count: int, slow_bytes: int, on_slow_done=None) -> list[list]:
    """Read `count` replies (up to ReadyForQuery each): the first slow_bytes in 4 KB reads 5 ms
    apart (pgherd's sends to this client come up short), then at full speed. DataRows equal to
    BIG_ROW are kept as "big" markers, not copies."""
    buf, got, p, msgs, done = bytearray(), 0, 0, [], 0
    while done < count:
        slow = got < slow_bytes
        chunk = sock.recv(4096 if slow else 1 << 20)
        assert chunk, f"pgherd closed the connection after {got} bytes"
        got += len(chunk)
        if slow:
            time.sleep(0.005)
        elif on_slow_done is not None:
            on_slow_done()
            on_slow_done = None
        buf += chunk
        while len(buf) - p >= 5:
            t, length = struct.unpack_from("!cI", buf, p)
            if len(buf) - p < 1 + length:
                break
            body = bytes(buf[p + 5:p + 1 + length])
            msgs.append(("big", b"") if t == b"D" and body == BIG_ROW else (t.decode(), body))
            p += 1 + length
            done += t == b"Z"
        del buf[:p]
        p = 0
    assert not buf
    return replies(msgs)


def test_big_result_slow_reader(fp, helpers, client, pg):
    raw = logged_in(helpers, fp)
    wait_parked(fp, helpers, [raw])
    raw.send(M.query(BIG_SQL) + M.query("select 'pipelined'"))
    # A third query sent while pgherd is still stuck on the big reply.
    big, piped, late = read_replies(raw.sock, 3, slow_bytes=400_000,
                                    on_slow_done=lambda: raw.send(M.query("select 'late'")))
    assert [t for t, _ in big[:1] + big[-2:]] == ["T", "C", "Z"]
    assert [t for t, _ in big[1:-2]] == ["big"] * 20000
    assert big[-2][1] == b"SELECT 20000\0"
    assert values(piped[1][1]) == [b"pipelined"] and values(late[1][1]) == [b"late"]
    assert values(raw.query("select 'after'")[1][1]) == [b"after"]
    raw.close()

    with helpers.connect(helpers.direct_dsn(pg)) as direct:
        expected = direct.execute(BIG_SQL).fetchall()
    conn = client(fp)
    assert conn.execute(BIG_SQL).fetchall() == expected
    assert conn.execute("select 'after'").fetchone() == ("after",)


# ---------------------------------------------------------------------------------------------
# 7. Session settings follow each client across servers


def test_settings_follow_the_client(fp, client):
    setters, plain = [client(fp) for _ in range(4)], [client(fp) for _ in range(4)]
    default = plain[0].execute("show application_name").fetchone()[0]
    assert not default.startswith("fp")
    for i, c in enumerate(setters):
        c.execute(f"set application_name = 'fp{i}'")
    # Inside a transaction: kept after COMMIT, undone by ROLLBACK.
    setters[2].execute("begin")
    setters[2].execute("set application_name = 'fp2-committed'")
    setters[2].execute("commit")
    setters[3].execute("begin")
    setters[3].execute("set application_name = 'fp3-rolled-back'")
    setters[3].execute("rollback")
    want = ["fp0", "fp1", "fp2-committed", "fp3"] + [default] * 4
    conns = setters + plain

    def work(i: int) -> None:
        for j in range(100):
            got = conns[i].execute("show application_name").fetchone()[0]
            assert got == want[i], (i, j, got)

    errors = run_threads(len(conns), work)
    assert errors == [], errors[:3]
    setters[0].execute("reset application_name")
    assert setters[0].execute("show application_name").fetchone() == (default,)


# ---------------------------------------------------------------------------------------------
# 8./9. A server or a client lost mid-query


def test_server_lost_mid_query(pgherd, client, helpers, pg_admin):
    """One server: the client queued behind the lost one gets a new server (WAIT_SLOT).

    The worker is paused while the backend exits, so its FATAL and its EOF arrive together.
    (Its own pgherd: a client left hanging would hold the pool's only server.)"""
    fp = pgherd(general=general(default_pool_size=1, checkout_timeout=10_000, shutdown_timeout=2_000))
    victim, queued = client(fp), client(fp)
    old = queued.execute("select pg_backend_pid()").fetchone()[0]
    victim.execute("select 'warm'")
    wait_parked(fp, helpers, [victim, queued])
    marker = tag()
    lost = Call(lambda: victim.execute(f"select pg_sleep(5), '{marker}'").fetchone())
    pids = helpers.wait_for(lambda: active_on_pg(pg_admin, marker), 5, what="the query on Postgres")
    assert pids == [old]
    served = Call(lambda: queued.execute("select 'served', pg_backend_pid()").fetchone())
    helpers.wait_for(lambda: pool_row(fp, "alice")["cl_waiting"] == 1, 5, what="the second client to queue")
    with worker_paused(fp):
        pg_admin.execute("select pg_terminate_backend(%s)", (old,))
        helpers.wait_for(lambda: not pg_admin.execute("select 1 from pg_stat_activity where pid = %s",
                                                      (old,)).fetchone(), 5, what="the backend to exit")
    _, err = lost.outcome(5)
    assert isinstance(err, psycopg.OperationalError) and sqlstate(err) in ("57P01", "08006"), repr(err)
    with pytest.raises(psycopg.OperationalError):
        victim.execute("select 1")  # client_connection_recovery "drop": disconnected
    result, err = served.outcome(5)
    assert err is None and result[0] == "served" and result[1] != old, (result, err)
    with client(fp) as fresh:
        assert fresh.execute("select 'fresh'").fetchone() == ("fresh",)
    assert queued.execute("select 'still usable'").fetchone() == ("still usable",)


@pytest.mark.parametrize("how", ["close", "reset", "close at once"])
def test_client_vanishes_mid_query(fp, client, helpers, pg_admin, how):
    """The client goes (FIN or RST) while its query runs, or sends it and closes at once (the
    worker sees the query and the EOF together). bob's only server must come back."""
    marker = tag()
    raw = logged_in(helpers, fp, "bob")
    wait_parked(fp, helpers, [raw])
    if how == "close at once":
        with worker_paused(fp):
            raw.send(M.query(f"select pg_sleep(1), '{marker}'"))
            raw.close()
    else:
        raw.send(M.query(f"select pg_sleep(1), '{marker}'"))
        helpers.wait_for(lambda: active_on_pg(pg_admin, marker), 5, what="the query on Postgres")
        if how == "reset":
            raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        raw.close()
    # A burst from other clients through bob's only server, queued behind the abandoned query.
    conns = [client(fp, "bob") for _ in range(5)]

    def work(i: int) -> None:
        for j in range(20):
            assert conns[i].execute("select %s::int", (i * 100 + j,)).fetchone() == (i * 100 + j,)

    assert run_threads(5, work) == []
    helpers.wait_for(lambda: not active_on_pg(pg_admin, marker), 3, what="the abandoned query to end")
    assert pool_row(fp, "bob")["sv_active"] == 0


def test_client_half_closes_after_query(fp, helpers):
    """A client sends a query and shuts down its sending side: it gets the reply, then pgherd
    closes the connection (as Postgres does at a client's EOF). The worker is paused meanwhile,
    so it sees the query and the EOF together."""
    raw = logged_in(helpers, fp)
    wait_parked(fp, helpers, [raw])
    with worker_paused(fp):
        raw.send(M.query("select 'last words'"))
        raw.sock.shutdown(socket.SHUT_WR)
    assert values(raw.read_until("Z")[1][1]) == [b"last words"]
    raw.sock.settimeout(3)
    raw.expect_closed()
    raw.close()


# ---------------------------------------------------------------------------------------------
# 10. COPY after plain queries


def test_copy_after_plain_queries(fp, client, helpers, pg, table):
    note = tag()
    conn = client(fp)
    for i in range(3):
        assert conn.execute("select %s::int", (i,)).fetchone() == (i,)
    wait_parked(fp, helpers, [conn])
    with conn.cursor().copy(f"copy {table} (note, n) from stdin") as copy:
        for i in range(5000):
            copy.write_row((note, i))
    assert conn.execute(f"select count(*), sum(n) from {table} where note = %s", (note,)).fetchone() \
        == (5000, sum(range(5000)))
    sql = f"copy (select n, note from {table} where note = '{note}' order by n) to stdout"
    with conn.cursor().copy(sql) as copy:
        via = b"".join(bytes(b) for b in copy)
    assert conn.execute("select 'after copy'").fetchone() == ("after copy",)
    with helpers.connect(helpers.direct_dsn(pg)) as direct:
        assert direct.execute(f"select count(*) from {table} where note = %s", (note,)).fetchone() == (5000,)
        with direct.cursor().copy(sql) as copy:
            assert via == b"".join(bytes(b) for b in copy)
    assert via.count(b"\n") == 5000


# ---------------------------------------------------------------------------------------------
# 11. Extended protocol without prepared-statement rewriting


def test_extended_protocol_without_rewriting(noprep, client, helpers, pg, pg_admin):
    conns = [client(noprep, simple=False) for _ in range(5)]
    pids: set[int] = set()

    def work(i: int) -> None:
        for j in range(100):
            v = i * 1000 + j
            got = conns[i].execute("select %s::int + 1, %s::text, %s::text, pg_backend_pid()",
                                   (v, f"c{i}", None)).fetchone()
            assert got[:3] == (v + 1, f"c{i}", None), (i, j, got)
            pids.add(got[3])

    assert run_threads(5, work) == []
    assert 1 <= len(pids) <= 2, pids
    assert len(helpers.server_backends(pg_admin, noprep, pg, "alice")) <= 2
    wait_parked(noprep, helpers, conns)


# ---------------------------------------------------------------------------------------------
# 12. Shutdown


def test_sigterm_drains_and_exits(pgherd, client, helpers, pg_admin):
    proc = pgherd(general=general(default_pool_size=4, shutdown_timeout=30_000))
    idle = [client(proc) for _ in range(10)]
    for c in idle:
        c.execute("select 1")
    sleeper = client(proc)
    sleeper.execute("select 1")
    wait_parked(proc, helpers, idle + [sleeper])
    marker = tag()
    call = Call(lambda: sleeper.execute(f"select pg_sleep(1), '{marker}'").fetchone())
    helpers.wait_for(lambda: active_on_pg(pg_admin, marker), 5, what="the query on Postgres")
    t0 = time.monotonic()
    proc.signal(signal.SIGTERM)
    assert call.is_alive(), "the query ended before SIGTERM; the test proves nothing"
    assert call.outcome(10) == (("", marker), None)
    assert proc.wait(15) == 0, proc.log_tail()
    assert time.monotonic() - t0 < 10, "pgherd waited for shutdown_timeout"
    for c in idle:
        with pytest.raises(psycopg.OperationalError):
            c.execute("select 1")


# ---------------------------------------------------------------------------------------------
# 13. The reactor waits in its own epoll while trio is idle: trio's tasks must not starve


def test_tasks_stay_prompt_while_the_reactor_is_busy(fp, client, helpers):
    """Logins and task-served (tracked, extended-protocol) clients next to busy parked clients.

    The reactor blocks in its own epoll set, which holds trio's: every wake-up of a task (a
    socket of trio's, a task made runnable by a callback, a timer) must end that wait at once.
    A wake-up it missed would leave the task waiting for trio's next timer (a quarter of a
    second or more), so 300 queries and 20 logins would take over a minute instead of seconds.
    """
    busy = [client(fp) for _ in range(6)]
    stop = threading.Event()

    def hammer(i: int) -> None:
        while not stop.is_set():
            assert busy[i].execute("select %s::int", (i,)).fetchone() == (i,)

    load = [Call(lambda i=i: hammer(i)) for i in range(len(busy))]
    try:
        tracked = client(fp, simple=False)  # prepared statements: served by its own task
        started = time.monotonic()
        for j in range(300):
            assert tracked.execute("select %s::int + 1", (j,)).fetchone() == (j + 1,)
        queries = time.monotonic() - started
        started = time.monotonic()
        for _ in range(20):
            with helpers.connect(fp.dsn("alice", None)) as conn:
                assert conn.execute("select 1").fetchone() == (1,)
        logins = time.monotonic() - started
    finally:
        stop.set()
        for call in load:
            assert call.outcome()[1] is None
    assert queries < 20 and logins < 20, f"300 task-served queries took {queries:.1f} s, 20 logins {logins:.1f} s"
