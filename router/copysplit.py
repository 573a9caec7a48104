"""COPY FROM STDIN split by shard: each row of a text, CSV or binary COPY stream goes to its key's shard.

    cp = copy_plan(sql, plan)          # None: nothing to split (send the COPY as the Route says)
    splitter = cp.splitter()           # one per COPY; pure, no I/O
    per client CopyData:  for shard, data in splitter.feed(payload).items(): CopyData(data) -> shard
    at client CopyDone:   for shard, data in splitter.finish().items():     CopyData(data) -> shard
                          then CopyDone to every shard, and to the client COPY <the shards'
                          counts summed - splitter.duplicates> (= splitter.rows unless ON_ERROR
                          ignore skipped rows)
    on CopySplitError e:  CopyFail to every shard (so nothing is committed anywhere), then an
                          ErrorResponse e.code / e.message (e.detail) to the client

Every shard runs the client's COPY statement unchanged. What each shard receives:

- text and CSV: the rows whose key maps to it, byte for byte as the client sent them (line ends
  included); with HEADER the header line goes to every shard first (each shard skips it, and with
  HEADER MATCH each shard checks it). The end-of-copy marker `\\.` is not forwarded: after it,
  input is ignored up to CopyDone, as Postgres does; a line that ends at the end of the data
  without a newline is a row, as in Postgres.
- binary: the file header (signature, flags, header extension) first, then its tuples, then at
  finish() a trailer (int16 -1) -- every shard gets header and trailer, even one with no rows.
- omnisharded tables (CopyPlan.omnisharded): every shard gets the whole stream unchanged.

feed() returns only the shards that have something, each as one bytes object (rows batched per
shard); only the incomplete last row is kept between calls (at most MAX_ROW_BYTES). A row whose
key value is NULL follows KeyFunction.insert_mask like INSERT does (hash: shard 0; broadcast_null:
every shard; a mapping without default rule: error); such a row sent to several shards counts
once in `rows` and `duplicates` times more in the shards' own COPY counts.

Parsing follows src/backend/commands/copyfromparse.c (PostgreSQL 16): CopyReadLineText finds the
lines (the newline style of the first line -- \\n, \\r or \\r\\n -- is required of all; in text
format a backslash escapes the next byte, `\\.` ends the data; in CSV, quote characters toggle a
quoted section in which newlines are data, and `\\.` ends the data only alone on a line),
CopyReadAttributesText / CopyReadAttributesCSV split fields (the NULL string is compared with the
raw field; text fields are de-escaped: \\b \\f \\n \\r \\t \\v, octal \\ooo, hex \\xhh, any other
escaped byte as itself), NextCopyFrom applies FORCE_NOT_NULL / FORCE_NULL, and the binary format
is the one of the COPY documentation ("Binary Format"). The input is taken to be UTF-8 (pgherd's
sharding functions hash UTF-8 text): a COPY with an ENCODING option other than UTF8 is refused,
and the caller must refuse COPY when the client_encoding is not UTF8.

Errors (CopySplitError) use Postgres' SQLSTATEs and messages: 22P04 bad COPY data, 22P02 / 22003
/ 22P03 / 22021 an invalid key value, 23514 a key no shard accepts ("no partition of relation ... found
for row"), 54000 a row over MAX_ROW_BYTES, 0A000 what pgherd cannot split (a DEFAULT key...).
With ON_ERROR ignore (PostgreSQL 17), a row whose key is invalid goes to the lowest shard, whose
Postgres then skips it.
"""

from __future__ import annotations

import re
import struct
from typing import NamedTuple, Optional, Union

from .analyze import OMNI, SHARDED, UNKNOWN, Analyzer
from .parse import ParseError, parse_statements
from .plan import ShardingPlan
from .sharding import INVALID, KeyFunction

__all__ = ["CopyOptions", "CopyPlan", "CopySplitError", "CopySplitter", "MAX_ROW_BYTES", "copy_plan",
           "parse_copy_options"]

# Postgres reads a line into one StringInfo, whose limit is MaxAllocSize (1 GB - 1): a longer row
# fails there too, so buffering more than that for one incomplete row is never useful.
MAX_ROW_BYTES = (1 << 30) - 1
# Key values seen recently -> their shard mask, so rows of one tenant (a repeated key) are hashed
# once; a few thousand entries cover the keys of a batch and cost well under a megabyte.
KEY_MEMO_ENTRIES = 4096

# PGCOPY\n\377\r\n\0 (copy.c BinarySignature), then int32 flags and int32 header extension length.
BINARY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
_BINARY_FIXED = len(BINARY_SIGNATURE) + 8
BINARY_TRAILER = b"\xff\xff"
_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_FLAGS_WITH_OIDS = 1 << 16

_LF, _CR, _BS, _DOT = 10, 13, 92, 46
# The newline style of the data, fixed by its first line (copyfromparse.c EolType).
EOL_UNKNOWN, EOL_NL, EOL_CR, EOL_CRNL = range(4)
# _find_line results besides a line: need more data, end-of-copy marker, nothing left at EOF.
_NEED, _MARKER, _NONE, _NOT_END = "need", "marker", "none", "not_end"

# An integer as int8in reads it (decimal, 0x, 0o, 0b, underscores between digits): when such a key
# is invalid it is out of range (22003), not malformed (22P02).
_INTEGER = re.compile(r"\s*[+-]?(?:0[xX](?:_?[0-9a-fA-F])+|0[oO](?:_?[0-7])+|0[bB](?:_?[01])+|[0-9](?:_?[0-9])*)\s*")
_UTF8_NAMES = frozenset(("utf8", "utf-8", "unicode"))
_FORMATS = ("text", "csv", "binary")
# Text-format delimiters that would be read as escapes or data (copy.c ProcessCopyOptions).
_TEXT_BAD_DELIMITERS = b"\\.abcdefghijklmnopqrstuvwxyz0123456789"

