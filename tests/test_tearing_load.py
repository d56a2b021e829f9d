"""Online load (圈存) tear matrix and host authorisation (issue 10, kiosk part 1).

The card simulator (real 3DES / SM4) is reached through the in-process reader driver; the host
side is a real :class:`clearinghost.loads.LoadAuthority` on real SQLite with the software key
store. For each card command of a load, the card removed before / after that command's commit,
re-presented at once or never, on 3DES and SM4 cards: never a double load, never a lost one.
The third column, re-presented after a kill -9 of the agent process, is
``tests/test_load_kill9.py`` (the real ``cardagent load`` process).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.crypto import Algorithm
from agent.offline_store import DeviceKey, OfflineStore, Record
from agent.sam.keys import KeySet
from agent.tap.load import KioskLoader, LoadRefusedByHost, LoadRequest, LoadResult
from clearinghost.keystore import KeyStore, SoftwareKeyStore, load_test_keys
from clearinghost.loads import LoadAuthority, LoadRefused
from tests.fake_reader.cpu_card import SimulatedCpuCard
from tests.fake_reader.inprocess import CardField, InProcessReader
from tests.fake_reader.scenario import TERMINAL_NUMBER, demo_keyset, demo_profile, make_card

KIOSK = "KIOSK-0001"
BALANCE = 5000
AMOUNT = 3000
MAX_BALANCE = 100000
CLEAN_LOAD_COMMANDS = 6  # PPSE, AID, EF17, GET BALANCE, INITIALIZE FOR LOAD, CREDIT FOR LOAD
NOW = dt.datetime(2026, 11, 30, 12, 0, 0, tzinfo=dt.UTC)


class InProcessHost:
    """The kiosk's host client, in process: the same calls the HTTP client makes."""

    def __init__(self, authority: LoadAuthority) -> None:
        self.authority = authority
        self.authorisations = 0

    def authorise(self, request: LoadRequest) -> bytes:
        self.authorisations += 1
        try:
            return self.authority.authorise(KIOSK, dataclasses.asdict(request))
        except LoadRefused as refused:
            raise LoadRefusedByHost(refused.reason, refused.detail) from refused

    def complete(self, load_key: str, outcome: str, counter: int, tac: str) -> None:
        self.authority.complete(KIOSK, load_key, outcome, counter, tac)


class Kiosk:
    def __init__(self, directory: Path, keystore: KeyStore | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.keyset = KeySet([*demo_keyset(), *load_test_keys()])
        self.authority = LoadAuthority(
            directory / "loads.db",
            keystore or SoftwareKeyStore(self.keyset),
            max_balance=MAX_BALANCE,
        )
        self.host = InProcessHost(self.authority)
        key_path = directory / "device.key"
        DeviceKey.create(key_path)
        self.store = OfflineStore.open(directory / "agent.db", DeviceKey.load(key_path), KIOSK)
        profile = dataclasses.replace(demo_profile(), max_balance=MAX_BALANCE)
        self.loader = KioskLoader(
            profile, self.store, self.host, TERMINAL_NUMBER, clock=lambda: NOW
        )
        self.field = CardField()
        self.reader = InProcessReader(self.field)

    def card(self, number: int, algorithm: Algorithm, **options: Any) -> SimulatedCpuCard:
        return make_card(
            "tunion", number, self.keyset, balance=BALANCE, algorithm=algorithm, **options
        )

    def present(
        self, card: SimulatedCpuCard, key: str, payment: dict[str, Any] | None = None
    ) -> LoadResult:
        self.field.insert(card)
        assert self.reader.wait_for_card(0) is not None
        try:
            return self.loader.load(
                self.reader, AMOUNT, payment or {"kind": "cash", "amount": AMOUNT}, key
            )
        finally:
            self.field.remove()

    def records(self, kind: str) -> list[Record]:
        return [r for r in self.store.records() if r.kind == kind]

    def expire(self) -> int:
        return self.loader.expire(dt.datetime.now(dt.UTC) + dt.timedelta(days=1), "gone")

    def close(self) -> None:
        self.store.close()
        self.authority.close()


@pytest.fixture
def kiosk(tmp_path: Path) -> Iterator[Kiosk]:
    k = Kiosk(tmp_path)
    yield k
    k.close()


ALGORITHMS = [Algorithm.TDES, Algorithm.SM4]


@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=["3des", "sm4"])
def test_clean_load_end_to_end(kiosk: Kiosk, algorithm: Algorithm) -> None:
    card = kiosk.card(1, algorithm)
    card.reset_command_count()
    result = kiosk.present(card, "order-0001")
    assert result.status == "loaded", result
    assert card.command_count == CLEAN_LOAD_COMMANDS
    assert card.balance == BALANCE + AMOUNT
    assert card.online_counter == 1
    (record,) = kiosk.records("load")
    assert record.fields["tac"] == card.loads[0].tac.hex().upper() == result.tac
    view = kiosk.authority.view("order-0001")
    assert view is not None and view.state == "completed", view  # TAC verified by the host


