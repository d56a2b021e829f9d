"""Operators of the clearing host: who may read the API and the page, and who may publish.

Two roles: ``viewer`` (read API: terminals, records, anomalies, terminal entries; the operator
page) and ``operator`` (a viewer who may also publish blacklist changes and parameter sets, add
terminals and authorise a terminal's new device key).

Operators are listed in a file (``cardhost host --operators-file F``), one per line::

    # name:role:sha256:HEX
    alice:operator:sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
    wall-screen:viewer:sha256:...

``HEX`` is the SHA-256 of the operator's token. Tokens are random (256 bits, made by
``cardhost operator add``), so a plain hash is enough: the file holds no secret, only who may
come in. Blank lines and lines starting with ``#`` are ignored. A single operator with the
``operator`` role can instead be given as the token itself in the environment variable
``CARDSYNC_OPERATOR_TOKEN`` (hashed when read, never on the command line).

A request authenticates with ``Authorization: Bearer TOKEN`` (tools, scripts) or HTTP Basic
``NAME:TOKEN`` (a browser opening the operator page). Every comparison is a constant-time one
over all known hashes (:func:`hmac.compare_digest`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from agent.errors import ConfigurationError

VIEWER = "viewer"
OPERATOR = "operator"
ROLES = (VIEWER, OPERATOR)  # each role may do what the ones before it may
TOKEN_ENV = "CARDSYNC_OPERATOR_TOKEN"  # noqa: S105 (a variable name)
ENV_OPERATOR_NAME = "env"
HASH_SCHEME = "sha256"
TOKEN_PREFIX = "cso_"  # noqa: S105 (a prefix)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def new_token() -> str:
    """A fresh operator token (256 random bits)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The stored form of a token: ``sha256:HEX``."""
    return f"{HASH_SCHEME}:{hashlib.sha256(token.encode()).hexdigest()}"


@dataclass(frozen=True)
class Operator:
    name: str
    role: str
    token_hash: str  # "sha256:HEX"

    def may(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)


class Operators:
    """The host's operators; empty means every operator route refuses (no open default)."""

    def __init__(self, operators: list[Operator] | None = None) -> None:
        self._operators: list[Operator] = list(operators or [])

    def __len__(self) -> int:
        return len(self._operators)

    def __bool__(self) -> bool:
        return bool(self._operators)

    @property
    def names(self) -> list[str]:
        return [o.name for o in self._operators]

    def add(self, operator: Operator) -> None:
        if operator.name in self.names:
            raise ConfigurationError(f"operator {operator.name!r} is listed twice")
        self._operators.append(operator)

    @classmethod
    def with_token(cls, name: str, role: str, token: str) -> Operators:
        return cls([Operator(name, _role(role), hash_token(token))])

    @classmethod
    def load(cls, path: Path | None = None, *, environ: dict[str, str] | None = None) -> Operators:
        """Operators from ``path`` (if given) and ``CARDSYNC_OPERATOR_TOKEN`` (if set)."""
        operators = cls(read_operators_file(path) if path is not None else [])
        token = (os.environ if environ is None else environ).get(TOKEN_ENV, "")
        if token:
            if len(token) < 16:
                raise ConfigurationError(f"{TOKEN_ENV} is too short (16 characters at least)")
            operators.add(Operator(ENV_OPERATOR_NAME, OPERATOR, hash_token(token)))
        return operators

    def authenticate(self, token: str, name: str | None = None) -> Operator | None:
        """The operator holding ``token`` (and called ``name``, for HTTP Basic), else ``None``.

        Every stored hash is compared, in constant time, whatever matches."""
        given = hash_token(token).encode()
        found: Operator | None = None
        for operator in self._operators:
            same = hmac.compare_digest(given, operator.token_hash.encode())
            if same and (name is None or hmac.compare_digest(name, operator.name)):
                found = operator
        return found

    def from_authorization(self, header: str) -> Operator | None:
        """Authenticate an ``Authorization`` header (Bearer TOKEN, or Basic NAME:TOKEN)."""
        scheme, _, value = header.strip().partition(" ")
        value = value.strip()
        if not value:
            return None
        if scheme.lower() == "bearer":
            return self.authenticate(value)
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(value, validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                return None
            name, sep, token = decoded.partition(":")
            return self.authenticate(token, name) if sep and token else None
        return None


def _role(role: str) -> str:
    if role not in ROLES:
        raise ConfigurationError(f"operator role must be one of {', '.join(ROLES)}, not {role!r}")
    return role


def read_operators_file(path: Path) -> list[Operator]:
    """Parse an operators file (see the module's documentation); refuse a world-writable one."""
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(f"operators file {path}: {exc}") from exc
    if mode & stat.S_IWOTH:
        raise ConfigurationError(f"operators file {path} is writable by anyone (chmod o-w)")
    operators: list[Operator] = []
    seen: set[str] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":")
        where = f"operators file {path} line {number}"
        if len(parts) != 4 or parts[2] != HASH_SCHEME:
            raise ConfigurationError(f"{where}: expected NAME:ROLE:sha256:HEX")
        name, role, _, digest = parts
        if not _NAME.match(name):
            raise ConfigurationError(f"{where}: bad operator name {name!r}")
        if role not in ROLES:
            raise ConfigurationError(f"{where}: role must be one of {', '.join(ROLES)}")
        if not _HEX64.match(digest):
            raise ConfigurationError(f"{where}: the hash must be 64 lowercase hex digits")
        if name in seen:
            raise ConfigurationError(f"{where}: operator {name!r} is listed twice")
        seen.add(name)
        operators.append(Operator(name, role, f"{HASH_SCHEME}:{digest}"))
    return operators