BAD_COPY_FILE_FORMAT = "22P04"
INVALID_TEXT_REPRESENTATION = "22P02"
NUMERIC_VALUE_OUT_OF_RANGE = "22003"
INVALID_BINARY_REPRESENTATION = "22P03"
CHARACTER_NOT_IN_REPERTOIRE = "22021"
CHECK_VIOLATION = "23514"
PROGRAM_LIMIT_EXCEEDED = "54000"
FEATURE_NOT_SUPPORTED = "0A000"
INVALID_PARAMETER_VALUE = "22023"
SYNTAX_ERROR = "42601"


class CopySplitError(Exception):
    """The COPY cannot go on: fail it on every shard and answer the client with code / message."""

    def __init__(self, message: str, code: str = BAD_COPY_FILE_FORMAT, detail: Optional[str] = None) -> None:
        super().__init__(message)
        self.message, self.code, self.detail = message, code, detail


class CopyOptions(NamedTuple):
    """The options of COPY FROM that decide how its data is read (copy.c ProcessCopyOptions).

    Strings are UTF-8 bytes. force_not_null / force_null: column names, or True for `*`.
    header: "false", "true" or "match".
    """

    format: str = "text"
    delimiter: bytes = b"\t"
    null: bytes = b"\\N"
    default: Optional[bytes] = None
    header: str = "false"
    quote: bytes = b'"'
    escape: bytes = b'"'
    force_not_null: Union[frozenset, bool] = frozenset()
    force_null: Union[frozenset, bool] = frozenset()
    on_error: str = "stop"

    @classmethod
    def of(cls, format: str = "text", **options: object) -> "CopyOptions":
        """The options of a format with Postgres' defaults for it (CSV: comma, empty NULL)."""
        if format == "csv":
            options = {"delimiter": b",", "null": b"", **options}
        return cls(format=format, **options)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# The COPY statement


class CopyPlan(NamedTuple):
    """How to split one COPY FROM STDIN: its table, columns, options and sharding key."""

    table: str  # as written: schema.name or name
    columns: Optional[tuple[str, ...]]  # the COPY's columns in order (the column list, or the table's)
    options: CopyOptions
    omnisharded: bool  # every shard gets every row: no parsing at all
    shards: int  # the database's shard count
    key_column: Optional[str] = None
    key_index: Optional[int] = None  # position of the key among the COPY's columns
    fn: Optional[KeyFunction] = None
    explicit_columns: bool = False  # the statement has a column list (binary field counts are checked)

    def splitter(self) -> "CopySplitter":
        """A new CopySplitter for one run of this COPY."""
        return CopySplitter(
            self.options, self.key_index if self.key_index is not None else 0, self.fn, self.shards,
            omnisharded=self.omnisharded, key_column=self.key_column, table=self.table,
            fields=len(self.columns) if self.explicit_columns and self.columns else None,
        )


def _arg_text(arg: object) -> Optional[str]:
    """The value of a DefElem argument as text (String, Integer, Float, Boolean), or None."""
    if not isinstance(arg, dict) or len(arg) != 1:
        return None
    tag, body = next(iter(arg.items()))
    if tag == "String":
        return body.get("sval", "")
    if tag == "Integer":
        return str(body.get("ival", 0))
    if tag == "Float":
        return body.get("fval", "0")
    if tag == "Boolean":
        return "true" if body.get("boolval") else "false"
    return None


def _bool_option(name: str, arg: object) -> bool:
    if arg is None:
        return True
    text = (_arg_text(arg) or "").lower()
    if text in ("true", "on", "1", "yes"):
        return True
    if text in ("false", "off", "0", "no"):
        return False
    raise CopySplitError(f"{name} requires a Boolean value", SYNTAX_ERROR)


def _columns_option(arg: object) -> Union[frozenset, bool]:
    if isinstance(arg, dict) and "A_Star" in arg:
        return True
    items = arg.get("List", {}).get("items", []) if isinstance(arg, dict) else []
    return frozenset(i.get("String", {}).get("sval", "") for i in items)


def _one_byte(name: str, value: str) -> bytes:
    raw = value.encode("utf-8")
    if len(raw) != 1:
        raise CopySplitError(f"COPY {name} must be a single one-byte character", FEATURE_NOT_SUPPORTED)
    return raw


