"""A worker process's entry point: serve clients until told to stop."""

from __future__ import annotations

import logging
import signal

import trio

from pgherd.shared import net

from .client import ClientSession
from .context import WorkerContext
from .listener import accept_loop, bind_listener

log = logging.getLogger("pgherd.worker")

# While draining at shutdown, check for finished transactions this often.
DRAIN_POLL = 0.05


async def serve(config, index: int = 0, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve clients of `config` until SIGINT/SIGTERM; then drain and return."""
    ctx = WorkerContext(config, index)
    g = config.general
    listeners = bind_listener(g.host, g.port)
    log.info("worker %d listening on %s:%d", index, g.host, g.port)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as clients:
            async with trio.open_nursery() as service:
                for sock in listeners:
                    service.start_soon(accept_loop, sock, clients, _handler(ctx))
                service.start_soon(ctx.maintenance_loop)
                task_status.started(ctx)
                async for signum in signals:
                    log.info("worker %d: %s received, shutting down", index, signal.Signals(signum).name)
                    break
                service.cancel_scope.cancel()
            for sock in listeners:
                net.close_quietly(sock)
            await _drain(ctx, clients, signals)
    ctx.close()
    log.info("worker %d stopped", index)


async def _drain(ctx: WorkerContext, clients: trio.Nursery, signals) -> None:
    """Let transactions in flight finish (up to shutdown_timeout), then close everyone."""
    with trio.move_on_after(ctx.shutdown_timeout):
        async with trio.open_nursery() as n:
            async def second_signal():
                async for _ in signals:
                    log.info("second signal: exiting now")
                    n.cancel_scope.cancel()
                    return

            n.start_soon(second_signal)
            while any(c.server is not None or c.state in ("login", "waiting")
                      for c in ctx.clients.values()):
                await trio.sleep(DRAIN_POLL)
            n.cancel_scope.cancel()
    clients.cancel_scope.cancel()


def _handler(ctx: WorkerContext):
    async def handle(sock, addr) -> None:
        session = ClientSession(ctx, sock, addr)
        try:
            await session.run()
        except Exception:
            # One client's bug must never take the worker down.
            log.exception("client %s: unexpected error", addr)
            net.close_quietly(sock)
    return handle


def run_worker(config, index: int = 0) -> None:
    """Blocking entry point (the supervisor starts this in a fresh process)."""
    trio.run(serve, config, index)
