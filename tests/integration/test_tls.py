"""TLS (issue 4): clients to pgherd and pgherd to Postgres, with certificates made for the test.

Client side: pgherd serves `tls_certificate`/`tls_private_key`; libpq (psycopg, psql, pgbench)
and asyncpg check it with `sslmode=verify-full` against the test CA; `tls_client_required` refuses
plaintext with 28000; `tls_client_ca_certificate` demands client certificates; unencrypted bytes
sent after an SSLRequest are refused (CVE-2021-23214); a reload swaps the certificate for new
connections while old ones keep working.

Server side: Debian's PostgreSQL 15 (the pgserver wheel's build has no SSL) with `ssl = on` and
pg_hba allowing alice over `hostssl` only; pgherd connects with each `tls_verify` mode.

Every certificate is made here with the `openssl` command line in a temporary directory.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import socket
import ssl
import struct
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any, Iterator

import psycopg
import pytest

from pgherd.shared.localpg import PgCluster, remove_cluster_dir

pytestmark = pytest.mark.timeout(90)

TEST_DB = "pgherd_test"
ALICE_PW = "alice-secret"
OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"
# Debian's PostgreSQL, built with OpenSSL (package `postgresql`).
DEBIAN_PG_BIN = Path("/usr/lib/postgresql/15/bin")
APT_TIMEOUT = 600
CONNECT_TIMEOUT = 10
# Raw-socket reads: long enough for a loaded machine, short enough to call it a hang.
RECV_TIMEOUT = 5.0
# A reload reaches the worker in milliseconds; generous for a loaded machine.
RELOAD_TIMEOUT = 10
LARGE_ROWS = 100_000
SSL_REQUEST = struct.pack("!ii", 8, 80877103)  # "SSLRequest": length 8, code 1234 5679
CERT_DAYS = "2"


# ---------------------------------------------------------------------------------------------
# Certificates


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run([OPENSSL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")


def _make_ca(d: Path, name: str, cn: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", CERT_DAYS,
             "-keyout", f"{name}.key", "-out", f"{name}.crt", "-subj", f"/CN={cn}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             "-addext", "subjectKeyIdentifier=hash", cwd=d)


def _make_leaf(d: Path, name: str, ca: str, cn: str, serial: int, *, server: bool = True,
               client: bool = False) -> None:
    usage = ",".join(u for u, on in (("serverAuth", server), ("clientAuth", client)) if on)
    ext = [
        "basicConstraints=CA:FALSE",
        "keyUsage=critical,digitalSignature,keyEncipherment",
        f"extendedKeyUsage={usage}",
        "subjectKeyIdentifier=hash",
        "authorityKeyIdentifier=keyid,issuer",
    ]
    if server:
        ext.append("subjectAltName=DNS:localhost,IP:127.0.0.1")
    (d / f"{name}.ext").write_text("\n".join(ext) + "\n")
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-set_serial", str(serial), "-days", CERT_DAYS, "-extfile", f"{name}.ext",
             "-out", f"{name}.crt", cwd=d)


class Certs:
    """Paths (as str) of the test PKI."""

    def __init__(self, d: Path) -> None:
        self.dir = d
        for name in ("ca", "server", "server2", "client", "other_ca", "other"):
            setattr(self, name, str(d / f"{name}.crt"))
            setattr(self, name + "_key", str(d / f"{name}.key"))

    ca: str
    ca_key: str
    server: str
    server_key: str
    server2: str
    server2_key: str
    client: str
    client_key: str
    other_ca: str
    other_ca_key: str
    other: str
    other_key: str


def der_fingerprint(pem_path: str) -> str:
    der = ssl.PEM_cert_to_DER_cert(Path(pem_path).read_text())
    return hashlib.sha256(der).hexdigest()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    d = tmp_path_factory.mktemp("pki")
    _make_ca(d, "ca", "pgherd test CA")
    _make_leaf(d, "server", "ca", "localhost", 1001)
    _make_leaf(d, "server2", "ca", "pgherd-reloaded", 1002)
    _make_leaf(d, "client", "ca", "alice", 1003, server=False, client=True)
    _make_ca(d, "other_ca", "unrelated CA")
    _make_leaf(d, "other", "other_ca", "localhost", 2001, server=True, client=True)
    for key in d.glob("*.key"):
        key.chmod(0o600)  # libpq refuses a private key others can read
    c = Certs(d)
    assert der_fingerprint(c.server) != der_fingerprint(c.server2)
    return c


# ---------------------------------------------------------------------------------------------
# Clients


def libpq_dsn(proc: Any, *, host: str = "localhost", user: str = "alice", password: str = ALICE_PW,
              **params: str) -> str:
    """A key=value libpq string for pgherd; host is the name checked by verify-full, hostaddr
    skips resolving it (pgherd listens on 127.0.0.1 only)."""
    fields = {"host": host, "hostaddr": "127.0.0.1", "port": str(proc.port), "dbname": TEST_DB,
              "user": user, "password": password, "connect_timeout": str(CONNECT_TIMEOUT), **params}
    return " ".join(f"{k}='{v}'" for k, v in fields.items())


def pg_connect(proc: Any, **params: str) -> psycopg.Connection:
    return psycopg.connect(libpq_dsn(proc, **params), autocommit=True, prepare_threshold=None)


def url(proc: Any, host: str = "localhost", **params: str) -> str:
    query = urllib.parse.urlencode(params)
    return f"postgresql://alice:{ALICE_PW}@{host}:{proc.port}/{TEST_DB}" + (f"?{query}" if query else "")


def psql(dsn: str, *commands: str, timeout: float = 30) -> subprocess.CompletedProcess:
    argv = [shutil.which("psql") or "psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"]
    for c in commands:
        argv += ["-c", c]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    return subprocess.run([*argv, dsn], capture_output=True, text=True, timeout=timeout, env=env)


def asyncpg_attempt(dsn: str, query: str = "select 1", ssl_ctx: Any = None, timeout: float = 20) -> Any:
    """Log in with asyncpg and run query. Returns (result, ssl_object-present) or the exception."""
    import asyncpg

    async def attempt() -> Any:
        kwargs = {"ssl": ssl_ctx} if ssl_ctx is not None else {}
        conn = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT, statement_cache_size=0, **kwargs)
        try:
            value = await conn.fetchval(query)
            transport = conn._transport  # noqa: SLF001 - only to see whether TLS is on
            return value, transport.get_extra_info("ssl_object") is not None
        finally:
            await conn.close()

    async def bounded() -> Any:
        try:
            return await asyncio.wait_for(attempt(), timeout)
        except asyncio.TimeoutError:
            pytest.fail(f"asyncpg to {dsn} hung for {timeout:g} s")
        except Exception as exc:  # noqa: BLE001 - the caller inspects it
            return exc

    return asyncio.run(bounded())


def raw_peer_cert(proc: Any) -> bytes:
    """SSLRequest by hand, then a TLS handshake without verification: pgherd's certificate (DER)."""
    with socket.create_connection((proc.host, proc.port), timeout=RECV_TIMEOUT) as sock:
        sock.sendall(SSL_REQUEST)
        answer = sock.recv(1)
        assert answer == b"S", f"pgherd answered SSLRequest with {answer!r}"
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with ctx.wrap_socket(sock, server_hostname="localhost") as tls:
            der = tls.getpeercert(binary_form=True)
    assert der
    return der


