"""The routing decision: which shards a query goes to, and whether it can be answered correctly.

    plan = ShardingPlan.from_config(config, "prod")      # once per config
    router = Router(plan)                                # once per worker (owns the cache)
    if not plan.trivial:
        route = router.route(sql, bind, session)         # per Query, or per Bind

`Route` is an immutable NamedTuple (routes are cached and shared: never mutate one). Decisions,
in order:

1. Statements that are not about table data: transaction control (tx_control), SET / RESET
   (session_change; pgherd.* variables are answered by pgherd, shards=()), SHOW pgherd.shards /
   pgherd.unique_id (admin_answer), session statements (DISCARD, DEALLOCATE, LISTEN...).
2. Manual routing: a /* pgherd_shard: N */ or /* pgherd_sharding_key: V */ comment, else the
   session's SET pgherd.shard / pgherd.sharding_key. It overrides everything below.
3. Schema sharding: tables in a [[sharded_schemas]] schema (qualified, or unqualified and the
   session's search_path names a sharded schema first) go to that schema's shard.
4. DDL and maintenance go to every shard (write_all).
5. Writes to omnisharded tables go to every shard (write_all, omnisharded); reads of only
   omnisharded tables, system catalogs, or no table at all go to any one shard (any_one: the
   caller picks, round robin or sticky per client when `sticky`).
6. Key-sharded tables: the shards the sharding-key conditions allow (see analyze.py); INSERT goes
   to the shards of its rows (split_insert when rows span shards).
7. Refusals (SQLSTATE 0A000 unless stated): shapes whose per-shard answer would be wrong.
"""

from __future__ import annotations

from typing import Any, Collection, NamedTuple, Optional, Union

from .analyze import CATALOG, OMNI, SCHEMA, UNKNOWN, Analyzer, Cond, StmtInfo
from .comments import NO_HINTS, Hints, manual_hints
from .params import Bind, parse_binary_array, parse_text_array
from .parse import ByteLRU, ParseError, parse_statements, text_bytes
from .sharding import INVALID
from .plan import CATALOG_SCHEMAS, ShardingPlan
from .session import PGHERD_VARIABLES, SessionChange

__all__ = ["ALL", "Bind", "CacheStats", "Route", "Router"]

# Route cache budget per worker: a cached entry is its query text plus an analysis of a few hundred
# bytes, so 16 MiB holds tens of thousands of distinct statements -- far more than applications
# use -- while staying small next to a worker's connection buffers.
ROUTE_CACHE_BYTES = 16 * 1024 * 1024
# Do not cache a statement whose entry would take more than this share of the cache: giant texts
# (bulk INSERTs with inline values) are usually unique and would evict the statements that repeat.
MAX_ENTRY_FRACTION = 64
# Fixed cost of one cache entry beyond its text: the entry, StmtInfo, scopes and refs (measured
# with tracemalloc on a typical join with a WHERE clause: about 2.3 KB); per condition leaf, a small tuple.
ENTRY_OVERHEAD_BYTES = 2304
LEAF_BYTES = 120
# Parameterized statements memoize routes per shard set; a statement touches few distinct sets.
MEMO_MAX = 64

# Kinds subject to cross_shard_disabled (data reads and writes; not DDL, SET, transaction control).
_DATA_KINDS = frozenset(("select", "insert", "update", "delete", "merge", "copy", "cursor"))
# Kinds counted as direct or cross-shard in the cache statistics (statements that read or write data).
_COUNTED_KINDS = frozenset(("select", "insert", "update", "delete", "merge", "copy", "cursor", "explain", "ddl",
                            "utility"))
# Kinds whose cross-shard result rows are concatenated and may need merging.
_READ_KINDS = frozenset(("select", "cursor", "copy"))
# Kinds manual routing applies to (a session SET pgherd.shard does not redirect SET or BEGIN).
_MANUAL_KINDS = _DATA_KINDS | {"ddl", "utility", "prepare", "execute"}
_SHOW_SHARDS = frozenset(("pgherd.shards", "pgdog.shards"))
_SHOW_UNIQUE_ID = frozenset(("pgherd.unique_id", "pgdog.unique_id"))


