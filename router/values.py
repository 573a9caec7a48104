"""Column values of DataRows: decoding, Postgres ordering keys, and encoding of merged results.

A cross-shard merge compares and combines values the shards sent, in the format the client asked
for in Bind (0 text, 1 binary; "Formats and Format Codes" in the protocol chapter). For each type
this module knows:

    key_function(oid, fmt)    raw bytes -> a key that sorts and compares (==, hash) exactly as
                              Postgres orders and groups the type (btree/hash opclass semantics)
    decode(oid, fmt, raw)     raw bytes -> a Python value for arithmetic (int, Decimal, float, bool)
    encode(oid, fmt, value)   a computed value -> the bytes Postgres would send (its output or send
                              function: int8out/int8send, numeric_out/numeric_send, float8out...)

Types (pg_type.dat OIDs): int2/int4/int8, numeric, float4/float8, text/varchar/bpchar/name, bool,
date, timestamp, timestamptz, uuid. Orders, from the types' comparison functions:
- numeric by value, 1.0 = 1.00, -Infinity < finite < Infinity < NaN (numeric.c, cmp_numerics);
- float4/float8: -0 = 0, NaN = NaN and greater than everything, +Infinity included (float.c,
  float8_cmp_internal);
- text types by the bytes of their UTF-8 text (memcmp, then length): that is code-point order, the
  order of the C / POSIX collations only (collation_supported); bpchar ignores trailing spaces
  (bpcharcmp);
- bool false < true; date / timestamp / timestamptz by time with -infinity / infinity at the
  ends (timestamptz by instant: the text form carries its UTC offset); uuid by its 16 bytes.
Text-format dates and timestamps are read in DateStyle ISO (the default); another DateStyle
raises ValueError (the caller turns that into an error for the client).
"""

from __future__ import annotations

import math
import re
import struct
from decimal import Context, Decimal, localcontext
from typing import Any, Callable, Optional

__all__ = [
    "BINARY", "TEXT", "OIDS", "INT2", "INT4", "INT8", "NUMERIC", "FLOAT4", "FLOAT8", "TEXTOID", "VARCHAR",
    "BPCHAR", "NAME", "BOOL", "DATE", "TIMESTAMP", "TIMESTAMPTZ", "UUID", "INTEGERS", "FLOATS", "TEXTS",
    "NumericOverflow", "collation_supported", "decode", "encode", "float_text", "key_function",
    "numeric_parts", "numeric_from_parts", "to_float4", "type_name",
]

TEXT, BINARY = 0, 1

# Type OIDs (src/include/catalog/pg_type.dat).
BOOL, NAME, INT8, INT2, INT4, TEXTOID = 16, 19, 20, 21, 23, 25
FLOAT4, FLOAT8, BPCHAR, VARCHAR, DATE, TIMESTAMP, TIMESTAMPTZ, NUMERIC, UUID = (
    700, 701, 1042, 1043, 1082, 1114, 1184, 1700, 2950)

_NAMES = {
    BOOL: "boolean", NAME: "name", INT8: "bigint", INT2: "smallint", INT4: "integer", TEXTOID: "text",
    FLOAT4: "real", FLOAT8: "double precision", BPCHAR: "character", VARCHAR: "character varying",
    DATE: "date", TIMESTAMP: "timestamp without time zone", TIMESTAMPTZ: "timestamp with time zone",
    NUMERIC: "numeric", UUID: "uuid",
}
OIDS = frozenset(_NAMES)
INTEGERS = frozenset((INT2, INT4, INT8))
FLOATS = frozenset((FLOAT4, FLOAT8))
TEXTS = frozenset((TEXTOID, VARCHAR, BPCHAR, NAME))

# Collations whose order is the byte order of UTF-8 text, i.e. code-point order (the libc "C" and
# "POSIX" locales, with or without a UTF-8 encoding suffix, and the builtin/ICU-free spellings).
_BYTE_ORDER_COLLATIONS = frozenset(("c", "posix", "c.utf8", "c.utf-8", "ucs_basic", "pg_c_utf8"))


