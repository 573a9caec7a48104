"""A worker process's entry point: serve clients until told to stop."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import time

import trio

from pgherd.shared import net
from pgherd.shared.logs import setup_logging
from pgherd.shared.wire import scan

from .client import ClientSession
from .context import WorkerContext
from .fastpath import Reactor
from .listener import accept_loop, bind_listener

log = logging.getLogger("pgherd.worker")

# While draining at shutdown, check for finished transactions this often.
DRAIN_POLL = 0.05
# A worker whose supervisor died stops serving (no orphan keeps the port with a
# stale configuration): it checks its parent this often. (PR_SET_PDEATHSIG does
# not fit: it fires when the *thread* that spawned the worker exits, and trio
# spawns processes from its thread cache.)
PARENT_CHECK_INTERVAL = 1.0
# Exit status of a worker that could not start serving (the supervisor reports it).
EXIT_START_FAILED = 3


async def serve(config, index: int = 0, *, link=None, workers: int = 1, node: int = 0,
                task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve clients of `config` until SIGTERM (or SIGINT alone) or a Shutdown; then drain.

    Under a supervisor the worker ignores SIGINT (a terminal's Ctrl-C reaches the
    whole process group; the supervisor turns it into an orderly shutdown) and
    never treats a repeated signal as "exit now": the supervisor decides that
    and kills workers itself.
    """
    ctx = WorkerContext(config, index, workers=workers, link=link, node=node)
    supervised = link is not None
    stop_signals = (signal.SIGTERM,) if supervised else (signal.SIGTERM, signal.SIGINT)
    g = config.general
    listeners = bind_listener(g.host, g.port)
    log.info("worker %d listening on %s:%d", index, g.host, g.port)
    if index == 0 and not scan.ACCELERATED:
        log.warning("the C extension pgherd.shared.wire._scan is not in use (not built, or PGHERD_NO_SPEEDUPS "
                    "set): the fast path scans in Python, at more CPU per transaction")
    if link is not None:
        link.ctx = ctx
    with trio.open_signal_receiver(*stop_signals) as signals:
        async with _fast_path(ctx), trio.open_nursery() as clients:
            async with trio.open_nursery() as service:
                for sock in listeners:
                    service.start_soon(accept_loop, sock, clients, _handler(ctx))
                service.start_soon(ctx.maintenance_loop)
                if g.pub_sub_channel_size > 0:
                    from .pubsub import PubSub
                    ctx.pubsub = PubSub(service, g.pub_sub_channel_size)
                task_status.started(ctx)
                stop = trio.Event()

                async def on_signal():
                    async for signum in signals:
                        log.info("worker %d: %s received, shutting down", index, signal.Signals(signum).name)
                        stop.set()
                        return

                async def on_shutdown():
                    await link.shutdown.wait()
                    log.info("worker %d: shutdown requested by the supervisor", index)
                    stop.set()

                service.start_soon(on_signal)
                if link is not None:
                    service.start_soon(on_shutdown)
                await stop.wait()
                service.cancel_scope.cancel()
            for sock in listeners:
                net.close_quietly(sock)
            await _drain(ctx, clients, None if supervised else signals)
    ctx.close()
    log.info("worker %d stopped", index)


@contextlib.asynccontextmanager
async def _fast_path(ctx: WorkerContext):
    """Run the fast path's reactor (worker/fastpath.py) for as long as any client may park there."""
    ctx.reactor = Reactor()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ctx.reactor.run)
        yield
        nursery.cancel_scope.cancel()


async def _drain(ctx: WorkerContext, clients: trio.Nursery, signals) -> None:
    """Let transactions in flight finish (up to shutdown_timeout), then close everyone."""
    with trio.move_on_after(ctx.shutdown_timeout):
        async with trio.open_nursery() as n:
            async def second_signal():
                async for _ in signals:
                    log.info("second signal: exiting now")
                    n.cancel_scope.cancel()
                    return

            if signals is not None:
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


async def _watch_parent(link, parent: int) -> None:
    while os.getppid() == parent:
        await trio.sleep(PARENT_CHECK_INTERVAL)
    log.error("the supervisor (pid %d) is gone: shutting down", parent)
    link.shutdown.set()


def run_worker_process(index: int, bus_dir: str) -> int:
    """Entry point of `python -m pgherd.worker`: get the config over the bus and serve."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    setup_logging()
    return trio.run(_worker_process, index, bus_dir)


async def _worker_process(index: int, bus_dir: str) -> int:
    from pgherd.config import Config
    from pgherd.shared.bus.messages import Ready, StartFailed

    from .link import WorkerLink

    link = WorkerLink(index, bus_dir)
    try:
        async with trio.open_nursery() as n:
            await n.start(link.run)
            n.start_soon(_watch_parent, link, os.getppid())
            welcome = await link.hello()
            config = Config.model_validate(welcome.config)
            setup_logging(config.general.log_level)
            wait = welcome.not_before_ms / 1000 - time.time()
            if wait > 0:
                # unique_id(): a restarted worker must not reuse its predecessor's milliseconds.
                await trio.sleep(wait)
            async def serve_then_stop(task_status=trio.TASK_STATUS_IGNORED):
                await serve(config, index, link=link, workers=welcome.workers, node=welcome.node,
                            task_status=task_status)
                n.cancel_scope.cancel()  # stop the bus tasks too

            try:
                ctx = await n.start(serve_then_stop)
            except OSError as exc:
                log.error("worker %d cannot start: %s", index, exc)
                link.send(StartFailed(index=index, reason=str(exc)))
                await trio.sleep(0.2)  # let the message go out
                n.cancel_scope.cancel()
                return EXIT_START_FAILED
            ctx.set_state(welcome.paused, welcome.maintenance)
            ctx.health.update(welcome.hosts)  # bans and roles from the supervisor's monitor
            link.send(Ready(index=index))
            # What is loaded by now (modules, the config, pglast) lives as long as the worker:
            # out of the cyclic GC's reach, a full collection takes under a millisecond instead
            # of pausing every client for about 13 ms (measured on the bench machine).
            gc.freeze()
    finally:
        link.close()
    return 0