@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=["3des", "sm4"])
@pytest.mark.parametrize("mode", ["tear_before", "tear_after"])
@pytest.mark.parametrize("comeback", ["at_once", "never"])
def test_load_tearing_matrix(
    tmp_path: Path, algorithm: Algorithm, mode: str, comeback: str
) -> None:
    for position in range(1, CLEAN_LOAD_COMMANDS + 1):
        kiosk = Kiosk(tmp_path / f"{position}")
        try:
            check_one_tear(kiosk, algorithm, position, mode, comeback)
        finally:
            kiosk.close()


def check_one_tear(
    kiosk: Kiosk, algorithm: Algorithm, position: int, mode: str, comeback: str
) -> None:
    label = f"{algorithm.name} command {position} {mode} {comeback}"
    card = kiosk.card(position, algorithm)
    card.reset_command_count()
    card.faults.add(position, mode)  # type: ignore[arg-type]
    torn = kiosk.present(card, "order-1")
    assert torn.status in ("torn", "failed"), (label, torn)
    assert len(card.loads) <= 1, label
    credited_by_torn = len(card.loads) == 1
    intent_written = bool(kiosk.store.pending_intents())

    if comeback == "at_once":
        again = kiosk.present(card, "order-1")
        assert again.status == ("recovered" if credited_by_torn else "loaded"), (label, again)
        assert len(card.loads) == 1, f"{label}: loaded {len(card.loads)} times"
        assert card.balance == BALANCE + AMOUNT, label
        (record,) = kiosk.records("load")
        assert record.fields["tac"] == card.loads[0].tac.hex().upper(), label
        assert not kiosk.records("unresolved"), label
        assert not kiosk.store.pending_intents(), label
        states = sorted(v.state for v in kiosk.authority.loads())
        # one load the host completed (TAC verified); any earlier attempt released
        assert states.count("completed") == 1, (label, states)
        assert set(states) <= {"completed", "not_credited"}, (label, states)
    else:
        kiosk.expire()
        assert not kiosk.store.pending_intents(), label
        assert not kiosk.records("load"), label
        unresolved = kiosk.records("unresolved")
        assert len(unresolved) == (1 if intent_written else 0), label
        if credited_by_torn:
            assert len(unresolved) == 1, label  # the credit is never lost: one record
        unknown = kiosk.authority.loads("unknown")
        assert len(unknown) == (1 if intent_written else 0), label  # shown so, money held
        if credited_by_torn:
            # the card's next MAC1 anywhere proves the credit: the host closes it as credited
            kiosk.present(card, "order-2")
            assert kiosk.authority.view("order-1").state == "credited", label  # type: ignore[union-attr]
            assert len(card.loads) == 2  # order-2 is a second, paid load
    assert kiosk.store.verify().ok, label


def test_forged_mac1_is_refused(kiosk: Kiosk) -> None:
    card = kiosk.card(1, Algorithm.TDES)
    kiosk.field.insert(card)
    request = _request(kiosk, card)
    kiosk.field.remove()
    forged = dataclasses.replace(request, mac1="00000000")
    with pytest.raises(LoadRefused) as refused:
        kiosk.authority.authorise(KIOSK, dataclasses.asdict(forged))
    assert refused.value.reason == "bad_mac1"
    assert not kiosk.authority.loads()


