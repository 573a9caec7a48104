"""Throwaway local PostgreSQL clusters for tests, the demo and benchmarks.

A `PgCluster` is one data directory under a base directory of its own, started with `pg_ctl` on
127.0.0.1 and a free port, tuned for speed rather than durability (the data is thrown away). SQL
runs through the `psql` binary from the same installation, so this module needs only the standard
library. PostgreSQL refuses to run as root: when we are root, every server-side binary runs as the
`postgres` account (or `nobody`), and the base directory is handed to that account.

    with PgCluster.create(Path("/tmp/x")) as pg:
        pg.create_role("alice", "secret")
        pg.sql("select 1")          # [['1']]
        replica = pg.add_replica(Path("/tmp/x-replica"))
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import pwd
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import time
import urllib.parse
import weakref
from pathlib import Path
from typing import Iterable, Mapping

__all__ = [
    "LocalPgError",
    "PgCluster",
    "free_port",
    "make_traversable",
    "pg_bin_dir",
    "pid_alive",
    "quote_ident",
    "quote_literal",
    "reap_orphans",
    "remove_cluster_dir",
]

HOST = "127.0.0.1"
SUPERUSER = "postgres"

# Settings every cluster gets. Durability is off because the data is thrown away and tests must not
# wait on fsync; wal_level, senders and slots are raised so replicas and logical decoding work;
# many connections and prepared transactions so pools and two-phase commit can be exercised.
DEFAULT_SETTINGS: dict[str, object] = {
    "listen_addresses": HOST,
    "fsync": False,
    "synchronous_commit": False,
    "full_page_writes": False,
    "wal_level": "logical",
    "max_prepared_transactions": 100,
    "max_connections": 300,
    "max_wal_senders": 10,
    "max_replication_slots": 10,
    "log_destination": "stderr",
    "logging_collector": False,
}

# Our settings live in their own file, included at the end of postgresql.conf, so they can be
# rewritten whole (a replica copies it and then gets its own port and socket directory).
SETTINGS_FILE = "pgherd.conf"
# Short, because a Unix socket path must fit in sockaddr_un.sun_path (108 bytes with the NUL).
SOCKET_DIR_NAME = "s"
SUN_PATH_MAX = 107
# The file in a base directory that names the process that owns the cluster (see reap_orphans).
OWNER_FILE = "owner.pid"

# initdb takes under a second here; generous so that loaded CI machines do not fail spuriously.
INITDB_TIMEOUT = 120
# pg_basebackup of a fresh cluster copies ~40 MB; a checkpoint=fast backup takes a second or two.
BASEBACKUP_TIMEOUT = 120
# A single psql call in tests is a few milliseconds; a minute means something is stuck.
SQL_TIMEOUT = 60
# How long a pg_ctl subprocess may run beyond the -t timeout it was given before we give up on it.
PG_CTL_GRACE = 15
# Poll the server for a state change (recovery, streaming, replay) at 20 Hz: cheap and responsive.
POLL_INTERVAL = 0.05
# A port picked with bind(0) may be taken by someone else before Postgres binds it: try again.
PORT_ATTEMPTS = 3
LOG_TAIL_LINES = 40


class LocalPgError(RuntimeError):
    """A step of starting, using or stopping a local cluster failed; the message says why."""


# ---------------------------------------------------------------------------------------------
# Finding binaries, ports and the account to run the server as.


def pg_bin_dir() -> Path:
    """The directory with initdb, pg_ctl, postgres, psql: $PGHERD_PG_BIN, else pgserver's."""
    env = os.environ.get("PGHERD_PG_BIN")
    if env:
        path = Path(env)
        if not (path / "pg_ctl").exists():
            raise LocalPgError(f"PGHERD_PG_BIN={env} has no pg_ctl: point it at PostgreSQL's bin directory")
        return path
    # find_spec locates the package without importing it (importing pgserver is slow).
    spec = importlib.util.find_spec("pgserver")
    if spec is not None:
        for location in spec.submodule_search_locations or ():
            path = Path(location) / "pginstall" / "bin"
            if (path / "pg_ctl").exists():
                return path
    raise LocalPgError(
        "PostgreSQL server binaries not found: install pgherd's `test` or `demo` extra "
        "(pip install -e '.[test]'), which brings the pgserver wheel, "
        "or set PGHERD_PG_BIN to a PostgreSQL bin directory (with initdb, pg_ctl, postgres, psql)"
    )


