"""Unit tests of the [rewrite] statement rewrites (router/rewrite.py).

The produced texts are checked by parsing them again: a part of a split INSERT must hold exactly
the original rows it names (same parse trees, parameters mapped back through param_indexes), and
must route, with its own Bind, to exactly its shard. tests/integration/test_rewrite_pg.py runs
them on Postgres.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgherd.config.model import Config
from pgherd.router.params import Bind
from pgherd.router.parse import parse_statements
from pgherd.router.plan import ShardingPlan
from pgherd.router.rewrite import (
    RewriteError, add_primary_key, merge_returning, part_bind, primary_key_rows, quote_ident,
    rewrite_shard_key_update, split_insert,
)
from pgherd.router.route import Router
from pgherd.router.sharding import KeyFunction, shard_bigint, shard_text

N = 3


def make_plan(columns: Any = None, **extra: Any) -> ShardingPlan:
    doc: dict = {
        "databases": [{"name": "prod", "host": "127.0.0.1", "shard": i} for i in range(N)],
        "sharded_tables": [
            {"database": "prod", "name": "users", "column": "id"},
            {"database": "prod", "name": "emails", "column": "email", "data_type": "varchar"},
            {"database": "prod", "name": "devices", "column": "uid", "data_type": "uuid"},
            {"database": "prod", "name": "listed", "column": "k",
             "mapping": [{"values": [1, 2], "shard": 0}, {"values": [3], "shard": 2}]},
        ],
        "omnisharded_tables": [{"database": "prod", "tables": ["countries"]}],
    }
    for key, value in extra.items():
        doc[key] = value
    return ShardingPlan.from_config(Config.model_validate(doc), "prod", columns=columns)


PLAN = make_plan({"users": ["id", "name", "n"]})


def keys_on_distinct_shards() -> list[int]:
    seen: dict[int, int] = {}
    v = 0
    while len(seen) < N:
        seen.setdefault(shard_bigint(v, N), v)
        v += 1
    return [seen[s] for s in range(N)]


K0, K1, K2 = keys_on_distinct_shards()  # K<s> lives on shard s


_POSITIONS = frozenset(("list_start", "list_end"))


def strip(node: Any) -> Any:
    """A parse tree without locations (they differ between texts)."""
    if isinstance(node, dict):
        return {k: strip(v) for k, v in node.items() if not k.endswith("location") and k not in _POSITIONS}
    if isinstance(node, list):
        return [strip(x) for x in node]
    return node


def renumber_back(node: Any, param_indexes: tuple[int, ...]) -> Any:
    """Map a part's $k back to the original $n."""
    if isinstance(node, dict):
        if set(node) == {"ParamRef"}:
            body = dict(node["ParamRef"])
            body["number"] = param_indexes[body["number"] - 1] + 1
            return {"ParamRef": body}
        return {k: renumber_back(v, param_indexes) for k, v in node.items()}
    if isinstance(node, list):
        return [renumber_back(x, param_indexes) for x in node]
    return node


def values_rows(sql: str) -> list:
    body = parse_statements(sql)[0]["InsertStmt"]
    return body["selectStmt"]["SelectStmt"]["valuesLists"]


def without_rows(sql: str) -> dict:
    body = dict(parse_statements(sql)[0]["InsertStmt"])
    body["selectStmt"] = None
    return body


def check_split(sql: str, bind: Bind | None, plan: ShardingPlan = PLAN) -> Any:
    """Split, then verify every part against the original (see the module docstring)."""
    split = split_insert(sql, plan, bind)
    original = values_rows(sql)
    seen = []
    router = Router(plan, split_inserts=True)
    for part in split.parts:
        rows = values_rows(part.sql)
        assert len(rows) == len(part.row_indexes)
        for row, i in zip(rows, part.row_indexes):
            assert strip(renumber_back(row, part.param_indexes)) == strip(original[i])
        # Everything but the rows is the original (column list, ON CONFLICT, RETURNING).
        assert strip(renumber_back(without_rows(part.sql), part.param_indexes)) == strip(without_rows(sql))
        route = router.route(part.sql, part_bind(bind, part.param_indexes))
        assert route.refuse is None and route.shards == (part.shard,), (part, route)
        seen.extend(part.row_indexes)
    assert sorted(seen) == list(range(split.rows)) or split.duplicates
    return split


