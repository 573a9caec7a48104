"""Rewrites of writes that span shards ([rewrite]): split multi-row INSERTs, move rows whose key changes, add ids.

All three work on the client's own statement text: the parts they keep (column lists, VALUES rows,
ON CONFLICT, RETURNING, comments) are sliced from it with the lexer's token positions
(pglast.parser.scan), never re-printed, so what runs on the shards is what the client wrote.
Parameters ($n) are renumbered per produced statement; `param_indexes` says which of the original
Bind values (0-based) each produced statement takes, in order, and part_bind() builds its Bind.

split_insert(sql, plan, bind) -> SplitInsert            [rewrite] split_inserts = "rewrite"
    A multi-row INSERT ... VALUES into a key-sharded table becomes one INSERT per shard holding
    that shard's rows (same column list, ON CONFLICT and RETURNING). The worker runs the parts
    inside the client's transaction (a failing part fails the statement: roll back), answers
    `INSERT 0 <sum of the parts' counts - duplicates>`, and puts RETURNING rows back in the
    client's row order with merge_returning().

rewrite_shard_key_update(sql, plan, bind) -> KeyMove | None   [rewrite] shard_key = "rewrite"
    `UPDATE t SET key = v [, col = v ...] WHERE key = w [RETURNING ...]` where every v and w is a
    literal or a $n (optionally cast): see KeyMove for the steps the worker runs. Anything else
    that changes the key is refused (RewriteError 0A000).

add_primary_key(sql, column, ids) -> str | None         [rewrite] primary_key = "rewrite"
    An INSERT that omits the table's bigint primary key gets the column, with one id per row
    (ids from the caller's pgherd.unique_id() generator). The caller finds the column with
    PRIMARY_KEY_QUERY on a shard (and caches it per table).

Errors are RewriteError(message, code) with the SQLSTATE the client should get.
"""

from __future__ import annotations

from typing import Any, Callable, Collection, NamedTuple, Optional, Sequence, Union

from pglast.parser import scan

from .analyze import SHARDED, UNKNOWN, Analyzer, Refusal, _unplaceable
from .params import Bind
from .parse import ParseError, parse_statements
from .plan import ShardingPlan
from .sharding import INVALID

__all__ = [
    "InsertPart", "KeyMove", "PRIMARY_KEY_QUERY", "RewriteError", "SplitInsert", "add_primary_key",
    "merge_returning", "part_bind", "primary_key_rows", "quote_ident", "rewrite_shard_key_update", "split_insert",
]

# Finds a table's primary key column when it is a single bigint column ($1: the table's name as
# regclass reads it, e.g. 'public.users', or '"Users"' for a quoted name). One row: the column's
# name; no row: no rewrite.
PRIMARY_KEY_QUERY = (
    "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] "
    "WHERE i.indrelid = $1::regclass AND i.indisprimary AND i.indnkeyatts = 1 AND a.atttypid = 'bigint'::regtype"
)

# Rows a shard-key move reads on the old shard: two are enough to tell "exactly one row matches"
# (it moves) from "more than one" (an error), without locking or reading every row of the key.
_MOVE_LIMIT = 2

_OPEN, _CLOSE, _COMMA, _EQUALS, _SEMI = "ASCII_40", "ASCII_41", "ASCII_44", "ASCII_61", "ASCII_59"
_COMMENTS = frozenset(("C_COMMENT", "SQL_COMMENT"))
_LEAVES = frozenset(("A_Const", "ParamRef"))


class RewriteError(Exception):
    """The statement cannot be rewritten: answer the client with this SQLSTATE and message."""

    def __init__(self, message: str, code: str = "0A000") -> None:
        super().__init__(message)
        self.message, self.code = message, code


def quote_ident(name: str) -> str:
    """An identifier, always double-quoted (so case, keywords and odd characters are kept)."""
    return '"' + name.replace('"', '""') + '"'


# ------------------------------------------------------------------------------------------------
# Statement text and its tokens


class _Tok(NamedTuple):
    start: int  # character offsets into the text; end is exclusive
    end: int
    name: str
    depth: int  # parenthesis depth before the token


