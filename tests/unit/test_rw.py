"""Unit tests of the read/write classifier (router/rw.py): statements, functions, transactions, cache."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgherd.router import rw as rw_module
from pgherd.router.rw import READ_ONLY_FUNCTIONS, RW, WRITE_FUNCTIONS, ReadWriteClassifier

# (sql, write under "conservative", write under "aggressive")
CASES = [
    # plain reads
    ("SELECT 1", False, False),
    ("select * from t where id = $1", False, False),
    ("SELECT a, count(*) FROM t GROUP BY a HAVING sum(b) > 1 ORDER BY 2 LIMIT 5", False, False),
    ("VALUES (1), (2)", False, False),
    ("TABLE t", False, False),
    ("SHOW work_mem", False, False),
    ("SHOW ALL", False, False),
    ("WITH x AS (SELECT 1) SELECT * FROM x", False, False),
    ("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5) SELECT * FROM r", False, False),
    ("SELECT * FROM t WHERE a IN (SELECT b FROM u) UNION SELECT 1", False, False),
    ("SELECT coalesce(a, 0), nullif(a, 1), greatest(a, b), least(a, b) FROM t", False, False),
    ("SELECT current_timestamp, current_date, current_user, localtimestamp, session_user", False, False),
    ("SELECT lower(name), upper(name), length(name) FROM users WHERE email LIKE $1", False, False),
    ("SELECT now(), pg_catalog.now(), extract(epoch from now()), date_trunc('day', now())", False, False),
    ("SELECT trim(both ' ' from a), substring(a from 2 for 3), position('x' in a) FROM t", False, False),
    ("SELECT * FROM generate_series(1, 10) g", False, False),
    ("SELECT jsonb_build_object('a', 1), json_agg(t), jsonb_set('{}', '{a}', '1') FROM t", False, False),
    ("SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn(), pg_backend_pid(), version()", False, False),
    ("SELECT row_number() OVER (ORDER BY a), rank() OVER w FROM t WINDOW w AS (ORDER BY b)", False, False),
    ("SELECT gen_random_uuid(), random(), pg_sleep(0), current_setting('work_mem')", False, False),
    ("SELECT pgherd.unique_id(), pgdog.unique_id()", False, False),
    ("SELECT count(*) FILTER (WHERE a > 1), string_agg(b, ',' ORDER BY b) FROM t", False, False),
    ("SELECT has_table_privilege('t', 'select'), pg_get_viewdef('v'::regclass), pg_typeof(1)", False, False),
    # text that looks like a write construct but is a string or a column
    ("SELECT 'FOR UPDATE', 'nextval(1)', '\"lockingClause\":', '\"FuncCall\":{'", False, False),
    ('SELECT "lockingClause", "InsertStmt" FROM t', False, False),
    ("SELECT $$ UPDATE t SET a = 1 $$", False, False),
    # EXPLAIN: plain EXPLAIN plans only; EXPLAIN ANALYZE runs its statement
    ("EXPLAIN SELECT * FROM t", False, False),
    ("EXPLAIN UPDATE t SET a = 1", False, False),
    ("EXPLAIN SELECT * FROM t FOR UPDATE", False, False),
    ("EXPLAIN SELECT nextval('s'), myfn()", False, False),
    ("EXPLAIN ANALYZE SELECT * FROM t", False, False),
    ("EXPLAIN (ANALYZE false) DELETE FROM t", False, False),
    ("EXPLAIN (ANALYZE off) DELETE FROM t", False, False),
    ("EXPLAIN (ANALYZE 0) DELETE FROM t", False, False),
    ("EXPLAIN ANALYZE DELETE FROM t", True, True),
    ("EXPLAIN (ANALYZE, BUFFERS) UPDATE t SET a = 1", True, True),
    ("EXPLAIN (ANALYZE true, FORMAT json) INSERT INTO t VALUES (1)", True, True),
    ("EXPLAIN (ANALYZE on) MERGE INTO t USING u ON t.id = u.id WHEN MATCHED THEN DELETE", True, True),
    ("EXPLAIN ANALYZE SELECT * FROM t FOR UPDATE", True, True),
    ("EXPLAIN ANALYZE CREATE TABLE t2 AS SELECT 1", True, True),
    ("EXPLAIN ANALYZE SELECT nextval('s')", True, True),
    ("EXPLAIN ANALYZE EXECUTE p", True, True),
    ("EXPLAIN ANALYZE SELECT myfn()", True, False),
    # COPY both ways
    ("COPY t TO STDOUT", False, False),
    ("COPY t (a, b) TO STDOUT WITH (FORMAT csv, HEADER)", False, False),
    ("COPY (SELECT * FROM t WHERE a > 1) TO STDOUT WITH (FORMAT csv)", False, False),
    ("COPY (SELECT lower(a) FROM t) TO STDOUT", False, False),
    ("COPY (SELECT myfn(a) FROM t) TO STDOUT", True, False),
    ("COPY (SELECT * FROM t FOR UPDATE) TO STDOUT", True, True),
    ("COPY (DELETE FROM t RETURNING *) TO STDOUT", True, True),
    ("COPY t FROM STDIN", True, True),
    ("COPY t (a, b) FROM STDIN WITH (FORMAT csv)", True, True),
    # cursors
    ("DECLARE c CURSOR FOR SELECT * FROM t", False, False),
    ("DECLARE c CURSOR WITH HOLD FOR SELECT lower(a) FROM t", False, False),
    ("DECLARE c CURSOR FOR SELECT * FROM t FOR UPDATE", True, True),
    ("DECLARE c CURSOR FOR SELECT myfn()", True, False),
    ("FETCH 10 FROM c", False, False),
    ("MOVE NEXT IN c", False, False),
    ("CLOSE c", False, False),
    # transaction control, settings, session statements
    ("BEGIN", False, False),
    ("START TRANSACTION READ ONLY", False, False),
    ("COMMIT", False, False),
    ("ROLLBACK", False, False),
    ("SAVEPOINT s", False, False),
    ("RELEASE SAVEPOINT s", False, False),
    ("ROLLBACK TO SAVEPOINT s", False, False),
    ("SET work_mem = '64MB'", False, False),
    ("SET LOCAL statement_timeout = 1000", False, False),
    ("RESET work_mem", False, False),
    ("SET search_path TO app, public", False, False),
    ("SET CONSTRAINTS ALL DEFERRED", False, False),
    ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", False, False),
    ("DISCARD ALL", False, False),
    ("UNLISTEN *", False, False),
    ("LOAD 'auto_explain'", False, False),
    ("PREPARE TRANSACTION 'g1'", True, True),
    ("COMMIT PREPARED 'g1'", True, True),
    ("ROLLBACK PREPARED 'g1'", True, True),
    # data changes and DDL
    ("INSERT INTO t VALUES (1)", True, True),
    ("INSERT INTO t SELECT * FROM u ON CONFLICT DO NOTHING", True, True),
    ("UPDATE t SET a = 1 WHERE id = $1", True, True),
    ("DELETE FROM t WHERE id = 1 RETURNING *", True, True),
    ("MERGE INTO t USING u ON t.id = u.id WHEN MATCHED THEN UPDATE SET a = u.a", True, True),
    ("CREATE TABLE t (a int)", True, True),
    ("CREATE TEMP TABLE tt (a int)", True, True),
    ("CREATE TABLE t2 AS SELECT * FROM t", True, True),
    ("CREATE MATERIALIZED VIEW mv AS SELECT 1", True, True),
    ("REFRESH MATERIALIZED VIEW mv", True, True),
    ("CREATE INDEX ON t (a)", True, True),
    ("ALTER TABLE t ADD COLUMN b int", True, True),
    ("DROP TABLE t", True, True),
    ("TRUNCATE t", True, True),
    ("GRANT SELECT ON t TO bob", True, True),
    ("COMMENT ON TABLE t IS 'x'", True, True),
    ("CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'", True, True),
    ("SELECT * INTO t2 FROM t", True, True),
    ("SELECT 1 INTO TEMP t3", True, True),
    ("CALL p()", True, True),
    ("DO $$BEGIN PERFORM 1; END$$", True, True),
    ("LOCK TABLE t", True, True),
    ("LOCK t IN ACCESS SHARE MODE", True, True),
    ("NOTIFY ch, 'x'", True, True),
    ("LISTEN ch", True, True),
    ("VACUUM t", True, True),
    ("ANALYZE t", True, True),
    ("VACUUM (ANALYZE) t", True, True),
    ("CHECKPOINT", True, True),
    ("CLUSTER t USING t_pkey", True, True),
    ("REINDEX TABLE t", True, True),
    ("PREPARE p AS SELECT 1", True, True),
    ("EXECUTE p", True, True),
    ("DEALLOCATE p", True, True),
    # row locks, anywhere
    ("SELECT * FROM t FOR UPDATE", True, True),
    ("SELECT * FROM t FOR NO KEY UPDATE", True, True),
    ("SELECT * FROM t FOR SHARE", True, True),
    ("SELECT * FROM t FOR KEY SHARE", True, True),
    ("SELECT * FROM t WHERE id = 1 FOR UPDATE SKIP LOCKED", True, True),
    ("SELECT * FROM t FOR UPDATE OF t NOWAIT", True, True),
    ("SELECT * FROM t WHERE a IN (SELECT b FROM u FOR UPDATE)", True, True),
    ("SELECT * FROM (SELECT * FROM t FOR SHARE) s", True, True),
    ("SELECT (SELECT b FROM u WHERE u.id = t.id FOR UPDATE) FROM t", True, True),
    ("WITH l AS (SELECT * FROM t FOR UPDATE) SELECT * FROM l", True, True),
    # data-modifying WITH
    ("WITH x AS (UPDATE t SET a = 1 RETURNING *) SELECT * FROM x", True, True),
    ("WITH x AS (INSERT INTO t VALUES (1) RETURNING id) SELECT id FROM x", True, True),
    ("WITH x AS (DELETE FROM t RETURNING *) SELECT count(*) FROM x", True, True),
    ("WITH x AS (MERGE INTO t USING u ON t.id = u.id WHEN MATCHED THEN DELETE RETURNING t.*) SELECT * FROM x",
     True, True),
    # built-ins that write, lock, or fail on a standby: writes under both strategies
    ("SELECT nextval('s')", True, True),
    ("SELECT pg_catalog.nextval('s')", True, True),
    ("SELECT setval('s', 1)", True, True),
    ("SELECT currval('s'), lastval()", True, True),
    ("SELECT * FROM t WHERE id = nextval('s')", True, True),
    ("SELECT (SELECT nextval('s'))", True, True),
    ("VALUES (nextval('s'))", True, True),
    ("SELECT lower(a) FROM t ORDER BY setval('s', 1)", True, True),
    ("SELECT pg_advisory_lock(1)", True, True),
    ("SELECT pg_try_advisory_xact_lock(1)", True, True),
    ("SELECT pg_advisory_unlock_all()", True, True),
    ("SELECT set_config('app.user', 'x', false)", True, True),
    ("SELECT txid_current()", True, True),
    ("SELECT pg_current_xact_id()", True, True),
    ("SELECT pg_current_wal_lsn()", True, True),
    ("SELECT lo_import('/tmp/x'), lo_unlink(1)", True, True),
    ("SELECT pg_notify('ch', 'x')", True, True),
    ("SELECT pg_terminate_backend(1), pg_cancel_backend(2)", True, True),
    ("SELECT pg_reload_conf()", True, True),
    ("SELECT pg_switch_wal()", True, True),
    ("SELECT pg_create_logical_replication_slot('s', 'pgoutput')", True, True),
    ("SELECT dblink_exec('conn', 'DELETE FROM t')", True, True),
    ("SELECT query_to_xml('DELETE FROM t RETURNING *', true, false, '')", True, True),
    # functions not known to be read-only: writes only under "conservative"
    ("SELECT myfn(1)", True, False),
    ("SELECT * FROM t WHERE a = myfn(b)", True, False),
    ("SELECT a FROM t ORDER BY myfn(a)", True, False),
    ("SELECT public.lower(a) FROM t", True, False),
    ("SELECT pg_catalog.lower(a), app.lower(a) FROM t", True, False),
    ('SELECT s."MyFn"(1)', True, False),
    ('SELECT "Lower"(a) FROM t', True, False),
    ("SELECT * FROM my_srf() AS f(a int)", True, False),
    ("SELECT my_agg(a) FROM t", True, False),
    ("SELECT * FROM t WHERE EXISTS (SELECT 1 FROM u WHERE u.a = myfn(t.a))", True, False),
    ("WITH a AS (SELECT f()) SELECT * FROM a", True, False),
    ("SELECT setseed(0.5)", True, False),
    ("SELECT nextval_like_but_mine()", True, False),
    ("SELECT app.nextval('s')", True, False),  # a user function named nextval: not the built-in
    # not SQL, or nothing at all
    ("SELEC 1", True, True),
    ("SELECT (", True, True),
    ("SELECT 'unterminated", True, True),
    ("", False, False),
    ("   ;  ", False, False),
    ("-- only a comment", False, False),
]


@pytest.fixture(scope="module")
def conservative() -> ReadWriteClassifier:
    return ReadWriteClassifier("conservative")


@pytest.fixture(scope="module")
def aggressive() -> ReadWriteClassifier:
    return ReadWriteClassifier("aggressive")


@pytest.mark.parametrize("sql,cons,aggr", CASES, ids=[c[0][:60] for c in CASES])
def test_read_or_write(sql: str, cons: bool, aggr: bool, conservative: ReadWriteClassifier,
                       aggressive: ReadWriteClassifier) -> None:
    assert conservative.classify(sql).write is cons
    assert aggressive.classify(sql).write is aggr


@pytest.mark.parametrize("sql,cons,aggr", CASES, ids=[c[0][:60] for c in CASES])
def test_tree_walk_agrees_with_the_json_scan(sql: str, cons: bool, aggr: bool,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The fallback (walking the tree) gives the same answers as the scan of the JSON text."""
    monkeypatch.setattr(rw_module, "_FUNC_RE", re.compile(r"(?!)"))  # never matches: always fall back
    assert ReadWriteClassifier("conservative").classify(sql).write is cons
    assert ReadWriteClassifier("aggressive").classify(sql).write is aggr


