"""The supervisor: starts and watches workers, brokers the bus, reloads, shuts down."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import psutil
import trio
import zmq

from pgherd import __version__
from pgherd.shared.backend_key import pid_owner
from pgherd.shared.bus import messages as B
from pgherd.shared.bus.transport import BusSocket

from . import admin as A
from .monitor import Monitor
from .recovery import Recovery
from .nodes import check_range, node_base
from .notify import Notifier

log = logging.getLogger("pgherd.supervisor")

# Restart backoff for a worker that died: 0.5 s, doubling, at most 30 s; reset
# once a worker has stayed up for BACKOFF_RESET seconds.
BACKOFF_START = 0.5
BACKOFF_MAX = 30.0
BACKOFF_RESET = 60.0
# How long to wait for every worker's Ready at startup before reporting.
STARTUP_TIMEOUT = 30.0
# A Collect fan-out waits this long for the workers' snapshots.
COLLECT_TIMEOUT = 2.0
# PAUSE waits for active servers to be released, checking this often, at most this long.
PAUSE_POLL = 0.1
PAUSE_MAX_WAIT = 60.0
# Extra time granted to workers beyond shutdown_timeout before they are killed.
SHUTDOWN_GRACE = 5.0


@dataclass
class WorkerProc:
    index: int
    node: int
    proc: trio.Process | None = None
    pid: int = 0
    state: str = "starting"
    started: float = 0.0
    restarts: int = 0
    backoff: float = BACKOFF_START
    last_exit_ms: int = 0
    ready: trio.Event = field(default_factory=trio.Event)
    failed_reason: str | None = None
    identity: bytes = b""


class Supervisor:
    def __init__(self, config, load_again, *, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.load_again = load_again  # () -> Config, raises ConfigError
        self.env = dict(os.environ if env is None else env)
        self.workers_n = max(1, config.worker_count())
        base = node_base(config.general.node_id, self.env)
        check_range(base, self.workers_n)
        self.workers = {i: WorkerProc(i, base + i, identity=f"w{i}".encode()) for i in range(self.workers_n)}
        self.paused: set[str] = set()
        self.maintenance: set[str] = set()
        self.notifier = Notifier(self.env)
        self.runtime_dir = ""
        self.stopping = trio.Event()
        self.exit_code = 0
        self._collects: dict[int, dict] = {}
        self._stats_prev: tuple[float, dict] | None = None
        self.avgs: dict[str, dict] = {}
        self.started = time.time()
        self.monitor = Monitor(config, self._publish_hosts)
        self.recovery = Recovery(config)

    # ------------------------------------------------------------ bus
    def _open_bus(self) -> None:
        self.runtime_dir = tempfile.mkdtemp(prefix="pgherd-")
        os.chmod(self.runtime_dir, 0o700)
        self.zctx = zmq.Context()
        pub = self.zctx.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.bind(f"ipc://{os.path.join(self.runtime_dir, 'pub')}")
        router = self.zctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.ROUTER_MANDATORY, 0)
        router.bind(f"ipc://{os.path.join(self.runtime_dir, 'router')}")
        self.pub = BusSocket(pub, name="supervisor pub")
        self.router = BusSocket(router, self._on_message, routed=True, name="supervisor router")

    def _close_bus(self) -> None:
        try:
            self.pub.close()
            self.router.close()
            self.zctx.term()
        finally:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def _publish_hosts(self, msg: B.HostStates) -> None:
        self.pub.send(msg)

    def config_data(self) -> dict:
        return self.config.model_dump(mode="json", exclude_unset=True)

    async def _on_message(self, msg: B.Msg, identity: bytes | None) -> None:
        if isinstance(msg, B.Hello):
            w = self.workers.get(msg.index)
            if w is None:
                return
            self.router.send(B.Welcome(config=self.config_data(), index=w.index, workers=self.workers_n,
                                       node=w.node, not_before_ms=w.last_exit_ms + 1 if w.last_exit_ms else 0,
                                       paused=sorted(self.paused), maintenance=sorted(self.maintenance),
                                       hosts=self.monitor.infos()),
                             identity)
        elif isinstance(msg, B.Ready):
            w = self.workers.get(msg.index)
            if w is not None:
                w.state = "serving"
                w.ready.set()
                log.info("worker %d (pid %d) serving", w.index, w.pid)
        elif isinstance(msg, B.StartFailed):
            w = self.workers.get(msg.index)
            if w is not None:
                w.failed_reason = msg.reason
        elif isinstance(msg, B.Collected):
            c = self._collects.get(msg.req)
            if c is not None:
                c["data"][msg.index] = msg.data
                if set(c["data"]) >= c["expect"]:
                    c["done"].set()
        elif isinstance(msg, B.CancelForward):
            owner = self.workers.get(pid_owner(msg.pid))
            if owner is not None and owner.state == "serving":
                self.router.send(B.CancelDeliver(pid=msg.pid, secret=msg.secret), owner.identity)
        elif isinstance(msg, B.HostFailed):
            self.monitor.host_failed(msg.key, msg.reason)
        elif isinstance(msg, B.AdminCommand):
            self._nursery.start_soon(self._admin, msg, identity)

    async def collect(self) -> list[dict]:
        """Every serving worker's snapshot (those that answer within COLLECT_TIMEOUT)."""
        req = self.router.next_id()
        expect = {i for i, w in self.workers.items() if w.state == "serving"}
        entry = self._collects[req] = {"expect": expect, "data": {}, "done": trio.Event()}
        if not expect:
            entry["done"].set()
        self.pub.send(B.Collect(req=req))
        with trio.move_on_after(COLLECT_TIMEOUT):
            await entry["done"].wait()
        del self._collects[req]
        return [entry["data"][i] for i in sorted(entry["data"])]

    # ------------------------------------------------------------ admin
    async def _admin(self, msg: B.AdminCommand, identity: bytes) -> None:
        try:
            reply = await self._admin_reply(msg)
        except Exception as exc:
            log.exception("admin command %s failed", msg.command)
            reply = B.AdminReply(req=msg.req, error=f"{msg.command} failed: {exc}", sqlstate="XX000")
        self.router.send(reply, identity)

    async def _admin_reply(self, msg: B.AdminCommand) -> B.AdminReply:
        cmd, arg, req = msg.command, msg.arg, msg.req
        if cmd == "SHOW":
            if arg == "VERSION":
                cols, rows = A.show_version()
            elif arg == "CONFIG":
                cols, rows = A.show_config(self.config)
            elif arg == "WORKERS":
                cols, rows = A.show_workers(await self.worker_table())
            elif arg == "REPLICATION":
                cols, rows = A.show_replication(self.monitor.snapshot())
            elif arg == "BANS":
                cols, rows = A.show_bans(self.monitor.snapshot())
            else:
                snaps = await self.collect()
                cols, rows = {
                    "POOLS": lambda: A.show_pools(snaps), "CLIENTS": lambda: A.show_clients(snaps),
                    "SERVERS": lambda: A.show_servers(snaps), "STATS": lambda: A.show_stats(snaps, self.avgs),
                    "LISTS": lambda: A.show_lists(snaps, self.config),
                    "QUERY_CACHE": lambda: A.show_query_cache(snaps)}[arg]()
            return B.AdminReply(req=req, columns=cols, rows=rows, tag=f"SHOW")
        if cmd == "RELOAD":
            ok, reason = await self.reload()
            if not ok:
                return B.AdminReply(req=req, error=f"configuration rejected, still serving the old one: {reason}",
                                    sqlstate="F0000")
            return B.AdminReply(req=req, tag="RELOAD")
        if cmd in ("PAUSE", "RESUME", "MAINTENANCE ON", "MAINTENANCE OFF"):
            return await self._gate_command(req, cmd, arg)
        if cmd in ("BAN", "UNBAN"):
            return await self._ban_command(req, cmd, arg or "")
        if cmd == "HEALTHCHECK":
            cols, rows = A.show_healthcheck(await self.monitor.check_now())
            return B.AdminReply(req=req, columns=cols, rows=rows, tag="HEALTHCHECK")
        if cmd == "RECONNECT":
            self.pub.send(B.Reconnect())
            await self.collect()  # applied by every worker before we answer
            return B.AdminReply(req=req, tag="RECONNECT")
        if cmd == "SHUTDOWN":
            self.request_stop("SHUTDOWN from the admin console")
            return B.AdminReply(req=req, tag="SHUTDOWN")
        return B.AdminReply(req=req, error=f"unknown command {cmd}", sqlstate="42601")

    async def _gate_command(self, req: int, cmd: str, arg: str | None) -> B.AdminReply:
        target = arg or "*"
        if arg is not None and arg not in self.config.database_names():
            return B.AdminReply(req=req, error=f'no such database: "{arg}"', sqlstate="3D000")
        gate = self.paused if cmd in ("PAUSE", "RESUME") else self.maintenance
        if cmd in ("PAUSE", "MAINTENANCE ON"):
            gate.add(target)
        elif target == "*":
            gate.clear()
        else:
            gate.discard(target)
        self.pub.send(B.State(paused=sorted(self.paused), maintenance=sorted(self.maintenance)))
        # Broadcasts (PUB) and replies (ROUTER) are not ordered with each other; a
        # Collect goes out on PUB after the State, so once every worker has answered
        # it, every worker has applied the State and the command may return.
        await self.collect()
        notice = None
        if cmd == "PAUSE":
            # PgBouncer's PAUSE returns once no server is in use for the database.
            deadline = trio.current_time() + PAUSE_MAX_WAIT
            while True:
                busy = sum(p["sv_active"] for p in A.merge_pools(await self.collect())
                           if target == "*" or p["database"] == target)
                if busy == 0:
                    break
                if trio.current_time() > deadline:
                    notice = f"PAUSE: {busy} server connection(s) still in use after {PAUSE_MAX_WAIT:.0f}s"
                    break
                await trio.sleep(PAUSE_POLL)
        return B.AdminReply(req=req, tag=cmd.split()[0], notice=notice)

    async def _ban_command(self, req: int, cmd: str, arg: str) -> B.AdminReply:
        try:
            keys = self.monitor.ban(arg) if cmd == "BAN" else self.monitor.unban(arg)
        except LookupError as exc:
            return B.AdminReply(req=req, error=str(exc), sqlstate="42704")
        # The monitor broadcast the new state on PUB; a Collect after it returns once every
        # worker has applied it (see _gate_command).
        await self.collect()
        if cmd == "BAN":
            notice = f"banned for {self.monitor.ban_timeout:g} s: " + ", ".join(keys)
        else:
            notice = "unbanned: " + ", ".join(keys)
        return B.AdminReply(req=req, tag=cmd, notice=notice)

    async def worker_table(self) -> dict:
        snaps = {s["index"]: s for s in await self.collect()}
        out = {}
        now = time.time()
        for i, w in self.workers.items():
            cpu = rss = 0
            if w.pid:
                try:
                    p = psutil.Process(w.pid)
                    t = p.cpu_times()
                    cpu, rss = t.user + t.system, p.memory_info().rss
                except psutil.Error:
                    pass
            out[i] = {"pid": w.pid, "node": w.node, "state": w.state, "restarts": w.restarts,
                      "uptime": now - w.started if w.started else 0,
                      "clients": len(snaps.get(i, {}).get("clients", [])), "cpu_seconds": cpu, "rss_bytes": rss}
        return out

    # ------------------------------------------------------------ reload
    async def reload(self) -> tuple[bool, str]:
        from pgherd.config import ConfigError

        self.notifier.reloading()
        try:
            new = await trio.to_thread.run_sync(self.load_again)
        except ConfigError as exc:
            reason = "; ".join(exc.errors)
            log.error("reload rejected, keeping the running configuration: %s", reason)
            self.notifier.ready("serving (reload rejected)")
            return False, reason
        except Exception as exc:  # e.g. the file vanished
            log.error("reload failed, keeping the running configuration: %s", exc)
            self.notifier.ready("serving (reload failed)")
            return False, str(exc)
        if max(1, new.worker_count()) != self.workers_n:
            log.warning("workers changed from %d to %d: takes effect after a restart", self.workers_n,
                        new.worker_count())
        self.config = new
        self.pub.send(B.ConfigUpdate(config=self.config_data(), workers=self.workers_n))
        self.monitor.reload(new)  # broadcasts the hosts of the new config
        self.recovery.reload(new)
        # Pause and maintenance state survive a reload: re-send it with the new config.
        self.pub.send(B.State(paused=sorted(self.paused), maintenance=sorted(self.maintenance)))
        await self.collect()  # every worker has applied the new config before RELOAD returns
        for key in new.unsupported_keys():
            log.warning("config key %s is accepted but not supported yet; it has no effect", key)
        log.info("configuration reloaded")
        self.notifier.ready(self.status_line())
        return True, ""

    # ------------------------------------------------------------ workers
    def _spawn_args(self, w: WorkerProc) -> list[str]:
        return [sys.executable, "-m", "pgherd.worker", "--index", str(w.index), "--bus", self.runtime_dir]

    async def _run_worker(self, w: WorkerProc) -> None:
        """Start worker w and restart it whenever it dies, until shutdown."""
        while not self.stopping.is_set():
            w.ready = trio.Event()
            w.failed_reason = None
            w.state = "starting"
            w.proc = await trio.lowlevel.open_process(self._spawn_args(w), stdin=subprocess.DEVNULL,
                                                      start_new_session=False)
            w.pid = w.proc.pid
            w.started = time.time()
            code = await w.proc.wait()
            w.last_exit_ms = int(time.time() * 1000)
            if self.stopping.is_set():
                w.state = "stopped"
                return
            w.state = "restarting"
            w.restarts += 1
            up = time.time() - w.started
            if up > BACKOFF_RESET:
                w.backoff = BACKOFF_START
            why = w.failed_reason or f"exit status {code}"
            log.error("worker %d (pid %d) died after %.1fs (%s); restarting in %.1fs", w.index, w.pid, up,
                      why, w.backoff)
            with trio.move_on_after(w.backoff):
                await self.stopping.wait()
            w.backoff = min(BACKOFF_MAX, w.backoff * 2)

    def status_line(self) -> str:
        serving = sum(1 for w in self.workers.values() if w.state == "serving")
        g = self.config.general
        return f"{serving}/{self.workers_n} workers serving on {g.host}:{g.port}"

    def request_stop(self, why: str) -> None:
        if not self.stopping.is_set():
            log.info("shutting down: %s", why)
            self.stopping.set()

    # ------------------------------------------------------------ main
    async def run(self) -> int:
        self._open_bus()
        try:
            async with trio.open_nursery() as n:
                self._nursery = n
                n.start_soon(self.pub.run)
                n.start_soon(self.router.run)
                n.start_soon(self.monitor.run)  # before the workers: their Welcome carries its state
                n.start_soon(self.recovery.run)
                with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as sigs:
                    n.start_soon(self._signals, sigs)
                    for w in self.workers.values():
                        n.start_soon(self._run_worker, w)
                    if not await self._await_startup():
                        self.exit_code = 1
                        self.request_stop("no worker could start")
                    else:
                        n.start_soon(self._stats_loop)
                        if self.notifier.watchdog_interval:
                            n.start_soon(self._watchdog)
                        if self.config.general.openmetrics_port:
                            from .metrics import serve_metrics
                            n.start_soon(serve_metrics, self)
                    await self.stopping.wait()
                    await self._shutdown()
                    n.cancel_scope.cancel()
        finally:
            self._close_bus()
        return self.exit_code

    async def _await_startup(self) -> bool:
        with trio.move_on_after(STARTUP_TIMEOUT):
            async with trio.open_nursery() as n:
                for w in self.workers.values():
                    n.start_soon(self._wait_ready_or_fail, w)
        serving = [w for w in self.workers.values() if w.state == "serving"]
        for w in self.workers.values():
            if w.state != "serving":
                log.error("worker %d did not start: %s", w.index, w.failed_reason or "no Ready in time")
        if not serving:
            return False
        log.info("pgherd %s: %s", __version__, self.status_line())
        self.notifier.ready(self.status_line())
        return True

    async def _wait_ready_or_fail(self, w: WorkerProc) -> None:
        while not w.ready.is_set():
            if w.failed_reason is not None or (w.restarts > 0 and w.state != "serving"):
                return
            with trio.move_on_after(0.05):
                await w.ready.wait()

    async def _signals(self, sigs) -> None:
        async for signum in sigs:
            if signum == signal.SIGHUP:
                log.info("SIGHUP: reloading configuration")
                await self.reload()
            elif self.stopping.is_set():
                log.warning("second %s: exiting now", signal.Signals(signum).name)
                for w in self.workers.values():
                    if w.proc is not None and w.proc.returncode is None:
                        w.proc.kill()
                self._close_bus()
                os._exit(1)
            else:
                self.request_stop(signal.Signals(signum).name)

    async def _shutdown(self) -> None:
        self.notifier.stopping()
        self.pub.send(B.Shutdown())
        for w in self.workers.values():
            if w.proc is not None and w.proc.returncode is None:
                try:
                    w.proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        limit = self.config.general.shutdown_timeout / 1000 + SHUTDOWN_GRACE
        with trio.move_on_after(limit):
            for w in self.workers.values():
                if w.proc is not None:
                    await w.proc.wait()
        for w in self.workers.values():
            if w.proc is not None and w.proc.returncode is None:
                log.warning("worker %d did not stop in time: killing it", w.index)
                w.proc.kill()
                await w.proc.wait()
        log.info("pgherd stopped")

    async def _stats_loop(self) -> None:
        period = max(1.0, self.config.general.stats_period / 1000)
        while True:
            snaps = await self.collect()
            now = trio.current_time()
            totals = A.database_totals(snaps)
            if self._stats_prev is not None:
                t0, prev = self._stats_prev
                self.avgs = A.averages(prev, totals, now - t0)
            self._stats_prev = (now, totals)
            await trio.sleep(period)

    async def _watchdog(self) -> None:
        while True:
            self.notifier.watchdog()
            await trio.sleep(self.notifier.watchdog_interval)


def run_supervisor(config, load_again) -> int:
    try:
        sup = Supervisor(config, load_again)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    return trio.run(sup.run)
