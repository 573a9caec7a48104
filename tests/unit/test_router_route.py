"""Unit tests of the routing decision (router/route.py): each construct and its expected shards.

Expected shards are computed with the sharding functions themselves (shard_bigint, shard_text,
shard_uuid), which tests/integration/test_hash_oracle.py proves equal to PostgreSQL's.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgherd.config.model import Config
from pgherd.router.params import Bind
from pgherd.router.plan import ShardingPlan
from pgherd.router.route import ALL, Route, Router
from pgherd.router.session import RoutingSession, session_change
from pgherd.router.sharding import shard_bigint, shard_text, shard_uuid

N = 4
INT8 = st.integers(-(1 << 63), (1 << 63) - 1)


def config(**sections: Any) -> Config:
    shards = sections.pop("shards", N)
    doc = {"databases": [{"name": "prod", "host": "127.0.0.1", "shard": i} for i in range(shards)]}
    general = sections.pop("general", None)
    if general:
        doc["general"] = general
    for key, entries in sections.items():
        doc[key] = [{"database": "prod", **e} for e in entries]
    return Config.model_validate(doc)


STANDARD = dict(
    sharded_tables=[
        {"name": "users", "column": "id"},
        {"name": "emails", "column": "email", "data_type": "varchar"},
        {"name": "devices", "column": "uid", "data_type": "uuid"},
    ],
    omnisharded_tables=[{"tables": ["countries"]}, {"tables": ["settings"], "sticky": True}],
)


def router(columns: Any = None, **kwargs: Any) -> Router:
    sections = dict(STANDARD)
    sections.update({k: v for k, v in kwargs.items() if k not in ("mergeable", "split_inserts", "split_copy")})
    caps = {k: v for k, v in kwargs.items() if k in ("mergeable", "split_inserts", "split_copy")}
    return Router(ShardingPlan.from_config(config(**sections), "prod", columns=columns), **caps)


@pytest.fixture(scope="module")
def r() -> Router:
    return router()


def s(*values: int) -> tuple[int, ...]:
    """The sorted, distinct shards of bigint keys."""
    return tuple(sorted({shard_bigint(v, N) for v in values}))


def direct(route: Route) -> int:
    assert route.refuse is None, route.refuse
    assert not route.cross_shard and len(route.shards) == 1, route
    return route.shards[0]


def keys_on_distinct_shards(count: int) -> list[int]:
    seen: dict[int, int] = {}
    v = 0
    while len(seen) < count:
        seen.setdefault(shard_bigint(v, N), v)
        v += 1
    return sorted(seen.values())


A, B, C, D = keys_on_distinct_shards(4)


def same_shard_keys() -> tuple[int, int]:
    first = shard_bigint(1, N)
    return 1, next(v for v in range(2, 1000) if shard_bigint(v, N) == first)


# -- WHERE key = literal / parameter ---------------------------------------------------------------


@settings(max_examples=150)
@given(INT8)
def test_where_key_equals_literal_and_params(r, value):
    want = shard_bigint(value, N)
    assert direct(r.route(f"SELECT * FROM users WHERE id = {value}")) == want
    assert direct(r.route(f"SELECT * FROM users WHERE id = '{value}'")) == want
    assert direct(r.route(f"SELECT * FROM users WHERE {value} = id")) == want
    q = "SELECT * FROM users WHERE id = $1"
    assert direct(r.route(q, Bind([str(value).encode()]))) == want
    assert direct(r.route(q, Bind([value.to_bytes(8, "big", signed=True)], [1], [20]))) == want
    assert direct(r.route("SELECT * FROM users WHERE id = $1::bigint", Bind([str(value).encode()]))) == want


@settings(max_examples=100)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")))
def test_varchar_key_literal_and_params(r, value):
    want = shard_text(value, N)
    literal = "'" + value.replace("'", "''") + "'"
    assert direct(r.route(f"SELECT * FROM emails WHERE email = {literal}")) == want
    q = "SELECT * FROM emails WHERE email = $1"
    assert direct(r.route(q, Bind([value.encode()]))) == want
    assert direct(r.route(q, Bind([value.encode()], [1], [25]))) == want


@settings(max_examples=50)
@given(st.uuids())
def test_uuid_key_literal_and_params(r, u):
    want = shard_uuid(u.bytes, N)
    assert direct(r.route(f"SELECT * FROM devices WHERE uid = '{u}'")) == want
    assert direct(r.route(f"SELECT * FROM devices WHERE uid = '{u}'::uuid")) == want
    q = "DELETE FROM devices WHERE uid = $1"
    assert direct(r.route(q, Bind([str(u).encode()]))) == want
    assert direct(r.route(q, Bind([u.bytes], [1], [2950]))) == want


def test_parameters_with_mixed_format_codes(r):
    q = "SELECT * FROM users WHERE name = $1 AND id = $2"
    bind = Bind([b"alice", (77).to_bytes(4, "big", signed=True)], [0, 1], [25, 23])
    assert direct(r.route(q, bind)) == shard_bigint(77, N)


def test_null_key_matches_nothing(r):
    route = r.route("SELECT * FROM users WHERE id = $1", Bind([None]))
    assert route.any_one and route.shards is ALL and not route.cross_shard
    assert r.route("SELECT * FROM users WHERE id = NULL").any_one


def test_route_without_bind_values_covers_all_shards(r):
    route = r.route("SELECT * FROM users WHERE id = $1")
    assert route.params_needed and route.shards is ALL


# -- IN, ANY, AND, OR ------------------------------------------------------------------------------


def test_in_list_is_the_set_of_shards(r):
    route = r.route(f"SELECT * FROM users WHERE id IN ({A}, {B}, {C})")
    assert route.shards == s(A, B, C) and route.cross_shard
    x, y = same_shard_keys()
    assert direct(r.route(f"SELECT * FROM users WHERE id IN ({x}, {y})")) == shard_bigint(x, N)
    route = r.route("SELECT * FROM users WHERE id IN ($1, $2)", Bind([str(A).encode(), str(D).encode()]))
    assert route.shards == s(A, D)


def test_any_array_literal_and_parameter(r):
    assert r.route(f"SELECT * FROM users WHERE id = ANY(ARRAY[{A}, {B}])").shards == s(A, B)
    assert r.route(f"SELECT * FROM users WHERE id = ANY('{{{A},{C}}}')").shards == s(A, C)
    q = "SELECT * FROM users WHERE id = ANY($1)"
    assert r.route(q, Bind([f"{{{B},{D}}}".encode()])).shards == s(B, D)
    # binary int8[]: ndim 1, no nulls, element type int8, size 2, lower bound 1, then elements
    data = (1).to_bytes(4, "big") + (0).to_bytes(4, "big") + (20).to_bytes(4, "big")
    data += (2).to_bytes(4, "big") + (1).to_bytes(4, "big")
    for v in (A, C):
        data += (8).to_bytes(4, "big") + v.to_bytes(8, "big", signed=True)
    assert r.route(q, Bind([data], [1], [1016])).shards == s(A, C)


def test_and_intersects_or_unites(r):
    assert direct(r.route(f"SELECT * FROM users WHERE id = {A} AND name = 'x'")) == shard_bigint(A, N)
    assert r.route(f"SELECT * FROM users WHERE id = {A} OR id = {B}").shards == s(A, B)
    assert r.route(f"SELECT * FROM users WHERE (id = {A} OR id = {B}) AND (id = {B} OR id = {C})").shards == s(B)
    assert r.route(f"SELECT * FROM users WHERE id IN ({A}, {B}) AND id IN ({B}, {C})").shards == s(B)
    # anything unkeyed in an OR means every shard
    assert r.route(f"SELECT * FROM users WHERE id = {A} OR name = 'x'").shards is ALL
    # contradictions match no row: any one shard answers
    assert r.route(f"SELECT * FROM users WHERE id = {A} AND id = {B}").any_one


def test_not_and_ranges_are_unkeyed(r):
    assert r.route(f"SELECT * FROM users WHERE NOT id = {A}").shards is ALL
    assert r.route(f"SELECT * FROM users WHERE id <> {A}").shards is ALL
    assert r.route(f"SELECT * FROM users WHERE id > {A}").shards is ALL
    assert r.route(f"SELECT * FROM users WHERE id NOT IN ({A})").shards is ALL


@settings(max_examples=100)
@given(st.lists(INT8, min_size=1, max_size=6), st.lists(INT8, min_size=1, max_size=6))
def test_and_or_of_in_lists(r, xs, ys):
    in_x, in_y = ", ".join(map(str, xs)), ", ".join(map(str, ys))
    route = r.route(f"SELECT * FROM users WHERE id IN ({in_x}) OR id IN ({in_y})")
    assert set(route.shard_list(N)) == {shard_bigint(v, N) for v in xs + ys}
    route = r.route(f"SELECT * FROM users WHERE id IN ({in_x}) AND id IN ({in_y})")
    both = {shard_bigint(v, N) for v in xs} & {shard_bigint(v, N) for v in ys}
    if both:
        assert set(route.shard_list(N)) == both
    else:
        assert route.any_one


# -- tables, aliases, schemas, joins ---------------------------------------------------------------


def test_alias_and_schema_qualified_names(r):
    want = shard_bigint(A, N)
    assert direct(r.route(f"SELECT u.name FROM users u WHERE u.id = {A}")) == want
    assert direct(r.route(f"SELECT * FROM public.users AS u WHERE u.id = {A}")) == want
    assert direct(r.route(f"SELECT * FROM public.users WHERE public.users.id = {A}")) == want
    assert direct(r.route(f"SELECT * FROM users WHERE users.id = {A}")) == want
    # a qualified column of another table is not the key
    assert r.route(f"SELECT * FROM users u JOIN countries c ON true WHERE c.id = {A}").shards is ALL


def test_join_filtered_by_the_key(r):
    want = shard_bigint(A, N)
    q = f"SELECT * FROM users u JOIN countries c ON c.code = u.country WHERE u.id = {A}"
    assert direct(r.route(q)) == want
    q = f"SELECT * FROM countries c, users u WHERE u.id = {A} AND c.code = u.country"
    assert direct(r.route(q)) == want
    # emails is sharded by email: its rows for user A may be on any shard, so joining it to users
    # not on the sharding keys cannot run per shard (however users is filtered)
    for q in (f"SELECT * FROM users u JOIN emails e ON e.user_id = u.id AND u.id = {A}",
              f"SELECT * FROM emails e LEFT JOIN users u ON u.id = e.user_id AND u.id = {A}"):
        route = r.route(q)
        assert route.refuse is not None and "not on their sharding keys" in route.refuse, route
        assert route.refuse_code == "0A000"


def test_joins_of_sharded_tables_need_their_keys():
    """Two key-sharded tables joined on their keys are co-located; otherwise only if each side is
    pinned to the statement's one shard by a key value."""
    rt = router(sharded_tables=[{"name": "a", "column": "id"}, {"name": "b", "column": "id"}])
    on_keys = ["SELECT * FROM a JOIN b ON a.id = b.id",
               "SELECT * FROM a, b WHERE a.id = b.id AND a.id IN (1, 2, 3)",
               "SELECT * FROM a LEFT JOIN b ON a.id = b.id AND b.x = 1",
               "SELECT * FROM a JOIN b USING (id)"]
    for q in on_keys:
        assert rt.route(q).refuse is None, q
    pinned = f"SELECT * FROM a JOIN b ON a.x = b.y WHERE a.id = {A} AND b.id = {A}"
    assert direct(rt.route(pinned)) == shard_bigint(A, N)
    refused = ["SELECT * FROM a JOIN b ON a.x = b.y",
               f"SELECT * FROM a JOIN b ON a.x = b.y WHERE a.id = {A}",
               "SELECT * FROM a, b WHERE a.id = b.id OR a.x = 1",
               "SELECT * FROM a LEFT JOIN b ON a.x = b.x",
               "SELECT * FROM a FULL JOIN b USING (x)"]
    for q in refused:
        route = rt.route(q)
        assert route.refuse is not None and "not on their sharding keys" in route.refuse, q


