"""Unit tests of COPY FROM STDIN splitting (router/copysplit.py).

Rows are generated (hypothesis), encoded by a reference encoder written here from the COPY
documentation (text, CSV, binary), fed in random chunks, and each shard's output must be exactly
the bytes of the rows whose key -- computed from the Python value with KeyFunction, not from the
encoded text -- maps there, in order, whatever the chunk boundaries.
"""

from __future__ import annotations

import random
import struct
import uuid
from collections import defaultdict
from typing import Any, Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgherd.config.model import Config
from pgherd.router import copysplit
from pgherd.router.copysplit import (
    BINARY_SIGNATURE, CopyOptions, CopySplitError, CopySplitter, copy_plan, parse_copy_options, unescape_text,
)
from pgherd.router.parse import parse_statements
from pgherd.router.plan import ShardingPlan
from pgherd.router.sharding import KeyFunction, shard_bigint

N = 3
# Tabs, newlines, CRs, backslashes, quotes, commas, the end-marker's period, non-ASCII (no NUL:
# Postgres text cannot hold it).
ALPHABET = "ab\t\n\r\\\"',.;|xN 0é日😀\u0301\x0b\x7f"
TEXT = st.text(alphabet=ALPHABET, max_size=12)
INT8 = st.integers(-(1 << 63), (1 << 63) - 1)
EOLS = (b"\n", b"\r\n", b"\r")


# ---------------------------------------------------------------------------------------------
# Reference encoders


def text_field(value: Optional[str], delim: str, rnd: random.Random, null: str = "\\N") -> bytes:
    """A value in COPY text format, with escapes chosen at random where several spellings work."""
    if value is None:
        return null.encode()
    out = []
    for ch in value:
        b = ch.encode()
        if ch == "\\":
            out.append(b"\\\\")
        elif ch == "\n":
            out.append(rnd.choice((b"\\n", b"\\012", b"\\x0a", b"\\\n")))
        elif ch == "\r":
            out.append(rnd.choice((b"\\r", b"\\015", b"\\x0D", b"\\\r")))
        elif ch == delim:
            out.append(rnd.choice((b"\\" + b, b"\\%03o" % ord(ch), b"\\x%02x" % ord(ch))))
        elif rnd.random() < 0.15:
            # Any byte may be written octal or hex; a letter without meaning as itself after a backslash.
            enc = rnd.choice(("oct", "hex", "lit"))
            if enc == "lit" and ch.isascii() and ch not in "bfnrtvx01234567.N":
                out.append(b"\\" + b)
            else:
                out.append(b"".join((b"\\%03o" % c) if enc == "oct" else (b"\\x%02x" % c) for c in b))
        else:
            out.append(b)
    return b"".join(out)


def csv_field(value: Optional[str], delim: str, quote: str, escape: str, rnd: random.Random) -> bytes:
    """A value in CSV (NULL as an unquoted empty field; quoted when it must be, or by chance)."""
    if value is None:
        return b""
    # A line holding only \. would be the end-of-copy marker: such a value must be quoted.
    must = value in ("", "\\.") or any(c in value for c in (delim, quote, "\n", "\r"))
    if not must and rnd.random() < 0.8:
        return value.encode()
    body = value.replace(escape, escape + escape) if escape != quote else value
    body = body.replace(quote, escape + quote)
    return (quote + body + quote).encode()


def binary_field(value: Any, kind: str) -> bytes:
    if value is None:
        return struct.pack("!i", -1)
    if kind == "bigint":
        size = 8 if not -(1 << 31) <= value < (1 << 31) else random.choice((4, 8))
        raw = value.to_bytes(size, "big", signed=True)
    elif kind == "uuid":
        raw = value.bytes
    else:
        raw = value.encode()
    return struct.pack("!i", len(raw)) + raw


def key_text(value: Any) -> Optional[str]:
    return None if value is None else str(value)


