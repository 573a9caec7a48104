"""Authentication: clients to pgherd (SCRAM, MD5, cleartext, trust) and pgherd to Postgres.

`require_auth` (libpq 16+) makes the client refuse any method but the one named, so each test
proves which method pgherd actually asked for.
"""

from __future__ import annotations

import psycopg
import pytest

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(psycopg.pq.version() < 160000, reason="require_auth needs libpq 16"),
]

TEST_DB = "pgherd_test"
LIBPQ_METHOD = {"scram": "scram-sha-256", "md5": "md5", "plain": "password"}

USERS = [
    {"name": "alice", "password": "alice-secret", "database": TEST_DB},
    {"name": "bob", "password": "bob-secret", "database": TEST_DB},
    {"name": "carol", "password": "carol-secret", "database": TEST_DB},
    # Logs in to pgherd as app/app-pass, to Postgres as alice.
    {"name": "app", "password": "app-pass", "database": TEST_DB, "server_user": "alice",
     "server_password": "alice-secret"},
    # Right password for pgherd, wrong one for Postgres.
    {"name": "alice", "password": "alice-secret", "database": "alias_db", "server_password": "not-it"},
]


@pytest.fixture(scope="module")
def procs(pgherd_module, pg):
    """One pgherd per auth_type (started on first use)."""
    started: dict[str, object] = {}

    def get(auth_type: str):
        if auth_type not in started:
            started[auth_type] = pgherd_module(
                general={"auth_type": auth_type, "min_pool_size": 0},
                databases=[{"name": TEST_DB, "host": pg.host, "port": pg.port},
                           {"name": "alias_db", "host": pg.host, "port": pg.port, "database_name": TEST_DB}],
                users=USERS,
            )
        return started[auth_type]

    return get


def login(proc, user: str, password: str | None, dbname: str = TEST_DB, method: str | None = None):
    kwargs = {"require_auth": method} if method else {}
    return psycopg.connect(proc.dsn(user, password, dbname), autocommit=True, connect_timeout=10, **kwargs)


def login_error(proc, user: str, password: str | None, dbname: str = TEST_DB, method: str | None = None):
    with pytest.raises(psycopg.OperationalError) as info:
        login(proc, user, password, dbname, method).close()
    return info.value


@pytest.mark.parametrize("auth_type", ["scram", "md5", "plain"])
@pytest.mark.parametrize("user", ["alice", "bob", "carol"])
def test_right_password(procs, auth_type, user, helpers):
    proc = procs(auth_type)
    with login(proc, user, helpers.PASSWORDS[user], method=LIBPQ_METHOD[auth_type]) as conn:
        assert conn.execute("select current_user, current_database()").fetchone() == (user, TEST_DB)
        # pgherd's server login (SCRAM for alice, MD5 for bob, cleartext for carol) worked.
        assert conn.execute("select count(*) from pg_stat_activity where pid = pg_backend_pid()"
                            " and usename = %s", (user,)).fetchone() == (1,)


@pytest.mark.parametrize("auth_type", ["scram", "md5", "plain"])
def test_wrong_password(procs, auth_type, helpers):
    proc = procs(auth_type)
    err = login_error(proc, "alice", "wrong-secret", method=LIBPQ_METHOD[auth_type])
    assert 'password authentication failed for user "alice"' in str(err)
    assert helpers.login_sqlstate(proc.dsn("alice", "wrong-secret")) == "28P01"
    # An empty password is refused too (libpq does not even send it: no sqlstate then).
    err = login_error(proc, "bob", "", method=LIBPQ_METHOD[auth_type])
    assert err.sqlstate in ("28P01", None)
    helpers.assert_serving(proc)