_IDENT = st.text(alphabet=st.sampled_from('abcXYZ_9 "\\]}[{:,'), min_size=1, max_size=12)


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.none() | _IDENT, _IDENT), min_size=1, max_size=4), st.sampled_from(["lower", "myfn"]))
def test_function_names_with_odd_characters(calls: list, known: str) -> None:
    """Quoted identifiers with quotes, backslashes and JSON punctuation: the scan reads the names
    the parser saw, exactly like the tree walk, and add_read_only matches them."""
    exprs = [(f"{_quote(s)}." if s is not None else "") + _quote(n) + "(1)" for s, n in calls]
    sql = f"SELECT {known}(a), {', '.join(exprs)} FROM t"
    names = {n if s is None else f"{s}.{n}" for s, n in calls} | {known}
    c = ReadWriteClassifier()
    before = c.classify(sql)
    c.add_read_only(names)
    assert c.classify(sql).write is False
    fallback = ReadWriteClassifier()
    fallback._read_calls = lambda src, body, text: fallback._walk(body, text)  # type: ignore[method-assign]
    assert fallback.classify(sql) == before


# -- transactions -----------------------------------------------------------------------------


@pytest.mark.parametrize("sql,begin", [
    ("BEGIN", "rw"),
    ("begin", "rw"),
    ("BEGIN WORK", "rw"),
    ("START TRANSACTION", "rw"),
    ("BEGIN READ WRITE", "rw"),
    ("BEGIN READ ONLY", "ro"),
    ("BEGIN TRANSACTION READ ONLY", "ro"),
    ("START TRANSACTION READ ONLY", "ro"),
    ("START TRANSACTION ISOLATION LEVEL REPEATABLE READ", "rw"),
    ("BEGIN ISOLATION LEVEL SERIALIZABLE, READ ONLY, DEFERRABLE", "ro"),
    ("BEGIN ISOLATION LEVEL SERIALIZABLE READ WRITE", "rw"),
    ("/* app */ BEGIN READ ONLY; SELECT 1", "ro"),
    ("SELECT 1; BEGIN", None),
    ("COMMIT", None),
    ("SELECT 1", None),
])
def test_begin(sql: str, begin: str | None, conservative: ReadWriteClassifier) -> None:
    facts = conservative.classify(sql)
    assert facts.begin == begin
    assert not facts.write


