"""The CPU purse product handler: T-Union, CJ/T 166 and ADF 1001 cards (cpu-purse.md).

::

    SELECT / read (EF15, EF17, GET BALANCE) ─► identified (presence by serial)
      ─► [CJ/T 166: 80 CA security code through the PSAM, §6.1]
      ─► settle this card's pending intents (lock, then purchase: §6.5)
      ─► blacklisted: journaled APPLICATION BLOCK through the PSAM (§6.6), lock record, refuse
      ─► qualify ─► double tap ─► fare
      ─► INIT (card) ─► 80 70 (PSAM: TTC, MAC1)
      ─► journal: INTENT ─► [UPDATE CAPP DATA CACHE] ─► DEBIT (TAC, MAC2) ─► 80 72 ─► RECORD

The PSAM of each tap is the one the profile routes the card's family to. The card-product
logic (commands, parsing, qualification, the recovery table) lives in :mod:`agent.products`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import structlog

from agent import crypto
from agent.apdu import Command, Party, Response, parse_response
from agent.errors import (
    AgentError,
    CardProtocolError,
    CardStatusError,
    SamError,
    TapRefused,
)
from agent.offline_store import Intent, RecordBody
from agent.products import cpu_lock, cpu_logs, cpu_purse
from agent.products.cpu_purse import CpuCard, PurchaseInit, Step
from agent.products.cpu_recovery import (
    CpuLockIntent,
    CpuPurchaseIntent,
    encode_fare_fields,
    judge_lock,
    judge_purchase,
)
from agent.products.intents import OP_LOCK, Decision, IntentPayloadError, Verdict, intent_op
from agent.profile import ApplicationProfile, Family, Flow
from agent.readers.base import CardPresence, CardTechnology
from agent.sam.base import PurchaseMacRequest, Sam
from agent.tap.context import TapContext, with_merchant
from agent.tap.outcome import TapOutcome, TapStatus

T = TypeVar("T")
log = structlog.get_logger("agent.tap.cpu")

PRODUCT_CPU = "cpu"


class CpuHandler:
    """Purchase and lock on CPU purse applications, in the order the profile lists them."""

    product = PRODUCT_CPU
    commands = "apdus"

    def accepts(self, presence: CardPresence) -> bool:
        return presence.technology is not CardTechnology.MIFARE_CLASSIC

    def tap(self, ctx: TapContext) -> None:
        exchanger = _Exchanger(ctx)
        try:
            self._tap(ctx, exchanger)
        finally:
            ctx.outcome.apdus = exchanger.apdus

    def _tap(self, ctx: TapContext, card_io: _Exchanger) -> None:
        with ctx.phase("read"):
            card, app = self._read(ctx, card_io)
        ctx.identified(card.card_id, card.family.value)
        trips: list[cpu_logs.Trip] = []
        if ctx.needs_trip():
            with ctx.phase("trip"):  # before any INITIALIZE (a later command would cancel it)
                trips = self._last_trips(ctx, card_io, card, ctx.trips_needed())
        ctx.outcome.printed_number = card.printed_number
        sam = ctx.sam(card.family.value)
        if card.family is Family.CJT166:
            # CJ/T 166: the PSAM checks the card's security code before any 80 50 (§6.1); any
            # command after INITIALIZE would cancel the card's pending purchase.
            with ctx.phase("security_code"):
                sam.verify_security_code(card_io.run(cpu_purse.get_security_code()))
        reusable: PurchaseInit | None = None
        pending = ctx.store.pending_intents(card.card_id)
        locks = [i for i in pending if intent_op(i.payload) == OP_LOCK]
        purchases = [i for i in pending if intent_op(i.payload) != OP_LOCK]
        if locks:
            with ctx.phase("recover"):
                # The application selected normally, so a journaled lock did not happen.
                ctx.journal.settle(ctx.journal.newest(locks), judge_lock(blocked=False))
        if purchases:
            with ctx.phase("recover"):
                recovered = self._recover(ctx, card_io, sam, card, app.flow, purchases)
            if isinstance(recovered, TapOutcome):
                return
            reusable = recovered
        if ctx.blacklisted(
            card.card_id,
            issuer=card.issuer_id.hex().upper(),
            city=card.city_code,
            printed_number=card.printed_number,
            printed_issuer=card.issuer_code,
        ):
            with ctx.phase("lock"):
                self._lock(ctx, card_io, sam, card)
        with ctx.phase("qualify"):
            cpu_purse.qualify(card, ctx.profile, ctx.now.date())
            ctx.check_double_tap(card.card_id)
        layout = cpu_purse.dialect_of(card, ctx.profile).trips
        fare = ctx.fare(
            card_type=card.card_type,
            last_trip=trips[0] if trips else None,
            earlier_trip=trips[1] if len(trips) > 1 else None,
            keeps_trip_state=app.flow is Flow.COMPOUND
            and layout is not None
            and layout.type_at >= 0,
        )
        if card.balance < fare:
            raise TapRefused("insufficient_balance", f"balance {card.balance} < fare {fare}")
        if reusable is not None and fare != ctx.fare_for(ctx.profile):
            reusable = None  # that INITIALIZE was for the flat probe amount, not this fare
        self._purchase(ctx, card_io, sam, card, app.flow, fare, reusable, app.ef1e_industry)

    @staticmethod
    def _last_trips(
        ctx: TapContext, card_io: _Exchanger, card: CpuCard, count: int
    ) -> list[cpu_logs.Trip]:
        """The card's ``count`` newest trip records (EF1E / CAPP, by its dialect; the CAPP
        record is one), newest first, for the fare. Records the layout cannot read (another
        system's, damaged) are logged and not used: the fare is then that of a card with no
        trip (no transfer discount, no open boarding)."""
        layout = cpu_purse.dialect_of(card, ctx.profile).trips
        if layout is None:
            return []
        ident = layout.identifier if layout.by_identifier else 0
        count = 1 if layout.by_identifier else min(count, layout.records)
        try:
            records = card_io.run(
                cpu_logs.read_records(layout.sfi, count, 0x00, by_identifier=ident)
            )
            return cpu_logs.parse_trips(layout, records)
        except (CardProtocolError, CardStatusError) as exc:  # a lost card still tears the tap
            log.warning("fare_trip_unreadable", card_id=card.card_id, error=str(exc))
            return []

    def _read(self, ctx: TapContext, card_io: _Exchanger) -> tuple[CpuCard, ApplicationProfile]:
        last_error: CardProtocolError | None = None
        for app in ctx.profile.applications:
            try:
                fci = card_io.run(cpu_purse.select_application(app))
            except cpu_purse.ApplicationNotFound as exc:
                last_error = exc
                continue
            except TapRefused as refused:
                if refused.reason == "card_locked":
                    self._blocked(ctx, refused)
                raise
            card = card_io.run(cpu_purse.read_card(app, fci, ctx.profile.dialects))
            if card.balance > ctx.profile.max_balance:
                raise CardProtocolError(
                    f"GET BALANCE: {card.balance} above the plausible maximum "
                    f"{ctx.profile.max_balance}"
                )
            return card, app
        raise TapRefused("unknown_card", str(last_error) if last_error else "no application")

    def _blocked(self, ctx: TapContext, error: TapRefused) -> None:
        """A blocked application: if this terminal journaled a lock of this card (by UID) that
        was torn, the block proves it and the intent becomes the lock record."""
        uid = ctx.presence.uid.hex().upper()
        for intent in ctx.store.pending_intents():
            if intent.product != PRODUCT_CPU or intent_op(intent.payload) != OP_LOCK:
                continue
            try:
                lock = CpuLockIntent.from_payload(intent.payload)
            except IntentPayloadError:
                continue
            if lock.uid == uid:
                break
        else:
            return
        ctx.outcome.card_id, ctx.outcome.family = intent.card_id, lock.family
        body = _lock_body(intent.card_id, lock, "", "", recovered=True)
        rec = ctx.journal.settle(intent, judge_lock(blocked=True), body)
        seq = f", record #{rec.seq}" if rec is not None else ""
        raise TapRefused("blacklisted", f"application blocked (completed){seq}") from error

    # --- blacklist lock (§6.6) ----------------------------------------------------------

    def _lock(self, ctx: TapContext, card_io: _Exchanger, sam: Sam, card: CpuCard) -> None:
        """Journaled APPLICATION BLOCK through the PSAM, a lock record, refusal."""
        profile = ctx.profile
        algorithm = self._lock_algorithm(ctx, card_io, sam, card)
        p2 = cpu_lock.P2_PERMANENT if profile.lock_permanent else cpu_lock.P2_TEMPORARY
        intent = CpuLockIntent(
            family=card.family.value,
            aid=card.aid.hex().upper(),
            asn=card.asn.hex().upper(),
            uid=ctx.presence.uid.hex().upper(),
            p2=p2,
            terminal=sam.terminal_number.hex().upper(),
            sam=sam.serial,
        )

        def operation() -> cpu_lock.LockOutcome:
            challenge = card_io.run(cpu_lock.get_challenge())
            sam.cipher_init(cpu_lock.MAINTENANCE_KEY_USAGE, profile.lock_key_index, card.factors)
            block = 16 if algorithm is crypto.Algorithm.SM4 else 8
            mac = sam.cipher_mac(cpu_lock.block_mac_input(challenge, p2, block=block))[:4]
            card_io.run(cpu_lock.application_block(mac, p2))
            return cpu_lock.LockOutcome(card.card_id, challenge, mac, p2)

        done, rec = ctx.journaled(
            PRODUCT_CPU,
            intent.to_payload(),
            operation,
            lambda lock: _lock_body(
                card.card_id,
                intent,
                lock.challenge.hex().upper(),
                lock.mac.hex().upper(),
                printed_number=card.printed_number,
            ),
            nothing_changed=_refused_by_card_or_sam,
        )
        ctx.outcome.record_seq = rec.seq
        log.warning("card_locked", card=card.card_id, seq=rec.seq, permanent=done.permanent)
        raise TapRefused("blacklisted", f"application blocked, record #{rec.seq}")

    @staticmethod
    def _lock_algorithm(
        ctx: TapContext, card_io: _Exchanger, sam: Sam, card: CpuCard
    ) -> crypto.Algorithm:
        """The block cipher of the card's keys: the profile's, or what INITIALIZE FOR PURCHASE
        reports (an INIT without DEBIT changes nothing on the card, §3.1)."""
        configured = ctx.profile.lock_algorithm
        if configured != "card":
            return crypto.Algorithm.SM4 if configured == "sm4" else crypto.Algorithm.TDES
        app_flow = Flow.SIMPLE
        probe = card_io.run(
            cpu_purse.initialize_purchase(
                app_flow,
                sam.purchase_key_index,
                0,
                sam.terminal_number,
                ctx.profile.max_balance,
                card.purse,
            )
        )
        return crypto.Algorithm(probe.algorithm)

    # --- purchase -----------------------------------------------------------------------

    def _purchase(
        self,
        ctx: TapContext,
        card_io: _Exchanger,
        sam: Sam,
        card: CpuCard,
        flow: Flow,
        fare: int,
        init: PurchaseInit | None,
        industry: int = 0x02,  # the trip record's industry (EF1E byte 9; profile ef1e_industry)
    ) -> None:
        terminal = sam.terminal_number
        if init is None:
            with ctx.phase("init"):
                init = card_io.run(
                    cpu_purse.initialize_purchase(
                        flow,
                        sam.purchase_key_index,
                        fare,
                        terminal,
                        ctx.profile.max_balance,
                        card.purse,
                    )
                )
        if init.balance != card.balance:
            raise CardProtocolError(
                f"INITIALIZE FOR PURCHASE: balance {init.balance} differs from GET BALANCE "
                f"{card.balance}"
            )
        when = ctx.now.replace(microsecond=0, tzinfo=None)
        datetime7 = crypto.datetime7(when)
        with ctx.phase("sam_mac1"):
            mac = sam.init_for_purchase(
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
        intent = CpuPurchaseIntent(
            family=card.family.value,
            aid=card.aid.hex().upper(),
            flow=flow.value,
            transaction_type=flow.transaction_type,
            asn=card.asn.hex().upper(),
            counter=init.counter,
            amount=fare,
            balance_before=init.balance,
            key_version=init.key_version,
            algorithm=init.algorithm,
            ttc=mac.ttc,
            mac1=mac.mac1.hex().upper(),
            datetime=datetime7.hex(),
            terminal=terminal.hex().upper(),
            sam=sam.serial,
            factors="".join(f.hex().upper() for f in card.factors),
            fare=encode_fare_fields(ctx.fare_fields()),
        )

        def operation() -> tuple[cpu_purse.Debit, bool]:
            if flow is Flow.COMPOUND:
                p1, p2, record = cpu_purse.capp_update_for(
                    card,
                    ctx.profile,
                    terminal=terminal,
                    # the trip's own part of the debit (a boarding that also closed an
                    # unfinished trip: without that trip's charge), for the alighting tap
                    amount=ctx.fare_decision.record_amount if ctx.fare_decision else fare,
                    balance_after=intent.balance_after,
                    datetime7=datetime7,
                    industry=industry,
                    line=ctx.place.line if ctx.place else None,
                    station=ctx.place.stop if ctx.place else None,
                    record_type=ctx.fare_decision.record_type if ctx.fare_decision else 0,
                    transfer_from=ctx.trip_transfer_from,
                )
                with ctx.phase("capp"):
                    card_io.run(cpu_purse.update_capp_cache(p1, p2, record))
            with ctx.phase("debit"):
                debit = card_io.run(cpu_purse.debit_for_purchase(mac.ttc, datetime7, mac.mac1))
            with ctx.phase("sam_mac2"):
                verified = _credit_sam(sam, debit.mac2, card.card_id)
            return debit, verified

        _, rec = ctx.journaled(
            PRODUCT_CPU,
            intent.to_payload(),
            operation,
            lambda done: _purchase_body(
                card.card_id,
                intent,
                tac=done[0].tac,
                mac2=done[0].mac2,
                mac2_verified=done[1],
                printed_number=card.printed_number,
                fare=ctx.fare_fields(),
            ),
            nothing_changed=_mac1_refused,
        )
        ctx.outcome.status = TapStatus.PAID
        ctx.outcome.balance_after = intent.balance_after
        ctx.outcome.record_seq = rec.seq

    # --- recovery (§6.5) ----------------------------------------------------------------

    def _recover(
        self,
        ctx: TapContext,
        card_io: _Exchanger,
        sam: Sam,
        card: CpuCard,
        flow: Flow,
        pending: list[Intent],
    ) -> TapOutcome | PurchaseInit | None:
        """Settle this card's pending purchase.

        Returns the finished outcome when the debit had happened (the passenger has paid), or
        the INIT answer to reuse for a fresh purchase when it had not (``None`` if that INIT
        cannot be reused).
        """
        intent = ctx.journal.newest(pending)
        try:
            stored = CpuPurchaseIntent.from_payload(intent.payload)
            intent_flow = Flow(stored.flow)
        except (IntentPayloadError, ValueError) as exc:
            ctx.journal.settle(intent, Decision(Verdict.UNRESOLVED, f"intent unreadable: {exc}"))
            return None
        fare = ctx.fare_for(ctx.profile)
        probe_amount = fare if intent_flow is flow and card.balance >= fare else 0
        init = card_io.run(
            cpu_purse.initialize_purchase(
                intent_flow,
                sam.purchase_key_index,
                probe_amount,
                sam.terminal_number,
                ctx.profile.max_balance,
                card.purse,
            )
        )
        decision = judge_purchase(stored, init.counter, init.balance)
        if decision.verdict is Verdict.FINALIZE:
            proof = card_io.run(
                cpu_purse.get_transaction_prove(stored.transaction_type, init.counter)
            )
            verified = _credit_sam(sam, proof.mac, card.card_id)
            rec = ctx.journal.settle(
                intent,
                decision,
                with_merchant(
                    _purchase_body(
                        card.card_id,
                        stored,
                        tac=proof.tac,
                        mac2=proof.mac,
                        mac2_verified=verified,
                        recovered=True,
                        printed_number=card.printed_number,
                        fare=stored.fare_fields(),
                    ),
                    ctx.profile,
                ),
            )
            outcome = ctx.outcome
            outcome.status = TapStatus.RECOVERED
            outcome.fare = stored.amount
            outcome.balance_after = stored.balance_after
            outcome.record_seq = rec.seq if rec is not None else None
            return outcome
        ctx.journal.settle(intent, decision)
        if decision.card_fault:
            raise CardProtocolError(decision.card_fault)
        if decision.verdict is Verdict.VOID and probe_amount == fare:
            return init
        return None


class _Exchanger:
    """The card exchange of one tap, counting APDUs."""

    def __init__(self, ctx: TapContext) -> None:
        self.reader = ctx.reader
        self.apdus = 0

    def exchange(self, command: Command) -> Response:
        self.apdus += 1
        raw = self.reader.transmit(command.to_bytes())
        return parse_response(raw, command, Party.CARD)

    def run(self, step: Step[T]) -> T:
        return cpu_purse.drive(step, self.exchange)


def _credit_sam(sam: Sam, mac2: bytes, card_id: str) -> bool:
    """80 72. The card is already debited, so a SAM failure only flags the record."""
    try:
        sam.credit_for_purchase(mac2)
    except SamError as exc:
        log.warning("mac2_unverified", card=card_id, error=str(exc), party=exc.party)
        return False
    return True


def _mac1_refused(exc: AgentError) -> str | None:
    """9302 to DEBIT: the card refused MAC1 and ended the transaction, counters unchanged."""
    if isinstance(exc, CardStatusError) and exc.sw == 0x9302:
        return "card refused MAC1 (9302)"
    return None


def _refused_by_card_or_sam(exc: AgentError) -> str | None:
    """A lock that failed with the card's or the PSAM's refusal did not block anything."""
    if isinstance(exc, CardStatusError | SamError):
        return f"lock refused: {exc}"
    return None


def _purchase_body(
    card_id: str,
    intent: CpuPurchaseIntent,
    *,
    tac: bytes,
    mac2: bytes,
    mac2_verified: bool,
    recovered: bool = False,
    printed_number: str = "",
    fare: Mapping[str, str | int | bool | None] | None = None,
) -> RecordBody:
    """The purchase record. ``printed_number`` (issue 15) is the number printed on the card;
    records made before it existed simply lack the field (the signature covers what is there)."""
    fields: dict[str, str | int | bool | None] = {
        "product": PRODUCT_CPU,
        "family": intent.family,
        "transaction_type": intent.transaction_type,
        "asn": intent.asn,
        "counter": intent.counter,
        "balance_before": intent.balance_before,
        "balance_after": intent.balance_after,
        "ttc": intent.ttc,
        "terminal": intent.terminal,
        "sam": intent.sam,
        "datetime": intent.datetime,
        "factors": intent.factors or None,
        "key_version": intent.key_version,
        "algorithm": intent.algorithm,
        "tac": tac.hex().upper(),
        "mac2": mac2.hex().upper(),
        "mac2_verified": mac2_verified,
        "recovered": recovered,
    }
    if printed_number:
        fields["printed_number"] = printed_number
    fields.update({k: v for k, v in (fare or {}).items() if v is not None})
    return RecordBody(kind="purchase", card_id=card_id, amount=intent.amount, fields=fields)


def _lock_body(
    card_id: str,
    intent: CpuLockIntent,
    challenge: str,
    mac: str,
    *,
    recovered: bool = False,
    printed_number: str = "",
) -> RecordBody:
    """The record a lock leaves (S3 ``ID_REC_BLKLIST``): kind ``lock``, amount 0."""
    fields: dict[str, Any] = {
        "product": PRODUCT_CPU,
        "family": intent.family,
        "asn": intent.asn,
        "aid": intent.aid,
        "lock": "permanent" if intent.p2 == cpu_lock.P2_PERMANENT else "temporary",
        "challenge": challenge,
        "mac": mac,
        "terminal": intent.terminal,
        "sam": intent.sam,
        "reason": "blacklisted",
        "recovered": recovered,
    }
    if printed_number:
        fields["printed_number"] = printed_number
    return RecordBody(kind="lock", card_id=card_id, amount=0, fields=fields)
