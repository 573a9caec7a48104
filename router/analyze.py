"""Statement analysis for routing: tables, sharding-key conditions and constructs, per query text.

The analysis of a statement is computed once per query text and plan (then cached by the Router)
and holds everything that does not depend on Bind values or session state:

- every table, classified against the plan: system catalog, schema-sharded, key-sharded,
  omnisharded, or unknown (a column-based rule exists and nothing shows whether the table has
  that column);
- a *condition tree* saying which shards can hold the rows the statement touches: shard
  bitmasks for constants, leaves for `$n` parameters, and & / | nodes. Extraction follows the
  boolean structure of WHERE and inner-join ON clauses: `key = v`, `v = key`, `key IN (...)`,
  `key = ANY(ARRAY[...] or $n)`, AND (intersection), OR (union); anything else -- NOT, ranges,
  functions, a comparison with another column -- means "all shards". Over-approximating is always
  safe: the statement then runs on more shards, each of which holds only its own rows;
- INSERT rows (the shard of each row's key), UPDATEs of the key column, and subqueries whose
  result would differ if computed per shard (aggregates, DISTINCT, LIMIT... over sharded data).

The model: a routed statement runs unchanged on each shard of its route, and each shard sees only
its own rows. Tables sharded by the same function are co-located (rows with the same key are on
the same shard), so joins on the key and correlated subqueries work per shard; that is the
assumption PgDog makes too.
"""

from __future__ import annotations

from typing import Any, Optional, Union

from .params import parse_text_array
from .plan import CATALOG_SCHEMAS, ShardingPlan, TableRule
from .session import change_from_stmt
from .sharding import INVALID, KeyFunction

__all__ = ["Analyzer", "Ref", "Scope", "StmtInfo", "Cond"]

# Table kinds.
CATALOG, SCHEMA, SHARDED, OMNI, UNKNOWN, DERIVED = range(6)

# A condition: an int shard mask, or a tuple node:
#   ("p", fn, n)    rows whose key equals parameter $n
#   ("a", fn, n)    rows whose key is an element of array parameter $n
#   ("i", fn, n)    the shard a new row with key $n goes to (INSERT; may be unplaceable)
#   ("&", c, ...)   intersection; ("|", c, ...) union
Cond = Union[int, tuple]

# Built-in aggregate functions (src/include/catalog/pg_aggregate.dat). User-defined aggregates
# cannot be told from functions without the catalog; any call with FILTER, WITHIN GROUP, ORDER BY
# inside, DISTINCT or * is an aggregate whatever its name.
AGGREGATES = frozenset("""
    avg bit_and bit_or bit_xor bool_and bool_or count every max min sum array_agg string_agg
    json_agg json_agg_strict jsonb_agg jsonb_agg_strict json_object_agg jsonb_object_agg
    json_object_agg_strict json_object_agg_unique json_object_agg_unique_strict
    jsonb_object_agg_strict jsonb_object_agg_unique jsonb_object_agg_unique_strict xmlagg range_agg
    range_intersect_agg any_value corr covar_pop covar_samp regr_avgx regr_avgy regr_count
    regr_intercept regr_r2 regr_slope regr_sxx regr_sxy regr_syy stddev stddev_pop stddev_samp
    variance var_pop var_samp mode percentile_cont percentile_disc
""".split())

# Constructs that make a SELECT's result depend on seeing all rows at once.
COMBINING = ("aggregate", "GROUP BY", "HAVING", "DISTINCT", "LIMIT", "OFFSET", "window function",
             "UNION", "INTERSECT", "EXCEPT")
# Top-level constructs a cross-shard SELECT needs merged, in the order a refusal names them.
_MERGE_ORDER = ("ORDER BY",) + COMBINING
# Of those, the ones a GROUP BY on the sharding key makes shard-local (each group on one shard).
_GROUP_LOCAL = frozenset(("aggregate", "GROUP BY", "HAVING"))

# Casts that keep a literal or parameter a value of the key's type (typeName's last name part).
_CASTS = {
    "bigint": frozenset(("int8", "int4", "int2", "bigint", "integer", "int", "smallint")),
    "varchar": frozenset(("text", "varchar", "name")),
    "uuid": frozenset(("uuid",)),
}
_UNIQUE_ID_SCHEMAS = frozenset(("pgherd", "pgdog"))
# DROP object types whose names are relations (DropStmt.removeType).
_DROP_RELATIONS = frozenset(("OBJECT_TABLE", "OBJECT_VIEW", "OBJECT_MATVIEW", "OBJECT_INDEX",
                             "OBJECT_SEQUENCE", "OBJECT_FOREIGN_TABLE"))


class Refusal(Exception):
    """A statement shape pgherd cannot route correctly (SQLSTATE code, message)."""

    def __init__(self, message: str, code: str = "0A000") -> None:
        super().__init__(message)
        self.message, self.code = message, code


class Ref:
    """A table (or derived table) named in a statement, classified against the plan."""

    __slots__ = ("schema", "name", "kind", "rules", "sticky", "mask", "path_dependent", "proven", "scope",
                 "implicit")

    def __init__(self, schema: Optional[str], name: str, kind: int) -> None:
        self.schema, self.name, self.kind = schema, name, kind
        self.rules: tuple[TableRule, ...] = ()
        self.sticky = False
        self.mask = 0  # SCHEMA: the schema's shards
        self.path_dependent = False  # unqualified, and schema sharding may claim it via search_path
        self.proven: Optional[TableRule] = None  # UNKNOWN shown to have a column-rule's column
        self.scope: Optional[Scope] = None  # DERIVED: the subquery or CTE
        self.implicit = False  # OMNI by default rather than listed

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}" if self.schema else self.name

    @property
    def key_sharded(self) -> bool:
        return self.kind == SHARDED or (self.kind == UNKNOWN and self.proven is not None)

    def key_rule(self) -> Optional[TableRule]:
        if self.kind == SHARDED:
            return self.rules[0]
        return self.proven

    def __repr__(self) -> str:
        return f"Ref({self.qualified}, {('catalog', 'schema', 'sharded', 'omni', 'unknown', 'derived')[self.kind]})"


