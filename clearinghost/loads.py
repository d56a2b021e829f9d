"""Online load authorisation at the clearing host (圈存, cpu-purse.md §6.4).

A kiosk asks the host to authorise a load with the card's MAC1; the host checks MAC1 with the
card's load key (diversified from the load master inside the key store), takes the money from
the payment source, answers MAC2 and records the load, all in one database transaction (SQLite
or PostgreSQL). The kiosk's ``load_key`` makes it idempotent: the same key and request give the
same MAC2, never a second authorisation.

Payment sources: ``cash`` the kiosk declares accepted; a ``voucher`` (他充: a code issued by an
operator, redeemed once); a ``pending`` load (funds credited at the host for one card by
someone else: an employer, a group purchase, an online payment, or a POS refund, loadable
exactly once at any kiosk). A voucher or pending load is claimed by a conditional update
(``… WHERE load_key IS NULL``): of two kiosks racing for it exactly one wins, on SQLite and on
PostgreSQL; a load proven not credited gives it back.

Never a double load. One MAC2 fits one INITIALIZE FOR LOAD (its random and online counter), and
at most one load per card and online counter can ever be credited. The host authorises nothing
for a card while an earlier load of that card is open unless the new, MAC1-verified request
proves what became of it:

* the online counter one higher with the balance raised by the open load's amount: that load
  was credited (state ``credited``, its TAC still owed);
* the same online counter: the open load was not credited *so far*. That closes it only when
  its kiosk can no longer credit: the load is ``unknown`` (its kiosk gave up on it) or was asked
  for by the same kiosk (which drives one card at a time). An ``authorised`` load of another
  kiosk may still be credited there (its INITIALIZE may have come after this one): the new
  request is refused ``load_in_progress`` until that kiosk reports;
* anything else: ``load_unresolved``, an operator decides.

States: authorised → completed | tac_mismatch | not_credited | unknown | credited. Unresolved
(the money held, shown to the operator: ``GET /v1/loads?state=unresolved``, ``cardhost loads
list --unresolved``): authorised, unknown, tac_mismatch. The host's reconciliation closes them
when the card's proof arrives (the kiosk's completion with the TAC from GET TRANSACTION PROVE),
when the kiosk's signed ``load`` record arrives through sync, or when the card's next
MAC1-verified INITIALIZE FOR LOAD shows its online counter.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import psycopg
import structlog

from agent.crypto import Algorithm
from clearinghost.keystore import CardKeyRef, KeyStore
from clearinghost.storage import PgTx, SqliteTx

log = structlog.get_logger("clearinghost.loads")
LOAD_TYPE = 0x02  # transaction type of an EP load, §3.10 (MAC1, MAC2 and TAC cover it, §5.7)
OPEN_STATES = ("authorised", "unknown")
UNRESOLVED_STATES = ("authorised", "unknown", "tac_mismatch")
STATES = ("authorised", "completed", "tac_mismatch", "not_credited", "unknown", "credited")
LOAD_KEY = re.compile(r"[A-Za-z0-9._-]{1,128}")  # it is a path segment of the completion route
CODE = re.compile(r"[A-Za-z0-9-]{4,64}")  # voucher codes and pending-load ids
ASN = re.compile(r"[0-9A-F]{16}")
MAX_AMOUNT = 0x7FFFFFFF

Row = tuple[Any, ...]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS loads (
    load_key TEXT PRIMARY KEY,
    terminal_id TEXT NOT NULL,
    asn TEXT NOT NULL,
    factors TEXT NOT NULL,
    algorithm INTEGER NOT NULL,
    counter INTEGER NOT NULL,
    random TEXT NOT NULL,
    mac1 TEXT NOT NULL,
    balance_before BIGINT NOT NULL,
    amount BIGINT NOT NULL,
    terminal TEXT NOT NULL,
    datetime TEXT NOT NULL,
    payment TEXT NOT NULL,
    voucher TEXT,
    mac2 TEXT NOT NULL,
    state TEXT NOT NULL,
    tac TEXT,
    detail TEXT NOT NULL DEFAULT '',
    pending_id TEXT,
    created_at DOUBLE PRECISION NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS loads_by_card ON loads (asn, state);
CREATE TABLE IF NOT EXISTS vouchers (
    code TEXT PRIMARY KEY,
    amount BIGINT NOT NULL,
    load_key TEXT,
    issued_by TEXT NOT NULL DEFAULT '',
    issued_at DOUBLE PRECISION NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS pending_loads (
    id TEXT PRIMARY KEY,
    asn TEXT NOT NULL,
    amount BIGINT NOT NULL,
    source TEXT NOT NULL,
    reference TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    load_key TEXT
);
CREATE INDEX IF NOT EXISTS pending_by_card ON pending_loads (asn, load_key)
"""
# Columns added after the first release of the loads file (SQLite files made before them).
_ADDED_COLUMNS = (
    ("loads", "pending_id", "TEXT"),
    ("loads", "created_at", "DOUBLE PRECISION NOT NULL DEFAULT 0"),
    ("vouchers", "issued_by", "TEXT NOT NULL DEFAULT ''"),
    ("vouchers", "issued_at", "DOUBLE PRECISION NOT NULL DEFAULT 0"),
)
# fare: a fare refund or an unfinished trip's correction (clearinghost.fare_refunds)
PENDING_SOURCES = ("employer", "group", "online", "refund", "fare", "other")


