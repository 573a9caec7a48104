"""Messages on the supervisor <-> worker bus: pydantic schemas, orjson on the wire.

Every message has a `type` and a version `v`; a receiver drops (and logs) any
message it cannot decode instead of failing.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ValidationError

log = logging.getLogger("pgherd.bus")

# Bumped when a message's meaning changes incompatibly; a peer with another
# version (e.g. mid-upgrade) is ignored rather than misread.
BUS_VERSION = 1


class Msg(BaseModel):
    type: str
    v: int = BUS_VERSION


# ---------------------------------------------------------------- worker -> supervisor
class Hello(Msg):
    """A worker announces itself and asks for its configuration."""
    type: Literal["hello"] = "hello"
    index: int
    pid: int


class Ready(Msg):
    """The worker is listening and serving."""
    type: Literal["ready"] = "ready"
    index: int


class StartFailed(Msg):
    """The worker cannot serve (e.g. the port is taken); it exits after sending this."""
    type: Literal["start_failed"] = "start_failed"
    index: int
    reason: str


class AdminCommand(Msg):
    """An admin console command to run instance-wide (SHOW …, PAUSE, RELOAD, …)."""
    type: Literal["admin"] = "admin"
    req: int
    command: str
    arg: str | None = None


class CancelForward(Msg):
    """A CancelRequest for a pid another worker owns."""
    type: Literal["cancel"] = "cancel"
    pid: int
    secret: int


class HostFailed(Msg):
    """A worker could not connect to (or lost) a host: ban it in every worker."""
    type: Literal["host_failed"] = "host_failed"
    key: str  # shared/hosts.host_key
    reason: str


class Collected(Msg):
    """A worker's answer to Collect: its snapshot of pools, clients, servers, stats."""
    type: Literal["collected"] = "collected"
    req: int
    index: int
    data: dict[str, Any]


class HostInfo(BaseModel):
    """What the supervisor's monitor knows about one host (one [[databases]] entry)."""
    key: str  # shared/hosts.host_key
    role: str  # "primary" or "replica": the configured role, or the detected one for role = "auto"
    banned: bool = False
    ban_reason: str | None = None
    banned_until: float | None = None  # wall-clock seconds
    healthy: bool = True
    in_recovery: bool | None = None
    lsn: int | None = None  # bytes, from pg_current_wal_lsn() / pg_last_wal_replay_lsn()
    lag_bytes: int | None = None
    lag_ms: float | None = None


# ---------------------------------------------------------------- supervisor -> worker
class Welcome(Msg):
    """Reply to Hello: the configuration and this worker's identity."""
    type: Literal["welcome"] = "welcome"
    config: dict[str, Any]
    index: int
    workers: int
    node: int
    not_before_ms: int = 0  # unique_id(): do not issue ids at or before this millisecond
    paused: list[str] = []
    maintenance: list[str] = []
    hosts: list[HostInfo] = []


class AdminReply(Msg):
    type: Literal["admin_reply"] = "admin_reply"
    req: int
    columns: list[str] = []
    rows: list[list[Any]] = []
    tag: str = ""
    error: str | None = None
    sqlstate: str | None = None
    notice: str | None = None


class Collect(Msg):
    """Broadcast: every worker answers with a Collected snapshot."""
    type: Literal["collect"] = "collect"
    req: int


class ConfigUpdate(Msg):
    """Broadcast after a successful reload."""
    type: Literal["config"] = "config"
    config: dict[str, Any]
    workers: int


class State(Msg):
    """Broadcast: pause and maintenance state ("*" means every database)."""
    type: Literal["state"] = "state"
    paused: list[str] = []
    maintenance: list[str] = []


class Reconnect(Msg):
    """Broadcast: replace server connections after their current use."""
    type: Literal["reconnect"] = "reconnect"


class Shutdown(Msg):
    """Broadcast: stop accepting, drain, exit."""
    type: Literal["shutdown"] = "shutdown"


class HostStates(Msg):
    """Broadcast: every monitored host's role and ban state (sent whenever one changes)."""
    type: Literal["hosts"] = "hosts"
    hosts: list[HostInfo] = []


class CancelDeliver(Msg):
    """To the owning worker: cancel the query of client `pid` if the secret matches."""
    type: Literal["cancel_deliver"] = "cancel_deliver"
    pid: int
    secret: int


_TYPES: dict[str, type[Msg]] = {
    cls.model_fields["type"].default: cls
    for cls in (Hello, Ready, StartFailed, AdminCommand, CancelForward, Collected, Welcome,
                AdminReply, Collect, ConfigUpdate, State, Reconnect, Shutdown, CancelDeliver,
                HostFailed, HostStates)
}


def encode(msg: Msg) -> bytes:
    return orjson.dumps(msg.model_dump(mode="json"))


def decode(raw: bytes) -> Msg | None:
    """The message in raw, or None (logged) if it is malformed, unknown or another version."""
    try:
        data = orjson.loads(raw)
        cls = _TYPES.get(data.get("type")) if isinstance(data, dict) else None
        if cls is None:
            log.warning("bus: dropping message of unknown type %r", data.get("type") if isinstance(data, dict) else data)
            return None
        if data.get("v") != BUS_VERSION:
            log.warning("bus: dropping %s message of version %r (this side speaks %d)", cls.__name__,
                        data.get("v"), BUS_VERSION)
            return None
        return cls.model_validate(data)
    except (orjson.JSONDecodeError, ValidationError, TypeError) as exc:
        log.warning("bus: dropping malformed message: %s", str(exc).splitlines()[0])
        return None
