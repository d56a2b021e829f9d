"""sd_notify without libsystemd: a few datagrams to ``$NOTIFY_SOCKET`` (see sd_notify(3)).

With ``Type=notify`` systemd waits for ``READY=1`` before it calls the unit started; with
``WatchdogSec=`` it expects ``WATCHDOG=1`` at least that often (``$WATCHDOG_USEC``) and kills
and restarts a unit that stops sending it. :class:`Notifier` is a no-op when the process was not
started by systemd (no ``NOTIFY_SOCKET``), so the same code runs under a shell, the demo and
the tests. :class:`Watchdog` pings at half the watchdog interval, and only when the caller's
loop says it is alive (:meth:`Watchdog.alive` from the loop itself, never from a timer thread:
a wedged loop must stop the pings, so that systemd restarts it).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

import structlog

log = structlog.get_logger(__name__)


class Notifier:
    """Sends sd_notify messages to ``NOTIFY_SOCKET`` (a path, or ``@name`` abstract socket)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = env.get("NOTIFY_SOCKET", "") or None
        watchdog_usec = env.get("WATCHDOG_USEC", "")
        watchdog_pid = env.get("WATCHDOG_PID", "")
        # WATCHDOG_PID names the process the watchdog is meant for (not a child we started)
        mine = not watchdog_pid or watchdog_pid == str(os.getpid())
        self.watchdog_s: float | None = None
        if watchdog_usec.isdigit() and int(watchdog_usec) > 0 and mine:
            self.watchdog_s = int(watchdog_usec) / 1_000_000
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` lines (``ready=1`` → ``READY=1``); ``False`` if not sent."""
        if self.address is None:
            return False
        message = "\n".join(f"{k.upper()}={v}" for k, v in fields.items()).encode()
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(
                        socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                    )
                self._sock.sendto(message, target)
            except OSError as exc:
                # systemd gone or the socket unusable: the agent goes on taking cards
                if not self._warned:
                    log.warning("sd_notify_failed", socket=self.address, error=str(exc))
                    self._warned = True
                return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify(ready=1, status=status)

    def status(self, status: str) -> bool:
        return self.notify(status=status)

    def stopping(self, status: str = "stopping") -> bool:
        return self.notify(stopping=1, status=status)

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


class Watchdog:
    """``WATCHDOG=1`` at most every half watchdog interval, when the loop calls :meth:`alive`."""

    def __init__(self, notifier: Notifier, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.notifier = notifier
        self.interval_s = None if notifier.watchdog_s is None else notifier.watchdog_s / 2
        self._monotonic = monotonic
        self._last: float | None = None
        self.pings = 0

    def alive(self) -> None:
        """The loop made progress: ping systemd if half the watchdog interval has passed."""
        if self.interval_s is None:
            return
        now = self._monotonic()
        if self._last is not None and now - self._last < self.interval_s:
            return
        if self.notifier.notify(watchdog=1):
            self.pings += 1
        self._last = now
