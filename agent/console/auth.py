"""Technician credentials (scrypt, ``cryptography``) and the console's persisted lockout.

``technicians.json`` (mode 0600) maps a technician's name to an scrypt hash of the password
with its own random salt and the cost parameters used. The password itself is never stored,
logged or echoed. ``console-lockout.json`` (mode 0600) counts failed logins across sessions
and reconnects: after :data:`FREE_ATTEMPTS` failures every further one locks the console for a
growing delay (:func:`lockout_delay`); a success clears it. The clock is injected.
"""

from __future__ import annotations

import hmac
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from agent.console.files import read_json, write_json
from agent.errors import ConfigurationError, StoreError

TECHNICIANS_FILE = "technicians.json"
LOCKOUT_FILE = "console-lockout.json"
SECRET_MODE = 0o600
SCRYPT_N, SCRYPT_R, SCRYPT_P, SCRYPT_LEN, SALT_LEN = 2**14, 8, 1, 32, 16
FREE_ATTEMPTS = 3
BASE_DELAY_S = 30.0
MAX_DELAY_S = 900.0
PASSWORD_MIN, PASSWORD_MAX = 8, 128
NAME_RULE = "a technician name is 1 to 32 characters: a-z, 0-9, '-', '_'"
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}", re.ASCII)


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ConfigurationError(f"technician name {name[:40]!r}: {NAME_RULE}")
    return name


def password_problem(password: str) -> str | None:
    if not PASSWORD_MIN <= len(password) <= PASSWORD_MAX:
        return f"a password is {PASSWORD_MIN} to {PASSWORD_MAX} characters"
    if not password.isprintable():
        return "a password is printable characters only"
    return None


def lockout_delay(failures: int) -> float:
    """Seconds locked after the ``failures``-th failure in a row: none for the first
    :data:`FREE_ATTEMPTS` - 1, then 30 s, 60 s, 120 s, ... up to 15 minutes."""
    if failures < FREE_ATTEMPTS:
        return 0.0
    return min(BASE_DELAY_S * 2.0 ** (failures - FREE_ATTEMPTS), MAX_DELAY_S)


def _kdf(salt: bytes, n: int, r: int, p: int) -> Scrypt:
    return Scrypt(salt=salt, length=SCRYPT_LEN, n=n, r=r, p=p)


@dataclass(frozen=True, slots=True)
class LoginResult:
    ok: bool
    retry_after_s: float = 0.0  # > 0: locked for this long (now, or after this failure)
    failures: int = 0


class Credentials:
    """The technicians file of a data directory, and its lockout state."""

    def __init__(self, data_dir: Path, clock: Callable[[], float]) -> None:
        self.path = data_dir / TECHNICIANS_FILE
        self.lockout_path = data_dir / LOCKOUT_FILE
        self.clock = clock

    def names(self) -> list[str]:
        return sorted(self._entries())

    def set_password(self, name: str, password: str) -> bool:
        """Create or replace ``name``'s credential; ``True`` if it replaced one."""
        check_name(name)
        problem = password_problem(password)
        if problem is not None:
            raise ConfigurationError(f"technician {name}: {problem}")
        salt = os.urandom(SALT_LEN)
        digest = _kdf(salt, SCRYPT_N, SCRYPT_R, SCRYPT_P).derive(password.encode("utf-8"))
        entries = self._entries()
        replaced = name in entries
        entries[name] = {
            "kdf": "scrypt",
            "n": SCRYPT_N,
            "r": SCRYPT_R,
            "p": SCRYPT_P,
            "salt": salt.hex(),
            "hash": digest.hex(),
        }
        write_json(self.path, {"version": 1, "technicians": entries}, SECRET_MODE)
        return replaced

    def check(self, name: str, password: str) -> LoginResult:
        """One login attempt. While locked the password is not even tried (and the attempt
        does not count); an unknown name costs the same scrypt as a known one."""
        now = self.clock()
        failures, locked_until = self._lockout()
        if locked_until > now:
            return LoginResult(False, locked_until - now, failures)
        entry = self._entries().get(name)
        ok = self._verify(entry, password)
        if ok:
            if failures or self.lockout_path.exists():
                write_json(self.lockout_path, {"failures": 0, "locked_until": 0.0}, SECRET_MODE)
            return LoginResult(True)
        failures += 1
        delay = lockout_delay(failures)
        write_json(
            self.lockout_path,
            {"failures": failures, "locked_until": now + delay if delay else 0.0},
            SECRET_MODE,
        )
        return LoginResult(False, delay, failures)

    def locked_for(self) -> float:
        _, locked_until = self._lockout()
        return max(0.0, locked_until - self.clock())

    def _verify(self, entry: dict[str, object] | None, password: str) -> bool:
        try:
            if entry is None:
                raise ValueError("no such technician")
            salt = bytes.fromhex(str(entry["salt"]))
            expected = bytes.fromhex(str(entry["hash"]))
            n, r, p = (int(str(entry[k])) for k in ("n", "r", "p"))
            kdf = _kdf(salt, n, r, p)
        except (KeyError, ValueError, TypeError):
            _kdf(b"\0" * SALT_LEN, SCRYPT_N, SCRYPT_R, SCRYPT_P).derive(password.encode())
            return False
        candidate = kdf.derive(password.encode("utf-8"))
        return hmac.compare_digest(candidate, expected)

    def _entries(self) -> dict[str, dict[str, object]]:
        data = read_json(self.path)
        if data is None:
            return {}
        mode = stat.S_IMODE(self.path.stat().st_mode)
        if mode & 0o077:
            raise StoreError(
                f"store: {self.path} has mode {mode:04o}: others can read the technician "
                f"hashes; refusing it (chmod 600 {self.path})"
            )
        entries = data.get("technicians")
        if not isinstance(entries, dict):
            raise StoreError(f"store: {self.path} has no technicians table")
        return {str(k): v for k, v in entries.items() if isinstance(v, dict)}

    def _lockout(self) -> tuple[int, float]:
        try:
            data = read_json(self.lockout_path) or {}
            failures = int(data.get("failures", 0))
            locked_until = float(data.get("locked_until", 0.0))
        except (StoreError, ValueError, TypeError):
            # unreadable: counted as the last free attempt spent (the next failure locks); a
            # success rewrites it
            return FREE_ATTEMPTS - 1, 0.0
        # a clock set back must not lock the console for ever: at most the longest delay
        return failures, min(locked_until, self.clock() + MAX_DELAY_S)