def test_derived_tables_and_ctes(r):
    want = shard_bigint(A, N)
    assert direct(r.route(f"SELECT * FROM (SELECT * FROM users WHERE id = {A}) x")) == want
    assert direct(r.route(f"WITH x AS (SELECT * FROM users WHERE id = {A}) SELECT * FROM x")) == want
    assert direct(r.route(f"SELECT * FROM countries WHERE code IN (SELECT country FROM users WHERE id = {A})")) == want


def test_column_rule_without_name_applies_to_every_table_with_that_column():
    rt = router(sharded_tables=[{"column": "tenant_id"}])
    want = shard_bigint(A, N)
    assert direct(rt.route(f"SELECT * FROM orders WHERE tenant_id = {A}")) == want
    assert direct(rt.route(f"SELECT * FROM invoices i WHERE i.tenant_id = {A}")) == want
    assert direct(rt.route(f"INSERT INTO orders (tenant_id, total) VALUES ({A}, 5)")) == want
    assert direct(rt.route(f"UPDATE orders SET total = 1 WHERE tenant_id = {A}")) == want
    # a table shown to have the column is sharded: unkeyed reads go everywhere
    assert rt.route("SELECT * FROM orders WHERE tenant_id > 5").shards is ALL
    # a table that may or may not have it cannot be routed without a key
    route = rt.route("SELECT * FROM cities")
    assert route.refuse and "cannot tell whether table cities is sharded" in route.refuse
    assert rt.route("SELECT * FROM countries").any_one  # listed in [[omnisharded_tables]]
    # ... unless the catalog of columns is known
    rt = router(sharded_tables=[{"column": "tenant_id"}], columns={"orders": ["id", "tenant_id"], "cities": ["code"]})
    assert rt.route("SELECT * FROM cities").any_one
    assert rt.route("SELECT * FROM orders").shards is ALL


