"""Sharding functions: a key value to its shard, bit-for-bit as PostgreSQL's PARTITION BY HASH.

Hash sharding places a value where a PostgreSQL table `PARTITION BY HASH (key)` with one partition
per shard (`FOR VALUES WITH (MODULUS n, REMAINDER shard)`) would put it, so data can be sharded by
pgherd and checked by Postgres with the same function:

- the type's *extended* hash support function is called with seed HASH_PARTITION_SEED
  (src/include/catalog/partition.h; src/backend/partitioning/partbounds.c,
  compute_partition_hash_value);
- the per-column hashes are folded with hash_combine64 starting from 0 (src/include/common/hashfn.h);
  a NULL key column is skipped, so an all-NULL key hashes to 0;
- the partition is rowHash % modulus, as unsigned 64-bit (partbounds.c, get_partition_for_tuple and
  satisfies_hash_partition).

The support functions (src/backend/utils/adt/int.c, int8.c, varlena.c, uuid.c):
- int2/int4: hash_uint32_extended((int32) value);
- int8: lo ^= (value >= 0 ? hi : ~hi), then hash_uint32_extended(lo); this makes every integer
  type hash alike for values that fit, which is why one `bigint` data_type serves all three;
- text/varchar with a deterministic collation (C, or any libc collation): hash_any_extended over the
  bytes in the server encoding (pgherd assumes UTF8);
- uuid: hash_any_extended over the 16 bytes.

hash_any_extended is Bob Jenkins' lookup3 hashlittle2 as adapted in src/common/hashfn.c
(hash_bytes_extended, hash_bytes_uint32_extended), reimplemented here from that description. The
results are for little-endian servers; PostgreSQL documents that hash partitioning is not portable
across byte orders.

PgDog's `hasher = "sha1"` (facts from its documentation and behaviour): SHA-1 of the key's bytes --
the decimal text of an integer, the UTF-8 bytes of text, the 16 raw bytes of a uuid -- of which the
last 4 bytes, read big-endian, modulo the shard count, give the shard.

List and range mappings ([[sharded_tables.mapping]], [[sharded_mappings]]) are tried list rules
first, then range rules (start inclusive, end exclusive, either open), then the default rule; a
value matching nothing goes to every shard.
"""

from __future__ import annotations

import hashlib
import re
import struct
from typing import Iterable, Optional

__all__ = [
    "HASH_PARTITION_SEED",
    "INVALID",
    "KeyFunction",
    "hash_bytes_extended",
    "hash_combine64",
    "hash_uint32_extended",
    "hashint2extended",
    "hashint4extended",
    "hashint8extended",
    "hashtextextended",
    "parse_int8",
    "parse_uuid",
    "partition_hash",
    "shard_bigint",
    "shard_text",
    "shard_uuid",
    "sha1_shard_bigint",
    "sha1_shard_bytes",
    "uuid_hash_extended",
]

M32 = 0xFFFFFFFF
M64 = 0xFFFFFFFFFFFFFFFF

# src/include/catalog/partition.h: "Seed for the hash function used for partitioning".
HASH_PARTITION_SEED = 0x7A5B22367996DCFD
# src/include/common/hashfn.h, hash_combine64: "0x49a0f4dd15e5a8e3 is 64bit random data".
_COMBINE64 = 0x49A0F4DD15E5A8E3
# src/common/hashfn.c: initial internal state is 0x9e3779b9 + length + 3923095.
_GOLDEN = 0x9E3779B9 + 3923095

INT8_MIN = -(1 << 63)
INT8_MAX = (1 << 63) - 1

# Type OIDs (src/include/catalog/pg_type.dat) a Bind parameter may be declared with.
OID_INT8, OID_INT2, OID_INT4 = 20, 21, 23
OID_TEXT, OID_NAME, OID_BPCHAR, OID_VARCHAR, OID_UNKNOWN = 25, 19, 1042, 1043, 705
OID_UUID = 2950
_INT_OIDS = frozenset((OID_INT8, OID_INT2, OID_INT4))
_TEXT_OIDS = frozenset((OID_TEXT, OID_NAME, OID_VARCHAR, OID_UNKNOWN))


# ---------------------------------------------------------------------------------------------
# lookup3, as in src/common/hashfn.c


