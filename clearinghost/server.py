"""The reference clearing host: an ASGI app (Starlette) served by uvicorn (``cardhost host``).

It implements the server side of :mod:`sync.protocol` (documented in ``clearinghost/openapi.json``,
served at ``/openapi.json``): idempotent record uploads with a cumulative acknowledgement,
record verification (device signatures, hash chain, TACs), signed blacklists and parameter sets,
a small read API and an operator page at ``/``.

The read API and the page need an authenticated ``viewer``, the admin routes an ``operator``
(:mod:`clearinghost.operators`); with no operators configured they all answer 401. Admin
POSTs must be ``application/json`` (415 otherwise) and a request whose ``Origin`` is not the
host's own is refused (403), so a web page open in an operator's browser cannot call them.

Enrolment: an operator adds a terminal (``POST /v1/admin/terminals``: id, kind, site) and gets
a one-time code (stored as its SHA-256, expiring, single use) or pre-registers the device's
key; the terminal enrols by signing the enrolment message with its device key (proof of
possession, :mod:`sync.protocol`). A new device key needs the same authorisation again
(``/rotate-key``); a plain register with another key stays 409. Every route with a terminal id
applies :mod:`agent.terminal_id` (400 ``bad_terminal_id``), and a connection with a client
certificate (mutual TLS) acts only for the terminal its subject CN names (403
``certificate_mismatch``). ``open_registration`` (first come, first served) is a development
opt-in.

Bounds (:class:`HostLimits`): each route caps its body (413) and the time it may take to arrive
(408, connection closed); a connection must send a request head within the header timeout and
connections beyond the cap are answered 503 and closed (:func:`bounded_protocol`). Uploads pass
an admission gate (:class:`UploadGate`): beyond ``max_uploads`` at once they wait briefly, then
are answered 503 ``busy`` with ``Retry-After`` (every 503/507 that asks to come back later carries
one; the daemon honours it, :mod:`sync.daemon`). A terminal sending uploads or list pulls
faster than ``client_rate`` (burst ``client_burst``) is answered 429 ``rate_limited`` with
``Retry-After`` (:class:`ClientRateLimit`), which the daemon honours as it does 503. A blacklist
change of more entries than ``approval_threshold`` is held (202) until another operator approves
it; a parameter set is checked at publication as the daemon and the agent will check it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import hmac
import html
import json
import re
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from math import ceil
from pathlib import Path
from typing import Any

import structlog
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from agent.blacklist import (
    KIND_DELTA,
    KIND_SNAPSHOT,
    LIST_MAGICS,
    SPACE_SERIAL,
    encode_list,
    list_digest,
    printed_key,
)
from agent.offline_store.device_key import (
    PUBLIC_KEY_SIZE,
    key_id_for,
    signature_verifier,
    verify_signature,
)
from agent.offline_store.records import QuarantineNotice, Record, canonical_json
from agent.params import MAX_PARAMS_FILE_BYTES
from agent.products.fare_policy import (
    MAX_FEN,
    FarePolicyError,
    parse_fare_policy,
    publication_problem,
)
from agent.terminal_id import terminal_id_problem
from clearinghost.clearing import (
    Finding,
    Screened,
    TacVerifier,
    batch_signature_refusal,
    notice_checker,
    screen,
    screen_signed,
    seal_checker,
)
from clearinghost.fare_refunds import (
    FARE_SOURCE,
    REFUND_FIELD,
    FareCredit,
    FareCreditError,
    correction_credit,
    refund_credit,
)
from clearinghost.fare_refunds import pending_id as fare_pending_id
from clearinghost.keys import HostKey, sign_params
from clearinghost.kiosk_routes import kiosk_routes
from clearinghost.load_routes import RouteKit, load_routes
from clearinghost.loads import LoadAuthority, LoadRefused, LoadStoreFailure, PendingLoad
from clearinghost.merchant_clearing import MerchantClearing, merchant_routes
from clearinghost.merchant_clearing import page_section as merchant_page_section
from clearinghost.operators import OPERATOR, VIEWER, Operators
from clearinghost.settlement import DEFAULT_TIME_ZONE, FeeSchedule
from clearinghost.storage import (
    BatchHead,
    PendingChangeRefused,
    Storage,
    StorageFailure,
    StorageFull,
    TerminalEntry,
    TerminalExists,
    TerminalKeyConflict,
)
from sync import protocol
from sync.params import check_payload
from sync.protocol import BadBatch, BatchTooLarge, RecordLine, error_body

log = structlog.get_logger(__name__)

OPENAPI_PATH = Path(__file__).with_name("openapi.json")
MAX_UPLOAD_BYTES = 16 * 1024 * 1024  # compressed body of an upload
MAX_SMALL_BODY_BYTES = 64 * 1024  # register, heartbeat
MAX_ADMIN_BODY_BYTES = 8 * 1024 * 1024  # admin publications (a blacklist of ~400,000 ASNs)
MAX_JSON_DEPTH = 16  # nesting of a JSON body (heartbeat figures, parameter sets)
MAX_QUERY_NUMBER = 2**63 - 1  # since / after / limit: what SQLite's INTEGER holds
MAX_FARE = 0xFFFFFFFF  # what a firmware profile's fare.flat_fare may be
PARAMS_FALLBACK_DEPTH = 50  # older stored sets GET /v1/params looks through past a bad one
_ASN_PATTERN = re.compile(r"[0-9A-Fa-f]{1,16}")
DEFAULT_LIST_TTL_S = 7 * 24 * 3600
MAX_ENROL_SKEW_S = 24 * 3600  # a terminal's clock may be off; a replay is still bounded
DEFAULT_CODE_TTL_S = 7 * 24 * 3600
MAX_CODE_TTL_S = 90 * 24 * 3600
# tls.getpeercert() of the connection, put in each request's scope["state"] (PeerCertProtocol)
PEER_CERT_STATE = "tls_peer_certificate"


@dataclass(frozen=True)
class _Authorisation:
    code: str  # the one-time code, shown once; "" for a pre-registered key
    fields: dict[str, Any]  # code_hash, code_expires_at, expected_key (storage)


def device_public_key(value: Any) -> bytes | None:
    """An Ed25519 device public key from its 64 hex digits, or ``None``."""
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        return None
    return raw if len(raw) == PUBLIC_KEY_SIZE else None


def new_enrolment_code() -> str:
    """A one-time enrolment code: 120 random bits, base32 in groups of four (typed by hand)."""
    text = base64.b32encode(secrets.token_bytes(15)).decode("ascii")
    return "-".join(text[i : i + 4] for i in range(0, len(text), 4))


CHECKER_CACHE_SIZE = 8192  # device keys whose signature checkers a host process keeps


class BoundedCache(dict[Any, Any]):
    """A dict that forgets its oldest entry beyond ``capacity`` (first in, first out)."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity

    def __setitem__(self, key: Any, value: Any) -> None:
        if key not in self and len(self) >= self.capacity:
            # another request thread may evict at the same moment: one of them wins
            with contextlib.suppress(KeyError, RuntimeError, StopIteration):
                del self[next(iter(self))]
        super().__setitem__(key, value)


# Signed list answers (blacklist, parameters) a host process keeps for reuse (ClearingHost
# ._answers): how many, how long, and the largest delta kept (a snapshot is always kept: serving
# the latest snapshot to many terminals is the point; a delta from an old version can be nearly
# as large, and any terminal may ask for one from any version).
ANSWER_CACHE_SIZE = 16
DEFAULT_REISSUE_WINDOW_S = 60.0
MAX_CACHED_DELTA_BYTES = 1 << 20


@dataclass
class SignedAnswer:
    """A signed list answer as served (``document``), signed at ``issued_at`` by the host's
    clock, of list or parameter set ``version``; its gzip form is made on first demand and
    kept with it."""

    document: bytes
    issued_at: int
    version: int
    _gzipped: bytes | None = None

    def gzipped(self) -> bytes:
        """The document gzip-compressed (made once; two racing threads may both make it)."""
        packed = self._gzipped
        if packed is None:
            packed = self._gzipped = gzip.compress(self.document, compresslevel=5, mtime=0)
        return packed


DEFAULT_APPROVAL_THRESHOLD = 1000  # blacklist entries in one change above which a second
# operator must approve it


@dataclass(frozen=True)
class HostLimits:
    """How long and how many: what one client (or many) may hold of the host.

    ``body_timeout_s``: a request's whole body must arrive within this (408 and the connection
    closed otherwise: a slow-loris body). ``header_timeout_s``: a connection must send a complete
    request head within this after it opens or after its previous answer (closed otherwise).
    ``keep_alive_s``: an idle keep-alive connection is closed after this (uvicorn).
    ``max_connections``: connections beyond this are answered 503 and closed at once.
    ``max_uploads``: uploads this process receives, verifies and stores at once (admission
    control: each holds its body, its parsed records and a database transaction).
    ``upload_wait_s``: how long an upload beyond that waits for a slot (its body unread, in
    the kernel's and uvicorn's bounded buffers) before it is answered 503 ``busy``.
    ``retry_after_s``: the least ``Retry-After`` of a 503/507 answer; a busy answer asks for
    more when many uploads wait (:class:`UploadGate`), up to ``max_retry_after_s``.
    ``client_rate`` / ``client_burst``: uploads and list pulls one terminal may send, per second
    on average and at once (:class:`ClientRateLimit`; 429 ``rate_limited`` with Retry-After
    beyond; ``client_rate`` 0 turns it off). A daemon sends a few requests a minute, and one
    draining a backlog one upload at a time stays far below 50 a second.
    All of them are per process: with ``--workers N`` the host holds N times as much.
    ``close_busy_connections`` (set in each worker of ``--workers N``): an upload answered while
    this process has other uploads in flight closes its connection (``Connection: close``).
    The kernel gives a connection to one worker for good, so keep-alive would tie each terminal
    to the worker that accepted it first, and one worker could verify most of the uploads while
    another idled; a new connection is accepted by whichever worker's loop wakes first, that is
    the less busy one. Measured in ``bench/RESULTS-sync.md`` (10 terminals, 2 workers).
    ``max_head_bytes``: a request head (request line and headers) longer than this is answered
    431 and its connection closed (a daemon's heads are under 1 KB).
    """

    body_timeout_s: float = 60.0
    header_timeout_s: float = 20.0
    keep_alive_s: int = 5
    max_connections: int = 512
    max_uploads: int = 8
    upload_wait_s: float = 2.0
    retry_after_s: int = 2
    max_retry_after_s: int = 60
    client_rate: float = 50.0
    client_burst: int = 200
    close_busy_connections: bool = False
    max_head_bytes: int = 16 * 1024

    def __post_init__(self) -> None:
        if not (self.body_timeout_s > 0 and self.header_timeout_s > 0 and self.keep_alive_s > 0):
            raise ValueError("host timeouts must be positive")
        if self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if self.max_head_bytes < 1024:
            raise ValueError("max_head_bytes must be at least 1024")
        if self.max_uploads < 1:
            raise ValueError("max_uploads must be at least 1")
        if self.upload_wait_s < 0:
            raise ValueError("upload_wait_s must not be negative")
        if not 1 <= self.retry_after_s <= self.max_retry_after_s:
            raise ValueError("retry_after_s must be 1..max_retry_after_s")
        if not (self.client_rate >= 0 and self.client_rate < float("inf")):
            raise ValueError("client_rate must be a finite number of requests a second, 0 = off")
        if self.client_burst < 1:
            raise ValueError("client_burst must be at least 1")


