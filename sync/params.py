"""Signed parameter sets: fare tables, issuer allow-lists, effective-from times.

The host signs ``agent.params.params_signed_bytes(payload)``; the terminal keeps the last accepted
envelope in ``params.json`` next to the store (atomic replace) and refuses unsigned, older or
expired sets (the set in force, answered again, is kept quietly). Payload fields (all times are
Unix seconds)::

    version          int, >= 1, strictly increasing
    issued_at        int
    expires_at       int, > issued_at
    effective_from   int: the terminal applies the set from this moment on
    fare_table       object, e.g. {"flat_fare": 200, "currency": "CNY"}
    fare_policy      object, optional: the fare rules (agent.products.fare_policy, validated
                     by parse_fare_policy here, at the host's publication and in the agent)
    issuer_allow_list  list of strings (EF15[0..3] issuers / CJ/T 166 city codes)
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from agent.blacklist import BlacklistFileError, Keys, write_atomically
from agent.params import ParamsRejected, params_content_digest, verify_envelope
from agent.products.fare_policy import check_effective_window, parse_fare_policy
from sync.errors import ListRejected

log = structlog.get_logger(__name__)

PARAMS_FILE = "params.json"


@dataclass(frozen=True, slots=True)
class ParamSet:
    version: int
    issued_at: int
    expires_at: int
    effective_from: int
    fare_table: Mapping[str, Any] = field(hash=False)
    issuer_allow_list: tuple[str, ...]
    payload: Mapping[str, Any] = field(hash=False, repr=False)


def verify_params(data: bytes, host_public_key: Keys) -> ParamSet:
    """Parse and verify an envelope. Raises :class:`ListRejected`."""
    try:
        payload = verify_envelope(data, host_public_key)
    except ParamsRejected as exc:
        raise ListRejected(f"params: {exc.args[0]}") from None
    try:
        check_payload(payload)
    except ValueError as exc:
        raise ListRejected(f"params: {exc}") from exc
    return ParamSet(
        version=payload["version"],
        issued_at=payload["issued_at"],
        expires_at=payload["expires_at"],
        effective_from=payload["effective_from"],
        fare_table=payload.get("fare_table", {}),
        issuer_allow_list=tuple(payload.get("issuer_allow_list", ())),
        payload=payload,
    )


def check_payload(payload: Mapping[str, Any]) -> None:
    for name in ("version", "issued_at", "expires_at", "effective_from"):
        value = payload.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"field {name!r} must be a non-negative integer, got {value!r}")
    if payload["version"] < 1:
        raise ValueError("version must be at least 1")
    if payload["expires_at"] <= payload["issued_at"]:
        raise ValueError("expires_at must be after issued_at")
    if not isinstance(payload.get("fare_table", {}), dict):
        raise ValueError("fare_table must be an object")
    allow = payload.get("issuer_allow_list", [])
    if not isinstance(allow, list) or not all(isinstance(x, str) for x in allow):
        raise ValueError("issuer_allow_list must be a list of strings")
    check_effective_window(payload)  # FarePolicyError is a ValueError naming the field
    if "fare_policy" in payload:
        parse_fare_policy(payload["fare_policy"])


class ParamsFile:
    """The terminal's accepted parameter set, ``params.json`` next to the store."""

    def __init__(self, path: Path, host_public_key: Keys) -> None:
        self.path = path
        self.keys = host_public_key  # the signing keys in force (the daemon updates them)
        self.current: ParamSet | None = None
        self.checked_at: float | None = None  # the newest verified set from the host
        if path.exists():
            try:
                self.current = verify_params(path.read_bytes(), host_public_key)
            except (ListRejected, OSError) as exc:
                log.error("params file unusable; waiting for a fresh set", error=str(exc))

    @property
    def version(self) -> int:
        return self.current.version if self.current else 0

    def apply(self, data: bytes, *, now: float | None = None) -> ParamSet:
        """Verify and store a set; the set in force answered again changes nothing and is
        returned quietly. Raises :class:`ListRejected` (an older version, the same version with
        other content, an expired or forged set) or ``BlacklistFileError``."""
        new = verify_params(data, self.keys)
        moment = time.time() if now is None else now
        if new.expires_at <= moment:
            raise ListRejected(f"params: version {new.version} has expired")
        current = self.current
        if current is not None:
            if new.version < current.version:
                raise ListRejected(
                    f"params: version {new.version} is older than the loaded version "
                    f"{current.version} (rollback refused)"
                )
            if new.version == current.version:
                # A version names one set (TUF: version bound to content): a re-issue may only
                # renew issued_at / expires_at; anything else under the same version is refused.
                if params_content_digest(new.payload) != params_content_digest(current.payload):
                    log.error(
                        "params_conflict",
                        detail="same version, other content: refused (possible attack)",
                        version=new.version,
                    )
                    raise ListRejected(
                        f"params: version {new.version} again with other content "
                        "(refused as an attack)"
                    )
                if new.issued_at <= current.issued_at:
                    # The set in force, answered again (a pull within the same second of the
                    # last, or a host worker whose clock is behind): normal and harmless, as
                    # for the blacklist (agent.blacklist, "blacklist unchanged"). The newer
                    # envelope on disk stays; only an older *version* is a rollback.
                    log.debug("params unchanged", version=new.version)
                    self.checked_at = moment
                    return current
        try:
            write_atomically(self.path, data)
        except BlacklistFileError as exc:
            raise BlacklistFileError(f"params: could not write {self.path}: {exc}") from exc
        self.current = new
        self.checked_at = moment
        log.info("params applied", version=new.version, effective_from=new.effective_from)
        return new
