"""PC/SC readers through pyscard: a contactless reader for cards, a contact reader for the PSAM.

Both are found by a name pattern (``fnmatch`` style, e.g. ``"ACS ACR1281 1S Dual Reader PICC*"``)
among the readers pcscd lists, so a reader that is unplugged and plugged back in, or a pcscd that
restarts, is picked up again by the next call.

Every PC/SC call runs on a worker thread that owns the PC/SC context (pcsc-lite wants one context
per thread) and is waited for with a bounded timeout: ``SCardTransmit`` to a card that stopped
answering, or any call to a wedged pcscd, blocks in the library with no timeout of its own. A
worker that overruns is abandoned (it exits once the library returns) and the next call gets a
fresh worker and context. Card insertion and removal come from ``SCardGetStatusChange`` events.

pcsc-lite return codes become the agent's errors here and nowhere else:

* card gone, reset or silent        -> :class:`CardRemovedError` (SAM: :class:`SamMuteError`)
* an empty answer (0 bytes, success) -> the same: the card left during the exchange
* pcscd gone, reader gone or broken -> :class:`ReaderError` (the context is rebuilt next call)
* a call that overran its timeout   -> :class:`CardRemovedError` / :class:`SamMuteError` for APDUs,
                                       :class:`ReaderTimeout` otherwise
"""

from __future__ import annotations

import contextlib
import fnmatch
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Generic, TypeVar

import structlog
from smartcard import scard

from agent.errors import (
    AgentError,
    CardRemovedError,
    ConfigurationError,
    ReaderError,
    ReaderTimeout,
    SamMuteError,
)
from agent.readers.base import CardPresence, CardTechnology
from agent.readers.storage import PseudoApduStorage

T = TypeVar("T")
_log = structlog.get_logger(__name__)

# A worker call may overrun the PC/SC timeout it passes to the library by this much.
CALL_MARGIN_S = 2.0
READER_POLL_S = 0.2  # how often to look for a missing reader

# pcsc-lite return codes, grouped by who failed.
_CARD_GONE = frozenset(
    {
        scard.SCARD_W_REMOVED_CARD,
        scard.SCARD_W_RESET_CARD,
        scard.SCARD_W_UNPOWERED_CARD,
        scard.SCARD_W_UNRESPONSIVE_CARD,
        scard.SCARD_E_NO_SMARTCARD,
        scard.SCARD_E_NOT_TRANSACTED,
        scard.SCARD_E_PROTO_MISMATCH,
        scard.SCARD_E_COMM_DATA_LOST,
    }
)
_SERVICE_GONE = frozenset(
    {
        scard.SCARD_E_NO_SERVICE,
        scard.SCARD_E_SERVICE_STOPPED,
        scard.SCARD_E_INVALID_HANDLE,
        scard.SCARD_F_COMM_ERROR,
        scard.SCARD_F_INTERNAL_ERROR,
        scard.SCARD_E_NO_MEMORY,
    }
)
_READER_GONE = frozenset(
    {
        scard.SCARD_E_UNKNOWN_READER,
        scard.SCARD_E_READER_UNAVAILABLE,
        scard.SCARD_E_NO_READERS_AVAILABLE,
    }
)
_PRESENT = scard.SCARD_STATE_PRESENT
_EMPTY: int = scard.SCARD_STATE_EMPTY
_MUTE = scard.SCARD_STATE_MUTE
_GONE_STATES = scard.SCARD_STATE_UNAVAILABLE | scard.SCARD_STATE_UNKNOWN | scard.SCARD_STATE_IGNORE
_PCI = {scard.SCARD_PROTOCOL_T0: scard.SCARD_PCI_T0, scard.SCARD_PROTOCOL_T1: scard.SCARD_PCI_T1}
# PC/SC Part 3 ATR of a storage card: RID A0 00 00 03 06 in the historical bytes (§4a.1).
_STORAGE_CARD_RID = bytes.fromhex("A000000306")