class Scope:
    """One SELECT level (or a DML statement's own level): its tables, conditions and constructs."""

    __slots__ = ("parent", "names", "refs", "subs", "cond", "constructs", "correlated", "ctes", "group_keys",
                 "detail", "value", "branches", "self_ref", "key_joins", "key_fixed")

    def __init__(self, parent: Optional["Scope"]) -> None:
        self.parent = parent
        self.names: dict[str, Ref] = {}
        self.refs: list[Ref] = []
        self.subs: list[Scope] = []
        self.cond: Cond = -1  # set by the analyzer
        self.constructs: list[str] = []
        self.correlated = False
        self.ctes: dict[str, Scope] = {}
        self.group_keys = False  # GROUP BY includes a sharding key column
        self.detail: dict[str, str] = {}  # construct -> how to name it in a message
        # A subquery whose result is used as a value (scalar, ARRAY(...), x > ALL (...), a
        # non-positive IN/EXISTS), rather than as rows joined or semi-joined to the outer query.
        self.value = False
        self.branches: list[Scope] = []  # the two sides of UNION / INTERSECT / EXCEPT
        self.self_ref = False  # stands for a recursive CTE inside its own definition
        self.key_joins: list[tuple[Ref, Ref]] = []  # key-sharded tables joined key = key (ANDed)
        self.key_fixed: list[Ref] = []  # key-sharded tables whose key is compared with values (ANDed)

    def add_construct(self, name: str, detail: Optional[str] = None) -> None:
        if name not in self.constructs:
            self.constructs.append(name)
            if detail:
                self.detail[name] = detail

    def combining(self) -> list[str]:
        local = self.group_keys
        return [c for c in self.constructs if c in COMBINING and not (local and c in _GROUP_LOCAL)]

    def reads_key_sharded(self) -> bool:
        if any(r.key_sharded or (r.kind == DERIVED and r.scope is not None and r.scope.reads_key_sharded())
               for r in self.refs):
            return True
        return any(s.reads_key_sharded() for s in self.subs)

    def rows_from_key_sharded(self) -> bool:
        """Whether every row this scope returns comes from a sharded table (by key or by schema), so a
        cross-shard run returns each row once; rows made from omnisharded tables alone repeat per shard."""
        if self.self_ref:
            return True  # the CTE's own rows: neutral
        if self.branches:
            return all(b.rows_from_key_sharded() for b in self.branches)
        return any(r.key_sharded or r.kind == SCHEMA
                   or (r.kind == DERIVED and r.scope is not None and r.scope.rows_from_key_sharded())
                   for r in self.refs)

    def describe(self, construct: str) -> str:
        return self.detail.get(construct, construct)


class StmtInfo:
    """The routing-relevant facts of one statement (see module docstring)."""

    __slots__ = (
        "kind", "read", "special", "refs", "cond", "top", "target", "insert_rows", "insert_const",
        "insert_split_const", "key_sets", "checks", "merge", "refuse", "write_all", "unique_id",
        "path_dependent", "params", "split_copy", "ddl_objects", "catalog_all", "memo", "follow_tx",
        "modifying_cte", "locking", "explain", "insert_count",
    )

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.read = False
        self.special: Any = None  # a ready Route for statements that do not depend on tables
        self.refs: list[Ref] = []
        self.cond: Cond = -1
        self.top: Optional[Scope] = None
        self.target: Optional[Ref] = None
        self.insert_rows: Optional[list[Cond]] = None  # parameter rows; const rows are folded
        self.insert_const = 0
        self.insert_split_const = False
        self.key_sets: list[tuple[Cond, str]] = []  # UPDATE SET key = value
        self.checks: list[tuple] = []  # (condition, what it is[, what to do instead]) to verify
        self.merge: tuple[str, ...] = ()  # top-level combining constructs, in order of appearance
        self.refuse: Optional[Refusal] = None
        self.write_all = False  # DDL-like: every shard, by nature
        self.unique_id = False
        self.path_dependent = False
        self.params = False  # the route depends on Bind values
        self.split_copy = False
        self.ddl_objects: list[tuple[Optional[str], str]] = []
        self.catalog_all = False  # system_catalogs = "sharded" and a catalog is read
        self.memo: dict[int, Any] = {}  # shard mask -> Route, for parameterized statements
        self.follow_tx = False
        self.modifying_cte = False
        self.locking = False
        self.explain: Optional[str] = None  # "analyze" or "plain" for EXPLAIN
        self.insert_count = 0


# ---------------------------------------------------------------------------------------------


def _typed(node: Any) -> Optional[tuple[str, Any]]:
    """(tag, body) of a node dict like {"A_Const": {...}}; None for bodies, lists and scalars."""
    if type(node) is dict and len(node) == 1:
        for item in node.items():
            if "A" <= item[0][0] <= "Z":
                return item
    return None


# Leaf nodes whose only routing interest is handled by the caller (no subqueries inside).
_LEAVES = frozenset(("ColumnRef", "A_Const", "ParamRef"))


def _is_leaf(node: Any) -> bool:
    t = _typed(node)
    return t is not None and t[0] in _LEAVES


def _sval(node: dict) -> Optional[str]:
    s = node.get("String")
    return None if s is None else s.get("sval", "")


def _name_parts(nodes: list) -> list[str]:
    return [p for p in (_sval(n) for n in nodes) if p is not None]


