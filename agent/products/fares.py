"""Fare rules: pure functions of (card state, tap, time, policy), and the table-driven engine.

Nothing here reads a card, a clock or a file. The tap layer gives :func:`decide` what it knows:

* :class:`CardFacts`: the card type (EF17[10] / dialect), the card's last trip record (EF1E or
  CAPP, :class:`agent.products.cpu_logs.Trip`) and the terminal's own history for the card
  (what it charged today, its last paid tap);
* :class:`TapPlace`: where the validator is (line, current stop from GPS or the driver's
  console, its role: ``single`` = one tap per ride, ``entry``, ``exit``, ``both`` = a bus
  validator taken at boarding and alighting), and the tap's time.

The policy (:mod:`agent.products.fare_policy`) decides; :func:`decide` applies the rules in one
order, each a small function: table price → card-type discount → transfer discount → daily
cap → monthly cap → never above ``max_fare``, never below 0. Entry/exit pricing settles on the
alighting tap what the boarding tap pre-authorised; an unfinished trip meets the policy's
``unfinished`` rule and the decision says so (``unfinished=...``) for the record and the host.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field

from agent.products.cpu_logs import Trip
from agent.products.fare_policy import FarePolicy, Line, NoFare, Stop, band_price, table_price

__all__ = ["NoFare", "band_price", "table_price"]


class Passback(ValueError):
    """A second entry on the same line within the anti-passback time."""


@dataclass(frozen=True, slots=True)
class TapPlace:
    line: int
    stop: int
    role: str = "single"  # single | entry | exit | both
    city: str = ""  # this system's city code (BCD hex), to recognise its own trip records


@dataclass(frozen=True, slots=True)
class PaidTap:
    """A tap this terminal charged for the card (from its own records)."""

    when: dt.datetime
    line: int
    amount: int


@dataclass(frozen=True, slots=True)
class CardFacts:
    card_type: int | None = None
    last_trip: Trip | None = None  # the card's newest trip record
    # The record before it (read only under an entry/exit policy with transfers): at an
    # alighting tap ``last_trip`` is this trip's own boarding, and the trip it may be a
    # transfer from is this one.
    earlier_trip: Trip | None = None
    paid_today: int = 0  # what this terminal already charged the card today (the cap's sum)
    last_paid: PaidTap | None = None
    paid_this_month: int = 0  # the same since the month began (the monthly cap's sum)


@dataclass(frozen=True, slots=True)
class FareDecision:
    amount: int  # what this tap debits, fen
    kind: str  # flat | single | entry | exit | unfinished_then_entry | ...
    base: int  # the table price before discounts (exit: the whole trip's)
    record_type: int = 0  # what the trip record written by this tap says (entry/exit)
    unfinished: str = ""  # the rule applied to an unfinished trip ("" when none)
    refund_due: int = 0  # an exit that pre-authorised more than the trip cost: owed by the host
    still_owed: int = 0  # an unfinished trip's charge beyond one tap's max_fare: for the host
    notes: tuple[str, ...] = field(default=())
    # What the trip record written by this tap says this trip has paid (None: ``amount``). A
    # boarding that also closes an unfinished trip debits both, but its record carries only
    # the new trip's part, so the alighting tap settles against that and never hands the
    # unfinished trip's charge back.
    trip_amount: int | None = None
    transfer_from: int | None = None  # the line a transfer discount came from (None: none)

    @property
    def record_amount(self) -> int:
        return self.amount if self.trip_amount is None else self.trip_amount


# --- the table (band_price, table_price: agent.products.fare_policy) ---------------------


def max_from(policy: FarePolicy, line: Line, stop: Stop) -> int:
    """The dearest trip from (or to) ``stop`` on its line: the boarding pre-authorisation."""
    return min(policy.max_fare, max(table_price(policy, line, stop, s) for s in line.stops))


def min_fare(policy: FarePolicy, line: Line, stop: Stop) -> int:
    return min(table_price(policy, line, stop, s) for s in line.stops)


# --- the rules ----------------------------------------------------------------------------


def card_discount(policy: FarePolicy, card_type: int | None, amount: int) -> int:
    """The amount after the card type's discount (rounded down to the fen: the rider's favour)."""
    if card_type is None or card_type not in policy.card_types:
        return amount
    return amount * policy.card_types[card_type].percent // 100


def transfer_discount(
    policy: FarePolicy, last: PaidTap | None, place: TapPlace, now: dt.datetime, amount: int
) -> int:
    """The amount after a transfer discount: the previous paid tap within the window, on
    another line (or another mode, as the policy says)."""
    rule = policy.transfer
    if rule is None or last is None or amount == 0:
        return amount
    elapsed = (now - last.when).total_seconds()
    if not 0 <= elapsed <= rule.window_s or last.line == place.line:
        return amount
    if rule.between == "modes":
        before, here = policy.lines.get(last.line), policy.lines.get(place.line)
        if before is None or here is None or before.mode == here.mode:
            return amount
    return max(0, amount - rule.discount)


def daily_cap(policy: FarePolicy, paid_today: int, amount: int) -> int:
    """The amount after the daily cap: nothing beyond the cap in one day on this terminal."""
    if policy.daily_cap is None:
        return amount
    return max(0, min(amount, policy.daily_cap - paid_today))


def monthly_cap(policy: FarePolicy, paid_this_month: int, amount: int) -> int:
    """The amount after the monthly cap: nothing beyond the cap in one calendar month (of the
    policy's time zone) on this terminal."""
    if policy.monthly_cap is None:
        return amount
    return max(0, min(amount, policy.monthly_cap - paid_this_month))


def check_passback(
    policy: FarePolicy, trip: Trip | None, place: TapPlace, now: dt.datetime, entry_type: int
) -> None:
    """Refuse a second entry on the same line within ``anti_passback_s``."""
    if policy.anti_passback_s <= 0 or trip is None or trip.line != place.line:
        return
    if trip.record_type != entry_type:
        return
    elapsed = (now.replace(tzinfo=None) - trip.when).total_seconds()
    if 0 <= elapsed < policy.anti_passback_s:
        raise Passback(f"entry on line {place.line} {elapsed:.0f} s ago")


def _line_and_stop(policy: FarePolicy, line_id: int, stop_id: int) -> tuple[Line, Stop]:
    line = policy.lines.get(line_id)
    if line is None:
        raise NoFare(f"line {line_id} is not in the fare policy")
    stop = line.stop(stop_id)
    if stop is None:
        raise NoFare(f"stop {stop_id} is not on line {line_id}")
    return line, stop


def _discounted(
    policy: FarePolicy, card: CardFacts, place: TapPlace, now: dt.datetime, base: int
) -> tuple[int, int | None]:
    """The amount after the rules, in their order, and the line a transfer discount came
    from (``None``: no transfer discount taken)."""
    amount = card_discount(policy, card.card_type, base)
    transferred = transfer_discount(policy, card.last_paid, place, now, amount)
    origin = card.last_paid.line if card.last_paid and transferred != amount else None
    amount = daily_cap(policy, card.paid_today, transferred)
    amount = monthly_cap(policy, card.paid_this_month, amount)
    return max(0, min(amount, policy.max_fare)), origin


# --- the engine ---------------------------------------------------------------------------


def decide(policy: FarePolicy, card: CardFacts, place: TapPlace, now: dt.datetime) -> FareDecision:
    """What this tap charges. Raises :class:`NoFare` (the tap is refused: the terminal is not
    on the policy's map) or :class:`Passback`."""
    if policy.entry_exit is None or place.role == "single":
        if card.last_trip is not None and _ours(card.last_trip, place):
            check_passback(policy, card.last_trip, place, now, card.last_trip.record_type)
        if policy.mode == "flat":
            base = policy.flat_fare
        else:
            line, stop = _line_and_stop(policy, place.line, place.stop)
            base = max_from(policy, line, stop)  # one tap, no alighting: the dearest ride
        amount, origin = _discounted(policy, card, place, now, base)
        kind = "flat" if policy.mode == "flat" else "single"
        return FareDecision(amount, kind, base, transfer_from=origin)
    return _entry_exit(policy, card, place, now)


def _ours(trip: Trip, place: TapPlace) -> bool:
    """A trip record this system wrote (same city code, where both are known)."""
    return not (place.city and trip.city and trip.city != place.city)


def last_paid_from(trip: Trip | None, place: TapPlace) -> PaidTap | None:
    """The card's newest trip record as a paid tap for the transfer rule (ours only)."""
    if trip is None or not _ours(trip, place):
        return None
    return PaidTap(when=trip.when, line=trip.line, amount=trip.amount)


def transfer_origin(
    policy: FarePolicy, earlier: Trip | None, boarding: Trip, place: TapPlace
) -> PaidTap | None:
    """The trip a boarding-and-alighting trip may be a transfer from: the card's record
    before this trip's boarding, if it is one of ours, finished (an alighting or a single
    tap, not another open boarding: that one met the unfinished rule) and not later than the
    boarding. The transfer rule (:func:`transfer_discount`) then measures its window from that
    record to the boarding, and wants another line (or mode)."""
    rules = policy.entry_exit
    if earlier is None or rules is None or earlier.record_type == rules.entry_record_type:
        return None
    if earlier.when > boarding.when:
        return None
    return last_paid_from(earlier, place)


def boarding_transfer_origin(
    policy: FarePolicy, last_trip: Trip | None, place: TapPlace, now: dt.datetime
) -> int | None:
    """What a boarding writes into a one-record trip layout (CJ/T 166 CAPP, M1 trip block),
    whose alighting tap cannot read the trip before the boarding (the boarding overwrote it):
    the line of the card's previous trip if the transfer rule takes it for a transfer into a
    trip boarded here now (ours, finished, within the window, another line or mode), else
    ``None``. The window is measured to the boarding, as :func:`transfer_origin` measures it
    at the alighting tap of a cyclic file, so both families decide alike."""
    if policy.transfer is None or last_trip is None:
        return None
    boarding = Trip(when=now.replace(tzinfo=None), line=place.line, city=place.city)
    origin = transfer_origin(policy, last_trip, boarding, place)
    if origin is None:
        return None
    if transfer_discount(policy, origin, place, boarding.when, 1) == 1:
        return None  # outside the window, or the same line (mode)
    return origin.line


def earlier_from_boarding(policy: FarePolicy, boarding: Trip | None) -> Trip | None:
    """The trip before a boarding, as a one-record layout keeps it: the finished trip on the
    boarding's ``transfer_from`` line, ending when the boarding began (its window was checked
    at the boarding, :func:`boarding_transfer_origin`). ``None`` when the record names none."""
    rules = policy.entry_exit
    if boarding is None or boarding.transfer_from is None or rules is None:
        return None
    return Trip(
        record_type=rules.exit_record_type,
        line=boarding.transfer_from,
        when=boarding.when,
        city=boarding.city,
    )


def open_entry(policy: FarePolicy, trip: Trip | None, place: TapPlace, now: dt.datetime) -> str:
    """What the card's last trip record means here: ``none`` (no open trip), ``open`` (an
    entry on this line, within the longest trip), ``other_line``, ``stale`` or ``foreign``
    (another city's system wrote it: never taken for one of ours)."""
    rules = policy.entry_exit
    if rules is None or trip is None or trip.record_type != rules.entry_record_type:
        return "none"
    if not _ours(trip, place):
        return "foreign"
    elapsed = (now.replace(tzinfo=None) - trip.when).total_seconds()
    if not 0 <= elapsed <= rules.max_trip_s:
        return "stale"
    return "open" if trip.line == place.line else "other_line"


def unfinished_charge(policy: FarePolicy, trip: Trip) -> tuple[int, str]:
    """What closes a trip that was boarded and never alighted, as the policy says, beyond what
    its boarding already debited (``trip.amount``)."""
    rules = policy.entry_exit
    assert rules is not None
    if rules.unfinished == "host":
        return 0, "host"  # recorded; the host corrects it later
    if rules.unfinished == "penalty":
        return max(0, rules.penalty - trip.amount), "penalty"
    return max(0, policy.max_fare - trip.amount), "max_fare"


def _entry_exit(
    policy: FarePolicy, card: CardFacts, place: TapPlace, now: dt.datetime
) -> FareDecision:
    rules = policy.entry_exit
    assert rules is not None
    line, stop = _line_and_stop(policy, place.line, place.stop)
    trip = card.last_trip
    state = open_entry(policy, trip, place, now)
    notes: list[str] = []
    if state == "foreign":
        notes.append(f"trip record of city {trip.city if trip else ''} ignored")
        state = "none"
    if state == "open" and place.role in ("exit", "both") and trip is not None:
        origin = line.stop(trip.station)
        if origin is None:
            notes.append(f"boarding stop {trip.station} not on line {line.id}")
            extra, rule = unfinished_charge(policy, trip)
            return FareDecision(
                extra, "exit_unfinished", policy.max_fare, rules.exit_record_type, rule,
                notes=tuple(notes),
            )  # fmt: skip
        # The daily cap's sum: on a bus validator (role both) this tap's own terminal took the
        # boarding debit, so it is in ``paid_today`` already; the trip is capped on what was
        # paid before it. An exit gate (role exit) did not take it.
        taken = trip.amount if place.role == "both" else 0  # the monthly cap's sum likewise
        before_trip = card.paid_today - taken
        price, transfer_from = _discounted(
            policy,
            dataclasses.replace(
                card,
                last_paid=transfer_origin(policy, card.earlier_trip, trip, place),
                paid_today=max(0, before_trip),
                paid_this_month=max(0, card.paid_this_month - taken),
            ),
            place,
            trip.when,  # the transfer window runs from the earlier trip to this boarding
            table_price(policy, line, origin, stop),
        )  # the trip's price for this card
        difference = price - trip.amount
        return FareDecision(
            max(0, difference),
            "exit",
            table_price(policy, line, origin, stop),
            rules.exit_record_type,
            refund_due=max(0, -difference),
            notes=tuple(notes),
            transfer_from=transfer_from,
        )
    if state == "open" and place.role == "entry":
        check_passback(policy, trip, place, now, rules.entry_record_type)
    extra, rule = 0, ""
    if state in ("open", "other_line", "stale") and trip is not None:
        extra, rule = unfinished_charge(policy, trip)
        notes.append(f"trip boarded on line {trip.line} stop {trip.station} not alighted")
    if place.role == "exit":
        # Alighting with no open boarding record: the unfinished rule, from this stop.
        if rule:
            return FareDecision(
                extra, "exit_unfinished", policy.max_fare, rules.exit_record_type, rule,
                notes=tuple(notes),
            )  # fmt: skip
        no_entry = _no_boarding(policy, line, stop)
        notes.append("alighting without a boarding record")
        return FareDecision(
            no_entry[0], "exit_without_entry", no_entry[0], rules.exit_record_type,
            no_entry[1], notes=tuple(notes),
        )  # fmt: skip
    ceiling = max_from(policy, line, stop)
    base = ceiling if rules.boarding_debit == "max" else min_fare(policy, line, stop)
    # Only the card type's discount at boarding; transfer and cap are settled at the exit.
    debit = card_discount(policy, card.card_type, base)
    total = debit + extra  # one tap never debits more than max_fare; the rest is the host's
    return FareDecision(
        min(total, policy.max_fare),
        "unfinished_then_entry" if rule else "entry",
        base,
        rules.entry_record_type,
        rule,
        still_owed=max(0, total - policy.max_fare),
        notes=tuple(notes),
        trip_amount=debit if rule else None,
    )


def _no_boarding(policy: FarePolicy, line: Line, stop: Stop) -> tuple[int, str]:
    rules = policy.entry_exit
    assert rules is not None
    if rules.unfinished == "host":
        return 0, "host"
    if rules.unfinished == "penalty":
        return rules.penalty, "penalty"
    return max_from(policy, line, stop), "max_fare"


def settle_trip(charges: Sequence[FareDecision]) -> int:
    """What a sequence of decisions took in all, less what the host owes back."""
    return sum(d.amount for d in charges) - sum(d.refund_due for d in charges)
