"""The offline store: the intent journal and the signed record chain in one SQLite file.

Every write method is exactly one ``BEGIN IMMEDIATE`` transaction and is durable when it
returns (WAL, ``synchronous=FULL``). The agent is the only writer of intents and records; the
sync daemon may read the same file concurrently.

Quarantine: a stored record whose content no longer verifies (it does not parse, its hash does
not match its content, its signature does not verify under the device key, it names another
terminal) is quarantined, never deleted or rewritten: the ``quarantine`` table gets a verbatim
copy of the row (kept for ever, compaction never touches it), what failed, the hash the next
record chains onto, and a signed :class:`QuarantineNotice` for the clearing host. Lookups skip
quarantined records; the upload sends the notice in the record's place. Whoever reads a bad
record first (the scan at start, a card lookup, the sync daemon) quarantines it.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import structlog
from sqlite_utils import Database

from agent.errors import StoreError
from agent.offline_store.device_key import DeviceKey, key_id_for
from agent.offline_store.records import (
    GENESIS_HASH,
    INT64_MAX,
    RECORD_COLUMNS,
    FieldValue,
    QuarantineNotice,
    Record,
    RecordBody,
    canonical_json,
    entry_from_json,
    format_timestamp,
    hash_hex,
    notice_to_json,
    parse_timestamp,
    require_text,
    seal_notice,
    seal_record,
)
from agent.offline_store.verify import ChainChecker, KeyEpochs, VerifyReport

log = structlog.get_logger(__name__)

BUSY_TIMEOUT_MS = 5000
_PAGE_SIZE = 500

_INSERT_RECORD = (
    "INSERT INTO records (seq, created_at, terminal_id, kind, card_id, amount, fields, "
    "prev_hash, hash, signature) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_SELECT_RECORDS_AFTER = (
    "SELECT seq, created_at, terminal_id, kind, card_id, amount, fields, prev_hash, hash, "
    "signature FROM records WHERE seq > ? ORDER BY seq LIMIT ?"
)
_SELECT_RECORDS_BETWEEN = (
    "SELECT seq, created_at, terminal_id, kind, card_id, amount, fields, prev_hash, hash, "
    "signature FROM records WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?"
)
_SELECT_LAST_RECORD_FOR_CARD = (
    "SELECT seq, created_at, terminal_id, kind, card_id, amount, fields, prev_hash, hash, "
    "signature FROM records WHERE card_id = ? AND kind IN ({kind_placeholders}) "
    "AND seq < ? AND seq NOT IN (SELECT seq FROM quarantine) ORDER BY seq DESC LIMIT 1"
)
_SELECT_RECORD = (
    "SELECT seq, created_at, terminal_id, kind, card_id, amount, fields, prev_hash, hash, "
    "signature FROM records WHERE seq = ?"
)
_SELECT_UNCHECKED_RECORDS = (
    "SELECT seq, created_at, terminal_id, kind, card_id, amount, fields, prev_hash, hash, "
    "signature FROM records WHERE seq > ? AND seq NOT IN (SELECT seq FROM quarantine) "
    "ORDER BY seq LIMIT ?"
)
_COPY_TO_QUARANTINE = (
    "INSERT INTO quarantine (seq, quarantined_at, reason, chain_hash, notice, created_at, "
    "terminal_id, kind, card_id, amount, fields, prev_hash, hash, signature) "
    "SELECT seq, ?, ?, ?, ?, created_at, terminal_id, kind, card_id, amount, fields, prev_hash, "
    "hash, signature FROM records WHERE seq = ?"
)
_SELECT_INTENTS = "SELECT id, card_id, product, created_at, payload FROM intents ORDER BY id"
_SELECT_INTENTS_FOR_CARD = (
    "SELECT id, card_id, product, created_at, payload FROM intents WHERE card_id = ? ORDER BY id"
)
_SELECT_INTENTS_CREATED_BEFORE = (
    "SELECT id, card_id, product, created_at, payload FROM intents WHERE created_at < ? ORDER BY id"
)

RecordRow = tuple[int, str, str, str, str, int, str, str, str, str]


@dataclass(frozen=True)
class QuarantinedRecord:
    """A quarantined record as the store keeps it (the verbatim row is in the table)."""

    seq: int
    quarantined_at: str
    reason: str
    notice: QuarantineNotice


class IntentNotFoundError(StoreError):
    """The intent is gone: already finalized, voided or expired (or never existed)."""


@dataclass(frozen=True)
class Intent:
    id: int
    card_id: str
    product: str
    created_at: datetime
    payload: dict[str, Any] = field(hash=False)


def _utc_now() -> datetime:
    return datetime.now(UTC)


@contextmanager
def atomic(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction on an autocommit connection: BEGIN IMMEDIATE … COMMIT/ROLLBACK."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error as rollback_error:
                log.error("rollback failed", error=str(rollback_error))
        raise


def _create_schema_v1(db: Database) -> None:
    db.create_table(
        "meta", {"key": str, "value": str}, pk="key", not_null=["key", "value"], strict=True
    )
    # AUTOINCREMENT: ids are never reused, so a stale finalize_intent(id) cannot hit a newer intent
    db.execute(
        """
        CREATE TABLE intents (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            card_id TEXT NOT NULL,
            product TEXT NOT NULL,
            created_at TEXT NOT NULL,
            payload TEXT NOT NULL
        )"""
        + (" STRICT" if db.supports_strict else "")
    )
    record_columns: dict[str, Any] = {
        "seq": int,
        "created_at": str,
        "terminal_id": str,
        "kind": str,
        "card_id": str,
        "amount": int,
        "fields": str,
        "prev_hash": str,
        "hash": str,
        "signature": str,
    }
    db.create_table("records", record_columns, pk="seq", not_null=record_columns, strict=True)
    db.table("records").create_index(["card_id", "seq"])
    db.table("meta").insert_all(
        [
            {"key": "last_seq", "value": "0"},
            {"key": "last_hash", "value": GENESIS_HASH},
            {"key": "chain_anchor_seq", "value": "0"},
            {"key": "chain_anchor_hash", "value": GENESIS_HASH},
        ]
    )


def _add_quarantine_v2(db: Database) -> None:
    # Not STRICT, and the copied record columns have no declared type: INSERT ... SELECT keeps
    # every value exactly as it was stored, whatever it has become.
    db.execute(
        """
        CREATE TABLE quarantine (
            seq INTEGER PRIMARY KEY,
            quarantined_at TEXT NOT NULL,
            reason TEXT NOT NULL,
            chain_hash TEXT NOT NULL,
            notice TEXT NOT NULL,
            created_at, terminal_id, kind, card_id, amount, fields, prev_hash, hash, signature
        )"""
    )


_MIGRATIONS: tuple[Callable[[Database], None], ...] = (_create_schema_v1, _add_quarantine_v2)
SCHEMA_VERSION = len(_MIGRATIONS)


class OfflineStore:
    """Intents and records of one terminal. Safe to share between threads of one process."""

    def __init__(
        self,
        db: Database,
        path: Path,
        device_key: DeviceKey | None,
        terminal_id: str,
        clock: Callable[[], datetime],
    ) -> None:
        self._db = db
        self._conn: sqlite3.Connection = db.conn
        self._path = path
        self._key = device_key
        self._terminal_id = terminal_id
        self._clock = clock
        self._stamp: Callable[[], tuple[datetime, Mapping[str, FieldValue]]] | None = None
        self._lock = threading.Lock()
        # which device key signed which records (verify.KeyEpochs, from meta: several after a
        # key rotation); read when first needed, and again when a signature does not verify
        # under it (another process rotated the key): _seal_problem
        self._epochs: KeyEpochs | None = None

    @classmethod
    def open(
        cls,
        path: Path,
        device_key: DeviceKey,
        terminal_id: str,
        *,
        clock: Callable[[], datetime] = _utc_now,
    ) -> OfflineStore:
        """Open (creating or migrating if needed) the store at ``path``.

        Refuses a store created with another device key or for another terminal.
        """
        require_text("terminal_id", terminal_id)
        try:
            conn = sqlite3.connect(
                path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise StoreError(f"store: could not open {path}: {exc}") from exc
        try:
            with _translated(f"open {path}"):
                db = Database(conn, execute_plugins=False)
                store = cls(db, path, device_key, terminal_id, clock)
                store._configure()
                found_version, meta = store._prepare_schema()
        except BaseException:
            conn.close()
            raise
        if found_version != SCHEMA_VERSION:
            log.info(
                "offline store schema created" if found_version == 0 else "offline store migrated",
                path=str(path),
                from_version=found_version,
                to_version=SCHEMA_VERSION,
            )
        log.info(
            "offline store opened",
            path=str(path),
            terminal_id=terminal_id,
            key_id=device_key.key_id,
            last_seq=meta["last_seq"],
        )
        return store

    @classmethod
    def open_for_reading(cls, path: Path) -> OfflineStore:
        """Open an existing store without its device key: list, export and verify only.

        Verification uses the public key recorded in the store; writing raises StoreError.
        """
        if not path.is_file():
            raise StoreError(f"store: {path} does not exist")
        try:
            conn = sqlite3.connect(
                f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise StoreError(f"store: could not open {path}: {exc}") from exc
        try:
            with _translated(f"open {path} for reading"):
                db = Database(conn, execute_plugins=False)
                meta = _read_meta(conn)
                terminal_id = _meta_text(meta, "terminal_id")
                if not db.table("quarantine").exists():
                    # a store from before the quarantine (schema 1), not migrated on a
                    # read-only open: an empty stand-in in the connection's temp schema
                    conn.execute(
                        "CREATE TEMP TABLE quarantine (seq INTEGER PRIMARY KEY, "
                        "quarantined_at TEXT, reason TEXT, chain_hash TEXT, notice TEXT)"
                    )
        except BaseException:
            conn.close()
            raise
        return cls(db, path, None, terminal_id, _utc_now)

    @property
    def path(self) -> Path:
        return self._path

    @property
    def terminal_id(self) -> str:
        return self._terminal_id

    def add_intent(self, card_id: str, product: str, payload: Mapping[str, Any]) -> int:
        """Journal what is about to be debited; returns the intent id (never reused)."""
        require_text("card_id", card_id)
        require_text("product", product)
        payload_json = canonical_json(dict(payload))
        # the guarded time when a stamp is set: intents expire against the same clock
        created_at = format_timestamp(self._clock() if self._stamp is None else self._stamp()[0])
        with self._write("add intent") as conn:
            cursor = conn.execute(
                "INSERT INTO intents (card_id, product, created_at, payload) VALUES (?, ?, ?, ?)",
                (card_id, product, created_at, payload_json),
            )
        intent_id = cursor.lastrowid
        if intent_id is None:
            raise StoreError("store: could not add intent: no id was assigned")
        log.debug("intent added", intent_id=intent_id, card_id=card_id, product=product)
        return intent_id

    def pending_intents(self, card_id: str | None = None) -> list[Intent]:
        """Intents not yet finalized, voided or expired, oldest first."""
        with self._read("list pending intents") as conn:
            if card_id is None:
                rows = conn.execute(_SELECT_INTENTS).fetchall()
            else:
                rows = conn.execute(_SELECT_INTENTS_FOR_CARD, (card_id,)).fetchall()
        return [_intent_from_row(row) for row in rows]

    def finalize_intent(self, intent_id: int, body: RecordBody) -> Record:
        """Delete the intent and append its record in one transaction.

        Raises :class:`IntentNotFoundError` if the intent is gone, so one intent can never
        yield two records.
        """
        with self._write(f"finalize intent {intent_id}") as conn:
            self._take_intent(conn, intent_id, body.card_id)
            record = self._append_in_transaction(conn, body)
        log.debug("intent finalized", intent_id=intent_id, seq=record.seq, kind=record.kind)
        return record

    def void_intent(self, intent_id: int, reason: str) -> None:
        """Forget an intent whose debit provably did not happen; no record is written."""
        require_text("reason", reason)
        with self._write(f"void intent {intent_id}") as conn:
            card_id = self._take_intent(conn, intent_id, None)
        log.info("intent voided", intent_id=intent_id, card_id=card_id, reason=reason)

    def set_stamp(self, stamp: Callable[[], tuple[datetime, Mapping[str, FieldValue]]]) -> None:
        """Stamp every record from now on with ``stamp()``: its time (``created_at``) and fields
        merged into the body (the clock state, :func:`agent.clock.record_stamp`)."""
        self._stamp = stamp

    def last_record_at(self) -> datetime | None:
        """The ``created_at`` of the newest record (compacted ones included), if any."""
        with self._read("read the last record's time") as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'last_created_at'").fetchone()
            if row is None:  # a store written before the key existed
                row = conn.execute(
                    "SELECT created_at FROM records ORDER BY seq DESC LIMIT 1"
                ).fetchone()
        return None if row is None else parse_timestamp(str(row[0]))

    def append_record(self, body: RecordBody) -> Record:
        with self._write("append record") as conn:
            record = self._append_in_transaction(conn, body)
        log.debug("record appended", seq=record.seq, kind=record.kind, card_id=record.card_id)
        return record

    def expire_intents(
        self, older_than: datetime, make_body: Callable[[Intent], RecordBody]
    ) -> list[Record]:
        """Turn every intent created before ``older_than`` into a record (one transaction each).

        ``make_body`` runs outside any transaction. An intent resolved meanwhile is skipped.
        """
        cutoff = format_timestamp(older_than)
        with self._read("list expired intents") as conn:
            rows = conn.execute(_SELECT_INTENTS_CREATED_BEFORE, (cutoff,)).fetchall()
        records: list[Record] = []
        for intent in (_intent_from_row(row) for row in rows):
            body = make_body(intent)
            try:
                with self._write(f"expire intent {intent.id}") as conn:
                    self._take_intent(conn, intent.id, body.card_id)
                    record = self._append_in_transaction(conn, body)
            except IntentNotFoundError:
                log.info("intent resolved before it expired", intent_id=intent.id)
                continue
            records.append(record)
            log.warning(
                "intent expired",
                intent_id=intent.id,
                card_id=intent.card_id,
                seq=record.seq,
                kind=record.kind,
            )
        return records

    def records(self, since_seq: int = 0, limit: int | None = None) -> Iterator[Record]:
        """Records with ``seq > since_seq`` in sequence order, read lazily in pages."""
        remaining = limit
        after = since_seq
        while remaining is None or remaining > 0:
            page_size = _PAGE_SIZE if remaining is None else min(_PAGE_SIZE, remaining)
            with self._read("read records") as conn:
                rows: list[RecordRow] = conn.execute(
                    _SELECT_RECORDS_AFTER, (after, page_size)
                ).fetchall()
            for row in rows:
                yield _record_from_row_or_raise(row)
            if len(rows) < page_size:
                return
            after = rows[-1][0]
            if remaining is not None:
                remaining -= len(rows)

    def last_record_for_card(
        self, card_id: str, kinds: Collection[str] = ("purchase",)
    ) -> Record | None:
        """The newest verified record of one of ``kinds`` for the card (a single ``str`` is one
        kind). A record that does not verify is quarantined and skipped: its content cannot be
        trusted, so it neither refuses nor allows the card (a double tap against a corrupted
        record is not caught)."""
        wanted = (kinds,) if isinstance(kinds, str) else tuple(kinds)
        if not wanted:
            return None
        query = _SELECT_LAST_RECORD_FOR_CARD.format(kind_placeholders=", ".join("?" * len(wanted)))
        below = INT64_MAX
        while True:
            with self._read("find the card's last record") as conn:
                row: RecordRow | None = conn.execute(query, (card_id, *wanted, below)).fetchone()
            if row is None:
                return None
            record, problem = self._checked(row)
            if record is not None:
                return record
            self._quarantine_found(row[0], problem)
            below = row[0]

    def purchases_since(self, card_id: str, since: datetime) -> int:
        """What this terminal's purchase records took from the card since ``since`` (fen):
        the daily cap's accumulator. Quarantined records do not count."""
        stamp = since.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        with self._read("sum the card's purchases") as conn:
            (total,) = conn.execute(
                "SELECT COALESCE(SUM(amount), 0) FROM records WHERE card_id = ? "
                "AND kind = 'purchase' AND created_at >= ? "
                "AND seq NOT IN (SELECT seq FROM quarantine)",
                (card_id, stamp),
            ).fetchone()
        return int(total)

    def count_records(self) -> int:
        with self._read("count records") as conn:
            (count,) = conn.execute("SELECT COUNT(*) FROM records").fetchone()
        return int(count)

    def last_seq(self) -> int:
        with self._read("read the last sequence number") as conn:
            return _meta_int(_read_meta(conn), "last_seq")

    # --- sync cursor and compaction (used by the sync daemon, ``cardsync run``) -----------------
    #
    # meta ``sync_ack_seq``: the host's cumulative acknowledgement — every record with
    # ``seq <= sync_ack_seq`` is stored at the clearing host. Absent means 0. It only moves
    # forward, never past ``last_seq``. ``compact`` deletes only records at or below it.

    def acknowledged_seq(self) -> int:
        """The highest seq the clearing host has acknowledged (0 if none)."""
        with self._read("read the sync acknowledgement") as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'sync_ack_seq'").fetchone()
        return _ack_value(row)

    def unsent_records(self, limit: int, after_seq: int | None = None) -> list[Record]:
        """At most ``limit`` records after ``after_seq`` (default: the acknowledged seq), in order.

        One short read; the caller streams a long backlog batch by batch.
        """
        if limit < 1:
            raise ValueError("limit must be at least 1")
        after = self.acknowledged_seq() if after_seq is None else after_seq
        return list(self.records(since_seq=after, limit=limit))

    def unsent_entries(
        self, limit: int, after_seq: int | None = None
    ) -> list[Record | QuarantineNotice]:
        """What the upload sends: at most ``limit`` records after ``after_seq`` (default: the
        acknowledged seq), in order, each quarantined one replaced by its signed notice (a
        record found corrupted here is quarantined now). Needs the device key."""
        if limit < 1:
            raise ValueError("limit must be at least 1")
        after = self.acknowledged_seq() if after_seq is None else after_seq
        with self._read("read unsent records") as conn:
            rows: list[RecordRow] = conn.execute(_SELECT_RECORDS_AFTER, (after, limit)).fetchall()
            notices = self._notices(conn, after, rows[-1][0] if rows else after)
        entries: list[Record | QuarantineNotice] = []
        for row in rows:
            seq = row[0]
            if seq in notices:
                entries.append(notices[seq])
                continue
            record, problem = self._checked(row)
            if record is not None:
                entries.append(record)
                continue
            quarantined = self._quarantine_found(seq, problem)
            if quarantined is None:
                raise StoreError(
                    f"store: record {seq} does not verify ({problem}) and this "
                    "store is open for reading only: it cannot be quarantined"
                )
            entries.append(quarantined.notice)
        return entries

    def count_unsent(self) -> int:
        with self._read("count unsent records") as conn:
            (count,) = conn.execute(
                "SELECT COUNT(*) FROM records WHERE seq > COALESCE((SELECT CAST(value AS INTEGER) "
                "FROM meta WHERE key = 'sync_ack_seq'), 0)"
            ).fetchone()
        return int(count)

    def oldest_unsent_created_at(self) -> datetime | None:
        """Creation time of the oldest record the host has not acknowledged, if any
        (quarantined records and unreadable times are passed over)."""
        with self._read("find the oldest unsent record") as conn:
            rows = conn.execute(
                "SELECT created_at FROM records WHERE seq > COALESCE((SELECT CAST(value AS "
                "INTEGER) FROM meta WHERE key = 'sync_ack_seq'), 0) AND seq NOT IN "
                "(SELECT seq FROM quarantine) ORDER BY seq LIMIT 20"
            ).fetchall()
        for (created_at,) in rows:
            try:
                return parse_timestamp(str(created_at))
            except (ValueError, TypeError):
                continue
        return None

    # --- quarantine ------------------------------------------------------------------------

    def quarantine_scan(self) -> list[QuarantinedRecord]:
        """Verify every record the clearing host does not yet hold (after the acknowledged
        seq, not yet quarantined: parse, terminal, hash, signature) and quarantine each that
        fails; returns every quarantined record, old and new, and logs them (an error naming
        terminal, seq and what failed). The agent runs this when it opens its data directory,
        so it says at start which records it has set aside. Acknowledged records are the
        host's evidence already; re-checking them would make every start cost the whole
        history, so :meth:`verify` (``records verify``) is the full check."""
        after = self.acknowledged_seq()
        while True:
            with self._read("read records to check") as conn:
                rows: list[RecordRow] = conn.execute(
                    _SELECT_UNCHECKED_RECORDS, (after, _PAGE_SIZE)
                ).fetchall()
            for row in rows:
                _, problem = self._checked(row)
                if problem:
                    self._quarantine_found(row[0], problem)
            if len(rows) < _PAGE_SIZE:
                break
            after = rows[-1][0]
        held = self.quarantined()
        if held:
            log.error(
                "store holds quarantined records; they are kept, skipped by lookups and "
                "reported to the clearing host",
                terminal_id=self._terminal_id,
                seqs=[q.seq for q in held],
            )
        return held

    def quarantined(self) -> list[QuarantinedRecord]:
        """Every quarantined record, by seq."""
        with self._read("list quarantined records") as conn:
            rows = conn.execute(
                "SELECT seq, quarantined_at, reason, notice FROM quarantine ORDER BY seq"
            ).fetchall()
        return [_quarantined_from_row(row) for row in rows]

    def count_quarantined(self) -> int:
        with self._read("count quarantined records") as conn:
            (count,) = conn.execute("SELECT COUNT(*) FROM quarantine").fetchone()
        return int(count)

    def _seal_problem(self, record: Record, conn: sqlite3.Connection | None = None) -> str | None:
        """What is wrong with a parsed record's seal, or ``None`` (it verifies)."""
        if record.terminal_id != self._terminal_id:
            return f"it names terminal {record.terminal_id!r}, not this store's"
        if hash_hex(record.canonical_bytes()) != record.hash:
            return "its content does not match its hash"
        signature, digest = bytes.fromhex(record.signature), bytes.fromhex(record.hash)
        if self._epochs is not None and self._epochs.verifier(record.seq)(signature, digest):
            return None
        # first use, or the key was rotated by another process since: read the keys again
        # (inside a transaction already, ``conn``: from it, never taking the lock twice)
        self._epochs = self.key_epochs() if conn is None else _key_epochs(_read_meta(conn))
        if not self._epochs.verifier(record.seq)(signature, digest):
            return "its signature does not verify under the device key"
        return None

    def key_epochs(self) -> KeyEpochs:
        """Which device key signs which records, from meta (``key_history`` after a rotation,
        else the one ``public_key``)."""
        with self._read("read the device public keys") as conn:
            meta = _read_meta(conn)
        return _key_epochs(meta)

    def rotate_key(self, new_key: DeviceKey) -> int:
        """Sign every record from the next one on with ``new_key``; returns the first seq it
        signs (the cut-over). One transaction: the key history in meta gains the new key from
        ``last_seq + 1``, ``public_key`` becomes it; earlier records stay verifiable under
        their own key. Repeating the rotation to the same key changes nothing. Only the
        process that signs taps (the agent, at start) may call this: another handle still
        holding the old key is refused at its next append (it must reopen)."""
        if self._key is None:
            raise StoreError(f"store: {self._path} is open for reading only")
        new_hex = new_key.public_key_bytes.hex()
        with self._write("rotate the device key") as conn:
            meta = _read_meta(conn)
            history = _key_history(meta)
            if history[-1][1] == new_hex:
                first = history[-1][0]
            else:
                if _meta_text(meta, "public_key") != self._key.public_key_bytes.hex():
                    raise StoreError(
                        f"store: cannot rotate from key {self._key.key_id}: the store is "
                        f"signed by {_stored_key_id(_meta_text(meta, 'public_key'))} now"
                    )
                first = _meta_int(meta, "last_seq") + 1
                history.append((first, new_hex))
                conn.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('key_history', ?)",
                    (json.dumps(history),),
                )
                conn.execute("UPDATE meta SET value = ? WHERE key = 'public_key'", (new_hex,))
        log.warning(
            "device key rotated: records from the cut-over on are signed with the new key",
            old_key_id=self._key.key_id,
            new_key_id=new_key.key_id,
            first_seq=first,
        )
        self._key, self._epochs = new_key, None
        return first

    def _checked(self, row: RecordRow) -> tuple[Record | None, str]:
        """The row as a verified record, or ``None`` and what failed."""
        try:
            record = _record_from_row(row)
        except (ValueError, TypeError) as exc:
            return None, f"unparsable: {exc}"
        problem = self._seal_problem(record)
        return (None, problem) if problem else (record, "")

    def _quarantine_found(self, seq: int, problem: str) -> QuarantinedRecord | None:
        """Quarantine record ``seq`` (found not to verify: ``problem``); ``None`` on a store
        open for reading only (nothing is written, the caller skips the record)."""
        if self._key is None:
            log.error(
                "record does not verify (not quarantined: store open for reading only)",
                terminal_id=self._terminal_id,
                seq=seq,
                problem=problem,
            )
            return None
        with self._write(f"quarantine record {seq}") as conn:
            known = conn.execute(
                "SELECT seq, quarantined_at, reason, notice FROM quarantine WHERE seq = ?",
                (seq,),
            ).fetchone()
            if known is not None:  # another process (agent or daemon) got there first
                return _quarantined_from_row(known)
            row = conn.execute(_SELECT_RECORD, (seq,)).fetchone()
            if row is None:
                raise StoreError(f"store: cannot quarantine record {seq}: it is gone")
            notice = seal_notice(
                seq=seq,
                terminal_id=self._terminal_id,
                quarantined_at=format_timestamp(self._clock()),
                reason=problem,
                chain_hash=self._chain_hash(conn, seq, row),
                raw=canonical_json(dict(zip(RECORD_COLUMNS, row, strict=True))).encode("utf-8"),
                sign=self._key.sign,
            )
            conn.execute(
                _COPY_TO_QUARANTINE,
                (notice.quarantined_at, problem, notice.chain_hash, notice_to_json(notice), seq),
            )
        log.error(
            "record quarantined: its stored content does not verify; kept verbatim, skipped "
            "by lookups, reported to the clearing host",
            terminal_id=self._terminal_id,
            seq=seq,
            problem=problem,
            chain_hash=notice.chain_hash,
        )
        return QuarantinedRecord(seq, notice.quarantined_at, problem, notice)

    def _chain_hash(self, conn: sqlite3.Connection, seq: int, row: RecordRow) -> str:
        """The hash record ``seq`` had when it was written: what the next record chains onto.

        Rule: the ``prev_hash`` of record ``seq + 1`` if that record verifies (its seal covers
        it); else, for the newest record, the store's ``last_hash`` (written with it); else the
        stored hash column if it is well formed; else zeros. In the last two cases the next
        record is quarantined too or missing, and a notice's own link is never checked.
        """
        following = conn.execute(_SELECT_RECORD, (seq + 1,)).fetchone()
        if following is not None:
            try:
                record = _record_from_row(following)
            except (ValueError, TypeError):
                record = None
            if record is not None and self._seal_problem(record, conn) is None:
                return record.prev_hash
        meta = _read_meta(conn)
        if _meta_int(meta, "last_seq") == seq:
            return _meta_text(meta, "last_hash")
        stored = row[8]
        if isinstance(stored, str) and len(stored) == 64 and stored == stored.lower():
            try:
                bytes.fromhex(stored)
                return stored
            except ValueError:
                pass
        return GENESIS_HASH

    @staticmethod
    def _notices(conn: sqlite3.Connection, after: int, through: int) -> dict[int, QuarantineNotice]:
        rows = conn.execute(
            "SELECT seq, quarantined_at, reason, notice FROM quarantine WHERE seq > ? AND seq <= ?",
            (after, through),
        ).fetchall()
        return {int(row[0]): _quarantined_from_row(row).notice for row in rows}

    def mark_acknowledged(self, through_seq: int) -> int:
        """Record the host's cumulative acknowledgement; returns the stored value.

        An acknowledgement below the stored one is ignored (it never moves back); one beyond
        ``last_seq`` is refused: the host claims records this terminal never wrote.
        """
        if through_seq < 0:
            raise ValueError("acknowledged seq must not be negative")
        with self._write(f"mark records through {through_seq} acknowledged") as conn:
            last_seq = _meta_int(_read_meta(conn), "last_seq")
            if through_seq > last_seq:
                raise StoreError(
                    f"store: acknowledgement {through_seq} is beyond the last record {last_seq}"
                )
            row = conn.execute("SELECT value FROM meta WHERE key = 'sync_ack_seq'").fetchone()
            current = _ack_value(row)
            if through_seq > current:
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('sync_ack_seq', ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (str(through_seq),),
                )
                current = through_seq
        return current

    def compact(self, through_seq: int, *, created_before: datetime | None = None) -> int:
        """Delete acknowledged records with ``seq <= through_seq`` (a prefix of the chain).

        With ``created_before``, the prefix stops at the first record created at or after it, so
        recent records stay for the double-tap check. The chain anchor moves to the last deleted
        record in the same transaction, so :meth:`verify` still passes. Returns the new anchor
        seq (unchanged if nothing was deleted).
        """
        with self._write(f"compact records through {through_seq}") as conn:
            meta = _read_meta(conn)
            anchor = _meta_int(meta, "chain_anchor_seq")
            limit = min(through_seq, _ack_value((meta.get("sync_ack_seq", "0"),)))
            if created_before is not None:
                row = conn.execute(
                    "SELECT MIN(seq) FROM records WHERE seq > ? AND created_at >= ?",
                    (anchor, format_timestamp(created_before)),
                ).fetchone()
                if row[0] is not None:
                    limit = min(limit, int(row[0]) - 1)
            if limit <= anchor:
                return anchor
            # a quarantined record's hash column may be the corruption: the anchor takes the
            # hash the next record chains onto
            row = conn.execute(
                "SELECT COALESCE((SELECT chain_hash FROM quarantine WHERE seq = ?), "
                "(SELECT hash FROM records WHERE seq = ?))",
                (limit, limit),
            ).fetchone()
            if row is None or row[0] is None:
                raise StoreError(f"store: cannot compact through {limit}: record is missing")
            conn.execute("DELETE FROM records WHERE seq <= ?", (limit,))
            conn.executemany(
                "UPDATE meta SET value = ? WHERE key = ?",
                ((str(limit), "chain_anchor_seq"), (str(row[0]), "chain_anchor_hash")),
            )
        log.info("records compacted", through_seq=limit, previous_anchor=anchor)
        return limit

    def file_size(self) -> int:
        """Bytes on disk of the store file plus its WAL (for health reports)."""
        total = 0
        for suffix in ("", "-wal"):
            try:
                total += Path(f"{self._path}{suffix}").stat().st_size
            except OSError:
                continue
        return total

    def verify(self, progress: Callable[[int, int], None] | None = None) -> VerifyReport:
        """Verify the stored chain against the meta anchor, last sequence and last hash.

        Records appended while verifying are left for the next run. ``progress(done, total)``
        is called after each page of records.
        """
        with self._read("read the chain state") as conn:
            meta = _read_meta(conn)
        last_seq = _meta_int(meta, "last_seq")
        checker = ChainChecker(
            _key_epochs(meta),
            anchor_seq=_meta_int(meta, "chain_anchor_seq"),
            anchor_hash=_meta_text(meta, "chain_anchor_hash"),
        )
        after = -1
        after_anchor = _meta_int(meta, "chain_anchor_seq")
        while True:
            with self._read("read records for verification") as conn:
                rows: list[RecordRow] = conn.execute(
                    _SELECT_RECORDS_BETWEEN, (after, last_seq, _PAGE_SIZE)
                ).fetchall()
                notices = self._notices(conn, after, rows[-1][0] if rows else after)
            for row in rows:
                notice = notices.get(row[0])
                if notice is not None:
                    checker.quarantined(row[0], notice.reason, notice.chain_hash)
                    continue
                try:
                    record = _record_from_row(row)
                except (ValueError, TypeError) as exc:
                    checker.unreadable(row[0], str(exc))
                else:
                    checker.check(record)
            if progress is not None and rows:
                progress(rows[-1][0] - after_anchor, last_seq - after_anchor)
            if len(rows) < _PAGE_SIZE:
                break
            after = rows[-1][0]
        with self._read("look for records beyond the last sequence") as conn:
            beyond_first, beyond_last, current_last = conn.execute(
                "SELECT MIN(seq), MAX(seq), (SELECT value FROM meta WHERE key = 'last_seq') "
                "FROM records WHERE seq > (SELECT CAST(value AS INTEGER) FROM meta "
                "WHERE key = 'last_seq')"
            ).fetchone()
        if beyond_first is not None:
            span = (
                f"record {beyond_first}"
                if beyond_first == beyond_last
                else f"records {beyond_first}..{beyond_last}"
            )
            checker.problem(f"{span} beyond the store's last sequence {current_last}")
        return checker.finish(
            expected_last_seq=last_seq, expected_last_hash=_meta_text(meta, "last_hash")
        )

    def integrity_check(self) -> str:
        """SQLite's ``PRAGMA integrity_check``: ``"ok"`` or the problems, one per line."""
        with self._read("check database integrity") as conn:
            rows = conn.execute("PRAGMA integrity_check").fetchall()
        return "\n".join(str(row[0]) for row in rows)

    def durability_settings(self) -> dict[str, str | int]:
        """The connection's journal mode, synchronous level, busy timeout and foreign keys."""
        with self._read("read connection settings") as conn:
            return {
                "journal_mode": str(conn.execute("PRAGMA journal_mode").fetchone()[0]),
                "synchronous": int(conn.execute("PRAGMA synchronous").fetchone()[0]),
                "busy_timeout": int(conn.execute("PRAGMA busy_timeout").fetchone()[0]),
                "foreign_keys": int(conn.execute("PRAGMA foreign_keys").fetchone()[0]),
            }

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"OfflineStore({str(self._path)!r}, terminal_id={self._terminal_id!r}, "
            f"key_id={self._key.key_id if self._key else None!r})"
        )

    @contextmanager
    def _write(self, action: str) -> Iterator[sqlite3.Connection]:
        with self._lock, _translated(action), atomic(self._conn) as conn:
            yield conn

    @contextmanager
    def _read(self, action: str) -> Iterator[sqlite3.Connection]:
        with self._lock, _translated(action):
            yield self._conn

    def _configure(self) -> None:
        conn = self._conn
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        self._db.enable_wal()
        if self._db.journal_mode != "wal":
            raise StoreError(f"store: {self._path} cannot use WAL journaling")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")

    def _prepare_schema(self) -> tuple[int, dict[str, str]]:
        """Create or migrate the schema and claim the store; returns the version found and meta."""
        with atomic(self._conn):
            found_version = self._schema_version()
            if found_version > SCHEMA_VERSION:
                raise StoreError(
                    f"store: {self._path} has schema version {found_version}, newer than "
                    f"this agent understands ({SCHEMA_VERSION})"
                )
            for migrate in _MIGRATIONS[found_version:]:
                migrate(self._db)
            if found_version != SCHEMA_VERSION:
                self._db.table("meta").upsert(
                    {"key": "schema_version", "value": str(SCHEMA_VERSION)}, pk="key"
                )
            meta = _read_meta(self._conn)
            assert self._key is not None, "only open() prepares the schema"
            self._claim_or_check("public_key", self._key.public_key_bytes.hex(), meta)
            self._claim_or_check("terminal_id", self._terminal_id, meta)
        return found_version, meta

    def _schema_version(self) -> int:
        if not self._db.table("meta").exists():
            return 0
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None:
            raise StoreError(f"store: {self._path} has a meta table but no schema version")
        try:
            return int(row[0])
        except ValueError as exc:
            raise StoreError(f"store: {self._path} has a corrupt schema version") from exc

    def _claim_or_check(self, key: str, value: str, meta: dict[str, str]) -> None:
        stored = meta.get(key)
        if stored is None:
            self._conn.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (key, value))
            meta[key] = value
        elif stored != value:
            if key == "public_key":
                mine = self._key.key_id if self._key else "?"
                raise StoreError(
                    f"store: {self._path} belongs to device key {_stored_key_id(stored)}, "
                    f"not {mine}; refusing to open it"
                )
            raise StoreError(
                f"store: {self._path} belongs to {key} {stored!r}, not {value!r}; "
                "refusing to open it"
            )

    def _take_intent(
        self, conn: sqlite3.Connection, intent_id: int, expected_card_id: str | None
    ) -> str:
        row = conn.execute("SELECT card_id FROM intents WHERE id = ?", (intent_id,)).fetchone()
        if row is None:
            raise IntentNotFoundError(
                f"store: intent {intent_id} does not exist (already finalized, voided or expired)"
            )
        card_id = str(row[0])
        if expected_card_id is not None and card_id != expected_card_id:
            raise ValueError(
                f"intent {intent_id} is for card {card_id!r}, the record for card "
                f"{expected_card_id!r}"
            )
        conn.execute("DELETE FROM intents WHERE id = ?", (intent_id,))
        return card_id

    def _append_in_transaction(self, conn: sqlite3.Connection, body: RecordBody) -> Record:
        if self._key is None:
            raise StoreError(f"store: {self._path} is open for reading only")
        chain = dict(
            conn.execute(
                "SELECT key, value FROM meta WHERE key IN ('last_seq', 'last_hash', 'public_key')"
            ).fetchall()
        )
        if chain.get("public_key") != self._key.public_key_bytes.hex():
            # the device key was rotated (rotate_key, by the agent) since this handle opened:
            # a record signed with the old key after the cut-over would be refused by the host
            raise StoreError(
                f"store: the device key of {self._path} is now "
                f"{_stored_key_id(chain.get('public_key', ''))}, not {self._key.key_id} (a key "
                "rotation): reopen the store with the new key; nothing was written"
            )
        if self._stamp is None:
            when = self._clock()
        else:
            when, extra = self._stamp()
            body = RecordBody(body.kind, body.card_id, body.amount, {**body.fields, **extra})
        record = seal_record(
            seq=_meta_int(chain, "last_seq") + 1,
            created_at=format_timestamp(when),
            terminal_id=self._terminal_id,
            body=body,
            prev_hash=_meta_text(chain, "last_hash"),
            sign=self._key.sign,
        )
        conn.execute(
            _INSERT_RECORD,
            (
                record.seq,
                record.created_at,
                record.terminal_id,
                record.kind,
                record.card_id,
                record.amount,
                canonical_json(record.fields),
                record.prev_hash,
                record.hash,
                record.signature,
            ),
        )
        conn.executemany(
            "UPDATE meta SET value = ? WHERE key = ?",
            ((str(record.seq), "last_seq"), (record.hash, "last_hash")),
        )
        # the clock guard's floor after compaction has removed the records themselves
        conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('last_created_at', ?)",
            (record.created_at,),
        )
        return record