class ClientRateLimit:
    """A token bucket per client (a terminal id), sans I/O: the caller passes the time.

    Each client's bucket holds up to ``burst`` tokens and refills at ``rate`` a second; a
    request takes one (:meth:`take`), or is refused with the seconds until the next token.
    Per host process (like :class:`UploadGate`): with ``--workers N`` a terminal may get up to
    N times the rate, whichever worker the kernel hands its connections to. At most
    ``max_clients`` buckets are kept: the least recently used are forgotten first, and a bucket
    that has refilled is the same as none, so forgetting it changes no answer."""

    def __init__(self, rate: float, burst: int, *, max_clients: int = 100_000) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_clients = max_clients
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, at), LRU order
        self.limited = 0

    def take(self, client: str, now: float) -> float:
        """0.0: one token taken, the request goes on; else the seconds until ``client`` has a
        token again (the request is refused and takes none)."""
        if self.rate <= 0:
            return 0.0
        tokens, at = self._buckets.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - at) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
            self.limited += 1
        self._buckets[client] = (tokens, now)  # last: the most recently used
        if len(self._buckets) > self.max_clients:
            self._forget(now)
        return wait

    def _forget(self, now: float) -> None:
        """Down to three quarters of ``max_clients``, oldest first: refilled buckets, and the
        oldest others while still above that (such a client starts again with a full bucket:
        generous, never stricter). Refilled buckets after that point are kept till next time."""
        keep = self.max_clients * 3 // 4
        for client, (tokens, at) in list(self._buckets.items()):
            refilled = tokens + (now - at) * self.rate >= self.burst
            if not refilled and len(self._buckets) <= keep:
                break
            del self._buckets[client]

    def __len__(self) -> int:
        return len(self._buckets)


class UploadGate:
    """Admission control of uploads in one host process (asyncio, the server's event loop).

    At most ``limits.max_uploads`` uploads are received, verified and stored at once; one
    beyond waits up to ``limits.upload_wait_s`` for a slot, else :meth:`enter` says no and the
    route answers 503 ``busy`` with ``Retry-After``. The delay asked for is an estimate of when
    the uploads now waiting will be through: waiting / slots × the mean time of an upload,
    between ``retry_after_s`` and ``max_retry_after_s`` (the daemon adds its own jitter).
    ``admitted`` / ``refused`` count answers since start (bench and tests read them)."""

    def __init__(self, limits: HostLimits) -> None:
        self.limits = limits
        self._slots = asyncio.Semaphore(limits.max_uploads)
        self.waiting = 0
        self.active = 0
        self.admitted = 0
        self.refused = 0
        self._mean_s = 0.05  # running mean of one admitted upload's time (EWMA)

    async def enter(self) -> bool:
        """Take a slot (waiting up to ``upload_wait_s``); False: the host is busy."""
        self.waiting += 1
        try:
            async with asyncio.timeout(self.limits.upload_wait_s):
                await self._slots.acquire()
        except TimeoutError:
            self.refused += 1
            return False
        finally:
            self.waiting -= 1
        self.active += 1
        self.admitted += 1
        return True

    def leave(self, took_s: float) -> None:
        self.active -= 1
        self._mean_s = 0.8 * self._mean_s + 0.2 * max(0.0, took_s)
        self._slots.release()

    def retry_after(self) -> int:
        """Seconds a refused upload should wait: the backlog in front of it, drained."""
        backlog = self.waiting + self.active + 1
        estimate = backlog * self._mean_s / self.limits.max_uploads
        return max(self.limits.retry_after_s, min(self.limits.max_retry_after_s, ceil(estimate)))

    def figures(self) -> dict[str, int]:
        return {
            "max_uploads": self.limits.max_uploads,
            "active": self.active,
            "waiting": self.waiting,
            "admitted": self.admitted,
            "refused": self.refused,
        }


def _acts_on_loads(record: Record | RecordLine) -> bool:
    """Whether a stored record may change the load authority's state (loads, pending loads)."""
    fields = record.fields
    return (
        (record.kind in ("load", "unresolved") and "load_key" in fields)
        or (record.kind == "refund_request" and fields.get("credit") == "host")
        or (record.kind == "purchase" and fields.get(REFUND_FIELD) is not None)
    )


