"""Reload (issue 3): SIGHUP and admin RELOAD with 3 workers.

A changed pool size applies (and is enforced: server connections on Postgres); untouched pools
keep their server connections (same backend pids); a broken file is rejected with the reason
logged and the old configuration keeps serving; pause and maintenance survive a reload; a
removed pool drains.
"""

from __future__ import annotations

import copy
import re
import signal
import threading
import time

import psycopg
import pytest

pytestmark = pytest.mark.timeout(60)

TEST_DB = "pgherd_test"
WORKERS = 3
ALICE_SIZE = 3  # 1 server per worker
ALICE_NEW_SIZE = 6  # 2 per worker
BOB_SIZE = 1  # each worker still gets 1
RELOAD_TIMEOUT = 10


def worker_of(pid: int) -> int:
    return (pid >> 22) - 1


def rows(cur: psycopg.Cursor) -> list[dict]:
    cols = [d.name for d in cur.description]
    return [dict(zip(cols, r)) for r in cur.fetchall()]


def admin_connect(proc) -> psycopg.Connection:
    return psycopg.connect(proc.admin_dsn(), autocommit=True, connect_timeout=10, prepare_threshold=None)


def show(admin: psycopg.Connection, what: str) -> list[dict]:
    return rows(admin.execute(f"SHOW {what}"))


def pool_row(admin: psycopg.Connection, user: str) -> dict:
    found = [p for p in show(admin, "POOLS") if p["user"] == user and p["database"] == TEST_DB]
    assert len(found) == 1, found
    return found[0]


def truthy(value) -> bool:
    return value in (True, 1, "1", "t", "true", "yes", "on")


def connect_on_workers(proc, helpers, wanted: dict[int, int], user: str = "alice", tries: int = 300,
                       **kwargs) -> dict[int, list[psycopg.Connection]]:
    kept: dict[int, list[psycopg.Connection]] = {w: [] for w in wanted}
    for _ in range(tries):
        if all(len(kept[w]) >= n for w, n in wanted.items()):
            return kept
        conn = helpers.connect(proc.dsn(user, helpers.PASSWORDS[user]), **kwargs)
        w = worker_of(conn.info.backend_pid)
        if w in kept and len(kept[w]) < wanted[w]:
            kept[w].append(conn)
        else:
            conn.close()
    close_all(kept)
    pytest.fail(f"could not place connections {wanted} on workers in {tries} attempts")


def close_all(placed: dict[int, list[psycopg.Connection]]) -> None:
    for conns in placed.values():
        for c in conns:
            c.close()


class Herd:
    """The module's pgherd with its original configuration, and ways to change it."""

    def __init__(self, proc, helpers) -> None:
        self.proc, self.helpers = proc, helpers
        self.config = copy.deepcopy(proc.config)
        self.users = copy.deepcopy(proc.users)

    def users_with(self, **sizes: int | None) -> dict:
        """users.toml with other pool sizes (user=None removes that user)."""
        doc = copy.deepcopy(self.users)
        doc["users"] = [{**u, "pool_size": sizes[u["name"]]} if sizes.get(u["name"]) else u
                        for u in doc["users"] if not (u["name"] in sizes and sizes[u["name"]] is None)]
        return doc

    def reloads(self) -> int:
        return len(re.findall(r"worker \d+: configuration reloaded", self.proc.log()))

    def rejections(self) -> int:
        return self.proc.log().count("reload rejected")

    def sighup(self, config: dict | None = None, users: dict | None = None) -> None:
        """Write the files and SIGHUP; return once every worker applied the new config."""
        before = self.reloads()
        self.proc.write_config(copy.deepcopy(config or self.config), copy.deepcopy(users or self.users))
        self.proc.signal(signal.SIGHUP)
        self.helpers.wait_for(lambda: self.reloads() >= before + WORKERS, timeout=RELOAD_TIMEOUT,
                              what="every worker to apply the reloaded configuration")

    def restore(self) -> None:
        self.sighup(self.config, self.users)


@pytest.fixture(scope="module")
def herd(pgherd_module, helpers):
    proc = pgherd_module(
        general={"workers": WORKERS, "default_pool_size": 30, "min_pool_size": 0, "checkout_timeout": 20_000},
        users=[
            {"name": "alice", "password": "alice-secret", "database": TEST_DB, "pool_size": ALICE_SIZE},
            {"name": "bob", "password": "bob-secret", "database": TEST_DB, "pool_size": BOB_SIZE},
            {"name": "carol", "password": "carol-secret", "database": TEST_DB},
        ],
    )
    with admin_connect(proc) as admin:
        helpers.wait_for(lambda: [w["state"] for w in show(admin, "WORKERS")] == ["serving"] * WORKERS,
                         timeout=20, what="every worker serving")
    return Herd(proc, helpers)