class Analyzer:
    """Builds StmtInfo for statements of one plan. Not thread-safe (one per worker, like the plan)."""

    def __init__(self, plan: ShardingPlan) -> None:
        self.plan = plan
        self.all = plan.all_mask
        self.info: StmtInfo = StmtInfo("none")

    # -- conditions -----------------------------------------------------------------------------

    def c_and(self, a: Cond, b: Cond) -> Cond:
        if type(a) is int and type(b) is int:
            return a & b
        if a == self.all:
            return b
        if b == self.all:
            return a
        if a == 0 or b == 0:
            return 0
        return ("&", a, b)

    def c_or(self, a: Cond, b: Cond) -> Cond:
        if type(a) is int and type(b) is int:
            return a | b
        if a == self.all or b == self.all:
            return self.all
        if a == 0:
            return b
        if b == 0:
            return a
        return ("|", a, b)

    # -- tables ---------------------------------------------------------------------------------

    def classify(self, schema: Optional[str], name: str) -> Ref:
        plan = self.plan
        if schema in CATALOG_SCHEMAS or (schema is None and name.startswith("pg_")):
            ref = Ref(schema, name, CATALOG)
            ref.sticky = plan.system_catalogs == "omnisharded_sticky"
            if plan.system_catalogs == "sharded":
                self.info.catalog_all = True
            return ref
        if schema is not None and schema in plan.schemas:
            ref = Ref(schema, name, SCHEMA)
            ref.mask = plan.schemas[schema]
            return ref
        rules = plan.rules_for(schema, name)
        if rules:
            ref = Ref(schema, name, SHARDED)
            ref.rules = rules
        elif name in plan.omni:
            ref = Ref(schema, name, OMNI)
            ref.sticky = plan.omni[name]
        elif plan.nameless:
            cols = plan.table_columns(schema, name)
            rule = None if cols is None else next((plan.nameless[c] for c in cols if c in plan.nameless), None)
            if cols is None:
                ref = Ref(schema, name, UNKNOWN)
            elif rule is not None:
                ref = Ref(schema, name, SHARDED)
                ref.rules = (rule,)
            else:
                ref = self._unmapped(schema, name)
        else:
            ref = self._unmapped(schema, name)
        if schema is None and plan.schemas:
            ref.path_dependent = True
            self.info.path_dependent = True
        return ref

    def _unmapped(self, schema: Optional[str], name: str) -> Ref:
        """A table no rule names: on the default schema shard if one is configured, else omnisharded."""
        if self.plan.schema_default is not None:
            ref = Ref(schema, name, SCHEMA)
            ref.mask = self.plan.schema_default
            return ref
        ref = Ref(schema, name, OMNI)
        ref.sticky = self.plan.omni_sticky
        ref.implicit = True
        return ref

    def add_table(self, body: dict, scope: Scope) -> Ref:
        schema, name = body.get("schemaname"), body.get("relname", "")
        alias = (body.get("alias") or {}).get("aliasname")
        if schema is None:
            s: Optional[Scope] = scope
            while s is not None:  # a CTE of this or an enclosing level shadows a table
                cte = s.ctes.get(name)
                if cte is not None:
                    ref = Ref(None, name, DERIVED)
                    ref.scope = cte
                    scope.refs.append(ref)
                    scope.names[alias or name] = ref
                    return ref
                s = s.parent
        ref = self.classify(schema, name)
        scope.refs.append(ref)
        scope.names[alias or name] = ref
        self.info.refs.append(ref)
        return ref

    # -- columns --------------------------------------------------------------------------------

    def key_of(self, node: Any, scope: Scope) -> Optional[KeyFunction]:
        """The sharding function if node is a sharding-key column reference (proves unknown tables)."""
        t = _typed(node)
        if t is None:
            return None
        kind, body = t
        if kind == "TypeCast":
            return self.key_of(body.get("arg"), scope)
        if kind != "ColumnRef":
            return None
        fields = body.get("fields", [])
        col = _sval(fields[-1]) if fields else None
        if col is None:
            return None
        if len(fields) == 1:
            return self._unqualified(col, scope)
        qual = _sval(fields[-2])
        schema = _sval(fields[-3]) if len(fields) >= 3 else None
        ref = self._lookup(qual, schema, scope)
        return None if ref is None else self._ref_key(ref, col)

    def _outer_join_keys(self, quals: Any, scope: Scope) -> None:
        """key = key conditions ANDed in an outer join's ON: the joined rows live on one shard."""
        t = _typed(quals)
        if t is None:
            return
        kind, body = t
        if kind == "BoolExpr" and body.get("boolop") == "AND_EXPR":
            for arg in body.get("args", []):
                self._outer_join_keys(arg, scope)
        elif kind == "A_Expr" and body.get("kind") == "AEXPR_OP" and _name_parts(body.get("name", []))[-1:] == ["="]:
            left, right = self.key_of(body.get("lexpr"), scope), self.key_of(body.get("rexpr"), scope)
            if left is not None and right is not None and left.signature == right.signature:
                a, b = self.key_table(body.get("lexpr"), scope), self.key_table(body.get("rexpr"), scope)
                if a is not None and b is not None and a is not b:
                    scope.key_joins.append((a, b))

    def _fix(self, column: Any, scope: Scope) -> None:
        ref = self.key_table(column, scope)
        if ref is not None:
            scope.key_fixed.append(ref)

    def key_table(self, node: Any, scope: Scope) -> Optional[Ref]:
        """The key-sharded table whose sharding key column node names (in this scope), if any."""
        t = _typed(node)
        while t is not None and t[0] == "TypeCast":
            t = _typed(t[1].get("arg"))
        if t is None or t[0] != "ColumnRef":
            return None
        fields = t[1].get("fields", [])
        col = _sval(fields[-1]) if fields else None
        if col is None:
            return None
        if len(fields) >= 2:
            ref = self._lookup(_sval(fields[-2]), _sval(fields[-3]) if len(fields) >= 3 else None, scope)
            return ref if ref is not None and ref.key_sharded and self._ref_key(ref, col) is not None else None
        owners = [r for r in scope.refs if r.key_sharded and self._ref_key(r, col) is not None]
        return owners[0] if len(owners) == 1 else None

    def _lookup(self, qual: Optional[str], schema: Optional[str], scope: Scope) -> Optional[Ref]:
        crossed = []
        s: Optional[Scope] = scope
        while s is not None:
            ref = s.names.get(qual) if qual is not None else None
            if ref is not None and (schema is None or ref.schema in (None, schema)):
                for c in crossed:
                    c.correlated = True
                return ref
            crossed.append(s)
            s = s.parent
        return None

    def _ref_key(self, ref: Ref, col: str) -> Optional[KeyFunction]:
        if ref.kind == SHARDED:
            for rule in ref.rules:
                if rule.column == col:
                    return rule.fn
            return None
        if ref.kind == UNKNOWN:
            rule = self.plan.nameless.get(col)
            if rule is not None:
                if ref.proven is None:
                    ref.proven = rule
                return rule.fn if ref.proven is rule else None
        return None

    def _unqualified(self, col: str, scope: Scope) -> Optional[KeyFunction]:
        unknowns = []
        for ref in scope.refs:
            if ref.kind == SHARDED:
                for rule in ref.rules:
                    if rule.column == col:
                        return rule.fn
            elif ref.kind == UNKNOWN:
                unknowns.append(ref)
        rule = self.plan.nameless.get(col)
        if rule is not None and unknowns:
            if len(unknowns) == 1:
                return self._ref_key(unknowns[0], col)
            return rule.fn  # one of them has it (SQL requires it unambiguous); which one does not matter
        return None

    # -- values ---------------------------------------------------------------------------------

    def value_of(self, node: Any, fn: KeyFunction) -> tuple[str, Any]:
        """("const", normalized value or None for NULL) | ("param", n) | ("other", node)."""
        t = _typed(node)
        if t is None:
            return ("other", node)
        kind, body = t
        if kind == "A_Const":
            if body.get("isnull"):
                return ("const", None)
            if "ival" in body:
                return ("const", fn.int_value(body["ival"].get("ival", 0)))
            if "sval" in body:
                return ("const", fn.text_value(body["sval"].get("sval", "")))
            if "fval" in body:
                return ("const", fn.numeric_value(body["fval"].get("fval", "0")))
            return ("const", INVALID)
        if kind == "ParamRef":
            self.info.params = True
            return ("param", body.get("number", 0))
        if kind == "TypeCast":
            names = _name_parts(body.get("typeName", {}).get("names", []))
            if names and names[-1] in _CASTS.get(fn.data_type, ()) and not body["typeName"].get("arrayBounds"):
                return self.value_of(body.get("arg"), fn)
        return ("other", node)

    def eq_leaf(self, value: tuple[str, Any], fn: KeyFunction) -> Cond:
        how, v = value
        if how == "const":
            return fn.mask(v)
        if how == "param":
            return ("p", fn, v)
        return self.all

    # -- boolean conditions ---------------------------------------------------------------------

    def eval_bool(self, node: Any, scope: Scope) -> Cond:
        t = _typed(node)
        if t is None:
            return self.all
        kind, body = t
        if kind == "BoolExpr":
            op = body.get("boolop")
            args = body.get("args", [])
            if op == "AND_EXPR":
                c: Cond = self.all
                for a in args:
                    c = self.c_and(c, self.eval_bool(a, scope))
                return c
            if op == "OR_EXPR":
                c = 0
                joins, fixed = len(scope.key_joins), len(scope.key_fixed)
                for a in args:
                    c = self.c_or(c, self.eval_bool(a, scope))
                # key = key or key = value inside OR does not restrict a table's rows
                del scope.key_joins[joins:]
                del scope.key_fixed[fixed:]
                return c
            self.walk(args, scope)
            return self.all
        if kind == "A_Expr":
            return self.eval_a_expr(body, scope)
        if kind == "SubLink":
            return self.sublink(body, scope, positive=True)
        self.walk(node, scope)
        return self.all

    def eval_a_expr(self, body: dict, scope: Scope) -> Cond:
        ekind = body.get("kind")
        names = _name_parts(body.get("name", []))
        op = names[-1] if names else ""
        lexpr, rexpr = body.get("lexpr"), body.get("rexpr")
        # Walk the operands for subqueries and proofs; plain leaves are looked at below anyway.
        if op != "=" or not _is_leaf(lexpr):
            self.walk(lexpr, scope)
        if op != "=" or not _is_leaf(rexpr):
            self.walk(rexpr, scope)
        if op != "=":
            return self.all
        if ekind == "AEXPR_OP":
            left, right = self.key_of(lexpr, scope), self.key_of(rexpr, scope)
            if left is not None and right is None:
                self._fix(lexpr, scope)
                return self.eq_leaf(self.value_of(rexpr, left), left)
            if right is not None and left is None:
                self._fix(rexpr, scope)
                return self.eq_leaf(self.value_of(lexpr, right), right)
            if left is not None and right is not None:
                a, b = self.key_table(lexpr, scope), self.key_table(rexpr, scope)
                if a is not None and b is not None and a is not b and left.signature == right.signature:
                    scope.key_joins.append((a, b))  # co-located: equal keys live on the same shard
            return self.all  # key = key (a join) or no key at all
        if ekind == "AEXPR_IN":
            fn = self.key_of(lexpr, scope)
            t = _typed(rexpr)
            if fn is None or t is None or t[0] != "List":
                return self.all
            self._fix(lexpr, scope)
            c: Cond = 0
            for item in t[1].get("items", []):
                c = self.c_or(c, self.eq_leaf(self.value_of(item, fn), fn))
            return c
        if ekind == "AEXPR_OP_ANY":
            fn = self.key_of(lexpr, scope)
            if fn is None:
                return self.all
            self._fix(lexpr, scope)
            t = _typed(rexpr)
            while t is not None and t[0] == "TypeCast":
                t = _typed(t[1].get("arg"))
            if t is None:
                return self.all
            if t[0] == "A_ArrayExpr":
                c = 0
                for item in t[1].get("elements", []):
                    c = self.c_or(c, self.eq_leaf(self.value_of(item, fn), fn))
                return c
            if t[0] == "ParamRef":
                self.info.params = True
                return ("a", fn, t[1].get("number", 0))
            if t[0] == "A_Const" and "sval" in t[1]:
                elems = parse_text_array(t[1]["sval"].get("sval", ""))
                if elems is None:
                    return self.all
                c = 0
                for e in elems:
                    c |= fn.mask(None if e is None else fn.text_value(e))
                return c
        return self.all

    # -- walking expressions --------------------------------------------------------------------

    def walk(self, node: Any, scope: Scope) -> None:
        """Visit an expression tree: subqueries, function calls, column references (for proofs)."""
        if type(node) is list:
            for x in node:
                self.walk(x, scope)
            return
        if type(node) is not dict:
            return
        t = _typed(node)
        if t is None:
            for v in node.values():
                if type(v) is dict or type(v) is list:
                    self.walk(v, scope)
            return
        kind, body = t
        if kind == "ColumnRef":
            self.key_of(node, scope)
        elif kind == "SubLink":
            self.sublink(body, scope, positive=False)
        elif kind == "FuncCall":
            self.funccall(body, scope)
        elif kind == "SelectStmt":
            scope.subs.append(self.select_scope(body, scope))
        elif kind in ("JsonArrayAgg", "JsonObjectAgg"):
            scope.add_construct("aggregate", "aggregate " + ("JSON_ARRAYAGG" if kind == "JsonArrayAgg" else "JSON_OBJECTAGG"))
            self.walk(body, scope)
        elif kind in ("A_Const", "ParamRef", "String", "Integer", "Float", "Boolean"):
            pass  # a parameter matters only where it gives a key value (value_of)
        else:
            self.walk(body, scope)

    def funccall(self, body: dict, scope: Scope) -> None:
        names = _name_parts(body.get("funcname", []))
        fname = names[-1].lower() if names else ""
        if fname == "unique_id" and len(names) == 2 and names[0].lower() in _UNIQUE_ID_SCHEMAS:
            self.info.unique_id = True
        if "over" in body:
            scope.add_construct("window function", f"window function {fname}()")
        elif (fname in AGGREGATES and (len(names) == 1 or names[0] == "pg_catalog")) or any(
            body.get(k) for k in ("agg_star", "agg_distinct", "agg_order", "agg_within_group", "agg_filter")
        ):
            scope.add_construct("aggregate", f"aggregate {fname}()")
        for k, v in body.items():
            if k != "funcname" and (type(v) is dict or type(v) is list):
                self.walk(v, scope)

    def sublink(self, body: dict, scope: Scope, positive: bool) -> Cond:
        sub = self.select_scope(body["subselect"]["SelectStmt"], scope) if "subselect" in body else None
        rows = positive and body.get("subLinkType") in ("EXISTS_SUBLINK", "ANY_SUBLINK")
        if sub is not None:
            scope.subs.append(sub)
            sub.value = not rows
        self.walk(body.get("testexpr"), scope)
        if sub is None or not rows:
            return self.all
        return self.row_cond(sub)

    def row_cond(self, sub: Scope) -> Cond:
        """A subquery's condition where its rows exist only on its shards (no aggregate result row)."""
        if any(c in sub.constructs for c in ("aggregate", "GROUP BY", "HAVING", "window function")):
            return self.all
        return sub.cond

    # -- SELECT ---------------------------------------------------------------------------------

    def with_clause(self, body: dict, scope: Scope) -> None:
        with_ = body.get("withClause")
        if not with_:
            return
        for item in with_.get("ctes", []):
            cte = item.get("CommonTableExpr", {})
            name = cte.get("ctename", "")
            # WITH RECURSIVE: the recursive term reads the CTE's own rows, which live where the
            # non-recursive term's rows do; so the self-reference adds no shard (cond 0 under OR).
            if with_.get("recursive"):
                placeholder = Scope(scope)
                placeholder.cond = 0
                placeholder.self_ref = True
                scope.ctes[name] = placeholder
            q = _typed(cte.get("ctequery"))
            if q is None:
                continue
            if q[0] == "SelectStmt":
                sub = self.select_scope(q[1], scope)
            else:
                self.info.modifying_cte = True
                sub = Scope(scope)
                sub.cond = self.all
                self.walk(q[1], sub)
            scope.ctes[name] = sub
            scope.subs.append(sub)

    def select_scope(self, body: dict, parent: Optional[Scope]) -> Scope:
        scope = Scope(parent)
        self.with_clause(body, scope)
        op = body.get("op", "SETOP_NONE")
        if op != "SETOP_NONE":
            left = self.select_scope(body.get("larg", {}), scope)
            right = self.select_scope(body.get("rarg", {}), scope)
            scope.subs += [left, right]
            scope.branches = [left, right]
            distinct = not body.get("all")
            if op == "SETOP_UNION":
                scope.cond = self.c_or(left.cond, right.cond)
                if distinct:
                    scope.add_construct("UNION")
            elif op == "SETOP_INTERSECT":
                scope.cond = self.c_and(left.cond, right.cond)
                scope.add_construct("INTERSECT")
            else:
                scope.cond = left.cond
                scope.add_construct("EXCEPT")
            self.tail_clauses(body, scope)
            return scope
        cond: Cond = self.all
        for item in body.get("valuesLists", []):
            self.walk(item, scope)
        for item in body.get("fromClause", []):
            cond = self.c_and(cond, self.from_item(item, scope))
        if "whereClause" in body:
            cond = self.c_and(cond, self.eval_bool(body["whereClause"], scope))
        scope.cond = cond
        self.walk(body.get("targetList"), scope)
        if body.get("groupClause"):
            scope.add_construct("GROUP BY")
            for g in body["groupClause"]:
                if self.key_of(g, scope) is not None:
                    scope.group_keys = True
                self.walk(g, scope)
        if body.get("havingClause"):
            scope.add_construct("HAVING")
            self.walk(body["havingClause"], scope)
        if "distinctClause" in body:
            scope.add_construct("DISTINCT", "DISTINCT ON" if any(body["distinctClause"]) else "DISTINCT")
            self.walk(body["distinctClause"], scope)
        self.walk(body.get("windowClause"), scope)
        if body.get("lockingClause"):
            self.info.locking = True
        self.tail_clauses(body, scope)
        return scope

    def tail_clauses(self, body: dict, scope: Scope) -> None:
        if body.get("sortClause"):
            scope.add_construct("ORDER BY")
            self.walk(body["sortClause"], scope)
        limit = body.get("limitCount")
        if limit is not None and not (_typed(limit) or ("", {}))[1].get("isnull"):
            with_ties = body.get("limitOption") == "LIMIT_OPTION_WITH_TIES"
            scope.add_construct("LIMIT", "FETCH FIRST ... WITH TIES" if with_ties else "LIMIT")
            self.walk(limit, scope)
        if body.get("limitOffset") is not None:
            scope.add_construct("OFFSET")
            self.walk(body["limitOffset"], scope)

    def from_item(self, node: Any, scope: Scope) -> Cond:
        t = _typed(node)
        if t is None:
            return self.all
        kind, body = t
        if kind == "RangeVar":
            ref = self.add_table(body, scope)
            if ref.kind == DERIVED and ref.scope is not None:
                return self.row_cond(ref.scope)
            return self.all
        if kind == "JoinExpr":
            before = len(scope.refs)
            left = self.from_item(body.get("larg"), scope)
            middle = len(scope.refs)
            right = self.from_item(body.get("rarg"), scope)
            for name in body.get("usingClause", []):
                # JOIN ... USING (key): the key columns of both sides are equal.
                col = _sval(name)
                a = [r for r in scope.refs[before:middle] if r.key_sharded and self._ref_key(r, col)]
                b = [r for r in scope.refs[middle:] if r.key_sharded and self._ref_key(r, col)]
                if len(a) == 1 and len(b) == 1 and self._ref_key(a[0], col).signature == \
                        self._ref_key(b[0], col).signature:
                    scope.key_joins.append((a[0], b[0]))
            jt = body.get("jointype", "JOIN_INNER")
            if jt == "JOIN_INNER":
                quals = self.eval_bool(body["quals"], scope) if "quals" in body else self.all
                return self.c_and(self.c_and(left, right), quals)
            self.walk(body.get("quals"), scope)
            self._outer_join_keys(body.get("quals"), scope)
            if jt == "JOIN_LEFT":
                return left
            if jt == "JOIN_RIGHT":
                return right
            return self.all
        if kind == "RangeSubselect":
            sub = self.select_scope(body["subquery"]["SelectStmt"], scope)
            scope.subs.append(sub)
            ref = Ref(None, (body.get("alias") or {}).get("aliasname", ""), DERIVED)
            ref.scope = sub
            scope.refs.append(ref)
            scope.names[ref.name] = ref
            return self.row_cond(sub)
        if kind == "RangeTableSample":
            return self.from_item(body.get("relation"), scope)
        # RangeFunction, JSON_TABLE, XMLTABLE: no table of their own; may call functions.
        self.walk(body, scope)
        alias = (body.get("alias") or {}).get("aliasname")
        if alias:
            ref = Ref(None, alias, DERIVED)
            scope.names[alias] = ref
        return self.all

    # -- statements -----------------------------------------------------------------------------

    def analyze(self, stmt: dict) -> StmtInfo:
        """StmtInfo for one raw statement (as parse_statements returns it)."""
        kind, body = next(iter(stmt.items()))
        handler = getattr(self, "_" + kind, None)
        if handler is None:
            info = self._ddl(kind, body)
        else:
            info = handler(body)
        return info

    def _start(self, kind: str) -> StmtInfo:
        self.info = StmtInfo(kind)
        return self.info

    def _finish(self, info: StmtInfo, top: Scope) -> StmtInfo:
        info.top = top
        info.cond = top.cond
        wanted = set(top.combining())
        if "ORDER BY" in top.constructs:
            wanted.add("ORDER BY")
        info.merge = tuple(c for c in _MERGE_ORDER if c in wanted)  # the order messages name them in
        self._collect_checks(top, info, is_top=True)
        if info.modifying_cte and info.refuse is None:
            info.refuse = Refusal("a data-modifying WITH (INSERT/UPDATE/DELETE inside WITH) is not supported on a "
                                  "sharded database: its writes are not routed; send them as separate statements, "
                                  "or route with /* pgherd_shard: N */")
        return info

    def _collect_checks(self, scope: Scope, info: StmtInfo, is_top: bool, value: bool = False) -> None:
        """Subqueries over key-sharded data whose per-shard result would differ from the whole
        result: ones that combine rows (aggregates, LIMIT...), and ones used as a value. Each must
        run on exactly the one shard holding its rows, which must be the statement's shard.
        (Correlated subqueries follow their outer row, which is on the same shard.)"""
        value = value or scope.value
        apart = self._unjoined(scope)
        if apart is not None:
            # Each group of tables joined on their keys must be restricted by a key value; then the
            # statement is right only on one shard. A group without one: rows could be anywhere.
            a, b, anchored = apart
            info.checks.append((scope.cond if anchored else 0,
                                f"a join of sharded tables {a.qualified} and {b.qualified} not on their sharding keys",
                                "join them on their sharding keys (a.key = b.key), or filter each by its key"))
        if not is_top and not scope.correlated:
            combining = scope.combining()
            if combining and scope.reads_key_sharded():
                info.checks.append((scope.cond, "a subquery with " + scope.describe(combining[0])))
            elif value and scope.reads_key_sharded():
                info.checks.append((scope.cond, "a subquery used as a value"))
        for sub in scope.subs:
            self._collect_checks(sub, info, False, value and not scope.correlated)

    @staticmethod
    def _unjoined(scope: Scope) -> Optional[tuple[Ref, Ref, bool]]:
        """Two key-sharded tables of one FROM list that no chain of key = key conditions connects
        (their matching rows may sit on different shards, so a per-shard join misses them), and
        whether every such group is restricted by a key value."""
        tables = [r for r in scope.refs if r.key_sharded]
        if len(tables) < 2:
            return None
        group = {id(r): i for i, r in enumerate(tables)}
        def find(i: int) -> int:
            while group[id(tables[i])] != i:
                i = group[id(tables[i])]
            return i
        for a, b in scope.key_joins:
            if id(a) in group and id(b) in group:
                ra, rb = find(group[id(a)]), find(group[id(b)])
                group[id(tables[ra])] = rb
        roots = {find(i) for i in range(len(tables))}
        if len(roots) == 1:
            return None
        fixed = {find(group[id(r)]) for r in scope.key_fixed if id(r) in group}
        first = tables[0]
        other = next(t for i, t in enumerate(tables) if find(i) != find(0))
        return first, other, roots <= fixed

    def _SelectStmt(self, body: dict) -> StmtInfo:
        info = self._start("select")
        top = self.select_scope(body, None)
        info.read = not info.locking and not info.modifying_cte
        if "intoClause" in body:
            info.kind = "ddl"
            info.write_all = True
            info.read = False
        return self._finish(info, top)

    def _InsertStmt(self, body: dict) -> StmtInfo:
        info = self._start("insert")
        scope = Scope(None)
        self.with_clause(body, scope)
        target = self.add_table(body["relation"], scope)
        info.target = target
        cols = [c.get("ResTarget", {}).get("name") for c in body.get("cols", [])]
        src = body.get("selectStmt", {}).get("SelectStmt")
        rows: Optional[list[list[Any]]] = None
        if src is not None:
            if "valuesLists" in src and src.get("op", "SETOP_NONE") == "SETOP_NONE":
                rows = [v.get("List", {}).get("items", []) for v in src["valuesLists"]]
                for row in rows:
                    self.walk(row, scope)
            elif "targetList" in src and not any(k in src for k in ("fromClause", "whereClause", "withClause")) \
                    and src.get("op", "SETOP_NONE") == "SETOP_NONE":
                rows = [[rt.get("ResTarget", {}).get("val") for rt in src["targetList"]]]
                for row in rows:
                    self.walk(row, scope)
            else:
                sub = self.select_scope(src, scope)
                scope.subs.append(sub)
        for k in ("onConflictClause", "returningClause", "returningList"):
            self.walk(body.get(k), scope)
        scope.cond = self.all
        self._finish(info, scope)
        info.merge = ()
        # Where does each new row go?
        if target.kind == UNKNOWN and target.proven is None:
            named = [c for c in cols if c in self.plan.nameless]
            if named:
                target.proven = self.plan.nameless[named[0]]
        rule = target.key_rule()
        if rule is None or target.kind not in (SHARDED, UNKNOWN):
            return info
        if src is None:
            info.refuse = Refusal(f"INSERT INTO {target.qualified} DEFAULT VALUES gives no value for its sharding key "
                                  f"{rule.column}; name the column and its value")
            return info
        if rows is None:
            info.refuse = Refusal(f"INSERT INTO sharded table {target.qualified} ... SELECT is not supported: pgherd "
                                  "cannot see which shard each row belongs to; use VALUES, or route it with "
                                  "/* pgherd_shard: N */")
            return info
        if not cols:
            table_cols = self.plan.table_columns(target.schema, target.name)
            if table_cols is None:
                info.refuse = Refusal(f"INSERT INTO sharded table {target.qualified} needs a column list naming its "
                                      f"sharding key {rule.column} (pgherd does not know the table's column order)")
                return info
            cols = list(table_cols)
        if rule.column not in cols:
            info.refuse = Refusal(f"INSERT INTO {target.qualified} gives no value for its sharding key {rule.column}; "
                                  "a default or sequence value cannot be routed: include the column")
            return info
        position = cols.index(rule.column)
        fn = rule.fn
        param_rows: list[Cond] = []
        const = 0
        for row in rows:
            item = row[position] if position < len(row) else None
            t = _typed(item)
            if t is not None and t[0] == "SetToDefault" or item is None:
                info.refuse = Refusal(f"INSERT INTO {target.qualified} sets its sharding key {rule.column} to DEFAULT; "
                                      "a default value cannot be routed: give the value")
                return info
            how, v = self.value_of(item, fn)
            if how == "const":
                m = fn.insert_mask(v)
                if m is None:
                    info.refuse = _unplaceable(target, rule, v)
                    return info
                const |= m
            elif how == "param":
                param_rows.append(("i", fn, v))
            else:
                if t is not None and t[0] == "FuncCall" and _is_unique_id(t[1]):
                    info.refuse = Refusal(f"pgherd.unique_id() as the sharding key of INSERT INTO {target.qualified} "
                                          "is not supported yet; fetch an id with SHOW pgherd.unique_id first")
                else:
                    info.refuse = Refusal(f"the sharding key {rule.column} of INSERT INTO {target.qualified} is an "
                                          "expression pgherd cannot evaluate; pass a literal or a parameter")
                return info
        info.insert_const = const
        info.insert_split_const = len(rows) > 1 and bin(const).count("1") > 1
        info.insert_count = len(rows)
        info.insert_rows = param_rows or None
        return info

    def _UpdateStmt(self, body: dict) -> StmtInfo:
        info = self._start("update")
        scope = Scope(None)
        self.with_clause(body, scope)
        target = self.add_table(body["relation"], scope)
        info.target = target
        cond: Cond = self.all
        for item in body.get("fromClause", []):
            cond = self.c_and(cond, self.from_item(item, scope))
        if "whereClause" in body:
            cond = self.c_and(cond, self.eval_bool(body["whereClause"], scope))
        scope.cond = cond
        for k in ("returningClause", "returningList"):
            self.walk(body.get(k), scope)
        assignments = []
        for rt in body.get("targetList", []):
            r = rt.get("ResTarget", {})
            self.walk(r.get("val"), scope)
            assignments.append((r.get("name"), r.get("val")))
        self._finish(info, scope)
        info.merge = ()
        if target.kind == UNKNOWN and target.proven is None:
            for name, _ in assignments:
                if name in self.plan.nameless:
                    target.proven = self.plan.nameless[name]
                    break
        rule = target.key_rule()
        if rule is not None:
            for name, val in assignments:
                if name != rule.column:
                    continue
                how, v = self.value_of(val, rule.fn)
                if how == "const":
                    m = rule.fn.insert_mask(v)
                    if m is None:
                        info.refuse = _unplaceable(target, rule, v)
                        return info
                    info.key_sets.append((m, rule.column))
                elif how == "param":
                    info.key_sets.append((("i", rule.fn, v), rule.column))
                else:
                    info.refuse = Refusal(f"UPDATE of {target.qualified} sets its sharding key {rule.column} to an "
                                          "expression; pgherd cannot tell whether rows would move between shards")
                    return info
        return info

    def _DeleteStmt(self, body: dict) -> StmtInfo:
        info = self._start("delete")
        scope = Scope(None)
        self.with_clause(body, scope)
        info.target = self.add_table(body["relation"], scope)
        cond: Cond = self.all
        for item in body.get("usingClause", []):
            cond = self.c_and(cond, self.from_item(item, scope))
        if "whereClause" in body:
            cond = self.c_and(cond, self.eval_bool(body["whereClause"], scope))
        scope.cond = cond
        for k in ("returningClause", "returningList"):
            self.walk(body.get(k), scope)
        self._finish(info, scope)
        info.merge = ()
        return info

    def _MergeStmt(self, body: dict) -> StmtInfo:
        info = self._start("merge")
        scope = Scope(None)
        self.with_clause(body, scope)
        target = self.add_table(body["relation"], scope)
        info.target = target
        self.from_item(body.get("sourceRelation"), scope)
        self.walk(body.get("joinCondition"), scope)
        self.walk(body.get("mergeWhenClauses"), scope)
        scope.cond = self.all
        self._finish(info, scope)
        info.merge = ()
        if target.key_sharded:
            info.refuse = Refusal(f"MERGE INTO sharded table {target.qualified} is not supported: rows it inserts "
                                  "cannot be routed; use INSERT ... ON CONFLICT, or /* pgherd_shard: N */")
        return info

    def _CopyStmt(self, body: dict) -> StmtInfo:
        info = self._start("copy")
        scope = Scope(None)
        if "query" in body:
            q = _typed(body["query"])
            if q is not None and q[0] == "SelectStmt":
                top = self.select_scope(q[1], None)
                info.read = True
                return self._finish(info, top)
            return self.analyze(body["query"])  # COPY (INSERT/UPDATE/DELETE ... RETURNING) TO
        if "relation" in body:
            ref = self.add_table(body["relation"], scope)
            info.target = ref
            if body.get("is_from"):
                attlist = _name_parts(body.get("attlist", []))
                if ref.kind == UNKNOWN and ref.proven is None:
                    named = [c for c in attlist if c in self.plan.nameless]
                    if named:
                        ref.proven = self.plan.nameless[named[0]]
                info.split_copy = ref.key_sharded
            else:
                info.read = True
        scope.cond = self.all
        return self._finish(info, scope)

    def _ExplainStmt(self, body: dict) -> StmtInfo:
        inner = self.analyze(body["query"])
        options = body.get("options", [])
        analyze = any(o.get("DefElem", {}).get("defname") == "analyze" and _true_option(o) for o in options)
        inner.explain = "analyze" if analyze else "plain"
        if not analyze:
            inner.read = True
        return inner

    def _DeclareCursorStmt(self, body: dict) -> StmtInfo:
        inner = self.analyze(body["query"])
        inner.kind = "cursor"
        return inner

    def _FetchStmt(self, body: dict) -> StmtInfo:
        info = self._start("cursor")
        info.read = True
        info.follow_tx = True
        return info

    _ClosePortalStmt = _FetchStmt

    # Statements that touch no table data. `special` tells route.py what they are.

    def _TransactionStmt(self, body: dict) -> StmtInfo:
        info = self._start("tx")
        info.read = True
        kind = body.get("kind", "TRANS_STMT_BEGIN")[len("TRANS_STMT_"):].lower()
        info.special = "begin" if kind == "start" else kind
        return info

    def _VariableSetStmt(self, body: dict) -> StmtInfo:
        info = self._start("set")
        info.read = True
        info.special = change_from_stmt({"VariableSetStmt": body})
        return info

    def _VariableShowStmt(self, body: dict) -> StmtInfo:
        info = self._start("show")
        info.read = True
        info.special = (body.get("name") or "").lower()
        return info

    def _session(self, body: Any) -> StmtInfo:
        info = self._start("session")
        info.read = True
        return info

    _DeallocateStmt = _DiscardStmt = _ListenStmt = _UnlistenStmt = _session

    def _PrepareStmt(self, body: dict) -> StmtInfo:
        inner = self.analyze(body["query"])
        inner.kind = "prepare"
        inner.refuse = Refusal("SQL-level PREPARE is not routed on a sharded database (EXECUTE could reach "
                               "another server); use the extended protocol (Parse/Bind), or /* pgherd_shard: N */")
        return inner

    def _ExecuteStmt(self, body: dict) -> StmtInfo:
        info = self._start("execute")
        info.refuse = Refusal("SQL-level EXECUTE is not routed on a sharded database; use the extended protocol "
                              "(Parse/Bind), or /* pgherd_shard: N */")
        return info

    def _utility(self, body: Any) -> StmtInfo:
        info = self._start("utility")
        info.write_all = True
        self.walk(body, Scope(None))
        return info

    _CallStmt = _DoStmt = _NotifyStmt = _utility

    def _LockStmt(self, body: dict) -> StmtInfo:
        info = self._start("utility")
        scope = Scope(None)
        for rv in body.get("relations", []):
            self.add_table(rv.get("RangeVar", rv), scope)
        info.write_all = True
        return info

    def _ddl(self, kind: str, body: Any) -> StmtInfo:
        """Any other statement: DDL and maintenance go to every shard (or to their schema's shard)."""
        info = self._start("ddl")
        info.write_all = True
        self._collect_objects(body, info)
        if kind == "DropStmt" and body.get("removeType") in _DROP_RELATIONS:
            for obj in body.get("objects", []):
                parts = _name_parts(obj.get("List", {}).get("items", []))
                if parts:
                    info.ddl_objects.append((parts[-2] if len(parts) >= 2 else None, parts[-1]))
        if self.plan.schemas and any(schema is None for schema, _ in info.ddl_objects):
            info.path_dependent = True  # CREATE TABLE t goes to the search_path's sharded schema
        self.walk(body, Scope(None))
        return info

    def _collect_objects(self, node: Any, info: StmtInfo) -> None:
        if type(node) is list:
            for x in node:
                self._collect_objects(x, info)
        elif type(node) is dict:
            if "relname" in node:
                info.ddl_objects.append((node.get("schemaname"), node["relname"]))
            for v in node.values():
                if type(v) is dict or type(v) is list:
                    self._collect_objects(v, info)


