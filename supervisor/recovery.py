"""Two-phase commit recovery: settle prepared transactions a worker left behind.

At start and every RECOVERY_INTERVAL the supervisor looks at each shard of every sharded database
with two-phase commit on (shared/twophase.py describes the protocol): a pgherd prepared
transaction whose decision record exists is committed; one without a record that has been
prepared for longer than RECOVERY_GRACE is rolled back. Decision records nothing refers to any
more are deleted.
"""

from __future__ import annotations

import logging
import os

import trio

from pgherd.shared.pgconn import PgConn, ServerError
from pgherd.shared.twophase import DECISION_TABLE, decided_sql, parse_gid

from .monitor import login_for

log = logging.getLogger("pgherd.recovery")

# A crashed worker's prepared transactions hold locks: settle them within seconds, but without
# querying every shard constantly. (The environment variables exist for tests and tuning.)
RECOVERY_INTERVAL = float(os.environ.get("PGHERD_2PC_RECOVERY_INTERVAL", "10"))
# A prepared transaction without a decision record is rolled back only after this long: a live
# worker takes milliseconds between PREPARE and the decision, so 30 s means it is gone.
RECOVERY_GRACE = float(os.environ.get("PGHERD_2PC_RECOVERY_GRACE", "30"))
# One round's connections give up after this long (a shard that does not answer is retried next round).
RECOVERY_TIMEOUT = 10.0
_PENDING = ("SELECT gid, extract(epoch FROM now() - prepared)::float8, owner FROM pg_prepared_xacts "
            "WHERE gid LIKE 'pgherd\\_%' AND database = current_database()")


def two_phase_databases(config) -> list[str]:
    """Sharded databases some login may use two-phase commit on."""
    wanted = config.general.two_phase_commit or any(u.two_phase_commit for u in config.users)
    if not wanted:
        return []
    return [name for name in config.database_names() if len(config.shards(name)) > 1]


def _primary(hosts):
    return next((db for db in hosts if db.role == "primary"), hosts[0])


class Recovery:
    def __init__(self, config) -> None:
        self.config = config
        self.committed = 0
        self.rolled_back = 0
        self.wake = trio.Event()
        self.logins: dict[int, str | None] = {}  # shard -> the user recovery is connected as

    def reload(self, config) -> None:
        self.config = config
        self.wake.set()

    async def run(self) -> None:
        while True:
            for database in two_phase_databases(self.config):
                try:
                    with trio.move_on_after(RECOVERY_TIMEOUT * 3):
                        await self.recover(database)
                except Exception:  # never let recovery take the supervisor down
                    log.exception("two-phase recovery of %s failed", database)
            with trio.move_on_after(RECOVERY_INTERVAL):
                await self.wake.wait()
            self.wake = trio.Event()

    async def _connect(self, db, owner: str | None = None) -> PgConn | None:
        """A connection to db as pgherd's first login, or as the login whose server user is owner
        (only the user who prepared a transaction, or a superuser, may finish it)."""
        login = login_for(self.config, db)
        if owner is not None and (login is None or login[0] != owner):
            logins = [self.config.server_login(u, db) for u in self.config.users if u.serves(db.name)]
            login = next((x for x in logins if x[0] == owner), login)
        if login is None:
            return None
        g = self.config.general
        try:
            with trio.fail_after(RECOVERY_TIMEOUT):
                return await PgConn.connect(db.host, db.port, user=login[0], database=db.server_database,
                                            password=login[1], params={"application_name": "pgherd recovery"},
                                            timeout=min(RECOVERY_TIMEOUT, g.connect_timeout / 1000 or RECOVERY_TIMEOUT))
        except Exception as exc:
            log.info("two-phase recovery: cannot reach %s: %s", db.address, exc)
            return None

    async def recover(self, database: str) -> None:
        shards = [_primary(hosts) for hosts in self.config.shards(database)]
        conns: dict[int, PgConn] = {}
        try:
            self.logins = {}
            for i, db in enumerate(shards):
                conn = await self._connect(db)
                if conn is not None:
                    conns[i] = conn
                    self.logins[i] = (login_for(self.config, db) or (None,))[0]
            pending: dict[int, list] = {}
            for i, conn in conns.items():
                with trio.fail_after(RECOVERY_TIMEOUT):
                    results = await conn.simple_query(_PENDING)
                pending[i] = [(row[0], float(row[1]), row[2]) for r in results for row in r.rows]
            for i, items in pending.items():
                for gid_text, age, owner in items:
                    await self._settle(database, shards[i], conns, i, gid_text, age, owner)
            if len(conns) == len(shards):
                await self._forget(conns, pending)
        finally:
            for conn in conns.values():
                conn.close()

    async def _settle(self, database: str, db, conns: dict, shard: int, gid_text: str, age: float,
                      owner: str) -> None:
        gid = parse_gid(gid_text)
        if gid is None or gid.decision not in conns:
            return  # not ours, or its decision shard is unreachable: wait for the next round
        with trio.fail_after(RECOVERY_TIMEOUT):
            try:
                decided = any(r.rows for r in await conns[gid.decision].simple_query(decided_sql(gid.txid)))
            except ServerError as exc:
                if exc.code != "42P01":  # no decision table: nothing was ever decided there
                    raise
                decided = False
            if not decided and age <= RECOVERY_GRACE:
                return  # maybe a live worker between its phases
            # Only the user who prepared a transaction (or a superuser) may finish it.
            own = await self._connect(db, owner) if owner != self.logins.get(shard) else None
            try:
                await (own or conns[shard]).simple_query(
                    f"{'COMMIT' if decided else 'ROLLBACK'} PREPARED '{gid_text}'")
            finally:
                if own is not None:
                    own.close()
            if decided:
                self.committed += 1
            else:
                self.rolled_back += 1
            log.warning("two-phase recovery: %s %s on %s shard %d (%s)", "committed" if decided else "rolled back",
                        gid_text, database, shard, "its decision was recorded" if decided
                        else f"no decision after {age:.0f} s")

    async def _forget(self, conns: dict, pending: dict) -> None:
        """Delete decision records no prepared transaction needs (every shard was checked)."""
        live = {g.txid for items in pending.values() for text, _, _ in items if (g := parse_gid(text))}
        keep = f" AND txid NOT IN ({','.join(str(t) for t in sorted(live))})" if live else ""
        for conn in conns.values():
            with trio.fail_after(RECOVERY_TIMEOUT):
                try:
                    await conn.simple_query(f"DELETE FROM {DECISION_TABLE} WHERE created < now() - "
                                            f"interval '{int(RECOVERY_GRACE)} seconds'{keep}")
                except ServerError as exc:
                    if exc.code != "42P01":
                        raise
