"""SAM routing (issue 8 item 2): each card family / M1 goes to its PSAM slot and application.

* :class:`PsamRouter` unit tests over in-process slots: a selection is kept while it is right,
  switching application re-selects once and reads that application's EF17 (key index) once; a
  missing slot refuses only its routes (:class:`SamUnavailable` naming slot and route) and is
  re-opened after ``retry_interval_s``; a mute slot likewise.
* through the real stacks (pcscd + vpcd, the serial module over TCP): two PSAMs in two slots
  serve a T-Union and a CJ/T 166 card in one run, and so does one PSAM with two applications;
  each record carries the identity (serial, terminal number) of the PSAM that signed for it. The
  simulated PSAMs are strict: a card under the other application fails its 80 CA (6985) or 80 70
  (6A88), which is what the old single ``sam.application`` did (checked below as the control).
"""

from __future__ import annotations

import dataclasses
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.errors import SamError, SamMuteError, SamStatusError, SamUnavailable
from agent.profile import Profile, parse_profile
from agent.readers.base import CardReader
from agent.sam.keys import KeySet
from agent.sam.psam import PsamConfig, PsamDriver, application_path, describe_path
from agent.sam.router import PsamRoute, PsamRouter, SingleSamRouter
from agent.sam.software import SamCore
from agent.transaction import TapOutcome, TransactionEngine
from agent.wiring import DataDir, Hardware, open_hardware, software_sam
from tests.fake_reader.faults import CardTorn
from tests.fake_reader.inprocess import CardField, InProcessSamSlot
from tests.fake_reader.module_server import ModuleEmulator
from tests.fake_reader.psam import (
    SimulatedPsam,
    cjt166_psam,
    multi_application_psam,
    tunion_psam,
)
from tests.fake_reader.scenario import (
    DEMO_PROFILE,
    PSAM_SERIAL,
    TERMINAL_NUMBER,
    demo_keyset,
    make_card,
)
from tests.fake_reader.vpcd_card import ContactlessCardIcc, PsamIcc
from tests.stacks import CARD_READER, SAM2_READER, SAM_READER, PcscStack

TUNION = application_path("tunion")
CJT166 = application_path("cjt166")

# TEST KEYS of the CJ/T 166 PSAM application: its own masters, purchase key index 2, version 2.
CJT_KEYS = KeySet.from_mapping(
    [
        {"usage": u, "index": i, "version": 2, "algorithm": 0, "levels": 2, "key": k}
        for u, i, k in (
            ("purchase", 2, "808182838485868788898A8B8C8D8E8F"),
            ("tac", 1, "909192939495969798999A9B9C9D9E9F"),
            ("maintenance", 1, "A0A1A2A3A4A5A6A7A8A9AAABACADAEAF"),
        )
    ]
)
CJT_SERIAL = bytes.fromhex("23010101000000212242")
CJT_TERMINAL = bytes.fromhex("000000000025")


def tunion_core(**kw: Any) -> SamCore:
    return SamCore(demo_keyset(), TERMINAL_NUMBER, PSAM_SERIAL, purchase_key_index=1, **kw)


def cjt_core(*, own_identity: bool = False) -> SamCore:
    """The CJ/T 166 application's core: in its own PSAM (``own_identity``) or in the T-Union
    PSAM's MF (same serial / terminal number, §4.1)."""
    terminal, serial = (
        (CJT_TERMINAL, CJT_SERIAL) if own_identity else (TERMINAL_NUMBER, PSAM_SERIAL)
    )
    return SamCore(CJT_KEYS, terminal, serial, purchase_key_index=2)


def selects(psam: SimulatedPsam) -> int:
    """Application SELECTs the PSAM received (not the MF)."""
    return sum(1 for c in psam.commands if c[1:2] == b"\xa4" and c[5:7] != b"\x3f\x00")


def ef17_reads(psam: SimulatedPsam) -> int:
    return sum(1 for c in psam.commands if c[1:3] == b"\xb0\x97")


class SwitchableSlot(InProcessSamSlot):
    """An in-process slot whose PSAM can be pulled out (reset and APDUs: SAM mute)."""

    def __init__(self, psam: SimulatedPsam | None, name: str) -> None:
        super().__init__(psam if psam is not None else _NO_PSAM, name)
        self.present = psam is not None
        self.resets = 0

    def insert(self, psam: SimulatedPsam) -> None:
        self.psam, self.present = psam, True

    def pull(self) -> None:
        self.present = False

    def reset(self) -> bytes:
        self.resets += 1
        if not self.present:
            raise SamMuteError(f"{self.name}: no SAM in the slot")
        return super().reset()

    def transmit(self, apdu: bytes) -> bytes:
        if not self.present:
            raise SamMuteError(f"{self.name}: no SAM in the slot")
        return super().transmit(apdu)


