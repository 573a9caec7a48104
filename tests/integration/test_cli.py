"""The `pgherd` command: --version, check, -d URL run, and shutdown on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import psycopg
import pytest

from pgherd.shared.localpg import free_port

pytestmark = pytest.mark.timeout(60)

TEST_DB = "pgherd_test"
PGHERD = Path(sys.executable).parent / "pgherd"


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([str(PGHERD), *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          stdin=subprocess.DEVNULL)


def test_version():
    done = run_cli("--version")
    assert done.returncode == 0, done.stderr
    out = (done.stdout + done.stderr).strip()
    assert out.startswith("pgherd ")
    assert version("pgherd") in out


def test_help_lists_commands():
    done = run_cli("--help")
    assert done.returncode == 0
    for word in ("run", "check", "--config", "--users", "--database-url"):
        assert word in done.stdout


def write_configs(tmp_path: Path, toml_dumps, pg, general: dict | None = None, users: list | None = None,
                  extra: str = "") -> tuple[Path, Path]:
    config = {
        "general": {"host": "127.0.0.1", "port": free_port(), "workers": 1, **(general or {})},
        "databases": [{"name": TEST_DB, "host": pg.host, "port": pg.port},
                      {"name": "other_db", "host": pg.host, "port": pg.port, "database_name": TEST_DB}],
    }
    user_doc = {"users": users if users is not None else [
        {"name": "alice", "password": "alice-secret", "database": TEST_DB},
        {"name": "bob", "password": "bob-secret", "database": "other_db", "pool_size": 3},
    ]}
    cfg, usr = tmp_path / "pgherd.toml", tmp_path / "users.toml"
    cfg.write_text(toml_dumps(config) + extra)
    usr.write_text(toml_dumps(user_doc))
    return cfg, usr


def test_check_valid_config(tmp_path, toml_dumps, pg):
    cfg, usr = write_configs(tmp_path, toml_dumps, pg)
    done = run_cli("-c", str(cfg), "-u", str(usr), "check")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for word in (TEST_DB, "other_db", "alice", "bob", f"{pg.host}:{pg.port}"):
        assert word in out, word
    assert "alice-secret" not in out and "bob-secret" not in out  # passwords are never printed


def test_check_reports_every_error_at_once(tmp_path, toml_dumps, pg):
    cfg, usr = write_configs(tmp_path, toml_dumps, pg, general={"prot": 7000, "default_pool_size": "ten"})
    done = run_cli("-c", str(cfg), "-u", str(usr), "check")
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    assert "prot" in out and "did you mean" in out and '"port"' in out.split("prot", 1)[1], out
    assert "default_pool_size" in out and "ten" in out, out
    # And `run` refuses the same files without starting.
    done = run_cli("-c", str(cfg), "-u", str(usr), "run", timeout=20)
    assert done.returncode != 0
    assert "prot" in done.stdout + done.stderr and "default_pool_size" in done.stdout + done.stderr


def test_check_reports_errors_in_both_files(tmp_path, toml_dumps, pg):
    users = [{"name": "alice", "pasword": "alice-secret", "database": TEST_DB}]
    cfg, usr = write_configs(tmp_path, toml_dumps, pg, general={"pooler_mode": "sometimes"}, users=users)
    done = run_cli("-c", str(cfg), "-u", str(usr), "check")
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    assert "pooler_mode" in out and "sometimes" in out, out
    assert "pasword" in out and '"password"' in out, out


def test_check_missing_file(tmp_path):
    done = run_cli("-c", str(tmp_path / "nope.toml"), "-u", str(tmp_path / "nope-users.toml"), "check")
    assert done.returncode != 0
    assert "nope.toml" in done.stdout + done.stderr


def wait_listening(host: str, port: int, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"pgherd exited with {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"pgherd did not listen on {host}:{port}")


def test_database_url_without_config_files(tmp_path, pg):
    empty = tmp_path / "empty"
    empty.mkdir()
    port = free_port()
    url = f"postgres://alice:alice-secret@127.0.0.1:{pg.port}/{TEST_DB}"
    log = tmp_path / "pgherd.log"
    env = {**os.environ, "PGHERD_PORT": str(port), "PGHERD_HOST": "127.0.0.1", "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        proc = subprocess.Popen([str(PGHERD), "-d", url, "run"], cwd=empty, env=env, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        try:
            wait_listening("127.0.0.1", port, proc)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{log.read_text()}") from None
        dsn = f"postgresql://alice:alice-secret@127.0.0.1:{port}/{TEST_DB}"
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
            assert conn.execute("select current_user, current_database()").fetchone() == ("alice", TEST_DB)
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(f"postgresql://alice:wrong@127.0.0.1:{port}/{TEST_DB}", connect_timeout=10)
        assert "password authentication failed" in str(info.value)
        assert list(empty.iterdir()) == []  # no files needed or written
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_sigterm_lets_open_transaction_commit(pgherd, pg, helpers, pg_admin):
    pg_admin.execute("drop table if exists shutdown_t")
    pg_admin.execute("create table shutdown_t (a int)")
    pg_admin.execute("grant all on shutdown_t to alice, bob")
    proc = pgherd(general={"shutdown_timeout": 10_000})
    idle = helpers.connect(proc.dsn())
    conn = helpers.connect(proc.dsn())
    try:
        conn.execute("begin")
        conn.execute("insert into shutdown_t values (1)")
        proc.signal(signal.SIGTERM)
        time.sleep(0.5)
        assert proc.returncode is None, "pgherd exited with a transaction in flight"
        # New clients are not accepted any more.
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(proc.dsn(), connect_timeout=3).close()
        # The open transaction goes on and commits.
        conn.execute("insert into shutdown_t values (2)")
        assert conn.execute("select count(*) from shutdown_t").fetchone() == (2,)
        conn.execute("commit")
        start = time.monotonic()
        assert proc.wait(8) == 0, proc.log_tail()
        assert time.monotonic() - start < 5  # it did not wait for the whole shutdown_timeout
    finally:
        conn.close()
        idle.close()
    assert pg_admin.execute("select array_agg(a order by a) from shutdown_t").fetchone() == ([1, 2],)
    pg_admin.execute("drop table shutdown_t")


def test_sigterm_with_idle_clients_exits_promptly(pgherd, helpers):
    proc = pgherd(general={"shutdown_timeout": 30_000})
    conns = [helpers.connect(proc.dsn()) for _ in range(3)]
    try:
        for c in conns:
            c.execute("select 1")
        start = time.monotonic()
        proc.signal(signal.SIGTERM)
        assert proc.wait(10) == 0, proc.log_tail()
        assert time.monotonic() - start < 5
        # The idle clients were disconnected.
        with pytest.raises(psycopg.OperationalError):
            conns[0].execute("select 1")
    finally:
        for c in conns:
            c.close()


def test_shutdown_timeout_ends_stuck_transactions(pgherd, pg, helpers, pg_admin):
    pg_admin.execute("drop table if exists shutdown_stuck_t")
    pg_admin.execute("create table shutdown_stuck_t (a int)")
    pg_admin.execute("grant all on shutdown_stuck_t to alice")
    proc = pgherd(general={"shutdown_timeout": 1000})
    conn = helpers.connect(proc.dsn())
    try:
        conn.execute("begin")
        conn.execute("insert into shutdown_stuck_t values (1)")
        start = time.monotonic()
        proc.signal(signal.SIGTERM)
        assert proc.wait(10) == 0, proc.log_tail()
        assert 0.8 <= time.monotonic() - start <= 5
        with pytest.raises(psycopg.OperationalError):
            conn.execute("commit")
    finally:
        conn.close()

    # Its transaction never committed and nothing is left on Postgres.
    def gone():
        return pg_admin.execute("select count(*) from pg_stat_activity where usename = 'alice'"
                                " and state like 'idle in transaction%'").fetchone() == (0,)
    helpers.wait_for(gone, timeout=5, what="the abandoned transaction to end")
    assert pg_admin.execute("select count(*) from shutdown_stuck_t").fetchone() == (0,)
    pg_admin.execute("drop table shutdown_stuck_t")


def test_second_sigterm_exits_at_once(pgherd, helpers):
    proc = pgherd(general={"shutdown_timeout": 30_000})
    conn = helpers.connect(proc.dsn())
    try:
        conn.execute("begin")
        conn.execute("select 1")
        proc.signal(signal.SIGTERM)
        time.sleep(0.3)
        assert proc.returncode is None
        start = time.monotonic()
        proc.signal(signal.SIGTERM)
        proc.wait(10)
        assert time.monotonic() - start < 5
    finally:
        conn.close()


def test_port_in_use_fails_cleanly(tmp_path, toml_dumps, pg):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(1)
        port = blocker.getsockname()[1]
        # SO_REUSEPORT lets two sockets share a port only if both set it; ours does not.
        cfg, usr = write_configs(tmp_path, toml_dumps, pg, general={"port": port})
        done = run_cli("-c", str(cfg), "-u", str(usr), "run", timeout=20)
    assert done.returncode != 0
    assert str(port) in done.stdout + done.stderr
