"""Small files of the data directory, written whole or not at all."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from agent.errors import StoreError
from agent.files import replace_file


def write_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    """:func:`agent.files.replace_file`; raises :class:`StoreError` naming the file, ``path``
    then untouched."""
    try:
        replace_file(path, data, mode)
    except OSError as exc:
        raise StoreError(f"store: could not write {path}: {exc.strerror or exc}") from exc


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; ``None`` if absent; :class:`StoreError` if unreadable."""
    try:
        value = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StoreError(f"store: {path} is unreadable: {exc}") from exc
    if not isinstance(value, dict):
        raise StoreError(f"store: {path} does not hold a JSON object")
    return value


def write_json(path: Path, value: dict[str, Any], mode: int = 0o644) -> None:
    write_atomically(path, (json.dumps(value, indent=1, sort_keys=True) + "\n").encode(), mode)