def parse_copy_options(options: list) -> CopyOptions:
    """CopyOptions from a CopyStmt's DefElem list (libpg_query JSON), with Postgres' defaults and
    the checks that matter for reading the data (copy.c ProcessCopyOptions)."""
    given: dict[str, object] = {}
    for item in options or []:
        d = item.get("DefElem", {})
        name = d.get("defname", "")
        if name in given:
            raise CopySplitError("conflicting or redundant options", SYNTAX_ERROR)
        given[name] = d.get("arg")
    fmt = (_arg_text(given["format"]) if "format" in given else "text") or "text"
    fmt = fmt.lower()
    if fmt not in _FORMATS:
        raise CopySplitError(f'COPY format "{fmt}" not recognized', INVALID_PARAMETER_VALUE)
    csv, binary = fmt == "csv", fmt == "binary"
    if binary:
        for name in ("delimiter", "null", "default", "header"):
            if name in given:
                raise CopySplitError(f"cannot specify {name.upper()} in BINARY mode", SYNTAX_ERROR)
    for name in ("quote", "escape", "force_not_null", "force_null"):
        if name in given and not csv:
            raise CopySplitError(f"COPY {name.upper().replace('_', ' ')} requires CSV mode", FEATURE_NOT_SUPPORTED)
    encoding = _arg_text(given.get("encoding")) if "encoding" in given else None
    if encoding is not None and encoding.lower().replace("_", "") not in _UTF8_NAMES:
        raise CopySplitError(f"COPY with ENCODING {encoding!r} into a sharded table is not supported: pgherd "
                             "splits UTF-8 data only; convert the data to UTF8", FEATURE_NOT_SUPPORTED)
    delimiter = _one_byte("delimiter", _arg_text(given["delimiter"]) or "") if "delimiter" in given else (
        b"," if csv else b"\t")
    null = (_arg_text(given["null"]) or "").encode() if "null" in given else (b"" if csv else b"\\N")
    default = (_arg_text(given["default"]) or "").encode() if "default" in given else None
    quote = _one_byte("quote", _arg_text(given["quote"]) or "") if "quote" in given else b'"'
    escape = _one_byte("escape", _arg_text(given["escape"]) or "") if "escape" in given else quote
    header = "false"
    if "header" in given:
        arg = given["header"]
        text = (_arg_text(arg) or "").lower() if arg is not None else "true"
        header = "match" if text == "match" else ("true" if _bool_option("header", arg) else "false")
    on_error = (_arg_text(given["on_error"]) or "stop").lower() if "on_error" in given else "stop"
    if on_error not in ("stop", "ignore"):
        raise CopySplitError(f"COPY ON_ERROR {on_error!r} is not supported on a sharded table: use stop or ignore",
                             FEATURE_NOT_SUPPORTED)
    if delimiter in (b"\r", b"\n"):
        raise CopySplitError("COPY delimiter cannot be newline or carriage return", INVALID_PARAMETER_VALUE)
    for what, value in (("null representation", null), ("default representation", default)):
        if value is not None and (b"\r" in value or b"\n" in value):
            raise CopySplitError(f"COPY {what} cannot use newline or carriage return", INVALID_PARAMETER_VALUE)
    if not csv and not binary and delimiter in _TEXT_BAD_DELIMITERS:
        raise CopySplitError(f'COPY delimiter cannot be "{delimiter.decode()}"', INVALID_PARAMETER_VALUE)
    if csv and delimiter == quote:
        raise CopySplitError("COPY delimiter and quote must be different", INVALID_PARAMETER_VALUE)
    return CopyOptions(
        format=fmt, delimiter=delimiter, null=null, default=default, header=header, quote=quote, escape=escape,
        force_not_null=_columns_option(given["force_not_null"]) if "force_not_null" in given else frozenset(),
        force_null=_columns_option(given["force_null"]) if "force_null" in given else frozenset(),
        on_error=on_error,
    )


def copy_plan(sql: str, plan: ShardingPlan) -> Optional[CopyPlan]:
    """The split plan of a `COPY table [(columns)] FROM STDIN ...` statement, or None when it needs
    no split (not COPY FROM, or a table that lives on one shard by schema, or a system catalog).

    Call it when the Route says split_copy (key-sharded table), or for COPY FROM into an
    omnisharded table (write_all, omnisharded): then CopyPlan.omnisharded is set and every shard
    gets the whole stream. Raises CopySplitError (0A000) for what cannot be split: COPY FROM a
    server file or program into a sharded table, a column list without the sharding key, no
    column list when the table's columns are unknown (ShardingPlan columns), a sharding function
    pgherd cannot compute, or a COPY inside a multi-statement query.

    Without a column list the key's position comes from ShardingPlan columns, which must then list
    the columns COPY reads: the table's columns in order, without generated ones. A WHERE clause
    needs nothing: each shard filters its own rows.
    """
    try:
        stmts = parse_statements(sql)
    except ParseError:
        return None
    copies = [s for s in stmts if "CopyStmt" in s]
    if not copies:
        return None
    body = copies[0]["CopyStmt"]
    if not body.get("is_from") or "relation" not in body:
        return None
    info = Analyzer(plan).analyze(copies[0])
    ref = info.target
    if ref is None or ref.kind not in (SHARDED, UNKNOWN, OMNI):
        return None
    table = ref.qualified
    if ref.kind == UNKNOWN and ref.proven is None:
        columns = ", ".join(sorted(plan.nameless))
        raise CopySplitError(f"pgherd cannot tell whether table {table} is sharded (by {columns}) or omnisharded: "
                             "name the sharding key in the COPY's column list, or list the table in "
                             "[[omnisharded_tables]]", FEATURE_NOT_SUPPORTED)
    if len(stmts) > 1:
        raise CopySplitError(f"COPY into table {table} of a sharded database must be sent as a query of its own",
                             FEATURE_NOT_SUPPORTED)
    if body.get("filename") is not None or body.get("is_program"):
        if ref.kind == OMNI:
            return None  # each shard reads its own server's file: that is what was asked
        raise CopySplitError(f"COPY FROM a server file or program into sharded table {table} is not supported: "
                             "each shard would load all of it; use COPY FROM STDIN", FEATURE_NOT_SUPPORTED)
    options = parse_copy_options(body.get("options", []))
    attlist = tuple(a.get("String", {}).get("sval", "") for a in body.get("attlist", []))
    columns: Optional[tuple[str, ...]] = attlist or plan.table_columns(ref.schema, ref.name)
    if ref.kind == OMNI:
        return CopyPlan(table, columns, options, omnisharded=True, shards=plan.shards, explicit_columns=bool(attlist))
    rule = ref.key_rule()
    assert rule is not None
    if rule.fn.opaque:
        raise CopySplitError(f"rows of {table} cannot be routed: its sharding function ({rule.label}) is not "
                             "supported by pgherd; COPY them per shard with /* pgherd_shard: N */",
                             FEATURE_NOT_SUPPORTED)
    if columns is None:
        raise CopySplitError(f"COPY into sharded table {table} needs a column list naming its sharding key "
                             f"{rule.column} (pgherd does not know the table's column order)", FEATURE_NOT_SUPPORTED)
    if rule.column not in columns:
        raise CopySplitError(f"COPY into {table} gives no value for its sharding key {rule.column}; a default or "
                             "sequence value cannot be routed: include the column", FEATURE_NOT_SUPPORTED)
    return CopyPlan(table, columns, options, omnisharded=False, shards=plan.shards, key_column=rule.column,
                    key_index=columns.index(rule.column), fn=rule.fn, explicit_columns=bool(attlist))


