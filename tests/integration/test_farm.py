"""The farm: one supervisor, several worker processes on one port (issue 3).

Real processes, real clients, checked on Postgres itself: clients spread over every worker;
a worker killed with SIGKILL under pgbench comes back under the same index while the others
keep serving and no server connection leaks; cancel requests reach the owning worker from any
worker; SIGTERM lets transactions in flight commit; unique ids from several processes.

Which worker owns a client is encoded in the BackendKeyData pid pgherd hands out:
worker index = (pid >> 22) - 1 (see shared/backend_key.py).
"""

from __future__ import annotations

import multiprocessing
import os
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import threading
import time
from pathlib import Path

import psutil
import psycopg
import pytest
from psycopg import errors as pgerr

from pgherd.shared.localpg import pg_bin_dir
from pgherd.shared.unique_id import UniqueIdGenerator, decode

pytestmark = pytest.mark.timeout(90)

TEST_DB = "pgherd_test"
WORKERS = 3
# Instance-wide pool size: 10 server connections per worker.
POOL_SIZE = 30
NODE_ID = 7
CLIENTS = 60
CANCEL_ROUNDS = 20
CANCEL_REQUEST_CODE = 80877102
# A cancel reaches Postgres in milliseconds; a second or two allows for a loaded machine.
CANCEL_DEADLINE = 2.0
# A restarted worker comes back after 0.5 s of backoff plus its start-up (about a second).
RESTART_TIMEOUT = 15
PGBENCH_CLIENTS = 12
PGBENCH_SECONDS = 8


def worker_of(pid: int) -> int:
    """The worker index encoded in a BackendKeyData pid handed out by pgherd."""
    return (pid >> 22) - 1


def rows(cur: psycopg.Cursor) -> list[dict]:
    cols = [d.name for d in cur.description]
    return [dict(zip(cols, r)) for r in cur.fetchall()]


def show(admin: psycopg.Connection, what: str) -> list[dict]:
    """An admin console SHOW (psycopg sends a query without parameters as a simple Query)."""
    return rows(admin.execute(f"SHOW {what}"))


def admin_connect(proc) -> psycopg.Connection:
    # prepare_threshold=None: psycopg would otherwise prepare a query run 5 times (extended
    # protocol), and the admin console speaks the simple protocol only.
    return psycopg.connect(proc.admin_dsn(), autocommit=True, connect_timeout=10, prepare_threshold=None)


def wait_all_serving(proc, helpers, workers: int = WORKERS) -> list[dict]:
    """SHOW WORKERS once every worker serves (the fixture only waits for the port to accept)."""
    with admin_connect(proc) as admin:
        return helpers.wait_for(
            lambda: (lambda ws: ws if len(ws) == workers and all(w["state"] == "serving" for w in ws) else None)(
                show(admin, "WORKERS")),
            timeout=20, what=f"{workers} workers serving")


def connect_on_workers(proc, helpers, wanted: dict[int, int], user: str = "alice", tries: int = 300,
                       **kwargs) -> dict[int, list[psycopg.Connection]]:
    """Connections placed on given workers: {worker index: how many}. SO_REUSEPORT picks the
    worker by the connection's addresses, so connect until each wanted worker has enough."""
    kept: dict[int, list[psycopg.Connection]] = {w: [] for w in wanted}
    for _ in range(tries):
        if all(len(kept[w]) >= n for w, n in wanted.items()):
            return kept
        conn = helpers.connect(proc.dsn(user, helpers.PASSWORDS[user]), **kwargs)
        w = worker_of(conn.info.backend_pid)
        if w in kept and len(kept[w]) < wanted[w]:
            kept[w].append(conn)
        else:
            conn.close()
    for conns in kept.values():
        for c in conns:
            c.close()
    pytest.fail(f"could not place connections {wanted} on workers in {tries} attempts")


@pytest.fixture(scope="module")
def farm(pgherd_module, helpers):
    proc = pgherd_module(general={"workers": WORKERS, "default_pool_size": POOL_SIZE, "node_id": NODE_ID,
                                  "checkout_timeout": 10_000, "stats_period": 1_000})
    wait_all_serving(proc, helpers)
    return proc


