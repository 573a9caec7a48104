"""Real clients through pgherd (transaction pooling): psql, psycopg 3 and asyncpg.

The strongest check is a comparison: the same statements through pgherd and straight to
Postgres must give the same rows, column types, command tags, errors and notices.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from decimal import Decimal

import asyncpg
import psycopg
import pytest
from psycopg import errors as pgerr

from pgherd.shared.localpg import pg_bin_dir

pytestmark = pytest.mark.timeout(60)

TEST_DB = "pgherd_test"


@pytest.fixture(scope="module")
def proc(pgherd_module):
    """One pgherd for the module: transaction pooling, a few servers."""
    return pgherd_module(general={"default_pool_size": 4})


@pytest.fixture(scope="module")
def proc1(pgherd_module):
    """pgherd with one server per pool: asyncpg's prepared statements stay on one server."""
    return pgherd_module(general={"default_pool_size": 1})


@pytest.fixture
def via(proc, helpers):
    """psycopg connection to pgherd as alice (autocommit)."""
    with helpers.connect(proc.dsn()) as conn:
        yield conn


@pytest.fixture
def direct(pg, helpers):
    """psycopg connection straight to Postgres as alice (autocommit)."""
    with helpers.connect(helpers.direct_dsn(pg)) as conn:
        yield conn


@pytest.fixture
def table(pg, helpers, request):
    """A fresh table owned by alice: (id int primary key, t text, n numeric); dropped after."""
    name = "t_" + request.node.name.replace("[", "_").replace("]", "").replace("-", "_")[:50]
    with helpers.connect(helpers.direct_dsn(pg)) as conn:
        conn.execute(f"drop table if exists {name}")
        conn.execute(f"create table {name} (id int primary key, t text, n numeric)")
    yield name
    with helpers.connect(helpers.direct_dsn(pg)) as conn:
        conn.execute(f"drop table if exists {name}")


def _bin(name: str) -> str:
    system = shutil.which(name)
    return system or str(pg_bin_dir() / name)


# ---------------------------------------------------------------------------------------------
# psql