@dataclass
class ClearingHost:
    """The host's behaviour, independent of HTTP (the endpoints are thin wrappers)."""

    storage: Storage
    key: HostKey
    tac: TacVerifier | None = None
    list_ttl_s: int = DEFAULT_LIST_TTL_S
    open_registration: bool = False  # first come, first served: development only
    operators: Operators = field(default_factory=Operators)
    clock: Callable[[], float] = time.time
    # signed root statements (agent.trust), oldest first: who the terminals trust to sign
    root_statements: tuple[bytes, ...] = ()
    limits: HostLimits = field(default_factory=HostLimits)
    approval_threshold: int = DEFAULT_APPROVAL_THRESHOLD
    # merchant-alliance clearing (issue 11): fee rates and the city's time zone (a record's day)
    fees: FeeSchedule = field(default_factory=FeeSchedule)
    time_zone: str = DEFAULT_TIME_ZONE
    loads: LoadAuthority | None = None  # online loads (圈存): clearinghost.loads, load_routes
    # refuse v1 uploads (no batch signature): for a city whose terminals all sign batches
    require_batch_signature: bool = False
    # A signed list answer is served again, the same bytes, to whoever asks the same question
    # while it is younger than this (capped at 1% of list_ttl_s); 0 signs every pull anew.
    reissue_window_s: float = DEFAULT_REISSUE_WINDOW_S
    # Per-process caches, keyed by what they are derived from (a device key, a list version
    # whose content the storage fixes): several host processes on one database never
    # disagree through them, and they are bounded (a city has tens of thousands of keys).
    _seal_checkers: dict[str, Callable[[Record], Finding | None]] = field(
        default_factory=lambda: BoundedCache(CHECKER_CACHE_SIZE)
    )
    # (key space, blacklist version) -> content digest
    _digests: dict[tuple[str, int], bytes] = field(default_factory=dict)
    _notice_checkers: dict[str, Callable[[QuarantineNotice], Finding | None]] = field(
        default_factory=lambda: BoundedCache(CHECKER_CACHE_SIZE)
    )
    _verifiers: dict[str, Callable[[bytes, bytes], bool]] = field(default_factory=dict)
    # (key space or "params", base version or 0 for a snapshot / parameter set, version,
    # signing key) -> the answer signed for it (_reused, _keep). Only entries of the current
    # version of a space are kept, so at worst: one snapshot per key space (a 10 M-entry serial
    # list is ~80 MB, plus its gzip form) and ANSWER_CACHE_SIZE - 2 deltas of at most
    # MAX_CACHED_DELTA_BYTES each (plus gzip). Written under _answers_lock (held for dict
    # operations only, never while signing); read without it.
    _answers: dict[tuple[str, int, int, bytes], SignedAnswer] = field(
        default_factory=lambda: BoundedCache(ANSWER_CACHE_SIZE)
    )
    _answers_lock: threading.Lock = field(default_factory=threading.Lock)

    # --- terminals -------------------------------------------------------------------------

    def register(self, terminal_id: str, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Enrolment (``POST /v1/terminals/{id}/register``): see :mod:`sync.protocol`.

        The rules, in order: the terminal proves it holds the key it sends (its signature over
        the enrolment message verifies under that key, issued within :data:`MAX_ENROL_SKEW_S`
        of the host's clock); the same key as registered is fine (200); otherwise the key is
        bound only through an operator's pending authorisation for this id (a one-time code
        or a pre-registered key; 201 for a new terminal, 200 for a rotation). Without an
        entry, only ``open_registration`` (dev/demo) binds a first-come key."""
        raw = device_public_key(payload.get("public_key"))
        if raw is None:
            return 400, error_body("bad_key", "public_key must be 64 hex digits (Ed25519)")
        code, issued_at, signature = (
            payload.get("enrolment_code"),
            payload.get("issued_at"),
            payload.get("signature"),
        )
        if code is not None and (
            not isinstance(code, str) or not 0 < len(code) <= protocol.MAX_CODE_LENGTH
        ):
            return 400, error_body(
                "bad_request", f"enrolment_code must be a string of 1..{protocol.MAX_CODE_LENGTH}"
            )
        if isinstance(issued_at, bool) or not isinstance(issued_at, int):
            return 400, error_body("bad_request", "issued_at must be an integer (Unix seconds)")
        if not isinstance(signature, str):
            return 400, error_body("bad_request", "signature must be hex (Ed25519, 64 bytes)")
        try:
            signature_raw = bytes.fromhex(signature)
        except ValueError:
            signature_raw = b""
        code_hash = protocol.code_digest(code) if code else None
        signed = protocol.enrolment_signed_bytes(
            {
                "terminal_id": terminal_id,
                "public_key": raw.hex(),
                "code_sha256": code_hash or "",
                "issued_at": issued_at,
            }
        )
        # proof of possession: whoever enrols a key must hold it (it signs the records)
        if not verify_signature(raw, signature_raw, signed):
            log.warning("enrolment refused: bad proof", terminal_id=terminal_id)
            return 403, error_body(
                "bad_proof",
                f"terminal {terminal_id!r}: the signature does not verify under the public key "
                "sent; the terminal must sign the enrolment message with that device key",
            )
        now = self.clock()
        if abs(issued_at - now) > MAX_ENROL_SKEW_S:
            return 403, error_body(
                "stale_proof",
                f"terminal {terminal_id!r}: the enrolment message was issued at {issued_at}, "
                f"more than {MAX_ENROL_SKEW_S} s from the host's time {int(now)}",
            )
        key = raw.hex()
        terminal = self.storage.terminal(terminal_id)
        if terminal is not None and terminal.public_key == key:
            return 200, {"terminal_id": terminal_id, "ack_seq": terminal.ack_seq, "status": "known"}
        entry = self.storage.terminal_entry(terminal_id)
        if entry is not None:
            outcome = self.storage.enrol(terminal_id, key, code_hash, now)
            if outcome is not None:
                held = self.storage.terminal(terminal_id)
                ack = held.ack_seq if held else 0
                status = 201 if outcome == "enrolled" else 200
                return status, {"terminal_id": terminal_id, "ack_seq": ack, "status": outcome}
            # name the refusal from the state now (a concurrent enrolment may have used the code)
            held = self.storage.terminal(terminal_id)
            if held is not None and held.public_key == key:  # that concurrent enrolment was ours
                return 200, {"terminal_id": terminal_id, "ack_seq": held.ack_seq, "status": "known"}
            entry = self.storage.terminal_entry(terminal_id) or entry
            return self._enrolment_refused(terminal_id, entry, code_hash, held is not None, now)
        if terminal is None and self.open_registration:
            try:  # first come, first served: the dev/demo opt-in (--open-registration)
                new = self.storage.register_terminal(terminal_id, key)
            except TerminalKeyConflict as exc:
                return 409, error_body("key_conflict", str(exc))
            if not new:  # registered a moment ago (on another host process): a retry's answer
                held = self.storage.terminal(terminal_id)
                ack = held.ack_seq if held else 0
                return 200, {"terminal_id": terminal_id, "ack_seq": ack, "status": "known"}
            return 201, {"terminal_id": terminal_id, "ack_seq": 0, "status": "enrolled"}
        if terminal is None:
            return 403, error_body(
                "not_enrolled",
                f"terminal {terminal_id!r} has no entry at this host: an operator adds it "
                "(cardhost terminal add) and gives the terminal its one-time enrolment code",
            )
        log.error("registration refused: another key", terminal_id=terminal_id)
        return 409, error_body(
            "key_conflict",
            f"terminal {terminal_id!r} is registered with another device key; a new key needs "
            "an operator's authorisation (cardhost terminal rotate-key)",
        )

    @staticmethod
    def _enrolment_refused(
        terminal_id: str,
        entry: TerminalEntry,
        code_hash: str | None,
        registered: bool,
        now: float,
    ) -> tuple[int, dict[str, Any]]:
        """Why an enrolment through an entry failed, naming it (the code's hash is compared
        in constant time; the code itself is never logged)."""
        same_code = code_hash is not None and hmac.compare_digest(code_hash, entry.code_hash or "")
        if same_code and entry.code_used_at is not None:
            code, detail = "code_used", "the enrolment code was already used (codes are single use)"
        elif same_code:
            code, detail = "code_expired", "the enrolment code has expired; ask for a new one"
        elif code_hash is not None:
            code, detail = "bad_code", "the enrolment code is not the one issued for it"
        elif registered:
            log.error("registration refused: another key", terminal_id=terminal_id)
            return 409, error_body(
                "key_conflict",
                f"terminal {terminal_id!r} is registered with another device key; a new key "
                "needs an operator's authorisation (cardhost terminal rotate-key)",
            )
        elif entry.expected_key is not None:
            code, detail = "unexpected_key", "this is not the device key the operator registered"
        else:
            code, detail = "enrolment_code_required", "enrolment needs the one-time code"
        log.warning("enrolment refused", terminal_id=terminal_id, reason=code)
        return 403, error_body(code, f"terminal {terminal_id!r}: {detail}")

    # --- terminal entries (operators) ----------------------------------------------------

    def add_terminal(self, operator: str, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """``POST /v1/admin/terminals``: a terminal entry and its first enrolment
        authorisation; the one-time code is in the answer only (stored hashed)."""
        terminal_id = payload.get("terminal_id")
        problem = terminal_id_problem(terminal_id)
        if problem is not None:
            return 400, error_body("bad_terminal_id", problem)
        assert isinstance(terminal_id, str)
        texts: dict[str, str] = {}
        for name in ("kind", "site"):
            value = payload.get(name, "")
            if not isinstance(value, str) or len(value) > 64 or not value.isprintable():
                return 400, error_body("bad_request", f"{name} must be printable text, 0..64")
            texts[name] = value
        authorisation = self._authorisation(payload)
        if isinstance(authorisation, tuple):
            return authorisation
        code, fields = authorisation.code, authorisation.fields
        try:
            self.storage.create_terminal_entry(
                terminal_id, texts["kind"], texts["site"], operator, self.clock(), **fields
            )
        except TerminalExists as exc:
            return 409, error_body("terminal_exists", str(exc))
        return 201, self._authorised_answer(terminal_id, code, fields) | texts

    def authorise_rotation(
        self, operator: str, terminal_id: str, payload: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        """``POST /v1/admin/terminals/{id}/rotate-key``: allow one new device key (a fresh
        one-time code, or the new key itself); until the terminal uses it, the old key works."""
        authorisation = self._authorisation(payload)
        if isinstance(authorisation, tuple):
            return authorisation
        code, fields = authorisation.code, authorisation.fields
        entry = self.storage.authorise_enrolment(terminal_id, operator, self.clock(), **fields)
        if entry is None:
            return 404, error_body("unknown_terminal", f"terminal {terminal_id!r} is unknown")
        return 200, self._authorised_answer(terminal_id, code, fields)

    def _authorisation(
        self, payload: dict[str, Any]
    ) -> _Authorisation | tuple[int, dict[str, Any]]:
        """A pre-registered ``public_key``, or a new one-time code valid ``code_ttl_s``."""
        ttl = payload.get("code_ttl_s", DEFAULT_CODE_TTL_S)
        if isinstance(ttl, bool) or not isinstance(ttl, int) or not 0 < ttl <= MAX_CODE_TTL_S:
            return 400, error_body("bad_request", f"code_ttl_s must be 1..{MAX_CODE_TTL_S}")
        if payload.get("public_key") is not None:
            raw = device_public_key(payload["public_key"])
            if raw is None:
                return 400, error_body("bad_key", "public_key must be 64 hex digits (Ed25519)")
            return _Authorisation(
                "", {"code_hash": None, "code_expires_at": None, "expected_key": raw.hex()}
            )
        code = new_enrolment_code()
        return _Authorisation(
            code,
            {
                "code_hash": protocol.code_digest(code),
                "code_expires_at": self.clock() + ttl,
                "expected_key": None,
            },
        )

    @staticmethod
    def _authorised_answer(terminal_id: str, code: str, fields: dict[str, Any]) -> dict[str, Any]:
        if code:
            return {
                "terminal_id": terminal_id,
                "enrolment_code": code,
                "code_expires_at": int(fields["code_expires_at"]),
            }
        return {"terminal_id": terminal_id, "public_key": fields["expected_key"]}

    def terminal_listing(self) -> list[dict[str, Any]]:
        """Every terminal entry and registered terminal, with its enrolment state."""
        now = self.clock()
        registered = {t.terminal_id: t for t in self.storage.terminals()}
        entries = {e.terminal_id: e for e in self.storage.terminal_entries()}
        listing = []
        for terminal_id in sorted(set(registered) | set(entries)):
            entry, held = entries.get(terminal_id), registered.get(terminal_id)
            listing.append(
                {
                    "terminal_id": terminal_id,
                    "kind": entry.kind if entry else "",
                    "site": entry.site if entry else "",
                    "enrolled": held is not None,
                    "key_id": key_id_for(bytes.fromhex(held.public_key)) if held else None,
                    "code_pending": bool(entry and entry.code_pending(now)),
                    "code_expires_at": entry.code_expires_at if entry else None,
                    "key_pending": bool(entry and entry.expected_key),
                    "created_by": entry.created_by if entry else None,
                }
            )
        return listing

    def _reconcile_loads(
        self,
        terminal_id: str,
        accepted: Sequence[Record | QuarantineNotice | RecordLine],
        ack_seq: int,
    ) -> None:
        """What stored records tell the load authority (idempotent, so a replayed batch is
        harmless): a kiosk's ``load`` record completes its load (the card's TAC), an
        ``unresolved`` load record shows it unknown, a POS ``refund_request`` (a host-side
        credit) becomes a pending load for that card, loadable once at any kiosk, and so does a
        purchase record's ``fare_refund_due`` (:mod:`clearinghost.fare_refunds`).

        Only a record the host holds acts: same seq, kind and hash as the stored slot. A record
        that conflicts with the slot at its seq (the batch is refused there, 409), anything
        after a refusal and a quarantined slot act on nothing."""
        loads = self.loads
        assert loads is not None
        wanted = [
            r
            for r in accepted
            if not isinstance(r, QuarantineNotice) and r.seq <= ack_seq and _acts_on_loads(r)
        ]
        if not wanted:
            return
        held = self.storage.held_slots(terminal_id, [r.seq for r in wanted])
        for record in wanted:
            if held.get(record.seq) != (record.kind, record.hash):
                log.warning(
                    "record not applied to loads: the host holds another slot at its seq",
                    terminal_id=terminal_id,
                    seq=record.seq,
                    kind=record.kind,
                    held_kind=held.get(record.seq, ("none", ""))[0],
                )
                continue
            try:
                if record.kind in ("load", "unresolved") and "load_key" in record.fields:
                    loads.reconcile_record(terminal_id, record.kind, record.fields)
                elif record.kind == "refund_request" and record.fields.get("credit") == "host":
                    loads.credit(
                        record.card_id[-16:],
                        record.amount,
                        "refund",
                        f"terminal {terminal_id}",
                        reference=str(record.fields.get("refund_id", ""))[:200],
                        pending_id=f"refund-{terminal_id}-{record.seq}",
                    )
                else:
                    fare = refund_credit(
                        terminal_id, record.seq, record.kind, record.card_id, record.fields
                    )
                    if fare is not None:
                        self._credit_fare(loads, fare, f"terminal {terminal_id}")
            except (LoadRefused, LoadStoreFailure, FareCreditError) as exc:
                # the record is stored; the operator sees the refusal (anomaly-free: logged)
                log.error(
                    "record not applied to loads",
                    terminal_id=terminal_id,
                    seq=record.seq,
                    kind=record.kind,
                    error=str(exc),
                )

    def correct_unfinished_trip(
        self, terminal_id: str, seq: int, amount: int, by: str, reason: str
    ) -> PendingLoad:
        """The host's later correction of an unfinished trip (issue 13: the policy's
        ``unfinished: "host"``): ``amount`` fen back to the card of the record the host holds
        at ``terminal_id`` / ``seq``, as one pending load whose id is the record's
        (:mod:`clearinghost.fare_refunds`): the same correction again is the same pending load,
        another amount for the same record is refused ``pending_exists``. Raises
        :class:`LoadRefused` (``unknown_record``, ``not_correctable``, ``loads_disabled``)."""
        loads = self.loads
        if loads is None:
            raise LoadRefused("loads_disabled", "this host does not keep pending loads")
        found = self.storage.records(terminal_id, after=seq - 1, limit=1)
        body = found[0] if found and found[0].get("seq") == seq else None
        if body is None or "notice" in body:  # none, or a quarantined slot: no record to trust
            raise LoadRefused(
                "unknown_record", f"the host holds no record {seq} of terminal {terminal_id!r}"
            )
        fields = body.get("fields")
        try:
            credit = correction_credit(
                terminal_id,
                seq,
                str(body.get("kind")),
                str(body.get("card_id")),
                fields if isinstance(fields, dict) else {},
                amount,
                self._max_fare(),
                reason,
            )
        except FareCreditError as exc:
            raise LoadRefused("not_correctable", str(exc)) from None
        pending = self._credit_fare(loads, credit, f"operator {by}")
        log.info(
            "unfinished trip corrected",
            terminal_id=terminal_id,
            seq=seq,
            amount=amount,
            by=by,
            pending_id=pending.id,
        )
        return pending

    def unfinished_trips(self, limit: int = 200) -> list[dict[str, Any]]:
        """Records left to the host's correction (``fare_unfinished: "host"``), newest first,
        each with the pending load that corrected it (``corrected``: its id, or ``None``)."""
        loads = self.loads
        done = (
            {p.id for p in loads.pending_loads(open_only=False) if p.source == FARE_SOURCE}
            if loads is not None
            else set()
        )
        listed = []
        for terminal_id, seq, body in self.storage.unfinished_for_host(limit):
            fields = body.get("fields", {})
            ident = fare_pending_id(terminal_id, seq)
            listed.append(
                {
                    "terminal_id": terminal_id,
                    "seq": seq,
                    "card_id": body.get("card_id"),
                    "created_at": body.get("created_at"),
                    "amount": body.get("amount"),
                    "fare_kind": fields.get("fare_kind"),
                    "fare_line": fields.get("fare_line"),
                    "fare_stop": fields.get("fare_stop"),
                    "corrected": ident if ident in done else None,
                }
            )
        return listed

    def _max_fare(self) -> int:
        """The ``max_fare`` of the newest published fare policy (no trip took more), else the
        largest amount any fare policy allows."""
        latest = self.storage.latest_params()
        raw = None if latest is None else latest.get("fare_policy")
        if raw is None:
            return MAX_FEN
        try:
            return parse_fare_policy(raw).max_fare
        except FarePolicyError:
            return MAX_FEN

    @staticmethod
    def _credit_fare(loads: LoadAuthority, fare: FareCredit, by: str) -> PendingLoad:
        """One pending load per fare record (its id is the record's: idempotent)."""
        return loads.credit(
            fare.asn,
            fare.amount,
            FARE_SOURCE,
            by,
            reference=fare.reference[:200],
            pending_id=fare.pending_id,
        )

    def upload(
        self,
        terminal_id: str,
        body: bytes,
        encoding: str | None,
        key: str | None,
        batch_signature: str | None = None,
    ) -> tuple[int, dict[str, Any]]:
        terminal = self.storage.terminal(terminal_id)
        if terminal is None:
            return 404, error_body("unknown_terminal", f"terminal {terminal_id!r} is unknown")
        records: Sequence[Record | QuarantineNotice] | Sequence[protocol.SignedEntry]
        try:
            signature = protocol.parse_batch_signature(batch_signature)
            if signature is None and self.require_batch_signature:
                log.warning("unsigned batch refused", terminal_id=terminal_id)
                return 422, error_body(
                    "batch_signature_required",
                    f"this host requires the {protocol.BATCH_SIGNATURE_HEADER} header "
                    f"(terminal {terminal_id!r} sent a v1 upload)",
                )
            # terminal binding is checked per record below (a refusal that names the seq)
            if signature is None:
                records, digest = protocol.decode_batch(body, encoding, None)
            else:
                records, digest = protocol.decode_signed_batch(body, encoding)
            protocol.check_idempotency_key(key, records, digest)
        except BatchTooLarge as exc:
            log.warning("batch refused", terminal_id=terminal_id, reason=str(exc))
            return 413, error_body("too_large", str(exc))
        except BadBatch as exc:
            log.warning("batch refused", terminal_id=terminal_id, reason=str(exc))
            return 400, error_body("bad_batch", str(exc))
        notice_seal = self._notice_checkers.get(terminal.public_key)
        if notice_seal is None:
            notice_seal = notice_checker(bytes.fromhex(terminal.public_key))
            self._notice_checkers[terminal.public_key] = notice_seal
        head: BatchHead | None = None
        if signature is None:
            seal = self._seal_checkers.get(terminal.public_key)
            if seal is None:
                seal = seal_checker(bytes.fromhex(terminal.public_key))
                self._seal_checkers[terminal.public_key] = seal
            # Records must verify to count: the first record that fails (binding, hash,
            # signature here; chain, gap, conflict in the storage) and every later one is not
            # stored. A quarantine notice counts when the terminal's device key signed it
            # (binding and signature here; gap and "never replaces a held record" in the
            # storage).
            screened = screen(
                records,  # type: ignore[arg-type]  # decode_batch's entries
                terminal_id,
                seal,
                self.tac,
                notice_seal,
            )
        else:
            # A signed batch: one device signature over the head (terminal, range, count,
            # chain head, body digest) proves every line came from this terminal; then each
            # record's hash and, in the storage, every link of the chain.
            signed = records  # decode_signed_batch's entries
            refused = batch_signature_refusal(
                signed,  # type: ignore[arg-type]
                terminal_id,
                digest,
                signature,
                self._verifier(terminal.public_key),
            )
            if refused is not None:  # nothing of the batch is stored; the refusal is noted
                screened = Screened([], {}, refused)
            else:
                screened = screen_signed(
                    signed,  # type: ignore[arg-type]
                    terminal_id,
                    self.tac,
                    notice_seal,
                )
            head = BatchHead(
                protocol.batch_head(
                    terminal_id,
                    records[0].seq,
                    records[-1].seq,
                    len(records),
                    records[-1].hash,
                    digest,
                ),
                signature.hex(),
                terminal.public_key,
            )
        assert key is not None
        try:
            result = self.storage.ingest(
                terminal_id, key, screened.accepted, screened.findings, screened.refusal, head
            )
        except StorageFull as exc:
            log.error("storage full; batch not stored", terminal_id=terminal_id, error=str(exc))
            return 507, error_body("storage_full", "the host's storage is full; retry later")
        except StorageFailure as exc:
            log.error("storage failed; batch not stored", terminal_id=terminal_id, error=str(exc))
            return 503, error_body("storage_failure", "the host's storage failed; retry later")
        if self.loads is not None:
            self._reconcile_loads(terminal_id, screened.accepted, result.ack_seq)
        log.info(
            "batch stored",
            terminal_id=terminal_id,
            first_seq=records[0].seq,
            last_seq=records[-1].seq,
            stored=result.stored,
            duplicates=result.duplicates,
            conflicts=result.conflicts,
            anomalies=result.anomalies,
            ack_seq=result.ack_seq,
            replay=result.replay,
            refused=result.refused,
        )
        if result.refused is not None:
            refused = result.refused
            status = 409 if refused.reason in ("gap", "conflict") else 422
            return status, {
                **error_body("record_refused", refused.detail),
                "seq": refused.seq,
                "reason": refused.reason,
                "ack_seq": result.ack_seq,
                "stored": result.stored,
            }
        answer = {
            "terminal_id": terminal_id,
            "idempotency_key": key,
            "last_seq": records[-1].seq,
            "last_hash": records[-1].hash,
            "ack_seq": result.ack_seq,
            "ack_hash": result.ack_hash,
            "stored": result.stored,
            "duplicates": result.duplicates,
            "conflicts": result.conflicts,
            "anomalies": result.anomalies,
        }
        return 200, protocol.sign_ack(answer, self.key.sign, self.key.key_id)

    def _verifier(self, public_key_hex: str) -> Callable[[bytes, bytes], bool]:
        verify = self._verifiers.get(public_key_hex)
        if verify is None:
            verify = signature_verifier(bytes.fromhex(public_key_hex))
            self._verifiers[public_key_hex] = verify
        return verify

    def heartbeat(self, terminal_id: str, figures: Any) -> tuple[int, dict[str, Any]]:
        if not isinstance(figures, dict):
            return 400, error_body("bad_heartbeat", "heartbeat must be a JSON object")
        held = self.storage.heartbeat(terminal_id, figures)
        if held is None:
            return 404, error_body("unknown_terminal", f"terminal {terminal_id!r} is unknown")
        ack_seq, blacklist_version = held
        return 200, {
            "terminal_id": terminal_id,
            "ack_seq": ack_seq,
            "blacklist_version": blacklist_version,
            "server_time": int(self.clock()),
        }

    # --- signed lists ---------------------------------------------------------------------

    def blacklist_answer(self, since: int, space: str = SPACE_SERIAL) -> SignedAnswer:
        """A signed list of one key space (raw serials, or printed numbers: agent.blacklist),
        with its gzip form: a delta from ``since`` (empty re-issue when current), else a
        snapshot. Both spaces share the version chain; each is its own signed list (its own
        magic). The answer signed for the same question (space, ``since`` or snapshot, current
        version) within the reissue window is served again (:meth:`_reused`); the current
        version is read on every call, so a newly published list is served at once."""
        current = self.storage.blacklist_version()
        base = since if 0 < since <= current else 0
        answer = self._reused((space, base, current, self.key.public_key_bytes))
        if answer is None:
            answer, base = self._sign_blacklist(since, space, current)
            self._keep((space, base, answer.version, self.key.public_key_bytes), answer)
        return answer

    def _sign_blacklist(self, since: int, space: str, current: int) -> tuple[SignedAnswer, int]:
        """The list answer signed now and its base version (0: a snapshot); its version may
        be above ``current`` (a list may have been published since ``current`` was read)."""
        now = int(self.clock())
        common = {
            "issued_at": now,
            "expires_at": now + self.list_ttl_s,
            "sign": self.key.sign,
            "public_key_raw": self.key.public_key_bytes,
            "space": space,
        }
        if 0 < since <= current:
            version, add, remove = self.storage.blacklist_delta(since, space)
            digest = self._blacklist_digest(version, space)
            if digest is not None:
                document = encode_list(
                    kind=KIND_DELTA,
                    version=version,
                    base_version=since,
                    add=add,
                    remove=remove,
                    content_digest=digest,
                    **common,  # type: ignore[arg-type]
                )
                return SignedAnswer(document, now, version), since
            # a list was published meanwhile: a snapshot is consistent by itself
        version, entries = self.storage.blacklist_snapshot(space)
        document = encode_list(
            kind=KIND_SNAPSHOT,
            version=version,
            base_version=0,
            add=entries,
            **common,  # type: ignore[arg-type]
        )
        return SignedAnswer(document, now, version), 0

    def _reissue_window(self) -> float:
        return min(self.reissue_window_s, self.list_ttl_s / 100)

    def _reused(self, key: tuple[str, int, int, bytes]) -> SignedAnswer | None:
        """The answer kept for ``key`` if it was signed less than the reissue window ago.

        Serving it instead of signing anew is safe: a version names one content (the storage
        never changes a published version, and the key carries the version), so the only
        difference a terminal can see is an issued_at up to the window old. The terminal takes
        the same version with a later issued_at as a re-issue that may only extend its expiry,
        and one with an equal or earlier issued_at as harmless, nothing to do
        (agent.blacklist ``Blacklist._check_acceptable``; sync.params ``ParamsFile.apply``
        for parameter sets); its expiry comes at most the window earlier."""
        answer = self._answers.get(key)
        if answer is None:
            return None
        age = self.clock() - answer.issued_at
        return answer if 0 <= age < self._reissue_window() else None

    def _keep(self, key: tuple[str, int, int, bytes], answer: SignedAnswer) -> None:
        """Keep ``answer`` for reuse, forgetting the answers of its space kept for another
        version or signing key (never asked for again: the current version is in the key)."""
        if self._reissue_window() <= 0:
            return
        if key[1] and len(answer.document) > MAX_CACHED_DELTA_BYTES:
            return
        space, _, version, signer = key
        with self._answers_lock:
            for old in [k for k in self._answers if k[0] == space and k[2:] != (version, signer)]:
                del self._answers[old]
            self._answers[key] = answer

    def _blacklist_digest(self, version: int, space: str = SPACE_SERIAL) -> bytes | None:
        """The content digest of blacklist ``version`` in ``space`` (it binds the version to the
        whole list it names, agent.blacklist); ``None`` if the current list is no longer that
        version."""
        digest = self._digests.get((space, version))
        if digest is None:
            at, entries = self.storage.blacklist_snapshot(space)
            if len(self._digests) > 16:
                self._digests.clear()
            digest = self._digests[(space, at)] = list_digest(entries)
            if at != version:
                return None
        return digest

    def root_statements_since(self, since: int) -> list[dict[str, Any]]:
        """The root statements with a version above ``since``, oldest first."""
        found = [json.loads(s) for s in self.root_statements]
        return [s for s in found if int(s["payload"]["version"]) > since]

    def params_document(self, since: int) -> bytes | None:
        """The latest valid parameter set, signed now (a re-issue extends the terminal's
        expiry; ``since`` is accepted for symmetry and logging). ``None`` if none was published.

        A stored set the terminals would refuse (stored before publications were checked) is
        skipped with an error in the log: the newest valid one before it is served.

        A stored set never changes: one signed answer per version (see :meth:`_reused`). A pull
        within the reissue window reads only the newest version number; the stored sets
        (up to :data:`PARAMS_FALLBACK_DEPTH` of them) are read and checked once per window."""
        newest = self.storage.params_version()
        answer = self._reused(("params", 0, newest, self.key.public_key_bytes))
        if answer is None:  # a new window, a new version, or a newest set the terminals refuse
            answer = self._newest_valid_params()
        if answer is not None and since > answer.version:
            log.warning("terminal ahead of the host's parameters", since=since, host=answer.version)
        return None if answer is None else answer.document

    def _newest_valid_params(self) -> SignedAnswer | None:
        for stored in self.storage.recent_params(PARAMS_FALLBACK_DEPTH):
            payload = self._payload(stored)
            problem = params_problem(payload)
            if problem is not None:
                log.error(
                    "stored parameter set skipped", version=stored.get("version"), why=problem
                )
                continue
            version = int(payload["version"])
            key = ("params", 0, version, self.key.public_key_bytes)
            answer = self._reused(key)
            if answer is None:
                answer = SignedAnswer(
                    sign_params(payload, self.key), int(payload["issued_at"]), version
                )
                self._keep(key, answer)
            return answer
        return None

    def merchant_clearing(self) -> MerchantClearing:
        """The merchant register and daily clearing (:mod:`clearinghost.merchant_clearing`)."""
        return MerchantClearing(self.storage, self.key, self.fees, self.time_zone, self.clock)

    def check_params(self, published: dict[str, Any]) -> str | None:
        """Why the agent or the daemon would refuse ``published`` once signed, else ``None``;
        and, at publication only, a fare policy that would take effect in the past."""
        payload = self._payload(dict(published, version=1))
        return params_problem(payload) or publication_problem(payload, int(self.clock()))

    def _payload(self, stored: dict[str, Any]) -> dict[str, Any]:
        now = int(self.clock())
        payload = dict(stored, issued_at=now, expires_at=now + self.list_ttl_s)
        # Not "now": a re-issue of a version must carry the same content (agent.params).
        payload.setdefault("effective_from", 0)
        return payload


# --- HTTP ------------------------------------------------------------------------------------


# Answers that ask the terminal to come back later carry Retry-After (RFC 9110 10.2.3)
RETRY_LATER_STATUS = frozenset({429, 503, 507})


def _json(status: int, body: dict[str, Any], retry_after_s: int | None = None) -> JSONResponse:
    answer = JSONResponse(body, status_code=status)
    if status in RETRY_LATER_STATUS:
        answer.headers["Retry-After"] = str(retry_after_s or HostLimits.retry_after_s)
    return answer


class Refusal(Exception):
    """A request the host answers with a 4xx before its handler runs (body too large, not
    JSON, too deeply nested, a bad query number)."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail

    def response(self) -> JSONResponse:
        answer = _json(self.status, error_body(self.code, self.detail))
        if self.status in (408, 413):
            # the rest of the body is not read: close rather than wait for it
            answer.headers["Connection"] = "close"
        return answer


def _body_timeout(request: Request) -> float:
    """The app's body timeout (:class:`HostLimits`), set on the app by :func:`create_app`."""
    value = getattr(request.app.state, "body_timeout_s", None)
    return float(value) if value is not None else HostLimits.body_timeout_s


async def read_body(request: Request, cap: int) -> bytes:
    """The request body, read chunk by chunk and refused (413) as soon as it passes ``cap``,
    with or without ``Content-Length`` (a declared length above ``cap`` is refused unread),
    and refused (408) when it has not all arrived within the body timeout."""
    length = request.headers.get("content-length")
    if length is not None:
        if not (length.isascii() and length.isdigit()):
            raise Refusal(400, "bad_request", "Content-Length is not a number")
        if len(length) > 20 or int(length) > cap:
            raise Refusal(413, "too_large", f"body above {cap} bytes")
    chunks: list[bytes] = []
    size = 0
    timeout = _body_timeout(request)
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > cap:
                    raise Refusal(413, "too_large", f"body above {cap} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise Refusal(
            408, "body_timeout", f"body not received within {timeout:g} s ({size} bytes came)"
        ) from None
    return b"".join(chunks)


async def drain_body(request: Request, cap: int) -> int:
    """Read a body away without keeping it (a refused upload): its size, bounded like
    :func:`read_body` (413 past ``cap``, 408 past the body timeout)."""
    size = 0
    timeout = _body_timeout(request)
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > cap:
                    raise Refusal(413, "too_large", f"body above {cap} bytes")
    except TimeoutError:
        raise Refusal(
            408, "body_timeout", f"body not received within {timeout:g} s ({size} bytes came)"
        ) from None
    return size


def json_depth_exceeds(value: Any, limit: int) -> bool:
    """Whether ``value`` nests lists/objects deeper than ``limit`` (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth >= limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return False


async def read_json(request: Request, cap: int) -> Any:
    """The body as JSON, bounded: 413 above ``cap`` bytes, 400 naming the problem when it is
    not UTF-8 JSON or nests deeper than :data:`MAX_JSON_DEPTH`."""
    return parse_json(await read_body(request, cap))


def parse_json(body: bytes) -> Any:
    """Bytes as JSON, bounded in depth; :class:`Refusal` 400 naming the problem."""
    try:
        value = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except RecursionError:
        raise Refusal(400, "too_deep", f"JSON nested deeper than {MAX_JSON_DEPTH}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise Refusal(400, "bad_json", f"body is not JSON: {str(exc)[:120]}") from None
    if json_depth_exceeds(value, MAX_JSON_DEPTH):
        raise Refusal(400, "too_deep", f"JSON nested deeper than {MAX_JSON_DEPTH}")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def query_number(request: Request, name: str, default: int) -> int:
    """A non-negative decimal query parameter (ASCII digits, at most :data:`MAX_QUERY_NUMBER`);
    400 naming the parameter otherwise."""
    text = request.query_params.get(name)
    if text is None:
        return default
    if not (text.isascii() and text.isdigit()) or len(text) > 19 or int(text) > MAX_QUERY_NUMBER:
        raise Refusal(
            400, "bad_request", f"{name} must be a number 0..{MAX_QUERY_NUMBER}, not {text[:40]!r}"
        )
    return int(text)


def parse_printed(payload: dict[str, Any], name: str) -> list[int]:
    """``printed_add``/``printed_remove`` of a blacklist publication: printed card numbers of
    one issuer each, ``{"issuer": "5180", "number": "881146306"}`` (a 4-digit city code and 1
    to 14 decimal digits, :func:`agent.blacklist.printed_key`). A bare number is refused:
    printed numbers are unique only within their issuer (issue 15)."""
    values = payload.get(name, [])
    if not isinstance(values, list):
        raise Refusal(400, "bad_request", f"{name} must be a list of printed card numbers")
    keys = []
    for i, value in enumerate(values):
        try:
            if isinstance(value, str):
                raise ValueError(
                    f"{value[:40]!r} names no issuer (a printed number is unique only within "
                    'its issuer): send {"issuer": "5180", "number": "881146306"}'
                )
            if (
                not isinstance(value, dict)
                or not isinstance(value.get("issuer"), str)
                or not isinstance(value.get("number"), str)
                or set(value) != {"issuer", "number"}
            ):
                raise ValueError(
                    f"{str(value)[:60]} is not {{'issuer': CITY CODE, 'number': DIGITS}}"
                )
            keys.append(printed_key(value["issuer"], value["number"]))
        except ValueError as exc:
            raise Refusal(400, "bad_printed_number", f"{name}[{i}]: {exc}") from None
    return keys


def parse_unscoped(payload: dict[str, Any], name: str) -> list[int]:
    """``printed_remove_unscoped``: printed numbers listed before issuer scoping (``p:NUMBER``
    rows, never published since) to remove, 1 to 19 decimal digits each."""
    values = payload.get(name, [])
    if not isinstance(values, list):
        raise Refusal(400, "bad_request", f"{name} must be a list of printed card numbers")
    numbers = []
    for i, value in enumerate(values):
        if not (
            isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 19
        ):
            raise Refusal(
                400,
                "bad_printed_number",
                f"{name}[{i}]: {str(value)[:40]!r} is not 1 to 19 decimal digits",
            )
        numbers.append(int(value))
    return numbers


def parse_asns(payload: dict[str, Any], name: str) -> list[int]:
    """``add``/``remove`` of a blacklist publication: a list of ASNs, 1-16 hex digits each."""
    values = payload.get(name, [])
    if not isinstance(values, list):
        raise Refusal(400, "bad_request", f"{name} must be a list of hex ASNs")
    asns = []
    for value in values:
        if not isinstance(value, str) or not _ASN_PATTERN.fullmatch(value):
            raise Refusal(
                400,
                "bad_asn",
                f"{name}: {str(value)[:40]!r} is not an ASN (1 to 16 hex digits, 0..2^64-1)",
            )
        asns.append(int(value, 16))
    return asns


def params_problem(payload: dict[str, Any]) -> str | None:
    """What is wrong with a parameter set as it would be signed, naming the field: the
    daemon's check (:func:`sync.params.check_payload`), canonical JSON (no NaN/infinity), the
    agent's size cap, and the values the agent would otherwise silently ignore (a fare that is
    not an integer 0..2^32-1, an issuer that is not even-length hex)."""
    try:
        check_payload(payload)
        size = len(canonical_json(payload).encode("utf-8"))
    except (ValueError, TypeError, KeyError) as exc:
        return str(exc)
    if size + 1024 > MAX_PARAMS_FILE_BYTES:
        return f"the signed set would be above the agent's {MAX_PARAMS_FILE_BYTES} bytes"
    fare = payload.get("fare_table", {}).get("flat_fare")
    if fare is not None and (
        isinstance(fare, bool) or not isinstance(fare, int) or not 0 <= fare <= MAX_FARE
    ):
        return f"field 'fare_table.flat_fare' must be an integer 0..{MAX_FARE}, got {fare!r:.60}"
    for index, issuer in enumerate(payload.get("issuer_allow_list", [])):
        if not issuer or len(issuer) % 2 or not _is_hex(issuer):
            return f"field 'issuer_allow_list[{index}]' must be even-length hex, got {issuer!r:.40}"
    return None


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return text.isascii() and " " not in text


def guarded(
    handler: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    """A route whose :class:`Refusal` becomes its 4xx answer."""

    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except Refusal as refusal:
            if refusal.status in (408, 413):
                log.warning("request body refused", path=request.url.path, detail=refusal.detail)
            return refusal.response()

    return wrapped


def create_app(host: ClearingHost) -> Starlette:
    """The ASGI application."""

    def authorised(
        role: str, handler: Callable[[Request], Awaitable[Response]]
    ) -> Callable[..., Any]:
        """Operator routes: same origin, an operator with ``role``, JSON bodies."""

        async def wrapped(request: Request) -> Response:
            origin = request.headers.get("origin")
            if origin is not None and not _same_origin(request, origin):
                log.warning("cross-origin operator request refused", origin=origin[:200])
                return _json(403, error_body("foreign_origin", "cross-origin request refused"))
            who = host.operators.from_authorization(request.headers.get("authorization", ""))
            if who is None:
                answer = _json(401, error_body("unauthorised", "operator token required"))
                answer.headers["WWW-Authenticate"] = 'Basic realm="cardsync operators"'
                return answer
            if not who.may(role):
                return _json(403, error_body("forbidden", f"needs the {role} role"))
            if request.method == "POST":
                media = request.headers.get("content-type", "").split(";")[0].strip().lower()
                if media != "application/json":
                    return _json(415, error_body("unsupported_media", "send application/json"))
            if role == OPERATOR:
                log.info("operator action", operator=who.name, path=request.url.path)
            request.scope[OPERATOR_SCOPE] = who.name
            return await guarded(handler)(request)

        return wrapped

    async def register(request: Request) -> Response:
        terminal_id = terminal_of(request)
        payload = await read_json(request, MAX_SMALL_BODY_BYTES)
        if not isinstance(payload, dict):
            return _json(400, error_body("bad_request", "body must be a JSON object"))
        status, body = await run_in_threadpool(host.register, terminal_id, payload)
        return _json(status, body)

    def rate_limited(request: Request, client: str) -> Response | None:
        """429 ``rate_limited`` with Retry-After when ``client`` is over its rate, else None."""
        wait = request.app.state.client_rate.take(client, time.monotonic())
        if not wait:
            return None
        limits = host.limits
        after = max(1, min(limits.max_retry_after_s, ceil(wait)))
        log.warning(
            "request refused: over the client rate",
            client=client,
            path=request.url.path,
            retry_after_s=after,
        )
        detail = (
            f"terminal {client!r} sends more than {limits.client_rate:g} requests a second "
            f"(burst {limits.client_burst}); retry after {after} s"
        )
        return _json(429, error_body("rate_limited", detail), retry_after_s=after)

    async def upload(request: Request) -> Response:
        terminal_id = terminal_of(request)
        refused = rate_limited(request, terminal_id)
        if refused is not None:
            await drain_body(request, MAX_UPLOAD_BYTES)  # as a busy refusal: read away, unkept
            return refused
        gate: UploadGate = request.app.state.upload_gate
        if not await gate.enter():
            # refused before its body is held: read it away in steps (the answer then reaches
            # the client, which writes its whole body before it reads), keep none of it
            await drain_body(request, MAX_UPLOAD_BYTES)
            wait = gate.retry_after()
            log.warning(
                "upload refused: host busy",
                terminal_id=terminal_id,
                retry_after_s=wait,
                **gate.figures(),
            )
            detail = (
                f"the host is verifying {gate.limits.max_uploads} uploads and "
                f"{gate.waiting} more wait; retry after {wait} s"
            )
            return _json(503, error_body("busy", detail), retry_after_s=wait)
        started = time.monotonic()
        try:
            body = await read_body(request, MAX_UPLOAD_BYTES)
            status, answer = await run_in_threadpool(
                host.upload,
                terminal_id,
                body,
                request.headers.get("content-encoding"),
                request.headers.get(protocol.IDEMPOTENCY_HEADER),
                request.headers.get(protocol.BATCH_SIGNATURE_HEADER),
            )
        finally:
            gate.leave(time.monotonic() - started)
        response = _json(status, answer, retry_after_s=host.limits.retry_after_s)
        if host.limits.close_busy_connections and gate.active > 0:
            # this worker has other uploads in flight: the terminal's next batch opens a new
            # connection, which a less busy worker of the shared socket accepts first
            response.headers["connection"] = "close"
        return response

    async def heartbeat(request: Request) -> Response:
        terminal_id = terminal_of(request)
        figures = await read_json(request, MAX_SMALL_BODY_BYTES)
        status, body = await run_in_threadpool(host.heartbeat, terminal_id, figures)
        return _json(status, body)

    async def add_terminal(request: Request) -> Response:
        payload = await read_json(request, MAX_SMALL_BODY_BYTES)
        if not isinstance(payload, dict):
            return _json(400, error_body("bad_request", "body must be a JSON object"))
        status, body = await run_in_threadpool(host.add_terminal, operator_name(request), payload)
        return _json(status, body)

    async def rotate_key(request: Request) -> Response:
        terminal_id = terminal_of(request, bind=False)
        payload = await read_json(request, MAX_SMALL_BODY_BYTES)
        if not isinstance(payload, dict):
            return _json(400, error_body("bad_request", "body must be a JSON object"))
        status, body = await run_in_threadpool(
            host.authorise_rotation, operator_name(request), terminal_id, payload
        )
        return _json(status, body)

    async def terminal_entries(request: Request) -> Response:
        return _json(200, {"terminals": await run_in_threadpool(host.terminal_listing)})

    async def blacklist(request: Request) -> Response:
        refused = rate_limited(request, puller_of(request))
        if refused is not None:
            return refused
        since = query_number(request, "since", 0)
        space = request.query_params.get("space", SPACE_SERIAL)
        if space not in LIST_MAGICS:
            raise Refusal(
                400,
                "bad_request",
                f"space must be {' or '.join(LIST_MAGICS)}, not {space[:40]!r}",
            )
        answer = await run_in_threadpool(host.blacklist_answer, since, space)
        document = answer.document
        headers = {"Cache-Control": "no-store"}
        if len(document) > 1024 and "gzip" in request.headers.get("accept-encoding", ""):
            document = await run_in_threadpool(answer.gzipped)  # made once per answer kept
            headers["Content-Encoding"] = "gzip"
        return Response(document, media_type=protocol.BLACKLIST_MEDIA_TYPE, headers=headers)

    async def params(request: Request) -> Response:
        refused = rate_limited(request, puller_of(request))
        if refused is not None:
            return refused
        since = query_number(request, "since", 0)
        document = await run_in_threadpool(host.params_document, since)
        if document is None:
            return _json(404, error_body("no_params", "no parameter set has been published"))
        return Response(document, media_type="application/json")

    async def root(request: Request) -> Response:
        since = query_number(request, "since", 0)
        statements = host.root_statements_since(since)
        if not host.root_statements:
            return _json(404, error_body("no_root", "this host publishes no root statements"))
        return _json(200, {"statements": statements})

    async def publish_blacklist(request: Request) -> Response:
        payload = await read_json(request, MAX_ADMIN_BODY_BYTES)
        if not isinstance(payload, dict):
            return _json(
                400, error_body("bad_request", 'body must be {"add": [...], "remove": [...]}')
            )
        add, remove = parse_asns(payload, "add"), parse_asns(payload, "remove")
        printed_add = parse_printed(payload, "printed_add")
        printed_remove = parse_printed(payload, "printed_remove")
        unscoped_remove = parse_unscoped(payload, "printed_remove_unscoped")
        entries = (
            len(set(add) | set(remove))
            + len(set(printed_add) | set(printed_remove))
            + len(set(unscoped_remove))
        )
        if entries > host.approval_threshold:
            by = operator_name(request)
            change = await run_in_threadpool(
                partial(
                    host.storage.propose_blacklist,
                    add,
                    remove,
                    by,
                    printed_add=printed_add,
                    printed_remove=printed_remove,
                    unscoped_remove=unscoped_remove,
                )
            )
            detail = (
                f"{entries} entries is above {host.approval_threshold}: change {change} waits "
                f"for another operator's approval (POST {v1}/admin/blacklist/pending/{change}"
                "/approve)"
            )
            return _json(
                202,
                {
                    "pending_id": change,
                    "state": "pending",
                    "entries": entries,
                    "threshold": host.approval_threshold,
                    "detail": detail,
                },
            )
        version = await run_in_threadpool(
            host.storage.publish_blacklist,
            add,
            remove,
            printed_add,
            printed_remove,
            unscoped_remove,
        )
        return _json(200, {"version": version})

    async def printed_entries(request: Request) -> Response:
        version, scoped, unscoped = await run_in_threadpool(host.storage.printed_blacklist_entries)
        return _json(
            200,
            {
                "version": version,
                "printed": [{"issuer": i, "number": n} for i, n in scoped],
                "unscoped": unscoped,
            },
        )

    async def pending_blacklist(request: Request) -> Response:
        changes = await run_in_threadpool(host.storage.pending_changes, "pending")
        return _json(200, {"pending": changes})

    def decide(approve: bool) -> Callable[[Request], Awaitable[Response]]:
        async def decision(request: Request) -> Response:
            text = request.path_params["change_id"]
            if not (text.isascii() and text.isdigit()) or len(text) > 18:
                raise Refusal(400, "bad_request", f"change id must be a number, not {text[:40]!r}")
            by = operator_name(request)
            try:
                version = await run_in_threadpool(
                    partial(host.storage.decide_blacklist, int(text), by, approve=approve)
                )
            except PendingChangeRefused as exc:
                status = {"unknown_change": 404, "own_change": 403}.get(exc.code, 409)
                return _json(status, error_body(exc.code, exc.detail))
            answer: dict[str, Any] = {
                "pending_id": int(text),
                "state": "approved" if approve else "rejected",
                "decided_by": by,
            }
            if version is not None:
                answer["version"] = version
            return _json(200, answer)

        return decision

    async def publish_params(request: Request) -> Response:
        payload = await read_json(request, MAX_ADMIN_BODY_BYTES)
        if not isinstance(payload, dict):
            return _json(400, error_body("bad_request", "body must be a JSON object"))
        problem = host.check_params(payload)
        if problem is not None:
            log.warning("parameter set refused", problem=problem)
            return _json(400, error_body("bad_params", problem))
        version = await run_in_threadpool(host.storage.publish_params, payload)
        return _json(200, {"version": version})

    async def terminals(request: Request) -> Response:
        rows = await run_in_threadpool(host.storage.terminals)
        return _json(
            200,
            {
                "terminals": [
                    {
                        "terminal_id": t.terminal_id,
                        "ack_seq": t.ack_seq,
                        "last_seen": t.last_seen,
                        "heartbeat": t.heartbeat,
                    }
                    for t in rows
                ]
            },
        )

    async def terminal_records(request: Request) -> Response:
        terminal_id = terminal_of(request, bind=False)
        after = query_number(request, "after", 0)
        limit = query_number(request, "limit", 100)
        rows = await run_in_threadpool(host.storage.records, terminal_id, after, min(limit, 1000))
        return _json(200, {"records": rows})

    async def anomalies(request: Request) -> Response:
        terminal_id = request.query_params.get("terminal_id")
        if terminal_id is not None and (problem := terminal_id_problem(terminal_id)):
            raise Refusal(400, "bad_terminal_id", problem)
        rows = await run_in_threadpool(host.storage.anomalies, terminal_id)
        return _json(200, {"anomalies": rows})

    async def openapi(request: Request) -> Response:
        return Response(OPENAPI_PATH.read_bytes(), media_type="application/json")

    async def healthz(request: Request) -> Response:
        return _json(200, {"status": "ok", "protocol": protocol.PROTOCOL_VERSION})

    async def page(request: Request) -> Response:
        return HTMLResponse(
            await run_in_threadpool(operator_page, host),
            headers={
                "Cache-Control": "no-store",
                "X-Frame-Options": "DENY",
                "Content-Security-Policy": (
                    "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'"
                ),
            },
        )

    v1 = protocol.API_PREFIX
    routes = [
        Route("/", authorised(VIEWER, page)),
        Route("/openapi.json", openapi),
        Route("/healthz", healthz),
        Route(f"{v1}/terminals", authorised(VIEWER, terminals)),
        Route(f"{v1}/terminals/{{terminal_id}}/register", guarded(register), methods=["POST"]),
        Route(f"{v1}/terminals/{{terminal_id}}/records", guarded(upload), methods=["POST"]),
        Route(
            f"{v1}/terminals/{{terminal_id}}/records",
            authorised(VIEWER, terminal_records),
            methods=["GET"],
        ),
        Route(f"{v1}/terminals/{{terminal_id}}/heartbeat", guarded(heartbeat), methods=["POST"]),
        Route(f"{v1}/blacklist", guarded(blacklist)),
        Route(f"{v1}/params", guarded(params)),
        Route(f"{v1}/root", guarded(root)),
        Route(f"{v1}/anomalies", authorised(VIEWER, anomalies)),
        Route(f"{v1}/admin/blacklist", authorised(OPERATOR, publish_blacklist), methods=["POST"]),
        Route(f"{v1}/admin/blacklist/printed", authorised(VIEWER, printed_entries)),
        Route(f"{v1}/admin/params", authorised(OPERATOR, publish_params), methods=["POST"]),
        Route(f"{v1}/admin/terminals", authorised(VIEWER, terminal_entries), methods=["GET"]),
        Route(f"{v1}/admin/terminals", authorised(OPERATOR, add_terminal), methods=["POST"]),
        Route(
            f"{v1}/admin/terminals/{{terminal_id}}/rotate-key",
            authorised(OPERATOR, rotate_key),
            methods=["POST"],
        ),
        Route(f"{v1}/admin/blacklist/pending", authorised(VIEWER, pending_blacklist)),
        Route(
            f"{v1}/admin/blacklist/pending/{{change_id}}/approve",
            authorised(OPERATOR, decide(approve=True)),
            methods=["POST"],
        ),
        Route(
            f"{v1}/admin/blacklist/pending/{{change_id}}/reject",
            authorised(OPERATOR, decide(approve=False)),
            methods=["POST"],
        ),
        *merchant_routes(v1, host.merchant_clearing(), authorised, operator_name, read_json),
    ]
    kit = RouteKit(terminal_of, read_body, Refusal, parse_json, operator_name)
    routes += load_routes(host, kit, guarded, authorised)
    routes += kiosk_routes(v1, host, kit, guarded, authorised, operator_name)
    app = Starlette(routes=routes, exception_handlers={404: _http_error, 405: _http_error})
    app.state.body_timeout_s = host.limits.body_timeout_s
    app.state.upload_gate = UploadGate(host.limits)
    app.state.client_rate = ClientRateLimit(host.limits.client_rate, host.limits.client_burst)
    return app


async def _http_error(request: Request, exc: Exception) -> Response:
    """No such route (404) or method (405): a JSON error like every other refusal."""
    status = int(getattr(exc, "status_code", 404))
    code = "not_found" if status == 404 else "method_not_allowed"
    detail = f"no {request.method} {request.url.path[:200]!r} here" + (
        " (see /openapi.json)" if status == 404 else ""
    )
    answer = _json(status, error_body(code, detail))
    allow = getattr(exc, "headers", None) or {}
    answer.headers.update(allow)
    return answer


OPERATOR_SCOPE = "cardhost.operator"  # the authenticated operator's name, set by authorised()


def operator_name(request: Request) -> str:
    return str(request.scope.get(OPERATOR_SCOPE, "?"))


def terminal_of(request: Request, *, bind: bool = True) -> str:
    """The path's terminal id, checked against the one rule (400 ``bad_terminal_id``).

    ``bind``: a terminal's own call. A connection with a client certificate (mutual TLS) may
    act only as the terminal its certificate names: the subject CN must equal the id, else
    403 ``certificate_mismatch`` naming both (a certificate issued to TA never speaks for TB).
    """
    terminal_id = str(request.path_params["terminal_id"])
    problem = terminal_id_problem(terminal_id)
    if problem is not None:
        raise Refusal(400, "bad_terminal_id", problem)
    if bind:
        certificate = request.scope.get("state", {}).get(PEER_CERT_STATE)
        if certificate:
            names = certificate_common_names(certificate)
            if names != [terminal_id]:
                log.warning(
                    "certificate used for another terminal",
                    terminal_id=terminal_id,
                    certificate_cn=names,
                )
                raise Refusal(
                    403,
                    "certificate_mismatch",
                    f"the client certificate is issued to {', '.join(map(repr, names)) or 'no CN'}"
                    f", not to terminal {terminal_id!r}",
                )
    return terminal_id


def puller_of(request: Request) -> str:
    """Who pulls a list (``/v1/blacklist``, ``/v1/params``: no terminal id in the path), for
    the client rate: the client certificate's CN (mutual TLS), else the terminal id the
    daemon names in ``Cardsync-Terminal`` (if it follows the id rule), else the peer address."""
    certificate = request.scope.get("state", {}).get(PEER_CERT_STATE)
    if certificate:
        names = certificate_common_names(certificate)
        if names:
            return names[0]
    named = request.headers.get(protocol.TERMINAL_HEADER)
    if named is not None and terminal_id_problem(named) is None:
        return named
    peer = request.client
    return f"peer {peer.host}" if peer is not None else "peer ?"


def certificate_common_names(certificate: dict[str, Any]) -> list[str]:
    """The subject commonName values of a certificate as ``ssl.getpeercert()`` returns it."""
    return [
        str(value)
        for rdn in certificate.get("subject", ())
        for name, value in rdn
        if name == "commonName"
    ]


def _same_origin(request: Request, origin: str) -> bool:
    """Whether ``origin`` is the host itself (the page's own scripts, not another site's)."""
    own = request.headers.get("host", "")
    return bool(own) and origin.rstrip("/").lower() == f"{request.url.scheme}://{own}".lower()


def operator_page(host: ClearingHost) -> str:
    """The operator's HTML page: terminals, anomalies, latest records (refreshes itself)."""
    storage = host.storage
    esc = html.escape
    rows = []
    for t in storage.terminals():
        beat = t.heartbeat or {}
        seen = (
            "-" if t.last_seen is None else time.strftime("%H:%M:%S", time.localtime(t.last_seen))
        )
        rows.append(
            f"<tr><td>{esc(t.terminal_id)}</td><td>{t.ack_seq}</td>"
            f"<td>{storage.count_records(t.terminal_id)}</td><td>{seen}</td>"
            f"<td>{esc(str(beat.get('unsent_records', '-')))}</td>"
            f"<td>{esc(str(beat.get('oldest_unsent_age_s', '-')))}</td>"
            f"<td>{esc(str(beat.get('blacklist_version', '-')))}</td></tr>"
        )
    anomalies = [
        f"<tr><td>{esc(a['terminal_id'])}</td><td>{a['seq']}</td><td>{esc(a['kind'])}</td>"
        f"<td>{esc(a['detail'])}</td><td>{a['repeats']}</td></tr>"
        for a in storage.anomalies(limit=50)
    ]
    recent = []
    for t in storage.terminals():
        for stored in storage.records(t.terminal_id, max(0, t.ack_seq - 10), 10):
            r = stored
            if "notice" in stored:  # a slot the terminal's quarantine notice fills
                r = {**stored, "kind": "quarantined", "card_id": "-", "amount": 0}
                r["created_at"] = stored["quarantined_at"]
            recent.append(
                f"<tr><td>{esc(r['terminal_id'])}</td><td>{r['seq']}</td><td>{esc(r['kind'])}</td>"
                f"<td>{esc(r['card_id'])}</td><td>{r['amount']}</td>"
                f"<td>{esc(r['created_at'])}</td></tr>"
            )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><meta http-equiv="refresh" content="5">