# Names of other common types, for messages only (the merge does not decode them).
_OTHER_NAMES = {17: "bytea", 26: "oid", 114: "json", 790: "money", 1083: "time without time zone",
                1186: "interval", 1266: "time with time zone", 3802: "jsonb", 869: "inet", 650: "cidr"}


def type_name(oid: int) -> str:
    return _NAMES.get(oid) or _OTHER_NAMES.get(oid) or f"OID {oid}"


def collation_supported(collate: str) -> bool:
    """Whether text ordered by this collation (datcollate, or a COLLATE clause) is in code-point
    order, the only text order the merge implements."""
    return collate.strip().strip('"').lower() in _BYTE_ORDER_COLLATIONS


class NumericOverflow(ValueError):
    """A merged value does not fit its result type (Postgres: SQLSTATE 22003)."""


# ------------------------------------------------------------------------------------------------
# numeric: values are Decimals whose exponent is minus the display scale (Decimal('1.50') has
# dscale 2), or Decimal NaN / Infinity / -Infinity.

_NBASE = 10000
# numeric's binary sign words (numeric.c: NUMERIC_POS, NUMERIC_NEG, NUMERIC_NAN, NUMERIC_PINF,
# NUMERIC_NINF).
_NUMERIC_POS, _NUMERIC_NEG, _NUMERIC_NAN, _NUMERIC_PINF, _NUMERIC_NINF = 0x0000, 0x4000, 0xC000, 0xD000, 0xF000
_NUM_HEAD = struct.Struct("!hhHH")
# What numeric_send sends as the dscale of +-Infinity: NUMERIC_DSCALE() of the special header
# (0xD000 / 0xF000 masked with NUMERIC_SHORT_DSCALE_MASK 0x1F80, shifted by 7).
_INF_DSCALE = 32
_NAN = Decimal("NaN")
_PINF = Decimal("Infinity")
_NINF = Decimal("-Infinity")


# numeric values have up to 147455 digits; Python limits int <-> str conversions to 4300 digits,
# so these functions go through Decimal's digit tuples and int(Decimal) / Decimal(int) instead.

def numeric_parts(d: Decimal) -> tuple[int, int]:
    """(unscaled integer, display scale) of a finite numeric value: 1.50 -> (150, 2)."""
    sign, digits, exp = d.as_tuple()
    u = int(Decimal((0, digits, 0)))
    if exp > 0:  # type: ignore[operator]
        u *= 10 ** exp  # type: ignore[operator]
        exp = 0
    return (-u if sign else u), -exp  # type: ignore[operator]


def numeric_from_parts(u: int, scale: int) -> Decimal:
    """The numeric value u * 10^-scale with display scale `scale` (never a negative zero)."""
    return Decimal((1 if u < 0 else 0, Decimal(abs(u)).as_tuple().digits, -scale))


def _digits_and_scale(d: Decimal) -> tuple[bool, str, int]:
    """(negative, decimal digits, scale) of a finite value: 1.50 -> (False, "150", 2)."""
    sign, digits, exp = d.as_tuple()
    text = "".join(map(str, digits))
    if exp > 0:  # type: ignore[operator]
        text += "0" * exp  # type: ignore[operator]
        exp = 0
    text = text.lstrip("0")
    return bool(sign) and text != "", text, -exp  # type: ignore[operator]


def _numeric_from_text(raw: bytes) -> Decimal:
    s = raw.decode("ascii")
    if s == "NaN":
        return _NAN
    return Decimal(s)  # "Infinity" / "-Infinity" are Decimal's spellings too


