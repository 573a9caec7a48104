"""Services the bench starts (pgherd, PgBouncer), and the CPU time and memory of process trees."""

from __future__ import annotations

import os
import pwd
import resource
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Mapping, Sequence

import psutil

# How often a service is probed while it starts, and how often RSS is sampled during a run
# (4 Hz: cheap next to the proxy, fine enough for a peak over a run of seconds).
POLL_INTERVAL = 0.05
RSS_SAMPLE_INTERVAL = 0.25
# After SIGTERM a service gets this long to exit before its whole process group is killed.
STOP_TIMEOUT = 10


class BenchError(RuntimeError):
    """A step of the bench failed; the message says which and why."""


def tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def raise_nofile(wanted: int) -> int:
    """Raise our RLIMIT_NOFILE (inherited by every child) to at least wanted; return the soft limit.

    Root may raise the hard limit too; others get at most their hard limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    if hard != resource.RLIM_INFINITY and hard < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
        except (ValueError, OSError):
            wanted = hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return wanted


# ---------------------------------------------------------------------------------------------
# Process trees.


def tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_cpu_seconds(root: psutil.Process) -> float:
    """User + system CPU of root and every live descendant, plus their reaped children.

    A process's children_user/children_system hold the CPU of the children it has waited for,
    so a worker that exited and was reaped still counts (in its parent's figure).
    """
    total = 0.0
    for p in tree(root):
        try:
            t = p.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def tree_rss_bytes(root: psutil.Process) -> tuple[int, int]:
    """(sum of RSS, number of processes) over root's tree. Shared pages count once per process."""
    rss = n = 0
    for p in tree(root):
        try:
            rss += p.memory_info().rss
            n += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return rss, n


def tree_uss_bytes(root: psutil.Process) -> int | None:
    """Sum of USS (memory unique to each process) over root's tree; None where unavailable."""
    total = 0
    for p in tree(root):
        try:
            total += p.memory_full_info().uss
        except (psutil.NoSuchProcess, psutil.AccessDenied, AttributeError):
            return None
    return total


def serving_processes(root: psutil.Process, worker_marker: str = "pgherd.worker") -> int:
    """How many processes of root's tree serve clients: its worker children, or root itself alone."""
    workers = 0
    for p in tree(root)[1:]:
        try:
            if any(worker_marker in part for part in p.cmdline()):
                workers += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return workers or (1 if tree(root) else 0)


class TreeSampler:
    """Samples a process tree's CPU time and RSS in a thread, with wall-clock timestamps.

    The tree is listed once, at the start: listing children scans every process on the machine
    (600 with 500 Postgres backends), too costly to repeat 4 times a second next to the proxy. A
    worker that exits during the run still counts, in its parent's children CPU time.
    """

    def __init__(self, root: psutil.Process | None, interval: float = RSS_SAMPLE_INTERVAL) -> None:
        self.root = root
        self.interval = interval
        self.procs = tree(root) if root is not None else []
        self.samples: list[tuple[float, float, int]] = []  # (time.time(), CPU seconds, RSS bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-sampler", daemon=True)

    @property
    def peak_rss(self) -> int:
        return max((rss for _, _, rss in self.samples), default=0)

    @property
    def processes(self) -> int:
        return len(self.procs)

    def _sample(self) -> None:
        if not self.procs:
            return
        cpu = 0.0
        rss = 0
        for p in self.procs:
            try:
                with p.oneshot():
                    t = p.cpu_times()
                    rss += p.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            cpu += t.user + t.system + t.children_user + t.children_system
        self.samples.append((time.time(), cpu, rss))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> TreeSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sample()

    def cpu_between(self, start: float, end: float) -> tuple[float, float, float] | None:
        """(CPU seconds, t_a, t_b) between the first sample at or after start and the last at or before end."""
        inside = [(t, cpu) for t, cpu, _ in self.samples if start <= t <= end]
        if len(inside) < 2:
            return None
        (ta, ca), (tb, cb) = inside[0], inside[-1]
        return cb - ca, ta, tb


# ---------------------------------------------------------------------------------------------
# Services.


class Service:
    """A long-running program (pgherd, PgBouncer) in its own session, with its output in a log file."""

    def __init__(
        self, name: str, argv: Sequence[str], log_path: Path, *, user: str | None = None,
        env: Mapping[str, str] | None = None, cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.user = user
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None
        self.ps: psutil.Process | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        account: dict = {}
        if self.user is not None:
            pw = pwd.getpwnam(self.user)
            account = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        with self.log_path.open("ab") as log:
            try:
                self.proc = subprocess.Popen(
                    self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    # Own session: Ctrl-C in the terminal reaches only the bench, which stops us in order.
                    start_new_session=True, env=self.env, cwd=self.cwd, **account,
                )
            except OSError as e:
                raise BenchError(f"cannot start {self.name} ({self.argv[0]}): {e}") from None
        self.ps = psutil.Process(self.proc.pid)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_listening(self, host: str, port: int, timeout: float) -> None:
        """Wait until host:port accepts TCP connections; raise BenchError with the log otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                code = self.proc.returncode if self.proc else None
                raise BenchError(
                    f"{self.name} exited with code {code} while starting; its log ({self.log_path}):\n"
                    f"{tail(self.log_path)}"
                )
            try:
                with socket.create_connection((host, port), timeout=0.5):
                    return
            except OSError:
                time.sleep(POLL_INTERVAL)
        raise BenchError(
            f"{self.name} is not listening on {host}:{port} after {timeout:g} s; its log ({self.log_path}):\n"
            f"{tail(self.log_path)}"
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> None:
        """Signal the service, wait up to timeout, then kill its process group (workers included)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"  {self.name} did not stop within {timeout:g} s: killing it", flush=True)
            except ProcessLookupError:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything it left behind in its group
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