@contextmanager
def _translated(action: str) -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as exc:
        raise StoreError(f"store: could not {action}: {exc}") from exc


def _read_meta(conn: sqlite3.Connection) -> dict[str, str]:
    return dict(conn.execute("SELECT key, value FROM meta").fetchall())


def _meta_int(meta: Mapping[str, str], key: str) -> int:
    try:
        return int(meta[key])
    except (KeyError, ValueError) as exc:
        raise StoreError(f"store: meta {key} is missing or corrupt") from exc


def _key_history(meta: Mapping[str, str]) -> list[tuple[int, str]]:
    """``[(first seq, public key hex), ...]``: meta ``key_history`` (a JSON list, written by
    :meth:`OfflineStore.rotate_key`), else the one ``public_key`` from the start."""
    raw = meta.get("key_history")
    if raw is None:
        return [(0, _meta_text(meta, "public_key"))]
    try:
        history = [(int(first), str(key)) for first, key in json.loads(raw)]
    except (ValueError, TypeError) as exc:
        raise StoreError(f"store: meta key_history is corrupt: {exc}") from exc
    if not history or history[-1][1] != meta.get("public_key"):
        raise StoreError("store: meta key_history does not end with the store's public_key")
    return history


def _key_epochs(meta: Mapping[str, str]) -> KeyEpochs:
    try:
        return KeyEpochs([(first, bytes.fromhex(key)) for first, key in _key_history(meta)])
    except ValueError as exc:
        raise StoreError(f"store: meta public_key is corrupt: {exc}") from exc


