"""Planning a cross-shard SELECT's merge: what each shard runs and how pgherd combines the rows.

    plan = plan_merge(sql, sharding_columns={"id"})   # MergeRefused (SQLSTATE 0A000) if it cannot
    plan.shard_sql                                     # the text every shard runs instead of sql

The plan is pure and cached per (text, sharding columns) in a ByteLRU. It decides:

- shard_sql: ORDER BY kept (as output positions), extended when the merge needs groups or
  duplicates to arrive next to each other; LIMIT n OFFSET m becomes LIMIT n+m; HAVING conditions
  on aggregates move after the merge; hidden columns are appended at the END of the target list:
  ORDER BY / GROUP BY / DISTINCT ON expressions that are not output columns, HAVING / ORDER BY
  aggregates that are not output columns, and helpers of aggregates that cannot be combined from
  their own per-shard values (avg: count and sum; variance family: count, sum, the exact sum of
  squares as numeric, and var_pop for float input). The client's own columns are unchanged, so
  their RowDescription entries from a shard are exactly what Postgres sends for the original.
- how the rows merge: `mode` "rows" (k-way merge by `sort`, DISTINCT, OFFSET/LIMIT: streaming) or
  "groups" (per-group combination of partial aggregates, HAVING, DISTINCT, ORDER BY, OFFSET/LIMIT;
  streaming when the groups arrive sorted by their key, else the groups are held until the end).

Column references in a plan are indexes into a shard's DataRow; a negative index counts from the
end (targets after a `*`, hidden columns), so they resolve once the RowDescription is known.
GROUP BY on a sharding column keeps every group on one shard: such a query merges as rows.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Collection, NamedTuple, Optional, Sequence, Union

from pglast import ast, parse_sql
from pglast.enums import (A_Expr_Kind, BoolExprType, GroupingSetKind, LimitOption, NullTestType,
                          SetOperation, SortByDir, SortByNulls)
from pglast.parser import ParseError
from pglast.stream import RawStream

from .analyze import AGGREGATES
from .parse import ByteLRU, text_bytes
from .values import collation_supported

__all__ = ["AggSpec", "MergeError", "MergePlan", "MergeRefused", "Param", "SortKey", "plan_merge"]

# Plan cache per process: a plan is its shard text plus a few small tuples (measured: about 3 KB
# for a grouped query with helpers), so 8 MiB holds a few thousand distinct cross-shard SELECTs,
# more than an application has, without mattering next to the route cache.
PLAN_CACHE_BYTES = 8 * 1024 * 1024
# Fixed cost of a cached plan beyond its two texts (MergePlan, tuples of keys and aggregates).
PLAN_OVERHEAD_BYTES = 3072
# Do not cache a plan bigger than this share of the cache (giant one-off texts).
MAX_PLAN_FRACTION = 64
# Name prefix of hidden columns (visible only to pgherd; the client never sees them).
HIDDEN_PREFIX = "pgherd_h"

# Aggregates the merge can combine exactly, by their name in pg_catalog ("every" is bool_and).
COMBINABLE = frozenset(("count", "sum", "min", "max", "avg", "stddev", "stddev_samp", "stddev_pop",
                        "variance", "var_samp", "var_pop", "bool_and", "bool_or", "every"))
_CANONICAL = {"every": "bool_and", "stddev": "stddev_samp", "variance": "var_samp"}
VARIANCES = frozenset(("stddev_samp", "stddev_pop", "var_samp", "var_pop"))
# Aggregates whose value is the same whether duplicates are counted once or not.
_IDEMPOTENT = frozenset(("min", "max", "bool_and", "bool_or"))
_COMPARISONS = frozenset(("=", "<>", "!=", "<", "<=", ">", ">="))


class MergeRefused(Exception):
    """The statement cannot be merged correctly; answer the client with this SQLSTATE and message."""

    def __init__(self, message: str, code: str = "0A000") -> None:
        super().__init__(message)
        self.message, self.code = message, code


class MergeError(Exception):
    """Merging failed the way Postgres would fail the statement (overflow 22003, negative LIMIT
    2201W...): answer the client with this SQLSTATE and message."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.message, self.code = message, code


class Param(NamedTuple):
    """A LIMIT / OFFSET given as parameter $number (its value comes from the Bind)."""

    number: int


class SortKey(NamedTuple):
    """One ORDER BY key: a column of the shard row, direction, NULL placement, explicit COLLATE."""

    column: int
    descending: bool = False
    nulls_first: bool = False
    collation: Optional[str] = None


class AggSpec(NamedTuple):
    """An aggregate column: func is count, sum, min, max, avg, bool_and, bool_or, var_pop,
    var_samp, stddev_pop or stddev_samp; column holds each shard's own value of it; helpers
    are (count, sum) for avg and (count, sum, sum of squares, var_pop) for the variance family."""

    func: str
    column: int
    helpers: tuple[int, ...] = ()
    text: str = ""


Limit = Union[int, Param, None]