_NO_PSAM = SimulatedPsam(tunion_core())


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def router_over(
    slots: dict[str, SwitchableSlot], routes: dict[str, tuple[str, Any]], clock: Clock
) -> PsamRouter:
    drivers = {}
    for name, slot in slots.items():
        first = next(path for slot_name, path in routes.values() if slot_name == name)
        drivers[name] = PsamDriver(slot, PsamConfig(application=first))
    return PsamRouter(
        drivers,
        {route: PsamRoute(slot, path) for route, (slot, path) in routes.items()},
        retry_interval_s=5.0,
        clock=clock,
    )


# -- router unit tests -------------------------------------------------------------------------


def test_one_psam_two_applications_selection_kept_while_right() -> None:
    psam = multi_application_psam(tunion_core(), cjt_core())
    router = router_over(
        {"psam": SwitchableSlot(psam, "slot1")},
        {"tunion": ("psam", TUNION), "cjt166": ("psam", CJT166), "m1": ("psam", CJT166)},
        Clock(),
    )
    assert router.open() == ["psam"]
    assert (selects(psam), ef17_reads(psam)) == (1, 1)  # T-Union at open

    t = router.sam_for("tunion")
    assert t.purchase_key_index == 1
    t = router.sam_for("tunion")
    assert t.terminal_number == TERMINAL_NUMBER and t.serial == PSAM_SERIAL.hex().upper()
    assert selects(psam) == 1, "no SELECT while the selection is right"

    c = router.sam_for("cjt166")
    assert psam.selected_application == "cjt166"
    assert c.purchase_key_index == 2, "EF17 of the CJ/T 166 application"
    assert c.terminal_number == TERMINAL_NUMBER, "EF16 lives in the MF: one per PSAM"
    c.verify_security_code(bytes(9))
    assert selects(psam) == 3  # FID 1001 + name "建设部"
    assert router.sam_for("m1") is not None and selects(psam) == 3  # same application

    # Views re-select per operation: the T-Union view used after the CJ/T one switches back.
    assert t.purchase_key_index == 1
    assert psam.selected_application == "tunion"
    assert selects(psam) == 4
    assert ef17_reads(psam) == 2, "each application's EF17 read once per open"
    with pytest.raises(SamStatusError) as refused:
        t.verify_security_code(bytes(9))  # the T-Union application has no 80 CA
    assert refused.value.sw == 0x6985

    status = {s.name: s for s in router.describe()}["psam"]
    assert status.open and status.serial == PSAM_SERIAL.hex().upper()
    assert status.terminal == TERMINAL_NUMBER.hex().upper()
    assert status.routes == ("tunion", "cjt166", "m1")
    assert status.application == describe_path(TUNION)


def test_missing_slot_refuses_its_routes_others_work_and_it_is_reopened() -> None:
    clock = Clock()
    local = SwitchableSlot(None, "slot2")
    router = router_over(
        {"jtt978": SwitchableSlot(tunion_psam(tunion_core()), "slot1"), "local": local},
        {"tunion": ("jtt978", TUNION), "cjt166": ("local", CJT166)},
        clock,
    )
    assert router.open() == ["jtt978"]
    with pytest.raises(SamUnavailable) as missing:
        router.sam_for("cjt166")
    assert "'local'" in str(missing.value) and "'cjt166'" in str(missing.value)
    assert (missing.value.slot, missing.value.route) == ("local", "cjt166")
    assert router.sam_for("tunion").purchase_key_index == 1  # the other route works

    status = {s.name: s for s in router.describe()}
    assert status["jtt978"].open and not status["local"].open
    assert status["local"].serial is None and "no SAM" in status["local"].error

    local.insert(cjt166_psam(cjt_core(own_identity=True)))
    resets = local.resets
    with pytest.raises(SamUnavailable, match="next retry"):
        router.sam_for("cjt166")  # within the retry interval: no reset attempted
    assert local.resets == resets
    clock.now += 5.0
    sam = router.sam_for("cjt166")
    assert sam.purchase_key_index == 2
    assert sam.serial == CJT_SERIAL.hex().upper()
    assert sam.terminal_number == CJT_TERMINAL
    assert all(s.open for s in router.describe())


