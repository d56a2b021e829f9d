"""Small files of the data directory, written whole or not at all."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from agent.errors import StoreError


def write_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Temporary file (``mode`` whatever the umask), fsync, rename over ``path``, fsync the
    directory. On any error ``path`` is untouched and :class:`StoreError` names the file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
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
