"""Unit tests of the relay's per-server protocol bookkeeping (worker/server.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pgherd.shared.wire import protocol as P
from pgherd.worker.server import COPY_END, ServerConn

Q, S, F = P.F_QUERY, P.F_SYNC, P.F_FUNCTION_CALL


@pytest.fixture
async def srv():
    conn = SimpleNamespace(sock=None, tx_status=P.TX_IDLE, rstart=0, rend=0, host="h", port=1, pid=1)
    return ServerConn(conn, pool=None)


async def test_ready_for_query_pops_in_order(srv):
    srv.expect.extend([Q, S])
    assert srv.owes_reply()
    assert srv.ready_for_query() and list(srv.expect) == [S]
    assert srv.ready_for_query() and not srv.owes_reply()
    assert not srv.ready_for_query()  # nobody asked: out of sync


async def test_simple_copy_waits_for_client(srv):
    srv.expect.append(Q)
    srv.start_copy_in()
    assert srv.copy_in and list(srv.expect) == [Q]
    assert not srv.owes_reply()  # the client must send COPY data first
    assert not srv.idle


async def test_pipelined_copy_done_ends_copy(srv):
    # asyncpg: Query(COPY), CopyData, CopyDone sent before CopyInResponse arrives.
    srv.expect.extend([Q, COPY_END])
    srv.start_copy_in()
    assert not srv.copy_in and list(srv.expect) == [Q]
    assert srv.owes_reply()


async def test_extended_copy_drops_ignored_syncs(srv):
    # libpq: Parse/Bind/Execute(COPY)/Sync; Postgres ignores that Sync during COPY IN.
    srv.expect.append(S)
    srv.start_copy_in()
    assert srv.copy_in and list(srv.expect) == []
    assert srv.unsynced  # a new Sync is needed after CopyDone


async def test_extended_pipelined_copy_keeps_later_sync(srv):
    # Execute(COPY), Sync (ignored), CopyData, CopyDone, Sync (answered).
    srv.expect.extend([S, COPY_END, S])
    srv.start_copy_in()
    assert not srv.copy_in and list(srv.expect) == [S]
    assert not srv.unsynced


async def test_stray_copy_end_is_ignored(srv):
    srv.expect.extend([COPY_END, Q])
    assert srv.owes_reply()
    assert srv.ready_for_query()
    assert not srv.owes_reply() and srv.idle


async def test_idle_requires_everything_settled(srv):
    assert srv.idle
    srv.unsynced = True
    assert not srv.idle
    srv.unsynced = False
    srv.tx = P.TX_IN_TRANSACTION
    assert not srv.idle
    srv.tx = P.TX_IDLE
    srv.skip = 3
    assert not srv.idle
