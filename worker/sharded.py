"""The relay for sharded databases: route each statement, fan out, combine the replies.

A client of a database with several shards talks to pgherd as to one Postgres. pgherd reads
whole messages, asks router/route.py where each statement goes, and acts as the extended-query
server itself: it keeps the client's prepared statements (name -> text) and, for each Bind,
sends Parse (unnamed) + Bind + Describe + Execute to the shards the route names, ending with
Sync. Replies are combined ("Message Flow" in the protocol chapter):
- one RowDescription / CopyOutResponse (the first shard's), every shard's DataRows as they come;
- one CommandComplete whose row count is the sum (UPDATE 7 = 3 + 4);
- the first ErrorResponse, after which the rest of the request is drained and dropped;
- one ReadyForQuery whose status combines the shards' (E over T over I).

Transactions: BEGIN is answered by pgherd and run on each shard when the transaction first
touches it (with the SAVEPOINTs made so far); COMMIT / ROLLBACK go to every shard it touched.
A write outside a transaction that reaches several shards runs inside BEGIN/COMMIT on each, so
an error on one shard rolls back the others, as Postgres rolls back a failed implicit transaction.
"""

from __future__ import annotations

import logging
import re

import trio

from pgherd.router.copysplit import CopySplitError, parse_copy_options
from pgherd.router.merge import MergeError, MergeRefused, plan_merge
from pgherd.router.parse import ParseError, parse_statements
from pgherd.router.rewrite import RewriteError
from pgherd.router.route import Bind
from pgherd.router.session import RoutingSession
from pgherd.router.settings import analyze as session_analyze
from pgherd.shared import net
from pgherd.shared.pgconn import ConnectError, PgConn, ServerError
from pgherd.shared.twophase import CREATE_DECISION_TABLE, Gid, forget_sql, record_sql
from pgherd.shared.wire import errors as E
from pgherd.shared.wire import messages as M
from pgherd.shared.wire import protocol as P

from .pool import sync_params
from .shardwrites import ShardWrites

log = logging.getLogger("pgherd.sharded")

# Replies to the client are written in batches of about this size: large results stream out
# with few syscalls and bounded memory.
OUT_FLUSH_BYTES = 64 * 1024
# Messages that end one statement's reply ("Extended Query": Execute ends with one of these).
_UNIT_END = frozenset([P.B_COMMAND_COMPLETE, P.B_EMPTY_QUERY_RESPONSE, P.B_PORTAL_SUSPENDED,
                       P.B_ERROR_RESPONSE, P.B_READY_FOR_QUERY])
# Command tags whose last word is a row count to sum across shards.
_COUNTED_TAGS = frozenset(["INSERT", "UPDATE", "DELETE", "SELECT", "COPY", "MERGE", "FETCH", "MOVE"])
# Data writes that run inside BEGIN/COMMIT on each shard when they reach several shards.
_WRITE_KINDS = frozenset(["insert", "update", "delete", "merge"])
_UNIQUE_ID_CALL = re.compile(r'"?pg(?:herd|dog)"?\s*\.\s*"?unique_id"?\s*\(\s*\)', re.I)
_FLUSH, _SYNC = M.flush(), M.sync()
_TEXT, _INT8 = 25, 20  # type OIDs of SHOW pgherd.* columns
# A value no setting has: marks a server setting pgherd no longer knows (see remember_settings).
_UNKNOWN = "\x00unknown"
_IN_FAILED_TX = "current transaction is aborted, commands ignored until end of transaction block"


class _Unit:
    """One step of an extended-protocol request: where it goes, what to send, which replies come back."""

    __slots__ = ("shards", "messages", "local", "local_route", "sync", "parse", "bind", "describe", "execute",
                 "kind", "merge", "special")

    def __init__(self, shards=(), messages=b"", local=b"", local_route=None, sync=False, parse=False,
                 bind=False, describe=None, execute=False) -> None:
        self.shards = shards
        self.messages = messages
        self.local = local  # replies pgherd gives itself (ParseComplete, CloseComplete, an error)
        self.local_route = local_route  # (route, sql, executes, describe) of a statement pgherd answers
        self.sync = sync
        self.parse = parse  # replies expected: ParseComplete (pgherd's own Parse: dropped),
        self.bind = bind  # BindComplete,
        self.describe = describe  # "S": ParameterDescription + RowDescription/NoData; "P": RowDescription/NoData
        self.execute = execute  # rows and CommandComplete / EmptyQueryResponse / PortalSuspended
        self.kind = ""
        self.merge = None  # (MergePlan, client described the portal, Bind, result formats): rows merged
        self.special = None  # async fn(servers) -> failed: a rewritten write (worker/shardwrites.py)


def sum_tags(tags: list[str]) -> str:
    """One command tag for several shards' tags of the same statement (row counts added)."""
    first = tags[0]
    words = first.split()
    if len(words) < 2 or words[0] not in _COUNTED_TAGS or not words[-1].isdigit():
        return first
    total = 0
    for tag in tags:
        last = tag.rsplit(None, 1)[-1]
        total += int(last) if last.isdigit() else 0
    return " ".join(words[:-1] + [str(total)])