def _numeric_from_binary(raw: bytes) -> Decimal:
    ndigits, weight, sign, dscale = _NUM_HEAD.unpack_from(raw, 0)
    if sign == _NUMERIC_NAN:
        return _NAN
    if sign == _NUMERIC_PINF:
        return _PINF
    if sign == _NUMERIC_NINF:
        return _NINF
    groups = "".join(f"{g:04d}" for g in struct.unpack_from(f"!{ndigits}h", raw, 8))
    # The first group is worth NBASE^weight: 4 * (weight + 1) decimal digits before the point.
    point = 4 * (weight + 1)
    if point < 0:
        groups, point = "0" * -point + groups, 0
    groups = groups.ljust(point + dscale, "0")[:point + dscale]
    digits = tuple(map(int, groups)) or (0,)
    return Decimal((1 if sign == _NUMERIC_NEG else 0, digits, -dscale))


def _numeric_text(d: Decimal) -> bytes:
    if d.is_nan():
        return b"NaN"
    if d.is_infinite():
        return b"-Infinity" if d < 0 else b"Infinity"
    negative, text, scale = _digits_and_scale(d)
    text = text.rjust(scale + 1, "0")
    body = f"{text[:-scale]}.{text[-scale:]}" if scale else text
    return (("-" if negative else "") + body).encode()