# ---------------------------------------------------------------------------------------------
# Clients spread over every worker


def test_every_worker_serves_some_of_60_clients(farm, helpers, pg, pg_admin):
    conns = []
    try:
        for _ in range(CLIENTS):
            conns.append(helpers.connect(farm.dsn()))
        ours = {b["pid"] for b in helpers.server_backends(pg_admin, farm, pg, "alice")}
        for conn in conns:
            # Each client really reaches Postgres, through one of pgherd's own server connections.
            pid = helpers.backend_pid(conn)
            if pid not in ours:
                ours = {b["pid"] for b in helpers.server_backends(pg_admin, farm, pg, "alice")}
            assert pid in ours, f"backend {pid} is not one of pgherd's server connections {sorted(ours)}"
        client_ids = {c.info.backend_pid for c in conns}
        assert len(client_ids) == CLIENTS, "two clients got the same BackendKeyData pid"

        children = {p.pid: p for p in psutil.Process(farm.pid).children(recursive=True)}
        with admin_connect(farm) as admin:
            workers = show(admin, "WORKERS")
            clients = show(admin, "CLIENTS")

        # SHOW WORKERS: three live worker processes of this supervisor, each serving some clients.
        assert [w["index"] for w in workers] == list(range(WORKERS))
        assert len({w["pid"] for w in workers}) == WORKERS
        for w in workers:
            assert w["state"] == "serving", w
            assert w["pid"] in children, f"worker {w['index']} pid {w['pid']} is not a child of pgherd {farm.pid}"
            assert "pgherd.worker" in " ".join(children[w["pid"]].cmdline())
            assert w["node"] == NODE_ID + w["index"], w
            assert w["restarts"] == 0, w
            assert w["clients"] > 0, f"worker {w['index']} serves no client: {workers}"
            assert w["rss_bytes"] > 1_000_000 and w["cpu_seconds"] > 0, w
            assert w["uptime"] >= 0
        # 60 clients + the admin connection asking.
        assert sum(w["clients"] for w in workers) == CLIENTS + 1, workers

        # SHOW CLIENTS: every client once, on the worker its pid names; counts agree with SHOW WORKERS.
        assert len(clients) == CLIENTS + 1, clients
        alice = [c for c in clients if c["user"] == "alice"]
        assert {c["id"] for c in alice} == client_ids
        admins = [c for c in clients if c["user"] == "admin"]
        assert len(admins) == 1 and admins[0]["database"] == "admin"
        for c in clients:
            assert c["worker"] == worker_of(c["id"]), c
            assert c["database"] == (TEST_DB if c["user"] == "alice" else "admin")
        per_worker = {w["index"]: sum(1 for c in clients if c["worker"] == w["index"]) for w in workers}
        assert per_worker == {w["index"]: w["clients"] for w in workers}

        # Idle clients in transaction mode hold no server: at most the pool's size on Postgres.
        assert len(helpers.server_backends(pg_admin, farm, pg, "alice")) <= POOL_SIZE
    finally:
        for conn in conns:
            conn.close()
    with admin_connect(farm) as admin:
        helpers.wait_for(lambda: len(show(admin, "CLIENTS")) == 1, timeout=5, what="the 60 clients gone")


# ---------------------------------------------------------------------------------------------
# Cancel requests land on any worker


class Bystander(threading.Thread):
    """A client on a given worker running `select pg_sleep(...)` over and over; any error
    (a QueryCanceled meant for somebody else) is kept."""

    def __init__(self, conn: psycopg.Connection, seconds: float) -> None:
        super().__init__(daemon=True)
        self.conn, self.seconds = conn, seconds
        self.stop = threading.Event()
        self.done = 0
        self.errors: list[BaseException] = []

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                t0 = time.monotonic()
                self.conn.execute("select pg_sleep(%s)" % self.seconds)
                assert time.monotonic() - t0 >= self.seconds * 0.9, "pg_sleep returned early"
                self.done += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(exc)


