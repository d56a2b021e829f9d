"""The printed card number where a technician looks (issue 15, "Done when"): ``cardagent card
read`` and ``cardagent readers`` show the number printed on the card, not only the raw serial,
read through the real serial-module driver over TCP (and pcscd in tests/test_pcsc_driver.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.cli import main
from tests.fake_reader.faults import CardTorn
from tests.fake_reader.inprocess import CardField
from tests.fake_reader.module_server import ModuleEmulator
from tests.fake_reader.scenario import DEMO_PROFILE, demo_keyset, make_card
from tests.stacks import PcscStack
from tests.test_printed_blacklist import CHINA_CITIES, SZT_PRINTED, shenzhen_tong_card


@pytest.fixture(autouse=True)
def _session_pcscd_named(pcsc_stack: PcscStack) -> None:
    """``cardagent readers`` also surveys PC/SC, in this process, and libpcsclite reads
    ``PCSCLITE_CSOCK_NAME`` once per process: the session's pcscd stack must have named its
    socket before (else every later pcscd test of this process talks to the default one)."""


DIALECT_COMMENT = '# [cpu_purse]\n# dialect_files = ["dialects/china-cities.toml"]'


def city_profile(tmp_path: Path, port: int) -> Path:
    """The demo profile with the shipped issuer dialects and the emulator's address."""
    text = DEMO_PROFILE.read_text(encoding="utf-8")
    assert DIALECT_COMMENT in text and 'url = "socket://127.0.0.1:7777"' in text
    text = text.replace(DIALECT_COMMENT, f'[cpu_purse]\ndialect_files = ["{CHINA_CITIES}"]')
    text = text.replace('url = "socket://127.0.0.1:7777"', f'url = "socket://127.0.0.1:{port}"')
    path = tmp_path / "city.toml"
    path.write_text(text, encoding="utf-8")
    return path


def run_cli(
    tmp_path: Path, card: object, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    field = CardField()
    emulator = ModuleEmulator(field, {}, torn_exc=CardTorn)
    _thread, port = emulator.serve_tcp("127.0.0.1", 0)
    field.insert(card)
    try:
        code = main([*argv, "--profile", str(city_profile(tmp_path, port))])
    finally:
        emulator.stop()
    return code, capsys.readouterr().out


def test_card_read_prints_the_printed_number(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Shenzhen Tong card: the number line is 881146306 (little-endian EF15[16..19], as
    Metrodroid shows it), next to the raw serial the blacklist's serial list keys on."""
    card = shenzhen_tong_card(demo_keyset(), SZT_PRINTED)
    code, out = run_cli(tmp_path, card, ["card", "read", "--wait", "5"], capsys)
    assert code == 0, out
    assert "(dialect shenzhen-tong)" in out
    assert f"number      {SZT_PRINTED} (serial 000051800000C2398534," in out


def test_readers_shows_the_number_of_the_card_in_the_profile_reader(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    card = shenzhen_tong_card(demo_keyset(), SZT_PRINTED)
    code, out = run_cli(tmp_path, card, ["readers"], capsys)
    assert code == 0, out
    assert "card present" in out
    line = next(line for line in out.splitlines() if line.startswith("card "))
    assert f"number {SZT_PRINTED} (dialect shenzhen-tong, serial 000051800000C2398534)" in line


def test_readers_shows_a_tunion_number_without_its_leading_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """T-Union: the printed number is the 19-digit serial without its leading 0."""
    card = make_card("tunion", 9, demo_keyset())
    code, out = run_cli(tmp_path, card, ["readers"], capsys)
    assert code == 0, out
    line = next(line for line in out.splitlines() if line.startswith("card "))
    serial = line.split("serial ")[1].rstrip(")")
    assert f"number {serial[1:]} (dialect t-union" in line


def test_readers_says_why_a_card_is_not_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A CPU card with none of the profile's applications: the line names the card as the
    party that failed, and ``readers`` still exits 0 (the reader itself is fine)."""
    card = make_card("legacy1001", 3, demo_keyset(), df_name=b"NOT.TRANSIT")
    card.adf_fids = ()  # no ADF 1001 either
    code, out = run_cli(tmp_path, card, ["readers"], capsys)
    assert code == 0, out
    line = next(line for line in out.splitlines() if line.startswith("card "))
    assert "not read (card:" in line
