"""sd_notify as systemd sees it: a real AF_UNIX datagram socket the test binds as
``NOTIFY_SOCKET``, and the real ``cardagent run`` / ``cardsync run`` processes started the way
systemd starts a ``Type=notify`` unit with ``WatchdogSec=`` (``NOTIFY_SOCKET``,
``WATCHDOG_USEC``). The agent runs against the simulated card field (serial module emulator
over TCP, as in tests/test_kill9_loop.py); the sync daemon against a real HostServer."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.sdnotify import Notifier, Watchdog
from agent.wiring import DataDir
from clearinghost.keys import HostKey
from clearinghost.server import HostServer, create_app
from clearinghost.storage import SqliteStorage
from tests.fake_reader.faults import CardTorn
from tests.fake_reader.inprocess import CardField
from tests.fake_reader.module_server import ModuleEmulator
from tests.fake_reader.scenario import DEMO_PROFILE, REPO, demo_keyset, make_card, make_psam
from tests.test_sync_support import Terminal, make_host

HANG_BOUND_S = 90.0  # how long a message may take on a loaded machine before the test fails


class NotifySocket:
    """What systemd does: bind a datagram socket and collect what the service sends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[dict[str, str]] = []

    def wait_for(self, key: str, value: str = "1", bound_s: float = HANG_BOUND_S) -> dict[str, str]:
        """The first message (past or future) with ``key=value``; fails after ``bound_s``."""
        for message in self.messages:
            if message.get(key) == value:
                return message
        end = time.monotonic() + bound_s
        while (left := end - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                break
            message = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append(message)
            if message.get(key) == value:
                return message
        raise AssertionError(f"no {key}={value} within {bound_s} s; got {self.messages}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


def test_notifier_sends_datagrams_and_is_silent_without_systemd(notify: NotifySocket) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(notify.path)})
    assert notifier.ready("taking cards")
    assert notify.wait_for("READY") == {"READY": "1", "STATUS": "taking cards"}
    assert notifier.stopping()
    assert notify.wait_for("STOPPING")["STATUS"] == "stopping"
    notifier.close()
    quiet = Notifier({})
    assert not quiet.enabled and not quiet.ready("x") and quiet.watchdog_s is None


def test_abstract_notify_socket(tmp_path: Path) -> None:
    name = f"cardagent-test-{os.getpid()}-{tmp_path.name}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    try:
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.status("hello")
        notifier.close()
        sock.settimeout(HANG_BOUND_S)
        assert sock.recv(100) == b"STATUS=hello"
    finally:
        sock.close()