# ------------------------------------------------------------------------------------------------
# Field values

_TEXT_ESCAPE = re.compile(rb"\\(?:([0-7]{1,3})|x([0-9A-Fa-f]{1,2})|(.)|\Z)", re.S)
_SIMPLE_ESCAPES = {ord("b"): b"\b", ord("f"): b"\f", ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t",
                   ord("v"): b"\v"}


def unescape_text(raw: bytes) -> tuple[bytes, bool]:
    """A text-format field de-escaped (CopyReadAttributesText), and whether an octal or hex escape
    made a NUL or non-ASCII byte (then the result must be checked against the encoding)."""
    if b"\\" not in raw:
        return raw, False
    odd = False

    def sub(m: re.Match) -> bytes:
        nonlocal odd
        octal, hexa, other = m.groups()
        if octal is not None or hexa is not None:
            b = int(octal, 8) & 0xFF if octal is not None else int(hexa, 16)
            if b == 0 or b >= 0x80:
                odd = True
            return bytes((b,))
        if other is None:
            return b""  # a backslash at the very end of the line is dropped
        return _SIMPLE_ESCAPES.get(other[0], other)

    return _TEXT_ESCAPE.sub(sub, raw), odd


def _show(value: object) -> str:
    if isinstance(value, bytes):
        return value.hex() if len(value) == 16 else value.decode("utf-8", "replace")
    return str(value)


# ------------------------------------------------------------------------------------------------
# The splitter


