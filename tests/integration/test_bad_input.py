"""Bad input on raw sockets: every case gets a clear error (or a clean close), never a hang, and
pgherd keeps serving everyone else.

pgherd runs with auth_type=trust so raw clients log in with a bare StartupMessage.
"""

from __future__ import annotations

import os
import socket
import struct
import time

import pytest

from pgherd.shared.wire import messages as M
from pgherd.shared.wire import protocol as P

pytestmark = pytest.mark.timeout(30)

TEST_DB = "pgherd_test"
MAX_MESSAGE_SIZE = 1048576
LOGIN_TIMEOUT_MS = 1000


@pytest.fixture(scope="module")
def proc(pgherd_module):
    return pgherd_module(general={
        "auth_type": "trust",
        "max_message_size": MAX_MESSAGE_SIZE,
        "client_login_timeout": LOGIN_TIMEOUT_MS,
        "default_pool_size": 3,
    })


@pytest.fixture
def raw(proc, helpers):
    clients = []

    def make(timeout: float = helpers.RECV_TIMEOUT):
        c = helpers.RawClient(proc, timeout=timeout)
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()


@pytest.fixture(autouse=True)
def still_serving(proc, helpers, pg):
    """After every bad input: pgherd lives, serves a normal client, and left no transaction open."""
    with helpers.connect(proc.dsn("alice", None)) as bystander:
        assert bystander.execute("select 1").fetchone() == (1,)
        yield
        # The client connected before the bad input still works, too.
        assert bystander.execute("select 'bystander'").fetchone() == ("bystander",)
    helpers.assert_serving(proc)
    with helpers.connect(pg.dsn(TEST_DB)) as admin:
        def clean():
            rows = helpers.server_backends(admin, proc, pg)
            return all(r["state"] == "idle" for r in rows)
        helpers.wait_for(clean, timeout=5, what="pgherd's servers to be idle")


def logged_in(raw):
    c = raw()
    msgs = c.startup()
    types = [t for t, _ in msgs]
    assert types[0] == "R" and "K" in types and types[-1] == "Z"
    return c


# ---------------------------------------------------------------------------------------------
# Startup phase


def test_oversize_startup_length(raw):
    c = raw()
    c.send(struct.pack("!ii", 100000, P.PROTOCOL_3_0) + b"user\0alice\0")
    err = c.expect_error_then_close()
    assert err["C"] == "08P01", err
    assert err["S"] == "FATAL"


@pytest.mark.parametrize("length", [0, 4, 7, -1])
def test_short_startup_length(raw, length):
    c = raw()
    c.send(struct.pack("!i", length) + struct.pack("!i", P.PROTOCOL_3_0))
    err = c.expect_error_then_close()
    assert err["C"] == "08P01", err


def test_startup_without_terminator(raw):
    c = raw()
    body = struct.pack("!i", P.PROTOCOL_3_0) + b"user\0alice\0database\0pgherd_test"  # no final NULs
    c.send(struct.pack("!i", len(body) + 4) + body)
    err = c.expect_error_then_close()
    assert err["C"] == "08P01", err


def test_startup_without_user(raw):
    c = raw()
    c.send(M.startup_message({"database": TEST_DB}))
    err = c.expect_error_then_close()
    assert err["C"] == "28000", err


@pytest.mark.parametrize("version", [(2, 0), (4, 0), (1, 0)])
def test_unsupported_protocol_version(raw, version):
    c = raw()
    c.send(M.startup_message({"user": "alice", "database": TEST_DB}, version=version[0] << 16 | version[1]))
    err = c.expect_error_then_close()
    assert err["C"] in ("0A000", "08P01"), err
    assert "protocol" in err["M"]


def test_newer_minor_version_negotiates(raw):
    """3.99 with a _pq_ option: pgherd answers NegotiateProtocolVersion and logs in on 3.0."""
    c = raw()
    c.send(M.startup_message({"user": "alice", "database": TEST_DB, "_pq_.made_up": "1"},
                             version=3 << 16 | 99))
    msgs = c.read_until("ZE")
    types = [t for t, _ in msgs]
    assert types[0] == "v" and types[-1] == "Z", msgs
    newest, unrecognized = M.read_negotiate_protocol_version(msgs[0][1])
    assert newest == 0 and unrecognized == ["_pq_.made_up"]
    assert any(t == "D" for t, _ in c.query("select 1"))