def read_until_eof(sock: socket.socket) -> bytes:
    """Everything pgherd sends until it closes; fails if it neither sends nor closes in time."""
    data = b""
    sock.settimeout(RECV_TIMEOUT)
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return data
        except socket.timeout:
            pytest.fail(f"pgherd neither answered nor closed within {RECV_TIMEOUT:g} s (got {data!r})")
        if not chunk:
            return data
        data += chunk


# ---------------------------------------------------------------------------------------------
# pgherd with a certificate for clients (TLS optional)


@pytest.fixture(scope="module")
def proc(pgherd_module, certs: Certs):
    return pgherd_module(general={"tls_certificate": certs.server, "tls_private_key": certs.server_key,
                                  "default_pool_size": 5, "checkout_timeout": 10_000})


def test_psycopg_verify_full(proc, certs):
    with pg_connect(proc, sslmode="verify-full", sslrootcert=certs.ca) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.info.hostaddr == "127.0.0.1"
        assert conn.info.host == "localhost"
        assert conn.execute("select 40 + 2").fetchone() == (42,)
    # The certificate also names 127.0.0.1.
    with pg_connect(proc, host="127.0.0.1", sslmode="verify-full", sslrootcert=certs.ca) as conn:
        assert conn.pgconn.ssl_in_use


