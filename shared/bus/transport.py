"""The trio <-> ZeroMQ adapter: one task owns each socket (DESIGN.md, "Processes").

pyzmq has no trio support and zmq.FD is edge-triggered: any call on the socket
may consume the edge.  So only the owning task touches the socket; it drains
with NOBLOCK calls, re-checks EVENTS after zmq.Again, and only then waits on the
FD.  Other tasks hand outgoing messages to the owner through a queue and wake it.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from typing import Awaitable, Callable

import trio
import zmq

from .messages import Msg, decode, encode

log = logging.getLogger("pgherd.bus")

# Safety net against a missed FD edge: the owner re-checks the socket at least
# this often even if the FD never signals (costs nothing measurable when idle).
EDGE_SAFETY_POLL = 0.25
# Outgoing messages kept while a peer is slow or gone; beyond this, drop the
# oldest (bus messages are control traffic, never data).
MAX_QUEUED = 100_000

Handler = Callable[[Msg, bytes | None], Awaitable[None] | None]


class BusSocket:
    """A zmq socket driven by one trio task (`run`)."""

    def __init__(self, sock: zmq.Socket, handler: Handler | None = None, *, routed: bool = False,
                 name: str = "bus") -> None:
        self.sock = sock
        self.handler = handler
        self.routed = routed  # ROUTER: frames are [identity, payload]
        self.name = name
        self._out: deque[list[bytes]] = deque()
        self._wait_scope: trio.CancelScope | None = None
        self._fd = sock.getsockopt(zmq.FD)
        self._can_recv = sock.type != zmq.PUB
        self._pending: dict[int, trio.Event] = {}
        self._replies: dict[int, Msg] = {}
        self._ids = itertools.count(1)

    # ------------------------------------------------------------ sending
    def send(self, msg: Msg, identity: bytes | None = None) -> None:
        """Queue a message (never blocks); the owner task sends it."""
        frames = [identity, encode(msg)] if self.routed else [encode(msg)]
        if len(self._out) >= MAX_QUEUED:
            self._out.popleft()
            log.warning("%s: outgoing queue full, dropping the oldest message", self.name)
        self._out.append(frames)
        if self._wait_scope is not None:
            self._wait_scope.cancel()

    def next_id(self) -> int:
        return next(self._ids)

    async def request(self, msg: Msg, timeout: float) -> Msg | None:
        """Send msg (which carries msg.req) and wait for the reply with the same req."""
        req = msg.req  # type: ignore[attr-defined]
        event = self._pending[req] = trio.Event()
        self.send(msg)
        try:
            with trio.move_on_after(timeout):
                await event.wait()
            return self._replies.pop(req, None)
        finally:
            self._pending.pop(req, None)

    def resolve(self, req: int, msg: Msg) -> bool:
        """Deliver a reply to a waiting request(); False if nobody waits for it."""
        event = self._pending.get(req)
        if event is None:
            return False
        self._replies[req] = msg
        event.set()
        return True

    # ------------------------------------------------------------ the owner task
    async def run(self) -> None:
        sock = self.sock
        while True:
            self._flush()
            received = self._drain()
            for identity, msg in received:
                if self.handler is not None:
                    try:
                        res = self.handler(msg, identity)
                        if res is not None:
                            await res
                    except Exception:
                        log.exception("%s: handler failed for %s", self.name, type(msg).__name__)
            if received:
                continue
            events = sock.getsockopt(zmq.EVENTS)
            if (self._can_recv and events & zmq.POLLIN) or (self._out and events & zmq.POLLOUT):
                continue
            self._wait_scope = trio.CancelScope()
            with self._wait_scope:
                with trio.move_on_after(EDGE_SAFETY_POLL):
                    await trio.lowlevel.wait_readable(self._fd)
            self._wait_scope = None
            await trio.lowlevel.checkpoint()

    def _flush(self) -> None:
        while self._out:
            try:
                self.sock.send_multipart(self._out[0], zmq.NOBLOCK)
            except zmq.Again:
                return  # high-water mark: retry when EVENTS says POLLOUT
            except zmq.ZMQError as exc:
                log.warning("%s: send failed: %s", self.name, exc)
            self._out.popleft()

    def _drain(self, limit: int = 1000) -> list[tuple[bytes | None, Msg]]:
        out = []
        if not self._can_recv:
            return out
        for _ in range(limit):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            identity = frames[0] if self.routed and len(frames) > 1 else None
            msg = decode(frames[-1])
            if msg is not None:
                out.append((identity, msg))
        return out

    def close(self) -> None:
        self.sock.close(linger=0)
