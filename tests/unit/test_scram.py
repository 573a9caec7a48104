"""Unit tests for SCRAM-SHA-256 and SASLprep (shared/wire/scram.py)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import unicodedata

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from pgherd.shared.wire import scram
from pgherd.shared.wire.scram import (
    DEFAULT_ITERATIONS,
    MECHANISM,
    ScramClient,
    ScramError,
    ScramServer,
    ScramVerifier,
    make_verifier,
    normalize_password,
    parse_verifier,
    saslprep,
)

# Iterations for property tests: the math is the same at any count, and 4096 would make each
# example cost milliseconds of PBKDF2.
FAST_ITERATIONS = 2

# --- RFC 7677 §3 test vector ---------------------------------------------------------------------

RFC_USER = "user"
RFC_PASSWORD = "pencil"
RFC_CLIENT_NONCE = "rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC_CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_FIRST = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
RFC_CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
# The vector's password as PostgreSQL would store it in pg_authid.rolpassword.
RFC_VERIFIER_TEXT = (
    "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ=="
    "$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU="
)


def test_rfc7677_client():
    client = ScramClient(RFC_USER, RFC_PASSWORD, nonce=RFC_CLIENT_NONCE)
    assert client.client_first() == RFC_CLIENT_FIRST
    assert client.client_final(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
    client.verify_server_final(RFC_SERVER_FINAL)


def test_rfc7677_server():
    verifier = make_verifier(RFC_PASSWORD, salt=RFC_SALT, iterations=4096)
    assert verifier.to_text() == RFC_VERIFIER_TEXT
    server = ScramServer(verifier, nonce=RFC_SERVER_NONCE)
    assert server.server_first(RFC_CLIENT_FIRST) == RFC_SERVER_FIRST
    assert not server.authenticated
    assert server.server_final(RFC_CLIENT_FINAL) == RFC_SERVER_FINAL
    assert server.authenticated


def test_rfc7677_server_from_parsed_verifier():
    server = ScramServer(parse_verifier(RFC_VERIFIER_TEXT), nonce=RFC_SERVER_NONCE)
    server.server_first(RFC_CLIENT_FIRST)
    assert server.server_final(RFC_CLIENT_FINAL) == RFC_SERVER_FINAL


# --- verifiers produced by PostgreSQL ------------------------------------------------------------

# pg_authid.rolpassword of roles made by PostgreSQL 16 with password_encryption = scram-sha-256 and
# CREATE ROLE ... PASSWORD '<password>'. They pin PostgreSQL's SASLprep rule, including where it
# departs from RFC 4013: ASCII kept as is ("a\x07b"), raw bytes when preparation fails ("\u0627 1",
# U+1F600, U+1E9E unassigned in Unicode 3.2) or leaves nothing ("\xad"), prohibited/bidi checks
# before normalization ("a\u2135", "\u05d0\u2122\u05d0"), current Unicode NFKC (U+2F868).
# ScramClient logged in to that server with each password, and libpq logged in to a ScramServer.
POSTGRES_16_VERIFIERS = [
    ("pencil", "SCRAM-SHA-256$4096:ehpNRvai09iyefuw2wniNQ==$3q4RJKkTtKBK4GiCPRgrNVnrc2XgJGgFUlWuGerJlys=:0KXQqDPsLm28L/6NPpSevFePbzzLZkviuATHnP6nAAM="),
    ("I\xadX", "SCRAM-SHA-256$4096:bjV1SRLf3v6aZpNml66Z3A==$XBll/ht4ptlDhjl0B6sQXJYwaDJKGU8WCZI09zENBnU=:Qu6KdLUKlBlXEF9A7ln9olwmH28JMS71hYgqpM3rNh4="),
    ("\u2168", "SCRAM-SHA-256$4096:wSIw9NYIObB7LvlZ+TzWNA==$uTe4d5Qg2aT7Ugl5vRmGfNZzboM68LkJf4m6AUafiSo=:fWx2TjoQuQo8R2nn8erI3ki664tiCujDawrjxF1GlAg="),
    ("\xaa", "SCRAM-SHA-256$4096:wxQAUXILarWm46qSg7XbFA==$lVt3dWGORYHl8x65s/C7SKin/ex6DGV2SGWAboDOQ1A=:sUnvfwtFpyjOGME4PGwh4aRtIT78PsYxCmqN4rPws5I="),
    ("a\u2135", "SCRAM-SHA-256$4096:D9ktWvplVLpuq3hU+5vOfA==$RRHhIgHpMQczsFfj44ZaP+/iXlzFsurY4VukV4LbmZQ=:8pCrUwmRG6qcpm6L2aT0Bhr2NLTnbNaLuZxLJRfq2LI="),
    ("\u05d0\u2122\u05d0", "SCRAM-SHA-256$4096:+hrgj25IBMFNqPRyPn0cEA==$fKrWMBegFInIi7mFK14xyi7LABNi+YkUyROXK88lIvM=:s3IdAfgDRKztcvtBpeenmlMyE9dU7Vz2svzERAzd+w8="),
    ("\u06271", "SCRAM-SHA-256$4096:uEniVff9gt4n2kUj72szlA==$OISOc6XEHcbfmRRKpUSfZG4GYTYmjLaaySqJHoQU8jw=:enXVGnRK3SD8/IJnpbQdDkyvhmsQow/nzkRxqs3bVfc="),
    ("a\x07b", "SCRAM-SHA-256$4096:WiSL/DuvOOff9AYToLAq/A==$bfdIVC+f3mGyo+eHbSjtd2ao8jyRF064rQusamFYk1c=:07hc5o5GSGxMYKKH5qlIrcz86MaKi97cYa4MQsGAGmo="),
    ("\xad", "SCRAM-SHA-256$4096:fYpnoMhDRNjE+HoMV3A/nA==$pW/L54cdXFfpHAW5clF+Pyy6Njkt8fHRl0OYvDlz24U=:35Q1ZpyugeofVJHlIfm6wYxhjeYNEWpZqyxiR8OwHho="),
    ("p\xe4ssw\xf6rd", "SCRAM-SHA-256$4096:KrevhdV7QGpfFO39AgTYAQ==$Bz/iYUZnyoDVkdkiJBbhZcm4KrqYmVoSkUdiVGsMHzs=:Y1pQvn7JotWyy1f+G3Ut1OphvFaZUYBkJ2QcqPCte6E="),
    ("\U0002f868", "SCRAM-SHA-256$4096:4WeRjgHSXcB+J+EpKFo0eg==$dbDSgkGWMvq+tadk4nswJLgPeotZSffgeCJlQELIMb0=:FtO5ZgYO9cw55IJgirzVJDbWNlJkqoyekXmNF9VfvhM="),
    ("\U0001f600", "SCRAM-SHA-256$4096:04axtcLVZOxMVPyJaigmww==$XuLpKeD1h3wk00HmDKXCGwqZqoWwHtCaiIVD74sW5/Q=:fQGKJvWmJJg0zoy2i0E2kWqLaRxUjIRa1f7IKvbCGFc="),
    ("x\u1e9e", "SCRAM-SHA-256$4096:zKkcbEwkurr7ViUVKYBJIw==$LW/6j+0uQ06SUed1E8Vefh1TwcowSLbeqiPxR240pnU=:bbgWXhDnQdGsd7i1f7M3KC9aYI124xpepiEasXRmzOk="),
    ("\u2135", "SCRAM-SHA-256$4096:NmyjcijNAE1pTfksAIjIKg==$4Zbl96mZeVABUJyyjHYbjt868a15YxWySrefkanCcOw=:jXvxbHBn3o002qpggeE4Rd1GwELZHN+JG058jfYN05Y="),
    ("a\xa0b", "SCRAM-SHA-256$4096:IRp0Cj0bUHzCKGIDHZkymQ==$VZdeGdm9Unx0BRv5yuiHXa45mIVsfk5iGkVOg0xi6mE=:ZCGx0WiDRyI5hqUEVRxETJtt5+M+o8Hq4xuT2XHAHTw="),
    ("\u06271\u0628", "SCRAM-SHA-256$4096:90e5DYCliZ21ygriyELAHA==$JRR9qDsIw2fqOOiY1jG8P7hNAGSfEU9kw2e+D4MzQHQ=:fgKxQ4PzQMLRdqz7pL8evohQuD+k7F2Ya+B+qUNIfU0="),
    ("\u0627\u0628", "SCRAM-SHA-256$4096:twX3V5TNxUezFiudJU22Xg==$IjEjg+dP/ET8LlOFnInZqrJZnDB2jqQjvzYF71EjCQU=:GdZhSsNgyqTyRcg3K2RKGpcupJNjsWu2+pCZWcxV2bo="),
    ("\ufb01", "SCRAM-SHA-256$4096:Y0LjcaWBK1pvFyFtbMytCg==$2wzgs9uVGHGYFOBb4dhDRCGmr/TyKYj59wtIhgt16/k=:c1h8TqXZ3P1k5/UKG2ASPxPrr/wZ804/FRX7nxzWh+k="),
    ("A\u0301", "SCRAM-SHA-256$4096:fpcmoh0E07nCb4gCojeqJw==$oa+UPB6saZuMHvv1Fi3E2lAUi4v0dRPHUBObhkiJdz8=:h5npPbazOnDHjjdHhFXdknpnIbkf76k1tDMfu2PvYKM="),
    ("\u212b", "SCRAM-SHA-256$4096:Zx5NNw2iK3Thgpk8atPUTQ==$d39ZgFbUw+xYSLbGyYv2v5igRjk2zkS5Mw5xxQJyT4g=:SwLvKMWygl9ZlQ4QkfgI8PF3fTG8lPzmgAAdspKKjj4="),
]


@pytest.mark.parametrize(("password", "text"), POSTGRES_16_VERIFIERS)
def test_postgres_verifier_matches(password, text):
    verifier = parse_verifier(text)
    assert verifier.iterations == 4096
    assert verifier.to_text() == text
    assert make_verifier(password, salt=verifier.salt, iterations=verifier.iterations) == verifier


@pytest.mark.parametrize(("password", "text"), POSTGRES_16_VERIFIERS[:6])
def test_postgres_verifier_login(password, text):
    client = ScramClient("", password)
    server = ScramServer(parse_verifier(text))
    client.verify_server_final(server.server_final(client.client_final(server.server_first(client.client_first()))))
    assert server.authenticated


# --- round trips ----------------------------------------------------------------------------------


def exchange(client: ScramClient, server: ScramServer) -> None:
    client_first = client.client_first()
    server_first = server.server_first(client_first)
    client_final = client.client_final(server_first)
    server_final = server.server_final(client_final)
    client.verify_server_final(server_final)


passwords = st.one_of(st.text(), st.binary())


@given(user=st.text(), password=passwords, salt=st.binary(min_size=1, max_size=32))
@example(user="", password="", salt=b"s")
@example(user="a,b=c", password="p\xe4ssw\xf6rd \u2168 \U0001f600", salt=b"s")
def test_round_trip(user, password, salt):
    server = ScramServer(make_verifier(password, salt=salt, iterations=FAST_ITERATIONS))
    client = ScramClient(user, password)
    exchange(client, server)
    assert server.authenticated


@given(right=passwords, wrong=passwords)
@example(right="pencil", wrong="Pencil")
@example(right="", wrong=" ")
def test_wrong_password_fails(right, wrong):
    # HMAC zero-pads its key to the block size, so passwords that differ only by trailing
    # NUL bytes derive the same keys (b"" and b"\x00" alike). That is SCRAM's own property,
    # shared by PostgreSQL, whose passwords cannot contain NUL anyway.
    assume(normalize_password(right).rstrip(b"\0") != normalize_password(wrong).rstrip(b"\0"))
    server = ScramServer(make_verifier(right, iterations=FAST_ITERATIONS))
    client = ScramClient("", wrong)
    client_final = client.client_final(server.server_first(client.client_first()))
    with pytest.raises(ScramError, match="password authentication failed") as info:
        server.server_final(client_final)
    assert info.value.sqlstate == "28P01"
    assert not server.authenticated


def test_equivalent_passwords_authenticate():
    # SASLprep makes these the same password (RFC 4013 §3).
    server = ScramServer(make_verifier("IX", iterations=FAST_ITERATIONS))
    exchange(ScramClient("", "I\u00adX"), server)
    assert server.authenticated


def test_y_flag_is_accepted():
    # "y": the client supports channel binding but believes we do not (RFC 5802 §6), which is true.
    password, salt = "secret", b"salty"
    server = ScramServer(make_verifier(password, salt=salt, iterations=FAST_ITERATIONS), nonce="SERVER")
    server_first = server.server_first(b"y,,n=,r=CLIENT")
    assert server_first == b"r=CLIENTSERVER,s=" + base64.b64encode(salt) + b",i=2"
    final = independent_client_final(password, salt, FAST_ITERATIONS, "n=,r=CLIENT", server_first.decode(), "y,,")
    server.server_final(final.encode())
    assert server.authenticated


def test_extensions_and_any_user_name_are_accepted():
    password, salt = "secret", b"salty"
    server = ScramServer(make_verifier(password, salt=salt, iterations=FAST_ITERATIONS), nonce="S")
    bare = "n=somebody=2Celse,r=C,x=extension"
    server_first = server.server_first(("n,," + bare).encode()).decode()
    final = independent_client_final(password, salt, FAST_ITERATIONS, bare, server_first, "n,,", extension=",y=more")
    server.server_final(final.encode())
    assert server.authenticated


def independent_client_final(password, salt, iterations, first_bare, server_first, gs2_header, extension=""):
    """client-final-message computed straight from RFC 5802 §3, without ScramClient."""
    nonce = re.match(r"r=([^,]*)", server_first).group(1)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    without_proof = f"c={base64.b64encode(gs2_header.encode()).decode()},r={nonce}{extension}"
    auth_message = f"{first_bare},{server_first},{without_proof}".encode()
    signature = hmac.digest(hashlib.sha256(client_key).digest(), auth_message, "sha256")
    proof = bytes(a ^ b for a, b in zip(client_key, signature))
    return f"{without_proof},p={base64.b64encode(proof).decode()}"


def test_default_nonces_are_random_and_printable():
    nonces = {ScramClient("", "x")._nonce for _ in range(20)}
    assert len(nonces) == 20
    for nonce in nonces:
        assert re.fullmatch(r"[A-Za-z0-9+/]{24}", nonce)
    first = ScramServer(make_verifier("x", iterations=1)).server_first(b"n,,n=,r=abc")
    assert re.fullmatch(rb"r=abc[A-Za-z0-9+/]{24},s=[A-Za-z0-9+/=]+,i=1", first)


def test_from_password_caches_the_verifier():
    a = ScramServer.from_password("cached password")
    b = ScramServer.from_password("cached password")
    assert a._verifier is b._verifier
    assert a._verifier.iterations == DEFAULT_ITERATIONS
    assert ScramServer.from_password("another password")._verifier.salt != a._verifier.salt
    exchange(ScramClient("", "cached password"), b)
    assert b.authenticated


def test_from_password_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(scram, "VERIFIER_CACHE_SIZE", 3)
    monkeypatch.setattr(scram, "_VERIFIER_CACHE", {})
    monkeypatch.setattr(scram, "DEFAULT_ITERATIONS", 1)
    for i in range(10):
        ScramServer.from_password(f"password {i}")
    assert list(scram._VERIFIER_CACHE) == ["password 7", "password 8", "password 9"]


# --- tampering ------------------------------------------------------------------------------------


def started(password="pencil", server_nonce="SNONCE"):
    client = ScramClient("", password, nonce="CNONCE")
    server = ScramServer(make_verifier(password, salt=b"salt", iterations=FAST_ITERATIONS), nonce=server_nonce)
    server_first = server.server_first(client.client_first())
    return client, server, server_first


def test_tampered_proof_fails():
    client, server, server_first = started()
    final = client.client_final(server_first).decode()
    head, _, proof = final.rpartition(",p=")
    raw = bytearray(base64.b64decode(proof))
    raw[0] ^= 1
    with pytest.raises(ScramError, match="password authentication failed"):
        server.server_final(f"{head},p={base64.b64encode(bytes(raw)).decode()}".encode())
    assert not server.authenticated


def test_tampered_nonce_fails():
    client, server, server_first = started()
    final = client.client_final(server_first).replace(b"r=CNONCESNONCE", b"r=CNONCESNONCF")
    with pytest.raises(ScramError, match="nonce"):
        server.server_final(final)


def test_tampered_channel_binding_fails():
    client, server, server_first = started()
    final = client.client_final(server_first).replace(b"c=biws", b"c=eSws")  # "y,," instead of "n,,"
    with pytest.raises(ScramError, match="channel binding"):
        server.server_final(final)


def test_client_rejects_foreign_server_nonce():
    client = ScramClient("", "pencil", nonce="CNONCE")
    client.client_first()
    with pytest.raises(ScramError, match="nonce"):
        client.client_final(b"r=OTHERSNONCE,s=c2FsdA==,i=4096")


def test_client_rejects_server_nonce_without_server_part():
    client = ScramClient("", "pencil", nonce="CNONCE")
    client.client_first()
    with pytest.raises(ScramError, match="nonce"):
        client.client_final(b"r=CNONCE,s=c2FsdA==,i=4096")


@pytest.mark.parametrize(
    "server_first",
    [
        b"r=CNONCES,s=,i=4096",  # empty salt
        b"r=CNONCES,s=c2FsdA,i=4096",  # unpadded base64
        b"r=CNONCES,s=c2Fs*A==,i=4096",  # not base64
        b"r=CNONCES,s=c2FsdA==,i=0",
        b"r=CNONCES,s=c2FsdA==,i=-1",
        b"r=CNONCES,s=c2FsdA==,i=04096",
        b"r=CNONCES,s=c2FsdA==,i=4096.0",
        b"r=CNONCES,s=c2FsdA==,i=\xd9\xa4",  # ARABIC-INDIC DIGIT FOUR: int() would take it
        b"r=CNONCES,s=c2FsdA==,i=2147483648",
        b"r=CNONCES,s=c2FsdA==",
        b"s=c2FsdA==,r=CNONCES,i=4096",  # wrong order
        b"m=must,r=CNONCES,s=c2FsdA==,i=4096",  # mandatory extension
        b"r=CNONCES,s=c2FsdA==,i=4096,",
        b"",
    ],
)
def test_client_rejects_bad_server_first(server_first):
    client = ScramClient("", "pencil", nonce="CNONCE")
    client.client_first()
    with pytest.raises(ScramError):
        client.client_final(server_first)


def test_client_accepts_server_first_extensions():
    client = ScramClient("", "pencil", nonce="CNONCE")
    client.client_first()
    assert client.client_final(b"r=CNONCES,s=c2FsdA==,i=1,x=whatever").startswith(b"c=biws,r=CNONCES,p=")


def test_client_rejects_wrong_server_signature():
    client, server, server_first = started()
    server.server_final(client.client_final(server_first))
    with pytest.raises(ScramError, match="server signature"):
        client.verify_server_final(b"v=" + base64.b64encode(bytes(32)))


def test_client_reports_server_error():
    client, _, server_first = started()
    client.client_final(server_first)
    with pytest.raises(ScramError, match="invalid-proof"):
        client.verify_server_final(b"e=invalid-proof")


def test_server_signature_for_another_exchange_fails():
    client1, server1, first1 = started(server_nonce="ONE")
    client2, server2, first2 = started(server_nonce="TWO")
    final1 = server1.server_final(client1.client_final(first1))
    server2.server_final(client2.client_final(first2))
    with pytest.raises(ScramError, match="server signature"):
        client2.verify_server_final(final1)


# --- client-first / client-final checks on the server ---------------------------------------------


def test_channel_binding_request_is_rejected_clearly():
    server = ScramServer(make_verifier("x", iterations=1))
    with pytest.raises(ScramError, match="channel binding is not supported") as info:
        server.server_first(b"p=tls-server-end-point,,n=,r=abc")
    assert info.value.sqlstate == "0A000"


def test_authzid_is_rejected():
    server = ScramServer(make_verifier("x", iterations=1))
    with pytest.raises(ScramError, match="authorization identity") as info:
        server.server_first(b"n,a=admin,n=,r=abc")
    assert info.value.sqlstate == "0A000"


@pytest.mark.parametrize(
    "client_first",
    [
        b"",
        b"n",
        b"n,",
        b"n,,",
        b"x,,n=,r=abc",
        b"n,,r=abc",  # missing n=
        b"n,,n=",  # missing r=
        b"n,,n=,r=",  # empty nonce
        b"n,,n=,r=a,b",  # not an attribute
        b"n,,r=abc,n=",  # wrong order
        b"n,,m=ext,n=,r=abc",  # mandatory extension
        b"n,,n=,r=ab\x7f",  # nonce not printable
        b"n,,n=,r=\xff",  # not UTF-8
        b"n,,n=\xc3(,r=abc",
        b"n,x,n=,r=abc",
        b"n,,1=,r=abc",
    ],
)
def test_server_rejects_bad_client_first(client_first):
    server = ScramServer(make_verifier("x", iterations=1))
    with pytest.raises(ScramError):
        server.server_first(client_first)
    assert not server.authenticated


@pytest.mark.parametrize(
    "client_final",
    [
        b"",
        b"c=biws,r=CNONCESNONCE",  # no proof
        b"r=CNONCESNONCE,c=biws,p=" + base64.b64encode(bytes(32)),  # wrong order
        b"c=biws,p=" + base64.b64encode(bytes(32)),  # no nonce
        b"c=biws,r=CNONCESNONCE,p=" + base64.b64encode(bytes(31)),  # short proof
        b"c=biws,r=CNONCESNONCE,p=AAAA*AAA",
        b"c=biws,r=CNONCESNONCE,p=" + base64.b64encode(bytes(32)) + b",x=after",
        b"c=biws,r=CNONCESNONCE,p=" + base64.b64encode(bytes(32)) + b",p=" + base64.b64encode(bytes(32)),
        b"c=bi*s,r=CNONCESNONCE,p=" + base64.b64encode(bytes(32)),
        b"c=biws,r=CNONCESNONCE,p=\xff",
    ],
)
def test_server_rejects_bad_client_final(client_final):
    _, server, _ = started()
    with pytest.raises(ScramError):
        server.server_final(client_final)
    assert not server.authenticated


def test_calls_out_of_order_fail():
    client = ScramClient("", "x")
    with pytest.raises(ScramError, match="out of order"):
        client.client_final(b"r=a,s=c2FsdA==,i=1")
    server = ScramServer(make_verifier("x", iterations=1))
    with pytest.raises(ScramError, match="out of order"):
        server.server_final(b"c=biws,r=a,p=" + base64.b64encode(bytes(32)))
    client.client_first()
    with pytest.raises(ScramError, match="out of order"):
        client.client_first()


def test_a_failed_exchange_stays_failed():
    client, server, server_first = started()
    good_final = client.client_final(server_first)
    with pytest.raises(ScramError):
        server.server_final(b"garbage")
    with pytest.raises(ScramError, match="out of order"):
        server.server_final(good_final)
    assert not server.authenticated


def test_bad_constructor_arguments():
    with pytest.raises(ValueError):
        ScramClient("", "x", nonce="has,comma")
    with pytest.raises(ValueError):
        ScramServer(make_verifier("x", iterations=1), nonce="")
    with pytest.raises(ValueError):
        ScramClient("\ud800", "x")


# --- malformed input only ever raises ScramError ----------------------------------------------------


def mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """Apply (kind, position, byte) edits: 0 replaces, 1 inserts, 2 deletes."""
    out = bytearray(data)
    for kind, position, value in edits:
        i = position % (len(out) + 1)
        if kind == 0 and i < len(out):
            out[i] = value
        elif kind == 1:
            out.insert(i, value)
        elif kind == 2 and i < len(out):
            del out[i]
    return bytes(out)


edits = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 200), st.sampled_from(b",=abnrcpv0+/\xff\x00")), max_size=4)
garbage = st.one_of(st.binary(max_size=200), st.builds(lambda parts: b",".join(parts), st.lists(st.binary(max_size=12), max_size=6)))


def only_scram_error(call, message):
    try:
        call(message)
    except ScramError:
        pass


@settings(max_examples=300)
@given(message=garbage, changes=edits)
def test_server_first_only_raises_scram_error(message, changes):
    server = ScramServer(make_verifier("pencil", salt=b"salt", iterations=1))
    only_scram_error(server.server_first, mutate(message, changes))
    server = ScramServer(make_verifier("pencil", salt=b"salt", iterations=1))
    only_scram_error(server.server_first, mutate(b"n,,n=user,r=CNONCE", changes))


@settings(max_examples=300)
@given(message=garbage, changes=edits)
def test_server_final_only_raises_scram_error(message, changes):
    client, server, server_first = started()
    only_scram_error(server.server_final, mutate(message, changes))
    client, server, server_first = started()
    only_scram_error(server.server_final, mutate(client.client_final(server_first), changes))


@settings(max_examples=300)
@given(message=garbage, changes=edits)
def test_client_final_only_raises_scram_error(message, changes):
    client = ScramClient("", "pencil", nonce="CNONCE")
    client.client_first()
    only_scram_error(client.client_final, mutate(message, changes))
    client = ScramClient("", "pencil", nonce="CNONCE")
    client.client_first()
    only_scram_error(client.client_final, mutate(b"r=CNONCESNONCE,s=c2FsdA==,i=2", changes))


@settings(max_examples=300)
@given(message=garbage, changes=edits)
def test_verify_server_final_only_raises_scram_error(message, changes):
    client, server, server_first = started()
    server_final = server.server_final(client.client_final(server_first))
    only_scram_error(client.verify_server_final, mutate(message, changes))
    client, server, server_first = started()
    server.server_final(client.client_final(server_first))
    only_scram_error(client.verify_server_final, mutate(server_final, changes))


# --- SASLprep (RFC 4013) -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "prepared"),
    [
        ("I\u00adX", "IX"),  # RFC 4013 §3: SOFT HYPHEN mapped to nothing
        ("user", "user"),  # no transformation
        ("USER", "USER"),  # case preserved, will not match #2
        ("\u00aa", "a"),  # output is NFKC, input in ISO 8859-1
        ("\u2168", "IX"),  # output is NFKC, will match #1
        ("a\u00a0b", "a b"),  # RFC 4013 §2.1: non-ASCII space mapped to SPACE
        ("\u0627\u0031\u0628", "\u0627\u0031\u0628"),  # RandALCat at both ends
        ("", ""),
    ],
)
def test_saslprep(text, prepared):
    assert saslprep(text) == prepared


@pytest.mark.parametrize(
    "text",
    [
        "\u0007",  # RFC 4013 §3: prohibited character
        "\u0627\u0031",  # RFC 4013 §3: bidi, RandALCat not last
        "\u0031\u0627",  # RandALCat not first
        "a\u0627a",  # RandALCat with LCat
        "\ue000",  # private use (C.3)
        "a\ud800",  # surrogate (C.5)
        "\u0221",  # unassigned in Unicode 3.2 (A.1)
        "\U000e0001",  # tagging character (C.9)
        "\u200e",  # LEFT-TO-RIGHT MARK (C.8)
    ],
)
def test_saslprep_rejects(text):
    with pytest.raises(ValueError):
        saslprep(text)


@pytest.mark.parametrize(
    ("password", "normalized"),
    [
        ("pencil", b"pencil"),
        ("I\u00adX", b"IX"),
        ("\u2168", b"IX"),
        ("\u0007", b"\x07"),  # SASLprep fails: raw bytes
        ("\u0627\u0031", "\u0627\u0031".encode()),  # bidi failure: raw bytes
        ("\u00ad", b"\xc2\xad"),  # PostgreSQL refuses an empty result: raw bytes
        (b"\xff\xfe", b"\xff\xfe"),  # not UTF-8: raw bytes
        (b"I\xc2\xadX", b"IX"),  # bytes that are UTF-8 are prepared
        ("", b""),
        # PostgreSQL checks bidi before normalizing: ALEF SYMBOL is left-to-right, its NFKC is not.
        ("a\u2135", b"a\xd7\x90"),
    ],
)
def test_normalize_password(password, normalized):
    assert normalize_password(password) == normalized


@given(st.text())
def test_normalize_password_never_fails(text):
    result = normalize_password(text)
    if text.isascii():
        assert result == text.encode()  # PostgreSQL leaves pure ASCII alone
    elif result != text.encode():
        assert unicodedata.is_normalized("NFKC", result.decode())


@given(st.binary())
def test_normalize_password_bytes_never_fails(data):
    assert isinstance(normalize_password(data), bytes)


# --- verifier text ---------------------------------------------------------------------------------


@given(password=passwords, salt=st.binary(min_size=1, max_size=40), iterations=st.integers(1, 3))
def test_verifier_text_round_trip(password, salt, iterations):
    verifier = make_verifier(password, salt=salt, iterations=iterations)
    text = verifier.to_text()
    assert re.fullmatch(r"SCRAM-SHA-256\$\d+:[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]{44}:[A-Za-z0-9+/=]{44}", text)
    assert parse_verifier(text) == verifier


def test_make_verifier_defaults():
    a, b = make_verifier("x"), make_verifier("x")
    assert a.iterations == DEFAULT_ITERATIONS == 4096
    assert len(a.salt) == 16
    assert a.salt != b.salt
    assert a.to_text().startswith(MECHANISM + "$4096:")


@pytest.mark.parametrize("iterations", [0, -1, 2**31, True, 1.5])
def test_make_verifier_rejects_bad_iterations(iterations):
    with pytest.raises(ValueError):
        make_verifier("x", salt=b"s", iterations=iterations)


def test_make_verifier_rejects_empty_salt():
    with pytest.raises(ValueError):
        make_verifier("x", salt=b"")


def test_verifier_repr_hides_keys():
    verifier = parse_verifier(RFC_VERIFIER_TEXT)
    assert "WG5d8" not in repr(verifier)
    assert base64.b64encode(verifier.stored_key).decode() not in repr(verifier)


def test_verifier_validates_fields():
    with pytest.raises(ValueError):
        ScramVerifier(4096, b"salt", b"short", bytes(32))
    with pytest.raises(ValueError):
        ScramVerifier(0, b"salt", bytes(32), bytes(32))


KEY = base64.b64encode(bytes(32)).decode()


@pytest.mark.parametrize(
    "text",
    [
        "",
        "md5a3556571e93b0d20722ba62be61e8c2d",
        f"SCRAM-SHA-1$4096:c2FsdA==${KEY}:{KEY}",
        f"SCRAM-SHA-256$4096:c2FsdA==${KEY}",
        f"SCRAM-SHA-256$4096c2FsdA==${KEY}:{KEY}",
        f"SCRAM-SHA-256$4096:c2FsdA==${KEY}:{KEY}$",
        f"SCRAM-SHA-256$0:c2FsdA==${KEY}:{KEY}",
        f"SCRAM-SHA-256$04096:c2FsdA==${KEY}:{KEY}",
        f"SCRAM-SHA-256$ 4096:c2FsdA==${KEY}:{KEY}",
        f"SCRAM-SHA-256$2147483648:c2FsdA==${KEY}:{KEY}",
        f"SCRAM-SHA-256$4096::{KEY}:{KEY}",
        f"SCRAM-SHA-256$4096:c2FsdA=${KEY}:{KEY}",
        f"SCRAM-SHA-256$4096:c2FsdA==$AAAA:{KEY}",
        f"SCRAM-SHA-256$4096:c2FsdA==${KEY}:{KEY}AAAA",
        f"SCRAM-SHA-256$4096:c2FsdA==${KEY}:{KEY}\n",
        f"SCRAM-SHA-256$4096:c2FsdA==${KEY}:{KEY[:-1]}*",
    ],
)
def test_parse_verifier_rejects(text):
    with pytest.raises(ValueError, match="SCRAM-SHA-256"):
        parse_verifier(text)


@given(st.text())
def test_parse_verifier_only_raises_value_error(text):
    try:
        parse_verifier(text)
    except ValueError:
        pass
