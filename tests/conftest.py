"""Shared test fixtures: the session PostgreSQL, disposable clusters, and running pgherd.

Fixtures:
  pg            session cluster with database `pgherd_test` and roles alice (SCRAM), bob (stored
                MD5), carol (cleartext `password` auth), all with full rights on pgherd_test.
  fresh_pg      a disposable cluster set up the same way, for tests that break things.
  cluster_dir   factory of fresh empty directories for extra clusters (replicas), removed after.
  pgherd        factory that starts the real `pgherd` command with a generated config.
  toml_dumps    the small TOML writer pgherd configs are written with.

Set PGHERD_TEST_DOCKER=1 to run `pg` in a testcontainers PostgresContainer instead (if a Docker
engine answers); `fresh_pg` always uses a local cluster.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from hypothesis import settings

from pgherd.shared.localpg import (
    PgCluster,
    free_port,
    pg_bin_dir,
    quote_ident,
    quote_literal,
    reap_orphans,
    remove_cluster_dir,
)

TEST_DB = "pgherd_test"
# name -> (password, how it is stored). carol's is checked by the `password` (cleartext) method.
ROLES = {
    "alice": ("alice-secret", "scram"),
    "bob": ("bob-secret", "md5"),
    "carol": ("carol-secret", "scram"),
}
# Goes before localpg's catch-all `host all all 127.0.0.1/32 md5`; the first matching line wins.
HBA_EXTRA = ["host all carol 127.0.0.1/32 password"]
ADMIN = {"name": "admin", "user": "admin", "password": "admin-secret"}

# Cluster directories live directly in the system temp dir, not under pytest's tmp_path: that is
# private to root (0700), and the server runs as `postgres`; the prefix lets a later run reap
# clusters left behind by a killed one.
CLUSTER_DIR_PREFIX = "pgherd-test-"
# pgherd starts in well under a second; 20 s leaves room for a loaded machine.
PGHERD_START_TIMEOUT = 20
PGHERD_STOP_TIMEOUT = 20
# How often to probe pgherd's port while waiting for it to listen.
PROBE_INTERVAL = 0.05
LOG_TAIL_LINES = 80


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes seconds (extra clusters, replication, restarts)")
    config.addinivalue_line("markers", "destructive: stops, crashes or reconfigures a PostgreSQL server")


# Property tests run next to Postgres clusters and pgherd processes on a small machine: a
# per-example deadline only measures the machine's load, never the code (hypothesis' default 200 ms
# failed an unchanged SCRAM test under load). Correctness is what they check; speed is scripts/bench's.
settings.register_profile("pgherd", deadline=None)
settings.load_profile("pgherd")


# ---------------------------------------------------------------------------------------------
# PostgreSQL


def _cluster_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix=CLUSTER_DIR_PREFIX))


def setup_test_roles(cluster: PgCluster) -> None:
    """Create the test database and the alice/bob/carol roles with full rights on it."""
    for name, (password, method) in ROLES.items():
        cluster.create_role(name, password, method=method)
    cluster.create_database(TEST_DB)
    for name in ROLES:
        cluster.grant_all(name, TEST_DB)


def new_test_cluster(base_dir: Path | None = None, **kwargs: Any) -> PgCluster:
    """A started local cluster with the test database and roles."""
    cluster = PgCluster.create(base_dir or _cluster_dir(), hba_extra=HBA_EXTRA, **kwargs)
    try:
        setup_test_roles(cluster)
    except BaseException:
        cluster.destroy()
        raise
    return cluster


@pytest.fixture(scope="session")
def pg() -> Iterator[Any]:
    """The session's PostgreSQL (a PgCluster, or a DockerPg with host/port/superuser/dsn/sql)."""
    if os.environ.get("PGHERD_TEST_DOCKER") == "1" and _docker_answers():
        yield from _docker_pg()
        return
    reap_orphans(Path(tempfile.gettempdir()).glob(CLUSTER_DIR_PREFIX + "*"))
    cluster = new_test_cluster()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def fresh_pg() -> Iterator[PgCluster]:
    """A disposable local cluster with the test database and roles, destroyed after the test."""
    cluster = new_test_cluster()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def cluster_dir() -> Iterator[Callable[[], Path]]:
    """Call it for a new empty directory to put a cluster in (e.g. add_replica); removed after,
    with any server still running in it."""
    made: list[Path] = []

    def make() -> Path:
        made.append(_cluster_dir())
        return made[-1]

    yield make
    for path in made:
        remove_cluster_dir(path)  # also stops a server a failed test left running there


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


