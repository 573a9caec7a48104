"""Two-phase commit survives SIGKILL: money moved between shards is never created or destroyed.

Two shard databases (crash_0, crash_1) each hold their hash partition of
  accounts (id bigint PRIMARY KEY, balance bigint)   ACCOUNTS accounts of START_BALANCE, on both shards
  ledger (txid uuid, account bigint, delta bigint)    one row per account a transfer touched
so a row in the wrong place fails in Postgres. pgherd serves them as database `crash` with
two_phase_commit = true, and recovery every 0.5 s with a 2 s grace.

CLIENTS threads each loop: BEGIN; UPDATE the shard-0 account (-x); INSERT its ledger row; UPDATE the
shard-1 account (+x); INSERT its ledger row; COMMIT; reconnecting after any error. (Every transfer
locks its shard-0 row before its shard-1 row, so two transfers can never wait for each other across
shards, a deadlock no shard could see.) Meanwhile the whole pgherd (supervisor and workers: its
process group) is killed with SIGKILL KILLS times at random moments and started again on the same
port. Then the clients stop, pgherd starts once more, and once recovery has left no prepared
transaction on either shard:
  - the total balance is unchanged and all ACCOUNTS rows are there, once;
  - every transfer is on both shards or on neither (its two ledger rows), and each account's
    balance is START_BALANCE plus its ledger deltas;
  - every transfer whose COMMIT pgherd acknowledged is there; none that failed before COMMIT is.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from typing import Any

import psutil
import psycopg
import pytest

from pgherd.shared.localpg import free_port

pytestmark = pytest.mark.timeout(180)

SHARDS = 2
DBS = [f"crash_{i}" for i in range(SHARDS)]
DB = "crash"
ALICE = ("alice", "alice-secret")
ACCOUNTS = 200
START_BALANCE = 1000
CLIENTS = 20
KILLS = 20
# Time between pgherd listening and the next SIGKILL (issue 7: "at random moments").
KILL_GAP = (0.3, 1.5)
# Recovery runs twice a second and rolls back undecided prepared transactions after 2 s: the
# leftovers of one kill are settled within a few restarts (max_prepared_transactions is 100).
RECOVERY_INTERVAL = "0.5"
RECOVERY_GRACE = "2"
# Two workers, so killing "pgherd" has to kill several processes.
WORKERS = 2
# A client that cannot reach pgherd (it is being restarted) tries again after this long.
RECONNECT_PAUSE = 0.05
# Deadlines (a loaded 2-core machine): processes to vanish after SIGKILL, clients to stop once
# pgherd is gone, recovery to settle everything after the last start.
KILL_DEADLINE = 10
CLIENT_STOP_DEADLINE = 20
SETTLE_DEADLINE = 45
POLL = 0.1


# ---------------------------------------------------------------------------------------------
# Shards


def _alice(pg: Any, db: str) -> psycopg.Connection:
    return psycopg.connect(pg.dsn(db, *ALICE), autocommit=True, connect_timeout=10)


@pytest.fixture
def bank(pg: Any) -> Any:
    """The shard databases with their accounts; returns {shard: [account ids]}."""
    for db in DBS:
        pg.sql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        pg.sql(f"CREATE DATABASE {db} OWNER alice")
    on: dict[int, list[int]] = {}
    try:
        for k, db in enumerate(DBS):
            part = f"FOR VALUES WITH (MODULUS {SHARDS}, REMAINDER {k})"
            with _alice(pg, db) as conn:
                conn.execute("CREATE TABLE accounts (id bigint PRIMARY KEY, balance bigint NOT NULL) "
                             "PARTITION BY HASH (id)")
                conn.execute(f"CREATE TABLE accounts_p{k} PARTITION OF accounts {part}")
                conn.execute("CREATE TABLE ledger (txid uuid NOT NULL, account bigint NOT NULL, delta bigint NOT NULL) "
                             "PARTITION BY HASH (account)")
                conn.execute(f"CREATE TABLE ledger_p{k} PARTITION OF ledger {part}")
                # Which shard an account lives on is Postgres' hash partitioning's answer.
                conn.execute(f"INSERT INTO accounts SELECT g, {START_BALANCE} FROM generate_series(1, {ACCOUNTS}) g "
                             f"WHERE satisfies_hash_partition('accounts'::regclass, {SHARDS}, {k}, g::bigint)")
                on[k] = [r[0] for r in conn.execute("SELECT id FROM accounts ORDER BY id")]
        assert all(on.values()) and sum(map(len, on.values())) == ACCOUNTS, on
        yield on
    finally:
        for db in DBS:
            try:
                # A database with prepared transactions cannot be dropped (a failed run may leave some).
                for (gid,) in pg.sql(f"SELECT gid FROM pg_prepared_xacts WHERE database = '{db}'", dbname=db):
                    pg.sql(f"ROLLBACK PREPARED '{gid}'", dbname=db)
                pg.sql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
            except Exception:
                pass


def _prepared(pg: Any) -> list[int]:
    """Prepared transactions waiting in each shard database."""
    out = []
    for db in DBS:
        rows = pg.sql(f"SELECT count(*) FROM pg_prepared_xacts WHERE database = '{db}'", dbname=db)
        out.append(int(rows[0][0]))
    return out


def _prepared_gids(pg: Any) -> set[tuple[str, str]]:
    """(database, gid) of the prepared transactions waiting on the shards."""
    names = ", ".join(f"'{db}'" for db in DBS)
    return {(r[0], r[1]) for r in pg.sql(f"SELECT database, gid FROM pg_prepared_xacts WHERE database IN ({names})")}


def _busy_backends(pg: Any) -> int:
    """Sessions on the shards still running a statement or inside a transaction (e.g. the server
    side of a connection whose pgherd was killed, waiting for a lock a prepared transaction holds)."""
    names = ", ".join(f"'{db}'" for db in DBS)
    rows = pg.sql(f"SELECT count(*) FROM pg_stat_activity WHERE datname IN ({names}) "
                  f"AND backend_type = 'client backend' AND pid <> pg_backend_pid() "
                  f"AND state IN ('active', 'idle in transaction', 'idle in transaction (aborted)')")
    return int(rows[0][0])


# ---------------------------------------------------------------------------------------------
# Clients


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.committed: list[uuid.UUID] = []  # COMMIT acknowledged
        self.unknown: list[uuid.UUID] = []  # COMMIT sent, connection lost before the answer
        self.not_committed: list[uuid.UUID] = []  # failed before COMMIT was sent
        self.errors: Counter = Counter()

    def add(self, bucket: list, txid: uuid.UUID) -> None:
        with self.lock:
            bucket.append(txid)


def client(dsn: str, on: dict[int, list[int]], seed: int, stop: threading.Event, tally: Tally) -> None:
    rng = random.Random(seed)
    conn = None
    while not stop.is_set():
        txid, committing = uuid.uuid4(), False
        try:
            if conn is None:
                conn = psycopg.connect(dsn, connect_timeout=5, prepare_threshold=None)
            a, b = rng.choice(on[0]), rng.choice(on[1])
            x = rng.choice((-1, 1)) * rng.randint(1, 50)
            # psycopg sends BEGIN before the first statement (autocommit is off).
            conn.execute("UPDATE accounts SET balance = balance - %s WHERE id = %s", (x, a))
            conn.execute("INSERT INTO ledger (txid, account, delta) VALUES (%s, %s, %s)", (txid, a, -x))
            conn.execute("UPDATE accounts SET balance = balance + %s WHERE id = %s", (x, b))
            conn.execute("INSERT INTO ledger (txid, account, delta) VALUES (%s, %s, %s)", (txid, b, x))
            committing = True
            conn.commit()
            tally.add(tally.committed, txid)
        except psycopg.Error as exc:
            if conn is not None:
                tally.add(tally.unknown if committing else tally.not_committed, txid)
                with tally.lock:
                    tally.errors[type(exc).__name__] += 1
                conn.close()
                conn = None
            time.sleep(RECONNECT_PAUSE)
    if conn is not None:
        conn.close()


# ---------------------------------------------------------------------------------------------
# pgherd


def _kill_everything(proc: Any) -> int:
    """SIGKILL pgherd's process group and wait until the supervisor and every worker are gone;
    return how many processes that was."""
    root = psutil.Process(proc.pid)
    victims = [root, *root.children(recursive=True)]
    proc.kill()  # os.killpg(pid, SIGKILL) on the group pgherd leads (tests/conftest.py)
    deadline = time.monotonic() + KILL_DEADLINE
    for p in victims:
        while True:
            try:
                if p.status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"pid {p.pid} ({' '.join(p.cmdline())}) survived SIGKILL of pgherd's group")
            time.sleep(POLL / 5)
    return len(victims)


@pytest.mark.slow
def test_sigkill_during_transfers_loses_no_money(pg: Any, bank: dict, pgherd: Any, monkeypatch: Any) -> None:
    # Read by the supervisor at start (supervisor/recovery.py).
    monkeypatch.setenv("PGHERD_2PC_RECOVERY_INTERVAL", RECOVERY_INTERVAL)
    monkeypatch.setenv("PGHERD_2PC_RECOVERY_GRACE", RECOVERY_GRACE)
    port = free_port()
    config = dict(
        general={"two_phase_commit": True, "port": port, "workers": WORKERS},
        databases=[{"name": DB, "host": pg.host, "port": pg.port, "database_name": db, "shard": i}
                   for i, db in enumerate(DBS)],
        users=[{"name": "alice", "password": ALICE[1], "database": DB}],
        extra_toml="".join(f'[[sharded_tables]]\ndatabase = "{DB}"\nname = "{t}"\ncolumn = "{c}"\n'
                           f'data_type = "bigint"\n\n' for t, c in (("accounts", "id"), ("ledger", "account"))),
    )
    dsn = f"host=127.0.0.1 port={port} dbname={DB} user={ALICE[0]} password={ALICE[1]}"
    rng = random.Random(7)
    tally = Tally()
    stop = threading.Event()
    procs = [pgherd(**config)]
    threads = [threading.Thread(target=client, args=(dsn, bank, i, stop, tally), daemon=True)
               for i in range(CLIENTS)]
    for t in threads:
        t.start()
    left_behind: set[tuple[str, str]] = set()  # prepared transactions on the shards right after a kill
    new_per_kill = []
    killed = 0
    started = time.monotonic()
    try:
        for i in range(KILLS):
            time.sleep(rng.uniform(*KILL_GAP))
            assert procs[-1].returncode is None, f"pgherd exited by itself: {procs[-1].returncode}"
            killed += _kill_everything(procs[-1])
            waiting = _prepared_gids(pg)
            new_per_kill.append(len(waiting - left_behind))
            left_behind |= waiting
            if i < KILLS - 1:
                procs.append(pgherd(**config))  # the same port; waits until it listens
    finally:
        stop.set()
        deadline = time.monotonic() + CLIENT_STOP_DEADLINE
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
    hung = sum(t.is_alive() for t in threads)
    assert not hung, f"{hung} clients did not stop within {CLIENT_STOP_DEADLINE} s after pgherd was killed"
    chaos = time.monotonic() - started

    # Start pgherd once more: its recovery must settle whatever the last kills left.
    procs.append(pgherd(**config))
    deadline = time.monotonic() + SETTLE_DEADLINE
    while (prepared := _prepared(pg)) != [0] * SHARDS or _busy_backends(pg):
        if time.monotonic() > deadline:
            pytest.fail(f"after {SETTLE_DEADLINE} s: prepared transactions per shard {prepared}, "
                        f"busy shard sessions {_busy_backends(pg)}:\n"
                        f"{pg.sql('SELECT gid, database, prepared FROM pg_prepared_xacts')}")
        time.sleep(POLL)
    settle = time.monotonic() - deadline + SETTLE_DEADLINE
    # The last pgherd serves transfers again.
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        a, b = bank[0][0], bank[1][0]
        conn.execute("UPDATE accounts SET balance = balance - 1 WHERE id = %s", (a,))
        conn.execute("UPDATE accounts SET balance = balance + 1 WHERE id = %s", (b,))
        conn.commit()

    logs = "\n".join(p.log() for p in procs)
    recovered = {w: logs.count(f"two-phase recovery: {w}") for w in ("committed", "rolled back")}
    # The others were finished by a COMMIT PREPARED the killed worker had already sent.
    by_recovery = sum(f" {gid} on {DB} shard" in logs for _, gid in left_behind)

    # Check the shards directly.
    accounts: dict[int, int] = {}
    ledger: dict[int, dict[uuid.UUID, list[tuple[int, int]]]] = {}
    for k, db in enumerate(DBS):
        with _alice(pg, db) as conn:
            for id_, balance in conn.execute("SELECT id, balance FROM accounts"):
                assert id_ not in accounts, f"account {id_} is on both shards"
                accounts[id_] = balance
            ledger[k] = {}
            for txid, account, delta in conn.execute("SELECT txid, account, delta FROM ledger"):
                ledger[k].setdefault(txid, []).append((account, delta))
    print(f"\n{killed} processes killed in {KILLS} SIGKILLs of pgherd ({WORKERS} workers) over {chaos:.1f} s; "
          f"{len(tally.committed)} transfers committed, {len(tally.unknown)} lost their COMMIT's answer, "
          f"{len(tally.not_committed)} failed before COMMIT (client errors: {dict(tally.errors)}); "
          f"prepared transactions found right after a kill: {len(left_behind)} (new per kill: {new_per_kill}), "
          f"{by_recovery} of them settled by recovery; "
          f"recovery log lines: {recovered} "
          f"(settled {settle:.1f} s after the last start); transfers on the shards: {len(ledger[0])}")

    assert sorted(accounts) == list(range(1, ACCOUNTS + 1)), "accounts lost or duplicated"
    assert sum(accounts.values()) == ACCOUNTS * START_BALANCE, \
        f"total balance {sum(accounts.values())}, expected {ACCOUNTS * START_BALANCE}"
    # Each transfer is on both shards or on neither, exactly once.
    assert set(ledger[0]) == set(ledger[1]), (
        f"transfers on one shard only: shard 0 only {len(set(ledger[0]) - set(ledger[1]))}, "
        f"shard 1 only {len(set(ledger[1]) - set(ledger[0]))}")
    for k in range(SHARDS):
        doubled = [t for t, rows in ledger[k].items() if len(rows) != 1]
        assert not doubled, f"transfers with several ledger rows on shard {k}: {doubled[:5]}"
    for k in range(SHARDS):
        for txid, rows in ledger[k].items():
            assert all(acct in bank[k] for acct, _ in rows), txid
    deltas: Counter = Counter()
    for k in range(SHARDS):
        for rows in ledger[k].values():
            for account, delta in rows:
                deltas[account] += delta
    # The final check transfer above has no ledger rows.
    deltas[bank[0][0]] -= 1
    deltas[bank[1][0]] += 1
    wrong = {a: (accounts[a], START_BALANCE + deltas[a]) for a in accounts if accounts[a] != START_BALANCE + deltas[a]}
    assert not wrong, f"balances that disagree with the ledger (balance, expected): {dict(list(wrong.items())[:5])}"
    lost = [t for t in tally.committed if t not in ledger[0]]
    assert not lost, f"{len(lost)} acknowledged commits are missing, e.g. {lost[:3]}"
    phantom = [t for t in tally.not_committed if t in ledger[0]]
    assert not phantom, f"{len(phantom)} transfers that failed before COMMIT were committed, e.g. {phantom[:3]}"
    assert tally.committed, "no transfer committed at all"
