"""The kiosk's client of the host's load routes (``/v1/terminals/{id}/loads``), over httpx.

Every request is signed with the terminal's enrolled device key (the key that signs its
records): header ``X-Terminal-Signature`` = hex Ed25519 over :func:`load_signed_bytes`. The host
refuses a request whose signature does not verify under the key it bound to the terminal id at
enrolment.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import httpx
import structlog

from agent.offline_store import DeviceKey
from agent.tap.load import LoadRefusedByHost, LoadRequest

SIGNATURE_HEADER = "X-Terminal-Signature"
log = structlog.get_logger("agent.load_http")
_DOMAIN = b"cardagent-terminal-request-v1\n"


def load_signed_bytes(terminal_id: str, method: str, path: str, body: bytes) -> bytes:
    """What the device key signs: domain, terminal id, method, path, SHA-256 of the body."""
    return (
        _DOMAIN
        + f"{terminal_id}\n{method.upper()}\n{path}\n".encode()
        + hashlib.sha256(body).hexdigest().encode()
    )


class HostCallFailed(Exception):
    """The host did not give a usable answer (network, 5xx, malformed): outcome unknown."""


class HttpLoadHost:
    """:class:`agent.tap.load.LoadHost` over HTTP."""

    def __init__(
        self,
        base_url: str,
        terminal_id: str,
        device_key: DeviceKey,
        *,
        timeout_s: float = 10.0,
        attempts: int = 3,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.terminal_id = terminal_id
        self.device_key = device_key
        self.client = httpx.Client(timeout=timeout_s)
        self.attempts = max(1, attempts)

    def close(self) -> None:
        self.client.close()

    def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        """POST the signed request; a request that got no answer (timeout, reset) is sent
        again, byte for byte: every route is idempotent (an authorisation by its load key)."""
        body = json.dumps(payload, separators=(",", ":")).encode()
        signature = self.device_key.sign(load_signed_bytes(self.terminal_id, "POST", path, body))
        for attempt in range(1, self.attempts + 1):
            try:
                answer = self.client.post(
                    self.base_url + path,
                    content=body,
                    headers={"Content-Type": "application/json", SIGNATURE_HEADER: signature.hex()},
                )
                break
            except httpx.HTTPError as exc:
                log.warning("load_host_no_answer", path=path, attempt=attempt, error=str(exc))
                if attempt == self.attempts:
                    raise HostCallFailed(
                        f"clearing host {path}: no answer after {attempt} attempts: {exc}"
                    ) from exc
        try:
            data = answer.json()
        except ValueError as exc:
            raise HostCallFailed(f"clearing host {path}: HTTP {answer.status_code}") from exc
        if not isinstance(data, dict):
            raise HostCallFailed(f"clearing host {path}: answer is not an object")
        if 400 <= answer.status_code < 500 and answer.status_code not in (408, 429):
            raise LoadRefusedByHost(str(data.get("error", "refused")), str(data.get("detail", "")))
        if answer.status_code != 200:
            raise HostCallFailed(f"clearing host {path}: HTTP {answer.status_code}")
        return data

    def authorise(self, request: LoadRequest) -> bytes:
        path = f"/v1/terminals/{self.terminal_id}/loads"
        data = self._post(path, dataclasses.asdict(request) | {"factors": list(request.factors)})
        mac2 = data.get("mac2")
        if not isinstance(mac2, str) or len(mac2) != 8:
            raise HostCallFailed("clearing host: authorisation without a MAC2")
        return bytes.fromhex(mac2)

    def pending_loads(self, asn: str) -> list[dict[str, Any]]:
        """Funds credited at the host for this card (``payment = {"kind": "pending", "id":
        …}`` loads one of them)."""
        data = self._post(f"/v1/terminals/{self.terminal_id}/pending-loads", {"asn": asn})
        found = data.get("pending_loads")
        if not isinstance(found, list):
            raise HostCallFailed("clearing host: pending loads answer without a list")
        return [p for p in found if isinstance(p, dict)]

    def complete(self, load_key: str, outcome: str, counter: int, tac: str) -> None:
        path = f"/v1/terminals/{self.terminal_id}/loads/{load_key}/completion"
        self._post(path, {"outcome": outcome, "counter": counter, "tac": tac})
