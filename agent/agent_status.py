"""What the running agent tells the technician console: ``agent-status.json`` in the data dir.

The agent (``cardagent run`` or ``cardagent pos``) holds the reader and the PSAMs, so the
console cannot ask them itself. The agent publishes what it knows instead, one small JSON
object replaced whole (:func:`agent.files.replace_file`):

* at start, and whenever the reader (present or failing), the card in the field, a PSAM slot
  (open, serial, terminal number, application, error) or the clock state changes;
* after taps, at most once every :data:`TAP_WRITE_EVERY_S` (the write happens on the loop's
  idle turn, never inside a tap: a tap costs no file write);
* every :data:`HEARTBEAT_S` while nothing changes, so that its age means something;
* a last time when the agent stops (``state = "stopped"``).

The console believes the file only while it is *fresh* (:func:`staleness`): written in this
boot by a process that is still alive (its pid, and the pid's start time in ``/proc``, so a
reused pid does not count) within :data:`STALE_AFTER_S` of monotonic time (``CLOCK_MONOTONIC``
is one clock for every process of a boot, and a wall-clock jump does not move it). Otherwise
the agent is reported not running, and the checks that rely on it fail saying why.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

import agent
from agent.errors import AgentError, ReaderError
from agent.files import replace_file
from agent.sam.router import SamSlotStatus

log = structlog.get_logger(__name__)

AGENT_STATUS_FILE = "agent-status.json"
STATUS_FORMAT = 1
HEARTBEAT_S = 30.0  # rewritten at least this often while the agent runs
TAP_WRITE_EVERY_S = 5.0  # taps alone cause at most one write per this many seconds
STALE_AFTER_S = 120.0  # the console's bound: an older file is stale (4 missed heartbeats)
MAX_STATUS_BYTES = 64 * 1024


@dataclass
class ReaderHealth:
    """The contactless reader as the loop last saw it (updated by :mod:`agent.validator`)."""

    name: str
    driver: str
    location: str
    present: bool | None = None  # None: not reached yet
    card_present: bool = False
    error: str = ""
    checked_at: float | None = None  # wall time of the last answer or failure

    def seen(self, *, card: bool) -> None:
        """The reader answered; ``card``: a card is in the field."""
        self.present, self.card_present, self.error = True, card, ""
        self.checked_at = time.time()

    def fault(self, error: str) -> None:
        """The reader failed (unplugged, module mute, pcscd gone)."""
        self.present, self.error = False, error[:300]
        self.checked_at = time.time()

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "driver": self.driver,
            "location": self.location,
            "present": self.present,
            "card_present": self.card_present,
            "error": self.error,
        }


def _iso(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def boot_id() -> str:
    """This boot's id (Linux), or "" where there is none."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
    except OSError:
        return ""


def process_start(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) of ``pid`` from ``/proc``, or
    ``None`` when there is no such process (or no ``/proc``)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    # "pid (comm) S ppid ...": comm may hold spaces and parentheses; fields follow the last ')'
    rest = text[text.rfind(")") + 2 :].split()
    try:
        return rest[0], int(rest[19])  # field 3 (state) and field 22 (starttime) of proc(5)
    except (IndexError, ValueError):
        return None


