"""Clock discipline (issue 12): the engine driven with an injected wall clock and monotonic clock.

Documented outcomes, per ``[clock] policy``:

* backward jump (an hour back while running), reset to 2000-01-01 (at start or while running),
  forward jump of a year while running: the clock is *suspect*;
* ``last_good_plus_elapsed``: the card is taken; the tap and the record use the last good time
  + the monotonic time elapsed since it; the record notes ``clock = "suspect"`` with the last
  good time and what the wall clock said; ``created_at`` never goes back;
* ``refuse``: the tap is refused ``clock_unreliable``, the card is not touched, no record;
* the clock is good again when the wall clock agrees with the expected time again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agent.clock import RELEASE_DATE, ClockGuard, midnight_utc
from agent.errors import ConfigurationError
from agent.offline_store import Record
from agent.profile import parse_profile
from agent.transaction import TransactionEngine
from sync.client import SyncClient
from sync.errors import HostError
from tests.fake_reader.scenario import DEMO_PROFILE, make_card
from tests.rig import Rig

START = dt.datetime(2026, 12, 1, 8, 0, tzinfo=dt.UTC)


class Clocks:
    """A wall clock the test sets and a monotonic clock the test advances."""

    def __init__(self) -> None:
        self.wall_time = START
        self.mono = 1000.0

    def wall(self) -> dt.datetime:
        return self.wall_time

    def monotonic(self) -> float:
        return self.mono

    def elapse(self, seconds: float) -> None:
        """Real time passes: both clocks move together."""
        self.mono += seconds
        self.wall_time += dt.timedelta(seconds=seconds)


def guarded(rig: Rig, clocks: Clocks, policy: str = "last_good_plus_elapsed") -> TransactionEngine:
    profile = dataclasses.replace(rig.profile, clock_policy=policy)
    guard = ClockGuard.for_profile(
        policy,
        profile.clock_max_step_s,
        profile.clock_not_before,
        rig.store.last_record_at(),
        wall=clocks.wall,
        monotonic=clocks.monotonic,
    )
    rig.engine = TransactionEngine(
        profile, rig.store, rig.sam, clock_guard=guard, clock=clocks.wall
    )
    return rig.engine


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    rig = Rig(tmp_path / "rig")
    yield rig
    rig.close()


def created(record: Record) -> dt.datetime:
    return dt.datetime.fromisoformat(record.created_at.replace("Z", "+00:00"))


def pay(rig: Rig, n: int) -> Record:
    outcome = rig.tap(make_card("tunion", n, rig.keyset, balance=5000))
    assert outcome.status == "paid", outcome
    return rig.records()[-1]


def test_a_good_clock_is_used_and_noted_ok(rig: Rig) -> None:
    clocks = Clocks()
    guarded(rig, clocks)
    first = pay(rig, 1)
    clocks.elapse(30)
    second = pay(rig, 2)
    assert first.fields["clock"] == "ok" and second.fields["clock"] == "ok"
    assert created(first) == START
    assert created(second) == START + dt.timedelta(seconds=30)
    assert rig.store.verify().ok  # the clock field is part of the signed body


def test_backward_jump_keeps_last_good_plus_elapsed(rig: Rig) -> None:
    """An hour back while running: suspect; the record's time is last good + elapsed."""
    clocks = Clocks()
    guarded(rig, clocks)
    pay(rig, 1)
    clocks.elapse(10)
    clocks.wall_time -= dt.timedelta(hours=1)
    with capture_logs() as logs:
        record = pay(rig, 2)
    assert record.fields["clock"] == "suspect"
    assert record.fields["clock_last_good"] == "2026-12-01T08:00:00.000Z"
    assert record.fields["clock_wall"] == "2026-12-01T07:00:10.000Z"
    assert created(record) == START + dt.timedelta(seconds=10)
    alarms = [e for e in logs if e["event"] == "clock_unreliable"]
    assert alarms and "jumped back" in alarms[0]["reason"]
    assert "SUSPECT" in (rig.engine.clock_guard.status() if rig.engine.clock_guard else "")
    # someone sets the clock right: good again, and the records go on from there
    clocks.wall_time += dt.timedelta(hours=1)
    clocks.elapse(5)
    with capture_logs() as logs:
        again = pay(rig, 3)
    assert again.fields["clock"] == "ok"
    assert created(again) == START + dt.timedelta(seconds=15)
    assert [e["event"] for e in logs if e["event"].startswith("clock_")] == ["clock_good_again"]


