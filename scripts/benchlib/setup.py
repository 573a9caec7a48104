"""Setting up a run: a local Postgres with pgbench tables and two shards, PgBouncer and pgherd."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from pgherd.shared.localpg import PgCluster, free_port, pg_bin_dir, quote_literal

from .procs import BenchError, Service

HOST = "127.0.0.1"
USER = "bench"
PASSWORD = "bench-secret"
DBNAME = "bench"
SHARDED_DB = "sharded"  # the name clients use for the sharded database through pgherd
SHARD_DBS = ("shard_0", "shard_1")
SHARDED_TABLE = "bench_kv"

# A service that is not listening after this long is broken (pgherd starts in about a second).
START_TIMEOUT = 30
# pgbench -i at scale 10 takes about a second here; generous for slow disks.
INIT_TIMEOUT = 600
# apt-get may have to download the package lists first.
APT_TIMEOUT = 600
# Server connections besides the clients: the proxies' pools, psql checks, autovacuum.
SPARE_CONNECTIONS = 60
# pgherd drains transactions in flight at shutdown: none are in flight when we stop it.
PGHERD_SHUTDOWN_TIMEOUT_MS = 2000
# Clients wait for a server behind 500 others: far below this, but a stall must not end the run.
CHECKOUT_TIMEOUT_MS = 30_000


def say(message: str) -> None:
    print(message, flush=True)


def toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def server_account() -> str | None:
    """The unprivileged account PgBouncer runs as when we are root (it refuses to run as root)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise BenchError("running as root, but there is no `postgres` or `nobody` account to run PgBouncer as")


def chown_to(path: Path, account: str | None) -> None:
    if account is not None:
        pw = pwd.getpwnam(account)
        os.chown(path, pw.pw_uid, pw.pw_gid)


# ---------------------------------------------------------------------------------------------
# Binaries.


def find_pgbench(explicit: str | None) -> str:
    """pgbench 16 from the pgserver wheel (the Postgres we start), else one on PATH."""
    candidates = [explicit] if explicit else []
    try:
        candidates.append(str(pg_bin_dir() / "pgbench"))
    except Exception:
        pass
    candidates += [shutil.which("pgbench") or "", "/usr/lib/postgresql/16/bin/pgbench", "/usr/bin/pgbench"]
    for c in candidates:
        if c and Path(c).exists():
            return c
    raise BenchError("pgbench not found: install pgherd's test extra (pgserver) or Debian's postgresql-client")


def version_of(argv: list[str]) -> str | None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    out = (done.stdout or done.stderr).strip().splitlines()
    return out[0] if out else None


def find_pgbouncer(install: bool) -> tuple[str | None, str]:
    """The pgbouncer binary, installing Debian's package when it is missing and we may.

    Returns (path or None, what happened) so the report can say why PgBouncer is missing.
    """
    def which() -> str | None:
        return shutil.which("pgbouncer") or next(
            (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if Path(p).exists()), None)

    found = which()
    if found:
        return found, "found"
    if not install:
        return None, "pgbouncer is not installed (and --no-install was given)"
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        why = "apt-get is not available" if apt is None else "installing needs root"
        return None, f"pgbouncer is not installed and cannot be installed here ({why}): install it yourself"
    say("pgbouncer is not installed: installing Debian's package (apt-get install -y pgbouncer) …")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for step in ([apt, "install", "-y", "-q", "pgbouncer"], [apt, "update", "-q"], [apt, "install", "-y", "-q", "pgbouncer"]):
        try:
            done = subprocess.run(step, capture_output=True, text=True, timeout=APT_TIMEOUT, env=env)
        except subprocess.TimeoutExpired:
            return None, f"`{' '.join(step)}` timed out after {APT_TIMEOUT} s"
        if step[1] == "install" and done.returncode == 0:
            break
        if step[1] == "update" and done.returncode != 0:
            return None, f"apt-get update failed: {done.stderr.strip()[-300:]}"
    found = which()
    if found:
        say(f"installed pgbouncer ({found})")
        # Debian's package starts a system pgbouncer on 6432; ours use their own ports, so leave it.
        return found, "installed with apt-get"
    return None, f"apt-get install pgbouncer failed: {done.stderr.strip()[-300:]}"


# ---------------------------------------------------------------------------------------------
# Postgres.


def start_postgres(base: Path, *, max_connections: int) -> PgCluster:
    say(f"starting PostgreSQL (max_connections={max_connections}) …")
    return PgCluster.create(base, settings={"max_connections": max_connections, "shared_buffers": "256MB"})