def test_mute_slot_refuses_its_routes_until_it_answers_again() -> None:
    clock = Clock()
    jtt = SwitchableSlot(tunion_psam(tunion_core()), "slot1")
    local = SwitchableSlot(cjt166_psam(cjt_core(own_identity=True)), "slot2")
    router = router_over(
        {"jtt978": jtt, "local": local},
        {"tunion": ("jtt978", TUNION), "cjt166": ("local", CJT166)},
        clock,
    )
    assert router.open() == ["jtt978", "local"]
    sam = router.sam_for("cjt166")
    local.pull()  # mute from now on
    with pytest.raises(SamMuteError):
        sam.verify_security_code(bytes(9))
    with pytest.raises(SamUnavailable, match=r"'local'.*'cjt166'"):
        router.sam_for("cjt166")  # one immediate re-open attempt, which fails
    with pytest.raises(SamUnavailable, match="next retry"):
        router.sam_for("cjt166")
    assert router.sam_for("tunion").serial == PSAM_SERIAL.hex().upper()
    local.present = True
    clock.now += 5.0
    router.sam_for("cjt166").verify_security_code(bytes(9))


def test_a_psam_without_the_application_refuses_that_route_only() -> None:
    router = router_over(
        {"psam": SwitchableSlot(tunion_psam(tunion_core()), "slot1")},
        {"tunion": ("psam", TUNION), "cjt166": ("psam", CJT166)},
        Clock(),
    )
    router.open()
    with pytest.raises(SamUnavailable, match=r"fid 1001.*6A82"):
        router.sam_for("cjt166")
    assert router.sam_for("tunion").purchase_key_index == 1
    with pytest.raises(SamUnavailable, match="routes it to no SAM"):
        router.sam_for("legacy1001")


def test_single_sam_router_serves_every_route(tmp_path: Path) -> None:
    sam = software_sam(demo_profile_with(), tmp_path / "ttc")
    router = SingleSamRouter(sam)
    assert router.sam_for("tunion") is sam and router.sam_for("m1") is sam
    (status,) = router.describe()
    assert status.open and status.serial == sam.serial
    assert status.terminal == sam.terminal_number.hex().upper()
    assert router.primary() is sam


# -- through the real stacks -------------------------------------------------------------------


def demo_profile_with(sam: dict[str, Any] | None = None, **reader: Any) -> Profile:
    raw = tomllib.loads(DEMO_PROFILE.read_text(encoding="utf-8"))
    if sam is not None:
        raw["sam"] = sam
    if reader:
        raw["reader"] = reader
    profile = parse_profile(raw, source="sam-routing-test")
    return dataclasses.replace(profile, double_tap_window_s=0.0)


def routing(
    slots: list[dict[str, Any]], routes: list[tuple[list[str], str, str]]
) -> dict[str, Any]:
    return {
        "kind": "psam",
        "retry_interval_s": 0.05,
        "slots": slots,
        "routes": [{"families": f, "slot": s, "application": a} for f, s, a in routes],
    }


TWO_PSAM_ROUTES = [
    (["tunion"], "jtt978", "tunion"),
    (["cjt166", "legacy1001", "m1"], "local", "cjt166"),
]
ONE_PSAM_ROUTES = [
    (["tunion"], "psam", "tunion"),
    (["cjt166", "legacy1001", "m1"], "psam", "cjt166"),
]


class Field:
    """The card side of one stack: present a card, take it away."""

    def __init__(self, reader: CardReader, present: Any, withdraw: Any) -> None:
        self.reader = reader
        self.present = present
        self.withdraw = withdraw


class Rig:
    def __init__(self, hardware: Hardware, engine: TransactionEngine, store: Any) -> None:
        self.hardware = hardware
        self.engine = engine
        self.store = store
        self.present: Any = None
        self.withdraw: Any = None

    def tap(self, card: Any, wait_s: float = 5.0) -> TapOutcome:
        self.present(card)
        try:
            presence = self.hardware.reader.wait_for_card(wait_s)
            assert presence is not None, "card not seen"
            return self.engine.process_tap(self.hardware.reader, presence)
        finally:
            self.withdraw()
            left = getattr(getattr(self.engine, "presence", None), "left", None)
            if left is not None:
                left()


@pytest.fixture
def data_dir(tmp_path: Path) -> DataDir:
    d = DataDir(tmp_path / "data")
    d.provision("ROUTE-0001")
    return d