def expected_mask(fn: KeyFunction, value: Any) -> int:
    if value is None:
        return fn.insert_mask(None)  # type: ignore[return-value]
    if fn.data_type == "bigint":
        return fn.insert_mask(value)  # type: ignore[return-value]
    if fn.data_type == "uuid":
        return fn.insert_mask(value.bytes)  # type: ignore[return-value]
    return fn.insert_mask(value.encode())  # type: ignore[return-value]


def run(splitter: CopySplitter, data: bytes, cuts: list[int], max_row: int = 0) -> dict[int, bytes]:
    out: dict[int, bytearray] = defaultdict(bytearray)
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for a, b in zip(points, points[1:]):
        for s, chunk in splitter.feed(data[a:b]).items():
            assert chunk, "feed returned an empty batch"
            out[s] += chunk
        if max_row:
            # Only the incomplete last row stays buffered (plus the end marker's look-ahead).
            assert len(splitter._buf) <= max_row + 3
    for s, chunk in splitter.finish().items():
        out[s] += chunk
    return {s: bytes(b) for s, b in out.items() if b}


KEYS = {
    "bigint": st.one_of(INT8, st.integers(-1000, 1000)),
    "varchar": TEXT,
    "uuid": st.builds(uuid.UUID, int=st.integers(0, (1 << 128) - 1)),
}


@st.composite
def tables(draw: Any, kinds: tuple[str, ...] = ("bigint", "varchar", "uuid")) -> dict:
    kind = draw(st.sampled_from(kinds))
    ncols = draw(st.integers(1, 4))
    key_index = draw(st.integers(0, ncols - 1))
    nrows = draw(st.integers(0, 25))
    rows = []
    for _ in range(nrows):
        row: list[Any] = [draw(st.one_of(st.none(), TEXT)) for _ in range(ncols)]
        row[key_index] = draw(st.one_of(st.none(), KEYS[kind])) if draw(st.integers(0, 9)) == 0 else draw(KEYS[kind])
        rows.append(row)
    return {"kind": kind, "ncols": ncols, "key_index": key_index, "rows": rows}


def check(options: CopyOptions, table: dict, encoded: list[bytes], prefix: bytes, data: bytes, cuts: list[int],
          broadcast: bool = False) -> None:
    fn = KeyFunction(table["kind"], N, broadcast_null=broadcast)
    want: dict[int, bytearray] = defaultdict(bytearray)
    if prefix:
        for s in range(N):
            want[s] += prefix
    for row, raw in zip(table["rows"], encoded):
        mask = expected_mask(fn, row[table["key_index"]])
        for s in range(N):
            if mask >> s & 1:
                want[s] += raw
    longest = max((len(r) for r in encoded), default=0) + len(prefix)
    splitter = CopySplitter(options, table["key_index"], fn, N, key_column="k", table="t")
    whole = run(splitter, data, [])
    chunked = run(CopySplitter(options, table["key_index"], fn, N, key_column="k", table="t"), data, cuts, longest)
    assert whole == chunked
    # (A last line left empty by dropping its line end is no row, for Postgres either.)
    rows = len(encoded) - (1 if encoded and not encoded[-1] else 0)
    assert splitter.rows == rows and splitter.done == data.endswith(b"the marker")
    assert whole == {s: bytes(b) for s, b in want.items() if b}


# ---------------------------------------------------------------------------------------------
# Property tests


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(table=tables(), eol=st.sampled_from(EOLS), delim=st.sampled_from(("\t", ",", "|", ";")),
       header=st.booleans(), marker=st.booleans(), rnd=st.randoms(use_true_random=False),
       cuts=st.lists(st.integers(0, 10_000), max_size=30))
