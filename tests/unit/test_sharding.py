"""Unit tests of router/sharding.py: PostgreSQL's hash functions, value parsing, list/range mappings.

Golden values below were computed by PostgreSQL 16 (hashint8extended, hashtextextended,
uuid_hash_extended with the given seeds); tests/integration/test_hash_oracle.py checks thousands
more against PARTITION BY HASH itself.
"""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgherd.router.sharding import (
    HASH_PARTITION_SEED,
    INVALID,
    KeyFunction,
    hash_combine64,
    hashint2extended,
    hashint4extended,
    hashint8extended,
    hashtextextended,
    parse_int8,
    parse_uuid,
    partition_hash,
    sha1_shard_bigint,
    shard_bigint,
    shard_text,
    shard_uuid,
    uuid_hash_extended,
)

SEED = HASH_PARTITION_SEED
M64 = (1 << 64) - 1
INT8 = st.integers(-(1 << 63), (1 << 63) - 1)


def u64(signed: int) -> int:
    """Postgres returns the extended hashes as signed int8."""
    return signed & M64


@pytest.mark.parametrize(
    "value, seed, expected",
    [
        (0, 0, 4154612158245552303),
        (5, 0, -9138765687874534020),
        (-1, SEED, -5017072347659237694),
        ((1 << 63) - 1, SEED, 4938542303000433043),
        (-(1 << 63), 42, -4216469540329842178),
    ],
)
def test_hashint8extended_golden(value, seed, expected):
    assert hashint8extended(value, seed) == u64(expected)


@pytest.mark.parametrize(
    "text, seed, expected",
    [
        ("", 0, -6939563903564495251),
        ("abc", 0, -6747756470228489321),
        ("abcdefghijkl", SEED, -7876791541613377658),  # exactly one 12-byte block
        ("héllo wörld, 日本", 7, 3644614048966343621),
        ("x", -1, 6068125099253810556),  # seed -1 as int8 = all ones
    ],
)
def test_hashtextextended_golden(text, seed, expected):
    assert hashtextextended(text, seed) == u64(expected)
    assert hashtextextended(text.encode(), seed) == u64(expected)


@pytest.mark.parametrize(
    "value, seed, expected",
    [
        ("00000000-0000-0000-0000-000000000000", 0, -6859010066814654381),
        ("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", SEED, 424513190990560493),
    ],
)
def test_uuid_hash_extended_golden(value, seed, expected):
    assert uuid_hash_extended(uuid.UUID(value).bytes, seed) == u64(expected)


def test_int2_int4_int8_hash_alike():
    assert hashint4extended(-7, 3) == hashint2extended(-7, 3) == hashint8extended(-7, 3) == u64(-3061289239652332668)


@given(st.integers(-(1 << 31), (1 << 31) - 1), st.integers(0, M64))
def test_int4_values_hash_the_same_as_int8(value, seed):
    assert hashint4extended(value, seed) == hashint8extended(value, seed)


@given(INT8, st.integers(0, M64))
def test_hashes_are_64_bit(value, seed):
    assert 0 <= hashint8extended(value, seed) <= M64


def test_hash_combine64_from_zero_is_partition_hash():
    for h in (0, 1, M64, 0x1234_5678_9ABC_DEF0):
        assert hash_combine64(0, h) == partition_hash(h)


@given(st.integers(0, M64), st.integers(0, M64))
def test_hash_combine64_stays_64_bit(a, b):
    assert 0 <= hash_combine64(a, b) <= M64


@given(INT8, st.integers(1, 64))
def test_shard_in_range_and_consistent(value, shards):
    s = shard_bigint(value, shards)
    assert 0 <= s < shards
    assert KeyFunction("bigint", shards).mask(value) == 1 << s


@given(st.text(), st.integers(1, 16))
def test_text_shard_hashes_utf8(value, shards):
    assert shard_text(value, shards) == shard_text(value.encode("utf-8"), shards)
    assert KeyFunction("varchar", shards).mask(value.encode()) == 1 << shard_text(value, shards)


