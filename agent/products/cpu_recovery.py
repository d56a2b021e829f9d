"""CPU purse intents, typed, and the pure judgement of a torn one (cpu-purse.md §6.5).

A purchase intent holds what the card and the PSAM said before DEBIT FOR PURCHASE: the card's
offline counter (CTC) used by the transaction, the balance before, the amount. On the card's
next tap a fresh INITIALIZE FOR PURCHASE shows the counter the card would use now:

=========================  =================================  ==========================
counter now                balance now                        decision
=========================  =================================  ==========================
= stored                   (any)                              void: the debit did not happen
= stored + 1 (mod 2^16)    = before - amount                  finalize (GET TRANSACTION PROVE)
= stored + 1               anything else                      unresolved, card fault
< stored                   (any)                              unresolved, card fault
> stored + 1               (any)                              unresolved (other terminals ran)
=========================  =================================  ==========================

A lock intent (APPLICATION BLOCK, §6.6) is proven by the application answering SELECT with
6283 / 9303 (blocked) and disproven by a normal SELECT.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.products.intents import (
    OP_LOCK,
    OP_PURCHASE,
    Decision,
    Verdict,
    from_payload,
    to_payload,
)


@dataclass(frozen=True, slots=True)
class CpuPurchaseIntent:
    """The durable payload of a CPU purchase intent (store column ``product`` = ``cpu``)."""

    family: str
    aid: str
    flow: str
    transaction_type: int
    asn: str
    counter: int  # CTC the purchase used (INITIALIZE FOR PURCHASE bytes 4..5)
    amount: int
    balance_before: int
    key_version: int
    algorithm: int
    ttc: int
    mac1: str
    datetime: str  # 7 bytes BCD, hex
    terminal: str
    sam: str
    factors: str = ""  # absent in intents written before factors were recorded
    # The fare decision's record fields (fare_kind, fare_refund_due, ...) as compact JSON, so
    # a purchase finalized on the card's next tap records them as the clean tap would have
    # (the host settles boarding/alighting refunds from them). "" without a fare policy.
    fare: str = ""

    def to_payload(self) -> dict[str, Any]:
        return to_payload(OP_PURCHASE, self)

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> CpuPurchaseIntent:
        return from_payload(cls, OP_PURCHASE, payload)

    def fare_fields(self) -> dict[str, str | int | bool | None]:
        """The fare fields stored with the intent; an unreadable value gives none (the record
        is still made, without them), never an exception."""
        return decode_fare_fields(self.fare)

    @property
    def balance_after(self) -> int:
        return self.balance_before - self.amount


def encode_fare_fields(fields: Mapping[str, str | int | bool | None]) -> str:
    present = {k: v for k, v in fields.items() if v is not None}
    return json.dumps(present, sort_keys=True, separators=(",", ":")) if present else ""


def decode_fare_fields(text: str) -> dict[str, str | int | bool | None]:
    if not text:
        return {}
    try:
        raw = json.loads(text)
    except ValueError:
        return {}
    if not isinstance(raw, dict):
        return {}
    return {
        k: v
        for k, v in raw.items()
        if isinstance(k, str) and k.startswith("fare_") and isinstance(v, str | int | bool)
    }


@dataclass(frozen=True, slots=True)
class CpuLockIntent:
    """The durable payload of an APPLICATION BLOCK intent."""

    family: str
    aid: str
    asn: str
    uid: str  # anticollision UID: a blocked application cannot be read, its UID still can
    p2: int
    terminal: str
    sam: str

    def to_payload(self) -> dict[str, Any]:
        return to_payload(OP_LOCK, self)

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> CpuLockIntent:
        return from_payload(cls, OP_LOCK, payload)


def judge_purchase(intent: CpuPurchaseIntent, counter: int, balance: int) -> Decision:
    """Decide a torn purchase from the counter and balance a fresh INITIALIZE shows."""
    stored = intent.counter
    if counter == stored:
        return Decision(Verdict.VOID, "card counter unchanged: the debit did not happen")
    if counter != (stored + 1) & 0xFFFF:
        reason = f"card counter {counter} where {stored} or {stored + 1} was expected"
        fault = f"INITIALIZE FOR PURCHASE: counter went back: {reason}" if counter < stored else ""
        return Decision(Verdict.UNRESOLVED, reason, card_fault=fault)
    if balance != intent.balance_after:
        return Decision(
            Verdict.UNRESOLVED,
            f"debit happened but balance is {balance}, not {intent.balance_after}",
            card_fault=(
                f"INITIALIZE FOR PURCHASE: balance moved the wrong way ({balance}, "
                f"expected {intent.balance_after})"
            ),
        )
    return Decision(Verdict.FINALIZE, "counter moved by one and balance by the amount")


def judge_lock(*, blocked: bool) -> Decision:
    """Decide a torn APPLICATION BLOCK from what SELECT answered."""
    if blocked:
        return Decision(Verdict.FINALIZE, "application answers SELECT as blocked")
    return Decision(Verdict.VOID, "application selects normally: the lock did not happen")