def free_port(host: str = HOST) -> int:
    """A TCP port on host that nobody listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class _Account:
    """The unprivileged account server-side binaries run as when we are root."""

    def __init__(self, name: str, uid: int, gid: int) -> None:
        self.name, self.uid, self.gid = name, uid, gid
        self.groups = os.getgrouplist(name, gid)

    def can_traverse(self, path: Path) -> bool:
        st = path.stat()
        if self.uid == 0:
            return True
        if st.st_uid == self.uid:
            return bool(st.st_mode & stat.S_IXUSR)
        if st.st_gid in self.groups:
            return bool(st.st_mode & stat.S_IXGRP)
        return bool(st.st_mode & stat.S_IXOTH)

    def first_untraversable(self, path: Path) -> Path | None:
        for p in reversed([path, *path.parents]):
            if not self.can_traverse(p):
                return p
        return None


def _server_account() -> _Account | None:
    """None when we are not root (the server runs as us), else `postgres`, else `nobody`."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            continue
        return _Account(name, pw.pw_uid, pw.pw_gid)
    raise LocalPgError(
        "running as root, and PostgreSQL refuses to run as root, but there is neither a `postgres` "
        "nor a `nobody` account to run it as: create one (useradd --system postgres) or run as "
        "an unprivileged user"
    )


def make_traversable(path: Path) -> list[Path]:
    """Add o+x to path and the directories above it that we own and the server account cannot enter.

    Only needed when we are root and path lies under a private directory (such as pytest's
    /tmp/pytest-of-root). Returns the directories changed.
    """
    account = _server_account()
    changed: list[Path] = []
    if account is None:
        return changed
    path = Path(path).resolve()
    for p in reversed([path, *path.parents]):
        if not p.exists():
            break
        if not account.can_traverse(p) and p.stat().st_uid == os.geteuid():
            p.chmod(p.stat().st_mode | stat.S_IXOTH)
            changed.append(p)
    return changed


# ---------------------------------------------------------------------------------------------
# Quoting.


def quote_ident(name: str) -> str:
    """An SQL identifier, double-quoted."""
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """An SQL string literal (standard_conforming_strings is on since PostgreSQL 9.1)."""
    return "'" + value.replace("'", "''") + "'"


def _conf_value(value: object) -> str:
    """A postgresql.conf value: on/off, a number, or a quoted string."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (int, float)):
        return str(value)
    return "'" + str(value).replace("\\", "\\\\").replace("'", "''") + "'"


def _child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Our environment without libpq's PG* variables, which would redirect psql and pg_ctl."""
    env = {k: v for k, v in os.environ.items() if not (k.startswith("PG") and not k.startswith("PGHERD"))}
    env["LC_ALL"] = "C"  # English server messages, which we search for ("Address already in use")
    env["PGCLIENTENCODING"] = "UTF8"
    if extra:
        env.update(extra)
    return env


def _text(data: object) -> str:
    if data is None:
        return ""
    if isinstance(data, bytes):
        return data.decode("utf-8", "replace")
    return str(data)


def _clip(text: str, limit: int = 4000) -> str:
    text = text.strip()
    return text if len(text) <= limit else "…" + text[-limit:]


# ---------------------------------------------------------------------------------------------
# Clusters.

# Clusters this process started, stopped at interpreter exit if nobody stopped them.
_live: "weakref.WeakSet[PgCluster]" = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:
    for cluster in list(_live):
        try:
            cluster.stop("immediate", timeout=10)
        except Exception:
            pass


