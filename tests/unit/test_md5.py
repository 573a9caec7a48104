"""Unit tests for MD5 password authentication (shared/wire/md5.py)."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from pgherd.shared.wire.md5 import md5_hash, md5_response, md5_verify, random_salt
from pgherd.shared.wire.scram import make_verifier

SALT = b"\x01\x02\x03\x04"


def test_md5_hash_known_value():
    assert md5_hash("postgres", "postgres") == "md53175bce1d3201d16594cebf9d7eb3f9d"


def test_md5_hash_matches_postgres():
    # pg_authid.rolpassword from PostgreSQL 16: SET password_encryption = md5;
    # CREATE ROLE md5user PASSWORD 'sécret'. md5_response logged in to that server with both the
    # plaintext and this hash.
    assert md5_hash("md5user", "s\u00e9cret") == "md5e7dd4e6b47d66228064b7ae65b2e41fe"


def test_md5_response_known_value():
    inner = hashlib.md5(b"postgrespostgres").hexdigest()
    expected = b"md5" + hashlib.md5(inner.encode() + SALT).hexdigest().encode()
    assert md5_response("postgres", "postgres", SALT) == expected
    assert len(expected) == 35


def test_md5_response_accepts_the_stored_hash():
    stored = md5_hash("alice", "wonderland")
    assert md5_response("alice", stored, SALT) == md5_response("alice", "wonderland", SALT)


def test_only_lowercase_md5_shape_counts_as_a_hash():
    # PostgreSQL's get_password_type: "md5" + 32 characters of 0-9a-f.
    upper = "md5" + "A" * 32
    assert md5_response("u", upper, SALT) == md5_response("u", md5_hash("u", upper), SALT)
    short = "md5" + "a" * 31
    assert md5_response("u", short, SALT) == md5_response("u", md5_hash("u", short), SALT)


@pytest.mark.parametrize("stored", ["wonderland", md5_hash("alice", "wonderland")])
@pytest.mark.parametrize("sent", ["wonderland", md5_hash("alice", "wonderland")])
def test_verify_round_trip(stored, sent):
    salt = random_salt()
    assert md5_verify("alice", stored, salt, md5_response("alice", sent, salt))


@pytest.mark.parametrize("stored", ["wonderland", md5_hash("alice", "wonderland")])
def test_verify_rejects_wrong_password_user_or_salt(stored):
    assert not md5_verify("alice", stored, SALT, md5_response("alice", "Wonderland", SALT))
    assert not md5_verify("alice", stored, SALT, md5_response("bob", "wonderland", SALT))
    assert not md5_verify("alice", stored, SALT, md5_response("alice", "wonderland", b"\x01\x02\x03\x05"))
    assert not md5_verify("alice", stored, SALT, b"")
    assert not md5_verify("alice", stored, SALT, b"md5" + b"0" * 32)
    assert not md5_verify("alice", stored, SALT, b"\xff" * 35)


def test_verify_refuses_a_scram_verifier():
    stored = make_verifier("wonderland", iterations=1).to_text()
    assert not md5_verify("alice", stored, SALT, md5_response("alice", stored, SALT))


@pytest.mark.parametrize("salt", [b"", b"abc", b"abcde"])
def test_salt_must_be_four_bytes(salt):
    with pytest.raises(ValueError):
        md5_response("u", "p", salt)


def test_random_salt():
    salts = {random_salt() for _ in range(8)}
    assert all(len(salt) == 4 for salt in salts)
    assert len(salts) > 1


@given(user=st.text(), password=st.text(), salt=st.binary(min_size=4, max_size=4))
def test_verify_property(user, password, salt):
    assume(not (len(password) == 35 and password.startswith("md5")))
    response = md5_response(user, password, salt)
    assert md5_verify(user, password, salt, response)
    assert md5_verify(user, md5_hash(user, password), salt, response)
    assert not md5_verify(user, password + "x", salt, response)