def test_reset_to_2000_at_start_reads_before_the_last_record(rig: Rig) -> None:
    """A flat RTC battery: the agent restarts on 2000-01-01. The last record is the floor;
    taps go on at that time + elapsed, noted suspect, and created_at never goes back."""
    clocks = Clocks()
    guarded(rig, clocks)
    last = pay(rig, 1)
    rig.restart()
    clocks.wall_time = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
    clocks.mono = 5.0  # a reboot: monotonic time starts again
    guarded(rig, clocks)
    clocks.mono += 20
    clocks.wall_time += dt.timedelta(seconds=20)
    record = pay(rig, 2)
    assert record.fields["clock"] == "suspect"
    assert record.fields["clock_wall"] == "2000-01-01T00:00:20.000Z"
    assert record.fields["clock_last_good"] == last.created_at
    assert created(record) == created(last) + dt.timedelta(seconds=20)
    assert created(record) > created(last)
    assert rig.store.verify().ok


def test_reset_to_2000_without_records_uses_the_release_date(rig: Rig) -> None:
    clocks = Clocks()
    clocks.wall_time = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
    guarded(rig, clocks)
    record = pay(rig, 1)
    assert record.fields["clock"] == "suspect"
    assert created(record) == midnight_utc(RELEASE_DATE)


def test_forward_jump_of_a_year_while_running(rig: Rig) -> None:
    """A year ahead: suspect; the records keep the last good time + elapsed (not next year),
    so a double tap and the intents' recovery window are still measured right."""
    clocks = Clocks()
    guarded(rig, clocks)
    pay(rig, 1)
    clocks.elapse(60)
    clocks.wall_time += dt.timedelta(days=365)
    with capture_logs() as logs:
        record = pay(rig, 2)
    assert record.fields["clock"] == "suspect"
    assert created(record) == START + dt.timedelta(seconds=60)
    assert any(e["event"] == "clock_unreliable" and "jumped forward" in e["reason"] for e in logs)


@pytest.mark.parametrize(
    "jump",
    [
        pytest.param(
            lambda c: setattr(c, "wall_time", c.wall_time - dt.timedelta(hours=1)), id="back"
        ),
        pytest.param(
            lambda c: setattr(c, "wall_time", dt.datetime(2000, 1, 1, tzinfo=dt.UTC)), id="reset"
        ),
        pytest.param(
            lambda c: setattr(c, "wall_time", c.wall_time + dt.timedelta(days=365)), id="forward"
        ),
    ],
)
def test_refuse_policy_refuses_taps_while_the_clock_is_suspect(rig: Rig, jump) -> None:
    """``[clock] policy = "refuse"``: clock_unreliable, the card is not debited, no record."""
    clocks = Clocks()
    guarded(rig, clocks, policy="refuse")
    pay(rig, 1)
    clocks.elapse(10)
    jump(clocks)
    card = make_card("cjt166", 2, rig.keyset, balance=5000)
    outcome = rig.tap(card)
    assert outcome.status == "refused"
    assert outcome.reason.startswith("clock_unreliable")
    assert card.balance == 5000 and len(rig.records()) == 1


def test_clock_profile_settings_are_validated_at_load() -> None:
    import tomllib

    raw = tomllib.loads(DEMO_PROFILE.read_text(encoding="utf-8"))
    base_dir = DEMO_PROFILE.parent
    profile = parse_profile(raw, base_dir=base_dir)
    assert profile.clock_policy == "last_good_plus_elapsed" and profile.clock_max_step_s == 300
    raw["clock"] = {"policy": "refuse", "max_step_s": 60, "not_before": dt.date(2026, 6, 1)}
    profile = parse_profile(raw, base_dir=base_dir)
    assert (profile.clock_policy, profile.clock_max_step_s) == ("refuse", 60.0)
    assert profile.clock_not_before == dt.date(2026, 6, 1)
    for bad, field in (
        ({"policy": "wall_clock"}, "clock.policy"),
        ({"max_step_s": 0}, "clock.max_step_s"),
        ({"not_before": "2026-06-01"}, "clock.not_before"),
        ({"polcy": "refuse"}, "clock.polcy"),
    ):
        raw["clock"] = bad
        with pytest.raises(ConfigurationError, match=field):
            parse_profile(raw, base_dir=base_dir)


def test_not_before_in_the_profile_raises_the_floor() -> None:
    clocks = Clocks()
    clocks.wall_time = dt.datetime(2027, 1, 1, tzinfo=dt.UTC)
    guard = ClockGuard.for_profile(
        "last_good_plus_elapsed",
        300.0,
        dt.date(2027, 3, 1),
        None,
        wall=clocks.wall,
        monotonic=clocks.monotonic,
    )
    reading = guard.read()
    assert not reading.ok and reading.now == dt.datetime(2027, 3, 1, tzinfo=dt.UTC)
    guard.confirm()  # a trusted source says the wall clock is right after all
    assert guard.read().ok


