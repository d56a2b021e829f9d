"""The POS service: purchases by order id, card reads, order look-ups, refunds, transactions.

One reader, one request at a time: :class:`PosService` holds a lock that a request takes
without waiting; a second request while a card operation runs is answered :class:`Busy` at once
(it is never queued, so it can never debit later). A purchase runs the validator's own
:class:`agent.transaction.TransactionEngine` with the requested amount as the fare
(``engine.fare_for``), the POS journal (:class:`agent.pos.journal.PosJournal`: the order id in
the intent and the record) and the POS presence rule (:class:`agent.pos.journal.PosGuard`).

Every answer says whether money moved (``money_moved``: true, false, or null while pending):

``paid``        the card was debited once; ``record_seq`` is the signed record
``refused``     no money moved (``reason``); the same order id may be tried again
``pending``     the card left during the debit: present the same card again with the same order
                id; the journal then proves the debit (paid) or voids it and debits once (paid)
``unresolved``  the card's evidence neither proves nor disproves the debit (or it never came
                back within the recovery window): the clearing centre settles it from the record
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import structlog

from agent.agent_status import ReaderHealth
from agent.errors import AgentError, ConfigurationError, ReaderError
from agent.offline_store import Intent, OfflineStore, Record, RecordBody
from agent.pos.card_info import read_card
from agent.pos.journal import ORDER_FIELD, PosGuard, PosJournal, evidence
from agent.pos.orders import OrderBook, OrderRow
from agent.readers.base import CardPresence, CardReader
from agent.tap.context import merchant_fields
from agent.tap.outcome import TapOutcome, TapStatus
from agent.transaction import TransactionEngine

log = structlog.get_logger("agent.pos")

MAX_CARD_WAIT_S = 60.0
REFUND_FIELD = "refund_id"


class Busy(Exception):
    """Another POS request is using the reader."""


class PosRequestError(Exception):
    """A request the service refuses as such: ``status`` is the HTTP status, ``code`` stable."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail


MESSAGES = {
    "paid": "Paid. 支付成功",
    "refused": "Not paid, no money taken. 未扣款",
    "pending": "Card left during payment: present the SAME card again. 请重新刷同一张卡",
    "unresolved": "Cannot tell whether the card was debited: the clearing centre settles it. "
    "待清算中心核实",
}


