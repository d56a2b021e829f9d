"""Terminal settings a technician may change at the console: ``settings.json`` in the data dir.

Each setting has a rule; a value is validated before anything is written, and the file is
replaced whole (:func:`agent.console.files.write_atomically`).

What the agent does with them:

* ``line_id``, ``stop_id``, ``vehicle_id``, ``institution`` replace the profile's
  ``terminal.line`` / ``station`` / ``vehicle`` / ``institution`` in the card's trip record and
  in the fare policy's line model (:class:`agent.position.SiteSettings`). The running agent
  looks at the file at every tap (one ``stat``: :class:`SettingsFile`), so a change is in force
  from the next tap, without a restart. A live position feed (``position.json``: a GPS unit)
  still wins for line and stop, as :mod:`agent.position` documents.
* ``reader_url`` overrides the profile's reader URL when ``cardagent run`` is given no
  ``--reader-url``; the reader is opened at start, so it takes a ``restart``.
* ``console_timeout_s`` is read by the console at each login.

The ranges are what every trip-record layout can hold (T-Union EF1E: line and station 2 bytes,
vehicle 3 bytes, binary; CJ/T 166 CAPP: line 8 BCD digits) and what ``position.json`` allows.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from agent.console.files import read_json, write_json
from agent.errors import ConfigurationError, StoreError
from agent.files import FileStamp, file_stamp
from agent.position import SiteSettings

log = structlog.get_logger(__name__)

SETTINGS_FILE = "settings.json"

_URL_SCHEMES = ("socket://", "rfc2217://", "loop://", "usb:", "tty:", "udp:")
_HOST_PORT = re.compile(r"([A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:]{2,39}\]):([0-9]{1,5})")


def _number(top: int) -> Callable[[str], str | None]:
    def problem(value: str) -> str | None:
        if re.fullmatch(r"[0-9]{1,8}", value, re.ASCII) and int(value) <= top:
            return None
        return f"a whole number in 0..{top}"

    return problem


def _institution(value: str) -> str | None:
    if re.fullmatch(r"(?:[0-9A-Fa-f]{2}){1,8}", value, re.ASCII):
        return None
    return "1 to 8 bytes in hex (the acceptor institution's code, e.g. 01663310)"


def _reader_url(value: str) -> str | None:
    if len(value) > 200 or not value.isprintable() or " " in value:
        return "at most 200 printable characters, no spaces"
    if value.startswith("/dev/"):
        return None if re.fullmatch(r"/dev/[A-Za-z0-9_./-]+", value) else "a device path"
    for scheme in ("socket://", "rfc2217://"):
        if value.startswith(scheme):
            match = _HOST_PORT.fullmatch(value[len(scheme) :].split("?", 1)[0])
            if match is None or not 1 <= int(match.group(2)) <= 65535:
                return f"{scheme}HOST:PORT with a port in 1..65535"
            return None
    if value.startswith(_URL_SCHEMES):
        return None
    return "a /dev/ path or a URL (" + ", ".join(_URL_SCHEMES) + ")"


def _timeout(value: str) -> str | None:
    if not value.isdigit() or not 60 <= int(value) <= 3600:
        return "whole seconds in 60..3600"
    return None


@dataclass(frozen=True, slots=True)
class Setting:
    name: str
    help: str
    problem: Callable[[str], str | None]
    takes_effect: str = "next tap"  # what the console tells the technician


SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        Setting(
            "line_id",
            "the line this vehicle serves (trip record, fares; 0..65535)",
            _number(0xFFFF),
        ),
        Setting(
            "stop_id",
            "the stop of a fixed validator (station gate, stop pole; 0..65535)",
            _number(0xFFFF),
        ),
        Setting(
            "vehicle_id",
            "the vehicle (bus number) this validator is fitted to (0..16777215)",
            _number(0xFFFFFF),
        ),
        Setting(
            "institution",
            "the acceptor institution's code in the trip record (hex, 1..8 bytes)",
            _institution,
        ),
        Setting(
            "reader_url",
            "the reader's port, overriding the profile's",
            _reader_url,
            "after restart",
        ),
        Setting(
            "console_timeout_s",
            "console idle session timeout, seconds",
            _timeout,
            "next login",
        ),
    )
}


def validate(name: str, value: str) -> str:
    """``value`` if ``name`` may take it, else :class:`ConfigurationError` saying why."""
    setting = SETTINGS.get(name)
    if setting is None:
        raise ConfigurationError(f"unknown setting {name!r} (settings: {', '.join(SETTINGS)})")
    problem = setting.problem(value)
    if problem is not None:
        raise ConfigurationError(f"setting {name}: {value[:60]!r} is not {problem}")
    return value


def read_settings(data_dir: Path) -> dict[str, str]:
    """The settings in force. An unreadable file, or a value that no longer validates, is
    logged and left out: the agent keeps taking cards on its profile's values."""
    try:
        data = read_json(data_dir / SETTINGS_FILE) or {}
    except StoreError as exc:
        log.error("settings_unreadable", error=str(exc))
        return {}
    settings: dict[str, str] = {}
    for name, value in data.items():
        if name in SETTINGS and isinstance(value, str) and SETTINGS[name].problem(value) is None:
            settings[name] = value
        else:
            log.error("setting_ignored", setting=str(name)[:40], path=str(data_dir / SETTINGS_FILE))
    return settings


def write_settings(data_dir: Path, settings: dict[str, str]) -> None:
    for name, value in settings.items():
        validate(name, value)
    write_json(data_dir / SETTINGS_FILE, dict(settings))


def site_settings(settings: dict[str, str]) -> SiteSettings:
    """The trip-record and fare values among validated ``settings``."""
    line, stop, vehicle = (settings.get(n) for n in ("line_id", "stop_id", "vehicle_id"))
    institution = settings.get("institution")
    return SiteSettings(
        line=None if line is None else int(line),
        stop=None if stop is None else int(stop),
        vehicle=None if vehicle is None else int(vehicle),
        institution=None if institution is None else bytes.fromhex(institution),
    )


class SettingsFile:
    """``settings.json`` as the running agent sees it: :meth:`site` costs one ``stat`` and
    re-reads the file only when its size, mtime or inode changed (the console replaces it
    whole, so a change always makes a new inode)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.path = data_dir / SETTINGS_FILE
        self._stamp: FileStamp | None = None
        self._site = SiteSettings()
        self.reloads = 0

    def site(self) -> SiteSettings:
        try:
            st = os.stat(self.path)
            stamp = file_stamp(st)
        except FileNotFoundError:
            stamp = (0, 0, 0)
        except OSError as exc:  # the last values stand; logged once per change of state
            if self._stamp != (-1, -1, -1):
                log.error("settings_unreadable", path=str(self.path), error=str(exc))
                self._stamp = (-1, -1, -1)
            return self._site
        if stamp != self._stamp:
            self._stamp = stamp
            site = site_settings(read_settings(self.data_dir))
            if site != self._site:
                log.info(
                    "terminal_settings",
                    line=site.line,
                    stop=site.stop,
                    vehicle=site.vehicle,
                    institution=None if site.institution is None else site.institution.hex(),
                )
            self._site = site
            self.reloads += 1
        return self._site