def test_text_rows_go_to_their_shards(table: dict, eol: bytes, delim: str, header: bool, marker: bool,
                                      rnd: random.Random, cuts: list[int]) -> None:
    options = CopyOptions(format="text", delimiter=delim.encode(), header="true" if header else "false")
    d = delim.encode()
    encoded = []
    for row in table["rows"]:
        fields = [text_field(key_text(v) if i == table["key_index"] else v, delim, rnd) for i, v in enumerate(row)]
        encoded.append(d.join(fields) + eol)
    if encoded and not marker and rnd.random() < 0.5:
        encoded[-1] = encoded[-1][: -len(eol)]  # the last line may end at the end of the data
    prefix = d.join(b"col%d" % i for i in range(table["ncols"])) + eol if header else b""
    data = prefix + b"".join(encoded)
    if marker:
        data += b"\\." + eol + b"anything\tafter\nthe marker"
    check(options, table, encoded, prefix, data, cuts)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(table=tables(), eol=st.sampled_from(EOLS), delim=st.sampled_from((",", "\t", ";", "|")),
       quoting=st.sampled_from((('"', '"'), ('"', "\\"), ("'", "'"), ("'", "|"))), header=st.booleans(),
       marker=st.booleans(), rnd=st.randoms(use_true_random=False), cuts=st.lists(st.integers(0, 10_000), max_size=30))
def test_csv_rows_go_to_their_shards(table: dict, eol: bytes, delim: str, quoting: tuple[str, str], header: bool,
                                     marker: bool, rnd: random.Random, cuts: list[int]) -> None:
    quote, escape = quoting
    if escape == delim:
        escape = quote
    options = CopyOptions(format="csv", delimiter=delim.encode(), null=b"", quote=quote.encode(),
                          escape=escape.encode(), header="true" if header else "false")
    d = delim.encode()
    encoded = []
    for row in table["rows"]:
        fields = [csv_field(key_text(v) if i == table["key_index"] else v, delim, quote, escape, rnd)
                  for i, v in enumerate(row)]
        encoded.append(d.join(fields) + eol)
    if encoded and not marker and rnd.random() < 0.5:
        encoded[-1] = encoded[-1][: -len(eol)]
    prefix = d.join(b"col%d" % i for i in range(table["ncols"])) + eol if header else b""
    data = prefix + b"".join(encoded)
    if marker:
        data += b"\\." + eol + b'"unterminated, ignored, the marker'
    check(options, table, encoded, prefix, data, cuts)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(table=tables(), extension=st.binary(max_size=8), trailer=st.booleans(),
       cuts=st.lists(st.integers(0, 10_000), max_size=30))
def test_binary_rows_go_to_their_shards(table: dict, extension: bytes, trailer: bool, cuts: list[int]) -> None:
    options = CopyOptions(format="binary")
    kind = table["kind"]
    encoded = []
    for row in table["rows"]:
        fields = [binary_field(v, kind) if i == table["key_index"] else binary_field(v, "text")
                  for i, v in enumerate(row)]
        encoded.append(struct.pack("!h", len(row)) + b"".join(fields))
    header = BINARY_SIGNATURE + struct.pack("!ii", 0, len(extension)) + extension
    data = header + b"".join(encoded) + (b"\xff\xff" if trailer else b"")
    fn = KeyFunction(kind, N)
    got = run(CopySplitter(options, table["key_index"], fn, N), data, cuts)
    assert got == run(CopySplitter(options, table["key_index"], fn, N), data, [])
    for s in range(N):
        rows = b"".join(raw for row, raw in zip(table["rows"], encoded)
                        if expected_mask(fn, row[table["key_index"]]) >> s & 1)
        assert got[s] == header + rows + b"\xff\xff"


@settings(max_examples=100, deadline=None)
@given(value=st.text(alphabet=ALPHABET, max_size=20), rnd=st.randoms(use_true_random=False))
def test_unescape_text_inverts_the_encoder(value: str, rnd: random.Random) -> None:
    raw = text_field(value, "\t", rnd)
    assert unescape_text(raw)[0] == value.encode()


def test_broadcast_null_rows_go_everywhere_and_count_once() -> None:
    fn = KeyFunction("bigint", N, broadcast_null=True)
    sp = CopySplitter(CopyOptions(), 0, fn, N)
    out = sp.feed(b"\\N\ta\n1\tb\n")
    assert all(out[s].startswith(b"\\N\ta\n") for s in range(N))
    assert sp.rows == 2 and sp.duplicates == N - 1


