"""APPLICATION BLOCK through the PSAM (cpu-purse.md §6.6) against the card and PSAM simulators,
and the end-to-end blacklist path: published at the real host, pulled by the daemon, seen by
the agent's Blacklist, the card locked, a later SELECT refused."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agent.apdu import Command, Party, Response, parse_response
from agent.blacklist import BLACKLIST_FILE, Blacklist
from agent.errors import CardStatusError, TapRefused
from agent.products import cpu_lock, cpu_purse
from agent.products.cpu_purse import CpuCard
from agent.sam.psam import PsamConfig, PsamDriver
from agent.wiring import DataDir
from sync.local import start_local_sync
from tests.fake_reader.cpu_card import SimulatedCpuCard
from tests.fake_reader.inprocess import InProcessSamSlot
from tests.fake_reader.scenario import demo_keyset, demo_profile, make_card, make_psam


def exchange_with(card: SimulatedCpuCard):
    def exchange(command: Command) -> Response:
        return parse_response(card.process(command.to_bytes()), command, Party.CARD)

    return exchange


def read(card: SimulatedCpuCard, family_index: int = 0) -> CpuCard:
    app = demo_profile().applications[family_index]
    exchange = exchange_with(card)
    fci = cpu_purse.drive(cpu_purse.select_application(app), exchange)
    return cpu_purse.drive(cpu_purse.read_card(app, fci), exchange)


@pytest.fixture
def psam() -> PsamDriver:
    driver = PsamDriver(InProcessSamSlot(make_psam(demo_keyset())), PsamConfig.tunion())
    driver.open()
    return driver


def test_mac_input_matches_the_spec_layout() -> None:
    data = cpu_lock.block_mac_input(bytes.fromhex("11223344"))
    assert data == bytes.fromhex("11223344 00000000 841E000004800000")
    assert len(cpu_lock.block_mac_input(bytes.fromhex("11223344"), 1, block=16)) == 32
    command = cpu_lock.application_block_command(bytes.fromhex("D2AD05F0"))
    assert command.to_bytes() == bytes.fromhex("841E000004D2AD05F0")


@pytest.mark.parametrize("permanent", [False, True])
def test_lock_blocks_the_application(psam: PsamDriver, permanent: bool) -> None:
    card = make_card("tunion", 7, demo_keyset())
    info = read(card)
    outcome = cpu_purse.drive(
        cpu_lock.block_application(psam, info, key_index=1, permanent=permanent),
        exchange_with(card),
    )
    assert card.lock_state == ("permanent" if permanent else "temporary")
    assert outcome.permanent is permanent and len(outcome.mac) == 4
    body = cpu_lock.lock_record_body(info, outcome)
    assert body.kind == "lock" and body.card_id == info.card_id and body.amount == 0
    card.power_on()
    with pytest.raises(TapRefused, match="card_locked"):
        read(card)


def test_wrong_key_index_is_refused_by_the_sam(psam: PsamDriver) -> None:
    card = make_card("tunion", 8, demo_keyset())
    info = read(card)
    with pytest.raises(Exception, match=r"INIT FOR DESCRYPT|key"):
        cpu_purse.drive(cpu_lock.block_application(psam, info, key_index=9), exchange_with(card))
    assert card.lock_state == "none"


def test_forged_mac_is_refused_by_the_card(psam: PsamDriver) -> None:
    card = make_card("tunion", 9, demo_keyset())
    info = read(card)

    class WrongSam:
        def cipher_init(self, p1: int, p2: int, factors: object) -> None:
            pass

        def cipher_mac(self, data: bytes) -> bytes:
            return bytes(4)

    with pytest.raises(CardStatusError) as refused:
        cpu_purse.drive(
            cpu_lock.block_application(WrongSam(), info, key_index=1),  # type: ignore[arg-type]
            exchange_with(card),
        )
    assert refused.value.sw == 0x6988
    assert card.lock_state == "none"


def test_host_blacklist_reaches_the_agent_within_one_pull_interval(
    tmp_path: Path, psam: PsamDriver
) -> None:
    """Published at the host → pulled by the daemon → the agent's Blacklist answers True →
    the card is locked and refused afterwards."""
    data_dir = tmp_path / "bus"
    DataDir(data_dir).provision("BUS-LOCK")
    interval = 0.3
    sync = start_local_sync(data_dir, blacklist_interval_s=interval)
    try:
        agent_view = Blacklist.open(data_dir / BLACKLIST_FILE, auto_refresh_s=0.05)
        card = make_card("tunion", 42, demo_keyset())
        info = read(card)
        assert not agent_view.contains(info.card_id)
        version = sync.blacklist_card(info.card_id)
        published = time.monotonic()
        while not agent_view.contains(info.card_id):
            assert time.monotonic() - published < interval + 1.0, "not refused within a pull"
            time.sleep(0.02)
        assert agent_view.version == version
        outcome = cpu_purse.drive(
            cpu_lock.block_application(psam, info, key_index=1), exchange_with(card)
        )
        assert card.lock_state == "temporary" and outcome.card_id == info.card_id
        other = make_card("tunion", 43, demo_keyset())
        assert not agent_view.contains(read(other).card_id)
    finally:
        sync.stop()