<title>cardsync clearing host</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin-bottom:2em}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}</style></head><body>
<h1>Clearing host</h1>
<p>Blacklist version {storage.blacklist_version()} · host key {esc(host.key.key_id)} ·
 storage {esc(storage.backend)} · <a href="/openapi.json">API</a></p>
<h2>Terminals</h2><table><tr><th>terminal</th><th>acknowledged seq</th><th>records</th>
<th>last seen</th><th>unsent</th><th>oldest unsent (s)</th><th>blacklist</th></tr>
{"".join(rows)}</table>
<h2>Anomalies</h2><table><tr><th>terminal</th><th>seq</th><th>kind</th><th>detail</th>
<th>repeats</th></tr>
{"".join(anomalies)}</table>
<h2>Latest records</h2><table><tr><th>terminal</th><th>seq</th><th>kind</th><th>card</th>
<th>amount</th><th>created</th></tr>{"".join(recent)}</table>
{merchant_page_section(storage)}
</body></html>"""


# --- serving -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerTls:
    """TLS for the host; with ``client_ca_file`` it requires client certificates (mTLS)."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None


class PeerCertProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol (httptools, the C parser: about 30 % less of the host's CPU a
    small request than h11's, measured side by side), plus the TLS client certificate of the
    connection in each request's ``scope["state"][PEER_CERT_STATE]`` (uvicorn does not pass it
    to the app)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        certificate = ssl_object.getpeercert() if ssl_object is not None else None
        if certificate:
            self.app_state = {**self.app_state, PEER_CERT_STATE: certificate}


