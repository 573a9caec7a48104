"""Tests of pgherd.shared.localpg, the throwaway clusters every other integration test runs on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import psycopg
import pytest

from pgherd.shared.localpg import LocalPgError, PgCluster, free_port, pg_bin_dir, reap_orphans


@pytest.fixture
def local_pg(pg):
    """The session cluster, when it is a local PgCluster (not a Docker container)."""
    if not isinstance(pg, PgCluster):
        pytest.skip("needs the local PgCluster, not Docker")
    return pg


def connect(dsn: str, **kwargs: object) -> psycopg.Connection:
    return psycopg.connect(dsn, connect_timeout=10, autocommit=True, **kwargs)


def test_session_cluster_answers(pg):
    assert pg.sql("select 1") == [["1"]]
    with connect(pg.dsn()) as conn:
        assert conn.execute("select current_setting('server_version_num')::int >= 150000").fetchone() == (True,)


def test_sql_returns_rows_of_text(pg):
    rows = pg.sql("select 1, 'a|b,c', null, E'two\\nlines' union all select 2, '', 'x', 'é'")
    assert rows == [["1", "a|b,c", "", "two\nlines"], ["2", "", "x", "é"]]
    assert pg.sql("select 1 where false") == []


def test_execute_runs_scripts(local_pg):
    out = local_pg.execute(
        "create temp table t (a int);\ninsert into t values (1), (2);\nselect sum(a) from t;\n",
        dbname="pgherd_test",
    )
    assert "3" in out


def test_stored_password_formats(pg):
    rows = dict(pg.sql("select rolname, rolpassword from pg_authid where rolname in ('alice', 'bob', 'carol')"))
    assert rows["alice"].startswith("SCRAM-SHA-256$")
    assert rows["bob"].startswith("md5") and len(rows["bob"]) == 35
    assert rows["carol"].startswith("SCRAM-SHA-256$")


@pytest.mark.skipif(psycopg.pq.version() < 160000, reason="require_auth needs libpq 16")
@pytest.mark.parametrize(
    "user, password, method",
    [("alice", "alice-secret", "scram-sha-256"), ("bob", "bob-secret", "md5"), ("carol", "carol-secret", "password")],
)
def test_roles_authenticate_with_their_method(pg, user, password, method):
    # require_auth makes libpq refuse any other method the server might ask for.
    with connect(pg.dsn("pgherd_test", user, password), require_auth=method) as conn:
        assert conn.execute("select current_user").fetchone() == (user,)
        conn.execute("create table if not exists localpg_rights_probe (a int)")  # rights on public
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        connect(pg.dsn("pgherd_test", user, "wrong"))


def test_superuser_is_trusted_over_tcp(pg):
    with connect(pg.dsn()) as conn:
        assert conn.execute("select rolsuper from pg_roles where rolname = current_user").fetchone() == (True,)


@pytest.mark.slow
@pytest.mark.destructive
def test_replica_streams_and_promotes(fresh_pg, cluster_dir):
    fresh_pg.execute("create table kv (k int primary key, v text);", dbname="pgherd_test")
    replica = fresh_pg.add_replica(cluster_dir())
    try:
        assert replica.port != fresh_pg.port
        assert replica.in_recovery()
        with connect(fresh_pg.dsn("pgherd_test", "alice", "alice-secret")) as conn:
            conn.execute("insert into kv values (1, 'one')")
        replica.wait_for_replay()
        assert replica.sql("select v from kv", dbname="pgherd_test") == [["one"]]
        # The roles came along, and the standby refuses writes.
        with connect(replica.dsn("pgherd_test", "bob", "bob-secret")) as conn:
            assert conn.execute("select v from kv").fetchone() == ("one",)
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                conn.execute("insert into kv values (2, 'two')")

        replica.promote()
        assert not replica.in_recovery()
        with connect(replica.dsn("pgherd_test", "alice", "alice-secret")) as conn:
            conn.execute("insert into kv values (2, 'two')")
        assert replica.sql("select count(*) from kv", dbname="pgherd_test") == [["2"]]
    finally:
        replica.destroy()
    assert not replica.base_dir.exists()


@pytest.mark.destructive
def test_stop_immediate_then_start(fresh_pg):
    port = fresh_pg.port
    fresh_pg.execute("create table kept (a int); insert into kept values (7); checkpoint;", dbname="pgherd_test")
    fresh_pg.stop("immediate")
    assert not fresh_pg.is_running()
    with pytest.raises(psycopg.OperationalError):
        connect(fresh_pg.dsn())
    fresh_pg.start()
    assert fresh_pg.is_running() and fresh_pg.port == port
    assert fresh_pg.sql("select a from kept", dbname="pgherd_test") == [["7"]]
    fresh_pg.restart()
    assert fresh_pg.sql("select 1") == [["1"]]


@pytest.mark.destructive
def test_start_after_postmaster_killed(fresh_pg):
    os.kill(fresh_pg.postmaster_pid(), signal.SIGKILL)
    deadline = time.monotonic() + 10
    while fresh_pg.is_running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not fresh_pg.is_running()
    fresh_pg.start()  # despite the stale lock files
    assert fresh_pg.sql("select 1") == [["1"]]


def test_bad_setting_raises_with_log_tail(cluster_dir):
    base = cluster_dir()
    with pytest.raises(LocalPgError) as failure:
        PgCluster.create(base, settings={"shared_buffers": "plenty"})
    message = str(failure.value)
    assert "pg_ctl" in message and "start" in message
    assert 'invalid value for parameter "shared_buffers"' in message  # from the server log
    assert str(base / "postgres.log") in message
    assert not (base / "data" / "postmaster.pid").exists()


def test_sql_error_raises_with_server_message(local_pg):
    with pytest.raises(LocalPgError, match='column "no_such_column" does not exist') as failure:
        local_pg.sql("select no_such_column")
    assert "psql" in str(failure.value) and str(local_pg.log_path) in str(failure.value)


def test_context_manager_destroys(cluster_dir):
    base = cluster_dir()
    with PgCluster.create(base) as cluster:
        assert cluster.sql("select current_user") == [["postgres"]]
        pid = cluster.postmaster_pid()
        assert pid is not None
    assert not base.exists()
    assert not cluster.is_running()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands clusters to another account")
def test_private_parent_dir_is_reported(tmp_path):
    # pytest's tmp_path is under /tmp/pytest-of-root, mode 0700: the postgres account cannot enter.
    with pytest.raises(LocalPgError, match="cannot enter"):
        PgCluster.create(tmp_path / "cluster")


def test_orphans_are_reaped(cluster_dir):
    base = cluster_dir()
    cluster = PgCluster.create(base)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (base / "owner.pid").write_text(f"{dead.stdout.strip()} 0\n")
    assert reap_orphans([base, Path(tempfile.gettempdir()) / "pgherd-test-nonexistent"]) == [base]
    assert not base.exists()
    assert not cluster.is_running()


def test_live_clusters_are_not_reaped(local_pg):
    assert reap_orphans([local_pg.base_dir]) == []
    assert local_pg.sql("select 1") == [["1"]]


def test_pg_bin_dir_override(monkeypatch, tmp_path):
    monkeypatch.setenv("PGHERD_PG_BIN", str(tmp_path))
    with pytest.raises(LocalPgError, match="PGHERD_PG_BIN"):
        pg_bin_dir()
    monkeypatch.delenv("PGHERD_PG_BIN")
    assert (pg_bin_dir() / "postgres").exists()


def test_free_port_is_bindable():
    import socket

    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_toml_writer_round_trips(toml_dumps):
    # The `pgherd` fixture writes pgherd.toml/users.toml with this writer (see conftest.py).
    doc = {
        "general": {"host": "127.0.0.1", "port": 6432, "workers": 2, "ratio": 0.5, "tls": False,
                    "dropped": None},
        "databases": [
            {"name": "db", "host": "h1", "shard": 0},
            {"name": "db", "host": "h2", "shard": 1, "role": "replica"},
        ],
        "sharded_tables": [
            {"database": "db", "column": "id", "data_type": "bigint",
             "mapping": [{"kind": "list", "values": [1, 2], "shard": 0},
                         {"kind": "range", "start": 3, "end": 9, "shard": 1}]},
            {"database": "db", "name": "other", "column": "k"},
        ],
        "admin": {"password": 'quo"te\\back\nline\ttab\x01é', "odd key": "v", "empty": [], "nested": {"a": [1.5, "s", True]}},
    }
    text = toml_dumps(doc)
    expected = dict(doc, general={k: v for k, v in doc["general"].items() if v is not None})
    assert tomllib.loads(text) == expected
    assert "[[sharded_tables.mapping]]" in text