def test_garbage_before_startup(raw):
    c = raw()
    c.send(os.urandom(3000))
    # Random bytes read as a length field: either an error, or pgherd waits for the rest of a
    # (claimed) packet and then gives up at client_login_timeout. Never a hang.
    while True:
        msg = c.read_message()
        if msg is None:
            break
        assert msg[0] == "E", msg
    c.close()


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",  # length field 'GET ' = 1195725856
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,  # a TLS ClientHello
    b"\x00\x00\x00\x08\x00\x00\x00\x00",  # length 8, version 0.0
])
def test_other_protocols_get_an_error(raw, data):
    c = raw()
    c.send(data)
    err = c.expect_error_then_close()
    assert err["C"] in ("08P01", "0A000"), err


def test_ssl_request_answered_with_n(raw):
    c = raw()
    c.send(M.ssl_request())
    assert c.recv_exact(1) == b"N"
    c.startup()
    rows = [t for t, _ in c.query("select current_user")]
    assert rows == ["T", "D", "C", "Z"]


def test_gssenc_request_answered_with_n(raw):
    c = raw()
    c.send(M.gssenc_request())
    assert c.recv_exact(1) == b"N"
    c.send(M.ssl_request())
    assert c.recv_exact(1) == b"N"
    c.startup()


def test_silent_client_closed_after_login_timeout(raw):
    c = raw(timeout=LOGIN_TIMEOUT_MS / 1000 + 4)
    start = time.monotonic()
    msg = c.read_message()
    elapsed = time.monotonic() - start
    if msg is not None:
        assert msg[0] == "E", msg
        c.expect_closed()
        elapsed = time.monotonic() - start
    assert 0.8 <= elapsed <= LOGIN_TIMEOUT_MS / 1000 + 2, elapsed


def test_half_startup_closed_after_login_timeout(raw):
    c = raw(timeout=LOGIN_TIMEOUT_MS / 1000 + 4)
    packet = M.startup_message({"user": "alice", "database": TEST_DB})
    start = time.monotonic()
    c.send(packet[:10])
    msg = c.read_message()
    if msg is not None:
        assert msg[0] == "E"
        assert M.read_error_fields(msg[1])["C"] == "08P01"
        c.expect_closed()
    assert 0.8 <= time.monotonic() - start <= LOGIN_TIMEOUT_MS / 1000 + 2