@pytest.mark.parametrize("sql,tx_end", [
    ("COMMIT", True),
    ("END", True),
    ("ROLLBACK", True),
    ("ABORT", True),
    ("COMMIT WORK", True),
    ("ROLLBACK TRANSACTION", True),
    ("commit;", True),
    ("COMMIT AND CHAIN", False),  # a new transaction starts at once
    ("ROLLBACK AND CHAIN", False),
    ("COMMIT; SELECT 1", False),
    ("SELECT 1; COMMIT", False),
    ("ROLLBACK TO SAVEPOINT s", False),
    ("RELEASE s", False),
    ("COMMIT PREPARED 'g'", False),
    ("BEGIN", False),
])
def test_tx_end(sql: str, tx_end: bool, conservative: ReadWriteClassifier) -> None:
    assert conservative.classify(sql).tx_end is tx_end


@pytest.mark.parametrize("sql,read_only", [
    ("SET TRANSACTION READ ONLY", True),
    ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY", True),
    ("SET TRANSACTION READ WRITE", False),
    ("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ", False),
    ("SET transaction_read_only = on", True),
    ("SET LOCAL transaction_read_only TO true", True),
    ("SET transaction_read_only = off", False),
    ("BEGIN; SET TRANSACTION READ ONLY; SELECT 1", True),
    ("BEGIN ISOLATION LEVEL SERIALIZABLE; SET TRANSACTION READ ONLY", True),
    ("BEGIN; SELECT 1; SET TRANSACTION READ ONLY", False),
    ("SELECT 1; SET TRANSACTION READ ONLY", False),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", False),  # a session default, not this transaction
])
def test_set_tx_read_only(sql: str, read_only: bool, conservative: ReadWriteClassifier) -> None:
    facts = conservative.classify(sql)
    assert facts.set_tx_read_only is read_only
    assert not facts.write


