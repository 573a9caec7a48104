"""Writes a sharded database runs rewritten ([rewrite]): split INSERTs, moved rows, added ids, split COPY.

ShardedRelay (worker/sharded.py) inherits these. Each rewritten statement runs inside the client's
transaction, or, outside one, inside a transaction pgherd opens on the shards it touches and
commits at the end of the request (with two-phase commit under two_phase_commit_auto), so a
failure anywhere leaves every shard unchanged. The statements pgherd sends use the extended
protocol ending with Flush; the request's Sync (or the simple Query's end) settles them.
"""

from __future__ import annotations

import logging

from pgherd.router.copysplit import CopySplitError, copy_plan
from pgherd.router.params import Bind
from pgherd.router.parse import ParseError, parse_statements
from pgherd.router.rewrite import (PRIMARY_KEY_QUERY, RewriteError, add_primary_key, merge_returning, part_bind,
                                   primary_key_rows, rewrite_shard_key_update, split_insert)
from pgherd.shared.pgconn import ServerError
from pgherd.shared.wire import errors as E
from pgherd.shared.wire import messages as M
from pgherd.shared.wire import protocol as P

log = logging.getLogger("pgherd.sharded")

_FLUSH = M.flush()


class _Failed(Exception):
    """A shard answered a pgherd statement with an ErrorResponse (body: the error, to forward)."""

    def __init__(self, body: bytes) -> None:
        self.body = body


class _Result:
    __slots__ = ("fields", "rows", "tag")

    def __init__(self) -> None:
        self.fields: bytes | None = None  # RowDescription body (None: NoData)
        self.rows: list[bytes] = []  # DataRow bodies
        self.tag = ""


def _insert_target(sql: str) -> str | None:
    """The table of a one-statement INSERT as regclass reads it ("schema"."name"), else None."""
    try:
        stmts = parse_statements(sql)
    except ParseError:
        return None
    if len(stmts) != 1 or "InsertStmt" not in stmts[0]:
        return None
    rel = stmts[0]["InsertStmt"]["relation"]
    parts = [rel[k] for k in ("schemaname", "relname") if rel.get(k)]
    return ".".join('"' + p.replace('"', '""') + '"' for p in parts)


def _count(tag: str) -> int:
    last = tag.rsplit(None, 1)[-1] if tag else ""
    return int(last) if last.isdigit() else 0


