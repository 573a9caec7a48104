"""A worker's end of the bus: hello/welcome, broadcasts, requests to the supervisor."""

from __future__ import annotations

import logging
import os

import trio
import zmq

from pgherd.shared.bus import messages as B
from pgherd.shared.bus.transport import BusSocket

log = logging.getLogger("pgherd.worker.link")

# How long a worker waits for the supervisor's Welcome before giving up: the
# supervisor answers in milliseconds; this only guards against a dead one.
WELCOME_TIMEOUT = 10.0
# Admin commands that aggregate over all workers wait this long for the supervisor.
ADMIN_TIMEOUT = 70.0


def endpoints(bus_dir: str) -> tuple[str, str]:
    return f"ipc://{os.path.join(bus_dir, 'pub')}", f"ipc://{os.path.join(bus_dir, 'router')}"


class WorkerLink:
    def __init__(self, index: int, bus_dir: str) -> None:
        self.index = index
        self.zctx = zmq.Context()
        pub, router = endpoints(bus_dir)
        dealer = self.zctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.IDENTITY, f"w{index}".encode())
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(router)
        sub = self.zctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.setsockopt(zmq.LINGER, 0)
        sub.connect(pub)
        self.dealer = BusSocket(dealer, self._on_message, name=f"worker {index} dealer")
        self.sub = BusSocket(sub, self._on_message, name=f"worker {index} sub")
        self.welcome: B.Welcome | None = None
        self._welcomed = trio.Event()
        self.ctx = None  # the WorkerContext, once serving
        self.shutdown = trio.Event()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as n:
            n.start_soon(self.dealer.run)
            n.start_soon(self.sub.run)
            task_status.started()

    async def hello(self) -> B.Welcome:
        self.dealer.send(B.Hello(index=self.index, pid=os.getpid()))
        with trio.fail_after(WELCOME_TIMEOUT):
            await self._welcomed.wait()
        return self.welcome

    def send(self, msg: B.Msg) -> None:
        self.dealer.send(msg)

    async def admin(self, command: str, arg: str | None) -> B.AdminReply | None:
        req = self.dealer.next_id()
        return await self.dealer.request(B.AdminCommand(req=req, command=command, arg=arg), ADMIN_TIMEOUT)

    async def _on_message(self, msg: B.Msg, _identity) -> None:
        ctx = self.ctx
        if isinstance(msg, B.Welcome):
            self.welcome = msg
            self._welcomed.set()
        elif isinstance(msg, B.AdminReply):
            self.dealer.resolve(msg.req, msg)
        elif isinstance(msg, B.HostStates):
            if self.welcome is not None:
                self.welcome.hosts = msg.hosts  # the latest word, for a worker not serving yet
            if ctx is not None:
                ctx.health.update(msg.hosts)
        elif ctx is None:
            return  # not serving yet: broadcasts will be repeated in the Welcome state
        elif isinstance(msg, B.Collect):
            from .stats import snapshot
            self.dealer.send(B.Collected(req=msg.req, index=self.index, data=snapshot(ctx)))
        elif isinstance(msg, B.CancelDeliver):
            await ctx.cancel(msg.pid, msg.secret)
        elif isinstance(msg, B.ConfigUpdate):
            ctx.reload(msg.config, msg.workers)
        elif isinstance(msg, B.State):
            ctx.set_state(msg.paused, msg.maintenance)
        elif isinstance(msg, B.Reconnect):
            ctx.reconnect()
        elif isinstance(msg, B.Shutdown):
            self.shutdown.set()

    def close(self) -> None:
        self.dealer.close()
        self.sub.close()
        self.zctx.term()
