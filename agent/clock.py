"""Clock discipline: a validator's real-time clock drifts, resets and jumps; records must not.

A validator runs offline for weeks on a battery-backed real-time clock. That clock can be reset
(a flat battery: 2000-01-01), stepped backwards or forwards by a bad time source, or simply be
wrong at boot. :class:`ClockGuard` sits between the wall clock and everything that stamps time
(the tap's ``now``, the records' ``created_at``) and judges every reading against:

* the **floor**: the latest of the software's release date, the profile's ``[clock] not_before``
  and the last record's time (records never go back in time), and every time handed out since;
* the **expected time**: the last good reading plus the monotonic time elapsed since it
  (``time.monotonic`` never jumps). A reading further than ``[clock] max_step_s`` from it, in
  either direction, is a jump.

A reading that passes both is *good*: it becomes the new last good time. Otherwise the clock is
*suspect*, and the time handed out is the last good time + elapsed monotonic time (never the
wall clock's). Every record notes the state (``clock = "ok"`` or ``"suspect"``, with
``clock_last_good`` and ``clock_wall`` when suspect); the agent logs ``clock_unreliable`` when it
becomes suspect and ``clock_good_again`` when it recovers, and says so in its status line.

The profile's ``[clock] policy`` decides what a tap does meanwhile: ``last_good_plus_elapsed``
takes the card with the guarded time; ``refuse`` refuses it (``clock_unreliable``). The clock is
good again as soon as the wall clock agrees with the expected time once more (someone set it
right), or when the sync daemon measured that it agrees with the host's time
(:meth:`ClockGuard.confirm_from_host`, ``clock-offset.json``). After a suspect start (an RTC
reset) the last record's time is only a lower bound: setting the clock right then is accepted,
however long the device was off.
At start there is no expected time yet: only the floor can be checked there, so a clock that is
too far *ahead* at boot is not detectable offline (the sync daemon reports the offset from the
host's time: ``clock_offset_s`` in the heartbeat and ``cardsync status``).
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

# The software's release date: a clock that reads earlier than this is wrong on any device
# running this release. Moved forward at each release.
RELEASE_DATE = dt.date(2026, 11, 1)
SLEW_TOLERANCE_S = 1.0  # a reading this little before the floor is a slewing clock, not a jump

# Written by the sync daemon in the data directory: this clock minus the host's HTTP Date at
# the last heartbeat ({"clock_offset_s": …, "clock_offset_measured_at": unix time}).
CLOCK_OFFSET_FILE = "clock-offset.json"
HOST_AGREES_S = 2.0  # the Date header's resolution is a second: within this, the clock is right

WallClock = Callable[[], dt.datetime]
Monotonic = Callable[[], float]


def _wall_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def midnight_utc(day: dt.date) -> dt.datetime:
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)


@dataclass(frozen=True, slots=True)
class ClockReading:
    """One judged reading: ``now`` is the time to use; ``wall`` what the clock said."""

    now: dt.datetime
    wall: dt.datetime
    ok: bool
    last_good: dt.datetime
    reason: str = ""

    @property
    def state(self) -> str:
        return "ok" if self.ok else "suspect"

    def fields(self) -> dict[str, str]:
        """What a record notes about the clock (part of the signed body)."""
        if self.ok:
            return {"clock": "ok"}
        return {
            "clock": "suspect",
            "clock_last_good": _iso(self.last_good),
            "clock_wall": _iso(self.wall),
        }


def _iso(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class ClockGuard:
    """Judges wall-clock readings (see the module docstring). Thread-safe."""

    def __init__(
        self,
        *,
        policy: str = "last_good_plus_elapsed",
        max_step_s: float = 300.0,
        floor: dt.datetime | None = None,
        wall: WallClock = _wall_now,
        monotonic: Monotonic = time.monotonic,
    ) -> None:
        self.policy = policy
        self.max_step_s = max_step_s
        self.floor = floor or midnight_utc(RELEASE_DATE)
        self._wall = wall
        self._monotonic = monotonic
        self._anchor: tuple[dt.datetime, float] | None = None  # last good time, monotonic then
        # True while the anchor is only the floor (the clock was wrong from the start): the
        # floor is a lower bound, so a later reading ahead of it is not a jump (the clock set
        # right after an RTC reset, however long the device was off)
        self._anchor_is_floor = False
        self._suspect_reason = ""
        self._lock = threading.Lock()
        self.read()  # the agent's start: judged (and logged if suspect) now, elapsed from here

    @classmethod
    def for_profile(
        cls,
        policy: str,
        max_step_s: float,
        not_before: dt.date | None,
        last_record_at: dt.datetime | None,
        *,
        wall: WallClock = _wall_now,
        monotonic: Monotonic = time.monotonic,
    ) -> ClockGuard:
        """The floor is the latest of the release date, ``not_before`` and the last record."""
        floors = [midnight_utc(RELEASE_DATE)]
        if not_before is not None:
            floors.append(midnight_utc(not_before))
        if last_record_at is not None:
            floors.append(last_record_at.astimezone(dt.UTC))
        return cls(
            policy=policy, max_step_s=max_step_s, floor=max(floors), wall=wall, monotonic=monotonic
        )

    @property
    def refuses(self) -> bool:
        """Whether a suspect clock refuses taps (``[clock] policy = "refuse"``)."""
        return self.policy == "refuse"

    def read(self) -> ClockReading:
        """Judge the wall clock now; the reading's ``now`` never goes backwards."""
        with self._lock:
            wall = self._wall().astimezone(dt.UTC)
            mono = self._monotonic()
            reason = self._problem(wall, mono)
            if reason:
                reading = self._suspect(wall, mono, reason)
            else:
                now = max(wall, self.floor)
                self._anchor = (now, mono)
                self._anchor_is_floor = False
                reading = ClockReading(now=now, wall=wall, ok=True, last_good=now)
                if self._suspect_reason:
                    log.warning("clock_good_again", wall=_iso(wall), was=self._suspect_reason)
                    self._suspect_reason = ""
            self.floor = max(self.floor, reading.now)
            return reading

    def now(self) -> dt.datetime:
        """The guarded time (what the store stamps records with)."""
        return self.read().now

    def confirm(self) -> None:
        """A trusted source says the wall clock is right now: make it the last good time."""
        with self._lock:
            wall = self._wall().astimezone(dt.UTC)
            self._anchor = (wall, self._monotonic())
            self._anchor_is_floor = False
            self.floor = wall
            if self._suspect_reason:
                log.warning("clock_good_again", wall=_iso(wall), was=self._suspect_reason)
            self._suspect_reason = ""

    @property
    def suspect(self) -> bool:
        with self._lock:
            return bool(self._suspect_reason)

    def confirm_from_host(self, offset_path: Path) -> bool:
        """While suspect: if the sync daemon measured, at about the wall clock's present
        reading, that it agrees with the host's time (|offset| <= 2 s), trust it again."""
        if not self.suspect:
            return False
        try:
            figures = json.loads(offset_path.read_bytes())
            offset = float(figures["clock_offset_s"])
            measured_at = float(figures["clock_offset_measured_at"])
        except (OSError, ValueError, KeyError, TypeError):
            return False
        wall = self._wall().timestamp()
        if abs(offset) > HOST_AGREES_S or not 0 <= wall - measured_at <= self.max_step_s:
            return False
        log.warning("clock_confirmed_by_host", offset_s=offset, measured_at=measured_at)
        self.confirm()
        return True

    def status(self) -> str:
        """A short status phrase: ``clock ok`` or ``clock SUSPECT: why``."""
        with self._lock:
            return f"clock SUSPECT: {self._suspect_reason}" if self._suspect_reason else "clock ok"

    def _expected(self, mono: float) -> dt.datetime | None:
        if self._anchor is None:
            return None
        good, at = self._anchor
        return good + dt.timedelta(seconds=max(0.0, mono - at))

    def _problem(self, wall: dt.datetime, mono: float) -> str:
        expected = self._expected(mono)
        if expected is not None:
            step = (wall - expected).total_seconds()
            if abs(step) > self.max_step_s and not (self._anchor_is_floor and step > 0):
                way = "forward" if step > 0 else "back"
                return f"jumped {way} {abs(step):.0f} s (more than {self.max_step_s:.0f} s)"
        if wall < self.floor - dt.timedelta(seconds=SLEW_TOLERANCE_S):
            return f"reads {_iso(wall)}, before {_iso(self.floor)} (last record or build date)"
        return ""

    def _suspect(self, wall: dt.datetime, mono: float, reason: str) -> ClockReading:
        if self._anchor is None:  # suspect at the first reading: the floor is the last good
            self._anchor = (self.floor, mono)
            self._anchor_is_floor = True
        expected = self._expected(mono)
        assert expected is not None
        last_good = self._anchor[0]
        if reason.split(" ", 1)[0] != self._suspect_reason.split(" ", 1)[0]:
            log.error(
                "clock_unreliable",
                reason=reason,
                wall=_iso(wall),
                last_good=_iso(last_good),
                using=_iso(expected),
                policy=self.policy,
            )
            self._suspect_reason = reason
        return ClockReading(
            now=max(expected, self.floor), wall=wall, ok=False, last_good=last_good, reason=reason
        )


def record_stamp(guard: ClockGuard) -> Callable[[], tuple[dt.datetime, Mapping[str, str]]]:
    """What the store stamps each record with: the guarded time and the clock state."""

    def stamp() -> tuple[dt.datetime, Mapping[str, str]]:
        reading = guard.read()
        return reading.now, reading.fields()

    return stamp