def describe(rv: int) -> str:
    """``0x8010000C (No smart card inserted.)``."""
    text = scard.SCardGetErrorMessage(rv).strip().rstrip(".")
    return f"0x{rv & 0xFFFFFFFF:08X} ({text})"


class PcscCallError(Exception):
    """Internal: a PC/SC call returned ``rv``; translated at the seam methods."""

    def __init__(self, call: str, rv: int) -> None:
        super().__init__(f"{call}: {describe(rv)}")
        self.call = call
        self.rv = rv


def _check(call: str, rv: int) -> None:
    if rv != scard.SCARD_S_SUCCESS:
        raise PcscCallError(call, rv)


# ---------------------------------------------------------------------------------------------
# The worker thread: owns one PC/SC context, runs calls with a bounded wait
# ---------------------------------------------------------------------------------------------


@dataclass
class _Job(Generic[T]):
    fn: Callable[[PcscWorker], T]
    done: threading.Event = field(default_factory=threading.Event)
    result: T | None = None
    error: BaseException | None = None


class PcscWorker:
    """A thread with its own PC/SC context. :meth:`run` waits at most ``timeout`` seconds."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.hung = False
        self._context: int | None = None
        self._jobs: queue.SimpleQueue[_Job[Any] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=f"pcsc-{label}", daemon=True)
        self._thread.start()

    def run(self, fn: Callable[[PcscWorker], T], timeout: float) -> T:
        """Run ``fn(worker)`` on the worker thread; :class:`TimeoutError` if it overruns."""
        if self.hung:
            raise RuntimeError("worker is hung")  # pragma: no cover - callers replace it first
        job: _Job[T] = _Job(fn)
        self._jobs.put(job)
        if not job.done.wait(timeout):
            self.hung = True
            self._jobs.put(None)  # exit once the stuck call returns
            raise TimeoutError(f"PC/SC call did not return within {timeout:g} s")
        if job.error is not None:
            raise job.error
        return job.result  # type: ignore[return-value]

    def context(self) -> int:
        """The worker's PC/SC context, established on first use (only on the worker thread)."""
        if self._context is None:
            rv, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
            _check("SCardEstablishContext", rv)
            self._context = ctx
        return self._context

    def drop_context(self) -> None:
        ctx, self._context = self._context, None
        if ctx is not None:
            scard.SCardReleaseContext(ctx)

    def stop(self) -> None:
        """Release the context and end the thread (without waiting for a stuck call)."""
        if not self.hung:
            self._jobs.put(_Job(lambda w: w.drop_context()))
        self._jobs.put(None)

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job.result = job.fn(self)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
                job.error = exc
            job.done.set()
        self.drop_context()


# ---------------------------------------------------------------------------------------------
# One reader, found by name pattern
# ---------------------------------------------------------------------------------------------


def list_readers(worker: PcscWorker) -> list[str]:
    """Reader names pcscd shows (on the worker thread). No reader at all is an empty list."""
    rv, names = scard.SCardListReaders(worker.context(), [])
    if rv == scard.SCARD_E_NO_READERS_AVAILABLE:
        return []
    _check("SCardListReaders", rv)
    return list(names)


def parse_atr_historical(atr: bytes) -> bytes:
    """The historical bytes of an ISO 7816-3 ATR (T0's low nibble counts them)."""
    if len(atr) < 2:
        return b""
    count, y, i = atr[1] & 0x0F, atr[1] >> 4, 2
    while y:
        i += bin(y).count("1")
        y = atr[i - 1] >> 4 if y & 0x8 and i - 1 < len(atr) else 0
    return atr[i : i + count]