def test_insert_without_column_list_uses_the_catalog():
    assert "column list" in router().route("INSERT INTO users VALUES (1, 'x')").refuse
    rt = router(columns={"users": ["id", "name"]})
    assert direct(rt.route(f"INSERT INTO users VALUES ({A}, 'x')")) == shard_bigint(A, N)


# -- INSERT, UPDATE, DELETE -----------------------------------------------------------------------


def test_insert_rows(r):
    want = shard_bigint(A, N)
    route = r.route(f"INSERT INTO users (id, name) VALUES ({A}, 'a')")
    assert direct(route) == want and not route.read
    q = "INSERT INTO users (name, id) VALUES ($1, $2) RETURNING *"
    assert direct(r.route(q, Bind([b"a", str(A).encode()]))) == want
    assert direct(r.route(f"INSERT INTO users (id) SELECT {A}")) == want
    x, y = same_shard_keys()
    assert direct(r.route(f"INSERT INTO users (id) VALUES ({x}), ({y})")) == shard_bigint(x, N)


def test_multi_row_insert_spanning_shards_is_flagged(r):
    route = r.route(f"INSERT INTO users (id) VALUES ({A}), ({B})")
    assert route.refuse and "different shards" in route.refuse
    rt = router(split_inserts=True)
    route = rt.route(f"INSERT INTO users (id) VALUES ({A}), ({B})")
    assert route.split_insert and route.shards == s(A, B) and route.refuse is None
    route = rt.route("INSERT INTO users (id) VALUES ($1), ($2)", Bind([str(A).encode(), str(C).encode()]))
    assert route.split_insert and route.shards == s(A, C)
    route = rt.route("INSERT INTO users (id) VALUES ($1), ($2)", Bind([str(A).encode(), str(A).encode()]))
    assert not route.split_insert and direct(route) == shard_bigint(A, N)


def test_inserts_that_cannot_be_routed(r):
    assert "DEFAULT VALUES" in r.route("INSERT INTO users DEFAULT VALUES").refuse
    assert "no value for its sharding key" in r.route("INSERT INTO users (name) VALUES ('x')").refuse
    assert "DEFAULT" in r.route("INSERT INTO users (id) VALUES (DEFAULT)").refuse
    assert "SELECT is not supported" in r.route("INSERT INTO users (id) SELECT id FROM emails").refuse
    assert "expression" in r.route("INSERT INTO users (id) VALUES (nextval('s'))").refuse
    route = r.route("INSERT INTO users (id) VALUES (pgherd.unique_id())")
    assert "unique_id" in route.refuse
    # a NULL key goes where PARTITION BY HASH puts it: remainder 0
    assert direct(r.route("INSERT INTO users (id) VALUES (NULL)")) == 0


def test_update_and_delete(r):
    want = shard_bigint(A, N)
    assert direct(r.route(f"UPDATE users SET name = 'x' WHERE id = {A}")) == want
    assert direct(r.route("UPDATE users SET name = $1 WHERE id = $2", Bind([b"x", str(A).encode()]))) == want
    assert direct(r.route(f"DELETE FROM users WHERE id = {A} RETURNING *")) == want
    route = r.route("UPDATE users SET name = 'x'")
    assert route.shards is ALL and route.cross_shard and not route.read and not route.needs_merge
    assert r.route("DELETE FROM users WHERE name = 'x'").shards is ALL
    q = f"UPDATE users u SET name = c.name FROM countries c WHERE c.code = u.country AND u.id = {A}"
    assert direct(r.route(q)) == want
    assert direct(r.route(f"DELETE FROM users u USING countries c WHERE u.id = {A} AND c.code = 'x'")) == want