class _Text:
    """A statement's text, its tokens (comments left out) with their parenthesis depth."""

    def __init__(self, sql: str) -> None:
        self.sql = sql
        toks: list[_Tok] = []
        depth = 0
        for t in scan(sql):
            if t.name in _COMMENTS:
                continue
            if t.name == _CLOSE:
                depth -= 1
            toks.append(_Tok(t.start, t.end + 1, t.name, depth))
            if t.name == _OPEN:
                depth += 1
        self.toks = toks

    def find(self, name: str, start: int = 0, depth: int = 0) -> int:
        """Index of the first token `name` at `depth` from token index start, or -1."""
        for i in range(start, len(self.toks)):
            t = self.toks[i]
            if t.name == name and t.depth == depth:
                return i
        return -1

    def closing(self, i: int) -> int:
        """Index of the ')' matching the '(' at token index i."""
        depth = self.toks[i].depth
        for j in range(i + 1, len(self.toks)):
            t = self.toks[j]
            if t.name == _CLOSE and t.depth == depth:
                return j
        raise RewriteError("unbalanced parentheses", "42601")

    def end(self) -> int:
        """Where the statement's text ends: after its last token that is not ';'."""
        for t in reversed(self.toks):
            if t.name != _SEMI:
                return t.end
        return 0


class _Params:
    """New parameter numbers for one produced statement, in order of first appearance."""

    def __init__(self, first: int = 1) -> None:
        self.first = first
        self.order: list[int] = []  # original 0-based indexes, in new-number order
        self._new: dict[int, int] = {}

    def number(self, original: int) -> int:
        """The new $number of original $original (1-based)."""
        n = self._new.get(original)
        if n is None:
            n = self._new[original] = self.first + len(self.order)
            self.order.append(original - 1)
        return n


def _copy(text: _Text, a: int, b: int, params: _Params) -> str:
    """text.sql[a:b] with every $n renumbered through params."""
    sql = text.sql
    out = []
    pos = a
    for t in text.toks:
        if t.start < a or t.end > b or t.name != "PARAM":
            continue
        out.append(sql[pos:t.start])
        out.append(f"${params.number(int(sql[t.start + 1:t.end]))}")
        pos = t.end
    out.append(sql[pos:b])
    return "".join(out)


def _one(sql: str, kind: str) -> tuple[dict, dict]:
    """The only statement of sql, which must be a `kind` (e.g. InsertStmt): (stmt, body)."""
    try:
        stmts = parse_statements(sql)
    except ParseError as e:
        raise RewriteError(str(e), "42601") from None
    if len(stmts) != 1 or kind not in stmts[0]:
        raise RewriteError(f"only a single {kind[:-4].upper()} statement can be rewritten; send it as a query "
                           "of its own")
    return stmts[0], stmts[0][kind]


def _tag(node: Any) -> Optional[str]:
    return next(iter(node)) if isinstance(node, dict) and len(node) == 1 else None


def _leaf(node: Any) -> bool:
    """A literal or a parameter, possibly cast: a value that needs no row to compute."""
    tag = _tag(node)
    if tag == "TypeCast":
        return _leaf(node["TypeCast"].get("arg"))
    return tag in _LEAVES


def _row_items(body: dict) -> Optional[list[list[Any]]]:
    """The VALUES rows of an INSERT, if its source is a plain VALUES list."""
    src = (body.get("selectStmt") or {}).get("SelectStmt")
    if src is None or "valuesLists" not in src or src.get("op", "SETOP_NONE") != "SETOP_NONE":
        return None
    if any(k in src for k in ("sortClause", "limitCount", "limitOffset", "withClause", "lockingClause")):
        return None
    return [v.get("List", {}).get("items", []) for v in src["valuesLists"]]


def _values_rows(text: _Text, count: int) -> tuple[int, list[tuple[int, int]]]:
    """(token index of the INSERT's VALUES keyword, character spans of its `( ... )` rows)."""
    toks = text.toks
    ins = text.find("INSERT")
    v = text.find("VALUES", ins + 1) if ins >= 0 else -1
    if v < 0:
        raise RewriteError("pgherd could not find the VALUES list of the INSERT", "XX000")
    rows = []
    i = v + 1
    while i < len(toks) and toks[i].name == _OPEN:
        j = text.closing(i)
        rows.append((toks[i].start, toks[j].end))
        i = j + 1
        if i < len(toks) and toks[i].name == _COMMA and toks[i].depth == 0:
            i += 1
        else:
            break
    if len(rows) != count:
        raise RewriteError(f"pgherd found {len(rows)} VALUES rows in the text but the parser {count}", "XX000")
    return v, rows


# ------------------------------------------------------------------------------------------------
# Multi-row INSERT split


