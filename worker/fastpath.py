"""The worker's fast path: plain requests served from one epoll, without waking client tasks.

A client task costs trio a task switch, a cancel-scope check and an epoll registration
for every wait: twice per transaction (wait for the client, wait for the server).
Measured on the 2-core bench machine, a byte forwarder built as one task per client
spends about 40 µs of CPU per `pgbench -S` transaction; the same forwarder driven by
callbacks from one epoll spends about 25 µs. So a client whose next request is plain
(see ClientSession._fast_ok) parks its task here, and one Reactor per worker:

- waits in its own epoll set whenever trio has nothing else to do (Reactor.before_io_wait,
  a trio instrument hook; the set includes trio's own epoll fd), then runs callbacks for the
  ready sockets outside any task, so a transaction costs no trio scheduling at all;
- reads the client's request; if it is whole Query (or, without prepared-statement
  rewriting, unnamed extended) messages ending in Query or Sync, checks out an idle
  server (or queues for one in the pool's FIFO, with checkout_timeout), sends it and
  relays the reply, using the client's own synchronous bookkeeping (_scan_client,
  _scan_server, _maybe_release) so the accounting is the slow path's; the common
  request and reply are recognised by one scan each (shared/wire/scan.py, in C);
- hands the client back to its task (with a code saying what is left to do) whenever
  anything needs waiting or anything unusual happens: a partial message, a short
  send, a lost server, a SET it could answer locally, a server with other settings,
  an open slot to connect, a cancel request, a bug.

Sockets are registered edge-triggered.  A client's socket is registered while its
task is parked here; a server's stays registered once used (events for a server not
in flight here are ignored), so the steady state costs no epoll_ctl per transaction.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import select
import socket
from collections import deque

import outcome
import trio

from pgherd.shared import net
from pgherd.shared.wire import errors as E
from pgherd.shared.wire import protocol as P
from pgherd.shared.wire.scan import reply_end as _reply_end

log = logging.getLogger("pgherd.fastpath")

# What the reactor hands back to a parked client task (ClientSession._relay_loop):
#   0      nothing read: read the client yourself
#   n > 0  n bytes read into buf[end:], not yet accounted
#   < 0    one of these, handled by ClientSession._fast_resume
SENT = -1  # request sent (maybe partly: fast_out), reply maybe partly relayed (fast_reply_end)
LOST = -2  # the server went away mid-request
ATTACHED = -3  # checked out fast_srv, which needs _prepare_server (settings, TLS) before the request
WAIT_TIMEOUT = -4  # queued for a server past checkout_timeout
WAIT_CANCELLED = -5  # queued for a server when a CancelRequest came
WAIT_SLOT = -6  # queued for a server; woken with a free slot to open a connection in

# ClientSession.fast_state
TASK, IDLE, WAITING, FLIGHT = 0, 1, 2, 3

# Edge-triggered, with the peer's close reported as such: after a short read, data and a close
# that arrived together would otherwise leave the close unseen until a read that never comes.
_EDGE_IN = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
# The expectations whose ReadyForQuery ClientSession._scan_server only counts (no SET to settle).
_PLAIN_EXPECT = frozenset([P.F_QUERY, P.F_SYNC])
_F_QUERY, _TX_IDLE = P.F_QUERY, P.TX_IDLE
_HUP = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_NETWORK_GONE = (ConnectionResetError, BrokenPipeError, TimeoutError)
_MAX_WAIT = 3600.0  # seconds: the longest single epoll wait (no timer due)


def _trio_runner():
    """trio's run loop, if the reactor may wait in its own epoll (Reactor.before_io_wait).

    That needs three of trio's internals, checked here so that another trio falls
    back to the plain loop: the run queue, the epoll set and its forced wake-up.
    The system clock, too: tests' autojump clocks need trio to do the waiting.
    """
    try:
        from trio._core._run import GLOBAL_RUN_CONTEXT, SystemClock
        runner = GLOBAL_RUN_CONTEXT.runner
        ok = (type(runner.clock) is SystemClock and not runner.is_guest
              and isinstance(runner.io_manager._epoll, select.epoll)
              and callable(runner.io_manager.force_wakeup) and hasattr(runner.runq, "__len__"))
    except (ImportError, AttributeError):
        return None
    return runner if ok else None


class _IdleHook(trio.abc.Instrument):
    """trio calls before_io_wait each time round its loop, after the last runnable task."""

    def __init__(self, reactor: "Reactor") -> None:
        self.before_io_wait = reactor.before_io_wait


class _Waiter:
    """A parked client's place in a pool's FIFO (the pool calls event.set() on it)."""
    __slots__ = ("reactor", "client", "server", "may_connect", "done", "pool", "started")

    def __init__(self, reactor: "Reactor", client, pool) -> None:
        self.reactor = reactor
        self.client = client
        self.pool = pool
        self.server = None
        self.may_connect = False
        self.done = False
        self.started = reactor.now

    @property
    def event(self) -> "_Waiter":
        return self

    def is_set(self) -> bool:
        return self.done

    def set(self) -> None:
        self.done = True
        self.reactor._run(self.reactor._served, self.client)

    def leave(self) -> None:
        """Out of the pool's queue and its statistics (served, timed out or cancelled)."""
        self.pool.wait_time += self.reactor.now - self.started