def test_replayed_key_gives_the_same_mac2_and_one_authorisation(kiosk: Kiosk) -> None:
    card = kiosk.card(1, Algorithm.SM4)
    request = dataclasses.asdict(_request(kiosk, card))
    first = kiosk.authority.authorise(KIOSK, request)
    assert kiosk.authority.authorise(KIOSK, request) == first
    assert len(kiosk.authority.loads()) == 1
    changed = {**request, "amount": AMOUNT + 1}
    with pytest.raises(LoadRefused) as refused:
        kiosk.authority.authorise(KIOSK, changed)
    assert refused.value.reason in ("load_key_reused",)


def test_voucher_is_redeemed_once(kiosk: Kiosk) -> None:
    kiosk.authority.add_voucher("VOUCHER-TEST-1", AMOUNT)
    voucher = {"kind": "voucher", "code": "VOUCHER-TEST-1"}
    first = kiosk.present(kiosk.card(1, Algorithm.TDES), "order-a", voucher)
    assert first.status == "loaded", first
    other = kiosk.card(2, Algorithm.TDES)
    second = kiosk.present(other, "order-b", voucher)
    assert second.status == "refused" and second.reason == "voucher_used", second
    assert not other.loads
    assert not kiosk.store.pending_intents()  # the refusal proved nothing changed: voided


def test_voucher_of_a_load_not_credited_is_given_back(kiosk: Kiosk) -> None:
    kiosk.authority.add_voucher("VOUCHER-TEST-2", AMOUNT)
    voucher = {"kind": "voucher", "code": "VOUCHER-TEST-2"}
    card = kiosk.card(1, Algorithm.TDES)
    card.reset_command_count()
    card.faults.add(CLEAN_LOAD_COMMANDS, "tear_before")
    assert kiosk.present(card, "order-v", voucher).status == "torn"
    again = kiosk.present(card, "order-v", voucher)
    assert again.status == "loaded", again
    assert len(card.loads) == 1


def test_balance_limit_is_refused(kiosk: Kiosk) -> None:
    card = kiosk.card(1, Algorithm.TDES)
    card._balance = MAX_BALANCE - AMOUNT + 1
    request = dataclasses.asdict(_request(kiosk, card))
    with pytest.raises(LoadRefused) as refused:
        kiosk.authority.authorise(KIOSK, request)
    assert refused.value.reason == "balance_limit"
    result = kiosk.present(card, "order-limit")
    assert result.status == "refused" and "balance_limit" in result.reason
    assert not card.loads


def test_host_refuses_while_an_earlier_load_is_unresolved(kiosk: Kiosk) -> None:
    """A load authorised, its card then loaded elsewhere: the counters no longer tell."""
    card = kiosk.card(1, Algorithm.TDES)
    kiosk.authority.authorise(KIOSK, dataclasses.asdict(_request(kiosk, card, key="order-x")))
    card._online_counter += 2
    with pytest.raises(LoadRefused) as refused:
        kiosk.authority.authorise(KIOSK, dataclasses.asdict(_request(kiosk, card, key="order-y")))
    assert refused.value.reason == "load_unresolved"


def _request(kiosk: Kiosk, card: SimulatedCpuCard, key: str = "order-req") -> LoadRequest:
    """INITIALIZE FOR LOAD on the card through the reader, as the kiosk would ask the host."""
    from agent.crypto import datetime7
    from agent.products import cpu_load, cpu_purse
    from agent.tap.load import _Exchanger

    kiosk.field.insert(card)
    assert kiosk.reader.wait_for_card(0) is not None
    try:
        io = _Exchanger(kiosk.reader)
        app = kiosk.loader.profile.applications[0]
        fci = io.run(cpu_purse.select_application(app))
        info = io.run(cpu_purse.read_card(app, fci, kiosk.loader.profile.dialects))
        init = io.run(cpu_load.initialize_for_load(1, AMOUNT, TERMINAL_NUMBER, 10**9))
    finally:
        kiosk.field.remove()
    return LoadRequest(
        load_key=key,
        asn=info.asn.hex().upper(),
        factors=tuple(f.hex().upper() for f in info.factors),
        key_index=1,
        key_version=init.key_version,
        algorithm=init.algorithm,
        balance=init.balance,
        counter=init.counter,
        random=init.random.hex().upper(),
        mac1=init.mac1.hex().upper(),
        amount=AMOUNT,
        terminal=TERMINAL_NUMBER.hex().upper(),
        datetime=datetime7(NOW).hex().upper(),
        payment={"kind": "cash", "amount": AMOUNT},
    )