def test_sha1_hasher_matches_pgdog():
    # PgDog's own regression vector: ids 0..19 over 12 shards.
    expected = [4, 7, 8, 3, 6, 0, 0, 10, 3, 11, 1, 7, 4, 4, 11, 2, 5, 0, 8, 3]
    assert [sha1_shard_bigint(i, 12) for i in range(20)] == expected
    fn = KeyFunction("bigint", 12, hasher="sha1")
    assert [fn.mask(i).bit_length() - 1 for i in range(20)] == expected


# -- parsing values like Postgres input functions ----------------------------------------------


@pytest.mark.parametrize(
    "text, value",
    [
        ("42", 42), (" 42 ", 42), ("+42", 42), ("-42", -42), ("0", 0), ("-0", 0), ("1_000", 1000),
        ("0x1F", 31), ("-0x1f", -31), ("0o17", 15), ("0b101", 5), ("0x_ff", 255),
        ("9223372036854775807", (1 << 63) - 1), ("-9223372036854775808", -(1 << 63)),
        ("\t7\n", 7),
    ],
)
def test_parse_int8_accepts_what_int8in_accepts(text, value):
    assert parse_int8(text) == value


@pytest.mark.parametrize(
    "text",
    ["", " ", "4 2", "1__0", "_1", "1_", "0x", "12a", "1.5", "9223372036854775808", "-9223372036854775809", "--1"],
)
def test_parse_int8_rejects(text):
    assert parse_int8(text) is INVALID


@given(INT8)
def test_parse_int8_roundtrip(value):
    assert parse_int8(str(value)) == value


@given(st.uuids())
def test_parse_uuid_forms(u):
    s = str(u)
    assert parse_uuid(s) == u.bytes
    assert parse_uuid(s.upper()) == u.bytes
    assert parse_uuid("{" + s + "}") == u.bytes
    assert parse_uuid(u.hex) == u.bytes
    # uuid_in allows a hyphen after any group of four hex digits
    h = u.hex
    assert parse_uuid("-".join(h[i : i + 4] for i in range(0, 32, 4))) == u.bytes


@pytest.mark.parametrize(
    "text",
    ["", "abc", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1", "a0ee-bc99-9c0b4ef8bb6d6bb9bd380a11-",
     "{a0eebc999c0b4ef8bb6d6bb9bd380a11", " a0eebc999c0b4ef8bb6d6bb9bd380a11", "a0e-ebc999c0b4ef8bb6d6bb9bd380a11"],
)
def test_parse_uuid_rejects(text):
    assert parse_uuid(text) is INVALID


# -- Bind parameters in text and binary formats --------------------------------------------------


@given(INT8)
def test_bigint_params_text_and_binary(value):
    fn = KeyFunction("bigint", 7)
    want = fn.mask(value)
    assert fn.mask(fn.param_value(str(value).encode(), False, 0)) == want
    assert fn.mask(fn.param_value(str(value).encode(), False, 20)) == want
    assert fn.mask(fn.param_value(value.to_bytes(8, "big", signed=True), True, 20)) == want
    assert fn.mask(fn.param_value(value.to_bytes(8, "big", signed=True), True, 0)) == want
    if -(1 << 31) <= value < 1 << 31:
        assert fn.mask(fn.param_value(value.to_bytes(4, "big", signed=True), True, 23)) == want
    if -(1 << 15) <= value < 1 << 15:
        assert fn.mask(fn.param_value(value.to_bytes(2, "big", signed=True), True, 21)) == want


@given(st.text())
def test_varchar_params_text_and_binary(value):
    fn = KeyFunction("varchar", 5)
    data = value.encode()
    want = 1 << shard_text(value, 5)
    for oid in (0, 25, 1043, 705):
        assert fn.mask(fn.param_value(data, False, oid)) == want
        assert fn.mask(fn.param_value(data, True, oid)) == want


@given(st.uuids())
def test_uuid_params_text_and_binary(u):
    fn = KeyFunction("uuid", 3)
    want = 1 << shard_uuid(u.bytes, 3)
    assert fn.mask(fn.param_value(str(u).encode(), False, 2950)) == want
    assert fn.mask(fn.param_value(str(u).encode(), False, 0)) == want
    assert fn.mask(fn.param_value(u.bytes, True, 2950)) == want
    assert fn.mask(fn.param_value(u.bytes, True, 0)) == want
    assert fn.mask(fn.param_value(str(u).encode(), True, 25)) == want