class _PcscDevice:
    """What the card reader and the SAM slot share: a worker, a pattern, a card handle."""

    role = "reader"

    def __init__(self, pattern: str, *, timeout: float, label: str) -> None:
        if not pattern:
            raise ConfigurationError(f"PC/SC {label}: the reader name pattern is empty")
        if not timeout > 0:
            raise ConfigurationError(f"PC/SC {label}: timeout must be positive")
        self.pattern = pattern
        self.timeout = timeout
        self.label = label
        self.reader_name = ""
        self.name = f"pcsc {pattern!r}"
        self._worker: PcscWorker | None = None
        self._card: int | None = None
        self._stale: list[int] = []
        self._protocol = 0
        self._closed = False

    # -- the worker, with recovery ----------------------------------------------------------

    def _call(self, what: str, fn: Callable[[PcscWorker], T], budget: float) -> T:
        """Run ``fn`` on the worker; translate pcsc-lite errors and overruns."""
        if self._closed:
            raise ReaderError(f"{self.name}: {self.label} is closed")
        worker = self._worker
        if worker is None or worker.hung:
            worker = self._worker = PcscWorker(self.label)
        try:
            return worker.run(fn, budget)
        except TimeoutError as exc:
            # The stuck call still holds the card handle; it dies with its context.
            self._card = None
            self._worker = None
            raise self._overrun(what, budget) from exc
        except PcscCallError as exc:
            if exc.rv in _SERVICE_GONE:
                self._service_lost()
                self._run_quietly(worker, lambda w: w.drop_context())
            raise self._translate(what, exc) from exc

    def _service_lost(self) -> None:
        """pcscd went away: handles and event counters of the old context mean nothing now."""
        self._card = None
        self._stale.clear()

    def _forget_card(self) -> None:
        """The card behind the handle is gone; the handle is released by the next disconnect
        (a forgotten exclusive handle would make the next connect a sharing violation)."""
        card, self._card = self._card, None
        if card is not None:
            self._stale.append(card)

    def _overrun(self, what: str, budget: float) -> AgentError:
        return ReaderTimeout(f"{self.name}: {what} did not return within {budget:g} s")

    def _translate(self, what: str, exc: PcscCallError) -> AgentError:
        if exc.rv in _SERVICE_GONE:
            return ReaderError(f"{self.name}: {what}: pcscd unavailable: {describe(exc.rv)}")
        if exc.rv in _READER_GONE:
            return ReaderError(f"{self.name}: {what}: reader gone: {describe(exc.rv)}")
        return ReaderError(f"{self.name}: {what}: {describe(exc.rv)}")

    @staticmethod
    def _run_quietly(worker: PcscWorker, fn: Callable[[PcscWorker], None]) -> None:
        if worker.hung:
            return
        with contextlib.suppress(TimeoutError, PcscCallError):
            worker.run(fn, CALL_MARGIN_S)

    # -- helpers that run on the worker thread ----------------------------------------------

    def _find(self, worker: PcscWorker) -> str:
        names = list_readers(worker)
        for candidate in names:
            if fnmatch.fnmatchcase(candidate, self.pattern):
                if candidate != self.reader_name:
                    _log.info("pcsc_reader_found", role=self.role, reader=candidate)
                self.reader_name = candidate
                return candidate
        raise ReaderError(
            f"{self.name}: no PC/SC reader matches (readers: {', '.join(names) or 'none'})"
        )

    def _connect(self, worker: PcscWorker, share: int) -> bytes:
        """Connect to the card in the reader; return its ATR."""
        self._disconnect(worker)
        reader = self._find(worker)
        protocols = scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1
        rv, card, protocol = scard.SCardConnect(worker.context(), reader, share, protocols)
        _check("SCardConnect", rv)
        self._card, self._protocol = card, protocol
        return self._atr(card)

    @staticmethod
    def _atr(card: int) -> bytes:
        rv, _reader, _state, _protocol, atr = scard.SCardStatus(card)
        _check("SCardStatus", rv)
        return bytes(atr)

    def _disconnect(self, worker: PcscWorker, disposition: int = scard.SCARD_LEAVE_CARD) -> None:
        self._forget_card()
        stale, self._stale = self._stale, []
        for card in stale:
            scard.SCardDisconnect(card, disposition)  # the handle is gone either way

    def _transmit(self, apdu: bytes) -> tuple[bytes, float]:
        card = self._card
        if card is None:
            raise PcscCallError("SCardTransmit", scard.SCARD_E_INVALID_HANDLE)
        started = time.perf_counter()
        rv, response = scard.SCardTransmit(card, _PCI.get(self._protocol, 0), list(apdu))
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        _check("SCardTransmit", rv)
        return bytes(response), elapsed_ms

    def close(self) -> None:
        if self._closed:
            return
        worker, self._worker = self._worker, None
        if worker is not None:
            self._run_quietly(worker, self._disconnect)
            worker.stop()
        self._closed = True


