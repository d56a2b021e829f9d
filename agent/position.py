"""Where the validator is now, for the fare policy: ``position.json`` in the data directory.

A GPS feed or the driver's console writes ``{"line": 8, "stop": 3, "role": "both"}`` (whole
file, atomically: :func:`write_position`); the engine reads it every tap through
:meth:`PositionFile.current` (re-read only when the file changes). Without the file the
profile's ``line`` and ``station`` stand, as a single-tap validator. A file that is not a
valid position is logged and gives *no* position: under a fare policy the tap is then refused
``no_fare`` (never charged a guess).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import structlog

from agent.blacklist import write_atomically
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


def profile_place(profile: Profile) -> TapPlace | None:
    """The profile's line and station, as a single-tap validator (``None``: line not a number)."""
    if not profile.line.isdigit():
        return None
    return TapPlace(int(profile.line), profile.station, "single", profile.operator_city)


class PositionFile:
    def __init__(self, path: Path, profile: Profile) -> None:
        self.path, self.profile = path, profile
        self._stamp: tuple[int, int] | None = None
        self._place: TapPlace | None = profile_place(profile)

    def current(self) -> TapPlace | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._stamp, self._place = None, profile_place(self.profile)
            return self._place
        except OSError as exc:
            log.error("position_unreadable", path=str(self.path), error=str(exc))
            return None
        stamp = (st.st_mtime_ns, st.st_size)
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