class PosService:
    """The POS operations over one engine, one reader and the order book."""

    def __init__(
        self,
        engine: TransactionEngine,
        reader: CardReader,
        orders: OrderBook,
        *,
        clock: Callable[[], dt.datetime] | None = None,
    ) -> None:
        if engine.profile.pos_max_amount <= 0:
            raise ConfigurationError(
                f"{engine.profile.source}: no [pos] max_amount: the POS front end needs the "
                "largest amount one purchase may take"
            )
        self.engine = engine
        self.reader = reader
        self.orders = orders
        self.store: OfflineStore = engine.store
        self.max_amount = engine.profile.pos_max_amount
        self.clock = clock or (lambda: dt.datetime.now().astimezone())
        # the engine's validator rules are not the POS's: no double-tap window, no presence
        # rule beyond one card at a time; its journal tags intents and records with the order
        engine.profile = dataclasses.replace(engine.profile, double_tap_window_s=0.0)
        self.guard = PosGuard()
        engine.presence = self.guard
        self.journal = PosJournal(engine.journal.store, on_intent=self._linked)
        engine.journal = self.journal
        self._lock = threading.Lock()
        # what the reader last did, for the status file (agent.agent_status); set by the CLI
        self.health: ReaderHealth | None = None
        self.on_tap: Callable[[], None] | None = None
        self.settle_all()

    def close(self) -> None:
        self.orders.close()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        if not self._lock.acquire(blocking=False):
            raise Busy("another POS request is using the reader; try again when it has answered")
        try:
            yield
        finally:
            self._lock.release()

    # --- purchases ------------------------------------------------------------------------

    def purchase(self, order_id: str, amount: int, wait_s: float) -> dict[str, Any]:
        """Debit ``amount`` fen from the card presented within ``wait_s`` seconds, once per
        order id: a repeated request answers the order's state, or completes it."""
        if not 0 < amount <= self.max_amount:
            raise PosRequestError(
                422,
                "amount_out_of_range",
                f"amount {amount} fen is outside 1..{self.max_amount} ([pos] max_amount)",
            )
        with self.exclusive():
            self._expire()
            row = self.orders.get(order_id)
            if row is not None and row.amount != amount:
                raise PosRequestError(
                    409,
                    "order_amount_mismatch",
                    f"order {order_id} is for {row.amount} fen, not {amount}; an order id "
                    "names one purchase",
                )
            if row is None:
                row = self.orders.create(order_id, amount, self.store.last_seq())
            else:
                row = self._settle(row)
                if row.status in ("paid", "unresolved"):
                    return self.answer(row)
            presence = self._wait_for_card(wait_s)
            if presence is None:
                if row.status == "pending":
                    return self.answer(row)
                row = self.orders.update(
                    order_id, status="refused", reason=f"no_card: no card within {wait_s:g} s"
                )
                return self.answer(row)
            self.guard.expected_card = row.card_id if row.status == "pending" else None
            self.guard.order = order_id
            self.journal.order, self.journal.first_seq = order_id, row.first_seq
            self.engine.fare_for = lambda _profile: amount
            self.orders.update(order_id, status=row.status, reason=row.reason, attempt=True)
            try:
                outcome = self.engine.process_tap(self.reader, presence)
            finally:
                self.journal.order = None
                self.guard.expected_card = None
            if self.on_tap is not None:
                self.on_tap()
            return self.answer(self._settle(self.orders.get(order_id) or row, outcome))

    def order(self, order_id: str) -> dict[str, Any] | None:
        """The order's state, from the journal's evidence; ``None`` if unknown. Never waits
        for the reader: it only reads the store."""
        row = self.orders.get(order_id)
        if row is None:
            return None
        if self._lock.acquire(blocking=False):
            try:
                row = self._settle(row)
            finally:
                self._lock.release()
        else:
            # a request is running: report the evidence without writing the row
            row = self._derive(row, None)
        return self.answer(row)

    def settle_all(self) -> None:
        """At start: every unsettled order's row from the journal's evidence (after a crash)."""
        with self.exclusive():
            self._expire()
            for row in self.orders.unsettled():
                settled = self._settle(row)
                log.info("pos_order_settled", order=row.order_id, status=settled.status)

    def _settle(self, row: OrderRow, outcome: TapOutcome | None = None) -> OrderRow:
        derived = self._derive(row, outcome)
        if derived != row:
            derived = self.orders.update(
                row.order_id,
                status=derived.status,
                reason=derived.reason,
                card_id=derived.card_id or None,
                printed_number=derived.printed_number or None,
                balance_after=derived.balance_after,
                record_seq=derived.record_seq,
                intent_id=derived.intent_id,
            )
        return derived

    def _derive(self, row: OrderRow, outcome: TapOutcome | None) -> OrderRow:
        """The order's state from the journal, with the tap's outcome for the reason."""
        found = evidence(self.store, row.order_id, row.first_seq)
        if found.record is not None:
            rec = found.record
            if rec.kind == "purchase":
                balance = rec.fields.get("balance_after")
                printed = rec.fields.get("printed_number")
                return dataclasses.replace(
                    row,
                    status="paid",
                    reason="recovered: the torn debit was proven"
                    if rec.fields.get("recovered")
                    else "",
                    card_id=rec.card_id,
                    printed_number=printed if isinstance(printed, str) else row.printed_number,
                    balance_after=balance if isinstance(balance, int) else None,
                    record_seq=rec.seq,
                )
            reason = rec.fields.get("reason")
            return dataclasses.replace(
                row,
                status="unresolved",
                reason=f"unresolved: {reason}" if isinstance(reason, str) else "unresolved",
                card_id=rec.card_id,
                record_seq=rec.seq,
            )
        if found.pending is not None:
            intent = found.pending
            return dataclasses.replace(
                row,
                status="pending",
                reason=(
                    outcome.reason
                    if outcome is not None and outcome.reason
                    else row.reason or "card left during the debit"
                ),
                card_id=intent.card_id,
                intent_id=intent.id,
            )
        # nothing in the journal: no money moved for this order
        if outcome is not None:
            reason = outcome.reason
            if outcome.status == TapStatus.RECOVERED:
                reason = (
                    "earlier_debit_settled: this card's pending debit of an earlier request "
                    f"(record #{outcome.record_seq}) was settled first; present the card again"
                )
            elif outcome.status == TapStatus.FAILED:
                reason = f"failed: {outcome.reason}"
            elif outcome.status == TapStatus.PAID:  # paid, but not under this order: a bug
                reason = "internal: paid without an order record"
            return dataclasses.replace(
                row,
                status="refused",
                reason=reason,
                card_id=outcome.card_id or row.card_id,
                printed_number=outcome.printed_number or row.printed_number,
            )
        if row.status in ("started", "pending"):
            what = (
                "voided: the debit did not happen"
                if row.status == "pending"
                else ("interrupted before the card was debited")
            )
            return dataclasses.replace(row, status="refused", reason=what)
        return row

    def _linked(self, order_id: str, intent: Intent) -> None:
        """The order's intent is durable (the debit follows): the row says pending first."""
        self.orders.update(
            order_id,
            status="pending",
            reason="debit in progress",
            card_id=intent.card_id,
            intent_id=intent.id,
        )

    def _expire(self) -> None:
        try:
            self.engine.expire_stale_intents()
        except AgentError as exc:
            log.warning("expire_failed", party=exc.party, error=str(exc))

    def answer(self, row: OrderRow) -> dict[str, Any]:
        moved: bool | None = {"paid": True, "refused": False}.get(row.status)
        body: dict[str, Any] = {
            "order_id": row.order_id,
            "status": row.status,
            "money_moved": moved,
            "amount": row.amount,
            "message": MESSAGES.get(row.status, ""),
            "reason": row.reason,
            "card_id": row.card_id or None,
            "printed_number": row.printed_number or None,
            "balance_after": row.balance_after,
            "record_seq": row.record_seq,
            "created_at": row.created_at,
            "updated_at": row.updated_at,
        }
        if row.status == "pending":
            body["message"] += f" (card {row.card_id})"
        return body

    def _wait_for_card(self, wait_s: float) -> CardPresence | None:
        """The reader's ``wait_for_card``, noting what it did in :attr:`health`."""
        try:
            presence = self.reader.wait_for_card(min(wait_s, MAX_CARD_WAIT_S))
        except ReaderError as exc:
            if self.health is not None:
                self.health.fault(str(exc))
            raise
        if self.health is not None:
            self.health.seen(card=presence is not None)
        return presence

    def probe_reader(self) -> None:
        """Look at the reader once (is it there, is a card lying on it) so that the status
        file says so before the first request; a failure is noted, not raised. Called at
        start, before the API serves: it never races a request for the reader."""
        with self.exclusive():
            try:
                self._wait_for_card(0)
            except ReaderError as exc:
                log.warning("pos_reader_unavailable", error=str(exc))

    # --- card, transactions, refunds ----------------------------------------------------

    def card(self, wait_s: float) -> dict[str, Any]:
        with self.exclusive():
            presence = self._wait_for_card(wait_s)
            if presence is None:
                raise PosRequestError(404, "no_card", f"no card on the reader within {wait_s:g} s")
            try:
                info = read_card(
                    self.reader,
                    presence,
                    self.engine.profile_in_force(),
                    self.engine.sams,
                    self.engine.blacklist,
                    self.clock().date(),
                )
            except AgentError as exc:
                raise PosRequestError(502, f"{exc.party}_error", f"{exc.party}: {exc}") from exc
        pending = [i for i in self.store.pending_intents(info.get("card_id", "") or "-")]
        info["pending_order"] = next(
            (i.payload.get(ORDER_FIELD) for i in pending if ORDER_FIELD in i.payload), None
        )
        return info

    def transactions(self, limit: int) -> list[dict[str, Any]]:
        """The newest ``limit`` records of this terminal, newest first."""
        last = self.store.last_seq()
        records = list(self.store.records(since_seq=max(0, last - limit)))
        return [_record_view(r) for r in reversed(records)]

    def refund(self, refund_id: str, order_id: str, amount: int) -> dict[str, Any]:
        """A refund is a host-side credit: the purse cannot be credited offline. The agent
        records a signed ``refund_request`` for the clearing host (loaded to the card at a
        kiosk or the next online load); idempotent by ``refund_id``."""
        with self.exclusive():
            known = self.orders.refund(refund_id)
            if known is not None:
                if (known.order_id, known.amount) != (order_id, amount):
                    raise PosRequestError(
                        409,
                        "refund_mismatch",
                        f"refund {refund_id} is for order {known.order_id}, {known.amount} fen",
                    )
            else:
                row = self.orders.get(order_id)
                if row is None:
                    raise PosRequestError(404, "unknown_order", f"no order {order_id}")
                row = self._settle(row)
                if row.status != "paid":
                    raise PosRequestError(
                        409,
                        "order_not_paid",
                        f"order {order_id} is {row.status}: nothing to refund",
                    )
                refunded = sum(r.amount for r in self.orders.refunds_of(order_id))
                if not 0 < amount <= row.amount - refunded:
                    raise PosRequestError(
                        422,
                        "refund_too_large",
                        f"order {order_id} paid {row.amount} fen, {refunded} refunded already; "
                        f"{amount} is more than is left",
                    )
                self.orders.create_refund(refund_id, order_id, amount, self.store.last_seq())
                known = self.orders.refund(refund_id)
                assert known is not None
            rec = self._refund_record(refund_id, known.first_seq)
            if rec is None:
                row = self.orders.get(order_id)
                assert row is not None
                rec = self.store.append_record(
                    RecordBody(
                        kind="refund_request",
                        card_id=row.card_id,
                        amount=amount,
                        fields={
                            ORDER_FIELD: order_id,
                            REFUND_FIELD: refund_id,
                            "original_seq": row.record_seq,
                            "credit": "host",
                            **merchant_fields(self.engine.profile),
                        },
                    )
                )
            if known.record_seq != rec.seq:
                self.orders.refund_recorded(refund_id, rec.seq)
        return {
            "refund_id": refund_id,
            "order_id": order_id,
            "amount": amount,
            "status": "requested",
            "money_moved": False,
            "card_id": rec.card_id,
            "record_seq": rec.seq,
            "message": (
                "The card cannot be credited offline. A signed refund request goes to the "
                "clearing host; the customer's card is credited at a kiosk or its next online "
                "load. 退款由清算中心处理，于充值点或下次圈存时写入卡内"
            ),
        }

    def _refund_record(self, refund_id: str, first_seq: int) -> Record | None:
        for rec in self.store.records(since_seq=first_seq):
            if rec.kind == "refund_request" and rec.fields.get(REFUND_FIELD) == refund_id:
                return rec
        return None


def _record_view(rec: Record) -> dict[str, Any]:
    keep = ("family", "balance_after", "printed_number", "reason", "recovered", REFUND_FIELD)
    return {
        "seq": rec.seq,
        "created_at": rec.created_at,
        "kind": rec.kind,
        "card_id": rec.card_id,
        "amount": rec.amount,
        "order_id": rec.fields.get(ORDER_FIELD),
        **{k: rec.fields[k] for k in keep if k in rec.fields},
    }