class PcscCardReader(_PcscDevice):
    """A PC/SC contactless reader as a :class:`agent.readers.base.CardReader`.

    Presence comes from ``SCardGetStatusChange`` events (pcscd polls readers that do not report
    events themselves, about every 0.4 s). ``timeout`` bounds every APDU. MIFARE Classic
    operations (:class:`agent.readers.storage.StorageCardReader`) go through the reader
    firmware's PC/SC Part 3 / ACS pseudo-APDUs over the same ``transmit``.

    What PC/SC lets the driver observe of presence (pcsc-lite 1.9.9, verified against vpcd):

    * the reader state (``SCARD_STATE_EMPTY`` / ``PRESENT`` / ``MUTE``) and, in its high 16 bits,
      pcscd's count of card insertions and removals in that reader. Connect, disconnect and
      reset leave the count alone; a card taken away and put back (or replaced by another)
      between two looks moves it, so :meth:`wait_for_removal` counts that as a removal. A mute
      card is still in the field: not a removal;
    * the ATR, read by pcscd at insertion only: a card replaced by another while pcscd kept
      seeing the slot occupied changes neither the ATR nor the count, so such a swap is not
      seen at all (the loop then keeps waiting for an empty field, and the new card is taken
      after it). vpcd always shows a swap as a removal and an insertion;
    * the count restarts when pcscd does, so after the connection to pcscd was lost the driver
      does not know whether the card left: :meth:`wait_for_removal` raises :class:`ReaderError`
      until :meth:`wait_for_card` has looked at the field again (the presence guard then refuses
      the card that was never seen leaving);
    * not how many cards are in the field: the reader firmware resolves anticollision and
      PC/SC reports one card, so ``CardPresence.cards_in_field`` stays 1. A phone or second card
      laid beside the first is either ignored by the reader or taken instead of it; the guard
      and the card id check keep that from charging a card twice.
    """

    role = "card"

    def __init__(self, pattern: str, *, timeout: float = 1.0) -> None:
        super().__init__(pattern, timeout=timeout, label="card reader")
        self._state = scard.SCARD_STATE_UNAWARE
        storage = PseudoApduStorage(self.transmit)
        self.load_key = storage.load_key
        self.authenticate = storage.authenticate
        self.read_block = storage.read_block
        self.write_block = storage.write_block
        self.increment = storage.increment
        self.decrement = storage.decrement
        self.restore = storage.restore
        self.transfer = storage.transfer
        self.value_transfer = storage.value_transfer

    def wait_for_card(self, timeout: float) -> CardPresence | None:
        deadline = time.monotonic() + timeout
        while True:
            remaining = max(0.0, deadline - time.monotonic())
            found = self._call(
                "wait for card",
                partial(self._wait_state, want_present=True, wait_s=remaining),
                remaining + CALL_MARGIN_S,
            )
            if found:
                try:
                    return self._call("connect", self._activate, self.timeout + CALL_MARGIN_S)
                except ReaderError as exc:
                    if not isinstance(exc.__cause__, PcscCallError) or (
                        exc.__cause__.rv not in _CARD_GONE
                    ):
                        raise
                    _log.debug("pcsc_card_left_before_connect", reader=self.reader_name)
                    time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
            if time.monotonic() >= deadline:
                return None

    def transmit(self, apdu: bytes) -> bytes:
        if self._card is None:
            raise CardRemovedError(f"{self.name}: no card connected")
        try:
            response, elapsed_ms = self._call(
                "transmit", lambda w: self._transmit(apdu), self.timeout
            )
        except ReaderError as exc:
            cause = exc.__cause__
            if isinstance(cause, PcscCallError) and cause.rv in _CARD_GONE:
                self._forget_card()
                raise CardRemovedError(f"{self.name}: card left the field: {cause}") from cause
            raise
        if not response:
            # No status word at all, with success: what pcscd passes on when the card (or vpcd's
            # virtual one) leaves during the exchange. The card is gone, not garbling its answer.
            self._forget_card()
            raise CardRemovedError(
                f"{self.name}: card left the field: empty answer from {self.reader_name!r} "
                "(fate of the command unknown)"
            )
        _log.debug(
            "pcsc_apdu", reader=self.reader_name, ins=f"{apdu[1]:02X}" if len(apdu) > 1 else "",
            sw=response[-2:].hex().upper(), ms=round(elapsed_ms, 2),
        )  # fmt: skip
        return response

    def _overrun(self, what: str, budget: float) -> AgentError:
        if what == "transmit":
            return CardRemovedError(
                f"{self.name}: card silent for {budget:g} s (fate of the command unknown)"
            )
        return super()._overrun(what, budget)

    def wait_for_removal(self, timeout: float) -> bool:
        """``True`` once pcscd shows the slot empty, or its event count moved (the card left
        and something came back between two looks); ``False`` while the card stays (mute or
        not). A reader that went away, or a pcscd connection rebuilt since the card was seen,
        raises :class:`ReaderError`: the card may still be there."""
        deadline = time.monotonic() + timeout
        self._call("disconnect", self._disconnect, CALL_MARGIN_S)
        if self._state == scard.SCARD_STATE_UNAWARE:
            raise ReaderError(
                f"{self.name}: the connection to pcscd was rebuilt since the card was seen; "
                "whether it left is unknown"
            )
        remaining = max(0.0, deadline - time.monotonic())
        return self._call(
            "wait for removal",
            lambda w: self._wait_state(w, want_present=False, wait_s=remaining),
            remaining + CALL_MARGIN_S,
        )

    def feedback(self, ok: bool, text: str) -> None:
        # LED / buzzer commands are vendor escapes (SCardControl), not part of PC/SC; the
        # profile names no such reader yet, so the outcome only goes to the log.
        _log.debug("pcsc_feedback", reader=self.reader_name, ok=ok, text=text)

    # -- on the worker thread --------------------------------------------------------------

    def _wait_state(self, worker: PcscWorker, *, want_present: bool, wait_s: float) -> bool:
        """Wait up to ``wait_s`` for a card to be present (or for the card to have left, see
        :meth:`_left_since`); return whether it is (has)."""
        reader = self._find(worker)
        deadline = time.monotonic() + wait_s
        since = self._state

        def reached() -> bool:
            return self._present() if want_present else self._left_since(since)

        while True:
            ms = max(0, int((deadline - time.monotonic()) * 1000))
            rv, states = scard.SCardGetStatusChange(worker.context(), ms, [(reader, self._state)])
            if rv == scard.SCARD_E_TIMEOUT:
                return reached()
            _check("SCardGetStatusChange", rv)
            _name, event, _atr = states[0]
            if event & _GONE_STATES:
                self._state = scard.SCARD_STATE_UNAWARE
                raise PcscCallError("SCardGetStatusChange", scard.SCARD_E_READER_UNAVAILABLE)
            # The high 16 bits count events, so a quick remove + insert still shows as a change.
            self._state = event & ~scard.SCARD_STATE_CHANGED
            if reached() or ms == 0:
                return reached()

    def _left_since(self, since: int) -> bool:
        """The slot is empty, or pcscd counted a removal (and insertion) since state ``since``."""
        if self._state & _EMPTY:
            return True
        return bool(since != scard.SCARD_STATE_UNAWARE and (self._state >> 16) != (since >> 16))

    def _service_lost(self) -> None:
        super()._service_lost()
        self._state = scard.SCARD_STATE_UNAWARE

    def _present(self) -> bool:
        return bool(self._state & _PRESENT) and not self._state & _MUTE

    def _activate(self, worker: PcscWorker) -> CardPresence:
        atr = self._connect(worker, scard.SCARD_SHARE_SHARED)
        historical = parse_atr_historical(atr)
        storage = _STORAGE_CARD_RID in historical[:8]
        uid = b""
        response, _ms = self._transmit(bytes.fromhex("FFCA000000"))  # GET DATA: UID (§4a.1)
        if not response:  # an empty answer: the card left while being activated
            raise PcscCallError("SCardTransmit", scard.SCARD_W_REMOVED_CARD)
        if response[-2:] == b"\x90\x00":
            uid = response[:-2]
        presence = CardPresence(
            uid=uid,
            technology=CardTechnology.MIFARE_CLASSIC if storage else CardTechnology.ISO_DEP,
            sak=None,
            ats=historical,
        )
        _log.debug("pcsc_card", reader=self.reader_name, atr=atr.hex().upper(), uid=uid.hex())
        return presence