class _All:
    """Every shard of the database (Route.shards)."""

    __slots__ = ()
    _instance: Optional["_All"] = None

    def __new__(cls) -> "_All":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "ALL"

    def __reduce__(self) -> str:
        return "ALL"


ALL = _All()


class Route(NamedTuple):
    """Where a query goes and how to treat it. Shared and cached: treat as read-only.

    kind          "select" "insert" "update" "delete" "merge" "copy" "cursor" "ddl" "utility"
                  "tx" "set" "show" "session" "prepare" "execute" "empty" "unparsed"
    shards        tuple of shard numbers, or ALL; () when pgherd answers itself
    read          a plain read (SELECT without FOR UPDATE/SHARE or writing CTEs, SHOW, EXPLAIN
                  without ANALYZE of a write, COPY TO); False for writes, DDL, unparsable text
    cross_shard   needs more than one shard
    any_one       any single shard will do (shards is ALL): the caller picks one
    sticky        with any_one: keep using the same shard for this client
    omnisharded   reads or writes omnisharded tables only (and catalogs)
    write_all     must run on every shard by nature (DDL, maintenance, omnisharded writes)
    needs_merge   constructs whose cross-shard results must be combined (ORDER BY, LIMIT, OFFSET,
                  aggregate, GROUP BY, HAVING, DISTINCT, window function, UNION, INTERSECT,
                  EXCEPT, EXPLAIN); empty unless cross_shard
    split_insert  a multi-row INSERT whose rows belong to different shards (must be split)
    split_copy    COPY FROM into a sharded table (rows must be split by key)
    refuse        an error message for the client (refuse_code is its SQLSTATE); do not forward
    tx_control    "begin" "commit" "rollback" "savepoint" "release" "rollback_to" "prepare"
                  "commit_prepared" "rollback_prepared"
    session_change  a SET/RESET of pgherd.shard, pgherd.sharding_key or search_path to track
    admin_answer  ("pgherd.shards", count) or ("pgherd.unique_id", None): pgherd answers
    unique_id_calls  the statement calls pgherd.unique_id() / pgdog.unique_id()
    follow_tx     FETCH / CLOSE: send to the shards the transaction already uses
    role          "primary" | "replica" from a /* pgherd_role: ... */ comment
    manual        "comment" | "session" when manual routing decided the shard
    params_needed the route depends on Bind values that were not given (shards is a superset)
    statements    number of statements in the query text

    Transaction control, SET and session statements have shards=ALL and cross_shard=False: they go
    to whichever servers the client's transaction or session uses (the caller knows which).
    """

    kind: str
    shards: Union[tuple[int, ...], _All]
    read: bool = False
    cross_shard: bool = False
    any_one: bool = False
    sticky: bool = False
    omnisharded: bool = False
    write_all: bool = False
    needs_merge: frozenset = frozenset()
    split_insert: bool = False
    split_copy: bool = False
    refuse: Optional[str] = None
    refuse_code: str = "0A000"
    tx_control: Optional[str] = None
    session_change: Optional[SessionChange] = None
    admin_answer: Optional[tuple] = None
    unique_id_calls: bool = False
    follow_tx: bool = False
    role: Optional[str] = None
    manual: Optional[str] = None
    params_needed: bool = False
    statements: int = 1

    def shard_list(self, shard_count: int) -> tuple[int, ...]:
        """The shards as a tuple, expanding ALL."""
        return tuple(range(shard_count)) if self.shards is ALL else self.shards  # type: ignore[return-value]


class CacheStats(NamedTuple):
    """For SHOW QUERY_CACHE: route cache counters of one worker."""

    hits: int
    misses: int
    entries: int
    bytes: int
    evictions: int
    direct: int
    cross_shard: int
    refused: int


