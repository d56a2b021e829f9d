"""The clearing host's storage: SQLite (default) or PostgreSQL (psycopg 3), same SQL.

Tables::

    terminals        terminal_id PK, public_key, registered_at, ack_seq, ack_hash, last_seen,
                     heartbeat (JSON)
    records          (terminal_id, seq) PK — the uniqueness that makes uploads idempotent —
                     hash, created_at, kind, card_id, amount, body (the record's JSON line),
                     merchant_id (the record's ``fields.merchant_id``, for clearing in SQL);
                     a slot filled by a terminal's quarantine notice has kind ``quarantined``,
                     hash = the notice's ``chain_hash``, no card, amount 0, body the notice
    batches          (terminal_id, idem_key) PK: every distinct upload, for audit and replays
    batch_signatures (terminal_id, idem_key) PK: a signed batch's head (first/last seq, entries,
                     last_hash, body_sha256), its device signature and the key it verified
                     under: the evidence that the records it stored came from the terminal
    audit_cursors    terminal_id PK, seq, hash: how far ``cardhost audit`` has re-verified
    anomalies        bad TACs, unresolved records; refused records (bad signature/hash, wrong
                     terminal, chain break, gap, conflict), which are never stored
    anomaly_repeats  (terminal_id, kind) PK, repeats, last_seen, last_seq, last_detail: a
                     refusal of a kind a terminal already had is counted here, not added as a
                     row (a terminal retrying a refused upload forever adds nothing); the
                     first occurrence stays in ``anomalies``
    pending_changes  id PK, kind 'blacklist', payload (JSON), requested_by, requested_at,
                     state 'pending' | 'approved' | 'rejected', decided_by, decided_at, version
    blacklist_current  asn PK (16 hex digits: a raw serial; ``p:ISSUER:NUMBER``, e.g.
                     ``p:5180:881146306``: a printed card number of one issuer, the other key
                     space of agent.blacklist; ``p:NUMBER``: an unscoped printed number listed
                     before issuer scoping, kept but never published), added_version
    blacklist_changes  (version, asn) PK, op 'add' | 'remove'; one version chain for both
                     spaces, each space published as its own signed list
    params           version PK, payload (JSON)
    host_meta        key PK, value
    terminal_entries terminal_id PK, kind, site, created_by, created_at; the pending enrolment
                     an operator authorised: code_hash (SHA-256 of a one-time code) with
                     code_expires_at and code_used_at, or expected_key (a pre-registered key)
    merchants        merchant_id PK, name, category, settlement_account, loaded_by, loaded_at:
                     the merchant register (issue 11), loaded whole from a CSV by an operator
    merchant_terminals  terminal_id PK, merchant_id, bound_by, bound_at: the merchant each
                     terminal is bound to (clearing pays a merchant only its own terminals'
                     records)
    settlements      (day, version) PK, content (the settlement CSV), signature (host key, hex),
                     view (JSON figures), cleared_by, cleared_at: every clearing run of a day;
                     a re-run after late records is the next version
    resolutions      (terminal_id, seq) PK, outcome 'paid' | 'void', resolved_by, resolved_at:
                     an operator's decision on an ``unresolved`` record (once, never changed)
    bills            bill_id PK, account, utility, period, amount, merchant_id, state 'open' |
                     'payment_pending' | 'paid', terminal_id, seq, card_id, detail, loaded_by,
                     updated_at: the utility bill book (一帐通, issue 10,
                     :mod:`clearinghost.bills`); a bill is ``paid`` only when its signed
                     purchase record is ingested

``ack_seq``/``ack_hash`` is each terminal's cumulative acknowledgement: the records stored are
exactly ``1..ack_seq``, each signed by the terminal's key and linked to its predecessor, and
``ack_hash`` is the hash of record ``ack_seq`` (of a quarantined slot: the hash the terminal
says the record had, which the next record must chain onto; the link into a quarantined slot
cannot be checked, its content being lost). A record that does not verify or link is refused
(never stored, never takes a seq, never moves the acknowledgement); a record beyond
``ack_seq + 1`` is refused as a gap (a terminal sends from its acknowledgement on).
Every write is one transaction; ingest of one terminal is serialised (SQLite: one writer at a
time; PostgreSQL: ``SELECT ... FOR UPDATE`` of the terminal row, between the connections of
one process's pool as between processes). A batch's records go in with one
statement (``executemany`` on SQLite, ``COPY`` on PostgreSQL), its repeats are looked up with
one query, and the body stored is the line as the terminal sent it. Several host processes
may share one database (``cardhost host --workers N``): an upload commits whole or not at all
(a process killed mid-batch leaves nothing), the terminal row lock orders a retry racing its
original on another process (the second sees the first's records as duplicates), and the
blacklist and parameter version counters are taken under a transaction-scoped lock
(PostgreSQL advisory lock; SQLite's write transaction), so two publications never share a
version.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Concatenate, ParamSpec, Protocol, TypeVar

import psycopg
import structlog
from psycopg_pool import ConnectionPool, PoolTimeout

from agent.blacklist import SPACE_PRINTED, SPACE_SERIAL, printed_entry, printed_key
from agent.kiosk import bill_of_order
from agent.merchant import MERCHANT_ID_FIELD
from agent.offline_store.records import (
    GENESIS_HASH,
    QuarantineNotice,
    Record,
    notice_to_json,
    record_to_json,
)
from agent.pos.journal import ORDER_FIELD
from clearinghost.bills import SELECT_BILL, Bill, bill_view
from clearinghost.clearing import AuditRow, Finding, Refusal
from clearinghost.settlement import DayRecord, DayTally, Merchant
from sync.protocol import BATCH_SIGNED_FIELDS, RecordLine

Slot = Record | QuarantineNotice | RecordLine  # what ingest stores in one (terminal, seq) slot


@dataclass(frozen=True, slots=True)
class BatchHead:
    """A signed batch's head as the host verified it (:data:`sync.protocol.BATCH_SIGNED_FIELDS`),
    the device signature (hex) and the terminal's key it verified under (hex)."""

    fields: dict[str, Any]
    signature: str
    public_key: str


log = structlog.get_logger(__name__)

Row = tuple[Any, ...]
_T = TypeVar("_T")
_S = TypeVar("_S")
_P = ParamSpec("_P")


class StorageFull(Exception):
    """The host's database or disk is full (SQLITE_FULL, PostgreSQL disk full)."""


class StorageFailure(Exception):
    """Any other database failure, with the backend's message."""


class StorageConflict(StorageFailure):
    """A write met a unique key another connection (another host process) committed after this
    transaction read that the key was free; the transaction was rolled back. Running it again
    sees the other's row (:func:`_rerun_on_conflict`)."""


