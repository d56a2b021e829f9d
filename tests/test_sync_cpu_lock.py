"""APPLICATION BLOCK through the PSAM (cpu-purse.md §6.6) against the card and PSAM simulators,
and the end-to-end blacklist path: published at the real host, pulled by the daemon, seen by
the agent's Blacklist, the card locked, a later SELECT refused."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest

from agent.apdu import Command, Party, Response, parse_response
from agent.blacklist import BLACKLIST_FILE, Blacklist
from agent.crypto import Algorithm
from agent.products import cpu_lock, cpu_purse
from agent.products.cpu_purse import CpuCard
from agent.sam.psam import PsamConfig, PsamDriver
from agent.transaction import TransactionEngine
from agent.wiring import DataDir
from clearinghost.local import start_local_sync
from tests.fake_reader.cpu_card import SimulatedCpuCard
from tests.fake_reader.inprocess import InProcessSamSlot
from tests.fake_reader.scenario import demo_keyset, demo_profile, make_card, make_psam
from tests.rig import Rig
from tests.stacks import PcscStack
from tests.test_reader_e2e import pcsc_rig


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


class ListedCards:
    """The agent's blacklist, as the engine sees it."""

    def __init__(self, *card_ids: str) -> None:
        self.card_ids = set(card_ids)

    def contains(self, card_id: str) -> bool:
        return card_id in self.card_ids


def lock_rig(tmp_path: Path, *, keys: list[dict[str, object]] | None = None, **profile: object):
    rig = Rig(tmp_path, **profile)
    if keys is not None:
        rig.profile = dataclasses.replace(rig.profile, test_keys=tuple(keys))
        rig.keyset = demo_keyset(rig.profile)
        rig.psam = make_psam(rig.keyset)
        rig.restart()
    return rig


def listed_engine(rig: Rig, *card_ids: str) -> TransactionEngine:
    rig.engine = TransactionEngine(
        rig.profile, rig.store, rig.sam, blacklist=ListedCards(*card_ids)
    )
    return rig.engine


def test_mac_input_matches_the_spec_layout() -> None:
    data = cpu_lock.block_mac_input(bytes.fromhex("11223344"), cpu_lock.P2_TEMPORARY)
    assert data == bytes.fromhex("1122334400000000841E000004800000")
    sm4 = cpu_lock.block_mac_input(bytes.fromhex("11223344"), cpu_lock.P2_TEMPORARY, block=16)
    assert sm4 == bytes.fromhex("11223344" + "00" * 12 + "841E000004800000" + "00" * 8)
    command = cpu_lock.application_block_command(bytes.fromhex("D2AD05F0"))
    assert command.to_bytes() == bytes.fromhex("841E000004D2AD05F0")


@pytest.mark.parametrize("permanent", [False, True])
def test_lock_blocks_the_application(tmp_path: Path, permanent: bool) -> None:
    rig = lock_rig(tmp_path, lock_permanent=permanent)
    card = make_card("tunion", 7, rig.keyset)
    listed_engine(rig, read(card).card_id)
    outcome = rig.tap(card)
    assert outcome.status == "refused" and outcome.reason.startswith("blacklisted")
    assert card.lock_state == ("permanent" if permanent else "temporary")
    [lock] = rig.records(kind="lock")
    assert lock.amount == 0 and lock.fields["lock"] == ("permanent" if permanent else "temporary")
    assert len(str(lock.fields["mac"])) == 8 and rig.store.pending_intents() == []
    again = rig.tap(card)
    assert again.status == "refused" and again.reason.startswith("card_locked")
    assert len(rig.records(kind="lock")) == 1


def sm4_maintenance_keys() -> list[dict[str, object]]:
    """The demo's test keys with an SM4 maintenance (application block) key in place of 3DES."""
    keys = [dict(k) for k in demo_profile().test_keys if k["usage"] != "maintenance"]
    keys.append(
        {
            "usage": "maintenance",
            "index": 1,
            "version": 1,
            "algorithm": 4,
            "levels": 2,
            "key": "707172737475767778797A7B7C7D7E7F",
        }
    )
    return keys


