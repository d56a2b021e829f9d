"""The pure recovery decisions of every product, as tables, and the journal's handling of an
intent it cannot read (CPU and M1 alike: unresolved, never a crash, then a normal tap)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from agent.products.cpu_recovery import CpuLockIntent, CpuPurchaseIntent, judge_lock
from agent.products.cpu_recovery import judge_purchase as judge_cpu
from agent.products.intents import OP_LOCK, IntentPayloadError, Verdict
from agent.products.m1_recovery import M1PurchaseIntent
from agent.products.m1_recovery import judge_lock as judge_m1_lock
from agent.products.m1_recovery import judge_purchase as judge_m1
from tests.fake_reader.scenario import make_card, make_m1_card
from tests.m1_rig import M1Rig
from tests.rig import Rig

CPU = CpuPurchaseIntent(
    family="tunion",
    aid="A000000632010105",
    flow="compound",
    transaction_type=9,
    asn="0000000000000001",
    counter=7,
    amount=200,
    balance_before=1000,
    key_version=1,
    algorithm=0,
    ttc=3,
    mac1="00112233",
    datetime="20240501083000",
    terminal="000000000024",
    sam="SAM1",
    factors="",
)


@pytest.mark.parametrize(
    ("counter", "balance", "verdict", "card_fault"),
    [
        (7, 1000, Verdict.VOID, False),  # counter unchanged: not debited
        (7, 800, Verdict.VOID, False),  # the counter decides, whatever the balance says
        (8, 800, Verdict.FINALIZE, False),  # counter + 1, balance - amount: debited
        (8, 1000, Verdict.UNRESOLVED, True),  # counter moved, balance did not
        (8, 600, Verdict.UNRESOLVED, True),  # moved by the wrong amount
        (9, 600, Verdict.UNRESOLVED, False),  # another terminal ran in between
        (6, 1000, Verdict.UNRESOLVED, True),  # counter went back
    ],
)
def test_cpu_purchase_table(counter: int, balance: int, verdict: Verdict, card_fault: bool) -> None:
    decision = judge_cpu(CPU, counter, balance)
    assert decision.verdict is verdict, decision
    assert bool(decision.card_fault) is card_fault
    assert decision.reason


def test_cpu_counter_wraps_at_16_bits() -> None:
    wrapped = dataclasses.replace(CPU, counter=0xFFFF)
    assert judge_cpu(wrapped, 0, 800).verdict is Verdict.FINALIZE


@pytest.mark.parametrize(("blocked", "verdict"), [(True, Verdict.FINALIZE), (False, Verdict.VOID)])
def test_cpu_lock_table(blocked: bool, verdict: Verdict) -> None:
    assert judge_lock(blocked=blocked).verdict is verdict


M1 = M1PurchaseIntent(
    family="m1",
    uid4="C1000064",
    city="1000",
    serial="00000064",
    card_number="100",
    card_type=1,
    counter_before=4,
    counter=5,
    balance_before=1000,
    amount=200,
    record_slot=2,
    datetime="20240501083000",
    terminal="000000000024",
    sam="SAM1",
)


@pytest.mark.parametrize(
    ("uid4", "serial", "counter", "balance", "verdict"),
    [
        ("C1000064", "00000064", 4, 1000, Verdict.VOID),
        ("C1000064", "00000064", 5, 800, Verdict.FINALIZE),
        ("C1000064", "00000064", 5, 1000, Verdict.UNRESOLVED),
        ("C1000064", "00000064", 4, 800, Verdict.UNRESOLVED),
        ("C1000064", "00000064", 6, 600, Verdict.UNRESOLVED),
        ("C1000065", "00000064", 4, 1000, Verdict.UNRESOLVED),  # another card
        ("C1000064", "00000065", 4, 1000, Verdict.UNRESOLVED),
    ],
)
def test_m1_purchase_table(
    uid4: str, serial: str, counter: int, balance: int, verdict: Verdict
) -> None:
    decision = judge_m1(
        M1, uid4=uid4, serial=serial, counter=counter, balance=balance, recovery="normal"
    )
    assert decision.verdict is verdict, decision


@pytest.mark.parametrize(
    ("same_card", "flagged", "verdict"),
    [
        (True, True, Verdict.FINALIZE),
        (True, False, Verdict.VOID),
        (False, True, Verdict.VOID),
        (False, False, Verdict.VOID),
    ],
)
def test_m1_lock_table(same_card: bool, flagged: bool, verdict: Verdict) -> None:
    payload = {"op": OP_LOCK, "uid4": "C1000064", "serial": "00000064"}
    decision = judge_m1_lock(
        payload,
        uid4="C1000064" if same_card else "C1000065",
        serial="00000064",
        flagged=flagged,
        recovery="normal",
    )
    assert decision.verdict is verdict


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"op": "purchase", "counter": "seven"},
        {**CPU.to_payload(), "amount": None},
        {**CPU.to_payload(), "counter": True},
        {**CPU.to_payload(), "op": OP_LOCK},
    ],
)
def test_unreadable_cpu_payloads_are_refused_by_name(payload: dict[str, object]) -> None:
    with pytest.raises(IntentPayloadError):
        CpuPurchaseIntent.from_payload(payload)


def test_typed_intents_round_trip() -> None:
    assert CpuPurchaseIntent.from_payload(CPU.to_payload()) == CPU
    assert M1PurchaseIntent.from_payload(M1.to_payload()) == M1
    lock = CpuLockIntent("tunion", "A0", "01", "C1", 0, "000000000024", "SAM1")
    assert CpuLockIntent.from_payload(lock.to_payload()) == lock


def test_a_cpu_intent_older_agents_wrote_without_factors_is_read() -> None:
    payload = CPU.to_payload()
    del payload["factors"], payload["op"]
    assert CpuPurchaseIntent.from_payload(payload).factors == ""


def test_unreadable_cpu_intent_becomes_unresolved_and_the_card_pays(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    card = make_card("tunion", 3, rig.keyset, balance=1000)
    probe = rig.tap(card)  # learn the card id the engine uses
    card_id = probe.card_id
    rig.store.add_intent(card_id, "cpu", {"op": "purchase", "counter": "garbage"})
    outcome = rig.tap(card)
    assert outcome.status == "paid", outcome.reason
    [unresolved] = rig.records(kind="unresolved")
    assert "intent unreadable" in str(unresolved.fields["reason"])
    assert rig.store.pending_intents() == []


def test_unreadable_m1_intent_becomes_unresolved_and_the_card_pays() -> None:
    rig = M1Rig()
    card = make_m1_card(9001, rig.layout, balance=1000)
    card_id = card.uid.hex().upper()
    rig.store.add_intent(card_id, "m1", {"op": "purchase", "balance_before": []})
    outcome = rig.tap(card)
    assert outcome.status == "paid", outcome.reason
    [unresolved] = rig.records(kind="unresolved")
    assert "intent unreadable" in str(unresolved.fields["reason"])
