"""Fixtures and helpers for the integration tests of pgherd's first slice.

tests/conftest.py (one level up) owns the PostgreSQL clusters and the per-test `pgherd`
factory. This file adds:

  pgherd_module   like `pgherd`, but module-scoped: one pgherd process shared by a module's
                  tests (starting one per test would make the suite slow).
  helpers         this module, for the helper functions below (the test modules are imported
                  with --import-mode=importlib and cannot import each other).
  pg_admin        a superuser psycopg connection straight to the session Postgres.

The helpers measure pgherd's effect on Postgres itself: which backends belong to a given pgherd
process (matched by the TCP ports of pgherd's sockets to Postgres, so direct test connections
never count), their state, and their pids.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import psutil
import psycopg
import pytest

from pgherd.shared.localpg import free_port
from pgherd.shared.wire import messages as M

TEST_DB = "pgherd_test"
PASSWORDS = {"alice": "alice-secret", "bob": "bob-secret", "carol": "carol-secret"}
# A client login or a short query through pgherd on this machine takes milliseconds.
CONNECT_TIMEOUT = 10
# Raw-socket reads: long enough for a loaded machine, short enough to catch a hang.
RECV_TIMEOUT = 5.0


# ---------------------------------------------------------------------------------------------
# Access to tests/conftest.py (PgherdProcess and the default config), loaded by pytest.


def _base_conftest(config: pytest.Config) -> Any:
    base = (Path(__file__).parent.parent / "conftest.py").resolve()
    for plugin in config.pluginmanager.get_plugins():
        path = getattr(plugin, "__file__", None)
        if path and Path(path).resolve() == base:
            return plugin
    raise RuntimeError(f"{base} is not loaded as a pytest plugin")


def _merged(default: dict, override: dict | None) -> dict:
    out = {**default, **(override or {})}
    return {k: v for k, v in out.items() if v is not None}


def _merged_list(default: list[dict], override: list | dict | None) -> list[dict]:
    if override is None:
        return default
    if isinstance(override, dict):
        return [_merged(entry, override) for entry in default]
    return list(override)


# Module-scoped pgherd processes by module node id, to show their logs when a test fails.
_MODULE_PROCESSES: dict[str, list[Any]] = {}


@pytest.fixture(scope="module")
def pgherd_module(request: pytest.FixtureRequest, pg: Any, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[Callable[..., Any]]:
    """Module-scoped factory with the same arguments as the `pgherd` fixture (minus expect_fail).

    pgherd_module(general=None, databases=None, users=None, admin=None, extra_toml="", args=())
    """
    base = _base_conftest(request.config)
    processes: list[Any] = []
    _MODULE_PROCESSES[request.node.nodeid] = processes
    counter = iter(range(1000))

    def start(general: dict | None = None, databases: list | dict | None = None,
              users: list | dict | None = None, admin: dict | bool | None = None,
              extra_toml: str = "", args: tuple[str, ...] | list[str] = ()) -> Any:
        config = base.default_pgherd_config(pg, free_port())
        config["general"] = _merged(config["general"], general)
        config["databases"] = _merged_list(config["databases"], databases)
        if admin is False:
            config.pop("admin", None)
        elif isinstance(admin, dict):
            config["admin"] = _merged(config.get("admin", {}), admin)
        user_doc = {"users": _merged_list(base.default_pgherd_users()["users"], users)}
        workdir = tmp_path_factory.mktemp(f"pgherd-mod{next(counter)}")
        proc = base.PgherdProcess(workdir=workdir, config=config, users=user_doc,
                                  extra_toml=extra_toml, args=tuple(args))
        processes.append(proc)
        proc.wait_ready()
        return proc

    yield start
    for proc in processes:
        proc.stop()
    _MODULE_PROCESSES.pop(request.node.nodeid, None)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """When a test fails, also show the logs of the module-scoped pgherd processes."""
    report = yield
    if report.failed:
        module = item.getparent(pytest.Module)
        for proc in _MODULE_PROCESSES.get(module.nodeid if module else "", []):
            report.sections.append((f"module pgherd log (pid {proc.pid}, {proc.log_path})", proc.log_tail()))
    return report


@pytest.fixture(scope="session")
def helpers() -> Any:
    return sys.modules[__name__]


@pytest.fixture
def pg_admin(pg: Any) -> Iterator[psycopg.Connection]:
    """Superuser connection straight to Postgres (database pgherd_test), autocommit."""
    with psycopg.connect(pg.dsn(TEST_DB), autocommit=True, connect_timeout=CONNECT_TIMEOUT) as conn:
        yield conn


# ---------------------------------------------------------------------------------------------
# Clients


def connect(dsn: str, autocommit: bool = True, **kwargs: Any) -> psycopg.Connection:
    """psycopg connection. Automatic server-side prepared statements are off by default
    (prepare_threshold=None), as for PgBouncer in transaction mode: psycopg names them _pg3_0,
    _pg3_1, ... per connection, so two clients sharing a server would collide. (Handling named
    prepared statements across servers is a later pgherd feature.)"""
    kwargs.setdefault("prepare_threshold", None)
    return psycopg.connect(dsn, autocommit=autocommit, connect_timeout=CONNECT_TIMEOUT, **kwargs)


def login_sqlstate(dsn: str) -> str | None:
    """SQLSTATE of a failed login (psycopg has none for connection errors; asyncpg does).

    Fails the test if the login succeeds.
    """
    import asyncio

    import asyncpg

    async def attempt() -> str | None:
        try:
            conn = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT, statement_cache_size=0)
        except asyncpg.PostgresError as exc:
            return exc.sqlstate
        await conn.close()
        pytest.fail(f"login to {dsn} succeeded")

    return asyncio.run(attempt())


def direct_dsn(pg: Any, user: str = "alice") -> str:
    return pg.dsn(TEST_DB, user, PASSWORDS[user])


def backend_pid(conn: psycopg.Connection) -> int:
    return conn.execute("select pg_backend_pid()").fetchone()[0]


# ---------------------------------------------------------------------------------------------
# pgherd's server connections, seen from both ends


def pgherd_server_ports(proc: Any, pg: Any) -> set[int]:
    """Local TCP ports of pgherd's (and its workers') established connections to Postgres."""
    ports: set[int] = set()
    try:
        root = psutil.Process(proc.pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return ports
    for p in procs:
        try:
            conns = p.net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for c in conns:
            if c.raddr and c.raddr.port == pg.port and c.status == psutil.CONN_ESTABLISHED:
                ports.add(c.laddr.port)
    return ports


def server_backends(admin: psycopg.Connection, proc: Any, pg: Any, user: str | None = None) -> list[dict]:
    """Rows of pg_stat_activity for the backends serving pgherd `proc` (optionally one user)."""
    ports = sorted(pgherd_server_ports(proc, pg))
    if not ports:
        return []
    cur = admin.execute(
        "select pid, usename, datname, state, application_name, backend_xid is not null as has_xid"
        " from pg_stat_activity where client_port = any(%s) and backend_type = 'client backend'"
        " and (%s::text is null or usename = %s::text)",
        (ports, user, user),
    )
    cols = [d.name for d in cur.description]
    return [dict(zip(cols, row)) for row in cur.fetchall()]


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = "condition") -> Any:
    """Poll predicate until it returns something truthy; return it, or fail after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what} (last value: {value!r})")
        time.sleep(interval)


