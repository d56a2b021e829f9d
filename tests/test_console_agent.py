"""The technician console beside a running agent (issue 12): the real ``cardagent run`` process
on the simulated field (serial reader module emulator with a simulated PSAM, over TCP on
127.0.0.1, as in tests/test_sdnotify.py), the console over a real socat pty.

* ``status`` and ``selftest`` show what the agent publishes in ``agent-status.json``: the
  reader, the card in the field, each PSAM's serial and terminal number (those of the simulated
  PSAM); with the agent stopped (SIGTERM), killed (SIGKILL) or silent past the bound, they say
  the agent is not running and the reader and PSAM checks fail.
* ``set line_id`` / ``vehicle_id`` / ``institution`` at the console are in the trip record the
  agent writes on the next card, without a restart; a live ``position.json`` wins for line and
  stop.

Waits are bounded (hang bounds), never timed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.agent_status import (
    AGENT_STATUS_FILE,
    HEARTBEAT_S,
    STALE_AFTER_S,
    TAP_WRITE_EVERY_S,
    ReaderHealth,
    StatusPublisher,
    read_status,
    staleness,
)
from agent.console.device import Device
from agent.position import POSITION_FILE, write_position
from agent.products import cpu_logs
from agent.profile import TUNION_EF1E
from tests.fake_reader.faults import CardTorn
from tests.fake_reader.inprocess import CardField
from tests.fake_reader.module_server import ModuleEmulator
from tests.fake_reader.scenario import (
    DEMO_PROFILE,
    PSAM_SERIAL,
    REPO,
    TERMINAL_NUMBER,
    demo_keyset,
    make_card,
    make_psam,
)
from tests.test_console import Console, FakeClock, fields, provisioned, start_console

HANG_BOUND_S = 90.0


@dataclass
class Field:
    """The simulated field and PSAM the agent's reader module serves, and what it showed."""

    field: CardField
    emulator: ModuleEmulator
    port: int
    feedback: list[tuple[bool, str]]


@pytest.fixture
def sim() -> Iterator[Field]:
    field = CardField()
    feedback: list[tuple[bool, str]] = []
    emulator = ModuleEmulator(
        field,
        {1: make_psam(demo_keyset())},
        torn_exc=CardTorn,
        on_feedback=lambda ok, text: feedback.append((ok, text)),
    )
    _thread, port = emulator.serve_tcp("127.0.0.1", 0)
    yield Field(field, emulator, port, feedback)
    emulator.stop()


