"""Running the validator: open the store and the hardware, loop, print live lines."""

from __future__ import annotations

import signal
import statistics
import threading
import time
from collections.abc import Callable
from types import FrameType

import structlog

from agent.agent_status import AGENT_STATUS_FILE, ReaderHealth, StatusPublisher
from agent.blacklist import (
    BLACKLIST_FILE,
    PRINTED_BLACKLIST_FILE,
    SPACE_PRINTED,
    SPACE_SERIAL,
    Blacklist,
    BlacklistFileError,
    CardBlacklist,
)
from agent.clock import CLOCK_OFFSET_FILE, ClockGuard
from agent.console.restart import watch_for_restart
from agent.console.settings import SettingsFile, read_settings
from agent.errors import AgentError, ReaderError, SamError
from agent.params import PARAMS_FILE, ActiveParams
from agent.position import POSITION_FILE, PositionFile
from agent.profile import Profile
from agent.sdnotify import Notifier, Watchdog
from agent.transaction import TapOutcome, TransactionEngine
from agent.validator import LoopStats, run_validator
from agent.wiring import DataDir, Hardware, open_hardware

log = structlog.get_logger(__name__)
OFFSET_CHECK_EVERY_S = 10.0  # while the clock is suspect: has the sync daemon confirmed it?


def run_agent(
    profile: Profile,
    data_dir: DataDir,
    reader_url: str | None,
    max_taps: int | None,
    stop: threading.Event | None = None,
    notifier: Notifier | None = None,
) -> LoopStats:
    """Open store and hardware, run the validator loop until stopped, close everything.

    Under systemd (``NOTIFY_SOCKET``): ``READY=1`` when the loop starts taking cards,
    ``WATCHDOG=1`` from the loop itself (:class:`agent.sdnotify.Watchdog`), ``STATUS=`` lines
    (waiting for hardware, taking cards, the clock state) and ``STOPPING=1`` at the end."""
    stop = stop or threading.Event()
    notifier = notifier or Notifier()
    watchdog = Watchdog(notifier)
    _stop_on_signals(stop)
    if reader_url is None:  # the console's 'set reader_url' (agent.console.settings)
        reader_url = read_settings(data_dir.path).get("reader_url")
    try:
        store = data_dir.open_store(cut_over=True)  # a new device key waiting: in force now
    except BaseException:
        notifier.stopping("stopping: the data directory cannot be opened")
        raise
    end_watch = watch_for_restart(data_dir.path, stop)  # the console's 'restart'
    health = ReaderHealth("card", profile.reader.driver, reader_location(profile, reader_url))
    publisher = StatusPublisher(
        data_dir.path / AGENT_STATUS_FILE,
        mode="run",
        profile=profile.name,
        terminal_id=store.terminal_id,
        reader=health,
    )
    try:
        notifier.status("opening the reader and PSAMs")
        publisher.tick()
        hardware = _open_hardware_until_ready(
            profile, data_dir, reader_url, stop, watchdog, publisher.waiting
        )
        if hardware is None:
            return LoopStats()
        try:
            guard = ClockGuard.for_profile(
                profile.clock_policy,
                profile.clock_max_step_s,
                profile.clock_not_before,
                store.last_record_at(),
            )
            engine = TransactionEngine(
                profile,
                store,
                hardware.sams,
                blacklist=_open_blacklist(data_dir),
                params=ActiveParams(data_dir.path / PARAMS_FILE),
                clock_guard=guard,
            )
            # the console's settings (line, stop, vehicle, institution), looked at every tap;
            # a live position.json (GPS) wins for line and stop (agent.position)
            settings = SettingsFile(data_dir.path)
            engine.site = settings.site
            engine.position = PositionFile(
                data_dir.path / POSITION_FILE, profile, settings.site
            ).current
            log.info("validator_started", profile=profile.name, terminal=store.terminal_id)
            status = StatusLine(notifier, guard, store.terminal_id)
            notifier.ready(status.text())
            publisher.sams = hardware.sams.describe  # no APDU: what the router last saw
            publisher.clock_state = lambda: (not guard.suspect, guard.status())
            publisher.running()

            offset_file = data_dir.path / CLOCK_OFFSET_FILE
            next_offset_check = [0.0]

            def tick() -> None:
                watchdog.alive()
                if guard.suspect and time.monotonic() >= next_offset_check[0]:
                    next_offset_check[0] = time.monotonic() + OFFSET_CHECK_EVERY_S
                    guard.confirm_from_host(offset_file)
                status.refresh()
                publisher.tick()

            def tapped(outcome: TapOutcome) -> None:
                print_tap(outcome)
                publisher.tapped()

            return run_validator(
                hardware.reader,
                engine,
                stop=stop,
                max_taps=max_taps,
                on_outcome=tapped,
                on_tick=tick,
                health=health,
            )
        finally:
            hardware.close()
    finally:
        publisher.stopped()
        end_watch()
        notifier.stopping()
        store.close()
        notifier.close()


