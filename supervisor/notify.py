"""systemd notifications (sd_notify protocol) over $NOTIFY_SOCKET, without libsystemd."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("pgherd.notify")


class Notifier:
    """Sends READY=1, RELOADING=1, STOPPING=1, STATUS=…, WATCHDOG=1 when run under systemd."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        addr = env.get("NOTIFY_SOCKET", "")
        if addr.startswith("@"):
            addr = "\0" + addr[1:]  # abstract namespace socket
        self.addr = addr or None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        self.watchdog_usec = int(usec) if usec.isdigit() and (not pid or pid == str(os.getpid())) else 0
        self.sock = None
        if self.addr:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings: half the timeout, as sd_watchdog_enabled advises."""
        return self.watchdog_usec / 2_000_000 if self.watchdog_usec else None

    def notify(self, *lines: str) -> None:
        if self.sock is None:
            return
        try:
            self.sock.sendto("\n".join(lines).encode(), self.addr)
        except OSError as exc:
            log.warning("sd_notify to %r failed: %s", self.addr, exc)

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def reloading(self) -> None:
        # RELOADING=1 must carry MONOTONIC_USEC for Type=notify-reload; harmless otherwise.
        import time
        self.notify("RELOADING=1", f"MONOTONIC_USEC={int(time.monotonic() * 1_000_000)}")

    def stopping(self) -> None:
        self.notify("STOPPING=1", "STATUS=shutting down")

    def status(self, text: str) -> None:
        self.notify(f"STATUS={text}")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")