@pytest.mark.parametrize("auth_type", ["scram", "md5", "plain"])
def test_unknown_user_looks_like_wrong_password(procs, auth_type, helpers):
    proc = procs(auth_type)
    # Same method asked for (require_auth), same error text.
    unknown = login_error(proc, "mallory", "whatever", method=LIBPQ_METHOD[auth_type])
    wrong = login_error(proc, "alice", "whatever", method=LIBPQ_METHOD[auth_type])
    assert str(unknown).replace("mallory", "USER") == str(wrong).replace("alice", "USER")
    assert 'password authentication failed for user "mallory"' in str(unknown)
    assert helpers.login_sqlstate(proc.dsn("mallory", "whatever")) == "28P01"


@pytest.mark.parametrize("auth_type", ["scram", "md5", "plain"])
def test_unknown_database(procs, auth_type, helpers):
    proc = procs(auth_type)
    err = login_error(proc, "alice", "alice-secret", dbname="no_such_db", method=LIBPQ_METHOD[auth_type])
    assert helpers.login_sqlstate(proc.dsn("alice", "alice-secret", "no_such_db")) == "28P01"
    assert 'password authentication failed for user "alice"' in str(err)


def test_md5_client_for_scram_only_server_side(procs):
    """md5 toward the client while Postgres wants SCRAM for alice: pgherd bridges both."""
    proc = procs("md5")
    with login(proc, "alice", "alice-secret", method="md5") as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    # And the client cannot force SCRAM: pgherd asks for md5.
    with pytest.raises(psycopg.OperationalError):
        login(proc, "alice", "alice-secret", method="scram-sha-256").close()


def test_server_user_override(procs, helpers):
    proc = procs("scram")
    with login(proc, "app", "app-pass", method="scram-sha-256") as conn:
        assert conn.execute("select current_user, session_user").fetchone() == ("alice", "alice")
    # app's pgherd password is not alice's, and alice's is not app's.
    assert helpers.login_sqlstate(proc.dsn("app", "alice-secret")) == "28P01"
    assert helpers.login_sqlstate(proc.dsn("alice", "app-pass")) == "28P01"
    with login(proc, "alice", "alice-secret") as conn:
        assert conn.execute("select current_user").fetchone() == ("alice",)


def test_database_alias(procs):
    """A [[databases]] name maps to database_name on the server."""
    proc = procs("scram")
    with login(proc, "app", "app-pass") as conn:
        assert conn.execute("select current_database()").fetchone() == (TEST_DB,)


def test_server_refuses_pgherd(procs, helpers):
    """Postgres rejects pgherd's login (wrong server_password): the client gets Postgres' error."""
    proc = procs("scram")
    with pytest.raises(psycopg.OperationalError) as info:
        with login(proc, "alice", "alice-secret", dbname="alias_db") as conn:
            conn.execute("select 1")
    assert "password authentication failed" in str(info.value)
    assert helpers.login_sqlstate(proc.dsn("alice", "alice-secret", "alias_db")) == "28P01"
    helpers.assert_serving(proc)


def test_trust(pgherd, helpers):
    proc = pgherd(general={"auth_type": "trust", "min_pool_size": 0})
    with psycopg.connect(proc.dsn("alice", None), autocommit=True, connect_timeout=10, require_auth="none") as conn:
        assert conn.execute("select current_user").fetchone() == ("alice",)
    with psycopg.connect(proc.dsn("bob", "anything"), autocommit=True, connect_timeout=10) as conn:
        assert conn.execute("select current_user").fetchone() == ("bob",)
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(proc.dsn("mallory", None), autocommit=True, connect_timeout=10).close()
    assert 'password authentication failed for user "mallory"' in str(info.value)
    assert helpers.login_sqlstate(proc.dsn("mallory", None)) == "28P01"


def test_many_logins_in_a_row(procs):
    """SCRAM logins do not leak or slow down (verifier cache), and failures don't poison them."""
    proc = procs("scram")
    for i in range(20):
        if i % 5 == 4:
            with pytest.raises(psycopg.OperationalError):
                login(proc, "alice", "nope").close()
            continue
        with login(proc, "alice", "alice-secret", method="scram-sha-256") as conn:
            assert conn.execute("select %s::int", (i,)).fetchone() == (i,)
