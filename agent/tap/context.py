"""What a product handler gets for one tap: the card, the clock, the SAM routes, the journal,
and the engine's shared policy (presence, blacklist, parameters in force, fare, double tap)."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

import structlog

from agent.errors import AgentError, SamUnavailable, TapRefused
from agent.merchant import MERCHANT_CATEGORY_FIELD, MERCHANT_ID_FIELD
from agent.offline_store import OfflineStore, Record, RecordBody
from agent.presence import PresenceGuard
from agent.products.cpu_logs import Trip
from agent.products.fare_policy import FarePolicy, NoFare, month_start
from agent.products.fares import (
    CardFacts,
    FareDecision,
    Passback,
    TapPlace,
    boarding_transfer_origin,
    decide,
    earlier_from_boarding,
    last_paid_from,
)
from agent.products.intents import OP_LOCK, intent_op
from agent.profile import Profile
from agent.readers.base import CardPresence, CardReader
from agent.sam.base import Sam
from agent.tap.journal import Journal
from agent.tap.outcome import PhaseTimer, TapOutcome

T = TypeVar("T")
log = structlog.get_logger(__name__)


class BlacklistLookup(Protocol):
    """What the engine needs of the blacklist (:class:`agent.blacklist.Blacklist`)."""

    def contains(self, card_id: str) -> bool: ...


@runtime_checkable
class PrintedLookup(Protocol):
    """A blacklist that also lists printed card numbers, in a key space of their own and
    scoped by issuer (:class:`agent.blacklist.CardBlacklist`)."""

    def contains_printed(self, issuer: str, number: str) -> bool: ...


@runtime_checkable
class ExpiringList(Protocol):
    """A blacklist that knows when it expires (:class:`agent.blacklist.Blacklist` does)."""

    version: int
    expires_at: int

    def is_expired(self, now: float | None = None) -> bool: ...


class SamRoutes(Protocol):
    """Which SAM (slot and PSAM application) serves a card family or product."""

    def sam_for(self, route: str) -> Sam: ...


def check_double_tap(store: OfflineStore, profile: Profile, card_id: str, now: dt.datetime) -> None:
    """Refuse a card that paid within the profile's double-tap window (any product)."""
    window = profile.double_tap_window_s
    if window <= 0:
        return
    last = store.last_record_for_card(card_id, kinds=("purchase",))
    if last is None:
        return
    paid_at = dt.datetime.fromisoformat(last.created_at.replace("Z", "+00:00"))
    if (now - paid_at).total_seconds() < window:
        raise TapRefused("double_tap", f"paid {(now - paid_at).total_seconds():.1f} s ago")