def _meta_text(meta: Mapping[str, str], key: str) -> str:
    value = meta.get(key)
    if value is None:
        raise StoreError(f"store: meta {key} is missing")
    return value


def _ack_value(row: tuple[Any, ...] | None) -> int:
    if row is None:
        return 0
    try:
        return int(row[0])
    except (TypeError, ValueError) as exc:
        raise StoreError("store: meta sync_ack_seq is corrupt") from exc


def _stored_key_id(public_key_hex: str) -> str:
    try:
        return key_id_for(bytes.fromhex(public_key_hex))
    except ValueError:
        return "(unreadable)"


def _intent_from_row(row: tuple[int, str, str, str, str]) -> Intent:
    intent_id, card_id, product, created_at, payload = row
    try:
        decoded = json.loads(payload)
        if not isinstance(decoded, dict):
            raise TypeError("payload is not a JSON object")
        return Intent(intent_id, card_id, product, parse_timestamp(created_at), decoded)
    except (ValueError, TypeError, RecursionError) as exc:
        raise StoreError(f"store: intent {intent_id} is unreadable: {exc}") from exc


def _record_from_row(row: RecordRow) -> Record:
    (
        seq,
        created_at,
        terminal_id,
        kind,
        card_id,
        amount,
        fields_json,
        prev_hash,
        hash_,
        signature,
    ) = row
    try:
        fields = json.loads(fields_json)
    except RecursionError as exc:
        raise ValueError("fields are nested too deeply") from exc
    if not isinstance(fields, dict):
        raise TypeError("fields are not a JSON object")
    return Record(
        seq=seq,
        created_at=created_at,
        terminal_id=terminal_id,
        kind=kind,
        card_id=card_id,
        amount=amount,
        fields=fields,
        prev_hash=prev_hash,
        hash=hash_,
        signature=signature,
    )


def _quarantined_from_row(row: tuple[Any, ...]) -> QuarantinedRecord:
    seq, quarantined_at, reason, notice_json = row
    try:
        notice = entry_from_json(str(notice_json))
    except (ValueError, TypeError) as exc:
        raise StoreError(
            f"store: the quarantine notice of record {seq} is unreadable: {exc}"
        ) from exc
    if not isinstance(notice, QuarantineNotice):
        raise StoreError(f"store: the quarantine entry of record {seq} holds no notice")
    return QuarantinedRecord(int(seq), str(quarantined_at), str(reason), notice)


def _record_from_row_or_raise(row: RecordRow) -> Record:
    try:
        return _record_from_row(row)
    except (ValueError, TypeError) as exc:
        raise StoreError(f"store: record {row[0]} is unreadable: {exc}") from exc
