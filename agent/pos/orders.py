"""The POS order book: order id → what happened, durable in the agent's store file.

Table ``pos_orders`` lives in ``agent.db`` beside the journal (its own connection, WAL,
``synchronous=FULL``). A row is written before the card is touched; the journal intent and the
signed record of the debit carry the order id (``pos_order``), so the truth of an order is always
derived from the journal's evidence, never from the row alone:

* a signed ``purchase`` record tagged with the order → ``paid`` (money moved, once)
* an ``unresolved`` record tagged with the order      → ``unresolved`` (the clearing centre decides)
* a pending intent tagged with the order              → ``pending`` (present that card again)
* none of these                                       → no money moved (``refused``)

The row caches the last answer (reason, card, balance) and ``first_seq``, the last record
sequence when the order was created: records of the order can only be after it.

``pos_refunds`` keeps refund requests by refund id, the same way: a row first, then a signed
``refund_request`` record tagged with the refund id.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from agent.errors import StoreError

BUSY_TIMEOUT_MS = 5000

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS pos_orders (
        order_id TEXT PRIMARY KEY,
        amount INTEGER NOT NULL,
        status TEXT NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        card_id TEXT NOT NULL DEFAULT '',
        printed_number TEXT NOT NULL DEFAULT '',
        balance_after INTEGER,
        record_seq INTEGER,
        intent_id INTEGER,
        first_seq INTEGER NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS pos_refunds (
        refund_id TEXT PRIMARY KEY,
        order_id TEXT NOT NULL,
        amount INTEGER NOT NULL,
        first_seq INTEGER NOT NULL,
        record_seq INTEGER,
        created_at TEXT NOT NULL
    )""",
)

_ORDER_COLUMNS = (
    "order_id, amount, status, reason, card_id, printed_number, balance_after, record_seq, "
    "intent_id, first_seq, attempts, created_at, updated_at"
)


@dataclass(frozen=True, slots=True)
class OrderRow:
    order_id: str
    amount: int
    status: str  # started | pending | paid | refused | unresolved
    reason: str
    card_id: str
    printed_number: str
    balance_after: int | None
    record_seq: int | None
    intent_id: int | None
    first_seq: int
    attempts: int
    created_at: str
    updated_at: str


@dataclass(frozen=True, slots=True)
class RefundRow:
    refund_id: str
    order_id: str
    amount: int
    first_seq: int
    record_seq: int | None
    created_at: str


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class OrderBook:
    """The POS tables of one store file. Thread-safe (one connection behind a lock)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            self._conn = sqlite3.connect(
                path,
                isolation_level=None,
                timeout=BUSY_TIMEOUT_MS / 1000,
                check_same_thread=False,
            )
            self._conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("PRAGMA synchronous = FULL")
            for statement in _SCHEMA:
                self._conn.execute(statement)
        except sqlite3.Error as exc:
            raise StoreError(f"store: could not open the POS order book in {path}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def _db(self, action: str) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._conn
            except sqlite3.Error as exc:
                raise StoreError(f"store: POS order book: could not {action}: {exc}") from exc

    # --- orders -------------------------------------------------------------------------

    def get(self, order_id: str) -> OrderRow | None:
        with self._db(f"read order {order_id!r}") as conn:
            row = conn.execute(
                f"SELECT {_ORDER_COLUMNS} FROM pos_orders WHERE order_id = ?",  # noqa: S608
                (order_id,),
            ).fetchone()
        return None if row is None else OrderRow(*row)

    def unsettled(self) -> list[OrderRow]:
        """Orders whose last known state is not final (started or pending)."""
        with self._db("list unsettled orders") as conn:
            rows = conn.execute(
                f"SELECT {_ORDER_COLUMNS} FROM pos_orders WHERE status IN ('started', 'pending') "  # noqa: S608
                "ORDER BY created_at"
            ).fetchall()
        return [OrderRow(*row) for row in rows]

    def create(self, order_id: str, amount: int, first_seq: int) -> OrderRow:
        """The order, durable before any card is touched (``INSERT``: one order id, one row)."""
        now = _now()
        with self._db(f"create order {order_id!r}") as conn:
            conn.execute(
                "INSERT INTO pos_orders (order_id, amount, status, first_seq, created_at, "
                "updated_at) VALUES (?, ?, 'started', ?, ?, ?)",
                (order_id, amount, first_seq, now, now),
            )
        row = self.get(order_id)
        assert row is not None
        return row

    def update(
        self,
        order_id: str,
        *,
        status: str,
        reason: str = "",
        card_id: str | None = None,
        printed_number: str | None = None,
        balance_after: int | None = None,
        record_seq: int | None = None,
        intent_id: int | None = None,
        attempt: bool = False,
    ) -> OrderRow:
        sets = ["status = ?", "reason = ?", "updated_at = ?"]
        values: list[object] = [status, reason, _now()]
        for column, value in (
            ("card_id", card_id),
            ("printed_number", printed_number),
            ("balance_after", balance_after),
            ("record_seq", record_seq),
            ("intent_id", intent_id),
        ):
            if value is not None:
                sets.append(f"{column} = ?")
                values.append(value)
        if attempt:
            sets.append("attempts = attempts + 1")
        with self._db(f"update order {order_id!r}") as conn:
            conn.execute(
                f"UPDATE pos_orders SET {', '.join(sets)} WHERE order_id = ?",  # noqa: S608
                (*values, order_id),
            )
        row = self.get(order_id)
        if row is None:
            raise StoreError(f"store: POS order {order_id!r} vanished")
        return row

    # --- refunds ------------------------------------------------------------------------

    def refund(self, refund_id: str) -> RefundRow | None:
        with self._db(f"read refund {refund_id!r}") as conn:
            row = conn.execute(
                "SELECT refund_id, order_id, amount, first_seq, record_seq, created_at "
                "FROM pos_refunds WHERE refund_id = ?",
                (refund_id,),
            ).fetchone()
        return None if row is None else RefundRow(*row)

    def refunds_of(self, order_id: str) -> list[RefundRow]:
        with self._db(f"list refunds of {order_id!r}") as conn:
            rows = conn.execute(
                "SELECT refund_id, order_id, amount, first_seq, record_seq, created_at "
                "FROM pos_refunds WHERE order_id = ? ORDER BY created_at",
                (order_id,),
            ).fetchall()
        return [RefundRow(*row) for row in rows]

    def create_refund(self, refund_id: str, order_id: str, amount: int, first_seq: int) -> None:
        with self._db(f"create refund {refund_id!r}") as conn:
            conn.execute(
                "INSERT INTO pos_refunds (refund_id, order_id, amount, first_seq, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (refund_id, order_id, amount, first_seq, _now()),
            )

    def refund_recorded(self, refund_id: str, seq: int) -> None:
        with self._db(f"update refund {refund_id!r}") as conn:
            conn.execute(
                "UPDATE pos_refunds SET record_seq = ? WHERE refund_id = ?", (seq, refund_id)
            )