_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"connection: close\r\nretry-after: %d\r\ncontent-length: %d\r\n\r\n%s"
)


_HEAD_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s"
)


def bounded_protocol(limits: HostLimits) -> type[HttpToolsProtocol]:
    """uvicorn's HTTP/1.1 protocol with a cap on open connections, a deadline for request heads
    and a bound on their size.

    A connection beyond ``limits.max_connections`` is answered 503 (JSON) and closed before it
    is read. A connection that has not sent a complete request head within
    ``limits.header_timeout_s`` of opening (or of its previous answer) is closed, however
    slowly it keeps sending (uvicorn's keep-alive timer restarts on every byte). A request head
    longer than ``limits.max_head_bytes`` is answered 431 and the connection closed: the parser
    hands each header to uvicorn as it arrives and neither bounds them, so without this a head
    could grow until the deadline at the sender's pace."""

    class BoundedProtocol(PeerCertProtocol):
        _head_timer: asyncio.TimerHandle | None = None
        _in_head = True  # the current request's head is not complete yet
        _head_began = False  # a request began in the read being handled
        _head_bytes = 0  # the reads since then that left its head unfinished

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections:
                detail = f"the host holds {limits.max_connections} connections; retry later"
                body = json.dumps(error_body("busy", detail)).encode()
                wait = max(limits.retry_after_s, 5)
                transport.write(_BUSY % (wait, len(body), body))
                transport.close()
                log.warning("connection refused: too many open", limit=limits.max_connections)
                return
            self._arm_head_timer()

        def data_received(self, data: bytes) -> None:
            if self.transport.is_closing():
                return
            self._head_began = False
            super().data_received(data)
            if self._in_head:
                # The read a request begins in is not counted (where in it the request began
                # is not known; it may hold the end of the previous body), the later ones whole
                # while the head is unfinished: a head is held to the bound plus two reads.
                if not self._head_began:
                    self._head_bytes += len(data)
                if self._head_bytes > limits.max_head_bytes:
                    self._refuse_head()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_head, self._head_began, self._head_bytes = True, True, 0

        def on_headers_complete(self) -> None:
            self._in_head = False
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

        def _refuse_head(self) -> None:
            detail = f"the request head exceeds {limits.max_head_bytes} bytes"
            body = json.dumps(error_body("head_too_large", detail)).encode()
            self.transport.write(_HEAD_TOO_LARGE % (len(body), body))
            self.transport.close()
            log.warning("connection closed: request head too large", client=self.client)

        def _arm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(
                limits.header_timeout_s, self._head_timeout, self.cycle
            )

        def _head_timeout(self, armed_cycle: object) -> None:
            # A new request since the timer was armed: that request's answer re-arms it.
            if self.cycle is not armed_cycle or self.transport.is_closing():
                return
            if self.cycle is not None and not self.cycle.response_complete:
                return  # the app is handling a request (its body has the body timeout)
            log.warning("connection closed: no request head in time", client=self.client)
            self.transport.close()

    return BoundedProtocol