def active_query(admin: psycopg.Connection, text: str) -> bool:
    return bool(admin.execute("select 1 from pg_stat_activity where query = %s and state = 'active'",
                              (text,)).fetchone())


def test_cancel_from_a_fresh_connection_reaches_the_owner(farm, helpers, pg_admin):
    placed = connect_on_workers(farm, helpers, {w: 1 for w in range(WORKERS)})
    bystanders = [Bystander(conns[0], 1.0) for conns in placed.values()]
    for b in bystanders:
        b.start()
    victims_on: dict[int, int] = {}
    slow: list[str] = []
    try:
        for rnd in range(CANCEL_ROUNDS):
            # A fresh victim each round, so the victims too land on every worker.
            with helpers.connect(farm.dsn()) as victim:
                victims_on[worker_of(victim.info.backend_pid)] = victims_on.get(worker_of(victim.info.backend_pid), 0) + 1
                sql = f"select pg_sleep(30) /* cancel round {rnd} */"
                outcome: list = []

                def run() -> None:
                    try:
                        victim.execute(sql)
                        outcome.append("completed")
                    except BaseException as exc:  # noqa: BLE001
                        outcome.append(exc)
                    outcome.append(time.monotonic())

                t = threading.Thread(target=run, daemon=True)
                t.start()
                helpers.wait_for(lambda: active_query(pg_admin, sql), timeout=10, what=f"round {rnd}'s pg_sleep on Postgres")
                t0 = time.monotonic()
                victim.cancel_safe(timeout=5)  # a new connection: SO_REUSEPORT may give it to any worker
                t.join(CANCEL_DEADLINE + 5)
                assert not t.is_alive(), f"round {rnd}: the cancelled query still runs after {CANCEL_DEADLINE + 5} s"
                assert isinstance(outcome[0], pgerr.QueryCanceled), f"round {rnd}: {outcome[0]!r}"
                assert outcome[0].sqlstate == "57014"
                if outcome[1] - t0 > CANCEL_DEADLINE:
                    slow.append(f"round {rnd}: {outcome[1] - t0:.2f} s")
                # The victim's session goes on.
                assert victim.execute("select 6 * 7").fetchone() == (42,)
    finally:
        for b in bystanders:
            b.stop.set()
        for b in bystanders:
            b.join(5)
        for conns in placed.values():
            for c in conns:
                c.close()
    assert not slow, f"cancels took longer than {CANCEL_DEADLINE} s: {slow}"
    for b in bystanders:
        assert not b.errors, f"a bystander's query failed (a cancel hit the wrong client?): {b.errors!r}"
        assert b.done >= 1
    assert len(victims_on) == WORKERS, f"victims landed only on workers {victims_on}"


def raw_cancel(proc, pid: int, secret: int) -> bytes:
    """Send one CancelRequest on a new connection; return what pgherd answered before closing."""
    with socket.create_connection((proc.host, proc.port), timeout=5) as sock:
        sock.sendall(struct.pack("!iiii", 16, CANCEL_REQUEST_CODE, pid, secret))
        got = b""
        while True:
            chunk = sock.recv(1024)  # socket.timeout here: pgherd kept the connection open
            if not chunk:
                return got
            got += chunk


def test_cancel_with_a_wrong_secret_cancels_nothing(farm, helpers, pg_admin):
    with helpers.connect(farm.dsn()) as victim:
        pid = victim.info.backend_pid
        sql = "select pg_sleep(2) /* wrong secret */"
        outcome: list = []

        def run() -> None:
            try:
                outcome.append(victim.execute(sql).fetchone())
            except BaseException as exc:  # noqa: BLE001
                outcome.append(exc)

        t0 = time.monotonic()
        t = threading.Thread(target=run, daemon=True)
        t.start()
        helpers.wait_for(lambda: active_query(pg_admin, sql), timeout=10, what="the pg_sleep on Postgres")
        # Many requests, so that they land on every worker (forwarded to the owner, which must
        # check the secret); also pids that name no client and no worker.
        for secret in (0, 1, 12345, 0x7FFFFFFF, -1, 42, 7, 99, 1 << 20):
            assert raw_cancel(farm, pid, secret) == b""
        for other in (pid + 1, (WORKERS + 5 + 1) << 22 | 1, 0, -1):
            assert raw_cancel(farm, other, 0) == b""
        t.join(10)
        assert not t.is_alive()
        assert outcome and outcome[0] == ("",), f"the query was cancelled by a wrong secret: {outcome!r}"
        assert time.monotonic() - t0 >= 2
        assert victim.execute("select 1").fetchone() == (1,)
    helpers.assert_serving(farm)


