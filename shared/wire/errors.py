"""SQLSTATE codes pgherd uses and ErrorResponse/NoticeResponse builders.

Codes come from PostgreSQL's documentation, appendix "PostgreSQL Error Codes".
"""

from __future__ import annotations

import struct

# Class 08: connection exception.
CONNECTION_EXCEPTION = "08000"
CONNECTION_FAILURE = "08006"
SQLCLIENT_UNABLE_TO_ESTABLISH = "08001"
SQLSERVER_REJECTED_ESTABLISHMENT = "08004"
PROTOCOL_VIOLATION = "08P01"
# Class 0A: feature not supported.
FEATURE_NOT_SUPPORTED = "0A000"
# Class 28: invalid authorization specification.
INVALID_AUTHORIZATION = "28000"
INVALID_PASSWORD = "28P01"
# Class 3D: invalid catalog name (unknown database).
INVALID_CATALOG_NAME = "3D000"
# Class 42: syntax error.
SYNTAX_ERROR = "42601"
# Class 53: insufficient resources.
TOO_MANY_CONNECTIONS = "53300"
# Class 57: operator intervention.
QUERY_CANCELED = "57014"
ADMIN_SHUTDOWN = "57P01"
CANNOT_CONNECT_NOW = "57P03"
# Class 58: system error.
IO_ERROR = "58030"
# Class XX: internal error.
INTERNAL_ERROR = "XX000"

_ERROR = ord("E")
_NOTICE = ord("N")


def _fields(severity: str, code: str, message: str, detail: str | None, hint: str | None) -> bytes:
    # ErrorResponse/NoticeResponse body: (field-type byte, cstring)*, then a
    # terminating zero byte ("Error and Notice Message Fields").
    parts = [b"S", severity.encode(), b"\0", b"V", severity.encode(), b"\0",
             b"C", code.encode(), b"\0", b"M", message.encode(), b"\0"]
    if detail:
        parts += [b"D", detail.encode(), b"\0"]
    if hint:
        parts += [b"H", hint.encode(), b"\0"]
    parts.append(b"\0")
    return b"".join(parts)


def error_response(code: str, message: str, *, severity: str = "ERROR",
                   detail: str | None = None, hint: str | None = None) -> bytes:
    """An ErrorResponse message ('E')."""
    body = _fields(severity, code, message, detail, hint)
    return struct.pack("!BI", _ERROR, len(body) + 4) + body


def fatal(code: str, message: str, *, detail: str | None = None, hint: str | None = None) -> bytes:
    """An ErrorResponse with severity FATAL: the connection is closed after it."""
    return error_response(code, message, severity="FATAL", detail=detail, hint=hint)


def notice_response(message: str, *, code: str = "00000", severity: str = "NOTICE",
                    detail: str | None = None, hint: str | None = None) -> bytes:
    """A NoticeResponse message ('N')."""
    body = _fields(severity, code, message, detail, hint)
    return struct.pack("!BI", _NOTICE, len(body) + 4) + body


class PgError(Exception):
    """An error to report to a client as an ErrorResponse with a SQLSTATE."""

    def __init__(self, code: str, message: str, *, detail: str | None = None,
                 hint: str | None = None, fatal: bool = False):
        super().__init__(message)
        self.code = code
        self.message = message
        self.detail = detail
        self.hint = hint
        self.fatal = fatal

    def to_bytes(self) -> bytes:
        return error_response(self.code, self.message, severity="FATAL" if self.fatal else "ERROR",
                              detail=self.detail, hint=self.hint)


class ProtocolViolation(PgError):
    """The peer broke the protocol: report 08P01 and disconnect."""

    def __init__(self, message: str):
        super().__init__(PROTOCOL_VIOLATION, message, fatal=True)