def test_clock_set_right_after_a_reset_is_good_again_however_long_the_device_was_off(
    rig: Rig,
) -> None:
    """Reset to 2000 at boot (suspect; the last record is only a lower bound), then a
    technician sets the clock right: two days after the last record is not a 'jump'."""
    clocks = Clocks()
    guarded(rig, clocks)
    pay(rig, 1)
    rig.restart()
    clocks.wall_time, clocks.mono = dt.datetime(2000, 1, 1, tzinfo=dt.UTC), 5.0
    guarded(rig, clocks)
    assert pay(rig, 2).fields["clock"] == "suspect"
    clocks.mono += 60
    clocks.wall_time = START + dt.timedelta(days=2)
    record = pay(rig, 3)
    assert record.fields["clock"] == "ok"
    assert created(record) == START + dt.timedelta(days=2)


def test_the_sync_daemons_offset_from_the_host_confirms_the_clock(rig: Rig, tmp_path: Path) -> None:
    """A year forward while running stays suspect until the sync daemon has measured the wall
    clock against the host's time (clock-offset.json) and found them within 2 s."""
    clocks = Clocks()
    engine = guarded(rig, clocks)
    guard = engine.clock_guard
    assert guard is not None
    pay(rig, 1)
    clocks.elapse(5)
    clocks.wall_time += dt.timedelta(days=365)  # the host says the year ahead is right
    assert pay(rig, 2).fields["clock"] == "suspect"
    offsets = tmp_path / "clock-offset.json"
    now = clocks.wall_time.timestamp()
    offsets.write_text(json.dumps({"clock_offset_s": 7200.0, "clock_offset_measured_at": now}))
    assert not guard.confirm_from_host(offsets)  # the host disagrees by two hours
    offsets.write_text(json.dumps({"clock_offset_s": 0.4, "clock_offset_measured_at": now - 3e7}))
    assert not guard.confirm_from_host(offsets)  # measured before the jump: says nothing now
    offsets.write_text(json.dumps({"clock_offset_s": 0.4, "clock_offset_measured_at": now}))
    assert guard.confirm_from_host(offsets)
    clocks.elapse(1)
    record = pay(rig, 3)
    assert record.fields["clock"] == "ok" and created(record) == clocks.wall_time


def test_sync_client_measures_the_offset_from_the_hosts_date(tmp_path: Path) -> None:
    """A real host's HTTP Date against a terminal clock an hour ahead."""
    from clearinghost.keys import HostKey
    from clearinghost.server import HostServer, create_app
    from clearinghost.storage import SqliteStorage
    from tests.test_sync_support import make_host

    host = make_host(SqliteStorage(tmp_path / "host.db"), HostKey.generate())
    with HostServer(create_app(host)) as server:
        client = SyncClient(server.url, "BUS-0001", wall=lambda: time.time() + 3600)
        try:
            assert client.clock_offset is None
            _any_call(client)
        finally:
            client.close()
    host.storage.close()
    assert client.clock_offset is not None
    assert 3600 - 3 <= client.clock_offset.offset_s <= 3600 + 3


def _any_call(client: SyncClient) -> None:
    """One request whatever it answers (an unknown terminal's heartbeat is refused: the Date
    header comes with the refusal too)."""
    with contextlib.suppress(HostError):
        client.heartbeat({"uptime_s": 1})


def test_a_torn_tap_on_a_reset_clock_is_not_expired_at_once(rig: Rig) -> None:
    """Intents are stamped with the guarded time too: a torn debit made while the RTC reads
    2000 waits for its card (the recovery window), it is not 26 years old."""
    clocks = Clocks()
    guarded(rig, clocks)
    pay(rig, 1)
    rig.restart()
    clocks.wall_time, clocks.mono = dt.datetime(2000, 1, 1, tzinfo=dt.UTC), 5.0
    engine = guarded(rig, clocks)
    card = make_card("tunion", 2, rig.keyset, balance=5000)
    card.reset_command_count()
    card.faults.add(7, "tear_after")
    assert rig.tap(card).status == "torn"
    clocks.mono += 10
    clocks.wall_time += dt.timedelta(seconds=10)
    assert engine.expire_stale_intents() == []
    assert len(rig.store.pending_intents()) == 1
    assert rig.tap(card).status == "recovered"
