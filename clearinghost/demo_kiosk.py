"""``cardhost demo --role kiosk``: the kiosk (信息亭) against simulated cards.

The reference clearing host (HTTP on 127.0.0.1, SQLite, load authority with the software key
store and test keys) with a bill book, a voucher and a pending load; the simulated card field
and PSAM behind the emulated serial reader module (the agent reaches them only through the
serial-module driver); a simulated note acceptor on a TCP socket; ``cardagent kiosk``'s service
and page on 127.0.0.1; the sync daemon uploading the kiosk's records. A scripted session goes
through the kiosk's JSON API, as the page does: a cash top-up, a voucher top-up, a pending load
and a utility bill payment (paid at the host once its signed record is uploaded). With
``--serve`` it stays up until Ctrl-C so a person can use the page (the card stays on the reader;
the simulated customer feeds two 10-yuan notes whenever the page asks for cash).

:class:`KioskSite` is the same assembly for the tests (any host storage: SQLite or PostgreSQL).
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from agent.crypto import Algorithm
from agent.kiosk.cli import Kiosk, build_kiosk
from agent.kiosk.http import KioskHttpServer, serve_in_thread
from agent.offline_store import DeviceKey, OfflineStore
from agent.profile import load_profile
from agent.sam.keys import KeySet
from agent.wiring import DEVICE_KEY_FILE, DataDir, Hardware, open_hardware
from clearinghost.bills import parse_bills
from clearinghost.keys import HostKey
from clearinghost.keystore import SoftwareKeyStore, load_test_keys
from clearinghost.loads import LoadAuthority
from clearinghost.operators import OPERATOR, Operators, new_token
from clearinghost.server import ClearingHost, HostServer, create_app
from clearinghost.settlement import Merchant
from clearinghost.storage import SqliteStorage, Storage
from sync.daemon import SyncDaemon, SyncSettings, open_daemon
from tests.fake_reader.cpu_card import SimulatedCpuCard
from tests.fake_reader.faults import CardTorn
from tests.fake_reader.inprocess import CardField
from tests.fake_reader.module_server import ModuleEmulator
from tests.fake_reader.note_acceptor import SimulatedNoteAcceptor
from tests.fake_reader.scenario import DEMO_PROFILE, demo_keyset, make_card, make_psam

KIOSK_ID = "KIOSK-0001"
DEMO_BILLS = """bill_id,account,utility,period,amount,merchant_id
W-2026-11-0001,110105-0001,water,2026-11,4250,WATER-01
E-2026-11-0001,110105-0001,electricity,2026-11,12880,POWER-01
G-2026-11-0001,110105-0001,gas,2026-11,6300,GAS-01
H-2026-Q4-0001,110105-0001,heating,2026 Q4,30000,HEAT-01
"""
UTILITIES = (
    Merchant("WATER-01", "City Water 自来水公司", "utility", "6222000000000001"),
    Merchant("POWER-01", "City Power 供电公司", "utility", "6222000000000002"),
    Merchant("GAS-01", "City Gas 燃气公司", "utility", "6222000000000003"),
    Merchant("HEAT-01", "City Heating 热力公司", "utility", "6222000000000004"),
)


class KioskSite:
    """Host + card field + note acceptor + kiosk (service, page, sync daemon), in process."""

    def __init__(
        self,
        root: Path,
        storage: Storage | None = None,
        *,
        note_timeout_s: float = 3.0,
        card_wait_s: float = 60.0,
        put_back_wait_s: float = 120.0,
    ) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.profile = load_profile(DEMO_PROFILE)
        self.keyset = KeySet([*demo_keyset(self.profile), *load_test_keys()])
        self._closers: list[Any] = []
        try:
            self._open(storage, note_timeout_s, card_wait_s, put_back_wait_s)
        except BaseException:
            self.close()
            raise

    def _open(
        self,
        storage: Storage | None,
        note_timeout_s: float,
        card_wait_s: float,
        put_back_wait_s: float,
    ) -> None:
        self.storage = storage or SqliteStorage(self.root / "host.db")
        self._closers.append(self.storage.close)
        self.authority = LoadAuthority(
            self.root / "loads.db",
            SoftwareKeyStore(
                self.keyset, apdu_order_card_first=self.profile.factor_order_card_first
            ),
            max_balance=self.profile.max_balance,
        )
        self._closers.append(self.authority.close)
        self.host_key = HostKey.generate()
        self.operator_token = new_token()
        self.host = ClearingHost(
            self.storage,
            self.host_key,
            operators=Operators.with_token("kiosk-demo", OPERATOR, self.operator_token),
            loads=self.authority,
        )
        self.server = HostServer(create_app(self.host), log_level="critical").start()
        self._closers.append(self.server.stop)
        self.field = CardField()
        self.psam = make_psam(self.keyset)
        self.emulator = ModuleEmulator(self.field, {1: self.psam}, torn_exc=CardTorn)
        _thread, port = self.emulator.serve_tcp("127.0.0.1", 0)
        self._closers.append(self.emulator.stop)
        self.notes = SimulatedNoteAcceptor()
        self._closers.append(self.notes.close)
        self.data_dir = DataDir(self.root / "kiosk")
        if not self.data_dir.path.exists():
            self.data_dir.provision(KIOSK_ID)
        device = DeviceKey.load(self.data_dir.path / DEVICE_KEY_FILE)
        self.storage.register_terminal(KIOSK_ID, device.public_key_bytes.hex())
        self.store: OfflineStore = self.data_dir.open_store()
        self._closers.append(self.store.close)
        self.hardware: Hardware = open_hardware(
            self.profile, self.data_dir, f"socket://127.0.0.1:{port}"
        )
        self._closers.append(self.hardware.close)
        self.kiosk: Kiosk = build_kiosk(
            self.profile,
            self.data_dir,
            self.store,
            self.hardware,
            self.server.url,
            self.notes.url,
            card_wait_s=card_wait_s,
            note_timeout_s=note_timeout_s,
            put_back_wait_s=put_back_wait_s,
        )
        self._closers.append(self.kiosk.close)
        self.http: KioskHttpServer = serve_in_thread(self.kiosk.service)
        self._closers.append(self.http.server_close)
        self._closers.append(self.http.shutdown)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/"
        self.daemon: SyncDaemon = open_daemon(
            self.data_dir.path,
            SyncSettings(
                self.server.url, self.host_key.public_key_bytes, compact_after_s=None, timeout_s=10
            ),
        )
        self._closers.append(self.daemon.close)

    # -- what the operator and the customers do -------------------------------------------

    def load_bills(self, text: str = DEMO_BILLS) -> None:
        self.storage.load_merchants(UTILITIES, "kiosk-demo")
        self.storage.load_bills(parse_bills(text), "kiosk-demo")

    def card(
        self, number: int, balance: int = 500, algorithm: Algorithm = Algorithm.TDES
    ) -> SimulatedCpuCard:
        return make_card("tunion", number, self.keyset, balance=balance, algorithm=algorithm)

    def upload(self) -> int:
        """Send the kiosk's records to the host now (what the sync daemon does on its own)."""
        return self.daemon.upload_pending().records

    def close(self) -> None:
        while self._closers:
            closer = self._closers.pop()
            try:
                closer()
            except Exception as exc:  # noqa: BLE001 - closing the rest matters more
                print(f"kiosk demo: closing {closer}: {exc}")