def run_psql(host: str, port: int, *args: str, user: str = "alice", password: str = "alice-secret",
             stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PGPASSWORD": password, "PGCONNECT_TIMEOUT": "10"}
    env.pop("PGAPPNAME", None)
    return subprocess.run(
        [_bin("psql"), "-X", "-v", "ON_ERROR_STOP=1", "-h", host, "-p", str(port), "-U", user,
         "-d", TEST_DB, *args],
        capture_output=True, text=True, timeout=30, env=env, input=stdin,
    )


def test_psql_command_matches_direct(proc, pg):
    sql = ("select n, n * n as square, repeat('ab', n) as s, n % 2 = 0 as even, null::int as nothing "
           "from generate_series(1, 7) n; select current_user, current_database()")
    through = run_psql(proc.host, proc.port, "-c", sql)
    straight = run_psql(pg.host, pg.port, "-c", sql)
    assert through.returncode == 0, through.stderr
    assert straight.returncode == 0, straight.stderr
    assert through.stdout == straight.stdout
    assert "(7 rows)" in through.stdout and "alice" in through.stdout


def test_psql_script_matches_direct(proc, pg, tmp_path):
    script = tmp_path / "script.sql"
    script.write_text(
        "begin;\n"
        "create table psql_script_t (id int primary key, v text);\n"
        "insert into psql_script_t select g, md5(g::text) from generate_series(1, 50) g;\n"
        "select count(*), min(v), max(v) from psql_script_t;\n"
        "update psql_script_t set v = 'x' where id <= 10;\n"
        "select id, v from psql_script_t where id between 8 and 12 order by id;\n"
        "\\echo between statements\n"
        "savepoint s1;\n"
        "delete from psql_script_t where id > 25;\n"
        "rollback to savepoint s1;\n"
        "select count(*) from psql_script_t;\n"
        "rollback;\n"
        "select count(*) as left_behind from pg_class where relname = 'psql_script_t';\n"
        "show client_encoding;\n"
    )
    through = run_psql(proc.host, proc.port, "-f", str(script))
    straight = run_psql(pg.host, pg.port, "-f", str(script))
    assert through.returncode == 0, through.stderr
    assert straight.returncode == 0, straight.stderr
    assert through.stdout == straight.stdout
    # Command tags made it through too.
    for tag in ("BEGIN", "CREATE TABLE", "INSERT 0 50", "UPDATE 10", "SAVEPOINT", "DELETE 25", "ROLLBACK"):
        assert tag in through.stdout


def test_psql_error_matches_direct(proc, pg):
    sql = "select 1; select 1/0; select 3"
    through = run_psql(proc.host, proc.port, "-c", sql)
    straight = run_psql(pg.host, pg.port, "-c", sql)
    assert through.returncode == straight.returncode != 0
    assert through.stderr == straight.stderr
    assert "division by zero" in through.stderr
    assert through.stdout == straight.stdout


def test_psql_stdin_copy_roundtrip(proc, pg, table):
    """psql's \\copy (COPY FROM STDIN / TO STDOUT) through pgherd."""
    data = "".join(f"{i}\trow {i}\t{i}.5\n" for i in range(1, 201))
    done = run_psql(proc.host, proc.port, "-c", f"\\copy {table} from stdin", stdin=data)
    assert done.returncode == 0, done.stderr
    assert "COPY 200" in done.stdout
    through = run_psql(proc.host, proc.port, "-c", f"\\copy (select * from {table} order by id) to stdout")
    straight = run_psql(pg.host, pg.port, "-c", f"\\copy (select * from {table} order by id) to stdout")
    assert through.returncode == 0, through.stderr
    assert through.stdout == straight.stdout == data


# ---------------------------------------------------------------------------------------------
# psycopg 3


TYPED_QUERY = """
select 1::int2 as i2, 2::int4 as i4, 3::int8 as i8, 1.5::numeric(10, 2) as num, 2.5::float4 as f4,
       3.25::float8 as f8, 'text'::text as t, 'vc'::varchar(10) as vc, 'c'::char(3) as ch, true as b,
       date '2024-02-29' as d, timestamp '2024-01-02 03:04:05.678' as ts,
       timestamptz '2024-01-02 03:04:05+02' as tstz, interval '1 day 2 hours' as iv,
       '{"a": [1, 2]}'::json as js, '{"b": null}'::jsonb as jsb,
       'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid as u, '\\xdeadbeef'::bytea as by,
       array[1, 2, 3] as arr, array['x', null] as tarr, '10.1.2.3/8'::inet as ip,
       null::text as nul, 'Infinity'::numeric as inf, int4range(1, 10) as r, 'x'::name as nm,
       '12:34:56'::time as tm, '{1:2}'::text as brace, 'é€😀'::text as uni
"""


def test_autocommit_query_matches_direct(via, direct):
    rows = via.execute(TYPED_QUERY).fetchall()
    assert rows == direct.execute(TYPED_QUERY).fetchall()
    assert rows[0][0] == 1 and rows[0][-1] == "é€😀"


def test_column_types_match_direct(via, direct):
    for binary in (False, True):
        c1 = via.cursor(binary=binary)
        c2 = direct.cursor(binary=binary)
        c1.execute(TYPED_QUERY)
        c2.execute(TYPED_QUERY)
        d1 = [(d.name, d.type_code, d.internal_size, d.precision, d.scale) for d in c1.description]
        d2 = [(d.name, d.type_code, d.internal_size, d.precision, d.scale) for d in c2.description]
        assert d1 == d2
        assert c1.fetchall() == c2.fetchall()
        assert c1.statusmessage == c2.statusmessage == "SELECT 1"
    # A few well-known OIDs, so the comparison is not vacuous.
    codes = dict((d[0], d[1]) for d in d1)
    assert codes["i4"] == 23 and codes["t"] == 25 and codes["jsb"] == 3802 and codes["u"] == 2950


def test_transactions_commit_and_rollback(proc, helpers, direct, table):
    with helpers.connect(proc.dsn(), autocommit=False) as conn:
        conn.execute(f"insert into {table} values (1, 'committed', 1)")
        # Read-your-writes inside the transaction, on whichever server it runs.
        assert conn.execute(f"select count(*) from {table}").fetchone() == (1,)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        conn.commit()
        conn.execute(f"insert into {table} values (2, 'rolled back', 2)")
        conn.rollback()
        with conn.transaction():
            conn.execute(f"insert into {table} values (3, 'block', 3)")
            with conn.transaction():  # savepoint
                conn.execute(f"insert into {table} values (4, 'savepoint', 4)")
        with pytest.raises(ZeroDivisionError):
            with conn.transaction():
                conn.execute(f"insert into {table} values (5, 'undone', 5)")
                raise ZeroDivisionError
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    rows = direct.execute(f"select id, t from {table} order by id").fetchall()
    assert rows == [(1, "committed"), (3, "block"), (4, "savepoint")]


def test_transaction_sees_its_own_temp_state(proc, helpers):
    """Statements of one transaction run on one server: a temp table lives until COMMIT."""
    with helpers.connect(proc.dsn(), autocommit=False) as conn:
        for round_ in range(3):
            conn.execute("create temp table scratch (a int) on commit drop")
            conn.execute("insert into scratch select generate_series(1, %s)", (round_ + 5,))
            pid1 = helpers.backend_pid(conn)
            assert conn.execute("select sum(a) from scratch").fetchone() == (sum(range(1, round_ + 6)),)
            assert helpers.backend_pid(conn) == pid1
            conn.commit()


def test_pipeline_matches_direct(via, direct, table):
    def run(conn: psycopg.Connection) -> list:
        conn.execute(f"delete from {table}")
        with conn.pipeline() as p:
            c1 = conn.execute("select 1, 'one'")
            c2 = conn.execute("select %s::int + %s::int", (20, 22))
            p.sync()
            c3 = conn.execute(f"insert into {table} values (%s, %s, %s) returning id, t", (7, "seven", Decimal("7.7")))
            c4 = conn.cursor()
            c4.executemany(f"insert into {table} values (%s, %s, %s)", [(i, f"r{i}", i) for i in range(10, 20)])
            c5 = conn.execute(f"select count(*), sum(n) from {table}")
            c6 = conn.execute("select generate_series(1, 1000)")
        return [c1.fetchall(), c2.fetchall(), c3.fetchall(), c5.fetchall(), c6.fetchall(), c6.statusmessage]

    result = run(via)
    assert result == run(direct)
    assert result[1] == [(42,)] and result[3] == [(11, Decimal("152.7"))]


def pipeline_with_error(conn: psycopg.Connection, table: str) -> list:
    """Events of a pipeline with an error in the middle, then more work on the same connection.

    (Each failing batch is its own `with conn.pipeline()`: where inside a batch psycopg raises
    the error depends on timing, and its exit syncs the pipeline either way.)
    """
    events: list = []
    conn.execute(f"delete from {table}")
    with conn.pipeline():
        c1 = conn.execute("select 1")
        c1b = conn.execute(f"insert into {table} values (1, 'before', 1)")
    events.append(("c1", c1.fetchall(), c1b.statusmessage))
    try:
        with conn.pipeline():
            conn.execute(f"insert into {table} values (2, 'same batch', 2)")
            conn.execute("select 1 / 0")
            conn.execute(f"insert into {table} values (3, 'after error', 3)")
    except psycopg.Error as exc:
        events.append(("error", type(exc).__name__, exc.sqlstate))
    with conn.pipeline():
        c4 = conn.execute("select 4")
        c5 = conn.execute(f"insert into {table} values (5, 'next batch', 5)")
    events.append(("c4", c4.fetchall(), c5.statusmessage))
    events.append(("after", conn.execute("select 'after pipeline'").fetchall()))
    events.append(("rows", conn.execute(f"select id, t from {table} order by id").fetchall()))
    return events


def test_pipeline_error_in_the_middle_matches_direct(via, direct, table):
    through = pipeline_with_error(via, table)
    straight = pipeline_with_error(direct, table)
    assert through == straight
    assert ("error", "DivisionByZero", "22012") in through
    assert through[-1] == ("rows", [(1, "before"), (5, "next batch")])


def test_pipeline_in_transaction_with_error(proc, helpers, direct, table):
    with helpers.connect(proc.dsn(), autocommit=False) as conn:
        with pytest.raises(pgerr.UniqueViolation):
            with conn.pipeline():
                conn.execute(f"insert into {table} values (1, 'a', 1)")
                conn.execute(f"insert into {table} values (1, 'dup', 1)")
                conn.execute("select 2")
        conn.rollback()
        with conn.pipeline():
            conn.execute(f"insert into {table} values (2, 'b', 2)")
            cur = conn.execute(f"select count(*) from {table}")
        assert cur.fetchone() == (1,)
        conn.commit()
    assert direct.execute(f"select id from {table}").fetchall() == [(2,)]


COPY_ROWS = [
    (1, "plain", Decimal("1.5")),
    (2, "tab\there", Decimal("-2")),
    (3, "new\nline and back\\slash", None),
    (4, None, Decimal("4e10")),
    (5, "unicode é€😀 and \"quotes\" 'and' commas,", Decimal("0.000001")),
    *[(i, f"bulk row {i} " + "x" * (i % 50), Decimal(i) / 7) for i in range(6, 5001)],
]


def test_copy_from_stdin(via, direct, table):
    with via.cursor() as cur:
        with cur.copy(f"copy {table} (id, t, n) from stdin") as copy:
            for row in COPY_ROWS:
                copy.write_row(row)
        assert cur.rowcount == len(COPY_ROWS)
        assert cur.statusmessage == f"COPY {len(COPY_ROWS)}"
    rows = direct.execute(f"select id, t, n from {table} order by id").fetchall()
    assert len(rows) == len(COPY_ROWS)
    assert rows[:5] == [(i, t, n if n is None else Decimal(n)) for i, t, n in COPY_ROWS[:5]]
    assert rows == via.execute(f"select id, t, n from {table} order by id").fetchall()


def test_copy_from_stdin_binary_and_error(via, direct, table):
    with via.cursor() as cur:
        with cur.copy(f"copy {table} (id, t) from stdin (format binary)") as copy:
            copy.set_types(["int4", "text"])
            for i in range(1, 101):
                copy.write_row((i, f"bin{i}"))
    # Bad data: the server's error arrives during COPY; the connection stays usable.
    with pytest.raises(pgerr.InvalidTextRepresentation) as info:
        with via.cursor().copy(f"copy {table} (id, t) from stdin") as copy:
            copy.write(b"1000\tok\nnot-a-number\tbad\n")
    assert info.value.sqlstate == "22P02"
    assert via.execute(f"select count(*), max(t) from {table}").fetchone() == (100, "bin99")
    assert direct.execute(f"select count(*) from {table}").fetchone() == (100,)


def copy_out(conn: psycopg.Connection, sql: str) -> bytes:
    out = bytearray()
    with conn.cursor().copy(sql) as copy:
        for chunk in copy:
            out += chunk
    return bytes(out)


def test_copy_to_stdout_matches_direct(via, direct, table):
    with direct.cursor() as cur:
        with cur.copy(f"copy {table} (id, t, n) from stdin") as copy:
            for row in COPY_ROWS:
                copy.write_row(row)
    for sql in (
        f"copy {table} to stdout",
        f"copy (select * from {table} order by id) to stdout with (format csv, header)",
        f"copy (select * from {table} order by id) to stdout (format binary)",
        "copy (select g, repeat('y', g % 300) from generate_series(1, 20000) g) to stdout",
    ):
        through = copy_out(via, sql)
        assert through == copy_out(direct, sql), sql
        assert len(through) > 1000
    # Rows parsed by psycopg, too.
    with via.cursor().copy(f"copy (select id, t from {table} order by id limit 5) to stdout") as copy:
        copy.set_types(["int4", "text"])
        assert list(copy.rows()) == [(i, t) for i, t, _ in COPY_ROWS[:5]]


ERROR_CASES = [
    ("select 1 / 0", pgerr.DivisionByZero, "22012"),
    ("select * from no_such_table_here", pgerr.UndefinedTable, "42P01"),
    ("selec 1", pgerr.SyntaxError, "42601"),
    ("select 'abc'::int", pgerr.InvalidTextRepresentation, "22P02"),
    ("select repeat('x', 10) from generate_series(1, 3) g where g / (g - 2) > 0", pgerr.DivisionByZero, "22012"),
]


@pytest.mark.parametrize("sql, exc_type, sqlstate", ERROR_CASES)
def test_server_errors_match_direct(via, direct, sql, exc_type, sqlstate):
    with pytest.raises(exc_type) as through:
        via.execute(sql)
    with pytest.raises(exc_type) as straight:
        direct.execute(sql)
    assert through.value.sqlstate == straight.value.sqlstate == sqlstate
    d1, d2 = through.value.diag, straight.value.diag
    assert (d1.severity, d1.message_primary, d1.statement_position) == (d2.severity, d2.message_primary,
                                                                         d2.statement_position)
    # The connection is still usable, with no transaction left open.
    assert via.execute("select 'still here'").fetchone() == ("still here",)
    assert via.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_unique_violation_and_failed_transaction(proc, helpers, direct, table):
    direct.execute(f"insert into {table} values (1, 'first', 1)")
    with helpers.connect(proc.dsn()) as conn:
        with pytest.raises(pgerr.UniqueViolation) as info:
            conn.execute(f"insert into {table} values (1, 'again', 1)")
        assert info.value.sqlstate == "23505"
        assert info.value.diag.constraint_name == f"{table}_pkey"
        assert info.value.diag.table_name == table
        # Inside a transaction: the error aborts it until ROLLBACK.
        conn.execute("begin")
        with pytest.raises(pgerr.UniqueViolation):
            conn.execute(f"insert into {table} values (1, 'again', 1)")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        with pytest.raises(pgerr.InFailedSqlTransaction) as info:
            conn.execute("select 1")
        assert info.value.sqlstate == "25P02"
        conn.execute("rollback")
        assert conn.execute(f"select count(*) from {table}").fetchone() == (1,)
        conn.execute(f"insert into {table} values (2, 'fine', 2)")
    assert direct.execute(f"select id from {table} order by id").fetchall() == [(1,), (2,)]


NOTICE_SQL = """
do $$
begin
  raise notice 'hello %', 42;
  raise warning 'careful: %', 'this is a warning' using hint = 'a hint', errcode = '01000';
  raise notice 'third';
end $$
"""


def collect_notices(conn: psycopg.Connection) -> list:
    notices: list = []
    conn.add_notice_handler(lambda d: notices.append((d.severity, d.sqlstate, d.message_primary, d.message_hint)))
    conn.execute(NOTICE_SQL)
    conn.execute("select 1")  # notices belong to the statement that raised them only
    return notices


def test_notices_match_direct(via, direct):
    through = collect_notices(via)
    assert through == collect_notices(direct)
    assert through == [("NOTICE", "00000", "hello 42", None),
                       ("WARNING", "01000", "careful: this is a warning", "a hint"),
                       ("NOTICE", "00000", "third", None)]


def multi_statement(conn: psycopg.Connection) -> list:
    out: list = []
    cur = conn.cursor()
    cur.execute("select 1 as a; select 'two' as b, 2.0 as c; select generate_series(1, 3)")
    while True:
        out.append((cur.statusmessage, [d.name for d in cur.description], cur.fetchall()))
        if not cur.nextset():
            break
    try:
        cur.execute("select 10; select 1 / 0; select 30")
    except psycopg.Error as exc:
        out.append(("error", exc.sqlstate))
    cur.execute("create temp table multi_t (a int); insert into multi_t values (1), (2); "
                "select sum(a) from multi_t; drop table multi_t")
    sets = []
    while True:
        sets.append((cur.statusmessage, cur.fetchall() if cur.description else None))
        if not cur.nextset():
            break
    out.append(sets)
    cur.execute("-- only a comment")
    out.append(("empty", cur.pgresult.status if cur.pgresult else None))
    out.append(("after", conn.execute("select 'ok'").fetchone()))
    return out


def test_multi_statement_simple_query_matches_direct(via, direct):
    through = multi_statement(via)
    assert through == multi_statement(direct)
    assert through[0] == ("SELECT 1", ["a"], [(1,)])
    assert ("error", "22012") in through
    assert through[-2][1] is not None


def test_large_results_match_direct(via, direct):
    sql = "select g, md5(g::text), g::numeric / 3 from generate_series(1, 100000) g"
    rows = via.execute(sql).fetchall()
    assert len(rows) == 100000
    assert rows == direct.execute(sql).fetchall()
    big = "select repeat('0123456789abcdef', 5 * 65536) || 'end' as big, 1 as after"
    value = via.execute(big).fetchone()
    assert len(value[0]) == 5 * 1024 * 1024 + 3 and value[0].endswith("end") and value[1] == 1
    assert value == direct.execute(big).fetchone()
    # Binary format too.
    cur = via.cursor(binary=True)
    assert cur.execute(big).fetchone() == value


def test_large_parameter_roundtrip(via, direct, table):
    """A 5 MB parameter (one large Bind message) streams from client to server intact."""
    text = ("pgherd-" * 800_000)[:5 * 1024 * 1024]
    via.execute(f"insert into {table} (id, t) values (%s, %s)", (1, text))
    via.execute(f"insert into {table} (id, t) values (%s, %s)", (2, text[::-1]))
    assert direct.execute(f"select t from {table} where id = 1").fetchone() == (text,)
    assert direct.execute(f"select md5(t) from {table} where id = 2").fetchone() == \
        via.execute("select md5(%s)", (text[::-1],)).fetchone()
    assert via.execute(f"select length(t) from {table} order by id").fetchall() == [(len(text),)] * 2


def test_parameter_status_at_login(via, direct):
    for name in ("server_version", "client_encoding", "TimeZone", "DateStyle", "integer_datetimes",
                 "standard_conforming_strings", "server_encoding"):
        assert via.info.parameter_status(name) is not None, name
    assert via.info.parameter_status("server_version") == direct.info.parameter_status("server_version")
    assert via.info.parameter_status("client_encoding") == "UTF8"
    assert via.info.server_version == direct.info.server_version
    # SET reports a new ParameterStatus, relayed to the client.
    via.execute("set timezone to 'Asia/Tokyo'")
    assert via.info.parameter_status("TimeZone") == "Asia/Tokyo"
    via.execute("reset timezone")


def test_many_sequential_connections(proc, helpers):
    """Connect, query, disconnect in a loop: nothing leaks, every login works."""
    for i in range(30):
        with helpers.connect(proc.dsn()) as conn:
            assert conn.execute("select %s::int", (i,)).fetchone() == (i,)


# ---------------------------------------------------------------------------------------------
# asyncpg (asyncio; pytest runs with trio_mode, so each test runs its own event loop)


def arun(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


ASYNCPG_QUERY = ("select g as i, g::text || 'x' as t, g * 1.5 as num, g % 2 = 0 as even, "
                 "array[g, g + 1] as arr, null::text as nothing, '{\"k\": 1}'::jsonb as js "
                 "from generate_series(1, 500) g")


def test_asyncpg_fetch_matches_direct(proc1, pg, helpers):
    async def fetch(dsn: str) -> list:
        conn = await asyncpg.connect(dsn, statement_cache_size=0)
        try:
            rows = await conn.fetch(ASYNCPG_QUERY)
            val = await conn.fetchval("select $1::int + $2::int", 40, 2)
            row = await conn.fetchrow("select current_user, current_database()")
            return [[tuple(r) for r in rows], [list(r.keys()) for r in rows[:1]], val, tuple(row)]
        finally:
            await conn.close()

    through = arun(fetch(proc1.dsn()))
    assert through == arun(fetch(helpers.direct_dsn(pg)))
    assert len(through[0]) == 500 and through[2] == 42 and through[3] == ("alice", TEST_DB)


def test_asyncpg_prepared_statements_in_transaction(proc1):
    async def main() -> list:
        conn = await asyncpg.connect(proc1.dsn())
        try:
            out = []
            async with conn.transaction():
                stmt = await conn.prepare("select $1::int * 2 as doubled, $2::text as label")
                for i in range(5):
                    out.append(tuple(await stmt.fetchrow(i, f"n{i}")))
                out.append([a.name for a in stmt.get_attributes()])
            # With one server in the pool, a statement prepared outside a transaction survives.
            stmt2 = await conn.prepare("select $1::int + 1")
            out.append([await stmt2.fetchval(i) for i in range(3)])
            # And the default statement cache works across calls.
            out.append([await conn.fetchval("select $1::int * 10", i) for i in range(4)])
            return out
        finally:
            await conn.close()

    out = arun(main())
    assert out[:5] == [(2 * i, f"n{i}") for i in range(5)]
    assert out[5] == ["doubled", "label"]
    assert out[6] == [1, 2, 3] and out[7] == [0, 10, 20, 30]


def test_asyncpg_executemany_and_transactions(proc1, pg, helpers, table):
    async def main() -> None:
        conn = await asyncpg.connect(proc1.dsn(), statement_cache_size=0)
        try:
            await conn.executemany(f"insert into {table} (id, t, n) values ($1, $2, $3)",
                                   [(i, f"row{i}", Decimal(i) / 4) for i in range(1, 301)])
            async with conn.transaction():
                await conn.execute(f"update {table} set t = 'updated' where id <= 10")
                try:
                    async with conn.transaction():  # savepoint, rolled back
                        await conn.execute(f"delete from {table}")
                        raise RuntimeError("undo the savepoint")
                except RuntimeError:
                    pass
            try:
                async with conn.transaction():
                    await conn.execute(f"insert into {table} (id, t) values (1000, 'gone')")
                    await conn.execute("select 1 / 0")
            except asyncpg.DivisionByZeroError as exc:
                assert exc.sqlstate == "22012"
            else:
                raise AssertionError("expected division by zero")
            with_err = None
            try:
                await conn.execute(f"insert into {table} (id) values (1)")
            except asyncpg.UniqueViolationError as exc:
                with_err = exc.sqlstate
            assert with_err == "23505"
            assert await conn.fetchval("select 'usable'") == "usable"
            await conn.copy_records_to_table(table, records=[(2000 + i, f"copied{i}", None) for i in range(50)],
                                             columns=["id", "t", "n"])
        finally:
            await conn.close()

    arun(main())
    with helpers.connect(helpers.direct_dsn(pg)) as conn:
        assert conn.execute(f"select count(*), sum(n) from {table} where id <= 300").fetchone() == \
            (300, sum(Decimal(i) / 4 for i in range(1, 301)))
        assert conn.execute(f"select count(*) from {table} where t = 'updated'").fetchone() == (10,)
        assert conn.execute(f"select count(*) from {table} where id = 1000").fetchone() == (0,)
        assert conn.execute(f"select count(*) from {table} where id >= 2000").fetchone() == (50,)