def init_pgbench(cluster: PgCluster, *, scale: int, pgbench: str) -> None:
    """The bench role and database, and pgbench's tables in it."""
    cluster.create_role(USER, PASSWORD)  # stored as a SCRAM verifier: every target logs in with SCRAM
    cluster.create_database(DBNAME, owner=USER)
    say(f"pgbench -i -s {scale} …")
    done = run_client(
        [pgbench, "-i", "-s", str(scale), "-q", "-h", cluster.host, "-p", str(cluster.port), "-U", USER, DBNAME],
        timeout=INIT_TIMEOUT, what="pgbench -i",
    )
    if done.returncode != 0:
        raise BenchError(f"pgbench -i failed (exit {done.returncode}):\n{done.stderr.strip()[-2000:]}")


def client_env() -> dict[str, str]:
    """libpq settings every client of the bench uses: our password, no TLS, bounded connects."""
    env = {k: v for k, v in os.environ.items() if not (k.startswith("PG") and not k.startswith("PGHERD"))}
    env.update(PGPASSWORD=PASSWORD, PGSSLMODE="disable", PGCONNECT_TIMEOUT="30", LC_ALL="C")
    return env


def run_client(argv: list[str], *, timeout: float, what: str, input: str | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=client_env(), input=input)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{what} timed out after {timeout:g} s") from None


def scram_verifier(cluster: PgCluster) -> str:
    return cluster.sql(f"SELECT rolpassword FROM pg_authid WHERE rolname = {quote_literal(USER)}")[0][0]


def create_shards(cluster: PgCluster, rows: int) -> None:
    """Two shard databases holding bench_kv(id, v) split exactly as PARTITION BY HASH (id) with 2 parts.

    pgherd's hash sharding is defined to match Postgres's hash partitioning, so Postgres itself
    decides which rows each shard holds: satisfies_hash_partition() against a partitioned parent.
    """
    say(f"creating 2 shards of {SHARDED_TABLE} ({rows} rows) …")
    for index, db in enumerate(SHARD_DBS):
        cluster.create_database(db, owner=USER)
        cluster.execute(
            "CREATE TABLE bench_kv_hash (id bigint) PARTITION BY HASH (id);\n"
            f"CREATE TABLE {SHARDED_TABLE} (id bigint PRIMARY KEY, v integer NOT NULL, pad text NOT NULL);\n"
            f"INSERT INTO {SHARDED_TABLE}\n"
            "  SELECT g, (hashint8(g) & 1048575)::int, repeat('x', 40) FROM generate_series(1, " + str(rows) + ") g\n"
            f"  WHERE satisfies_hash_partition('bench_kv_hash'::regclass, {len(SHARD_DBS)}, {index}, g::bigint);\n"
            f"CREATE INDEX ON {SHARDED_TABLE} (v);\n"
            "DROP TABLE bench_kv_hash;\n"
            f"VACUUM ANALYZE {SHARDED_TABLE};\n",
            dbname=db, user=USER, timeout=300,
        )


# ---------------------------------------------------------------------------------------------
# Targets.


@dataclass
class Target:
    """Something pgbench connects to: a proxy (with the process tree we measure) or Postgres itself."""

    key: str  # pgherd-1w, pgherd-percore, pgbouncer, direct, shard0-direct, …
    label: str  # for tables and charts
    kind: str  # pgherd | pgbouncer | direct
    port: int
    dbname: str
    service: Service | None = None
    workers: int | None = None  # requested pgherd workers
    workers_running: int | None = None  # pgherd worker processes seen after the warm-up
    notes: list[str] = field(default_factory=list)

    @property
    def root(self) -> psutil.Process | None:
        return self.service.ps if self.service is not None else None

    def describe(self) -> dict:
        return {
            "key": self.key, "label": self.label, "kind": self.kind, "port": self.port, "dbname": self.dbname,
            "workers_requested": self.workers, "workers_running": self.workers_running, "notes": self.notes,
            "command": self.service.argv if self.service else None,
        }


def pgherd_command() -> str:
    command = Path(sys.executable).parent / "pgherd"
    if not command.exists():
        raise BenchError(f"{command} not found: install pgherd into this Python (scripts/bench does)")
    return str(command)


def write_pgherd_config(
    workdir: Path, name: str, *, port: int, workers: int, pool_size: int, cluster: PgCluster,
    auth_type: str = "scram", sharded: bool = False,
) -> tuple[Path, Path]:
    """pgherd.toml and users.toml (PgDog's format) for one pgherd instance of the bench."""
    config = workdir / f"{name}.toml"
    users = workdir / f"{name}-users.toml"
    lines = [
        f"# pgherd for the bench: {name}",
        "[general]",
        f"host = {toml_str(HOST)}",
        f"port = {port}",
        f"workers = {workers}",
        f"default_pool_size = {pool_size}",
        'pooler_mode = "transaction"',
        f"auth_type = {toml_str(auth_type)}",
        f"checkout_timeout = {CHECKOUT_TIMEOUT_MS}",
        f"shutdown_timeout = {PGHERD_SHUTDOWN_TIMEOUT_MS}",
        'log_level = "warning"',
        "",
    ]
    if sharded:
        for shard, db in enumerate(SHARD_DBS):
            lines += [
                "[[databases]]", f"name = {toml_str(SHARDED_DB)}", f"host = {toml_str(cluster.host)}",
                f"port = {cluster.port}", f"database_name = {toml_str(db)}", f"shard = {shard}", "",
            ]
        lines += [
            "[[sharded_tables]]", f"database = {toml_str(SHARDED_DB)}", f"name = {toml_str(SHARDED_TABLE)}",
            'column = "id"', 'data_type = "bigint"', "",
        ]
        database = SHARDED_DB
    else:
        lines += ["[[databases]]", f"name = {toml_str(DBNAME)}", f"host = {toml_str(cluster.host)}",
                  f"port = {cluster.port}", ""]
        database = DBNAME
    config.write_text("\n".join(lines))
    users.write_text(
        "[[users]]\n"
        f"name = {toml_str(USER)}\n"
        f"password = {toml_str(PASSWORD)}\n"
        f"database = {toml_str(database)}\n"
    )
    return config, users