def uvicorn_config(
    app: Any,
    *,
    tls: ServerTls | None = None,
    log_level: str = "warning",
    limits: HostLimits | None = None,
) -> Any:
    limits = limits or HostLimits()
    kwargs: dict[str, Any] = {}
    if tls is not None:
        kwargs.update(ssl_certfile=str(tls.cert_file), ssl_keyfile=str(tls.key_file))
        if tls.client_ca_file is not None:
            kwargs.update(ssl_ca_certs=str(tls.client_ca_file), ssl_cert_reqs=ssl.CERT_REQUIRED)
    return uvicorn.Config(
        app,
        log_level=log_level,
        access_log=False,
        lifespan="off",
        http=bounded_protocol(limits),
        timeout_keep_alive=limits.keep_alive_s,
        # uvicorn's own guard (requests in flight or connections): one above the connection
        # cap, so the protocol's JSON 503 answers first and uvicorn's never has to
        limit_concurrency=limits.max_connections + 1,
        **kwargs,
    )


class HostServer:
    """Serve an ASGI app with uvicorn on ``127.0.0.1`` in a background thread (tests, demo)."""

    def __init__(
        self,
        app: Any,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: ServerTls | None = None,
        log_level: str = "warning",
        limits: HostLimits | None = None,
    ) -> None:
        self._app = app
        self._tls = tls
        self._limits = limits
        self._log_level = log_level
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # accepted connections inherit TCP_NODELAY (Linux): no Nagle delay on small answers
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock.bind((host, port))
        self._sock.listen(128)
        self.host, self.port = self._sock.getsockname()[:2]
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self._tls else "http"
        return f"{scheme}://{self.host}:{self.port}"

    def start(self) -> HostServer:
        self._server = uvicorn.Server(
            uvicorn_config(self._app, tls=self._tls, log_level=self._log_level, limits=self._limits)
        )
        server = self._server

        def serve() -> None:
            asyncio.run(server.serve(sockets=[self._sock]))

        self._thread = threading.Thread(target=serve, name="clearing-host", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the clearing host did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        with contextlib.suppress(OSError):
            self._sock.close()

    def __enter__(self) -> HostServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def blacklist_publish_body(
    add: list[str],
    remove: list[str],
    printed_add: list[dict[str, str]] | None = None,
    printed_remove: list[dict[str, str]] | None = None,
) -> bytes:
    """Body of ``POST /v1/admin/blacklist``: hex serials in ``add`` / ``remove``, printed card
    numbers of one issuer each (``{"issuer": "5180", "number": "881146306"}``) in
    ``printed_add`` / ``printed_remove``."""
    body: dict[str, list[Any]] = {"add": add, "remove": remove}
    if printed_add or printed_remove:
        body["printed_add"] = printed_add or []
        body["printed_remove"] = printed_remove or []
    return json.dumps(body).encode()