class ShardedRelay(ShardWrites):
    """Serves one client of a sharded database until it leaves."""

    def __init__(self, client) -> None:
        self.c = client
        self.ctx = client.ctx
        self.cluster = client.cluster
        self.router = self.ctx.router_for(client.database)
        self.key_columns = {rule.column for rule in self.router.plan.rules}
        self.shard_count = len(self.cluster.shards)
        self.session = RoutingSession.from_startup_options(client.startup_params)
        self.statements: dict[str, tuple[str, list[int]]] = {}
        self.portals: dict[str, _Portal] = {}
        self.servers: dict[int, object] = {}  # shard -> ServerConn held by this client
        self.in_tx = False
        self.tx_failed = False
        self.prelude: list[str] = []  # BEGIN and SAVEPOINTs, for shards joining the transaction
        self.out: list[bytes] = []
        self.out_size = 0
        self.batch: list[tuple[int, bytes]] = []
        self.batch_failed = False  # an error in this extended batch: skip to Sync
        self.rr = client.pid  # round robin over shards for any-one reads, per client start
        self.sticky: int | None = None
        self.copy_out = False
        self.copy_join: _CopyOut | None = None  # joins the shards' COPY TO streams
        self.same_rows = False  # an omnisharded write: every shard counts the client's rows
        self.dropped = 0  # merged rows beyond an Execute's row limit
        self.unsynced: set[int] = set()  # shards sent extended messages since the last Sync
        self.synced: set[int] = set()  # shards sent the request's Sync already (ReadyForQuery due)
        # Two-phase commit (shared/twophase.py): for transactions that span shards, and
        # (_auto) for single statements that write on several shards outside a transaction.
        g, user = self.ctx.config.general, self.ctx.config.find_user(client.user, client.database)
        two_pc = user.two_phase_commit if user is not None and user.two_phase_commit is not None \
            else g.two_phase_commit
        auto = user.two_phase_commit_auto if user is not None and user.two_phase_commit_auto is not None \
            else g.two_phase_commit_auto
        self.two_pc = two_pc
        self.two_pc_auto = two_pc if auto is None else (auto and two_pc)
        # [rewrite]: each mode acts only with enabled = true (PgDog's master switch).
        rw = self.ctx.config.rewrite
        self.rewrite_split_inserts = rw.enabled and rw.split_inserts == "rewrite"
        self.rewrite_shard_key = rw.enabled and rw.shard_key == "rewrite"
        self.primary_key_mode = rw.primary_key if rw.enabled else "ignore"
        self.primary_keys: dict[str, str] = {}  # table -> its bigint primary key column ("" if none)

    # ================================================================ output
    def emit(self, data: bytes) -> None:
        self.out.append(data)
        self.out_size += len(data)

    async def flush(self) -> None:
        if self.out:
            data = b"".join(self.out)
            self.out.clear()
            self.out_size = 0
            await self.c.send(data)

    def status(self) -> int:
        if not self.in_tx:
            return P.TX_IDLE
        return P.TX_FAILED if self.tx_failed else P.TX_IN_TRANSACTION

    def error(self, exc: E.PgError) -> None:
        self.emit(exc.to_bytes())

    # ================================================================ main loop
    async def run(self) -> None:
        c = self.c
        limit = self.ctx.max_message_size
        try:
            while True:
                await self.flush()
                t, body = await c.read_message(limit)
                c.pool.received += len(body) + 5
                if t == P.F_TERMINATE:
                    return
                try:
                    if t == P.F_QUERY:
                        await self.simple(body)
                    elif t in (P.F_PARSE, P.F_BIND, P.F_DESCRIBE, P.F_EXECUTE, P.F_CLOSE):
                        self.batch.append((t, body))
                    elif t == P.F_SYNC or t == P.F_FLUSH:
                        self.batch.append((t, body))
                        await self.extended()
                    else:
                        await self.other(t)
                except ValueError as exc:  # a message body that does not decode ("Message Formats")
                    raise E.ProtocolViolation(f"invalid {chr(t)!r} message: {exc}") from None
        finally:
            await self.release_all(force=True)

    async def other(self, t: int) -> None:
        """Messages outside the query protocols."""
        if t == P.F_FUNCTION_CALL:
            self.error(E.PgError(E.FEATURE_NOT_SUPPORTED,
                                 "the function call protocol is not supported on a sharded database"))
            self.emit(M.ready_for_query(self.status()))
        elif t not in (P.F_COPY_DATA, P.F_COPY_DONE, P.F_COPY_FAIL):
            # (COPY messages outside COPY are ignored, as Postgres does after an error.)
            raise E.ProtocolViolation(f"invalid frontend message type {t}")

    # ================================================================ routing
    def route(self, sql: str, bind: Bind | None = None):
        return self.router.route(sql, bind, self.session)

    def targets(self, route) -> list[int]:
        if route.any_one:
            if self.servers:
                return [next(iter(self.servers))]  # a shard this transaction already uses
            if route.sticky:
                if self.sticky is None:
                    self.sticky = self.rr % self.shard_count
                return [self.sticky]
            self.rr += 1
            return [self.rr % self.shard_count]
        if route.follow_tx:
            return list(self.servers) or [0]
        return list(route.shard_list(self.shard_count))

    def with_unique_ids(self, sql: str) -> str:
        """The text with each pgherd.unique_id() call replaced by a new id (calls found by the parser)."""
        try:
            stmts = parse_statements(sql)
        except ParseError:
            return sql
        locations: dict[int, bool] = {}
        _call_locations(stmts, locations)
        if not locations:
            return sql
        if any(locations.values()):
            # pgherd replaces each call with one value: every row would get the same id.
            raise E.PgError(E.FEATURE_NOT_SUPPORTED, "pgherd.unique_id() in a query that reads rows from a table "
                            "would give every row the same id", hint="call it once per row in INSERT … VALUES, "
                            "or fetch ids with SELECT pgherd.unique_id() first")
        raw = sql.encode()
        out, last = [], 0
        text = raw.decode()
        for m in _UNIQUE_ID_CALL.finditer(text):
            start = len(text[:m.start()].encode())
            if start not in locations:
                continue
            out.append(raw[last:start])
            out.append(str(self.ctx.unique_ids.next_id()).encode())
            last = len(text[:m.end()].encode())
        out.append(raw[last:])
        return b"".join(out).decode()

    # ================================================================ servers
    async def server(self, shard: int):
        srv = self.servers.get(shard)
        if srv is not None:
            return srv
        ctx = self.ctx
        if ctx.paused or ctx.maintenance:
            await ctx.wait_gate(self.c.database)
        pool = self.cluster.shards[shard].primary() or self.cluster.shards[shard].pools[0]
        srv = pool.try_checkout()
        if srv is None:
            self.c.state = "waiting"
            try:
                srv = await pool.checkout()
            finally:
                self.c.state = "active"
        srv.client = self.c
        self.servers[shard] = srv
        try:
            await sync_params(srv, self.c.settings)
            for stmt in self.prelude if self.in_tx else ():
                await srv.conn.simple_query(stmt)
            srv.tx = srv.conn.tx_status
        except ServerError as exc:
            raise _server_error(exc) from None
        except (net.PeerClosed, OSError):
            await self.lost(srv)
        return srv

    async def release_all(self, force: bool = False) -> None:
        """Return the servers to their pools (outside a transaction, or when the client leaves)."""
        if not force and (self.in_tx or self.c.mode == "session"):
            return
        servers, self.servers = list(self.servers.values()), {}
        for srv in servers:
            if force and not srv.idle:
                with trio.CancelScope(shield=True):
                    await self.c._release_dirty(srv)
            else:
                srv.pool.checkin(srv)

    async def lost(self, srv) -> None:
        srv.broken = True
        raise E.PgError(E.CONNECTION_FAILURE, "server closed the connection unexpectedly",
                        hint="the query may or may not have run; reconnect and retry", fatal=True)

    async def send(self, srv, data: bytes) -> None:
        try:
            await srv.conn.send(data)
        except (net.PeerClosed, OSError):
            await self.lost(srv)

    async def read(self, srv) -> tuple[int, bytes]:
        try:
            t, body = await srv.conn.read_message()
        except (net.PeerClosed, OSError):
            await self.lost(srv)
        srv.pool.sent += len(body) + 5
        return t, body

    async def run_on(self, shards, sql: str) -> None:
        """A control statement (BEGIN, COMMIT, SAVEPOINT, SET) on the given shards' servers."""
        for shard in shards:
            srv = self.servers[shard]
            try:
                await srv.conn.simple_query(sql)
            except (net.PeerClosed, OSError):
                await self.lost(srv)
            finally:
                srv.tx = srv.conn.tx_status

    # ================================================================ reading replies
    async def read_unit(self, srv, first: bool, tags: list[str], last: bool = True) -> tuple[int, bytes]:
        """Forward one statement's reply from srv; returns its end message (type, body).

        Headers (RowDescription, CopyOutResponse, ParameterDescription) are forwarded from the
        first shard only; rows from every shard; the end message is left to the caller. COPY TO
        data goes through self.copy_join (one CSV header, one binary file header and trailer).
        """
        while True:
            t, body = await self.reply(srv, first)
            if t == P.B_DATA_ROW:
                self.emit(M.message(t, body))
                if self.out_size >= OUT_FLUSH_BYTES:
                    await self.flush()
            elif t == P.B_COPY_DATA:
                data = body if self.copy_join is None else self.copy_join.data(first, body)
                if data:
                    self.emit(M.copy_data(data))
                if self.out_size >= OUT_FLUSH_BYTES:
                    await self.flush()
            elif t in _UNIT_END:
                if t == P.B_COMMAND_COMPLETE and self.copy_join is not None and self.copy_out:
                    trailer = self.copy_join.end(last)
                    if trailer:
                        self.emit(M.copy_data(trailer))
                if t == P.B_COMMAND_COMPLETE:
                    tags.append(M.read_command_complete(body))
                elif t == P.B_READY_FOR_QUERY:
                    srv.tx = body[0]
                return t, body
            elif t == P.B_COPY_DONE:
                self.copy_out = True  # sent once by the caller after every shard's data
            elif t in (P.B_COPY_IN_RESPONSE, P.B_COPY_BOTH_RESPONSE):
                return t, body
            elif first:
                self.emit(M.message(t, body))  # RowDescription, NoData, CopyOutResponse, ...

    async def drain(self, srv) -> None:
        """Read and drop replies until srv's ReadyForQuery."""
        while True:
            t, body = await self.read(srv)
            if t == P.B_READY_FOR_QUERY:
                srv.tx = body[0]
                return
            if t in (P.B_COPY_IN_RESPONSE, P.B_COPY_BOTH_RESPONSE):
                await self.send(srv, M.copy_fail("the request failed on another shard"))

    # ================================================================ simple query
    async def simple(self, body: bytes) -> None:
        sql = M.read_query(body)
        route = self.route(sql)
        if _calls_unique_id(route, sql):
            try:
                sql = self.with_unique_ids(sql)  # then route the text with the ids in place
            except E.PgError as exc:
                await self.fail_request(exc)
                return
            route = self.route(sql)
        several = route.statements > 1 and route.refuse is None and not self.tx_failed
        if route.split_copy and not several and not self.tx_failed:
            await self.copy_split(sql)
            return
        if not several and not self.tx_failed:
            try:
                sql, route = await self.add_ids(sql, route, None)
                rewritten = self.rewritten_write(route, sql, None, (), True, True, extended=False)
            except E.PgError as exc:
                await self.fail_request(exc)
                return
            if rewritten is not None:
                await self.run_units([rewritten, _Unit(sync=True)], synced=True)
                return
        if not several and await self.answer_locally(route, sql, simple=True):
            return
        shards = self.targets(route)
        if route.needs_merge and len(shards) > 1 and not several:
            await self.merged_query(sql, shards)
            return
        wrap = len(shards) > 1 and not self.in_tx and route.kind in _WRITE_KINDS and route.statements == 1
        try:
            servers = [await self.server(s) for s in shards]
            if wrap:
                await self.run_on(shards, "BEGIN")
        except E.PgError as exc:
            await self.fail_request(exc)
            return
        for srv in servers:
            await self.send(srv, M.query(sql))
        self.same_rows = route.omnisharded and route.write_all
        self.copy_join = _CopyOut.of(sql) if route.kind == "copy" and len(servers) > 1 else None
        try:
            failed = await self.relay_statements(servers)
        finally:
            self.same_rows, self.copy_join = False, None
        if wrap:
            error = await self.finish_on(shards, not failed, self.two_pc_auto)
            if error is not None:
                self.error(error)
        if several:
            self.follow_servers(servers, sql, failed)
        elif failed and self.in_tx:
            self.tx_failed = True
        self.emit(M.ready_for_query(self.status()))
        await self.release_all()

    def follow_servers(self, servers, sql: str, failed: bool) -> None:
        """After a query string of several statements (which may BEGIN, COMMIT or SET itself),
        take the transaction state from the servers' ReadyForQuery and the settings from the text."""
        statuses = {srv.tx for srv in servers}
        if statuses == {P.TX_IDLE}:
            if self.in_tx:
                self.session.end_transaction(not failed)
            self.in_tx, self.tx_failed, self.prelude = False, False, []
        else:
            if not self.in_tx:
                self.in_tx, self.prelude = True, ["BEGIN"]
            self.tx_failed = P.TX_FAILED in statuses
        if not failed:
            self.remember_settings(sql, servers)

    # ================================================================ rewritten writes (worker/shardwrites.py)
    async def add_ids(self, sql: str, route, bind):
        """[rewrite] primary_key: "rewrite" fills an omitted bigint primary key with unique ids,
        "error" refuses the INSERT (PgDog's modes; "ignore" sends it as it is)."""
        if self.primary_key_mode in ("rewrite", "error") and route.kind == "insert" and route.statements == 1:
            new = await self.with_primary_key(sql, self.primary_key_mode)
            if new != sql:
                return new, self.route(new, bind)
        return sql, route

    def rewritten_write(self, route, sql: str, bind, formats, describe: bool, execute: bool,
                        extended: bool = True) -> _Unit | None:
        """A unit running a multi-shard INSERT split by shard, or an UPDATE moving a row between
        shards ([rewrite] split_inserts / shard_key = "rewrite"); None for other statements."""
        if not execute:
            return None
        try:
            if route.split_insert and self.rewrite_split_inserts:
                shards, special = self.split_unit(sql, bind, formats, describe, extended)
            elif route.kind == "update" and route.refuse is not None and self.rewrite_shard_key:
                found = self.move_unit(sql, bind, formats, describe, extended)
                if found is None:
                    return None
                shards, special = found
            else:
                return None
        except RewriteError as exc:
            raise E.PgError(exc.code, exc.message) from None
        unit = _Unit(shards=shards)
        unit.special, unit.kind = special, route.kind
        return unit

    # ================================================================ merged results (router/merge.py)
    def merge_plan(self, sql: str):
        """The merge plan of a cross-shard SELECT; PgError 0A000 when it cannot be merged correctly."""
        try:
            return plan_merge(sql, sharding_columns=self.key_columns)
        except MergeRefused as exc:
            raise E.PgError(getattr(exc, "code", None) or E.FEATURE_NOT_SUPPORTED, exc.message) from None

    async def collation(self, srv) -> str:
        """The shard database's collation (text order must be Postgres'): asked once per pool."""
        pool = srv.pool
        if getattr(pool, "datcollate", None) is None:
            try:
                results = await srv.conn.simple_query(
                    "SELECT datcollate FROM pg_database WHERE datname = current_database()")
            except ServerError as exc:
                raise _server_error(exc) from None
            except (net.PeerClosed, OSError):
                await self.lost(srv)
            pool.datcollate = next((r.rows[0][0] for r in results if r.rows), "C")
        return pool.datcollate

    def new_merger(self, plan, fields, count: int, bind=None, formats=None, collation: str = "C"):
        try:
            return plan.merger(fields, count, bind=bind, formats=formats, collation=collation,
                               extra_float_digits=int(self.c.settings.get("extra_float_digits", "1") or 1))
        except MergeRefused as exc:
            raise E.PgError(getattr(exc, "code", None) or E.FEATURE_NOT_SUPPORTED, exc.message) from None

    async def merged_query(self, sql: str, shards: list[int]) -> None:
        """A cross-shard SELECT whose rows must be combined (ORDER BY, LIMIT, aggregates, ...)."""
        try:
            plan = self.merge_plan(sql)
            servers = [await self.server(s) for s in shards]
            collation = await self.collation(servers[0])
        except E.PgError as exc:
            await self.fail_request(exc)
            return
        for srv in servers:
            await self.send(srv, M.query(plan.shard_sql))
        failed = await self.merge_replies(plan, servers, describe=True, collation=collation)
        for srv in servers:
            await self.drain(srv)
        if failed and self.in_tx:
            self.tx_failed = True
        self.emit(M.ready_for_query(self.status()))
        await self.release_all()

    async def merge_replies(self, plan, servers, describe: bool, collation: str, bind=None,
                            formats=None, max_rows: int = 0) -> bool:
        """Read every shard's rows of plan.shard_sql and send the merged result; True on error.

        Each shard's reply must be at its RowDescription (simple Query) or its Describe's
        RowDescription (extended). Shards are read only as the merge needs rows, so memory stays
        bounded; after the last row the rest of each shard's (LIMIT-bounded) reply is dropped."""
        heads = []
        for srv in servers:
            t, body = await self.reply(srv, False)
            heads.append((t, body))
        error = next((b for t, b in heads if t == P.B_ERROR_RESPONSE), None)
        if error is not None:
            self.emit(M.message(P.B_ERROR_RESPONSE, error))
            return True
        if any(t != P.B_ROW_DESCRIPTION for t, _ in heads):
            self.error(E.PgError(E.INTERNAL_ERROR, "a shard did not describe the rows of a merged query"))
            return True
        fields = M.read_row_description(heads[0][1])
        shape = [_shape(f) for f in fields]
        if any([_shape(f) for f in M.read_row_description(b)] != shape for _, b in heads[1:]):
            self.error(E.PgError("0A000", "the shards describe this query's rows differently (column types "
                                          "differ between shards): it cannot be merged"))
            return True
        try:
            merger = self.new_merger(plan, fields, len(servers), bind=bind, formats=formats, collation=collation)
        except E.PgError as exc:
            self.error(exc)
            return True
        if describe:
            self.emit(M.row_description(plan.client_fields(fields)))
        ended = [False] * len(servers)
        sent = 0  # rows sent; with max_rows (Execute with a row limit) the rest is dropped
        try:
            while not merger.done:
                if max_rows and sent >= max_rows:
                    break
                waiting = merger.waiting
                if not waiting:
                    break
                for i in sorted(waiting):
                    t, body = await self.reply(servers[i], False)
                    if t == P.B_DATA_ROW:
                        merger.push(i, body)
                    elif t == P.B_COMMAND_COMPLETE:
                        ended[i] = True
                        merger.end(i)
                    elif t == P.B_ERROR_RESPONSE:
                        ended[i] = True
                        self.emit(M.message(t, body))
                        await self.skip_rows(servers, ended)
                        return True
                    else:
                        raise E.PgError(E.INTERNAL_ERROR, f"unexpected message {chr(t)!r} in a merged result")
                sent = self.emit_rows(merger.pop_ready(), sent, max_rows)
                if self.out_size >= OUT_FLUSH_BYTES:
                    await self.flush()
            sent = self.emit_rows(merger.pop_ready(), sent, max_rows)
            if max_rows and sent >= max_rows and not self.dropped:
                # Is there a row beyond the limit? Then the portal is suspended, else complete.
                extra = merger.pop_ready()
                while not extra and not merger.done and merger.waiting:
                    for i in sorted(merger.waiting):
                        t, body = await self.reply(servers[i], False)
                        if t == P.B_DATA_ROW:
                            merger.push(i, body)
                        else:
                            ended[i] = True
                            merger.end(i)
                    extra = merger.pop_ready()
                self.dropped += len(extra)
        except MergeError as exc:
            self.error(E.PgError(exc.code, exc.message))
            await self.skip_rows(servers, ended)
            return True
        suspended = bool(max_rows) and self.dropped > 0
        self.dropped = 0
        await self.skip_rows(servers, ended)
        self.emit(M.portal_suspended() if suspended else M.command_complete(f"SELECT {sent}"))
        return False

    def emit_rows(self, rows, sent: int, max_rows: int) -> int:
        for row in rows:
            if max_rows and sent >= max_rows:
                self.dropped += 1
                continue
            self.emit(row)
            sent += 1
        return sent

    async def skip_rows(self, servers, ended: list[bool]) -> None:
        """Drop the rest of each shard's rows up to its end message (bounded: shards got LIMIT n+m)."""
        for i, srv in enumerate(servers):
            while not ended[i]:
                t, _ = await self.reply(srv, False)
                ended[i] = t in (P.B_COMMAND_COMPLETE, P.B_ERROR_RESPONSE, P.B_EMPTY_QUERY_RESPONSE)

    async def relay_statements(self, servers) -> bool:
        """The replies of a simple Query on every server, statement by statement; True on error."""
        live = list(servers)
        failed = False
        while live:
            tags: list[str] = []
            ends = []
            for i, srv in enumerate(live):
                ends.append(await self.read_unit(srv, i == 0, tags, last=i == len(live) - 1))
            if any(t == P.B_COPY_IN_RESPONSE for t, _ in ends):
                failed = await self.copy_in(live, ends)
                continue
            errors = [b for t, b in ends if t == P.B_ERROR_RESPONSE]
            if errors:
                self.emit(M.message(P.B_ERROR_RESPONSE, errors[0]))
                for srv, (t, _) in zip(live, ends):
                    if t != P.B_READY_FOR_QUERY:
                        await self.drain(srv)
                return True
            done = [t == P.B_READY_FOR_QUERY for t, _ in ends]
            if all(done):
                return failed
            if any(done):
                # The shards disagree on how many statements there were: cannot happen for the
                # same text; drain and report rather than guess.
                for srv, d in zip(live, done):
                    if not d:
                        await self.drain(srv)
                self.error(E.PgError(E.INTERNAL_ERROR, "shards answered the query differently"))
                return True
            t0, b0 = ends[0]
            if t0 == P.B_COMMAND_COMPLETE:
                if self.copy_out:
                    self.emit(M.copy_done())  # once, after every shard's rows
                    self.copy_out = False
                # Omnisharded writes ran the same rows on every copy: the client's count is one shard's.
                self.emit(M.command_complete(tags[0] if self.same_rows else sum_tags(tags)))
            else:
                self.emit(M.message(t0, b0))
        return failed

    async def copy_in(self, servers, ends) -> bool:
        """COPY FROM STDIN on these servers: every client CopyData goes to each of them."""
        first = next(b for t, b in ends if t == P.B_COPY_IN_RESPONSE)
        self.emit(M.message(P.B_COPY_IN_RESPONSE, first))
        await self.flush()
        c = self.c
        while True:
            t, body = await c.read_message(self.ctx.max_message_size)
            if t in (P.F_COPY_DATA, P.F_COPY_DONE, P.F_COPY_FAIL):
                for srv in servers:
                    await self.send(srv, M.message(t, body))
                if t != P.F_COPY_DATA:
                    break
            elif t in (P.F_FLUSH, P.F_SYNC):
                continue  # ignored during COPY, as Postgres does
            else:
                for srv in servers:
                    await self.send(srv, M.copy_fail("unexpected message during COPY"))
                raise E.ProtocolViolation(f"unexpected message type {t} during COPY from stdin")
        tags: list[str] = []
        ends = [await self.read_unit(srv, i == 0, tags) for i, srv in enumerate(servers)]
        errors = [b for t, b in ends if t == P.B_ERROR_RESPONSE]
        if errors:
            self.emit(M.message(P.B_ERROR_RESPONSE, errors[0]))
            for srv, (t, _) in zip(servers, ends):
                if t != P.B_READY_FOR_QUERY:
                    await self.drain(srv)
            return True
        self.emit(M.command_complete(tags[0] if self.same_rows else sum_tags(tags)))
        return False

    async def fail_request(self, exc: E.PgError) -> None:
        if exc.fatal:
            raise exc
        self.error(exc)
        if self.in_tx:
            self.tx_failed = True
        self.emit(M.ready_for_query(self.status()))
        await self.release_all()

    # ================================================================ statements pgherd answers
    async def answer_locally(self, route, sql: str, simple: bool) -> bool:
        """Refusals, transaction control, SET, SHOW pgherd.*; True when answered (simple protocol)."""
        if self.tx_failed and route.tx_control not in ("commit", "rollback", "rollback_to"):
            self.error(E.PgError("25P02", _IN_FAILED_TX))
        elif route.refuse is not None:
            self.error(E.PgError(route.refuse_code, route.refuse))
            if self.in_tx:
                self.tx_failed = True
        elif route.tx_control is not None:
            await self.tx_control(route.tx_control, sql)
        elif route.admin_answer is not None:
            self.admin_answer(route.admin_answer)
        elif route.kind == "set":
            await self.set_statement(route, sql)
        else:
            return False
        if simple:
            self.emit(M.ready_for_query(self.status()))
            await self.release_all()
        return True

    async def tx_control(self, kind: str, sql: str) -> None:
        if kind == "begin":
            if self.in_tx:
                self.emit(E.notice_response("there is already a transaction in progress", code="25001", severity="WARNING"))
            else:
                self.in_tx, self.tx_failed, self.prelude = True, False, [sql]
            self.emit(M.command_complete("BEGIN"))
            return
        if kind in ("savepoint", "release", "rollback_to"):
            if not self.in_tx:
                self.error(E.PgError("25P01", f"{kind.upper().replace('_', ' ')} can only be used in transaction blocks"))
                return
            shards = list(self.servers)
            try:
                await self.run_on(shards, sql)
            except ServerError as exc:
                self.error(_server_error(exc))
                self.tx_failed = True
                return
            self.prelude.append(sql)
            if kind == "rollback_to":
                self.tx_failed = False
            tag = {"savepoint": "SAVEPOINT", "release": "RELEASE", "rollback_to": "ROLLBACK"}[kind]
            self.emit(M.command_complete(tag))
            return
        if kind in ("commit", "rollback"):
            if not self.in_tx:
                self.emit(E.notice_response("there is no transaction in progress", code="25P01", severity="WARNING"))
                self.emit(M.command_complete("COMMIT" if kind == "commit" else "ROLLBACK"))
                return
            commit = kind == "commit" and not self.tx_failed
            error = await self.finish_on(list(self.servers), commit, self.two_pc)
            self.in_tx, self.tx_failed, self.prelude = False, False, []
            self.session.end_transaction(commit and error is None)
            if error is not None:
                self.error(error)
            else:
                self.emit(M.command_complete("COMMIT" if commit else "ROLLBACK"))
            return
        # PREPARE TRANSACTION and friends: pgherd's two-phase commit owns them.
        self.error(E.PgError(E.FEATURE_NOT_SUPPORTED,
                             f"{kind.replace('_', ' ').upper()} is not supported on a sharded database"))

    # ================================================================ ending transactions
    async def finish_on(self, shards: list[int], commit: bool, two_phase: bool) -> E.PgError | None:
        """COMMIT (or ROLLBACK) the transaction on these shards; with two-phase commit when it
        spans several shards and two_phase is on. Returns the error the client gets, if any."""
        if commit and two_phase and len(shards) > 1:
            return await self.commit_two_phase(sorted(shards))
        error = None
        for shard in shards:
            try:
                await self.run_on([shard], "COMMIT" if commit and error is None else "ROLLBACK")
            except ServerError as exc:
                error = error or _server_error(exc)
        return error

    async def commit_two_phase(self, shards: list[int]) -> E.PgError | None:
        """shared/twophase.py: decision record, PREPARE everywhere, commit the decision, then the rest."""
        decision = shards[0]
        txid = self.ctx.unique_ids.next_id()
        gids = {s: str(Gid(txid, decision, s)) for s in shards}
        prepared: list[int] = []
        try:
            await self.ensure_decision_table(decision)
            await self.run_on([decision], record_sql(txid))
            for s in shards:
                await self.run_on([s], f"PREPARE TRANSACTION '{gids[s]}'")
                prepared.append(s)
        except ServerError as exc:
            # Phase one failed: nothing is decided; undo everywhere (recovery catches what we miss).
            for s in shards:
                if s in prepared:
                    await self.quietly(s, f"ROLLBACK PREPARED '{gids[s]}'")
                elif self.servers[s].tx != P.TX_IDLE:
                    await self.quietly(s, "ROLLBACK")
            return _server_error(exc)
        try:
            await self.run_on([decision], f"COMMIT PREPARED '{gids[decision]}'")
        except (ServerError, E.PgError) as exc:
            log.warning("two-phase commit %d: the decision could not be committed: %s", txid, exc)
            return E.PgError("08007", "the transaction may or may not have committed: the commit on shard "
                             f"{decision} failed ({exc}); pgherd's recovery settles it",
                             hint="check the data before retrying")
        for s in shards[1:]:
            # Decided: from here on the client gets success; recovery finishes what fails.
            await self.quietly(s, f"COMMIT PREPARED '{gids[s]}'")
        await self.quietly(decision, forget_sql(txid))
        return None

    async def quietly(self, shard: int, sql: str) -> None:
        """A statement whose failure recovery will repair: logged, never raised."""
        try:
            await self.run_on([shard], sql)
        except (ServerError, E.PgError) as exc:
            log.warning("shard %d: %s failed: %s (left to recovery)", shard, sql, exc)

    async def ensure_decision_table(self, shard: int) -> None:
        """Create the decision table once per pool, on a connection of its own (not in the transaction)."""
        pool = self.servers[shard].pool
        if getattr(pool, "decision_table", False):
            return
        s = pool.settings
        try:
            conn = await PgConn.connect(s.host, s.port, user=s.server_user, database=s.database_name,
                                        password=s.server_password, timeout=s.connect_timeout, tls=s.tls,
                                        tls_required=s.tls_required)
        except (ConnectError, ServerError) as exc:
            raise ServerError({"C": E.CONNECTION_FAILURE, "M": f"two-phase commit: {exc}"}) from None
        try:
            await conn.simple_query(CREATE_DECISION_TABLE)
        except ServerError as exc:
            if exc.code not in ("23505", "42P07"):  # created concurrently by another worker
                raise
        finally:
            conn.close()
        pool.decision_table = True

    async def set_statement(self, route, sql: str) -> None:
        change = route.session_change
        if change is not None:
            self.session.apply(change, self.in_tx)
        if route.shards == ():
            self.emit(M.command_complete("RESET" if sql.lstrip().upper().startswith("RESET") else "SET"))
            return  # pgherd.shard / pgherd.sharding_key: never forwarded
        # A real setting: check it on one server (the transaction's, or any), then remember it so
        # every server this client uses gets it (worker/pool.sync_params).
        shards = list(self.servers) or [self.targets(route._replace(any_one=True))[0]]
        try:
            for shard in shards:
                await self.server(shard)
            await self.run_on(shards, sql)
        except ServerError as exc:
            self.error(_server_error(exc))
            if self.in_tx:
                self.tx_failed = True
            return
        except E.PgError as exc:
            self.error(exc)
            return
        self.remember_settings(sql, [self.servers[s] for s in shards])
        self.emit(M.command_complete("RESET" if sql.lstrip().upper().startswith("RESET") else "SET"))

    def remember_settings(self, sql: str, ran_on) -> None:
        """Record the SET/RESETs of sql as the client's settings, for every server it uses later.

        The servers it ran on no longer match what pool.sync_params believes they hold: the
        names it changed are marked unknown there, so the next sync sets or resets them."""
        changes, _ = session_analyze(sql)
        settings, startup = self.c.settings, self.c.startup
        for srv in ran_on:
            names = set(srv.set_params) | set(settings) if any(ch.kind == "reset_all" for ch in changes) \
                else {ch.name for ch in changes if ch.name}
            srv.set_params = {**srv.set_params, **{name: _UNKNOWN for name in names}}
        for ch in changes:
            if ch.local:
                continue
            if ch.kind == "set":
                settings[ch.name] = ch.value
            elif ch.kind == "reset" and ch.name in startup:
                settings[ch.name] = startup[ch.name]
            elif ch.kind == "reset":
                settings.pop(ch.name, None)
            elif ch.kind == "reset_all":
                settings.clear()
                settings.update(startup)

    def admin_shape(self, answer) -> bytes:
        column, oid = ("shards", _TEXT) if answer[0] == "pgherd.shards" else ("unique_id", _INT8)
        return M.row_description([M.Field(column, type_oid=oid)])

    def admin_answer(self, answer, describe: bool = True) -> None:
        """SHOW pgherd.shards (the count) and SHOW pgherd.unique_id (a new id)."""
        name, value = answer
        if describe:
            self.emit(self.admin_shape(answer))
        value = str(value) if name == "pgherd.shards" else str(self.ctx.unique_ids.next_id())
        self.emit(M.data_row([value]))
        self.emit(M.command_complete("SHOW"))

    # ================================================================ extended protocol
    async def extended(self) -> None:
        """Run the batch of extended-protocol messages up to Sync (or Flush)."""
        batch, self.batch = self.batch, []
        synced = batch[-1][0] == P.F_SYNC
        units: list[_Unit] = []
        for t, body in batch:
            if t == P.F_SYNC:
                units.extend(await self.unexecuted_portals())
                units.append(_Unit(sync=True))
                continue
            if self.batch_failed:
                continue  # after an error, everything up to Sync is skipped (as Postgres does)
            try:
                unit = await self.plan_message(t, body)
            except E.PgError as exc:
                if exc.fatal:
                    raise
                units.append(_Unit(local=exc.to_bytes()))
                self.batch_failed = True
                continue
            if unit is not None:
                units.append(unit)
        if synced:
            self.batch_failed = False
        await self.run_units(units, synced)

    async def plan_message(self, t: int, body: bytes) -> _Unit | None:
        if t == P.F_PARSE:
            msg = M.read_parse(body)
            self.statements[msg.name] = (msg.query, list(msg.param_types))
            return _Unit(local=M.parse_complete())
        if t == P.F_CLOSE:
            kind, name = M.read_describe_or_close(body)
            (self.statements if kind == "S" else self.portals).pop(name, None)
            return _Unit(local=M.close_complete())
        if t == P.F_BIND:
            msg = M.read_bind(body)
            stmt = self.statements.get(msg.statement)
            if stmt is None:
                raise E.PgError("26000", f'prepared statement "{msg.statement}" does not exist')
            self.portals[msg.portal] = _Portal(msg, stmt)
            return None  # sent with its Execute (or at Sync)
        if t == P.F_DESCRIBE:
            kind, name = M.read_describe_or_close(body)
            if kind == "S":
                stmt = self.statements.get(name)
                if stmt is None:
                    raise E.PgError("26000", f'prepared statement "{name}" does not exist')
                sql, types = stmt
                route = self.route(sql)
                if _calls_unique_id(route, sql):
                    sql = self.with_unique_ids(sql)  # Postgres has no pgherd.unique_id() to describe
                    route = self.route(sql)
                if route.tx_control is not None or route.kind == "set" or route.admin_answer is not None:
                    shape = M.no_data() if route.admin_answer is None else self.admin_shape(route.admin_answer)
                    return _Unit(local=M.parameter_description([]) + shape)
                shard = self.targets(route._replace(any_one=True))[0]
                return _Unit(shards=[shard], messages=M.parse("", sql, types) + M.describe("S", ""),
                             parse=True, describe="S")
            portal = self.portals.get(name)
            if portal is None:
                raise E.PgError("34000", f'portal "{name}" does not exist')
            if portal.shards is not None:
                return _Unit(shards=portal.shards, messages=M.describe("P", ""), describe="P")
            portal.describe = True  # answered with its Execute, or at Sync
            return None
        if t == P.F_EXECUTE:
            name, max_rows = M.read_execute(body)
            portal = self.portals.get(name)
            if portal is None:
                raise E.PgError("34000", f'portal "{name}" does not exist')
            return await self.portal_unit(portal, max_rows)
        return None  # Flush

    async def unexecuted_portals(self) -> list[_Unit]:
        """Bound (and maybe described) portals never executed: their BindComplete is still due."""
        units = []
        for portal in self.portals.values():
            if portal.shards is None and not self.batch_failed:
                try:
                    units.append(await self.portal_unit(portal, None))
                except E.PgError as exc:
                    units.append(_Unit(local=exc.to_bytes()))
                    self.batch_failed = True
        self.portals = {k: p for k, p in self.portals.items() if self.in_tx and p.shards is not None}
        return units

    async def portal_unit(self, portal: "_Portal", max_rows) -> _Unit:
        """The messages that run a bound portal on its shards: Parse + Bind [+ Describe] [+ Execute]."""
        execute = max_rows is not None
        if portal.shards is not None:
            # Already bound on its shards (an Execute with a row limit, continued).
            if portal.local is not None or len(portal.shards) > 1:
                raise E.PgError(E.FEATURE_NOT_SUPPORTED, "this portal cannot be fetched again")
            return _Unit(shards=portal.shards, messages=M.execute("", max_rows or 0), execute=execute)
        msg, (sql, types) = portal.bind, portal.stmt
        bind = Bind(msg.params, msg.param_formats, types)
        route = self.route(sql, bind)
        if self.tx_failed and route.tx_control not in ("commit", "rollback", "rollback_to"):
            raise E.PgError("25P02", _IN_FAILED_TX)
        if _calls_unique_id(route, sql):
            sql = self.with_unique_ids(sql)
            route = self.route(sql, bind)
        sql, route = await self.add_ids(sql, route, bind)
        rewritten = self.rewritten_write(route, sql, bind, msg.result_formats, portal.describe, execute)
        if rewritten is not None:
            portal.shards, portal.local, portal.describe = rewritten.shards, "rewritten", False
            return rewritten
        if route.refuse is not None:
            raise E.PgError(route.refuse_code, route.refuse)
        portal.shards = ()
        if route.tx_control is not None or route.kind == "set" or route.admin_answer is not None:
            portal.local = route
            return _Unit(local_route=(route, sql, execute, portal.describe))
        if execute and max_rows and route.cross_shard and route.kind != "select":
            raise E.PgError(E.FEATURE_NOT_SUPPORTED,
                            "fetching a cross-shard result in parts (Execute with a row limit) is not supported; "
                            "fetch all rows, or filter by the sharding key")
        portal.shards = self.targets(route)
        if len(portal.shards) > 1 and execute and (route.needs_merge or max_rows):
            plan = self.merge_plan(sql)
            data = [M.parse("", plan.shard_sql, types),
                    M.bind("", "", msg.params, msg.param_formats, plan.shard_formats(msg.result_formats)),
                    M.describe("P", ""), M.execute("", 0)]
            unit = _Unit(shards=portal.shards, messages=b"".join(data), parse=True, bind=True, execute=True)
            unit.merge = (plan, portal.describe, bind, msg.result_formats, max_rows)
            portal.local = "fetched"  # its rows beyond max_rows are gone: it cannot be fetched again
            unit.kind = route.kind
            portal.describe = False
            return unit
        data = [M.parse("", sql, types), M.bind("", "", msg.params, msg.param_formats, msg.result_formats)]
        if portal.describe:
            data.append(M.describe("P", ""))
        if execute:
            data.append(M.execute("", max_rows))
        unit = _Unit(shards=portal.shards, messages=b"".join(data), parse=True, bind=True,
                     describe="P" if portal.describe else None, execute=execute)
        unit.kind = route.kind
        portal.describe = False
        return unit

    async def run_units(self, units: list[_Unit], synced: bool) -> None:
        """Run the units in request order: each is sent (ending with Flush) to its shards and its
        replies are forwarded before the next one goes out, so nothing runs after an error."""
        involved: list[int] = []
        for u in units:
            for s in u.shards:
                if s not in involved:
                    involved.append(s)
        wrap = len(involved) > 1 and not self.in_tx and any(u.kind in _WRITE_KINDS for u in units)
        try:
            servers = {s: await self.server(s) for s in involved}
            for u in units:
                if u.merge is not None:
                    await self.collation(servers[u.shards[0]])
            if wrap:
                await self.run_on(involved, "BEGIN")
        except E.PgError as exc:
            if exc.fatal:
                raise
            self.error(exc)
            if self.in_tx:
                self.tx_failed = True
            self.emit(M.ready_for_query(self.status()))
            self.batch_failed = not synced
            await self.release_all()
            return
        # The last remote step before a Sync goes out with the Sync itself: one round trip.
        with_sync = {}
        pending = None
        for k, u in enumerate(units):
            if u.sync:
                if pending is not None:
                    with_sync[pending] = True
                pending = None
            elif u.messages and u.special is None:
                pending = k
            elif u.special is not None:
                pending = None
        failed = False
        for k, u in enumerate(units):
            if u.sync:
                await self.end_sync(failed, wrap)
                failed = False
                continue
            if failed:
                continue  # the servers skip to Sync after an error; so does the client
            if u.special is not None:
                failed = await u.special([servers[s] for s in u.shards])
            elif u.local_route is not None:
                await self.local_unit(*u.local_route)
                failed = self.tx_failed and self.in_tx
            elif u.local:
                self.emit(u.local)
                failed = u.local[0] == P.B_ERROR_RESPONSE
            else:
                last = with_sync.get(k, False)
                for s in u.shards:
                    if last:
                        self.synced.add(s)
                    else:
                        self.unsynced.add(s)
                    await self.send(servers[s], u.messages + (_SYNC if last else _FLUSH))
                failed = await self.relay_unit([servers[s] for s in u.shards], u)
            if failed and self.in_tx:
                self.tx_failed = True
        if not synced:
            self.batch_failed = self.batch_failed or failed
            await self.flush()

    async def reply(self, srv, first: bool) -> tuple[int, bytes]:
        """srv's next reply that is not a notice (notices are forwarded from every shard)."""
        while True:
            t, body = await self.read(srv)
            if t == P.B_NOTICE_RESPONSE or t == P.B_NOTIFICATION_RESPONSE:
                self.emit(M.message(t, body))
            elif t == P.B_PARAMETER_STATUS:
                name, value = M.read_parameter_status(body)
                srv.conn.params[name] = value
                if first:
                    self.emit(M.message(t, body))
            else:
                return t, body

    async def relay_unit(self, servers, unit: _Unit) -> bool:
        """Forward one unit's replies from its servers, combined; True if it failed."""
        if unit.merge is not None:
            return await self.relay_merged(servers, unit)
        tags: list[str] = []
        ends = []
        for i, srv in enumerate(servers):
            ends.append(await self.unit_replies(srv, unit, i == 0, tags))
        errors = [b for t, b in ends if t == P.B_ERROR_RESPONSE]
        if errors:
            self.emit(M.message(P.B_ERROR_RESPONSE, errors[0]))
            return True
        if unit.execute:
            t0, b0 = ends[0]
            if t0 == P.B_COMMAND_COMPLETE:
                self.emit(M.command_complete(sum_tags(tags)))
            else:
                self.emit(M.message(t0, b0))
        return False

    async def relay_merged(self, servers, unit: _Unit) -> bool:
        """A merged cross-shard Execute: ParseComplete and BindComplete from each shard, then merge."""
        plan, describe, bind, formats, max_rows = unit.merge
        for i, srv in enumerate(servers):
            for want in (P.B_PARSE_COMPLETE, P.B_BIND_COMPLETE):
                t, body = await self.reply(srv, False)
                if t == P.B_ERROR_RESPONSE:
                    self.emit(M.message(t, body))
                    return True
        self.emit(M.bind_complete())
        try:
            collation = getattr(servers[0].pool, "datcollate", None) or "C"
            return await self.merge_replies(plan, servers, describe, collation, bind=bind, formats=formats,
                                            max_rows=max_rows)
        except E.PgError as exc:
            if exc.fatal:
                raise
            self.error(exc)
            return True

    async def unit_replies(self, srv, unit: _Unit, first: bool, tags: list[str]) -> tuple[int, bytes]:
        """Read one server's replies to a unit; returns the last message (or the ErrorResponse)."""
        expected = []
        if unit.parse:
            expected.append(P.B_PARSE_COMPLETE)
        if unit.bind:
            expected.append(P.B_BIND_COMPLETE)
        if unit.describe == "S":
            expected.append(P.B_PARAMETER_DESCRIPTION)
        if unit.describe:
            expected.append(P.B_ROW_DESCRIPTION)
        t, body = 0, b""
        for want in expected:
            t, body = await self.reply(srv, first)
            if t == P.B_ERROR_RESPONSE:
                return t, body
            if first and want != P.B_PARSE_COMPLETE:
                self.emit(M.message(t, body))  # BindComplete, ParameterDescription, RowDescription/NoData
        if unit.execute:
            t, body = await self.read_unit(srv, first, tags)
        return t, body

    async def local_unit(self, route, sql: str, executes: bool, describe: bool) -> None:
        """A Bind/Execute of a statement pgherd answers (BEGIN, SET, SHOW pgherd.shards)."""
        self.emit(M.bind_complete())
        if describe and route.admin_answer is None:
            self.emit(M.no_data())
        describe = describe and route.admin_answer is not None
        if not executes:
            return
        if route.admin_answer is not None:
            self.admin_answer(route.admin_answer, describe)
        elif route.tx_control is not None:
            await self.tx_control(route.tx_control, sql)
        else:
            await self.set_statement(route, sql)

    async def end_sync(self, failed: bool, wrap: bool) -> None:
        """Sync: every server that got messages since the last Sync answers with ReadyForQuery."""
        shards = [s for s in self.servers if s in self.unsynced and s not in self.synced]
        for s in shards:
            await self.send(self.servers[s], _SYNC)
        for s in self.servers:
            if s in self.unsynced or s in self.synced:
                await self.drain(self.servers[s])
        self.unsynced.clear()
        self.synced.clear()
        if wrap:
            error = await self.finish_on(list(self.servers), not failed, self.two_pc_auto)
            if error is not None:
                self.error(error)
        self.emit(M.ready_for_query(self.status()))
        await self.release_all()