class KioskApi:
    """What the page does, over the kiosk's JSON API (httpx; hang-bounded waits)."""

    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=30.0)

    def post(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        answer = self.http.post(path, json=body or {})
        data: dict[str, Any] = answer.json()
        if answer.status_code != 200:
            raise RuntimeError(f"kiosk {path}: {answer.status_code} {data}")
        return data

    def state(self) -> dict[str, Any]:
        data: dict[str, Any] = self.http.get("/api/state").json()
        return data

    def wait(self, *phases: str, bound_s: float = 120.0, **match: Any) -> dict[str, Any]:
        end = time.monotonic() + bound_s
        while True:
            state = self.state()
            settled = not state["busy"] or state["phase"] in ("put_back", "cash", "waiting_card")
            if (
                state["phase"] in phases
                and settled
                and all(_dig(state, k) == v for k, v in match.items())
            ):
                return state
            if time.monotonic() > end:
                raise RuntimeError(f"kiosk never reached {phases} {match}: {state}")
            time.sleep(0.05)

    def close(self) -> None:
        self.http.close()


def _dig(state: dict[str, Any], dotted: str) -> Any:
    value: Any = state
    for part in dotted.split("__"):
        if isinstance(value, list) and part.isdigit():
            value = value[int(part)] if int(part) < len(value) else None
        else:
            value = value.get(part) if isinstance(value, dict) else None
    return value


def _yuan(fen: int) -> str:
    return f"{fen / 100:.2f}"


def run_kiosk_demo(data_dir: Path, *, serve: bool = False) -> int:
    if data_dir.exists():
        shutil.rmtree(data_dir)
    site = KioskSite(data_dir, note_timeout_s=5.0)
    api = KioskApi(site.url)
    try:
        site.load_bills()
        site.authority.add_voucher("GIFT-2026-0001", 5000)
        card = site.card(1, balance=500)
        asn = card.asn.hex().upper()
        site.authority.credit(asn, 3000, "employer", "kiosk-demo", pending_id="EMP-2026-11-01")
        print(f"clearing host on {site.server.url} (loads, bills, vouchers, pending loads)")
        print(f"kiosk page: {site.url}")
        site.field.insert(card)
        print(f"card {card.asn.hex().upper()} on the reader, balance {_yuan(card.balance)} yuan")

        api.post("/api/card")
        state = api.wait("ready", "failed")
        print(f"[read]    balance {_yuan(state['card']['balance'])}; pending loads: "
              f"{[(p['pending_id'], p['amount']) for p in state['pending']]}")  # fmt: skip

        api.post("/api/cash")
        for note in (2000, 5000):
            site.notes.insert(note)
        api.wait("cash", cash__accepted=7000)
        api.post("/api/load", {"source": "cash"})
        state = _done(api, "cash top-up 70.00")

        api.post("/api/reset")
        api.post("/api/load", {"source": "voucher", "amount": 5000, "code": "GIFT-2026-0001"})
        state = _done(api, "voucher top-up 50.00 (他充)")

        api.post("/api/reset")
        api.post("/api/card")
        api.wait("ready", "failed")
        api.post("/api/load", {"source": "pending", "pending_id": "EMP-2026-11-01"})
        state = _done(api, "pending load 30.00")

        api.post("/api/reset")
        bills = api.post("/api/bills/lookup", {"account": "110105-0001"})["bills"]
        print("[bills]   " + ", ".join(f"{b['bill_id']} {_yuan(b['amount'])} {b['state']}"
                                      for b in bills))  # fmt: skip
        api.post("/api/bills/pay", {"bill_id": "W-2026-11-0001"})
        state = _done(api, "water bill 42.50 (一帐通)")
        print("[receipt] " + state["receipt"]["text"].replace("\n", "\n          "))
        uploaded = site.upload()
        bill = site.storage.bill("W-2026-11-0001")
        assert bill is not None
        print(f"[sync]    {uploaded} records uploaded; bill W-2026-11-0001 at the host: "
              f"{bill['state']} ({bill['detail']})")  # fmt: skip
        loads = site.authority.loads()
        print("[host]    loads: " + ", ".join(f"{v.load_key} {v.amount} {v.state}" for v in loads))
        print(f"card balance now {_yuan(card.balance)} yuan; receipts in "
              f"{site.data_dir.path / 'receipts'}")  # fmt: skip
        api.post("/api/reset")
        if serve:
            _serve(site)
    finally:
        api.close()
        site.close()
    return 0


def _done(api: KioskApi, what: str) -> dict[str, Any]:
    state = api.wait("success", "failed")
    if state["phase"] != "success":
        raise RuntimeError(f"{what}: {state['message']} {state['detail']}")
    balance = state["card"]["balance"] if state.get("card") else None
    shown = "?" if balance is None else _yuan(balance)
    print(f"[ok]      {what}: {state['message']}, balance {shown} yuan")
    return state


def _serve(site: KioskSite) -> None:
    """Until Ctrl-C: the page is live; a simulated customer feeds notes when asked."""
    stop = threading.Event()

    def customer() -> None:
        while not stop.is_set():
            if site.notes.enabled.wait(0.5) and not stop.is_set():
                time.sleep(1.0)
                site.notes.insert(1000)
                time.sleep(0.5)
                site.notes.insert(1000)
                while site.notes.enabled.is_set() and not stop.is_set():
                    time.sleep(0.2)

    threading.Thread(target=customer, name="demo-customer", daemon=True).start()
    print(f"\nserving the kiosk page on {site.url} — open it in a browser; Ctrl-C to stop")
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("stopping")
    finally:
        stop.set()