# ---------------------------------------------------------------------------------------------
# split_insert


def test_literal_rows_split_by_shard_keeping_the_text() -> None:
    sql = (f"/* app */ INSERT INTO users (id, name) VALUES ({K1}, 'a,(b'), ({K0}, $$)$$), "
           f"({K1}, 'c' || ')') ON CONFLICT (id) DO UPDATE SET name = excluded.name RETURNING id, name;")
    split = check_split(sql, None)
    assert [p.shard for p in split.parts] == [0, 1]
    assert split.parts[0].sql == (f"/* app */ INSERT INTO users (id, name) VALUES ({K0}, $$)$$) ON CONFLICT (id) "
                                  "DO UPDATE SET name = excluded.name RETURNING id, name;")
    assert split.parts[1].row_indexes == (0, 2) and split.parts[1].param_indexes == ()
    assert split.rows == 3 and split.duplicates == 0 and split.returning


def test_parameters_are_renumbered_per_part() -> None:
    sql = ("INSERT INTO users (id, name, n) VALUES ($1, $2, 1), ($3, 'x', $4), ($5, $2, $6) "
           "ON CONFLICT (id) DO UPDATE SET n = $7 RETURNING $8::int")
    values = [str(K2).encode(), b"shared", str(K0).encode(), b"4", str(K2).encode(), b"6", b"7", b"8"]
    bind = Bind(values, formats=[0], oids=[20, 25, 20, 23, 20, 23, 23, 23])
    split = check_split(sql, bind)
    p0, p2 = split.parts
    assert p0.shard == 0 and p0.sql == "INSERT INTO users (id, name, n) VALUES ($1, 'x', $2) ON CONFLICT (id) " \
                                       "DO UPDATE SET n = $3 RETURNING $4::int"
    assert p0.param_indexes == (2, 3, 6, 7)
    assert p2.param_indexes == (0, 1, 4, 5, 6, 7) and p2.row_indexes == (0, 2)
    b = part_bind(bind, p0.param_indexes)
    assert (list(b.values), list(b.formats), list(b.oids)) == ([str(K0).encode(), b"4", b"7", b"8"], [0],
                                                                [20, 23, 23, 23])


def test_binary_parameters_and_per_parameter_formats() -> None:
    sql = "INSERT INTO users (id, name) VALUES ($1, $2), ($3, $4)"
    bind = Bind([K1.to_bytes(8, "big", signed=True), b"a", str(K2).encode(), b"b"], formats=[1, 0, 0, 0])
    split = check_split(sql, bind)
    assert [p.shard for p in split.parts] == [1, 2]
    b = part_bind(bind, split.parts[0].param_indexes)
    assert list(b.formats) == [1, 0] and list(b.oids) == [0, 0]


def test_rows_without_column_list_use_the_known_columns() -> None:
    split = check_split(f"INSERT INTO users VALUES ({K0}, 'a', 1), ({K2}, 'b', 2)", None)
    assert [p.shard for p in split.parts] == [0, 2]


def test_varchar_uuid_and_mapped_keys() -> None:
    emails = ["a@x", "b@y", "c@z", "d@w"]
    split = check_split("INSERT INTO emails (email) VALUES " + ", ".join(f"('{e}')" for e in emails), None)
    assert {p.shard: p.row_indexes for p in split.parts} == {
        s: tuple(i for i, e in enumerate(emails) if shard_text(e, N) == s) for s in {shard_text(e, N) for e in emails}}
    u = [uuid.UUID(int=i * 7919) for i in range(6)]
    check_split("INSERT INTO devices (uid) VALUES " + ", ".join(f"('{x}'::uuid)" for x in u), None)
    split = check_split("INSERT INTO listed (k) VALUES (3), (1), (2)", None)
    assert [(p.shard, p.row_indexes) for p in split.parts] == [(0, (1, 2)), (2, (0,))]