class _CopyOut:
    """Joins several shards' COPY … TO STDOUT streams into the one file the client expects.

    Postgres sends a CSV header line as the first CopyData; a binary file starts with its 19-byte
    header (signature, flags, extension length) plus extension and ends with the int16 -1 trailer
    ("COPY", File Formats). Only the first shard's header and the last shard's trailer are kept.
    """

    __slots__ = ("header", "binary", "started", "skip", "held")

    def __init__(self, header: bool, binary: bool) -> None:
        self.header, self.binary = header, binary
        self.started = False  # the current shard sent its first CopyData
        self.skip = 0  # binary: header bytes of the current shard still to drop
        self.held = b""  # binary: the last 2 bytes seen (the trailer, once the shard ends)

    @classmethod
    def of(cls, sql: str) -> "_CopyOut | None":
        try:
            stmts = parse_statements(sql)
        except ParseError:
            return None
        copy = stmts[0].get("CopyStmt") if len(stmts) == 1 else None
        if copy is None or copy.get("is_from"):
            return None
        try:
            options = parse_copy_options(copy.get("options", []))
        except CopySplitError:
            return None  # Postgres reports the bad option
        fmt, header = options.format, options.format == "csv" and options.header != "false"
        return cls(header, fmt == "binary") if header or fmt == "binary" else None

    def data(self, first: bool, payload: bytes) -> bytes:
        if not self.started:
            self.started = True
            if self.header and not first:
                return b""  # the header line again
            if self.binary and not first:
                self.skip = -1  # drop the header once its length is known
        if not self.binary:
            return payload
        data = self.held + payload
        if self.skip == -1 and len(data) >= 19:
            self.skip = 19 + int.from_bytes(data[15:19], "big")
        if self.skip > 0:
            cut = min(self.skip, len(data))
            data, self.skip = data[cut:], self.skip - cut
        if self.skip == -1:
            self.held = data
            return b""
        self.held = data[-2:]
        return data[:-2]

    def end(self, last: bool) -> bytes:
        """At a shard's end: the held trailer for the last shard, nothing for the others."""
        held, self.held, self.started, self.skip = self.held, b"", False, 0
        return held if last and self.binary else b""


