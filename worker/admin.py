"""The admin console session: PgBouncer-style commands, answered instance-wide."""

from __future__ import annotations

import logging
import re

from pgherd.shared.wire import errors as E
from pgherd.shared.wire import messages as M
from pgherd.shared.wire import protocol as P

log = logging.getLogger("pgherd.admin")

COMMANDS = ("SHOW POOLS", "SHOW CLIENTS", "SHOW SERVERS", "SHOW STATS", "SHOW CONFIG", "SHOW VERSION",
            "SHOW LISTS", "SHOW WORKERS", "SHOW REPLICATION", "SHOW BANS", "SHOW QUERY_CACHE", "RELOAD", "PAUSE [db]", "RESUME [db]",
            "MAINTENANCE ON|OFF [db]", "RECONNECT", "SHUTDOWN", "BAN host", "UNBAN host", "HEALTHCHECK")
_SHOW_WHAT = {"POOLS", "CLIENTS", "SERVERS", "STATS", "CONFIG", "VERSION", "LISTS", "WORKERS", "REPLICATION", "BANS", "QUERY_CACHE"}
# BAN / UNBAN take a host key (db/shard/host:port), host:port or a host name, which the word
# pattern above would split: the argument is the rest of the line, optionally quoted.
_BAN = re.compile(r"\s*(UN)?BAN\s+(?:'([^']*)'|\"([^\"]*)\"|(\S+))\s*", re.IGNORECASE)
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_$.\-]*|\"(?:[^\"]|\"\")*\"")
# Row values of these Python types get these column types (PgBouncer reports
# counters as bigint, so dashboards can do arithmetic on them).
INT8, FLOAT8, TEXT, BOOL = 20, 701, 25, 16


def parse_command(sql: str) -> tuple[str, str | None]:
    """('SHOW', 'POOLS') / ('PAUSE', 'db') / ...; raises PgError for unknown commands."""
    ban = _BAN.fullmatch(sql.strip().rstrip(";"))
    if ban:
        return ("UNBAN" if ban.group(1) else "BAN"), next(g for g in ban.groups()[1:] if g is not None)
    words = [w.strip('"') if w.startswith('"') else w for w in _WORD.findall(sql.strip().rstrip(";"))]
    if not words:
        return "EMPTY", None
    head = words[0].upper()
    rest = words[1:]
    if head == "SHOW" and len(rest) == 1 and rest[0].upper() in _SHOW_WHAT:
        return "SHOW", rest[0].upper()
    if head in ("RELOAD", "RECONNECT", "SHUTDOWN", "HEALTHCHECK") and not rest:
        return head, None
    if head in ("PAUSE", "RESUME") and len(rest) <= 1:
        return head, rest[0] if rest else None
    if head == "MAINTENANCE" and 1 <= len(rest) <= 2 and rest[0].upper() in ("ON", "OFF"):
        return f"MAINTENANCE {rest[0].upper()}", rest[1] if len(rest) == 2 else None
    raise E.PgError(E.SYNTAX_ERROR, f"unknown admin command: {sql.strip()[:200]}",
                    hint="commands: " + ", ".join(COMMANDS))


def _type_of(values: list) -> int:
    for v in values:
        if v is None:
            continue
        if isinstance(v, bool):
            return TEXT
        if isinstance(v, int):
            return INT8
        if isinstance(v, float):
            return FLOAT8
        return TEXT
    return TEXT


def _text(v) -> str | None:
    if v is None:
        return None
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def encode_result(columns: list[str], rows: list[list], tag: str) -> bytes:
    types = [_type_of([r[i] for r in rows]) for i in range(len(columns))]
    out = [M.row_description([M.Field(c, type_oid=t, type_size=8 if t in (INT8, FLOAT8) else -1)
                              for c, t in zip(columns, types)])]
    out += [M.data_row([_text(v) for v in r]) for r in rows]
    out.append(M.command_complete(tag))
    return b"".join(out)


async def serve_admin(session) -> None:
    """Answer simple queries until the client leaves (the session is logged in)."""
    while True:
        t, body = await session.read_admin_message()
        if t == P.F_TERMINATE:
            return
        if t != P.F_QUERY:
            # Extended protocol and the rest: refuse, then resynchronise on Sync.
            if t == P.F_SYNC:
                await session.send(E.error_response(E.FEATURE_NOT_SUPPORTED,
                                                    "the admin console only accepts simple queries")
                                   + M.ready_for_query(P.TX_IDLE))
            continue
        sql = M.read_query(body)
        try:
            reply = await _run(session, sql)
        except E.PgError as exc:
            reply = exc.to_bytes()
        await session.send(reply + M.ready_for_query(P.TX_IDLE))


async def _run(session, sql: str) -> bytes:
    cmd, arg = parse_command(sql)
    if cmd == "EMPTY":
        return M.empty_query_response()
    link = session.ctx.link
    if link is None:
        raise E.PgError(E.FEATURE_NOT_SUPPORTED, "the admin console needs the supervisor")
    log.info("admin %s@%s: %s", session.user, session.addr, sql.strip()[:200])
    reply = await link.admin(cmd, arg)
    if reply is None:
        raise E.PgError(E.IO_ERROR, "the supervisor did not answer in time")
    if reply.error:
        raise E.PgError(reply.sqlstate or E.INTERNAL_ERROR, reply.error)
    out = b""
    if reply.notice:
        out += E.notice_response(reply.notice)
    if reply.columns:
        return out + encode_result(reply.columns, reply.rows, reply.tag or f"SHOW")
    return out + M.command_complete(reply.tag or cmd)