def test_update_of_the_key_must_stay_on_its_shard(r):
    x, y = same_shard_keys()
    assert direct(r.route(f"UPDATE users SET id = {y} WHERE id = {x}")) == shard_bigint(x, N)
    assert "move to another shard" in r.route(f"UPDATE users SET id = {B} WHERE id = {A}").refuse
    assert "move to another shard" in r.route(f"UPDATE users SET id = {A}").refuse
    q = "UPDATE users SET id = $1 WHERE id = $2"
    assert r.route(q, Bind([str(x).encode(), str(y).encode()])).refuse is None
    assert r.route(q, Bind([str(A).encode(), str(B).encode()])).refuse
    assert "expression" in r.route("UPDATE users SET id = id + 1 WHERE id = 5").refuse


# -- omnisharded tables, catalogs, no tables --------------------------------------------------------


def test_omnisharded_reads_go_to_one_shard(r):
    route = r.route("SELECT * FROM countries WHERE code = 'fr'")
    assert route.any_one and route.omnisharded and not route.sticky and not route.cross_shard and route.read
    assert r.route("SELECT * FROM settings").sticky
    # implicitly omnisharded (not named anywhere) follows [general] omnisharded_sticky
    assert r.route("SELECT * FROM anything").any_one and not r.route("SELECT * FROM anything").sticky
    assert router(general={"omnisharded_sticky": True}).route("SELECT * FROM anything").sticky


def test_omnisharded_writes_go_everywhere(r):
    for q in ("INSERT INTO countries (code) VALUES ('fr')", "UPDATE countries SET name = 'x'",
              "DELETE FROM countries WHERE code = 'fr'", "COPY countries FROM STDIN"):
        route = r.route(q)
        assert route.shards is ALL and route.write_all and route.omnisharded and not route.read, q
    route = r.route(f"INSERT INTO countries (code) SELECT country FROM users WHERE id = {A}")
    assert "would leave the shards' copies different" in route.refuse


def test_sharded_table_wins_over_omnisharded(r):
    assert direct(r.route(f"SELECT * FROM countries c JOIN users u ON u.country = c.code WHERE u.id = {A}")) == \
        shard_bigint(A, N)
    assert r.route("SELECT * FROM countries c JOIN users u ON u.country = c.code").shards is ALL


def test_system_catalogs_and_no_table(r):
    route = r.route("SELECT * FROM pg_catalog.pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace")
    assert route.any_one and route.sticky
    assert r.route("SELECT * FROM information_schema.tables").sticky
    route = r.route("SELECT 1")
    assert route.any_one and not route.sticky and route.read and not route.omnisharded
    assert not router(general={"system_catalogs": "omnisharded"}).route("SELECT * FROM pg_class").sticky
    assert router(general={"system_catalogs": "sharded"}).route("SELECT * FROM pg_class").shards is ALL


# -- cross-shard reads that need combining -----------------------------------------------------------


@pytest.mark.parametrize(
    "query, construct",
    [
        ("SELECT * FROM users ORDER BY id", "ORDER BY"),
        ("SELECT count(*) FROM users", "aggregate"),
        ("SELECT name, count(*) FROM users GROUP BY name", "GROUP BY"),
        ("SELECT DISTINCT name FROM users", "DISTINCT"),
        ("SELECT DISTINCT ON (name) name FROM users", "DISTINCT"),
        ("SELECT * FROM users LIMIT 5", "LIMIT"),
        ("SELECT * FROM users FETCH FIRST 5 ROWS ONLY", "LIMIT"),
        ("SELECT * FROM users OFFSET 5", "OFFSET"),
        ("SELECT rank() OVER (ORDER BY id) FROM users", "window function"),
        ("SELECT name FROM users UNION SELECT email FROM emails", "UNION"),
        ("SELECT name FROM users INTERSECT SELECT email FROM emails", "INTERSECT"),
        ("SELECT name FROM users EXCEPT SELECT email FROM emails", "EXCEPT"),
        ("SELECT max(id) FILTER (WHERE id > 1) FROM users", "aggregate"),
    ],
)
def test_cross_shard_constructs_are_named_and_refused(r, query, construct):
    route = r.route(query)
    assert route.refuse is not None and route.refuse_code == "0A000"
    assert "cross-shard" in route.refuse
    rt = router(mergeable={"ORDER BY", "aggregate", "GROUP BY", "DISTINCT", "LIMIT", "OFFSET", "window function",
                           "UNION", "INTERSECT", "EXCEPT", "HAVING"})
    route = rt.route(query)
    assert route.refuse is None and construct in route.needs_merge and route.cross_shard


def test_single_shard_reads_need_no_merge(r):
    route = r.route(f"SELECT name, count(*) FROM users WHERE id = {A} GROUP BY name ORDER BY 2 LIMIT 3")
    assert direct(route) == shard_bigint(A, N) and not route.needs_merge
    route = r.route("SELECT * FROM countries ORDER BY code LIMIT 1")
    assert route.any_one and not route.needs_merge


def test_union_all_is_plain_concatenation(r):
    route = r.route("SELECT name FROM users UNION ALL SELECT email FROM emails")
    assert route.refuse is None and route.cross_shard and not route.needs_merge


def test_group_by_the_key_is_shard_local(r):
    route = r.route("SELECT id, count(*) FROM users GROUP BY id")
    assert route.refuse is None and route.shards is ALL and not route.needs_merge
    route = r.route("SELECT id, count(*) FROM users GROUP BY id ORDER BY 2")
    assert route.refuse and "ORDER BY" in route.refuse