class InsertPart(NamedTuple):
    """One shard's INSERT: its text, the original Bind values it takes (0-based, in $1..$k order)
    and the original positions (0-based) of the VALUES rows it carries, in their order."""

    shard: int
    sql: str
    param_indexes: tuple[int, ...]
    row_indexes: tuple[int, ...]


class SplitInsert(NamedTuple):
    """A multi-row INSERT split by shard (parts ordered by shard).

    rows: the statement's VALUES rows; duplicates: extra copies of rows sent to several shards
    (NULL keys with broadcast_null), to subtract from the parts' summed INSERT counts;
    returning: the statement has a RETURNING clause.
    """

    parts: tuple[InsertPart, ...]
    rows: int
    duplicates: int
    returning: bool


def split_insert(sql: str, plan: ShardingPlan, bind: Optional[Bind] = None) -> SplitInsert:
    """Split `INSERT INTO t [(cols)] VALUES (...), (...) [ON CONFLICT ...] [RETURNING ...]` by the
    shard of each row's sharding key (literals, or $n read from bind)."""
    stmt, body = _one(sql, "InsertStmt")
    analyzer = Analyzer(plan)
    info = analyzer.analyze(stmt)
    if info.refuse is not None:
        raise RewriteError(info.refuse.message, info.refuse.code)
    target = info.target
    rule = target.key_rule() if target is not None else None
    if target is None or rule is None or target.kind not in (SHARDED, UNKNOWN):
        raise RewriteError("only an INSERT into a key-sharded table is split by shard")
    rows = _row_items(body)
    if rows is None:
        raise RewriteError(f"only INSERT ... VALUES into sharded table {target.qualified} can be split by shard; "
                           "ORDER BY, LIMIT and set operations on the VALUES list cannot")
    cols = [c.get("ResTarget", {}).get("name") for c in body.get("cols", [])] or list(
        plan.table_columns(target.schema, target.name) or ())
    position = cols.index(rule.column)  # the analyzer has checked that the key is there
    fn = rule.fn
    masks: list[int] = []
    for row in rows:
        how, v = analyzer.value_of(row[position], fn)
        if how == "param":
            if bind is None:
                raise RewriteError("the INSERT's rows are routed by its parameters: split it with its Bind values",
                                   "08P01")
            v = fn.param_value(*bind.param(v))
        elif how != "const":
            raise RewriteError(f"the sharding key {rule.column} of INSERT INTO {target.qualified} is an expression "
                               "pgherd cannot evaluate; pass a literal or a parameter")
        m = fn.insert_mask(v)
        if m is None:
            r: Refusal = _unplaceable(target, rule, v)
            raise RewriteError(r.message, r.code)
        masks.append(m)
    text = _Text(sql)
    _v, spans = _values_rows(text, len(rows))
    head, tail = (0, spans[0][0]), (spans[-1][1], len(sql))
    by_shard: dict[int, list[int]] = {}
    for i, m in enumerate(masks):
        for s in plan.mask_to_shards(m):
            by_shard.setdefault(s, []).append(i)
    parts = []
    for shard in sorted(by_shard):
        params = _Params()
        pieces = [_copy(text, *head, params)]
        pieces.append(", ".join(_copy(text, *spans[i], params) for i in by_shard[shard]))
        pieces.append(_copy(text, *tail, params))
        parts.append(InsertPart(shard, "".join(pieces), tuple(params.order), tuple(by_shard[shard])))
    copies = sum(len(p.row_indexes) for p in parts)
    returning = bool(body.get("returningClause") or body.get("returningList"))
    return SplitInsert(tuple(parts), len(rows), copies - len(rows), returning)


def part_bind(bind: Optional[Bind], param_indexes: Sequence[int]) -> Bind:
    """The Bind of a produced statement: the original values, formats and types it takes."""
    if bind is None:
        return Bind([])
    values = [bind.values[i] if i < len(bind.values) else None for i in param_indexes]
    nf = len(bind.formats)
    formats: list[int] = list(bind.formats) if nf == 1 else (
        [bind.formats[i] if i < nf else 0 for i in param_indexes] if nf else [])
    oids = [bind.oids[i] if i < len(bind.oids) else 0 for i in param_indexes]
    return Bind(values, formats, oids)