@pytest.fixture
def admin(herd):
    with admin_connect(herd.proc) as conn:
        yield conn


@pytest.fixture
def bob_servers(herd, helpers, pg, pg_admin):
    """bob's connections, one per worker, and the backend pid each worker gave bob."""
    placed = connect_on_workers(herd.proc, helpers, {w: 1 for w in range(WORKERS)}, user="bob")
    pids = {w: helpers.backend_pid(cs[0]) for w, cs in placed.items()}
    assert len(set(pids.values())) == WORKERS
    assert {b["pid"] for b in helpers.server_backends(pg_admin, herd.proc, pg, "bob")} == set(pids.values())
    yield placed, pids
    close_all(placed)


def assert_bob_kept(herd, helpers, pg, pg_admin, bob_servers) -> None:
    placed, pids = bob_servers
    for w, cs in placed.items():
        assert helpers.backend_pid(cs[0]) == pids[w], f"worker {w} replaced bob's server connection"
    assert {b["pid"] for b in helpers.server_backends(pg_admin, herd.proc, pg, "bob")} == set(pids.values())


def hold_transactions(proc, helpers, per_worker: int):
    """per_worker alice clients on every worker, each trying to BEGIN and hold a server."""
    placed = connect_on_workers(proc, helpers, {w: per_worker for w in range(WORKERS)})
    release = threading.Event()
    errors: list[BaseException] = []

    def client(conn):
        try:
            conn.execute("begin")
            helpers.backend_pid(conn)
            release.wait(30)
            conn.execute("commit")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for cs in placed.values() for c in cs]
    for t in threads:
        t.start()

    def finish():
        release.set()
        for t in threads:
            t.join(20)
        close_all(placed)
        assert not any(t.is_alive() for t in threads), "clients hung"
        assert not errors, errors

    return finish


def alice_in_transaction(helpers, proc, pg, pg_admin) -> int:
    return sum(1 for b in helpers.server_backends(pg_admin, proc, pg, "alice") if b["state"] == "idle in transaction")


# ---------------------------------------------------------------------------------------------


def test_sighup_applies_a_new_pool_size_and_keeps_untouched_pools(herd, admin, helpers, pg, pg_admin, bob_servers):
    proc = herd.proc
    assert pool_row(admin, "alice")["pool_size"] == ALICE_SIZE
    herd.sighup(users=herd.users_with(alice=ALICE_NEW_SIZE))
    try:
        assert pool_row(admin, "alice")["pool_size"] == ALICE_NEW_SIZE
        assert pool_row(admin, "bob")["pool_size"] == max(BOB_SIZE, WORKERS)
        # Enforced: 3 clients per worker want a server; 2 per worker get one, the third waits.
        finish = hold_transactions(proc, helpers, per_worker=3)
        try:
            alice = helpers.wait_for(
                lambda: (lambda p: p if p["sv_active"] == ALICE_NEW_SIZE and p["cl_waiting"] == WORKERS else None)(
                    pool_row(admin, "alice")), timeout=10, what=f"alice: sv_active {ALICE_NEW_SIZE}, cl_waiting 3")
            assert alice_in_transaction(helpers, proc, pg, pg_admin) == ALICE_NEW_SIZE, alice
            time.sleep(0.3)
            assert alice_in_transaction(helpers, proc, pg, pg_admin) == ALICE_NEW_SIZE
        finally:
            finish()
        # bob's pool did not change: its server connections (backend pids) are the same.
        assert_bob_kept(herd, helpers, pg, pg_admin, bob_servers)
    finally:
        herd.restore()
    # Back to the old size: the extra idle servers close, at most ALICE_SIZE stay.
    assert pool_row(admin, "alice")["pool_size"] == ALICE_SIZE
    helpers.wait_for(lambda: len(helpers.server_backends(pg_admin, proc, pg, "alice")) <= ALICE_SIZE, timeout=5,
                     what=f"at most {ALICE_SIZE} alice servers after shrinking the pool")
    finish = hold_transactions(proc, helpers, per_worker=2)
    try:
        helpers.wait_for(lambda: pool_row(admin, "alice")["cl_waiting"] == WORKERS, timeout=10,
                         what="one waiting alice client per worker")
        assert alice_in_transaction(helpers, proc, pg, pg_admin) == ALICE_SIZE
    finally:
        finish()
    assert_bob_kept(herd, helpers, pg, pg_admin, bob_servers)


def _unknown_key(herd) -> tuple[str, str]:
    config = copy.deepcopy(herd.config)
    config["general"]["default_pool_sizee"] = 7
    users = herd.users_with(alice=ALICE_NEW_SIZE)  # a change that must not apply
    herd.proc.write_config(config, users)
    return "default_pool_sizee", "default_pool_size"