def test_subqueries_that_aggregate_across_shards_are_refused(r):
    route = r.route("SELECT * FROM users WHERE score > (SELECT avg(score) FROM users)")
    assert route.refuse and "subquery with aggregate avg()" in route.refuse
    route = r.route(f"SELECT * FROM users WHERE id = {A} AND score > (SELECT avg(score) FROM users)")
    assert route.refuse
    # restricted to the same shard, or correlated on the statement's rows: computed correctly per shard
    q = f"SELECT * FROM users WHERE id = {A} AND score > (SELECT avg(score) FROM users WHERE id = {A})"
    assert direct(r.route(q)) == shard_bigint(A, N)
    q = "SELECT u.*, (SELECT count(*) FROM emails e WHERE e.user_id = u.id) FROM users u"
    assert r.route(q).refuse is None
    assert r.route("SELECT * FROM (SELECT * FROM users LIMIT 3) x").refuse
    assert r.route("SELECT count(*) FROM users UNION ALL SELECT count(*) FROM emails").refuse
    # a subquery over omnisharded data is the same everywhere
    assert r.route("SELECT * FROM users WHERE country IN (SELECT code FROM countries LIMIT 3)").refuse is None


def test_explain(r):
    route = r.route(f"EXPLAIN SELECT * FROM users WHERE id = {A}")
    assert route.kind == "explain" and route.read and direct(route) == shard_bigint(A, N)
    assert "EXPLAIN" in r.route("EXPLAIN SELECT * FROM users").refuse
    assert not r.route(f"EXPLAIN ANALYZE DELETE FROM users WHERE id = {A}").read
    assert r.route("EXPLAIN INSERT INTO countries (code) VALUES ('x')").any_one  # not executed
    assert "EXPLAIN" in r.route("EXPLAIN ANALYZE INSERT INTO countries (code) VALUES ('x')").refuse


# -- read vs write -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query, read",
    [
        ("SELECT * FROM countries", True),
        ("SELECT * FROM countries FOR UPDATE", False),
        ("SELECT * FROM countries FOR SHARE", False),
        ("WITH x AS (DELETE FROM countries RETURNING *) SELECT * FROM x", False),
        ("SHOW work_mem", True),
        ("INSERT INTO countries (code) VALUES ('x')", False),
        ("CREATE TABLE t (id int)", False),
        ("COPY countries TO STDOUT", True),
        ("not sql at all", False),
    ],
)
def test_read_or_write(r, query, read):
    assert r.route(query).read is read


# -- DDL, utility, transactions, SET, SHOW -----------------------------------------------------------


def test_ddl_goes_everywhere(r):
    for q in ("CREATE TABLE t (id bigint)", "ALTER TABLE users ADD COLUMN x int", "DROP TABLE users",
              "CREATE INDEX ON users (name)", "TRUNCATE users", "VACUUM users", "GRANT SELECT ON users TO bob",
              "CREATE TABLE x AS SELECT * FROM users", "SELECT * INTO x FROM users", "LOCK TABLE users"):
        route = r.route(q)
        assert route.shards is ALL and route.write_all and not route.read and route.refuse is None, q


@pytest.mark.parametrize(
    "query, control",
    [
        ("BEGIN", "begin"), ("START TRANSACTION ISOLATION LEVEL SERIALIZABLE", "begin"), ("COMMIT", "commit"),
        ("END", "commit"), ("ROLLBACK", "rollback"), ("ABORT", "rollback"), ("SAVEPOINT a", "savepoint"),
        ("RELEASE SAVEPOINT a", "release"), ("ROLLBACK TO SAVEPOINT a", "rollback_to"),
        ("PREPARE TRANSACTION 'x'", "prepare"), ("COMMIT PREPARED 'x'", "commit_prepared"),
        ("ROLLBACK PREPARED 'x'", "rollback_prepared"),
    ],
)
def test_transaction_control(r, query, control):
    route = r.route(query)
    assert route.kind == "tx" and route.tx_control == control


def test_set_routing_variables(r):
    route = r.route("SET pgherd.shard = 2")
    assert route.shards == () and route.session_change.variable == "shard" and route.session_change.value == 2
    route = r.route("SET LOCAL pgdog.sharding_key TO 'abc'")
    assert route.session_change == session_change("SET LOCAL pgdog.sharding_key TO 'abc'")
    assert route.session_change.local and route.session_change.value == "abc"
    assert r.route("SET pgherd.shard = 9").refuse_code == "22023"
    assert r.route("SET pgherd.shard = 'x'").refuse_code == "22023"
    route = r.route("SET search_path TO app, public")
    assert route.shards is ALL and route.session_change.value == ("app", "public") and route.session_change.forward
    route = r.route("SET statement_timeout = 5")
    assert route.kind == "set" and route.shards is ALL and route.session_change is None


def test_show(r):
    assert r.route("SHOW pgherd.shards").admin_answer == ("pgherd.shards", N)
    assert r.route("SHOW pgdog.shards").admin_answer == ("pgherd.shards", N)
    assert r.route("SHOW pgdog.unique_id").admin_answer == ("pgherd.unique_id", None)
    assert r.route("SHOW server_version").any_one


def test_unique_id_calls_are_flagged(r):
    assert r.route("SELECT pgherd.unique_id()").unique_id_calls
    assert r.route("SELECT pgdog.unique_id(), pgdog.unique_id()").unique_id_calls
    assert r.route("INSERT INTO countries (id, code) VALUES (pgdog.unique_id(), 'x')").unique_id_calls
    assert not r.route("SELECT unique_id()").unique_id_calls


def test_sql_level_prepare_is_refused(r):
    assert "PREPARE" in r.route("PREPARE p AS SELECT * FROM users WHERE id = $1").refuse
    assert "EXECUTE" in r.route("EXECUTE p(1)").refuse
    assert direct(r.route("/* pgherd_shard: 1 */ EXECUTE p(1)")) == 1
    assert r.route("DEALLOCATE ALL").kind == "session"