def test_begin_then_set_transaction_keeps_both_facts(conservative: ReadWriteClassifier) -> None:
    assert conservative.classify("BEGIN; SET TRANSACTION READ ONLY; SELECT 1") == RW(
        False, begin="rw", set_tx_read_only=True, statements=3)


@pytest.mark.parametrize("sql,session", [
    ("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", True),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY", True),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE", False),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE", None),
    ("SET default_transaction_read_only = on", True),
    ("SET default_transaction_read_only TO true", True),
    ("SET default_transaction_read_only = 1", True),
    ("SET default_transaction_read_only = off", False),
    ("SET SESSION default_transaction_read_only = 'no'", False),
    ("SET default_transaction_read_only = maybe", None),  # Postgres will refuse it
    ("RESET default_transaction_read_only", False),
    ("SET default_transaction_read_only TO DEFAULT", False),
    ("SET LOCAL default_transaction_read_only = on", None),  # this transaction only
    ("RESET ALL", False),
    ("DISCARD ALL", False),
    ("DISCARD PLANS", None),
    ("SET default_transaction_read_only = on; SET default_transaction_read_only = off", False),
    ("SET default_transaction_read_only = on; SELECT 1", True),
    ("SELECT 1", None),
])
def test_session_read_only(sql: str, session: bool | None, conservative: ReadWriteClassifier) -> None:
    facts = conservative.classify(sql)
    assert facts.session_read_only is session
    assert not facts.write