class Reactor:
    def __init__(self) -> None:
        self.ep = select.epoll()
        self.registered: dict[int, socket.socket] = {}  # fd -> the socket registered under it
        self.owner: dict[int, object] = {}  # fd -> the ClientSession served here
        # Registered server fds that became readable while not in flight here (used by a client
        # task, or closed by Postgres while idle): re-armed before their next flight.
        self.stale: set[int] = set()
        self.deadlines: list = []  # heap of (checkout deadline, seq, waiter)
        self._seq = itertools.count()
        self._busy = False
        self._pending: deque = deque()
        self.closed = False
        self._runner = None  # trio's run loop, when the reactor waits in before_io_wait
        self._trio_fd = -1
        # trio's clock, read once per wake-up for everything the callbacks time (as PgBouncer's
        # cached time): checkout, check-in, query and transaction statistics.
        self._clock = trio.current_time
        self.now = 0.0

    # ---------------------------------------------------------------- the task
    async def run(self) -> None:
        runner = _trio_runner()
        try:
            if runner is None:
                await self._run_in_trio()
            else:
                self._runner = runner
                self._clock = runner.clock.current_time
                self._trio_fd = runner.io_manager._epoll.fileno()
                self.ep.register(self._trio_fd, select.EPOLLIN)
                instrument = _IdleHook(self)
                trio.lowlevel.add_instrument(instrument)
                try:
                    await trio.sleep_forever()
                finally:
                    with contextlib.suppress(KeyError):  # (trio drops an instrument that raised)
                        trio.lowlevel.remove_instrument(instrument)
        except Exception:
            # Never take the worker down: the clients carry on in their own tasks.
            log.exception("fast path stopped; clients are served by their own tasks from now on")
        finally:
            self._close()

    def before_io_wait(self, timeout: float) -> None:
        """trio is about to wait for its I/O (every task has run): serve the parked clients.

        Busy (timeout 0): a look at the reactor's sockets in passing. Idle: wait in
        the reactor's own epoll rather than trio's, for as long as trio would have
        (the timeout is its next timer). trio's epoll set is a member of ours, so its
        sockets' events (other tasks' I/O, run_sync_soon from threads, signals) end
        the wait and trio's own wait then returns at once. A callback here that
        makes a task runnable, or trio's timer coming due, also ends it, and a
        forced wake-up keeps trio from waiting out its timeout again. With only
        parked clients about, a transaction costs two epoll_waits and no trio
        scheduling at all.
        """
        if not self.owner or self.closed:
            return
        try:
            self._wait(timeout)
        except Exception:
            log.exception("fast path stopped; clients are served by their own tasks from now on")
            self._close()
            self._runner.io_manager.force_wakeup()

    def _wait(self, timeout: float) -> None:
        trio_fd, poll, ours = self._trio_fd, self.ep.poll, self.deadlines
        if timeout <= 0:
            self._dispatch(poll(0), trio_fd)
            return
        runner = self._runner
        runq = runner.runq
        until = (now := self._clock()) + timeout
        while True:
            while ours and ours[0][2].done:
                heapq.heappop(ours)  # served or cancelled: forget its deadline
            wait = (ours[0][0] if ours and ours[0][0] < until else until) - now
            if wait > 0:
                if self._dispatch(poll(wait if wait < _MAX_WAIT else _MAX_WAIT), trio_fd):
                    return  # trio's own sockets have events: its wait returns at once
            else:
                self._dispatch((), trio_fd)  # a checkout_timeout of ours (or trio's timer) is due
            # (The clock as _dispatch read it, before its callbacks: the next wait ends
            # later by their run time at most.)
            now = self.now
            if runq or not self.owner or now >= until:
                runner.io_manager.force_wakeup()
                return

    async def _run_in_trio(self) -> None:
        """The plain loop (another clock, guest mode, another trio): wait for the epoll set in trio."""
        fd = self.ep.fileno()
        deadlines = self.deadlines
        while True:
            while deadlines and deadlines[0][2].done:
                heapq.heappop(deadlines)
            if deadlines:
                with trio.move_on_at(deadlines[0][0]):
                    await trio.lowlevel.wait_readable(fd)
            else:
                await trio.lowlevel.wait_readable(fd)
            self._dispatch(self.ep.poll(0), -1)

    def _dispatch(self, events, trio_fd: int) -> bool:
        """Run the callbacks for ready sockets; True if trio_fd was among them."""
        trio_ready = False
        self._busy = True
        self.now = self._clock()
        try:
            owner = self.owner
            for fd_ready, ev in events:
                c = owner.get(fd_ready)
                if c is None:
                    if fd_ready == trio_fd:
                        trio_ready = True
                    elif fd_ready in self.registered:
                        self.stale.add(fd_ready)  # a server not in flight here spoke
                    continue
                try:
                    if fd_ready == c.fast_fd:
                        if ev & _HUP:
                            c.fast_hup = True
                        self._on_client(c)
                    else:
                        self._on_server(c, ev & _HUP)
                except Exception as exc:
                    self._failed(c, exc)
            if self.deadlines:
                self._expire()
            if self._pending:
                self._drain()
        finally:
            self._busy = False
        return trio_ready

    def _close(self) -> None:
        """The reactor stops (worker shutdown, or a bug): every parked client goes back to its task."""
        self.closed = True
        for c in list(self.owner.values()):
            if c.fast_state == FLIGHT:
                self._handover(c, SENT)
            elif c.fast_state == WAITING:
                self._drop_waiter(c)
                self._handover(c, WAIT_CANCELLED)
            elif c.fast_state == IDLE:
                self._handover(c, 0)
        self.ep.close()

    def _run(self, fn, c) -> None:
        """Run a callback now, or after the one running (a pool checkin inside a callback)."""
        if self._busy:
            self._pending.append((fn, c))
            return
        self._busy = True
        self.now = self._clock()
        try:
            self._call(fn, c)
            self._drain()
        finally:
            self._busy = False

    def _drain(self) -> None:
        pending = self._pending
        while pending:
            fn, c = pending.popleft()
            self._call(fn, c)

    def _call(self, fn, c) -> None:
        try:
            fn(c)
        except Exception as exc:
            self._failed(c, exc)

    def _failed(self, c, exc: Exception) -> None:
        """A callback raised: the client's task raises it (a PgError: as the slow path would)."""
        if not isinstance(exc, (E.PgError, net.PeerClosed)):
            log.exception("client %s: fast path failed; the client's task takes over", c.addr)
        if c.fast_state != TASK:
            self._handover(c, error=exc)

    # ---------------------------------------------------------------- parking
    async def park(self, c) -> int:
        """Wait here for the client's next request; returns what the task must do next."""
        if self.closed:
            return 0
        fd = c.fast_fd = c.sock.fileno()
        c.fast_task = trio.lowlevel.current_task()
        c.fast_more = c.fast_abort = c.fast_hup = False
        try:
            self.ep.register(fd, _EDGE_IN)  # reports data already waiting, too
        except FileExistsError:
            self.ep.modify(fd, _EDGE_IN)
        self.registered[fd] = c.sock
        self.owner[fd] = c
        c.fast_state = IDLE

        def abort(_):
            if c.fast_state == FLIGHT:
                c.fast_abort = True  # handed back when the reply is through
                return trio.lowlevel.Abort.FAILED
            if c.fast_state == WAITING:
                self._drop_waiter(c)
            self._release_client(c)
            return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)

    def _release_client(self, c) -> None:
        fd = c.fast_fd
        if self.owner.get(fd) is c:
            del self.owner[fd]
        if self.registered.pop(fd, None) is not None:
            try:
                self.ep.unregister(fd)
            except OSError:
                pass
        if c.fast_sfd >= 0 and self.owner.get(c.fast_sfd) is c:
            del self.owner[c.fast_sfd]
        c.fast_sfd = -1
        c.fast_state = TASK

    def _handover(self, c, value: int = 0, error: BaseException | None = None) -> None:
        self._release_client(c)
        trio.lowlevel.reschedule(c.fast_task, outcome.Error(error) if error is not None else outcome.Value(value))

    # ---------------------------------------------------------------- requests
    def _on_client(self, c) -> None:
        if c.fast_state != IDLE:
            c.fast_more = True  # the next request, pipelined: read when this one is through
            return
        if c.fast_hup:
            self._handover(c, 0)  # the client closed (maybe after a last request): its task reads to the end
            return
        end = c.end
        free = len(c.buf) - end
        try:
            n = c.sock.recv_into(c.view[end:] if end else c.buf)
        except BlockingIOError:
            return
        except OSError:
            n = 0
        if n == 0 or n == free:
            self._handover(c, n)  # EOF (the task reads it again) or a full buffer (more to come)
            return
        queries = c.fast_queries = c._plain_request(end + n)
        if queries < 0:
            self._handover(c, n)  # a request that needs the task: it carries on from the bytes read
            return
        srv = c.server
        if srv is None:
            ctx, pool = c.ctx, c.pool
            if ctx.paused or ctx.maintenance or pool.closed or c.cluster.closed:
                self._handover(c, n)
                return
            srv = pool.try_checkout(self.now)
            if srv is None:
                if pool.idle or (pool.total < pool.settings.pool_size and not pool.waiters):
                    self._handover(c, n)  # a health check or a new connection: the task waits for it
                    return
                c.end = end + n
                pool.received += n
                self._enqueue(c, pool)
                return
            c.end = end + n
            pool.received += n
            self._attached(c, srv)
            return
        c.end = end + n
        c.pool.received += n
        self._send(c, srv)

    def _attached(self, c, srv) -> None:
        if srv.set_params != c.settings or type(srv.sock) is not socket.socket:
            c.fast_srv = srv
            self._handover(c, ATTACHED)
            return
        srv.client = c
        c.state = "active"
        c.server = srv
        self._send(c, srv)

    def _send(self, c, srv) -> None:
        # c._start_request, knowing that a parked client's server owes no reply (_fast_ok).
        srv.req_start = now = self.now
        if srv.tx == _TX_IDLE:
            srv.xact_start = now
        queries = c.fast_queries
        if queries:  # only Queries that leave session state alone: _scan_client's bookkeeping, in short
            if queries == 1:
                srv.expect.append(_F_QUERY)
            else:
                srv.expect.extend([_F_QUERY] * queries)
            srv.unsynced = False
            fwd = c.end
        else:
            fwd, _ = c._scan_client(srv)
        try:
            sent = srv.sock.send(c.view[:fwd])
        except BlockingIOError:
            sent = 0
        except _NETWORK_GONE:
            self._handover(c, LOST)
            return
        if sent < fwd:
            c.fast_out = (sent, fwd)
            self._handover(c, SENT)
            return
        if fwd == c.end:
            c.end = 0
        else:
            c._consume(fwd)
        sock = srv.sock
        fd = c.fast_sfd = sock.fileno()
        if self.registered.get(fd) is not sock:
            try:
                self.ep.register(fd, _EDGE_IN)
            except FileExistsError:
                self.ep.modify(fd, _EDGE_IN)
            self.registered[fd] = sock
            self.stale.discard(fd)
        elif fd in self.stale:
            self.stale.discard(fd)
            self.ep.modify(fd, _EDGE_IN)  # reports what is already waiting (or the close) again
        self.owner[fd] = c
        c.fast_state = FLIGHT

    def _on_server(self, c, hup: int = 0) -> None:
        """The server of a request in flight has data: relay it until the last ReadyForQuery.

        hup: the server closed its end too; read to the end (a close after a FATAL).
        """
        srv = c.server
        conn = srv.conn
        while True:
            rend = conn.rend
            if conn.rstart == rend:
                conn.rstart = conn.rend = rend = 0
            elif rend == len(conn.rbuf):
                conn._compact()
                rend = conn.rend
            rbuf = conn.rbuf
            free = len(rbuf) - rend
            try:
                n = srv.sock.recv_into(memoryview(rbuf)[rend:] if rend else rbuf)
            except BlockingIOError:
                return
            except _NETWORK_GONE:
                n = 0
            if n == 0:
                self._handover(c, LOST)
                return
            conn.rend = p = rend + n
            expect = srv.expect
            # c._scan_server, for the common reply: whole messages, none it acts on, the last a
            # ReadyForQuery answering the one Query or Sync the server owes, for a client with
            # no session changes waiting on it.
            plain = (len(expect) == 1 and expect[0] in _PLAIN_EXPECT and not srv.skip and not c.change_queue
                     and c.tx_backup is None and _reply_end(rbuf, conn.rstart, p) >= 0)
            if plain:
                expect.popleft()
                srv.tx = rbuf[p - 1]
                srv.count_reply(self.now)
            else:
                p = c._scan_server(srv)
            start = conn.rstart
            if p > start:
                srv.pool.sent += p - start
                try:
                    k = c.sock.send(memoryview(conn.rbuf)[start:p])
                except BlockingIOError:
                    k = 0
                except _NETWORK_GONE as exc:
                    conn.rstart = p
                    c.lost_mid_reply = True
                    self._handover(c, error=net.PeerClosed(str(exc)))
                    return
                conn.rstart = start + k
                if start + k < p:
                    c.fast_reply_end = p
                    self._handover(c, SENT)
                    return
            if plain or not srv.owes_reply():
                break  # (after a plain reply, the server owes nothing)
            if n < free and not hup:
                return  # all read: the next edge brings the rest
        del self.owner[c.fast_sfd]
        c.fast_sfd = -1
        if hup:
            srv.broken = True  # it answered, then hung up: never hand it out again
        c._maybe_release(self.now)
        if c.fast_abort or not c._fast_ok(c.server):
            self._handover(c, 0)
            return
        c.fast_state = IDLE
        if c.fast_more:
            c.fast_more = False
            self._on_client(c)

    # ---------------------------------------------------------------- waiting for a server
    def _enqueue(self, c, pool) -> None:
        waiter = c.fast_waiter = _Waiter(self, c, pool)
        pool.waiters.append(waiter)
        heapq.heappush(self.deadlines, (waiter.started + pool.settings.checkout_timeout, next(self._seq), waiter))
        c.state = "waiting"
        c.fast_state = WAITING

    def _served(self, c) -> None:
        """The pool handed this client's waiter a server (or room to open one)."""
        waiter, c.fast_waiter = c.fast_waiter, None
        pool, srv = waiter.pool, waiter.server
        waiter.leave()
        if c.fast_state != WAITING:  # (cannot happen: a client leaves the queue when it leaves here)
            if srv is not None:
                pool.checkin(srv)
            elif waiter.may_connect:
                pool.total -= 1
            return
        c.fast_state = IDLE
        if srv is not None:
            self._attached(c, srv)
        else:  # may_connect: a connection closed and left room for a new one
            self._handover(c, WAIT_SLOT)

    def _drop_waiter(self, c) -> None:
        """Leave the pool's queue (timeout, cancel); what was handed over meanwhile goes back."""
        waiter, c.fast_waiter = c.fast_waiter, None
        if waiter is None:
            return
        self.now = self._clock()  # (also called from other tasks: cancel, shutdown)
        pool = waiter.pool
        if not waiter.done:
            waiter.done = True
            pool.waiters.remove(waiter)
        waiter.leave()

    def _expire(self) -> None:
        now = self.now
        deadlines = self.deadlines
        while deadlines and deadlines[0][0] <= now:
            waiter = heapq.heappop(deadlines)[2]
            c = waiter.client
            if not waiter.done and c.fast_waiter is waiter:
                self._drop_waiter(c)
                self._handover(c, WAIT_TIMEOUT)

    def cancel_wait(self, c) -> bool:
        """A CancelRequest for a client queued here: it gets 57014 as from the slow path."""
        if c.fast_state != WAITING:
            return False
        self._drop_waiter(c)
        self._handover(c, WAIT_CANCELLED)
        return True