def test_cursors(r):
    route = r.route(f"DECLARE c CURSOR FOR SELECT * FROM users WHERE id = {A}")
    assert route.kind == "cursor" and direct(route) == shard_bigint(A, N)
    assert r.route("FETCH 10 FROM c").follow_tx
    assert r.route("CLOSE c").follow_tx


# -- manual routing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        "/* pgherd_shard: 2 */ SELECT * FROM users ORDER BY id",
        "SELECT * FROM users ORDER BY id /* pgherd_shard: 2 */",
        "/* pgdog_shard: 2 */ SELECT * FROM users ORDER BY id",
        "SELECT * /* app: x, pgdog_shard:2 */ FROM users ORDER BY id",
        "/* a */ /* pgherd_shard: 2 */ INSERT INTO users (name) VALUES ('no key')",
    ],
)
def test_shard_comment(r, query):
    route = r.route(query)
    assert direct(route) == 2 and route.manual == "comment"


def test_comment_hints_ignore_strings_and_line_comments(r):
    assert r.route("SELECT '/* pgherd_shard: 2 */' FROM users").shards is ALL
    assert r.route("SELECT * FROM users -- pgherd_shard: 2").shards is ALL


def test_sharding_key_comment():
    rt = router(sharded_tables=[{"name": "users", "column": "id"}, {"name": "orders", "column": "user_id"}])
    for q in (f"/* pgherd_sharding_key: {A} */ SELECT * FROM users",
              f"SELECT * FROM users /* pgdog_sharding_key: '{A}' */",
              f'SELECT 1 /* pgherd_sharding_key: "{A}" */'):
        route = rt.route(q)
        assert direct(route) == shard_bigint(A, N) and route.manual == "comment"
    assert direct(rt.route(f"/* pgherd_sharding_key: {A} */ SELECT count(*) FROM orders")) == shard_bigint(A, N)
    assert rt.route("/* pgherd_sharding_key: abc */ SELECT 1").refuse_code == "22P02"
    mixed = router()  # bigint, varchar and uuid keys: no single function
    assert "ambiguous" in mixed.route("/* pgherd_sharding_key: 5 */ SELECT 1").refuse


def test_shard_comment_out_of_range(r):
    route = r.route("/* pgherd_shard: 9 */ SELECT 1")
    assert route.refuse_code == "22023" and "does not exist" in route.refuse


def test_role_comment(r):
    assert r.route("SELECT * FROM countries /* pgdog_role: primary */").role == "primary"
    assert r.route("/* pgherd_role: replica */ SELECT 1").role == "replica"


def test_session_shard_and_key():
    rt = router(sharded_tables=[{"name": "users", "column": "id"}])
    session = RoutingSession()
    q = "SELECT * FROM users ORDER BY id"
    assert rt.route(q, session=session).refuse
    session.apply(session_change("SET pgherd.shard = 3"), in_transaction=False)
    route = rt.route(q, session=session)
    assert direct(route) == 3 and route.manual == "session"
    # a comment is more specific than the session's setting
    assert direct(rt.route("/* pgherd_shard: 1 */ " + q, session=session)) == 1
    session.apply(session_change("RESET pgherd.shard"), in_transaction=False)
    session.apply(session_change(f"SET pgdog.sharding_key = '{B}'"), in_transaction=False)
    assert direct(rt.route(q, session=session)) == shard_bigint(B, N)
    # transaction control and SET are not redirected
    assert rt.route("BEGIN", session=session).tx_control == "begin"


def test_set_local_lasts_one_transaction():
    session = RoutingSession()
    session.apply(session_change("SET pgherd.shard = 1"), in_transaction=False)
    session.apply(session_change("SET LOCAL pgherd.shard = 2"), in_transaction=True)
    assert session.shard == 2
    session.end_transaction(committed=True)
    assert session.shard == 1
    session.apply(session_change("SET pgherd.shard = 3"), in_transaction=True)
    session.end_transaction(committed=False)  # ROLLBACK undoes a plain SET made in the block
    assert session.shard == 1
    session.apply(session_change("SET LOCAL pgherd.shard = 2"), in_transaction=False)  # no effect outside
    assert session.shard == 1


# -- schema sharding -------------------------------------------------------------------------------


SCHEMAS = dict(sharded_schemas=[{"name": "customer_a", "shard": 0}, {"name": "customer_b", "shard": 3},
                                {"name": "everyone", "all": True}])


def test_schema_qualified_tables_go_to_their_schema():
    rt = router(**SCHEMAS)
    assert direct(rt.route("SELECT * FROM customer_a.orders")) == 0
    assert direct(rt.route("SELECT count(*) FROM customer_b.orders o JOIN customer_b.items i ON true")) == 3
    assert direct(rt.route("INSERT INTO customer_b.orders (x) VALUES (1)")) == 3
    assert direct(rt.route(f"SELECT * FROM customer_a.users WHERE id = {C}")) == 0  # the schema wins over a key
    assert direct(rt.route("CREATE TABLE customer_b.t (id int)")) == 3
    assert "different shards" in rt.route("SELECT * FROM customer_a.t JOIN customer_b.t USING (id)").refuse
    route = rt.route("SELECT * FROM everyone.t")
    assert route.shards is ALL and route.cross_shard
    assert rt.route("SELECT * FROM other.t").any_one  # unmapped schema, no default: omnisharded


def test_search_path_picks_the_schema_of_unqualified_tables():
    rt = router(**SCHEMAS)
    session = RoutingSession()
    session.apply(session_change("SET search_path TO '$user', public, customer_b"), in_transaction=False)
    assert direct(rt.route("SELECT * FROM orders", session=session)) == 3
    assert direct(rt.route("CREATE TABLE t (id int)", session=session)) == 3
    session.apply(session_change("SET LOCAL search_path TO customer_a"), in_transaction=True)
    assert direct(rt.route("SELECT * FROM orders", session=session)) == 0
    session.end_transaction(committed=True)
    assert direct(rt.route("SELECT * FROM orders", session=session)) == 3
    # catalogs are never claimed by the search_path
    assert rt.route("SELECT * FROM pg_class", session=session).any_one
    # startup options work too
    session = RoutingSession.from_startup_options({"options": "-c search_path=customer_a"})
    assert direct(rt.route("SELECT * FROM orders", session=session)) == 0