def start_rig(profile: Profile, data_dir: DataDir) -> Rig:
    store = data_dir.open_store()
    hardware = open_hardware(profile, data_dir)
    return Rig(hardware, TransactionEngine(profile, store, hardware.sams), store)


def stop_rig(rig: Rig) -> None:
    rig.hardware.close()
    rig.store.close()


class Stack:
    """pcsc or serial: PSAMs in numbered slots, a card field, a profile."""

    def __init__(self, kind: str, pcsc: PcscStack | None) -> None:
        self.kind = kind
        self.pcsc = pcsc
        self.field = CardField()
        self.emulator: ModuleEmulator | None = None
        self.port = 0
        if kind == "serial":
            self.emulator = ModuleEmulator(self.field, {}, torn_exc=CardTorn)
            _thread, self.port = self.emulator.serve_tcp("127.0.0.1", 0)

    def insert_psam(self, slot: int, psam: SimulatedPsam) -> None:
        if self.emulator is not None:
            self.emulator.insert_sam(slot, psam)
            return
        assert self.pcsc is not None
        self.pcsc.slot(slot).insert(PsamIcc(psam))
        self.pcsc.wait_card((SAM_READER, SAM2_READER)[slot - 1], present=True)

    def slot_entry(self, name: str, slot: int) -> dict[str, Any]:
        if self.kind == "serial":
            return {"name": name, "slot": slot}
        return {"name": name, "reader": (SAM_READER, SAM2_READER)[slot - 1]}

    def reader_section(self) -> dict[str, Any]:
        if self.kind == "serial":
            return {"driver": "serial", "url": f"socket://127.0.0.1:{self.port}", "timeout_s": 1.0}
        return {"driver": "pcsc", "card_reader": CARD_READER, "timeout_s": 1.0}

    def wire(self, rig: Rig) -> Rig:
        if self.kind == "serial":
            rig.present, rig.withdraw = self.field.insert, self.field.remove
            return rig
        pcsc = self.pcsc
        assert pcsc is not None

        def withdraw() -> None:
            pcsc.slot(0).remove()
            pcsc.wait_card(CARD_READER, present=False)

        rig.present = lambda card: pcsc.slot(0).insert(ContactlessCardIcc(card))
        rig.withdraw = withdraw
        return rig

    def close(self) -> None:
        if self.emulator is not None:
            self.emulator.stop()


@pytest.fixture(params=["pcsc", "serial"])
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    pcsc = request.getfixturevalue("pcsc") if request.param == "pcsc" else None
    s = Stack(request.param, pcsc)
    try:
        yield s
    finally:
        s.close()


def assert_paid_by(rig: Rig, outcome: TapOutcome, serial: bytes, terminal: bytes) -> None:
    assert outcome.status == "paid", outcome.reason
    record = list(rig.store.records())[-1]
    assert record.fields["sam"] == serial.hex().upper()
    assert record.fields["terminal"] == terminal.hex().upper()


@pytest.mark.stack
def test_two_psams_in_two_slots_serve_tunion_and_cjt166(stack: Stack, data_dir: DataDir) -> None:
    jtt, local = tunion_psam(tunion_core()), cjt166_psam(cjt_core(own_identity=True))
    stack.insert_psam(1, jtt)
    stack.insert_psam(2, local)
    profile = demo_profile_with(
        routing([stack.slot_entry("jtt978", 1), stack.slot_entry("local", 2)], TWO_PSAM_ROUTES),
        **stack.reader_section(),
    )
    rig = stack.wire(start_rig(profile, data_dir))
    try:
        t_card = make_card("tunion", 61, demo_keyset(), balance=5000)
        c_card = make_card("cjt166", 62, CJT_KEYS, balance=3000)
        assert_paid_by(rig, rig.tap(t_card), PSAM_SERIAL, TERMINAL_NUMBER)
        assert_paid_by(rig, rig.tap(c_card), CJT_SERIAL, CJT_TERMINAL)
        assert_paid_by(
            rig, rig.tap(make_card("tunion", 63, demo_keyset())), PSAM_SERIAL, TERMINAL_NUMBER
        )
        assert (t_card.balance, c_card.balance) == (
            5000 - profile.flat_fare,
            3000 - profile.flat_fare,
        )
        assert local.security_codes, "the CJ/T 166 card's 80 CA went to the CJ/T 166 PSAM"
        assert jtt.core.ttc == 2 and local.core.ttc == 1  # each PSAM's own TTC
        status = {s.name: s for s in rig.hardware.sams.describe()}
        assert status["jtt978"].serial == PSAM_SERIAL.hex().upper()
        assert status["local"].terminal == CJT_TERMINAL.hex().upper()
        assert rig.store.verify().ok
    finally:
        stop_rig(rig)