class _Portal:
    __slots__ = ("bind", "stmt", "describe", "shards", "local")

    def __init__(self, bind, stmt) -> None:
        self.bind = bind
        self.stmt = stmt
        self.describe = False
        self.shards = None  # set when sent to its shards
        self.local = None  # the route, when pgherd answers it


def _shape(field) -> tuple:
    """What must agree between shards' RowDescriptions (table OIDs differ from one database to another)."""
    return field.name, field.type_oid, field.type_size, field.type_modifier, field.format


def _calls_unique_id(route, sql: str) -> bool:
    """Whether sql calls pgherd.unique_id() (a refused route does not say: the call may be why)."""
    return route.unique_id_calls or (route.refuse is not None and _UNIQUE_ID_CALL.search(sql) is not None)


def _call_locations(node, out: dict, rows: bool = False) -> None:
    """Byte offsets of pgherd.unique_id() / pgdog.unique_id() calls in a parse tree -> whether
    the call sits in a SELECT with a FROM clause (which may produce many rows)."""
    if type(node) is list:
        for x in node:
            _call_locations(x, out, rows)
    elif type(node) is dict:
        select = node.get("SelectStmt")
        if select is not None and select.get("fromClause"):
            rows = True
        call = node.get("FuncCall")
        if call is not None:
            names = [n.get("String", {}).get("sval", "").lower() for n in call.get("funcname", [])]
            if len(names) == 2 and names[0] in ("pgherd", "pgdog") and names[1] == "unique_id":
                out[call.get("location", -1)] = rows
        for v in node.values():
            if type(v) is dict or type(v) is list:
                _call_locations(v, out, rows)


def _server_error(exc: ServerError) -> E.PgError:
    f = exc.fields
    return E.PgError(exc.code, f.get("M", str(exc)), detail=f.get("D"), hint=f.get("H"))

