"""The transaction engine: one tap, from card in field to a durable, signed record.

::

    read card ─► resolve a pending intent of this card (recovery, cpu-purse.md §6.5)
              ─► qualify ─► double-tap window ─► fare
              ─► INIT (card) ─► 80 70 (SAM: TTC, MAC1)
              ─► store INTENT, durable            ◄── nothing is debited before this commit
              ─► [UPDATE CAPP DATA CACHE] ─► DEBIT (card: TAC, MAC2) ─► 80 72 (SAM)
              ─► INTENT → signed RECORD, durable ─► feedback to the passenger

If the card leaves after the intent is durable, the intent stays. The card's next tap proves
whether the debit happened (its counter moved by one, GET TRANSACTION PROVE) and turns the
intent into a record or voids it; an intent whose card never returns becomes an ``unresolved``
record once the profile's recovery window has passed. No debit is ever repeated for an intent.

This module is the I/O glue: card-product logic lives in :mod:`agent.products.cpu_purse`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import structlog

from agent import crypto
from agent.apdu import Command, Party, Response, parse_response
from agent.errors import (
    AgentError,
    CardError,
    CardProtocolError,
    CardStatusError,
    ReaderError,
    SamError,
    TapRefused,
)
from agent.offline_store import Intent, OfflineStore, Record, RecordBody
from agent.params import ActiveParams
from agent.products import cpu_lock, cpu_purse
from agent.products.cpu_purse import CpuCard, PurchaseInit, Step
from agent.profile import ApplicationProfile, Family, Flow, Profile
from agent.readers.base import CardPresence, CardReader, CardTechnology
from agent.sam.base import PurchaseMacRequest, Sam

if TYPE_CHECKING:
    from agent.transaction_m1 import M1TapHandler

T = TypeVar("T")
log = structlog.get_logger(__name__)


class BlacklistLookup(Protocol):
    """What the engine needs of the blacklist (:class:`agent.blacklist.Blacklist`)."""

    def contains(self, card_id: str) -> bool: ...


PRODUCT_CPU = "cpu"


@dataclass(slots=True)
class TapOutcome:
    """What one tap did. ``status``: paid, recovered, refused, torn, failed."""

    status: str
    card_id: str = ""
    family: str = ""
    fare: int = 0
    balance_after: int | None = None
    record_seq: int | None = None
    reason: str = ""
    phases_ms: dict[str, float] = field(default_factory=dict)
    apdus: int = 0

    @property
    def total_ms(self) -> float:
        return sum(self.phases_ms.values())


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


class _Tap(PhaseTimer):
    """Per-tap bookkeeping: phase timings and the card exchange."""

    def __init__(self, reader: CardReader) -> None:
        super().__init__()
        self.reader = reader
        self.apdus = 0

    def exchange(self, command: Command) -> Response:
        self.apdus += 1
        raw = self.reader.transmit(command.to_bytes())
        return parse_response(raw, command, Party.CARD)

    def run(self, step: Step[T]) -> T:
        return cpu_purse.drive(step, self.exchange)


class TransactionEngine:
    """Runs taps against one SAM and one offline store, under one firmware profile."""

    def __init__(
        self,
        profile: Profile,
        store: OfflineStore,
        sam: Sam,
        *,
        clock: Callable[[], dt.datetime] | None = None,
        blacklist: BlacklistLookup | None = None,
        params: ActiveParams | None = None,
    ) -> None:
        self.profile = profile
        self.store = store
        self.sam = sam
        self.clock = clock or (lambda: dt.datetime.now().astimezone())
        self.blacklist = blacklist
        self.params = params
        self.m1: M1TapHandler | None = None
        if profile.m1_purse:
            from agent.transaction_m1 import M1TapHandler  # noqa: PLC0415 - circular

            self.m1 = M1TapHandler(
                profile,
                store,
                sam,
                blacklist=blacklist,
                fare=lambda: self._profile_in_force().flat_fare,
            )

    # --- the tap ------------------------------------------------------------------------

    def process_tap(self, reader: CardReader, presence: CardPresence) -> TapOutcome:
        """Handle one card in the field. Never raises an :class:`AgentError`."""
        if presence.technology is CardTechnology.MIFARE_CLASSIC and self.m1 is not None:
            return self.m1.process(reader, presence)
        tap = _Tap(reader)
        outcome = TapOutcome(status="failed")
        try:
            outcome = self._tap(tap, outcome)
        except TapRefused as refused:
            outcome.status = "refused"
            outcome.reason = str(refused)
        except AgentError as exc:
            # After the intent is durable any failure leaves it for recovery: the tap is torn.
            outcome.status = "torn" if outcome.status == "in_flight" else "failed"
            outcome.reason = f"{exc.party}: {exc}"
        outcome.phases_ms = tap.phases_ms
        outcome.apdus = tap.apdus
        log_tap(outcome, outcome.card_id or presence.uid.hex().upper())
        self._feedback(reader, outcome)
        return outcome

    def _tap(self, tap: _Tap, outcome: TapOutcome) -> TapOutcome:
        with tap.phase("read"):
            card, app = self._read(tap)
        outcome.card_id, outcome.family = card.card_id, card.family.value
        now = self.clock()
        if card.family is Family.CJT166:
            # CJ/T 166: the PSAM checks the card's security code before any 80 50 (§6.1); any
            # command after INITIALIZE would cancel the card's pending purchase.
            with tap.phase("security_code"):
                self.sam.verify_security_code(tap.run(cpu_purse.get_security_code()))
        recovered_init: PurchaseInit | None = None
        pending = self.store.pending_intents(card.card_id)
        if pending:
            with tap.phase("recover"):
                result = self._recover(tap, card, app.flow, pending, now)
            if isinstance(result, TapOutcome):
                result.card_id, result.family = card.card_id, card.family.value
                return result
            recovered_init = result
        if self.blacklist is not None and self.blacklist.contains(card.card_id):
            with tap.phase("lock"):
                self._lock(tap, card)
        profile = self._profile_in_force()
        with tap.phase("qualify"):
            cpu_purse.qualify(card, profile, now.date())
            check_double_tap(self.store, self.profile, card.card_id, now)
        fare = profile.flat_fare
        outcome.fare = fare
        if card.balance < fare:
            raise TapRefused("insufficient_balance", f"balance {card.balance} < fare {fare}")
        return self._purchase(tap, card, app.flow, fare, now, outcome, recovered_init)

    def _profile_in_force(self) -> Profile:
        """The firmware profile, with the fare and allow-list of a parameter set in force."""
        params = self.params.current() if self.params is not None else None
        if params is None:
            return self.profile
        changes: dict[str, Any] = {}
        if params.flat_fare is not None:
            changes["flat_fare"] = params.flat_fare
        if params.issuer_allow_list is not None:
            changes["issuer_allow_list"] = params.issuer_allow_list
        return dataclasses.replace(self.profile, **changes) if changes else self.profile

    def _lock(self, tap: _Tap, card: CpuCard) -> None:
        """APPLICATION BLOCK through the PSAM (cpu-purse.md §6.6), a lock record, refusal."""
        outcome = tap.run(
            cpu_lock.block_application(
                self.sam,
                card,
                key_index=self.profile.lock_key_index,
                permanent=self.profile.lock_permanent,
            )
        )
        rec = self.store.append_record(cpu_lock.lock_record_body(card, outcome))
        log.warning("card_locked", card=card.card_id, seq=rec.seq, permanent=outcome.permanent)
        raise TapRefused("blacklisted", f"application blocked, record #{rec.seq}")

    def _read(self, tap: _Tap) -> tuple[CpuCard, ApplicationProfile]:
        last_error: CardProtocolError | None = None
        for app in self.profile.applications:
            try:
                fci = tap.run(cpu_purse.select_application(app))
            except cpu_purse.ApplicationNotFound as exc:
                last_error = exc
                continue
            card = tap.run(cpu_purse.read_card(app, fci))
            if card.balance > self.profile.max_balance:
                raise CardProtocolError(
                    f"GET BALANCE: {card.balance} above the plausible maximum "
                    f"{self.profile.max_balance}"
                )
            return card, app
        raise TapRefused("unknown_card", str(last_error) if last_error else "no application")

    # --- purchase -----------------------------------------------------------------------

    def _purchase(
        self,
        tap: _Tap,
        card: CpuCard,
        flow: Flow,
        fare: int,
        now: dt.datetime,
        outcome: TapOutcome,
        init: PurchaseInit | None,
    ) -> TapOutcome:
        terminal = self.sam.terminal_number
        if init is None:
            with tap.phase("init"):
                init = tap.run(
                    cpu_purse.initialize_purchase(
                        flow, self.sam.purchase_key_index, fare, terminal, self.profile.max_balance
                    )
                )
        if init.balance != card.balance:
            raise CardProtocolError(
                f"INITIALIZE FOR PURCHASE: balance {init.balance} differs from GET BALANCE "
                f"{card.balance}"
            )
        when = now.replace(microsecond=0, tzinfo=None)
        datetime7 = crypto.datetime7(when)
        with tap.phase("sam_mac1"):
            mac = self.sam.init_for_purchase(
                PurchaseMacRequest(
                    card_random=init.random,
                    card_counter=init.counter,
                    amount=fare,
                    transaction_type=flow.transaction_type,
                    when=when,
                    key_version=init.key_version,
                    algorithm=init.algorithm,
                    factors=card.factors,
                )
            )
        payload: dict[str, Any] = {
            "family": card.family.value,
            "aid": card.aid.hex().upper(),
            "flow": flow.value,
            "transaction_type": flow.transaction_type,
            "asn": card.asn.hex().upper(),
            "counter": init.counter,
            "amount": fare,
            "balance_before": init.balance,
            "key_version": init.key_version,
            "algorithm": init.algorithm,
            "ttc": mac.ttc,
            "mac1": mac.mac1.hex().upper(),
            "datetime": datetime7.hex(),
            "terminal": terminal.hex().upper(),
            "sam": self.sam.serial,
            "factors": "".join(f.hex().upper() for f in card.factors),
        }
        with tap.phase("intent_commit"):
            intent_id = self.store.add_intent(card.card_id, PRODUCT_CPU, payload)
        outcome.status = "in_flight"  # from here on, a failure leaves the intent for recovery
        balance_after = init.balance - fare
        if flow is Flow.COMPOUND:
            p1, p2, record = cpu_purse.capp_update_for(
                card,
                self.profile,
                terminal=terminal,
                amount=fare,
                balance_after=balance_after,
                datetime7=datetime7,
                industry=0x02,
            )
            with tap.phase("capp"):
                tap.run(cpu_purse.update_capp_cache(p1, p2, record))
        with tap.phase("debit"):
            try:
                debit = tap.run(cpu_purse.debit_for_purchase(mac.ttc, datetime7, mac.mac1))
            except CardStatusError as exc:
                if exc.sw == 0x9302:
                    # MAC1 refused: the card ended the transaction, counters unchanged (§3.3).
                    self.store.void_intent(intent_id, "card refused MAC1 (9302)")
                    outcome.status = "failed"
                raise
        with tap.phase("sam_mac2"):
            mac2_verified = self._credit_sam(debit.mac2, card.card_id)
        with tap.phase("record_commit"):
            rec = self.store.finalize_intent(
                intent_id,
                self._purchase_body(
                    card.card_id,
                    payload,
                    tac=debit.tac,
                    mac2=debit.mac2,
                    mac2_verified=mac2_verified,
                    recovered=False,
                ),
            )
        outcome.status = "paid"
        outcome.balance_after = balance_after
        outcome.record_seq = rec.seq
        return outcome

    def _credit_sam(self, mac2: bytes, card_id: str) -> bool:
        """80 72. The card is already debited, so a SAM failure only flags the record."""
        try:
            self.sam.credit_for_purchase(mac2)
        except SamError as exc:
            log.warning("mac2_unverified", card=card_id, error=str(exc), party=exc.party)
            return False
        return True

    @staticmethod
    def _purchase_body(
        card_id: str,
        payload: dict[str, Any],
        *,
        tac: bytes,
        mac2: bytes,
        mac2_verified: bool,
        recovered: bool,
    ) -> RecordBody:
        amount = int(payload["amount"])
        fields: dict[str, str | int | bool | None] = {
            "product": PRODUCT_CPU,
            "family": payload["family"],
            "transaction_type": payload["transaction_type"],
            "asn": payload["asn"],
            "counter": payload["counter"],
            "balance_before": payload["balance_before"],
            "balance_after": int(payload["balance_before"]) - amount,
            "ttc": payload["ttc"],
            "terminal": payload["terminal"],
            "sam": payload["sam"],
            "datetime": payload["datetime"],
            "factors": payload.get("factors"),
            "key_version": payload["key_version"],
            "algorithm": payload["algorithm"],
            "tac": tac.hex().upper(),
            "mac2": mac2.hex().upper(),
            "mac2_verified": mac2_verified,
            "recovered": recovered,
        }
        return RecordBody(kind="purchase", card_id=card_id, amount=amount, fields=fields)

    # --- recovery (cpu-purse.md §6.5) --------------------------------------------------

    def _recover(
        self,
        tap: _Tap,
        card: CpuCard,
        flow: Flow,
        pending: list[Intent],
        now: dt.datetime,
    ) -> TapOutcome | PurchaseInit | None:
        """Resolve this card's pending intent.

        Returns a finished outcome when the pending debit had happened (the passenger has paid),
        or the INIT answer to reuse for a fresh purchase when it had not (``None`` if that INIT
        cannot be reused).
        """
        *older, intent = sorted(pending, key=lambda i: i.id)
        for stale in older:  # only the newest attempt can still be proven on the card
            self._to_unresolved(stale, "superseded by a later attempt on the same card")
        p = intent.payload
        intent_flow = Flow(p["flow"])
        fare = self._profile_in_force().flat_fare
        probe_amount = fare if intent_flow is flow and card.balance >= fare else 0
        init = tap.run(
            cpu_purse.initialize_purchase(
                intent_flow,
                self.sam.purchase_key_index,
                probe_amount,
                self.sam.terminal_number,
                self.profile.max_balance,
            )
        )
        stored = int(p["counter"])
        if init.counter == stored:
            self.store.void_intent(intent.id, "card counter unchanged: the debit did not happen")
            log.info("intent_voided", card=card.card_id, intent=intent.id, counter=stored)
            return init if probe_amount == fare else None
        if init.counter != (stored + 1) & 0xFFFF:
            reason = f"card counter {init.counter} where {stored} or {stored + 1} was expected"
            self._to_unresolved(intent, reason)
            if init.counter < stored:
                raise CardProtocolError(f"INITIALIZE FOR PURCHASE: counter went back: {reason}")
            return None
        expected_balance = int(p["balance_before"]) - int(p["amount"])
        if init.balance != expected_balance:
            self._to_unresolved(
                intent, f"debit happened but balance is {init.balance}, not {expected_balance}"
            )
            raise CardProtocolError(
                f"INITIALIZE FOR PURCHASE: balance moved the wrong way ({init.balance}, "
                f"expected {expected_balance})"
            )
        proof = tap.run(cpu_purse.get_transaction_prove(int(p["transaction_type"]), init.counter))
        mac2_verified = self._credit_sam(proof.mac, card.card_id)
        rec = self.store.finalize_intent(
            intent.id,
            self._purchase_body(
                card.card_id,
                p,
                tac=proof.tac,
                mac2=proof.mac,
                mac2_verified=mac2_verified,
                recovered=True,
            ),
        )
        log.info("intent_recovered", card=card.card_id, intent=intent.id, seq=rec.seq)
        return TapOutcome(
            status="recovered",
            fare=int(p["amount"]),
            balance_after=expected_balance,
            record_seq=rec.seq,
        )

    def _to_unresolved(self, intent: Intent, reason: str) -> Record:
        rec = self.store.finalize_intent(intent.id, unresolved_body(intent, reason))
        log.warning("intent_unresolved", card=intent.card_id, intent=intent.id, reason=reason)
        return rec

    def expire_stale_intents(self) -> list[Record]:
        """Turn intents older than the recovery window into ``unresolved`` records."""
        cutoff = self.clock().astimezone(dt.UTC) - dt.timedelta(
            seconds=self.profile.recovery_window_s
        )
        reason = f"card did not return within {self.profile.recovery_window_s:.0f} s"
        records = self.store.expire_intents(cutoff, lambda i: unresolved_body(i, reason))
        for rec in records:
            log.warning("intent_expired", card=rec.card_id, seq=rec.seq, reason=reason)
        return records

    # --- output -------------------------------------------------------------------------

    @staticmethod
    def _feedback(reader: CardReader, outcome: TapOutcome) -> None:
        if outcome.status in ("paid", "recovered"):
            text = f"OK {outcome.fare / 100:.2f}  余额 {(outcome.balance_after or 0) / 100:.2f}"
            ok = True
        elif outcome.status == "torn":
            text, ok = "请重刷 tap again", False
        elif outcome.reason.startswith("double_tap"):
            text, ok = "已付 already paid", True
        else:
            text, ok = f"拒绝 {outcome.reason.split(':')[0]}", False
        try:
            reader.feedback(ok, text)
        except (ReaderError, CardError) as exc:
            log.warning("feedback_failed", error=str(exc))


def log_tap(outcome: TapOutcome, card: str, commands: str = "apdus") -> None:
    """The one structured log line per tap, with the latency of every phase."""
    fields: dict[str, Any] = {
        "status": outcome.status,
        "card": card,
        "family": outcome.family,
        "fare": outcome.fare,
        "balance_after": outcome.balance_after,
        "seq": outcome.record_seq,
        commands: outcome.apdus,
        "total_ms": round(outcome.total_ms, 2),
        **{f"{k}_ms": round(v, 2) for k, v in outcome.phases_ms.items()},
    }
    if outcome.status in ("paid", "recovered"):
        log.info("tap", **fields)
    else:
        log.warning("tap", reason=outcome.reason, **fields)


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


def unresolved_body(intent: Intent, reason: str) -> RecordBody:
    """The record an intent becomes when the debit can be neither proven nor disproven."""
    p = intent.payload
    fields: dict[str, str | int | bool | None] = {
        "product": intent.product,
        "reason": reason,
        "intent_id": intent.id,
        "intent_created_at": intent.created_at.isoformat(),
    }
    for key in (
        "family",
        "transaction_type",
        "asn",
        "counter",
        "balance_before",
        "ttc",
        "terminal",
        "sam",
        "datetime",
        "mac1",
    ):
        if key in p:
            fields[key] = p[key]
    return RecordBody(
        kind="unresolved", card_id=intent.card_id, amount=int(p.get("amount", 0)), fields=fields
    )