def test_broadcast_null_rows_go_to_every_part_and_returning_is_merged() -> None:
    plan = make_plan(sharded_tables=[{"database": "prod", "name": "users", "column": "id", "broadcast_null": True}])
    split = split_insert(f"INSERT INTO users (id) VALUES ({K1}), (NULL), ({K0}) RETURNING id", plan, None)
    assert [(p.shard, p.row_indexes) for p in split.parts] == [(0, (1, 2)), (1, (0, 1)), (2, (1,))]
    assert split.duplicates == 2
    results = [[("null@0",), (K0,)], [(K1,), ("null@1",)], [("null@2",)]]
    assert merge_returning(split, results) == [(K1,), ("null@0",), (K0,)]
    # A part that returned fewer rows (ON CONFLICT DO NOTHING): part after part.
    assert merge_returning(split, [[(K0,)], [(K1,), ("n",)], []]) == [(K0,), (K1,), ("n",)]


@pytest.mark.parametrize("sql, bind, code, message", [
    ("INSERT INTO users (id) SELECT 1", None, "0A000", "only INSERT ... VALUES"),
    ("INSERT INTO users (id) SELECT 1 FROM countries", None, "0A000", "SELECT is not supported"),
    ("INSERT INTO users (id) VALUES (1), (2) ORDER BY 1", None, "0A000", "ORDER BY, LIMIT"),
    ("INSERT INTO users (id) VALUES (1) UNION VALUES (2)", None, "0A000", "SELECT is not supported"),
    ("INSERT INTO users (id) VALUES (1), (2) LIMIT 1", None, "0A000", "ORDER BY, LIMIT"),
    ("INSERT INTO users (id) VALUES (DEFAULT), (1)", None, "0A000", "DEFAULT"),
    ("INSERT INTO users (id) VALUES (1 + 1), (1)", None, "0A000", "expression"),
    ("INSERT INTO users (id) VALUES ($1), (1)", None, "08P01", "Bind values"),
    ("INSERT INTO listed (k) VALUES (1), (7)", None, "23514", "no mapping rule matches"),
    ("INSERT INTO users (id) VALUES ($1), (1)", Bind([b"x"]), "22P02", "not a valid bigint"),
    ("INSERT INTO users (id) VALUES (NULL), (1)", Bind([]), None, None),
    ("INSERT INTO countries (id) VALUES (1), (2)", None, "0A000", "key-sharded"),
    ("INSERT INTO users (id) VALUES (1); INSERT INTO users (id) VALUES (2)", None, "0A000", "of its own"),
    ("SELECT 1", None, "0A000", "single INSERT"),
])
def test_split_insert_refusals(sql: str, bind: Bind | None, code: str | None, message: str | None) -> None:
    if code is None:
        check_split(sql, bind)
        return
    with pytest.raises(RewriteError) as e:
        split_insert(sql, PLAN, bind)
    assert e.value.code == code and message in e.value.message, (e.value.code, e.value.message)


# A small SQL expression vocabulary for row values: literals with awkward text, casts, calls,
# nested parentheses, arrays, parameters.
VALUE = st.sampled_from([
    "'x'", "'a,b'", "'(('", "')'", "$$)$$", "E'\\''", "'é😀'", "lower('X')", "((1))", "ARRAY[1, 2]",
    "'{1,2}'::int[]", "NULL", "1.5", "-2", "now()", "(SELECT 1)", "'--'", "/* c */ 3", "U&'\\00e9'",
])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(st.tuples(st.integers(-(1 << 40), 1 << 40), st.booleans(), VALUE, st.booleans()), min_size=1,
                     max_size=12),
       returning=st.booleans(), conflict=st.booleans())