class LoadRefused(Exception):
    """The host refuses a load; ``reason`` is a stable code (``bad_mac1``, ``voucher_used``, …)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class LoadStoreFailure(Exception):
    """The loads database failed (SQLite or PostgreSQL): nothing was authorised or changed."""


class _Retry(Exception):
    """A concurrent transaction inserted the same key first: run the request again."""


# --- the database: SQLite or PostgreSQL ------------------------------------------------------


class _Tx(Protocol):
    def run(self, sql: str, params: Sequence[Any] = ()) -> int: ...
    def one(self, sql: str, params: Sequence[Any] = ()) -> Row | None: ...
    def all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]: ...


class _Database(Protocol):
    where: str

    def transaction(self, card: str | None = None) -> Any: ...
    def close(self) -> None: ...


class _SqliteDatabase:
    """One file, WAL, ``synchronous=FULL``; ``BEGIN IMMEDIATE`` serialises writers, also those
    of other host processes on the same file."""

    def __init__(self, path: Path) -> None:
        self.where = str(path)
        self._lock = threading.Lock()
        try:
            self._conn = sqlite3.connect(
                path, isolation_level=None, timeout=30, check_same_thread=False
            )
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.executescript(_SCHEMA)
            for table, column, decl in _ADDED_COLUMNS:
                have = {r[1] for r in self._conn.execute(f"PRAGMA table_info({table})")}
                if column not in have:
                    self._conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
        except sqlite3.Error as exc:
            raise LoadStoreFailure(f"loads database {path}: cannot open: {exc}") from exc

    @contextmanager
    def transaction(self, card: str | None = None) -> Iterator[_Tx]:
        del card  # the whole file is locked by BEGIN IMMEDIATE
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield SqliteTx(self._conn)
                    self._conn.execute("COMMIT")
                except BaseException:
                    if self._conn.in_transaction:
                        self._conn.execute("ROLLBACK")
                    raise
            except sqlite3.IntegrityError as exc:
                raise _Retry(str(exc)) from exc
            except sqlite3.Error as exc:
                raise LoadStoreFailure(f"loads database {self.where}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class _PostgresDatabase:
    """PostgreSQL (psycopg 3). Requests for one card are serialised across host processes by a
    transaction-scoped advisory lock on the card; claims of vouchers and pending loads are
    conditional updates, which READ COMMITTED re-checks after a concurrent commit."""

    def __init__(self, dsn: str) -> None:
        self.where = "PostgreSQL"
        self._lock = threading.Lock()
        try:
            self._conn = psycopg.connect(dsn, autocommit=False)
            with self.transaction() as tx:
                tx.run("SELECT pg_advisory_xact_lock(7355609)")  # one schema creator at a time
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        tx.run(statement)
        except psycopg.Error as exc:
            raise LoadStoreFailure(f"loads database: cannot open PostgreSQL: {exc}") from exc

    @contextmanager
    def transaction(self, card: str | None = None) -> Iterator[_Tx]:
        with self._lock:
            try:
                with self._conn.transaction(), self._conn.cursor() as cur:
                    tx = PgTx(cur)
                    if card is not None:
                        digest = hashlib.sha256(b"cardhost-load-card\n" + card.encode()).digest()
                        lock_id = int.from_bytes(digest[:8], "big", signed=True)
                        tx.run("SELECT pg_advisory_xact_lock(?)", (lock_id,))
                    yield tx
            except psycopg.errors.UniqueViolation as exc:
                raise _Retry(str(exc)) from exc
            except psycopg.Error as exc:
                raise LoadStoreFailure(f"loads database: PostgreSQL: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _open_database(location: Path | str) -> _Database:
    """A path (SQLite) or a PostgreSQL DSN (``postgresql://…`` or ``host=… dbname=…``)."""
    text = str(location)
    if text.startswith(("postgresql://", "postgres://", "host=")):
        return _PostgresDatabase(text)
    return _SqliteDatabase(Path(text.removeprefix("sqlite:///")))


# --- views ---------------------------------------------------------------------------------

_SELECT_LOAD = (
    "SELECT load_key, asn, amount, counter, state, mac2, tac, detail, terminal_id, payment,"
    " pending_id, voucher FROM loads"
)


@dataclass(frozen=True, slots=True)
class LoadView:
    load_key: str
    asn: str
    amount: int
    counter: int
    state: str
    mac2: str
    tac: str | None
    detail: str
    terminal_id: str = ""
    payment: str = ""
    pending_id: str | None = None
    voucher: str | None = None

    @property
    def unresolved(self) -> bool:
        """The outcome is not known yet: the money stays held."""
        return self.state in UNRESOLVED_STATES

    def to_json(self) -> dict[str, Any]:
        return {
            "load_key": self.load_key,
            "asn": self.asn,
            "amount": self.amount,
            "counter": self.counter,
            "state": self.state,
            "mac2": self.mac2,
            "tac": self.tac,
            "detail": self.detail,
            "terminal_id": self.terminal_id,
            "payment": self.payment,
            "unresolved": self.unresolved,
        }


@dataclass(frozen=True, slots=True)
class PendingLoad:
    """Funds credited at the host for one card, loadable once at any kiosk."""

    id: str
    asn: str
    amount: int
    source: str
    reference: str
    created_by: str
    load_key: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "asn": self.asn,
            "amount": self.amount,
            "source": self.source,
            "reference": self.reference,
            "created_by": self.created_by,
            "load_key": self.load_key,
        }