# ---------------------------------------------------------------------------------------------
# unique_id() generators in several processes


def _ids_in_process(node: int, count: int, barrier, out) -> None:
    gen = UniqueIdGenerator(node)
    barrier.wait(30)  # every process bursts in the same milliseconds
    out.put((node, [gen.next_id() for _ in range(count)]))


def test_unique_ids_from_several_processes_are_unique():
    per_process = 20_000  # several milliseconds' worth (4096 per millisecond per node)
    nodes = [0, 1, 2, NODE_ID, 1023]
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters, like pgherd's workers
    barrier, out = ctx.Barrier(len(nodes)), ctx.Queue()
    procs = [ctx.Process(target=_ids_in_process, args=(n, per_process, barrier, out)) for n in nodes]
    for p in procs:
        p.start()
    try:
        got = dict(out.get(timeout=60) for _ in nodes)
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    results = [got[n] for n in nodes]
    for node, ids in zip(nodes, results):
        assert len(ids) == per_process
        assert all(isinstance(i, int) and 0 < i < 2**63 for i in ids)
        assert all(a < b for a, b in zip(ids, ids[1:])), "ids of one generator must strictly increase"
        assert {decode(i)[1] for i in ids} == {node}
    everything = [i for ids in results for i in ids]
    assert len(set(everything)) == len(everything), "two processes with distinct nodes gave the same id"
    # They really ran at the same time: ids of different nodes share milliseconds.
    stamps = [{decode(i)[0] for i in ids} for ids in results]
    assert any(a & b for i, a in enumerate(stamps) for b in stamps[i + 1:]), "the processes never overlapped"


# ---------------------------------------------------------------------------------------------
# SIGTERM: transactions in flight commit, then exit 0


def test_sigterm_lets_transactions_in_flight_commit(pgherd, helpers, pg, pg_admin):
    pg_admin.execute("drop table if exists farm_sigterm")
    pg_admin.execute("create table farm_sigterm (client int, n int)")
    pg_admin.execute("grant all on farm_sigterm to alice")
    proc = pgherd(general={"workers": WORKERS, "default_pool_size": POOL_SIZE, "shutdown_timeout": 10_000})
    wait_all_serving(proc, helpers)
    placed = connect_on_workers(proc, helpers, {0: 2, 1: 2, 2: 1}, autocommit=False)
    conns = [c for cs in placed.values() for c in cs]
    try:
        for i, conn in enumerate(conns):
            conn.execute("insert into farm_sigterm values (%s, 1)", (i,))  # psycopg sends BEGIN first
        in_tx = [b for b in helpers.server_backends(pg_admin, proc, pg, "alice") if b["has_xid"]]
        assert len(in_tx) == len(conns), in_tx
        proc.signal(signal.SIGTERM)
        t_signal = time.monotonic()

        def refuses() -> bool:
            try:
                socket.create_connection((proc.host, proc.port), timeout=1).close()
                return False
            except OSError:
                return True

        helpers.wait_for(refuses, timeout=5, what="pgherd to stop accepting connections")
        time.sleep(0.3)
        assert proc.returncode is None, "pgherd exited with transactions in flight"
        for i, conn in enumerate(conns):
            conn.execute("insert into farm_sigterm values (%s, 2)", (i,))
            conn.commit()
        code = proc.wait(15)
        assert code == 0, f"exit status {code}\n{proc.log_tail()}"
        assert time.monotonic() - t_signal < 10, "pgherd waited for the whole shutdown_timeout"
    finally:
        for conn in conns:
            conn.close()
    got = pg_admin.execute("select client, n from farm_sigterm order by client, n").fetchall()
    assert got == [(i, n) for i in range(len(conns)) for n in (1, 2)]
    pg_admin.execute("drop table farm_sigterm")


