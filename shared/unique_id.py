"""Unique 64-bit ids for pgherd.unique_id(): PgDog's layout, time-ordered, per node.

Layout of an id (a positive bigint; bit 63 stays clear):

    | 41 bits: milliseconds since EPOCH_MS | 10 bits: node number | 12 bits: sequence |

then `unique_id_min` ([general], default 0) is *added* to the packed value, as PgDog does, so every
id is at least that large (useful when existing ids must stay below the new ones); an id that
would then exceed the bigint range raises OverflowError. Ids from one
generator strictly increase; ids from different node numbers never collide.

- Within one millisecond the sequence counts 0, 1, ... 4095; when a millisecond's 4096 ids are used
  up, next_id() waits for the next millisecond (PgDog does the same: 4,096,000 ids/s per node).
- The clock going backwards (NTP step, VM resume) must never produce an id at or below the last
  one. A small step back (at most CLOCK_BACKWARDS_WAIT_MS) is waited out; a larger one raises
  ClockWentBackwards rather than block the caller's event loop for long -- the caller answers that
  query with an error and later calls succeed once the clock has caught up. (PgDog waits however
  long it takes.)

Node numbers come from the supervisor (one per worker process, unique across the deployment).
"""

from __future__ import annotations

import time
from typing import Callable, Optional

__all__ = [
    "ClockWentBackwards",
    "EPOCH_MS",
    "MAX_NODE",
    "MAX_OFFSET",
    "UniqueIdGenerator",
    "decode",
]

# 2025-11-26T19:13:15Z, PgDog's epoch: ids made by PgDog and by pgherd share one timeline.
EPOCH_MS = 1764184395000
TIMESTAMP_BITS = 41  # about 69.7 years of milliseconds: until 2095
NODE_BITS = 10  # 1024 nodes
SEQUENCE_BITS = 12  # 4096 ids per millisecond per node
NODE_SHIFT = SEQUENCE_BITS
TIMESTAMP_SHIFT = SEQUENCE_BITS + NODE_BITS
MAX_TIMESTAMP = (1 << TIMESTAMP_BITS) - 1
MAX_NODE = (1 << NODE_BITS) - 1
MAX_SEQUENCE = (1 << SEQUENCE_BITS) - 1
INT8_MAX = (1 << 63) - 1
# The packed layout fills all 63 bits by 2095, so any unique_id_min > 0 eventually overflows a
# bigint; the offset is accepted up to INT8_MAX and each id is checked (OverflowError) instead.
MAX_OFFSET = INT8_MAX

# Wait out a clock step back of up to this much (NTP corrections are usually a few ms); beyond it,
# raise instead of stalling a worker's event loop.
CLOCK_BACKWARDS_WAIT_MS = 50
# Sleep granularity while waiting for the clock (the next millisecond is at most 1 ms away).
_POLL_SECONDS = 0.0001


class ClockWentBackwards(RuntimeError):
    """The system clock is behind the last id generated, by more than CLOCK_BACKWARDS_WAIT_MS."""


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class UniqueIdGenerator:
    """Generates ids for one node number. Not thread-safe: one per worker process (trio is single-threaded)."""

    __slots__ = ("node", "offset", "_node_part", "_last_ms", "_sequence", "_clock", "_sleep")

    def __init__(
        self,
        node: int,
        unique_id_min: int = 0,
        *,
        clock: Callable[[], int] = _now_ms,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not 0 <= node <= MAX_NODE:
            raise ValueError(f"node number {node} is out of range: it must be 0 to {MAX_NODE}")
        if not 0 <= unique_id_min <= MAX_OFFSET:
            raise ValueError(f"unique_id_min = {unique_id_min} is out of range: it must be 0 to {MAX_OFFSET}")
        self.node = node
        self.offset = unique_id_min
        self._node_part = node << NODE_SHIFT
        self._last_ms = -1
        self._sequence = 0
        self._clock = clock
        self._sleep = sleep

    def next_id(self) -> int:
        """A new id, larger than every id this generator returned before."""
        now = self._clock()
        last = self._last_ms
        if now < last:
            now = self._wait_for(last)
        if now == last:
            seq = (self._sequence + 1) & MAX_SEQUENCE
            if seq == 0:  # this millisecond's ids are used up
                now = self._wait_for(last + 1)
        else:
            seq = 0
        self._last_ms = now
        self._sequence = seq
        elapsed = now - EPOCH_MS
        if not 0 <= elapsed <= MAX_TIMESTAMP:
            raise OverflowError(f"the clock ({now} ms) is outside the id range starting at {EPOCH_MS} ms")
        uid = ((elapsed << TIMESTAMP_SHIFT) | self._node_part | seq) + self.offset
        if uid > INT8_MAX:
            raise OverflowError(f"unique id {uid} exceeds bigint: unique_id_min ({self.offset}) is too large")
        return uid

    def _wait_for(self, target_ms: int) -> int:
        """Wait until the clock reads at least target_ms; raise if it is too far behind."""
        now = self._clock()
        if target_ms - now > CLOCK_BACKWARDS_WAIT_MS:
            raise ClockWentBackwards(
                f"the system clock went back {target_ms - now} ms; unique ids resume when it catches up"
            )
        while now < target_ms:
            self._sleep(_POLL_SECONDS)
            now = self._clock()
        return now


def decode(uid: int, unique_id_min: int = 0) -> tuple[int, int, int]:
    """(Unix time in ms, node number, sequence) of an id made with this unique_id_min."""
    packed = uid - unique_id_min
    if packed < 0:
        raise ValueError(f"{uid} is below unique_id_min {unique_id_min}")
    return (
        (packed >> TIMESTAMP_SHIFT) + EPOCH_MS,
        (packed >> NODE_SHIFT) & MAX_NODE,
        packed & MAX_SEQUENCE,
    )


def generator_for(config: object, node: int) -> UniqueIdGenerator:
    """A generator for this node with the config's [general] unique_id_min."""
    general: Optional[object] = getattr(config, "general", None)
    return UniqueIdGenerator(node, getattr(general, "unique_id_min", 0) or 0)