def test_null_key_goes_to_shard_zero_with_hashing() -> None:
    sp = CopySplitter(CopyOptions.of("csv"), 1, KeyFunction("bigint", N), N)
    assert sp.feed(b"a,\nb,\n") == {0: b"a,\nb,\n"}


# ---------------------------------------------------------------------------------------------
# Options of the key column


def test_force_not_null_and_force_null_on_the_key() -> None:
    fn = KeyFunction("varchar", N)
    # FORCE_NOT_NULL: an unquoted empty key is the empty string, not NULL.
    sp = CopySplitter(CopyOptions.of("csv", force_not_null=frozenset({"k"})), 0, fn, N,
                      key_column="k")
    assert sp.feed(b",x\n") == {fn.insert_mask(b"").bit_length() - 1: b",x\n"}  # type: ignore[union-attr]
    # FORCE_NULL: a quoted key equal to the NULL string is NULL.
    sp = CopySplitter(CopyOptions.of("csv", null=b"N", force_null=True), 0, KeyFunction("varchar", N,
                      lists=[(["zz"], 1)]), N, key_column="k")
    with pytest.raises(CopySplitError) as e:
        sp.feed(b'"N",x\n')
    assert e.value.code == "23514" and "(k) = (null)" in (e.value.detail or "")


def test_text_null_is_compared_before_de_escaping() -> None:
    fn = KeyFunction("varchar", N)
    sp = CopySplitter(CopyOptions(null=b"NULL"), 0, fn, N, key_column="k")
    shard_of = lambda v: fn.insert_mask(v).bit_length() - 1  # type: ignore[union-attr]  # noqa: E731
    out = sp.feed(b"NULL\t1\n\\NULL\t2\n")
    assert out.get(0, b"").startswith(b"NULL\t1\n")  # NULL -> shard 0
    assert b"\\NULL\t2\n" in out[shard_of(b"NULL")]


def test_default_marker_on_the_key_is_refused() -> None:
    sp = CopySplitter(CopyOptions(default=b"D"), 0, KeyFunction("bigint", N), N, key_column="id", table="t")
    with pytest.raises(CopySplitError) as e:
        sp.feed(b"D\tx\n")
    assert e.value.code == "0A000"


def test_on_error_ignore_sends_invalid_keys_to_the_lowest_shard() -> None:
    sp = CopySplitter(CopyOptions(on_error="ignore"), 0, KeyFunction("bigint", N), N)
    assert sp.feed(b"abc\tx\n") == {0: b"abc\tx\n"}


# ---------------------------------------------------------------------------------------------
# Errors


def feed_all(options: CopyOptions, data: bytes, fn: Optional[KeyFunction] = None, key_index: int = 0) -> dict:
    sp = CopySplitter(options, key_index, fn or KeyFunction("bigint", N), N, key_column="id", table="t")
    out = sp.feed(data)
    out.update(sp.finish())
    return out


@pytest.mark.parametrize("options, data, code, message", [
    (CopyOptions(), b"abc\tx\n", "22P02", 'invalid input syntax for type bigint: "abc"'),
    (CopyOptions(), b"1\tx\r\n2\tx\n", "22P04", "literal newline found in data"),
    (CopyOptions(), b"1\tx\n2\tx\r", "22P04", "literal carriage return found in data"),
    (CopyOptions(), b"1\tx\r\n2\tx\r3\n", "22P04", "literal carriage return found in data"),
    (CopyOptions(), b"1\tx\n\\.x\n", "22P04", "end-of-copy marker corrupt"),
    (CopyOptions(), b"1\tx\n\\.", "22P04", "end-of-copy marker corrupt"),
    (CopyOptions(), b"1\tx\n\\.\r", "22P04", "end-of-copy marker does not match previous newline style"),
    (CopyOptions(), b"1\tx\r\n\\.\n", "22P04", "end-of-copy marker does not match previous newline style"),
    (CopyOptions.of("csv"), b'1,x\r\n2,x\n', "22P04", "unquoted newline found in data"),
    (CopyOptions.of("csv"), b'"1,x\n', "22P04", "unterminated CSV quoted field"),
    (CopyOptions.of("csv"), b'"1"x"\n', "22P04", "unterminated CSV quoted field"),
    (CopyOptions.of("csv"), b'1,x\n\\.\r\n', "22P04", "end-of-copy marker does not match previous newline style"),
    (CopyOptions(), b"99999999999999999999\tx\n", "22003", "out of range for type bigint"),
])
def test_bad_text_and_csv_data(options: CopyOptions, data: bytes, code: str, message: str) -> None:
    with pytest.raises(CopySplitError) as e:
        feed_all(options, data)
    assert e.value.code == code and message in e.value.message, (e.value.code, e.value.message)