def _numeric_binary(d: Decimal) -> bytes:
    """numeric_send: ndigits, weight, sign, dscale, base-10000 digits (leading and trailing zero
    digits stripped, as make_result stores them)."""
    if d.is_nan():
        return _NUM_HEAD.pack(0, 0, _NUMERIC_NAN, 0)
    if d.is_infinite():
        # numeric_send reads the special value's header as a short header: its dscale bits say 32.
        return _NUM_HEAD.pack(0, 0, _NUMERIC_NINF if d < 0 else _NUMERIC_PINF, _INF_DSCALE)
    negative, text, scale = _digits_and_scale(d)
    if not text:
        return _NUM_HEAD.pack(0, 0, _NUMERIC_POS, scale)
    whole, frac = (text[:-scale], text[-scale:].rjust(scale, "0")) if scale else (text, "")
    if len(text) < scale:
        whole = ""
    whole = whole.rjust(-(-len(whole) // 4) * 4, "0")
    frac = frac.ljust(-(-len(frac) // 4) * 4, "0")
    digits = [int(whole[i:i + 4]) for i in range(0, len(whole), 4)] + [int(frac[i:i + 4])
                                                                       for i in range(0, len(frac), 4)]
    weight = len(whole) // 4 - 1
    while digits and digits[0] == 0:
        digits.pop(0)
        weight -= 1
    while digits and digits[-1] == 0:
        digits.pop()
    sign = _NUMERIC_NEG if negative else _NUMERIC_POS
    return _NUM_HEAD.pack(len(digits), weight, sign, scale) + struct.pack(f"!{len(digits)}h", *digits)


def _numeric_key(d: Decimal) -> tuple:
    if d.is_nan():
        return (3,)
    if d.is_infinite():
        return (0,) if d < 0 else (2,)
    return (1, d)


# ------------------------------------------------------------------------------------------------
# float4 / float8 text output (float.c float8out/float4out; src/common/d2s.c and f2s.c): with
# extra_float_digits > 0 (the default, 1) the shortest decimal that reads back as the same value,
# in fixed notation when its decimal exponent is in [-4, 15) for float8 or [-4, 6) for float4, else
# as d.ddde+XX; with extra_float_digits <= 0, printf("%.*g", DBL_DIG/FLT_DIG + extra).

_DBL_DIG, _FLT_DIG = 15, 6
_F4 = struct.Struct("!f")
_F8 = struct.Struct("!d")
_U32 = struct.Struct("!I")
# Exact arithmetic on the decimal expansions of doubles (at most about 770 significant digits).
_EXACT = Context(prec=2000)
_FLT_MAX = 3.4028234663852886e38


def to_float4(x: float) -> float:
    """x rounded to the nearest float4 (as C's (float) cast); NumericOverflow when too large."""
    if math.isfinite(x) and abs(x) > _FLT_MAX:
        # Values just above FLT_MAX can still round down to it.
        try:
            return _F4.unpack(_F4.pack(x))[0]
        except OverflowError:
            raise NumericOverflow("value out of range: overflow") from None
    return _F4.unpack(_F4.pack(x))[0]


def _neighbours(x: float, single: bool) -> tuple[float, float]:
    """The next smaller and larger representable values of a positive finite x."""
    if single:
        (bits,) = _U32.unpack(_F4.pack(x))
        lo = _F4.unpack(_U32.pack(bits - 1))[0] if bits > 0 else 0.0
        hi = _F4.unpack(_U32.pack(bits + 1))[0]
    else:
        lo, hi = math.nextafter(x, 0.0), math.nextafter(x, math.inf)
    if math.isinf(hi):
        hi = x + (x - lo)
    return lo, hi


def _strictly_rounds_to(s: str, x: float, single: bool) -> bool:
    """Whether decimal s lies strictly inside x's rounding interval. Postgres's Ryu (d2s.c, f2s.c)
    does not accept the interval's bounds: a decimal exactly halfway to a neighbour is not used
    even when round-half-even would read it back as x."""
    lo, hi = _neighbours(x, single)
    with localcontext(_EXACT):
        d, dx = Decimal(s), Decimal(x)
        return (Decimal(lo) + dx) / 2 < d < (dx + Decimal(hi)) / 2


def _shortest_digits(x: float, single: bool) -> tuple[str, int]:
    """(digits without trailing zeros, decimal exponent of the first digit) of the shortest
    decimal strictly inside x's rounding interval (the correctly rounded one of that length)."""
    s = repr(x)  # shortest, but may sit on an interval bound
    if single or not _strictly_rounds_to(s, x, False):
        first = 1 if single else len(Decimal(s).as_tuple().digits) + 1
        for p in range(first, 18):
            s = f"{x:.{p - 1}e}"
            if _strictly_rounds_to(s, x, single):
                break
    sign, digits, exp = Decimal(s).as_tuple()
    ds = "".join(map(str, digits)).rstrip("0") or "0"
    exp10 = len(digits) - 1 + exp  # type: ignore[operator]
    return ds, exp10


def float_text(x: float, single: bool = False, extra_float_digits: int = 1) -> str:
    """float8out / float4out of x."""
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    if extra_float_digits <= 0:
        precision = max(1, (_FLT_DIG if single else _DBL_DIG) + extra_float_digits)
        return "%.*g" % (precision, x)
    neg = math.copysign(1.0, x) < 0
    if x == 0:
        return "-0" if neg else "0"
    ds, exp10 = _shortest_digits(abs(x), single)
    if -4 <= exp10 < (6 if single else 15):
        if exp10 >= len(ds) - 1:
            body = ds + "0" * (exp10 - len(ds) + 1)
        elif exp10 >= 0:
            body = f"{ds[:exp10 + 1]}.{ds[exp10 + 1:]}"
        else:
            body = "0." + "0" * (-exp10 - 1) + ds
    else:
        mant = ds[0] + ("." + ds[1:] if len(ds) > 1 else "")
        body = f"{mant}e{'-' if exp10 < 0 else '+'}{abs(exp10):02d}"
    return ("-" if neg else "") + body


def _float_key(x: float) -> tuple:
    # NaN equals NaN and sorts after +Infinity; -0.0 == 0.0 (and hashes alike) in Python already.
    return (1, 0.0) if x != x else (0, x)


def _float_from_text(raw: bytes) -> float:
    s = raw.decode("ascii")
    return float(s)  # float() reads NaN, Infinity, -Infinity as float8in does


# ------------------------------------------------------------------------------------------------
# Dates and timestamps: keys are days / microseconds since 2000-01-01 (the binary formats' epoch),
# with the binary formats' sentinels for -infinity and infinity (datatype/timestamp.h:
# DATEVAL_NOBEGIN/NOEND, DT_NOBEGIN/NOEND).

_DATE_NOBEGIN, _DATE_NOEND = -(1 << 31), (1 << 31) - 1
_DT_NOBEGIN, _DT_NOEND = -(1 << 63), (1 << 63) - 1
_USECS_PER_DAY = 86_400_000_000
_DATETIME_RE = re.compile(
    rb"(\d{4,})-(\d\d)-(\d\d)"
    rb"(?: (\d\d):(\d\d):(\d\d)(?:\.(\d{1,6}))?)?"
    rb"(?:([+-])(\d\d)(?::(\d\d)(?::(\d\d))?)?)?"
    rb"( BC)?")


def _days_from_civil(y: int, m: int, d: int) -> int:
    """Days from 1970-01-01 of a proleptic Gregorian date (astronomical year: 1 BC is 0)."""
    y -= m <= 2
    era = (y if y >= 0 else y - 399) // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


_PG_EPOCH_DAYS = _days_from_civil(2000, 1, 1)


def _parse_datetime(raw: bytes, with_time: bool) -> int:
    """Days (dates) or microseconds (timestamps, at UTC when an offset is given) since 2000-01-01
    of a DateStyle ISO text value."""
    low = raw.lower()
    if low == b"infinity":
        return _DT_NOEND if with_time else _DATE_NOEND
    if low == b"-infinity":
        return _DT_NOBEGIN if with_time else _DATE_NOBEGIN
    m = _DATETIME_RE.fullmatch(raw)
    if m is None:
        raise ValueError(f"cannot read {raw!r} as a DateStyle ISO date/time value")
    year = int(m[1])
    if m[12]:
        year = 1 - year
    days = _days_from_civil(year, int(m[2]), int(m[3])) - _PG_EPOCH_DAYS
    if not with_time:
        return days
    usec = days * _USECS_PER_DAY
    if m[4]:
        usec += ((int(m[4]) * 60 + int(m[5])) * 60 + int(m[6])) * 1_000_000
        if m[7]:
            usec += int(m[7].ljust(6, b"0"))
    if m[8]:
        offset = (int(m[9]) * 60 + int(m[10] or 0)) * 60 + int(m[11] or 0)
        usec -= (offset if m[8] == b"+" else -offset) * 1_000_000
    return usec


# ------------------------------------------------------------------------------------------------
# Per-type tables.

_I2, _I4, _I8 = struct.Struct("!h"), struct.Struct("!i"), struct.Struct("!q")
_INT_BIN = {INT2: _I2, INT4: _I4, INT8: _I8}
_INT8_MIN, _INT8_MAX = -(1 << 63), (1 << 63) - 1


def _int_from_text(raw: bytes) -> int:
    return int(raw)


def _bpchar_key(raw: bytes) -> bytes:
    return raw.rstrip(b" ")


def _bool_text(raw: bytes) -> bool:
    return raw == b"t"


def _bool_bin(raw: bytes) -> bool:
    return raw != b"\x00"


def _uuid_text(raw: bytes) -> bytes:
    return bytes.fromhex(raw.replace(b"-", b"").decode("ascii"))


def _identity(raw: bytes) -> bytes:
    return bytes(raw)


def _int_bin_fn(s: struct.Struct) -> Callable[[bytes], int]:
    unpack = s.unpack

    def f(raw: bytes) -> int:
        return unpack(raw)[0]

    return f


def _float_bin_fn(single: bool) -> Callable[[bytes], float]:
    unpack = (_F4 if single else _F8).unpack

    def f(raw: bytes) -> float:
        return unpack(raw)[0]

    return f


def _date_text(raw: bytes) -> int:
    return _parse_datetime(raw, False)


def _ts_text(raw: bytes) -> int:
    return _parse_datetime(raw, True)


_DECODERS: dict[tuple[int, int], Callable[[bytes], Any]] = {}
_KEYS: dict[tuple[int, int], Callable[[bytes], Any]] = {}
for _oid in INTEGERS:
    _DECODERS[_oid, TEXT] = _KEYS[_oid, TEXT] = _int_from_text
    _DECODERS[_oid, BINARY] = _KEYS[_oid, BINARY] = _int_bin_fn(_INT_BIN[_oid])
_DECODERS[NUMERIC, TEXT] = _numeric_from_text
_DECODERS[NUMERIC, BINARY] = _numeric_from_binary
_KEYS[NUMERIC, TEXT] = lambda raw: _numeric_key(_numeric_from_text(raw))
_KEYS[NUMERIC, BINARY] = lambda raw: _numeric_key(_numeric_from_binary(raw))
for _oid, _single in ((FLOAT4, True), (FLOAT8, False)):
    _DECODERS[_oid, TEXT] = _float_from_text
    _DECODERS[_oid, BINARY] = _float_bin_fn(_single)
_KEYS[FLOAT4, TEXT] = _KEYS[FLOAT8, TEXT] = lambda raw: _float_key(_float_from_text(raw))
_KEYS[FLOAT4, BINARY] = (lambda f: lambda raw: _float_key(f(raw)))(_float_bin_fn(True))
_KEYS[FLOAT8, BINARY] = (lambda f: lambda raw: _float_key(f(raw)))(_float_bin_fn(False))
for _oid in TEXTS:
    for _fmt in (TEXT, BINARY):
        _DECODERS[_oid, _fmt] = _identity
        _KEYS[_oid, _fmt] = _bpchar_key if _oid == BPCHAR else _identity
_DECODERS[BOOL, TEXT] = _KEYS[BOOL, TEXT] = _bool_text
_DECODERS[BOOL, BINARY] = _KEYS[BOOL, BINARY] = _bool_bin
_DECODERS[DATE, TEXT] = _KEYS[DATE, TEXT] = _date_text
_DECODERS[DATE, BINARY] = _KEYS[DATE, BINARY] = _int_bin_fn(_I4)
for _oid in (TIMESTAMP, TIMESTAMPTZ):
    _DECODERS[_oid, TEXT] = _KEYS[_oid, TEXT] = _ts_text
    _DECODERS[_oid, BINARY] = _KEYS[_oid, BINARY] = _int_bin_fn(_I8)
_DECODERS[UUID, TEXT] = _KEYS[UUID, TEXT] = _uuid_text
_DECODERS[UUID, BINARY] = _KEYS[UUID, BINARY] = _identity


def key_function(oid: int, fmt: int) -> Optional[Callable[[bytes], Any]]:
    """raw bytes -> ordering/equality key for a non-NULL value; None for an unsupported type."""
    return _KEYS.get((oid, 1 if fmt else 0))


def decode(oid: int, fmt: int, raw: bytes) -> Any:
    """The Python value of a non-NULL value: int, Decimal, float, bool, bytes (text and uuid),
    int days / microseconds since 2000-01-01 (dates, timestamps). KeyError for an unsupported type."""
    return _DECODERS[oid, 1 if fmt else 0](raw)


def encode(oid: int, fmt: int, value: Any, extra_float_digits: int = 1) -> bytes:
    """The bytes Postgres sends for a computed value of type oid (int8, numeric, float4, float8,
    bool); NumericOverflow when it does not fit the type."""
    binary = bool(fmt)
    if oid in INTEGERS:
        lo, hi = {INT2: (-(1 << 15), (1 << 15) - 1), INT4: (-(1 << 31), (1 << 31) - 1)}.get(oid, (_INT8_MIN, _INT8_MAX))
        if not lo <= value <= hi:
            raise NumericOverflow(f"{type_name(oid)} out of range")
        return _INT_BIN[oid].pack(value) if binary else str(value).encode()
    if oid == NUMERIC:
        return _numeric_binary(value) if binary else _numeric_text(value)
    if oid in FLOATS:
        single = oid == FLOAT4
        if binary:
            return (_F4 if single else _F8).pack(value)
        return float_text(value, single, extra_float_digits).encode()
    if oid == BOOL:
        if binary:
            return b"\x01" if value else b"\x00"
        return b"t" if value else b"f"
    raise KeyError(oid)
