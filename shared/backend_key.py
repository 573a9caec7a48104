"""The BackendKeyData pid pgherd hands to clients: it encodes the owning worker.

A CancelRequest can land on any worker (SO_REUSEPORT spreads connections); the
pid tells which worker owns the client: pid = (index + 1) << 22 | counter.
"""

PID_INDEX_SHIFT = 22
PID_COUNTER_MASK = (1 << PID_INDEX_SHIFT) - 1


def make_pid(index: int, counter: int) -> int:
    return ((index + 1) << PID_INDEX_SHIFT) | (counter & PID_COUNTER_MASK)


def pid_owner(pid: int) -> int:
    """Worker index encoded in a pid handed out by pgherd (-1 if not ours)."""
    return (pid >> PID_INDEX_SHIFT) - 1