def merge_returning(split: SplitInsert, results: Sequence[Sequence[Any]]) -> list[Any]:
    """The RETURNING rows of all parts (results[k]: rows of split.parts[k], as it returned them)
    in the order of the client's VALUES rows. A part that returned a different number of rows than
    it carries (ON CONFLICT DO NOTHING, a trigger skipping rows) makes the order unknowable: then
    the rows come part after part. A row sent to several shards is returned once."""
    if any(len(rows) != len(part.row_indexes) for part, rows in zip(split.parts, results)):
        return [row for rows in results for row in rows]
    placed: list[Any] = [None] * split.rows
    seen = [False] * split.rows
    for part, rows in zip(split.parts, results):
        for i, row in zip(part.row_indexes, rows):
            if not seen[i]:
                placed[i], seen[i] = row, True
    return placed


# ------------------------------------------------------------------------------------------------
# UPDATE of the sharding key: move the row


class KeyMove(NamedTuple):
    """How to run an UPDATE that moves one row to another shard. The worker, inside the client's
    transaction (two shards: commit with two-phase commit when enabled):

    0. old_shard None: no shard can hold a row with that key (NULL, or a value no mapping rule
       accepts): run the original statement on any one shard (it matches nothing).
       new_shard == old_shard: nothing moves: run the original statement on that shard.
    1. On old_shard: select_sql with part_bind(bind, select_params), text result format. Its
       columns are tableoid, ctid, then the table's columns.
       - no row: run the original statement on old_shard (it matches nothing, and answers with
         the right RowDescription and UPDATE 0);
       - more than one row: fail with too_many_rows() (nothing was changed);
    2. On new_shard: sql, bind = move.insert_for_row(names[2:], values[2:], bind) with the column
       names of the RowDescription and the text values of the row; run it. Its RETURNING rows are
       the client's (the new row), its RowDescription too.
    3. On old_shard: delete_sql with Bind([tableoid, ctid]) (the row's first two values).
    4. Answer the client UPDATE 1.
    """

    table: str  # quoted, schema-qualified when the statement qualifies it
    alias: Optional[str]
    key_column: str
    old_shard: Optional[int]
    new_shard: int
    select_sql: str
    select_params: tuple[int, ...]
    assignments: dict  # column -> (SQL text of its new value, with $n as in the original statement)
    delete_sql: str
    returning: Optional[str]  # the RETURNING clause, $n as in the original statement

    def insert_for_row(self, columns: Sequence[str], values: Sequence[Optional[bytes]], bind: Optional[Bind],
                       generated: Collection[str] = ()) -> tuple[str, Bind]:
        """The INSERT of the moved row on new_shard: the old row's values (text format) with the
        SET columns replaced. generated: stored generated columns, left out (Postgres computes
        them; pg_attribute.attgenerated = 's')."""
        unknown = [c for c in self.assignments if c not in columns]
        if unknown:
            raise RewriteError(f'column "{unknown[0]}" of relation {self.table} does not exist', "42703")
        kept = [(c, v) for c, v in zip(columns, values) if c not in generated]
        row_params = sum(1 for c, _ in kept if c not in self.assignments)
        params = _Params(first=row_params + 1)
        items, row_values = [], []
        for c, v in kept:
            if c in self.assignments:
                items.append(_renumber(self.assignments[c], params))
            else:
                row_values.append(v)
                items.append(f"${len(row_values)}")
        returning = "" if self.returning is None else " " + _renumber(self.returning, params)
        alias = f" AS {quote_ident(self.alias)}" if self.alias else ""
        sql = (f"INSERT INTO {self.table}{alias} ({', '.join(quote_ident(c) for c in (c for c, _ in kept))}) "
               f"OVERRIDING SYSTEM VALUE VALUES ({', '.join(items)}){returning}")
        extra = part_bind(bind, params.order)
        n = len(params.order)
        codes = list(extra.formats) if len(extra.formats) > 1 else [extra.formats[0] if extra.formats else 0] * n
        # The row's values are text (the SELECT's result format) of unspecified type (0): Postgres
        # reads each with the input function of its column.
        text = [0] * len(row_values)
        return sql, Bind(list(row_values) + list(extra.values), text + codes, text + list(extra.oids))

    def too_many_rows(self, count: int) -> RewriteError:
        return RewriteError(f"UPDATE of {self.table} changes sharding key {self.key_column} of {count} or more rows; "
                            "pgherd moves one row per statement between shards: filter by a unique column", "21000")


def _renumber(fragment: str, params: _Params) -> str:
    """A SQL fragment with its $n renumbered through params."""
    return _copy(_Text(fragment), 0, len(fragment), params)