class _Entry:
    """A cached query text: its statements' analyses, comment hints and, when fixed, its route."""

    __slots__ = ("infos", "hints", "static", "error")

    def __init__(self, infos: tuple[StmtInfo, ...], hints: Hints, error: Optional[str] = None) -> None:
        self.infos, self.hints, self.error = infos, hints, error
        self.static: Optional[Route] = None


class _Refuse(Exception):
    def __init__(self, message: str, code: str = "0A000") -> None:
        self.message, self.code = message, code


def _popcount(mask: int) -> int:
    return bin(mask).count("1")


class Router:
    """Routes query texts for one ShardingPlan, with a route cache bounded by bytes.

    mergeable: needs_merge constructs the caller can combine (others are refused with 0A000);
    split_inserts / split_copy: whether the caller splits multi-shard INSERT rows / COPY data
    (if not, such statements are refused rather than sent whole to several shards).
    """

    def __init__(
        self,
        plan: ShardingPlan,
        *,
        cache_bytes: int = ROUTE_CACHE_BYTES,
        mergeable: Collection[str] = (),
        split_inserts: bool = False,
        split_copy: bool = False,
    ) -> None:
        self.plan = plan
        self.all = plan.all_mask
        self.multi = plan.shards > 1
        self.mergeable = frozenset(mergeable)
        self.split_inserts = split_inserts
        self.split_copy = split_copy
        self._analyzer = Analyzer(plan)
        self._cache: ByteLRU[str, _Entry] = ByteLRU(cache_bytes, max(1, cache_bytes // MAX_ENTRY_FRACTION))
        self._shards_of: dict[int, tuple[int, ...]] = {}
        self.direct = self.cross = self.refused = 0
        self._missing = False

    # -- public ---------------------------------------------------------------------------------

    def route(self, sql: str, bind: Optional[Bind] = None, session: Any = None) -> Route:
        """The Route for a query text (simple Query, or Parse text with its Bind values).

        session: anything with .shard, .sharding_key and .search_path (a RoutingSession), or None.
        """
        entry = self._cache.get(sql)
        if entry is None:
            entry = self._build(sql)
        manual = session is not None and (session.shard is not None or session.sharding_key is not None)
        static = entry.static
        if static is not None and not (manual and static.kind in _MANUAL_KINDS):
            route = static
        else:
            route = self._compute(entry, bind, session)
        if route.refuse is not None:
            self.refused += 1
        elif route.kind in _COUNTED_KINDS:
            if route.cross_shard:
                self.cross += 1
            else:
                self.direct += 1
        return route

    def stats(self) -> CacheStats:
        c = self._cache
        return CacheStats(c.hits, c.misses, len(c), c.bytes, c.evictions, self.direct, self.cross, self.refused)

    def cached_queries(self) -> list[tuple[str, Optional[Route]]]:
        """(query text, its fixed route or None when it depends on parameters/session), LRU first."""
        return [(sql, e.static) for sql, e in self._cache.items()]

    # -- building cache entries -----------------------------------------------------------------

    def _build(self, sql: str) -> _Entry:
        try:
            stmts = parse_statements(sql)
        except ParseError as e:
            entry = _Entry((), NO_HINTS, error=str(e))
            entry.static = Route("unparsed", ALL, any_one=True)
            self._cache.put(sql, entry, text_bytes(sql) + ENTRY_OVERHEAD_BYTES)
            return entry
        hints = manual_hints(sql)
        try:
            infos = tuple(self._analyzer.analyze(s) for s in stmts)
        except Exception as e:  # a bug in the analyzer must not take the worker down: refuse this query
            entry = _Entry((), hints, error=repr(e))
            entry.static = Route("unparsed", (), refuse_code="XX000", refuse=(
                f"pgherd could not analyze this statement for routing ({type(e).__name__}: {e}); please report it, "
                "and route it meanwhile with /* pgherd_shard: N */"))
            return entry
        entry = _Entry(infos, hints)
        if not any(i.params or i.path_dependent for i in infos):
            entry.static = self._compute(entry, None, None)
        leaves = sum(len(i.insert_rows or ()) + len(i.checks) + len(i.key_sets) for i in infos)
        self._cache.put(sql, entry, text_bytes(sql) + ENTRY_OVERHEAD_BYTES * max(1, len(infos)) + leaves * LEAF_BYTES)
        return entry

    # -- deciding -------------------------------------------------------------------------------

    def _compute(self, entry: _Entry, bind: Optional[Bind], session: Any) -> Route:
        infos = entry.infos
        if not infos:
            return Route("empty", ALL, read=True, any_one=True)
        if len(infos) == 1:
            return self._decide(infos[0], entry.hints, bind, session)
        return self._combine([self._decide(i, entry.hints, bind, session) for i in infos])

    def _decide(self, info: StmtInfo, hints: Hints, bind: Optional[Bind], session: Any) -> Route:
        special = self._special(info)
        if special is not None:
            return special
        self._missing = False  # set by _ev when a needed Bind value is absent
        try:
            manual = self._manual(info, hints, session)
            if manual is not None:
                return manual
            if not self.multi:
                route = Route(info.kind, (0,), read=info.read, unique_id_calls=info.unique_id, role=hints.role,
                              write_all=info.write_all)
            else:
                route = self._automatic(info, hints, bind, session)
        except _Refuse as r:
            route = Route(info.kind, (), read=info.read, refuse=r.message, refuse_code=r.code)
        if info.explain is not None:
            # EXPLAIN prints one plan per server: several shards' plans need combining.
            if route.cross_shard and route.refuse is None and "EXPLAIN" not in self.mergeable:
                route = route._replace(shards=(), cross_shard=False, refuse=(
                    "cross-shard EXPLAIN is not supported yet: the statement needs several shards; "
                    "filter by the sharding key, or route with /* pgherd_shard: N */"))
            route = route._replace(kind="explain")
        return route

    def _special(self, info: StmtInfo) -> Optional[Route]:
        kind = info.kind
        if kind == "tx":
            return Route("tx", ALL, read=True, tx_control=info.special)
        if kind == "set":
            change: Optional[SessionChange] = info.special
            if change is None:
                return Route("set", ALL, read=True)
            if change.error is not None:
                return Route("set", (), read=True, refuse=change.error, refuse_code="22023")
            if change.variable in PGHERD_VARIABLES:
                if change.variable == "shard" and change.value is not None and not 0 <= change.value < self.plan.shards:
                    return Route("set", (), read=True, refuse_code="22023", refuse=(
                        f"pgherd.shard = {change.value} does not exist: database {self.plan.database} has shards "
                        f"0 to {self.plan.shards - 1}"))
                return Route("set", (), read=True, session_change=change)
            return Route("set", ALL, read=True, session_change=change)
        if kind == "show":
            if info.special in _SHOW_SHARDS:
                return Route("show", (), read=True, admin_answer=("pgherd.shards", self.plan.shards))
            if info.special in _SHOW_UNIQUE_ID:
                return Route("show", (), read=True, admin_answer=("pgherd.unique_id", None))
            return Route("show", ALL, read=True, any_one=True)
        if kind == "session":
            return Route("session", ALL, read=True)
        if info.follow_tx:
            return Route("cursor", ALL, read=True, follow_tx=True)
        return None

    def _manual(self, info: StmtInfo, hints: Hints, session: Any) -> Optional[Route]:
        shard, key, source = hints.shard, hints.sharding_key, "comment"
        if shard is None and key is None:
            if session is None:
                return None
            shard, key, source = session.shard, session.sharding_key, "session"
            if shard is None and key is None:
                return None
        plan = self.plan
        if shard is not None:
            if not 0 <= shard < plan.shards:
                raise _Refuse(f"shard {shard} does not exist: database {plan.database} has shards 0 to "
                              f"{plan.shards - 1}", "22023")
            mask = 1 << shard
        else:
            mask = self._key_mask(str(key))
        return self._finish(info, mask, hints, manual=source)

    def _key_mask(self, key: str) -> int:
        """Shards for a manual sharding key: a sharded schema's name, else the common function."""
        plan = self.plan
        if key in plan.schemas:
            return plan.schemas[key]
        fn = plan.common_fn
        if fn is None:
            if not plan.rules:
                raise _Refuse(f"pgherd_sharding_key {key!r} names no sharded schema, and database "
                              f"{plan.database} has no sharded tables", "22023")
            raise _Refuse(f"pgherd_sharding_key is ambiguous: database {plan.database} shards tables with "
                          "different functions; use pgherd_shard instead", "22023")
        value = fn.text_value(key)
        if value is INVALID:
            raise _Refuse(f"pgherd_sharding_key {key!r} is not a valid {fn.data_type}", "22P02")
        return fn.mask(value) or self.all

    def _automatic(self, info: StmtInfo, hints: Hints, bind: Optional[Bind], session: Any) -> Route:
        if info.refuse is not None:
            raise _Refuse(info.refuse.message, info.refuse.code)
        plan = self.plan
        refs = info.refs
        path_mask = None
        if info.path_dependent and session is not None:
            path_mask = plan.schema_for_path(session.search_path)
        # Schema sharding first (PgDog: the schema wins over a sharding key).
        schema_mask = self._schema_mask(info, path_mask)
        if schema_mask is not None:
            if schema_mask == 0:
                raise _Refuse("the statement uses tables of schemas that live on different shards; "
                              "send it per schema")
            return self._finish(info, schema_mask, hints)
        if info.write_all:
            return Route(info.kind, ALL, read=False, cross_shard=True, write_all=True,
                         unique_id_calls=info.unique_id, role=hints.role)
        target = info.target
        key_refs = [r for r in refs if r.key_sharded]
        writes = (info.kind in ("insert", "update", "delete", "merge") or (info.kind == "copy" and not info.read)) \
            and info.explain != "plain"  # EXPLAIN without ANALYZE does not execute the write
        if writes and target is not None and target.kind in (OMNI, CATALOG):
            if key_refs:
                raise _Refuse(f"a write to omnisharded table {target.qualified} that reads sharded table "
                              f"{key_refs[0].qualified} would leave the shards' copies different")
            self._no_unknown(refs)
            return Route(info.kind, ALL, read=False, cross_shard=True, write_all=True, omnisharded=True,
                         unique_id_calls=info.unique_id, role=hints.role)
        if not key_refs and not info.catalog_all:
            self._no_unknown(refs)
            sticky = any(r.sticky for r in refs)
            return Route(info.kind, ALL, read=info.read, any_one=True, sticky=sticky, omnisharded=bool(refs),
                         unique_id_calls=info.unique_id, role=hints.role)
        if info.kind == "insert" and info.insert_count:
            mask = info.insert_const
            for leaf in info.insert_rows or ():
                m = self._ev(leaf, bind)
                if m < 0:
                    table = target.qualified if target is not None else "the table"
                    raise _Refuse(f"a row of {table} has a sharding key value that no shard holds (NULL or "
                                  "invalid, or no mapping rule matches)", "23514")
                mask |= m
        elif info.catalog_all and not key_refs:
            mask = self.all
        else:
            mask = self._ev(info.cond, bind)
        return self._finish(info, mask, hints, bind=bind)

    def _no_unknown(self, refs: list) -> None:
        for r in refs:
            if r.kind == UNKNOWN and r.proven is None:
                columns = ", ".join(sorted(self.plan.nameless))
                raise _Refuse(f"pgherd cannot tell whether table {r.qualified} is sharded (by {columns}) or "
                              f"omnisharded: filter by its sharding key, or list it in [[omnisharded_tables]]")

    def _schema_mask(self, info: StmtInfo, path_mask: Optional[int]) -> Optional[int]:
        plan = self.plan
        if not plan.has_schemas:
            return None
        mask = None
        if info.kind == "ddl":
            for schema, _name in info.ddl_objects:
                if schema in CATALOG_SCHEMAS:
                    continue
                m = plan.schemas.get(schema) if schema else path_mask
                if m is None and schema and plan.schema_default is not None:
                    m = plan.schema_default
                if m is not None:
                    mask = m if mask is None else mask & m
            return mask
        for ref in info.refs:
            if ref.path_dependent and path_mask is not None and ref.kind != CATALOG:
                m = path_mask
            elif ref.kind == SCHEMA:
                m = ref.mask
            else:
                continue
            mask = m if mask is None else mask & m
        return mask

    def _finish(self, info: StmtInfo, mask: int, hints: Hints, manual: Optional[str] = None,
                bind: Optional[Bind] = None) -> Route:
        """The Route for a statement going to the shards of `mask` (after the checks on them)."""
        missing = self._missing
        simple = manual is None and not info.checks and not info.key_sets
        memo_key = mask
        if simple and info.memo and not missing:
            hit = info.memo.get(memo_key)
            if hit is not None:
                return hit
        if mask == 0:
            # No row can match (key = NULL, contradictory keys): any one shard gives the empty answer.
            route = Route(info.kind, ALL, read=info.read, any_one=True, unique_id_calls=info.unique_id,
                          role=hints.role, manual=manual, params_needed=missing)
            return self._memo(info, memo_key, route, simple and not missing)
        count = _popcount(mask)
        cross = count > 1
        if manual is None:
            for check in info.checks:
                cond, what = check[0], check[1]
                sub = self._ev(cond, bind)
                if cross or sub != mask:
                    fix = check[2] if len(check) > 2 else ("restrict the subquery to the statement's shard by its "
                                                           "sharding key")
                    raise _Refuse(f"{what} over sharded data would be computed separately on each shard, giving a "
                                  f"wrong result; {fix}, or route with /* pgherd_shard: N */")
            for cond, column in info.key_sets:
                m = self._ev(cond, bind)
                if m != mask or cross:
                    raise _Refuse(f"UPDATE changes sharding key {column} so that rows would move to another "
                                  "shard; delete and insert them instead")
            if cross and info.kind in _READ_KINDS and info.top is not None and not info.catalog_all and info.read \
                    and not info.top.rows_from_key_sharded():
                raise _Refuse("the rows of this cross-shard query come from omnisharded tables only, so each shard "
                              "would return its own copy of them; filter by the sharding key, or route with "
                              "/* pgherd_shard: N */")
        split_insert = info.kind == "insert" and info.insert_count > 1 and cross and manual is None
        merge: frozenset = frozenset()
        if cross:
            if info.explain is not None:
                merge = frozenset(("EXPLAIN",))
            elif info.kind in _READ_KINDS and info.read and info.merge:
                merge = frozenset(info.merge)
        if cross and self.plan.cross_shard_disabled and info.kind in _DATA_KINDS and not info.write_all:
            raise _Refuse(f"this statement needs {count} shards and cross-shard queries are disabled "
                          "(cross_shard_disabled); filter by the sharding key")
        if split_insert and not self.split_inserts:
            raise _Refuse(f"a multi-row INSERT whose rows belong to different shards "
                          f"({', '.join(map(str, self._shards(mask)))}) is not supported yet; insert the rows "
                          "of each shard in separate statements")
        if info.split_copy and not self.split_copy and manual is None:
            table = info.target.qualified if info.target is not None else "a sharded table"
            raise _Refuse(f"COPY FROM into sharded table {table} is not supported yet; "
                          "route it with /* pgherd_shard: N */ per shard")
        unmergeable = [c for c in info.merge if c in merge and c not in self.mergeable] if merge else []
        if unmergeable and info.explain is None:
            what = info.top.describe(unmergeable[0]) if info.top else unmergeable[0]
            raise _Refuse(f"cross-shard {info.kind.upper() if info.kind != 'cursor' else 'cursor'} with {what} is not "
                          f"supported yet: it needs {count} shards; filter by the sharding key, or route with "
                          "/* pgherd_shard: N */")
        route = Route(
            info.kind,
            self._shards(mask) if mask != self.all or not cross else ALL,
            read=info.read,
            cross_shard=cross,
            write_all=info.write_all,
            needs_merge=merge,
            split_insert=split_insert,
            split_copy=info.split_copy and manual is None,
            unique_id_calls=info.unique_id,
            role=hints.role,
            manual=manual,
            params_needed=missing,
        )
        return self._memo(info, memo_key, route, simple and not missing)

    def _memo(self, info: StmtInfo, key: int, route: Route, ok: bool) -> Route:
        if ok and info.params and len(info.memo) < MEMO_MAX:
            info.memo[key] = route
        return route

    def _shards(self, mask: int) -> tuple[int, ...]:
        t = self._shards_of.get(mask)
        if t is None:
            t = self._shards_of[mask] = self.plan.mask_to_shards(mask)
        return t

    # -- conditions with parameters ---------------------------------------------------------------

    def _ev(self, c: Cond, bind: Optional[Bind]) -> int:
        if type(c) is int:
            return c
        op = c[0]
        if op == "&":
            r = self.all
            for x in c[1:]:
                r &= self._ev(x, bind)
            return r
        if op == "|":
            r = 0
            for x in c[1:]:
                r |= self._ev(x, bind)
            return r
        fn, n = c[1], c[2]
        if bind is None:
            self._missing = True
            return self.all
        raw, binary, oid = bind.param(n)
        if op == "p":
            return fn.mask(fn.param_value(raw, binary, oid))
        if op == "i":
            m = fn.insert_mask(fn.param_value(raw, binary, oid))
            return -1 if m is None else m
        # "a": an array parameter
        if raw is None:
            return 0
        r = 0
        if binary:
            parsed = parse_binary_array(raw)
            if parsed is None:
                return self.all
            elemtype, values = parsed
            for v in values:
                r |= fn.mask(fn.param_value(v, True, elemtype))
            return r
        try:
            elems = parse_text_array(bytes(raw).decode("utf-8"))
        except UnicodeDecodeError:
            elems = None
        if elems is None:
            return self.all
        for e in elems:
            r |= fn.mask(None if e is None else fn.text_value(e))
        return r

    # -- several statements in one query --------------------------------------------------------------

    def _combine(self, routes: list[Route]) -> Route:
        n = len(routes)
        for r in routes:
            if r.refuse is not None:
                return r._replace(statements=n)
        for r in routes:
            if r.admin_answer is not None or (r.kind == "set" and r.shards == ()):
                return Route(r.kind, (), read=r.read, statements=n, refuse=(
                    "SET/SHOW of pgherd settings must be sent as a query of its own"), refuse_code="0A000")
        neutral = ("tx", "set", "session", "empty")
        core = [r for r in routes if r.kind not in neutral]
        tx = next((r.tx_control for r in reversed(routes) if r.tx_control), None)
        if not core:
            return routes[0]._replace(statements=n, tx_control=tx)
        fixed = [r for r in core if not r.any_one]
        read = all(r.read for r in core)
        uid = any(r.unique_id_calls for r in core)
        if not fixed:
            return core[0]._replace(read=read, sticky=any(r.sticky for r in core), unique_id_calls=uid,
                                    omnisharded=all(r.omnisharded for r in core), statements=n, tx_control=tx)
        first = fixed[0]
        for r in fixed[1:]:
            if r.shards != first.shards:
                return Route(first.kind, (), read=read, statements=n, refuse=(
                    f"the statements of this query need different shards ({_show(first.shards)} and "
                    f"{_show(r.shards)}); send them as separate queries"))
        return first._replace(
            read=read,
            write_all=any(r.write_all for r in fixed),
            needs_merge=frozenset().union(*(r.needs_merge for r in fixed)),
            split_insert=any(r.split_insert for r in fixed),
            split_copy=any(r.split_copy for r in fixed),
            unique_id_calls=uid,
            omnisharded=all(r.omnisharded for r in core),
            params_needed=any(r.params_needed for r in core),
            statements=n,
            tx_control=tx,
        )


def _show(shards: Any) -> str:
    return "all" if shards is ALL else ", ".join(map(str, shards))

