"""Session state in transaction mode: SET/RESET/SET LOCAL/set_config/DISCARD ALL follow each
client across servers, with Postgres' transaction semantics; SET ROLE and advisory locks pin."""

from __future__ import annotations

import asyncio
import threading

import asyncpg
import psycopg
import pytest

pytestmark = pytest.mark.timeout(120)

NAMES = ("search_path", "timezone", "statement_timeout", "application_name")


@pytest.fixture(scope="module")
def single(pgherd_module):
    """One worker, one server: every client shares the same backend."""
    return pgherd_module(general={"workers": 1, "default_pool_size": 1})


def connect(dsn: str) -> psycopg.Connection:
    return psycopg.connect(dsn, autocommit=True, prepare_threshold=None, connect_timeout=10)


def show(conn: psycopg.Connection) -> tuple:
    return tuple(conn.execute(f"show {n}").fetchone()[0] for n in NAMES)


def test_set_isolation_matrix_psycopg(single, pg):
    with connect(single.dsn()) as a, connect(single.dsn()) as b, connect(single.dsn()) as c, \
            connect(pg.dsn("pgherd_test", "alice", "alice-secret")) as direct:
        default = show(c)
        assert default == show(direct)  # e.g. application_name '' as on a direct connection
        pid = c.execute("select pg_backend_pid()").fetchone()[0]
        a.execute("set search_path to a_schema, public")
        a.execute("set timezone = 'Asia/Tokyo'")
        a.execute("set statement_timeout = '7s'")
        a.execute("set application_name = 'client-a'")
        b.execute("SET search_path = b_schema")
        b.execute("SET TIME ZONE 'America/New_York'")
        b.execute("select set_config('statement_timeout', '9s', false)")
        b.execute("set application_name to 'client-b'")
        for _ in range(3):
            assert show(a) == ("a_schema, public", "Asia/Tokyo", "7s", "client-a")
            assert show(b) == ("b_schema", "America/New_York", "9s", "client-b")
            assert show(c) == default
        # They really share one server.
        assert {x.execute("select pg_backend_pid()").fetchone()[0] for x in (a, b, c)} == {pid}


def test_transaction_semantics(single):
    with connect(single.dsn()) as a, connect(single.dsn()) as other:
        default = show(other)
        with a.transaction():
            a.execute("set application_name = 'committed'")
        assert show(a)[3] == "committed"
        with pytest.raises(RuntimeError):
            with a.transaction():
                a.execute("set application_name = 'rolled-back'")
                raise RuntimeError
        assert show(a)[3] == "committed"
        with a.transaction():
            a.execute("set local statement_timeout = '1s'")
            assert show(a)[2] == "1s"
        assert show(a)[2] == default[2]
        # A failed SET changes nothing, as on Postgres.
        with pytest.raises(psycopg.Error) as info:
            a.execute("set statement_timeout = 'bogus'")
        assert info.value.sqlstate == "22023"
        assert show(a)[2] == default[2]
        # Multi-statement query rolled back by an error: the SET in it does not stand.
        with pytest.raises(psycopg.Error):
            a.execute("set application_name = 'lost'; select 1/0")
        assert show(a)[3] == "committed"
        assert show(other) == default


def test_reset_and_discard(single, pg):
    opts = "-c search_path=startup_schema"
    with psycopg.connect(single.dsn(), autocommit=True, prepare_threshold=None, options=opts) as a, \
            psycopg.connect(pg.dsn("pgherd_test", "alice", "alice-secret"), autocommit=True,
                            options=opts) as direct, connect(single.dsn()) as other:
        for conn in (a, direct):
            conn.execute("set search_path = elsewhere")
            conn.execute("set application_name = 'x'")
            conn.execute("reset search_path")
            conn.execute("reset application_name")
        assert show(a) == show(direct)
        for conn in (a, direct):
            conn.execute("set search_path = elsewhere; set statement_timeout = '3s'")
            conn.execute("reset all")
        assert show(a) == show(direct)
        for conn in (a, direct):
            conn.execute("set timezone = 'Asia/Tokyo'")
            conn.execute("discard all")
        assert show(a) == show(direct)
        assert other.execute("show search_path").fetchone()[0] == "\"$user\", public"


def test_advisory_lock_and_set_role_pin_the_server(single, pg_admin):
    with connect(single.dsn()) as a, connect(single.dsn()) as b:
        a.execute("select pg_advisory_lock(4242)")
        got = {}
        t = threading.Thread(target=lambda: got.setdefault("b", b.execute("select 1").fetchone()))
        t.start()
        t.join(1.0)
        assert "b" not in got, "the only server must stay with the client holding a session lock"
        a.execute("select pg_advisory_unlock(4242)")
        t.join(5)
        assert got.get("b") == (1,)
        a.execute("set role alice")
        pid = a.execute("select pg_backend_pid()").fetchone()[0]
        assert a.execute("select current_user").fetchone()[0] == "alice"
        a.execute("reset role")
        assert b.execute("select pg_backend_pid()").fetchone()[0] == pid  # released again


def test_client_leaving_with_a_lock_frees_it(single, pg_admin):
    a = connect(single.dsn())
    a.execute("select pg_advisory_lock(777)")
    a.close()
    with connect(single.dsn()) as b:
        assert b.execute("select pg_try_advisory_lock(777)").fetchone()[0] is True
        b.execute("select pg_advisory_unlock_all()")


def test_set_isolation_matrix_asyncpg(single):
    async def main():
        x = await asyncpg.connect(single.dsn(), server_settings={"application_name": "apg"})
        y = await asyncpg.connect(single.dsn())
        try:
            await x.execute("set search_path to x_schema")
            await y.execute("set search_path to y_schema")
            await x.execute("set timezone to 'UTC'")
            await y.execute("set timezone to 'Europe/Paris'")
            for _ in range(3):
                assert await x.fetchval("show search_path") == "x_schema"
                assert await y.fetchval("show search_path") == "y_schema"
                assert await x.fetchval("show timezone") == "UTC"
                assert await y.fetchval("show timezone") == "Europe/Paris"
                assert await x.fetchval("show application_name") == "apg"
        finally:
            await x.close()
            await y.close()

    asyncio.run(asyncio.wait_for(main(), 60))