def _mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    """hashfn.c mix(): reversibly mix three 32-bit values."""
    a = (a - c) & M32
    a ^= ((c << 4) | (c >> 28)) & M32
    c = (c + b) & M32
    b = (b - a) & M32
    b ^= ((a << 6) | (a >> 26)) & M32
    a = (a + c) & M32
    c = (c - b) & M32
    c ^= ((b << 8) | (b >> 24)) & M32
    b = (b + a) & M32
    a = (a - c) & M32
    a ^= ((c << 16) | (c >> 16)) & M32
    c = (c + b) & M32
    b = (b - a) & M32
    b ^= ((a << 19) | (a >> 13)) & M32
    a = (a + c) & M32
    c = (c - b) & M32
    c ^= ((b << 4) | (b >> 28)) & M32
    b = (b + a) & M32
    return a, b, c


def _final64(a: int, b: int, c: int) -> int:
    """hashfn.c final(), then the 64-bit result ((uint64) b << 32) | c."""
    c ^= b
    c = (c - (((b << 14) | (b >> 18)) & M32)) & M32
    a ^= c
    a = (a - (((c << 11) | (c >> 21)) & M32)) & M32
    b ^= a
    b = (b - (((a << 25) | (a >> 7)) & M32)) & M32
    c ^= b
    c = (c - (((b << 16) | (b >> 16)) & M32)) & M32
    a ^= c
    a = (a - (((c << 4) | (c >> 28)) & M32)) & M32
    b ^= a
    b = (b - (((a << 14) | (a >> 18)) & M32)) & M32
    c ^= b
    c = (c - (((b << 24) | (b >> 8)) & M32)) & M32
    return (b << 32) | c


def _seeded_state(length: int, seed: int) -> tuple[int, int, int]:
    """The internal state after the seed is folded in (hashfn.c: the seed acts as a 12-byte chunk)."""
    a = b = c = (_GOLDEN + length) & M32
    if seed:
        a = (a + (seed >> 32)) & M32
        b = (b + (seed & M32)) & M32
        a, b, c = _mix(a, b, c)
    return a, b, c


# Per-length start states for the partition seed: the seed mix is the same for every key of a
# given length, so it is computed once per length (keys are short; bounded to keep it small).
_STATE_CACHE_MAX_LENGTH = 256
_partition_states: dict[int, tuple[int, int, int]] = {}
_UINT32_PARTITION_STATE = _seeded_state(4, HASH_PARTITION_SEED)
_unpack3 = struct.Struct("<3I").unpack_from
_ZEROS = bytes(12)


def hash_bytes_extended(data: bytes, seed: int = 0) -> int:
    """hash_bytes_extended (= hash_any_extended): 64-bit lookup3 hash of data with a 64-bit seed."""
    n = len(data)
    if seed == HASH_PARTITION_SEED and n <= _STATE_CACHE_MAX_LENGTH:
        state = _partition_states.get(n)
        if state is None:
            state = _partition_states[n] = _seeded_state(n, seed)
        a, b, c = state
    else:
        a, b, c = _seeded_state(n, seed & M64)
    off = 0
    # hashfn.c: "handle most of the key" -- whole 12-byte blocks, little-endian words.
    while n - off >= 12:
        x, y, z = _unpack3(data, off)
        a, b, c = _mix((a + x) & M32, (b + y) & M32, (c + z) & M32)
        off += 12
    # "handle the last 11 bytes": zero-padded words; the lowest byte of c is reserved for the
    # length, so bytes 8..10 go in shifted left by 8. Done even when nothing is left (then final()
    # runs on the state as is, unlike the original lookup3).
    rest = n - off
    if rest:
        x, y, z = _unpack3(bytes(data[off:]) + _ZEROS[rest:], 0)
        a = (a + x) & M32
        b = (b + y) & M32
        c = (c + (z << 8)) & M32
    return _final64(a, b, c)


def hash_uint32_extended(k: int, seed: int = 0) -> int:
    """hash_bytes_uint32_extended: 64-bit lookup3 hash of one 32-bit value with a 64-bit seed."""
    if seed == HASH_PARTITION_SEED:
        a, b, c = _UINT32_PARTITION_STATE
    else:
        a, b, c = _seeded_state(4, seed & M64)
    return _final64((a + (k & M32)) & M32, b, c)


# ---------------------------------------------------------------------------------------------
# Type support functions and the partition hash


def hashint8extended(value: int, seed: int = 0) -> int:
    """int8.c hashint8extended: fold the high half into the low half, so int2/int4/int8 agree."""
    lo = value & M32
    hi = (value >> 32) & M32
    lo ^= hi if value >= 0 else (~hi & M32)
    return hash_uint32_extended(lo, seed)


