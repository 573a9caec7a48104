"""Two-phase commit names and the decision record, shared by workers (commit) and the supervisor (recovery).

A transaction that wrote on several shards commits like this (the pattern Citus uses):

1. its first shard (the lowest number, the "decision shard") also inserts the transaction's id
   into DECISION_TABLE, inside the same transaction;
2. PREPARE TRANSACTION on every shard, with gid `pgherd_<txid>_<decision>_<shard>`;
3. COMMIT PREPARED on the decision shard: this commits the decision record, the commit point;
4. COMMIT PREPARED on the other shards, then the record is deleted.

Recovery can then settle any leftover prepared transaction from Postgres alone: its gid names the
decision shard; if the record exists there, the transaction committed (finish it with COMMIT
PREPARED); if not, and it has been prepared for a while (supervisor/recovery.py), nobody will
commit it (ROLLBACK PREPARED).
"""

from __future__ import annotations

import re
from typing import NamedTuple, Optional

GID_PREFIX = "pgherd_"
# The decision record lives in each shard database's public schema (schema-qualified, so a
# client's search_path cannot move it); pgherd's server user needs CREATE there once.
DECISION_TABLE = "public.pgherd_transactions"
CREATE_DECISION_TABLE = (f"CREATE TABLE IF NOT EXISTS {DECISION_TABLE} "
                         "(txid bigint PRIMARY KEY, created timestamptz NOT NULL DEFAULT now())")
_GID = re.compile(r"^pgherd_(\d+)_(\d+)_(\d+)$")


class Gid(NamedTuple):
    txid: int
    decision: int
    shard: int

    def __str__(self) -> str:
        return f"{GID_PREFIX}{self.txid}_{self.decision}_{self.shard}"


def parse_gid(gid: str) -> Optional[Gid]:
    m = _GID.match(gid)
    return Gid(int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None


def record_sql(txid: int) -> str:
    return f"INSERT INTO {DECISION_TABLE} (txid) VALUES ({int(txid)})"


def forget_sql(txid: int) -> str:
    return f"DELETE FROM {DECISION_TABLE} WHERE txid = {int(txid)}"


def decided_sql(txid: int) -> str:
    return f"SELECT 1 FROM {DECISION_TABLE} WHERE txid = {int(txid)}"