def test_psql_verify_full_conninfo(proc, certs):
    done = psql(libpq_dsn(proc, sslmode="verify-full", sslrootcert=certs.ca), r"\conninfo", "select 'tls-ok'")
    assert done.returncode == 0, done.stderr
    assert "SSL connection (protocol: TLSv1." in done.stdout, done.stdout
    assert "tls-ok" in done.stdout


def test_asyncpg_verify_full(proc, certs):
    got = asyncpg_attempt(url(proc, sslmode="verify-full", sslrootcert=certs.ca), "select 7")
    assert not isinstance(got, BaseException), repr(got)
    assert got == (7, True)


def test_large_result_over_tls_matches_direct(proc, pg, certs, helpers):
    query = f"select g, md5(g::text), g * 1.5 from generate_series(1, {LARGE_ROWS}) g"
    with helpers.connect(helpers.direct_dsn(pg)) as direct:
        expected = direct.execute(query).fetchall()
    with pg_connect(proc, sslmode="verify-full", sslrootcert=certs.ca) as conn:
        assert conn.pgconn.ssl_in_use
        got = conn.execute(query).fetchall()
    assert len(got) == LARGE_ROWS
    assert got == expected


def test_copy_over_tls_matches_direct(proc, pg, certs, helpers):
    table = f"tls_copy_{os.getpid()}"
    query = f"copy (select g, md5(g::text) from generate_series(1, {LARGE_ROWS}) g) to stdout"
    with helpers.connect(helpers.direct_dsn(pg)) as direct:
        with direct.cursor().copy(query) as copy:
            expected = b"".join(bytes(block) for block in copy)
        direct.execute(f"drop table if exists {table}")
        direct.execute(f"create table {table} (id int primary key, t text)")
        try:
            with pg_connect(proc, sslmode="verify-full", sslrootcert=certs.ca) as conn:
                assert conn.pgconn.ssl_in_use
                with conn.cursor().copy(query) as copy:
                    got = b"".join(bytes(block) for block in copy)
                assert got == expected
                # And in: the same bytes into a table, in 64 KiB pieces.
                with conn.cursor().copy(f"copy {table} from stdin") as copy:
                    for i in range(0, len(expected), 65536):
                        copy.write(expected[i:i + 65536])
                assert conn.execute(f"select count(*) from {table}").fetchone() == (LARGE_ROWS,)
            with direct.cursor().copy(f"copy (select * from {table} order by id) to stdout") as copy:
                stored = b"".join(bytes(block) for block in copy)
            assert stored == expected
        finally:
            direct.execute(f"drop table if exists {table}")


def test_pgbench_select_only_over_tls(proc, pg):
    pgbench = shutil.which("pgbench") or "pgbench"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PG")},
           "PGPASSWORD": ALICE_PW, "PGCONNECT_TIMEOUT": "10"}
    # Initialise straight on Postgres (the TLS path is what -S measures); own tables prefix-free,
    # dropped after.
    init = subprocess.run([pgbench, "-i", "-s", "1", "-q", "-h", pg.host, "-p", str(pg.port), "-U", "alice",
                           TEST_DB], capture_output=True, text=True, timeout=120, env=env)
    assert init.returncode == 0, init.stderr
    try:
        done = subprocess.run(
            [pgbench, "-S", "-n", "-c", "8", "-j", "2", "-T", "2", "-h", proc.host, "-p", str(proc.port),
             "-U", "alice", TEST_DB],
            capture_output=True, text=True, timeout=60, env={**env, "PGSSLMODE": "require"})
        out = done.stdout + done.stderr
        assert done.returncode == 0, out
        processed = re.search(r"number of transactions actually processed: (\d+)", out)
        assert processed and int(processed.group(1)) > 50, out
        failed = re.search(r"number of failed transactions: (\d+)", out)
        assert failed is None or failed.group(1) == "0", out
    finally:
        pg.sql("drop table if exists pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history",
               dbname=TEST_DB)


