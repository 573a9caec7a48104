"""Unit tests of the sans-IO protocol core: framing, builders/readers, errors."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgherd.shared.wire import errors as E
from pgherd.shared.wire import messages as M
from pgherd.shared.wire import protocol as P
from pgherd.shared.wire.framing import check_length, iter_messages, split_messages, startup_length
from pgherd.worker.client import parse_options

message_types = st.sampled_from(sorted(P.FRONTEND_TYPES))
bodies = st.binary(max_size=300)


@given(st.lists(st.tuples(message_types, bodies), max_size=20))
def test_split_recovers_every_message(msgs):
    data = b"".join(M.message(t, b) for t, b in msgs)
    assert split_messages(data) == msgs


@given(st.lists(st.tuples(message_types, bodies), min_size=1, max_size=10), st.data())
def test_iter_messages_stops_before_partial(msgs, data):
    raw = b"".join(M.message(t, b) for t, b in msgs)
    cut = data.draw(st.integers(0, len(raw)))
    seen = list(iter_messages(raw, 0, cut))
    # Every yielded message is complete and in order; the rest starts at a boundary.
    consumed = seen[-1][2] if seen else 0
    assert consumed <= cut
    assert [(t, raw[b0:b1]) for t, b0, b1 in seen] == msgs[:len(seen)]
    if len(seen) < len(msgs):
        assert cut - consumed < 5 + len(msgs[len(seen)][1])


@pytest.mark.parametrize("length", [-1, 0, 3, 2**31 - 1])
def test_bad_length_is_protocol_violation(length):
    raw = struct.pack("!Bi", ord("Q"), length) if length < 0 else struct.pack("!BI", ord("Q"), length)
    with pytest.raises(E.ProtocolViolation) as exc:
        list(iter_messages(raw, 0, len(raw), max_size=1 << 20))
    assert exc.value.code == "08P01"
    with pytest.raises(E.ProtocolViolation):
        check_length(ord("Q"), length & 0xFFFFFFFF, 1 << 20)


@pytest.mark.parametrize("length", [0, 4, 7, 10001, 2**31 - 1])
def test_startup_length_bounds(length):
    raw = struct.pack("!ii", length, P.PROTOCOL_3_0)
    with pytest.raises(E.ProtocolViolation):
        startup_length(raw, len(raw))


def test_startup_roundtrip():
    raw = M.startup_message({"user": "alice", "database": "db", "options": "-c x=1"})
    assert startup_length(raw, 3) is None
    assert startup_length(raw, len(raw)) == len(raw)
    version, = struct.unpack_from("!i", raw, 4)
    assert version == P.PROTOCOL_3_0
    assert M.read_startup_params(raw[8:]) == {"user": "alice", "database": "db", "options": "-c x=1"}


@pytest.mark.parametrize("body", [b"", b"user\0alice\0", b"user\0alice", b"user\0alice\0\0extra"])
def test_bad_startup_params(body):
    with pytest.raises(ValueError):
        M.read_startup_params(body)


def test_special_startup_packets():
    assert struct.unpack("!ii", M.ssl_request()) == (8, P.SSL_REQUEST_CODE)
    assert struct.unpack("!ii", M.gssenc_request()) == (8, P.GSSENC_REQUEST_CODE)
    assert struct.unpack("!iiii", M.cancel_request(7, -5)) == (16, P.CANCEL_REQUEST_CODE, 7, -5)


def test_error_response_fields():
    raw = E.error_response("53300", "no server", detail="d", hint="h")
    [(t, body)] = split_messages(raw)
    assert t == ord("E")
    f = M.read_error_fields(body)
    assert f == {"S": "ERROR", "V": "ERROR", "C": "53300", "M": "no server", "D": "d", "H": "h"}
    [(t, body)] = split_messages(E.notice_response("hello"))
    assert t == ord("N") and M.read_error_fields(body)["M"] == "hello"


def test_backend_builders_read_back():
    fields = [M.Field("a", type_oid=23, type_size=4), M.Field("b")]
    [(t, body)] = split_messages(M.row_description(fields))
    assert t == P.B_ROW_DESCRIPTION and M.read_row_description(body) == fields
    [(t, body)] = split_messages(M.data_row([b"1", None, "x"]))
    assert M.read_data_row(body) == [b"1", None, b"x"]
    [(t, body)] = split_messages(M.parameter_status("TimeZone", "UTC"))
    assert M.read_parameter_status(body) == ("TimeZone", "UTC")
    [(t, body)] = split_messages(M.backend_key_data(12, 34))
    assert M.read_backend_key_data(body) == (12, 34)
    [(t, body)] = split_messages(M.command_complete("SELECT 1"))
    assert M.read_command_complete(body) == "SELECT 1"
    [(t, body)] = split_messages(M.notification_response(5, "ch", "payload"))
    assert M.read_notification(body) == (5, "ch", "payload")
    [(t, body)] = split_messages(M.copy_in_response(0, [0, 0]))
    assert t == P.B_COPY_IN_RESPONSE and M.read_copy_response(body) == (0, [0, 0])
    [(t, body)] = split_messages(M.copy_out_response(1, [1]))
    assert t == P.B_COPY_OUT_RESPONSE and M.read_copy_response(body) == (1, [1])
    [(t, body)] = split_messages(M.function_call_response(None))
    assert M.read_function_call_response(body) is None
    [(t, body)] = split_messages(M.negotiate_protocol_version(0, ["_pq_.x"]))
    assert M.read_negotiate_protocol_version(body) == (0, ["_pq_.x"])
    [(t, body)] = split_messages(M.auth_sasl(["SCRAM-SHA-256"]))
    code, data = M.read_authentication(body)
    assert code == P.AUTH_SASL and M.read_sasl_mechanisms(data) == ["SCRAM-SHA-256"]
    [(t, body)] = split_messages(M.ready_for_query(P.TX_IN_TRANSACTION))
    assert body == b"T"


def test_frontend_builders_read_back():
    [(t, body)] = split_messages(M.parse("s1", "select $1", [23]))
    assert t == P.F_PARSE and M.read_parse(body) == M.ParseMsg("s1", "select $1", [23])
    [(t, body)] = split_messages(M.bind("p", "s1", [b"1", None], [0], [1]))
    assert M.read_bind(body) == M.BindMsg("p", "s1", [0], [b"1", None], [1])
    [(t, body)] = split_messages(M.describe("S", "s1"))
    assert M.read_describe_or_close(body) == ("S", "s1")
    [(t, body)] = split_messages(M.execute("p", 10))
    assert M.read_execute(body) == ("p", 10)
    [(t, body)] = split_messages(M.query("select 1"))
    assert M.read_query(body) == "select 1"
    [(t, body)] = split_messages(M.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=x"))
    assert M.read_sasl_initial_response(body) == ("SCRAM-SHA-256", b"n,,n=,r=x")
    [(t, body)] = split_messages(M.password_message("secret"))
    assert M.read_password(body) == b"secret"
    for raw, typ in [(M.sync(), P.F_SYNC), (M.flush(), P.F_FLUSH), (M.terminate(), P.F_TERMINATE),
                     (M.copy_done(), P.F_COPY_DONE), (M.copy_fail("x"), P.F_COPY_FAIL),
                     (M.close("P", ""), P.F_CLOSE), (M.function_call(1, [b"a"]), P.F_FUNCTION_CALL)]:
        assert split_messages(raw)[0][0] == typ


@settings(max_examples=300)
@given(st.binary(max_size=64))
def test_readers_only_raise_valueerror(body):
    for reader in (M.read_parse, M.read_bind, M.read_row_description, M.read_data_row,
                   M.read_execute, M.read_sasl_initial_response, M.read_error_fields):
        try:
            reader(body)
        except ValueError:
            pass


@pytest.mark.parametrize("options,expected", [
    ("-c search_path=foo", {"search_path": "foo"}),
    ("-csearch_path=foo -c statement_timeout=5s", {"search_path": "foo", "statement_timeout": "5s"}),
    ("--work-mem=64MB", {"work_mem": "64MB"}),
    (r"-c application_name=a\ b", {"application_name": "a b"}),
    ("", {}),
])
def test_parse_options(options, expected):
    assert parse_options(options) == expected


@pytest.mark.parametrize("options", ["foo", "-c novalue"])
def test_parse_options_rejects(options):
    with pytest.raises(E.PgError):
        parse_options(options)


@pytest.mark.parametrize("sql,expected", [
    ("BEGIN", True), ("begin;", True), ("  \n begin isolation level serializable", True),
    ("START TRANSACTION", True), ("/* a /* nested */ comment */ BEGIN", True), ("-- c\nbegin", True),
    ("select 1", False), ("beginning", False), ("begin_x", False), ("", False), ("/* unterminated", False),
    ("commit", False), ("select 'begin'", False),
])
def test_starts_transaction(sql, expected):
    from pgherd.router.txstart import starts_transaction
    assert starts_transaction(sql) is expected
