"""The kiosk service: what the touch page asks for, one card operation at a time.

The page polls :meth:`KioskService.snapshot` (``phase``, ``message``, the card, the cash, the
bills, the receipt) and starts operations that run on one worker thread; a second operation
while one runs is refused :class:`Busy` at once (never queued). Phases::

    idle ─► waiting_card ("put your card on the reader") ─► working ("keep the card still")
          ─► ready (card shown) | success (receipt) | failed (message, what happened to the money)
          ─► put_back ("put the card back"): the card left mid-operation; the SAME operation
             (same load key, same bill order) is resumed when it returns: the journal settles
             it from the card (never a second load, never a second debit)
    cash: the note acceptor is enabled and counts notes (:class:`CashDrawer`)

Loads run :class:`agent.tap.load.KioskLoader` (the host authorises, paid by cash, a voucher or
a pending load); bills run the POS purchase (:class:`agent.pos.service.PosService`) with the
order ``bill-<id>`` and the bill's utility as the merchant (category ``utility``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import secrets
import threading
import time
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import structlog

from agent.apdu import Command, Party, Response, parse_response
from agent.errors import AgentError, TapRefused
from agent.files import replace_file
from agent.kiosk import bill_order
from agent.kiosk.book import KioskBook
from agent.kiosk.host import HostRefused, KioskHost
from agent.kiosk.notes import NoteAcceptor, NoteAcceptorError
from agent.pos.service import PosRequestError, PosService
from agent.products import cpu_purse
from agent.products.cpu_inspect import CardReport, inspect_card
from agent.products.cpu_load import OP_LOAD
from agent.products.intents import intent_op
from agent.profile import Profile
from agent.readers.base import CardReader
from agent.tap.load import KioskLoader, LoadResult

T = TypeVar("T")
log = structlog.get_logger("agent.kiosk")

PAYMENT_SOURCES = ("cash", "voucher", "pending")
VOUCHER_CODE = re.compile(r"[A-Za-z0-9-]{4,40}")


class Busy(Exception):
    """Another kiosk operation is using the reader."""


class KioskRequestError(Exception):
    """A request the kiosk refuses as such (HTTP ``status``, stable ``code``)."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.status, self.code, self.detail = status, code, detail


def _yuan(fen: int) -> str:
    return f"{fen // 100}.{fen % 100:02d}"


def _card_view(report: CardReport) -> dict[str, Any]:
    card = report.card
    return {
        "card_id": card.card_id,
        "printed_number": card.printed_number or card.card_id,
        "asn": card.asn.hex().upper(),
        "balance": report.shown_balance,
        "valid_until": card.expiry.isoformat(),
        "transactions": [
            {
                "when": None if e.when is None else e.when.isoformat(sep=" "),
                "amount": e.amount,
                "type": {0x02: "load", 0x06: "purchase", 0x09: "purchase"}.get(
                    e.transaction_type, f"{e.transaction_type:02X}"
                ),
                "terminal": e.terminal,
            }
            for e in report.log
        ],
        "trips": [
            {
                "when": t.when.isoformat(sep=" "),
                "amount": t.amount,
                "line": t.line,
                "station": t.station,
                "balance": t.balance,
            }
            for t in report.trips
        ],
        "problems": list(report.problems),
    }