def test_an_sm4_card_is_locked_with_16_byte_mac_blocks(tmp_path: Path) -> None:
    """The engine learns the card's algorithm (INITIALIZE byte 10 = 04) and MACs the 84 1E
    header in 16-byte SM4 blocks; the card checks the MAC with its SM4 maintenance key."""
    rig = lock_rig(tmp_path, keys=sm4_maintenance_keys())
    card = make_card("tunion", 17, rig.keyset, algorithm=Algorithm.SM4)
    listed_engine(rig, read(card).card_id)
    outcome = rig.tap(card)
    assert outcome.reason.startswith("blacklisted"), outcome.reason
    assert card.lock_state == "temporary"
    fa = [c for c in rig.psam.commands if c[:2] == b"\x80\xfa"]
    assert fa and fa[-1][4] == 0x20  # Lc 32: IV 16 + one 16-byte block, not 3DES's 16


@pytest.mark.stack
@pytest.mark.parametrize("algorithm", [Algorithm.SM4, Algorithm.TDES])
def test_lock_through_pcscd_uses_the_cards_block_size(
    pcsc: PcscStack, tmp_path: Path, algorithm: Algorithm
) -> None:
    """Card and PSAM behind a real pcscd: the lock MAC block follows the card's algorithm."""
    keys = sm4_maintenance_keys() if algorithm is Algorithm.SM4 else None
    rig = lock_rig(tmp_path, keys=keys)
    driver_rig = pcsc_rig(pcsc, rig.psam)
    sam = PsamDriver(driver_rig.slot, PsamConfig.tunion())
    try:
        sam.open()
        card = make_card("tunion", 18, rig.keyset, algorithm=algorithm)
        engine = TransactionEngine(
            rig.profile, rig.store, sam, blacklist=ListedCards(read(card).card_id)
        )
        driver_rig.present(card)
        presence = driver_rig.reader.wait_for_card(5.0)
        assert presence is not None
        outcome = engine.process_tap(driver_rig.reader, presence)
        driver_rig.withdraw()
    finally:
        driver_rig.close()
    assert outcome.reason.startswith("blacklisted"), outcome.reason
    assert card.lock_state == "temporary"
    fa = [c for c in rig.psam.commands if c[:2] == b"\x80\xfa"]
    assert fa[-1][4] == (0x20 if algorithm is Algorithm.SM4 else 0x10)
    assert [r.kind for r in rig.store.records()] == ["lock"]


def test_wrong_key_index_is_refused_by_the_sam(tmp_path: Path) -> None:
    rig = lock_rig(tmp_path, lock_key_index=9)
    card = make_card("tunion", 8, rig.keyset)
    listed_engine(rig, read(card).card_id)
    outcome = rig.tap(card)
    assert outcome.status == "failed" and outcome.reason.startswith("sam")
    assert card.lock_state == "none"
    assert rig.store.pending_intents() == [] and rig.records(kind="lock") == []


@pytest.mark.parametrize("tear", ["tear_before", "tear_after"])
def test_a_torn_lock_is_settled_by_the_next_tap(tmp_path: Path, tear: str) -> None:
    """The card leaves during APPLICATION BLOCK: before it acts (the next tap finds the
    application selectable: intent voided, the card locked again) or after (the next tap finds
    it blocked: the intent, matched by UID, becomes the one lock record)."""
    rig = lock_rig(tmp_path)
    card = make_card("tunion", 11, rig.keyset)
    listed_engine(rig, read(card).card_id)
    card.power_on()
    card.reset_command_count()
    # SELECT PPSE, SELECT AID (FCI holds EF15), EF17, GET BALANCE, INIT (algorithm), GET
    # CHALLENGE, 84 1E
    card.faults.add(7, tear)  # type: ignore[arg-type]
    first = rig.tap(card)
    assert first.status == "torn", first.reason
    assert len(rig.store.pending_intents()) == 1
    second = rig.tap(card)
    assert second.reason.startswith("blacklisted"), second.reason
    assert card.lock_state == "temporary"
    [lock] = rig.records(kind="lock")
    assert lock.fields["recovered"] is (tear == "tear_after")
    assert rig.store.pending_intents() == []


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
            # A hang bound, not a speed claim (the pull interval is 0.3 s; CI machines are loaded).
            assert time.monotonic() - published < interval + 30.0, "never refused"
            time.sleep(0.02)
        assert agent_view.version == version
        rig = Rig(tmp_path / "rig")
        rig.engine = TransactionEngine(rig.profile, rig.store, rig.sam, blacklist=agent_view)
        card = make_card("tunion", 42, rig.keyset)
        outcome = rig.tap(card)
        assert outcome.reason.startswith("blacklisted") and card.lock_state == "temporary"
        other = make_card("tunion", 43, demo_keyset())
        assert not agent_view.contains(read(other).card_id)
    finally:
        sync.stop()