def _key_ref(node: Any, column: str, names: Collection[str]) -> bool:
    """Whether node is a reference to the key column (bare, or qualified by the table or alias)."""
    if _tag(node) != "ColumnRef":
        return False
    fields = [f.get("String", {}).get("sval") for f in node["ColumnRef"].get("fields", [])]
    if not fields or fields[-1] != column:
        return False
    return len(fields) == 1 or fields[-2] in names


def rewrite_shard_key_update(sql: str, plan: ShardingPlan, bind: Optional[Bind] = None) -> Optional[KeyMove]:
    """The KeyMove of an UPDATE that sets the sharding key, or None if it does not set it."""
    stmt, body = _one(sql, "UpdateStmt")
    analyzer = Analyzer(plan)
    info = analyzer.analyze(stmt)
    target = info.target
    rule = target.key_rule() if target is not None else None
    if target is None or rule is None or target.kind not in (SHARDED, UNKNOWN):
        return None
    key = rule.column
    targets = [t.get("ResTarget", {}) for t in body.get("targetList", [])]
    if not any(t.get("name") == key for t in targets):
        return None
    shape = (f"moving a row between shards supports UPDATE {target.qualified} SET {key} = <literal or $n> "
             f"[, column = <literal or $n> ...] WHERE {key} = <literal or $n> [RETURNING ...]")
    if any(k in body for k in ("fromClause", "withClause")) or "whereClause" not in body:
        raise RewriteError(f"{shape}; this UPDATE has another shape")
    seen = set()
    for t in targets:
        if "name" not in t or t.get("indirection") or not _leaf(t.get("val")):
            raise RewriteError(f"{shape}; this UPDATE sets a column to an expression, DEFAULT or a sub-field")
        if t["name"] in seen:
            raise RewriteError(f'multiple assignments to same column "{t["name"]}"', "42601")
        seen.add(t["name"])
    relation = body["relation"]
    alias = (relation.get("alias") or {}).get("aliasname")
    names = {relation.get("relname"), alias} - {None}
    where = body["whereClause"]
    expr = where.get("A_Expr", {})
    op = [n.get("String", {}).get("sval") for n in expr.get("name", [])]
    if _tag(where) != "A_Expr" or expr.get("kind") != "AEXPR_OP" or op != ["="]:
        raise RewriteError(f"{shape}; this UPDATE has another WHERE clause")
    if _key_ref(expr.get("lexpr"), key, names) and _leaf(expr.get("rexpr")):
        value_side, old_node = 1, expr["rexpr"]
    elif _key_ref(expr.get("rexpr"), key, names) and _leaf(expr.get("lexpr")):
        value_side, old_node = 0, expr["lexpr"]
    else:
        raise RewriteError(f"{shape}; this UPDATE has another WHERE clause")
    fn = rule.fn

    def value(node: Any) -> object:
        how, v = analyzer.value_of(node, fn)
        if how == "param":
            if bind is None:
                raise RewriteError("the UPDATE moves rows by its parameters: rewrite it with its Bind values", "08P01")
            return fn.param_value(*bind.param(v))
        if how != "const":
            raise RewriteError(f"{shape}; the key is compared with or set to an expression")
        return v

    old = value(old_node)
    new = value(next(t["val"] for t in targets if t["name"] == key))
    for v in (old, new):
        if v is INVALID:
            r = _unplaceable(target, rule, v)
            raise RewriteError(r.message, r.code)
    old_mask = fn.mask(old)
    old_shard = old_mask.bit_length() - 1 if old_mask and old_mask & (old_mask - 1) == 0 else None
    new_mask = fn.insert_mask(new)
    if new_mask is None:
        r = _unplaceable(target, rule, new)
        raise RewriteError(r.message, r.code)
    if new_mask & (new_mask - 1):
        raise RewriteError(f"UPDATE of {target.qualified} sets sharding key {key} to NULL, which broadcast_null puts "
                           "on every shard; delete and insert the row instead")
    new_shard = new_mask.bit_length() - 1

    text = _Text(sql)
    toks = text.toks
    upd = text.find("UPDATE")
    set_i = text.find("SET", upd + 1)
    where_i = text.find("WHERE", set_i + 1)
    ret_i = text.find("RETURNING", where_i + 1)
    if min(upd, set_i, where_i) < 0:
        raise RewriteError("pgherd could not find the SET and WHERE clauses of the UPDATE", "XX000")
    # SET items: `column = value` separated by commas at depth 0.
    assignments: dict[str, str] = {}
    item_start = set_i + 1
    bounds = [i for i in range(set_i + 1, where_i) if toks[i].name == _COMMA and toks[i].depth == 0] + [where_i]
    for t, end_i in zip(targets, bounds):
        eq = text.find(_EQUALS, item_start)
        assignments[t["name"]] = sql[toks[eq + 1].start:toks[end_i - 1].end]
        item_start = end_i + 1
    where_end = ret_i if ret_i >= 0 else len(toks)
    while where_end > where_i + 1 and toks[where_end - 1].name == _SEMI:
        where_end -= 1
    eq = text.find(_EQUALS, where_i + 1)
    lo, hi = (eq + 1, where_end) if value_side == 1 else (where_i + 1, eq)
    params = _Params()
    old_text = _copy(text, toks[lo].start, toks[hi - 1].end, params)
    table = ".".join(quote_ident(p) for p in (relation.get("schemaname"), relation["relname"]) if p)
    select_sql = (f"SELECT tableoid, ctid, * FROM {table} WHERE {quote_ident(key)} = {old_text} "
                  f"LIMIT {_MOVE_LIMIT} FOR UPDATE")
    returning = sql[toks[ret_i].start:text.end()] if ret_i >= 0 else None
    return KeyMove(
        table=table, alias=alias, key_column=key, old_shard=old_shard, new_shard=new_shard,
        select_sql=select_sql, select_params=tuple(params.order), assignments=assignments,
        delete_sql=f"DELETE FROM {table} WHERE tableoid = $1 AND ctid = $2", returning=returning,
    )


