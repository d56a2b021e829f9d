"""The bus-validator loop: wait for a card, run the tap, wait for it to leave, repeat.

After a tap the loop waits until the reader has seen the field empty, however long the card lies
there, and only then looks for the next card: a card left on the validator is processed once.
The wait is polled in ``poll_timeout_s`` steps so that ``stop`` ends it. The removal it observes
is passed to the engine's :class:`agent.presence.PresenceGuard` (``engine.presence.left()``);
when the wait ends in a reader fault instead, the loop recovers as for any fault and takes cards
again, and the guard refuses the card that was never seen leaving if the reader reports it
again (reconnect, pcscd restart).

Nothing that goes wrong in one tap stops the loop: reader faults are logged and retried with a
bounded back-off (drivers reconnect on their next call), and an unexpected exception is logged
as a bug with its traceback before the loop carries on.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from agent.agent_status import ReaderHealth
from agent.errors import AgentError, ReaderError
from agent.readers.base import CardReader
from agent.transaction import TapOutcome, TransactionEngine

log = structlog.get_logger(__name__)

CARD_LYING_S = 5.0  # a card still in the field after this long is logged as lying there
EXPIRE_EVERY_S = 5.0


@dataclass(slots=True)
class LoopStats:
    taps: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    fares: int = 0
    reader_faults: int = 0
    bugs: int = 0
    tap_ms: list[float] = field(default_factory=list)

    def add(self, outcome: TapOutcome) -> None:
        self.taps += 1
        self.by_status[outcome.status] = self.by_status.get(outcome.status, 0) + 1
        if outcome.status in ("paid", "recovered"):
            self.fares += outcome.fare
        self.tap_ms.append(outcome.total_ms)


def run_validator(
    reader: CardReader,
    engine: TransactionEngine,
    *,
    stop: threading.Event,
    max_taps: int | None = None,
    on_outcome: Callable[[TapOutcome], None] | None = None,
    poll_timeout_s: float = 0.5,
    on_tick: Callable[[], None] | None = None,
    health: ReaderHealth | None = None,
) -> LoopStats:
    """Take cards until ``stop`` is set or ``max_taps`` taps have been handled.

    ``on_tick`` is called from the loop on every turn (at least every ``poll_timeout_s`` while
    it waits for a card or for one to leave): the systemd watchdog pings only from here.
    ``health`` is kept up to date with what the reader last did (answered, with or without a
    card; failed), for the agent's status file (:mod:`agent.agent_status`)."""
    stats = LoopStats()
    backoff = 0.05
    last_expire = 0.0
    _expire(engine)

    def expire_when_due() -> None:
        nonlocal last_expire
        if on_tick is not None:
            on_tick()
        if time.monotonic() - last_expire > EXPIRE_EVERY_S:
            _expire(engine)
            last_expire = time.monotonic()

    while not stop.is_set() and (max_taps is None or stats.taps < max_taps):
        try:
            expire_when_due()
            presence = reader.wait_for_card(poll_timeout_s)
            if health is not None:
                health.seen(card=presence is not None)
            if presence is None:
                continue
            outcome = engine.process_tap(reader, presence)
            stats.add(outcome)
            if on_outcome is not None:
                on_outcome(outcome)
            if max_taps is not None and stats.taps >= max_taps:
                break
            await_removal(
                reader,
                engine,
                stop=stop,
                poll_s=poll_timeout_s,
                idle=expire_when_due,
                health=health,
            )
            backoff = 0.05
        except ReaderError as exc:
            if health is not None:
                health.fault(str(exc))
            stats.reader_faults += 1
            log.warning("reader_fault", error=str(exc), retry_in_s=backoff)
            stop.wait(backoff)
            backoff = min(backoff * 2, 2.0)
        except AgentError as exc:
            log.warning("loop_error", party=exc.party, error=str(exc))
        except Exception:  # the loop must survive a bug in one tap; it is logged as such
            stats.bugs += 1
            log.exception("bug_in_tap_loop")
            stop.wait(backoff)
    return stats


def await_removal(
    reader: CardReader,
    engine: TransactionEngine,
    *,
    stop: threading.Event,
    poll_s: float,
    idle: Callable[[], None] | None = None,
    health: ReaderHealth | None = None,
) -> bool:
    """Wait until the reader sees the field empty (then tell the engine's presence guard and
    return ``True``) or ``stop`` is set (``False``). Never looks for a new card meanwhile; a
    reader fault propagates (the card was not seen leaving, so the guard keeps refusing it)."""
    started = time.monotonic()
    overdue = False
    while not stop.is_set():
        if reader.wait_for_removal(poll_s):
            if health is not None:
                health.seen(card=False)
            engine.presence.left()
            if overdue:
                log.info("card_left", after_s=round(time.monotonic() - started, 1))
            return True
        if not overdue and time.monotonic() - started >= CARD_LYING_S:
            overdue = True
            log.info("card_still_in_field", waited_s=CARD_LYING_S)
        if idle is not None:
            idle()
    return False


def _expire(engine: TransactionEngine) -> None:
    try:
        engine.expire_stale_intents()
    except AgentError as exc:
        log.warning("expire_failed", party=exc.party, error=str(exc))