def test_default_schema_shard():
    rt = router(sharded_schemas=[{"name": "customer_a", "shard": 1}, {"shard": 2}], sharded_tables=[],
                omnisharded_tables=[])
    assert direct(rt.route("SELECT * FROM customer_c.users")) == 2
    assert direct(rt.route("SELECT * FROM users")) == 2
    assert direct(rt.route("SELECT * FROM customer_a.users")) == 1
    assert direct(rt.route("/* pgherd_sharding_key: customer_a */ SELECT 1")) == 1


# -- list and range mappings --------------------------------------------------------------------------


def test_list_and_range_mappings_in_sharded_tables():
    rt = router(sharded_tables=[{"name": "tenants", "column": "tenant_id", "mapping": [
        {"values": [1, 2, 3], "shard": 0}, {"start": 100, "end": 200, "shard": 2}, {"start": 200, "shard": 3}]}],
        omnisharded_tables=[])
    assert direct(rt.route("SELECT * FROM tenants WHERE tenant_id = 2")) == 0
    assert direct(rt.route("SELECT * FROM tenants WHERE tenant_id = 100")) == 2
    assert direct(rt.route("SELECT * FROM tenants WHERE tenant_id = 199")) == 2
    assert direct(rt.route("SELECT * FROM tenants WHERE tenant_id = 5000")) == 3
    assert rt.route("SELECT * FROM tenants WHERE tenant_id = 50").shards is ALL  # no match, no default
    assert rt.route("INSERT INTO tenants (tenant_id) VALUES (50)").refuse_code == "23514"
    assert rt.route("SELECT * FROM tenants WHERE tenant_id IN (1, 150)").shards == (0, 2)


def test_older_sharded_mappings_section():
    rt = router(
        sharded_tables=[{"column": "region", "data_type": "varchar"}],
        sharded_mappings=[{"column": "region", "kind": "list", "values": ["eu", "uk"], "shard": 1},
                          {"column": "region", "kind": "default", "shard": 3}],
        omnisharded_tables=[{"tables": ["countries"]}],
    )
    assert direct(rt.route("SELECT * FROM shops WHERE region = 'uk'")) == 1
    assert direct(rt.route("SELECT * FROM shops WHERE region = 'us'")) == 3
    assert direct(rt.route("INSERT INTO shops (region) VALUES ($1)", Bind([b"eu"]))) == 1


# -- configuration-wide behaviour ---------------------------------------------------------------------


def test_cross_shard_disabled():
    rt = router(general={"cross_shard_disabled": True})
    assert "cross_shard_disabled" in rt.route("SELECT * FROM users").refuse
    assert "cross_shard_disabled" in rt.route(f"DELETE FROM users WHERE id IN ({A}, {B})").refuse
    assert direct(rt.route(f"SELECT * FROM users WHERE id = {A}")) == shard_bigint(A, N)
    assert rt.route("CREATE TABLE t (id int)").refuse is None  # DDL goes everywhere by nature
    assert rt.route("INSERT INTO countries (code) VALUES ('x')").refuse is None


def test_trivial_plan_and_single_shard():
    plan = ShardingPlan.from_config(config(shards=1), "prod")
    assert plan.trivial
    plan = ShardingPlan.from_config(config(**STANDARD), "prod")
    assert not plan.trivial
    one = Router(ShardingPlan.from_config(config(shards=1, **STANDARD), "prod"))
    assert not one.plan.trivial
    route = one.route("SELECT * FROM users ORDER BY id LIMIT 1")
    assert route.shards == (0,) and route.refuse is None and route.read


def test_multi_statement_queries(r):
    route = r.route(f"BEGIN; UPDATE users SET x = 1 WHERE id = {A}; COMMIT")
    assert direct(route) == shard_bigint(A, N) and route.statements == 3 and not route.read
    route = r.route(f"SELECT 1; SELECT * FROM users WHERE id = {A}")
    assert direct(route) == shard_bigint(A, N) and route.read
    route = r.route(f"INSERT INTO users (id) VALUES ({A}); INSERT INTO users (id) VALUES ({B})")
    assert "different shards" in route.refuse
    assert "own" in r.route("SET pgherd.shard = 1; SELECT 1").refuse


def test_empty_and_unparsable(r):
    assert r.route("").kind == "empty"
    assert r.route("  /* nothing */ ").kind == "empty"
    route = r.route("SELEC 1")
    assert route.kind == "unparsed" and route.any_one  # Postgres reports the syntax error


# -- the cache -------------------------------------------------------------------------------------


def test_cache_counts_and_byte_bound():
    rt = Router(ShardingPlan.from_config(config(**STANDARD), "prod"), cache_bytes=200_000)
    q = f"SELECT * FROM users WHERE id = {A}"
    first = rt.route(q)
    assert rt.route(q) is first  # cached decisions are shared
    stats = rt.stats()
    assert (stats.hits, stats.misses, stats.entries, stats.direct, stats.cross_shard) == (1, 1, 1, 2, 0)
    rt.route("SELECT * FROM users")
    assert rt.stats().cross_shard == 1
    for i in range(500):
        rt.route(f"SELECT * FROM users WHERE id = {i}")
    stats = rt.stats()
    assert stats.bytes <= 200_000 and stats.evictions > 0 and 10 < stats.entries < 500
    # giant one-off texts are not cached
    rt.route("SELECT 1 " + " " * 100_000)
    assert rt.stats().entries == stats.entries