def test_missing_key_field() -> None:
    for options, data in ((CopyOptions(), b"x\t1\n2\n"), (CopyOptions(), b"1\\\tx\n"),
                          (CopyOptions.of("csv"), b'x,1\n"2\n,"\n')):
        with pytest.raises(CopySplitError, match='missing data for column "id"'):
            feed_all(options, data, key_index=1)


def test_errors_name_the_line() -> None:
    with pytest.raises(CopySplitError) as e:
        feed_all(CopyOptions(header="true"), b"id\tv\n1\tx\nx\ty\n")
    assert e.value.detail == "COPY t, line 3"


def test_csv_end_marker_only_alone_on_a_line() -> None:
    fn = KeyFunction("varchar", N)
    out = feed_all(CopyOptions.of("csv"), b"\\.x,1\n\\.\nlost,2\n", fn)
    assert b"".join(out.values()) == b"\\.x,1\n"


def test_text_end_marker_after_data_ends_the_copy_with_that_row() -> None:
    # copyfromparse.c: the data before \. on its line is the last row.
    out = feed_all(CopyOptions(), b"1\tx\n2\ty\\.\n3\tz\n")
    rows = sorted(b"".join(out.values()).split(b"\n"))
    assert rows == [b"1\tx", b"2\ty"]


def test_unknown_keys_of_a_mapping_and_utf8() -> None:
    fn = KeyFunction("bigint", N, lists=[([1, 2], 1)])
    with pytest.raises(CopySplitError) as e:
        feed_all(CopyOptions(), b"1\tx\n3\tx\n", fn)
    assert e.value.code == "23514" and e.value.message == 'no partition of relation "t" found for row'
    with pytest.raises(CopySplitError) as e:
        feed_all(CopyOptions(), b"\\377\tx\n", KeyFunction("varchar", N))
    assert e.value.code == "22021"
    with pytest.raises(CopySplitError) as e:
        feed_all(CopyOptions(), b"a\\0b\tx\n", KeyFunction("varchar", N))
    assert e.value.code == "22021"


@pytest.mark.parametrize("data, message", [
    (b"", "COPY file signature not recognized"),
    (b"PGCOPY\n\xff\r\n\x01" + bytes(8), "COPY file signature not recognized"),
    (BINARY_SIGNATURE + struct.pack("!ii", 1 << 16, 0), "invalid COPY file header (WITH OIDS)"),
    (BINARY_SIGNATURE + struct.pack("!ii", 1 << 17, 0), "unrecognized critical flags in COPY file header"),
    (BINARY_SIGNATURE + struct.pack("!ii", 0, -1), "invalid COPY file header (missing length)"),
    (BINARY_SIGNATURE + struct.pack("!ii", 0, 4) + b"ab", "invalid COPY file header (wrong length)"),
    (BINARY_SIGNATURE + bytes(8) + struct.pack("!hi", 1, 8) + b"\x00", "unexpected EOF in COPY data"),
    (BINARY_SIGNATURE + bytes(8) + struct.pack("!hi", 1, -2), "invalid field size"),
    (BINARY_SIGNATURE + bytes(8) + struct.pack("!h", 0), "row field count is 0"),
    (BINARY_SIGNATURE + bytes(8) + b"\xff\xff\x00", "received copy data after EOF marker"),
    (BINARY_SIGNATURE + bytes(8) + struct.pack("!hi", 1, 3) + b"abc", "incorrect binary data format"),
])
def test_bad_binary_data(data: bytes, message: str) -> None:
    with pytest.raises(CopySplitError) as e:
        feed_all(CopyOptions(format="binary"), data)
    assert message in e.value.message, e.value.message