class ShardWrites:
    """Mixin for ShardedRelay: the [rewrite] statements and COPY FROM into sharded tables."""

    # ---------------------------------------------------------------- running one statement
    async def collect(self, srv, sql: str, bind: Bind | None, formats=()) -> _Result:
        """Run sql with bind on srv (unnamed statement, Flush) and collect its whole result."""
        bind = bind or Bind([])
        self.unsynced.add(self.shard_of(srv))
        await self.send(srv, M.parse("", sql, list(bind.oids)) + M.bind("", "", list(bind.values), list(bind.formats),
                                                                           list(formats))
                        + M.describe("P", "") + M.execute("", 0) + _FLUSH)
        result = _Result()
        for want in (P.B_PARSE_COMPLETE, P.B_BIND_COMPLETE, P.B_ROW_DESCRIPTION):
            t, body = await self.reply(srv, False)
            if t == P.B_ERROR_RESPONSE:
                raise _Failed(body)
            if t == P.B_ROW_DESCRIPTION:
                result.fields = body
        while True:
            t, body = await self.reply(srv, False)
            if t == P.B_DATA_ROW:
                result.rows.append(body)
            elif t == P.B_ERROR_RESPONSE:
                raise _Failed(body)
            else:
                result.tag = M.read_command_complete(body) if t == P.B_COMMAND_COMPLETE else ""
                return result

    def shard_of(self, srv) -> int:
        return next(s for s, x in self.servers.items() if x is srv)

    def answer(self, fields: bytes | None, rows, tag: str, *, bind_complete: bool, describe: bool) -> None:
        """The client's reply to a rewritten statement: [BindComplete] [RowDescription/NoData] rows tag."""
        if bind_complete:
            self.emit(M.bind_complete())
        if describe:
            self.emit(M.message(P.B_ROW_DESCRIPTION, fields) if fields is not None else M.no_data())
        for row in rows:
            self.emit(M.message(P.B_DATA_ROW, row))
        self.emit(M.command_complete(tag))

    # ---------------------------------------------------------------- multi-row INSERT
    def split_unit(self, sql: str, bind: Bind | None, formats, describe: bool, extended: bool):
        """(shards, special) for an INSERT whose rows belong to several shards; RewriteError if it cannot."""
        split = split_insert(sql, self.router.plan, bind)

        async def run(servers) -> bool:
            results = []
            try:
                for part, srv in zip(split.parts, servers):
                    results.append(await self.collect(srv, part.sql, part_bind(bind, part.param_indexes), formats))
            except _Failed as failed:
                self.emit(M.message(P.B_ERROR_RESPONSE, failed.body))
                return True
            count = sum(_count(r.tag) for r in results) - split.duplicates
            rows = merge_returning(split, [r.rows for r in results]) if split.returning else []
            fields = results[0].fields
            self.answer(fields, rows, f"INSERT 0 {count}", bind_complete=extended,
                        describe=describe if extended else fields is not None)
            return False

        return [part.shard for part in split.parts], run

    # ---------------------------------------------------------------- UPDATE of the sharding key
    def move_unit(self, sql: str, bind: Bind | None, formats, describe: bool, extended: bool):
        """(shards, special) for an UPDATE that moves a row to another shard, or None if it moves nothing."""
        move = rewrite_shard_key_update(sql, self.router.plan, bind)
        if move is None or move.old_shard is None or move.old_shard == move.new_shard:
            return None

        async def run(servers) -> bool:
            old, new = servers
            try:
                found = await self.collect(old, move.select_sql, part_bind(bind, move.select_params))
                if not found.rows:
                    # Nothing matches: the original statement answers (UPDATE 0, its RowDescription).
                    result = await self.collect(old, sql, bind, formats)
                    self.answer(result.fields, [], result.tag, bind_complete=extended,
                                describe=describe if extended else result.fields is not None)
                    return False
                if len(found.rows) > 1:
                    raise move.too_many_rows(len(found.rows))
                names = [f.name for f in M.read_row_description(found.fields)]
                values = M.read_data_row(found.rows[0])
                insert_sql, insert_bind = move.insert_for_row(names[2:], values[2:], bind)
                inserted = await self.collect(new, insert_sql, insert_bind, formats)
                await self.collect(old, move.delete_sql, Bind(values[:2], [0, 0], [0, 0]))
            except _Failed as failed:
                self.emit(M.message(P.B_ERROR_RESPONSE, failed.body))
                return True
            except RewriteError as exc:
                self.emit(E.PgError(exc.code, exc.message).to_bytes())
                return True
            self.answer(inserted.fields, inserted.rows, "UPDATE 1", bind_complete=extended,
                        describe=describe if extended else inserted.fields is not None)
            return False

        return [move.old_shard, move.new_shard], run

    # ---------------------------------------------------------------- ids for an omitted primary key
    async def with_primary_key(self, sql: str, mode: str = "rewrite") -> str:
        """[rewrite] primary_key: an INSERT into a sharded table that omits its bigint primary key
        gets pgherd.unique_id() values for it (the key column is asked of shard 0 once per table)."""
        target = _insert_target(sql)
        if target is None:
            return sql
        column = self.primary_keys.get(target)
        if column is None:
            srv = await self.server(0)
            try:
                results = await srv.conn.simple_query(PRIMARY_KEY_QUERY.replace(
                    "$1", "'" + target.replace("'", "''") + "'"))
            except ServerError as exc:
                log.info("primary key of %s: %s", target, exc)
                results = []
            column = next((r.rows[0][0] for r in results if r.rows), "")
            self.primary_keys[target] = column
        if not column or primary_key_rows(sql, column) is None:
            return sql
        if mode == "error":
            raise E.PgError(E.FEATURE_NOT_SUPPORTED, f"INSERT INTO {target} gives no value for its bigint primary key "
                            f"{column} ([rewrite] primary_key = \"error\")",
                            hint="give the key, or set [rewrite] primary_key = \"rewrite\" to fill it with "
                                 "pgherd.unique_id()")
        return add_primary_key(sql, column, self.ctx.unique_ids.next_id) or sql

    # ---------------------------------------------------------------- COPY FROM STDIN
    async def copy_split(self, sql: str) -> None:
        """COPY … FROM STDIN into a sharded table: each row to its shard, batched per CopyData.

        Every shard runs the COPY (inside one transaction): a bad row, a CopyFail or an error on
        any shard rolls all of them back."""
        try:
            plan = copy_plan(sql, self.router.plan)
            if plan is None:
                raise CopySplitError("this COPY cannot be split by shard", "0A000")
            splitter = plan.splitter()
            shards = list(range(self.shard_count))
            servers = [await self.server(s) for s in shards]
            # Keys are read as UTF-8: the session's encoding (as the server reports it) must be.
            if servers[0].conn.params.get("client_encoding", "UTF8") not in ("UTF8", "SQL_ASCII"):
                raise CopySplitError("COPY into a sharded table needs client_encoding UTF8", "0A000")
        except CopySplitError as exc:
            await self.fail_request(E.PgError(exc.code, exc.message, detail=exc.detail))
            return
        except E.PgError as exc:
            await self.fail_request(exc)
            return
        wrap = not self.in_tx
        if wrap:
            await self.run_on(shards, "BEGIN")
        for srv in servers:
            await self.send(srv, M.query(sql))
        heads = [await self.reply(srv, False) for srv in servers]
        failed = next((b for t, b in heads if t == P.B_ERROR_RESPONSE), None)
        if failed is not None:
            for srv, (t, _) in zip(servers, heads):
                if t == P.B_COPY_IN_RESPONSE:
                    await self.send(srv, M.copy_fail("COPY failed on another shard"))
            self.emit(M.message(P.B_ERROR_RESPONSE, failed))
        else:
            self.emit(M.message(P.B_COPY_IN_RESPONSE, heads[0][1]))
            await self.flush()
            failed = await self.copy_rows(splitter, servers)
        tags = []
        for srv in servers:
            while True:
                t, body = await self.reply(srv, False)
                if t == P.B_COMMAND_COMPLETE:
                    tags.append(_count(M.read_command_complete(body)))
                elif t == P.B_ERROR_RESPONSE and failed is None:
                    failed = body
                    self.emit(M.message(t, body))
                elif t == P.B_READY_FOR_QUERY:
                    srv.tx = body[0]
                    break
        if failed is None:
            self.emit(M.command_complete(f"COPY {sum(tags) - splitter.duplicates}"))
        if wrap:
            error = await self.finish_on(shards, failed is None, self.two_pc_auto)
            if error is not None:
                self.error(error)
        elif failed is not None:
            self.tx_failed = True
        self.emit(M.ready_for_query(self.status()))
        await self.release_all()

    async def copy_rows(self, splitter, servers) -> bytes | None:
        """Relay the client's COPY data split by shard; the error to report (already sent) or None."""
        c = self.c
        while True:
            t, body = await c.read_message(self.ctx.max_message_size)
            try:
                if t == P.F_COPY_DATA:
                    parts = splitter.feed(body)
                elif t == P.F_COPY_DONE:
                    parts = splitter.finish()
                elif t == P.F_COPY_FAIL:
                    for srv in servers:
                        await self.send(srv, M.message(P.F_COPY_FAIL, body))
                    return None  # the shards answer with the error the client expects
                elif t in (P.F_FLUSH, P.F_SYNC):
                    continue  # ignored during COPY, as Postgres does
                else:
                    raise CopySplitError(f"unexpected message type {chr(t)!r} during COPY from stdin", "08P01")
            except CopySplitError as exc:
                for srv in servers:
                    await self.send(srv, M.copy_fail(exc.message))
                error = E.PgError(exc.code, exc.message, detail=exc.detail).to_bytes()
                self.emit(error)
                if t != P.F_COPY_DONE and exc.code == "08P01":
                    raise E.ProtocolViolation(exc.message) from None
                return error[5:]
            for shard, data in parts.items():
                if data:
                    await self.send(servers[shard], M.copy_data(data))
            if t == P.F_COPY_DONE:
                for srv in servers:
                    await self.send(srv, M.copy_done())
                return None