@dataclass(slots=True)
class TapContext:
    """One tap in progress. ``profile`` is the firmware profile with the parameter set in
    force applied (fare, issuer allow-list); handlers read policy from here only."""

    reader: CardReader
    presence: CardPresence
    outcome: TapOutcome
    timer: PhaseTimer
    now: dt.datetime
    profile: Profile
    store: OfflineStore
    journal: Journal
    sams: SamRoutes
    guard: PresenceGuard
    blacklist: BlacklistLookup | None
    fare_for: Callable[[Profile], int]
    # The fare policy of the parameter set in force (None: the flat fare of ``fare_for``) and
    # where the validator is now (line, stop from GPS or the driver's console, role).
    fare_policy: FarePolicy | None = None
    place: TapPlace | None = None
    fare_decision: FareDecision | None = None  # set by fare() under a policy: for the records
    # A boarding's transfer origin, for a one-record trip layout (set by fare(); the handler
    # writes it into the card's trip record: fares.boarding_transfer_origin).
    trip_transfer_from: int | None = None

    def phase(self, name: str) -> AbstractContextManager[None]:
        return self.timer.phase(name)

    def identified(self, card_id: str, family: str) -> None:
        """The card is known: refuse it if it is the card still in the field from the last
        tap (a card whose UID changes per activation is recognised here by its serial)."""
        self.outcome.card_id, self.outcome.family = card_id, family
        self.guard.admit_card(card_id)

    def sam(self, route: str) -> Sam:
        """The SAM the profile routes ``route`` to. A missing or mute one refuses this card's
        family (the other families keep working); the router retries the slot later."""
        try:
            return self.sams.sam_for(route)
        except SamUnavailable as exc:
            raise TapRefused("sam_unavailable", str(exc)) from exc

    def blacklisted(
        self,
        card_id: str,
        *,
        issuer: str = "",
        city: str = "",
        printed_number: str = "",
        printed_issuer: str = "",
    ) -> bool:
        """True if the card is listed (the handler locks it): by its serial ``card_id``, or by
        its ``printed_number`` in the printed-number list, among the entries of its own issuer
        ``printed_issuer`` (``CpuCard.issuer_code``) only. A card not listed while the
        list has expired meets the profile's ``[blacklist] expired_policy``: kept with an
        alarm, or refused ``blacklist_expired`` (all cards, or those of the listed issuers)."""
        if self.blacklist is None:
            return False
        if self.blacklist.contains(card_id):
            return True  # a listed card is locked on any list, expired or not
        if (
            printed_number
            and isinstance(self.blacklist, PrintedLookup)
            and self.blacklist.contains_printed(printed_issuer, printed_number)
        ):
            log.info(
                "blacklisted_by_printed_number",
                card_id=card_id,
                issuer=printed_issuer,
                printed=printed_number,
            )
            return True
        listed = self.blacklist
        if not isinstance(listed, ExpiringList) or not listed.is_expired(self.now.timestamp()):
            return False
        policy = self.profile.blacklist_expired_policy
        refused = policy == "refuse_all" or (
            policy == "refuse_issuers"
            and any(
                (issuer and issuer.startswith(entry)) or city == entry
                for entry in self.profile.blacklist_expired_refuse_issuers
            )
        )
        log.warning(
            "blacklist_expired_alarm",
            policy=policy,
            version=listed.version,
            expired_s=round(self.now.timestamp() - listed.expires_at),
            card_id=card_id,
            refused=refused,
        )
        if refused:
            raise TapRefused(
                "blacklist_expired",
                f"blacklist version {listed.version} expired; policy {policy} refuses this card",
            )
        return False

    def check_double_tap(self, card_id: str) -> None:
        check_double_tap(self.store, self.profile, card_id, self.now)

    def journaled(
        self,
        product: str,
        payload: Mapping[str, Any],
        operation: Callable[[], T],
        record: Callable[[T], RecordBody],
        *,
        nothing_changed: Callable[[AgentError], str | None] = lambda _exc: None,
    ) -> tuple[T, Record]:
        """Run ``operation`` on the identified card under the journal (:meth:`Journal.execute`).
        A purchase record of a merchant's terminal carries the merchant (:mod:`agent.merchant`)."""
        profile = self.profile

        def tagged(result: T) -> RecordBody:
            return with_merchant(record(result), profile)

        if intent_op(payload) != OP_LOCK:  # an unresolved record names the merchant too
            payload = {**payload, **merchant_fields(profile)}
        return self.journal.execute(
            self.timer,
            self.outcome,
            self.outcome.card_id,
            product,
            payload,
            operation,
            tagged,
            nothing_changed=nothing_changed,
        )

    def needs_trip(self) -> bool:
        """Whether the fare depends on the card's last trip record (transfer, passback,
        entry/exit): the handler reads it before anything that would cancel a purchase."""
        policy = self.fare_policy
        return policy is not None and (
            policy.transfer is not None
            or policy.anti_passback_s > 0
            or policy.entry_exit is not None
        )

    def trips_needed(self) -> int:
        """How many of the card's newest trip records the fare reads: none without a rule that
        looks at them; two under an entry/exit policy with transfers (at an alighting tap the
        newest is the trip's own boarding, the one before it the trip it may transfer from);
        else one."""
        if not self.needs_trip():
            return 0
        policy = self.fare_policy
        assert policy is not None
        return 2 if policy.entry_exit is not None and policy.transfer is not None else 1

    def fare(
        self,
        *,
        card_type: int | None = None,
        last_trip: Trip | None = None,
        earlier_trip: Trip | None = None,
        keeps_trip_state: bool = False,
    ) -> int:
        """The amount this tap takes: the fare policy in force (:func:`fares.decide`, from
        the card's type and last trip record and the validator's position), else the flat
        fare of the profile in force. A policy that has no price here refuses the tap
        (``no_fare``), never a silent zero; a second entry too soon is ``passback``.

        ``keeps_trip_state``: the card's trip record says boarding or alighting (its layout has
        a record type: T-Union EF1E, the CJ/T 166 CAPP record, the M1 trip block; a simple-flow
        CPU application writes none). A card that cannot pays under an entry/exit policy as a
        single tap (the dearest ride from here), logged ``fare_no_trip_state``. A one-record
        layout's boarding names the trip it may transfer from (``trip_transfer_from``)."""
        policy, place = self.fare_policy, self.place
        if policy is None:
            fare = self.fare_for(self.profile)
        elif place is None:
            raise TapRefused("no_fare", "fare policy in force but the validator's position unknown")
        else:
            if policy.entry_exit is not None and not keeps_trip_state and place.role != "single":
                log.info("fare_no_trip_state", line=place.line, stop=place.stop)
                place = dataclasses.replace(place, role="single")
            if earlier_trip is None:  # a one-record layout keeps it in the boarding record
                earlier_trip = earlier_from_boarding(policy, last_trip)
            card = CardFacts(
                card_type=card_type,
                last_trip=last_trip,
                earlier_trip=earlier_trip,
                last_paid=last_paid_from(last_trip, place),
                paid_today=self._paid_today(policy),
                paid_this_month=self._paid_this_month(policy),
            )
            try:
                decision = decide(policy, card, place, self.now.replace(tzinfo=None))
            except NoFare as exc:
                log.error("fare_no_price", line=place.line, stop=place.stop, error=str(exc))
                raise TapRefused("no_fare", str(exc)) from None
            except Passback as exc:
                raise TapRefused("passback", str(exc)) from None
            log.info(
                "fare_decided",
                kind=decision.kind,
                base=decision.base,
                amount=decision.amount,
                card_type=card_type,
                line=place.line,
                stop=place.stop,
                unfinished=decision.unfinished or None,
                notes=list(decision.notes) or None,
            )
            fare, self.fare_decision = decision.amount, decision
            rules = policy.entry_exit
            if rules is not None and decision.record_type == rules.entry_record_type:
                self.trip_transfer_from = boarding_transfer_origin(
                    policy, last_trip, place, self.now.replace(tzinfo=None)
                )
        self.outcome.fare = fare
        return fare

    def _paid_today(self, policy: FarePolicy) -> int:
        """The daily cap's accumulator: this terminal's own purchase records for the card since
        local midnight (a terminal cannot see what other terminals charged)."""
        if policy.daily_cap is None or not self.outcome.card_id:
            return 0
        midnight = self.now.replace(hour=0, minute=0, second=0, microsecond=0)
        return self.store.purchases_since(self.outcome.card_id, midnight)

    def _paid_this_month(self, policy: FarePolicy) -> int:
        """The monthly cap's accumulator: this terminal's own purchase records for the card
        since the month began in the policy's time zone (``fare_policy.month_start``)."""
        if policy.monthly_cap is None or not self.outcome.card_id:
            return 0
        return self.store.purchases_since(self.outcome.card_id, month_start(policy, self.now))

    def fare_fields(self) -> dict[str, str | int | bool | None]:
        """What the purchase record says of the fare decision (empty without a policy): the
        rule applied to an unfinished trip is recorded as such, for the host."""
        decision, place = self.fare_decision, self.place
        if decision is None or place is None:
            return {}
        return {
            "fare_kind": decision.kind,
            "fare_base": decision.base,
            "fare_line": place.line,
            "fare_stop": place.stop,
            "fare_unfinished": decision.unfinished or None,
            "fare_refund_due": decision.refund_due or None,
            "fare_still_owed": decision.still_owed or None,
            "fare_transfer_from": decision.transfer_from,
        }


def with_merchant(body: RecordBody, profile: Profile) -> RecordBody:
    """A purchase ``body`` with the profile's merchant among its signed fields (issue 11);
    any other body, or a profile without ``[merchant]``, unchanged."""
    if body.kind != "purchase" or not profile.merchant_id:
        return body
    return dataclasses.replace(body, fields={**body.fields, **merchant_fields(profile)})


def merchant_fields(profile: Profile) -> dict[str, str]:
    """``merchant_id`` / ``merchant_category`` of the profile's ``[merchant]`` (or nothing)."""
    if not profile.merchant_id:
        return {}
    return {
        MERCHANT_ID_FIELD: profile.merchant_id,
        MERCHANT_CATEGORY_FIELD: profile.merchant_category,
    }