def start_pgherd(
    workdir: Path, logdir: Path, key: str, label: str, *, workers: int, pool_size: int, cluster: PgCluster,
    nofile: int, auth_type: str = "scram", sharded: bool = False,
) -> Target:
    port = free_port()
    config, users = write_pgherd_config(workdir, key, port=port, workers=workers, pool_size=pool_size,
                                        cluster=cluster, auth_type=auth_type, sharded=sharded)
    # `ulimit -n` in the launch, as a systemd unit's LimitNOFILE would: 500 or 10,000 clients need
    # more descriptors than a login shell's default 1024. exec: the measured root is pgherd itself.
    argv = ["bash", "-c", f'ulimit -n {nofile} && exec "$0" "$@"', pgherd_command(),
            "-c", str(config), "-u", str(users), "run"]
    service = Service(key, argv, logdir / f"{key}.log", env={**os.environ, "PYTHONUNBUFFERED": "1"})
    say(f"starting {label} on {HOST}:{port} …")
    service.start()
    target = Target(key, label, "pgherd", port, SHARDED_DB if sharded else DBNAME, service, workers)
    try:
        service.wait_listening(HOST, port, START_TIMEOUT)
    except BaseException:  # not listening, or Ctrl-C while we waited: do not leave it running
        service.stop()
        raise
    return target


def start_pgbouncer(
    workdir: Path, logdir: Path, key: str, label: str, *, binary: str, pool_size: int, cluster: PgCluster,
    max_clients: int, auth_type: str = "scram-sha-256", dbname: str = DBNAME, plain_password: bool = False,
) -> Target:
    """PgBouncer in transaction mode with the same pool size, run as an unprivileged account.

    Its auth_file holds the role's SCRAM verifier from pg_authid, so it authenticates clients
    with SCRAM and logs in to Postgres with the client's proof (PgBouncer >= 1.14), as pgherd
    and a direct connection do: no target pays for PBKDF2 on the server side per login.
    With auth_type "trust" clients send no proof, so plain_password puts the password itself there
    for PgBouncer's own login to Postgres.
    """
    account = server_account()
    port = free_port()
    pgb_dir = workdir / key
    pgb_dir.mkdir(exist_ok=True)
    userlist = pgb_dir / "userlist.txt"
    secret = PASSWORD if plain_password else scram_verifier(cluster)
    userlist.write_text(f'"{USER}" "{secret}"\n')
    ini = pgb_dir / "pgbouncer.ini"
    ini.write_text(
        "[databases]\n"
        f"{dbname} = host={cluster.host} port={cluster.port} dbname={dbname}\n"
        "\n[pgbouncer]\n"
        f"listen_addr = {HOST}\n"
        f"listen_port = {port}\n"
        "unix_socket_dir =\n"
        f"auth_type = {auth_type}\n"
        f"auth_file = {userlist}\n"
        "pool_mode = transaction\n"
        f"default_pool_size = {pool_size}\n"
        "min_pool_size = 0\n"
        "reserve_pool_size = 0\n"
        f"max_client_conn = {max_clients}\n"
        f"query_wait_timeout = {CHECKOUT_TIMEOUT_MS // 1000}\n"
        "ignore_startup_parameters = extra_float_digits,options\n"
        "log_connections = 0\n"
        "log_disconnections = 0\n"
        "stats_period = 60\n"
    )
    for path in (pgb_dir, userlist, ini):
        chown_to(path, account)
    service = Service(key, [binary, str(ini)], logdir / f"{key}.log", user=account)
    say(f"starting {label} on {HOST}:{port}" + (f" as {account}" if account else "") + " …")
    service.start()
    target = Target(key, label, "pgbouncer", port, dbname, service)
    try:
        service.wait_listening(HOST, port, START_TIMEOUT)
    except BaseException:  # not listening, or Ctrl-C while we waited: do not leave it running
        service.stop()
        raise
    return target