class CashDrawer:
    """Reads the note acceptor on its own thread while cash is being taken in; every event goes
    to the book first, then to the page. A note drawn in (ESCROW) and not confirmed within
    ``note_timeout_s`` is ``disputed`` (recorded for staff, never counted), like a jammed one."""

    def __init__(
        self,
        notes: NoteAcceptor,
        book: KioskBook,
        session: str,
        on_change: Callable[[dict[str, Any]], None],
        note_timeout_s: float,
    ) -> None:
        self.notes = notes
        self.book = book
        self.session = session
        self.on_change = on_change
        self.note_timeout_s = note_timeout_s
        self.accepted = 0
        self.alerts: list[dict[str, Any]] = []
        self.escrow: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.open = False

    def view(self) -> dict[str, Any]:
        return {
            "session": self.session,
            "accepted": self.accepted,
            "inserting": self.escrow,
            "open": self.open,
            "alerts": list(self.alerts),
        }

    def start(self) -> None:
        self.notes.enable()
        self.open = True
        self._thread = threading.Thread(target=self._run, name="kiosk-cash", daemon=True)
        self._thread.start()
        self.on_change(self.view())

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(10)

    def _alert(self, code: str, amount: int, detail: str) -> None:
        self.alerts.append({"code": code, "amount": amount, "detail": detail})
        log.warning("kiosk_cash_alert", session=self.session, code=code, detail=detail)

    def _close(self) -> None:
        if self.open:
            self.open = False
            try:
                self.notes.disable()
            except NoteAcceptorError as exc:
                self._alert("acceptor_failed", 0, str(exc))

    def _run(self) -> None:
        escrow_since = 0.0
        try:
            while not self._stop.is_set():
                event = self.notes.next_event(0.1)
                if event is None:
                    if (
                        self.escrow is not None
                        and time.monotonic() - escrow_since > self.note_timeout_s
                    ):
                        detail = f"note of {self.escrow} fen drawn in, never confirmed"
                        self.book.cash_event(self.session, "disputed", self.escrow, detail)
                        self._alert("note_timeout", self.escrow, detail)
                        self.escrow = None
                        self._close()
                        self.on_change(self.view())
                        return
                    continue
                if event.kind == "escrow":
                    self.escrow, escrow_since = event.amount, time.monotonic()
                elif event.kind == "stacked":
                    self.book.cash_event(self.session, "accepted", event.amount, event.raw)
                    self.accepted += event.amount
                    self.escrow = None
                elif event.kind == "rejected":
                    self.book.cash_event(self.session, "rejected", event.amount, event.raw)
                    self._alert("note_rejected", event.amount, "note handed back")
                    self.escrow = None
                elif event.kind == "jam":
                    amount = self.escrow or 0
                    detail = f"jam with a note of {amount} fen in the path" if amount else "jam"
                    self.book.cash_event(self.session, "disputed", amount, detail)
                    self._alert("jam", amount, detail)
                    self.escrow = None
                    self._close()
                    self.on_change(self.view())
                    return
                else:
                    self.book.cash_event(self.session, "garbage", 0, event.raw)
                    self._alert("garbage", 0, f"the note acceptor sent {event.raw!r}")
                self.on_change(self.view())
        except NoteAcceptorError as exc:
            self._alert("acceptor_failed", self.escrow or 0, str(exc))
            if self.escrow:
                self.book.cash_event(self.session, "disputed", self.escrow, str(exc))
            self.open = False
            self.on_change(self.view())
            return
        self._close()
        self.on_change(self.view())