class DockerPg:
    """The part of PgCluster's interface the tests need, for a testcontainers PostgresContainer."""

    superuser = "postgres"

    def __init__(self, container: Any) -> None:
        self.container = container
        self.host = container.get_container_host_ip()
        self.port = int(container.get_exposed_port(5432))
        self.password = container.password

    def dsn(self, dbname: str = "postgres", user: str = "postgres", password: str | None = None) -> str:
        if user == self.superuser and password is None:
            password = self.password
        auth = user + (f":{password}" if password is not None else "")
        return f"postgresql://{auth}@{self.host}:{self.port}/{dbname}"

    def sql(self, query: str, dbname: str = "postgres", user: str = "postgres") -> list[list[str]]:
        psql = shutil.which("psql") or str(pg_bin_dir() / "psql")
        password = self.password if user == self.superuser else ROLES[user][0]
        done = subprocess.run(
            [psql, "-X", "-q", "-A", "-t", "-F", "\x1f", "-R", "\x1e", "-v", "ON_ERROR_STOP=1",
             "-h", self.host, "-p", str(self.port), "-U", user, "-d", dbname, "-c", query],
            capture_output=True, text=True, timeout=60, env={**os.environ, "PGPASSWORD": password},
        )
        if done.returncode != 0:
            raise RuntimeError(f"psql -c {query!r} failed: {done.stderr.strip()}")
        out = done.stdout.removesuffix("\n")
        return [r.split("\x1f") for r in out.split("\x1e") if r] if out else []


def _docker_pg() -> Iterator[DockerPg]:
    try:
        from testcontainers.community.postgres import PostgresContainer
    except ImportError:
        from testcontainers.postgres import PostgresContainer

    # md5 host auth: SCRAM for SCRAM-stored roles, MD5 for bob (scram-sha-256 would reject him).
    container = PostgresContainer("postgres:16", username="postgres", password="postgres", dbname="postgres")
    container.with_env("POSTGRES_HOST_AUTH_METHOD", "md5")
    with container:
        rule = HBA_EXTRA[0].replace("127.0.0.1/32", "all")
        container.exec(["sh", "-c", f"sed -i '1i {rule}' \"$PGDATA/pg_hba.conf\""])
        db = DockerPg(container)
        db.sql("SELECT pg_reload_conf()")
        for name, (password, method) in ROLES.items():
            encryption = "md5" if method == "md5" else "scram-sha-256"
            db.sql(f"SET password_encryption = '{encryption}'; CREATE ROLE {quote_ident(name)} LOGIN PASSWORD {quote_literal(password)}")
        db.sql(f"CREATE DATABASE {TEST_DB}")
        for name in ROLES:
            db.sql(f"GRANT ALL ON DATABASE {TEST_DB} TO {name}")
            db.sql(f"GRANT ALL ON SCHEMA public TO {name}", dbname=TEST_DB)
            db.sql(f"ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON TABLES TO {name}", dbname=TEST_DB)
        yield db


# ---------------------------------------------------------------------------------------------
# TOML (pgherd.toml / users.toml). Enough of TOML for configs: strings, ints, floats, bools,
# arrays, tables and arrays of tables, nested. A None value leaves its key out.

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r", "\b": "\\b", "\f": "\\f"}


def _toml_str(s: str) -> str:
    out = []
    for ch in s:
        if ch in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _toml_str(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items() if v is not None)
        return "{ " + items + " }" if items else "{}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML: {value!r}")


def _is_table_array(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(v, dict) for v in value)


def _toml_table(lines: list[str], path: list[str], table: dict, array_item: bool) -> None:
    if path:
        name = ".".join(_toml_key(p) for p in path)
        lines.append("")
        lines.append(f"[[{name}]]" if array_item else f"[{name}]")
    # A table's own keys must come before any sub-table header.
    for key, value in table.items():
        if value is not None and not isinstance(value, dict) and not _is_table_array(value):
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, value in table.items():
        if isinstance(value, dict):
            _toml_table(lines, [*path, key], value, array_item=False)
        elif _is_table_array(value):
            for item in value:
                _toml_table(lines, [*path, key], item, array_item=True)


