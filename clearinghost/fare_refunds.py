"""What the clearing host owes a rider from the fare records (issue 13): pure decisions.

An alighting tap whose trip cost less than the boarding pre-authorised writes
``fare_refund_due`` (fen) into its signed purchase record (:meth:`agent.tap.context.TapContext.
fare_fields`, from :class:`agent.products.fares.FareDecision`). The host turns that into one
pending load for the card (:meth:`clearinghost.loads.LoadAuthority.credit`, source ``fare``),
credited at the card's next kiosk load like a POS refund. The pending load's id is derived from
the record (``fare-<terminal>-<seq>``), so a re-upload, a retried batch or two host workers
storing the same batch make one pending load, never two (the id is the table's key).

An unfinished trip under the policy's ``unfinished: "host"`` rule (the record says
``fare_unfinished: "host"``) debits nothing more at the terminal: the host's later correction
is an operator's decision with an amount (``cardhost fares correct``), one pending load per
record under the same id, so a refund and a correction of one record can never both be paid.

Only records the host holds count (the caller checks kind and hash against the stored slot): a
record refused by screening (a forged signature, a broken chain), a record that conflicts with
what the host holds at its seq and a quarantined slot never create a pending load.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.blacklist import asn_of
from agent.products.fare_policy import MAX_FEN

FARE_SOURCE = "fare"  # clearinghost.loads.PENDING_SOURCES
REFUND_FIELD = "fare_refund_due"  # agent.tap.context.TapContext.fare_fields
UNFINISHED_FIELD = "fare_unfinished"
HOST_RULE = "host"  # agent.products.fare_policy.UNFINISHED: the host's later correction


class FareCreditError(ValueError):
    """A fare record the host cannot turn into a pending load; the message names the record."""


@dataclass(frozen=True, slots=True)
class FareCredit:
    """One pending load owed to a card for one fare record."""

    pending_id: str
    asn: str  # 16 hex digits (clearinghost.loads.ASN)
    amount: int  # fen
    reference: str


def pending_id(terminal_id: str, seq: int) -> str:
    """The pending load of a fare record: one per record (refund or correction)."""
    return f"fare-{terminal_id}-{seq}"


def card_asn(card_id: str, where: str) -> str:
    """The card's ASN as pending loads key it (the last 8 bytes of the card id, the
    blacklist's :func:`agent.blacklist.asn_of`)."""
    try:
        return f"{asn_of(card_id):016X}"
    except ValueError as exc:
        raise FareCreditError(f"{where}: {exc}") from None


def _where(fields: Mapping[str, Any]) -> str:
    return f"line {fields.get('fare_line')} stop {fields.get('fare_stop')}"


def refund_due(fields: Mapping[str, Any], where: str) -> int:
    """The record's ``fare_refund_due`` in fen: 0 when absent (or null: nothing owed); raises
    :class:`FareCreditError` for a value that is not a whole number of fen in 0..MAX_FEN."""
    value = fields.get(REFUND_FIELD)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_FEN:
        raise FareCreditError(
            f"{where}: {REFUND_FIELD} must be a whole number of fen 0..{MAX_FEN}, got {value!r}"
        )
    return value


def refund_credit(
    terminal_id: str, seq: int, kind: str, card_id: str, fields: Mapping[str, Any]
) -> FareCredit | None:
    """The pending load a stored record asks for: a purchase with ``fare_refund_due`` > 0;
    ``None`` for every other record."""
    where = f"record {seq} of terminal {terminal_id}"
    if kind != "purchase":
        return None
    amount = refund_due(fields, where)
    if amount == 0:
        return None
    return FareCredit(
        pending_id(terminal_id, seq),
        card_asn(card_id, where),
        amount,
        f"fare refund: {terminal_id} seq {seq}, alighting at {_where(fields)}",
    )


def correction_credit(
    terminal_id: str,
    seq: int,
    kind: str,
    card_id: str,
    fields: Mapping[str, Any],
    amount: int,
    max_fare: int,
    reason: str,
) -> FareCredit:
    """The host's later correction of an unfinished trip (the record says
    ``fare_unfinished: "host"``): ``amount`` fen back to the card, at most ``max_fare`` (the
    fare policy in force: no trip took more). Raises :class:`FareCreditError` naming why."""
    where = f"record {seq} of terminal {terminal_id}"
    if kind != "purchase" or fields.get(UNFINISHED_FIELD) != HOST_RULE:
        raise FareCreditError(
            f"{where} is not an unfinished trip left to the host's correction "
            f"(kind {kind}, {UNFINISHED_FIELD} {fields.get(UNFINISHED_FIELD)!r})"
        )
    if refund_due(fields, where):
        raise FareCreditError(f"{where} carries a fare refund already; it is not corrected")
    if isinstance(amount, bool) or not 0 < amount <= max_fare:
        raise FareCreditError(f"{where}: a correction is 1..{max_fare} fen, got {amount!r}")
    text = reason.strip()
    if not text or len(text) > 120:
        raise FareCreditError("a correction needs a reason of 1..120 characters")
    return FareCredit(
        pending_id(terminal_id, seq),
        card_asn(card_id, where),
        amount,
        f"unfinished trip corrected: {terminal_id} seq {seq} ({fields.get('fare_kind')} at "
        f"{_where(fields)}): {text}",
    )