class MergePlan:
    """How to run one cross-shard SELECT and combine its rows (see the module docstring).

    shard_sql    text each shard runs (same parameters as the original)
    hidden       number of hidden columns at the end of each shard row
    mode         "rows" or "groups"
    sort         the order the shards return rows in (their ORDER BY), as SortKeys
    order_keys   how many leading `sort` keys are the client's own ORDER BY (rows mode); the rest
                 were added so duplicates arrive next to each other
    order        the client's ORDER BY (groups mode: the final order of the groups)
    limit, offset, with_ties   applied after merging (int, Param or None)
    distinct     None, "all" (DISTINCT, UNION) or "on" (DISTINCT ON distinct_on columns)
    distinct_sorted  rows mode: `sort` puts equal rows next to each other (else a * in the select
                 list hides the columns: duplicates are found by hashing)
    group_by     group key columns (groups mode); aggregates: AggSpecs; having: predicate tree
    streaming    groups mode: the shards return groups sorted by `sort` (its first keys are the
                 group columns), so finished groups can be sent before all rows are read
    shard_limited  the shards got LIMIT n+m (groups mode: only with streaming)
    collations   explicit COLLATE names of ORDER BY keys (all supported)
    """

    __slots__ = ("sql", "shard_sql", "hidden", "mode", "sort", "order_keys", "order", "limit", "offset",
                 "with_ties", "distinct", "distinct_on", "distinct_sorted", "group_by", "aggregates", "having",
                 "streaming", "sort_added", "shard_limited", "collations", "constructs")

    def __init__(self, **kw: Any) -> None:
        for name in self.__slots__:
            setattr(self, name, kw.get(name))

    def __repr__(self) -> str:
        return f"MergePlan({self.mode}, {self.shard_sql!r})"

    # -- for the worker ------------------------------------------------------------------------

    def client_fields(self, shard_fields: Sequence[Any]) -> list[Any]:
        """The RowDescription fields to send the client: a shard's fields without the hidden
        columns (the client's columns are the original statement's, unchanged)."""
        return list(shard_fields[:len(shard_fields) - self.hidden])

    def shard_formats(self, client_formats: Sequence[int]) -> list[int]:
        """Bind result-format codes for shard_sql given the client's: one code or none applies to
        every column as before; a per-column list gets binary codes for the hidden columns."""
        if len(client_formats) <= 1:
            return list(client_formats)
        return list(client_formats) + [1] * self.hidden

    def limits(self, bind: Any = None) -> tuple[Optional[int], int]:
        """(limit or None, offset) with parameters taken from the Bind (router.params.Bind);
        MergeError 2201W / 2201X for a negative value, as Postgres."""
        limit = _param_int(self.limit, bind, "LIMIT")
        offset = _param_int(self.offset, bind, "OFFSET")
        if limit is not None and limit < 0:
            raise MergeError("LIMIT must not be negative", "2201W")
        if offset is not None and offset < 0:
            raise MergeError("OFFSET must not be negative", "2201X")
        return limit, offset or 0

    def merger(self, fields: Sequence[Any], shards: Any, **kw: Any) -> Any:
        """The merger for this plan: OrderedMerge (rows) or AggregateMerge (groups); see merge.py."""
        from .merge import make_merger

        return make_merger(self, fields, shards, **kw)


def _param_int(value: Limit, bind: Any, what: str) -> Optional[int]:
    if value is None or isinstance(value, int):
        return value
    if bind is None:
        raise MergeError(f"{what} ${value.number} has no value", "08P01")
    raw, binary, _oid = bind.param(value.number)
    if raw is None:
        return None
    raw = bytes(raw)
    try:
        if binary:
            if len(raw) not in (2, 4, 8):
                raise ValueError
            return int.from_bytes(raw, "big", signed=True)
        return int(Decimal(raw.decode("ascii").strip()).to_integral_value(ROUND_HALF_UP))
    except (ValueError, ArithmeticError, UnicodeDecodeError):
        raise MergeError(f"invalid {what} value in parameter ${value.number}", "22P02") from None


# ------------------------------------------------------------------------------------------------