def hashint4extended(value: int, seed: int = 0) -> int:
    """int.c hashint4extended: hash_uint32_extended((int32) value)."""
    return hash_uint32_extended(value & M32, seed)


def hashint2extended(value: int, seed: int = 0) -> int:
    """int.c hashint2extended: the int2 widened to int32, hashed as hashint4extended."""
    return hash_uint32_extended(value & M32, seed)


def hashtextextended(value: str | bytes, seed: int = 0) -> int:
    """varlena.c hashtextextended for a deterministic collation: hash_any_extended over the bytes."""
    if isinstance(value, str):
        value = value.encode("utf-8")
    return hash_bytes_extended(value, seed)


def uuid_hash_extended(value: bytes, seed: int = 0) -> int:
    """uuid.c uuid_hash_extended: hash_any_extended over the 16 bytes."""
    return hash_bytes_extended(value, seed)


def hash_combine64(a: int, b: int) -> int:
    """hashfn.h hash_combine64: a ^= b + 0x49a0f4dd15e5a8e3 + (a << 54) + (a >> 7)."""
    return (a ^ ((b + _COMBINE64 + (a << 54) + (a >> 7)) & M64)) & M64


def partition_hash(column_hash: int) -> int:
    """compute_partition_hash_value for a one-column key: hash_combine64(0, hash)."""
    return (column_hash + _COMBINE64) & M64


def shard_bigint(value: int, shards: int) -> int:
    """The REMAINDER of the hash partition (MODULUS shards) holding a bigint/integer/smallint key."""
    return partition_hash(hashint8extended(value, HASH_PARTITION_SEED)) % shards


def shard_text(value: str | bytes, shards: int) -> int:
    """The REMAINDER of the hash partition holding a text/varchar key (UTF-8, deterministic collation)."""
    return partition_hash(hashtextextended(value, HASH_PARTITION_SEED)) % shards


def shard_uuid(value: bytes, shards: int) -> int:
    """The REMAINDER of the hash partition holding a uuid key given as its 16 bytes."""
    return partition_hash(uuid_hash_extended(value, HASH_PARTITION_SEED)) % shards


def sha1_shard_bytes(data: bytes, shards: int) -> int:
    """PgDog's sha1 hasher: the last 4 bytes of SHA-1(data), big-endian, modulo shards."""
    return int.from_bytes(hashlib.sha1(data).digest()[-4:], "big") % shards


def sha1_shard_bigint(value: int, shards: int) -> int:
    """PgDog's sha1 hasher for integers: SHA-1 of the decimal text."""
    return sha1_shard_bytes(str(value).encode("ascii"), shards)


# ---------------------------------------------------------------------------------------------
# Parsing values as Postgres does on input