def start_agent(data_dir: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    """``cardagent run`` as a service starts it (this worktree's code: cwd is the repo)."""
    with log.open("ab") as err:
        return subprocess.Popen(
            [
                sys.executable, "-m", "agent.cli", "--log-format", "json", "run",
                "--profile", str(DEMO_PROFILE), "--data-dir", str(data_dir),
                "--reader-url", f"socket://127.0.0.1:{port}",
            ],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )  # fmt: skip


def stop_agent(agent: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    if agent.poll() is None:
        agent.send_signal(sig)
    return agent.wait(HANG_BOUND_S)


def wait_status(
    data_dir: Path, predicate: Callable[[dict[str, Any]], bool], agent: subprocess.Popen[bytes]
) -> dict[str, Any]:
    """The agent's status file once ``predicate`` holds (hang bound: the agent must publish)."""
    end = time.monotonic() + HANG_BOUND_S
    document: dict[str, Any] | None = None
    while time.monotonic() < end:
        assert agent.poll() is None, f"the agent exited with {agent.returncode}"
        document = read_status(data_dir / AGENT_STATUS_FILE)
        if document is not None and predicate(document):
            return document
        time.sleep(0.02)
    pytest.fail(f"the agent's status never got there; last: {json.dumps(document)[:2000]}")


def taking_cards(document: dict[str, Any]) -> bool:
    sams = document.get("sams") or []
    return (
        document["state"] == "running"
        and document["reader"]["present"] is True
        and bool(sams)
        and all(s["open"] for s in sams)
    )


def tap(sim: Field, data_dir: Path, agent: subprocess.Popen[bytes], card: Any) -> None:
    """Present ``card`` until the agent answered, take it away, and wait until the agent has
    seen the field empty (its status file says so) before the next card."""
    before = len(sim.feedback)
    sim.field.insert(card)
    end = time.monotonic() + HANG_BOUND_S
    while len(sim.feedback) == before:
        assert agent.poll() is None and time.monotonic() < end, "no answer to the tap"
        time.sleep(0.02)
    ok, text = sim.feedback[before]
    assert ok, text
    wait_status(data_dir, lambda d: d["reader"]["card_present"] is True, agent)
    sim.field.remove()
    wait_status(data_dir, lambda d: d["reader"]["card_present"] is False, agent)


def last_trip(card: Any) -> cpu_logs.Trip:
    trip = cpu_logs.parse_trip(TUNION_EF1E, card.records(0x1E)[0])
    assert trip is not None
    return trip


@pytest.fixture
def tech(tmp_path: Path) -> Iterator[tuple[Console, Path]]:
    data_dir = provisioned(tmp_path)
    clock = FakeClock()
    clock.now = time.time() + 3600  # after every record the agent writes: selftest's clock check
    console = start_console(tmp_path, data_dir, clock)
    assert console.login()[-1] == "OK logged in"
    yield console, data_dir
    console.close()


@pytest.mark.stack
def test_status_and_selftest_show_the_running_agents_reader_and_psam(
    tmp_path: Path, sim: Field, tech: tuple[Console, Path]
) -> None:
    console, data_dir = tech
    agent = start_agent(data_dir, sim.port, tmp_path / "agent.log")
    try:
        wait_status(data_dir, taking_cards, agent)
        status = fields(console.ask("status"))
        assert status["agent"] == "running" and status["agent_pid"] == str(agent.pid)
        assert status["agent_mode"] == "run" and status["agent_last_tap_at"] == "-"
        assert status["reader_present"] == "yes" and status["card_present"] == "no"
        assert status["reader"] == f"serial socket://127.0.0.1:{sim.port}"
        # the simulated PSAM's EF15 serial and EF16 terminal number, read by the agent at start
        assert status["psam.psam.serial"] == PSAM_SERIAL.hex().upper()
        assert status["psam.psam.terminal"] == TERMINAL_NUMBER.hex().upper()
        assert status["psam.psam.state"] == "open"
        assert status["psam.psam.applications"] == "tunion,cjt166"
        assert status["agent_clock"] == "clock ok"
        answer = console.ask("selftest")
        assert answer[-1] == "OK all checks passed", answer
        checks = fields(answer)
        assert checks["check.reader"].startswith(f"ok yes, socket://127.0.0.1:{sim.port} answered")
        assert checks["check.psam.psam"] == (
            f"ok serial {PSAM_SERIAL.hex().upper()} terminal {TERMINAL_NUMBER.hex().upper()}"
        )
        assert checks["check.agent"].startswith(f"ok run pid {agent.pid} since ")

        tap(sim, data_dir, agent, make_card("tunion", 1, demo_keyset()))
        done = wait_status(data_dir, lambda d: d["taps"] == 1, agent)  # after the throttle
        status = fields(console.ask("status"))
        assert status["agent_taps"] == "1" and status["agent_last_tap_at"] == done["last_tap_at"]

        # a console whose monotonic clock is past the bound: the file is stale, not trusted
        late = Device(data_dir, monotonic=lambda: time.monotonic() + STALE_AFTER_S + 60)
        checks_late, failures = late.selftest()
        assert failures == 3
        assert dict(checks_late)["check.reader"].startswith("fail agent status stale: last ")
        assert dict(late.status())["agent"] == "not running"

        assert stop_agent(agent) == 0
        status = fields(console.ask("status"))
        assert status["agent"] == "not running"
        assert status["agent_problem"].startswith("agent not running: it stopped at ")
        assert status["reader_present"].startswith("unknown (agent not running")
        assert "psam.psam.serial" not in status
        answer = console.ask("selftest")
        assert answer[-1] == "ERR selftest_failed 3 check(s) failed"
        for name in ("agent", "reader", "psam"):
            assert fields(answer)[f"check.{name}"].startswith("fail agent not running: it stopped")

        # killed: no last word from the agent, its pid is gone
        agent = start_agent(data_dir, sim.port, tmp_path / "agent.log")
        wait_status(data_dir, lambda d: taking_cards(d) and d["pid"] == agent.pid, agent)
        assert fields(console.ask("status"))["agent"] == "running"
        assert stop_agent(agent, signal.SIGKILL) == -signal.SIGKILL
        status = fields(console.ask("status"))
        assert status["agent"] == "not running"
        assert status["agent_problem"].startswith(f"agent not running: process {agent.pid} is gone")
        assert fields(console.ask("selftest"))["check.psam"].startswith("fail agent not running")
    finally:
        stop_agent(agent, signal.SIGKILL)


@pytest.mark.stack
def test_set_line_at_the_console_is_in_the_next_trip_record(
    tmp_path: Path, sim: Field, tech: tuple[Console, Path]
) -> None:
    console, data_dir = tech
    keys = demo_keyset()
    agent = start_agent(data_dir, sim.port, tmp_path / "agent.log")
    try:
        wait_status(data_dir, taking_cards, agent)
        first = make_card("tunion", 1, keys)
        tap(sim, data_dir, agent, first)
        assert (last_trip(first).line, last_trip(first).vehicle) == (1, 0)  # the profile's

        answer = console.ask("set line_id 4321 --yes")
        assert answer[-1] == "OK applied" and fields(answer)["takes_effect"] == "next tap"
        assert console.ask("set vehicle_id 654321 --yes")[-1] == "OK applied"
        assert console.ask("set institution 01663310 --yes")[-1] == "OK applied"
        assert console.ask("set stop_id 12 --yes")[-1] == "OK applied"
        second = make_card("tunion", 2, keys)
        tap(sim, data_dir, agent, second)  # the same agent process: no restart
        trip = last_trip(second)
        assert (trip.line, trip.station, trip.vehicle) == (4321, 12, 654321)
        assert trip.institution == "01663310"
        status = fields(console.ask("status"))
        assert (status["line_in_force"], status["place_source"]) == ("4321", "settings")

        # a live position feed (GPS) wins for line and stop; the settings keep the vehicle
        write_position(data_dir, 77, 5)
        answer = console.ask("set line_id 99 --yes")
        assert "position.json" in fields(answer)["note"]
        third = make_card("tunion", 3, keys)
        tap(sim, data_dir, agent, third)
        trip = last_trip(third)
        assert (trip.line, trip.station, trip.vehicle) == (77, 5, 654321)
        status = fields(console.ask("status"))
        assert (status["line_in_force"], status["place_source"]) == ("77", POSITION_FILE)
        (data_dir / POSITION_FILE).unlink()
        fourth = make_card("tunion", 4, keys)
        tap(sim, data_dir, agent, fourth)
        assert (last_trip(fourth).line, last_trip(fourth).station) == (99, 12)
        assert agent.poll() is None  # one process throughout
    finally:
        stop_agent(agent, signal.SIGKILL)


def test_the_publisher_writes_on_change_and_throttles_taps(tmp_path: Path) -> None:
    """Taps cost no write; a change is written at once; a quiet agent writes a heartbeat."""
    mono = [1000.0]
    reader = ReaderHealth("card", "serial", "socket://127.0.0.1:1")
    publisher = StatusPublisher(
        tmp_path / AGENT_STATUS_FILE,
        mode="run",
        profile="p",
        terminal_id="T-1",
        reader=reader,
        monotonic=lambda: mono[0],
    )
    assert publisher.tick() and publisher.writes == 1  # at start
    assert not publisher.tick()  # nothing changed
    reader.seen(card=False)
    assert publisher.tick() and publisher.writes == 2  # the reader answered: at once
    for _ in range(100):
        publisher.tapped()
        assert not publisher.tick()  # taps alone wait for the throttle
    mono[0] += TAP_WRITE_EVERY_S
    assert publisher.tick()
    assert (read_status(tmp_path / AGENT_STATUS_FILE) or {}).get("taps") == 100
    mono[0] += HEARTBEAT_S - 1
    assert not publisher.tick()
    mono[0] += 1
    assert publisher.tick() and publisher.writes == 4  # the heartbeat
    document = read_status(tmp_path / AGENT_STATUS_FILE)
    assert document is not None
    assert staleness(document, monotonic_now=mono[0] + STALE_AFTER_S) == ""
    assert staleness(document, monotonic_now=mono[0] + STALE_AFTER_S + 1).startswith(
        "agent status stale"
    )
    assert staleness(document, monotonic_now=mono[0], this_boot="another-boot").startswith(
        "agent not running: its status is from an earlier boot"
    )
    publisher.stopped()
    stopped = read_status(tmp_path / AGENT_STATUS_FILE)
    assert stopped is not None and stopped["state"] == "stopped"
    assert staleness(stopped, monotonic_now=mono[0]).startswith("agent not running: it stopped")


def test_a_reused_pid_or_a_bad_file_is_not_a_running_agent(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(HANG_BOUND_S)
    publisher = StatusPublisher(
        tmp_path / AGENT_STATUS_FILE,
        mode="run",
        profile="p",
        terminal_id="T-1",
        reader=ReaderHealth("card", "pcsc", "Virtual PCD 00 00"),
    )
    publisher.tick()
    document = read_status(tmp_path / AGENT_STATUS_FILE)
    assert document is not None and staleness(document, monotonic_now=time.monotonic()) == ""
    gone = {**document, "pid": child.pid}
    assert f"process {child.pid} is gone" in staleness(gone, monotonic_now=time.monotonic())
    reused = {**document, "pid_start": int(document["pid_start"]) + 1}  # this pid, another start
    assert "is another process now" in staleness(reused, monotonic_now=time.monotonic())
    (tmp_path / AGENT_STATUS_FILE).write_text("{not json")
    device = Device(tmp_path)
    assert dict(device.status())["agent_problem"].startswith("agent status unreadable")
    with pytest.raises(ValueError, match="not an agent status"):
        (tmp_path / AGENT_STATUS_FILE).write_text('{"format": 99}')
        read_status(tmp_path / AGENT_STATUS_FILE)


@pytest.mark.stack
def test_cardagent_pos_publishes_its_status_too(tmp_path: Path) -> None:
    """``cardagent pos``: the reader looked at before the first request, the PSAM's serial and
    terminal number, a purchase counted; stopped, it says so."""
    from tests.pos_stack import Field as PosField
    from tests.pos_stack import PosClient, free_port, start_pos, wait_until_serving, write_profile

    data_dir = provisioned(tmp_path)
    field = PosField()
    port = free_port()
    pos = start_pos(write_profile(tmp_path), data_dir, field.url, port)
    client = PosClient(f"http://127.0.0.1:{port}")
    try:
        wait_until_serving(f"http://127.0.0.1:{port}", pos)
        document = wait_status(data_dir, taking_cards, pos)
        assert document["mode"] == "pos" and document["reader_checked_at"] is not None
        device = Device(data_dir)
        status = dict(device.status())
        assert status["agent"] == "running" and status["agent_mode"] == "pos"
        assert status["psam.psam.serial"] == PSAM_SERIAL.hex().upper()
        assert status["psam.psam.terminal"] == TERMINAL_NUMBER.hex().upper()
        field.present(make_card("tunion", 7, field.keyset))
        answer = client.purchase("order-1", 150, wait_s=30.0)
        assert answer.status_code == 200 and answer.json()["status"] == "paid", answer.text
        field.take_away()
        wait_status(data_dir, lambda d: d["taps"] == 1, pos)
        assert stop_agent(pos) == 0
        stopped = dict(Device(data_dir).status())
        assert stopped["agent"] == "not running" and "it stopped at" in stopped["agent_problem"]
    finally:
        client.close()
        stop_agent(pos, signal.SIGKILL)
        field.close()
