"""Builders and readers for every message of the PostgreSQL v3 protocol.

Builders return complete messages (type byte, Int32 length, body) as bytes.
Readers take a message *body* (after the 5-byte header) and return values.
Formats: PostgreSQL documentation, "Message Formats".
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from . import protocol as P

_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_I16 = struct.Struct("!h")
_HDR = struct.Struct("!BI")


def message(type_byte: int, body: bytes = b"") -> bytes:
    """Frame a regular message: Byte1 type, Int32 length (counts itself), body."""
    return _HDR.pack(type_byte, len(body) + 4) + body


def cstr(text: str | bytes) -> bytes:
    if isinstance(text, str):
        text = text.encode()
    return text + b"\0"


class Reader:
    """Sequential reader over a message body (raises ValueError when short)."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes | memoryview, pos: int = 0):
        self.buf = bytes(buf)
        self.pos = pos

    def _need(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            raise ValueError("message is shorter than its contents")

    def byte(self) -> int:
        self._need(1)
        b = self.buf[self.pos]
        self.pos += 1
        return b

    def int16(self) -> int:
        self._need(2)
        (v,) = _I16.unpack_from(self.buf, self.pos)
        self.pos += 2
        return v

    def int32(self) -> int:
        self._need(4)
        (v,) = _I32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def uint32(self) -> int:
        self._need(4)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def bytes(self, n: int) -> bytes:
        if n < 0:
            raise ValueError("negative length")
        self._need(n)
        v = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return v

    def cstring(self) -> str:
        end = self.buf.find(b"\0", self.pos)
        if end < 0:
            raise ValueError("unterminated string")
        raw = self.buf[self.pos:end]
        self.pos = end + 1
        return raw.decode("utf-8", "replace")

    def rest(self) -> bytes:
        v = bytes(self.buf[self.pos:])
        self.pos = len(self.buf)
        return v

    def at_end(self) -> bool:
        return self.pos >= len(self.buf)


# ============================ startup phase ===================================

def startup_message(params: dict[str, str], version: int = P.PROTOCOL_3_0) -> bytes:
    """StartupMessage: Int32 length, Int32 version, (name, value) cstrings, 0."""
    body = _I32.pack(version) + b"".join(cstr(k) + cstr(v) for k, v in params.items()) + b"\0"
    return _I32.pack(len(body) + 4) + body


def ssl_request() -> bytes:
    return _I32.pack(8) + _I32.pack(P.SSL_REQUEST_CODE)


def gssenc_request() -> bytes:
    return _I32.pack(8) + _I32.pack(P.GSSENC_REQUEST_CODE)


def cancel_request(pid: int, secret: int) -> bytes:
    return _I32.pack(16) + _I32.pack(P.CANCEL_REQUEST_CODE) + _I32.pack(pid) + _I32.pack(secret)


def read_startup_params(body: bytes) -> dict[str, str]:
    """Parameters of a StartupMessage body (after the version Int32).

    Raises ValueError if the list is not terminated properly.
    """
    params: dict[str, str] = {}
    r = Reader(body)
    while True:
        if r.at_end():
            raise ValueError("startup packet parameters are not terminated")
        if r.buf[r.pos] == 0:
            r.pos += 1
            break
        name = r.cstring()
        value = r.cstring()
        params[name] = value
    if not r.at_end():
        raise ValueError("trailing bytes after startup packet parameters")
    return params


# ============================ backend messages ================================

def auth_ok() -> bytes:
    return message(P.B_AUTHENTICATION, _I32.pack(P.AUTH_OK))


def auth_cleartext() -> bytes:
    return message(P.B_AUTHENTICATION, _I32.pack(P.AUTH_CLEARTEXT))


def auth_md5(salt: bytes) -> bytes:
    return message(P.B_AUTHENTICATION, _I32.pack(P.AUTH_MD5) + salt)


def auth_sasl(mechanisms: list[str]) -> bytes:
    return message(P.B_AUTHENTICATION, _I32.pack(P.AUTH_SASL) + b"".join(cstr(m) for m in mechanisms) + b"\0")


def auth_sasl_continue(data: bytes) -> bytes:
    return message(P.B_AUTHENTICATION, _I32.pack(P.AUTH_SASL_CONTINUE) + data)


def auth_sasl_final(data: bytes) -> bytes:
    return message(P.B_AUTHENTICATION, _I32.pack(P.AUTH_SASL_FINAL) + data)


def backend_key_data(pid: int, secret: int) -> bytes:
    return message(P.B_BACKEND_KEY_DATA, _I32.pack(pid) + _I32.pack(secret))


def parameter_status(name: str, value: str) -> bytes:
    return message(P.B_PARAMETER_STATUS, cstr(name) + cstr(value))


def ready_for_query(status: int = P.TX_IDLE) -> bytes:
    return message(P.B_READY_FOR_QUERY, bytes((status,)))


def command_complete(tag: str) -> bytes:
    return message(P.B_COMMAND_COMPLETE, cstr(tag))


def empty_query_response() -> bytes:
    return message(P.B_EMPTY_QUERY_RESPONSE)


def parse_complete() -> bytes:
    return message(P.B_PARSE_COMPLETE)


def bind_complete() -> bytes:
    return message(P.B_BIND_COMPLETE)


def close_complete() -> bytes:
    return message(P.B_CLOSE_COMPLETE)


def no_data() -> bytes:
    return message(P.B_NO_DATA)


def portal_suspended() -> bytes:
    return message(P.B_PORTAL_SUSPENDED)


def parameter_description(type_oids: list[int]) -> bytes:
    return message(P.B_PARAMETER_DESCRIPTION, _I16.pack(len(type_oids)) + b"".join(_U32.pack(o) for o in type_oids))


@dataclass(frozen=True)
class Field:
    """One column of a RowDescription."""
    name: str
    table_oid: int = 0
    column: int = 0
    type_oid: int = 25  # text
    type_size: int = -1
    type_modifier: int = -1
    format: int = 0


def row_description(fields: list[Field]) -> bytes:
    parts = [_I16.pack(len(fields))]
    for f in fields:
        parts.append(cstr(f.name) + struct.pack("!IhIhih", f.table_oid, f.column, f.type_oid,
                                                f.type_size, f.type_modifier, f.format))
    return message(P.B_ROW_DESCRIPTION, b"".join(parts))


def data_row(values: list[bytes | str | None]) -> bytes:
    parts = [_I16.pack(len(values))]
    for v in values:
        if v is None:
            parts.append(_I32.pack(-1))
        else:
            if isinstance(v, str):
                v = v.encode()
            parts.append(_I32.pack(len(v)) + v)
    return message(P.B_DATA_ROW, b"".join(parts))


def copy_in_response(fmt: int, column_formats: list[int]) -> bytes:
    return message(P.B_COPY_IN_RESPONSE, bytes((fmt,)) + _I16.pack(len(column_formats))
                   + b"".join(_I16.pack(c) for c in column_formats))


def copy_out_response(fmt: int, column_formats: list[int]) -> bytes:
    return message(P.B_COPY_OUT_RESPONSE, bytes((fmt,)) + _I16.pack(len(column_formats))
                   + b"".join(_I16.pack(c) for c in column_formats))


def copy_both_response(fmt: int, column_formats: list[int]) -> bytes:
    return message(P.B_COPY_BOTH_RESPONSE, bytes((fmt,)) + _I16.pack(len(column_formats))
                   + b"".join(_I16.pack(c) for c in column_formats))


def copy_data(data: bytes) -> bytes:
    return message(P.F_COPY_DATA, data)  # same type byte both directions


def copy_done() -> bytes:
    return message(P.F_COPY_DONE)


def notification_response(pid: int, channel: str, payload: str) -> bytes:
    return message(P.B_NOTIFICATION_RESPONSE, _I32.pack(pid) + cstr(channel) + cstr(payload))


def function_call_response(value: bytes | None) -> bytes:
    if value is None:
        return message(P.B_FUNCTION_CALL_RESPONSE, _I32.pack(-1))
    return message(P.B_FUNCTION_CALL_RESPONSE, _I32.pack(len(value)) + value)


def negotiate_protocol_version(newest_minor: int, unrecognized: list[str]) -> bytes:
    return message(P.B_NEGOTIATE_PROTOCOL_VERSION, _I32.pack(newest_minor) + _I32.pack(len(unrecognized))
                   + b"".join(cstr(o) for o in unrecognized))


# ============================ frontend messages ===============================

def query(sql: str) -> bytes:
    return message(P.F_QUERY, cstr(sql))


def parse(name: str, sql: str, param_types: list[int] = ()) -> bytes:
    return message(P.F_PARSE, cstr(name) + cstr(sql) + _I16.pack(len(param_types))
                   + b"".join(_U32.pack(t) for t in param_types))


def bind(portal: str, statement: str, params: list[bytes | None], param_formats: list[int] = (),
         result_formats: list[int] = ()) -> bytes:
    parts = [cstr(portal), cstr(statement), _I16.pack(len(param_formats))]
    parts += [_I16.pack(f) for f in param_formats]
    parts.append(_I16.pack(len(params)))
    for p in params:
        parts.append(_I32.pack(-1) if p is None else _I32.pack(len(p)) + p)
    parts.append(_I16.pack(len(result_formats)))
    parts += [_I16.pack(f) for f in result_formats]
    return message(P.F_BIND, b"".join(parts))


def describe(kind: str, name: str) -> bytes:
    """kind is 'S' (statement) or 'P' (portal)."""
    return message(P.F_DESCRIBE, kind.encode() + cstr(name))


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    return message(P.F_EXECUTE, cstr(portal) + _I32.pack(max_rows))


def close(kind: str, name: str) -> bytes:
    return message(P.F_CLOSE, kind.encode() + cstr(name))


def sync() -> bytes:
    return message(P.F_SYNC)


def flush() -> bytes:
    return message(P.F_FLUSH)


def terminate() -> bytes:
    return message(P.F_TERMINATE)


def copy_fail(reason: str) -> bytes:
    return message(P.F_COPY_FAIL, cstr(reason))


def function_call(oid: int, args: list[bytes | None], arg_formats: list[int] = (), result_format: int = 0) -> bytes:
    parts = [_U32.pack(oid), _I16.pack(len(arg_formats))]
    parts += [_I16.pack(f) for f in arg_formats]
    parts.append(_I16.pack(len(args)))
    for a in args:
        parts.append(_I32.pack(-1) if a is None else _I32.pack(len(a)) + a)
    parts.append(_I16.pack(result_format))
    return message(P.F_FUNCTION_CALL, b"".join(parts))


def password_message(password: bytes | str) -> bytes:
    return message(P.F_PASSWORD, cstr(password))


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return message(P.F_PASSWORD, cstr(mechanism) + _I32.pack(len(data)) + data)


def sasl_response(data: bytes) -> bytes:
    return message(P.F_PASSWORD, data)


# ============================ readers =========================================

def read_error_fields(body: bytes | memoryview) -> dict[str, str]:
    """Fields of an ErrorResponse/NoticeResponse body, keyed by field letter."""
    fields: dict[str, str] = {}
    r = Reader(body)
    while not r.at_end():
        code = r.byte()
        if code == 0:
            break
        fields[chr(code)] = r.cstring()
    return fields


def read_parameter_status(body: bytes | memoryview) -> tuple[str, str]:
    r = Reader(body)
    return r.cstring(), r.cstring()


def read_backend_key_data(body: bytes | memoryview) -> tuple[int, int]:
    r = Reader(body)
    return r.int32(), r.int32()


def read_authentication(body: bytes | memoryview) -> tuple[int, bytes]:
    r = Reader(body)
    return r.int32(), r.rest()


def read_sasl_mechanisms(data: bytes) -> list[str]:
    r = Reader(data)
    out = []
    while not r.at_end():
        m = r.cstring()
        if not m:
            break
        out.append(m)
    return out


def read_command_complete(body: bytes | memoryview) -> str:
    return Reader(body).cstring()


def read_row_description(body: bytes | memoryview) -> list[Field]:
    r = Reader(body)
    n = r.int16()
    out = []
    for _ in range(n):
        name = r.cstring()
        out.append(Field(name, r.uint32(), r.int16(), r.uint32(), r.int16(), r.int32(), r.int16()))
    return out


def read_data_row(body: bytes | memoryview) -> list[bytes | None]:
    r = Reader(body)
    n = r.int16()
    out: list[bytes | None] = []
    for _ in range(n):
        ln = r.int32()
        out.append(None if ln < 0 else r.bytes(ln))
    return out


def read_query(body: bytes | memoryview) -> str:
    return Reader(body).cstring()


@dataclass
class ParseMsg:
    name: str
    query: str
    param_types: list[int]


def read_parse(body: bytes | memoryview) -> ParseMsg:
    r = Reader(body)
    name, q = r.cstring(), r.cstring()
    n = r.int16()
    return ParseMsg(name, q, [r.uint32() for _ in range(n)])


@dataclass
class BindMsg:
    portal: str
    statement: str
    param_formats: list[int]
    params: list[bytes | None]
    result_formats: list[int]


def read_bind(body: bytes | memoryview) -> BindMsg:
    r = Reader(body)
    portal, stmt = r.cstring(), r.cstring()
    pf = [r.int16() for _ in range(r.int16())]
    params: list[bytes | None] = []
    for _ in range(r.int16()):
        ln = r.int32()
        params.append(None if ln < 0 else r.bytes(ln))
    rf = [r.int16() for _ in range(r.int16())]
    return BindMsg(portal, stmt, pf, params, rf)


def read_describe_or_close(body: bytes | memoryview) -> tuple[str, str]:
    r = Reader(body)
    return chr(r.byte()), r.cstring()


def read_execute(body: bytes | memoryview) -> tuple[str, int]:
    r = Reader(body)
    return r.cstring(), r.int32()


def read_notification(body: bytes | memoryview) -> tuple[int, str, str]:
    r = Reader(body)
    return r.int32(), r.cstring(), r.cstring()


def read_copy_response(body: bytes | memoryview) -> tuple[int, list[int]]:
    r = Reader(body)
    fmt = r.byte()
    return fmt, [r.int16() for _ in range(r.int16())]


def read_sasl_initial_response(body: bytes | memoryview) -> tuple[str, bytes]:
    r = Reader(body)
    mech = r.cstring()
    ln = r.int32()
    return mech, (b"" if ln < 0 else r.bytes(ln))


def read_password(body: bytes | memoryview) -> bytes:
    raw = bytes(body)
    return raw[:-1] if raw.endswith(b"\0") else raw


def read_function_call_response(body: bytes | memoryview) -> bytes | None:
    r = Reader(body)
    ln = r.int32()
    return None if ln < 0 else r.bytes(ln)


def read_negotiate_protocol_version(body: bytes | memoryview) -> tuple[int, list[str]]:
    r = Reader(body)
    minor = r.int32()
    return minor, [r.cstring() for _ in range(r.int32())]