class CopySplitter:
    """Splits one COPY FROM STDIN stream by shard (see the module docstring). Not thread-safe.

    options     the COPY's CopyOptions
    key_index   position of the sharding key among the COPY's fields
    fn          the table's sharding function (None with omnisharded)
    shards      the database's shard count
    omnisharded every shard gets every byte
    key_column, table   for messages (and FORCE_NULL / FORCE_NOT_NULL of the key column)
    fields      the expected field count of binary tuples, when known
    Counters: rows (rows read), duplicates (extra copies of rows sent to several shards).
    After a CopySplitError the splitter is done with: fail the COPY.
    """

    def __init__(self, options: CopyOptions, key_index: int, fn: Optional[KeyFunction], shards: int,
                 omnisharded: bool = False, *, key_column: Optional[str] = None, table: str = "the table",
                 fields: Optional[int] = None) -> None:
        if fn is None and not omnisharded:
            raise ValueError("a sharding function is needed unless the table is omnisharded")
        self.options = options
        self.fn = fn
        self.shards = shards
        self.omnisharded = omnisharded
        self.key_index = key_index
        self.key_column = key_column or f"column {key_index + 1}"
        self.table = table
        self.fields = fields
        self.rows = 0
        self.duplicates = 0
        self.done = False  # end of data seen (\. or the binary trailer)
        self._finished = False
        self._buf = bytearray()
        self._scan = 0  # where scanning of the current line resumes (the line starts at 0)
        self._eol = EOL_UNKNOWN
        self._line = 0  # lines read (for error context)
        self._in_quote = self._last_esc = False
        self._first = True
        self._header = options.header != "false" and options.format != "binary"
        self._binary = options.format == "binary"
        self._binary_header = self._binary
        self._memo: dict[bytes, int] = {}
        self._shards_of: dict[int, tuple[int, ...]] = {}
        csv = self._csv = options.format == "csv"
        self._delim = options.delimiter
        self._null = options.null
        self._default = options.default
        self._lowest = 1  # ON_ERROR ignore: where rows with invalid keys go to be skipped
        self._ignore = options.on_error == "ignore"
        column = key_column
        fnn, fn_ = options.force_not_null, options.force_null
        self._force_not_null = csv and (fnn is True or (column is not None and column in fnn))  # type: ignore[operator]
        self._force_null = csv and (fn_ is True or (column is not None and column in fn_))  # type: ignore[operator]
        d = re.escape(self._delim)
        if csv:
            q, e = options.quote, options.escape
            self._quote_c, self._esc_c = q[0], (-1 if e == q else e[0])
            specials = {q, e, b"\r", b"\n", b"\\"}
            self._special = re.compile(b"[" + b"".join(re.escape(s) for s in sorted(specials)) + b"]")
            if e == q:
                # Quote parity tells where a line ends (_bulk); stop at a \r and at a line
                # that starts with a backslash (maybe the end-of-copy marker).
                self._bulk_special = re.compile(rb"\r|\n\\")
            else:
                bulk = {q, e, b"\r", b"\\"}
                self._bulk_special = re.compile(b"[" + b"".join(re.escape(s) for s in sorted(bulk)) + b"]")
            qe, ee = re.escape(q), re.escape(e)
            inner = (b"(?:[^" + qe + b"]+|" + qe + qe + b")*+" if e == q
                     else b"(?:[^" + qe + ee + b"]+|" + ee + b"[" + qe + ee + b"]|" + ee + b")*+")
            self._csv_field = re.compile(b"(?:[^" + d + qe + b"]+|" + qe + inner + qe + b")*+", re.S)
            self._csv_quoted = re.compile(qe + b"(" + inner + b")" + qe, re.S)
            self._csv_unescape = None if e == q else re.compile(ee + b"([" + qe + ee + b"])")
        else:
            self._special = re.compile(rb"[\\\r\n]")
            # Lines split at \n are lines unless a backslash escapes a newline or starts the
            # end-of-copy marker, or a \r is about (_bulk).
            self._bulk_special = re.compile(rb"\r|\\[\n.]")
            self._escaped_delim = b"\\" + self._delim
            self._text_field = re.compile(b"(?:[^\\\\" + d + b"]+|\\\\.?)*", re.S)

    # -- public -------------------------------------------------------------------------------------

    def feed(self, data: bytes) -> dict[int, bytes]:
        """The complete rows of this CopyData payload (and earlier partial ones), per shard."""
        if self._finished:
            raise CopySplitError("COPY data after the end of the COPY", BAD_COPY_FILE_FORMAT)
        if self.omnisharded:
            return {s: bytes(data) for s in range(self.shards)} if data else {}
        if self.done:
            if self._binary and data:
                raise CopySplitError("received copy data after EOF marker")
            return {}  # text and CSV: input after \. is ignored up to CopyDone
        buf = self._buf
        buf += data
        out: dict[int, bytearray] = {}
        used = self._binary_rows(buf, out, False) if self._binary else self._text_rows(buf, out, False)
        if used:
            del buf[:used]
            if not self._binary:
                self._scan -= used
        if len(buf) > MAX_ROW_BYTES:
            raise CopySplitError(f"a row of the COPY into {self.table} is longer than {MAX_ROW_BYTES} bytes",
                                 PROGRAM_LIMIT_EXCEEDED, self._context())
        return {s: bytes(b) for s, b in out.items() if b}

    def finish(self) -> dict[int, bytes]:
        """At CopyDone: the last rows per shard (the binary trailer to every shard); raises
        CopySplitError if the data ends in the middle of something Postgres would reject."""
        if self._finished:
            return {}
        self._finished = True
        if self.omnisharded:
            return {}
        out: dict[int, bytearray] = {}
        buf = self._buf
        if self._binary:
            if not self.done:
                self._binary_rows(buf, out, True)
            for s in range(self.shards):
                out.setdefault(s, bytearray()).extend(BINARY_TRAILER)
        elif not self.done:
            self._text_rows(buf, out, True)
        buf.clear()
        return {s: bytes(b) for s, b in out.items() if b}

    # -- helpers ------------------------------------------------------------------------------------

    def _context(self) -> str:
        what = "row" if self._binary else "line"
        return f"COPY {self.table}, {what} {self._line + 1}"

    def _targets(self, mask: int) -> tuple[int, ...]:
        t = self._shards_of.get(mask)
        if t is None:
            t = self._shards_of[mask] = tuple(s for s in range(self.shards) if mask >> s & 1)
        return t

    def _emit_all(self, out: dict[int, bytearray], data: Union[bytes, bytearray, memoryview]) -> None:
        for s in range(self.shards):
            b = out.get(s)
            if b is None:
                b = out[s] = bytearray()
            b += data

    def _emit(self, out: dict[int, bytearray], mask: int, row: Union[bytes, bytearray, memoryview]) -> None:
        self.rows += 1
        if mask & (mask - 1) == 0:
            s = mask.bit_length() - 1
            b = out.get(s)
            if b is None:
                b = out[s] = bytearray()
            b += row
            return
        targets = self._targets(mask)
        self.duplicates += len(targets) - 1
        for s in targets:
            b = out.get(s)
            if b is None:
                b = out[s] = bytearray()
            b += row

    # -- key values -> shard masks -----------------------------------------------------------------

    def _mask(self, value: Optional[bytes], shown: bytes, binary: bool = False) -> int:
        """The shard mask of a row whose key field is value (None: NULL), in text or binary form."""
        fn = self.fn
        assert fn is not None
        if value is None:
            m = fn.insert_mask(None)
            if m is None:
                raise CopySplitError(f'no partition of relation "{self.table}" found for row', CHECK_VIOLATION,
                                     f"Partition key of the failing row contains ({self.key_column}) = (null); the "
                                     f"mapping has no default rule. {self._context()}")
            return m
        if binary:
            key = fn.param_value(value, True, 0)
            if fn.data_type == "varchar" and key is not INVALID:
                self._check_utf8(value)
            if key is INVALID:
                return self._invalid(f"incorrect binary data format for the sharding key {self.key_column} "
                                     f"({fn.data_type})", INVALID_BINARY_REPRESENTATION)
        else:
            dt = fn.data_type
            if dt == "varchar":
                self._check_utf8(value)
                key = bytes(value)
            else:
                self._check_utf8(value)
                key = fn.text_value(value.decode("utf-8"))
                if key is INVALID:
                    shown_text = shown.decode("utf-8", "replace")
                    if dt == "bigint" and _INTEGER.fullmatch(shown_text):
                        return self._invalid(f'value "{shown_text}" is out of range for type bigint',
                                             NUMERIC_VALUE_OUT_OF_RANGE)
                    return self._invalid(f'invalid input syntax for type {dt}: "{shown_text}"',
                                         INVALID_TEXT_REPRESENTATION)
        m = fn.insert_mask(key)
        if m is None:
            raise CopySplitError(f'no partition of relation "{self.table}" found for row', CHECK_VIOLATION,
                                 f"Partition key of the failing row contains ({self.key_column}) = "
                                 f"({_show(key) if binary else shown.decode('utf-8', 'replace')}); no mapping rule "
                                 "matches and there is no "
                                 f"default rule. {self._context()}")
        return m

    def _invalid(self, message: str, code: str) -> int:
        if self._ignore and not self._binary:
            return self._lowest  # ON_ERROR ignore: that shard's Postgres skips the row
        raise CopySplitError(message, code, self._context())

    def _check_utf8(self, value: bytes) -> None:
        try:
            bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            bad = bytes(value)[e.start:e.start + 2]
            raise CopySplitError(f'invalid byte sequence for encoding "UTF8": '
                                 f'{" ".join(f"0x{b:02x}" for b in bad)}', CHARACTER_NOT_IN_REPERTOIRE,
                                 self._context()) from None
        if b"\x00" in value:
            raise CopySplitError('invalid byte sequence for encoding "UTF8": 0x00', CHARACTER_NOT_IN_REPERTOIRE,
                                 self._context())

    def _default_key(self) -> None:
        raise CopySplitError(f"the sharding key {self.key_column} of {self.table} is given as DEFAULT; a default "
                             "value cannot be routed: give the value", FEATURE_NOT_SUPPORTED, self._context())

    def _raw_mask(self, raw: bytes) -> int:
        """Mask of a key field given raw: a text-format field as written (escapes and all), or an
        unquoted CSV field. The result depends on raw alone, so it is memoized."""
        m = self._memo.get(raw)
        if m is not None:
            return m
        if raw == self._null:  # compared before de-escaping (CopyReadAttributesText)
            value: Optional[bytes] = self._null if self._force_not_null else None
        else:
            if self._default is not None and raw == self._default:
                self._default_key()
            if not self._csv and b"\\" in raw:
                value, odd = unescape_text(raw)
                if odd:
                    self._check_utf8(value)
            else:
                value = None if (self._force_null and raw == self._null) else raw
        m = self._mask(value, raw if value is None else value)
        if len(self._memo) >= KEY_MEMO_ENTRIES:
            self._memo.clear()
        self._memo[raw] = m
        return m

    def _missing(self) -> None:
        raise CopySplitError(f'missing data for column "{self.key_column}"', BAD_COPY_FILE_FORMAT, self._context())

    def _line_mask(self, line: bytes) -> int:
        """The shard mask of one line's row (text or CSV), from its key field."""
        k = self.key_index
        if self._csv:
            if self.options.quote in line:
                return self._csv_line_mask(line)
        elif self._escaped_delim in line:
            # An escaped delimiter is data: walk the fields escape by escape.
            pos, n, field = 0, len(line), self._text_field
            for _ in range(k):
                pos = field.match(line, pos).end()  # type: ignore[union-attr]
                if pos >= n:
                    self._missing()
                pos += 1
            return self._raw_mask(line[pos:field.match(line, pos).end()])  # type: ignore[union-attr]
        parts = line.split(self._delim, k + 1)
        if len(parts) <= k:
            self._missing()
        return self._raw_mask(parts[k])

    def _csv_line_mask(self, line: bytes) -> int:
        k, pos, n, field, d = self.key_index, 0, len(line), self._csv_field, self._delim[0]
        for _ in range(k):
            pos = field.match(line, pos).end()  # type: ignore[union-attr]
            if pos >= n:
                self._missing()
            if line[pos] != d:
                self._unterminated()
            pos += 1
        end = field.match(line, pos).end()  # type: ignore[union-attr]
        if end < n and line[end] != d:
            self._unterminated()
        raw = line[pos:end]
        quote = self.options.quote
        saw_quote = quote in raw
        if not saw_quote:
            return self._raw_mask(raw)
        if self._default is not None and raw == self._default:
            self._default_key()
        value = self._dequote(raw)
        if self._force_null and value == self._null:
            return self._mask(None, raw)
        return self._mask(value, value)

    def _dequote(self, raw: bytes) -> bytes:
        """A CSV field's value: quoted sections lose their quotes, escapes inside them their escape."""
        q = self.options.quote
        out = bytearray()
        pos, n = 0, len(raw)
        quoted = self._csv_quoted
        while pos < n:
            i = raw.find(q, pos)
            if i < 0:
                out += raw[pos:]
                break
            out += raw[pos:i]
            m = quoted.match(raw, i)
            if m is None:
                self._unterminated()
            inner = m.group(1)  # type: ignore[union-attr]
            if self._csv_unescape is None:
                inner = inner.replace(q + q, q)
            else:
                inner = self._csv_unescape.sub(rb"\1", inner)
            out += inner
            pos = m.end()  # type: ignore[union-attr]
        return bytes(out)

    def _unterminated(self) -> None:
        raise CopySplitError("unterminated CSV quoted field", BAD_COPY_FILE_FORMAT, self._context())

    # -- text and CSV lines -------------------------------------------------------------------------

    def _text_rows(self, buf: bytearray, out: dict[int, bytearray], eof: bool) -> int:
        """Route every complete line of buf; returns how many bytes were used."""
        pos = 0
        n = len(buf)
        while True:
            if self._eol == EOL_NL and not self._header and self._scan == pos and pos < n:
                end = self._bulk(buf, pos, out)
                if end > pos:
                    pos = self._scan = end
                    continue
            r = self._find_line(buf, pos, eof)
            if r is _NEED:
                return pos
            if r is _NONE:
                return n
            content_end, next_start, marker = r  # type: ignore[misc]
            if self._header:
                self._header = False
                self._line += 1
                if not marker:
                    self._emit_all(out, buf[pos:next_start])
            elif content_end > pos or not marker:
                mask = self._line_mask(bytes(buf[pos:content_end]))
                self._emit(out, mask, buf[pos:next_start] if not marker else buf[pos:content_end])
                self._line += 1
            if marker:
                self.done = True
                return n
            pos = self._scan = next_start
            self._in_quote = self._last_esc = False
            self._first = True
            if pos >= n and not eof:
                return pos

    def _bulk(self, buf: bytearray, pos: int, out: dict[int, bytearray]) -> int:
        """Fast path once lines are known to end in \\n: route the whole lines from pos up to the
        first byte that needs the careful scanner (_bulk_special). Returns where it stopped."""
        last = buf.rfind(b"\n", pos)
        if last < 0:
            return pos
        m = self._bulk_special.search(buf, pos, last + 1)
        if m is not None:
            cut = m.start()
            last = cut if buf[cut] == _LF else buf.rfind(b"\n", pos, cut)
            if last < pos:
                return pos
        line_mask = self._line_mask
        emit = self._emit
        nl = b"\n"
        pieces = bytes(buf[pos:last]).split(nl)
        if not self._csv:
            for line in pieces:
                mask = line_mask(line)
                emit(out, mask, line + nl)
                self._line += 1
            return last + 1
        if buf[pos] == _BS:
            return pos  # maybe the end-of-copy marker
        if self._esc_c != -1:
            for line in pieces:  # _bulk_special kept quotes and escapes out
                mask = line_mask(line)
                emit(out, mask, line + nl)
                self._line += 1
            return last + 1
        # CSV whose escape is its quote: the quote characters toggle a quoted section, so a line
        # ends at a \\n preceded by an even number of them (CopyReadLineText).
        quote = self.options.quote
        used = pos
        line = None
        odd = 0
        for piece in pieces:
            if line is None:
                line, odd = piece, piece.count(quote) & 1
            else:
                line += nl + piece
                odd ^= piece.count(quote) & 1
            if not odd:
                mask = line_mask(line)
                emit(out, mask, line + nl)
                self._line += 1
                used += len(line) + 1
                line = None
        return used

    def _find_line(self, buf: bytearray, pos: int, eof: bool) -> object:
        """The next line from pos: (content end, next line start, is the end-of-copy marker), or
        _NEED (resume later at self._scan), or _NONE (no more lines at EOF). CopyReadLineText."""
        n = len(buf)
        p = self._scan
        csv = self._csv
        special = self._special
        in_quote, last_esc, first = self._in_quote, self._last_esc, self._first
        quote = self._quote_c if csv else -1
        esc = self._esc_c if csv else -1
        while True:
            m = special.search(buf, p)
            if m is None:
                if n > p:
                    first = False
                    last_esc = False
                if eof:
                    if n <= pos:
                        return _NONE
                    if in_quote and not self._header:
                        self._unterminated()
                    return (n, n, False)
                self._scan, self._in_quote, self._last_esc, self._first = n, in_quote, last_esc, first
                return _NEED
            s = m.start()
            if s > p:
                first = False
                last_esc = False
            p = s
            c = buf[p]
            before = (in_quote, last_esc, first)
            if p + 1 >= n and not eof and (c == _BS or c == _CR):
                self._scan, (self._in_quote, self._last_esc, self._first) = p, before
                return _NEED
            if csv:
                if in_quote and c == esc:
                    last_esc = not last_esc
                if c == quote and not last_esc:
                    in_quote = not in_quote
                if c != esc:
                    last_esc = False
            if c == _CR and not in_quote:
                return self._cr(buf, p, n, eof)
            if c == _LF and not in_quote:
                if self._eol in (EOL_CR, EOL_CRNL):
                    raise CopySplitError(
                        "unquoted newline found in data" if csv else "literal newline found in data",
                        BAD_COPY_FILE_FORMAT, self._context())
                self._eol = EOL_NL
                return (p, p + 1, False)
            if c == _BS and (not csv or first):
                if p + 1 >= n:  # at EOF: a backslash just before EOF is data
                    return (n, n, False)
                if buf[p + 1] == _DOT:
                    r = self._end_marker(buf, p, n, eof)
                    if r is _NEED:
                        self._scan, (self._in_quote, self._last_esc, self._first) = p, before
                        return _NEED
                    if r is _MARKER:
                        return (p, n, True)
                elif not csv:
                    p += 1  # the escaped byte is data, whatever it is
            first = False
            p += 1

    def _cr(self, buf: bytearray, p: int, n: int, eof: bool) -> object:
        csv = self._csv
        eol = self._eol
        if eol in (EOL_UNKNOWN, EOL_CRNL):
            c2 = buf[p + 1] if p + 1 < n else 0  # p + 1 < n unless at EOF (checked by the caller)
            if c2 == _LF:
                self._eol = EOL_CRNL
                return (p, p + 2, False)
            if eol == EOL_CRNL:
                self._bad_cr(csv)
            self._eol = EOL_CR
            return (p, p + 1, False)
        if eol == EOL_NL:
            self._bad_cr(csv)
        return (p, p + 1, False)

    def _bad_cr(self, csv: bool) -> None:
        raise CopySplitError("unquoted carriage return found in data" if csv else
                             "literal carriage return found in data", BAD_COPY_FILE_FORMAT, self._context())

    def _end_marker(self, buf: bytearray, p: int, n: int, eof: bool) -> object:
        """At a backslash followed by a period: the end-of-copy marker (_MARKER), data (_NOT_END,
        CSV only), or _NEED; raises for a malformed marker in text format."""
        csv = self._csv
        eol = self._eol
        q = p + 2
        if eol == EOL_CRNL:
            if q >= n and not eof:
                return _NEED
            c2 = buf[q] if q < n else 0
            q += 1
            if c2 == _LF:
                if csv:
                    return _NOT_END
                raise CopySplitError("end-of-copy marker does not match previous newline style",
                                     BAD_COPY_FILE_FORMAT, self._context())
            if c2 != _CR:
                if csv:
                    return _NOT_END
                raise CopySplitError("end-of-copy marker corrupt", BAD_COPY_FILE_FORMAT, self._context())
        if q >= n and not eof:
            return _NEED
        c2 = buf[q] if q < n else 0
        if c2 != _CR and c2 != _LF:
            if csv:
                return _NOT_END
            raise CopySplitError("end-of-copy marker corrupt", BAD_COPY_FILE_FORMAT, self._context())
        if (eol in (EOL_NL, EOL_CRNL) and c2 != _LF) or (eol == EOL_CR and c2 != _CR):
            raise CopySplitError("end-of-copy marker does not match previous newline style", BAD_COPY_FILE_FORMAT,
                                 self._context())
        return _MARKER

    # -- binary -------------------------------------------------------------------------------------

    def _binary_rows(self, buf: bytearray, out: dict[int, bytearray], eof: bool) -> int:
        n = len(buf)
        pos = 0
        if self._binary_header:
            if n < _BINARY_FIXED:
                if eof:
                    self._bad_header(buf)
                return 0
            self._bad_header(buf)  # raises unless the fixed part is right
            (ext,) = _I32.unpack_from(buf, _BINARY_FIXED - 4)
            if n < _BINARY_FIXED + ext:
                if eof:
                    raise CopySplitError("invalid COPY file header (wrong length)")
                if _BINARY_FIXED + ext > MAX_ROW_BYTES:
                    raise CopySplitError("the binary COPY header extension is too long", PROGRAM_LIMIT_EXCEEDED)
                return 0
            pos = _BINARY_FIXED + ext
            self._emit_all(out, buf[:pos])
            self._binary_header = False
        k = self.key_index
        expected = self.fields
        mv = memoryview(buf)
        try:
            while n - pos >= 2:
                (count,) = _I16.unpack_from(buf, pos)
                if count == -1:
                    self.done = True
                    if n > pos + 2:
                        raise CopySplitError("received copy data after EOF marker")
                    return n
                if (expected is not None and count != expected) or count <= k:
                    raise CopySplitError(f"row field count is {count}, expected "
                                         f"{expected if expected is not None else f'at least {k + 1}'}",
                                         BAD_COPY_FILE_FORMAT, self._context())
                q = pos + 2
                key: Optional[bytes] = None
                complete = True
                for i in range(count):
                    if n - q < 4:
                        complete = False
                        break
                    (size,) = _I32.unpack_from(buf, q)
                    q += 4
                    if size < -1:
                        raise CopySplitError("invalid field size", BAD_COPY_FILE_FORMAT, self._context())
                    if size > 0:
                        if n - q < size:
                            complete = False
                            break
                    if i == k and size >= 0:
                        key = bytes(buf[q:q + size])
                    if size > 0:
                        q += size
                if not complete:
                    break
                mask = self._mask(key, b"", binary=True)
                self._emit(out, mask, mv[pos:q])
                self._line += 1
                pos = q
        finally:
            mv.release()
        if eof and pos < n:
            raise CopySplitError("unexpected EOF in COPY data", BAD_COPY_FILE_FORMAT, self._context())
        return pos

    def _bad_header(self, buf: bytearray) -> None:
        """Raise unless buf starts with a valid fixed binary header (copyfromparse.c
        ReceiveCopyBinaryHeader)."""
        if len(buf) < len(BINARY_SIGNATURE) or bytes(buf[:len(BINARY_SIGNATURE)]) != BINARY_SIGNATURE:
            raise CopySplitError("COPY file signature not recognized")
        if len(buf) < len(BINARY_SIGNATURE) + 4:
            raise CopySplitError("invalid COPY file header (missing flags)")
        (flags,) = _I32.unpack_from(buf, len(BINARY_SIGNATURE))
        if flags & _FLAGS_WITH_OIDS:
            raise CopySplitError("invalid COPY file header (WITH OIDS)")
        if (flags & ~_FLAGS_WITH_OIDS) >> 16:
            raise CopySplitError("unrecognized critical flags in COPY file header")
        if len(buf) < _BINARY_FIXED:
            raise CopySplitError("invalid COPY file header (missing length)")
        (ext,) = _I32.unpack_from(buf, _BINARY_FIXED - 4)
        if ext < 0:
            raise CopySplitError("invalid COPY file header (missing length)")