def test_verify_full_with_another_ca_fails(proc, certs):
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        pg_connect(proc, sslmode="verify-full", sslrootcert=certs.other_ca).close()
    done = psql(libpq_dsn(proc, sslmode="verify-full", sslrootcert=certs.other_ca), "select 1")
    assert done.returncode != 0
    assert "certificate verify failed" in done.stderr, done.stderr
    got = asyncpg_attempt(url(proc, sslmode="verify-full", sslrootcert=certs.other_ca))
    assert isinstance(got, ssl.SSLCertVerificationError), repr(got)


def test_plaintext_still_allowed_when_not_required(proc):
    with pg_connect(proc, sslmode="disable") as conn:
        assert not conn.pgconn.ssl_in_use
        assert conn.execute("select 1").fetchone() == (1,)
    got = asyncpg_attempt(url(proc, sslmode="disable"), "select 2")
    assert got == (2, False), repr(got)


def test_unencrypted_bytes_after_ssl_request_are_refused(proc, helpers):
    from pgherd.shared.wire import messages as M

    startup = M.startup_message({"user": "alice", "database": TEST_DB})
    with socket.create_connection((proc.host, proc.port), timeout=RECV_TIMEOUT) as sock:
        sock.sendall(SSL_REQUEST + startup)  # one write: the StartupMessage is plaintext
        data = read_until_eof(sock)
    # Either a plain ErrorResponse (as Postgres gives) and a close, or just a close; never 'S'
    # followed by a login that took the injected bytes.
    if data:
        assert data[:1] == b"E", f"expected an ErrorResponse or a close, got {data[:64]!r}"
        length = struct.unpack_from("!i", data, 1)[0]
        fields = M.read_error_fields(data[5:1 + length])
        assert fields.get("C") == "08P01", fields
        assert "unencrypted" in fields.get("M", ""), fields
    helpers.assert_serving(proc)


def test_garbage_instead_of_tls_handshake(proc, helpers):
    with socket.create_connection((proc.host, proc.port), timeout=RECV_TIMEOUT) as sock:
        sock.sendall(SSL_REQUEST)
        assert sock.recv(1) == b"S"
        sock.sendall(b"this is not a TLS ClientHello\r\n" * 4)
        read_until_eof(sock)
    helpers.assert_serving(proc)


# ---------------------------------------------------------------------------------------------
# tls_client_required, tls_client_ca_certificate


def test_tls_client_required_refuses_plaintext(pgherd, certs):
    proc = pgherd(general={"tls_certificate": certs.server, "tls_private_key": certs.server_key,
                           "tls_client_required": True})
    import asyncpg

    got = asyncpg_attempt(url(proc, sslmode="disable"))
    assert isinstance(got, asyncpg.PostgresError), repr(got)
    assert got.sqlstate == "28000", repr(got)
    assert "TLS is required" in str(got)

    with pytest.raises(psycopg.OperationalError, match="TLS is required"):
        pg_connect(proc, sslmode="disable").close()
    done = psql(libpq_dsn(proc, sslmode="disable"), "select 1")
    assert done.returncode != 0 and "TLS is required" in done.stderr, done.stderr

    # TLS works: libpq (require and verify-full), asyncpg (require, and its default prefer).
    with pg_connect(proc, sslmode="require") as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("select 1").fetchone() == (1,)
    with pg_connect(proc, sslmode="verify-full", sslrootcert=certs.ca) as conn:
        assert conn.pgconn.ssl_in_use
    assert asyncpg_attempt(url(proc, sslmode="require"), "select 3") == (3, True)
    assert asyncpg_attempt(url(proc), "select 4") == (4, True)
    assert proc.returncode is None


