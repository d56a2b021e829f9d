"""The M1 (MIFARE Classic) purse product handler (m1-purse-and-readers.md §3).

::

    issuance (sector 1, UID key) ─► identified ─► sector keys (PSAM 80 FC / 80 1A+FA / software)
      ─► read purse P/B + public info P/B ─► classify (§3.5) ─► repair if interrupted
      ─► settle this card's pending intents (debit: counter + balance; lock: the flag)
      ─► blacklisted, flag not set: journaled flag write into pubP/pubB, lock record, refuse
      ─► qualify (dates, enable flag, city, card type, flag) ─► double tap ─► fare
      ─► journal: INTENT ─► debit A..F with read-backs ─► TAC through the PSAM ─► RECORD

The card-product logic (layout, codecs, the debit order, the recovery table) lives in
:mod:`agent.products`; this module carries its operations out on a storage-card reader.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import structlog

from agent.errors import (
    CardProtocolError,
    ConfigurationError,
    ReaderError,
    SamError,
    TapRefused,
)
from agent.offline_store import Intent, RecordBody
from agent.products import cpu_logs, m1_lock, m1_purse
from agent.products.cpu_logs import Trip
from agent.products.cpu_recovery import encode_fare_fields
from agent.products.intents import OP_LOCK, Decision, IntentPayloadError, Verdict, intent_op
from agent.products.m1_codec import Issuance, TripRecord
from agent.products.m1_layout import M1Layout
from agent.products.m1_purse import (
    Authenticate,
    Classification,
    Decrement,
    Increment,
    M1Session,
    M1Step,
    Operation,
    PurseState,
    Read,
    Recovery,
    Restore,
    TacInput,
    Transfer,
    Write,
)
from agent.products.m1_recovery import M1PurchaseIntent, judge_lock, judge_purchase
from agent.profile import Profile
from agent.readers.base import CardPresence, CardTechnology
from agent.readers.storage import StorageCardReader
from agent.sam.base import Sam
from agent.sam.m1_keys import M1KeyProvider, key_provider_for
from agent.tap.context import TapContext, with_merchant
from agent.tap.outcome import TapStatus

T = TypeVar("T")
log = structlog.get_logger("agent.tap.m1")

PRODUCT_M1 = "m1"
FAMILY_M1 = "m1"
KEY_SLOT = 0x00


def execute(reader: StorageCardReader, op: Operation) -> bytes | None:
    """Carry one purse-machine operation out on a storage-card reader."""
    if isinstance(op, Read):
        return reader.read_block(op.block)
    if isinstance(op, Authenticate):
        reader.load_key(KEY_SLOT, op.key)
        reader.authenticate(op.block, op.key_type, KEY_SLOT)
    elif isinstance(op, Write):
        reader.write_block(op.block, op.data)
    elif isinstance(op, Decrement):
        reader.decrement(op.block, op.value)
    elif isinstance(op, Increment):
        reader.increment(op.block, op.value)
    elif isinstance(op, Restore):
        reader.restore(op.block)
    elif isinstance(op, Transfer):
        reader.transfer(op.block)
    return None


class _Operator:
    """The storage-card operations of one tap, counted."""

    def __init__(self, reader: StorageCardReader) -> None:
        self.reader = reader
        self.ops = 0

    def execute(self, op: Operation) -> bytes | None:
        self.ops += 1
        return execute(self.reader, op)

    def run(self, step: M1Step[T], session: M1Session | None = None) -> T:
        return m1_purse.drive(step, self.execute, session)


@dataclass(slots=True)
class _Card:
    """One M1 card as this tap has read (and, if needed, repaired) it."""

    card_id: str  # the UID in hex: M1 cards are known by UID (the blacklist's key too)
    uid: bytes
    uid4: bytes
    issuance: Issuance
    sam: Sam
    session: M1Session
    state: PurseState
    classification: Classification
    io: _Operator

    def run(self, step: M1Step[T]) -> T:
        return self.io.run(step, self.session)

    @property
    def uid4_hex(self) -> str:
        return self.uid4.hex().upper()

    @property
    def serial_hex(self) -> str:
        return self.issuance.serial.hex().upper()


class M1Handler:
    """Debit and lock of M1 purses under one profile's ``[m1_purse]`` layout."""

    product = PRODUCT_M1
    commands = "ops"

    def __init__(
        self,
        profile: Profile,
        *,
        layout: M1Layout | None = None,
        key_provider: Callable[[Sam], M1KeyProvider] | None = None,
    ) -> None:
        if layout is None:
            if not profile.m1_purse:
                raise ConfigurationError(f"{profile.source}: no [m1_purse] section")
            layout = M1Layout.from_mapping(profile.m1_purse, f"{profile.source} m1_purse")
        self.layout = layout
        production = profile.is_production
        self.key_provider = key_provider or (
            lambda sam: key_provider_for(layout, sam, production=production)
        )

    def accepts(self, presence: CardPresence) -> bool:
        return presence.technology is CardTechnology.MIFARE_CLASSIC

    def tap(self, ctx: TapContext) -> None:
        ctx.outcome.family = FAMILY_M1
        ctx.outcome.card_id = ctx.presence.uid.hex().upper()
        if not isinstance(ctx.reader, StorageCardReader):
            raise ReaderError(f"reader {ctx.reader.name} cannot operate MIFARE Classic cards")
        card_io = _Operator(ctx.reader)
        try:
            self._tap(ctx, card_io)
        finally:
            ctx.outcome.apdus = card_io.ops

    def _tap(self, ctx: TapContext, card_io: _Operator) -> None:
        card = self._read(ctx, card_io)
        state = card.state
        pending = ctx.store.pending_intents(card.card_id)
        locks = [i for i in pending if intent_op(i.payload) == OP_LOCK]
        debits = [i for i in pending if intent_op(i.payload) != OP_LOCK]
        if debits:
            with ctx.phase("recover"):
                if self._resolve(ctx, card, debits):
                    return
        if locks:
            with ctx.phase("recover"):
                self._resolve_lock(ctx, card, locks)
        if not m1_lock.is_flagged(self.layout, state.pub_p) and ctx.blacklisted(
            card.card_id, city=card.issuance.city_code.hex().upper()
        ):
            with ctx.phase("lock"):
                self._lock(ctx, card)
        with ctx.phase("qualify"):
            m1_purse.qualify(
                self.layout, card.issuance, state, ctx.now.date(), ctx.profile.max_balance
            )
            ctx.check_double_tap(card.card_id)
        # The M1 card type (issuance sector, ``[m1_purse]`` layout) prices like the CPU card's:
        # the policy's card_types discounts apply; the last trip (boarding, transfer origin)
        # comes from the trip block when the policy looks at it (issue 13).
        last_trip: Trip | None = None
        if self._keeps_trip(ctx):
            with ctx.phase("trip"):
                last_trip = self._last_trip(card)
        fare = ctx.fare(
            card_type=card.issuance.card_type,
            last_trip=last_trip,
            keeps_trip_state=self._keeps_trip(ctx) and self.layout.trip.layout.type_at >= 0,
        )
        balance = state.purse_p
        assert balance is not None and state.pub_p is not None
        if balance < fare:
            raise TapRefused("insufficient_balance", f"balance {balance} < fare {fare}")
        self._purchase(ctx, card, fare)

    def _keeps_trip(self, ctx: TapContext) -> bool:
        """The trip block is read and written only while the fare looks at the last trip."""
        return self.layout.trip.enabled and ctx.needs_trip()

    def _last_trip(self, card: _Card) -> Trip | None:
        """The card's last trip from its trip block (``[m1_purse.trip]``). Not used, and logged,
        when it cannot be trusted: a block the layout cannot read (another system's, damaged),
        or a card whose last debit was torn after the purse and before the "done" flag write
        began, rolled forward here (recovery B/C: that debit's trip block write may not have
        landed, and no journal of this terminal holds it; recovery D, a tear in the flag
        write itself, comes after the trip block was read back). The fare is then that of a
        card with no trip record, as for a CPU card whose trip record is unreadable; the
        record's fare kind says so."""
        layout = self.layout
        kind = card.classification.kind
        if kind is Recovery.BC:
            log.warning(
                "fare_trip_untrusted", card_id=card.card_id, recovery=kind.value,
                reason="last debit torn before its trip block was confirmed",
            )  # fmt: skip
            return None
        raw = card.run(m1_purse.read_trip(layout, card.session))
        try:
            return cpu_logs.parse_trip(layout.trip.layout, raw)
        except CardProtocolError as exc:
            log.warning("fare_trip_unreadable", card_id=card.card_id, error=str(exc))
            return None

    def _trip_block(self, ctx: TapContext, fare: int, when: dt.datetime) -> bytes | None:
        """The trip block this tap writes (``None``: the fare does not read one)."""
        if not self._keeps_trip(ctx) or ctx.place is None:
            return None
        trips = self.layout.trip.layout
        decision = ctx.fare_decision
        trip = cpu_logs.Trip(
            record_type=(decision.record_type if decision else 0) or trips.record_type,
            line=ctx.place.line,
            station=ctx.place.stop,
            amount=decision.record_amount if decision else fare,
            when=when,
            city=ctx.place.city or ctx.profile.operator_city,
            transfer_from=ctx.trip_transfer_from,
        )
        return cpu_logs.build_trip(trips, trip)

    def _read(self, ctx: TapContext, card_io: _Operator) -> _Card:
        """Issuance, identity, keys, purse and public info; an interrupted debit is repaired
        to one consistent purse (§3.5) before anything else looks at it."""
        layout = self.layout
        card_id = ctx.outcome.card_id
        uid4 = m1_purse.auth_uid(ctx.presence.uid)
        with ctx.phase("read"):
            if layout.directory_check:
                card_io.run(m1_purse.check_directory(layout))
            issuance = card_io.run(m1_purse.read_issuance(layout, uid4))
        ctx.identified(card_id, FAMILY_M1)
        sam = ctx.sam(FAMILY_M1)
        with ctx.phase("keys"):
            session = self._session(sam, uid4, issuance)
        with ctx.phase("read"):
            state = card_io.run(m1_purse.read_state(layout, session), session)
        classification = m1_purse.classify(state, layout)
        if classification.kind is Recovery.BROKEN:
            raise TapRefused("card_damaged", classification.reason)
        if classification.kind is not Recovery.NORMAL:
            with ctx.phase("repair"):
                log.info("m1_repair", card=card_id, recovery=classification.kind.value)
                state = card_io.run(m1_purse.repair(layout, session, classification), session)
        return _Card(
            card_id=card_id,
            uid=ctx.presence.uid,
            uid4=uid4,
            issuance=issuance,
            sam=sam,
            session=session,
            state=state,
            classification=classification,
            io=card_io,
        )

    def _session(self, sam: Sam, uid4: bytes, issuance: Issuance) -> M1Session:
        layout = self.layout
        sectors = layout.sectors_in_use()
        keys = self.key_provider(sam).sector_keys(uid4, issuance, sectors)
        return M1Session(keys, layout.keys.key_type)

    # --- blacklist lock (§3.1 public-info byte 6) -------------------------------------------

    def _lock(self, ctx: TapContext, card: _Card) -> None:
        """Journal the lock, set the flag in pubP and pubB, record it, refuse the tap."""
        plan = m1_lock.plan_lock(self.layout, card.state)
        payload = m1_lock.lock_payload(
            self.layout,
            plan,
            uid=card.uid,
            uid4=card.uid4,
            issuance=card.issuance,
            profile=ctx.profile.name,
            terminal=card.sam.terminal_number,
            sam=card.sam.serial,
            when=ctx.now.replace(microsecond=0, tzinfo=None).strftime("%Y%m%d%H%M%S"),
        )
        _, rec = ctx.journaled(
            PRODUCT_M1,
            payload,
            lambda: card.run(m1_lock.set_blacklist_flag(self.layout, card.session, plan)),
            lambda _: m1_lock.lock_record_body(card.card_id, payload),
        )
        ctx.outcome.record_seq = rec.seq
        log.warning("card_locked", card=card.card_id, seq=rec.seq, flag=f"{plan.flag:02X}")
        raise TapRefused("blacklisted", f"blacklist flag set, record #{rec.seq}")

    def _resolve_lock(self, ctx: TapContext, card: _Card, pending: list[Intent]) -> None:
        """Settle this card's pending lock: a proven lock refuses the tap."""
        intent = ctx.journal.newest(pending)
        decision = judge_lock(
            intent.payload,
            uid4=card.uid4_hex,
            serial=card.serial_hex,
            flagged=m1_lock.is_flagged(self.layout, card.state.pub_p),
            recovery=card.classification.kind.value,
        )
        body = m1_lock.lock_record_body(card.card_id, intent.payload, card.classification)
        rec = ctx.journal.settle(intent, decision, body)
        if decision.verdict is Verdict.FINALIZE and rec is not None:
            ctx.outcome.record_seq = rec.seq
            raise TapRefused("blacklisted", f"blacklist flag set (completed), record #{rec.seq}")

    # --- purchase -----------------------------------------------------------------------

    def _purchase(self, ctx: TapContext, card: _Card, fare: int) -> None:
        layout, state, issuance = self.layout, card.state, card.issuance
        when = ctx.now.replace(microsecond=0, tzinfo=None)
        terminal = card.sam.terminal_number
        assert state.purse_p is not None
        record = TripRecord(
            when=(when.day, when.hour, when.minute, when.second),
            balance_before=state.purse_p,
            amount=fare,
            kind=layout.record_type,
            device=bytes(terminal[-4:]),
        )
        trip = self._trip_block(ctx, fare, when)
        plan = m1_purse.plan_debit(layout, state, fare, record, trip)
        with ctx.phase("precheck"):
            card.run(m1_purse.check_record_sector(layout, card.session, plan.pointer))
            if trip is not None:
                card.run(m1_purse.check_trip_sector(layout, card.session))
        intent = M1PurchaseIntent(
            family=FAMILY_M1,
            uid4=card.uid4_hex,
            city=issuance.city_code.hex().upper(),
            serial=card.serial_hex,
            card_number=issuance.card_number,
            card_type=issuance.card_type,
            counter_before=plan.counter_before,
            counter=plan.counter_after,
            balance_before=plan.balance_before,
            amount=plan.amount,
            record_slot=plan.pointer,
            datetime=when.strftime("%Y%m%d%H%M%S"),
            terminal=terminal.hex().upper(),
            sam=card.sam.serial,
            fare=encode_fare_fields(ctx.fare_fields()),
            trip="" if trip is None else trip.hex().upper(),
        )

        def operation() -> tuple[int, str, str]:
            with ctx.phase("debit"):
                balance_after = card.io.run(
                    m1_purse.debit(layout, card.session, plan), card.session
                )
            with ctx.phase("tac"):
                tac, tac_error = self._tac(card.sam, intent)
            return balance_after, tac, tac_error

        (balance_after, _, _), rec = ctx.journaled(
            PRODUCT_M1,
            intent.to_payload(),
            operation,
            lambda done: self._record_body(card.card_id, intent, done[1], done[2], None),
        )
        ctx.outcome.status = TapStatus.PAID
        ctx.outcome.balance_after = balance_after
        ctx.outcome.record_seq = rec.seq

    def _tac(self, sam: Sam, intent: M1PurchaseIntent) -> tuple[str, str]:
        """Record TAC through the PSAM; the card is already debited, so a SAM failure only
        leaves the record without TAC (and says why)."""
        config = self.layout.tac
        if not config.enabled:
            return "", "disabled by profile"
        text = intent.datetime
        data = TacInput(
            amount=intent.amount,
            when=(
                int(text[0:4]),
                int(text[4:6]),
                int(text[6:8]),
                int(text[8:10]),
                int(text[10:12]),
                int(text[12:14]),
            ),
            counter=intent.counter,
            terminal=bytes.fromhex(intent.terminal),
            serial=bytes.fromhex(intent.serial),
            balance_before=intent.balance_before,
            uid4=bytes.fromhex(intent.uid4),
            city=bytes.fromhex(intent.city),
        )
        message = m1_purse.tac_message(config, data)
        try:
            sam.cipher_init(config.p1, config.p2, m1_purse.tac_factors(config, data))
            tac = sam.cipher_mac(m1_purse.tac_mac_data(config, message))
        except SamError as exc:
            log.warning("m1_tac_failed", card=intent.uid4, error=str(exc), party=exc.party)
            return "", str(exc)
        return tac.hex().upper(), ""

    def _record_body(
        self,
        card_id: str,
        intent: M1PurchaseIntent,
        tac: str,
        tac_error: str,
        recovery: Classification | None,
    ) -> RecordBody:
        fields: dict[str, str | int | bool | None] = {
            "product": PRODUCT_M1,
            "family": FAMILY_M1,
            "uid4": intent.uid4,
            "city": intent.city,
            "serial": intent.serial,
            "card_number": intent.card_number,
            "card_type": intent.card_type,
            "counter": intent.counter,
            "balance_before": intent.balance_before,
            "balance_after": intent.balance_after,
            "record_slot": intent.record_slot,
            "terminal": intent.terminal,
            "sam": intent.sam,
            "datetime": intent.datetime,
            "tac": tac,
            "tac_fields": ",".join(self.layout.tac.fields),
            "tac_error": tac_error,
            "recovered": recovery is not None,
            "recovery": "" if recovery is None else recovery.kind.value,
        }
        fields.update({k: v for k, v in intent.fare_fields().items() if v is not None})
        return RecordBody(kind="purchase", card_id=card_id, amount=intent.amount, fields=fields)

    # --- recovery (§3.5 rule 3: a re-tap completes rather than repeats) --------------------

    def _resolve(self, ctx: TapContext, card: _Card, pending: list[Intent]) -> bool:
        """Settle this card's pending debit against the repaired card. ``True`` when it had
        happened (the passenger has paid; the outcome says so), ``False`` when a fresh debit
        may follow (voided or unresolved)."""
        intent = ctx.journal.newest(pending)
        state = card.state
        assert state.pub_p is not None and state.purse_p is not None
        try:
            stored = M1PurchaseIntent.from_payload(intent.payload)
        except IntentPayloadError as exc:
            ctx.journal.settle(intent, Decision(Verdict.UNRESOLVED, f"intent unreadable: {exc}"))
            return False
        decision = judge_purchase(
            stored,
            uid4=card.uid4_hex,
            serial=card.serial_hex,
            counter=state.pub_p.counter,
            balance=state.purse_p,
            recovery=card.classification.kind.value,
        )
        if decision.verdict is not Verdict.FINALIZE:
            ctx.journal.settle(intent, decision)
            return False
        if stored.trip and self.layout.trip.enabled:
            # The debit happened; its trip block may not have (torn before C'): write it as
            # the journal has it, before the intent is settled (a tear here leaves the intent
            # for the next tap, which judges the same and writes again).
            block = bytes.fromhex(stored.trip)
            if card.run(m1_purse.read_trip(self.layout, card.session)) != block:
                with ctx.phase("trip"):
                    card.run(m1_purse.write_trip(self.layout, card.session, block))
                log.info("m1_trip_restored", card=card.card_id, counter=stored.counter)
        tac, tac_error = self._tac(card.sam, stored)
        body = self._record_body(card.card_id, stored, tac, tac_error, card.classification)
        rec = ctx.journal.settle(intent, decision, with_merchant(body, ctx.profile))
        outcome = ctx.outcome
        outcome.status = TapStatus.RECOVERED
        outcome.fare = stored.amount
        outcome.balance_after = state.purse_p
        outcome.record_seq = rec.seq if rec is not None else None
        return True