def test_truncated_startup_then_close(raw, proc):
    c = raw()
    packet = M.startup_message({"user": "alice", "database": TEST_DB})
    c.send(packet[:len(packet) // 2])
    c.close()
    time.sleep(0.1)
    assert proc.returncode is None


def test_cancel_request_with_bad_key(raw):
    """A CancelRequest for an unknown backend is ignored; the connection just closes."""
    c = raw()
    c.send(M.cancel_request(12345, 67890))
    c.expect_closed()


def test_many_bad_clients_at_once(proc, helpers):
    """A burst of garbage connections while a normal client works."""
    socks = []
    try:
        for i in range(40):
            s = socket.create_connection((proc.host, proc.port), timeout=5)
            s.sendall(struct.pack("!i", 100000 + i) if i % 2 else os.urandom(17))
            socks.append(s)
        with helpers.connect(proc.dsn("alice", None)) as conn:
            assert conn.execute("select count(*) from generate_series(1, 1000)").fetchone() == (1000,)
    finally:
        for s in socks:
            s.close()


# ---------------------------------------------------------------------------------------------
# After login


def test_message_longer_than_max_message_size(raw):
    c = logged_in(raw)
    c.send(b"Q" + struct.pack("!I", 10 * 1024 * 1024) + b"select 1")
    err = c.expect_error_then_close()
    assert err["C"] == "08P01", err
    assert str(MAX_MESSAGE_SIZE) in err["M"]


def test_message_at_max_message_size_is_accepted(raw):
    """Just under the limit is fine: a 1 MB - 100 byte query (a big comment)."""
    c = logged_in(raw)
    sql = "select 'big' -- " + "x" * (MAX_MESSAGE_SIZE - 200)
    c.send(M.query(sql))
    msgs = c.read_until("Z")
    assert [t for t, _ in msgs] == ["T", "D", "C", "Z"], [t for t, _ in msgs]


@pytest.mark.parametrize("length", [0, 3, -1])
def test_message_length_below_four(raw, length):
    c = logged_in(raw)
    c.send(b"Q" + struct.pack("!i", length))
    err = c.expect_error_then_close()
    assert err["C"] == "08P01", err


@pytest.mark.parametrize("type_byte", [b"z", b"\x00", b"p", b"1"])
def test_unknown_message_type(raw, type_byte):
    c = logged_in(raw)
    c.send(type_byte + struct.pack("!i", 8) + b"abcd")
    err = c.expect_error_then_close()
    assert err["C"] == "08P01", err


def test_unknown_message_type_inside_transaction(raw, proc, helpers, pg):
    """The server the client held is rolled back (or dropped), not left in a transaction."""
    c = logged_in(raw)
    c.query("begin")
    c.query("create temp table bad_input_tmp (a int)")
    c.send(b"z" + struct.pack("!i", 4))
    err = c.expect_error_then_close()
    assert err["C"] == "08P01"
    # (the autouse fixture checks that no backend stays in a transaction)


def test_truncated_message_then_close(raw, proc, helpers, pg):
    """A client leaves in the middle of a message inside a transaction: pgherd cannot complete
    the message, so the server must be dropped (or reset) at once, not kept in the transaction."""
    c = logged_in(raw)
    c.query("begin")
    c.query("select 1")
    c.send(b"Q" + struct.pack("!i", 1000) + b"select 1 -- only part of it")
    time.sleep(0.05)
    c.close()
    with helpers.connect(pg.dsn(TEST_DB)) as admin:
        def no_transaction():
            rows = helpers.server_backends(admin, proc, pg)
            return all(r["state"] == "idle" for r in rows)
        helpers.wait_for(no_transaction, timeout=2, what="the abandoned server to leave its transaction")
    assert proc.returncode is None


def test_truncated_message_then_silence(raw, proc, helpers):
    """A client stops in the middle of a message and just stays: others are not blocked."""
    c = logged_in(raw)
    c.send(b"Q" + struct.pack("!i", 1000) + b"select 1 -- only part")
    with helpers.connect(proc.dsn("alice", None)) as other:
        assert other.execute("select 2").fetchone() == (2,)


def test_terminate_closes_cleanly(raw):
    c = logged_in(raw)
    c.send(M.terminate())
    c.expect_closed()


def test_garbage_after_login(raw):
    c = logged_in(raw)
    c.send(os.urandom(200))
    while True:  # an error then close, or just close
        msg = c.read_message()
        if msg is None:
            break
        assert msg[0] in "E", msg


def test_query_without_terminator(raw):
    """A Query whose text lacks its NUL: Postgres reports it; the session continues or ends cleanly."""
    c = logged_in(raw)
    c.send(b"Q" + struct.pack("!i", 4 + 8) + b"select 1")
    codes = []
    while True:
        msg = c.read_message()
        if msg is None or msg[0] == "Z":
            break
        if msg[0] == "E":
            codes.append(M.read_error_fields(msg[1])["C"])
    assert codes and codes[0] == "08P01", codes


def test_extended_protocol_by_hand(raw):
    """Parse/Bind/Describe/Execute/Sync and a Flush-only round on raw sockets work."""
    c = logged_in(raw)
    c.send(M.parse("", "select $1::int + 1", [23]) + M.bind("", "", [b"41"]) + M.describe("P", "")
           + M.execute("", 0) + M.sync())
    msgs = c.read_until("Z")
    assert [t for t, _ in msgs] == ["1", "2", "T", "D", "C", "Z"]
    assert M.read_data_row(msgs[3][1]) == [b"42"]
    # Error in the middle of extended messages: everything up to Sync is skipped.
    c.send(M.parse("", "select 1/0") + M.bind("", "", []) + M.execute("", 0) + M.sync())
    msgs = c.read_until("Z")
    assert [t for t, _ in msgs] == ["1", "E", "Z"]  # 1/0 is folded (and fails) at Bind
    c.send(M.query("select 'ok'"))
    assert [t for t, _ in c.read_until("Z")] == ["T", "D", "C", "Z"]


def test_copy_data_sent_before_copy_in_response(raw, pg):
    """A client may send COPY FROM STDIN, its data and CopyDone in one go, without waiting
    for CopyInResponse (asyncpg's copy_records_to_table does): all of it reaches the server."""
    pg.sql("drop table if exists raw_copy_t; create table raw_copy_t (id int, t text);"
           " grant all on raw_copy_t to alice", dbname=TEST_DB)
    c = logged_in(raw)
    c.send(M.query("copy raw_copy_t (id, t) from stdin") + M.copy_data(b"1\tx\n2\ty\n") + M.copy_done())
    msgs = c.read_until("Z")
    assert [t for t, _ in msgs] == ["G", "C", "Z"], msgs
    assert M.read_command_complete(msgs[1][1]) == "COPY 2"
    assert pg.sql("select count(*) from raw_copy_t", dbname=TEST_DB) == [["2"]]
    c.send(M.query("select 'after copy'"))
    assert [t for t, _ in c.read_until("Z")] == ["T", "D", "C", "Z"]
    pg.sql("drop table raw_copy_t", dbname=TEST_DB)


def test_psycopg_after_bad_input(proc, helpers):
    """A plain check that the worker is fine after everything above (the fixture checks too)."""
    with helpers.connect(proc.dsn("alice", None)) as conn:
        assert conn.execute("select count(*) from pg_stat_activity where usename = 'alice'").fetchone()[0] >= 1
