"""The terminal's HTTP client for the clearing host (httpx), with TLS and client certificates.

One method per protocol call, one attempt each: retrying is the daemon's decision
(:mod:`sync.daemon`), taken only for calls the protocol makes safe to repeat. Every failure is
translated at this seam into :mod:`sync.errors` (who failed: the link, or the host).

Answers are read as a stream with a bounded size: the client asks for ``gzip`` only and inflates
it itself with a cap on the output (``zlib`` ``max_length``), so neither a large body nor a small
one that inflates to gigabytes is ever held in memory. A blacklist is also checked as it
arrives: bytes that cannot be a signed list are refused at its header, and a list may not run
past the size its header declares; it is handed on in steps as it arrives (``sink``: the daemon
streams it to a file beside the blacklist, :class:`agent.blacklist.IncomingList`), never held
whole. A body past the call's cap, a
``Content-Encoding`` it did not ask for, or a corrupt gzip is a :class:`ProtocolError`, raised
before anything is parsed, verified or applied. Caps: JSON answers 1 MiB, a parameter set 4 MiB,
a blacklist 96 MiB (a snapshot of 10 M cards is 80 MB); an error body is cut at 64 KiB.
"""

from __future__ import annotations

import email.utils
import json
import socket
import ssl
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import structlog

from agent.blacklist import SPACE_SERIAL, BlacklistRejected, Keys, list_document_size
from agent.terminal_id import terminal_id_problem
from sync import protocol
from sync.errors import HostBusy, HostError, HostUnreachable, ProtocolError
from sync.protocol import Ack, UploadBatch

log = structlog.get_logger(__name__)

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504, 507})

MAX_JSON_ANSWER_BYTES = 1024 * 1024
MAX_PARAMS_ANSWER_BYTES = 4 * 1024 * 1024
MAX_LIST_ANSWER_BYTES = 96 * 1024 * 1024
MAX_ERROR_BODY_BYTES = 64 * 1024
_IDENTITY = frozenset({"", "identity"})
_STEP = 1024 * 1024  # inflate at most this much per step
_PREFIX_BYTES = 256  # what a size_of check is shown of a body's start
SizeOf = Callable[[bytes], int | None]
Sink = Callable[[bytes], None]


@dataclass(frozen=True)
class Answer:
    """A host's answer, read in full within its cap (decoded: no Content-Encoding left)."""

    status_code: int
    content: bytes
    path: str

    def json(self) -> Any:
        return json.loads(self.content)

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class ClockOffset:
    """The terminal's clock minus the host's, in seconds (positive: the terminal is ahead),
    measured from the host's HTTP ``Date`` header at ``measured_at`` (terminal time). The
    header has a resolution of one second: an offset within ±2 s is agreement."""

    offset_s: float
    measured_at: float


