"""``cardagent doctor`` on a real provisioned data directory, a real store, and the serial module
emulator over TCP (with and without its PSAM): one line per check, the exit status says
whether anything failed, and every failure comes with a fix."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import cli
from agent.doctor import FAIL, OK, Check, Machine, run_checks
from agent.offline_store import RecordBody
from agent.wiring import DEVICE_KEY_FILE, DataDir
from tests.fake_reader.faults import CardTorn
from tests.fake_reader.inprocess import CardField
from tests.fake_reader.module_server import ModuleEmulator
from tests.fake_reader.scenario import DEMO_PROFILE, demo_keyset, make_psam


def serve(with_psam: bool) -> tuple[ModuleEmulator, int]:
    sams = {1: make_psam(demo_keyset())} if with_psam else {}
    emulator = ModuleEmulator(CardField(), sams, torn_exc=CardTorn)  # type: ignore[arg-type]
    _thread, port = emulator.serve_tcp("127.0.0.1", 0)
    return emulator, port


@pytest.fixture
def device(tmp_path: Path) -> Iterator[tuple[Path, Path, ModuleEmulator]]:
    emulator, port = serve(with_psam=True)
    profile = tmp_path / "profile.toml"
    profile.write_text(
        DEMO_PROFILE.read_text(encoding="utf-8").replace(
            'url = "socket://127.0.0.1:7777"', f'url = "socket://127.0.0.1:{port}"'
        ),
        encoding="utf-8",
    )
    data_dir = tmp_path / "device"
    DataDir(data_dir).provision("DOCTOR-0001")
    yield profile, data_dir, emulator
    emulator.stop()


def levels(checks: list[Check]) -> dict[str, str]:
    return {c.name: c.level for c in checks}


def test_a_ready_device_passes(
    device: tuple[Path, Path, ModuleEmulator], capsys: pytest.CaptureFixture[str]
) -> None:
    profile, data_dir, _ = device
    status = cli.main(["doctor", "--profile", str(profile), "--data-dir", str(data_dir)])
    out = capsys.readouterr().out
    assert status == 0, out
    for name in ("profile", "data dir", "identity", "device key", "disk", "clock", "reader"):
        assert f"ok   {name}" in out, out
    assert "ok   PSAM psam" in out and "slot 1: PSAM answers reset" in out
    assert out.rstrip().endswith("0 failed, 0 warning(s)")


def test_every_problem_is_named_with_a_fix(
    device: tuple[Path, Path, ModuleEmulator], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    profile, data_dir, emulator = device
    emulator.stop()
    empty, port = serve(with_psam=False)  # the module answers; its PSAM slot is empty
    try:
        profile.write_text(
            profile.read_text(encoding="utf-8").replace(
                profile.read_text(encoding="utf-8").split('url = "')[1].split('"')[0],
                f"socket://127.0.0.1:{port}",
            ),
            encoding="utf-8",
        )
        (data_dir / DEVICE_KEY_FILE).chmod(0o644)
        data_dir.chmod(0o777)
        status = cli.main(["doctor", "--profile", str(profile), "--data-dir", str(data_dir)])
    finally:
        empty.stop()
        data_dir.chmod(0o750)
    out = capsys.readouterr().out
    assert status == 1, out
    assert "FAIL data dir" in out and "fix: chmod go-w" in out
    assert "FAIL device key" in out and "fix: chmod 600" in out
    assert "FAIL PSAM psam" in out and "no PSAM answers" in out
    assert "fix: insert the PSAM" in out


def test_clock_before_the_last_record_fails(
    device: tuple[Path, Path, ModuleEmulator],
) -> None:
    profile, data_dir, _ = device
    with DataDir(data_dir).open_store() as store:
        store.append_record(RecordBody("purchase", "0310517007010000001", 200, {}))
    checks = run_checks(
        Machine(profile, data_dir, wall=lambda: dt.datetime(2000, 1, 1, tzinfo=dt.UTC))
    )
    clock = next(c for c in checks if c.name == "clock")
    assert clock.level == FAIL and "2000-01-01" in clock.found and "timedatectl" in clock.fix


def test_missing_profile_and_unprovisioned_data_dir(tmp_path: Path) -> None:
    checks = run_checks(Machine(tmp_path / "nope.toml", tmp_path / "nothing"))
    got = levels(checks)
    assert got["profile"] == FAIL and got["data dir"] == FAIL and got["device key"] == FAIL
    assert got["disk"] == OK
    assert "cardagent provision" in next(c for c in checks if c.name == "data dir").fix


def test_an_unreachable_reader_fails(tmp_path: Path) -> None:
    emulator, port = serve(with_psam=True)
    emulator.stop()  # nobody listens on that port any more
    profile = tmp_path / "profile.toml"
    profile.write_text(
        DEMO_PROFILE.read_text(encoding="utf-8").replace(
            'url = "socket://127.0.0.1:7777"', f'url = "socket://127.0.0.1:{port}"'
        ),
        encoding="utf-8",
    )
    data_dir = tmp_path / "device"
    DataDir(data_dir).provision("DOCTOR-0002")
    reader = next(c for c in run_checks(Machine(profile, data_dir)) if c.name == "reader")
    assert reader.level == FAIL and "reader error" in reader.found
