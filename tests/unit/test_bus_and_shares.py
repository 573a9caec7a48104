"""Bus message encoding (malformed input is dropped, never raised) and pool shares per worker."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgherd.shared.bus import messages as B
from pgherd.supervisor.nodes import MAX_NODE, check_range, node_base
from pgherd.worker.context import worker_min_share, worker_share


def test_roundtrip_every_message_type():
    msgs = [B.Hello(index=1, pid=2), B.Ready(index=0), B.StartFailed(index=0, reason="port"),
            B.AdminCommand(req=1, command="SHOW", arg="POOLS"), B.CancelForward(pid=5, secret=-3),
            B.Collected(req=1, index=0, data={"a": [1]}), B.Welcome(config={}, index=0, workers=2, node=7),
            B.AdminReply(req=1, columns=["x"], rows=[[1]]), B.Collect(req=3), B.ConfigUpdate(config={}, workers=2),
            B.State(paused=["db"]), B.Reconnect(), B.Shutdown(), B.CancelDeliver(pid=1, secret=2)]
    for msg in msgs:
        assert B.decode(B.encode(msg)) == msg


@pytest.mark.parametrize("raw", [b"", b"not json", b"[]", b'{"type": "nope", "v": 1}',
                                 b'{"type": "hello", "v": 1}', b'{"type": "hello", "v": 99, "index": 1, "pid": 1}',
                                 b'{"type": "ready", "v": 1, "index": "x"}'])
def test_malformed_unknown_or_other_version_is_dropped(raw):
    assert B.decode(raw) is None


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise(raw):
    B.decode(raw)


@given(st.dictionaries(st.text(max_size=8), st.integers(-2**63, 2**63 - 1) | st.text(max_size=8), max_size=5))
def test_arbitrary_json_never_raises(obj):
    B.decode(orjson.dumps(obj))


@given(st.integers(1, 500), st.integers(1, 64))
def test_pool_share_sums_to_max_of_size_and_workers(total, workers):
    shares = [worker_share(total, i, workers) for i in range(workers)]
    assert all(s >= 1 for s in shares)
    assert sum(shares) == max(total, workers)
    assert max(shares) - min(shares) <= 1
    mins = [worker_min_share(total, i, workers) for i in range(workers)]
    assert sum(mins) == total


def test_node_numbers():
    assert node_base(None, {}) == 0
    assert node_base(5, {"NODE_ID": "pgherd-9"}) == 5
    assert node_base(None, {"NODE_ID": "pgherd-9"}) == 9
    with pytest.raises(ValueError):
        node_base(None, {"NODE_ID": "pgherd-x"})
    check_range(1020, 4)
    with pytest.raises(ValueError, match="10 bits"):
        check_range(MAX_NODE, 2)
