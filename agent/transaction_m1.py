"""One tap of an M1 (MIFARE Classic) purse card, with the CPU engine's journal discipline.

::

    issuance (sector 1, UID key) ─► sector keys (PSAM 80 FC / 80 1A+FA / software)
      ─► read purse P/B + public info P/B ─► classify (§3.5) ─► repair if interrupted
      ─► resolve this card's pending intent (counter + balance prove the debit or not)
      ─► blacklisted on the agent's list, flag not set: INTENT, flag into pubP/pubB, RECORD, refuse
      ─► qualify (enable flag, city, card type, blacklist flag) ─► double tap ─► fare
      ─► store INTENT, durable                ◄── nothing is written to the card before this
      ─► debit A..F (public flag 01, DEC+TRANSFER, record, flag 02, pubB, P→B), read-backs
      ─► TAC through the PSAM (80 1A / 80 FA 05 00) ─► INTENT → signed RECORD ─► feedback

A torn debit leaves the intent. The card's next tap is classified and repaired to one
consistent purse (old or new balance, both copies equal), and the purse counter and balance
prove whether the journaled debit happened: the intent becomes a record (``recovered``) or is
voided. A blacklist lock (public-info byte 6, :mod:`agent.products.m1_lock`) is journaled the
same way: the flag found set on the next tap proves it, clear disproves it. References are to
``shared/spec/m1-purse-and-readers.md``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any, TypeVar

import structlog

import agent.transaction as engine
from agent.errors import (
    AgentError,
    CardProtocolError,
    ConfigurationError,
    ReaderError,
    SamError,
    TapRefused,
)
from agent.offline_store import Intent, OfflineStore, Record, RecordBody
from agent.products import m1_lock, m1_purse
from agent.products.m1_codec import Issuance, TripRecord
from agent.products.m1_keys import M1KeyProvider, key_provider_for
from agent.products.m1_layout import KEY_ROLES, M1Layout
from agent.products.m1_purse import (
    Authenticate,
    Classification,
    DebitPlan,
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
from agent.profile import Profile
from agent.readers.base import CardPresence, CardReader
from agent.readers.storage import StorageCardReader
from agent.sam.base import Sam

T = TypeVar("T")
log = structlog.get_logger(__name__)

PRODUCT_M1 = "m1"
FAMILY_M1 = "m1"
KEY_SLOT = 0x00

_ENABLE_REFUSALS = {0x01: "not_enabled", 0x03: "stopped", 0x04: "blacklisted"}


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


class _Tap(engine.PhaseTimer):
    """Per-tap bookkeeping: phase timings and the operations sent to the card."""

    def __init__(self, reader: StorageCardReader) -> None:
        super().__init__()
        self.reader = reader
        self.ops = 0

    def execute(self, op: Operation) -> bytes | None:
        self.ops += 1
        return execute(self.reader, op)

    def run(self, step: M1Step[T], session: M1Session | None = None) -> T:
        return m1_purse.drive(step, self.execute, session)


class M1TapHandler:
    """Runs M1 purse taps against one SAM and one offline store, under one profile."""

    def __init__(
        self,
        profile: Profile,
        store: OfflineStore,
        sam: Sam,
        key_provider: M1KeyProvider | None = None,
        *,
        layout: M1Layout | None = None,
        clock: Callable[[], dt.datetime] | None = None,
        blacklist: engine.BlacklistLookup | None = None,
        fare: Callable[[], int] | None = None,
    ) -> None:
        if layout is None:
            if not profile.m1_purse:
                raise ConfigurationError(f"{profile.source}: no [m1_purse] section")
            layout = M1Layout.from_mapping(profile.m1_purse, f"{profile.source} m1_purse")
        self.profile = profile
        self.layout = layout
        self.store = store
        self.sam = sam
        self.key_provider = key_provider or key_provider_for(
            layout, sam, production=profile.is_production
        )
        self.clock = clock or (lambda: dt.datetime.now().astimezone())
        self.blacklist = blacklist  # keyed by the UID hex (``CardPresence.uid``), as card_id
        self.fare = fare or (lambda: profile.flat_fare)  # the engine's fare in force

    # --- the tap ------------------------------------------------------------------------

    def process(self, reader: CardReader, presence: CardPresence) -> engine.TapOutcome:
        """Handle one M1 card in the field. Never raises an :class:`AgentError`."""
        outcome = engine.TapOutcome(status="failed", family=FAMILY_M1)
        outcome.card_id = presence.uid.hex().upper()
        tap: _Tap | None = None
        try:
            if not isinstance(reader, StorageCardReader):
                raise ReaderError(f"reader {reader.name} cannot operate MIFARE Classic cards")
            tap = _Tap(reader)
            outcome = self._tap(tap, presence, outcome)
        except TapRefused as refused:
            outcome.status = "refused"
            outcome.reason = str(refused)
        except AgentError as exc:
            outcome.status = "torn" if outcome.status == "in_flight" else "failed"
            outcome.reason = f"{exc.party}: {exc}"
        if tap is not None:
            outcome.phases_ms = tap.phases_ms
            outcome.apdus = tap.ops
        engine.log_tap(outcome, outcome.card_id, commands="ops")
        engine.TransactionEngine._feedback(reader, outcome)
        return outcome

    def _tap(
        self, tap: _Tap, presence: CardPresence, outcome: engine.TapOutcome
    ) -> engine.TapOutcome:
        layout = self.layout
        card_id = outcome.card_id
        uid4 = m1_purse.auth_uid(presence.uid)
        with tap.phase("read"):
            if layout.directory_check:
                tap.run(m1_purse.check_directory(layout))
            issuance = tap.run(m1_purse.read_issuance(layout, uid4))
        with tap.phase("keys"):
            session = self._session(uid4, issuance)
        with tap.phase("read"):
            state = tap.run(m1_purse.read_state(layout, session), session)
        classification = m1_purse.classify(state, layout)
        if classification.kind is Recovery.BROKEN:
            raise TapRefused("card_damaged", classification.reason)
        if classification.kind is not Recovery.NORMAL:
            with tap.phase("repair"):
                log.info("m1_repair", card=card_id, recovery=classification.kind.value)
                state = tap.run(m1_purse.repair(layout, session, classification), session)
        now = self.clock()
        pending = self.store.pending_intents(card_id)
        locks = [i for i in pending if m1_lock.is_lock_intent(i.payload)]
        debits = [i for i in pending if not m1_lock.is_lock_intent(i.payload)]
        if debits:
            with tap.phase("recover"):
                done = self._resolve(card_id, uid4, issuance, state, classification, debits)
            if done is not None:
                done.card_id, done.family = card_id, FAMILY_M1
                return done
        if locks:
            with tap.phase("recover"):
                self._resolve_lock(card_id, uid4, issuance, state, classification, locks, outcome)
        if (
            self.blacklist is not None
            and not m1_lock.is_flagged(layout, state.pub_p)
            and self.blacklist.contains(card_id)
        ):
            with tap.phase("lock"):
                self._lock(tap, session, presence.uid, uid4, issuance, state, now, outcome)
        with tap.phase("qualify"):
            self._qualify(issuance, state)
            engine.check_double_tap(self.store, self.profile, card_id, now)
        fare = self.fare()
        outcome.fare = fare
        balance = state.purse_p
        assert balance is not None and state.pub_p is not None
        if balance < fare:
            raise TapRefused("insufficient_balance", f"balance {balance} < fare {fare}")
        return self._purchase(tap, session, card_id, uid4, issuance, state, fare, now, outcome)

    def _session(self, uid4: bytes, issuance: Issuance) -> M1Session:
        layout = self.layout
        roles = self.key_provider.sector_keys(uid4, issuance, KEY_ROLES)
        keys = {layout.purse_sector: roles["purse"], layout.public_sector: roles["public"]}
        for sector in layout.record_sectors:
            keys[sector] = roles["records"]
        return M1Session(keys, layout.keys.key_type)

    def _qualify(self, issuance: Issuance, state: PurseState) -> None:
        layout = self.layout
        flag = issuance.enable_flag
        if flag != layout.enable_flag_normal:
            reason = _ENABLE_REFUSALS.get(flag, "card_disabled")
            raise TapRefused(reason, f"issuance enable flag {flag:02X}")
        city = issuance.city_code.hex().upper()
        if layout.city_codes and city not in layout.city_codes:
            raise TapRefused("not_accepted_city", f"city code {city}")
        if layout.accepted_card_types and issuance.card_type not in layout.accepted_card_types:
            raise TapRefused("card_type", f"card type {issuance.card_type:02X}")
        assert state.pub_p is not None and state.purse_p is not None
        if state.pub_p.blacklist == layout.blacklist_value:
            raise TapRefused("blacklisted", "public-info blacklist flag set")
        if not 0 <= state.purse_p <= self.profile.max_balance:
            raise CardProtocolError(
                f"M1 purse: balance {state.purse_p} outside 0..{self.profile.max_balance}"
            )

    # --- blacklist lock (§3.1 public-info byte 6) -------------------------------------------

    def _lock(
        self,
        tap: _Tap,
        session: M1Session,
        uid: bytes,
        uid4: bytes,
        issuance: Issuance,
        state: PurseState,
        now: dt.datetime,
        outcome: engine.TapOutcome,
    ) -> None:
        """Journal the lock, set the flag in pubP and pubB, record it, refuse the tap."""
        card_id = outcome.card_id
        plan = m1_lock.plan_lock(self.layout, state)
        payload = m1_lock.lock_payload(
            self.layout,
            plan,
            uid=uid,
            uid4=uid4,
            issuance=issuance,
            profile=self.profile.name,
            terminal=self.sam.terminal_number,
            sam=self.sam.serial,
            when=now.replace(microsecond=0, tzinfo=None).strftime("%Y%m%d%H%M%S"),
        )
        intent_id = self.store.add_intent(card_id, PRODUCT_M1, payload)
        outcome.status = "in_flight"  # a failure leaves the lock intent for the next tap
        tap.run(m1_lock.set_blacklist_flag(self.layout, session, plan), session)
        rec = self.store.finalize_intent(intent_id, m1_lock.lock_record_body(card_id, payload))
        outcome.record_seq = rec.seq
        log.warning("card_locked", card=card_id, seq=rec.seq, flag=f"{plan.flag:02X}")
        raise TapRefused("blacklisted", f"blacklist flag set, record #{rec.seq}")

    def _resolve_lock(
        self,
        card_id: str,
        uid4: bytes,
        issuance: Issuance,
        state: PurseState,
        classification: Classification,
        pending: list[Intent],
        outcome: engine.TapOutcome,
    ) -> None:
        """Settle this card's pending lock intent: the flag on the repaired card proves the lock
        (the intent becomes the lock record, the tap is refused); a clear flag disproves it."""
        *older, intent = sorted(pending, key=lambda i: i.id)
        for stale in older:  # a lock moves no money: an older attempt is simply superseded
            self.store.void_intent(stale.id, "lock superseded by a later attempt")
        p = intent.payload
        same_card = p.get("uid4") == uid4.hex().upper() and p.get("serial") == (
            issuance.serial.hex().upper()
        )
        if same_card and m1_lock.is_flagged(self.layout, state.pub_p):
            rec = self.store.finalize_intent(
                intent.id, m1_lock.lock_record_body(card_id, p, classification)
            )
            outcome.record_seq = rec.seq
            log.warning(
                "lock_recovered", card=card_id, seq=rec.seq, recovery=classification.kind.value
            )
            raise TapRefused("blacklisted", f"blacklist flag set (completed), record #{rec.seq}")
        reason = (
            f"blacklist flag not set (recovery {classification.kind.value}): no lock happened"
            if same_card
            else "card identity differs from the lock intent"
        )
        self.store.void_intent(intent.id, reason)
        log.info("lock_intent_voided", card=card_id, intent=intent.id, reason=reason)

    # --- purchase -----------------------------------------------------------------------

    def _purchase(
        self,
        tap: _Tap,
        session: M1Session,
        card_id: str,
        uid4: bytes,
        issuance: Issuance,
        state: PurseState,
        fare: int,
        now: dt.datetime,
        outcome: engine.TapOutcome,
    ) -> engine.TapOutcome:
        layout = self.layout
        when = now.replace(microsecond=0, tzinfo=None)
        terminal = self.sam.terminal_number
        assert state.purse_p is not None
        record = TripRecord(
            when=(when.day, when.hour, when.minute, when.second),
            balance_before=state.purse_p,
            amount=fare,
            kind=layout.record_type,
            device=bytes(terminal[-4:]),
        )
        plan = m1_purse.plan_debit(layout, state, fare, record)
        with tap.phase("precheck"):
            tap.run(m1_purse.check_record_sector(layout, session, plan.pointer), session)
        payload = self._payload(uid4, issuance, plan, when, terminal)
        with tap.phase("intent_commit"):
            intent_id = self.store.add_intent(card_id, PRODUCT_M1, payload)
        outcome.status = "in_flight"  # from here on, a failure leaves the intent for recovery
        with tap.phase("debit"):
            balance_after = tap.run(m1_purse.debit(layout, session, plan), session)
        with tap.phase("tac"):
            tac, tac_error = self._tac(payload)
        with tap.phase("record_commit"):
            rec = self.store.finalize_intent(
                intent_id, self._record_body(card_id, payload, tac, tac_error, None)
            )
        outcome.status = "paid"
        outcome.balance_after = balance_after
        outcome.record_seq = rec.seq
        return outcome

    def _payload(
        self,
        uid4: bytes,
        issuance: Issuance,
        plan: DebitPlan,
        when: dt.datetime,
        terminal: bytes,
    ) -> dict[str, Any]:
        return {
            "family": FAMILY_M1,
            "uid4": uid4.hex().upper(),
            "city": issuance.city_code.hex().upper(),
            "serial": issuance.serial.hex().upper(),
            "card_number": issuance.card_number,
            "card_type": issuance.card_type,
            "counter_before": plan.counter_before,
            "counter": plan.counter_after,
            "balance_before": plan.balance_before,
            "amount": plan.amount,
            "record_slot": plan.pointer,
            "datetime": when.strftime("%Y%m%d%H%M%S"),
            "terminal": terminal.hex().upper(),
            "sam": self.sam.serial,
        }

    def _tac(self, payload: dict[str, Any]) -> tuple[str, str]:
        """Record TAC through the PSAM; the card is already debited, so a SAM failure only
        leaves the record without TAC (and says why)."""
        config = self.layout.tac
        if not config.enabled:
            return "", "disabled by profile"
        text = str(payload["datetime"])
        data = TacInput(
            amount=int(payload["amount"]),
            when=(
                int(text[0:4]),
                int(text[4:6]),
                int(text[6:8]),
                int(text[8:10]),
                int(text[10:12]),
                int(text[12:14]),
            ),
            counter=int(payload["counter"]),
            terminal=bytes.fromhex(str(payload["terminal"])),
            serial=bytes.fromhex(str(payload["serial"])),
            balance_before=int(payload["balance_before"]),
            uid4=bytes.fromhex(str(payload["uid4"])),
            city=bytes.fromhex(str(payload["city"])),
        )
        message = m1_purse.tac_message(config, data)
        try:
            self.sam.cipher_init(config.p1, config.p2, m1_purse.tac_factors(config, data))
            tac = self.sam.cipher_mac(m1_purse.tac_mac_data(config, message))
        except SamError as exc:
            log.warning("m1_tac_failed", card=payload["uid4"], error=str(exc), party=exc.party)
            return "", str(exc)
        return tac.hex().upper(), ""

    def _record_body(
        self,
        card_id: str,
        payload: dict[str, Any],
        tac: str,
        tac_error: str,
        recovery: Classification | None,
    ) -> RecordBody:
        amount = int(payload["amount"])
        fields: dict[str, str | int | bool | None] = {
            "product": PRODUCT_M1,
            "family": FAMILY_M1,
            "uid4": payload["uid4"],
            "city": payload["city"],
            "serial": payload["serial"],
            "card_number": payload["card_number"],
            "card_type": payload["card_type"],
            "counter": payload["counter"],
            "balance_before": payload["balance_before"],
            "balance_after": int(payload["balance_before"]) - amount,
            "record_slot": payload["record_slot"],
            "terminal": payload["terminal"],
            "sam": payload["sam"],
            "datetime": payload["datetime"],
            "tac": tac,
            "tac_fields": ",".join(self.layout.tac.fields),
            "tac_error": tac_error,
            "recovered": recovery is not None,
            "recovery": "" if recovery is None else recovery.kind.value,
        }
        return RecordBody(kind="purchase", card_id=card_id, amount=amount, fields=fields)

    # --- recovery (§3.5 rule 3: a re-tap completes rather than repeats) --------------------

    def _resolve(
        self,
        card_id: str,
        uid4: bytes,
        issuance: Issuance,
        state: PurseState,
        classification: Classification,
        pending: list[Intent],
    ) -> engine.TapOutcome | None:
        """Settle this card's pending intent against the repaired card.

        Returns the outcome when the journaled debit had happened (the passenger has paid);
        ``None`` when it had not (voided) or cannot be told (unresolved): a fresh debit follows.
        """
        *older, intent = sorted(pending, key=lambda i: i.id)
        for stale in older:  # only the newest attempt can still be proven on the card
            self._to_unresolved(stale, "superseded by a later attempt on the same card")
        p = intent.payload
        assert state.pub_p is not None and state.purse_p is not None
        counter, balance = state.pub_p.counter, state.purse_p
        try:
            before, amount = int(p["balance_before"]), int(p["amount"])
            counter_before = int(p["counter_before"])
            same_card = (
                p["uid4"] == uid4.hex().upper() and p["serial"] == issuance.serial.hex().upper()
            )
        except (KeyError, TypeError, ValueError):
            self._to_unresolved(intent, "intent payload unreadable")
            return None
        if not same_card:
            self._to_unresolved(intent, "card identity differs from the intent")
            return None
        if counter == counter_before and balance == before:
            self.store.void_intent(
                intent.id,
                f"purse counter {counter} unchanged (recovery {classification.kind.value}): "
                "the debit did not happen",
            )
            log.info("intent_voided", card=card_id, intent=intent.id, counter=counter)
            return None
        if counter == (counter_before + 1) & 0xFFFF and balance == before - amount:
            tac, tac_error = self._tac(p)
            rec = self.store.finalize_intent(
                intent.id, self._record_body(card_id, p, tac, tac_error, classification)
            )
            log.info(
                "intent_recovered",
                card=card_id,
                intent=intent.id,
                seq=rec.seq,
                recovery=classification.kind.value,
            )
            return engine.TapOutcome(
                status="recovered", fare=amount, balance_after=balance, record_seq=rec.seq
            )
        self._to_unresolved(
            intent,
            f"purse counter {counter} / balance {balance}, where {counter_before}/{before} "
            f"(not debited) or {counter_before + 1}/{before - amount} (debited) was expected",
        )
        return None

    def _to_unresolved(self, intent: Intent, reason: str) -> Record:
        rec = self.store.finalize_intent(intent.id, engine.unresolved_body(intent, reason))
        log.warning("intent_unresolved", card=intent.card_id, intent=intent.id, reason=reason)
        return rec
