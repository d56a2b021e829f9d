"""The kiosk's online load (圈存): the I/O glue around :mod:`agent.products.cpu_load`.

::

    read the card ─► settle this card's pending load intents (probe INIT, judge, 80 5A 00 02)
    ─► INITIALIZE FOR LOAD ─► INTENT durable ─► host authorises (MAC1 → MAC2, money taken)
    ─► CREDIT FOR LOAD ─► RECORD durable ─► TAC to the host

The host is reached through :class:`LoadHost` (the kiosk's HTTP client in production, any
object in tests); this module never imports the clearing host. The host knows a load by the
kiosk-chosen ``load_key``: asking twice gives the same MAC2, never a second authorisation.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import structlog

from agent import crypto
from agent.apdu import Command, Party, Response, parse_response
from agent.errors import AgentError, TapRefused
from agent.offline_store import Intent, OfflineStore, RecordBody
from agent.products import cpu_load, cpu_purse
from agent.products.cpu_load import CpuLoadIntent, LoadInit, Mac2Rejected
from agent.products.cpu_purse import CpuCard, Step
from agent.products.intents import Decision, IntentPayloadError, Verdict, intent_op
from agent.profile import Profile
from agent.readers.base import CardReader
from agent.tap.journal import Journal
from agent.tap.outcome import PhaseTimer, TapOutcome, TapStatus

T = TypeVar("T")
log = structlog.get_logger("agent.load")
PRODUCT = "cpu"


class LoadRefusedByHost(AgentError):
    """The clearing host refused to authorise the load (nothing was taken, nothing credited)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(
            f"clearing host refused the load: {reason}" + (f" ({detail})" if detail else "")
        )
        self.reason = reason


@dataclass(frozen=True, slots=True)
class LoadRequest:
    """What the host needs to check MAC1 and compute MAC2 (§6.4 T→H)."""

    load_key: str
    asn: str
    factors: tuple[str, ...]  # diversification factors as the PSAM lists them (card first)
    key_index: int
    key_version: int
    algorithm: int
    balance: int
    counter: int
    random: str
    mac1: str
    amount: int
    terminal: str
    datetime: str
    payment: Mapping[str, Any]


class LoadHost(Protocol):
    def authorise(self, request: LoadRequest) -> bytes:
        """MAC2, or :class:`LoadRefusedByHost`; any other error leaves the outcome unknown."""
        ...

    def complete(self, load_key: str, outcome: str, counter: int, tac: str) -> None:
        """Report ``credited`` (with the TAC), ``not_credited`` or ``unknown``."""
        ...


@dataclass(slots=True)
class LoadResult:
    status: str  # loaded | recovered-and-loaded | refused | torn | failed
    card_id: str = ""
    balance_after: int | None = None
    tac: str = ""
    reason: str = ""
    settled: tuple[str, ...] = ()  # verdicts of earlier torn loads settled on this presentation


class _Exchanger:
    def __init__(self, reader: CardReader) -> None:
        self.reader = reader

    def exchange(self, command: Command) -> Response:
        return parse_response(self.reader.transmit(command.to_bytes()), command, Party.CARD)

    def run(self, step: Step[T]) -> T:
        return cpu_purse.drive(step, self.exchange)


