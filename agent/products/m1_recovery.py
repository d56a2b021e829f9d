"""M1 purse intents, typed, and the pure judgement of a torn one (m1-purse-and-readers.md §3.5).

The card is first classified and repaired to one consistent purse (old or new balance, both
copies equal, :func:`agent.products.m1_purse.classify`); then the purse counter (public info)
and the balance prove whether the journaled debit happened:

======================================  ==========================================
card now (same UID and serial)          decision
======================================  ==========================================
counter, balance as before              void: the debit did not happen
counter + 1, balance - amount           finalize: the record (``recovered``)
anything else                           unresolved
another card (UID or serial differ)     unresolved
======================================  ==========================================

A lock intent (blacklist flag, public-info byte 6) is proven by the flag found set on the
repaired card and disproven by a clear flag (or another card): it moves no money, so a
disproven lock is voided and the card locked again if still listed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.products.cpu_recovery import decode_fare_fields
from agent.products.intents import OP_PURCHASE, Decision, Verdict, from_payload, to_payload


@dataclass(frozen=True, slots=True)
class M1PurchaseIntent:
    """The durable payload of an M1 debit intent (store column ``product`` = ``m1``)."""

    family: str
    uid4: str
    city: str
    serial: str
    card_number: str
    card_type: int
    counter_before: int
    counter: int
    balance_before: int
    amount: int
    record_slot: int
    datetime: str  # YYYYMMDDhhmmss
    terminal: str
    sam: str
    # Issue 13, absent from older intents: the fare decision's record fields (compact JSON,
    # cpu_recovery.encode_fare_fields) and the trip block this debit writes (hex, "" none),
    # so a debit finalized on the card's next tap records the fare and restores the trip.
    fare: str = ""
    trip: str = ""

    def to_payload(self) -> dict[str, Any]:
        return to_payload(OP_PURCHASE, self)

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> M1PurchaseIntent:
        return from_payload(cls, OP_PURCHASE, payload)

    @property
    def balance_after(self) -> int:
        return self.balance_before - self.amount

    def fare_fields(self) -> dict[str, str | int | bool | None]:
        """The fare fields stored with the intent (none when unreadable, never an error)."""
        return decode_fare_fields(self.fare)


def judge_purchase(
    intent: M1PurchaseIntent, *, uid4: str, serial: str, counter: int, balance: int, recovery: str
) -> Decision:
    """Decide a torn M1 debit from the repaired card's purse counter and balance."""
    if intent.uid4 != uid4 or intent.serial != serial:
        return Decision(Verdict.UNRESOLVED, "card identity differs from the intent")
    before, amount = intent.balance_before, intent.amount
    if counter == intent.counter_before and balance == before:
        return Decision(
            Verdict.VOID,
            f"purse counter {counter} unchanged (recovery {recovery}): the debit did not happen",
        )
    if counter == (intent.counter_before + 1) & 0xFFFF and balance == before - amount:
        return Decision(Verdict.FINALIZE, f"counter and balance moved (recovery {recovery})")
    return Decision(
        Verdict.UNRESOLVED,
        f"purse counter {counter} / balance {balance}, where {intent.counter_before}/{before} "
        f"(not debited) or {intent.counter_before + 1}/{before - amount} (debited) was expected",
    )


def judge_lock(
    payload: Mapping[str, Any], *, uid4: str, serial: str, flagged: bool, recovery: str
) -> Decision:
    """Decide a torn blacklist-flag write from the repaired card's public info."""
    same_card = payload.get("uid4") == uid4 and payload.get("serial") == serial
    if not same_card:
        return Decision(Verdict.VOID, "card identity differs from the lock intent")
    if flagged:
        return Decision(Verdict.FINALIZE, f"blacklist flag set (recovery {recovery})")
    return Decision(Verdict.VOID, f"blacklist flag not set (recovery {recovery}): no lock happened")
