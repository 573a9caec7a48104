"""systemd notifications (issue 3): pgherd started with $NOTIFY_SOCKET pointing at a datagram
socket this test listens on, as systemd does for Type=notify services.

READY=1 once every worker serves, STATUS= lines, RELOADING=1 then READY=1 around a SIGHUP,
STOPPING=1 on SIGTERM, and WATCHDOG=1 every WATCHDOG_USEC/2 when the watchdog is on.
"""

from __future__ import annotations

import re
import signal
import socket
import threading
import time
from pathlib import Path

import psycopg
import pytest

pytestmark = pytest.mark.timeout(60)

WORKERS = 3
WATCHDOG_USEC = 500_000


class NotifySocket:
    """An AF_UNIX datagram socket collecting (arrival time, {key: value}) notifications."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, dict[str, str], str]] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            text = data.decode()
            fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
            with self.lock:
                self.messages.append((time.monotonic(), fields, text))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        self.sock.close()

    def all(self) -> list[tuple[float, dict[str, str], str]]:
        with self.lock:
            return list(self.messages)

    def with_key(self, key: str, value: str | None = None) -> list[tuple[float, dict[str, str], str]]:
        return [m for m in self.all() if key in m[1] and (value is None or m[1][key] == value)]

    def index_of(self, key: str, value: str, start: int = 0) -> int | None:
        for i, m in enumerate(self.all()[start:], start):
            if m[1].get(key) == value:
                return i
        return None


@pytest.fixture
def notify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "notify.sock"
    listener = NotifySocket(path)
    # The pgherd fixture starts the command with this process's environment.
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield listener
    listener.close()


def serving_workers(proc) -> list[str]:
    with psycopg.connect(proc.admin_dsn(), autocommit=True, connect_timeout=10) as admin:
        return [r[3] for r in admin.execute("SHOW WORKERS").fetchall()]


def test_ready_reloading_stopping(pgherd, helpers, notify):
    proc = pgherd(general={"workers": WORKERS})
    ready = helpers.wait_for(lambda: notify.with_key("READY", "1"), timeout=20, what="READY=1")
    t_ready, fields, text = ready[0]
    # READY=1 comes once every worker serves, with a STATUS= line saying so.
    assert "STATUS" in fields, text
    assert re.search(rf"\b{WORKERS}/{WORKERS} workers serving\b", fields["STATUS"]), text
    assert fields.get("MAINPID", str(proc.pid)) == str(proc.pid), text
    log = proc.log()
    for w in range(WORKERS):
        assert re.search(rf"worker {w} \(pid \d+\) serving", log), log
    assert serving_workers(proc) == ["serving"] * WORKERS
    assert not notify.with_key("RELOADING") and not notify.with_key("STOPPING")

    # SIGHUP: RELOADING=1 (with MONOTONIC_USEC), then READY=1 again.
    seen = len(notify.all())
    proc.signal(signal.SIGHUP)
    helpers.wait_for(lambda: notify.index_of("READY", "1", seen) is not None, timeout=10, what="READY=1 after SIGHUP")
    reloading = notify.index_of("RELOADING", "1", seen)
    ready_again = notify.index_of("READY", "1", seen)
    assert reloading is not None and reloading < ready_again, notify.all()[seen:]
    assert notify.all()[reloading][1].get("MONOTONIC_USEC", "").isdigit(), notify.all()[reloading]
    helpers.assert_serving(proc)

    # SIGTERM: STOPPING=1, then exit 0.
    seen = len(notify.all())
    proc.signal(signal.SIGTERM)
    assert proc.wait(20) == 0, proc.log_tail()
    time.sleep(0.2)
    stopping = notify.index_of("STOPPING", "1", seen)
    assert stopping is not None, notify.all()[seen:]
    assert not [m for m in notify.all()[stopping:] if m[1].get("READY") == "1"], "READY=1 after STOPPING=1"


def test_watchdog_pings(pgherd, helpers, notify, monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
    proc = pgherd(general={"workers": 1})
    helpers.wait_for(lambda: notify.with_key("READY", "1"), timeout=20, what="READY=1")
    helpers.wait_for(lambda: len(notify.with_key("WATCHDOG", "1")) >= 4, timeout=5, what="4 WATCHDOG=1 pings")
    pings = [t for t, _, _ in notify.with_key("WATCHDOG", "1")]
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    # Pings come at least every WATCHDOG_USEC (systemd kills the service otherwise).
    assert max(gaps) < WATCHDOG_USEC / 1_000_000, gaps
    assert proc.stop() == 0


def test_no_watchdog_pings_for_another_pid(pgherd, helpers, notify, monkeypatch):
    """WATCHDOG_PID names the process systemd watches; pings are for that process only."""
    monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
    monkeypatch.setenv("WATCHDOG_PID", "1")
    proc = pgherd(general={"workers": 1})
    helpers.wait_for(lambda: notify.with_key("READY", "1"), timeout=20, what="READY=1")
    time.sleep(WATCHDOG_USEC / 1_000_000 * 2)
    assert not notify.with_key("WATCHDOG"), notify.all()
    assert proc.stop() == 0