class KioskLoader:
    """Online loads on one kiosk: one offline store (the kiosk's journal), one host."""

    def __init__(
        self,
        profile: Profile,
        store: OfflineStore,
        host: LoadHost,
        terminal: bytes,
        *,
        key_index: int = 1,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.profile = profile
        self.store = store
        self.journal = Journal(store)
        self.host = host
        self.terminal = terminal
        self.key_index = key_index
        self.clock = clock

    # -- public --------------------------------------------------------------------------

    def load(
        self, reader: CardReader, amount: int, payment: Mapping[str, Any], load_key: str
    ) -> LoadResult:
        """Read the card, settle its torn loads, then load ``amount`` paid by ``payment``."""
        card_io = _Exchanger(reader)
        result = LoadResult(status="failed")
        try:
            card, app = self._read(card_io)
            result.card_id = card.card_id
            settled = self._settle(card_io, card)
            result.settled = tuple(verdict for _key, verdict, _tac in settled)
            attempts = [(k, v, t) for k, v, t in settled if k.split(".r", 1)[0] == load_key]
            for _key, verdict, tac in attempts:
                if verdict == Verdict.FINALIZE.value:
                    result.status, result.tac = "recovered", tac
                    return result
                if verdict == Verdict.UNRESOLVED.value:
                    raise TapRefused("load_unresolved", f"load {load_key}: outcome unknown")
            # a voided attempt keeps its key at the host (not_credited): the retry has its own
            attempt_key = f"{load_key}.r{len(attempts)}" if attempts else load_key
            self._new_load(card_io, card, app.aid, amount, payment, attempt_key, result)
        except TapRefused as refused:
            result.status, result.reason = "refused", f"{refused.reason}: {refused}"
        except LoadRefusedByHost as refused:
            result.status, result.reason = "refused", refused.reason
        except AgentError as exc:
            if result.status != "torn":
                result.status = "failed"
            result.reason = str(exc)
        log.info("load", card=result.card_id, status=result.status, reason=result.reason)
        return result

    def expire(self, cutoff: dt.datetime, reason: str) -> int:
        """Load intents older than ``cutoff`` (the card never came back) become ``unresolved``
        records, and the host is told the outcome is ``unknown`` (it shows the load so)."""
        stale = [
            i
            for i in self.store.pending_intents()
            if intent_op(i.payload) == cpu_load.OP_LOAD and i.created_at < cutoff
        ]
        self.journal.expire(cutoff, reason)
        for intent in stale:
            key, counter = intent.payload.get("load_key"), intent.payload.get("counter")
            if isinstance(key, str) and isinstance(counter, int):
                self._tell_host(key, "unknown", counter, "")
        return len(stale)

    # -- steps ---------------------------------------------------------------------------

    def _read(self, card_io: _Exchanger) -> tuple[CpuCard, Any]:
        for app in self.profile.applications:
            try:
                fci = card_io.run(cpu_purse.select_application(app))
            except cpu_purse.ApplicationNotFound:
                continue
            return card_io.run(cpu_purse.read_card(app, fci, self.profile.dialects)), app
        raise TapRefused("unknown_card", "no purse application")

    def _pending(self, card: CpuCard) -> list[Intent]:
        return [
            i
            for i in self.store.pending_intents(card.card_id)
            if intent_op(i.payload) == cpu_load.OP_LOAD
        ]

    def _settle(self, card_io: _Exchanger, card: CpuCard) -> list[tuple[str, str, str]]:
        """(load key, verdict, TAC) of each pending load intent of this card, settled."""
        pending = self._pending(card)
        if not pending:
            return []
        intent = self.journal.newest(pending)
        settled = [
            (str(i.payload.get("load_key", "")), Verdict.UNRESOLVED.value, "")
            for i in pending
            if i.id != intent.id
        ]
        try:
            typed = CpuLoadIntent.from_payload(intent.payload)
        except IntentPayloadError as exc:
            self.journal.settle(intent, Decision(Verdict.UNRESOLVED, f"unreadable intent: {exc}"))
            return [*settled, (str(intent.payload.get("load_key", "")), "unresolved", "")]
        probe = card_io.run(
            cpu_load.initialize_for_load(self.key_index, 0, self.terminal, self.profile.max_balance)
        )
        decision = cpu_load.judge_load(typed, probe.counter, probe.balance)
        tac = ""
        if decision.verdict is Verdict.FINALIZE:
            proof = card_io.run(cpu_load.prove_load(probe.counter))
            record = self._record(intent.card_id, typed, proof.tac, recovered=True)
            self.journal.settle(intent, decision, record)
            tac = proof.tac.hex().upper()
            self._tell_host(typed.load_key, "credited", typed.counter, tac)
        else:
            self.journal.settle(intent, decision)
            outcome = "not_credited" if decision.verdict is Verdict.VOID else "unknown"
            self._tell_host(typed.load_key, outcome, typed.counter, "")
        if decision.card_fault:
            raise TapRefused("card_fault", decision.card_fault)
        return [*settled, (typed.load_key, decision.verdict.value, tac)]

    def _new_load(
        self,
        card_io: _Exchanger,
        card: CpuCard,
        aid: bytes,
        amount: int,
        payment: Mapping[str, Any],
        load_key: str,
        result: LoadResult,
    ) -> None:
        if amount <= 0:
            raise TapRefused("bad_amount", f"load amount {amount}")
        if card.city_code != self.profile.operator_city:
            # a card of another city: its load key is its own city's (nothing asked, nothing paid)
            raise TapRefused(
                "not_loadable_here",
                f"card of city {card.city_code}: this kiosk loads cards of city "
                f"{self.profile.operator_city} only",
            )
        init: LoadInit = card_io.run(
            cpu_load.initialize_for_load(
                self.key_index, amount, self.terminal, self.profile.max_balance
            )
        )
        if init.balance + amount > self.profile.max_balance:
            raise TapRefused(
                "balance_limit", f"{init.balance} + {amount} > {self.profile.max_balance}"
            )
        when = crypto.datetime7(self.clock())
        intent = CpuLoadIntent(
            family=card.family.value,
            aid=aid.hex().upper(),
            asn=card.asn.hex().upper(),
            load_key=load_key,
            counter=init.counter,
            amount=amount,
            balance_before=init.balance,
            key_version=init.key_version,
            algorithm=init.algorithm,
            random=init.random.hex().upper(),
            mac1=init.mac1.hex().upper(),
            datetime=when.hex().upper(),
            terminal=self.terminal.hex().upper(),
        )
        request = LoadRequest(
            load_key=load_key,
            asn=intent.asn,
            factors=tuple(f.hex().upper() for f in card.factors),
            key_index=self.key_index,
            key_version=init.key_version,
            algorithm=init.algorithm,
            balance=init.balance,
            counter=init.counter,
            random=intent.random,
            mac1=intent.mac1,
            amount=amount,
            terminal=intent.terminal,
            datetime=intent.datetime,
            payment=dict(payment),
        )

        def operation() -> bytes:
            mac2 = self.host.authorise(request)
            return card_io.run(cpu_load.credit_for_load(when, mac2))

        def nothing_changed(exc: AgentError) -> str | None:
            if isinstance(exc, LoadRefusedByHost):
                return f"host refused: {exc.reason}"
            if isinstance(exc, Mac2Rejected):
                return "card refused MAC2 (9302)"
            return None

        outcome = TapOutcome(card_id=card.card_id)
        try:
            tac, _rec = self.journal.execute(
                PhaseTimer(),
                outcome,
                card.card_id,
                PRODUCT,
                intent.to_payload(),
                operation,
                lambda tac: self._record(card.card_id, intent, tac, recovered=False),
                nothing_changed=nothing_changed,
            )
        except Mac2Rejected:
            self._tell_host(load_key, "not_credited", intent.counter, "")
            raise
        except AgentError:
            if outcome.status == TapStatus.IN_FLIGHT:
                result.status = "torn"
            raise
        except Exception as exc:  # the host client failed in a way it did not classify
            result.status = "torn"
            raise _HostUnreachable(f"clearing host: {exc}") from exc
        result.status = "loaded"
        result.balance_after = intent.balance_after
        result.tac = tac.hex().upper()
        self._tell_host(load_key, "credited", intent.counter, result.tac)

    @staticmethod
    def _record(card_id: str, intent: CpuLoadIntent, tac: bytes, *, recovered: bool) -> RecordBody:
        return RecordBody(
            kind="load",
            card_id=card_id,
            amount=intent.amount,
            fields={
                "asn": intent.asn,
                "load_key": intent.load_key,
                "counter": intent.counter,
                "balance_before": intent.balance_before,
                "balance_after": intent.balance_after,
                "datetime": intent.datetime,
                "terminal": intent.terminal,
                "algorithm": intent.algorithm,
                "tac": tac.hex().upper(),
                "recovered": recovered,
            },
        )

    def _tell_host(self, load_key: str, outcome: str, counter: int, tac: str) -> None:
        """Best effort: the record holds the outcome; the host keeps the load ``authorised``
        (outcome unknown, shown as such) until it hears."""
        try:
            self.host.complete(load_key, outcome, counter, tac)
        except Exception as exc:  # noqa: BLE001 - any host failure leaves the load shown unknown
            log.warning("load_completion_not_delivered", load_key=load_key, error=str(exc))


class _HostUnreachable(AgentError):
    """The host did not answer the authorisation: the intent stays, the card decides later."""