def test_client_certificate_required(pgherd, certs):
    proc = pgherd(general={"tls_certificate": certs.server, "tls_private_key": certs.server_key,
                           "tls_client_ca_certificate": certs.ca})
    # A certificate signed by the configured CA (psycopg and psql).
    with pg_connect(proc, sslmode="verify-full", sslrootcert=certs.ca, sslcert=certs.client,
                    sslkey=certs.client_key) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("select current_user").fetchone() == ("alice",)
    done = psql(libpq_dsn(proc, sslmode="verify-full", sslrootcert=certs.ca, sslcert=certs.client,
                          sslkey=certs.client_key), "select 'with-cert'")
    assert done.returncode == 0 and "with-cert" in done.stdout, done.stderr
    # asyncpg with a client certificate.
    ctx = ssl.create_default_context(cafile=certs.ca)
    ctx.load_cert_chain(certs.client, certs.client_key)
    assert asyncpg_attempt(url(proc), "select 5", ssl_ctx=ctx) == (5, True)

    # No client certificate: the handshake fails.
    nocert = {"sslcertmode": "disable"} if psycopg.pq.version() >= 160000 else {
        "sslcert": str(certs.dir / "absent.crt"), "sslkey": str(certs.dir / "absent.key")}
    with pytest.raises(psycopg.OperationalError) as info:
        pg_connect(proc, sslmode="verify-full", sslrootcert=certs.ca, **nocert).close()
    # TLS 1.3: "alert certificate required"; TLS 1.2: "alert handshake failure".
    assert re.search(r"certificate required|handshake failure", str(info.value)), str(info.value)
    # A certificate from an unrelated CA: refused too.
    with pytest.raises(psycopg.OperationalError) as info:
        pg_connect(proc, sslmode="verify-full", sslrootcert=certs.ca, sslcert=certs.other,
                   sslkey=certs.other_key).close()
    assert re.search(r"unknown ca|bad certificate|certificate verify failed", str(info.value)), str(info.value)
    # Still serving certificate holders.
    with pg_connect(proc, sslmode="require", sslcert=certs.client, sslkey=certs.client_key) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    assert proc.returncode is None


# ---------------------------------------------------------------------------------------------
# Reload


def wait_for_cert(proc: Any, helpers: Any, fingerprint: str, what: str) -> None:
    helpers.wait_for(lambda: hashlib.sha256(raw_peer_cert(proc)).hexdigest() == fingerprint,
                     timeout=RELOAD_TIMEOUT, interval=0.1, what=what)


def test_reload_swaps_certificate_for_new_connections(pgherd, certs, helpers):
    import signal

    proc = pgherd(general={"tls_certificate": certs.server, "tls_private_key": certs.server_key})
    old_fp, new_fp = der_fingerprint(certs.server), der_fingerprint(certs.server2)
    assert hashlib.sha256(raw_peer_cert(proc)).hexdigest() == old_fp
    old = pg_connect(proc, sslmode="verify-full", sslrootcert=certs.ca)
    try:
        assert old.pgconn.ssl_in_use
        assert old.execute("select 1").fetchone() == (1,)
        old.execute("begin")  # a transaction in flight across the reload
        old.execute("select 2")

        config = dict(proc.config)
        config["general"] = {**config["general"], "tls_certificate": certs.server2,
                             "tls_private_key": certs.server2_key}
        proc.write_config(config)
        proc.signal(signal.SIGHUP)
        wait_for_cert(proc, helpers, new_fp, "new connections to get the reloaded certificate (SIGHUP)")

        # New connections verify the new certificate (same CA) and see its subject.
        with pg_connect(proc, sslmode="verify-full", sslrootcert=certs.ca) as conn:
            assert conn.pgconn.ssl_in_use
            assert conn.execute("select 3").fetchone() == (3,)
        shown = subprocess.run([OPENSSL, "x509", "-inform", "DER", "-noout", "-subject", "-serial"],
                               input=raw_peer_cert(proc), capture_output=True, timeout=30)
        assert b"CN = pgherd-reloaded" in shown.stdout, shown
        assert b"serial=03EA" in shown.stdout, shown  # 1002

        # The old connection keeps working, in and after its transaction.
        assert old.execute("select 4").fetchone() == (4,)
        old.execute("commit")
        assert old.execute("select 5").fetchone() == (5,)
        assert old.pgconn.ssl_in_use
    finally:
        old.close()
    assert proc.returncode is None


