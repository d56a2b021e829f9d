"""The engine's journal and presence rule, as a POS purchase needs them.

:class:`PosJournal` is the engine's :class:`agent.tap.journal.Journal` with the POS order id
written into every purchase intent and every record it becomes (``pos_order``: purchase,
recovered purchase, unresolved), and one more rule at the only place a debit can start
(:meth:`PosJournal.execute`, before the intent): an order that already has a purchase or an
unresolved record, or a pending intent, is never debited again.

:class:`PosGuard` replaces the validator's presence rule: a POS purchase is an explicit request,
so a card that stayed in the field may pay the next order; a crowded field is still refused,
and an order whose debit is pending on a card accepts only that card.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import structlog

from agent.errors import AgentError, TapRefused
from agent.offline_store import Intent, OfflineStore, Record, RecordBody
from agent.presence import PresenceGuard
from agent.products.intents import OP_LOCK, Decision, Verdict, intent_op
from agent.readers.base import CardPresence
from agent.tap.journal import Journal, unresolved_body
from agent.tap.outcome import PhaseTimer, TapOutcome

T = TypeVar("T")
log = structlog.get_logger("agent.pos")

ORDER_FIELD = "pos_order"


def tagged(body: RecordBody, order_id: str) -> RecordBody:
    """``body`` with the POS order id among its signed fields."""
    return dataclasses.replace(body, fields={**body.fields, ORDER_FIELD: order_id})


def order_of(payload: Mapping[str, Any]) -> str | None:
    value = payload.get(ORDER_FIELD)
    return value if isinstance(value, str) else None


@dataclasses.dataclass(frozen=True, slots=True)
class Evidence:
    """What the journal shows of one order."""

    record: Record | None = None  # its purchase or unresolved record
    pending: Intent | None = None  # its pending purchase intent


def evidence(store: OfflineStore, order_id: str, first_seq: int) -> Evidence:
    """The order's record (after ``first_seq``) or pending intent, if any."""
    for rec in store.records(since_seq=first_seq):
        if rec.fields.get(ORDER_FIELD) == order_id and rec.kind in ("purchase", "unresolved"):
            return Evidence(record=rec)
    for intent in store.pending_intents():
        if order_of(intent.payload) == order_id and intent_op(intent.payload) != OP_LOCK:
            return Evidence(pending=intent)
    return Evidence()


class PosJournal(Journal):
    """The journal with the order id of the request in progress (``order``, ``first_seq``)."""

    def __init__(
        self, store: OfflineStore, on_intent: Callable[[str, Intent], None] | None = None
    ) -> None:
        super().__init__(store)
        self.order: str | None = None
        self.first_seq = 0
        self.on_intent = on_intent

    def execute(
        self,
        timer: PhaseTimer,
        outcome: TapOutcome,
        card_id: str,
        product: str,
        payload: Mapping[str, Any],
        operation: Callable[[], T],
        record: Callable[[T], RecordBody],
        *,
        nothing_changed: Callable[[AgentError], str | None] = lambda _exc: None,
    ) -> tuple[T, Record]:
        order = self.order
        if order is None or intent_op(payload) == OP_LOCK:
            return super().execute(
                timer,
                outcome,
                card_id,
                product,
                payload,
                operation,
                record,
                nothing_changed=nothing_changed,
            )
        found = evidence(self.store, order, self.first_seq)
        if found.record is not None:
            raise TapRefused(
                "order_settled",
                f"order {order} already has {found.record.kind} record #{found.record.seq}",
            )
        if found.pending is not None:
            raise TapRefused(
                "order_pending",
                f"order {order} has a pending debit on card {found.pending.card_id}",
            )

        def linked() -> T:
            # the intent is durable: link it to the order before the debit command
            if self.on_intent is not None:
                for intent in reversed(self.store.pending_intents(card_id)):
                    if order_of(intent.payload) == order:
                        self.on_intent(order, intent)
                        break
            return operation()

        return super().execute(
            timer,
            outcome,
            card_id,
            product,
            {**payload, ORDER_FIELD: order},
            linked,
            lambda result: tagged(record(result), order),
            nothing_changed=nothing_changed,
        )

    def settle(
        self, intent: Intent, decision: Decision, record: RecordBody | None = None
    ) -> Record | None:
        order = order_of(intent.payload)
        if order is None or decision.verdict is Verdict.VOID:
            return super().settle(intent, decision, record)
        if decision.verdict is Verdict.FINALIZE:
            return super().settle(
                intent, decision, None if record is None else tagged(record, order)
            )
        rec = self.store.finalize_intent(
            intent.id, tagged(unresolved_body(intent, decision.reason), order)
        )
        log.warning(
            "intent_unresolved",
            card=intent.card_id,
            intent=intent.id,
            order=order,
            reason=decision.reason,
        )
        return rec

    def expire(self, cutoff: dt.datetime, reason: str) -> list[Record]:
        def body(intent: Intent) -> RecordBody:
            plain = unresolved_body(intent, reason)
            order = order_of(intent.payload)
            return plain if order is None else tagged(plain, order)

        records = self.store.expire_intents(cutoff, body)
        for rec in records:
            log.warning("intent_expired", card=rec.card_id, seq=rec.seq, reason=reason)
        return records


class PosGuard(PresenceGuard):
    """Presence for explicit POS requests: no ``still_present`` rule; one card at a time;
    ``expected_card`` (an order pending on that card) refuses any other card."""

    def __init__(self) -> None:
        super().__init__()
        self.expected_card: str | None = None
        self.order: str = ""

    def admit(self, presence: CardPresence) -> None:
        if presence.cards_in_field > 1:
            super().admit(presence)

    def admit_card(self, card_id: str) -> None:
        if self.expected_card and card_id != self.expected_card:
            raise TapRefused(
                "wrong_card",
                f"order {self.order} has a pending debit on card {self.expected_card}; "
                f"present that card, not {card_id}",
            )

    def processed(self, uid: bytes, card_id: str) -> None:
        return None