class _Refused(Exception):
    pass


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
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._wall = wall
        # this terminal's clock minus the host's (its HTTP Date header), from the last answer
        self.clock_offset: ClockOffset | None = None
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
        headers = {
            "User-Agent": f"cardsync/{protocol.PROTOCOL_VERSION}",
            # gzip is the only encoding this client inflates (itself, bounded)
            "Accept-Encoding": "gzip",
        }
        if terminal_id_problem(terminal_id) is None:  # a list pull counts against its rate
            headers[protocol.TERMINAL_HEADER] = terminal_id
        self._http = httpx.Client(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout_s),
            verify=verify,
            transport=transport,
            headers=headers,
        )

    def close(self) -> None:
        self._http.close()

    # --- calls -------------------------------------------------------------------------------

    def register(
        self, public_key: bytes, sign: Callable[[bytes], bytes], code: str | None = None
    ) -> int:
        """Enrol this terminal's device key, proving possession (``sign`` is that key's), with
        the one-time enrolment ``code`` when it has one; returns the host's ack_seq."""
        body = protocol.enrolment_request(
            self.terminal_id, public_key, sign, code, int(time.time())
        )
        response = self._send("POST", protocol.register_path(self.terminal_id), json=body)
        return int(self._json(response).get("ack_seq", 0))

    def upload(self, batch: UploadBatch, local_last_seq: int, host_public_key: Keys) -> Ack:
        """Send one batch; the answer must be signed by ``host_public_key`` and match the batch
        (:func:`sync.protocol.parse_ack`), else :class:`ProtocolError`."""
        response = self._send(
            "POST",
            protocol.records_path(self.terminal_id),
            content=batch.body,
            headers=batch.headers(),  # with the batch signature when the batch carries one
        )
        return protocol.parse_ack(self._json(response), batch, local_last_seq, host_public_key)

    def fetch_blacklist(
        self, since: int, sink: Sink | None = None, *, space: str = SPACE_SERIAL
    ) -> bytes:
        """The signed list of a key space (delta from ``since`` or snapshot): raw serials, or
        printed numbers (``space=printed``, query ``space=printed``). With ``sink``, its
        decoded bytes go there in steps as they arrive and nothing is returned (``b""``); a
        :class:`BlacklistRejected` the sink raises refuses the answer (ProtocolError)."""
        params: dict[str, Any] = {"since": since}
        if space != SPACE_SERIAL:
            params["space"] = space
        response = self._send(
            "GET",
            protocol.BLACKLIST_PATH,
            limit=MAX_LIST_ANSWER_BYTES,
            size_of=partial(list_document_size, space=space),
            sink=sink,
            params=params,
        )
        return response.content

    def fetch_root(self, since: int) -> list[bytes]:
        """The host's root statements newer than ``since`` (oldest first); none if the host
        publishes none (404 ``no_root``). Each is verified by the caller (:mod:`agent.trust`)."""
        try:
            response = self._send("GET", protocol.ROOT_PATH, params={"since": since})
        except HostError as exc:
            if exc.code == "no_root":
                return []
            raise
        statements = self._json(response).get("statements")
        if not isinstance(statements, list) or not all(isinstance(s, dict) for s in statements):
            raise ProtocolError(f"host: answer to {protocol.ROOT_PATH} has no statement list")
        return [protocol.json_bytes(s) for s in statements]

    def fetch_params(self, since: int) -> bytes | None:
        """The signed parameter set, or ``None`` if the host has none."""
        try:
            response = self._send(
                "GET", protocol.PARAMS_PATH, limit=MAX_PARAMS_ANSWER_BYTES, params={"since": since}
            )
        except HostError as exc:
            if exc.code == "no_params":
                return None
            raise
        return response.content

    def heartbeat(self, figures: dict[str, Any]) -> dict[str, Any]:
        response = self._send("POST", protocol.heartbeat_path(self.terminal_id), json=figures)
        return self._json(response)

    # --- plumbing ----------------------------------------------------------------------------

    def _send(
        self,
        method: str,
        path: str,
        *,
        limit: int = MAX_JSON_ANSWER_BYTES,
        size_of: SizeOf | None = None,
        sink: Sink | None = None,
        **kwargs: Any,
    ) -> Answer:
        try:
            request = self._http.build_request(method, path, **kwargs)
            response = self._http.send(request, stream=True)
            self._note_host_date(response.headers.get("date"))
            retry_after = response.headers.get("retry-after")
            try:
                if response.status_code < 400:
                    content = _read_bounded(response, limit, size_of=size_of, sink=sink)
                    return Answer(response.status_code, content, path)
                answer = Answer(
                    response.status_code,
                    _read_bounded(response, MAX_ERROR_BODY_BYTES, truncate=True),
                    path,
                )
            finally:
                response.close()
        except httpx.TimeoutException as exc:
            raise HostUnreachable(
                f"link: {method} {path}: timed out ({type(exc).__name__})"
            ) from exc
        except httpx.TransportError as exc:
            # connection refused or reset, TLS failure, a response cut short
            raise HostUnreachable(f"link: {method} {path}: {type(exc).__name__}: {exc}") from exc
        except _Refused as exc:
            raise ProtocolError(f"host: answer to {method} {path} {exc}; nothing applied") from None
        code, detail = "", answer.text[:200]
        try:
            body = answer.json()
            if isinstance(body, dict):
                code, detail = str(body.get("error", "")), str(body.get("detail", detail))
        except (ValueError, UnicodeDecodeError, RecursionError):
            pass
        message = f"host: {method} {path} answered {answer.status_code} {code}: {detail}"
        if answer.status_code in RETRYABLE_STATUS:
            after = retry_after_seconds(retry_after, self._wall())
            if after is not None:
                message += f" (retry after {after:g} s)"
            raise HostBusy(message, answer.status_code, code, after)
        raise HostError(message, answer.status_code, code)

    def _note_host_date(self, header: str | None) -> None:
        """Measure the terminal's clock offset from the host's ``Date`` (1 s resolution)."""
        if not header:
            return
        try:
            host = email.utils.parsedate_to_datetime(header)
        except (TypeError, ValueError, IndexError):
            return
        if host.tzinfo is None:
            return
        local = self._wall()
        self.clock_offset = ClockOffset(
            offset_s=round(local - host.timestamp(), 1), measured_at=local
        )

    @staticmethod
    def _json(response: Answer) -> dict[str, Any]:
        try:
            value = response.json()
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise ProtocolError(f"host: answer to {response.path} is not JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise ProtocolError(f"host: answer to {response.path} is not an object")
        return value


MAX_RETRY_AFTER_S = 24 * 3600.0  # a larger Retry-After is read as this (the daemon caps lower)


def retry_after_seconds(header: str | None, now: float) -> float | None:
    """A ``Retry-After`` value (RFC 9110: delay-seconds or an HTTP-date) as seconds from
    ``now``, within 0..:data:`MAX_RETRY_AFTER_S`; ``None`` if absent or unreadable."""
    if header is None:
        return None
    text = header.strip()
    if text.isascii() and text.isdigit():
        return min(float(int(text[:12])), MAX_RETRY_AFTER_S)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return min(max(0.0, when.timestamp() - now), MAX_RETRY_AFTER_S)


def _read_bounded(
    response: httpx.Response,
    limit: int,
    *,
    truncate: bool = False,
    size_of: SizeOf | None = None,
    sink: Sink | None = None,
) -> bytes:
    """The decoded body, at most ``limit`` bytes before and after inflation. Past the cap:
    :class:`_Refused` (or, with ``truncate``, the first ``limit`` bytes). ``size_of``: the size
    the body's first bytes declare (``None`` until it can tell; raises if they cannot be
    right); the cap then becomes that size. ``sink``: each decoded step goes there (checked
    against the cap first) instead of being kept; ``b""`` is returned."""
    encoding = response.headers.get("content-encoding", "").strip().lower()
    if encoding not in _IDENTITY and encoding != "gzip":
        if truncate:
            return b""
        raise _Refused(f"has Content-Encoding {encoding!r}, which the client did not ask for")
    declared = response.headers.get("content-length", "")
    if not truncate and declared.isdigit() and int(declared) > limit:
        raise _Refused(f"declares {declared} bytes, over the cap of {limit}")
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS) if encoding == "gzip" else None
    out = bytearray()  # the body, or with a sink its first bytes only
    total = 0  # decoded bytes so far
    received, raw_limit = 0, limit  # the wire bytes keep the call's cap (gzip may add a little)
    for chunk in response.iter_raw():
        received += len(chunk)
        pending = chunk
        while pending:
            if inflater is None:
                data, pending = pending, b""
            else:
                try:  # at most _STEP bytes at a time: a bomb never lands in memory whole
                    data = inflater.decompress(pending, min(_STEP, limit + 1 - total))
                except zlib.error as exc:
                    if truncate:
                        return bytes(out[:limit])
                    raise _Refused(f"is not valid gzip: {exc}") from None
                pending = inflater.unconsumed_tail
            if total + len(data) > limit or received > raw_limit:
                if truncate:
                    return bytes((out + data)[:limit])
                raise _Refused(f"is over the cap of {limit} bytes (inflated or not)")
            total += len(data)
            if sink is None:
                out += data
            elif len(out) < _PREFIX_BYTES:
                out += data[: _PREFIX_BYTES - len(out)]
            if size_of is not None:
                try:
                    expected = size_of(bytes(out[:_PREFIX_BYTES]))
                except BlacklistRejected as exc:
                    raise _Refused(f"is refused at its first bytes: {exc}") from None
                if expected is not None:
                    if expected > limit or total > expected:
                        raise _Refused(
                            f"declares {expected} bytes (cap {limit}); {total} came already"
                        )
                    limit, size_of = expected, None
            if sink is not None and data:
                try:
                    sink(data)
                except BlacklistRejected as exc:
                    raise _Refused(f"is refused: {exc}") from None
    if inflater is not None and not inflater.eof and not truncate:
        raise _Refused("is a truncated gzip stream")
    return b"" if sink is not None else bytes(out)