def toml_dumps(doc: dict) -> str:
    """Write a dict as TOML."""
    lines: list[str] = []
    _toml_table(lines, [], doc, array_item=False)
    return "\n".join(lines).lstrip("\n") + "\n"


@pytest.fixture(name="toml_dumps")
def toml_dumps_fixture() -> Callable[[dict], str]:
    return toml_dumps


# ---------------------------------------------------------------------------------------------
# pgherd


def pgherd_command() -> Path:
    """The `pgherd` console script installed beside the running Python."""
    return Path(sys.executable).parent / "pgherd"


class PgherdProcess:
    """A running `pgherd … run`, started by the `pgherd` fixture."""

    def __init__(
        self, *, workdir: Path, config: dict, users: dict, extra_toml: str = "", args: tuple[str, ...] = (),
    ) -> None:
        self.workdir = workdir
        self.config = config
        self.users = users
        self.extra_toml = extra_toml
        self.log_shown = False
        self.config_path = workdir / "pgherd.toml"
        self.users_path = workdir / "users.toml"
        self.log_path = workdir / "pgherd.log"
        general = config.get("general", {})
        self.host: str = general.get("host", "127.0.0.1")
        self.port: int = int(general.get("port", 6432))
        self.write_config()
        self.argv = [
            str(pgherd_command()), "-c", str(self.config_path), "-u", str(self.users_path), *args, "run",
        ]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=workdir,
                # Own process group: stop() can clean up workers even if the supervisor died.
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    def __repr__(self) -> str:
        return f"<pgherd pid {self.pid} on {self.host}:{self.port}>"

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        """None while running, else the exit code (negative: killed by that signal)."""
        return self.proc.poll()

    def write_config(self, config: dict | None = None, users: dict | None = None) -> None:
        """(Re)write pgherd.toml and users.toml; send SIGHUP afterwards to make pgherd reload."""
        if config is not None:
            self.config = config
        if users is not None:
            self.users = users
        extra = "\n" + self.extra_toml + "\n" if self.extra_toml else ""
        self.config_path.write_text(toml_dumps(self.config) + extra)
        self.users_path.write_text(toml_dumps(self.users))

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.log().splitlines()[-n:])

    def dsn(self, user: str = "alice", password: str | None = "alice-secret", dbname: str = TEST_DB) -> str:
        auth = user + (f":{password}" if password is not None else "")
        return f"postgresql://{auth}@{self.host}:{self.port}/{dbname}"

    def admin_dsn(self, user: str = ADMIN["user"], password: str = ADMIN["password"]) -> str:
        return self.dsn(user, password, ADMIN["name"])

    def signal(self, sig: int) -> None:
        """Send sig to the pgherd (supervisor) process."""
        self.proc.send_signal(sig)

    def wait(self, timeout: float = PGHERD_STOP_TIMEOUT) -> int:
        """Wait for exit; raises subprocess.TimeoutExpired."""
        return self.proc.wait(timeout)

    def wait_ready(self, timeout: float = PGHERD_START_TIMEOUT) -> None:
        """Wait until the port accepts TCP connections; pytest.fail if pgherd exits or times out."""
        deadline = time.monotonic() + timeout
        while True:
            if self.returncode is not None:
                self.fail(f"pgherd exited with code {self.returncode} before listening on {self.host}:{self.port}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.fail(f"pgherd did not listen on {self.host}:{self.port} within {timeout:g} s")
            time.sleep(PROBE_INTERVAL)

    def fail(self, message: str) -> None:
        """pytest.fail with the command line and the log tail."""
        self.log_shown = True  # the report hook need not repeat it
        pytest.fail(
            f"{message}\ncommand: {' '.join(self.argv)}\n--- {self.log_path} ---\n{self.log_tail()}", pytrace=False
        )

    def stop(self, timeout: float = PGHERD_STOP_TIMEOUT) -> int:
        """SIGTERM, wait up to timeout, SIGKILL if still there; return the exit code."""
        if self.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill_group()
                self.proc.wait()
        self._reap_group(grace=2.0)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL pgherd and everything it started."""
        self._kill_group()
        self.proc.wait()

    def _kill_group(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _reap_group(self, grace: float) -> None:
        """Give workers left in pgherd's process group grace seconds to exit, then kill them."""
        deadline = time.monotonic() + grace
        while _group_alive(self.proc.pid):
            if time.monotonic() > deadline:
                self._kill_group()
                return
            time.sleep(PROBE_INTERVAL)


def _group_alive(pgid: int) -> bool:
    """Whether process group pgid has a member that is not a zombie.

    (Orphaned workers are reparented to PID 1, which in containers may never reap them, and
    killpg(pgid, 0) counts zombies.)
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    if not os.path.isdir("/proc/self"):
        return True
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


_PGHERD_PROCESSES = pytest.StashKey[list]()


def default_pgherd_config(pg: Any, port: int) -> dict:
    return {
        "general": {"host": "127.0.0.1", "port": port, "workers": 1},
        "databases": [{"name": TEST_DB, "host": pg.host, "port": pg.port}],
        "admin": dict(ADMIN),
    }


def default_pgherd_users() -> dict:
    return {"users": [{"name": name, "password": pw, "database": TEST_DB} for name, (pw, _) in ROLES.items()]}


def _merged(default: dict, override: dict) -> dict:
    """default updated with override; an override value of None removes the key."""
    out = {**default, **override}
    return {k: v for k, v in out.items() if v is not None}


def _merged_list(default: list[dict], override: list | dict | None) -> list[dict]:
    """A list replaces the default entries; a dict updates each of them."""
    if override is None:
        return default
    if isinstance(override, dict):
        return [_merged(entry, override) for entry in default]
    return list(override)


@pytest.fixture
def pgherd(request: pytest.FixtureRequest, pg: Any, tmp_path: Path) -> Iterator[Callable[..., PgherdProcess]]:
    """Start the real `pgherd` command; stopped at teardown.

    pgherd(general=None, databases=None, users=None, admin=None, extra_toml="", args=(),
           expect_fail=False) -> PgherdProcess

    general/admin: dicts merged over the defaults ([general] host 127.0.0.1, a free port,
    workers 1; [admin] admin/admin-secret; admin=False leaves [admin] out). databases/users: a
    list replaces the default entries (pgherd_test on the session pg; alice, bob, carol), a dict
    updates each default entry. A None value removes a key. extra_toml is appended to
    pgherd.toml. args go before `run`. With expect_fail, wait for pgherd to exit (see
    .returncode and .log()) instead of for it to listen.
    """
    processes: list[PgherdProcess] = []
    request.node.stash[_PGHERD_PROCESSES] = processes
    numbers = itertools.count()

    def start(
        general: dict | None = None,
        databases: list | dict | None = None,
        users: list | dict | None = None,
        admin: dict | bool | None = None,
        extra_toml: str = "",
        args: tuple[str, ...] | list[str] = (),
        expect_fail: bool = False,
    ) -> PgherdProcess:
        if not pgherd_command().exists():
            pytest.fail(f"{pgherd_command()} not found: install pgherd into this Python (pip install -e '.[test]')")
        config = default_pgherd_config(pg, free_port())
        config["general"] = _merged(config["general"], general or {})
        config["databases"] = _merged_list(config["databases"], databases)
        if admin is False:
            del config["admin"]
        elif isinstance(admin, dict):
            config["admin"] = _merged(config["admin"], admin)
        user_doc = {"users": _merged_list(default_pgherd_users()["users"], users)}
        workdir = tmp_path / f"pgherd{next(numbers)}"
        workdir.mkdir()
        proc = PgherdProcess(workdir=workdir, config=config, users=user_doc, extra_toml=extra_toml, args=tuple(args))
        processes.append(proc)
        if expect_fail:
            try:
                proc.wait(PGHERD_START_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.fail(f"pgherd was expected to fail but still runs after {PGHERD_START_TIMEOUT} s")
        else:
            proc.wait_ready()
        return proc

    yield start
    for proc in processes:
        proc.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """When a test fails, show the log of every pgherd it started."""
    report = yield
    if report.failed:
        for proc in item.stash.get(_PGHERD_PROCESSES, []):
            if proc.log_shown:
                continue
            report.sections.append((f"pgherd log (pid {proc.pid}, {proc.log_path})", proc.log_tail()))
    return report