def test_any_split_reproduces_the_rows(rows: list, returning: bool, conflict: bool) -> None:
    texts, values = [], []
    for key, key_param, other, other_param in rows:
        if key_param:
            values.append(str(key).encode())
            k = f"${len(values)}"
        else:
            k = str(key)
        if other_param:
            values.append(b"v")
            o = f"${len(values)}"
        else:
            o = other
        texts.append(f"({k}, {o})")
    sql = f"INSERT INTO users AS u (id, name) VALUES {', '.join(texts)}"
    if conflict:
        values.append(b"c")
        sql += f" ON CONFLICT (id) DO UPDATE SET name = ${len(values)}"
    if returning:
        sql += " RETURNING u.id, (id + 1)"
    split = check_split(sql, Bind(values))
    assert sorted(i for p in split.parts for i in p.row_indexes) == list(range(len(rows)))
    for part in split.parts:
        assert all(shard_bigint(rows[i][0], N) == part.shard for i in part.row_indexes)


# ---------------------------------------------------------------------------------------------
# UPDATE of the sharding key


def test_key_move_plan() -> None:
    sql = "UPDATE users AS u SET name = $1, id = $2::bigint WHERE u.id = $3 RETURNING u.*, $1 AS tag;"
    bind = Bind([b"new", str(K2).encode(), str(K0).encode()])
    move = rewrite_shard_key_update(sql, PLAN, bind)
    assert move is not None
    assert (move.old_shard, move.new_shard, move.alias, move.table) == (0, 2, "u", '"users"')
    assert move.select_sql == 'SELECT tableoid, ctid, * FROM "users" WHERE "id" = $1 LIMIT 2 FOR UPDATE'
    assert move.select_params == (2,)
    assert move.assignments == {"name": "$1", "id": "$2::bigint"}
    assert move.delete_sql == 'DELETE FROM "users" WHERE tableoid = $1 AND ctid = $2'
    assert move.returning == "RETURNING u.*, $1 AS tag"
    sql2, b2 = move.insert_for_row(["id", "name", "n", "total"], [str(K0).encode(), b"old", None, b"9"], bind,
                                   generated=["total"])
    assert sql2 == ('INSERT INTO "users" AS "u" ("id", "name", "n") OVERRIDING SYSTEM VALUE VALUES ($2::bigint, $3, '
                    "$1) RETURNING u.*, $3 AS tag")
    assert list(b2.values) == [None, str(K2).encode(), b"new"] and list(b2.formats) == [0, 0, 0]
    with pytest.raises(RewriteError) as e:
        move.insert_for_row(["id"], [b"1"], bind)
    assert e.value.code == "42703"
    assert move.too_many_rows(2).code == "21000"


def test_key_move_with_literals_and_reversed_comparison() -> None:
    move = rewrite_shard_key_update(f"update public.users set id = {K1}, n = -3 where {K2} = id", PLAN)
    assert move is not None and (move.old_shard, move.new_shard) == (2, 1)
    assert move.table == '"public"."users"' and move.select_params == ()
    assert move.select_sql.endswith(f'WHERE "id" = {K2} LIMIT 2 FOR UPDATE')
    sql, bind = move.insert_for_row(["id", "name", "n"], [str(K2).encode(), None, b"5"], None)
    assert sql == f'INSERT INTO "public"."users" ("id", "name", "n") OVERRIDING SYSTEM VALUE VALUES ({K1}, $1, -3)'
    assert list(bind.values) == [None]


def test_key_move_same_shard_null_and_no_key_change() -> None:
    move = rewrite_shard_key_update(f"UPDATE users SET id = {K0} WHERE id = {K0}", PLAN)
    assert move is not None and move.old_shard == move.new_shard == 0
    move = rewrite_shard_key_update(f"UPDATE users SET id = {K0} WHERE id = NULL", PLAN)
    assert move is not None and move.old_shard is None
    assert rewrite_shard_key_update("UPDATE users SET name = 'x' WHERE id = 1", PLAN) is None
    assert rewrite_shard_key_update("UPDATE countries SET id = 2 WHERE id = 1", PLAN) is None