class _Invalid:
    """A value Postgres would reject (or that pgherd cannot evaluate) for the key's type."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "INVALID"


INVALID = _Invalid()

# int8in (src/backend/utils/adt/numutils.c, pg_strtoint64_safe): surrounding whitespace, a sign,
# then decimal, 0x/0o/0b (PostgreSQL 16) digits with single underscores between digits.
_INT_RE = re.compile(
    r"\s*([+-]?)(?:(0[xX](?:_?[0-9a-fA-F])+)|(0[oO](?:_?[0-7])+)|(0[bB](?:_?[01])+)|([0-9](?:_?[0-9])*))\s*\Z"
)


def parse_int8(text: str) -> int | _Invalid:
    """A bigint from its text form as int8in accepts it, or INVALID (also when out of range)."""
    if text.isdigit() and len(text) < 19:  # the common case, without the regex
        return int(text)
    m = _INT_RE.match(text)
    if m is None:
        return INVALID
    sign, hexa, octal, binary, decimal = m.groups()
    if decimal is not None:
        value = int(decimal.replace("_", ""), 10)
    else:
        digits = (hexa or octal or binary).replace("_", "")
        value = int(digits[2:], 16 if hexa else 8 if octal else 2)
    if sign == "-":
        value = -value
    return value if INT8_MIN <= value <= INT8_MAX else INVALID


_HEX = frozenset("0123456789abcdefABCDEF")


def parse_uuid(text: str) -> bytes | _Invalid:
    """The 16 bytes of a uuid as uuid_in accepts it (src/backend/utils/adt/uuid.c, string_to_uuid):
    32 hex digits, optionally in braces, with an optional hyphen after each group of four digits."""
    s = text
    braces = s.startswith("{")
    if braces:
        if not s.endswith("}"):
            return INVALID
        s = s[1:-1]
    out = []
    i, n = 0, len(s)
    for byte in range(16):
        if i + 2 > n or s[i] not in _HEX or s[i + 1] not in _HEX:
            return INVALID
        out.append(s[i : i + 2])
        i += 2
        if byte % 2 == 1 and byte < 15 and i < n and s[i] == "-":
            i += 1
    if i != n:
        return INVALID
    return bytes.fromhex("".join(out))


def _numeric_to_int(text: str) -> int | _Invalid:
    """An integral numeric literal (the parser gives integers beyond int4 as numeric) as an int."""
    value = parse_int8(text)
    if value is not INVALID:
        return value
    m = re.fullmatch(r"\s*([+-]?)(\d+)(?:\.(0*))?\s*", text)
    if m is None:
        return INVALID
    value = int(m.group(1) + m.group(2))
    return value if INT8_MIN <= value <= INT8_MAX else INVALID


# ---------------------------------------------------------------------------------------------
# A compiled sharding function for one [[sharded_tables]] entry


DATA_TYPES = ("bigint", "varchar", "uuid")


class KeyFunction:
    """Maps normalized key values of one data type to a shard bitmask (bit s = shard s).

    Normalized values: bigint -> int; varchar -> UTF-8 bytes; uuid -> 16 bytes. Build one per
    distinct ([[sharded_tables]] entry, shard count) when the config is loaded; it is read-only
    afterwards and safe to share.
    """

    __slots__ = (
        "data_type", "hasher", "shards", "all_mask", "lists", "ranges", "default_mask",
        "mapped", "opaque", "broadcast_null", "signature",
    )

    def __init__(
        self,
        data_type: str,
        shards: int,
        *,
        hasher: str = "postgres",
        lists: Iterable[tuple[Iterable[object], int]] = (),
        ranges: Iterable[tuple[object, object, int]] = (),
        default: Optional[int] = None,
        opaque: bool = False,
        broadcast_null: bool = False,
    ) -> None:
        if shards < 1:
            raise ValueError("a sharded database has at least one shard")
        self.data_type = data_type if data_type in DATA_TYPES else "bigint"
        self.hasher = hasher
        self.shards = shards
        self.all_mask = (1 << shards) - 1
        # opaque: a key pgherd cannot compute (vector centroids, lookup queries): every value -> all.
        self.opaque = opaque or data_type not in DATA_TYPES
        self.broadcast_null = broadcast_null
        self.lists: dict[object, int] = {}
        for values, shard in lists:
            for v in values:
                key = self.config_value(v)
                self.lists.setdefault(key, 1 << self._check_shard(shard))
        self.ranges: tuple[tuple[object, object, int], ...] = tuple(
            (
                None if start is None else self.config_value(start),
                None if end is None else self.config_value(end),
                1 << self._check_shard(shard),
            )
            for start, end, shard in ranges
        )
        self.default_mask = None if default is None else 1 << self._check_shard(default)
        self.mapped = bool(self.lists or self.ranges or default is not None)
        self.signature = (
            self.data_type, self.hasher, self.shards, self.opaque, tuple(sorted(self.lists.items(), key=repr)),
            self.ranges, self.default_mask,
        )

    def _check_shard(self, shard: int) -> int:
        if not 0 <= shard < self.shards:
            raise ValueError(f"mapping names shard {shard}, but the database has shards 0 to {self.shards - 1}")
        return shard

    def config_value(self, value: object) -> object:
        """A value from pgherd.toml (an integer or a string) normalized; ValueError if it is not one."""
        if isinstance(value, bool):
            raise ValueError(f"{value!r} is not a {self.data_type} value")
        if isinstance(value, int):
            if self.data_type == "bigint":
                return value
            if self.data_type == "varchar":
                return str(value).encode()
            raise ValueError(f"{value!r} is not a uuid")
        v = self.text_value(str(value))
        if v is INVALID:
            raise ValueError(f"{value!r} is not a {self.data_type} value")
        return v

    # -- normalizing values from SQL and from Bind ---------------------------------------------

    def text_value(self, text: str) -> object:
        """A value given as text (a string literal, a text-format parameter, a comment)."""
        dt = self.data_type
        if dt == "bigint":
            return parse_int8(text)
        if dt == "varchar":
            return text.encode("utf-8")
        return parse_uuid(text)

    def int_value(self, value: int) -> object:
        """An integer literal: a bigint key, or text (INSERT's assignment cast int -> text)."""
        dt = self.data_type
        if dt == "bigint":
            return value if INT8_MIN <= value <= INT8_MAX else INVALID
        if dt == "varchar":
            return str(value).encode()
        return INVALID

    def numeric_value(self, text: str) -> object:
        """A numeric literal (the parser's fval: decimals and integers beyond int4)."""
        if self.data_type == "bigint":
            return _numeric_to_int(text)
        return INVALID

    def param_value(self, raw: Optional[bytes], binary: bool, oid: int) -> object:
        """A Bind parameter value (None for NULL) in text or binary format with its declared type."""
        if raw is None:
            return None
        dt = self.data_type
        if not binary:
            try:
                text = bytes(raw).decode("utf-8")
            except UnicodeDecodeError:
                return INVALID
            if dt == "varchar":
                return bytes(raw)
            return self.text_value(text)
        # Binary formats: int2/int4/int8 send big-endian two's complement; text sends its bytes;
        # uuid sends its 16 bytes (int.c/int8.c *send, varlena.c textsend, uuid.c uuid_send).
        n = len(raw)
        if dt == "bigint":
            if oid in _INT_OIDS or oid == 0:
                if n in (2, 4, 8):
                    return int.from_bytes(raw, "big", signed=True)
                return INVALID
            return INVALID
        if dt == "varchar":
            if oid in _TEXT_OIDS or oid == 0 or oid == OID_BPCHAR:
                return bytes(raw)
            if oid in _INT_OIDS and n in (2, 4, 8):
                return str(int.from_bytes(raw, "big", signed=True)).encode()
            return INVALID
        if oid in (OID_UUID, 0) and n == 16:
            return bytes(raw)
        if oid in _TEXT_OIDS:
            return self.text_value(bytes(raw).decode("utf-8", "replace"))
        return INVALID

    # -- shards ---------------------------------------------------------------------------------

    def hash_shard(self, value: object) -> int:
        """The hash shard of a normalized value (no mappings)."""
        n = self.shards
        if self.hasher == "sha1":
            if self.data_type == "bigint":
                return sha1_shard_bigint(value, n)  # type: ignore[arg-type]
            return sha1_shard_bytes(value, n)  # type: ignore[arg-type]
        if self.data_type == "bigint":
            return partition_hash(hashint8extended(value, HASH_PARTITION_SEED)) % n  # type: ignore[arg-type]
        return partition_hash(hash_bytes_extended(value, HASH_PARTITION_SEED)) % n  # type: ignore[arg-type]

    def mask(self, value: object) -> int:
        """Shards that may hold rows whose key equals value (a WHERE key = value filter).

        NULL matches no row (0); an invalid value matches what Postgres decides, so all shards.
        """
        if value is None:
            return 0
        if value is INVALID or self.opaque:
            return self.all_mask
        if self.mapped:
            return self._mapped(value)
        return 1 << self.hash_shard(value)

    def insert_mask(self, value: object) -> Optional[int]:
        """The shard a new row with this key goes to; None if pgherd cannot place it.

        A NULL key: with broadcast_null every shard; with hashing shard 0, where PARTITION BY HASH
        puts it (the NULL column is skipped, rowHash stays 0); with a mapping its default rule.
        """
        if self.opaque or value is INVALID:
            return None
        if value is None:
            if self.broadcast_null:
                return self.all_mask
            if self.mapped:
                return self.default_mask
            return 1
        if self.mapped:
            m = self._mapped(value)
            return None if m == self.all_mask and self.shards > 1 and self.default_mask is None else m
        return 1 << self.hash_shard(value)

    def _mapped(self, value: object) -> int:
        hit = self.lists.get(value)
        if hit is not None:
            return hit
        for start, end, m in self.ranges:
            try:
                if (start is None or start <= value) and (end is None or value < end):  # type: ignore[operator]
                    return m
            except TypeError:
                continue
        if self.default_mask is not None:
            return self.default_mask
        return self.all_mask

    def __repr__(self) -> str:
        kind = "opaque" if self.opaque else "mapping" if self.mapped else self.hasher
        return f"KeyFunction({self.data_type}, {kind}, shards={self.shards})"