@pytest.mark.stack
def test_one_psam_with_two_applications_serves_tunion_and_cjt166(
    stack: Stack, data_dir: DataDir
) -> None:
    psam = multi_application_psam(tunion_core(), cjt_core())
    stack.insert_psam(1, psam)
    profile = demo_profile_with(
        routing([stack.slot_entry("psam", 1)], ONE_PSAM_ROUTES), **stack.reader_section()
    )
    rig = stack.wire(start_rig(profile, data_dir))
    try:
        cards = [
            make_card("tunion", 71, demo_keyset()),
            make_card("cjt166", 72, CJT_KEYS),
            make_card("cjt166", 73, CJT_KEYS),
            make_card("tunion", 74, demo_keyset()),
        ]
        for card in cards:
            assert_paid_by(rig, rig.tap(card), PSAM_SERIAL, TERMINAL_NUMBER)
        # Opened on T-Union; switched to CJ/T 166 once (FID + name), back to T-Union once.
        assert selects(psam) == 1 + 2 + 1
        assert ef17_reads(psam) == 2
        assert psam.application("tunion").core.ttc == 2
        assert psam.application("cjt166").core.ttc == 2
    finally:
        stop_rig(rig)


@pytest.mark.stack
def test_control_one_application_for_every_family_fails_the_other_family(
    stack: Stack, data_dir: DataDir
) -> None:
    """The old shape (``sam.application = "tunion"`` for every family) against the same PSAM:
    the CJ/T 166 card fails at the PSAM — what routing fixes."""
    stack.insert_psam(1, multi_application_psam(tunion_core(), cjt_core()))
    section: dict[str, Any] = {"kind": "psam", "application": "tunion"}
    reader = stack.reader_section()
    reader.update({"sam_slot": 1} if stack.kind == "serial" else {"sam_reader": SAM_READER})
    rig = stack.wire(start_rig(demo_profile_with(section, **reader), data_dir))
    try:
        assert rig.tap(make_card("tunion", 81, demo_keyset())).status == "paid"
        outcome = rig.tap(make_card("cjt166", 82, CJT_KEYS))
        assert outcome.status != "paid"
        assert "6985" in outcome.reason or "6A88" in outcome.reason, outcome.reason
    finally:
        stop_rig(rig)


@pytest.mark.stack
def test_missing_psam_refuses_its_family_and_is_picked_up_later(
    stack: Stack, data_dir: DataDir
) -> None:
    stack.insert_psam(1, tunion_psam(tunion_core()))
    profile = demo_profile_with(
        routing([stack.slot_entry("jtt978", 1), stack.slot_entry("local", 2)], TWO_PSAM_ROUTES),
        **stack.reader_section(),
    )
    rig = stack.wire(start_rig(profile, data_dir))
    try:
        outcome = rig.tap(make_card("cjt166", 91, CJT_KEYS))
        assert outcome.status != "paid"
        assert "'local'" in outcome.reason and "'cjt166'" in outcome.reason, outcome.reason
        assert_paid_by(
            rig, rig.tap(make_card("tunion", 92, demo_keyset())), PSAM_SERIAL, TERMINAL_NUMBER
        )

        stack.insert_psam(2, cjt166_psam(cjt_core(own_identity=True)))
        time.sleep(2 * profile.sam_retry_interval_s)  # the slot's next retry is due
        outcome = rig.tap(make_card("cjt166", 93, CJT_KEYS))
        assert_paid_by(rig, outcome, CJT_SERIAL, CJT_TERMINAL)
    finally:
        stop_rig(rig)


def test_open_hardware_without_any_psam_raises(data_dir: DataDir) -> None:
    field = CardField()
    emulator = ModuleEmulator(field, {}, torn_exc=CardTorn)
    _thread, port = emulator.serve_tcp("127.0.0.1", 0)
    try:
        profile = demo_profile_with(
            routing([{"name": "psam", "slot": 1}], ONE_PSAM_ROUTES),
            driver="serial",
            url=f"socket://127.0.0.1:{port}",
        )
        with pytest.raises(SamError, match="no PSAM could be opened"):
            open_hardware(profile, data_dir)
    finally:
        emulator.stop()