def test_binary_field_count_checked_when_columns_are_listed() -> None:
    sp = CopySplitter(CopyOptions(format="binary"), 0, KeyFunction("bigint", N), N, fields=2)
    with pytest.raises(CopySplitError, match="row field count is 1, expected 2"):
        sp.feed(BINARY_SIGNATURE + bytes(8) + struct.pack("!hiq", 1, 8, 5))


def test_binary_data_after_the_trailer_in_a_later_payload() -> None:
    sp = CopySplitter(CopyOptions(format="binary"), 0, KeyFunction("bigint", N), N)
    sp.feed(BINARY_SIGNATURE + bytes(8) + b"\xff\xff")
    with pytest.raises(CopySplitError, match="after EOF marker"):
        sp.feed(b"x")


def test_rows_longer_than_the_limit_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(copysplit, "MAX_ROW_BYTES", 100)
    sp = CopySplitter(CopyOptions(), 0, KeyFunction("bigint", N), N)
    sp.feed(b"1\t" + b"x" * 90)
    with pytest.raises(CopySplitError) as e:
        sp.feed(b"x" * 20)
    assert e.value.code == "54000"


def test_omnisharded_streams_go_everywhere_unchanged() -> None:
    sp = CopySplitter(CopyOptions(), 0, None, N, omnisharded=True)
    assert sp.feed(b"1\tpartial") == {s: b"1\tpartial" for s in range(N)}
    assert sp.finish() == {}


def test_long_row_arriving_byte_by_byte_is_scanned_once() -> None:
    """Scanning resumes where it stopped: a 200 kB row fed in 1-byte chunks stays linear."""
    sp = CopySplitter(CopyOptions.of("csv"), 0, KeyFunction("bigint", N), N)
    row = b'7,"' + b"a\n" * 100_000 + b'"\n'
    got = bytearray()
    for i in range(len(row)):
        for chunk in sp.feed(row[i:i + 1]).values():
            got += chunk
    assert bytes(got) == row and sp._buf == bytearray()


# ---------------------------------------------------------------------------------------------
# copy_plan


def plan(columns: Any = None) -> ShardingPlan:
    doc = {
        "databases": [{"name": "prod", "host": "127.0.0.1", "shard": i} for i in range(N)],
        "sharded_tables": [
            {"database": "prod", "name": "users", "column": "id"},
            {"database": "prod", "name": "emails", "column": "email", "data_type": "varchar"},
            {"database": "prod", "column": "tenant_id"},
        ],
        "omnisharded_tables": [{"database": "prod", "tables": ["countries"]}],
        "sharded_schemas": [{"database": "prod", "name": "s1", "shard": 1}],
    }
    return ShardingPlan.from_config(Config.model_validate(doc), "prod", columns=columns)


def test_copy_plan_reads_columns_and_options() -> None:
    cp = copy_plan("COPY users (name, id) FROM STDIN WITH (FORMAT csv, HEADER match, DELIMITER ';', "
                   "FORCE_NULL (id), QUOTE '''', ESCAPE '\\')", plan())
    assert cp is not None and not cp.omnisharded
    assert cp.columns == ("name", "id") and cp.key_index == 1 and cp.key_column == "id"
    o = cp.options
    assert (o.format, o.header, o.delimiter, o.quote, o.escape, o.null) == ("csv", "match", b";", b"'", b"\\", b"")
    assert o.force_null == frozenset({"id"})
    sp = cp.splitter()
    assert sp.shards == N and sp._force_null
    # The old syntax.
    cp = copy_plan("COPY users (id) FROM STDIN CSV HEADER FORCE NOT NULL id", plan())
    assert cp is not None and cp.options.header == "true" and cp.options.force_not_null == frozenset({"id"})
    cp = copy_plan("copy users (id, name) from stdin binary", plan())
    assert cp is not None and cp.options.format == "binary" and cp.splitter().fields == 2


