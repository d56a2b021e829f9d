"""Several host processes behind one address (``cardhost host --workers N``).

The supervisor binds the listening socket once and starts N worker processes, each a complete
``cardhost host`` (its own storage connection, its own uvicorn loop) serving that same socket
(inherited, ``--listen-fd``): the kernel hands each new connection to one of them, and a worker
that answers an upload while it verifies others closes that connection
(``HostLimits.close_busy_connections``), so keep-alive does not tie a terminal to one worker.
The scale is carried by the database they share (PostgreSQL; SQLite works, one writer at a
time, queued on ``<db>-writer``), not by anything between the workers: they hold no state of
their own that another needs (enrolment codes, pending approvals, version counters and
acknowledgements are rows; per-process are only the limits,
:class:`clearinghost.server.HostLimits`, and caches keyed by immutable content).

A worker that dies (a crash, SIGKILL) is started again; the connections it held are cut and
their terminals retry on another worker (an upload is one transaction: nothing of it is kept,
or all of it is and the retry is answered as duplicates). A worker that exits with status 2 (a
configuration error) stops the supervisor with status 2. SIGTERM or SIGINT: the workers get
SIGTERM (uvicorn finishes its requests), then SIGKILL after ``stop_timeout_s``. A supervisor
that dies itself (even by SIGKILL) takes its workers with it (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import ctypes
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import FrameType

import structlog

log = structlog.get_logger(__name__)

CONFIGURATION_ERROR = 2  # a worker's exit status that restarting cannot fix
QUICK_DEATH_S = 5.0  # a worker dying sooner than this after its start backs the restarts off
MAX_RESTART_DELAY_S = 30.0


def listening_socket(address: str, port: int, backlog: int = 2048) -> socket.socket:
    """The one socket every worker accepts on (inheritable; accepted connections inherit
    TCP_NODELAY on Linux)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((address, port))
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


def worker_argv(argv: Sequence[str], fd: int) -> list[str]:
    """A worker's command line: the supervisor's, without ``--workers``, with ``--listen-fd``."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--workers":
            skip = True
            continue
        if arg.startswith("--workers="):
            continue
        out.append(arg)
    return [sys.executable, "-m", "clearinghost.cli", *out, "--listen-fd", str(fd)]


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_supervisor() -> None:
    """In a worker, before exec: SIGTERM when the supervisor dies, however it dies (even by
    SIGKILL), so no worker keeps serving the address alone (Linux ``prctl``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class _Worker:
    index: int
    process: subprocess.Popen[bytes]
    started: float
    quick_deaths: int = 0


@dataclass
class Supervisor:
    """Start ``workers`` processes on ``sock`` and keep them running until stopped."""

    argv: Sequence[str]  # the supervisor's own arguments (after the program name)
    sock: socket.socket
    workers: int
    stop_timeout_s: float = 30.0
    poll_s: float = 0.2
    restarts: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _running: list[_Worker] = field(default_factory=list)

    def run(self) -> int:
        def on_signal(signum: int, frame: FrameType | None) -> None:
            log.info("supervisor stopping", signal=signal.Signals(signum).name)
            self._stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        try:
            self._running = [self._start(i, 0) for i in range(self.workers)]
            while not self._stop.wait(self.poll_s):
                status = self._reap()
                if status is not None:
                    return status
            return 0
        finally:
            self._stop_all()
            self.sock.close()

    def pids(self) -> list[int]:
        return [w.process.pid for w in self._running]

    def _start(self, index: int, quick_deaths: int) -> _Worker:
        command = worker_argv(self.argv, self.sock.fileno())
        # our own interpreter and module, the supervisor's own arguments: no outside input;
        # preexec_fn is safe here: the supervisor runs no other thread
        process = subprocess.Popen(  # noqa: S603
            command,
            pass_fds=(self.sock.fileno(),),
            preexec_fn=_die_with_supervisor,  # noqa: PLW1509
        )
        log.info("worker started", worker=index, pid=process.pid)
        return _Worker(index, process, time.monotonic(), quick_deaths)

    def _reap(self) -> int | None:
        """Start again each worker that exited; a status to exit with, or ``None``."""
        for slot, worker in enumerate(self._running):
            status = worker.process.poll()
            if status is None:
                continue
            if status == CONFIGURATION_ERROR:
                log.error("worker refused its configuration; stopping", worker=worker.index)
                return CONFIGURATION_ERROR
            quick = time.monotonic() - worker.started < QUICK_DEATH_S
            deaths = worker.quick_deaths + 1 if quick else 0
            delay = min(MAX_RESTART_DELAY_S, 0.5 * 2**deaths) if quick else 0.0
            log.warning(
                "worker died; starting it again",
                worker=worker.index,
                pid=worker.process.pid,
                status=status,
                restart_in_s=delay,
            )
            if delay and self._stop.wait(delay):
                return None
            self._running[slot] = self._start(worker.index, deaths)
            self.restarts += 1
        return None

    def _stop_all(self) -> None:
        for worker in self._running:
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout_s
        for worker in self._running:
            try:
                worker.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker did not stop; killing it", pid=worker.process.pid)
                worker.process.kill()
                worker.process.wait()
        log.info("workers stopped", restarts=self.restarts)
