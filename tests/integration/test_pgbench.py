"""pgbench through pgherd: initialisation, then select-only and TPC-B with 10 clients on 5 servers."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from pgherd.shared.localpg import pg_bin_dir

TEST_DB = "pgherd_test"
POOL_SIZE = 5
CLIENTS = 10
SECONDS = 2


def pgbench_bin() -> str:
    return shutil.which("pgbench") or str(pg_bin_dir() / "pgbench")


@pytest.fixture(scope="module")
def proc(pgherd_module):
    return pgherd_module(general={"default_pool_size": POOL_SIZE, "checkout_timeout": 10_000})


def pgbench(proc, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PGPASSWORD": "alice-secret", "PGCONNECT_TIMEOUT": "10"}
    return subprocess.run(
        [pgbench_bin(), "-h", proc.host, "-p", str(proc.port), "-U", "alice", *args, TEST_DB],
        capture_output=True, text=True, timeout=timeout, env=env,
    )


@pytest.fixture(scope="module")
def initialized(proc, pg):
    done = pgbench(proc, "-i", "-s", "1", "-q")
    assert done.returncode == 0, f"pgbench -i failed:\n{done.stdout}\n{done.stderr}"
    yield done
    pg.sql("drop table if exists pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history",
           dbname=TEST_DB)


@pytest.mark.timeout(120)
def test_pgbench_init(initialized, pg):
    assert "done" in initialized.stderr
    counts = pg.sql("select (select count(*) from pgbench_accounts), (select count(*) from pgbench_branches),"
                    " (select count(*) from pgbench_tellers), (select count(*) from pgbench_history)",
                    dbname=TEST_DB)
    assert counts == [["100000", "1", "10", "0"]]
    # The primary keys were built (the last step of -i).
    keys = pg.sql("select count(*) from pg_constraint where contype = 'p' and conrelid::regclass::text"
                  " in ('pgbench_accounts', 'pgbench_branches', 'pgbench_tellers')", dbname=TEST_DB)
    assert keys == [["3"]]


def transactions(out: str) -> tuple[int, int]:
    processed = re.search(r"number of transactions actually processed: (\d+)", out)
    failed = re.search(r"number of failed transactions: (\d+)", out)
    assert processed, out
    return int(processed.group(1)), int(failed.group(1)) if failed else 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["simple", "extended"])
@pytest.mark.parametrize("script", ["select-only", "tpcb-like"])
def test_pgbench_run(initialized, proc, pg, helpers, mode, script):
    history_before = int(pg.sql("select count(*) from pgbench_history", dbname=TEST_DB)[0][0])
    done = pgbench(proc, "-M", mode, "-b", script, "-c", str(CLIENTS), "-j", "2", "-T", str(SECONDS),
                   "-n", timeout=SECONDS + 40)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    processed, failed = transactions(out)
    assert failed == 0, out
    assert processed > 50, out
    assert "number of failed transactions: 0" in out
    history_after = int(pg.sql("select count(*) from pgbench_history", dbname=TEST_DB)[0][0])
    if script == "tpcb-like":
        # Every TPC-B transaction inserted one history row, committed on Postgres.
        assert history_after - history_before == processed
        # Money is conserved: branch, teller and account balances moved together.
        sums = pg.sql("select (select sum(bbalance) from pgbench_branches), (select sum(tbalance) from"
                      " pgbench_tellers), (select sum(abalance) from pgbench_accounts),"
                      " (select sum(delta) from pgbench_history)", dbname=TEST_DB)[0]
        assert len(set(sums)) == 1, sums
    else:
        assert history_after == history_before
    # The pool stayed within its size, and nothing is left in a transaction.
    with helpers.connect(pg.dsn(TEST_DB)) as admin:
        backends = helpers.server_backends(admin, proc, pg, user="alice")
        assert len(backends) <= POOL_SIZE, backends
        assert all(b["state"] == "idle" for b in backends), backends
