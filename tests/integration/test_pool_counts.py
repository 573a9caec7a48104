"""worker/pool.Pool's counts while a server passes from one client straight to the next.

PAUSE returns once every worker reports no active server (supervisor/main.py), so a server
handed from a releasing client to a waiting one must stay counted as active until that
client is done with it, even before the waiting client's task has run. Real servers (the
session's Postgres); the Pool is driven directly, as a worker's clients drive it.
"""

from __future__ import annotations

import trio
import trio.testing

from pgherd.tests.conftest import ROLES, TEST_DB
from pgherd.worker.pool import Pool, PoolSettings


def one_server_pool(pg) -> Pool:
    settings = PoolSettings(
        host=pg.host, port=pg.port, database_name=TEST_DB, server_user="alice",
        server_password=ROLES["alice"][0], pool_size=1, min_pool_size=0, pooler_mode="transaction",
        checkout_timeout=10, connect_timeout=5, connect_attempts=1, connect_attempt_delay=0,
        idle_timeout=0, server_lifetime=0, rollback_timeout=5)
    return Pool("alice", TEST_DB, settings)


async def test_a_server_handed_to_a_waiter_stays_active(pg):
    pool = one_server_pool(pg)
    try:
        first = await pool.checkout()
        assert pool.active == 1
        got = []

        async def waiter():
            got.append(await pool.checkout())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert len(pool.waiters) == 1
            pool.checkin(first)
            # The waiter's task has not run yet: the server is on its way to it, still in use.
            assert pool.active == 1 and not pool.idle and not got
        assert got == [first] and pool.active == 1
        pool.checkin(first)
        assert pool.active == 0 and list(pool.idle) == [first]
    finally:
        pool.close_all()
