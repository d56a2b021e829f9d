"""The terminal's HTTP client for the clearing host (httpx), with TLS and client certificates.

One method per protocol call, one attempt each: retrying is the daemon's decision
(:mod:`sync.daemon`), taken only for calls the protocol makes safe to repeat. Every failure is
translated at this seam into :mod:`sync.errors` (who failed: the link, or the host).
"""

from __future__ import annotations

import json
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import structlog

from sync import protocol
from sync.errors import HostBusy, HostError, HostUnreachable, ProtocolError
from sync.protocol import Ack, UploadBatch

log = structlog.get_logger(__name__)

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504, 507})


@dataclass(frozen=True)
class ClientTls:
    """Verify the host against ``ca_file`` (else the system CAs); present a client certificate
    (mutual TLS) when ``cert_file``/``key_file`` are set."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(
            cafile=str(self.ca_file) if self.ca_file is not None else None
        )
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert_file is not None:
            context.load_cert_chain(
                str(self.cert_file), str(self.key_file) if self.key_file else None
            )
        return context


class SyncClient:
    """Calls of one terminal to the clearing host at ``base_url``."""

    def __init__(
        self,
        base_url: str,
        terminal_id: str,
        *,
        tls: ClientTls | None = None,
        timeout_s: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.terminal_id = terminal_id
        verify: ssl.SSLContext | bool = True
        if tls is not None:
            verify = tls.context()
        elif self.base_url.startswith("http://"):
            verify = False  # plain HTTP: no TLS, skip loading the system CA bundle

        if transport is None:
            # TCP_NODELAY: a request is written as headers then body; without it Nagle's
            # algorithm meets the peer's delayed ACK and every call waits ~40 ms.
            transport = httpx.HTTPTransport(
                verify=verify, socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
            )
        self._http = httpx.Client(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout_s),
            verify=verify,
            transport=transport,
            headers={"User-Agent": f"cardsync/{protocol.PROTOCOL_VERSION}"},
        )

    def close(self) -> None:
        self._http.close()

    # --- calls -------------------------------------------------------------------------------

    def register(self, public_key: bytes) -> int:
        """Register this terminal's device public key; returns the host's ack_seq."""
        response = self._send(
            "POST",
            protocol.register_path(self.terminal_id),
            json={"public_key": public_key.hex()},
        )
        return int(self._json(response).get("ack_seq", 0))

    def upload(self, batch: UploadBatch, local_last_seq: int, host_public_key: bytes) -> Ack:
        """Send one batch; the answer must be signed by ``host_public_key`` and match the batch
        (:func:`sync.protocol.parse_ack`), else :class:`ProtocolError`."""
        response = self._send(
            "POST",
            protocol.records_path(self.terminal_id),
            content=batch.body,
            headers={
                "Content-Type": protocol.NDJSON,
                "Content-Encoding": "gzip",
                protocol.IDEMPOTENCY_HEADER: batch.idempotency_key,
            },
        )
        return protocol.parse_ack(self._json(response), batch, local_last_seq, host_public_key)

    def fetch_blacklist(self, since: int) -> bytes:
        response = self._send("GET", protocol.BLACKLIST_PATH, params={"since": since})
        return response.content

    def fetch_params(self, since: int) -> bytes | None:
        """The signed parameter set, or ``None`` if the host has none."""
        try:
            response = self._send("GET", protocol.PARAMS_PATH, params={"since": since})
        except HostError as exc:
            if exc.code == "no_params":
                return None
            raise
        return response.content

    def heartbeat(self, figures: dict[str, Any]) -> dict[str, Any]:
        response = self._send("POST", protocol.heartbeat_path(self.terminal_id), json=figures)
        return self._json(response)

    # --- plumbing ----------------------------------------------------------------------------

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise HostUnreachable(
                f"link: {method} {path}: timed out ({type(exc).__name__})"
            ) from exc
        except httpx.TransportError as exc:
            # connection refused or reset, TLS failure, a response cut short
            raise HostUnreachable(f"link: {method} {path}: {type(exc).__name__}: {exc}") from exc
        if response.status_code < 400:
            return response
        code, detail = "", response.text[:200]
        try:
            body = response.json()
            if isinstance(body, dict):
                code, detail = str(body.get("error", "")), str(body.get("detail", detail))
        except (ValueError, UnicodeDecodeError):
            pass
        message = f"host: {method} {path} answered {response.status_code} {code}: {detail}"
        if response.status_code in RETRYABLE_STATUS:
            raise HostBusy(message, response.status_code, code)
        raise HostError(message, response.status_code, code)

    @staticmethod
    def _json(response: httpx.Response) -> dict[str, Any]:
        try:
            value = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ProtocolError(
                f"host: answer to {response.request.url.path} is not JSON: {exc}"
            ) from exc
        if not isinstance(value, dict):
            raise ProtocolError(f"host: answer to {response.request.url.path} is not an object")
        return value
