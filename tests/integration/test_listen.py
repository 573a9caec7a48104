"""LISTEN/NOTIFY in transaction mode (pub_sub_channel_size > 0) and in session mode."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

pytestmark = pytest.mark.timeout(120)


def connect(dsn: str) -> psycopg.Connection:
    return psycopg.connect(dsn, autocommit=True, prepare_threshold=None, connect_timeout=10)


def collect(conns, seconds: float) -> dict:
    got = {i: [] for i in range(len(conns))}

    def reader(i):
        for note in conns[i].notifies(timeout=seconds):
            got[i].append((note.channel, note.payload))

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(len(conns))]
    for t in threads:
        t.start()
    return got, threads


@pytest.fixture(scope="module")
def pooled(pgherd_module):
    return pgherd_module(general={"workers": 1, "default_pool_size": 1, "pub_sub_channel_size": 100})


def test_three_listeners_commit_and_rollback(pooled):
    listeners = [connect(pooled.dsn()) for _ in range(3)]
    try:
        for c in listeners:
            c.execute("LISTEN jobs")
        got, threads = collect(listeners, 2.5)
        time.sleep(0.3)
        with connect(pooled.dsn()) as n:
            n.execute("NOTIFY jobs, 'plain'")
            with n.transaction():
                n.execute("NOTIFY jobs, 'committed'")
                n.execute("select 1")
            with pytest.raises(RuntimeError):
                with n.transaction():
                    n.execute("NOTIFY jobs, 'rolled back'")
                    raise RuntimeError
            n.execute("select pg_notify('jobs', 'function')")
            n.execute("NOTIFY other_channel, 'not for them'")
        for t in threads:
            t.join()
        for i in range(3):
            assert got[i] == [("jobs", "plain"), ("jobs", "committed"), ("jobs", "function")], got
        # While listening, the clients still run queries normally (one server for everyone).
        assert [c.execute("select 1").fetchone() for c in listeners] == [(1,)] * 3
    finally:
        for c in listeners:
            c.close()


def test_unlisten_and_disconnect_clean_up(pooled, pg_admin):
    a, b = connect(pooled.dsn()), connect(pooled.dsn())
    try:
        a.execute('LISTEN "Mixed Case"')
        b.execute('LISTEN "Mixed Case"')
        a.execute('UNLISTEN "Mixed Case"')
        got, threads = collect([a, b], 1.5)
        time.sleep(0.3)
        with connect(pooled.dsn()) as n:
            n.execute("""NOTIFY "Mixed Case", 'only b'""")
        for t in threads:
            t.join()
        assert got == {0: [], 1: [("Mixed Case", "only b")]}
        b.execute("UNLISTEN *")
    finally:
        a.close()
        b.close()
    # No pooled server was left listening: pgherd's one listening connection does it.
    rows = pg_admin.execute("select count(*) from pg_stat_activity where usename = 'alice' "
                            "and query ilike 'listen%'").fetchone()[0]
    assert rows <= 1


def test_session_mode_passes_through(pgherd):
    proc = pgherd(general={"workers": 1, "pooler_mode": "session"})
    with connect(proc.dsn()) as a, connect(proc.dsn()) as n:
        a.execute("LISTEN direct")
        got, threads = collect([a], 1.5)
        time.sleep(0.3)
        n.execute("NOTIFY direct, 'x'")
        for t in threads:
            t.join()
        assert got == {0: [("direct", "x")]}
