"""Asking the running agent to restart: a flag file in the data directory.

The console (``restart``) creates ``agent.restart``. ``cardagent run`` removes a flag it finds
at start (it is starting anyway), watches for a new one between taps (a tap in progress always
completes), stops its loop cleanly when it appears and exits with :data:`RESTART_EXIT_STATUS`
(75, EX_TEMPFAIL), so the service manager starts it again (``Restart=on-failure`` or
``always``) with the profile and settings now in the data directory.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

RESTART_FLAG_FILE = "agent.restart"
RESTART_EXIT_STATUS = 75


def request_restart(data_dir: Path) -> Path:
    flag = data_dir / RESTART_FLAG_FILE
    flag.touch()
    return flag


def restart_requested(data_dir: Path) -> bool:
    return (data_dir / RESTART_FLAG_FILE).exists()


def watch_for_restart(
    data_dir: Path, stop: threading.Event, interval_s: float = 1.0
) -> Callable[[], None]:
    """Clear a stale flag, then set ``stop`` when a new flag appears (a daemon thread).
    Returns the function that ends the watch (the agent's loop has ended)."""
    flag = data_dir / RESTART_FLAG_FILE
    flag.unlink(missing_ok=True)
    done = threading.Event()

    def watch() -> None:
        while not done.wait(interval_s) and not stop.is_set():
            if flag.exists():
                log.info("restart_requested", flag=str(flag))
                stop.set()
                return

    threading.Thread(target=watch, name="restart-watch", daemon=True).start()
    return done.set