_SELECT_PENDING = (
    "SELECT id, asn, amount, source, reference, created_by, load_key FROM pending_loads"
)


def _hex(request: Mapping[str, Any], name: str, length: int) -> bytes:
    value = request.get(name)
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != length:
        raise LoadRefused("bad_request", f"{name} must be {length} bytes of hex")
    return raw


def _int(request: Mapping[str, Any], name: str, top: int) -> int:
    value = request.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
        raise LoadRefused("bad_request", f"{name} must be an integer 0..{top}")
    return value


@dataclass(frozen=True, slots=True)
class _Request:
    """A load request, checked field by field (every bad field named)."""

    key: str
    asn: bytes
    factors: tuple[bytes, ...]
    algorithm: Algorithm
    key_index: int
    counter: int
    balance: int
    amount: int
    random4: bytes
    mac1: bytes
    terminal: bytes
    when: bytes
    payment: Mapping[str, Any]

    @classmethod
    def parse(cls, request: Mapping[str, Any]) -> _Request:
        key = request.get("load_key")
        if not isinstance(key, str) or LOAD_KEY.fullmatch(key) is None:
            raise LoadRefused("bad_request", "load_key must be 1..128 of A-Z a-z 0-9 . _ -")
        asn = _hex(request, "asn", 8)
        factors_raw = request.get("factors")
        if not isinstance(factors_raw, list | tuple) or not 1 <= len(factors_raw) <= 3:
            raise LoadRefused("bad_request", "factors must be a list of 1..3 hex factors")
        factors = tuple(_hex({"factor": f}, "factor", 8) for f in factors_raw)
        if factors[0] != asn:
            raise LoadRefused("bad_request", "the first factor must be the card's ASN")
        try:
            algorithm = Algorithm(_int(request, "algorithm", 0xFF))
        except ValueError as exc:
            raise LoadRefused("bad_request", "algorithm must be 0 (3DES) or 4 (SM4)") from exc
        payment = request.get("payment")
        if not isinstance(payment, Mapping):
            raise LoadRefused("bad_request", "payment must be an object")
        return cls(
            key=key,
            asn=asn,
            factors=factors,
            algorithm=algorithm,
            key_index=_int(request, "key_index", 0xFF),
            counter=_int(request, "counter", 0xFFFF),
            balance=_int(request, "balance", MAX_AMOUNT),
            amount=_int(request, "amount", MAX_AMOUNT),
            random4=_hex(request, "random", 4),
            mac1=_hex(request, "mac1", 4),
            terminal=_hex(request, "terminal", 6),
            when=_hex(request, "datetime", 7),
            payment=payment,
        )

    @property
    def asn_hex(self) -> str:
        return self.asn.hex().upper()