def bus_dir_of(proc) -> Path:
    """The supervisor's bus directory, from a worker's command line (`--bus DIR`)."""
    for child in psutil.Process(proc.pid).children():
        argv = child.cmdline()
        if "--bus" in argv:
            return Path(argv[argv.index("--bus") + 1])
    pytest.fail("no worker with --bus on its command line")


def test_bus_directory_is_private_and_removed_at_exit(pgherd, helpers):
    proc = pgherd(general={"workers": 2})
    wait_all_serving(proc, helpers, workers=2)
    bus = bus_dir_of(proc)
    assert stat.S_IMODE(bus.stat().st_mode) == 0o700, oct(bus.stat().st_mode)
    assert proc.stop() == 0
    assert not bus.exists(), f"{bus} left behind"


def test_second_sigterm_exits_at_once(pgherd, helpers):
    proc = pgherd(general={"workers": WORKERS, "shutdown_timeout": 60_000})
    workers = [w["pid"] for w in wait_all_serving(proc, helpers)]
    conn = helpers.connect(proc.dsn(), autocommit=False)
    try:
        conn.execute("select 1")  # a transaction in flight holds the shutdown
        proc.signal(signal.SIGTERM)
        time.sleep(0.5)
        assert proc.returncode is None
        t0 = time.monotonic()
        proc.signal(signal.SIGTERM)
        code = proc.wait(10)
        assert time.monotonic() - t0 < 5
        assert code != 0  # docs/operations.md: status 1
    finally:
        conn.close()  # its connection is gone with the killed worker
    helpers.wait_for(lambda: not any(helpers.pid_alive(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                                     for p in workers), timeout=5, what="the workers to be gone")


def test_no_worker_can_start_exits_non_zero(pgherd):
    # The port is held by a socket without SO_REUSEPORT: no worker can bind it.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc = pgherd(general={"workers": 2, "port": port}, expect_fail=True)
    assert proc.returncode not in (0, None)
    log = proc.log()
    assert "worker 0" in log and re.search(r"address already in use|errno 98", log, re.I), log
    assert "no worker could start" in log


def test_node_numbers_must_fit_in_10_bits(pgherd):
    proc = pgherd(general={"workers": WORKERS, "node_id": 1022}, expect_fail=True)
    assert proc.returncode not in (0, None)
    assert "1022..1024" in proc.log() and "10 bits" in proc.log(), proc.log()


# ---------------------------------------------------------------------------------------------
# kill -9 one worker under pgbench (last: it changes the shared farm's worker table)


def pgbench_bin() -> str:
    return shutil.which("pgbench") or str(pg_bin_dir() / "pgbench")


def pgbench_env() -> dict:
    return {**os.environ, "PGPASSWORD": "alice-secret", "PGCONNECT_TIMEOUT": "10"}


@pytest.fixture
def pgbench_tables(pg):
    """pgbench's tables, made straight on Postgres (quick), dropped after."""
    done = subprocess.run([pgbench_bin(), "-i", "-s", "1", "-q", "-h", pg.host, "-p", str(pg.port), "-U", "alice",
                           TEST_DB], capture_output=True, text=True, timeout=60, env=pgbench_env())
    assert done.returncode == 0, done.stderr
    yield
    pg.sql("drop table if exists pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history",
           dbname=TEST_DB)


def worker_backend_pids(proc_pid: int, pg, pg_admin) -> set[int]:
    """Postgres backends whose client sockets belong to one worker process."""
    try:
        ports = [c.laddr.port for c in psutil.Process(proc_pid).net_connections(kind="tcp")
                 if c.raddr and c.raddr.port == pg.port]
    except psutil.NoSuchProcess:
        return set()
    if not ports:
        return set()
    return {r[0] for r in pg_admin.execute("select pid from pg_stat_activity where client_port = any(%s)",
                                           (ports,)).fetchall()}


@pytest.mark.timeout(120)
def test_kill_9_a_worker_under_pgbench(farm, helpers, pg, pg_admin, pgbench_tables):
    before = {w["index"]: w for w in wait_all_serving(farm, helpers)}
    bench = subprocess.Popen(
        [pgbench_bin(), "-h", farm.host, "-p", str(farm.port), "-U", "alice", "-S", "-n", "-c", str(PGBENCH_CLIENTS),
         "-j", "2", "-T", str(PGBENCH_SECONDS), "-P", "1", TEST_DB],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=pgbench_env())
    started = time.monotonic()
    try:
        with admin_connect(farm) as admin:
            clients = helpers.wait_for(
                lambda: (lambda cs: cs if len(cs) == PGBENCH_CLIENTS else None)(
                    [c for c in show(admin, "CLIENTS") if c["application_name"] == "pgbench"]),
                timeout=10, what="pgbench's clients in SHOW CLIENTS")
        on = {w: sum(1 for c in clients if c["worker"] == w) for w in range(WORKERS)}
        victim = max(on, key=lambda w: (on[w] > 0, w == 1))  # worker 1 unless it has no pgbench client
        victim_pid = before[victim]["pid"]
        time.sleep(2)
        leaked_candidates = worker_backend_pids(victim_pid, pg, pg_admin)
        os.kill(victim_pid, signal.SIGKILL)
        killed_at = time.monotonic() - started
        out, err = bench.communicate(timeout=PGBENCH_SECONDS + 30)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()

    # pgbench: only the dead worker's clients abort; the others keep running transactions.
    aborted = set(re.findall(r"client (\d+) aborted", err))
    processed = re.search(r"number of transactions actually processed: (\d+)", out)
    assert processed, f"pgbench output:\n{out}\n{err}"
    assert int(processed.group(1)) > 1000, f"pgbench:\n{out}\n{err}"
    assert len(aborted) <= on[victim], f"{len(aborted)} pgbench clients aborted, worker {victim} had {on[victim]}:\n{err}"
    progress = [(float(t), float(tps)) for t, tps in re.findall(r"progress: ([\d.]+) s, ([\d.]+) tps", err)]
    after = [tps for t, tps in progress if t > killed_at + 1.5]
    assert after and all(tps > 0 for tps in after), f"no transactions after the kill at {killed_at:.1f} s:\n{err}"

    # The worker is back under the same index with a new pid; the others were left alone.
    with admin_connect(farm) as admin:
        workers = helpers.wait_for(
            lambda: (lambda ws: ws if ws[victim]["state"] == "serving" and ws[victim]["pid"] != victim_pid else None)(
                {w["index"]: w for w in show(admin, "WORKERS")}),
            timeout=RESTART_TIMEOUT, what=f"worker {victim} to come back")
    assert len(workers) == WORKERS
    assert workers[victim]["restarts"] == 1 and workers[victim]["node"] == NODE_ID + victim, workers[victim]
    assert not helpers.pid_alive(victim_pid) or psutil.Process(victim_pid).status() == psutil.STATUS_ZOMBIE
    for w in range(WORKERS):
        if w != victim:
            assert workers[w]["pid"] == before[w]["pid"] and workers[w]["restarts"] == 0, workers[w]
    assert re.search(rf"worker {victim} \(pid {victim_pid}\) died", farm.log()), farm.log_tail()
    # The restarted worker serves.
    placed = connect_on_workers(farm, helpers, {victim: 1})
    with placed[victim][0] as conn:
        assert conn.execute("select 40 + 2").fetchone() == (42,)

    # No leak: the dead worker's backends go away, and every alice backend on Postgres is one of
    # pgherd's live connections, at most the pool's size.
    def settled():
        gone = not (leaked_candidates & {r[0] for r in pg_admin.execute("select pid from pg_stat_activity").fetchall()})
        total = pg_admin.execute("select count(*) from pg_stat_activity where usename = 'alice'").fetchone()[0]
        ours = len(helpers.server_backends(pg_admin, farm, pg, "alice"))
        return gone and total == ours <= POOL_SIZE and (gone, total, ours)

    helpers.wait_for(settled, timeout=10, what="the dead worker's server connections to close, no other alice backends")
    helpers.assert_serving(farm)