def test_admin_reload_picks_up_certificate_files_replaced_in_place(pgherd, certs, helpers, tmp_path):
    """The renewal case (certbot and the like): same paths, new contents, then RELOAD."""
    live_crt, live_key = tmp_path / "live.crt", tmp_path / "live.key"
    shutil.copyfile(certs.server, live_crt)
    shutil.copyfile(certs.server_key, live_key)
    live_key.chmod(0o600)
    proc = pgherd(general={"tls_certificate": str(live_crt), "tls_private_key": str(live_key)})
    assert hashlib.sha256(raw_peer_cert(proc)).hexdigest() == der_fingerprint(certs.server)
    old = pg_connect(proc, sslmode="verify-full", sslrootcert=certs.ca)
    try:
        # Replace the files atomically (rename), as renewal tools do.
        for src, dst in ((certs.server2, live_crt), (certs.server2_key, live_key)):
            tmp = dst.with_suffix(".new")
            shutil.copyfile(src, tmp)
            tmp.chmod(0o600)
            os.replace(tmp, dst)
        with psycopg.connect(proc.admin_dsn(), autocommit=True, connect_timeout=CONNECT_TIMEOUT,
                             prepare_threshold=None) as admin:
            admin.execute("RELOAD")
        wait_for_cert(proc, helpers, der_fingerprint(certs.server2),
                      "new connections to get the replaced certificate file (RELOAD)")
        assert old.execute("select 1").fetchone() == (1,)
    finally:
        old.close()


# ---------------------------------------------------------------------------------------------
# pgherd to a Postgres with ssl = on


def _ensure_debian_postgres() -> None:
    if (DEBIAN_PG_BIN / "postgres").exists():
        return
    apt = shutil.which("apt-get")
    why = ""
    if apt is None:
        why = "apt-get not found"
    else:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        try:
            done = subprocess.run([apt, "install", "-y", "postgresql"], capture_output=True, text=True,
                                  timeout=APT_TIMEOUT, env=env)
            if done.returncode != 0:
                subprocess.run([apt, "update"], capture_output=True, timeout=APT_TIMEOUT, env=env)
                done = subprocess.run([apt, "install", "-y", "postgresql"], capture_output=True, text=True,
                                      timeout=APT_TIMEOUT, env=env)
            if done.returncode != 0:
                why = f"`apt-get install -y postgresql` failed: {(done.stderr or done.stdout).strip()[-500:]}"
        except (OSError, subprocess.TimeoutExpired) as exc:
            why = f"`apt-get install -y postgresql` could not run: {exc}"
    if not (DEBIAN_PG_BIN / "postgres").exists():
        pytest.skip(
            "server-side TLS needs a PostgreSQL built with SSL (the pgserver wheel's has none); "
            f"{DEBIAN_PG_BIN}/postgres is missing and installing Debian's `postgresql` package did not "
            f"provide it ({why or 'it installed a different major version'})")


@pytest.fixture(scope="module")
def ssl_pg(certs: Certs) -> Iterator[PgCluster]:
    """Debian PostgreSQL 15 with ssl=on; alice may log in over TLS only.

    (Module-scoped, so not tests/conftest.py's function-scoped `cluster_dir`; the same kind of
    directory directly in /tmp with the same prefix, which the postgres account can reach.)
    """
    _ensure_debian_postgres()
    base = Path(tempfile.mkdtemp(prefix="pgherd-test-"))
    try:
        tls_dir = base / "tls"
        tls_dir.mkdir(mode=0o755)
        crt, key = tls_dir / "server.crt", tls_dir / "server.key"
        shutil.copyfile(certs.server, crt)
        shutil.copyfile(certs.server_key, key)
        key.chmod(0o600)  # Postgres refuses a key others can read
        if os.geteuid() == 0:
            import pwd

            pw = pwd.getpwnam("postgres") if _has_user("postgres") else pwd.getpwnam("nobody")
            for p in (crt, key):
                os.chown(p, pw.pw_uid, pw.pw_gid)
        cluster = PgCluster.create(
            base, bin_dir=DEBIAN_PG_BIN,
            settings={"ssl": True, "ssl_cert_file": str(crt), "ssl_key_file": str(key)},
            hba_extra=["hostssl all alice 127.0.0.1/32 scram-sha-256",
                       "hostnossl all alice 127.0.0.1/32 reject"],
        )
    except BaseException:
        remove_cluster_dir(base)
        raise
    try:
        cluster.create_role("alice", ALICE_PW)
        cluster.create_database(TEST_DB)
        cluster.grant_all("alice", TEST_DB)
        yield cluster
    finally:
        cluster.destroy()
        remove_cluster_dir(base)