def test_watchdog_pings_at_half_the_interval_only_when_the_loop_turns(
    notify: NotifySocket,
) -> None:
    now = [0.0]
    notifier = Notifier({"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "4000000"})
    watchdog = Watchdog(notifier, monotonic=lambda: now[0])
    assert watchdog.interval_s == 2.0
    watchdog.alive()
    now[0] = 1.9
    watchdog.alive()  # too soon: no second ping
    now[0] = 2.0
    watchdog.alive()
    assert watchdog.pings == 2
    # a WATCHDOG_PID naming another process: the watchdog is not ours to feed
    other = Notifier(
        {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}
    )
    assert Watchdog(other).interval_s is None
    notify.wait_for("WATCHDOG")
    notifier.close()


def test_a_vanished_notify_socket_does_not_stop_the_service(tmp_path: Path) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert not notifier.ready("x")
    assert not notifier.notify(watchdog=1)
    notifier.close()


def _systemd_env(notify: NotifySocket, watchdog_usec: int) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.update(NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC=str(watchdog_usec))
    env.pop("WATCHDOG_PID", None)
    return env


@pytest.mark.stack
def test_cardagent_run_under_systemd_notify(tmp_path: Path, notify: NotifySocket) -> None:
    """READY=1 once the loop takes cards, WATCHDOG=1 from its turns, a tap in between, then
    SIGTERM: STOPPING=1 and exit 0."""
    data_dir = tmp_path / "device"
    DataDir(data_dir).provision("NOTIFY-0001")
    keys = demo_keyset()
    field = CardField()
    paid: list[str] = []
    emulator = ModuleEmulator(
        field,
        {1: make_psam(keys)},
        torn_exc=CardTorn,
        on_feedback=lambda ok, text: paid.append(text) if ok else None,
    )
    _thread, port = emulator.serve_tcp("127.0.0.1", 0)
    log = (tmp_path / "agent.log").open("wb")
    agent = subprocess.Popen(
        [
            sys.executable, "-m", "agent.cli", "--log-format", "json", "run",
            "--profile", str(DEMO_PROFILE), "--data-dir", str(data_dir),
            "--reader-url", f"socket://127.0.0.1:{port}",
        ],
        cwd=REPO,
        env=_systemd_env(notify, 1_000_000),
        stdout=subprocess.DEVNULL,
        stderr=log,
    )  # fmt: skip
    try:
        ready = notify.wait_for("READY")
        assert "taking cards as NOTIFY-0001" in ready["STATUS"]
        assert "clock ok" in ready["STATUS"]
        notify.wait_for("WATCHDOG")
        field.insert(make_card("tunion", 1, keys, balance=5000))
        end = time.monotonic() + HANG_BOUND_S
        while not paid:
            assert agent.poll() is None and time.monotonic() < end, "no tap (hang bound)"
            time.sleep(0.02)
        field.remove()
        pings = sum(m.get("WATCHDOG") == "1" for m in notify.messages)
        notify.messages.clear()
        notify.wait_for("WATCHDOG")  # still pinging after the tap: the loop is alive
        assert pings >= 1
        agent.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING")
        assert agent.wait(timeout=HANG_BOUND_S) == 0
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(10)
        log.close()
        emulator.stop()


@pytest.mark.stack
def test_cardsync_run_under_systemd_notify(tmp_path: Path, notify: NotifySocket) -> None:
    """READY=1 once the jobs are scheduled, WATCHDOG=1 from the scheduler, a STATUS with the
    clock offset after a heartbeat, STOPPING=1 on SIGTERM; the offset is in cardsync status."""
    host_key = HostKey.generate()  # TEST KEY
    terminal = Terminal.provision(tmp_path, "BUS-NOTIFY")
    terminal.store.close()
    host = make_host(SqliteStorage(tmp_path / "host.db"), host_key)
    with HostServer(create_app(host)) as server:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "sync.cli", "--log-format", "json", "run",
                "--data-dir", str(terminal.data_dir), "--host", server.url,
                "--host-public-key", host_key.public_key_hex(), "--heartbeat-interval", "0.5",
                "--timeout", "5",
            ],
            cwd=REPO,
            env=_systemd_env(notify, 2_000_000),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            assert "syncing with" in notify.wait_for("READY")["STATUS"]
            notify.wait_for("WATCHDOG")
            status = _wait_for_status(notify, "clock offset")
            assert "acknowledged #" in status
            proc.send_signal(signal.SIGTERM)
            notify.wait_for("STOPPING")
            assert proc.wait(timeout=HANG_BOUND_S) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        beat = host.storage.terminal("BUS-NOTIFY").heartbeat  # type: ignore[union-attr]
        assert beat is not None and "clock_offset_s" in beat
    out = subprocess.run(
        [sys.executable, "-m", "sync.cli", "status", "--data-dir", str(terminal.data_dir)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        check=True,
        timeout=HANG_BOUND_S,
    )
    import json

    figures = json.loads(out.stdout)
    assert isinstance(figures["clock_offset_s"], float)
    assert abs(figures["clock_offset_s"]) < 3600  # same machine: only the Date's resolution


def _wait_for_status(notify: NotifySocket, text: str) -> str:
    end = time.monotonic() + HANG_BOUND_S
    while time.monotonic() < end:
        for message in notify.messages:
            if text in message.get("STATUS", ""):
                return message["STATUS"]
        notify.sock.settimeout(max(0.01, end - time.monotonic()))
        try:
            data = notify.sock.recv(4096)
        except TimeoutError:
            break
        notify.messages.append(
            dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        )
    raise AssertionError(f"no STATUS with {text!r}; got {notify.messages}")