class StatusLine:
    """The ``STATUS=`` line systemd shows (``systemctl status cardagent``): sent on change."""

    def __init__(self, notifier: Notifier, guard: ClockGuard, terminal_id: str) -> None:
        self.notifier = notifier
        self.guard = guard
        self.terminal_id = terminal_id
        self._sent = ""

    def text(self) -> str:
        return f"taking cards as {self.terminal_id}; {self.guard.status()}"

    def refresh(self) -> None:
        text = self.text()
        if text != self._sent:
            self._sent = text
            self.notifier.status(text)


def _open_blacklist(data_dir: DataDir) -> CardBlacklist:
    """The blacklists the sync daemon maintains (raw serials and printed numbers, two key
    spaces); a corrupt file is replaced by its next pull."""
    lists = []
    for name, space in ((BLACKLIST_FILE, SPACE_SERIAL), (PRINTED_BLACKLIST_FILE, SPACE_PRINTED)):
        path = data_dir.path / name
        try:
            lists.append(Blacklist.open(path, space=space))
        except BlacklistFileError as exc:
            log.error("blacklist_unusable", path=str(path), error=str(exc))
            lists.append(Blacklist(path, space=space))
    return CardBlacklist(*lists)


def reader_location(profile: Profile, reader_url: str | None) -> str:
    """Where the contactless reader is: the URL in force, or the PC/SC reader name pattern."""
    rp = profile.reader
    return reader_url or rp.url or rp.card_reader


def _open_hardware_until_ready(
    profile: Profile,
    data_dir: DataDir,
    reader_url: str | None,
    stop: threading.Event,
    watchdog: Watchdog,
    on_wait: Callable[[AgentError], None] | None = None,
) -> Hardware | None:
    """A validator boots before its reader module sometimes: retry with back-off until stopped.
    ``on_wait`` hears every failed attempt (the status file says what the agent waits for)."""
    backoff = 0.1
    while not stop.is_set():
        watchdog.alive()  # retrying is progress: a missing reader is not a hung agent
        try:
            return open_hardware(profile, data_dir, reader_url)
        except (ReaderError, SamError) as exc:
            log.warning("hardware_unavailable", party=exc.party, error=str(exc), retry_in_s=backoff)
            watchdog.notifier.status(f"waiting for hardware: {exc.party}: {exc}")
            if on_wait is not None:
                on_wait(exc)
            stop.wait(backoff)
            backoff = min(backoff * 2, 5.0)
    return None


def _stop_on_signals(stop: threading.Event) -> None:
    if threading.current_thread() is not threading.main_thread():
        return

    def handle(signum: int, _frame: FrameType | None) -> None:
        log.info("stopping", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


def print_tap(outcome: TapOutcome) -> None:
    """One live line per tap on standard output."""
    balance = "" if outcome.balance_after is None else f"{outcome.balance_after / 100:9.2f}"
    seq = "" if outcome.record_seq is None else f"#{outcome.record_seq}"
    detail = outcome.reason if outcome.status not in ("paid", "recovered") else ""
    print(
        f"{outcome.status:<9} {outcome.card_id or '-':<20} {outcome.family:<10} "
        f"fare {outcome.fare / 100:5.2f} balance {balance:>9} {seq:>6} "
        f"{outcome.total_ms:7.1f} ms  {detail}",
        flush=True,
    )


def print_summary(stats: LoopStats) -> None:
    counts = ", ".join(f"{k} {v}" for k, v in sorted(stats.by_status.items()))
    print(f"\n{stats.taps} taps: {counts or 'none'}; fares taken {stats.fares / 100:.2f}")
    if stats.tap_ms:
        ms = sorted(stats.tap_ms)
        p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
        print(f"tap time p50 {statistics.median(ms):.1f} ms, p99 {p99:.1f} ms (incl. card I/O)")
    if stats.reader_faults or stats.bugs:
        print(f"reader faults {stats.reader_faults}, bugs {stats.bugs}")
