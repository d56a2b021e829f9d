"""Online load authorisation at the clearing host (圈存, cpu-purse.md §6.4).

A kiosk asks the host to authorise a load with the card's MAC1; the host checks MAC1 with the
card's load key (diversified from the load master inside the key store), takes the money from
the payment source (cash the kiosk declares accepted, or a voucher redeemed once), answers MAC2
and records the load, all in one SQLite transaction. The kiosk's ``load_key`` makes it
idempotent: the same key and request give the same MAC2, never a second authorisation.

Never a double load: one MAC2 fits one INITIALIZE FOR LOAD (its random and online counter), and
the host authorises nothing for a card while an earlier load of that card is open (``authorised``
or ``unknown``) unless the new, MAC1-verified request proves what became of it: the same online
counter means the earlier credit did not happen (it is ``not_credited``, its voucher is given
back), the counter one higher with the balance raised by its amount means it did (it is
``credited``, its TAC still owed). Anything else is refused ``load_unresolved``: the operator
decides. States: authorised → completed | tac_mismatch | not_credited | unknown | credited.
"""

from __future__ import annotations

import re
import sqlite3
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from agent.crypto import Algorithm
from clearinghost.keystore import CardKeyRef, KeyStore

log = structlog.get_logger("clearinghost.loads")
LOAD_TYPE = 0x02
OPEN_STATES = ("authorised", "unknown")
LOAD_KEY = re.compile(r"[A-Za-z0-9._-]{1,128}")  # it is a path segment of the completion route

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
    balance_before INTEGER NOT NULL,
    amount INTEGER NOT NULL,
    terminal TEXT NOT NULL,
    datetime TEXT NOT NULL,
    payment TEXT NOT NULL,
    voucher TEXT,
    mac2 TEXT NOT NULL,
    state TEXT NOT NULL,
    tac TEXT,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS loads_by_card ON loads (asn, state);
CREATE TABLE IF NOT EXISTS vouchers (
    code TEXT PRIMARY KEY,
    amount INTEGER NOT NULL,
    load_key TEXT
);
CREATE TABLE IF NOT EXISTS pending_loads (
    pending_id TEXT PRIMARY KEY,
    asn TEXT NOT NULL,
    amount INTEGER NOT NULL,
    source TEXT NOT NULL,
    load_key TEXT
);
"""


class LoadRefused(Exception):
    """The host refuses a load; ``reason`` is a stable code (``bad_mac1``, ``voucher_used``, …)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


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
        }


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