# -- manual routing: SET pgherd.role and comments -----------------------------------------------


@pytest.mark.parametrize("sql,role", [
    ("SET pgherd.role TO 'replica'", "replica"),
    ("SET pgherd.role = 'primary'", "primary"),
    ("SET pgherd.role = replica", "replica"),
    ("SET pgherd.role TO auto", "auto"),
    ("SET pgdog.role TO 'replica'", "replica"),
    ("SET SESSION pgherd.role TO 'Replica'", "replica"),
    ("SET PGHERD.ROLE TO 'primary'", "primary"),
    ("RESET pgherd.role", "reset"),
    ("RESET pgdog.role", "reset"),
    ("SET pgherd.role TO DEFAULT", "reset"),
    ("RESET ALL", "reset"),
    ("DISCARD ALL", "reset"),
    ("SET pgherd.role TO 'bogus'", "bogus"),  # the caller refuses it
    ("SET pgherd.role TO 'replica', 'primary'", ""),  # two values: not a role
    ("SET pgherd.role TO 'replica'; SELECT 1", "replica"),
    ("SET pgherd.role TO 'replica'; RESET pgherd.role", "reset"),
    ("SET pgherd.shard TO 1", None),
    ("SET application_name = 'pgherd.role'", None),
    ("SELECT 1", None),
])
def test_set_role(sql: str, role: str | None, conservative: ReadWriteClassifier) -> None:
    facts = conservative.classify(sql)
    assert facts.set_role == role
    assert not facts.write