def _rerun_on_conflict(
    method: Callable[Concatenate[_S, _P], _T],
) -> Callable[Concatenate[_S, _P], _T]:
    """A storage method that is one transaction reading whether a key is taken, then inserting
    it, run again when it lost the race for that key to another host process
    (:class:`StorageConflict`): the next run reads the winner's row and answers as a retry of
    the request would (already there, same key: done; another: the caller's 409)."""

    @functools.wraps(method)
    def run(self: _S, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        for n in range(1, CONFLICT_ATTEMPTS + 1):
            try:
                return method(self, *args, **kwargs)
            except StorageConflict as exc:
                if n == CONFLICT_ATTEMPTS:
                    raise
                log.info(
                    "write lost a unique-key race; running it again",
                    what=method.__name__,
                    error=str(exc),
                )
        raise AssertionError("unreachable")  # pragma: no cover

    return run


CONFLICT_ATTEMPTS = 3  # a transaction that lost a unique-key race runs again, this often at most


class TerminalKeyConflict(Exception):
    """A terminal id registered again with a different device key."""


class TerminalExists(Exception):
    """An operator added a terminal entry whose id is already taken."""


class PendingChangeRefused(Exception):
    """An approval or rejection that cannot be made: ``code`` is ``unknown_change``,
    ``already_decided`` or ``own_change``."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code, self.detail = code, detail


class _Tx(Protocol):
    def run(self, sql: str, params: Sequence[Any] = ()) -> int: ...
    def one(self, sql: str, params: Sequence[Any] = ()) -> Row | None: ...
    def all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]: ...
    def each(self, sql: str, params: Sequence[Any] = ()) -> Iterator[Row]: ...
    def insert_rows(self, table: str, columns: Mapping[str, str], rows: Sequence[Row]) -> None:
        """``rows`` into ``table``; ``columns``: each column's name and PostgreSQL type."""


# The columns of a ``records`` row, in :func:`_slot_row`'s order, with their PostgreSQL types
# (the schema's; PostgreSQL's binary COPY takes each value in its column's own format).
_RECORD_ROW_COLUMNS: dict[str, str] = {
    "terminal_id": "text",
    "seq": "int8",
    "hash": "text",
    "prev_hash": "text",
    "created_at": "text",
    "kind": "text",
    "card_id": "text",
    "amount": "int8",
    "body": "text",
    "received_at": "float8",
    "merchant_id": "text",
}


# records.created_at serves the day ranges of settlement and clearing. SQLite: a btree. PostgreSQL:
# a BRIN index (min/max per range of 128 pages, summarised by autovacuum as the table grows): rows
# arrive about in time order, so a day's ranges are few; it is about 0.1 MB where a btree is about
# 50 bytes a record, and every COPY of an upload writes to it far less (docs/city-scale.md).
CREATED_AT_INDEX = {
    "sqlite": "CREATE INDEX IF NOT EXISTS records_created_at ON records (created_at)",
    "postgresql": "CREATE INDEX IF NOT EXISTS records_created_at ON records "
    "USING brin (created_at) WITH (autosummarize = on)",
}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS terminals (
    terminal_id TEXT PRIMARY KEY,
    public_key TEXT NOT NULL,
    registered_at DOUBLE PRECISION NOT NULL,
    ack_seq BIGINT NOT NULL DEFAULT 0,
    ack_hash TEXT NOT NULL,
    last_seen DOUBLE PRECISION,
    heartbeat TEXT
);
CREATE TABLE IF NOT EXISTS records (
    terminal_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    hash TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    created_at TEXT NOT NULL,
    kind TEXT NOT NULL,
    card_id TEXT NOT NULL,
    amount BIGINT NOT NULL,
    body TEXT NOT NULL,
    received_at DOUBLE PRECISION NOT NULL,
    merchant_id TEXT,
    PRIMARY KEY (terminal_id, seq)
);
CREATE TABLE IF NOT EXISTS batches (
    terminal_id TEXT NOT NULL,
    idem_key TEXT NOT NULL,
    first_seq BIGINT NOT NULL,
    last_seq BIGINT NOT NULL,
    received_at DOUBLE PRECISION NOT NULL,
    replays BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (terminal_id, idem_key)
);
CREATE TABLE IF NOT EXISTS batch_signatures (
    terminal_id TEXT NOT NULL,
    idem_key TEXT NOT NULL,
    first_seq BIGINT NOT NULL,
    last_seq BIGINT NOT NULL,
    entries BIGINT NOT NULL,
    last_hash TEXT NOT NULL,
    body_sha256 TEXT NOT NULL,
    signature TEXT NOT NULL,
    public_key TEXT NOT NULL,
    received_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (terminal_id, idem_key)
);
CREATE INDEX IF NOT EXISTS batch_signatures_last ON batch_signatures (terminal_id, last_seq);
CREATE TABLE IF NOT EXISTS audit_cursors (
    terminal_id TEXT PRIMARY KEY,
    seq BIGINT NOT NULL,
    hash TEXT NOT NULL,
    audited_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS anomalies (
    id {autoid},
    terminal_id TEXT NOT NULL,
    seq BIGINT,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL,
    found_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS anomaly_repeats (
    terminal_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    repeats BIGINT NOT NULL DEFAULT 0,
    last_seen DOUBLE PRECISION NOT NULL,
    last_seq BIGINT,
    last_detail TEXT NOT NULL,
    PRIMARY KEY (terminal_id, kind)
);
CREATE TABLE IF NOT EXISTS blacklist_current (
    asn TEXT PRIMARY KEY,
    added_version BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS blacklist_changes (
    version BIGINT NOT NULL,
    asn TEXT NOT NULL,
    op TEXT NOT NULL,
    PRIMARY KEY (version, asn)
);
CREATE INDEX IF NOT EXISTS blacklist_changes_asn ON blacklist_changes (asn, version);
CREATE TABLE IF NOT EXISTS pending_changes (
    id {autoid},
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    entries BIGINT NOT NULL,
    requested_by TEXT NOT NULL,
    requested_at DOUBLE PRECISION NOT NULL,
    state TEXT NOT NULL,
    decided_by TEXT,
    decided_at DOUBLE PRECISION,
    version BIGINT
);
CREATE TABLE IF NOT EXISTS params (
    version BIGINT PRIMARY KEY,
    payload TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS host_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS terminal_entries (
    terminal_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    site TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    authorised_by TEXT,
    code_hash TEXT,
    code_expires_at DOUBLE PRECISION,
    code_used_at DOUBLE PRECISION,
    expected_key TEXT
);
{created_at_index};
CREATE INDEX IF NOT EXISTS anomalies_record ON anomalies (terminal_id, seq, kind);
CREATE TABLE IF NOT EXISTS merchants (
    merchant_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    category TEXT NOT NULL,
    settlement_account TEXT NOT NULL,
    loaded_by TEXT NOT NULL,
    loaded_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS settlements (
    day TEXT NOT NULL,
    version BIGINT NOT NULL,
    content TEXT NOT NULL,
    signature TEXT NOT NULL,
    view TEXT NOT NULL,
    cleared_by TEXT NOT NULL,
    cleared_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (day, version)
);
CREATE TABLE IF NOT EXISTS merchant_terminals (
    terminal_id TEXT PRIMARY KEY,
    merchant_id TEXT NOT NULL,
    bound_by TEXT NOT NULL,
    bound_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS resolutions (
    terminal_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    outcome TEXT NOT NULL,
    resolved_by TEXT NOT NULL,
    resolved_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (terminal_id, seq)
);
CREATE TABLE IF NOT EXISTS bills (
    bill_id TEXT PRIMARY KEY,
    account TEXT NOT NULL,
    utility TEXT NOT NULL,
    period TEXT NOT NULL,
    amount BIGINT NOT NULL,
    merchant_id TEXT NOT NULL,
    state TEXT NOT NULL,
    terminal_id TEXT,
    seq BIGINT,
    card_id TEXT,
    detail TEXT NOT NULL,
    loaded_by TEXT NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS bills_by_account ON bills (account);
CREATE INDEX IF NOT EXISTS bills_by_record ON bills (terminal_id, seq)
"""

# A purchase is paid to the merchant it names when its terminal is bound to that merchant, or
# when it is the recorded payment of one of that merchant's bills (a kiosk collects for every
# utility of the bill book, not for one merchant): a bill names its record (terminal, seq) only
# once ingest has checked the record's amount and merchant against it.
_PAYABLE_PURCHASE = (
    "(EXISTS (SELECT 1 FROM merchant_terminals b WHERE b.terminal_id = r.terminal_id "
    "AND b.merchant_id = r.merchant_id) OR EXISTS (SELECT 1 FROM bills x "
    "WHERE x.terminal_id = r.terminal_id AND x.seq = r.seq AND x.merchant_id = r.merchant_id "
    "AND x.state = 'paid'))"
)


@dataclass(frozen=True, slots=True)
class Terminal:
    terminal_id: str
    public_key: str
    ack_seq: int
    ack_hash: str
    last_seen: float | None = None
    heartbeat: dict[str, Any] | None = None
    registered_at: float = 0.0


@dataclass(frozen=True, slots=True)
class TerminalEntry:
    """What an operator created for a terminal, and the enrolment it authorised (if any)."""

    terminal_id: str
    kind: str
    site: str
    created_by: str
    created_at: float
    authorised_by: str | None = None
    code_hash: str | None = None
    code_expires_at: float | None = None
    code_used_at: float | None = None
    expected_key: str | None = None

    def code_pending(self, now: float) -> bool:
        return (
            self.code_hash is not None
            and self.code_used_at is None
            and (self.code_expires_at or 0.0) > now
        )


_SELECT_ENTRY = (
    "SELECT terminal_id, kind, site, created_by, created_at, authorised_by, code_hash, "
    "code_expires_at, code_used_at, expected_key FROM terminal_entries"
)


@dataclass(slots=True)
class IngestResult:
    ack_seq: int
    ack_hash: str = GENESIS_HASH
    refused: Refusal | None = None
    stored: int = 0
    duplicates: int = 0
    conflicts: int = 0
    anomalies: int = 0
    replay: bool = False
    findings: list[Finding] = field(default_factory=list)


class Storage:
    """Host storage: the SQL both backends share; see the module docstring."""

    backend = "?"

    # --- backend hooks --------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[_Tx]:  # pragma: no cover - overridden
        raise NotImplementedError
        yield

    def _reading(self) -> AbstractContextManager[_Tx]:
        """One read statement (the terminal's row, a version, the parameter sets), beside the
        writers, each statement its own snapshot: one round trip on PostgreSQL (autocommit)."""
        return self._transaction()

    def _snapshot(self) -> AbstractContextManager[_Tx]:
        """Several read statements that must see one state (a list's version and its entries),
        beside the writers."""
        return self._transaction()

    # The row lock that serialises two host processes ingesting for one terminal (PostgreSQL).
    _select_cursor = "SELECT ack_seq, ack_hash FROM terminals WHERE terminal_id = ?"

    def _serialise(self, tx: _Tx, what: str) -> None:
        """Hold ``what`` (a version counter: ``blacklist``, ``params``) for the rest of the
        transaction against every other host process. SQLite: nothing to do, a write
        transaction (``BEGIN IMMEDIATE``) already excludes every other writer of the file."""

    def close(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    # --- terminals ------------------------------------------------------------------------

    @_rerun_on_conflict
    def register_terminal(self, terminal_id: str, public_key_hex: str) -> bool:
        """Register a terminal's device key. True if new; the same key again is fine (also
        when another host process registered it a moment ago); another key raises
        :class:`TerminalKeyConflict`."""
        with self._transaction() as tx:
            row = tx.one("SELECT public_key FROM terminals WHERE terminal_id = ?", (terminal_id,))
            if row is not None:
                if row[0] != public_key_hex:
                    raise TerminalKeyConflict(
                        f"terminal {terminal_id!r} is registered with another device key"
                    )
                return False
            tx.run(
                "INSERT INTO terminals (terminal_id, public_key, registered_at, ack_seq, ack_hash)"
                " VALUES (?, ?, ?, 0, ?)",
                (terminal_id, public_key_hex, time.time(), GENESIS_HASH),
            )
        log.info("terminal registered", terminal_id=terminal_id, public_key=public_key_hex[:16])
        return True

    # --- terminal entries and enrolment ---------------------------------------------------

    @_rerun_on_conflict
    def create_terminal_entry(
        self,
        terminal_id: str,
        kind: str,
        site: str,
        operator: str,
        now: float,
        *,
        code_hash: str | None,
        code_expires_at: float | None,
        expected_key: str | None,
    ) -> TerminalEntry:
        """An operator's new terminal entry with its first enrolment authorisation (a code
        hash with an expiry, or a pre-registered key). :class:`TerminalExists` if the id has
        an entry or is already registered (also by another host process a moment ago)."""
        with self._transaction() as tx:
            taken = tx.one(
                "SELECT 1 FROM terminal_entries WHERE terminal_id = ? UNION ALL "
                "SELECT 1 FROM terminals WHERE terminal_id = ?",
                (terminal_id, terminal_id),
            )
            if taken is not None:
                raise TerminalExists(f"terminal {terminal_id!r} already exists")
            tx.run(
                "INSERT INTO terminal_entries (terminal_id, kind, site, created_by, created_at, "
                "authorised_by, code_hash, code_expires_at, expected_key) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    terminal_id,
                    kind,
                    site,
                    operator,
                    now,
                    operator,
                    code_hash,
                    code_expires_at,
                    expected_key,
                ),
            )
        log.info("terminal entry created", terminal_id=terminal_id, operator=operator)
        entry = self.terminal_entry(terminal_id)
        assert entry is not None
        return entry

    @_rerun_on_conflict
    def authorise_enrolment(
        self,
        terminal_id: str,
        operator: str,
        now: float,
        *,
        code_hash: str | None,
        code_expires_at: float | None,
        expected_key: str | None,
    ) -> TerminalEntry | None:
        """Replace the pending authorisation of a terminal (a new code or key: a re-enrolment
        or a key rotation). A terminal registered without an entry (open registration) gets
        one (two host processes creating it at once: the later authorisation is in force).
        ``None`` if the terminal is unknown."""
        with self._transaction() as tx:
            known = tx.one(
                "SELECT (SELECT COUNT(*) FROM terminal_entries WHERE terminal_id = ?), "
                "(SELECT COUNT(*) FROM terminals WHERE terminal_id = ?)",
                (terminal_id, terminal_id),
            )
            assert known is not None
            has_entry, registered = int(known[0]), int(known[1])
            if not has_entry and not registered:
                return None
            if not has_entry:
                tx.run(
                    "INSERT INTO terminal_entries (terminal_id, kind, site, created_by, "
                    "created_at) VALUES (?, '', '', ?, ?)",
                    (terminal_id, operator, now),
                )
            tx.run(
                "UPDATE terminal_entries SET authorised_by = ?, code_hash = ?, "
                "code_expires_at = ?, code_used_at = NULL, expected_key = ? "
                "WHERE terminal_id = ?",
                (operator, code_hash, code_expires_at, expected_key, terminal_id),
            )
        log.info("terminal enrolment authorised", terminal_id=terminal_id, operator=operator)
        return self.terminal_entry(terminal_id)

    def terminal_entry(self, terminal_id: str) -> TerminalEntry | None:
        with self._reading() as tx:
            row = tx.one(_SELECT_ENTRY + " WHERE terminal_id = ?", (terminal_id,))
        return None if row is None else _entry(row)

    def terminal_entries(self) -> list[TerminalEntry]:
        with self._reading() as tx:
            rows = tx.all(_SELECT_ENTRY + " ORDER BY terminal_id")
        return [_entry(r) for r in rows]

    @_rerun_on_conflict
    def enrol(
        self, terminal_id: str, public_key_hex: str, code_hash: str | None, now: float
    ) -> str | None:
        """Bind ``terminal_id`` to ``public_key_hex`` if its entry holds a pending
        authorisation for it: an unused, unexpired code whose hash is ``code_hash``, or this
        pre-registered key. The authorisation is consumed in the same transaction that binds
        the key (single use, whatever runs concurrently). Returns ``"enrolled"`` (a new
        terminal), ``"rotated"`` (a registered terminal's key replaced: the chain and the
        acknowledgement carry on, only the new key verifies from now on) or ``None``. Run
        again if an open registration of the same id (another host process) took the terminal
        row first: the authorisation then rotates its key."""
        with self._transaction() as tx:
            consumed = tx.run(
                "UPDATE terminal_entries SET code_used_at = "
                "CASE WHEN code_hash IS NULL THEN NULL ELSE ? END, expected_key = NULL "
                "WHERE terminal_id = ? AND ((code_hash = ? AND code_used_at IS NULL "
                "AND code_expires_at > ?) OR expected_key = ?)",
                (now, terminal_id, code_hash or "", now, public_key_hex),
            )
            if consumed != 1:
                return None
            if tx.run(
                "UPDATE terminals SET public_key = ? WHERE terminal_id = ?",
                (public_key_hex, terminal_id),
            ):
                outcome = "rotated"
            else:
                tx.run(
                    "INSERT INTO terminals (terminal_id, public_key, registered_at, ack_seq, "
                    "ack_hash) VALUES (?, ?, ?, 0, ?)",
                    (terminal_id, public_key_hex, now, GENESIS_HASH),
                )
                outcome = "enrolled"
        log.info(f"terminal {outcome}", terminal_id=terminal_id, public_key=public_key_hex[:16])
        return outcome

    def terminal(self, terminal_id: str) -> Terminal | None:
        with self._reading() as tx:
            row = tx.one(
                "SELECT terminal_id, public_key, ack_seq, ack_hash, last_seen, heartbeat, "
                "registered_at FROM terminals WHERE terminal_id = ?",
                (terminal_id,),
            )
        return None if row is None else _terminal(row)

    def terminals(self) -> list[Terminal]:
        with self._reading() as tx:
            rows = tx.all(
                "SELECT terminal_id, public_key, ack_seq, ack_hash, last_seen, heartbeat, "
                "registered_at FROM terminals ORDER BY terminal_id"
            )
        return [_terminal(r) for r in rows]

    def heartbeat(self, terminal_id: str, figures: dict[str, Any]) -> tuple[int, int] | None:
        """Keep a terminal's heartbeat figures; its acknowledgement and the blacklist version,
        read in the same transaction (``None``: no such terminal, nothing kept)."""
        with self._transaction() as tx:
            row = tx.one(
                "UPDATE terminals SET heartbeat = ?, last_seen = ? WHERE terminal_id = ? "
                "RETURNING ack_seq",
                (json.dumps(figures, ensure_ascii=False), time.time(), terminal_id),
            )
            if row is None:
                return None
            return int(row[0]), self._meta_int(tx, "blacklist_version")

    # --- records ---------------------------------------------------------------------------

    def ingest(
        self,
        terminal_id: str,
        idem_key: str,
        records: Sequence[Slot],
        findings: dict[int, list[Finding]],
        refusal: Refusal | None = None,
        head: BatchHead | None = None,
    ) -> IngestResult:
        """Store a batch in one transaction and advance the terminal's acknowledgement.

        The caller has checked each record's terminal binding, hash and device signature (or,
        for a signed batch, the batch signature: ``head``, kept as evidence when the batch
        stores anything); this checks each record against what the host holds, in batch order:
        a seq already held must
        carry the held hash (a duplicate), the next seq must link to the acknowledged record
        (``prev_hash``), and nothing may leave a gap. The first record that fails stops the
        batch (:attr:`IngestResult.refused`): the records before it are stored, none from it on,
        so the terminal's records are always exactly ``1..ack_seq``, every link checked.
        ``findings``: anomalies per seq (TAC, unresolved), recorded for records stored now.
        ``refusal``: the caller's refusal of the record after ``records`` (signature, hash,
        terminal binding), recorded as an anomaly unless this check refuses earlier.
        A quarantine notice (its signature checked by the caller) fills the next free slot
        like a record, without a link check (its record's content is lost); at a held seq it
        is a duplicate only if the held hash is its ``chain_hash``, else a conflict: it never
        replaces what the host holds.
        """
        now = time.time()
        with self._transaction() as tx:
            row = tx.one(self._select_cursor, (terminal_id,))
            if row is None:
                raise KeyError(terminal_id)
            ack_seq, ack_hash = int(row[0]), str(row[1])
            result = IngestResult(ack_seq=ack_seq, ack_hash=ack_hash)
            new_batch = not records or tx.run(
                "INSERT INTO batches (terminal_id, idem_key, first_seq, last_seq, received_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (terminal_id, idem_key) DO NOTHING",
                (terminal_id, idem_key, records[0].seq, records[-1].seq, now),
            )
            if not new_batch:
                result.replay = True
                tx.run(
                    "UPDATE batches SET replays = replays + 1 WHERE terminal_id = ? AND "
                    "idem_key = ?",
                    (terminal_id, idem_key),
                )
            held = self._held_hashes(tx, terminal_id, records, ack_seq)
            rows: list[Row] = []
            noted: list[tuple[int, Finding]] = []
            paid: list[Record | RecordLine] = []  # stored now: may pay a bill
            for record in records:
                if record.seq <= ack_seq:
                    held_hash = held.get(record.seq)
                    if held_hash is None and record.seq not in held:
                        found = tx.one(
                            "SELECT hash FROM records WHERE terminal_id = ? AND seq = ?",
                            (terminal_id, record.seq),
                        )
                        held_hash = None if found is None else str(found[0])
                    if held_hash == record.hash:
                        result.duplicates += 1
                        continue
                    what = "quarantine notice" if isinstance(record, QuarantineNotice) else "record"
                    result.refused = Refusal(
                        record.seq,
                        "conflict",
                        f"{what} {record.seq} differs from the record the host holds at that seq "
                        f"({record.hash[:16]}…, held {str(held_hash or '?')[:16]}…)",
                    )
                    break
                if record.seq != ack_seq + 1:
                    result.refused = Refusal(
                        record.seq,
                        "gap",
                        f"record {record.seq} does not follow the acknowledged record {ack_seq}",
                    )
                    break
                if not isinstance(record, QuarantineNotice) and record.prev_hash != ack_hash:
                    result.refused = Refusal(
                        record.seq,
                        "chain_break",
                        f"record {record.seq} does not link to record {ack_seq} "
                        "(prev_hash mismatch)",
                    )
                    break
                rows.append(_slot_row(terminal_id, record, ack_hash, now))
                # only a record naming a POS order may pay a bill (_bill_evidence)
                if not isinstance(record, QuarantineNotice) and ORDER_FIELD in record.fields:
                    paid.append(record)
                held[record.seq] = record.hash  # a later line of this batch repeating it
                ack_seq, ack_hash = record.seq, record.hash
                flagged = findings.get(record.seq)
                if flagged:
                    noted.extend((record.seq, f) for f in flagged)
            if rows:
                # A row left beyond the acknowledgement by an older host version is replaced.
                tx.run(
                    "DELETE FROM records WHERE terminal_id = ? AND seq >= ? AND seq <= ?",
                    (terminal_id, rows[0][1], rows[-1][1]),
                )
                tx.insert_rows("records", _RECORD_ROW_COLUMNS, rows)
                result.stored = len(rows)
                for entry in paid:
                    self._bill_evidence(tx, terminal_id, entry, now)
            for seq, finding in noted:
                self._anomaly(tx, terminal_id, seq, finding, now)
                result.findings.append(finding)
            if head is not None and new_batch and rows:
                tx.run(
                    "INSERT INTO batch_signatures (terminal_id, idem_key, first_seq, last_seq, "
                    "entries, last_hash, body_sha256, signature, public_key, received_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (terminal_id, idem_key) DO NOTHING",
                    (
                        terminal_id,
                        idem_key,
                        head.fields["first_seq"],
                        head.fields["last_seq"],
                        head.fields["count"],
                        head.fields["last_hash"],
                        head.fields["body_sha256"],
                        head.signature,
                        head.public_key,
                        now,
                    ),
                )
            result.refused = result.refused or refusal
            if result.refused is not None:
                refusal = result.refused
                self._refusal_anomaly(
                    tx, terminal_id, refusal.seq, Finding(refusal.reason, refusal.detail), now
                )
            result.ack_seq, result.ack_hash = ack_seq, ack_hash
            tx.run(
                "UPDATE terminals SET ack_seq = ?, ack_hash = ?, last_seen = ? "
                "WHERE terminal_id = ?",
                (ack_seq, ack_hash, now, terminal_id),
            )
        result.anomalies = len(result.findings)
        return result

    @staticmethod
    def _held_hashes(
        tx: _Tx, terminal_id: str, records: Sequence[Slot], ack_seq: int
    ) -> dict[int, str | None]:
        """The hashes the host holds at the seqs of ``records`` it has acknowledged, in one
        query when they form a compact range (a resent batch); a scattered set is looked up
        seq by seq in :meth:`ingest` (absent here)."""
        repeated = [r.seq for r in records if r.seq <= ack_seq]
        if not repeated:
            return {}
        low, high = min(repeated), max(repeated)
        if high - low >= 2 * len(records):
            return {}
        found = tx.all(
            "SELECT seq, hash FROM records WHERE terminal_id = ? AND seq >= ? AND seq <= ?",
            (terminal_id, low, high),
        )
        held: dict[int, str | None] = dict.fromkeys(range(low, high + 1))
        held.update((int(seq), str(h)) for seq, h in found)
        return held

    @staticmethod
    def _anomaly(tx: _Tx, terminal_id: str, seq: int | None, finding: Finding, now: float) -> None:
        tx.run(
            "INSERT INTO anomalies (terminal_id, seq, kind, detail, found_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (terminal_id, seq, finding.kind, finding.detail, now),
        )
        log.warning(
            "anomaly", terminal_id=terminal_id, seq=seq, kind=finding.kind, detail=finding.detail
        )

    @classmethod
    def _refusal_anomaly(
        cls, tx: _Tx, terminal_id: str, seq: int | None, finding: Finding, now: float
    ) -> None:
        """A refused record: its first occurrence per terminal and kind is an anomaly row,
        every later one only counts (``anomaly_repeats``): refusals cost no rows."""
        counted = tx.run(
            "UPDATE anomaly_repeats SET repeats = repeats + 1, last_seen = ?, last_seq = ?, "
            "last_detail = ? WHERE terminal_id = ? AND kind = ?",
            (now, seq, finding.detail, terminal_id, finding.kind),
        )
        if counted:
            log.warning(
                "anomaly repeated",
                terminal_id=terminal_id,
                seq=seq,
                kind=finding.kind,
                detail=finding.detail,
            )
            return
        tx.run(
            "INSERT INTO anomaly_repeats (terminal_id, kind, repeats, last_seen, last_seq, "
            "last_detail) VALUES (?, ?, 0, ?, ?, ?)",
            (terminal_id, finding.kind, now, seq, finding.detail),
        )
        cls._anomaly(tx, terminal_id, seq, finding, now)

    def records(self, terminal_id: str, after: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        with self._transaction() as tx:
            rows = tx.all(
                "SELECT body FROM records WHERE terminal_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (terminal_id, after, limit),
            )
        return [json.loads(r[0]) for r in rows]

    def held_slots(self, terminal_id: str, seqs: Sequence[int]) -> dict[int, tuple[str, str]]:
        """``seq -> (kind, hash)`` of the slots the host holds among ``seqs`` (a quarantined
        slot's kind is ``quarantined``): what an uploaded record must match to act on anything
        beyond the records table (pending loads: clearinghost.server._reconcile_loads)."""
        if not seqs:
            return {}
        wanted = set(seqs)
        with self._transaction() as tx:
            rows = tx.all(
                "SELECT seq, kind, hash FROM records WHERE terminal_id = ? AND seq >= ? "
                "AND seq <= ?",
                (terminal_id, min(wanted), max(wanted)),
            )
        return {int(q): (str(k), str(h)) for q, k, h in rows if int(q) in wanted}

    def unfinished_for_host(self, limit: int = 200) -> list[tuple[str, int, dict[str, Any]]]:
        """``(terminal_id, seq, body)`` of purchase records whose fare decision left an
        unfinished trip to the host's correction (``fare_unfinished: "host"``), newest first,
        at most ``limit``. The stored line is the terminal's canonical JSON
        (``agent.offline_store.records.canonical_json``), so the field reads
        ``"fare_unfinished":"host"`` there; each match is confirmed on the parsed body."""
        with self._transaction() as tx:
            rows = tx.all(
                "SELECT terminal_id, seq, body FROM records WHERE kind = 'purchase' "
                "AND body LIKE ? ORDER BY received_at DESC, terminal_id, seq DESC LIMIT ?",
                ('%"fare_unfinished":"host"%', limit),
            )
        found = []
        for terminal_id, seq, body in rows:
            parsed = json.loads(body)
            fields = parsed.get("fields") if isinstance(parsed, dict) else None
            if isinstance(fields, dict) and fields.get("fare_unfinished") == "host":
                found.append((str(terminal_id), int(seq), parsed))
        return found

    def record_keys(self, terminal_id: str) -> list[tuple[int, str]]:
        """Every ``(seq, hash)`` stored for a terminal (tests, reconciliation)."""
        with self._transaction() as tx:
            rows = tx.all(
                "SELECT seq, hash FROM records WHERE terminal_id = ? ORDER BY seq", (terminal_id,)
            )
        return [(int(s), str(h)) for s, h in rows]

    # --- the audit (clearinghost.audit) ------------------------------------------------------

    def audit_cursor(self, terminal_id: str) -> tuple[int, str]:
        """How far the audit of a terminal has gone: the last seq re-verified and its hash."""
        with self._transaction() as tx:
            row = tx.one(
                "SELECT seq, hash FROM audit_cursors WHERE terminal_id = ?", (terminal_id,)
            )
        return (0, GENESIS_HASH) if row is None else (int(row[0]), str(row[1]))

    def audit_rows(self, terminal_id: str, after: int, through: int, limit: int) -> list[AuditRow]:
        """Stored slots ``after < seq <= through`` of a terminal, in seq order, at most
        ``limit``."""
        with self._transaction() as tx:
            rows = tx.all(
                "SELECT seq, kind, hash, prev_hash, body FROM records WHERE terminal_id = ? "
                "AND seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
                (terminal_id, after, through, limit),
            )
        return [AuditRow(int(q), str(k), str(h), str(p), str(b)) for q, k, h, p, b in rows]

    def batch_heads(
        self, terminal_id: str, after: int, through: int
    ) -> list[tuple[BatchHead, str | None]]:
        """The stored batch signatures of a terminal whose last seq is in ``after..through``
        (exclusive, inclusive), each with the hash the host holds at that seq."""
        with self._transaction() as tx:
            rows = tx.all(
                "SELECT b.first_seq, b.last_seq, b.entries, b.last_hash, b.body_sha256, "
                "b.signature, b.public_key, r.hash FROM batch_signatures b LEFT JOIN records r "
                "ON r.terminal_id = b.terminal_id AND r.seq = b.last_seq "
                "WHERE b.terminal_id = ? AND b.last_seq > ? AND b.last_seq <= ? "
                "ORDER BY b.last_seq, b.first_seq",
                (terminal_id, after, through),
            )
        heads = []
        for first, last, count, last_hash, body_sha256, signature, key, held in rows:
            values = (terminal_id, int(first), int(last), int(count), str(last_hash))
            fields = dict(zip(BATCH_SIGNED_FIELDS, (*values, str(body_sha256)), strict=True))
            heads.append(
                (BatchHead(fields, str(signature), str(key)), None if held is None else str(held))
            )
        return heads

    def batch_keys(self, terminal_id: str, low: int, high: int) -> list[tuple[int, int, str]]:
        """``(first_seq, last_seq, public_key)`` of the signed batches that stored records of a
        terminal in ``low..high``: the key each record came under."""
        with self._transaction() as tx:
            rows = tx.all(
                "SELECT first_seq, last_seq, public_key FROM batch_signatures "
                "WHERE terminal_id = ? AND last_seq >= ? AND first_seq <= ? ORDER BY first_seq",
                (terminal_id, low, high),
            )
        return [(int(f), int(t), str(k)) for f, t, k in rows]

    def save_audit(
        self, terminal_id: str, seq: int, hash_: str, findings: Sequence[tuple[int, Finding]]
    ) -> None:
        """Advance a terminal's audit cursor and record its findings as anomalies, together."""
        now = time.time()
        with self._transaction() as tx:
            for at, finding in findings:
                self._anomaly(tx, terminal_id, at, finding, now)
            tx.run(
                "INSERT INTO audit_cursors (terminal_id, seq, hash, audited_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (terminal_id) DO UPDATE SET "
                "seq = excluded.seq, hash = excluded.hash, audited_at = excluded.audited_at",
                (terminal_id, seq, hash_, now),
            )

    def count_records(self, terminal_id: str | None = None) -> int:
        with self._transaction() as tx:
            if terminal_id is None:
                row = tx.one("SELECT COUNT(*) FROM records")
            else:
                row = tx.one("SELECT COUNT(*) FROM records WHERE terminal_id = ?", (terminal_id,))
        return int(row[0]) if row else 0

    def anomalies(self, terminal_id: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
        """Newest first; a refusal's row is its first occurrence, with ``repeats`` (how many
        more) and the last one's time, seq and detail (``last_*``, equal to the first's when
        it did not repeat)."""
        select = (
            "SELECT a.terminal_id, a.seq, a.kind, a.detail, a.found_at, r.repeats, r.last_seen, "
            "r.last_seq, r.last_detail FROM anomalies a LEFT JOIN anomaly_repeats r "
            "ON r.terminal_id = a.terminal_id AND r.kind = a.kind "
        )
        with self._transaction() as tx:
            if terminal_id is None:
                rows = tx.all(select + "ORDER BY a.id DESC LIMIT ?", (limit,))
            else:
                rows = tx.all(
                    select + "WHERE a.terminal_id = ? ORDER BY a.id DESC LIMIT ?",
                    (terminal_id, limit),
                )
        return [
            {
                "terminal_id": t,
                "seq": s,
                "kind": k,
                "detail": d,
                "found_at": f,
                "repeats": int(n or 0),
                "last_seen": f if last is None else last,
                "last_seq": s if last is None else last_seq,
                "last_detail": d if last is None else last_detail,
            }
            for t, s, k, d, f, n, last, last_seq, last_detail in rows
        ]

    # --- blacklist -------------------------------------------------------------------------

    def blacklist_version(self) -> int:
        with self._reading() as tx:
            return self._meta_int(tx, "blacklist_version")

    def publish_blacklist(
        self,
        add: Sequence[int],
        remove: Sequence[int],
        printed_add: Sequence[int] = (),
        printed_remove: Sequence[int] = (),
        unscoped_remove: Sequence[int] = (),
    ) -> int:
        """One new version with these changes (no-op entries are dropped); returns it.
        ``printed_*`` are printed card numbers of one issuer each
        (:func:`agent.blacklist.printed_key` values); ``unscoped_remove`` removes printed
        numbers listed before issuer scoping (never published since)."""
        with self._transaction() as tx:
            self._serialise(tx, "blacklist")
            version = self._apply_blacklist(
                tx,
                _keys(add, printed_add),
                _keys(remove, printed_remove) + [_unscoped_text(n) for n in unscoped_remove],
            )
        log.info(
            "blacklist published",
            version=version,
            add=len(add),
            remove=len(remove),
            printed_add=len(printed_add),
            printed_remove=len(printed_remove),
        )
        return version

    def propose_blacklist(
        self,
        add: Sequence[int],
        remove: Sequence[int],
        by: str,
        printed_add: Sequence[int] = (),
        printed_remove: Sequence[int] = (),
        unscoped_remove: Sequence[int] = (),
    ) -> int:
        """Hold a blacklist change for a second operator's approval; returns its id."""
        change: dict[str, list[str]] = {
            "add": [_asn_text(a) for a in add],
            "remove": [_asn_text(a) for a in remove],
        }
        if printed_add or printed_remove:
            change["printed_add"] = [_printed_text(p) for p in printed_add]
            change["printed_remove"] = [_printed_text(p) for p in printed_remove]
        if unscoped_remove:
            change["printed_remove_unscoped"] = [_unscoped_text(n) for n in unscoped_remove]
        entries = (
            len(add) + len(remove) + len(printed_add) + len(printed_remove) + len(unscoped_remove)
        )
        with self._transaction() as tx:
            row = tx.one(
                "INSERT INTO pending_changes (kind, payload, entries, requested_by, requested_at, "
                "state) VALUES ('blacklist', ?, ?, ?, ?, 'pending') RETURNING id",
                (json.dumps(change), entries, by, time.time()),
            )
        assert row is not None
        log.warning("blacklist change awaits approval", id=int(row[0]), by=by, entries=entries)
        return int(row[0])

    def pending_changes(self, state: str | None = "pending") -> list[dict[str, Any]]:
        """Held changes (without their entries), oldest first; ``state=None``: all of them."""
        select = (
            "SELECT id, kind, entries, requested_by, requested_at, state, decided_by, "
            "decided_at, version FROM pending_changes "
        )
        with self._transaction() as tx:
            if state is None:
                rows = tx.all(select + "ORDER BY id")
            else:
                rows = tx.all(select + "WHERE state = ? ORDER BY id", (state,))
        names = (
            "id",
            "kind",
            "entries",
            "requested_by",
            "requested_at",
            "state",
            "decided_by",
            "decided_at",
            "version",
        )
        return [dict(zip(names, row, strict=True)) for row in rows]

    def decide_blacklist(self, change_id: int, by: str, *, approve: bool) -> int | None:
        """Approve (apply it as a new version, returned) or reject (``None``) a held change.

        Raises :class:`PendingChangeRefused`: no such change, already decided, or ``by`` is
        the operator who asked for it (a second operator must decide)."""
        with self._transaction() as tx:
            self._serialise(tx, "blacklist")  # before reading the state: one decision wins
            row = tx.one(
                "SELECT payload, requested_by, state FROM pending_changes "
                "WHERE id = ? AND kind = 'blacklist'",
                (change_id,),
            )
            if row is None:
                raise PendingChangeRefused(
                    "unknown_change", f"no held blacklist change {change_id}"
                )
            payload, requested_by, state = str(row[0]), str(row[1]), str(row[2])
            if state != "pending":
                raise PendingChangeRefused(
                    "already_decided", f"change {change_id} was already {state}"
                )
            if requested_by == by:
                raise PendingChangeRefused(
                    "own_change",
                    f"change {change_id} was asked for by {by}: another operator must decide",
                )
            version = None
            if approve:
                change = json.loads(payload)
                version = self._apply_blacklist(
                    tx,
                    change["add"] + [PRINTED_PREFIX + p for p in change.get("printed_add", [])],
                    change["remove"]
                    + [PRINTED_PREFIX + p for p in change.get("printed_remove", [])]
                    + change.get("printed_remove_unscoped", []),
                )
            tx.run(
                "UPDATE pending_changes SET state = ?, decided_by = ?, decided_at = ?, version = ? "
                "WHERE id = ?",
                ("approved" if approve else "rejected", by, time.time(), version, change_id),
            )
        log.warning(
            "blacklist change decided", id=change_id, by=by, approved=approve, version=version
        )
        return version

    def _apply_blacklist(self, tx: _Tx, add: Sequence[str], remove: Sequence[str]) -> int:
        """One new blacklist version with these changes (stored keys: :func:`_keys`), in the
        caller's transaction."""
        version = self._meta_int(tx, "blacklist_version") + 1
        for key in sorted(set(remove)):
            if tx.run("DELETE FROM blacklist_current WHERE asn = ?", (key,)):
                tx.run(
                    "INSERT INTO blacklist_changes (version, asn, op) VALUES (?, ?, 'remove')",
                    (version, key),
                )
        for key in sorted(set(add) - set(remove)):
            if tx.run(
                "INSERT INTO blacklist_current (asn, added_version) VALUES (?, ?) "
                "ON CONFLICT (asn) DO NOTHING",
                (key, version),
            ):
                tx.run(
                    "INSERT INTO blacklist_changes (version, asn, op) VALUES (?, ?, 'add')",
                    (version, key),
                )
        self._set_meta(tx, "blacklist_version", str(version))
        return version

    def printed_blacklist_entries(self) -> tuple[int, list[tuple[str, str]], list[str]]:
        """The current version, the listed printed numbers as (issuer code, number), and the
        unscoped printed numbers listed before issuer scoping (kept, never published)."""
        with self._transaction() as tx:
            version = self._meta_int(tx, "blacklist_version")
            rows = tx.all(
                "SELECT asn FROM blacklist_current WHERE asn LIKE ? ORDER BY asn",
                (PRINTED_PREFIX + "%",),
            )
        scoped: list[tuple[str, str]] = []
        unscoped: list[str] = []
        for (text,) in rows:
            key = _key_of(str(text), SPACE_PRINTED)
            if key is None:
                unscoped.append(str(text)[len(PRINTED_PREFIX) :])
            else:
                scoped.append(printed_entry(key))
        return version, sorted(scoped), unscoped

    def blacklist_snapshot(self, space: str = SPACE_SERIAL) -> tuple[int, list[int]]:
        """The current version and the keys of one space (raw serials or printed numbers)."""
        with self._snapshot() as tx:
            version = self._meta_int(tx, "blacklist_version")
            rows = tx.all("SELECT asn FROM blacklist_current ORDER BY asn")
        return version, [k for k in (_key_of(str(r[0]), space) for r in rows) if k is not None]

    def blacklist_delta(
        self, since: int, space: str = SPACE_SERIAL
    ) -> tuple[int, list[int], list[int]]:
        """Net changes of one key space from version ``since`` to the current one:
        (version, add, remove).

        The first change of a key after ``since`` tells its state at ``since`` (changes of one
        key alternate add/remove), the current table its state now.
        """
        with self._snapshot() as tx:
            version = self._meta_int(tx, "blacklist_version")
            rows = tx.all(
                "SELECT c.asn, c.op, (SELECT 1 FROM blacklist_current b WHERE b.asn = c.asn) "
                "FROM blacklist_changes c WHERE c.version > ? AND c.version = "
                "(SELECT MIN(c2.version) FROM blacklist_changes c2 "
                "WHERE c2.asn = c.asn AND c2.version > ?)",
                (since, since),
            )
        add: list[int] = []
        remove: list[int] = []
        for text, first_op, now_listed in rows:
            key = _key_of(str(text), space)
            if key is None:
                continue
            was_listed = first_op == "remove"
            if now_listed and not was_listed:
                add.append(key)
            elif not now_listed and was_listed:
                remove.append(key)
        return version, add, remove

    # --- parameters ------------------------------------------------------------------------

    def publish_params(self, payload: dict[str, Any]) -> int:
        with self._transaction() as tx:
            self._serialise(tx, "params")
            row = tx.one("SELECT MAX(version) FROM params")
            version = int(row[0] or 0) + 1 if row else 1
            stored = dict(payload, version=version)
            tx.run(
                "INSERT INTO params (version, payload) VALUES (?, ?)",
                (version, json.dumps(stored, ensure_ascii=False)),
            )
        return version

    def params_version(self) -> int:
        """The newest parameter set's version (0: none published)."""
        with self._reading() as tx:
            row = tx.one("SELECT MAX(version) FROM params")
        return int(row[0] or 0) if row else 0

    def recent_params(self, limit: int) -> list[dict[str, Any]]:
        """The ``limit`` newest parameter sets, newest first."""
        with self._reading() as tx:
            rows = tx.all("SELECT payload FROM params ORDER BY version DESC LIMIT ?", (limit,))
        return [dict(json.loads(r[0])) for r in rows]

    def latest_params(self) -> dict[str, Any] | None:
        with self._reading() as tx:
            row = tx.one("SELECT payload FROM params ORDER BY version DESC LIMIT 1")
        return None if row is None else dict(json.loads(row[0]))

    # --- merchant clearing (issue 11) ------------------------------------------------------

    def load_merchants(self, merchants: Sequence[Merchant], by: str) -> tuple[int, int]:
        """Add or replace register entries (one transaction); ``(added, updated)``."""
        added = updated = 0
        now = time.time()
        with self._transaction() as tx:
            for m in merchants:
                known = tx.one("SELECT 1 FROM merchants WHERE merchant_id = ?", (m.merchant_id,))
                tx.run(
                    "INSERT INTO merchants (merchant_id, name, category, settlement_account, "
                    "loaded_by, loaded_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (merchant_id) "
                    "DO UPDATE SET name = excluded.name, category = excluded.category, "
                    "settlement_account = excluded.settlement_account, "
                    "loaded_by = excluded.loaded_by, loaded_at = excluded.loaded_at",
                    (m.merchant_id, m.name, m.category, m.settlement_account, by, now),
                )
                if known:
                    updated += 1
                else:
                    added += 1
        return added, updated

    def merchants(self) -> list[Merchant]:
        with self._transaction() as tx:
            rows = tx.all(
                "SELECT merchant_id, name, category, settlement_account FROM merchants "
                "ORDER BY merchant_id"
            )
        return [Merchant(str(a), str(b), str(c), str(d)) for a, b, c, d in rows]

    def day_records(self, start: str, end: str) -> list[DayRecord]:
        """Purchases, unresolved records and refund requests with ``start <= created_at <
        end`` (record timestamps, UTC), every one in memory: for inspection, tests and the
        reference arithmetic; clearing itself reads :meth:`day_tally`."""
        with self._transaction() as tx:
            rows = tx.all(
                "SELECT r.terminal_id, r.seq, r.created_at, r.kind, r.amount, r.body, "
                "s.outcome FROM records r LEFT JOIN resolutions s "
                "ON s.terminal_id = r.terminal_id AND s.seq = r.seq "
                "WHERE r.created_at >= ? AND r.created_at < ? "
                "AND r.kind IN ('purchase', 'unresolved', 'refund_request') "
                "ORDER BY r.terminal_id, r.seq",
                (start, end),
            )
        return [_day_record(row) for row in rows]

    def day_tally(
        self, start: str, end: str
    ) -> tuple[dict[str, Merchant], dict[str, str], DayTally]:
        """One business day reduced in SQL (one transaction, so register, bindings and records
        agree): the register, the terminal bindings, and the :class:`DayTally` whose payable
        purchases (registered merchant, terminal bound to it) are counted and summed by the
        database; only the records that may not be payable (unresolved, refund requests,
        purchases of an unknown merchant or from an unbound terminal) come to Python, one at
        a time. Memory does not grow with the day's purchases."""
        tally = DayTally()
        with self._transaction() as tx:
            register = {
                str(a): Merchant(str(a), str(b), str(c), str(d))
                for a, b, c, d in tx.all(
                    "SELECT merchant_id, name, category, settlement_account FROM merchants"
                )
            }
            bindings = {
                str(t): str(m)
                for t, m in tx.all("SELECT terminal_id, merchant_id FROM merchant_terminals")
            }
            for merchant_id, count, amount in tx.all(
                "SELECT r.merchant_id, COUNT(*), SUM(r.amount) FROM records r "  # noqa: S608
                "JOIN merchants m ON m.merchant_id = r.merchant_id "
                "WHERE r.created_at >= ? AND r.created_at < ? AND r.kind = 'purchase' "
                f"AND {_PAYABLE_PURCHASE} GROUP BY r.merchant_id",
                (start, end),
            ):
                tally.pay(str(merchant_id), int(count), int(amount))
            for row in tx.each(
                "SELECT r.terminal_id, r.seq, r.created_at, r.kind, r.amount, r.body, "  # noqa: S608
                "s.outcome FROM records r "
                "LEFT JOIN resolutions s ON s.terminal_id = r.terminal_id AND s.seq = r.seq "
                "LEFT JOIN merchants m ON m.merchant_id = r.merchant_id "
                "WHERE r.created_at >= ? AND r.created_at < ? AND ("
                "r.kind IN ('unresolved', 'refund_request') OR (r.kind = 'purchase' AND ("
                f"m.merchant_id IS NULL OR NOT {_PAYABLE_PURCHASE})))",
                (start, end),
            ):
                tally.add(_day_record(row), register, bindings)
        return register, bindings, tally

    def bind_terminals(self, pairs: Sequence[tuple[str, str]], by: str) -> tuple[int, int]:
        """Bind each terminal to a merchant (one transaction; a terminal bound again is moved
        to the new merchant): ``(bound, moved)``."""
        bound = moved = 0
        now = time.time()
        with self._transaction() as tx:
            for terminal_id, merchant_id in pairs:
                known = tx.one(
                    "SELECT merchant_id FROM merchant_terminals WHERE terminal_id = ?",
                    (terminal_id,),
                )
                tx.run(
                    "INSERT INTO merchant_terminals (terminal_id, merchant_id, bound_by, bound_at) "
                    "VALUES (?, ?, ?, ?) ON CONFLICT (terminal_id) DO UPDATE SET "
                    "merchant_id = excluded.merchant_id, bound_by = excluded.bound_by, "
                    "bound_at = excluded.bound_at",
                    (terminal_id, merchant_id, by, now),
                )
                if known is None:
                    bound += 1
                elif known[0] != merchant_id:
                    moved += 1
        return bound, moved

    def terminal_bindings(self) -> list[tuple[str, str]]:
        """Every ``(terminal_id, merchant_id)`` binding, by terminal."""
        with self._transaction() as tx:
            rows = tx.all(
                "SELECT terminal_id, merchant_id FROM merchant_terminals ORDER BY terminal_id"
            )
        return [(str(t), str(m)) for t, m in rows]

    def flag_records(self, kind: str, items: Sequence[tuple[str, int, str]]) -> int:
        """An anomaly ``kind`` for each ``(terminal_id, seq, detail)`` not flagged so yet
        (clearing may run again: a record is flagged once; ``anomalies_record`` makes each
        check an index look-up); returns how many are new, logged once."""
        now = time.time()
        added = 0
        with self._transaction() as tx:
            for terminal_id, seq, detail in items:
                added += tx.run(
                    "INSERT INTO anomalies (terminal_id, seq, kind, detail, found_at) "
                    "SELECT ?, ?, ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM anomalies "
                    "WHERE terminal_id = ? AND seq = ? AND kind = ?)",
                    (terminal_id, seq, kind, detail, now, terminal_id, seq, kind),
                )
        if added:
            first = next(iter(items))
            log.warning("anomalies", kind=kind, new=added, first=f"{first[0]}/{first[1]}")
        return added

    def resolve_record(self, terminal_id: str, seq: int, outcome: str, by: str) -> str:
        """Record an operator's decision on an ``unresolved`` record; answers its
        ``created_at`` (the day to re-clear). :class:`PendingChangeRefused` with ``code``
        ``unknown_record``, ``not_unresolved`` or ``already_resolved`` otherwise."""
        with self._transaction() as tx:
            row = tx.one(
                "SELECT kind, created_at FROM records WHERE terminal_id = ? AND seq = ?",
                (terminal_id, seq),
            )
            if row is None:
                raise PendingChangeRefused("unknown_record", f"no record {terminal_id}/{seq}")
            if row[0] != "unresolved":
                raise PendingChangeRefused(
                    "not_unresolved", f"record {terminal_id}/{seq} is {row[0]}, not unresolved"
                )
            done = tx.one(
                "SELECT outcome, resolved_by FROM resolutions WHERE terminal_id = ? AND seq = ?",
                (terminal_id, seq),
            )
            if done is not None:
                raise PendingChangeRefused(
                    "already_resolved",
                    f"record {terminal_id}/{seq} was resolved {done[0]} by {done[1]}",
                )
            tx.run(
                "INSERT INTO resolutions (terminal_id, seq, outcome, resolved_by, resolved_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (terminal_id, seq, outcome, by, time.time()),
            )
            body = tx.one(
                "SELECT body FROM records WHERE terminal_id = ? AND seq = ?", (terminal_id, seq)
            )
            fields = json.loads(str(body[0])).get("fields") if body is not None else None
            bill_id = bill_of_order(fields.get(ORDER_FIELD)) if isinstance(fields, dict) else None
            if bill_id is not None:  # an unresolved bill payment: the operator's word settles it
                tx.run(
                    "UPDATE bills SET state = ?, detail = ?, updated_at = ? WHERE bill_id = ? "
                    "AND state = 'payment_pending'",
                    (
                        "paid" if outcome == "paid" else "open",
                        f"record {terminal_id}/{seq} resolved {outcome} by {by}",
                        time.time(),
                        bill_id,
                    ),
                )
        return str(row[1])

    def latest_settlement(self, day: str) -> dict[str, Any] | None:
        """The newest version of ``day``'s settlement: ``version``, ``content``, ``signature``,
        ``view`` (dict), ``cleared_by``, ``cleared_at``; ``None`` if never cleared."""
        return self.settlement(day, None)

    def settlement(self, day: str, version: int | None) -> dict[str, Any] | None:
        with self._transaction() as tx:
            if version is None:
                row = tx.one(
                    "SELECT version, content, signature, view, cleared_by, cleared_at "
                    "FROM settlements WHERE day = ? ORDER BY version DESC LIMIT 1",
                    (day,),
                )
            else:
                row = tx.one(
                    "SELECT version, content, signature, view, cleared_by, cleared_at "
                    "FROM settlements WHERE day = ? AND version = ?",
                    (day, version),
                )
        if row is None:
            return None
        return {
            "version": int(row[0]),
            "content": str(row[1]),
            "signature": str(row[2]),
            "view": dict(json.loads(row[3])),
            "cleared_by": str(row[4]),
            "cleared_at": float(row[5]),
        }

    def save_settlement(
        self, day: str, version: int, content: str, signature: str, view: dict[str, Any], by: str
    ) -> None:
        """Store one version; a version already taken (a concurrent run) is a
        :class:`StorageFailure` and nothing is stored."""
        with self._transaction() as tx:
            tx.run(
                "INSERT INTO settlements (day, version, content, signature, view, cleared_by, "
                "cleared_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (day, version, content, signature, json.dumps(view), by, time.time()),
            )

    def cleared_days(self, limit: int = 60) -> list[dict[str, Any]]:
        """The newest version of the ``limit`` latest cleared days, newest day first."""
        with self._transaction() as tx:
            rows = tx.all(
                "SELECT day, MAX(version) FROM settlements GROUP BY day ORDER BY day DESC LIMIT ?",
                (limit,),
            )
        return [{"day": str(d), "version": int(v)} for d, v in rows]

    # --- utility bills (一帐通, issue 10) ---------------------------------------------------

    @_rerun_on_conflict
    def load_bills(self, bills: Sequence[Bill], by: str) -> dict[str, int]:
        """Add bills, or replace the details of bills still ``open`` (one transaction); a bill
        being paid or paid is kept as it is. ``{"added", "updated", "kept"}``. The same book
        loaded on two host processes at once: the later one finds the other's bills."""
        counts = {"added": 0, "updated": 0, "kept": 0}
        now = time.time()
        with self._transaction() as tx:
            for bill in bills:
                held = tx.one("SELECT state FROM bills WHERE bill_id = ?", (bill.bill_id,))
                values = (bill.account, bill.utility, bill.period, bill.amount, bill.merchant_id)
                if held is None:
                    tx.run(
                        "INSERT INTO bills (bill_id, account, utility, period, amount, "
                        "merchant_id, state, detail, loaded_by, updated_at) "
                        "VALUES (?, ?, ?, ?, ?, ?, 'open', '', ?, ?)",
                        (bill.bill_id, *values, by, now),
                    )
                    counts["added"] += 1
                elif held[0] == "open":
                    tx.run(
                        "UPDATE bills SET account = ?, utility = ?, period = ?, amount = ?, "
                        "merchant_id = ?, loaded_by = ?, updated_at = ? WHERE bill_id = ?",
                        (*values, by, now, bill.bill_id),
                    )
                    counts["updated"] += 1
                else:
                    counts["kept"] += 1
        return counts

    def bills(self, account: str | None = None, state: str | None = None) -> list[dict[str, Any]]:
        where, params = [], []
        if account is not None:
            where.append("account = ?")
            params.append(account)
        if state is not None:
            where.append("state = ?")
            params.append(state)
        sql = SELECT_BILL + (" WHERE " + " AND ".join(where) if where else "")
        with self._transaction() as tx:
            rows = tx.all(sql + " ORDER BY account, period, bill_id", params)
        return [bill_view(r) for r in rows]

    def bill(self, bill_id: str) -> dict[str, Any] | None:
        with self._transaction() as tx:
            row = tx.one(SELECT_BILL + " WHERE bill_id = ?", (bill_id,))
        return None if row is None else bill_view(row)

    def start_bill_payment(self, bill_id: str, terminal_id: str, card_id: str) -> dict[str, Any]:
        """A kiosk starts paying ``bill_id``: ``open`` → ``payment_pending``. Again by the same
        terminal: the bill as it is. :class:`PendingChangeRefused` ``unknown_bill``,
        ``bill_paid`` or ``bill_payment_pending`` (another terminal is paying it)."""
        with self._transaction() as tx:
            row = tx.one(SELECT_BILL + " WHERE bill_id = ?", (bill_id,))
            if row is None:
                raise PendingChangeRefused("unknown_bill", f"no bill {bill_id}")
            bill = bill_view(row)
            if bill["state"] == "paid":
                raise PendingChangeRefused(
                    "bill_paid",
                    f"bill {bill_id} is already paid (record {bill['terminal_id']}/{bill['seq']})",
                )
            if bill["state"] == "payment_pending" and bill["terminal_id"] != terminal_id:
                raise PendingChangeRefused(
                    "bill_payment_pending",
                    f"bill {bill_id} is being paid at terminal {bill['terminal_id']}",
                )
            if bill["state"] == "open":
                tx.run(
                    "UPDATE bills SET state = 'payment_pending', terminal_id = ?, card_id = ?, "
                    "seq = NULL, detail = ?, updated_at = ? WHERE bill_id = ?",
                    (
                        terminal_id,
                        card_id,
                        f"payment started at {terminal_id}: waiting for its signed record",
                        time.time(),
                        bill_id,
                    ),
                )
            row = tx.one(SELECT_BILL + " WHERE bill_id = ?", (bill_id,))
        assert row is not None
        return bill_view(row)

    def release_bill_payment(self, bill_id: str, terminal_id: str) -> dict[str, Any]:
        """The kiosk's payment was refused (no money moved): ``payment_pending`` → ``open``,
        unless a record of it arrived (then it stays as the record says)."""
        with self._transaction() as tx:
            row = tx.one(SELECT_BILL + " WHERE bill_id = ?", (bill_id,))
            if row is None:
                raise PendingChangeRefused("unknown_bill", f"no bill {bill_id}")
            bill = bill_view(row)
            if bill["state"] == "paid":
                raise PendingChangeRefused("bill_paid", f"bill {bill_id} is already paid")
            if bill["terminal_id"] not in (None, terminal_id):
                raise PendingChangeRefused(
                    "bill_payment_pending",
                    f"bill {bill_id} is being paid at terminal {bill['terminal_id']}",
                )
            if bill["state"] == "payment_pending" and bill["seq"] is None:
                tx.run(
                    "UPDATE bills SET state = 'open', terminal_id = NULL, card_id = NULL, "
                    "detail = ?, updated_at = ? WHERE bill_id = ?",
                    (f"payment at {terminal_id} refused, no money moved", time.time(), bill_id),
                )
            row = tx.one(SELECT_BILL + " WHERE bill_id = ?", (bill_id,))
        assert row is not None
        return bill_view(row)

    @staticmethod
    def _bill_evidence(tx: _Tx, terminal_id: str, record: Record | RecordLine, now: float) -> None:
        """A stored record that pays a bill (its POS order ``bill-<id>``): a ``purchase`` of
        the bill's amount to the bill's merchant marks it ``paid``; an ``unresolved`` record
        (or a purchase that does not match) leaves it ``payment_pending`` for the operator."""
        bill_id = bill_of_order(record.fields.get(ORDER_FIELD))
        if bill_id is None or record.kind not in ("purchase", "unresolved"):
            return
        row = tx.one(SELECT_BILL + " WHERE bill_id = ?", (bill_id,))
        if row is None or row[6] == "paid":
            return
        where = f"record {terminal_id}/{record.seq}"
        if record.kind == "purchase":
            if record.amount == int(row[4]) and record.fields.get("merchant_id") == row[5]:
                state, detail = "paid", f"paid: {where}"
            else:
                state = "payment_pending"
                detail = (
                    f"{where} paid {record.amount} fen to {record.fields.get('merchant_id')!r}, "
                    f"not the bill's {row[4]} fen to {row[5]!r}: an operator must settle it"
                )
        else:
            state = "payment_pending"
            detail = f"{where} is unresolved: the clearing centre settles it"
        tx.run(
            "UPDATE bills SET state = ?, terminal_id = ?, seq = ?, card_id = ?, detail = ?, "
            "updated_at = ? WHERE bill_id = ?",
            (state, terminal_id, record.seq, record.card_id, detail, now, bill_id),
        )
        log.info("bill_evidence", bill_id=bill_id, state=state, detail=detail)

    # --- meta ------------------------------------------------------------------------------

    @staticmethod
    def _meta_int(tx: _Tx, key: str) -> int:
        row = tx.one("SELECT value FROM host_meta WHERE key = ?", (key,))
        return int(row[0]) if row else 0

    @staticmethod
    def _set_meta(tx: _Tx, key: str, value: str) -> None:
        tx.run(
            "INSERT INTO host_meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )


def _slot_row(terminal_id: str, entry: Slot, ack_hash: str, now: float) -> tuple[Any, ...]:
    """The ``records`` row of a stored record, or of a slot a quarantine notice fills (its
    ``prev_hash`` is the host's previous hash: where the slot sits, not a checked link)."""
    if isinstance(entry, QuarantineNotice):
        return (
            terminal_id,
            entry.seq,
            entry.chain_hash,
            ack_hash,
            entry.quarantined_at,
            "quarantined",
            "",
            0,
            notice_to_json(entry),
            now,
            None,
        )
    merchant = entry.fields.get(MERCHANT_ID_FIELD)
    return (
        terminal_id,
        entry.seq,
        entry.hash,
        entry.prev_hash,
        entry.created_at,
        entry.kind,
        entry.card_id,
        entry.amount,
        # a signed batch's line as the terminal sent it (its bytes are under the batch
        # signature); a v1 record re-encoded (canonical JSON)
        entry.line if isinstance(entry, RecordLine) else record_to_json(entry),
        now,
        merchant if isinstance(merchant, str) else None,
    )


def pg_index_method(tx: _Tx, index: str) -> str | None:
    """PostgreSQL: the access method of ``index`` (``btree``, ``brin``...), ``None`` if absent."""
    row = tx.one(
        "SELECT am.amname FROM pg_class c JOIN pg_am am ON am.oid = c.relam "
        "WHERE c.oid = to_regclass(?)",
        (index,),
    )
    return None if row is None else str(row[0])


def _add_merchant_column(tx: _Tx, has_column: str, from_body: str) -> None:
    """A database made before records had ``merchant_id``: add the column and fill it from
    each stored record's body (once, in the opening transaction), as ingest fills it: the
    field's text, or NULL when the field is absent or not text."""
    row = tx.one(has_column)
    if row is not None and int(row[0]):
        return
    tx.run("ALTER TABLE records ADD COLUMN merchant_id TEXT")
    filled = tx.run(
        f"UPDATE records SET merchant_id = {from_body} "  # noqa: S608 - our constant SQL
        "WHERE kind IN ('purchase', 'unresolved', 'refund_request')"
    )
    log.info("records.merchant_id added", filled=filled)


def _day_record(row: Row) -> DayRecord:
    terminal_id, seq, created_at, kind, amount, body, outcome = row
    fields = json.loads(body).get("fields")
    return DayRecord(
        str(terminal_id),
        int(seq),
        str(created_at),
        str(kind),
        int(amount),
        fields if isinstance(fields, dict) else {},
        str(outcome or ""),
    )


PRINTED_PREFIX = "p:"  # a stored printed-number key: never 16 hex digits, so never a serial's


def _printed_text(key: int) -> str:
    """The stored text of a printed key (after ``p:``): ``ISSUER:NUMBER``."""
    issuer, number = printed_entry(key)
    return f"{issuer}:{number}"


def _unscoped_text(number: int) -> str:
    """The stored key of a printed number listed before issuer scoping: ``p:NUMBER``."""
    if not 0 <= number < 10**19:
        raise ValueError(f"unscoped printed number {number} has more than 19 digits")
    return f"{PRINTED_PREFIX}{number}"


def _keys(serials: Sequence[int], printed: Sequence[int]) -> list[str]:
    """The stored keys of serials (16 hex digits) and printed numbers (``p:`` + digits)."""
    return [_asn_text(a) for a in serials] + [PRINTED_PREFIX + _printed_text(p) for p in printed]


def _key_of(text: str, space: str) -> int | None:
    """The list key of a stored key in ``space``; ``None`` if it belongs to the other one, or
    is an unscoped printed number (``p:NUMBER``, listed before issuer scoping: it names no
    issuer, so no issuer-scoped list can carry it)."""
    if text.startswith(PRINTED_PREFIX):
        issuer, scoped, number = text[len(PRINTED_PREFIX) :].partition(":")
        if space != SPACE_PRINTED or not scoped:
            return None
        return printed_key(issuer, number)
    return int(text, 16) if space == SPACE_SERIAL else None


def _asn_text(asn: int) -> str:
    if not 0 <= asn < 1 << 64:
        raise ValueError(f"ASN {asn} is outside 0..2^64-1")
    return f"{asn:016X}"


def _entry(row: Row) -> TerminalEntry:
    tid, kind, site, by, at, authorised, code, expires, used, expected = row
    return TerminalEntry(
        terminal_id=str(tid),
        kind=str(kind),
        site=str(site),
        created_by=str(by),
        created_at=float(at),
        authorised_by=None if authorised is None else str(authorised),
        code_hash=None if code is None else str(code),
        code_expires_at=None if expires is None else float(expires),
        code_used_at=None if used is None else float(used),
        expected_key=None if expected is None else str(expected),
    )


def _terminal(row: Row) -> Terminal:
    tid, key, ack, ack_hash, last_seen, heartbeat, registered = row
    return Terminal(
        terminal_id=str(tid),
        public_key=str(key),
        ack_seq=int(ack),
        ack_hash=str(ack_hash),
        last_seen=None if last_seen is None else float(last_seen),
        heartbeat=None if heartbeat is None else json.loads(heartbeat),
        registered_at=float(registered),
    )


# --- SQLite ------------------------------------------------------------------------------------


class SqliteTx:
    """One SQLite transaction's statements (``?`` placeholders); also the loads database's."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._conn.execute(sql, tuple(params)).rowcount

    def one(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        row: Row | None = self._conn.execute(sql, tuple(params)).fetchone()
        return row

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return list(self._conn.execute(sql, tuple(params)).fetchall())

    def each(self, sql: str, params: Sequence[Any] = ()) -> Iterator[Row]:
        """Rows one at a time (SQLite steps the statement as they are read)."""
        yield from self._conn.execute(sql, tuple(params))

    def insert_rows(self, table: str, columns: Mapping[str, str], rows: Sequence[Row]) -> None:
        marks = ", ".join("?" * len(columns))
        self._conn.executemany(
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})",  # noqa: S608
            rows,
        )


SQLITE_BUSY_TIMEOUT_S = 10.0


class _WriterQueue:
    """Writers of one SQLite file in several processes (``cardhost host --workers N``) take
    turns on an ``flock`` of ``<db>-writer`` before ``BEGIN IMMEDIATE``, polled every 2 ms
    at most, so the next one starts within 2 ms of the previous commit. Without it they meet
    SQLite's own busy handler, whose sleeps grow to 100 ms a try: ten terminals uploading
    100,000 records into two workers took 4.0 and 4.1 s without it, 3.1 and 3.3 s with it
    (alternated, one machine). Bounded like SQLite's busy timeout: past
    ``timeout_s`` the writer is refused (``StorageFailure``, 503). A process that dies holding
    the lock loses it with its descriptor."""

    def __init__(self, db: Path, timeout_s: float) -> None:
        self.path = Path(f"{db}-writer")
        self.timeout_s = timeout_s
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    @contextmanager
    def turn(self) -> Iterator[None]:
        deadline = time.monotonic() + self.timeout_s
        pause = 0.0001
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StorageFailure(
                        f"host storage: {self.path}: another process has been writing for "
                        f"{self.timeout_s:g} s"
                    ) from None
                time.sleep(pause)
                pause = min(0.002, pause * 2)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self._fd)


class SqliteStorage(Storage):
    """SQLite in WAL mode, ``synchronous=FULL``: an acknowledged record survives a power cut.
    One write transaction at a time per process (``_lock``), and per file
    (:class:`_WriterQueue`); reads on a second connection of their own (:meth:`_reading`)."""

    backend = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        try:
            self._writers = _WriterQueue(path, SQLITE_BUSY_TIMEOUT_S)
            self._conn = sqlite3.connect(
                path, isolation_level=None, timeout=SQLITE_BUSY_TIMEOUT_S, check_same_thread=False
            )
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("PRAGMA synchronous = FULL")
            self._reader = sqlite3.connect(
                path, isolation_level=None, timeout=SQLITE_BUSY_TIMEOUT_S, check_same_thread=False
            )
            self._read_lock = threading.Lock()
            with self._transaction() as tx:
                for statement in _SCHEMA.format(
                    autoid="INTEGER PRIMARY KEY AUTOINCREMENT",
                    created_at_index=CREATED_AT_INDEX["sqlite"],
                ).split(";"):
                    if statement.strip():
                        tx.run(statement)
                _add_merchant_column(
                    tx,
                    "SELECT COUNT(*) FROM pragma_table_info('records') WHERE name = 'merchant_id'",
                    "CASE WHEN json_type(body, '$.fields.merchant_id') = 'text' "
                    "THEN json_extract(body, '$.fields.merchant_id') END",
                )
        except (sqlite3.Error, StorageFailure, OSError) as exc:
            if hasattr(self, "_writers"):
                self._writers.close()
            raise StorageFailure(f"host storage: cannot open {path}: {exc}") from exc

    @contextmanager
    def _transaction(self) -> Iterator[_Tx]:
        with self._lock, self._writers.turn(), self._run(self._conn, "BEGIN IMMEDIATE") as tx:
            yield tx

    # Reads go to the reader connection: in WAL mode they read the last commit while a writer
    # (of this process or another) works, so a heartbeat's or a list pull's read never waits
    # for an upload's write (nor takes the writers' flock).

    @contextmanager
    def _reading(self) -> Iterator[_Tx]:
        with self._read_lock, self._run(self._reader, None) as tx:  # SQLite's implicit one
            yield tx

    @contextmanager
    def _snapshot(self) -> Iterator[_Tx]:
        with self._read_lock, self._run(self._reader, "BEGIN") as tx:
            yield tx

    @contextmanager
    def _run(self, conn: sqlite3.Connection, begin: str | None) -> Iterator[_Tx]:
        try:
            if begin is None:
                yield SqliteTx(conn)
                return
            conn.execute(begin)
            try:
                yield SqliteTx(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as exc:
            if "full" in str(exc).lower():
                raise StorageFull(f"host storage: {self.path}: {exc}") from exc
            raise StorageFailure(f"host storage: {self.path}: {exc}") from exc
        except sqlite3.IntegrityError as exc:
            if "UNIQUE" in str(exc).upper():
                raise StorageConflict(f"host storage: {self.path}: {exc}") from exc
            raise StorageFailure(f"host storage: {self.path}: {exc}") from exc
        except sqlite3.Error as exc:
            raise StorageFailure(f"host storage: {self.path}: {exc}") from exc

    def set_max_pages(self, pages: int | None) -> None:
        """Cap the database size (``PRAGMA max_page_count``): a disk that fills up, for tests."""
        with self._lock:
            value = pages if pages is not None else 4294967294
            self._conn.execute(f"PRAGMA max_page_count = {int(value)}")

    def page_count(self) -> int:
        with self._lock:
            return int(self._conn.execute("PRAGMA page_count").fetchone()[0])

    def close(self) -> None:
        with self._lock, self._read_lock:
            self._reader.close()
            self._conn.close()
            self._writers.close()


# --- PostgreSQL --------------------------------------------------------------------------------


class PgTx:
    """One PostgreSQL transaction's statements, written with ``?`` placeholders as for SQLite;
    also the loads database's."""

    def __init__(self, cursor: Any) -> None:
        self._cur = cursor

    @staticmethod
    def _sql(sql: str) -> str:
        return sql.replace("?", "%s")

    def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        self._cur.execute(self._sql(sql), tuple(params))
        return int(self._cur.rowcount)

    def one(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        self._cur.execute(self._sql(sql), tuple(params))
        row: Row | None = self._cur.fetchone()
        return row

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        self._cur.execute(self._sql(sql), tuple(params))
        return list(self._cur.fetchall())

    def each(self, sql: str, params: Sequence[Any] = ()) -> Iterator[Row]:
        """Rows one at a time (libpq single-row mode), never the whole result in memory."""
        yield from self._cur.stream(self._sql(sql), tuple(params))

    def insert_rows(self, table: str, columns: Mapping[str, str], rows: Sequence[Row]) -> None:
        # COPY: one round trip for the whole batch (psycopg streams the rows), in the binary
        # format: each value as its column's type sends it, which neither side then formats
        # or parses as text (a record row: 6 µs of the host's CPU and 8 of the server's in
        # text, 3.6 and 5 in binary, measured side by side)
        statement = f"COPY {table} ({', '.join(columns)}) FROM STDIN (FORMAT BINARY)"
        try:
            with self._cur.copy(statement) as copy:
                copy.set_types(list(columns.values()))
                for row in rows:
                    copy.write_row(row)
        except (TypeError, ValueError, OverflowError) as exc:  # a value its column cannot take
            raise StorageFailure(f"host storage: PostgreSQL: a {table} row: {exc}") from exc


PG_CONNECTIONS = 4  # a host process's pool of PostgreSQL connections, by default
PG_CONNECTION_WAIT_S = 10.0  # a transaction waits this long for a free one, then 503


class PostgresStorage(Storage):
    """PostgreSQL through psycopg 3 (``dsn`` as libpq understands it), over a pool of up to
    ``connections`` connections (psycopg_pool): transactions of different requests run side by
    side, each on its own connection. They were serialised on one connection, several round
    trips each, and that queue, not the CPU, limited a worker under a city's request load
    (docs/city-scale.md section 5). What serialises writers that must not overlap is in the
    database, as between host processes: the terminal row lock (ingest), advisory locks
    (version counters), unique keys (:func:`_rerun_on_conflict`). A connection the server
    dropped (a restart, an idle timeout) fails the one transaction that meets it (503, the
    terminal retries); the pool then replaces it."""

    backend = "postgresql"

    def __init__(self, dsn: str, connections: int = PG_CONNECTIONS) -> None:
        self.dsn = dsn
        if connections < 1:
            raise StorageFailure(f"host storage: PostgreSQL: {connections} connections: need 1")
        # the process shows in pg_stat_activity (several host processes share a database)
        name = f"cardhost[{os.getpid()}]"
        try:
            # the schema on a connection of its own first: an unreachable server or a bad DSN
            # is refused at once, not after the pool's reconnection attempts
            with psycopg.connect(dsn, autocommit=False, application_name=name) as conn:
                self._create_schema(conn)
        except psycopg.Error as exc:
            raise StorageFailure(f"host storage: cannot open PostgreSQL: {exc}") from exc
        self._pool = ConnectionPool(
            dsn,
            min_size=1,
            max_size=connections,
            # autocommit: a write is an explicit transaction (BEGIN ... COMMIT), a one-statement
            # read is one round trip (_reading)
            kwargs={"autocommit": True, "application_name": name},
            timeout=PG_CONNECTION_WAIT_S,
            name=name,
            open=True,
        )

    def _create_schema(self, conn: psycopg.Connection[Any]) -> None:
        with conn.transaction(), conn.cursor() as cur:
            tx = PgTx(cur)
            tx.run("SELECT pg_advisory_xact_lock(7355608)")  # one schema creator at a time
            for statement in _SCHEMA.format(
                autoid="BIGSERIAL PRIMARY KEY", created_at_index=CREATED_AT_INDEX["postgresql"]
            ).split(";"):
                if statement.strip():
                    tx.run(statement)
            _add_merchant_column(
                tx,
                "SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = "
                "current_schema() AND table_name = 'records' AND column_name = 'merchant_id'",
                "CASE WHEN jsonb_typeof(body::jsonb #> '{fields,merchant_id}') = 'string' "
                "THEN body::jsonb #>> '{fields,merchant_id}' END",
            )
            method = pg_index_method(tx, "records_created_at")
            if method is not None and method != "brin":
                # a database made before the BRIN index: left as it is (rebuilding it
                # here would lock the records table while every worker waits)
                log.warning(
                    "records_created_at is not BRIN: ingest writes more than it needs to; "
                    "docs/city-scale.md says how to replace it while serving",
                    method=method,
                )

    _select_cursor = "SELECT ack_seq, ack_hash FROM terminals WHERE terminal_id = ? FOR UPDATE"
    # transaction-scoped advisory locks, one per version counter (the schema's is 7355608)
    _ADVISORY_KEYS: ClassVar[dict[str, int]] = {"blacklist": 7355609, "params": 7355610}

    def _serialise(self, tx: _Tx, what: str) -> None:
        """A transaction-scoped advisory lock: a second host process publishing (or approving)
        at the same moment waits, then reads the version this one wrote, so no two lists or
        parameter sets ever share a version number (READ COMMITTED alone would let both read
        the same counter)."""
        tx.run("SELECT pg_advisory_xact_lock(?)", (self._ADVISORY_KEYS[what],))

    @contextmanager
    def _transaction(self) -> Iterator[_Tx]:
        with self._connection() as conn, conn.transaction(), conn.cursor() as cur:
            yield PgTx(cur)

    @contextmanager
    def _reading(self) -> Iterator[_Tx]:
        with self._connection() as conn, conn.cursor() as cur:
            yield PgTx(cur)

    @contextmanager
    def _snapshot(self) -> Iterator[_Tx]:
        # READ COMMITTED gives each statement its own snapshot: a list published between the
        # version read and the entries read would be signed under the older version
        with self._connection() as conn, conn.transaction(), conn.cursor() as cur:
            tx = PgTx(cur)
            tx.run("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield tx

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        try:
            with self._pool.connection() as conn:
                yield conn
        except PoolTimeout as exc:
            raise StorageFailure(
                f"host storage: PostgreSQL: no free connection of {self._pool.max_size} "
                f"within {PG_CONNECTION_WAIT_S:g} s ({exc})"
            ) from exc
        except psycopg.errors.DiskFull as exc:
            raise StorageFull(f"host storage: PostgreSQL: {exc}") from exc
        except psycopg.errors.UniqueViolation as exc:
            raise StorageConflict(f"host storage: PostgreSQL: {exc}") from exc
        except psycopg.Error as exc:
            raise StorageFailure(f"host storage: PostgreSQL: {exc}") from exc

    def close(self) -> None:
        self._pool.close()


def open_storage(url: str, pg_connections: int = PG_CONNECTIONS) -> Storage:
    """``sqlite:///path/to/host.db``, a bare path, or ``postgresql://...`` (a pool of up to
    ``pg_connections`` connections)."""
    if url.startswith(("postgresql://", "postgres://")) or url.startswith("host="):
        return PostgresStorage(url, pg_connections)
    path = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else url
    return SqliteStorage(Path(path))