_CACHE: ByteLRU[tuple, Union[MergePlan, MergeRefused]] = ByteLRU(PLAN_CACHE_BYTES,
                                                                  PLAN_CACHE_BYTES // MAX_PLAN_FRACTION)


def plan_merge(sql: str, sharding_columns: Collection[str] = ()) -> MergePlan:
    """The MergePlan for one cross-shard SELECT; MergeRefused when it cannot be merged exactly.

    sharding_columns: names of the sharding-key columns of the tables it reads: count(DISTINCT
    key) and GROUP BY key are only mergeable on them.
    """
    key = (sql, frozenset(c.lower() for c in sharding_columns))
    hit = _CACHE.get(key)
    if hit is None:
        try:
            hit = _Planner(sql, key[1]).plan()
        except MergeRefused as e:
            hit = e
        size = PLAN_OVERHEAD_BYTES + text_bytes(sql) * (1 if isinstance(hit, MergeRefused) else 2)
        _CACHE.put(key, hit, size)
    if isinstance(hit, MergeRefused):
        raise MergeRefused(hit.message, hit.code)
    return hit


def clear_cache() -> None:
    _CACHE.clear()


# ------------------------------------------------------------------------------------------------
# AST helpers

def _text(node: Any) -> str:
    """SQL text of a node (a RawStream accumulates its output: one per call)."""
    return RawStream()(node)


def _children(node: Any):
    for attr in type(node).__slots__:
        v = getattr(node, attr, None)
        if isinstance(v, ast.Node):
            yield v
        elif isinstance(v, (tuple, list)):
            for x in v:
                if isinstance(x, ast.Node):
                    yield x


def _walk(node: Any, stop=(ast.SubLink, ast.SelectStmt, ast.RangeSubselect)):
    """node and its descendants, not entering subqueries (they are their own SELECTs)."""
    if node is None:
        return
    if isinstance(node, (tuple, list)):
        for x in node:
            yield from _walk(x, stop)
        return
    if not isinstance(node, ast.Node):
        return
    yield node
    if isinstance(node, stop):
        return
    for c in _children(node):
        yield from _walk(c, stop)


def _func_name(call: ast.FuncCall) -> Optional[str]:
    names = [n.sval for n in call.funcname if isinstance(n, ast.String)]
    if len(names) == 2 and names[0].lower() != "pg_catalog":
        return None
    return names[-1].lower() if names else None


def _is_aggregate(node: Any) -> bool:
    if not isinstance(node, ast.FuncCall) or node.over is not None:
        return False
    name = _func_name(node)
    return (name is not None and name in AGGREGATES) or bool(
        node.agg_star or node.agg_distinct or node.agg_order or node.agg_within_group or node.agg_filter)


def _has_aggregate(node: Any) -> bool:
    return any(_is_aggregate(n) for n in _walk(node))


def _window(node: Any) -> Optional[str]:
    for n in _walk(node):
        if isinstance(n, ast.FuncCall) and n.over is not None:
            return _func_name(n) or "window function"
    return None


def _column_name(node: Any) -> Optional[str]:
    """The last name of a bare column reference (x, t.x), else None."""
    if isinstance(node, ast.ColumnRef) and node.fields and isinstance(node.fields[-1], ast.String):
        return node.fields[-1].sval
    return None


def _bare_name(node: Any) -> Optional[str]:
    """The name of a one-part column reference (ORDER BY x), else None."""
    if isinstance(node, ast.ColumnRef) and len(node.fields) == 1 and isinstance(node.fields[0], ast.String):
        return node.fields[0].sval
    return None


def _is_star(node: Any) -> bool:
    return isinstance(node, ast.ColumnRef) and bool(node.fields) and isinstance(node.fields[-1], ast.A_Star)


def _figure_name(node: Any) -> Optional[str]:
    """The output column name Postgres gives an unnamed target (parse_target.c FigureColname),
    for the common node kinds; None when it would be ?column? or is not worked out here."""
    if isinstance(node, ast.ColumnRef):
        return _column_name(node)
    if isinstance(node, ast.FuncCall):
        return _func_name(node) or [n.sval for n in node.funcname if isinstance(n, ast.String)][-1]
    if isinstance(node, ast.TypeCast):
        inner = _figure_name(node.arg)
        if inner is not None and isinstance(node.arg, (ast.ColumnRef, ast.FuncCall, ast.TypeCast)):
            return inner
        names = [n.sval for n in node.typeName.names if isinstance(n, ast.String)]
        return names[-1] if names else None
    if isinstance(node, ast.CollateClause):
        return _figure_name(node.arg)
    if isinstance(node, ast.CoalesceExpr):
        return "coalesce"
    if isinstance(node, ast.CaseExpr):
        return "case"
    if isinstance(node, ast.A_ArrayExpr):
        return "array"
    if isinstance(node, ast.A_Expr) and node.kind == A_Expr_Kind.AEXPR_NULLIF:
        return "nullif"
    return None


def _collation(node: Any) -> Optional[str]:
    if isinstance(node, ast.CollateClause):
        names = [n.sval for n in node.collname if isinstance(n, ast.String)]
        return names[-1] if names else None
    return None


def _int_const(n: int) -> ast.A_Const:
    return ast.A_Const(isnull=False, val=ast.Integer(ival=n))


def _call(name: str, arg: Any, like: ast.FuncCall) -> ast.FuncCall:
    """pg_catalog.name(arg) with the FILTER and DISTINCT of aggregate call `like`."""
    return ast.FuncCall(funcname=(ast.String(sval="pg_catalog"), ast.String(sval=name)), args=(arg,),
                        agg_filter=like.agg_filter, agg_distinct=like.agg_distinct, agg_star=False,
                        agg_within_group=False, func_variadic=False)


def _cast(node: Any, type_name: str) -> ast.TypeCast:
    return ast.TypeCast(arg=node, typeName=ast.TypeName(names=(ast.String(sval="pg_catalog"),
                                                                ast.String(sval=type_name)), typemod=-1))


class _Target:
    __slots__ = ("idx", "val", "star", "name")

    def __init__(self, idx: int, rt: ast.ResTarget) -> None:
        self.idx = idx
        self.val = rt.val
        self.star = _is_star(rt.val)
        self.name = rt.name if rt.name else (None if self.star else _figure_name(rt.val))


# A column during planning: ("t", target index), ("h", hidden index), ("p", 0-based position).
Col = tuple


class _Planner:
    def __init__(self, sql: str, sharding: frozenset) -> None:
        try:
            stmts = parse_sql(sql)
        except ParseError as e:
            raise MergeRefused(f"syntax error: {e}", "42601") from None
        if len(stmts) != 1:
            raise MergeRefused("a cross-shard query with several statements cannot be merged; send them one by one")
        stmt = stmts[0].stmt
        if not isinstance(stmt, ast.SelectStmt):
            raise MergeRefused(f"only SELECT results can be merged across shards, not {type(stmt).__name__}")
        self.stmt = stmt
        self.sql = sql
        self.sharding = sharding
        self.targets: list[_Target] = []
        self.hidden: list[ast.ResTarget] = []
        self.slots: list[tuple[Any, AggSpec]] = []  # (aggregate call, its planning-time spec)
        self.constructs: set[str] = set()

    # -- columns ---------------------------------------------------------------------------------

    def _set_targets(self, target_list: Any) -> None:
        self.targets = [_Target(i, rt) for i, rt in enumerate(target_list or ())]
        stars = [t.idx for t in self.targets if t.star]
        self.first_star = stars[0] if stars else None
        self.last_star = stars[-1] if stars else None

    def _hide(self, node: Any) -> Col:
        """A hidden column computing node (one per distinct expression). Expressions are compared
        as parse trees (pglast node equality ignores source positions): deparsing costs more."""
        for j, rt in enumerate(self.hidden):
            if rt.val == node:
                return ("h", j)
        self.hidden.append(ast.ResTarget(name=f"{HIDDEN_PREFIX}{len(self.hidden) + 1}", val=node))
        return ("h", len(self.hidden) - 1)

    def _match_target(self, node: Any) -> Optional[Col]:
        for t in self.targets:
            if not t.star and t.val == node:
                return ("t", t.idx)
        return None

    def _position(self, node: Any, clause: str) -> Optional[Col]:
        if isinstance(node, ast.A_Const) and isinstance(node.val, ast.Integer):
            k = node.val.ival
            if k < 1 or (self.first_star is None and k > len(self.targets)):
                raise MergeRefused(f"{clause} position {k} is not in select list", "42P10")
            return ("t", k - 1) if self.first_star is None else ("p", k - 1)
        return None

    def _resolve_sql92(self, node: Any, clause: str, hide: bool = True) -> Col:
        """An ORDER BY / DISTINCT ON item: a position, an output column name, else an expression
        (parse_clause.c findTargetlistEntrySQL92)."""
        col = self._position(node, clause)
        if col is not None:
            return col
        name = _bare_name(node)
        if name is not None:
            for t in self.targets:
                if not t.star and t.name == name:
                    return ("t", t.idx)
        col = self._match_target(node)
        if col is not None:
            return col
        if not hide:
            raise MergeRefused(f"{clause} of a cross-shard UNION must name an output column or its position")
        return self._hide(node)

    def _final(self, col: Col) -> int:
        """The DataRow index of a planning column (negative: from the end)."""
        kind, i = col
        hidden = len(self.hidden)
        if kind == "h":
            return i - hidden
        if kind == "p":
            return i
        if self.first_star is None or i < self.first_star:
            return i
        if i > self.last_star:
            return -(hidden + len(self.targets) - i)
        raise MergeRefused("an output column between two * expansions cannot be located by the merge; "
                           "name the columns instead of *")

    def _target_of(self, col: Col) -> Optional[_Target]:
        return self.targets[col[1]] if col[0] == "t" else None

    def _sort_node(self, col: Col) -> Any:
        """The shard's ORDER BY item for a column: its output position when known, else its
        expression."""
        kind, i = col
        if kind == "p":
            return _int_const(i + 1)
        if self.first_star is None:
            return _int_const(i + 1 if kind == "t" else len(self.targets) + i + 1)
        if kind == "t" and i < self.first_star:
            return _int_const(i + 1)
        return self.targets[i].val if kind == "t" else self.hidden[i].val

    # -- clauses ---------------------------------------------------------------------------------

    @staticmethod
    def _direction(sb: ast.SortBy) -> tuple[bool, bool]:
        """(descending, nulls first) of an ORDER BY item, with Postgres's defaults."""
        desc = sb.sortby_dir == SortByDir.SORTBY_DESC
        if sb.sortby_dir == SortByDir.SORTBY_USING:
            op = [n.sval for n in sb.useOp if isinstance(n, ast.String)][-1:]
            if op == ["<"]:
                desc = False
            elif op == [">"]:
                desc = True
            else:
                raise MergeRefused(f"ORDER BY ... USING {op[0] if op else '?'} cannot be merged across shards; "
                                   "use ASC or DESC")
        if sb.sortby_nulls == SortByNulls.SORTBY_NULLS_FIRST:
            return desc, True
        if sb.sortby_nulls == SortByNulls.SORTBY_NULLS_LAST:
            return desc, False
        return desc, desc  # Postgres: NULLS LAST for ASC, NULLS FIRST for DESC

    def _sort_key(self, sb: ast.SortBy, col: Col) -> tuple[Col, bool, bool, Optional[str]]:
        desc, nulls_first = self._direction(sb)
        t = self._target_of(col)
        collation = _collation(sb.node) or (_collation(t.val) if t is not None else None)
        if collation is not None and not collation_supported(collation):
            raise MergeRefused(f'ORDER BY ... COLLATE "{collation}" cannot be merged across shards: pgherd '
                               'orders text in code-point order only (COLLATE "C")')
        return col, desc, nulls_first, collation

    def _sort_keys(self, sort_clause: Any, hide: bool = True) -> list[tuple[Col, bool, bool, Optional[str]]]:
        return [self._sort_key(sb, self._resolve_sql92(sb.node, "ORDER BY", hide)) for sb in sort_clause or ()]

    def _limit_value(self, node: Any, what: str) -> tuple[Limit, Any]:
        if node is None:
            return None, None
        inner = node
        while isinstance(inner, ast.TypeCast):
            inner = inner.arg
        if isinstance(inner, ast.A_Const):
            if inner.isnull:
                return None, None
            v = inner.val
            if isinstance(v, ast.Integer):
                return v.ival, node
            if isinstance(v, (ast.Float, ast.String)):
                try:
                    text = v.fval if isinstance(v, ast.Float) else v.sval
                    return int(Decimal(text.strip()).to_integral_value(ROUND_HALF_UP)), node
                except ArithmeticError:
                    pass
        if isinstance(inner, ast.ParamRef):
            return Param(inner.number), node
        raise MergeRefused(f"a cross-shard {what} must be a constant or a parameter to be merged")

    def _limits(self, s: ast.SelectStmt) -> tuple[Limit, Limit, bool, Any, Any]:
        limit, limit_node = self._limit_value(s.limitCount, "LIMIT")
        offset, offset_node = self._limit_value(s.limitOffset, "OFFSET")
        with_ties = s.limitOption == LimitOption.LIMIT_OPTION_WITH_TIES
        if limit is not None or s.limitCount is not None:
            self.constructs.add("LIMIT")
        if s.limitOffset is not None:
            self.constructs.add("OFFSET")
        return limit, offset, with_ties, limit_node, offset_node

    @staticmethod
    def _shard_limit(s: ast.SelectStmt, limit: Limit, offset: Limit, limit_node: Any, offset_node: Any,
                     keep: bool = True) -> None:
        """Give the shards LIMIT limit+offset (enough rows for any answer) and no OFFSET, or (keep
        False, or no LIMIT) no limit at all. Parameters stay referenced with their original casts,
        so the shard statement has the client's parameters and types."""
        if keep and limit is not None and offset is None:
            s.limitOffset = None
            return
        if keep and isinstance(limit, int) and isinstance(offset, int):
            if limit >= 0 and offset >= 0:  # else keep both: the shards raise Postgres's own error
                s.limitCount = _int_const(limit + offset)
                s.limitOffset = None
            return
        if keep and limit is not None:
            def term(v: Limit, node: Any) -> Any:
                return _int_const(v) if isinstance(v, int) else _cast(node, "int8")

            plus = ast.A_Expr(kind=A_Expr_Kind.AEXPR_OP, name=(ast.String(sval="+"),),
                              lexpr=term(limit, limit_node),
                              rexpr=ast.CoalesceExpr(args=(term(offset, offset_node), _int_const(0))))
            s.limitCount, s.limitOffset = plus, None  # OFFSET NULL means OFFSET 0
            return
        # No limit on the shards. NULLIF(p, p) is NULL (LIMIT ALL) and keeps parameter p in use.
        terms = [ast.A_Expr(kind=A_Expr_Kind.AEXPR_NULLIF, name=(ast.String(sval="="),),
                                                        lexpr=_cast(node, "int8"), rexpr=_cast(node, "int8"))
                 for node in (limit_node, offset_node) if node is not None and _has_param(node)]
        count = terms[0] if terms else None
        for t in terms[1:]:
            count = ast.A_Expr(kind=A_Expr_Kind.AEXPR_OP, name=(ast.String(sval="+"),), lexpr=count, rexpr=t)
        s.limitCount, s.limitOffset = count, None
        if s.limitOption == LimitOption.LIMIT_OPTION_WITH_TIES:
            s.limitOption = LimitOption.LIMIT_OPTION_COUNT

    # -- planning --------------------------------------------------------------------------------

    def plan(self) -> MergePlan:
        s = self.stmt
        if s.op != SetOperation.SETOP_NONE:
            return self._plan_setop()
        if s.valuesLists:
            raise MergeRefused("a cross-shard VALUES list cannot be merged")
        if s.intoClause is not None:
            raise MergeRefused("SELECT INTO across shards is not supported; use CREATE TABLE AS on one shard")
        for clause in (s.targetList, s.sortClause, s.havingClause, s.distinctClause, s.windowClause):
            name = _window(clause)
            if name is not None or (clause is s.windowClause and s.windowClause):
                raise MergeRefused(f"window function {name or ''}() over several shards cannot be merged: it "
                                   "needs all rows at once; filter by the sharding key, or route with "
                                   "/* pgherd_shard: N */")
        self._set_targets(s.targetList)
        limit, offset, with_ties, limit_node, offset_node = self._limits(s)
        if s.lockingClause and (limit is not None or offset is not None or s.limitCount is not None):
            raise MergeRefused("SELECT ... FOR UPDATE/SHARE with LIMIT across shards would lock rows on every shard "
                               "that are not returned; filter by the sharding key")
        group_items = [g for g in (s.groupClause or ())
                       if not (isinstance(g, ast.GroupingSet) and g.kind == GroupingSetKind.GROUPING_SET_EMPTY)]
        for g in group_items:
            if isinstance(g, ast.GroupingSet):
                raise MergeRefused("GROUPING SETS / ROLLUP / CUBE across shards cannot be merged; group by plain "
                                   "expressions")
        grouped = bool(s.groupClause) or s.havingClause is not None or any(
            _has_aggregate(t.val) for t in self.targets) or any(_has_aggregate(sb.node) for sb in s.sortClause or ())
        local = grouped and any(_column_name(g) is not None and _column_name(g).lower() in self.sharding
                                for g in group_items)
        if grouped and not local:
            return self._plan_groups(group_items, limit, offset, with_ties, limit_node, offset_node)
        if local:
            self.constructs.add("GROUP BY")
        return self._plan_rows(limit, offset, with_ties, limit_node, offset_node)

    def _distinct(self, s: ast.SelectStmt) -> tuple[Optional[str], list[Col]]:
        if s.distinctClause is None:
            return None, []
        self.constructs.add("DISTINCT")
        if len(s.distinctClause) == 1 and s.distinctClause[0] is None:
            return "all", []
        return "on", [self._resolve_sql92(e, "DISTINCT ON") for e in s.distinctClause]

    def _plan_rows(self, limit: Limit, offset: Limit, with_ties: bool, limit_node: Any, offset_node: Any) -> MergePlan:
        s = self.stmt
        keys = self._sort_keys(s.sortClause)
        if keys:
            self.constructs.add("ORDER BY")
        distinct, on = self._distinct(s)
        user = len(keys)
        if distinct == "on":
            on_set = set(on)
            head = [k[0] for k in keys[:len(on)]]
            if keys and not (set(head) <= on_set):
                raise MergeRefused("SELECT DISTINCT ON expressions must match initial ORDER BY expressions", "42P10")
            present = {k[0] for k in keys}
            if not on_set <= set(head):
                if not all(k[0] in on_set for k in keys):
                    raise MergeRefused("SELECT DISTINCT ON expressions must match initial ORDER BY expressions",
                                       "42P10")
                keys += [(c, False, False, None) for c in on if c not in present]
        elif distinct == "all" and self.first_star is None:
            present = {k[0] for k in keys}
            keys += [(("t", i), False, False, None) for i in range(len(self.targets)) if ("t", i) not in present]
        if s.sortClause or keys:
            s.sortClause = tuple(self._sort_by(k) for k in keys)
        self._shard_limit(s, limit, offset, limit_node, offset_node)
        self._append_hidden(s)
        sort = tuple(SortKey(self._final(c), d, n, coll) for c, d, n, coll in keys)
        return MergePlan(
            sql=self.sql, shard_sql=_text(s), hidden=len(self.hidden), mode="rows", sort=sort, order_keys=user,
            order=sort[:user], limit=limit, offset=offset, with_ties=with_ties, distinct=distinct,
            distinct_on=tuple(self._final(c) for c in on), distinct_sorted=distinct == "on" or (
                distinct == "all" and self.first_star is None), group_by=(), aggregates=(), having=None,
            streaming=True, sort_added=len(sort) > user, shard_limited=limit is not None,
            collations=frozenset(k.collation for k in sort if k.collation), constructs=frozenset(self.constructs))

    def _sort_by(self, key: tuple) -> ast.SortBy:
        col, desc, nulls_first, _collation_name = key
        return ast.SortBy(node=self._sort_node(col),
                          sortby_dir=SortByDir.SORTBY_DESC if desc else SortByDir.SORTBY_ASC,
                          sortby_nulls=SortByNulls.SORTBY_NULLS_FIRST if nulls_first else SortByNulls.SORTBY_NULLS_LAST)

    def _append_hidden(self, s: ast.SelectStmt) -> None:
        if self.hidden:
            s.targetList = tuple(s.targetList or ()) + tuple(self.hidden)

    # -- set operations ------------------------------------------------------------------------------

    def _plan_setop(self) -> MergePlan:
        s = self.stmt
        node = s
        ops = []
        stack = [s]
        while stack:
            n = stack.pop()
            if n.op == SetOperation.SETOP_NONE:
                continue
            ops.append(n)
            stack += [n.larg, n.rarg]
        for n in ops:
            if n.op in (SetOperation.SETOP_INTERSECT, SetOperation.SETOP_EXCEPT):
                what = "INTERSECT" if n.op == SetOperation.SETOP_INTERSECT else "EXCEPT"
                raise MergeRefused(f"cross-shard {what} cannot be merged: a row's partners may be on another shard; "
                                   "filter by the sharding key, or route with /* pgherd_shard: N */")
        top_distinct = not s.all
        if not top_distinct and any(not n.all for n in ops):
            raise MergeRefused("a UNION (without ALL) inside a cross-shard UNION ALL cannot be merged; use UNION ALL "
                               "or UNION throughout")
        for leaf in _setop_leaves(s):
            what = _branch_combines(leaf, allow_distinct=top_distinct)
            if what is not None:
                raise MergeRefused(f"{what} inside a branch of a cross-shard UNION would be computed per shard; "
                                   "filter by the sharding key, or route with /* pgherd_shard: N */")
        while node.op != SetOperation.SETOP_NONE:
            node = node.larg
        self._set_targets(node.targetList)
        self.constructs.add("UNION")
        limit, offset, with_ties, limit_node, offset_node = self._limits(s)
        keys = self._sort_keys(s.sortClause, hide=False)
        if keys:
            self.constructs.add("ORDER BY")
        user = len(keys)
        distinct = "all" if top_distinct else None
        if distinct and self.first_star is None:
            present = {k[0] for k in keys}
            keys += [(("t", i), False, False, None) for i in range(len(self.targets)) if ("t", i) not in present]
        if keys:
            s.sortClause = tuple(self._sort_by(k) for k in keys)
        self._shard_limit(s, limit, offset, limit_node, offset_node)
        sort = tuple(SortKey(self._final(c), d, n, coll) for c, d, n, coll in keys)
        return MergePlan(
            sql=self.sql, shard_sql=_text(s), hidden=0, mode="rows", sort=sort, order_keys=user, order=sort[:user],
            limit=limit, offset=offset, with_ties=with_ties, distinct=distinct, distinct_on=(),
            distinct_sorted=bool(distinct) and self.first_star is None, group_by=(), aggregates=(), having=None,
            streaming=True, sort_added=len(sort) > user,
            shard_limited=limit is not None, collations=frozenset(k.collation for k in sort if k.collation),
            constructs=frozenset(self.constructs))

    # -- aggregates ---------------------------------------------------------------------------------

    def _agg(self, call: ast.FuncCall, col: Col) -> AggSpec:
        """Check an aggregate call and add the hidden helpers it needs; col holds its own value."""
        name = _func_name(call)
        shown = _text(call)
        if name not in COMBINABLE:
            raise MergeRefused(f"aggregate {name or shown}() over several shards cannot be merged (pgherd combines "
                               "count, sum, min, max, avg, bool_and, bool_or, every, stddev and variance); filter "
                               "by the sharding key, or route with /* pgherd_shard: N */")
        func = _CANONICAL.get(name, name)
        if call.agg_within_group or call.func_variadic:
            raise MergeRefused(f"aggregate {shown} cannot be merged across shards")
        args = tuple(call.args or ())
        if call.agg_star:
            if func != "count":
                raise MergeRefused(f"aggregate {shown} cannot be merged across shards")
        elif len(args) != 1:
            raise MergeRefused(f"aggregate {shown} with {len(args)} arguments cannot be merged across shards")
        if call.agg_distinct and func not in _IDEMPOTENT:
            column = _column_name(args[0]) if args else None
            if column is None or column.lower() not in self.sharding or func in VARIANCES:
                raise MergeRefused(f"{shown} over several shards cannot be merged: the same value may be on several "
                                   "shards; DISTINCT is merged only on the sharding key (in count, sum and avg)")
        self.constructs.add("aggregate")
        helpers: tuple[Col, ...] = ()
        if func == "avg":
            arg = args[0]
            helpers = (self._hide(_call("count", arg, call)), self._hide(_call("sum", arg, call)))
        elif func in VARIANCES:
            arg = args[0]
            square = ast.A_Expr(kind=A_Expr_Kind.AEXPR_OP, name=(ast.String(sval="*"),),
                                lexpr=_cast(arg, "numeric"), rexpr=_cast(arg, "numeric"))
            helpers = (self._hide(_call("count", arg, call)), self._hide(_call("sum", arg, call)),
                       self._hide(_call("sum", square, call)), self._hide(_call("var_pop", arg, call)))
        return AggSpec(func, col, helpers, shown)  # type: ignore[arg-type]

    def _agg_column(self, call: ast.FuncCall) -> Col:
        """The column of an aggregate used in HAVING / ORDER BY: an output column computing the
        same aggregate, else a hidden one."""
        for node, spec in self.slots:
            if node == call:
                return spec.column  # type: ignore[return-value]
        col = self._match_target(call) or self._hide(call)
        self.slots.append((call, self._agg(call, col)))
        return col

    def _group_column(self, item: Any) -> Col:
        """A GROUP BY item's column. A bare name means an input column before an output alias
        (parse_clause.c findTargetlistEntrySQL99), so an alias is used only when its expression
        does not read a column of that name."""
        col = self._position(item, "GROUP BY")
        if col is not None:
            if col[0] == "p":
                raise MergeRefused("GROUP BY position with * in the select list cannot be merged across shards; "
                                   "name the columns")
            return col
        col = self._match_target(item)
        if col is not None:
            return col
        name = _bare_name(item)
        if name is not None:
            for t in self.targets:
                if not t.star and t.name == name and _bare_name(t.val) != name:
                    reads_it = any(_column_name(n) == name for n in _walk(t.val))
                    if not reads_it:
                        return ("t", t.idx)
        return self._hide(item)

    def _plan_groups(self, group_items: list, limit: Limit, offset: Limit, with_ties: bool, limit_node: Any,
                     offset_node: Any) -> MergePlan:
        s = self.stmt
        if s.distinctClause is not None and not (len(s.distinctClause) == 1 and s.distinctClause[0] is None):
            raise MergeRefused("SELECT DISTINCT ON with aggregates across shards cannot be merged")
        if self.first_star is not None:
            raise MergeRefused("SELECT * with GROUP BY across shards cannot be merged; name the columns")
        if group_items:
            self.constructs.add("GROUP BY")
        # Output columns: aggregates (combined), others (the same on every shard for a group).
        for t in self.targets:
            if _is_aggregate(t.val):
                self.slots.append((t.val, self._agg(t.val, ("t", t.idx))))
            elif _has_aggregate(t.val):
                raise MergeRefused(f"an aggregate inside an expression ({_text(t.val)}) cannot be merged across "
                                   "shards; select the aggregate itself and compute the expression in the application")
        groups = []
        for g in group_items:
            col = self._group_column(g)
            if col not in groups:
                groups.append(col)
        # HAVING: conditions on aggregates after the merge; conditions on group keys on the shards.
        having = None
        if s.havingClause is not None:
            self.constructs.add("HAVING")
            conjuncts = _conjuncts(s.havingClause)
            local = [c for c in conjuncts if not _has_aggregate(c)]
            merged = [c for c in conjuncts if _has_aggregate(c)]
            if merged:
                preds = [self._predicate(c) for c in merged]
                having = preds[0] if len(preds) == 1 else ("and", tuple(preds))
            # A moved condition with parameters stays on the shards as (condition) OR TRUE: always
            # true, and the parameters keep their place and inferred types in the shard statement.
            local += [ast.BoolExpr(boolop=BoolExprType.OR_EXPR, args=(c, ast.A_Const(isnull=False, val=ast.Boolean(
                boolval=True)))) for c in merged if _has_param(c)]
            s.havingClause = None if not local else (
                local[0] if len(local) == 1 else ast.BoolExpr(boolop=BoolExprType.AND_EXPR, args=tuple(local)))
        # ORDER BY: group keys, output columns, or aggregates (hidden when not output columns).
        keys = []
        for sb in s.sortClause or ():
            if _is_aggregate(sb.node):
                keys.append(self._sort_key(sb, self._agg_column(sb.node)))
            elif _has_aggregate(sb.node) and self._match_target(sb.node) is None:
                raise MergeRefused(f"ORDER BY an expression over aggregates ({_text(sb.node)}) cannot be merged "
                                   "across shards; order by the aggregate itself")
            else:
                keys.extend(self._sort_keys((sb,)))
        if keys:
            self.constructs.add("ORDER BY")
        distinct = "all" if s.distinctClause is not None else None
        if distinct:
            self.constructs.add("DISTINCT")
        # Streaming: the shards sort their groups by the group key when the ORDER BY allows it.
        stream_keys = None
        if groups and not distinct:
            prefix = []
            for k in keys:
                if k[0] not in groups:
                    break
                prefix.append(k)
            covered = {k[0] for k in prefix}
            if covered == set(groups):
                stream_keys = prefix
            elif len(prefix) == len(keys):
                stream_keys = prefix + [(c, False, False, None) for c in groups if c not in covered]
        user_keys = len(keys)
        if stream_keys is not None:
            s.sortClause = tuple(self._sort_by(k) for k in stream_keys)
        else:
            s.sortClause = None
        shard_limited = (stream_keys is not None and having is None and limit is not None and not with_ties)
        self._shard_limit(s, limit, offset, limit_node, offset_node, keep=shard_limited)
        self._append_hidden(s)
        final = self._final
        aggregates = tuple(AggSpec(a.func, final(a.column), tuple(final(h) for h in a.helpers), a.text)
                           for _, a in self.slots)
        order = tuple(SortKey(final(c), d, n, coll) for c, d, n, coll in keys)
        sort = tuple(SortKey(final(c), d, n, coll) for c, d, n, coll in (stream_keys or ()))
        return MergePlan(
            sql=self.sql, shard_sql=_text(s), hidden=len(self.hidden), mode="groups", sort=sort, order_keys=user_keys,
            order=order, limit=limit, offset=offset, with_ties=with_ties, distinct=distinct, distinct_on=(),
            distinct_sorted=False, group_by=tuple(final(c) for c in groups), aggregates=aggregates,
            having=_finish_pred(having, final) if having is not None else None,
            streaming=stream_keys is not None, sort_added=stream_keys is not None and len(stream_keys) > user_keys,
            shard_limited=shard_limited, collations=frozenset(k.collation for k in order + sort if k.collation),
            constructs=frozenset(self.constructs))

    # -- HAVING ---------------------------------------------------------------------------------------

    def _predicate(self, node: Any) -> tuple:
        """A HAVING condition evaluated after the merge:
        ("and"|"or", (p, ...)), ("not", p), ("cmp", op, a, b), ("null", a, is_null),
        ("between", a, lo, hi, negated); operands ("col", column), ("const", kind, text) or
        ("param", number) (its value comes from the Bind)."""
        if isinstance(node, ast.BoolExpr):
            parts = tuple(self._predicate(a) for a in node.args)
            if node.boolop == BoolExprType.NOT_EXPR:
                return ("not", parts[0])
            return ("and" if node.boolop == BoolExprType.AND_EXPR else "or", parts)
        if isinstance(node, ast.NullTest):
            return ("null", self._operand(node.arg), node.nulltesttype == NullTestType.IS_NULL)
        if isinstance(node, ast.A_Expr):
            op = [n.sval for n in node.name if isinstance(n, ast.String)]
            if node.kind == A_Expr_Kind.AEXPR_OP and len(op) == 1 and op[0] in _COMPARISONS:
                return ("cmp", "<>" if op[0] == "!=" else op[0], self._operand(node.lexpr), self._operand(node.rexpr))
            if node.kind in (A_Expr_Kind.AEXPR_BETWEEN, A_Expr_Kind.AEXPR_NOT_BETWEEN):
                lo, hi = node.rexpr
                return ("between", self._operand(node.lexpr), self._operand(lo), self._operand(hi),
                        node.kind == A_Expr_Kind.AEXPR_NOT_BETWEEN)
        raise MergeRefused(f"HAVING {_text(node)} cannot be evaluated after a cross-shard merge; compare aggregates "
                           "with constants (=, <>, <, <=, >, >=, BETWEEN, IS NULL) joined by AND / OR / NOT")

    def _operand(self, node: Any) -> tuple:
        if _is_aggregate(node):
            return ("col", self._agg_column(node))
        inner = node.arg if isinstance(node, ast.TypeCast) else node
        if isinstance(inner, ast.ParamRef):
            if isinstance(node, ast.TypeCast):
                raise MergeRefused(f"HAVING with a cast parameter ({_text(node)}) cannot be evaluated after a "
                                   "cross-shard merge; write the parameter without a cast")
            return ("param", inner.number)
        if isinstance(inner, ast.A_Const):
            if isinstance(node, ast.TypeCast) and not (inner.isnull or isinstance(inner.val, ast.String)):
                raise MergeRefused(f"HAVING with a cast number ({_text(node)}) cannot be evaluated after a cross-shard "
                                   "merge; write the number without a cast")
            if inner.isnull:
                return ("const", "null", None)
            v = inner.val
            if isinstance(v, ast.Integer):
                return ("const", "int", str(v.ival))
            if isinstance(v, ast.Float):
                return ("const", "num", v.fval)
            if isinstance(v, ast.Boolean):
                return ("const", "bool", "t" if v.boolval else "f")
            if isinstance(v, ast.String):
                return ("const", "str", v.sval)
        if _has_aggregate(node):
            raise MergeRefused(f"HAVING with an expression over aggregates ({_text(node)}) cannot be evaluated after "
                               "a cross-shard merge; compare the aggregate itself with a constant")
        if isinstance(node, (ast.ParamRef, ast.SubLink)) or any(isinstance(n, (ast.ParamRef, ast.SubLink))
                                                                 for n in _walk(node)):
            raise MergeRefused(f"HAVING with {_text(node)} cannot be evaluated after a cross-shard merge; use a "
                               "constant")
        # A group-key expression: the same on every shard for a group.
        return ("col", self._match_target(node) or self._hide(node))


def _setop_leaves(s: ast.SelectStmt) -> list:
    if s.op == SetOperation.SETOP_NONE:
        return [s]
    return _setop_leaves(s.larg) + _setop_leaves(s.rarg)


def _branch_combines(leaf: ast.SelectStmt, allow_distinct: bool) -> Optional[str]:
    """What in one SELECT of a UNION would need all shards' rows (None if nothing)."""
    for clause in (leaf.targetList, leaf.havingClause, leaf.sortClause):
        name = _window(clause)
        if name is not None:
            return f"window function {name}()"
        if _has_aggregate(clause):
            return "an aggregate"
    if leaf.windowClause:
        return "a window"
    if leaf.groupClause or leaf.havingClause is not None:
        return "GROUP BY / HAVING"
    if leaf.limitCount is not None or leaf.limitOffset is not None:
        return "LIMIT / OFFSET"
    if leaf.distinctClause is not None and not (allow_distinct and len(leaf.distinctClause) == 1
                                                and leaf.distinctClause[0] is None):
        return "DISTINCT"
    return None


def _has_param(node: Any) -> bool:
    return any(isinstance(n, ast.ParamRef) for n in _walk(node, stop=()))


def _conjuncts(node: Any) -> list:
    if isinstance(node, ast.BoolExpr) and node.boolop == BoolExprType.AND_EXPR:
        out = []
        for a in node.args:
            out += _conjuncts(a)
        return out
    return [node]


def _finish_pred(p: tuple, final: Any) -> tuple:
    kind = p[0]
    if kind in ("and", "or"):
        return (kind, tuple(_finish_pred(x, final) for x in p[1]))
    if kind == "not":
        return ("not", _finish_pred(p[1], final))
    if kind == "col":
        return ("col", final(p[1]))
    if kind in ("const", "param"):
        return p
    return (kind,) + tuple(_finish_pred(x, final) if isinstance(x, tuple) else x for x in p[1:])