def _has_user(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def herd_to(pgherd: Any, cluster: PgCluster, host: str, **general: Any) -> Any:
    return pgherd(
        general={"connect_timeout": 3_000, **general},
        databases=[{"name": TEST_DB, "host": host, "port": cluster.port}],
        users=[{"name": "alice", "password": ALICE_PW, "database": TEST_DB}],
    )


SSL_QUERY = "select ssl from pg_stat_ssl where pid = pg_backend_pid()"


def test_ssl_server_refuses_plaintext_directly(ssl_pg):
    """The setup itself: alice gets in over TLS only (so the tests below prove pgherd used TLS)."""
    base = f"host=127.0.0.1 port={ssl_pg.port} dbname={TEST_DB} user=alice password={ALICE_PW}"
    with psycopg.connect(base + " sslmode=require", connect_timeout=CONNECT_TIMEOUT) as conn:
        assert conn.execute(SSL_QUERY).fetchone() == (True,)
    with pytest.raises(psycopg.OperationalError, match="pg_hba.conf rejects connection"):
        psycopg.connect(base + " sslmode=disable", connect_timeout=CONNECT_TIMEOUT).close()


def test_server_verify_full(pgherd, ssl_pg, certs, helpers):
    proc = herd_to(pgherd, ssl_pg, "localhost", tls_verify="verify_full", tls_server_ca_certificate=certs.ca)
    with helpers.connect(proc.dsn()) as conn:
        assert conn.execute(SSL_QUERY).fetchone() == (True,)
        assert conn.execute("select setting from pg_settings where name = 'port'").fetchone() == (str(ssl_pg.port),)
    got = asyncpg_attempt(proc.dsn() + "?sslmode=disable", SSL_QUERY)
    assert got == (True, False), repr(got)


def test_server_verify_ca_by_address(pgherd, ssl_pg, certs, helpers):
    proc = herd_to(pgherd, ssl_pg, "127.0.0.1", tls_verify="verify_ca", tls_server_ca_certificate=certs.ca)
    with helpers.connect(proc.dsn()) as conn:
        assert conn.execute(SSL_QUERY).fetchone() == (True,)


def test_server_verify_full_with_wrong_ca_fails_clearly(pgherd, ssl_pg, certs):
    proc = herd_to(pgherd, ssl_pg, "localhost", tls_verify="verify_full",
                   tls_server_ca_certificate=certs.other_ca)
    import asyncpg

    started = time.monotonic()
    got = asyncpg_attempt(proc.dsn() + "?sslmode=disable", SSL_QUERY, timeout=20)
    assert isinstance(got, asyncpg.PostgresError), repr(got)
    assert got.sqlstate == "08006", repr(got)
    assert re.search(r"certificate verif", str(got), re.I), str(got)
    assert time.monotonic() - started < 15
    # psycopg sees the same (at login or at the first query, wherever pgherd connects).
    with pytest.raises(psycopg.Error, match=r"(?i)certificate verif"):
        with psycopg.connect(proc.dsn(), autocommit=True, connect_timeout=CONNECT_TIMEOUT) as conn:
            conn.execute("select 1")
    assert proc.returncode is None


def test_server_tls_disabled_gets_postgres_hba_error(pgherd, ssl_pg):
    proc = herd_to(pgherd, ssl_pg, "localhost", tls_verify="disabled")
    import asyncpg

    got = asyncpg_attempt(proc.dsn() + "?sslmode=disable", SSL_QUERY, timeout=20)
    assert isinstance(got, asyncpg.PostgresError), repr(got)
    assert got.sqlstate == "28000", repr(got)
    assert "pg_hba.conf rejects connection" in str(got) and "no encryption" in str(got), str(got)


def test_server_tls_prefer(pgherd, ssl_pg, helpers):
    proc = herd_to(pgherd, ssl_pg, "localhost", tls_verify="prefer")
    with helpers.connect(proc.dsn()) as conn:
        assert conn.execute(SSL_QUERY).fetchone() == (True,)
    # prefer is the default.
    proc2 = herd_to(pgherd, ssl_pg, "localhost")
    with helpers.connect(proc2.dsn()) as conn:
        assert conn.execute(SSL_QUERY).fetchone() == (True,)