class PgCluster:
    """One local PostgreSQL data directory and the server running on it."""

    host: str = HOST
    superuser: str = SUPERUSER

    def __init__(
        self,
        base_dir: Path,
        *,
        port: int | None = None,
        settings: Mapping[str, object] | None = None,
        hba_extra: Iterable[str] = (),
        bin_dir: Path | None = None,
    ) -> None:
        """Describe a cluster in base_dir/data; use `create` to make one."""
        self.base_dir = Path(base_dir).absolute()
        self.data_dir = self.base_dir / "data"
        self.log_path = self.base_dir / "postgres.log"
        self.bin_dir = Path(bin_dir) if bin_dir else pg_bin_dir()
        self._auto_port = port is None
        self.port = port if port is not None else free_port()
        self.settings = dict(settings or {})
        self.hba_extra = list(hba_extra)
        self.primary: PgCluster | None = None
        self._started = False
        self._account = _server_account()
        sock = self.base_dir / SOCKET_DIR_NAME
        self.socket_dir: Path | None = sock if len(f"{sock}/.s.PGSQL.65535.lock") <= SUN_PATH_MAX else None

    def __repr__(self) -> str:
        return f"<PgCluster {self.host}:{self.port} {self.data_dir}>"

    def __enter__(self) -> PgCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    # -- creation ------------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        base_dir: Path,
        *,
        port: int | None = None,
        settings: Mapping[str, object] | None = None,
        hba_extra: Iterable[str] = (),
        bin_dir: Path | None = None,
        start: bool = True,
        timeout: float = 30,
    ) -> PgCluster:
        """initdb into base_dir/data, configure it for throwaway use, and start it.

        settings override or extend DEFAULT_SETTINGS; hba_extra lines go into pg_hba.conf before
        the catch-all `host all all 127.0.0.1/32 md5` line.
        """
        cluster = cls(base_dir, port=port, settings=settings, hba_extra=hba_extra, bin_dir=bin_dir)
        cluster._prepare_base_dir()
        cluster._run(
            [
                cluster._bin("initdb"),
                "-D", str(cluster.data_dir),
                "-U", SUPERUSER,
                "--auth=trust",
                "--no-sync",
                "--encoding=UTF8",
                "--locale=C",
                "--no-instructions",
            ],
            server_side=True,
            timeout=INITDB_TIMEOUT,
            what="initdb",
        )
        cluster._write_hba()
        cluster._write_settings()
        if start:
            cluster.start(timeout=timeout)
        return cluster

    def _prepare_base_dir(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        if self.data_dir.exists():
            raise LocalPgError(f"{self.data_dir} already exists: give PgCluster.create an empty base_dir")
        account = self._account
        if account is not None:
            for path, above, role in (
                (self.base_dir, self.base_dir.parent, "base_dir"),
                (self.bin_dir, self.bin_dir, "the PostgreSQL bin directory"),
            ):
                blocked = account.first_untraversable(above.resolve())
                if blocked is not None:
                    raise LocalPgError(
                        f"{role} {path} is inside {blocked} (mode {stat.filemode(blocked.stat().st_mode)}), "
                        f"which the `{account.name}` account cannot enter; PostgreSQL runs as "
                        f"`{account.name}` because it refuses to run as root. Use a directory that "
                        f"account can reach (such as a new one directly in /tmp), or allow it with "
                        f"`chmod o+x {blocked}` (localpg.make_traversable does that)"
                    )
            os.chown(self.base_dir, account.uid, account.gid)
        (self.base_dir / OWNER_FILE).write_text(f"{os.getpid()} {_process_start(os.getpid())}\n")
        if self.socket_dir is not None:
            self.socket_dir.mkdir(exist_ok=True)
            self._give(self.socket_dir)

    def _give(self, path: Path) -> None:
        """Make path belong to the account the server runs as."""
        if self._account is not None:
            os.chown(path, self._account.uid, self._account.gid)

    def _write_hba(self) -> None:
        # First match wins. Unix socket and the superuser are trusted so tests and this module
        # never need passwords; everyone else must authenticate. `md5` means SCRAM for roles whose
        # stored password is a SCRAM verifier and MD5 for roles with an md5 hash.
        lines = [
            "# written by pgherd.shared.localpg",
            "local all all trust",
            f"host all {SUPERUSER} {HOST}/32 trust",
            f"host replication all {HOST}/32 trust",
            *self.hba_extra,
            f"host all all {HOST}/32 md5",
        ]
        path = self.data_dir / "pg_hba.conf"
        path.write_text("\n".join(lines) + "\n")
        self._give(path)

    def _write_settings(self) -> None:
        settings: dict[str, object] = {
            **DEFAULT_SETTINGS,
            "port": self.port,
            "unix_socket_directories": str(self.socket_dir) if self.socket_dir else "",
            **self.settings,
        }
        path = self.data_dir / SETTINGS_FILE
        path.write_text(
            "# written by pgherd.shared.localpg; included at the end of postgresql.conf\n"
            + "".join(f"{name} = {_conf_value(value)}\n" for name, value in settings.items())
        )
        self._give(path)
        main = self.data_dir / "postgresql.conf"
        include = f"include_if_exists = '{SETTINGS_FILE}'"
        if include not in main.read_text():
            with main.open("a") as f:
                f.write(f"\n{include}\n")

    # -- running commands ----------------------------------------------------------------------

    def _bin(self, name: str) -> str:
        return str(self.bin_dir / name)

    def _run(
        self,
        argv: list[str],
        *,
        server_side: bool = False,
        timeout: float,
        what: str,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
        check: bool = True,
        log_lines: int = LOG_TAIL_LINES,
    ) -> subprocess.CompletedProcess[str]:
        """Run one binary with a timeout; raise LocalPgError with the output and log on failure."""
        kwargs: dict[str, object] = {}
        child_env = _child_env(env)
        if server_side and self._account is not None:
            kwargs = {"user": self._account.uid, "group": self._account.gid, "extra_groups": self._account.groups}
            child_env["HOME"] = str(self.base_dir)
        try:
            done = subprocess.run(
                argv,
                input=input,
                capture_output=True,
                text=True,
                encoding="utf-8",
                errors="replace",
                timeout=timeout,
                env=child_env,
                cwd=str(self.base_dir) if self.base_dir.is_dir() else "/",
                **kwargs,
            )
        except subprocess.TimeoutExpired as e:
            raise self._error(f"{what} timed out after {timeout:g} s", argv, e.stdout, e.stderr, log_lines) from None
        except OSError as e:
            raise self._error(f"{what} could not run: {e}", argv, log_lines=log_lines) from None
        if check and done.returncode != 0:
            raise self._error(f"{what} failed (exit code {done.returncode})", argv, done.stdout, done.stderr, log_lines)
        return done

    def _error(
        self, what: str, argv: list[str] | None = None, out: object = None, err: object = None,
        log_lines: int = LOG_TAIL_LINES,
    ) -> LocalPgError:
        parts = [f"{what} [cluster {self.host}:{self.port}, {self.data_dir}]"]
        if argv:
            parts.append(f"command: {shlex.join(argv)}")
        output = _clip(_text(out) + "\n" + _text(err))
        if output:
            parts.append("output:\n" + output)
        parts.append(f"server log {self.log_path}, last lines:\n{self.log_tail(log_lines) or '(empty)'}")
        return LocalPgError("\n".join(parts))

    def _pg_ctl(self, args: list[str], timeout: float, what: str) -> subprocess.CompletedProcess[str]:
        return self._run(
            [self._bin("pg_ctl"), "-D", str(self.data_dir), *args],
            server_side=True,
            timeout=timeout + PG_CTL_GRACE,
            what=what,
        )

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, timeout: float = 30) -> None:
        """Start the server and wait until it accepts connections."""
        if self.is_running():
            return
        # A postmaster killed with SIGKILL leaves its lock files; if its pid lingers as an unreaped
        # zombie, the new postmaster would take the locks as held.
        (self.data_dir / "postmaster.pid").unlink(missing_ok=True)
        if self.socket_dir is not None:
            for stale in self.socket_dir.glob(".s.PGSQL.*"):
                stale.unlink(missing_ok=True)
        # Only before the first start may the port change: later, clients and replicas know it.
        attempts = PORT_ATTEMPTS if self._auto_port and not self._started else 1
        for attempt in range(attempts):
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            try:
                self._pg_ctl(
                    ["-l", str(self.log_path), "-w", "-t", str(int(timeout)), "start"], timeout, "pg_ctl start"
                )
                break
            except LocalPgError:
                new_log = self._log_since(log_offset)
                if "Address already in use" in new_log and attempt + 1 < attempts:
                    self.port = free_port()
                    self._write_settings()
                    continue
                raise
        self._started = True
        _live.add(self)

    def stop(self, mode: str = "fast", timeout: float = 30) -> None:
        """Stop the server: "smart" waits for clients, "fast" disconnects them, "immediate" crashes."""
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"stop mode must be smart, fast or immediate, not {mode!r}")
        if self.is_running():
            self._pg_ctl(["-m", mode, "-w", "-t", str(int(timeout)), "stop"], timeout, f"pg_ctl stop -m {mode}")
        _live.discard(self)

    def restart(self, mode: str = "fast", timeout: float = 30) -> None:
        """Stop (in mode) and start again on the same port."""
        self.stop(mode, timeout)
        self.start(timeout)

    def postmaster_pid(self) -> int | None:
        """The running postmaster's pid, or None."""
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def is_running(self) -> bool:
        return self.postmaster_pid() is not None

    def destroy(self) -> None:
        """Stop the server at once and remove base_dir."""
        try:
            self.stop("immediate", timeout=20)
        except LocalPgError:
            pid = self.postmaster_pid()
            if pid is not None:
                os.kill(pid, signal.SIGQUIT)  # what immediate shutdown sends
                _wait_gone(pid, 10)
        _live.discard(self)
        shutil.rmtree(self.base_dir, ignore_errors=True)

    # -- SQL -----------------------------------------------------------------------------------

    def dsn(self, dbname: str = "postgres", user: str = SUPERUSER, password: str | None = None) -> str:
        """A libpq URL for connecting over TCP."""
        q = lambda s: urllib.parse.quote(s, safe="")  # noqa: E731
        auth = q(user) + (":" + q(password) if password is not None else "")
        return f"postgresql://{auth}@{self.host}:{self.port}/{q(dbname)}"

    def _psql(self, dbname: str, user: str, password: str | None) -> tuple[list[str], dict[str, str]]:
        # Over the Unix socket every role is trusted (pg_hba `local all all trust`).
        host = str(self.socket_dir) if self.socket_dir is not None else self.host
        argv = [
            self._bin("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1",
            "-h", host, "-p", str(self.port), "-U", user, "-d", dbname,
        ]
        env = {"PGPASSWORD": password} if password is not None else {}
        env["PGCONNECT_TIMEOUT"] = "10"
        return argv, env

    def sql(
        self, query: str, dbname: str = "postgres", user: str = SUPERUSER, *, password: str | None = None,
        timeout: float = SQL_TIMEOUT,
    ) -> list[list[str]]:
        """Run one SQL command; return its rows as lists of text (NULL reads as '')."""
        argv, env = self._psql(dbname, user, password)
        # Unit and record separators cannot occur in ordinary text, unlike | and newline.
        argv += ["-A", "-t", "-F", "\x1f", "-R", "\x1e", "-c", query]
        done = self._run(argv, timeout=timeout, what=f"psql -c {query!r}", env=env, log_lines=10)
        out = done.stdout
        if out.endswith("\n"):
            out = out[:-1]
        return [record.split("\x1f") for record in out.split("\x1e") if record != ""] if out else []

    def execute(
        self, script: str, dbname: str = "postgres", user: str = SUPERUSER, *, password: str | None = None,
        timeout: float = SQL_TIMEOUT,
    ) -> str:
        """Run an SQL script (several statements, psql meta-commands allowed); return psql's output."""
        argv, env = self._psql(dbname, user, password)
        done = self._run(argv + ["-f", "-"], input=script, timeout=timeout, what="psql script", env=env, log_lines=10)
        return done.stdout

    def create_role(
        self, name: str, password: str | None, *, method: str = "scram", superuser: bool = False,
        replication: bool = False, login: bool = True,
    ) -> None:
        """CREATE ROLE with the password stored as a SCRAM verifier (method="scram") or an md5 hash."""
        encryption = {"scram": "scram-sha-256", "md5": "md5"}.get(method)
        if encryption is None:
            raise ValueError(f"method must be 'scram' or 'md5', not {method!r}")
        options = [
            "LOGIN" if login else "NOLOGIN",
            "SUPERUSER" if superuser else "NOSUPERUSER",
            "REPLICATION" if replication else "NOREPLICATION",
        ]
        if password is not None:
            options.append("PASSWORD " + quote_literal(password))
        # password_encryption decides how CREATE ROLE stores the password (md5 is deprecated in 16, but works).
        self.execute(
            f"SET password_encryption = {quote_literal(encryption)};\n"
            f"CREATE ROLE {quote_ident(name)} {' '.join(options)};\n"
        )

    def create_database(self, name: str, owner: str | None = None) -> None:
        """CREATE DATABASE name [OWNER owner]."""
        owner_sql = f" OWNER {quote_ident(owner)}" if owner else ""
        self.sql(f"CREATE DATABASE {quote_ident(name)}{owner_sql}")

    def grant_all(self, role: str, dbname: str) -> None:
        """Give role every right on dbname, its public schema, and the tables in it (now and later)."""
        r = quote_ident(role)
        self.execute(
            f"GRANT ALL ON DATABASE {quote_ident(dbname)} TO {r};\n"
            f"\\connect {quote_ident(dbname)}\n"
            f"GRANT ALL ON SCHEMA public TO {r};\n"
            f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {r};\n"
            f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {r};\n"
            f"ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON TABLES TO {r};\n"
            f"ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON SEQUENCES TO {r};\n"
        )

    def current_lsn(self) -> str:
        """The primary's current WAL insert position: everything committed so far is before it.

        (Not pg_current_wal_lsn(): with synchronous_commit off a commit record may be inserted but
        not yet written, and the write position would be behind it.)
        """
        return self.sql("SELECT pg_current_wal_insert_lsn()")[0][0]

    def in_recovery(self) -> bool:
        return self.sql("SELECT pg_is_in_recovery()")[0][0] == "t"

    # -- replication ---------------------------------------------------------------------------

    def add_replica(self, base_dir: Path, *, port: int | None = None, timeout: float = 60) -> PgCluster:
        """Clone this cluster with pg_basebackup, start it as a streaming hot standby, return it."""
        replica = type(self)(
            base_dir, port=port, settings=self.settings, hba_extra=self.hba_extra, bin_dir=self.bin_dir
        )
        replica.primary = self
        replica._prepare_base_dir()
        # --checkpoint=fast: otherwise the backup waits for a spread checkpoint (minutes).
        replica._run(
            [
                self._bin("pg_basebackup"),
                "-D", str(replica.data_dir),
                "-h", self.host, "-p", str(self.port), "-U", SUPERUSER,
                "-R", "-X", "stream", "--checkpoint=fast", "--no-sync",
            ],
            server_side=True,
            timeout=BASEBACKUP_TIMEOUT,
            what=f"pg_basebackup from {self.host}:{self.port}",
        )
        replica._write_settings()
        replica.start(timeout=timeout)
        replica._wait_until(
            "SELECT pg_is_in_recovery() AND EXISTS (SELECT 1 FROM pg_stat_wal_receiver WHERE status = 'streaming')",
            timeout,
            "the replica to stream from its primary",
        )
        return replica

    def wait_for_replay(self, lsn: str | None = None, timeout: float = 30) -> None:
        """On a replica: wait until it has replayed lsn (default: the primary's current position)."""
        if lsn is None:
            if self.primary is None:
                raise LocalPgError(f"{self!r} is not a replica made by add_replica: pass lsn")
            lsn = self.primary.current_lsn()
        self._wait_until(
            f"SELECT pg_last_wal_replay_lsn() >= {quote_literal(lsn)}::pg_lsn", timeout, f"replay up to {lsn}"
        )

    def promote(self, timeout: float = 30) -> None:
        """Turn this standby into a primary and wait until it accepts writes."""
        self._pg_ctl(["-w", "-t", str(int(timeout)), "promote"], timeout, "pg_ctl promote")
        self._wait_until("SELECT NOT pg_is_in_recovery()", timeout, "the promoted server to leave recovery")
        self.primary = None

    def _wait_until(self, query: str, timeout: float, what: str) -> None:
        """Poll a boolean query until it returns true."""
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            try:
                rows = self.sql(query, timeout=max(1.0, deadline - time.monotonic()))
                last = rows[0][0] if rows else "(no rows)"
                if last == "t":
                    return
            except LocalPgError as e:
                last = str(e).split("\n", 1)[0]
            if time.monotonic() >= deadline:
                raise self._error(f"timed out after {timeout:g} s waiting for {what} (last answer: {last})")
            time.sleep(POLL_INTERVAL)

    # -- logs ----------------------------------------------------------------------------------

    def log_tail(self, n: int = LOG_TAIL_LINES) -> str:
        """The last n lines of the server log."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - 256 * n))
                data = f.read()
        except OSError:
            return ""
        return "\n".join(data.decode("utf-8", "replace").splitlines()[-n:])

    def _log_since(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(offset)
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""


# ---------------------------------------------------------------------------------------------
# Clean-up of clusters whose owner died (a test run killed with SIGKILL leaves its servers up).


def _process_start(pid: int) -> str:
    """The start time of process pid (Linux /proc), to tell a live owner from a reused pid."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "?"
    return stat_line.rsplit(")", 1)[1].split()[19]


def pid_alive(pid: int) -> bool:
    """Whether process pid exists and is not a zombie.

    A server started by pg_ctl is reparented to PID 1 when pg_ctl exits; in containers PID 1 may
    never reap it, so after exit it lingers as a zombie that kill(pid, 0) still finds.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, and belongs to someone else
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc: trust kill()
    return state not in ("Z", "X")


def _owner_alive(base_dir: Path) -> bool:
    try:
        pid_text, started = (base_dir / OWNER_FILE).read_text().split()
        pid = int(pid_text)
    except (OSError, ValueError):
        return False
    if not pid_alive(pid):
        return False
    return started == "?" or _process_start(pid) == started


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(POLL_INTERVAL)


def reap_orphans(base_dirs: Iterable[Path]) -> list[Path]:
    """Stop the servers in, and remove, those base directories whose owning process has died.

    Directories without an owner file are left alone (they may be half-created by a live
    process). Returns the directories removed.
    """
    removed = []
    for base in base_dirs:
        base = Path(base)
        if not (base / OWNER_FILE).exists() or _owner_alive(base):
            continue
        remove_cluster_dir(base)
        removed.append(base)
    return removed


def remove_cluster_dir(base_dir: Path) -> None:
    """Stop at once any server running on base_dir/data (without pg_ctl), and remove base_dir.

    For clean-up when the PgCluster object is lost (a test failed half-way, its owner died).
    """
    data = Path(base_dir).absolute() / "data"
    try:
        pid = int((data / "postmaster.pid").read_text().split("\n", 1)[0])
        # Only a postmaster of this very data directory (the pid may have been reused).
        if pid_alive(pid) and str(data).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
            os.kill(pid, signal.SIGQUIT)  # what `pg_ctl stop -m immediate` sends
            _wait_gone(pid, 10)
    except (OSError, ValueError):
        pass
    shutil.rmtree(base_dir, ignore_errors=True)
