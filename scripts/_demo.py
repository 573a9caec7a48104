"""The demo: a throwaway PostgreSQL with a `demo` database, and pgherd in front of it.

Run through scripts/demo. Starts a local cluster in a temporary directory, creates role demo/demo
and a small `accounts` table, starts `pgherd` on 127.0.0.1:6432 (or the next free port), prints how
to connect, and waits; Ctrl-C or SIGTERM stops everything and removes the directory.
--check runs one query through pgherd with psql and exits 0 (it worked) or 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pgherd.shared.localpg import LocalPgError, PgCluster, free_port, make_traversable

HOST = "127.0.0.1"
DEFAULT_PORT = 6432  # PgBouncer's and PgDog's port
PORT_SEARCH = 100  # if 6432 is taken, try the next ports up to 6531
DB = USER = PASSWORD = "demo"
ADMIN_PASSWORD = "admin"
ACCOUNTS = 10
# pgherd starts in about a second; a loaded machine may need more.
START_TIMEOUT = 20
STOP_TIMEOUT = 10
QUERY = "SELECT count(*), sum(balance) FROM accounts"


class Stop(Exception):
    """Ctrl-C or SIGTERM."""


def say(message: str) -> None:
    print(message, flush=True)


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def pick_port(preferred: int) -> int:
    for port in range(preferred, preferred + PORT_SEARCH):
        if port_is_free(port):
            return port
    return free_port()


def toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def write_configs(workdir: Path, port: int, cluster: PgCluster) -> tuple[Path, Path]:
    config = workdir / "pgherd.toml"
    users = workdir / "users.toml"
    config.write_text(
        "# pgherd demo configuration (PgDog's format)\n"
        "[general]\n"
        f"host = {toml_str(HOST)}\n"
        f"port = {port}\n"
        "\n[[databases]]\n"
        f"name = {toml_str(DB)}\n"
        f"host = {toml_str(cluster.host)}\n"
        f"port = {cluster.port}\n"
        "\n[admin]\n"
        'name = "admin"\n'
        'user = "admin"\n'
        f"password = {toml_str(ADMIN_PASSWORD)}\n"
    )
    users.write_text(
        "[[users]]\n"
        f"name = {toml_str(USER)}\n"
        f"password = {toml_str(PASSWORD)}\n"
        f"database = {toml_str(DB)}\n"
    )
    return config, users


def start_postgres(base: Path) -> PgCluster:
    say("starting PostgreSQL …")
    cluster = PgCluster.create(base)
    cluster.create_role(USER, PASSWORD)
    cluster.create_database(DB, owner=USER)
    rows = ",\n".join(f"({i}, 'account {i}', {i * 100}.00)" for i in range(1, ACCOUNTS + 1))
    cluster.execute(
        "CREATE TABLE accounts (id bigint PRIMARY KEY, name text NOT NULL, balance numeric NOT NULL);\n"
        f"INSERT INTO accounts VALUES\n{rows};\n",
        dbname=DB,
        user=USER,
    )
    return cluster


def start_pgherd(workdir: Path, config: Path, users: Path) -> tuple[subprocess.Popen, Path]:
    command = Path(sys.executable).parent / "pgherd"
    if not command.exists():
        raise SystemExit(f"{command} not found: install pgherd into this Python (scripts/demo does)")
    log_path = workdir / "pgherd.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [str(command), "-c", str(config), "-u", str(users), "run"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Own session: Ctrl-C reaches only us, and we stop pgherd in order.
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    return proc, log_path


def wait_listening(proc: subprocess.Popen, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def stop_pgherd(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            say(f"pgherd did not stop within {STOP_TIMEOUT} s: killing it")
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # and any worker left behind
    except ProcessLookupError:
        pass
    proc.wait()


def tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def check(cluster: PgCluster, dsn: str) -> bool:
    psql = str(cluster.bin_dir / "psql")
    try:
        done = subprocess.run(
            [psql, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", dsn, "-c", QUERY],
            capture_output=True, text=True, timeout=30,
        )
    except subprocess.TimeoutExpired:
        say(f"check: psql timed out: {QUERY}")
        return False
    answer = done.stdout.strip()
    say(f"check: {QUERY} -> {answer or done.stderr.strip()}")
    expected = f"{ACCOUNTS}|{sum(i * 100 for i in range(1, ACCOUNTS + 1))}.00"
    return done.returncode == 0 and answer == expected


def on_signal(signum: int, frame: object) -> None:
    raise Stop(signal.Signals(signum).name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="run one query through pgherd, then stop (exit 0/1)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port for pgherd (default 6432)")
    args = parser.parse_args()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    workdir = Path(tempfile.mkdtemp(prefix="pgherd-demo-"))
    cluster: PgCluster | None = None
    proc: subprocess.Popen | None = None
    try:
        make_traversable(workdir)  # the server runs as `postgres` when we are root
        cluster = start_postgres(workdir / "pg")
        port = pick_port(args.port)
        if port != args.port:
            say(f"port {args.port} is taken: pgherd listens on {port} instead")
        config, users = write_configs(workdir, port, cluster)
        say(f"starting pgherd on {HOST}:{port} …")
        proc, log_path = start_pgherd(workdir, config, users)
        if not wait_listening(proc, port, START_TIMEOUT):
            state = f"exited with code {proc.returncode}" if proc.poll() is not None else f"is not listening after {START_TIMEOUT} s"
            say(f"pgherd {state}; its log ({log_path}):\n{tail(log_path)}")
            return 1
        dsn = f"postgres://{USER}:{PASSWORD}@{HOST}:{port}/{DB}"
        if args.check:
            ok = check(cluster, dsn)
            if not ok:
                say(f"pgherd log:\n{tail(log_path)}")
            say("check passed" if ok else "check FAILED")
            return 0 if ok else 1
        psql = "psql" if shutil.which("psql") else str(cluster.bin_dir / "psql")
        say(
            f"\npgherd is running on {HOST}:{port}, in front of PostgreSQL {cluster.host}:{cluster.port}.\n\n"
            f"  connect:        {psql} \"{dsn}\"\n"
            f"  try:            SELECT * FROM accounts;\n"
            f"  admin console:  {psql} \"postgres://admin:{ADMIN_PASSWORD}@{HOST}:{port}/admin\" -c 'SHOW POOLS'\n"
            f"  pgherd log:     {log_path}\n"
            f"  config:         {config}\n\n"
            "Press Ctrl-C to stop.",
        )
        code = proc.wait()
        say(f"pgherd exited by itself with code {code}; its log:\n{tail(log_path)}")
        return 1
    except Stop as stop:
        say(f"\n{stop}: stopping …")
        return 0
    except LocalPgError as e:
        say(f"PostgreSQL failed: {e}")
        return 1
    finally:
        # No second Ctrl-C half-way through cleaning up.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if proc is not None:
            stop_pgherd(proc)
        if cluster is not None:
            cluster.destroy()
        shutil.rmtree(workdir, ignore_errors=True)
        if not args.check:
            say("stopped pgherd and PostgreSQL; removed " + str(workdir))


if __name__ == "__main__":
    sys.exit(main())
