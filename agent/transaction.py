"""The transaction engine: one tap, from a card in the field to a durable, signed record.

::

    presence ─► the product handler for the card's technology (CPU purse, M1 purse)
             ─► the handler reads the card, identifies it, settles its pending intents, and
                runs its operation through the journal (intent ─► card ─► record)
             ─► one tap log line with the latency of every phase ─► feedback to the passenger

The engine owns what every product shares: card presence (a card that stays in the field is
never processed twice), the blacklist, the parameter set in force, the fare, the double-tap
window, the SAM routes, the journal, feedback and the tap log line. A handler owns its card
conversation (a sans-I/O step machine in :mod:`agent.products`) and its recovery table.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import structlog

from agent.clock import ClockGuard, record_stamp
from agent.errors import AgentError, CardError, ReaderError, TapRefused
from agent.offline_store import OfflineStore, Record
from agent.params import ActiveParams
from agent.position import SiteSettings, profile_place
from agent.presence import PresenceGuard
from agent.products.fare_policy import FarePolicy
from agent.products.fares import TapPlace
from agent.profile import Profile
from agent.readers.base import CardPresence, CardReader
from agent.sam.base import Sam
from agent.sam.router import SamRouter, SingleSamRouter
from agent.tap.context import BlacklistLookup, SamRoutes, TapContext, check_double_tap
from agent.tap.cpu import PRODUCT_CPU, CpuHandler
from agent.tap.journal import Journal, unresolved_body
from agent.tap.m1 import M1Handler
from agent.tap.outcome import PhaseTimer, TapOutcome, TapStatus, feedback_for, log_tap

__all__ = [
    "PRODUCT_CPU",
    "BlacklistLookup",
    "PhaseTimer",
    "ProductHandler",
    "TapOutcome",
    "TapStatus",
    "TransactionEngine",
    "check_double_tap",
    "log_tap",
    "unresolved_body",
]

log = structlog.get_logger(__name__)


class ProductHandler(Protocol):
    """One card product: which presences it takes, and its tap."""

    product: str
    commands: str  # what the tap log line counts: "apdus" or "ops"

    def accepts(self, presence: CardPresence) -> bool: ...

    def tap(self, ctx: TapContext) -> None:
        """Fill ``ctx.outcome``; raise :class:`TapRefused` to refuse, an AgentError on faults."""
        ...


def flat_fare(profile: Profile) -> int:
    return profile.flat_fare


class TransactionEngine:
    """Runs taps under one firmware profile against one offline store and the SAMs it routes.

    ``sam`` is one :class:`Sam` serving every card family, or a :class:`SamRouter`.
    """

    def __init__(
        self,
        profile: Profile,
        store: OfflineStore,
        sam: Sam | SamRouter,
        *,
        clock: Callable[[], dt.datetime] | None = None,
        blacklist: BlacklistLookup | None = None,
        params: ActiveParams | None = None,
        handlers: Sequence[ProductHandler] | None = None,
        presence: PresenceGuard | None = None,
        clock_guard: ClockGuard | None = None,
    ) -> None:
        self.profile = profile
        self.store = store
        self.sams: SamRoutes = sam if isinstance(sam, SamRouter) else SingleSamRouter(sam)
        self.clock = clock or (lambda: dt.datetime.now().astimezone())
        # With a guard (the production loop: agent.runner), the tap's time and every record's
        # time and ``clock`` field come from it, and [clock] policy applies (agent.clock).
        self.clock_guard = clock_guard
        if clock_guard is not None:
            store.set_stamp(record_stamp(clock_guard))
        self.blacklist = blacklist
        self.params = params
        self.journal = Journal(store)
        self.presence = presence or PresenceGuard()
        self.fare_for: Callable[[Profile], int] = flat_fare
        # The technician's terminal settings (line, stop, vehicle, institution) over the
        # profile's, read every tap (agent.position: the runner watches settings.json).
        self.site: Callable[[], SiteSettings] = SiteSettings
        # Where the validator is, for the fare policy and the trip record: the settings' (else
        # the profile's) line and stop unless a GPS or driver-console feed replaces this
        # (agent.position.PositionFile: position.json first).
        self.position: Callable[[], TapPlace | None] = lambda: profile_place(
            self.site().apply(self.profile)
        )
        if handlers is None:
            handlers = [CpuHandler()]
            if profile.m1_purse:
                handlers.insert(0, M1Handler(profile))
        self.handlers = list(handlers)

    def process_tap(self, reader: CardReader, presence: CardPresence) -> TapOutcome:
        """Handle one card in the field. Never raises an :class:`AgentError`."""
        timer = PhaseTimer()
        outcome = TapOutcome(status=TapStatus.FAILED)
        handler = next((h for h in self.handlers if h.accepts(presence)), None)
        commands = handler.commands if handler is not None else "apdus"
        try:
            self.presence.admit(presence)
            if handler is None:
                raise TapRefused("unknown_card", f"no product for {presence.technology.value}")
            now = self._now_for_tap()
            profile, policy = self.policy_in_force()
            handler.tap(
                TapContext(
                    reader=reader,
                    presence=presence,
                    outcome=outcome,
                    timer=timer,
                    now=now,
                    profile=profile,
                    store=self.store,
                    journal=self.journal,
                    sams=self.sams,
                    guard=self.presence,
                    blacklist=self.blacklist,
                    fare_for=self.fare_for,
                    fare_policy=policy,
                    # the fare policy's place, and the line and stop of the card's trip record
                    place=self.position(),
                )
            )
        except TapRefused as refused:
            outcome.status = TapStatus.REFUSED
            outcome.reason = str(refused)
        except AgentError as exc:
            # After the intent is durable any failure leaves it for recovery: the tap is torn.
            torn = outcome.status == TapStatus.IN_FLIGHT
            outcome.status = TapStatus.TORN if torn else TapStatus.FAILED
            outcome.reason = f"{exc.party}: {exc}"
        if outcome.status != TapStatus.TORN and outcome.refusal != "still_present":
            # A torn tap is not "processed": if the card is reported again before a removal
            # could be seen (a reader reconnect mid-tap), its next tap settles the intent and
            # never debits twice (the journal); anything else waits for the card to leave.
            self.presence.processed(presence.uid, outcome.card_id)
        outcome.phases_ms = timer.phases_ms
        log_tap(outcome, outcome.card_id or presence.uid.hex().upper(), commands=commands)
        self._feedback(reader, outcome)
        return outcome

    def _now_for_tap(self) -> dt.datetime:
        """The tap's time; with a guard, a suspect clock under ``refuse`` refuses the tap."""
        if self.clock_guard is None:
            return self.clock()
        reading = self.clock_guard.read()
        if not reading.ok and self.clock_guard.refuses:
            raise TapRefused("clock_unreliable", reading.reason)
        return reading.now

    def profile_in_force(self) -> Profile:
        """The firmware profile, with the fare and allow-list of a parameter set in force."""
        return self.policy_in_force()[0]

    def policy_in_force(self) -> tuple[Profile, FarePolicy | None]:
        """:meth:`profile_in_force` and the fare policy of the set in force. A fare hook other
        than the flat fare (a POS amount) takes precedence over the policy."""
        base = self.site().apply(self.profile)
        params = self.params.current() if self.params is not None else None
        if params is None:
            return base, None
        policy = params.fare_policy if self.fare_for is flat_fare else None
        changes: dict[str, Any] = {}
        if params.flat_fare is not None:
            changes["flat_fare"] = params.flat_fare
        if params.issuer_allow_list is not None:
            changes["issuer_allow_list"] = params.issuer_allow_list
        return (dataclasses.replace(base, **changes) if changes else base), policy

    def expire_stale_intents(self) -> list[Record]:
        """Turn intents older than the recovery window into ``unresolved`` records."""
        window = self.profile.recovery_window_s
        now = self.clock() if self.clock_guard is None else self.clock_guard.now()
        cutoff = now.astimezone(dt.UTC) - dt.timedelta(seconds=window)
        return self.journal.expire(cutoff, f"card did not return within {window:.0f} s")

    @staticmethod
    def _feedback(reader: CardReader, outcome: TapOutcome) -> None:
        shown = feedback_for(outcome)
        if shown is None:
            return
        try:
            reader.feedback(*shown)
        except (ReaderError, CardError) as exc:
            log.warning("feedback_failed", error=str(exc))