def test_copy_plan_without_column_list_uses_known_columns() -> None:
    cp = copy_plan("COPY users FROM STDIN", plan({"users": ["name", "id"]}))
    assert cp is not None and cp.key_index == 1 and not cp.explicit_columns and cp.splitter().fields is None
    with pytest.raises(CopySplitError, match="needs a column list"):
        copy_plan("COPY users FROM STDIN", plan())


def test_copy_plan_column_based_rule_and_unknown_tables() -> None:
    cp = copy_plan("COPY orders (tenant_id, total) FROM STDIN", plan())
    assert cp is not None and cp.key_column == "tenant_id" and cp.key_index == 0
    with pytest.raises(CopySplitError, match="cannot tell whether table orders is sharded"):
        copy_plan("COPY orders (total) FROM STDIN", plan())


@pytest.mark.parametrize("sql, message", [
    ("COPY users (name) FROM STDIN", "gives no value for its sharding key id"),
    ("COPY users (id) FROM '/tmp/data'", "server file or program"),
    ("COPY users (id) FROM PROGRAM 'cat'", "server file or program"),
    ("COPY users (id) FROM STDIN (ENCODING 'LATIN1')", "ENCODING"),
    ("COPY users (id) FROM STDIN (FORMAT xml)", 'COPY format "xml" not recognized'),
    ("COPY users (id) FROM STDIN (DELIMITER '||')", "single one-byte character"),
    ("COPY users (id) FROM STDIN (FORMAT csv, DELIMITER '\"')", "delimiter and quote must be different"),
    ("COPY users (id) FROM STDIN (QUOTE 'x')", "QUOTE requires CSV mode"),
    ("COPY users (id) FROM STDIN (FORMAT binary, HEADER)", "cannot specify HEADER in BINARY mode"),
    ("COPY users (id) FROM STDIN (DELIMITER 'a')", 'COPY delimiter cannot be "a"'),
    ("COPY users (id) FROM STDIN; SELECT 1", "query of its own"),
])
def test_copy_plan_refusals(sql: str, message: str) -> None:
    with pytest.raises(CopySplitError, match=message):
        copy_plan(sql, plan())


def test_copy_plan_none_when_nothing_to_split() -> None:
    p = plan()
    assert copy_plan("COPY users TO STDOUT", p) is None
    assert copy_plan("COPY (SELECT 1) TO STDOUT", p) is None
    assert copy_plan("COPY s1.anything (a) FROM STDIN", p) is None
    assert copy_plan("COPY pg_catalog.pg_class FROM STDIN", p) is None
    assert copy_plan("SELECT 1", p) is None
    cp = copy_plan("COPY countries FROM STDIN", p)
    assert cp is not None and cp.omnisharded and cp.splitter().omnisharded and cp.splitter().shards == N


def test_parse_copy_options_defaults() -> None:
    body = parse_statements("COPY t FROM STDIN")[0]["CopyStmt"]
    assert parse_copy_options(body.get("options", [])) == CopyOptions()
    body = parse_statements("COPY t FROM STDIN (FORMAT csv, HEADER false, ON_ERROR ignore)")[0]["CopyStmt"]
    o = parse_copy_options(body["options"])
    assert (o.delimiter, o.null, o.quote, o.escape, o.header, o.on_error) == (b",", b"", b'"', b'"', "false", "ignore")


def test_splitter_is_fast_enough_for_bulk_loads() -> None:
    """Not a timing test: checks that 20k plain rows go through the bulk path correctly."""
    fn = KeyFunction("bigint", N)
    data = b"".join(b"%d\tname %d\t\\N\n" % (i, i) for i in range(20_000))
    out = run(CopySplitter(CopyOptions(), 0, fn, N), data, list(range(0, len(data), 65536)))
    for s in range(N):
        assert out[s].count(b"\n") == sum(1 for i in range(20_000) if shard_bigint(i, N) == s)
