"""The kiosk end to end through its JSON API (issue 10): a real clearing host (uvicorn on
127.0.0.1, SQLite or PostgreSQL), the simulated card field and PSAM behind the emulated serial
reader module reached through the real serial driver, a simulated note acceptor on a TCP socket
reached through pyserial, and the kiosk service and page server of ``cardagent kiosk``.

Top-ups by cash, voucher and pending load; note acceptor faults (garbage, jam, a note that
times out mid-way) with every fen accounted for; a voucher used twice; a utility bill paid and
marked paid at the host only after the upload; the card removed at each step of a load and of a
bill debit: the page says "put the card back", and the card is credited or debited exactly once.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.kiosk.notes import NoteEvent, parse_line
from agent.offline_store import DeviceKey
from agent.sam.keys import KeySet
from agent.wiring import DEVICE_KEY_FILE, DataDir
from clearinghost.demo_kiosk import KioskApi, KioskSite
from clearinghost.keys import HostKey
from clearinghost.keystore import SoftwareKeyStore, load_test_keys
from clearinghost.loads import LoadAuthority
from clearinghost.server import ClearingHost, HostServer, create_app
from clearinghost.storage import PostgresStorage, SqliteStorage, Storage
from tests.fake_reader.cpu_card import SimulatedCpuCard, make_tunion_card
from tests.fake_reader.faults import CardTorn
from tests.fake_reader.inprocess import CardField
from tests.fake_reader.module_server import ModuleEmulator
from tests.fake_reader.note_acceptor import SimulatedNoteAcceptor
from tests.fake_reader.scenario import DEMO_PROFILE, REPO, demo_keyset, make_card, make_psam
from tests.pos_stack import free_port
from tests.test_sync_storage import PgServer

INIT = (0x80, 0x50)
CREDIT = (0x80, 0x52)
DEBIT = (0x80, 0x54)


class TearOnce:
    """The card, leaving the field at its first command ``cla ins`` (``p1`` if given): before
    the card processes it, or after it committed (the answer is lost)."""

    def __init__(self, card: SimulatedCpuCard, cla_ins: tuple[int, int], when: str,
                 p1: int | None = None) -> None:  # fmt: skip
        self.card, self.cla_ins, self.when, self.p1 = card, cla_ins, when, p1
        self.fired = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.card, name)

    def process(self, apdu: bytes) -> bytes:
        hit = tuple(apdu[:2]) == self.cla_ins and (self.p1 is None or apdu[2] == self.p1)
        if hit and not self.fired:
            self.fired = True
            if self.when == "after":
                self.card.process(apdu)
            raise CardTorn(f"card left at {apdu[:4].hex()} ({self.when})")
        return self.card.process(apdu)


@pytest.fixture(scope="module")
def pgserver() -> Iterator[PgServer]:
    server = PgServer().start()
    yield server
    server.stop()


def _site(tmp_path: Path, storage: Storage | None = None, **options: Any) -> KioskSite:
    options.setdefault("note_timeout_s", 1.0)
    options.setdefault("put_back_wait_s", 120.0)
    return KioskSite(tmp_path / "site", storage, **options)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[KioskSite]:
    site = _site(tmp_path)
    yield site
    site.close()


@pytest.fixture
def api(site: KioskSite) -> Iterator[KioskApi]:
    client = KioskApi(site.url)
    yield client
    client.close()


def _read(api: KioskApi) -> dict[str, Any]:
    api.post("/api/card")
    state = api.wait("ready", "failed")
    assert state["phase"] == "ready", state
    return state


def _host_loads(site: KioskSite) -> dict[str, list[int]]:
    by_state: dict[str, list[int]] = {}
    for view in site.authority.loads():
        by_state.setdefault(view.state, []).append(view.amount)
    return by_state


def test_cash_top_up_with_note_faults_accounts_for_every_fen(
    site: KioskSite, api: KioskApi
) -> None:
    card = site.card(1, balance=500)
    site.field.insert(card)
    state = _read(api)
    assert state["card"]["balance"] == 500 and state["card"]["loadable"] is True
    api.post("/api/cash")
    site.notes.insert(2000)
    api.wait("cash", cash__accepted=2000)
    site.notes.garbage()
    state = api.wait("cash", cash__accepted=2000, cash__alerts__0__code="garbage")
    site.notes.insert(1000)
    api.wait("cash", cash__accepted=3000)
    site.notes.jam(5000)  # a 50-yuan note stuck in the path
    state = api.wait("cash", cash__open=False)
    assert [a["code"] for a in state["cash"]["alerts"]] == ["garbage", "jam"]
    assert state["cash"]["accepted"] == 3000 and site.notes.enabled.is_set() is False
    api.post("/api/load", {"source": "cash"})
    state = api.wait("success", "failed")
    assert state["phase"] == "success" and state["message"] == "loaded", state
    assert card.balance == 3500 and len(card.loads) == 1
    assert _host_loads(site) == {"completed": [3000]}
    events = site.kiosk.book.cash_events()
    kinds = [(e["kind"], e["amount"]) for e in events]
    assert kinds == [("accepted", 2000), ("garbage", 0), ("accepted", 1000), ("disputed", 5000)]
    load_key = site.authority.loads()[0].load_key
    assert {e["load_key"] for e in events if e["kind"] == "accepted"} == {load_key}
    assert site.kiosk.book.unused_cash() == 0
    receipt = Path(site.data_dir.path / "receipts" / state["receipt"]["file"]).read_text()
    assert "30.00 yuan" in receipt and "35.00 yuan" in receipt and load_key in receipt

    # a note drawn in and never confirmed: recorded for staff, never counted, nothing loaded
    api.post("/api/reset")
    api.post("/api/cash")
    site.notes.escrow_only(1000)
    state = api.wait("cash", cash__open=False)
    assert [a["code"] for a in state["cash"]["alerts"]] == ["note_timeout"]
    answer = api.http.post("/api/load", json={"source": "cash"})
    assert answer.status_code == 409 and answer.json()["error"] == "no_cash"
    assert site.kiosk.book.cash_events()[-1]["kind"] == "disputed"
    assert card.balance == 3500 and len(card.loads) == 1


def test_cash_for_a_load_above_the_limit_is_kept_for_the_customer(
    site: KioskSite, api: KioskApi
) -> None:
    card = site.card(9, balance=99000)
    site.field.insert(card)
    _read(api)
    api.post("/api/cash")
    site.notes.insert(2000)
    api.wait("cash", cash__accepted=2000)
    api.post("/api/load", {"source": "cash"})
    state = api.wait("success", "failed")
    assert (state["phase"], state["message"]) == ("failed", "refused:balance_limit"), state
    assert "cash 20.00 yuan accepted, kept for you" in state["detail"]
    assert card.balance == 99000 and not card.loads and site.authority.loads() == []
    assert site.kiosk.book.unused_cash() == 2000 == state["unused_cash"]


def test_one_card_operation_at_a_time(site: KioskSite, api: KioskApi) -> None:
    site.authority.add_voucher("GIFT-BUSY", 1000)
    api.post("/api/load", {"source": "voucher", "amount": 1000, "code": "GIFT-BUSY"})
    assert api.wait("waiting_card")["message"] == "present_card"
    for path, body in [
        ("/api/card", {}),
        ("/api/load", {"source": "voucher", "amount": 1000, "code": "GIFT-BUSY"}),
        ("/api/reset", {}),
    ]:
        answer = api.http.post(path, json=body)
        assert answer.status_code == 423 and answer.json()["error"] == "busy", path
    card = site.card(10, balance=500)
    site.field.insert(card)
    assert api.wait("success", "failed")["phase"] == "success"
    assert card.balance == 1500 and len(card.loads) == 1


def test_note_lines_from_the_device_are_untrusted() -> None:
    assert parse_line(b"STACKED 2000\r") == NoteEvent("stacked", 2000, "STACKED 2000")
    assert parse_line(b"ESCROW 10000") == NoteEvent("escrow", 10000, "ESCROW 10000")
    assert parse_line(b"JAM") == NoteEvent("jam", 0, "JAM")
    for raw in (b"STACKED 2001", b"STACKED -100", b"STACKED 1e3", b"stacked 100", b"\xff\x00",
                b"", b"STACKED 100 100", b"REJECTED"):  # fmt: skip
        event = parse_line(raw)
        assert event.kind == "garbage" and event.amount == 0, raw


def test_voucher_once_unknown_and_twice(site: KioskSite, api: KioskApi) -> None:
    card = site.card(2, balance=500)
    site.field.insert(card)
    site.authority.add_voucher("GIFT-0001", 5000)
    _read(api)
    api.post("/api/load", {"source": "voucher", "amount": 5000, "code": "GIFT-0001"})
    assert api.wait("success", "failed")["phase"] == "success"
    assert card.balance == 5500
    for code, amount, refusal in [
        ("GIFT-0001", 5000, "refused:voucher_used"),
        ("GIFT-9999", 5000, "refused:voucher_unknown"),
    ]:
        api.post("/api/reset")
        api.post("/api/load", {"source": "voucher", "amount": amount, "code": code})
        state = api.wait("success", "failed")
        assert (state["phase"], state["message"]) == ("failed", refusal), state
    assert card.balance == 5500 and len(card.loads) == 1
    assert _host_loads(site) == {"completed": [5000]}
    bad = api.http.post("/api/load", json={"source": "voucher", "amount": 12.5, "code": "X-1"})
    assert bad.status_code == 422 and bad.json()["error"] == "invalid_amount"
    bad = api.http.post("/api/load", json={"source": "gift", "amount": 100})
    assert bad.status_code == 422 and bad.json()["error"] == "bad_source"


def test_a_card_of_another_city_is_not_loaded(site: KioskSite, api: KioskApi) -> None:
    card = make_tunion_card(
        keyset=site.keyset,
        asn=bytes.fromhex("5170070199999999"),
        balance=500,
        issuer_id=bytes.fromhex("03034000FFFFFFFF"),
        city_code="4000",
    )
    site.field.insert(card)
    site.authority.add_voucher("GIFT-FOREIGN", 1000)
    state = _read(api)
    assert state["card"]["loadable"] is False
    api.post("/api/load", {"source": "voucher", "amount": 1000, "code": "GIFT-FOREIGN"})
    state = api.wait("success", "failed")
    assert (state["phase"], state["message"]) == ("failed", "refused:not_loadable"), state
    assert card.balance == 500 and not card.loads and site.authority.loads() == []


def test_pending_load_is_listed_and_loaded_once(site: KioskSite, api: KioskApi) -> None:
    card = site.card(3, balance=1000)
    site.field.insert(card)
    site.authority.credit(card.asn.hex().upper(), 3000, "employer", "test", pending_id="EMP-11")
    state = _read(api)
    assert state["pending"] == [{"pending_id": "EMP-11", "amount": 3000, "source": "employer"}]
    api.post("/api/load", {"source": "pending", "pending_id": "EMP-11"})
    assert api.wait("success", "failed")["phase"] == "success"
    assert card.balance == 4000
    api.post("/api/reset")
    assert _read(api)["pending"] == []
    assert site.authority.pending_loads(card.asn.hex()) == []


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_bill_paid_at_the_host_only_after_the_upload(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    storage: Storage | None = None
    if backend == "postgresql":
        storage = PostgresStorage(request.getfixturevalue("pgserver").new_database())
    site = _site(tmp_path, storage)
    api = KioskApi(site.url)
    try:
        site.load_bills()
        card = site.card(4, balance=20000)
        site.field.insert(card)
        bills = api.post("/api/bills/lookup", {"account": "110105-0001"})["bills"]
        assert {b["bill_id"]: b["state"] for b in bills} == {
            "W-2026-11-0001": "open", "E-2026-11-0001": "open",
            "G-2026-11-0001": "open", "H-2026-Q4-0001": "open",
        }  # fmt: skip
        api.post("/api/bills/pay", {"bill_id": "E-2026-11-0001"})
        state = api.wait("success", "failed")
        assert (state["phase"], state["message"]) == ("success", "bill_paid_ok"), state
        assert card.balance == 20000 - 12880 and len(card.debits) == 1
        assert "128.80 yuan" in state["receipt"]["text"]
        assert site.storage.bill("E-2026-11-0001")["state"] == "payment_pending"  # type: ignore[index]
        assert site.upload() >= 1
        bill = site.storage.bill("E-2026-11-0001")
        assert bill is not None and bill["state"] == "paid" and bill["terminal_id"] == "KIOSK-0001"
        api.post("/api/reset")
        bills = api.post("/api/bills/lookup", {"account": "110105-0001"})["bills"]
        assert {b["bill_id"]: b["state"] for b in bills}["E-2026-11-0001"] == "paid"
        again = api.http.post("/api/bills/pay", json={"bill_id": "E-2026-11-0001"})
        assert again.status_code == 409 and again.json()["error"] == "bill_paid"
        assert len(card.debits) == 1
        unknown = api.http.post("/api/bills/lookup", json={"account": "no/such"})
        assert unknown.status_code == 422 and unknown.json()["error"] == "bad_account"
    finally:
        api.close()
        site.close()


def test_a_bill_above_the_balance_is_refused_and_released(site: KioskSite, api: KioskApi) -> None:
    site.load_bills()
    card = site.card(5, balance=1000)
    site.field.insert(card)
    api.post("/api/bills/lookup", {"account": "110105-0001"})
    api.post("/api/bills/pay", {"bill_id": "H-2026-Q4-0001"})
    state = api.wait("success", "failed")
    assert (state["phase"], state["message"]) == ("failed", "refused:insufficient_balance")
    assert card.balance == 1000 and not card.debits
    assert site.storage.bill("H-2026-Q4-0001")["state"] == "open"  # type: ignore[index]


@pytest.mark.parametrize(
    ("command", "when", "source"),
    [
        (INIT, "before", "cash"),
        (INIT, "after", "cash"),
        (CREDIT, "before", "cash"),
        (CREDIT, "after", "cash"),
        (CREDIT, "before", "voucher"),
        (CREDIT, "after", "pending"),
    ],
    ids=[
        "init-before",
        "init-after",
        "credit-before",
        "credit-after",
        "voucher-credit-before",
        "pending-credit-after",
    ],
)
def test_card_removed_mid_load_is_put_back_and_loaded_once(
    site: KioskSite, api: KioskApi, command: tuple[int, int], when: str, source: str
) -> None:
    card = site.card(6, balance=500)
    site.field.insert(card)
    site.authority.add_voucher("GIFT-0006", 2000)
    site.authority.credit(card.asn.hex().upper(), 2000, "employer", "test", pending_id="EMP-06")
    _read(api)
    if source == "cash":
        api.post("/api/cash")
        site.notes.insert(2000)
        api.wait("cash", cash__accepted=2000)
        body: dict[str, Any] = {"source": "cash"}
    elif source == "voucher":
        body = {"source": "voucher", "amount": 2000, "code": "GIFT-0006"}
    else:
        body = {"source": "pending", "pending_id": "EMP-06"}
    site.field.remove()
    site.field.insert(TearOnce(card, command, when, p1=0x00 if command == INIT else None))
    api.post("/api/load", body)
    state = api.wait("put_back", "success", "failed")
    assert (state["phase"], state["message"]) == ("put_back", "put_back"), state
    site.field.insert(card)  # the customer puts the same card back
    state = api.wait("success", "failed")
    assert state["phase"] == "success", state
    assert card.balance == 2500 and len(card.loads) == 1  # credited exactly once
    loads = _host_loads(site)
    assert loads["completed"] == [2000] and set(loads) <= {"completed", "not_credited"}
    assert site.kiosk.book.unused_cash() == 0


def test_card_never_back_is_settled_at_its_next_visit(tmp_path: Path) -> None:
    site = _site(tmp_path, put_back_wait_s=1.0)
    api = KioskApi(site.url)
    try:
        card = site.card(7, balance=500)
        site.authority.add_voucher("GIFT-A", 1000)
        site.authority.add_voucher("GIFT-B", 1000)
        site.field.insert(TearOnce(card, CREDIT, "after"))
        api.post("/api/load", {"source": "voucher", "amount": 1000, "code": "GIFT-A"})
        state = api.wait("success", "failed")
        assert (state["phase"], state["message"]) == ("failed", "card_not_back"), state
        assert card.balance == 1500 and _host_loads(site) == {"authorised": [1000]}
        api.post("/api/reset")
        site.field.insert(card)  # days later, another top-up
        api.post("/api/load", {"source": "voucher", "amount": 1000, "code": "GIFT-B"})
        assert api.wait("success", "failed")["phase"] == "success"
        assert card.balance == 2500 and len(card.loads) == 2
        assert _host_loads(site) == {"completed": [1000, 1000]}
    finally:
        api.close()
        site.close()


@pytest.mark.parametrize("when", ["before", "after"])
def test_card_removed_mid_bill_debit_is_put_back_and_debited_once(
    site: KioskSite, api: KioskApi, when: str
) -> None:
    site.load_bills()
    card = site.card(8, balance=10000)
    site.field.insert(TearOnce(card, DEBIT, when))
    api.post("/api/bills/lookup", {"account": "110105-0001"})
    api.post("/api/bills/pay", {"bill_id": "W-2026-11-0001"})
    state = api.wait("put_back", "success", "failed")
    assert (state["phase"], state["message"]) == ("put_back", "put_back"), state
    site.field.insert(card)
    state = api.wait("success", "failed")
    assert state["phase"] == "success", state
    assert card.balance == 10000 - 4250 and len(card.debits) == 1
    site.upload()
    assert site.storage.bill("W-2026-11-0001")["state"] == "paid"  # type: ignore[index]


def test_page_is_served_offline_with_its_assets(site: KioskSite, api: KioskApi) -> None:
    page = api.http.get("/")
    assert page.status_code == 200 and "kiosk.js" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN, no web font
    for asset in ("/kiosk.js", "/kiosk.css"):
        body = api.http.get(asset).text
        assert "http://" not in body and "https://" not in body and "@import" not in body
    assert "default-src 'none'" in page.headers["content-security-policy"]
    foreign = api.http.get("/api/state", headers={"Host": "evil.example"})
    assert foreign.status_code == 403
    cross = api.http.post("/api/card", json={}, headers={"Origin": "http://evil.example"})
    assert cross.status_code == 403 and cross.json()["error"] == "foreign_origin"
    assert api.http.get("/receipts/../kiosk.db").status_code == 404


def test_cardhost_demo_role_kiosk(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "clearinghost.cli", "demo", "--role", "kiosk",
         "--data-dir", str(tmp_path / "demo")],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    out = result.stdout
    assert result.returncode == 0, result.stderr[-3000:] + out[-3000:]
    assert "kiosk page: http://127.0.0.1:" in out
    assert "[ok]      cash top-up 70.00: loaded, balance 75.00 yuan" in out
    assert "[ok]      voucher top-up 50.00 (他充): loaded, balance 125.00 yuan" in out
    assert "[ok]      pending load 30.00: loaded, balance 155.00 yuan" in out
    assert "[ok]      water bill 42.50 (一帐通): bill_paid_ok, balance 112.50 yuan" in out
    assert "bill W-2026-11-0001 at the host: paid" in out


def test_cardagent_kiosk_command_serves_the_page_and_loads(tmp_path: Path) -> None:
    """``cardagent kiosk`` as a subprocess (the installed command's code path)."""

    keyset = KeySet([*demo_keyset(), *load_test_keys()])
    authority = LoadAuthority(tmp_path / "loads.db", SoftwareKeyStore(keyset), max_balance=100000)
    host = ClearingHost(SqliteStorage(tmp_path / "host.db"), HostKey.generate(), loads=authority)
    field = CardField()
    emulator = ModuleEmulator(field, {1: make_psam(keyset)}, torn_exc=CardTorn)
    _thread, reader_port = emulator.serve_tcp("127.0.0.1", 0)
    notes = SimulatedNoteAcceptor()
    data = DataDir(tmp_path / "kiosk")
    data.provision("KIOSK-0002")
    device = DeviceKey.load(data.path / DEVICE_KEY_FILE)
    host.storage.register_terminal("KIOSK-0002", device.public_key_bytes.hex())
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_file = (tmp_path / "kiosk.log").open("ab")
    try:
        with HostServer(create_app(host), log_level="critical") as server:
            process = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "--log-format", "json", "kiosk",
                 "--profile", str(DEMO_PROFILE), "--data-dir", str(data.path),
                 "--reader-url", f"socket://127.0.0.1:{reader_port}",
                 "--host-url", server.url, "--notes-url", notes.url,
                 "--listen", f"127.0.0.1:{port}"],
                cwd=REPO, stdout=subprocess.DEVNULL, stderr=log_file,
            )  # fmt: skip
            api = KioskApi(url)
            try:
                end = time.monotonic() + 120
                while True:
                    assert process.poll() is None, (tmp_path / "kiosk.log").read_text()[-3000:]
                    try:
                        if api.http.get("/api/state").status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    assert time.monotonic() < end, "cardagent kiosk did not serve within 120 s"
                    time.sleep(0.1)
                assert "kiosk.js" in api.http.get("/").text
                card = make_card("tunion", 21, keyset, balance=500)
                field.insert(card)
                api.post("/api/card")
                assert api.wait("ready", "failed")["card"]["balance"] == 500
                api.post("/api/cash")
                notes.insert(5000)
                api.wait("cash", cash__accepted=5000)
                api.post("/api/load", {"source": "cash"})
                state = api.wait("success", "failed")
                assert state["phase"] == "success", state
                assert card.balance == 5500 and [v.state for v in authority.loads()] == [
                    "completed"
                ]
            finally:
                api.close()
                process.terminate()
                assert process.wait(60) == 0
    finally:
        log_file.close()
        notes.close()
        emulator.stop()
        authority.close()
        host.storage.close()
