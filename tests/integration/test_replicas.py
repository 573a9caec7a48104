"""Replicas behind one endpoint (issue 5): read/write split, load balancing, bans, failover.

A real primary with two streaming replicas (shared/localpg), the real `pgherd` command in front.
Which host served a query is asked of the host itself (`inet_server_port()`, once also
pg_settings), through pgherd; writes record the port of the server that ran them, and a write
on a replica would fail anyway (SQLSTATE 25006, read-only transaction), so "no errors" proves it
reached the primary. The destructive tests (a stopped replica, a failover) build their own
disposable clusters so the module's cluster stays intact for the others.

Waits poll with deadlines; monitor intervals in the configs are short (250 ms) so a loaded
machine still passes well within them.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import psycopg
import pytest
from psycopg import errors as pgerr

from pgherd.shared.localpg import LocalPgError, pg_bin_dir, remove_cluster_dir

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

TEST_DB = "pgherd_test"
ALICE = ("alice", "alice-secret")
# Health and LSN checks every 250 ms from the start: bans and role changes show within a second
# on an idle machine; DEADLINE leaves room for a loaded one.
FAST = {
    "idle_healthcheck_interval": 250,
    "idle_healthcheck_delay": 0,
    "healthcheck_timeout": 2000,
    "lsn_check_interval": 250,
    "lsn_check_timeout": 2000,
    "connect_timeout": 2000,
}
DEADLINE = 20.0
CONNECT_TIMEOUT = 10
PORT_SQL = "SELECT inet_server_port()"
USER_FN = "rw_user_fn"
USER_FN_SQL = f"SELECT inet_server_port() + {USER_FN}()"
SETTING_PORT_SQL = "SELECT setting::int FROM pg_settings WHERE name = 'port'"

SPLITS = ["include_primary", "exclude_primary", "include_primary_if_replica_banned", "prefer_primary"]
STRATEGIES = ["random", "round_robin", "least_active_connections", "weighted_round_robin"]
# lb_weight of primary, replica 1, replica 2 (only weighted_round_robin reads them).
WEIGHTS = (100, 100, 200)
# Reads per combination in the split x strategy matrix (enough to see every host and the
# rotation), and per strategy in the share tests: the 10,000, about 2 s each here; a
# random 50/50 split then has a standard deviation of 0.5 points.
MATRIX_READS = 600
SHARE_READS = 10_000
READ_CLIENTS = 4
WRITES = 60


# ---------------------------------------------------------------------------------------------
# clusters


def _new_dir() -> Path:
    # Same prefix as tests/conftest.py: a killed run's clusters are reaped by the next one.
    return Path(tempfile.mkdtemp(prefix="pgherd-test-"))


class Replicated:
    """A primary with two streaming replicas, set up like the session cluster (roles, database)."""

    def __init__(self, base: Any) -> None:
        self.dirs: list[Path] = []
        self.marker = 0
        self.primary = base.new_test_cluster(self._dir())
        self.replicas: list[Any] = []
        try:
            self.primary.sql("CREATE TABLE rw_writes (id bigserial PRIMARY KEY, tag text NOT NULL, port int NOT NULL)",
                             dbname=TEST_DB)
            # A function pgherd cannot know is read-only (conservative routes its callers to the primary).
            self.primary.sql(f"CREATE FUNCTION {USER_FN}() RETURNS int LANGUAGE sql STABLE AS 'SELECT 0'",
                             dbname=TEST_DB)
            for _ in range(2):
                self.replicas.append(self.primary.add_replica(self._dir()))
            self.sync()
        except BaseException:
            self.destroy()
            raise

    def _dir(self) -> Path:
        self.dirs.append(_new_dir())
        return self.dirs[-1]

    def sync(self, timeout: float = DEADLINE) -> None:
        """Wait until both replicas have everything the primary committed so far: a marker row
        written now shows on them. (Not PgCluster.wait_for_replay: on an idle primary the insert
        position can lie past the last record, and replay only reaches it with the next WAL
        record, up to 15 s later when the checkpointer logs running transactions.)"""
        self.marker += 1
        tag = f"sync-{self.marker}"
        self.primary.sql(f"INSERT INTO rw_writes (tag, port) VALUES ('{tag}', 0)", dbname=TEST_DB)
        for r in self.replicas:
            wait_rows(r, f"SELECT count(*) FROM rw_writes WHERE tag = '{tag}'", "1", timeout)

    @property
    def all(self) -> list[Any]:
        return [self.primary, *self.replicas]

    def destroy(self) -> None:
        for cluster in [*self.replicas, self.primary]:
            try:
                cluster.destroy()
            except Exception:
                pass
        for d in self.dirs:
            remove_cluster_dir(d)


@pytest.fixture(scope="module")
def replicated(request, helpers):
    base = helpers._base_conftest(request.config)
    rep = Replicated(base)
    try:
        yield rep
    finally:
        rep.destroy()


@pytest.fixture
def disposable(request, helpers):
    """A fresh primary + two replicas for one destructive test."""
    base = helpers._base_conftest(request.config)
    rep = Replicated(base)
    try:
        yield rep
    finally:
        rep.destroy()


def wait_rows(cluster, sql: str, want: str, timeout: float = DEADLINE) -> None:
    """Poll a one-value query on a server until it answers `want` (errors count as not yet)."""
    def answer():
        try:
            got = cluster.sql(sql, dbname=TEST_DB)
        except LocalPgError:
            return None
        return got and got[0][0] == want

    wait_for(f"{sql!r} = {want} on port {cluster.port}", answer, timeout)


def host_entries(rep: Replicated, roles=("primary", "replica", "replica"), weights=None) -> list[dict]:
    entries = []
    for i, (c, role) in enumerate(zip(rep.all, roles)):
        entry = {"name": TEST_DB, "host": c.host, "port": c.port, "role": role}
        if weights is not None:
            entry["lb_weight"] = weights[i]
        entries.append(entry)
    return entries


# ---------------------------------------------------------------------------------------------
# clients


def connect(dsn: str, autocommit: bool = True, **kwargs: Any) -> psycopg.Connection:
    kwargs.setdefault("prepare_threshold", None)
    return psycopg.connect(dsn, autocommit=autocommit, connect_timeout=CONNECT_TIMEOUT, **kwargs)


def admin_connect(proc) -> psycopg.Connection:
    return connect(proc.admin_dsn())


def rows(conn: psycopg.Connection, sql: str) -> list[dict]:
    cur = conn.execute(sql)
    cols = [d.name for d in cur.description]
    return [dict(zip(cols, r)) for r in cur.fetchall()]


def bans(admin) -> dict[int, dict]:
    return {r["port"]: r for r in rows(admin, "SHOW BANS")}


def wait_for(what: str, predicate: Callable[[], Any], timeout: float = DEADLINE, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}; last: {last!r}")
        time.sleep(interval)


def port_of(conn: psycopg.Connection, sql: str = PORT_SQL) -> int:
    return conn.execute(sql).fetchone()[0]


def read_ports(proc, n: int, clients: int = READ_CLIENTS, sql: str = PORT_SQL, **conn_kwargs: Any) -> collections.Counter:
    """Run `sql` (which returns the serving port) n times through pgherd over `clients` parallel
    connections; count the answers by port. Any error fails the test."""
    counts: collections.Counter = collections.Counter()
    errors: list[BaseException] = []
    lock = threading.Lock()
    share = [n // clients + (1 if i < n % clients else 0) for i in range(clients)]

    def run(k: int) -> None:
        local: collections.Counter = collections.Counter()
        try:
            with connect(proc.dsn(*ALICE), **conn_kwargs) as conn:
                cur = conn.cursor()
                for _ in range(k):
                    cur.execute(sql)
                    local[cur.fetchone()[0]] += 1
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        with lock:
            counts.update(local)

    threads = [threading.Thread(target=run, args=(k,)) for k in share]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, f"reads through pgherd failed: {errors!r}"
    assert sum(counts.values()) == n, counts
    return counts


def write_rows(proc, tag: str, n: int) -> set[int]:
    """n INSERTs through pgherd (autocommit); each records the port of the server that ran it."""
    ports = set()
    with connect(proc.dsn(*ALICE)) as conn:
        cur = conn.cursor()
        for _ in range(n):
            cur.execute("INSERT INTO rw_writes (tag, port) VALUES (%s, inet_server_port()) RETURNING port", (tag,))
            ports.add(cur.fetchone()[0])
    return ports


def rows_by_port(cluster, tag: str) -> dict[int, int]:
    out = cluster.sql(f"SELECT port, count(*) FROM rw_writes WHERE tag = '{tag}' GROUP BY port", dbname=TEST_DB)
    return {int(p): int(c) for p, c in out}


def shares(counts: collections.Counter, ports: list[int]) -> list[float]:
    total = sum(counts.values())
    return [counts.get(p, 0) / total for p in ports]


def named(rep: Replicated, counts: collections.Counter) -> dict[str, int]:
    names = {rep.primary.port: "primary", rep.replicas[0].port: "replica1", rep.replicas[1].port: "replica2"}
    return {names.get(p, str(p)): c for p, c in sorted(counts.items())}


# ---------------------------------------------------------------------------------------------
# reads and writes for each split mode and each strategy


def read_set(rep: Replicated, split: str) -> list[int]:
    """The hosts reads may land on with every host healthy."""
    p, r1, r2 = (c.port for c in rep.all)
    return {
        "include_primary": [p, r1, r2],
        "exclude_primary": [r1, r2],
        "include_primary_if_replica_banned": [r1, r2],
        "prefer_primary": [p],
    }[split]


def expected_shares(rep: Replicated, strategy: str, hosts: list[int]) -> list[float] | None:
    """The share each host gets under the strategy, where it is fixed."""
    if strategy in ("round_robin", "random"):
        return [1 / len(hosts)] * len(hosts)
    if strategy == "weighted_round_robin":
        weight = {c.port: w for c, w in zip(rep.all, WEIGHTS)}
        total = sum(weight[h] for h in hosts)
        return [weight[h] / total for h in hosts]
    return None  # least_active_connections: depends on timing; every host is used


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("split", SPLITS)
def test_reads_on_replicas_writes_on_primary(pgherd, replicated, split, strategy):
    rep = replicated
    proc = pgherd(general={**FAST, "workers": 2, "ban_timeout": 60_000, "read_write_split": split,
                           "load_balancing_strategy": strategy},
                  databases=host_entries(rep, weights=WEIGHTS))
    hosts = read_set(rep, split)
    counts = read_ports(proc, MATRIX_READS)
    assert set(counts) == set(hosts), f"{split}/{strategy}: reads landed on {named(rep, counts)}"
    got = shares(counts, hosts)
    want = expected_shares(rep, strategy, hosts)
    if strategy in ("round_robin", "weighted_round_robin"):
        # Deterministic per worker: exact but for the rotation's phase in each worker.
        assert all(abs(g - w) <= 0.03 for g, w in zip(got, want)), (named(rep, counts), want)
    elif strategy == "random":
        # 600 reads: a host's share has a standard deviation under 2 points.
        assert all(abs(g - w) <= 0.10 for g, w in zip(got, want)), (named(rep, counts), want)
    else:
        assert all(g > 0 for g in got), named(rep, counts)

    tag = f"matrix-{split}-{strategy}"
    assert write_rows(proc, tag, WRITES) == {rep.primary.port}
    assert rows_by_port(rep.primary, tag) == {rep.primary.port: WRITES}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_shares_over_many_reads(pgherd, replicated, strategy):
    """SHARE_READS reads over the two replicas (exclude_primary): the share each gets matches
    the strategy within a few percent."""
    rep = replicated
    proc = pgherd(general={**FAST, "workers": 2, "ban_timeout": 60_000, "read_write_split": "exclude_primary",
                           "load_balancing_strategy": strategy},
                  databases=host_entries(rep, weights=WEIGHTS))
    hosts = [r.port for r in rep.replicas]
    started = time.monotonic()
    counts = read_ports(proc, SHARE_READS)
    took = time.monotonic() - started
    print(f"{strategy}: {named(rep, counts)} in {took:.1f} s ({SHARE_READS / took:.0f} reads/s)")
    assert set(counts) <= set(hosts), f"a read reached the primary: {named(rep, counts)}"
    got = shares(counts, hosts)
    if strategy == "least_active_connections":
        assert all(g >= 0.10 for g in got), named(rep, counts)
        return
    want = expected_shares(rep, strategy, hosts)
    tolerance = 0.01 if strategy != "random" else 0.02
    assert all(abs(g - w) <= tolerance for g, w in zip(got, want)), (named(rep, counts), want)
    if strategy == "weighted_round_robin":
        ratio = counts[hosts[1]] / counts[hosts[0]]
        assert 1.9 <= ratio <= 2.1, f"lb_weight 100/200 gave {ratio:.2f}: {named(rep, counts)}"


def test_host_from_pg_settings_agrees(pgherd, replicated):
    """The two ways of asking the serving host (pg_settings, inet_server_port) agree."""
    rep = replicated
    proc = pgherd(general={**FAST, "read_write_split": "exclude_primary", "load_balancing_strategy": "round_robin"},
                  databases=host_entries(rep))
    counts = read_ports(proc, 40, clients=1, sql=SETTING_PORT_SQL)
    assert set(counts) == {r.port for r in rep.replicas}, named(rep, counts)
    with connect(proc.dsn(*ALICE)) as conn:
        assert port_of(conn, "/* pgherd_role: primary */ SELECT setting::int FROM pg_settings WHERE name = 'port'") \
            == rep.primary.port


def test_include_primary_if_replica_banned(pgherd, replicated):
    """Reads use the replicas only; with a replica banned (BAN on the console) the primary joins in;
    after UNBAN it leaves again. Writes stay on the primary throughout."""
    rep = replicated
    p, r1, r2 = (c.port for c in rep.all)
    proc = pgherd(general={**FAST, "workers": 2, "ban_timeout": 60_000,
                           "read_write_split": "include_primary_if_replica_banned",
                           "load_balancing_strategy": "round_robin"},
                  databases=host_entries(rep))
    assert set(read_ports(proc, 200)) == {r1, r2}
    with admin_connect(proc) as admin:
        admin.execute(f"BAN {rep.replicas[1].host}:{r2}")
        try:
            assert set(bans(admin)) == {r2}
            counts = read_ports(proc, 200)
            assert set(counts) == {p, r1}, named(rep, counts)
            assert write_rows(proc, "ban-split", 20) == {p}
        finally:
            admin.execute(f"UNBAN {rep.replicas[1].host}:{r2}")
        assert bans(admin) == {}
    counts = read_ports(proc, 200)
    assert set(counts) == {r1, r2}, named(rep, counts)


# ---------------------------------------------------------------------------------------------
# transactions and overrides


@pytest.fixture(scope="module")
def conservative(pgherd_module, replicated):
    """exclude_primary + round_robin + conservative: a read that lands on the primary was routed there."""
    return pgherd_module(general={**FAST, "workers": 2, "ban_timeout": 60_000, "read_write_split": "exclude_primary",
                                  "load_balancing_strategy": "round_robin"},
                         databases=host_entries(replicated))


@pytest.fixture(scope="module")
def aggressive(pgherd_module, replicated):
    return pgherd_module(general={**FAST, "workers": 2, "ban_timeout": 60_000, "read_write_split": "exclude_primary",
                                  "load_balancing_strategy": "round_robin", "read_write_strategy": "aggressive"},
                         databases=host_entries(replicated))


@pytest.fixture(scope="module")
def prefer_primary(pgherd_module, replicated):
    return pgherd_module(general={**FAST, "workers": 2, "ban_timeout": 60_000, "read_write_split": "prefer_primary",
                                  "load_balancing_strategy": "round_robin"},
                         databases=host_entries(replicated))


@pytest.fixture(scope="module")
def session_mode(pgherd_module, replicated):
    return pgherd_module(general={**FAST, "workers": 2, "ban_timeout": 60_000, "pooler_mode": "session",
                                  "read_write_split": "exclude_primary", "load_balancing_strategy": "round_robin"},
                         databases=host_entries(replicated))


def tx_ports(conn: psycopg.Connection, statements: list[str]) -> list[int]:
    """Run statements in one explicit transaction (autocommit connection); the port after each
    statement that returns rows, then COMMIT."""
    ports = []
    for sql in statements:
        cur = conn.execute(sql)
        if cur.description is not None:
            ports.append(cur.fetchone()[0])
    conn.execute("COMMIT")
    return ports


def test_begin_read_only_reads_on_a_replica(conservative, replicated):
    rep = replicated
    replicas = {r.port for r in rep.replicas}
    with connect(conservative.dsn(*ALICE)) as conn:
        for _ in range(4):  # both replicas take turns
            ports = tx_ports(conn, ["BEGIN READ ONLY", PORT_SQL, "SELECT pg_backend_pid()", PORT_SQL])
            assert ports[0] in replicas and ports[2] == ports[0], ports  # one host for the whole transaction
        ports = tx_ports(conn, ["START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY", PORT_SQL])
        assert ports[0] in replicas
        ports = tx_ports(conn, ["BEGIN", "SET TRANSACTION READ ONLY", PORT_SQL, PORT_SQL])
        assert ports[0] in replicas and ports[1] == ports[0], ports
        # psycopg's own read-only transactions (it sends BEGIN READ ONLY)
    with connect(conservative.dsn(*ALICE), autocommit=False) as conn:
        conn.read_only = True
        seen = set()
        for _ in range(4):
            with conn.transaction():
                seen.add(port_of(conn))
                assert conn.execute("SHOW transaction_read_only").fetchone()[0] == "on"
        assert seen == replicas


def test_writes_in_plain_begin_on_the_primary(conservative, replicated):
    rep = replicated
    p = rep.primary.port
    with connect(conservative.dsn(*ALICE)) as conn:
        ports = tx_ports(conn, ["BEGIN", "INSERT INTO rw_writes (tag, port) VALUES ('tx', inet_server_port()) RETURNING port",
                                PORT_SQL])
        assert ports == [p, p]
        # Conservative: a plain BEGIN goes to the primary even when the transaction starts with a read.
        ports = tx_ports(conn, ["BEGIN", PORT_SQL, "INSERT INTO rw_writes (tag, port) VALUES ('tx', inet_server_port()) RETURNING port"])
        assert ports == [p, p]
        # BEGIN and the write in one text
        cur = conn.execute("BEGIN; INSERT INTO rw_writes (tag, port) VALUES ('tx', inet_server_port()); COMMIT")
    with connect(conservative.dsn(*ALICE), autocommit=False) as conn:  # psycopg's implicit BEGIN
        for _ in range(3):
            conn.execute("INSERT INTO rw_writes (tag, port) VALUES ('tx', inet_server_port())")
            assert port_of(conn) == p
            conn.commit()
    assert rows_by_port(rep.primary, "tx") == {p: 6}
    # ... and it reached the replicas by streaming
    rep.sync()
    for r in rep.replicas:
        assert rows_by_port(r, "tx") == {p: 6}


def test_rolled_back_write_leaves_nothing(conservative, replicated):
    rep = replicated
    with connect(conservative.dsn(*ALICE)) as conn:
        conn.execute("BEGIN")
        conn.execute("INSERT INTO rw_writes (tag, port) VALUES ('rolled-back', inet_server_port())")
        conn.execute("ROLLBACK")
        # a held BEGIN that never reached a server, then COMMIT
        conn.execute("BEGIN")
        conn.execute("COMMIT")
        assert port_of(conn) in {r.port for r in rep.replicas}
    assert rows_by_port(rep.primary, "rolled-back") == {}


def test_aggressive_first_statement_decides(aggressive, replicated):
    rep = replicated
    p, replicas = rep.primary.port, {r.port for r in rep.replicas}
    with connect(aggressive.dsn(*ALICE)) as conn:
        ports = tx_ports(conn, ["BEGIN", PORT_SQL, "SELECT pg_backend_pid()", PORT_SQL])
        assert ports[0] in replicas and ports[2] == ports[0], ports
        ports = tx_ports(conn, ["BEGIN", "INSERT INTO rw_writes (tag, port) VALUES ('aggr', inet_server_port()) RETURNING port",
                                PORT_SQL])
        assert ports == [p, p]
        # The first statement read, so the transaction runs on a replica: a later write there fails
        # with Postgres' read-only error rather than being lost.
        conn.execute("BEGIN")
        assert port_of(conn) in replicas
        with pytest.raises(pgerr.ReadOnlySqlTransaction):
            conn.execute("INSERT INTO rw_writes (tag, port) VALUES ('aggr-lost', inet_server_port())")
        conn.execute("ROLLBACK")
        assert port_of(conn) in replicas  # the connection goes on
        # aggressive: functions not known to be read-only do not make a read a write
        assert port_of(conn, USER_FN_SQL) in replicas
    assert rows_by_port(rep.primary, "aggr") == {p: 1}
    assert rows_by_port(rep.primary, "aggr-lost") == {}


def test_role_comment_overrides(conservative, replicated):
    rep = replicated
    p, replicas = rep.primary.port, {r.port for r in rep.replicas}
    with connect(conservative.dsn(*ALICE)) as conn:
        assert port_of(conn, f"/* pgherd_role: primary */ {PORT_SQL}") == p
        assert port_of(conn, f"/* pgdog_role: primary */ {PORT_SQL}") == p
        assert port_of(conn, f"{PORT_SQL} /* pgherd_role: primary */") == p
        assert port_of(conn, PORT_SQL) in replicas  # a comment is for its own query only
        # conservative: a function not known to be read-only makes the read a write ...
        assert port_of(conn, USER_FN_SQL) == p
        # ... unless a comment says it reads
        assert {port_of(conn, f"/* pgherd_role: replica */ {USER_FN_SQL}") for _ in range(4)} == replicas
        assert {port_of(conn, f"/* pgdog_role: replica */ {USER_FN_SQL}") for _ in range(4)} == replicas
        # A write sent to a replica on purpose fails there, visibly (25006), and commits nothing.
        with pytest.raises(pgerr.ReadOnlySqlTransaction):
            conn.execute("/* pgherd_role: replica */ INSERT INTO rw_writes (tag, port) VALUES ('forced', 0)")
        assert port_of(conn, "/* pgherd_role: primary */ SELECT inet_server_port()") == p
    assert rows_by_port(rep.primary, "forced") == {}


@pytest.mark.parametrize("var", ["pgherd.role", "pgdog.role"])
def test_set_role_overrides(conservative, replicated, var):
    rep = replicated
    p, replicas = rep.primary.port, {r.port for r in rep.replicas}
    with connect(conservative.dsn(*ALICE)) as conn:
        conn.execute(f"SET {var} TO 'primary'")
        assert {port_of(conn) for _ in range(4)} == {p}
        conn.execute(f"SET {var} TO 'replica'")
        assert {port_of(conn, USER_FN_SQL) for _ in range(4)} == replicas
        with pytest.raises(pgerr.ReadOnlySqlTransaction):
            conn.execute("INSERT INTO rw_writes (tag, port) VALUES ('forced-set', 0)")
        conn.execute(f"RESET {var}")
        assert {port_of(conn) for _ in range(4)} == replicas
        assert port_of(conn, USER_FN_SQL) == p
        assert write_rows(conservative, "after-reset", 3) == {p}
    # as a startup option
    with connect(conservative.dsn(*ALICE), options=f"-c {var}=primary") as conn:
        assert {port_of(conn) for _ in range(4)} == {p}
    with connect(conservative.dsn(*ALICE), options=f"-c {var}=replica") as conn:
        assert {port_of(conn, USER_FN_SQL) for _ in range(4)} == replicas
    assert rows_by_port(rep.primary, "forced-set") == {}


REPLICA_OVERRIDES = {
    "comment-pgherd_role": ("/* pgherd_role: replica */ ", None, None),
    "comment-pgdog_role": ("/* pgdog_role: replica */ ", None, None),
    "set-pgherd.role": ("", "SET pgherd.role TO 'replica'", None),
    "set-pgdog.role": ("", "SET pgdog.role TO 'replica'", None),
    "startup-pgherd.role": ("", None, "-c pgherd.role=replica"),
    "startup-pgdog.role": ("", None, "-c pgdog.role=replica"),
}


@pytest.mark.parametrize("how", list(REPLICA_OVERRIDES))
def test_prefer_primary_reads_on_primary_unless_told_replica(prefer_primary, replicated, how):
    """prefer_primary: every query on the primary unless pgdog.role / the pgdog_role comment says
    replica (PgDog's documentation of read_write_split)."""
    rep = replicated
    p, replicas = rep.primary.port, {r.port for r in rep.replicas}
    with connect(prefer_primary.dsn(*ALICE)) as conn:
        assert {port_of(conn) for _ in range(6)} == {p}
    prefix, set_sql, options = REPLICA_OVERRIDES[how]
    kwargs = {"options": options} if options else {}
    with connect(prefer_primary.dsn(*ALICE), **kwargs) as conn:
        if set_sql:
            conn.execute(set_sql)
        seen = {port_of(conn, prefix + PORT_SQL) for _ in range(6)}
        assert seen == replicas, f"{how} under prefer_primary: reads went to {named(rep, collections.Counter(seen))}"


def test_session_mode_primary_unless_role_replica(session_mode, replicated):
    rep = replicated
    p, replicas = rep.primary.port, {r.port for r in rep.replicas}
    with connect(session_mode.dsn(*ALICE)) as conn:
        assert {port_of(conn) for _ in range(4)} == {p}
        assert conn.execute("INSERT INTO rw_writes (tag, port) VALUES ('session', inet_server_port()) RETURNING port"
                            ).fetchone() == (p,)
    seen = set()
    for _ in range(4):
        with connect(session_mode.dsn(*ALICE), options="-c pgherd.role=replica") as conn:
            ports = {port_of(conn) for _ in range(3)}
            assert len(ports) == 1 and ports <= replicas, ports  # a session stays on its server
            seen |= ports
    assert seen == replicas


# ---------------------------------------------------------------------------------------------
# a replica stops under load


def pgbench_bin() -> str:
    return shutil.which("pgbench") or str(pg_bin_dir() / "pgbench")


def pgbench_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    return {**env, "PGPASSWORD": ALICE[1], "PGCONNECT_TIMEOUT": "10"}


def pgbench_argv(host: str, port: int, *args: str) -> list[str]:
    return [pgbench_bin(), "-h", host, "-p", str(port), "-U", ALICE[0], *args, TEST_DB]


def pgbench_counts(out: str) -> tuple[int, int]:
    processed = re.search(r"number of transactions actually processed: (\d+)", out)
    failed = re.search(r"number of failed transactions: (\d+)", out)
    assert processed, out
    return int(processed.group(1)), int(failed.group(1)) if failed else 0


def run_pgbench(proc, *args: str, timeout: float = 60) -> tuple[str, int, int]:
    """pgbench through pgherd to completion; (output, transactions processed, failed). Fails the
    test if pgbench fails or a client aborted."""
    done = subprocess.run(pgbench_argv(proc.host, proc.port, "-n", *args), capture_output=True, text=True,
                          timeout=timeout, env=pgbench_env())
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "aborted" not in out.lower(), out
    processed, failed = pgbench_counts(out)
    return out, processed, failed


@pytest.mark.destructive
@pytest.mark.timeout(150)
def test_stopped_replica_under_pgbench(pgherd, disposable):
    """pgbench -S runs through pgherd while a replica stops: once its ban shows in SHOW BANS, a
    new pgbench -S has no failed transaction and no aborted client. After the replica restarts
    it gets no reads while it is still banned, and is back in rotation once ban_timeout passed."""
    rep = disposable
    primary, r1, r2 = rep.all
    done = subprocess.run(pgbench_argv(primary.host, primary.port, "-i", "-s", "1", "-q"),
                          capture_output=True, text=True, timeout=120, env=pgbench_env())
    assert done.returncode == 0, f"pgbench -i on the primary failed:\n{done.stdout}\n{done.stderr}"
    rep.sync()  # the replicas have the pgbench tables
    ban_timeout = 4.0
    proc = pgherd(general={**FAST, "workers": 2, "ban_timeout": int(ban_timeout * 1000),
                           "read_write_split": "exclude_primary", "load_balancing_strategy": "round_robin",
                           "checkout_timeout": 10_000},
                  databases=host_entries(rep))
    assert set(read_ports(proc, 40)) == {r1.port, r2.port}
    out, processed, failed = run_pgbench(proc, "-S", "-c", "4", "-j", "2", "-T", "1")
    assert failed == 0 and processed > 100, out

    # pgbench -S through pgherd; the replica stops under it. Its clients may see errors until
    # the ban takes effect (a query in flight on the stopping server fails).
    during = subprocess.Popen(pgbench_argv(proc.host, proc.port, "-n", "-S", "-c", "4", "-j", "2", "-T", "8", "-P", "1"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=pgbench_env())
    try:
        with admin_connect(proc) as admin:
            wait_for("pgbench to connect", lambda: len([c for c in rows(admin, "SHOW CLIENTS")
                                                         if c["user"] == "alice"]) >= 4 or during.poll() is not None)
            assert during.poll() is None, during.communicate()[0]
            time.sleep(0.3)  # some transactions in flight: the stop happens under load
            r2.stop("fast")
            stopped = time.monotonic()
            ban = wait_for("the stopped replica's ban", lambda: bans(admin).get(r2.port))
            print(f"\nreplica banned {time.monotonic() - stopped:.2f} s after it stopped: {ban['reason']}")

            # After the ban: pgbench -S has no failures at all.
            out, processed, failed = run_pgbench(proc, "-S", "-c", "4", "-j", "2", "-T", "1")
            assert failed == 0 and processed > 100, out
            counts = read_ports(proc, 40)
            assert set(counts) == {r1.port}, named(rep, counts)

            # Back in rotation once it runs again and ban_timeout has passed, not before.
            r2.start()
            restarted = time.monotonic()
            at_restart = bans(admin).get(r2.port)
            print(f"ban at restart: {at_restart}")
            deadline = restarted + ban_timeout + DEADLINE
            while True:
                banned_before = r2.port in bans(admin)
                counts = read_ports(proc, 20)
                banned_after = r2.port in bans(admin)
                if banned_before and banned_after:
                    assert r2.port not in counts, f"reads reached the banned replica: {named(rep, counts)}"
                if r2.port in counts:
                    break
                if time.monotonic() > deadline:
                    pytest.fail(f"the restarted replica got no reads within {deadline - restarted:.0f} s;"
                                f" bans: {bans(admin)}")
                time.sleep(0.1)
            back = time.monotonic() - restarted
            print(f"replica back in rotation {back:.2f} s after restart (ban_timeout {ban_timeout:g} s)")
            if at_restart is not None:
                assert back >= at_restart["remaining"] - 0.5, (back, at_restart)
    finally:
        try:
            first_out = during.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            during.kill()
            first_out = during.communicate()[0]
    print("pgbench -S while the replica stopped and came back (failures allowed before the ban):\n"
          + first_out[-2500:])
    out, processed, failed = run_pgbench(proc, "-S", "-c", "4", "-j", "2", "-T", "2")
    assert failed == 0 and processed > 100, out
    counts = read_ports(proc, 200)
    assert set(counts) == {r1.port, r2.port}, named(rep, counts)
    assert abs(counts[r1.port] - counts[r2.port]) <= 10, named(rep, counts)  # round robin again


# ---------------------------------------------------------------------------------------------
# failover with role = "auto"


class WriteLoop(threading.Thread):
    """Inserts 1, 2, 3, ... through pgherd, each in its own transaction, and records the outcome:
    n -> (monotonic time, port that committed it) for successes, n -> error for failures."""

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.dsn = dsn
        self.stop = threading.Event()
        self.ok: dict[int, tuple[float, int]] = {}
        self.failed: dict[int, str] = {}
        self.crash: BaseException | None = None

    def run(self) -> None:
        n = 0
        conn = None
        try:
            while not self.stop.is_set():
                if conn is None or conn.closed:
                    try:
                        conn = connect(self.dsn)
                    except psycopg.OperationalError:
                        time.sleep(0.05)
                        continue
                n += 1
                try:
                    with conn.transaction():
                        port = conn.execute("INSERT INTO failover_t (n, port) VALUES (%s, inet_server_port())"
                                            " RETURNING port", (n,)).fetchone()[0]
                    self.ok[n] = (time.monotonic(), port)
                except psycopg.Error as exc:
                    self.failed[n] = f"{type(exc).__name__}: {exc}".strip()
                    if conn.closed or conn.broken:
                        conn = None
                    time.sleep(0.01)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.crash = exc
        finally:
            if conn is not None:
                conn.close()

    def successes_on(self, port: int, since: float = 0.0) -> list[tuple[int, float]]:
        return sorted((n, t) for n, (t, p) in list(self.ok.items()) if p == port and t >= since)


@pytest.mark.destructive
@pytest.mark.timeout(150)
def test_failover_with_auto_roles(pgherd, disposable):
    """All hosts `role = "auto"`. Under a write loop the primary stops and a replica is promoted
    (what Patroni or repmgr do: the old primary goes first, so no write can commit on it after
    the promotion and be lost to the new timeline). Every write commits on the new primary
    exactly once or fails with an error; none is lost or applied twice; none reaches a host in
    recovery. The second replica keeps following the old primary's timeline and stays a replica."""
    rep = disposable
    old, new, other = rep.all
    old.sql("CREATE TABLE failover_t (n int NOT NULL, port int NOT NULL)", dbname=TEST_DB)  # no key: duplicates show
    rep.sync()
    interval_ms = 250
    proc = pgherd(general={**FAST, "workers": 2, "lsn_check_delay": 0, "lsn_check_interval": interval_ms,
                           "ban_timeout": 60_000, "checkout_timeout": 5_000},
                  databases=host_entries(rep, roles=("auto", "auto", "auto")))
    with admin_connect(proc) as admin:
        def roles():
            return {r["port"]: r["role"] for r in rows(admin, "SHOW REPLICATION")}

        want = {old.port: "primary", new.port: "replica", other.port: "replica"}
        wait_for("the roles to be detected", lambda: roles() == want or None)

        loop = WriteLoop(proc.dsn(*ALICE))
        loop.start()
        try:
            wait_for("writes through pgherd", lambda: len(loop.successes_on(old.port)) >= 50)
            old.stop("fast")
            stopped = time.monotonic()
            new.promote()  # returns once the new primary accepts writes
            promoted = time.monotonic()
            first = wait_for("a write on the new primary", lambda: loop.successes_on(new.port), timeout=30)
            wait_for("more writes on the new primary", lambda: len(loop.successes_on(new.port)) >= 50, timeout=30)
        finally:
            loop.stop.set()
            loop.join(30)
        assert not loop.is_alive(), "the write loop did not stop"
        assert loop.crash is None, repr(loop.crash)
        took = first[0][1] - promoted
        print(f"\nfailover: old primary stopped at 0.00 s; `pg_ctl promote -w` (new primary accepts writes) "
              f"returned at {promoted - stopped:.2f} s; first write committed on the new primary at "
              f"{first[0][1] - stopped:.2f} s ({took:+.2f} s after the promotion returned); "
              f"{len(loop.ok)} writes committed, {len(loop.failed)} failed")
        final_roles = roles()
    failures = collections.Counter(e.split(":", 1)[0] for e in loop.failed.values())
    print(f"failed writes by error: {dict(failures)}; first errors: {list(loop.failed.items())[:3]}")

    # No committed write on a host in recovery, and none on the old primary after it stopped.
    ports = collections.Counter(p for _, p in loop.ok.values())
    assert set(ports) <= {old.port, new.port}, f"writes committed on {ports}"
    assert all(t < stopped for t, p in loop.ok.values() if p == old.port)
    assert all(t >= stopped for t, p in loop.ok.values() if p == new.port)
    # Every write either committed (then it is on the new primary exactly once) or failed (then
    # it is there at most once); no value twice.
    on_new = collections.Counter(int(n) for (n,) in new.sql("SELECT n FROM failover_t", dbname=TEST_DB))
    twice = {n: c for n, c in on_new.items() if c > 1}
    assert not twice, f"writes applied more than once: {twice}"
    print("failed writes present on the new primary: "
          f"{sorted(n for n in loop.failed if n in on_new)} of {sorted(loop.failed)}")
    missing = sorted(set(loop.ok) - set(on_new))
    assert not missing, f"{len(missing)} committed writes lost, first {missing[:10]}"
    unknown = set(on_new) - set(loop.ok) - set(loop.failed)
    assert not unknown, f"rows nobody wrote: {sorted(unknown)[:10]}"
    attempted = set(loop.ok) | set(loop.failed)
    assert attempted == set(range(1, len(attempted) + 1))
    assert final_roles[new.port] == "primary", final_roles
    assert final_roles[other.port] != "primary", final_roles
    # issue 5: writes move within lsn_check_interval + 1 s; generous room for a loaded machine
    assert took < interval_ms / 1000 + 1 + 8, f"first write on the new primary {took:.2f} s after the promotion"