@pytest.mark.parametrize("sql,role,write", [
    ("/* pgherd_role: primary */ SELECT 1", "primary", False),
    ("SELECT 1 /* pgdog_role: replica */", "replica", False),
    ("/* pgherd_role: replica */ UPDATE t SET a = 1", "replica", True),  # the caller decides what to do
    ("/* pgherd_role: primary */ SELEC 1", "primary", True),
    ("-- pgherd_role: primary\nSELECT 1", None, False),
    ("SELECT '/* pgherd_role: primary */'", None, False),
    ("/* pgherd_role: leader */ SELECT 1", None, False),
])
def test_role_comment(sql: str, role: str | None, write: bool, conservative: ReadWriteClassifier) -> None:
    facts = conservative.classify(sql)
    assert (facts.role, facts.write) == (role, write)


# -- several statements ---------------------------------------------------------------------------


@pytest.mark.parametrize("sql,cons,aggr,count", [
    ("BEGIN; SELECT 1; COMMIT", False, False, 3),
    ("BEGIN; UPDATE t SET a = 1; COMMIT", True, True, 3),
    ("SELECT 1; SELECT 2", False, False, 2),
    ("SELECT 1; INSERT INTO t VALUES (1)", True, True, 2),
    ("SELECT 1; SELECT myfn()", True, False, 2),
    ("SELECT now(); SELECT count(*) FROM t", False, False, 2),
    ("SELECT now(); SELECT * FROM t FOR UPDATE", True, True, 2),
    ("SELECT lower(a) FROM t; SELECT nextval('s')", True, True, 2),
    ("EXPLAIN SELECT * FROM t FOR UPDATE; SELECT 1", False, False, 2),
    ("SELECT 1; EXPLAIN SELECT nextval('s')", False, False, 2),
    ("SET pgherd.role TO 'replica'; SELECT lower(a) FROM t", False, False, 2),
    ("SELECT 1;;", False, False, 1),
    ("SELECT 1; SELEC 2", True, True, 1),  # does not parse: count unknown
])
def test_several_statements(sql: str, cons: bool, aggr: bool, count: int, conservative: ReadWriteClassifier,
                            aggressive: ReadWriteClassifier) -> None:
    assert conservative.classify(sql).write is cons
    assert aggressive.classify(sql).write is aggr
    assert conservative.classify(sql).statements == count


def test_whole_results(conservative: ReadWriteClassifier) -> None:
    assert conservative.classify("SELECT 1") == RW(False)
    assert conservative.classify("") == RW(False, statements=0)
    assert conservative.classify("not sql at all") == RW(True)
    # PRIMARY is a reserved word: Postgres itself refuses this unquoted
    assert conservative.classify("SET pgherd.role = primary") == RW(True)
    assert conservative.classify("BEGIN READ ONLY") == RW(False, begin="ro")
    assert conservative.classify("COMMIT") == RW(False, tx_end=True)
    assert conservative.classify("/* pgdog_role: replica */ SELECT 1; SELECT 2") == RW(False, role="replica",
                                                                                        statements=2)


def test_strategy_is_checked() -> None:
    with pytest.raises(ValueError, match="conservative"):
        ReadWriteClassifier("optimistic")