def test_parameterized_routes_are_memoized(r):
    q = "SELECT * FROM users WHERE id = $1 /* memo */"
    a = r.route(q, Bind([str(A).encode()]))
    b = r.route(q, Bind([str(A).encode()]))
    assert a is b and direct(a) == shard_bigint(A, N)
    assert direct(r.route(q, Bind([str(B).encode()]))) == shard_bigint(B, N)


def test_uuid_keys_in_insert(r):
    u = uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
    want = shard_uuid(u.bytes, N)
    assert direct(r.route(f"INSERT INTO devices (uid, name) VALUES ('{u}', 'x')")) == want
    assert direct(r.route("INSERT INTO devices (uid) VALUES ($1)", Bind([u.bytes], [1], [2950]))) == want
    assert r.route("INSERT INTO devices (uid) VALUES ('not-a-uuid')").refuse_code == "22P02"


def test_subqueries_used_as_values_must_stay_on_the_statement_shard(r):
    q = f"SELECT *, (SELECT name FROM users WHERE id = {B}) FROM users WHERE id = {A}"
    assert "subquery used as a value" in r.route(q).refuse
    q = f"SELECT *, (SELECT name FROM users WHERE id = {A}) FROM users WHERE id = {A}"
    assert direct(r.route(q)) == shard_bigint(A, N)
    q = f"INSERT INTO users (id, name) VALUES ({A}, (SELECT name FROM users WHERE id = {B}))"
    assert r.route(q).refuse
    q = f"UPDATE users SET name = (SELECT name FROM emails WHERE email = 'x') WHERE id = {A}"
    assert r.route(q).refuse
    q = f"SELECT * FROM users WHERE id = {A} AND NOT EXISTS (SELECT 1 FROM emails WHERE email = 'x')"
    assert r.route(q).refuse
    # semi-joins on the key are co-located: fine per shard
    assert r.route("SELECT * FROM users WHERE id IN (SELECT user_id FROM emails WHERE email LIKE 'a%')").refuse is None


def test_cross_shard_rows_from_omnisharded_tables_only_are_refused(r):
    route = r.route("SELECT * FROM countries WHERE code IN (SELECT country FROM users)")
    assert "omnisharded tables only" in route.refuse
    q = f"SELECT * FROM countries WHERE code IN (SELECT country FROM users WHERE id = {A})"
    assert direct(r.route(q)) == shard_bigint(A, N)  # one shard: each country once
    assert r.route("SELECT c.* FROM countries c JOIN users u ON u.country = c.code").refuse is None
    assert r.route("SELECT code FROM countries UNION ALL SELECT name FROM users").refuse


# -- property: nested boolean conditions against an independent model ------------------------------

ALL_SHARDS = frozenset(range(N))


@st.composite
def conditions(draw: Any, depth: int = 0) -> tuple[str, frozenset]:
    """(SQL boolean expression, the shards PostgreSQL rows matching it can live on)."""
    choice = draw(st.integers(0, 5 if depth < 3 else 2))
    if choice == 0:
        v = draw(INT8)
        return f"u.id = {v}", frozenset({shard_bigint(v, N)})
    if choice == 1:
        vs = draw(st.lists(INT8, min_size=1, max_size=4))
        return f"id IN ({', '.join(map(str, vs))})", frozenset(shard_bigint(v, N) for v in vs)
    if choice == 2:
        return draw(st.sampled_from(["name = 'x'", "u.score > 3", "id > 7", "TRUE", "email IS NULL"])), ALL_SHARDS
    left, lset = draw(conditions(depth + 1))
    right, rset = draw(conditions(depth + 1))
    if choice == 3:
        return f"({left} AND {right})", lset & rset
    if choice == 4:
        return f"({left} OR {right})", lset | rset
    return f"NOT ({left})", ALL_SHARDS


@settings(max_examples=300)
@given(conditions())
def test_nested_conditions_match_the_model(r, case):
    where, expected = case
    route = r.route(f"SELECT * FROM users u WHERE {where}")
    assert route.refuse is None
    if not expected:
        assert route.any_one
    else:
        assert set(route.shard_list(N)) == set(expected)


@settings(max_examples=200)
@given(st.text(max_size=60))
def test_arbitrary_text_never_crashes(r, text):
    route = r.route(text)
    assert isinstance(route, Route)
    assert route.refuse_code != "XX000"


def test_ctes_shadowing_and_recursion(r):
    want = shard_bigint(A, N)
    # in a plain WITH, the CTE's own name inside its body is the table
    assert direct(r.route(f"WITH users AS (SELECT * FROM users WHERE id = {A}) SELECT * FROM users")) == want
    q = f"WITH RECURSIVE t(n) AS (SELECT id FROM users WHERE id = {A} UNION ALL SELECT n + 1 FROM t) SELECT * FROM t"
    assert direct(r.route(q)) == want


def test_table_rule_with_a_schema():
    rt = router(sharded_tables=[{"name": "users", "schema": "app", "column": "id"}], omnisharded_tables=[])
    want = shard_bigint(A, N)
    assert direct(rt.route(f"SELECT * FROM app.users WHERE id = {A}")) == want
    assert direct(rt.route(f"SELECT * FROM users WHERE id = {A}")) == want  # resolved through search_path
    assert rt.route(f"SELECT * FROM other.users WHERE id = {A}").any_one  # another schema's table: not sharded


def test_data_modifying_with_is_refused(r):
    q = f"WITH x AS (INSERT INTO countries (code) VALUES ('x') RETURNING *) UPDATE users SET a = 1 WHERE id = {A}"
    route = r.route(q)
    assert "data-modifying WITH" in route.refuse
    assert direct(r.route("/* pgherd_shard: 0 */ WITH x AS (DELETE FROM users RETURNING *) SELECT * FROM x")) == 0
