"""The kiosk's client of the clearing host: the load routes (:class:`HttpLoadHost`) plus the
kiosk's look-ups (a utility account's bills, a bill payment's start and release, the pending
loads of a card), every request signed with the kiosk's enrolled device key."""

from __future__ import annotations

import json
from typing import Any

import httpx

from agent.errors import AgentError
from agent.tap.load_http import SIGNATURE_HEADER, HostCallFailed, HttpLoadHost, load_signed_bytes


class HostRefused(AgentError):
    """The clearing host refused a kiosk request (4xx): ``reason`` is its stable code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"clearing host refused: {reason}" + (f" ({detail})" if detail else ""))
        self.reason = reason
        self.detail = detail


class HostUnavailable(AgentError):
    """The clearing host gave no usable answer (network, 5xx, malformed)."""


class KioskHost(HttpLoadHost):
    def _call(self, method: str, path: str, payload: dict[str, Any] | None) -> dict[str, Any]:
        body = b"" if payload is None else json.dumps(payload, separators=(",", ":")).encode()
        signature = self.device_key.sign(load_signed_bytes(self.terminal_id, method, path, body))
        headers = {SIGNATURE_HEADER: signature.hex()}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        try:
            answer = self.client.request(
                method, self.base_url + path, content=body or None, headers=headers
            )
            data = answer.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise HostUnavailable(f"clearing host {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise HostUnavailable(f"clearing host {path}: answer is not an object")
        if 400 <= answer.status_code < 500 and answer.status_code not in (408, 429):
            raise HostRefused(str(data.get("error", "refused")), str(data.get("detail", "")))
        if answer.status_code != 200:
            raise HostUnavailable(f"clearing host {path}: HTTP {answer.status_code}")
        return data

    def bills(self, account: str) -> list[dict[str, Any]]:
        data = self._call("GET", f"/v1/terminals/{self.terminal_id}/bills/{account}", None)
        bills = data.get("bills")
        if not isinstance(bills, list):
            raise HostUnavailable("clearing host: bills answer without bills")
        return [b for b in bills if isinstance(b, dict)]

    def bill_payment(self, bill_id: str, action: str, card_id: str) -> dict[str, Any]:
        path = f"/v1/terminals/{self.terminal_id}/bills/{bill_id}/payment"
        return self._call("POST", path, {"action": action, "card_id": card_id})

    def pending_loads(self, asn: str) -> list[dict[str, Any]]:
        """The card's pending loads (``pending_id``, ``amount``, ``source``), from the load
        routes' ``POST /v1/terminals/{id}/pending-loads``."""
        data = self._call("POST", f"/v1/terminals/{self.terminal_id}/pending-loads", {"asn": asn})
        pending = data.get("pending_loads")
        if not isinstance(pending, list):
            raise HostUnavailable("clearing host: pending-loads answer without pending_loads")
        return [
            {"pending_id": str(p["id"]), "amount": int(p["amount"]), "source": str(p["source"])}
            for p in pending
            if isinstance(p, dict) and "id" in p and isinstance(p.get("amount"), int)
        ]


__all__ = ["HostCallFailed", "HostRefused", "HostUnavailable", "KioskHost"]