def test_function_lists_do_not_overlap() -> None:
    assert not READ_ONLY_FUNCTIONS & WRITE_FUNCTIONS
    assert not [n for n in READ_ONLY_FUNCTIONS if n.startswith(rw_module.WRITE_PREFIXES)]
    assert all(n == n.lower() for n in READ_ONLY_FUNCTIONS | WRITE_FUNCTIONS)


# -- the cache ----------------------------------------------------------------------------------


def test_cache_hit_returns_the_cached_result() -> None:
    c = ReadWriteClassifier()
    first = c.classify("SELECT lower(a) FROM t WHERE id = $1")
    hits = c.cache.hits
    assert c.classify("SELECT lower(a) FROM t WHERE id = $1") is first
    assert c.cache.hits == hits + 1
    # results are shared between texts with the same facts
    assert c.classify("SELECT 2") is c.classify("SELECT 3")


def test_cache_is_bounded_by_bytes() -> None:
    limit = 20_000
    c = ReadWriteClassifier(cache_bytes=limit)
    for i in range(1000):
        assert c.classify(f"SELECT * FROM t WHERE id = {i}").write is False
    assert c.cache.bytes <= limit
    assert 0 < len(c.cache) < 1000
    assert c.cache.evictions > 0
    assert "SELECT * FROM t WHERE id = 999" in c.cache  # the most recent stay
    assert "SELECT * FROM t WHERE id = 0" not in c.cache


def test_giant_texts_are_not_cached() -> None:
    c = ReadWriteClassifier(cache_bytes=64 * 1024)  # one entry may take 1 KiB
    sql = "INSERT INTO t VALUES " + ", ".join(f"({i})" for i in range(1000))
    assert c.classify(sql).write is True
    assert sql not in c.cache and len(c.cache) == 0
    assert c.classify("SELECT 1").write is False
    assert "SELECT 1" in c.cache


def test_add_read_only_drops_only_results_that_depended_on_functions() -> None:
    c = ReadWriteClassifier("conservative")
    kept = ["SELECT 1", "UPDATE t SET a = myfn()", "SELECT lower(a) FROM t", "SELECT nextval('s')",
            "SELECT myfn() FROM t FOR UPDATE"]
    dropped = ["SELECT myfn(1)", "SELECT app.report(2)", "SELECT other(1)"]
    for sql in kept + dropped:
        c.classify(sql)
    assert c.classify("SELECT myfn(1)").write and c.classify("SELECT app.report(2)").write
    order = [k for k, _ in c.cache.items() if k in kept]
    c.add_read_only(["myfn", "app.report", "nextval"])
    assert [k for k, _ in c.cache.items()] == order  # the rest stay, in LRU order
    for sql in dropped:
        assert sql not in c.cache
    assert c.classify("SELECT myfn(1)").write is False
    assert c.classify("SELECT pg_catalog.myfn(1)").write is False
    assert c.classify("SELECT app.report(2)").write is False
    assert c.classify("SELECT report(2)").write is True  # another function than app.report
    assert c.classify("SELECT other.myfn(1)").write is True  # a qualified call needs its qualified name
    assert c.classify("SELECT other(1)").write is True
    assert c.classify("SELECT nextval('s')").write is True  # known writers stay writes
    assert c.classify("SELECT myfn() FROM t FOR UPDATE").write is True


def test_add_read_only_takes_a_single_name_and_ignores_known_ones() -> None:
    c = ReadWriteClassifier()
    assert c.classify('SELECT "Report"()').write is True
    c.add_read_only("Report")  # one name, exactly as in pg_proc
    assert c.classify('SELECT "Report"()').write is False
    assert c.classify("SELECT Report()").write is True  # unquoted: folded to report
    c.classify("SELECT myfn()")
    c.add_read_only(["Report"])  # nothing new: the cache is left alone
    assert "SELECT myfn()" in c.cache


def test_aggressive_ignores_unknown_functions_but_not_writers() -> None:
    c = ReadWriteClassifier("aggressive")
    assert c.classify("SELECT app.anything(1), myfn()").write is False
    assert c.classify("SELECT pg_advisory_xact_lock(1), myfn()").write is True
    c.add_read_only(["pg_advisory_xact_lock"])
    assert c.classify("SELECT pg_advisory_xact_lock(1), myfn()").write is True