class StatusPublisher:
    """Builds and writes the agent's status file; :meth:`tick` is called from the loop's
    idle turns, :meth:`tapped` after each tap (no I/O), :meth:`stopped` at the end."""

    def __init__(
        self,
        path: Path,
        *,
        mode: str,
        profile: str,
        terminal_id: str,
        reader: ReaderHealth,
        sams: Callable[[], Sequence[SamSlotStatus]] = list,
        clock_state: Callable[[], tuple[bool, str]] = lambda: (True, "clock ok"),
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.mode = mode
        self.profile = profile
        self.terminal_id = terminal_id
        self.reader = reader
        self.sams = sams
        self.clock_state = clock_state
        self.wall = wall
        self.monotonic = monotonic
        self.pid = os.getpid()
        started = process_start(self.pid)
        self.pid_start = started[1] if started else None
        self.boot_id = boot_id()
        self.started_at = wall()
        self.state = "starting"
        self.hardware_error = ""  # why the reader and PSAMs could not be opened (waiting)
        self.taps = 0
        self.last_tap_at: float | None = None
        self.writes = 0
        self._written_key = ""
        self._written_taps = -1
        self._written_at: float | None = None
        self._write_error = ""

    def tapped(self) -> None:
        """A tap was handled: noted now, written by a later :meth:`tick` (throttled)."""
        self.taps += 1
        self.last_tap_at = self.wall()

    def waiting(self, error: AgentError) -> None:
        """Opening the hardware failed; the agent retries (``state = "waiting_for_hardware"``)."""
        self.state = "waiting_for_hardware"
        self.hardware_error = f"{error.party}: {error}"[:300]
        if isinstance(error, ReaderError):
            self.reader.fault(str(error))
        self.tick()

    def running(self) -> None:
        self.state, self.hardware_error = "running", ""
        self.tick()

    def stopped(self) -> None:
        self.state = "stopped"
        self.reader.card_present = False
        self._write(self._document())

    def _stable(self) -> dict[str, Any]:
        """What, when it changes, is written at once."""
        ok, text = self.clock_state()
        sams = []
        for slot in self.sams():
            entry = slot.as_dict()
            entry["state"] = "open" if slot.open else "unavailable"
            sams.append(entry)
        return {
            "state": self.state,
            "hardware_error": self.hardware_error,
            "reader": self.reader.as_dict(),
            "sams": sams,
            "clock_ok": ok,
            "clock": text,
        }

    def _document(self) -> dict[str, Any]:
        return {
            "format": STATUS_FORMAT,
            "mode": self.mode,
            "pid": self.pid,
            "pid_start": self.pid_start,
            "boot_id": self.boot_id,
            "version": agent.__version__,
            "profile": self.profile,
            "terminal_id": self.terminal_id,
            "started_at": _iso(self.started_at),
            "updated_at": _iso(self.wall()),
            "updated_monotonic": self.monotonic(),
            "taps": self.taps,
            "last_tap_at": None if self.last_tap_at is None else _iso(self.last_tap_at),
            # not in the stable part: the loop checks the reader every turn
            "reader_checked_at": (
                None if self.reader.checked_at is None else _iso(self.reader.checked_at)
            ),
            **self._stable(),
        }

    def tick(self) -> bool:
        """Write the file if something changed, taps are due or the heartbeat is; returns
        whether it wrote."""
        stable = self._stable()
        key = json.dumps(stable, sort_keys=True)
        now = self.monotonic()
        since = None if self._written_at is None else now - self._written_at
        due = (
            key != self._written_key
            or since is None
            or since >= HEARTBEAT_S
            or (self.taps != self._written_taps and since >= TAP_WRITE_EVERY_S)
        )
        if not due:
            return False
        return self._write(self._document(), key)

    def _write(self, document: dict[str, Any], key: str | None = None) -> bool:
        data = (json.dumps(document, sort_keys=True, indent=1) + "\n").encode()
        try:
            replace_file(self.path, data)
        except OSError as exc:
            error = f"{exc.strerror or exc}"
            if error != self._write_error:  # logged once per kind of failure, not per turn
                log.error("agent_status_unwritable", path=str(self.path), error=error)
            self._write_error = error
            self._written_at = self.monotonic()  # retried at the next heartbeat or change
            return False
        self._write_error = ""
        self._written_key = key if key is not None else json.dumps(self._stable(), sort_keys=True)
        self._written_taps = self.taps
        self._written_at = self.monotonic()
        self.writes += 1
        return True


def read_status(path: Path) -> dict[str, Any] | None:
    """The status object in ``path``; ``None`` when absent; ``ValueError`` saying what is
    wrong with a file that is not one."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_STATUS_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror}") from exc
    if len(data) > MAX_STATUS_BYTES:
        raise ValueError(f"{path} is larger than {MAX_STATUS_BYTES} bytes")
    try:
        document = json.loads(data)
    except ValueError as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from exc
    if not isinstance(document, dict) or document.get("format") != STATUS_FORMAT:
        raise ValueError(f"{path} is not an agent status (format {STATUS_FORMAT})")
    return document


def _alive(pid: int, start: object) -> str:
    """ "" when ``pid`` is a live process started at ``start`` (clock ticks), else why not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"process {pid} is gone"
    except PermissionError:
        pass  # another user's process (the agent's service user): it exists
    now = process_start(pid)
    if now is None:
        return "" if not Path("/proc/self/stat").exists() else f"process {pid} is gone"
    state, ticks = now
    if state in ("Z", "X"):
        return f"process {pid} has exited"
    if isinstance(start, int) and ticks != start:
        return f"pid {pid} is another process now"
    return ""


def staleness(
    document: dict[str, Any],
    *,
    monotonic_now: float,
    this_boot: str | None = None,
    bound_s: float = STALE_AFTER_S,
) -> str:
    """ "" if ``document`` describes an agent running now, else why it does not (the text the
    console shows): stopped, from an earlier boot, its process gone, or older than ``bound_s``."""
    updated = str(document.get("updated_at", "?"))
    if document.get("state") == "stopped":
        return f"agent not running: it stopped at {updated}"
    pid = document.get("pid")
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return "agent not running: the status file names no process"
    boot = boot_id() if this_boot is None else this_boot
    if boot and document.get("boot_id") != boot:
        return f"agent not running: its status is from an earlier boot (last written {updated})"
    gone = _alive(pid, document.get("pid_start"))
    if gone:
        return f"agent not running: {gone} (last status {updated})"
    written = document.get("updated_monotonic")
    if isinstance(written, bool) or not isinstance(written, int | float):
        return "agent status unusable: no updated_monotonic"
    age = monotonic_now - float(written)
    if age > bound_s or age < 0:
        return (
            f"agent status stale: last written {age:.0f} s ago, over the {bound_s:.0f} s bound "
            f"(process {pid} is alive but not publishing: hung?)"
        )
    return ""