def add_operator(path: Path, name: str, role: str) -> str:
    """Add an operator to ``path`` (created 0600 if absent); returns the new token, which is
    stored nowhere: only its hash is written."""
    if not _NAME.match(name):
        raise ConfigurationError(f"bad operator name {name!r} (letters, digits, . _ -)")
    _role(role)
    existing = read_operators_file(path) if path.exists() else []
    if name in {o.name for o in existing}:
        raise ConfigurationError(f"operator {name!r} already exists in {path}")
    token = new_token()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as out:
        if out.tell() == 0:
            out.write("# cardsync operators: NAME:ROLE:sha256:HEX (sha256 of the token)\n")
        out.write(f"{name}:{role}:{hash_token(token)}\n")
        out.flush()
        os.fsync(out.fileno())
    return token


def remove_operator(path: Path, name: str) -> bool:
    """Remove ``name`` from ``path``; ``False`` if it was not there."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if line.split(":", 1)[0].strip() != name or line[:1] == "#"]
    if len(kept) == len(lines):
        return False
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.writelines(kept)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    return True


def read_token(token_file: Path | None, *, environ: dict[str, str] | None = None) -> str | None:
    """The token a client sends: ``token_file``'s first line, else ``CARDSYNC_OPERATOR_TOKEN``."""
    if token_file is not None:
        try:
            token = token_file.read_text(encoding="utf-8").strip().splitlines()
        except OSError as exc:
            raise ConfigurationError(f"token file {token_file}: {exc}") from exc
        if not token or not token[0].strip():
            raise ConfigurationError(f"token file {token_file} is empty")
        return token[0].strip()
    return (os.environ if environ is None else environ).get(TOKEN_ENV) or None


def is_loopback(address: str) -> bool:
    """Whether a listen address only reaches this machine (unknown names count as not)."""
    address = address.strip("[]")
    if address in ("", "localhost"):
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def check_exposure(address: str, *, tls: bool, operators: Operators) -> None:
    """Refuse to serve beyond loopback without TLS and operator authentication."""
    if is_loopback(address):
        return
    missing = []
    if not tls:
        missing.append("TLS (--tls-cert/--tls-key)")
    if not operators:
        missing.append(f"operators (--operators-file or {TOKEN_ENV})")
    if missing:
        raise ConfigurationError(
            f"refusing to listen on {address} (beyond loopback) without {' and '.join(missing)}"
        )
