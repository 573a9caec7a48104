"""Unit tests of shared/unique_id.py: PgDog's id layout, ordering, waits and clock steps."""

from __future__ import annotations

import multiprocessing
import time
from array import array

import pytest

from pgherd.shared.unique_id import (
    CLOCK_BACKWARDS_WAIT_MS,
    EPOCH_MS,
    MAX_NODE,
    MAX_OFFSET,
    MAX_SEQUENCE,
    ClockWentBackwards,
    UniqueIdGenerator,
    decode,
)

TOTAL_IDS = 1_000_000
PROCESSES = 4


class FakeClock:
    """Returns the given readings in turn, then the last one forever; sleep advances nothing."""

    def __init__(self, *readings: int) -> None:
        self.readings = list(readings)
        self.calls = 0
        self.sleeps = 0

    def __call__(self) -> int:
        i = min(self.calls, len(self.readings) - 1)
        self.calls += 1
        return self.readings[i]

    def sleep(self, _seconds: float) -> None:
        self.sleeps += 1


def test_layout_matches_pgdog():
    # Fixed-clock ids as PgDog computes them: node 42 at 1_775_590_268_126 ms.
    now = 1_775_590_268_126
    clock = FakeClock(now, now, now + 1)
    gen = UniqueIdGenerator(42, clock=clock, sleep=clock.sleep)
    first, second, third = gen.next_id(), gen.next_id(), gen.next_id()
    assert (first, second, third) == (47_839_699_276_046_336, 47_839_699_276_046_337, 47_839_699_280_240_640)
    assert decode(first) == (now, 42, 0)
    assert decode(second) == (now, 42, 1)
    assert decode(third) == (now + 1, 42, 0)


def test_offset_is_added_after_packing():
    now = EPOCH_MS + 321
    gen = UniqueIdGenerator(3, 1_000_000, clock=FakeClock(now))
    uid = gen.next_id()
    assert uid == 1_347_383_872  # PgDog's value for the same inputs
    assert decode(uid, 1_000_000) == (now, 3, 0)
    assert uid > 1_000_000


def test_sequence_wrap_waits_for_next_millisecond():
    now = EPOCH_MS + 99
    clock = FakeClock(*([now] * (MAX_SEQUENCE + 3)), now + 1)
    gen = UniqueIdGenerator(7, clock=clock, sleep=clock.sleep)
    ids = [gen.next_id() for _ in range(MAX_SEQUENCE + 2)]
    assert [decode(i)[2] for i in ids[:3]] == [0, 1, 2]
    assert decode(ids[MAX_SEQUENCE]) == (now, 7, MAX_SEQUENCE)
    assert decode(ids[-1]) == (now + 1, 7, 0)  # the 4097th id waited for the next millisecond
    assert clock.sleeps >= 1
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


def test_small_clock_step_back_is_waited_out():
    now = EPOCH_MS + 10_000
    clock = FakeClock(now, now - 3, now - 3, now - 1, now)
    gen = UniqueIdGenerator(1, clock=clock, sleep=clock.sleep)
    a = gen.next_id()
    b = gen.next_id()
    assert b > a
    assert decode(b)[0] == now


def test_large_clock_step_back_raises_then_recovers():
    now = EPOCH_MS + 10_000
    clock = FakeClock(now, now - CLOCK_BACKWARDS_WAIT_MS - 1000)
    gen = UniqueIdGenerator(1, clock=clock, sleep=clock.sleep)
    a = gen.next_id()
    with pytest.raises(ClockWentBackwards, match="went back"):
        gen.next_id()
    clock.readings.append(now + 5)
    clock.calls = len(clock.readings) - 1
    assert gen.next_id() > a


def test_bounds_are_checked():
    with pytest.raises(ValueError, match="node number"):
        UniqueIdGenerator(MAX_NODE + 1)
    with pytest.raises(ValueError, match="unique_id_min"):
        UniqueIdGenerator(0, MAX_OFFSET + 1)
    with pytest.raises(ValueError, match="unique_id_min"):
        UniqueIdGenerator(0, -1)
    gen = UniqueIdGenerator(MAX_NODE, clock=FakeClock(EPOCH_MS + (1 << 41) - 1))
    assert gen.next_id() == (1 << 63) - 1 - MAX_SEQUENCE  # the last millisecond still fits a bigint
    with pytest.raises(OverflowError, match="unique_id_min"):
        UniqueIdGenerator(MAX_NODE, 1 << 62, clock=FakeClock(EPOCH_MS + (1 << 41) - 1)).next_id()
    with pytest.raises(OverflowError):
        UniqueIdGenerator(0, clock=FakeClock(EPOCH_MS - 1)).next_id()


def test_decode_gives_current_time_and_node():
    before = time.time_ns() // 1_000_000
    uid = UniqueIdGenerator(513).next_id()
    after = time.time_ns() // 1_000_000
    ms, node, seq = decode(uid)
    assert before <= ms <= after
    assert node == 513
    assert 0 <= seq <= MAX_SEQUENCE
    assert uid > 0


def _generate(node: int, count: int) -> bytes:
    gen = UniqueIdGenerator(node)
    next_id = gen.next_id
    return array("q", [next_id() for _ in range(count)]).tobytes()


def test_million_ids_from_several_processes_are_unique_and_increasing():
    per_process = TOTAL_IDS // PROCESSES
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(PROCESSES) as pool:
        results = pool.starmap(_generate, [(node, per_process) for node in range(1, PROCESSES + 1)])
    everything = array("q")
    for node, raw in enumerate(results, start=1):
        ids = array("q")
        ids.frombytes(raw)
        assert len(ids) == per_process
        assert all(a < b for a, b in zip(ids, ids[1:])), f"ids of node {node} are not increasing"
        assert decode(ids[0])[1] == node and decode(ids[-1])[1] == node
        everything.extend(ids)
    ordered = sorted(everything)
    assert all(a != b for a, b in zip(ordered, ordered[1:])), "duplicate ids across processes"
    assert len(ordered) == TOTAL_IDS