def _true_option(o: dict) -> bool:
    arg = o.get("DefElem", {}).get("arg")
    if arg is None:
        return True
    t = _typed(arg)
    if t is None:
        return True
    text = str(next(iter(t[1].values()), "")).lower() if t[1] else ""
    return text not in ("off", "false", "0", "no")


def _is_unique_id(body: dict) -> bool:
    names = _name_parts(body.get("funcname", []))
    return len(names) == 2 and names[0].lower() in _UNIQUE_ID_SCHEMAS and names[1].lower() == "unique_id"


def _unplaceable(target: Ref, rule: TableRule, value: object) -> Refusal:
    if value is None:
        return Refusal(f"a row of {target.qualified} with a NULL sharding key {rule.column} has no shard: the mapping "
                       "has no default rule", "23514")
    if value is INVALID:
        return Refusal(f"the sharding key {rule.column} of {target.qualified} is given a value that is not a valid "
                       f"{rule.fn.data_type}", "22P02")
    if rule.fn.opaque:
        return Refusal(f"rows of {target.qualified} cannot be routed: its sharding function ({rule.label}) is not "
                       "supported by pgherd; route them with /* pgherd_shard: N */")
    return Refusal(f"no shard holds {rule.column} = {_show(value)} of {target.qualified}: no mapping rule matches "
                   "and there is no default rule", "23514")


def _show(value: object) -> str:
    if isinstance(value, bytes):
        return repr(value.decode("utf-8", "replace")) if len(value) != 16 else value.hex()
    return repr(value)
