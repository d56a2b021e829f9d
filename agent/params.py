"""The parameter set in force: fare table and issuer allow-list pulled by the sync daemon.

The daemon (``cardsync run``) verifies each signed set from the clearing host (signature,
version, expiry) before it atomically replaces ``params.json`` in the device's data directory,
the same trust domain as the offline store. The agent reads that file, re-reading it when it
changes, and applies a set only from its ``effective_from`` time until it expires; otherwise the
firmware profile's values stand.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

PARAMS_FILE = "params.json"


@dataclass(frozen=True, slots=True)
class ParamsInForce:
    version: int
    flat_fare: int | None
    issuer_allow_list: tuple[str, ...] | None


class ActiveParams:
    """Reads ``params.json`` lazily; a missing, corrupt or out-of-window file means 'none'."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        self._stamp: tuple[int, int] | None = None
        self._payload: dict[str, object] | None = None

    def current(self) -> ParamsInForce | None:
        self._reload_if_changed()
        payload = self._payload
        if payload is None:
            return None
        now = self.clock()
        effective = payload.get("effective_from")
        expires = payload.get("expires_at")
        if not isinstance(effective, int) or not isinstance(expires, int):
            return None
        if not effective <= now < expires:
            return None
        fare_table = payload.get("fare_table")
        fare = fare_table.get("flat_fare") if isinstance(fare_table, dict) else None
        allow = payload.get("issuer_allow_list")
        version = payload.get("version")
        return ParamsInForce(
            version=version if isinstance(version, int) else 0,
            flat_fare=fare
            if isinstance(fare, int) and not isinstance(fare, bool) and fare >= 0
            else None,
            issuer_allow_list=tuple(str(x).upper() for x in allow)
            if isinstance(allow, list) and allow
            else None,
        )

    def _reload_if_changed(self) -> None:
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            self._stamp, self._payload = None, None
            return
        except OSError as exc:
            log.warning("params_unreadable", path=str(self.path), error=str(exc))
            return
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            envelope = json.loads(self.path.read_bytes())
            payload = envelope["payload"]
            if not isinstance(payload, dict):
                raise TypeError("payload is not an object")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("params_corrupt", path=str(self.path), error=str(exc))
            self._payload = None
            return
        self._payload = payload
        log.info("params_loaded", version=payload.get("version"))
