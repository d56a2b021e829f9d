"""Terminal settings a technician may change at the console: ``settings.json`` in the data dir.

Each setting has a rule; a value is validated before anything is written, and the file is
replaced whole (:func:`agent.console.files.write_atomically`). ``reader_url`` overrides the
profile's reader URL when ``cardagent run`` is given no ``--reader-url``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from agent.console.files import read_json, write_json
from agent.errors import ConfigurationError, StoreError

log = structlog.get_logger(__name__)

SETTINGS_FILE = "settings.json"

_ID = re.compile(r"[A-Z0-9][A-Z0-9_-]{0,15}", re.ASCII)
_URL_SCHEMES = ("socket://", "rfc2217://", "loop://", "usb:", "tty:", "udp:")
_HOST_PORT = re.compile(r"([A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:]{2,39}\]):([0-9]{1,5})")


def _id(value: str) -> str | None:
    if _ID.fullmatch(value):
        return None
    return "1 to 16 characters: A-Z, 0-9, '-', '_', starting with a letter or digit"


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


SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        Setting("line_id", "the route (line) this vehicle serves", _id),
        Setting("stop_id", "the stop of a fixed validator (station gate, stop pole)", _id),
        Setting("vehicle_id", "the vehicle (bus number) this validator is fitted to", _id),
        Setting("reader_url", "the reader's port, overriding the profile's", _reader_url),
        Setting("console_timeout_s", "console idle session timeout, seconds", _timeout),
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