def assert_serving(proc: Any, user: str = "alice") -> None:
    """pgherd still runs and a normal client can log in and query."""
    assert proc.returncode is None, f"pgherd exited with code {proc.returncode}:\n{proc.log_tail()}"
    with connect(proc.dsn(user, PASSWORDS[user])) as conn:
        assert conn.execute("select 40 + 2").fetchone() == (42,)


# ---------------------------------------------------------------------------------------------
# Raw protocol client (for bad input)


class RawClient:
    """A bare TCP connection to pgherd that speaks the protocol by hand."""

    def __init__(self, proc: Any, timeout: float = RECV_TIMEOUT) -> None:
        self.sock = socket.create_connection((proc.host, proc.port), timeout=timeout)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _recv_more(self) -> bool:
        """Read more bytes; False on EOF (or a reset, which also means pgherd closed)."""
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            return False
        if not chunk:
            return False
        self.buf += chunk
        return True

    def recv_exact(self, n: int) -> bytes | None:
        while len(self.buf) < n:
            if not self._recv_more():
                return None
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_message(self) -> tuple[str, bytes] | None:
        """One backend message (type char, body), or None at EOF. socket.timeout on a hang."""
        head = self.recv_exact(5)
        if head is None:
            return None
        t, length = struct.unpack("!cI", head)
        body = self.recv_exact(length - 4)
        if body is None:
            return None
        return t.decode(), body

    def read_until(self, types: str) -> list[tuple[str, bytes]]:
        """Messages up to and including the first of one of `types`; fails on EOF before it."""
        out = []
        while True:
            msg = self.read_message()
            if msg is None:
                raise AssertionError(f"connection closed before any of {types!r}; got {out!r}")
            out.append(msg)
            if msg[0] in types:
                return out

    def startup(self, user: str = "alice", database: str = TEST_DB, **params: str) -> list[tuple[str, bytes]]:
        """StartupMessage and login (trust auth) up to ReadyForQuery."""
        self.send(M.startup_message({"user": user, "database": database, **params}))
        msgs = self.read_until("ZE")
        assert msgs[-1][0] == "Z", f"login failed: {error_fields(msgs[-1][1]) if msgs[-1][0] == 'E' else msgs}"
        return msgs

    def query(self, sql: str) -> list[tuple[str, bytes]]:
        self.send(M.query(sql))
        return self.read_until("Z")

    def expect_error_then_close(self) -> dict[str, str]:
        """The next message is an ErrorResponse, then the socket closes; return the error's fields."""
        msgs = []
        while True:
            msg = self.read_message()
            assert msg is not None, f"pgherd closed without an ErrorResponse (got {msgs!r})"
            if msg[0] == "E":
                break
            assert msg[0] in "NS", f"unexpected message before the error: {msg!r}"
            msgs.append(msg)
        fields = error_fields(msg[1])
        self.expect_closed()
        return fields

    def expect_closed(self) -> None:
        """The socket reaches EOF (pgherd closed it) within the receive timeout."""
        while True:
            try:
                more = self._recv_more()
            except socket.timeout:
                raise AssertionError(f"pgherd did not close the connection within {self.sock.gettimeout()} s")
            if not more:
                return


def error_fields(body: bytes) -> dict[str, str]:
    return M.read_error_fields(body)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
