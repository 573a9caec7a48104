"""Node numbers for unique_id(): [general] node_id (or NODE_ID) plus the worker index."""

from __future__ import annotations

import re

# unique_id() has 10 bits for the node number.
MAX_NODE = 1023


def node_base(node_id: int | None, env: dict[str, str]) -> int:
    """The instance's first node number.

    `node_id` from the config wins; else the number after the last '-' of
    $NODE_ID (PgDog style, e.g. a StatefulSet pod name `pgherd-3`); else 0.
    """
    if node_id is not None:
        return int(node_id)
    raw = env.get("NODE_ID", "")
    m = re.search(r"(\d+)$", raw.rsplit("-", 1)[-1]) if raw else None
    if raw and not m:
        raise ValueError(f"NODE_ID={raw!r}: expected a number after the last '-' (e.g. pgherd-3)")
    return int(m.group(1)) if m else 0


def check_range(base: int, workers: int) -> None:
    last = base + workers - 1
    if base < 0 or last > MAX_NODE:
        raise ValueError(f"node numbers {base}..{last} (node_id {base} + {workers} workers) do not fit in "
                         f"10 bits (0..{MAX_NODE}); lower node_id or workers")
