"""The journal discipline, one template for every operation that moves money or changes a card.

::

    store INTENT (durable)  ─►  status IN_FLIGHT  ─►  card operation  ─►  INTENT → signed RECORD
                                                      │ raises: the intent stays (torn), unless
                                                      │ the error proves nothing changed (void)
    next presentation of the card:
        the product's pure judge reads the evidence (counters, balance, flags) ─► Decision
        VOID (nothing happened) | FINALIZE (it happened: the record) | UNRESOLVED (can't tell)
    card never back: after the recovery window the intent becomes an ``unresolved`` record

Nothing touches a card before its intent is durable; no intent is ever carried out twice. The
products decide (:mod:`agent.products.cpu_recovery`, :mod:`agent.products.m1_recovery`); this
module only applies their decisions to the store.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import structlog

from agent.errors import AgentError
from agent.offline_store import Intent, OfflineStore, Record, RecordBody
from agent.products.intents import (
    OP_LOCK,
    Decision,
    IntentPayloadError,
    Verdict,
    field_int,
    intent_op,
)
from agent.tap.outcome import PhaseTimer, TapOutcome, TapStatus

T = TypeVar("T")
log = structlog.get_logger("agent.journal")


def unresolved_body(intent: Intent, reason: str) -> RecordBody:
    """The record an intent becomes when it can be neither proven nor disproven."""
    p = intent.payload
    fields: dict[str, str | int | bool | None] = {
        "product": intent.product,
        "op": intent_op(p) or "unknown",
        "reason": reason,
        "intent_id": intent.id,
        "intent_created_at": intent.created_at.isoformat(),
    }
    for key in (
        "merchant_id",  # a merchant terminal's purchase intent carries its merchant (issue 11)
        "merchant_category",
        "family",
        "transaction_type",
        "asn",
        "uid4",
        "serial",
        "counter",
        "balance_before",
        "ttc",
        "terminal",
        "sam",
        "datetime",
        "mac1",
    ):
        value = p.get(key)
        if isinstance(value, str | int) and not isinstance(value, bool):
            fields[key] = value
    try:
        amount = field_int(p, "amount") if "amount" in p else 0
    except IntentPayloadError:
        amount = 0
    return RecordBody(kind="unresolved", card_id=intent.card_id, amount=amount, fields=fields)


class Journal:
    """Applies the journal discipline to one offline store."""

    def __init__(self, store: OfflineStore) -> None:
        self.store = store

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
        """Intent, durable ─► the card operation ─► the record, durable.

        If the operation raises, the intent stays for the card's next tap and ``outcome`` is
        left ``IN_FLIGHT`` (the tap is torn), unless ``nothing_changed`` says the error itself
        proves the card unchanged: then the intent is voided with that reason.
        """
        with timer.phase("intent_commit"):
            intent_id = self.store.add_intent(card_id, product, dict(payload))
        outcome.status = TapStatus.IN_FLIGHT
        try:
            result = operation()
        except AgentError as exc:
            reason = nothing_changed(exc)
            if reason is not None:
                self.store.void_intent(intent_id, reason)
                outcome.status = TapStatus.FAILED
            raise
        with timer.phase("record_commit"):
            rec = self.store.finalize_intent(intent_id, record(result))
        return result, rec

    def newest(self, pending: Iterable[Intent]) -> Intent:
        """The newest of a card's pending intents of one kind; older ones can no longer be
        proven on the card (a later attempt ran over them) and are closed: an older money
        intent becomes ``unresolved``, an older lock (no money) is voided."""
        *older, newest = sorted(pending, key=lambda i: i.id)
        for stale in older:
            reason = "superseded by a later attempt on the same card"
            verdict = Verdict.VOID if intent_op(stale.payload) == OP_LOCK else Verdict.UNRESOLVED
            self.settle(stale, Decision(verdict, reason))
        return newest

    def settle(
        self,
        intent: Intent,
        decision: Decision,
        record: RecordBody | None = None,
    ) -> Record | None:
        """Apply a product's decision: void, finalize into ``record``, or unresolved."""
        if decision.verdict is Verdict.VOID:
            self.store.void_intent(intent.id, decision.reason)
            log.info("intent_voided", card=intent.card_id, intent=intent.id, reason=decision.reason)
            return None
        if decision.verdict is Verdict.FINALIZE:
            if record is None:
                raise ValueError("a FINALIZE decision needs the record to write")
            rec = self.store.finalize_intent(intent.id, record)
            log.info("intent_recovered", card=intent.card_id, intent=intent.id, seq=rec.seq)
            return rec
        rec = self.store.finalize_intent(intent.id, unresolved_body(intent, decision.reason))
        log.warning(
            "intent_unresolved", card=intent.card_id, intent=intent.id, reason=decision.reason
        )
        return rec

    def expire(self, cutoff: dt.datetime, reason: str) -> list[Record]:
        """Intents older than ``cutoff`` become ``unresolved`` records."""
        records = self.store.expire_intents(cutoff, lambda i: unresolved_body(i, reason))
        for rec in records:
            log.warning("intent_expired", card=rec.card_id, seq=rec.seq, reason=reason)
        return records