def _syntax_error(herd) -> tuple[str, str]:
    herd.proc.write_config(copy.deepcopy(herd.config), herd.users_with(alice=ALICE_NEW_SIZE))
    text = herd.proc.config_path.read_text()
    herd.proc.config_path.write_text(text.replace("[general]", "[general\nworkers = = 3"))
    return "pgherd.toml", "line"


@pytest.mark.parametrize("breakage", [_unknown_key, _syntax_error], ids=["unknown-key", "toml-syntax-error"])
def test_sighup_with_a_broken_file_is_rejected_and_the_old_config_serves(herd, admin, helpers, pg, pg_admin,
                                                                         bob_servers, breakage):
    proc = herd.proc
    pids = {w["index"]: w["pid"] for w in show(admin, "WORKERS")}
    rejected = herd.rejections()
    mention, also = breakage(herd)
    try:
        proc.signal(signal.SIGHUP)
        helpers.wait_for(lambda: herd.rejections() > rejected, timeout=RELOAD_TIMEOUT, what="the reload to be rejected")
        lines = [line for line in proc.log().splitlines() if "reload rejected" in line]
        assert mention in lines[-1] and also in lines[-1], lines[-1]
        helpers.assert_serving(proc)
        assert pool_row(admin, "alice")["pool_size"] == ALICE_SIZE, "the rejected file's pool size applied"
        assert {w["index"]: w["pid"] for w in show(admin, "WORKERS")} == pids
        assert_bob_kept(herd, helpers, pg, pg_admin, bob_servers)
    finally:
        herd.restore()


def test_admin_reload_of_a_broken_file_is_an_error_and_keeps_serving(herd, admin, helpers, pg, pg_admin,
                                                                     bob_servers):
    proc = herd.proc
    _unknown_key(herd)
    try:
        with pytest.raises(psycopg.Error) as info:
            admin.execute("RELOAD")
        assert "default_pool_sizee" in str(info.value), str(info.value)
        assert info.value.sqlstate and info.value.sqlstate != "00000"
        helpers.assert_serving(proc)
        assert pool_row(admin, "alice")["pool_size"] == ALICE_SIZE
        # Fixed file: RELOAD applies it.
        proc.write_config(copy.deepcopy(herd.config), herd.users_with(alice=ALICE_NEW_SIZE))
        before = herd.reloads()
        admin.execute("RELOAD")
        helpers.wait_for(lambda: herd.reloads() >= before + WORKERS, timeout=RELOAD_TIMEOUT, what="workers reloaded")
        assert pool_row(admin, "alice")["pool_size"] == ALICE_NEW_SIZE
        assert_bob_kept(herd, helpers, pg, pg_admin, bob_servers)
    finally:
        herd.restore()


@pytest.mark.parametrize("gate", ["PAUSE", "MAINTENANCE"])
def test_pause_and_maintenance_survive_a_reload(herd, admin, helpers, gate):
    proc = herd.proc
    on, off = ("PAUSE", "RESUME") if gate == "PAUSE" else ("MAINTENANCE ON", "MAINTENANCE OFF")
    with helpers.connect(proc.dsn()) as conn:
        admin.execute(on)
        try:
            herd.sighup(users=herd.users_with(alice=ALICE_NEW_SIZE))  # alice's pool is replaced
            assert pool_row(admin, "alice")["pool_size"] == ALICE_NEW_SIZE
            assert truthy(pool_row(admin, "alice")["paused"])
            # Via the admin console too.
            before = herd.reloads()
            admin.execute("RELOAD")
            helpers.wait_for(lambda: herd.reloads() >= before + WORKERS, timeout=RELOAD_TIMEOUT, what="reload")
            done: list = []
            t = threading.Thread(target=lambda: done.append(conn.execute("select 1").fetchone()), daemon=True)
            t.start()
            time.sleep(1.0)
            assert t.is_alive() and not done, f"a query ran during {on} after a reload"
        finally:
            admin.execute(off)
        t.join(10)
        assert done == [(1,)]
    herd.restore()


def test_a_removed_pool_drains(herd, admin, helpers):
    proc = herd.proc
    with helpers.connect(proc.dsn("carol", "carol-secret"), autocommit=False) as carol:
        carol.execute("select 1")  # BEGIN + a query: carol's transaction holds a server
        herd.sighup(users=herd.users_with(carol=None))
        try:
            # The transaction in flight finishes...
            assert carol.execute("select 2").fetchone() == (2,)
            carol.commit()
            # ...and carol can no longer log in.
            assert helpers.login_sqlstate(proc.dsn("carol", "carol-secret")) in ("28P01", "28000")
            helpers.wait_for(lambda: not [p for p in show(admin, "POOLS") if p["user"] == "carol"], timeout=5,
                             what="carol's pool gone from SHOW POOLS")
        finally:
            herd.restore()
    with helpers.connect(proc.dsn("carol", "carol-secret")) as again:
        assert again.execute("select 1").fetchone() == (1,)