class LoadAuthority:
    """Authorises, records and completes loads; one database (SQLite or PostgreSQL), one key
    store. ``issuers``: hex prefixes of the card's issuer factor (the second factor: T-Union
    EF15[0..7], CJ/T 166 city code ‖ FF0000000000) this host loads; empty: any card whose load
    key it holds. ``max_balance``: the purse limit (the profile's ``terminal.max_balance``)."""

    def __init__(
        self,
        location: Path | str,
        keystore: KeyStore,
        *,
        max_balance: int,
        issuers: Sequence[str] = (),
        clock: Any = time.time,
    ) -> None:
        self.keystore = keystore
        self.max_balance = max_balance
        self.issuers = tuple(i.upper() for i in issuers)
        self.clock = clock
        self._db = _open_database(location)

    def close(self) -> None:
        self._db.close()

    def _transact(self, card: str | None, work: Any) -> Any:
        """Run ``work(tx)`` in one transaction; once more if a concurrent insert won a race
        (the second run sees the first's row: a replay, or a claim already taken)."""
        for attempt in (1, 2):
            try:
                with self._db.transaction(card) as tx:
                    return work(tx)
            except _Retry as exc:
                if attempt == 2:
                    raise LoadStoreFailure(f"loads database: conflict twice: {exc}") from exc
                log.info("load_transaction_retried", error=str(exc))
        raise AssertionError("unreachable")

    # -- vouchers and pending loads ----------------------------------------------------------

    def add_voucher(self, code: str, amount: int, by: str = "test") -> None:
        self.issue_vouchers(amount, 1, by, codes=[code])

    def issue_vouchers(
        self, amount: int, count: int, by: str, *, codes: Sequence[str] | None = None
    ) -> list[str]:
        """``count`` new voucher codes worth ``amount`` fen each (random unless given)."""
        if not 0 < amount <= MAX_AMOUNT:
            raise LoadRefused("bad_request", f"voucher amount must be 1..{MAX_AMOUNT} fen")
        if not 1 <= count <= 1000:
            raise LoadRefused("bad_request", "count must be 1..1000")
        chosen = list(codes) if codes is not None else [_new_code("V") for _ in range(count)]
        for code in chosen:
            if CODE.fullmatch(code) is None:
                raise LoadRefused("bad_request", "a voucher code is 4..64 of A-Z a-z 0-9 -")

        def work(tx: _Tx) -> list[str]:
            for code in chosen:
                if tx.one("SELECT 1 FROM vouchers WHERE code = ?", (code,)) is not None:
                    raise LoadRefused("voucher_exists", f"voucher {code} exists already")
                tx.run(
                    "INSERT INTO vouchers (code, amount, issued_by, issued_at) VALUES (?, ?, ?, ?)",
                    (code, amount, by, self.clock()),
                )
            return chosen

        issued: list[str] = self._transact(None, work)
        log.info("vouchers_issued", count=len(issued), amount=amount, by=by)
        return issued

    def vouchers(self) -> list[dict[str, Any]]:
        def work(tx: _Tx) -> list[Row]:
            return tx.all("SELECT code, amount, load_key, issued_by FROM vouchers ORDER BY code")

        rows: list[Row] = self._transact(None, work)
        return [{"code": r[0], "amount": r[1], "load_key": r[2], "issued_by": r[3]} for r in rows]

    def credit(
        self,
        asn: str,
        amount: int,
        source: str,
        by: str,
        *,
        reference: str = "",
        pending_id: str | None = None,
    ) -> PendingLoad:
        """A pending load for card ``asn``: funds credited at the host by someone else, loadable
        once at any kiosk. Idempotent by ``pending_id`` (a refund uses its terminal and seq)."""
        asn = asn.upper()
        if ASN.fullmatch(asn) is None:
            raise LoadRefused("bad_request", "card must be the 16 hex digits of its ASN")
        if not 0 < amount <= MAX_AMOUNT:
            raise LoadRefused("bad_request", f"amount must be 1..{MAX_AMOUNT} fen")
        if source not in PENDING_SOURCES:
            raise LoadRefused("bad_request", f"source must be one of {list(PENDING_SOURCES)}")
        if len(reference) > 200:
            raise LoadRefused("bad_request", "reference is at most 200 characters")
        ident = pending_id or _new_code("P")

        def work(tx: _Tx) -> tuple[Row, bool]:
            row = tx.one(_SELECT_PENDING + " WHERE id = ?", (ident,))
            if row is not None:
                if (row[1], row[2]) != (asn, amount):
                    raise LoadRefused("pending_exists", f"pending load {ident} is another credit")
                return row, False
            tx.run(
                "INSERT INTO pending_loads (id, asn, amount, source, reference, created_by,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (ident, asn, amount, source, reference, by, self.clock()),
            )
            found = tx.one(_SELECT_PENDING + " WHERE id = ?", (ident,))
            assert found is not None
            return found, True

        row, created = self._transact(None, work)
        if created:
            log.info(
                "pending_load_credited", id=ident, asn=asn, amount=amount, source=source, by=by
            )
        else:  # the same credit again (a re-uploaded record, a retried request): one credit
            log.debug("pending_load_exists", id=ident, asn=asn, amount=amount, source=source)
        return PendingLoad(*row)

    def pending_loads(self, asn: str | None = None, *, open_only: bool = True) -> list[PendingLoad]:
        """Pending loads (of one card), oldest first; ``open_only``: not yet claimed."""
        sql = _SELECT_PENDING
        clauses, params = [], []
        if asn is not None:
            clauses.append("asn = ?")
            params.append(asn.upper())
        if open_only:
            clauses.append("load_key IS NULL")
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)

        def work(tx: _Tx) -> list[Row]:
            return tx.all(sql + " ORDER BY created_at, id", params)

        rows: list[Row] = self._transact(None, work)
        return [PendingLoad(*r) for r in rows]

    # -- authorisation -------------------------------------------------------------------

    def authorise(self, terminal_id: str, request: Mapping[str, Any]) -> bytes:
        """MAC2 for a MAC1-verified, paid load; raises :class:`LoadRefused`."""
        parsed = _Request.parse(request)
        mac2: bytes = self._transact(
            parsed.asn_hex, lambda tx: self._authorise(tx, terminal_id, parsed)
        )
        return mac2

    def _authorise(self, tx: _Tx, terminal_id: str, r: _Request) -> bytes:
        row = tx.one(
            "SELECT asn, counter, random, mac1, amount, mac2, terminal_id FROM loads"
            " WHERE load_key = ?",
            (r.key,),
        )
        if row is not None:
            same = (row[0], row[1], row[2], row[3], row[4], row[6]) == (
                r.asn_hex,
                r.counter,
                r.random4.hex().upper(),
                r.mac1.hex().upper(),
                r.amount,
                terminal_id,
            )
            if not same:
                raise LoadRefused("load_key_reused", f"load {r.key} was a different request")
            # the kiosk's answer was lost (timeout, reset): the same MAC2, no second authorisation
            log.info("load_replayed", load_key=r.key)
            return bytes.fromhex(row[5])
        if self.issuers and (
            len(r.factors) < 2 or not r.factors[1].hex().upper().startswith(self.issuers)
        ):
            issuer = r.factors[1].hex().upper() if len(r.factors) > 1 else "none"
            raise LoadRefused(
                "not_loadable_here",
                f"card {r.asn_hex} of issuer {issuer} is not loadable at this host (it loads "
                f"issuers {', '.join(self.issuers)})",
            )
        ref = CardKeyRef("load", r.key_index, r.algorithm, r.factors)
        # Load MAC1 = MAC(SESLK, old balance ‖ amount ‖ type 02 ‖ terminal), §5.7
        mac1_data = (
            r.balance.to_bytes(4, "big")
            + r.amount.to_bytes(4, "big")
            + bytes((LOAD_TYPE,))
            + r.terminal
        )
        if not self.keystore.load_mac1_ok(ref, r.random4, r.counter, r.mac1, mac1_data):
            raise LoadRefused("bad_mac1", f"MAC1 of card {r.asn_hex} does not verify")
        if r.amount <= 0:
            raise LoadRefused("bad_amount", "load amount must be positive")
        if r.balance + r.amount > self.max_balance:
            raise LoadRefused(
                "balance_limit",
                f"card {r.asn_hex}: balance {r.balance} + {r.amount} would exceed the purse "
                f"limit {self.max_balance}",
            )
        self._settle_open(tx, terminal_id, r)
        voucher, pending = self._take_payment(tx, r)
        # Load MAC2 = MAC(SESLK, amount ‖ type 02 ‖ terminal ‖ date ‖ time), §5.7
        mac2_data = r.amount.to_bytes(4, "big") + bytes((LOAD_TYPE,)) + r.terminal + r.when
        mac2 = self.keystore.load_mac2(ref, r.random4, r.counter, mac2_data)
        tx.run(
            "INSERT INTO loads (load_key, terminal_id, asn, factors, algorithm, counter, random,"
            " mac1, balance_before, amount, terminal, datetime, payment, voucher, mac2, state,"
            " pending_id, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'authorised', ?, ?)",
            (
                r.key,
                terminal_id,
                r.asn_hex,
                ",".join(f.hex().upper() for f in r.factors),
                int(r.algorithm),
                r.counter,
                r.random4.hex().upper(),
                r.mac1.hex().upper(),
                r.balance,
                r.amount,
                r.terminal.hex().upper(),
                r.when.hex().upper(),
                str(r.payment.get("kind")),
                voucher,
                mac2.hex().upper(),
                pending,
                self.clock(),
            ),
        )
        log.info("load_authorised", load_key=r.key, asn=r.asn_hex, amount=r.amount)
        return mac2

    def _settle_open(self, tx: _Tx, terminal_id: str, r: _Request) -> None:
        """What a MAC1-verified INITIALIZE FOR LOAD proves about this card's open loads
        (the online counter, §3.4 response bytes 4..5; §6.5 counter semantics)."""
        rows = tx.all(
            "SELECT load_key, counter, balance_before, amount, state, terminal_id FROM loads"
            " WHERE asn = ? AND state IN ('authorised', 'unknown')",
            (r.asn_hex,),
        )
        for key, old_counter, old_balance, old_amount, state, old_terminal in rows:
            if r.counter == (old_counter + 1) & 0xFFFF and r.balance == old_balance + old_amount:
                self._set(tx, key, "credited", None, "card's online counter and balance moved")
            elif r.counter == old_counter and (state == "unknown" or old_terminal == terminal_id):
                self._set(tx, key, "not_credited", None, "card's online counter unchanged")
                self._release(tx, key)
            elif r.counter == old_counter:
                raise LoadRefused(
                    "load_in_progress",
                    f"card {r.asn_hex} has load {key} open at terminal {old_terminal}, which may "
                    "still credit it; retry when that kiosk has reported",
                )
            else:
                raise LoadRefused(
                    "load_unresolved",
                    f"load {key} of card {r.asn_hex} is unresolved (counter {old_counter}, now "
                    f"{r.counter}): an operator must settle it",
                )

    def _take_payment(self, tx: _Tx, r: _Request) -> tuple[str | None, str | None]:
        """(voucher code, pending-load id) claimed for load ``r.key``."""
        kind = r.payment.get("kind")
        if kind == "cash":
            cash = r.payment.get("amount")
            if isinstance(cash, bool) or not isinstance(cash, int) or cash != r.amount:
                raise LoadRefused("payment_mismatch", "cash accepted differs from the amount")
            return None, None
        if kind == "voucher":
            code = r.payment.get("code")
            if not isinstance(code, str) or not code:
                raise LoadRefused("bad_request", "voucher code missing")
            row = tx.one("SELECT amount, load_key FROM vouchers WHERE code = ?", (code,))
            if row is None:
                raise LoadRefused("voucher_unknown", "no such voucher")
            if row[0] != r.amount:
                raise LoadRefused("payment_mismatch", f"voucher is worth {row[0]}")
            claimed = tx.run(
                "UPDATE vouchers SET load_key = ? WHERE code = ? AND load_key IS NULL",
                (r.key, code),
            )
            if claimed != 1:
                raise LoadRefused("voucher_used", "voucher already redeemed")
            return code, None
        if kind == "pending":
            ident = r.payment.get("id")
            if not isinstance(ident, str) or not ident:
                raise LoadRefused("bad_request", "pending load id missing")
            row = tx.one("SELECT asn, amount FROM pending_loads WHERE id = ?", (ident,))
            if row is None:
                raise LoadRefused("pending_unknown", f"no pending load {ident}")
            if row[0] != r.asn_hex:
                raise LoadRefused("pending_other_card", f"pending load {ident} is another card's")
            if row[1] != r.amount:
                raise LoadRefused("payment_mismatch", f"pending load {ident} is {row[1]} fen")
            claimed = tx.run(
                "UPDATE pending_loads SET load_key = ? WHERE id = ? AND load_key IS NULL",
                (r.key, ident),
            )
            if claimed != 1:
                raise LoadRefused("pending_taken", f"pending load {ident} was loaded already")
            return None, ident
        raise LoadRefused("bad_request", "payment kind must be cash, voucher or pending")

    @staticmethod
    def _release(tx: _Tx, key: str) -> None:
        """A load proven not credited gives its voucher or pending load back."""
        tx.run("UPDATE vouchers SET load_key = NULL WHERE load_key = ?", (key,))
        tx.run("UPDATE pending_loads SET load_key = NULL WHERE load_key = ?", (key,))

    @staticmethod
    def _set(tx: _Tx, key: str, state: str, tac: str | None, detail: str) -> None:
        tx.run(
            "UPDATE loads SET state = ?, tac = COALESCE(?, tac), detail = ? WHERE load_key = ?",
            (state, tac, detail, key),
        )
        log.info("load_state", load_key=key, state=state, detail=detail)

    # -- completion ----------------------------------------------------------------------

    def complete(
        self, terminal_id: str, key: str, outcome: str, counter: int, tac: str
    ) -> LoadView:
        """The kiosk's report: ``credited`` (TAC verified), ``not_credited`` or ``unknown``.
        A report that arrives twice gets the same answer and changes nothing."""
        view: LoadView = self._transact(
            None, lambda tx: self._complete(tx, terminal_id, key, outcome, counter, tac)
        )
        return view

    def _complete(
        self, tx: _Tx, terminal_id: str, key: str, outcome: str, counter: int, tac: str
    ) -> LoadView:
        row = tx.one(
            "SELECT terminal_id, factors, algorithm, counter, balance_before, amount, terminal,"
            " datetime, state, tac FROM loads WHERE load_key = ?",
            (key,),
        )
        if row is None or row[0] != terminal_id:
            raise LoadRefused("unknown_load", f"no load {key} of terminal {terminal_id}")
        if counter != row[3]:
            raise LoadRefused("bad_request", f"load {key} used counter {row[3]}, not {counter}")
        state = row[8]
        if outcome == "credited":
            if state in ("completed", "tac_mismatch") and (row[9] or "") == tac.upper():
                return self._view(tx, key)  # the same report again
            if state not in ("authorised", "unknown", "credited"):
                raise LoadRefused("load_closed", f"load {key} is {state}")
            try:
                tac_bytes = bytes.fromhex(tac)
            except ValueError:
                tac_bytes = b""
            if len(tac_bytes) != 4:
                raise LoadRefused("bad_request", "tac must be 4 bytes of hex")
            expected = self.keystore.load_tac(
                [bytes.fromhex(f) for f in row[1].split(",")],
                row[4] + row[5],
                row[3],
                row[5],
                bytes.fromhex(row[6]),
                bytes.fromhex(row[7]),
                Algorithm(row[2]),
            )
            if expected == tac_bytes:
                self._set(tx, key, "completed", tac.upper(), "TAC verified")
            else:
                self._set(tx, key, "tac_mismatch", tac.upper(), "card TAC does not verify")
        elif outcome == "not_credited":
            if state == "not_credited":
                return self._view(tx, key)
            if state not in OPEN_STATES:
                raise LoadRefused("load_closed", f"load {key} is {state}")
            self._set(tx, key, "not_credited", None, "kiosk: card not credited")
            self._release(tx, key)
        elif outcome == "unknown":
            if state == "authorised":
                self._set(tx, key, "unknown", None, "kiosk: outcome unknown")
        else:
            raise LoadRefused("bad_request", "outcome must be credited, not_credited or unknown")
        return self._view(tx, key)

    def resolve(self, key: str, outcome: str, by: str, reason: str) -> LoadView:
        """An operator's decision on an unresolved load (authorised, unknown, tac_mismatch),
        e.g. after reading the card: ``credited`` keeps the money, ``not_credited`` gives the
        voucher or pending load back. Once; a closed load is refused ``load_closed``."""
        if outcome not in ("credited", "not_credited"):
            raise LoadRefused("bad_request", "outcome must be credited or not_credited")
        if not reason.strip() or len(reason) > 500:
            raise LoadRefused("bad_request", "a reason (1..500 characters) is required")

        def work(tx: _Tx) -> LoadView:
            row = tx.one("SELECT state FROM loads WHERE load_key = ?", (key,))
            if row is None:
                raise LoadRefused("unknown_load", f"no load {key}")
            if row[0] not in UNRESOLVED_STATES:
                raise LoadRefused("load_closed", f"load {key} is {row[0]}")
            self._set(tx, key, outcome, None, f"operator {by}: {reason.strip()}")
            if outcome == "not_credited":
                self._release(tx, key)
            return self._view(tx, key)

        view: LoadView = self._transact(None, work)
        log.info("load_resolved_by_operator", load_key=key, outcome=outcome, by=by)
        return view

    def reconcile_record(self, terminal_id: str, kind: str, fields: Mapping[str, Any]) -> None:
        """The host's reconciliation from a kiosk's signed record arriving through sync: a
        ``load`` record carries the card's TAC (completes the load if the completion report
        was lost); an ``unresolved`` load record makes an ``authorised`` load ``unknown``."""
        key, counter = fields.get("load_key"), fields.get("counter")
        if not isinstance(key, str) or isinstance(counter, bool) or not isinstance(counter, int):
            return
        outcome = "credited" if kind == "load" else "unknown"
        tac = fields.get("tac") if kind == "load" else ""
        if not isinstance(tac, str):
            return
        try:
            view = self.complete(terminal_id, key, outcome, counter, tac)
        except LoadRefused as refused:
            log.info("load_record_not_applied", load_key=key, reason=refused.reason)
            return
        log.info("load_reconciled", load_key=key, state=view.state, source="record")

    # -- views ---------------------------------------------------------------------------

    def _view(self, tx: _Tx, key: str) -> LoadView:
        row = tx.one(_SELECT_LOAD + " WHERE load_key = ?", (key,))
        assert row is not None
        return LoadView(*row)

    def view(self, key: str) -> LoadView | None:
        def work(tx: _Tx) -> Row | None:
            return tx.one(_SELECT_LOAD + " WHERE load_key = ?", (key,))

        row: Row | None = self._transact(None, work)
        return None if row is None else LoadView(*row)

    def loads(self, state: str | None = None) -> list[LoadView]:
        """Loads oldest first; ``state`` one of :data:`STATES`, or ``unresolved``."""
        sql = _SELECT_LOAD
        params: tuple[str, ...] = ()
        if state == "unresolved":
            sql += " WHERE state IN ('authorised', 'unknown', 'tac_mismatch')"
        elif state:
            sql += " WHERE state = ?"
            params = (state,)

        def work(tx: _Tx) -> list[Row]:
            return tx.all(sql + " ORDER BY created_at, load_key", params)

        rows: list[Row] = self._transact(None, work)
        return [LoadView(*r) for r in rows]


def _new_code(prefix: str) -> str:
    """A random code: prefix + 16 characters of an alphabet without look-alikes."""
    alphabet = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
    return prefix + "-" + "".join(secrets.choice(alphabet) for _ in range(16))
