"""Where the validator is now, for the fare policy and the card's trip record.

Three sources, the first that has a value wins (line and stop; vehicle and institution come
only from the last two):

1. ``position.json`` in the data directory, the live feed: a GPS unit or the driver's console
   writes ``{"line": 8, "stop": 3, "role": "both"}`` (whole file, atomically:
   :func:`write_position`); it knows where the vehicle is *now*.
2. The technician's terminal settings (``settings.json``, ``set line_id`` … at the console):
   :class:`SiteSettings`, the device's standing configuration, over the profile's defaults.
3. The firmware profile's ``terminal.line`` / ``station`` / ``vehicle`` / ``institution``.

The engine reads both files every tap, cheaply (one ``stat`` each; re-read only when a file
changes), so a change is in force from the next tap without a restart. Without
``position.json`` the settings' (else the profile's) line and stop stand, as a single-tap
validator. A ``position.json`` that is not a valid position is logged and gives *no*
position: under a fare policy the tap is then refused ``no_fare`` (never charged a guess).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from agent.blacklist import write_atomically
from agent.files import FileStamp, file_stamp
from agent.products.fares import TapPlace
from agent.profile import Profile

log = structlog.get_logger(__name__)

POSITION_FILE = "position.json"
ROLES = ("single", "entry", "exit", "both")


def parse_position(raw: object, city: str) -> TapPlace:
    """A position from the file's JSON. Raises ``ValueError`` naming the field."""
    if not isinstance(raw, dict) or set(raw) - {"line", "stop", "role"}:
        raise ValueError("position must be an object with line, stop and role")
    line, stop, role = raw.get("line"), raw.get("stop"), raw.get("role", "single")
    if isinstance(line, bool) or not isinstance(line, int) or not 0 <= line <= 0xFFFFFF:
        raise ValueError(f"position.line must be an integer 0..16777215, got {line!r:.40}")
    if isinstance(stop, bool) or not isinstance(stop, int) or not 0 <= stop <= 0xFFFF:
        raise ValueError(f"position.stop must be an integer 0..65535, got {stop!r:.40}")
    if role not in ROLES:
        raise ValueError(f"position.role must be one of {', '.join(ROLES)}, got {role!r:.40}")
    return TapPlace(line, stop, str(role), city)


def write_position(data_dir: Path, line: int, stop: int, role: str = "single") -> None:
    """What a GPS feeder or the console calls: validate, then replace the file whole."""
    parse_position({"line": line, "stop": stop, "role": role}, "")
    body = json.dumps({"line": line, "stop": stop, "role": role}).encode()
    write_atomically(data_dir / POSITION_FILE, body)


@dataclass(frozen=True, slots=True)
class SiteSettings:
    """The technician's terminal settings that replace the profile's trip-record values
    (``None``: the profile's stands). Values are validated by :mod:`agent.console.settings`."""

    line: int | None = None
    stop: int | None = None
    vehicle: int | None = None
    institution: bytes | None = None

    def apply(self, profile: Profile) -> Profile:
        """``profile`` with these values in its ``terminal`` section (the trip record and the
        single-tap fare place read them there)."""
        changes: dict[str, Any] = {}
        if self.line is not None:
            changes["line"] = f"{self.line:04d}"
        if self.stop is not None:
            changes["station"] = self.stop
        if self.vehicle is not None:
            changes["vehicle"] = self.vehicle
        if self.institution is not None:
            changes["institution"] = self.institution
        return dataclasses.replace(profile, **changes) if changes else profile


def profile_place(profile: Profile) -> TapPlace | None:
    """The profile's line and station, as a single-tap validator (``None``: line not a number)."""
    if not profile.line.isdigit():
        return None
    return TapPlace(int(profile.line), profile.station, "single", profile.operator_city)


class PositionFile:
    """``position.json``, read when it changes; without it, the place of ``site`` (the
    technician's settings) over the profile."""

    def __init__(
        self, path: Path, profile: Profile, site: Callable[[], SiteSettings] = SiteSettings
    ) -> None:
        self.path, self.profile, self.site = path, profile, site
        self._stamp: FileStamp | None = None
        self._place: TapPlace | None = profile_place(site().apply(profile))

    def current(self) -> TapPlace | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._stamp, self._place = None, profile_place(self.site().apply(self.profile))
            return self._place
        except OSError as exc:
            log.error("position_unreadable", path=str(self.path), error=str(exc))
            return None
        stamp = file_stamp(st)  # a feeder replaces the file whole (write_position)
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                if st.st_size > 4096:
                    raise ValueError("larger than 4096 bytes")
                raw = json.loads(self.path.read_bytes())
                self._place = parse_position(raw, self.profile.operator_city)
                log.info("position", line=self._place.line, stop=self._place.stop)
            except (OSError, ValueError, RecursionError) as exc:
                self._place = None
                log.error(
                    "position_invalid",
                    path=str(self.path),
                    error=str(exc),
                    detail="taps under a fare policy are refused no_fare until it is fixed",
                )
        return self._place
