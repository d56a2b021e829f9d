"""The technician console (issue 12) over a real pty pair (socat) with pyserial on both ends:
login and the persisted lockout, every command, noise, a cable pulled mid-paste, and a new
device provisioned from nothing to enrolled at a real clearing host on 127.0.0.1.

Timeouts and lockout delays run on an injected clock; waits on the line are bounded."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import serial

from agent import cli as agent_cli
from agent.console.auth import FREE_ATTEMPTS, Credentials, lockout_delay
from agent.console.device import (
    FLUSH_FLAG_FILE,
    PREVIOUS_PROFILE_FILE,
    PROFILE_FILE,
    ConsoleError,
    Device,
)
from agent.console.lines import LineAssembler, LineKind
from agent.console.restart import RESTART_EXIT_STATUS, RESTART_FLAG_FILE, watch_for_restart
from agent.console.serial_loop import serve
from agent.console.session import Session, State
from agent.console.settings import read_settings
from agent.offline_store import OfflineStore, Record, RecordBody
from agent.wiring import ENROLMENT_CODE_FILE, DataDir
from sync import cli as sync_cli
from sync import daemon as sync_daemon
from sync.daemon import open_daemon
from tests.test_enrolment import OPERATOR_TOKEN, Site, auth

DEMO_PROFILE = Path(__file__).resolve().parent.parent / "firmware_profiles" / "test-city-demo.toml"
PASSWORD = "correct-horse-42"  # a test credential, set per test in a temporary directory
TERMINAL = "BUS-0042"
WAIT_S = 15.0


class FakeClock:
    """Both clocks of the console (session timeouts and the lockout), moved by the test."""

    def __init__(self) -> None:
        self.now = 1_780_000_000.0  # 2026

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class PtyPair:
    """A socat pty pair: the console serves one end, the technician's pyserial the other."""

    def __init__(self, root: Path, name: str) -> None:
        socat = shutil.which("socat")
        if socat is None:
            pytest.fail("socat is required for the console tests: apt-get install socat")
        self.console, self.technician = root / f"tty{name}C", root / f"tty{name}T"
        self.proc = subprocess.Popen(
            [
                socat,
                f"pty,raw,echo=0,link={self.console}",
                f"pty,raw,echo=0,link={self.technician}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 5
        while not (self.console.exists() and self.technician.exists()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                pytest.fail("socat did not create the pty pair")
            time.sleep(0.01)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Line:
    """The technician's end of the line (pyserial)."""

    port: serial.Serial

    def write(self, data: bytes) -> None:
        self.port.write(data)

    def send(self, line: str, end: bytes = b"\r") -> None:
        self.port.write(line.encode("utf-8") + end)

    def answer(self) -> list[str]:
        """Lines up to and including the final ``OK`` / ``ERR`` (or a JSON answer)."""
        lines: list[str] = []
        deadline = time.monotonic() + WAIT_S
        buf = b""
        while time.monotonic() < deadline:
            buf += self.port.read(max(1, self.port.in_waiting))
            while b"\r\n" in buf:
                raw, buf = buf.split(b"\r\n", 1)
                line = raw.decode("utf-8")
                lines.append(line)
                if line == "OK" or line.startswith(("OK ", "ERR ", "{")):
                    assert not buf, f"bytes after the answer: {buf!r}"
                    return lines
        pytest.fail(f"no complete answer within {WAIT_S} s; got {lines!r} {buf!r}")

    def ask(self, line: str) -> list[str]:
        self.send(line)
        return self.answer()

    def read_until(self, marker: bytes) -> bytes:
        data = b""
        deadline = time.monotonic() + WAIT_S
        while marker not in data:
            if time.monotonic() > deadline:
                pytest.fail(f"{marker!r} not seen within {WAIT_S} s; got {data!r}")
            data += self.port.read(max(1, self.port.in_waiting))
        return data

    def login(self, name: str = "ana", password: str = PASSWORD) -> list[str]:
        self.send(name)
        return self.ask(password)

    def wait_for(self, predicate: Callable[[], bool]) -> None:
        deadline = time.monotonic() + WAIT_S
        while not predicate():
            if time.monotonic() > deadline:
                pytest.fail("the console did not get there in time")
            time.sleep(0.01)


@dataclass
class Console(Line):
    """A console served on a pty (a thread of this process), and the technician's end."""

    session: Session
    pty: PtyPair
    stop: threading.Event
    thread: threading.Thread

    def close(self) -> None:
        self.stop.set()
        self.thread.join(WAIT_S)
        self.port.close()
        self.pty.close()


def fields(lines: list[str]) -> dict[str, str]:
    return dict(line.split("=", 1) for line in lines[:-1] if "=" in line)


def start_console(
    root: Path, data_dir: Path, clock: FakeClock, *, echo: bool = False, name: str = "A"
) -> Console:
    device = Device(data_dir, wall_clock=clock)
    session = Session(device, clock, echo=echo, paste_timeout_s=60.0)
    pty = PtyPair(root, name)
    port = serial.Serial(str(pty.technician), 115200, timeout=0.05)  # before the greeting
    stop = threading.Event()
    thread = threading.Thread(
        target=serve,
        args=(str(pty.console), session, stop),
        kwargs={"poll_s": 0.02, "reopen_s": 0.05},
        daemon=True,
    )
    thread.start()
    console = Console(port, session, pty, stop, thread)
    console.read_until(b"login: " if echo else b"log in\r\n")
    return console


def provisioned(root: Path) -> Path:
    data_dir = root / "device"
    DataDir(data_dir).provision(TERMINAL)
    DataDir(data_dir).open_store().close()  # the agent has run once: the store exists
    Credentials(data_dir, time.time).set_password("ana", PASSWORD)
    shutil.copy(DEMO_PROFILE, data_dir / PROFILE_FILE)
    return data_dir


def maintenance(data_dir: Path) -> list[Record]:
    with OfflineStore.open_for_reading(data_dir / "agent.db") as store:
        return [r for r in store.records() if r.kind == "maintenance"]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return provisioned(tmp_path)


@pytest.fixture
def console(tmp_path: Path, data_dir: Path, clock: FakeClock) -> Iterator[Console]:
    c = start_console(tmp_path, data_dir, clock)
    yield c
    c.close()


@pytest.fixture
def tech(console: Console) -> Console:
    assert console.login()[-1] == "OK logged in"
    return console


# --- the line discipline (pure) ---------------------------------------------------------------


def feed_all(lines: LineAssembler, data: bytes) -> tuple[list[tuple[LineKind, str]], bytes]:
    events, echo = [], b""
    while data:
        fed = lines.feed(data)
        data = data[fed.consumed :]
        echo += fed.echo
        if fed.event is not None:
            events.append((fed.event.kind, fed.event.text))
    return events, echo


def test_line_ends_backspace_noise_and_bounds() -> None:
    lines = LineAssembler(max_line=16)
    events, echo = feed_all(lines, b"a\rb\nc\r\nd\r\r\nstatuz\x08s\r")
    assert events == [(LineKind.LINE, t) for t in ("a", "b", "c", "d", "", "status")]
    assert echo.endswith(b"statuz\b \bs\r\n")
    events, _ = feed_all(lines, b"x" * 5000 + b"\rok\r")
    assert events == [(LineKind.OVERLONG, "line longer than 16 bytes"), (LineKind.LINE, "ok")]
    events, _ = feed_all(lines, b"se\x1b[At\r\xff\xfe\rst\x03\r")
    assert [k for k, _ in events] == [
        LineKind.NOISE,
        LineKind.NOISE,
        LineKind.INTERRUPT,
        LineKind.LINE,
    ]
    lines.secret = True
    events, echo = feed_all(lines, b"hunter22\r")
    assert events == [(LineKind.LINE, "hunter22")] and echo == b"\r\n"


def test_lockout_delay_grows_and_is_capped() -> None:
    delays = [lockout_delay(n) for n in range(1, 12)]
    assert delays[: FREE_ATTEMPTS - 1] == [0.0] * (FREE_ATTEMPTS - 1)
    assert delays[FREE_ATTEMPTS - 1 :][:3] == [30.0, 60.0, 120.0]
    assert max(delays) == 900.0


# --- login, lockout, session -----------------------------------------------------------------


def test_login_echo_and_prompts_for_a_terminal_program(tmp_path: Path, data_dir: Path) -> None:
    c = start_console(tmp_path, data_dir, FakeClock(), echo=True)
    try:
        c.send("ana")
        assert c.read_until(b"password: ").endswith(b"ana\r\npassword: ")
        c.send(PASSWORD)
        out = c.read_until(b"> ")
        assert PASSWORD.encode() not in out
        assert b"OK logged in\r\n> " in out
        c.write(b"statux\x7fs\r\n")  # DEL erases, CRLF is one line end
        out = c.read_until(b"> ")
        assert b"statux\b \bs\r\n" in out and b"terminal_id=BUS-0042" in out
    finally:
        c.close()


def test_nothing_before_login_and_wrong_password(console: Console) -> None:
    console.send("status")
    answer = console.ask("status")  # 'status' was taken as a name and this as its password
    assert answer[-1].startswith("ERR auth login failed")
    assert not any("terminal_id" in line for line in answer)
    assert console.login("ana", "wrong-password")[-1].startswith("ERR auth")
    assert console.login()[-1] == "OK logged in"


def test_lockout_grows_and_survives_a_reconnect(
    tmp_path: Path, data_dir: Path, clock: FakeClock
) -> None:
    c = start_console(tmp_path, data_dir, clock)
    try:
        for _ in range(FREE_ATTEMPTS - 1):
            assert c.login("ana", "not-the-password")[-1].startswith("ERR auth")
        third = c.login("ana", "not-the-password")
        assert third[-1].startswith("ERR locked") and fields(third)["retry_after_s"] == "30"
        locked = c.login()  # the right password is not even tried while locked
        assert locked[-1].startswith("ERR locked")
        clock.advance(31)
        fourth = c.login("ana", "still-not-it")
        assert fields(fourth)["retry_after_s"] == "60"
    finally:
        c.close()
    # a new connection (another line, another process's view) finds the lockout in force
    again = start_console(tmp_path, data_dir, clock, name="B")
    try:
        assert again.login()[-1].startswith("ERR locked")  # the right password does not help
        clock.advance(61)
        assert again.login()[-1] == "OK logged in"
        again.ask("logout")
        assert again.login("ana", "wrong-once-more")[-1].startswith("ERR auth")  # reset
    finally:
        again.close()
    assert (data_dir / "console-lockout.json").stat().st_mode & 0o777 == 0o600
    assert (data_dir / "technicians.json").stat().st_mode & 0o777 == 0o600
    assert PASSWORD not in (data_dir / "technicians.json").read_text()


def test_session_timeout_and_logout(tech: Console, clock: FakeClock) -> None:
    clock.advance(301)
    assert tech.answer()[-1].startswith("ERR timeout session closed")
    tech.send("status")  # logged out: taken as a name
    assert tech.ask("x")[-1].startswith("ERR auth")
    assert tech.login()[-1] == "OK logged in"
    assert tech.ask("logout")[-1] == "OK logged out"
    tech.send("status")
    assert tech.ask("x")[-1].startswith("ERR auth")


# --- commands ----------------------------------------------------------------------------


def test_help_lists_and_explains_every_command(tech: Console) -> None:
    listing = tech.ask("help")
    assert listing[-1].startswith("OK")
    for word in ("status", "selftest", "provision", "set", "profile load", "profile rollback"):
        assert any(line.startswith(f"command={word}") for line in listing), word
    for word in ("sync now", "log tail", "records verify", "restart", "passwd", "mode"):
        assert any(line.startswith(f"command={word}") for line in listing), word
    one = fields(tech.ask("help set"))
    assert one["usage"] == "set KEY VALUE [--yes]" and "line_id" in one["detail"]
    assert tech.ask("help profile")[-1] == "OK"
    assert tech.ask("profile")[-1].startswith("ERR usage one of: profile load")
    assert tech.ask("help nonsense")[-1].startswith("ERR unknown_command")


def test_status_and_selftest(tech: Console, data_dir: Path) -> None:
    status = fields(tech.ask("status"))
    assert status["terminal_id"] == TERMINAL
    assert status["profile"] == "test-city-demo" and len(status["profile_sha256"]) == 64
    assert status["reader_url"] == "socket://127.0.0.1:7777"
    assert status["queue_depth"] == "0" and status["blacklist_version"] == "0"
    assert status["params_version"] == "none" and status["line_id"] == "-"
    assert status["clock_sane"] == "yes" and status["clock_utc"].startswith("2026-")
    assert status["agent"] == "not running" and "no agent-status.json" in status["agent_problem"]
    assert status["reader_present"].startswith("unknown (agent not running")
    answer = tech.ask("selftest")
    # no agent has run here: the checks that need it fail, saying why, and nothing is skipped
    assert answer[-1] == "ERR selftest_failed 3 check(s) failed", answer
    checks = fields(answer)
    assert checks["check.record_chain"].startswith("ok")
    for name in ("agent", "reader", "psam"):
        assert checks[f"check.{name}"].startswith("fail agent not running: no agent-status")
    assert not any("skipped" in value for value in checks.values())
    text = "\n".join(answer)
    assert "private" not in text and (data_dir / "device.key").read_bytes().hex() not in text


def test_set_is_validated_confirmed_and_recorded(tech: Console, data_dir: Path) -> None:
    assert tech.ask("set line_id")[-1].startswith("ERR usage")
    assert tech.ask("set line_id 12 13")[-1].startswith("ERR usage")
    assert tech.ask("set colour blue")[-1].startswith("ERR bad_value unknown setting")
    assert tech.ask("set line_id bad/id")[-1].startswith("ERR bad_value")
    assert tech.ask("set reader_url socket://x:99999")[-1].startswith("ERR bad_value")
    assert tech.ask("sett line_id 12")[-1].startswith("ERR unknown_command")
    assert tech.ask("status --yes")[-1].startswith("ERR usage")
    shown = tech.ask("set line_id 12")
    assert fields(shown)["confirm"] == "required" and fields(shown)["new"] == "12"
    assert tech.ask("status")[-1].startswith("ERR cancelled")  # not run, and nothing changed
    assert read_settings(data_dir) == {} and not maintenance(data_dir)
    tech.ask("set line_id 12")
    applied = tech.ask("confirm")
    assert applied[-1] == "OK applied" and fields(applied)["line_id"] == "12"
    assert tech.ask("set vehicle_id BUS-7 --yes")[-1].startswith("ERR bad_value")  # a number
    assert tech.ask("set vehicle_id 16777216 --yes")[-1].startswith("ERR bad_value")
    assert tech.ask("set institution 0166331 --yes")[-1].startswith("ERR bad_value")  # odd hex
    assert tech.ask("set vehicle_id 7 --yes")[-1] == "OK applied"
    assert fields(tech.ask("get line_id")) == {"line_id": "12"}
    assert read_settings(data_dir) == {"line_id": "12", "vehicle_id": "7"}
    records = maintenance(data_dir)
    assert [(r.fields["what"], r.fields["old"], r.fields["new"]) for r in records] == [
        ("set line_id", "-", "12"),
        ("set vehicle_id", "-", "7"),
    ]
    assert {r.fields["who"] for r in records} == {"ana"}
    assert tech.ask("records verify")[-1] == "OK chain and signatures verified"


def test_provision_shows_the_public_key_only(tech: Console, data_dir: Path) -> None:
    shown = fields(tech.ask("provision"))
    key = DataDir(data_dir)
    assert shown["terminal_id"] == TERMINAL and len(shown["public_key"]) == 64
    assert tech.ask("provision BUS-0099 --yes")[-1].startswith("ERR already_provisioned")
    assert tech.ask("provision code")[-1].startswith("ERR usage")
    assert key.terminal_id() == TERMINAL


def test_sync_now_log_tail_restart(tech: Console, data_dir: Path) -> None:
    assert FLUSH_FLAG_FILE == sync_daemon.FLUSH_FLAG_FILE
    assert tech.ask("sync now")[-1].startswith("OK")
    assert (data_dir / FLUSH_FLAG_FILE).exists()
    assert tech.ask("log tail")[-1].startswith("ERR no_log")
    (data_dir / "agent.log").write_bytes(
        b"".join(f'{{"event": "tap", "n": {n}}}\n'.encode() for n in range(50)) + b"\x1b[31m\n"
    )
    tail = tech.ask("log tail 3")
    assert tail[:-1] == [
        'log={"event": "tap", "n": 48}',
        'log={"event": "tap", "n": 49}',
        "log=?[31m",
    ]
    assert tech.ask("log tail 0")[-1].startswith("ERR bad_value")
    assert tech.ask("log tail 9999")[-1].startswith("ERR bad_value")
    assert tech.ask("restart")[-1].startswith("OK")
    assert tech.ask("no")[-1].startswith("ERR cancelled")
    assert not (data_dir / RESTART_FLAG_FILE).exists()
    assert tech.ask("restart --yes")[-1] == "OK applied"
    assert (data_dir / RESTART_FLAG_FILE).exists()


def test_the_agent_stops_for_a_restart_flag(tmp_path: Path) -> None:
    (tmp_path / RESTART_FLAG_FILE).touch()
    stop = threading.Event()
    end = watch_for_restart(tmp_path, stop, interval_s=0.01)
    try:
        assert not (tmp_path / RESTART_FLAG_FILE).exists()  # a stale flag is cleared at start
        (tmp_path / RESTART_FLAG_FILE).touch()
        assert stop.wait(WAIT_S)
    finally:
        end()
    assert RESTART_EXIT_STATUS == 75


def test_passwd_changes_the_password(tech: Console, data_dir: Path) -> None:
    tech.send("passwd")
    assert tech.ask("not-my-password")[-1].startswith("ERR auth wrong password")
    tech.send("passwd")
    tech.send(PASSWORD)
    tech.send("new-password-1")
    assert tech.ask("new-password-2")[-1].startswith("ERR bad_value the passwords differ")
    tech.send("passwd")
    tech.send(PASSWORD)
    tech.send("short")
    assert tech.ask("short")[-1].startswith("ERR bad_value")
    tech.send("passwd --yes")
    tech.send(PASSWORD)
    tech.send("new-password-1")
    assert tech.ask("new-password-1")[-1] == "OK applied"
    tech.ask("logout")
    assert tech.login()[-1].startswith("ERR auth")
    assert tech.login("ana", "new-password-1")[-1] == "OK logged in"
    (record,) = maintenance(data_dir)
    assert record.fields["what"] == "technician password"
    assert "new-password-1" not in json.dumps(record.to_dict())


def test_json_mode(tech: Console) -> None:
    assert json.loads(tech.ask("mode json")[-1]) == {"ok": True, "data": {"mode": "json"}}
    answer = json.loads(tech.ask("status")[-1])
    assert answer["ok"] is True and answer["data"]["terminal_id"] == TERMINAL
    error = json.loads(tech.ask("frobnicate")[-1])
    assert error == {
        "ok": False,
        "data": {},
        "error": "unknown_command",
        "message": "unknown command 'frobnicate'; try 'help'",
    }
    assert tech.ask("mode text") == ["mode=text", "OK"]


# --- profiles -------------------------------------------------------------------------------


def paste(tech: Console, text: str, *, yes: bool = False) -> list[str]:
    assert tech.ask("profile load" + (" --yes" if yes else ""))[-1].startswith("OK paste")
    for line in text.splitlines():
        tech.send(line, end=b"\n")
    return tech.ask(".")


def test_profile_load_confirm_and_rollback(tech: Console, data_dir: Path) -> None:
    old = (data_dir / PROFILE_FILE).read_bytes()
    new_text = DEMO_PROFILE.read_text().replace('name = "test-city-demo"', 'name = "city-v2"')
    shown = paste(tech, new_text)
    assert fields(shown)["name"] == "city-v2" and fields(shown)["confirm"] == "required"
    assert (data_dir / PROFILE_FILE).read_bytes() == old
    assert tech.ask("confirm")[-1] == "OK applied"
    assert (data_dir / PROFILE_FILE).read_text() == new_text
    assert (data_dir / PREVIOUS_PROFILE_FILE).read_bytes() == old
    assert fields(tech.ask("status"))["profile"] == "city-v2"
    assert tech.ask("profile rollback --yes")[-1] == "OK applied"
    assert (data_dir / PROFILE_FILE).read_bytes() == old
    whats = [(r.fields["what"], str(r.fields["new"]).split()[0]) for r in maintenance(data_dir)]
    assert whats == [("profile load", "city-v2"), ("profile rollback", "test-city-demo")]


def test_a_profile_with_an_error_names_its_line(tech: Console, data_dir: Path) -> None:
    old = (data_dir / PROFILE_FILE).read_bytes()
    lines = DEMO_PROFILE.read_text().splitlines()
    number = lines.index('line = "0001"') + 1
    bad = DEMO_PROFILE.read_text().replace('line = "0001"', 'line = "12"')
    answer = paste(tech, bad, yes=True)
    assert answer[-1].startswith("ERR profile_invalid") and "terminal.line" in answer[-1]
    assert fields(answer)["line"] == str(number)
    broken = DEMO_PROFILE.read_text().replace("[fare]", "[fare")
    answer = paste(tech, broken, yes=True)
    assert answer[-1].startswith("ERR profile_invalid not TOML")
    assert fields(answer)["line"] == str(lines.index("[fare]") + 1)
    assert (data_dir / PROFILE_FILE).read_bytes() == old and not maintenance(data_dir)


def test_noise_on_the_line_is_refused_and_harmless(tech: Console, data_dir: Path) -> None:
    assert tech.ask("set line_id \x01\x02 --yes")[-1].startswith("ERR noise control byte 0x01")
    tech.write(bytes(range(128, 256)) + b"\r")
    assert tech.answer()[-1].startswith("ERR noise bytes that are not UTF-8")
    tech.write(b"A" * 100_000 + b"\r")
    assert tech.answer()[-1].startswith("ERR overlong")
    tech.write(b"\x00\xff" * 3000 + b"\n")
    assert tech.answer()[-1].startswith("ERR")
    # noise inside a pasted profile: the line is named, nothing applied
    text = DEMO_PROFILE.read_text().splitlines()
    assert tech.ask("profile load --yes")[-1].startswith("OK paste")
    for n, line in enumerate(text, 1):
        tech.send(line + ("\x07" if n == 4 else ""), end=b"\n")
    answer = tech.ask(".")
    assert answer[-1].startswith("ERR noise profile line 4") and fields(answer)["line"] == "4"
    assert fields(tech.ask("status"))["terminal_id"] == TERMINAL  # still logged in, still sane
    assert read_settings(data_dir) == {} and not maintenance(data_dir)
    assert not (data_dir / PREVIOUS_PROFILE_FILE).exists()


def test_a_paste_cut_short_by_silence_changes_nothing(
    tech: Console, data_dir: Path, clock: FakeClock
) -> None:
    old = (data_dir / PROFILE_FILE).read_bytes()
    assert tech.ask("profile load --yes")[-1].startswith("OK paste")
    for line in DEMO_PROFILE.read_text().splitlines()[:20]:
        tech.send(line, end=b"\n")
    tech.wait_for(lambda: len(tech.session._paste) == 20)
    clock.advance(61)
    answer = tech.answer()
    assert answer[-1].startswith("ERR paste_timeout profile cut short") and "20 lines" in answer[-1]
    assert (data_dir / PROFILE_FILE).read_bytes() == old and not maintenance(data_dir)
    assert fields(tech.ask("status"))["profile"] == "test-city-demo"


def test_cable_pulled_mid_profile_load(tech: Console, data_dir: Path) -> None:
    old = (data_dir / PROFILE_FILE).read_bytes()
    new_text = DEMO_PROFILE.read_text().replace('name = "test-city-demo"', 'name = "city-v2"')
    assert tech.ask("profile load --yes")[-1].startswith("OK paste")
    for line in new_text.splitlines()[:30]:
        tech.send(line, end=b"\n")
    tech.wait_for(lambda: len(tech.session._paste) == 30)
    tech.pty.close()  # the cable: the console's end of the line fails
    tech.wait_for(lambda: tech.session.state is State.LOGIN and not tech.session.user)
    assert (data_dir / PROFILE_FILE).read_bytes() == old  # the old profile is still in force
    assert not (data_dir / PREVIOUS_PROFILE_FILE).exists() and not maintenance(data_dir)
    assert tech.session._paste == []
    assert DataDir(data_dir).terminal_id() == TERMINAL


# --- a new device, from nothing to enrolled -----------------------------------------------


def test_scripted_provisioning_from_nothing_to_enrolled(tmp_path: Path, clock: FakeClock) -> None:
    (tmp_path / "host-site").mkdir()
    site = Site(tmp_path / "host-site")
    data_dir = tmp_path / "new-device"
    secret = tmp_path / "technician.pw"
    secret.write_text(PASSWORD + "\n")
    assert (
        agent_cli.main(
            [
                "technician",
                "set",
                "ana",
                "--password-file",
                str(secret),
                "--data-dir",
                str(data_dir),
            ]
        )
        == 0
    )
    with site.server:
        # the operator: a terminal entry and its one-time code (cardhost terminal add)
        answer = httpx.post(
            f"{site.server.url}/v1/admin/terminals",
            json={"terminal_id": "BUS-0777", "kind": "bus", "site": "depot-3"},
            headers=auth(OPERATOR_TOKEN),
        )
        assert answer.status_code == 201, answer.text
        code = str(answer.json()["enrolment_code"])
        # the technician's script, over the serial line
        c = start_console(tmp_path, data_dir, clock)
        try:
            assert c.login()[-1] == "OK logged in"
            assert c.ask("echo off")[-1] == "OK"
            assert c.ask("provision")[-1].startswith("ERR not_provisioned")
            created = c.ask("provision BUS-0777 --yes")
            assert created[-1] == "OK applied", created
            public_key = fields(created)["public_key"]
            assert c.ask(f"provision code {code} --yes")[-1] == "OK applied"
            assert c.ask("sync now")[-1].startswith("OK")
            transcript = "\n".join(created)
        finally:
            c.close()
        assert code not in transcript
        code_file = data_dir / ENROLMENT_CODE_FILE
        assert code_file.stat().st_mode & 0o777 == 0o600
        assert code not in json.dumps([r.to_dict() for r in maintenance(data_dir)])
        # the sync daemon, as 'cardsync run --enrolment-code-file' starts it
        args = sync_cli._parser().parse_args(
            [
                "run",
                "--data-dir",
                str(data_dir),
                "--host",
                site.server.url,
                "--host-public-key",
                site.key.public_key_hex(),
                "--enrolment-code-file",
                str(code_file),
                "--timeout",
                "5",
            ]
        )
        daemon = open_daemon(data_dir, sync_cli.settings_from(args))
        try:
            report = daemon.upload_pending()
            daemon.send_heartbeat()
        finally:
            daemon.close()
        terminal = site.host.storage.terminal("BUS-0777")
        assert terminal is not None and terminal.public_key == public_key
        assert report.ack_seq == 2  # the maintenance records: provision, enrolment code
        at_host = site.host.storage.records("BUS-0777")
        assert [(r["kind"], r["fields"]["what"]) for r in at_host] == [
            ("maintenance", "provision"),
            ("maintenance", "enrolment code"),
        ]
        entry = site.host.storage.terminal_entry("BUS-0777")
        assert entry is not None and entry.code_used_at is not None
        status = dict(Device(data_dir, wall_clock=clock).status())
        assert status["acknowledged_seq"] == "2" and status["queue_depth"] == "0"
    site.host.storage.close()


def test_cable_pulled_with_a_change_awaiting_confirmation(tech: Console, data_dir: Path) -> None:
    assert fields(tech.ask("set line_id 12"))["confirm"] == "required"
    tech.pty.close()
    tech.wait_for(lambda: tech.session.state is State.LOGIN and not tech.session.user)
    assert tech.session._pending is None
    assert read_settings(data_dir) == {} and not maintenance(data_dir)


def test_changes_beside_an_agent_taking_cards(tech: Console, data_dir: Path) -> None:
    """The agent keeps appending records while the console writes maintenance records: one
    chain, every record there once, and it verifies."""
    done = threading.Event()
    written: list[int] = []

    def agent_taps() -> None:
        with DataDir(data_dir).open_store() as store:
            while not done.is_set():
                body = RecordBody("purchase", "03105170070100000001", 200, {"n": len(written)})
                written.append(store.append_record(body).seq)
                done.wait(0.005)  # one tap after another, as a validator takes them

    thread = threading.Thread(target=agent_taps, daemon=True)
    thread.start()
    try:
        tech.wait_for(lambda: len(written) >= 5)
        for n in range(5):
            assert tech.ask(f"set stop_id {n} --yes")[-1] == "OK applied"
    finally:
        done.set()
        thread.join(WAIT_S)
    assert tech.ask("records verify")[-1] == "OK chain and signatures verified"
    with OfflineStore.open_for_reading(data_dir / "agent.db") as store:
        kinds = [r.kind for r in store.records()]
    assert kinds.count("maintenance") == 5 and kinds.count("purchase") == len(written)


def test_the_agent_takes_the_reader_url_setting_and_exits_75_for_a_restart(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agent import runner

    seen: list[str | None] = []

    def no_hardware(profile: object, dd: object, url: str | None, *_: object) -> None:
        seen.append(url)
        (data_dir / RESTART_FLAG_FILE).touch()  # the console asks for a restart meanwhile

    monkeypatch.setattr(runner, "_open_hardware_until_ready", no_hardware)
    (data_dir / "settings.json").write_text('{"reader_url": "socket://127.0.0.1:7001"}')
    profile = str(data_dir / PROFILE_FILE)
    status = agent_cli.main(["run", "--profile", profile, "--data-dir", str(data_dir)])
    assert seen == ["socket://127.0.0.1:7001"] and status == RESTART_EXIT_STATUS


def test_an_error_in_an_array_table_names_its_line(data_dir: Path) -> None:
    text = DEMO_PROFILE.read_text()
    lines = text.splitlines()
    second = [n for n, line in enumerate(lines, 1) if line == "[[cpu_purse.applications]]"][1]
    select = next(n for n in range(second, len(lines)) if lines[n].startswith("select"))
    bad = "\n".join(
        line.replace(lines[select], 'select = "nope"') if n == select else line
        for n, line in enumerate(lines)
    )
    with pytest.raises(ConsoleError) as refused:
        Device(data_dir).validate_profile(bad)
    assert dict(refused.value.fields)["line"] == str(select + 1), refused.value.message


def test_cardagent_console_process_on_a_pty(tmp_path: Path, data_dir: Path) -> None:
    """The installed command, as a technician starts it: its own process on a socat pty."""
    import os
    import sys

    pty = PtyPair(tmp_path, "P")
    port = serial.Serial(str(pty.technician), 115200, timeout=0.05)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    command = [sys.executable, "-m", "agent.cli", "--log-format", "json", "console"]
    proc = subprocess.Popen(
        [*command, "--port", str(pty.console), "--data-dir", str(data_dir), "--no-echo"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    c = Line(port)
    try:
        c.read_until(b"log in\r\n")
        assert c.login()[-1] == "OK logged in"
        assert fields(c.ask("status"))["terminal_id"] == TERMINAL
        assert c.ask("logout")[-1] == "OK logged out"
    finally:
        proc.terminate()
        _, errors = proc.communicate(timeout=WAIT_S)
        port.close()
        pty.close()
    assert PASSWORD.encode() not in errors and b"console_login" in errors


def test_cardagent_console_refuses_an_unsafe_or_unusable_data_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bare = tmp_path / "bare"
    DataDir(bare).provision(TERMINAL)
    assert agent_cli.main(["console", "--port", "loop://", "--data-dir", str(bare)]) == 2
    assert "no technician can log in" in capsys.readouterr().err
    bare.chmod(0o777)
    assert agent_cli.main(["console", "--port", "loop://", "--data-dir", str(bare)]) == 2
    assert "other users can write it" in capsys.readouterr().err
    secret = tmp_path / "pw"
    secret.write_text("short\n")
    args = ["technician", "set", "ana", "--password-file", str(secret), "--data-dir", str(bare)]
    bare.chmod(0o750)
    assert agent_cli.main(args) == 2
    assert "8 to 128 characters" in capsys.readouterr().err
    assert agent_cli.main([*args[:2], "Ana!", *args[3:]]) == 2
    assert not (bare / "technicians.json").exists()


def test_a_profile_swap_cut_by_a_crash_is_finished_or_undone(data_dir: Path) -> None:
    from agent.console.device import PRIOR_PROFILE_FILE

    old = (data_dir / PROFILE_FILE).read_bytes()
    # crashed after copying the current profile aside, before the new one was in place
    (data_dir / PRIOR_PROFILE_FILE).write_bytes(old)
    Device(data_dir)
    assert not (data_dir / PRIOR_PROFILE_FILE).exists()
    assert not (data_dir / PREVIOUS_PROFILE_FILE).exists()
    assert (data_dir / PROFILE_FILE).read_bytes() == old
    # crashed after the new profile was in place: the prior one becomes the previous one
    (data_dir / PRIOR_PROFILE_FILE).write_bytes(old)
    (data_dir / PROFILE_FILE).write_bytes(old.replace(b"test-city-demo", b"city-v2"))
    Device(data_dir)
    assert (data_dir / PREVIOUS_PROFILE_FILE).read_bytes() == old
    assert not (data_dir / PRIOR_PROFILE_FILE).exists()


def test_a_name_left_without_its_password_times_out(console: Console, clock: FakeClock) -> None:
    console.send("ana")
    console.wait_for(lambda: console.session.state is State.PASSWORD)
    clock.advance(61)
    assert console.answer() == ["ERR timeout login timed out; log in again"]
    assert console.login()[-1] == "OK logged in"
