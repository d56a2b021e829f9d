"""What one tap did, how long each phase took, and what the passenger is shown."""

from __future__ import annotations

import enum
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import structlog

log = structlog.get_logger("agent.tap")


class TapStatus(enum.StrEnum):
    """The end of a tap. ``IN_FLIGHT`` only while an intent is durable and the card is busy."""

    PAID = "paid"
    RECOVERED = "recovered"  # a torn debit of an earlier tap was proven and recorded
    REFUSED = "refused"
    TORN = "torn"  # the card left after the intent was durable: the next tap settles it
    FAILED = "failed"
    IN_FLIGHT = "in_flight"


MONEY_TAKEN = (TapStatus.PAID, TapStatus.RECOVERED)


@dataclass(slots=True)
class TapOutcome:
    """What one tap did (``status`` compares equal to its string value)."""

    status: str = TapStatus.FAILED
    card_id: str = ""
    family: str = ""
    printed_number: str = ""  # the number printed on the card (CPU: by the issuer's dialect)
    fare: int = 0
    balance_after: int | None = None
    record_seq: int | None = None
    reason: str = ""
    phases_ms: dict[str, float] = field(default_factory=dict)
    apdus: int = 0

    @property
    def total_ms(self) -> float:
        return sum(self.phases_ms.values())

    @property
    def refusal(self) -> str:
        """The machine-readable refusal code (``double_tap``, ``expired``, …) or ``""``."""
        return self.reason.split(":", 1)[0] if self.status == TapStatus.REFUSED else ""


class PhaseTimer:
    """Latency per phase of one tap, in milliseconds, for the tap log line."""

    def __init__(self) -> None:
        self.phases_ms: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = (time.perf_counter() - start) * 1000.0
            self.phases_ms[name] = self.phases_ms.get(name, 0.0) + elapsed


def feedback_for(outcome: TapOutcome) -> tuple[bool, str] | None:
    """Beep/LED/display for the passenger, or ``None`` when nothing must be shown (a card that
    simply stayed in the field has been answered already)."""
    if outcome.status in MONEY_TAKEN:
        return True, f"OK {outcome.fare / 100:.2f}  余额 {(outcome.balance_after or 0) / 100:.2f}"
    if outcome.status == TapStatus.TORN:
        return False, "请重刷 tap again"
    code = outcome.refusal
    if code == "still_present":
        return None
    if code == "double_tap":
        return True, "已付 already paid"
    if code == "one_card_at_a_time":
        return False, "请单张刷卡 one card at a time"
    return False, f"拒绝 {outcome.reason.split(':')[0]}"


def log_tap(outcome: TapOutcome, card: str, commands: str = "apdus") -> None:
    """The one structured log line per tap, with the latency of every phase."""
    fields: dict[str, Any] = {
        "status": str(outcome.status),
        "card": card,
        "family": outcome.family,
        **({"printed": outcome.printed_number} if outcome.printed_number else {}),
        "fare": outcome.fare,
        "balance_after": outcome.balance_after,
        "seq": outcome.record_seq,
        commands: outcome.apdus,
        "total_ms": round(outcome.total_ms, 2),
        **{f"{k}_ms": round(v, 2) for k, v in outcome.phases_ms.items()},
    }
    if outcome.status in MONEY_TAKEN:
        log.info("tap", **fields)
    else:
        log.warning("tap", reason=outcome.reason, **fields)