# ------------------------------------------------------------------------------------------------
# Primary keys for INSERTs that omit them


def _pk_target(sql: str, column: str) -> Optional[tuple[dict, Optional[list[list[Any]]]]]:
    """(InsertStmt body, VALUES rows or None for DEFAULT VALUES) when column must be added."""
    _stmt, body = _one(sql, "InsertStmt")
    cols = [c.get("ResTarget", {}).get("name") for c in body.get("cols", [])]
    if "selectStmt" not in body:
        return body, None  # DEFAULT VALUES
    if not cols or column in cols:
        return None  # without a column list pgherd cannot tell which value is which column
    rows = _row_items(body)
    if rows is None:
        return None
    return body, rows


def primary_key_rows(sql: str, column: str) -> Optional[int]:
    """How many ids add_primary_key needs for this INSERT, or None when it leaves it alone
    (it names the column, has no column list, or is INSERT ... SELECT)."""
    found = _pk_target(sql, column)
    if found is None:
        return None
    rows = found[1]
    return 1 if rows is None else len(rows)


def add_primary_key(sql: str, column: str, ids: Union[Sequence[Union[int, str]], Callable[[], Union[int, str]]]
                    ) -> Optional[str]:
    """The INSERT with `column` added to its column list and one id per VALUES row (ids: values,
    or a function returning the next one; an int is written as a literal, a str as given, e.g.
    "$7" to pass it as a parameter). None when no rewrite applies (see primary_key_rows).
    `INSERT INTO t DEFAULT VALUES` becomes `INSERT INTO t ("id") VALUES (<id>)`."""
    found = _pk_target(sql, column)
    if found is None:
        return None
    _body, rows = found
    count = 1 if rows is None else len(rows)
    if callable(ids):
        values = [ids() for _ in range(count)]
    else:
        values = list(ids)
        if len(values) != count:
            raise ValueError(f"the INSERT has {count} rows but {len(values)} ids were given")
    texts = [str(int(v)) if isinstance(v, int) else str(v) for v in values]
    text = _Text(sql)
    toks = text.toks
    ins = text.find("INSERT")
    col = quote_ident(column)
    if rows is None:
        d = text.find("DEFAULT", ins + 1)
        if d < 0 or d + 1 >= len(toks) or toks[d + 1].name != "VALUES":
            raise RewriteError("pgherd could not find DEFAULT VALUES in the INSERT", "XX000")
        return f"{sql[:toks[d].start]}({col}) VALUES ({texts[0]}){sql[toks[d + 1].end:]}"
    open_i = text.find(_OPEN, ins + 1)
    close_i = text.closing(open_i)
    _v, spans = _values_rows(text, len(rows))
    edits = [(toks[close_i].start, f", {col}")] + [(end - 1, f", {t}") for (_s, end), t in zip(spans, texts)]
    out, pos = [], 0
    for at, insert in edits:
        out.append(sql[pos:at])
        out.append(insert)
        pos = at
    out.append(sql[pos:])
    return "".join(out)