class LoadAuthority:
    """Authorises, records and completes loads; one SQLite file, one key store."""

    def __init__(self, path: Path, keystore: KeyStore, *, max_balance: int) -> None:
        self.keystore = keystore
        self.max_balance = max_balance
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def add_voucher(self, code: str, amount: int) -> None:
        with self._lock:
            self._db.execute("INSERT INTO vouchers (code, amount) VALUES (?, ?)", (code, amount))

    def add_pending(self, pending_id: str, asn: str, amount: int, source: str) -> None:
        """Funds credited at the host for card ``asn`` by someone else (employer, group
        purchase, online payment), waiting to be loaded at any kiosk (payment kind
        ``pending``, taken once like a voucher)."""
        if amount <= 0:
            raise LoadRefused("bad_amount", "a pending load must be positive")
        with self._lock:
            self._db.execute(
                "INSERT INTO pending_loads (pending_id, asn, amount, source) VALUES (?, ?, ?, ?)",
                (pending_id, asn.upper(), amount, source),
            )

    def pending_for(self, asn: str) -> list[dict[str, Any]]:
        """The card's pending loads not yet taken by a load."""
        with self._lock:
            rows = self._db.execute(
                "SELECT pending_id, amount, source FROM pending_loads"
                " WHERE asn = ? AND load_key IS NULL ORDER BY rowid",
                (asn.upper(),),
            ).fetchall()
        return [{"pending_id": r[0], "amount": r[1], "source": r[2]} for r in rows]

    # -- authorisation -------------------------------------------------------------------

    def authorise(self, terminal_id: str, request: Mapping[str, Any]) -> bytes:
        """MAC2 for a MAC1-verified, paid load; raises :class:`LoadRefused`."""
        key = request.get("load_key")
        if not isinstance(key, str) or LOAD_KEY.fullmatch(key) is None:
            raise LoadRefused("bad_request", "load_key must be 1..128 of A-Z a-z 0-9 . _ -")
        asn = _hex(request, "asn", 8)
        factors_raw = request.get("factors")
        if not isinstance(factors_raw, list | tuple) or not 1 <= len(factors_raw) <= 3:
            raise LoadRefused("bad_request", "factors must be a list of 1..3 hex factors")
        factors = tuple(_hex({"f": f}, "f", 8) for f in factors_raw)
        if factors[0] != asn:
            raise LoadRefused("bad_request", "the first factor must be the card's ASN")
        try:
            algorithm = Algorithm(_int(request, "algorithm", 0xFF))
        except ValueError as exc:
            raise LoadRefused("bad_request", "algorithm must be 0 (3DES) or 4 (SM4)") from exc
        key_index = _int(request, "key_index", 0xFF)
        counter = _int(request, "counter", 0xFFFF)
        balance = _int(request, "balance", 0x7FFFFFFF)
        amount = _int(request, "amount", 0x7FFFFFFF)
        random4 = _hex(request, "random", 4)
        mac1 = _hex(request, "mac1", 4)
        terminal = _hex(request, "terminal", 6)
        when = _hex(request, "datetime", 7)
        payment = request.get("payment")
        if not isinstance(payment, Mapping):
            raise LoadRefused("bad_request", "payment must be an object")
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                mac2 = self._authorise(
                    terminal_id,
                    key,
                    asn,
                    factors,
                    algorithm,
                    key_index,
                    counter,
                    balance,
                    amount,
                    random4,
                    mac1,
                    terminal,
                    when,
                    payment,
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return mac2

    def _authorise(
        self,
        terminal_id: str,
        key: str,
        asn: bytes,
        factors: tuple[bytes, ...],
        algorithm: Algorithm,
        key_index: int,
        counter: int,
        balance: int,
        amount: int,
        random4: bytes,
        mac1: bytes,
        terminal: bytes,
        when: bytes,
        payment: Mapping[str, Any],
    ) -> bytes:
        row = self._db.execute(
            "SELECT asn, counter, random, mac1, amount, mac2, terminal_id FROM loads"
            " WHERE load_key = ?",
            (key,),
        ).fetchone()
        if row is not None:
            same = (row[0], row[1], row[2], row[3], row[4], row[6]) == (
                asn.hex().upper(),
                counter,
                random4.hex().upper(),
                mac1.hex().upper(),
                amount,
                terminal_id,
            )
            if not same:
                raise LoadRefused("load_key_reused", f"load {key} was a different request")
            log.info("load_replayed", load_key=key)
            return bytes.fromhex(row[5])
        ref = CardKeyRef("load", key_index, algorithm, factors)
        mac1_data = (
            balance.to_bytes(4, "big") + amount.to_bytes(4, "big") + bytes((LOAD_TYPE,)) + terminal
        )
        if not self.keystore.load_mac1_ok(ref, random4, counter, mac1, mac1_data):
            raise LoadRefused("bad_mac1", f"MAC1 of card {asn.hex().upper()} does not verify")
        if amount <= 0:
            raise LoadRefused("bad_amount", "load amount must be positive")
        if balance + amount > self.max_balance:
            raise LoadRefused(
                "balance_limit", f"balance {balance} + {amount} above {self.max_balance}"
            )
        self._settle_open(asn.hex().upper(), counter, balance)
        voucher = self._take_payment(key, amount, payment, asn.hex().upper())
        mac2_data = amount.to_bytes(4, "big") + bytes((LOAD_TYPE,)) + terminal + when
        mac2 = self.keystore.load_mac2(ref, random4, counter, mac2_data)
        self._db.execute(
            "INSERT INTO loads (load_key, terminal_id, asn, factors, algorithm, counter, random,"
            " mac1, balance_before, amount, terminal, datetime, payment, voucher, mac2, state)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'authorised')",
            (
                key,
                terminal_id,
                asn.hex().upper(),
                ",".join(f.hex().upper() for f in factors),
                int(algorithm),
                counter,
                random4.hex().upper(),
                mac1.hex().upper(),
                balance,
                amount,
                terminal.hex().upper(),
                when.hex().upper(),
                str(payment.get("kind")),
                voucher,
                mac2.hex().upper(),
            ),
        )
        log.info("load_authorised", load_key=key, asn=asn.hex().upper(), amount=amount)
        return mac2

    def _settle_open(self, asn: str, counter: int, balance: int) -> None:
        """What a MAC1-verified INITIALIZE FOR LOAD proves about this card's open loads."""
        rows = self._db.execute(
            "SELECT load_key, counter, balance_before, amount FROM loads"
            " WHERE asn = ? AND state IN ('authorised', 'unknown')",
            (asn,),
        ).fetchall()
        for key, old_counter, old_balance, old_amount in rows:
            if counter == old_counter:
                self._set(key, "not_credited", None, "card's online counter unchanged")
                self._refund(key)
            elif counter == (old_counter + 1) & 0xFFFF and balance == old_balance + old_amount:
                self._set(key, "credited", None, "card's online counter and balance moved")
            else:
                raise LoadRefused(
                    "load_unresolved",
                    f"load {key} of card {asn} is unresolved (counter {old_counter}, now "
                    f"{counter}): an operator must settle it",
                )

    def _take_payment(
        self, key: str, amount: int, payment: Mapping[str, Any], asn: str
    ) -> str | None:
        kind = payment.get("kind")
        if kind == "cash":
            cash = payment.get("amount")
            if isinstance(cash, bool) or not isinstance(cash, int) or cash != amount:
                raise LoadRefused("payment_mismatch", "cash accepted differs from the amount")
            return None
        if kind == "voucher":
            code = payment.get("code")
            if not isinstance(code, str) or not code:
                raise LoadRefused("bad_request", "voucher code missing")
            row = self._db.execute(
                "SELECT amount, load_key FROM vouchers WHERE code = ?", (code,)
            ).fetchone()
            if row is None:
                raise LoadRefused("voucher_unknown", "no such voucher")
            if row[1] is not None:
                raise LoadRefused("voucher_used", "voucher already redeemed")
            if row[0] != amount:
                raise LoadRefused("payment_mismatch", f"voucher is worth {row[0]}")
            self._db.execute("UPDATE vouchers SET load_key = ? WHERE code = ?", (key, code))
            return code
        if kind == "pending":
            pending_id = payment.get("id")
            if not isinstance(pending_id, str) or not pending_id:
                raise LoadRefused("bad_request", "pending load id missing")
            row = self._db.execute(
                "SELECT amount, load_key, asn FROM pending_loads WHERE pending_id = ?",
                (pending_id,),
            ).fetchone()
            if row is None or row[2] != asn:
                raise LoadRefused("pending_unknown", "no such pending load for this card")
            if row[1] is not None:
                raise LoadRefused("pending_used", "pending load already loaded")
            if row[0] != amount:
                raise LoadRefused("payment_mismatch", f"the pending load is {row[0]}")
            self._db.execute(
                "UPDATE pending_loads SET load_key = ? WHERE pending_id = ?", (key, pending_id)
            )
            return None
        raise LoadRefused("bad_request", "payment kind must be cash, voucher or pending")

    def _refund(self, key: str) -> None:
        self._db.execute("UPDATE vouchers SET load_key = NULL WHERE load_key = ?", (key,))
        self._db.execute("UPDATE pending_loads SET load_key = NULL WHERE load_key = ?", (key,))

    def _set(self, key: str, state: str, tac: str | None, detail: str) -> None:
        self._db.execute(
            "UPDATE loads SET state = ?, tac = COALESCE(?, tac), detail = ? WHERE load_key = ?",
            (state, tac, detail, key),
        )
        log.info("load_state", load_key=key, state=state, detail=detail)

    # -- completion ----------------------------------------------------------------------

    def complete(
        self, terminal_id: str, key: str, outcome: str, counter: int, tac: str
    ) -> LoadView:
        """The kiosk's report: ``credited`` (TAC verified), ``not_credited`` or ``unknown``."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                view = self._complete(terminal_id, key, outcome, counter, tac)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return view

    def _complete(
        self, terminal_id: str, key: str, outcome: str, counter: int, tac: str
    ) -> LoadView:
        row = self._db.execute(
            "SELECT terminal_id, factors, algorithm, counter, balance_before, amount, terminal,"
            " datetime, state FROM loads WHERE load_key = ?",
            (key,),
        ).fetchone()
        if row is None or row[0] != terminal_id:
            raise LoadRefused("unknown_load", f"no load {key} of terminal {terminal_id}")
        if counter != row[3]:
            raise LoadRefused("bad_request", f"load {key} used counter {row[3]}, not {counter}")
        state = row[8]
        if outcome == "credited":
            if state not in ("authorised", "unknown", "credited"):
                raise LoadRefused("load_closed", f"load {key} is {state}")
            expected = self.keystore.load_tac(
                [bytes.fromhex(f) for f in row[1].split(",")],
                row[4] + row[5],
                row[3],
                row[5],
                bytes.fromhex(row[6]),
                bytes.fromhex(row[7]),
                Algorithm(row[2]),
            )
            if expected.hex().upper() == tac.upper():
                self._set(key, "completed", tac.upper(), "TAC verified")
            else:
                self._set(key, "tac_mismatch", tac.upper(), "card TAC does not verify")
        elif outcome == "not_credited":
            if state not in OPEN_STATES:
                raise LoadRefused("load_closed", f"load {key} is {state}")
            self._set(key, "not_credited", None, "kiosk: card not credited")
            self._refund(key)
        elif outcome == "unknown":
            if state == "authorised":
                self._set(key, "unknown", None, "kiosk: outcome unknown")
        else:
            raise LoadRefused("bad_request", "outcome must be credited, not_credited or unknown")
        view = self.view(key)
        assert view is not None
        return view

    def view(self, key: str) -> LoadView | None:
        row = self._db.execute(
            "SELECT load_key, asn, amount, counter, state, mac2, tac, detail FROM loads"
            " WHERE load_key = ?",
            (key,),
        ).fetchone()
        return None if row is None else LoadView(*row)

    def loads(self, state: str | None = None) -> list[LoadView]:
        sql = "SELECT load_key, asn, amount, counter, state, mac2, tac, detail FROM loads"
        rows = (
            self._db.execute(sql + " WHERE state = ? ORDER BY rowid", (state,))
            if state
            else self._db.execute(sql + " ORDER BY rowid")
        ).fetchall()
        return [LoadView(*r) for r in rows]