class PcscSamSlot(_PcscDevice):
    """A PC/SC contact reader holding the PSAM, as a :class:`agent.readers.base.SamSlot`.

    The slot never reconnects behind the caller's back: after the connection is lost (SAM pulled,
    pcscd restarted) every APDU raises :class:`SamMuteError` until :meth:`reset`, because a SAM
    that was powered off has lost its selected application and session keys.
    """

    role = "sam"

    def __init__(self, pattern: str, *, timeout: float = 1.0) -> None:
        super().__init__(pattern, timeout=timeout, label="SAM reader")

    def reset(self) -> bytes:
        return self._call("reset", self._reset, self.timeout + CALL_MARGIN_S)

    def transmit(self, apdu: bytes) -> bytes:
        if self._card is None:
            raise SamMuteError(f"{self.name}: SAM not connected (lost or never reset)")
        response, _ms = self._call("transmit", lambda w: self._transmit(apdu), self.timeout)
        if not response:
            # A SAM that answers nothing at all has been pulled or lost power: it needs a reset.
            self._forget_card()
            raise SamMuteError(
                f"{self.name}: SAM gave an empty answer in {self.reader_name!r} (lost; reset it)"
            )
        return response

    def _reset(self, worker: PcscWorker) -> bytes:
        card = self._card
        if card is not None:
            protocols = scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1
            rv, protocol = scard.SCardReconnect(
                card, scard.SCARD_SHARE_EXCLUSIVE, protocols, scard.SCARD_RESET_CARD
            )
            if rv == scard.SCARD_S_SUCCESS:
                self._protocol = protocol
                return self._atr(card)
        return self._connect(worker, scard.SCARD_SHARE_EXCLUSIVE)

    def _overrun(self, what: str, budget: float) -> AgentError:
        return SamMuteError(f"{self.name}: SAM did not answer {what} within {budget:g} s")

    def _translate(self, what: str, exc: PcscCallError) -> AgentError:
        if exc.rv in _CARD_GONE:
            self._forget_card()
            return SamMuteError(f"{self.name}: SAM did not answer {what}: {describe(exc.rv)}")
        return super()._translate(what, exc)


# ---------------------------------------------------------------------------------------------
# Listing, for `cardagent readers`
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReaderInfo:
    name: str
    card_present: bool
    atr: bytes


def survey(timeout: float = 2.0) -> list[ReaderInfo]:
    """Every PC/SC reader pcscd shows, with whether something is in it (and its ATR)."""
    worker = PcscWorker("survey")

    def look(w: PcscWorker) -> list[ReaderInfo]:
        names = list_readers(w)
        if not names:
            return []
        rv, states = scard.SCardGetStatusChange(
            w.context(), 0, [(n, scard.SCARD_STATE_UNAWARE) for n in names]
        )
        _check("SCardGetStatusChange", rv)
        return [ReaderInfo(name, bool(event & _PRESENT), bytes(atr)) for name, event, atr in states]

    try:
        return worker.run(look, timeout)
    except TimeoutError as exc:
        raise ReaderTimeout(f"pcscd did not answer within {timeout:g} s") from exc
    except PcscCallError as exc:
        raise ReaderError(f"PC/SC: {exc}") from exc
    finally:
        worker.stop()