class KioskService:
    def __init__(
        self,
        profile: Profile,
        reader: CardReader,
        loader: KioskLoader,
        pos: PosService,
        host: KioskHost,
        book: KioskBook,
        notes: NoteAcceptor | None,
        receipts: Path,
        *,
        kiosk_id: str,
        card_wait_s: float = 30.0,
        put_back_wait_s: float = 120.0,
        note_timeout_s: float = 10.0,
    ) -> None:
        self.profile = profile
        self.reader = reader
        self.loader = loader
        self.pos = pos
        self.base_profile = pos.engine.profile
        self.host = host
        self.book = book
        self.notes = notes
        self.receipts = receipts
        self.kiosk_id = kiosk_id
        self.card_wait_s = card_wait_s
        self.put_back_wait_s = put_back_wait_s
        self.note_timeout_s = note_timeout_s
        self._lock = threading.Lock()  # the state
        self._job: threading.Thread | None = None
        self._cash: CashDrawer | None = None
        self._state: dict[str, Any] = {}
        self._reset_state()

    # -- state ---------------------------------------------------------------------------

    def _reset_state(self) -> None:
        self._state = {
            "phase": "idle",
            "message": "welcome",
            "detail": "",
            "card": None,
            "pending": [],
            "cash": None,
            "bills": None,
            "receipt": None,
            "operation": None,
        }

    def _set(self, **changes: Any) -> None:
        with self._lock:
            self._state.update(changes)
            self._state["version"] = self._state.get("version", 0) + 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            state = dict(self._state)
        state["busy"] = self._job is not None and self._job.is_alive()
        state["unused_cash"] = self.book.unused_cash()
        return state

    def _start(self, name: str, work: Callable[[], None]) -> None:
        if self._job is not None and self._job.is_alive():
            raise Busy("another operation is using the card reader; wait for it to finish")

        def run() -> None:
            try:
                work()
            except Exception as exc:  # a bug must not leave the page without an answer
                log.exception("kiosk_bug", job=name)
                self._set(phase="failed", message="internal_error", detail=str(exc))

        self._job = threading.Thread(target=run, name=f"kiosk-{name}", daemon=True)
        self._job.start()

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait for the running operation to end (tests, shutdown)."""
        job = self._job
        if job is not None:
            job.join(timeout_s)
            return not job.is_alive()
        return True

    def reset(self) -> None:
        """Back to the welcome screen (refused while an operation runs or a card must return)."""
        if self._job is not None and self._job.is_alive():
            raise Busy("an operation is running")
        if self._cash is not None:
            self._cash.stop()
            self._cash = None
        self._set(**{k: v for k, v in self._fresh().items()})

    def _fresh(self) -> dict[str, Any]:
        saved = self._state
        self._reset_state()
        fresh, self._state = self._state, saved
        return fresh

    # -- the card ------------------------------------------------------------------------

    def _wait_card(self, message: str, wait_s: float) -> bool:
        self._set(phase="waiting_card", message=message, detail="")
        presence = self.reader.wait_for_card(wait_s)
        return presence is not None

    def _inspect(self) -> CardReport:
        def exchange(command: Command) -> Response:
            return parse_response(self.reader.transmit(command.to_bytes()), command, Party.CARD)

        return cpu_purse.drive(
            inspect_card(self.profile.applications, self.profile.dialects), exchange
        )

    def read_card(self) -> None:
        self._start("read", self._read_card)

    def _read_card(self) -> None:
        if not self._wait_card("present_card", self.card_wait_s):
            self._set(phase="idle", message="no_card", detail="")
            return
        self._set(phase="working", message="keep_still")
        try:
            report = self._inspect()
        except AgentError as exc:
            self._set(phase="failed", message="card_unreadable", detail=str(exc))
            return
        view = _card_view(report)
        try:
            cpu_purse.qualify(report.card, self.profile, dt.date.today())
            view["loadable"], view["not_loadable_reason"] = True, ""
        except TapRefused as refused:
            view["loadable"], view["not_loadable_reason"] = False, f"{refused.reason}: {refused}"
        pending: list[dict[str, Any]] = []
        detail = ""
        try:
            pending = self.host.pending_loads(view["asn"])
        except AgentError as exc:
            detail = f"pending loads not available: {exc}"
        self._set(phase="ready", message="card_read", detail=detail, card=view, pending=pending)

    # -- cash ----------------------------------------------------------------------------

    def start_cash(self) -> dict[str, Any]:
        if self.notes is None:
            raise KioskRequestError(409, "no_note_acceptor", "this kiosk takes no cash")
        if self._job is not None and self._job.is_alive():
            raise Busy("an operation is using the card reader")
        if self._cash is not None and self._cash.open:
            return self._cash.view()
        session = self._cash.session if self._cash is not None else _session_id()
        drawer = CashDrawer(
            self.notes, self.book, session, lambda view: self._set(cash=view), self.note_timeout_s
        )
        drawer.accepted = self.book.cash_accepted(session)
        self._cash = drawer
        self._set(phase="cash", message="insert_notes", detail="")
        try:
            drawer.start()
        except NoteAcceptorError as exc:
            self._set(phase="failed", message="acceptor_failed", detail=str(exc))
            raise KioskRequestError(503, "acceptor_failed", str(exc)) from exc
        return drawer.view()

    # -- loads ---------------------------------------------------------------------------

    def load(
        self, source: str, amount: int | None, code: str | None, pending_id: str | None
    ) -> None:
        if source not in PAYMENT_SOURCES:
            raise KioskRequestError(422, "bad_source", f"source must be one of {PAYMENT_SOURCES}")
        if self._job is not None and self._job.is_alive():
            raise Busy("another operation is using the card reader")
        payment: dict[str, Any]
        if source == "cash":
            drawer = self._cash
            if drawer is None:
                raise KioskRequestError(409, "no_cash", "insert notes first")
            drawer.stop()
            session = drawer.session
            amount = self.book.cash_accepted(session)
            if amount <= 0:
                raise KioskRequestError(409, "no_cash", "no note was accepted")
            payment = {"kind": "cash", "amount": amount}
        elif source == "voucher":
            if code is None or VOUCHER_CODE.fullmatch(code) is None:
                raise KioskRequestError(
                    422, "bad_voucher_code", "a voucher code is 4..40 of A-Z 0-9 -"
                )
            if amount is None:
                raise KioskRequestError(422, "bad_amount", "the voucher's amount is needed")
            session = _session_id()
            payment = {"kind": "voucher", "code": code}
        else:
            found = [
                p for p in self._state.get("pending") or [] if p.get("pending_id") == pending_id
            ]
            if not found:
                raise KioskRequestError(422, "unknown_pending", "no such pending load for the card")
            amount = int(found[0]["amount"])
            session = _session_id()
            payment = {"kind": "pending", "id": pending_id}
        assert amount is not None
        if not 0 < amount <= self.profile.max_balance:
            raise KioskRequestError(422, "bad_amount", f"amount {amount} fen out of range")
        load_key = f"{self.kiosk_id}.{session}"
        card = self._state.get("card") or {}
        expected = card.get("card_id")
        operation = {"kind": "load", "source": source, "amount": amount, "session": session}
        self._set(operation=operation)
        self.book.save_session(session, "load", amount, payment, expected, "started", {})
        self._start("load", lambda: self._run_load(session, amount, payment, load_key, expected))

    def _run_load(
        self,
        session: str,
        amount: int,
        payment: dict[str, Any],
        load_key: str,
        expected: str | None,
    ) -> None:
        if not self._wait_card("present_card", self.card_wait_s):
            self._set(phase="failed", message="no_card", detail="")
            self.book.save_session(session, "load", amount, payment, None, "no_card", {})
            return
        self._set(phase="working", message="keep_still", detail="")
        self._expire()
        try:
            report = self._inspect()
        except AgentError as exc:
            report = None
            log.warning("kiosk_identify_failed", error=str(exc))
        card_id = None if report is None else report.card.card_id
        if report is not None:
            try:  # a card of another city, expired or disabled is not loaded here
                cpu_purse.qualify(report.card, self.profile, dt.date.today())
            except TapRefused as refused:
                detail = f"card {card_id}: {refused.reason}: {refused}"
                log.warning("kiosk_not_loadable", card=card_id, reason=refused.reason)
                self.book.save_session(
                    session, "load", amount, payment, card_id, "refused", {"reason": detail}
                )
                self._set(phase="failed", message="refused:not_loadable", detail=detail)
                return
        if card_id is not None and self._pending(card_id, load=False):
            self.book.save_session(session, "load", amount, payment, card_id, "refused", {})
            self._set(
                phase="failed",
                message="refused:payment_pending",
                detail=f"card {card_id} has an interrupted payment: it is settled first",
            )
            return
        while True:
            self._set(phase="working", message="keep_still", detail="")
            result = self.loader.load(self.reader, amount, payment, load_key)
            expected = expected or (result.card_id or None)
            gone = result.status in ("torn", "failed") and self._card_gone()
            if result.status in ("loaded", "recovered"):
                self._loaded(session, amount, payment, load_key, result)
                return
            if not gone:
                reason = result.reason or result.status
                code = reason.split(":", 1)[0] if result.status == "refused" else "load_failed"
                self.book.save_session(
                    session, "load", amount, payment, expected, "refused", {"reason": reason}
                )
                if payment["kind"] == "cash":  # no dispenser: the notes stay the customer's
                    reason += f" | cash {_yuan(amount)} yuan accepted, kept for you: ask staff"
                self._set(phase="failed", message=f"refused:{code}", detail=reason)
                return
            log.warning("kiosk_card_left", session=session, status=result.status)
            self.book.save_session(
                session, "load", amount, payment, expected, "put_back", {"reason": result.reason}
            )
            if not self._put_back(expected):
                self._set(
                    phase="failed",
                    message="card_not_back",
                    detail=f"load {load_key}: the card did not come back; it is settled when "
                    "the card is shown at this kiosk again (or by the clearing centre)",
                )
                return

    def _card_gone(self) -> bool:
        try:
            return self.reader.wait_for_removal(0)
        except AgentError:
            return True

    def _put_back(self, expected: str | None) -> bool:
        """Wait for the card that left; another card is asked to leave. ``False``: timeout."""
        deadline = time.monotonic() + self.put_back_wait_s
        message = "put_back"
        while time.monotonic() < deadline:
            self._set(phase="put_back", message=message, detail=expected or "")
            if self.reader.wait_for_card(min(1.0, max(0.0, deadline - time.monotonic()))) is None:
                continue
            try:
                card_id = self._identify()
            except AgentError:
                continue  # it left again while being read
            if expected is None or card_id == expected:
                return True
            message = "wrong_card"
            while not self._card_gone() and time.monotonic() < deadline:
                time.sleep(0.1)
        return False

    def _pending(self, card_id: str, *, load: bool) -> bool:
        """Whether the card has a pending load intent (``load``) or another pending intent:
        a load and a purchase never run over each other's unsettled intent."""
        return any(
            (intent_op(i.payload) == OP_LOAD) is load
            for i in self.loader.store.pending_intents(card_id)
        )

    def _expire(self) -> None:
        """Intents whose card stayed away past the recovery window become ``unresolved``
        records (a load's host is told its outcome is unknown)."""
        cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=self.profile.recovery_window_s)
        try:
            self.loader.expire(cutoff, "card not back within the recovery window")
        except AgentError as exc:
            log.warning("kiosk_expire_failed", error=str(exc))

    def _identify(self) -> str:
        return self._inspect().card.card_id

    def _loaded(
        self,
        session: str,
        amount: int,
        payment: dict[str, Any],
        load_key: str,
        result: LoadResult,
    ) -> None:
        if payment["kind"] == "cash":
            self.book.cash_used(session, load_key)
            self._cash = None
        card = dict(self._state.get("card") or {})
        balance = result.balance_after
        try:
            report = self._inspect()
            card = _card_view(report)
            balance = report.shown_balance
        except AgentError:
            pass  # the card left after its load: the receipt shows what the load result says
        lines = [
            ("Top-up 充值", f"{_yuan(amount)} yuan 元"),
            ("Paid by 支付方式", {"cash": "cash 现金", "voucher": "voucher 充值券",
                                  "pending": "pending load 待圈存"}[payment["kind"]]),
            ("Card 卡号", card.get("printed_number") or result.card_id),
            ("Balance 余额", "?" if balance is None else f"{_yuan(balance)} yuan 元"),
            ("Load key 流水号", load_key),
            ("TAC", result.tac or "-"),
        ]  # fmt: skip
        receipt = self._receipt(session, "load", lines)
        self.book.save_session(
            session, "load", amount, payment, result.card_id, "done",
            {"status": result.status, "tac": result.tac, "balance_after": balance},
        )  # fmt: skip
        self._set(
            phase="success",
            message="loaded" if result.status == "loaded" else "recovered",
            detail="",
            card=card or None,
            receipt=receipt,
        )

    # -- bills ---------------------------------------------------------------------------

    def lookup_bills(self, account: str) -> dict[str, Any]:
        try:
            bills = self.host.bills(account)
        except HostRefused as refused:
            raise KioskRequestError(422, refused.reason, refused.detail) from refused
        except AgentError as exc:
            raise KioskRequestError(503, "host_unavailable", str(exc)) from exc
        answer = {"account": account, "bills": bills}
        self._set(bills=answer)
        return answer

    def pay_bill(self, bill_id: str) -> None:
        known = self._state.get("bills") or {}
        found = [b for b in known.get("bills", []) if b.get("bill_id") == bill_id]
        if not found:
            raise KioskRequestError(422, "unknown_bill", "look the account's bills up first")
        bill = found[0]
        if bill.get("state") == "paid":
            raise KioskRequestError(409, "bill_paid", f"bill {bill_id} is already paid")
        if self._job is not None and self._job.is_alive():
            raise Busy("another operation is using the card reader")
        session = _session_id()
        operation = {"kind": "bill", "bill": bill, "amount": bill["amount"], "session": session}
        self._set(operation=operation)
        self._start("bill", lambda: self._run_bill(session, bill))

    def _run_bill(self, session: str, bill: dict[str, Any]) -> None:
        bill_id, amount = str(bill["bill_id"]), int(bill["amount"])
        payment = {"kind": "bill", "bill_id": bill_id}
        if not self._wait_card("present_card", self.card_wait_s):
            self._set(phase="failed", message="no_card", detail="")
            return
        self._set(phase="working", message="keep_still", detail="")
        self._expire()
        try:
            card_id = self._identify()
            if self._pending(card_id, load=True):
                self._set(
                    phase="failed",
                    message="refused:load_pending",
                    detail=f"card {card_id} has an interrupted top-up: top it up again first",
                )
                return
            self.host.bill_payment(bill_id, "start", card_id)
        except HostRefused as refused:
            self._set(phase="failed", message=f"refused:{refused.reason}", detail=refused.detail)
            return
        except AgentError as exc:
            message = "put_back" if self._card_gone() else "bill_failed"
            self._set(phase="failed", message=message, detail=str(exc))
            return
        self.book.save_session(session, "bill", amount, payment, card_id, "started", {})
        self.pos.engine.profile = dataclasses.replace(
            self.base_profile, merchant_id=str(bill["merchant_id"]), merchant_category="utility"
        )
        try:
            while True:
                self._set(phase="working", message="keep_still", detail="")
                try:
                    answer = self.pos.purchase(bill_order(bill_id), amount, self.card_wait_s)
                except PosRequestError as exc:
                    answer = {"status": "refused", "reason": f"{exc.code}: {exc.detail}"}
                status = answer.get("status")
                if status == "paid":
                    self._bill_paid(session, bill, card_id, answer)
                    return
                if status == "pending":
                    self.book.save_session(
                        session, "bill", amount, payment, card_id, "put_back", answer
                    )
                    if not self._put_back(card_id):
                        self._set(
                            phase="failed",
                            message="card_not_back",
                            detail=f"bill {bill_id}: the debit is settled when the card is "
                            "shown here again; the bill stays payment pending meanwhile",
                        )
                        return
                    continue
                if status == "unresolved":
                    self.book.save_session(
                        session, "bill", amount, payment, card_id, "unresolved", answer
                    )
                    self._set(
                        phase="failed",
                        message="bill_unresolved",
                        detail=str(answer.get("reason", "")),
                    )
                    return
                reason = str(answer.get("reason", "refused"))
                self.book.save_session(session, "bill", amount, payment, card_id, "refused", answer)
                try:
                    self.host.bill_payment(bill_id, "release", card_id)
                except AgentError as exc:
                    log.warning("bill_release_failed", bill_id=bill_id, error=str(exc))
                self._set(
                    phase="failed", message=f"refused:{reason.split(':', 1)[0]}", detail=reason
                )
                return
        finally:
            self.pos.engine.profile = self.base_profile

    def _bill_paid(
        self, session: str, bill: dict[str, Any], card_id: str, answer: dict[str, Any]
    ) -> None:
        balance = answer.get("balance_after")
        card = dict(self._state.get("card") or {})
        try:
            report = self._inspect()
            card = _card_view(report)
            balance = report.shown_balance
        except AgentError:
            pass
        lines = [
            ("Bill 缴费", f"{bill['utility']} {bill['period']}"),
            ("Account 户号", str(bill["account"])),
            ("Bill no. 账单号", str(bill["bill_id"])),
            ("Paid 金额", f"{_yuan(int(bill['amount']))} yuan 元"),
            ("Payee 收款单位", str(bill["merchant_id"])),
            ("Card 卡号", card.get("printed_number") or card_id),
            ("Balance 余额", "?" if balance is None else f"{_yuan(int(balance))} yuan 元"),
            ("Record 记录", f"#{answer.get('record_seq')}"),
        ]
        receipt = self._receipt(session, "bill", lines)
        self.book.save_session(
            session, "bill", int(bill["amount"]), {"kind": "bill"}, card_id, "done", answer
        )
        bills = dict(self._state.get("bills") or {})
        bills["bills"] = [
            {**b, "state": "payment_pending"} if b.get("bill_id") == bill["bill_id"] else b
            for b in bills.get("bills", [])
        ]
        self._set(phase="success", message="bill_paid_ok", detail="", card=card or None,
                  receipt=receipt, bills=bills)  # fmt: skip

    # -- receipts ------------------------------------------------------------------------

    def _receipt(self, session: str, kind: str, lines: list[tuple[str, str]]) -> dict[str, Any]:
        when = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %z")
        width = max(_display_width(label) for label, _ in lines) + 2
        text = "\n".join(
            [
                "城市一卡通 自助服务终端 / City card kiosk",
                f"Kiosk 终端: {self.kiosk_id}",
                f"Time 时间: {when}",
                "-" * 40,
                *(label + " " * (width - _display_width(label)) + value for label, value in lines),
                "-" * 40,
                "Keep this receipt. 请保留此凭条。",
                "",
            ]
        )
        self.receipts.mkdir(parents=True, exist_ok=True)
        path = self.receipts / f"{session}-{kind}.txt"
        replace_file(path, text.encode("utf-8"))
        return {"session": session, "text": text, "file": path.name}

    def receipt_text(self, name: str) -> bytes | None:
        if re.fullmatch(r"[A-Za-z0-9-]+-(load|bill)\.txt", name) is None:
            return None
        path = self.receipts / name
        return path.read_bytes() if path.is_file() else None

    def close(self) -> None:
        if self._cash is not None:
            self._cash.stop()
        self.wait_idle(30)


def _display_width(text: str) -> int:
    """Columns a monospaced receipt printer gives ``text`` (CJK characters take two)."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _session_id() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%d%H%M%S") + "-" + secrets.token_hex(3)