def test_null_and_invalid_params():
    fn = KeyFunction("bigint", 4)
    assert fn.mask(fn.param_value(None, False, 0)) == 0  # key = NULL matches nothing
    assert fn.mask(fn.param_value(b"abc", False, 0)) == 0b1111  # Postgres will reject it: anywhere
    assert fn.param_value(b"\x00\x01\x02", True, 20) is INVALID
    assert fn.insert_mask(INVALID) is None
    assert fn.insert_mask(None) == 1  # PARTITION BY HASH puts a NULL key in remainder 0
    assert KeyFunction("bigint", 4, broadcast_null=True).insert_mask(None) == 0b1111


def test_literal_values():
    big = KeyFunction("bigint", 4)
    assert big.int_value(5) == 5
    assert big.text_value("5") == 5
    assert big.numeric_value("9223372036854775807") == (1 << 63) - 1
    assert big.numeric_value("5.0") == 5
    assert big.numeric_value("5.5") is INVALID
    assert big.int_value(1 << 70) is INVALID
    text = KeyFunction("varchar", 4)
    assert text.int_value(5) == b"5"  # INSERT's assignment cast int -> text
    assert text.text_value("é") == "é".encode()


# -- list, range and default mappings -------------------------------------------------------------


def test_list_then_range_then_default():
    fn = KeyFunction(
        "bigint", 4,
        lists=[([1, 2, 3], 0), ([50], 3)],
        ranges=[(None, 10, 1), (10, 100, 2)],
        default=3,
    )
    assert fn.mask(1) == 1 << 0
    assert fn.mask(50) == 1 << 3  # the list wins over the range 10..100
    assert fn.mask(-5) == 1 << 1  # open start
    assert fn.mask(9) == 1 << 1
    assert fn.mask(10) == 1 << 2  # start inclusive
    assert fn.mask(99) == 1 << 2
    assert fn.mask(100) == 1 << 3  # end exclusive: default
    assert fn.insert_mask(1000) == 1 << 3


def test_no_match_without_default_is_all_shards():
    fn = KeyFunction("bigint", 3, lists=[([1], 0)], ranges=[(100, None, 2)])
    assert fn.mask(5) == 0b111
    assert fn.insert_mask(5) is None  # a new row cannot be placed
    assert fn.mask(100) == 1 << 2
    assert fn.insert_mask(None) is None


def test_text_and_uuid_mappings():
    fn = KeyFunction("varchar", 2, lists=[(["eu", "uk"], 0), (["us"], 1)])
    assert fn.mask(fn.text_value("uk")) == 1
    assert fn.mask(fn.text_value("us")) == 2
    u = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
    ufn = KeyFunction("uuid", 2, lists=[([u], 1)], default=0)
    assert ufn.mask(ufn.text_value(u.upper())) == 2
    assert ufn.mask(ufn.text_value(str(uuid.uuid4()))) == 1


def test_mapping_values_are_checked():
    with pytest.raises(ValueError, match="not a bigint"):
        KeyFunction("bigint", 2, lists=[(["abc"], 0)])
    with pytest.raises(ValueError, match="shard 5"):
        KeyFunction("bigint", 2, lists=[([1], 5)])
    with pytest.raises(ValueError, match="not a uuid"):
        KeyFunction("uuid", 2, lists=[([7], 0)])


@settings(max_examples=200)
@given(st.lists(st.integers(-1000, 1000), min_size=2, max_size=20, unique=True), st.integers(-2000, 2000))
def test_range_rules_first_match(bounds, value):
    bounds = sorted(set(bounds))
    ranges = [(bounds[i], bounds[i + 1], i % 3) for i in range(len(bounds) - 1)]
    fn = KeyFunction("bigint", 3, ranges=ranges)
    want = next((1 << s for lo, hi, s in ranges if lo <= value < hi), 0b111)
    assert fn.mask(value) == want