@pytest.mark.parametrize("sql, code, message", [
    ("UPDATE users SET id = id + 1 WHERE id = 1", "0A000", "expression"),
    ("UPDATE users SET id = 2, n = n + 1 WHERE id = 1", "0A000", "expression"),
    ("UPDATE users SET id = DEFAULT WHERE id = 1", "0A000", "DEFAULT"),
    ("UPDATE users SET (id, n) = (2, 3) WHERE id = 1", "0A000", "expression"),
    ("UPDATE users SET id = 2 WHERE id = 1 AND n = 3", "0A000", "WHERE"),
    ("UPDATE users SET id = 2 WHERE id > 1", "0A000", "WHERE"),
    ("UPDATE users SET id = 2 WHERE n = 1", "0A000", "WHERE"),
    ("UPDATE users SET id = 2", "0A000", "another shape"),
    ("UPDATE users SET id = 2 FROM countries WHERE users.id = 1", "0A000", "another shape"),
    ("UPDATE users SET id = 2, id = 3 WHERE id = 1", "42601", "multiple assignments"),
    ("UPDATE users SET id = 'x' WHERE id = 1", "22P02", "not a valid bigint"),
    ("UPDATE listed SET k = 9 WHERE k = 1", "23514", "no mapping rule"),
    ("UPDATE users SET id = $1 WHERE id = 1", "08P01", "Bind values"),
])
def test_key_move_refusals(sql: str, code: str, message: str) -> None:
    with pytest.raises(RewriteError) as e:
        rewrite_shard_key_update(sql, PLAN)
    assert e.value.code == code and message in e.value.message, (e.value.code, e.value.message)


def test_key_move_to_broadcast_null_is_refused() -> None:
    plan = make_plan(sharded_tables=[{"database": "prod", "name": "users", "column": "id", "broadcast_null": True}])
    with pytest.raises(RewriteError, match="broadcast_null"):
        rewrite_shard_key_update("UPDATE users SET id = NULL WHERE id = 1", plan)


# ---------------------------------------------------------------------------------------------
# Primary keys


def test_add_primary_key_to_rows() -> None:
    sql = "INSERT INTO users (name, n) VALUES ('a', (1)), ($1, 2) ON CONFLICT DO NOTHING RETURNING id -- c"
    assert primary_key_rows(sql, "id") == 2
    out = add_primary_key(sql, "id", [101, "$2"])
    assert out == ("INSERT INTO users (name, n, \"id\") VALUES ('a', (1), 101), ($1, 2, $2) ON CONFLICT DO NOTHING "
                   "RETURNING id -- c")
    ids = iter([7])
    assert add_primary_key("INSERT INTO users DEFAULT VALUES RETURNING *", "id", lambda: next(ids)) == \
        'INSERT INTO users ("id") VALUES (7) RETURNING *'
    body = parse_statements(out)[0]["InsertStmt"]
    assert [c["ResTarget"]["name"] for c in body["cols"]] == ["name", "n", "id"]


def test_add_primary_key_leaves_other_inserts_alone() -> None:
    for sql in ("INSERT INTO users (id, name) VALUES (1, 'a')", "INSERT INTO users VALUES (1, 'a')",
                "INSERT INTO users (name) SELECT 'a'"):
        assert primary_key_rows(sql, "id") is None and add_primary_key(sql, "id", [1]) is None
    with pytest.raises(ValueError):
        add_primary_key("INSERT INTO users (name) VALUES ('a'), ('b')", "id", [1])
    assert add_primary_key('INSERT INTO users (name) VALUES (1)', 'Weird "Id"', [5]) == \
        'INSERT INTO users (name, "Weird ""Id""") VALUES (1, 5)'
    assert quote_ident('a"b') == '"a""b"'


def test_key_function_sanity() -> None:
    fn = KeyFunction("bigint", N)
    assert [fn.insert_mask(k) for k in (K0, K1, K2)] == [1, 2, 4]
