"""``cardhost demo --role pos``: a shop counter session, from the card on the reader to the
merchant's settlement line.

Three real processes' worth of the system: the reference clearing host (HTTP on 127.0.0.1) and
the sync daemon in this process, as in the bus demo; ``cardagent pos`` as a subprocess, serving
the POS API on 127.0.0.1 and reaching the simulated card field (CPU cards + PSAM behind the
emulated serial reader module, on ``socket://127.0.0.1:PORT``) only through the serial-module
driver. This process plays the customer (it puts cards on the reader and pulls one away
mid-debit) and the shop's POS software (httpx). At the end the daemon has uploaded the
terminal's records and the host clears the day for the shop's merchant.
"""

from __future__ import annotations

import dataclasses
import shutil
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from agent.errors import ConfigurationError
from agent.offline_store import OfflineStore
from agent.offline_store.device_key import verify_signature
from agent.profile import load_profile
from agent.wiring import DataDir
from clearinghost.local import LocalSync, start_local_sync
from clearinghost.settlement import business_day, city_zone, signed_message

REPO = Path(__file__).resolve().parent.parent
PROFILE = REPO / "firmware_profiles" / "test-city-demo.toml"
TERMINAL_ID = "SHOP-0001"
MERCHANT_ID = "M-DEMO-01"
MERCHANT_LINE = f"{MERCHANT_ID},Demo Noodle House,dining,6222000011112222"
TIME_ZONE = "Asia/Shanghai"
SERVE_BOUND_S = 60.0
UPLOAD_BOUND_S = 60.0


def run_pos_demo(data_dir: Path, seed: int = 7) -> int:
    """The shop counter session; exit code 0 when every step gave the expected answer."""
    if not (REPO / "tests" / "fake_reader" / "module_server.py").is_file():
        raise ConfigurationError("the demo needs a source checkout (tests/fake_reader)")
    # the simulators live in the source tree's tests/, never in the installed host
    from tests.fake_reader.faults import CardTorn
    from tests.fake_reader.inprocess import CardField
    from tests.fake_reader.module_server import ModuleEmulator
    from tests.fake_reader.scenario import demo_keyset, make_psam

    if data_dir.exists():
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True)
    device = DataDir(data_dir)
    device.provision(TERMINAL_ID)
    profile_path = data_dir / "profile.toml"
    profile_path.write_text(
        PROFILE.read_text(encoding="utf-8")
        + f'\n[merchant]\nid = "{MERCHANT_ID}"\ncategory = "dining"\n',
        encoding="utf-8",
    )
    profile = load_profile(profile_path)
    keys = demo_keyset(profile)
    field = CardField()
    emulator = ModuleEmulator(field, {1: make_psam(keys)}, torn_exc=CardTorn)
    _thread, field_port = emulator.serve_tcp("127.0.0.1", 0)
    local = start_local_sync(data_dir, profile=profile, upload_interval_s=1.0)
    pos_process: subprocess.Popen[bytes] | None = None
    try:
        _register_merchant(local)
        print(
            f"clearing host on {local.url}; merchant {MERCHANT_ID} (dining) in its register, "
            f"terminal {TERMINAL_ID} bound to it"
        )
        port = _free_port()
        pos_process = _start_pos(profile_path, data_dir, f"socket://127.0.0.1:{field_port}", port)
        pos_url = f"http://127.0.0.1:{port}"
        _wait_until_serving(pos_url, pos_process)
        print(
            f"simulated reader module + PSAM on socket://127.0.0.1:{field_port}; "
            f"cardagent pos serving {pos_url} (a separate process)\n"
        )
        counter = Counter(pos_url, field, keys, seed)
        ok = counter.session()
    finally:
        if pos_process is not None:
            pos_process.terminate()
            try:
                pos_process.wait(30)
            except subprocess.TimeoutExpired:
                pos_process.kill()
                pos_process.wait(10)
    try:
        ok = _upload_and_clear(local, device) and ok
    finally:
        local.stop()
        emulator.stop()
    print(f"inspect: cardagent records list --db {device.store_path}")
    return 0 if ok else 1


def _register_merchant(local: LocalSync) -> None:
    """What the operator does once for a new shop: the register line, then the binding."""
    headers = {"Authorization": f"Bearer {local.operator_token}"}
    for path, body in (
        ("/v1/admin/merchants", "merchant_id,name,category,settlement_account\n" + MERCHANT_LINE),
        ("/v1/admin/merchant-terminals", f"terminal_id,merchant_id\n{TERMINAL_ID},{MERCHANT_ID}"),
    ):
        answer = httpx.post(f"{local.url}{path}", json={"csv": body}, headers=headers, timeout=10)
        answer.raise_for_status()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_pos(profile: Path, data_dir: Path, reader: str, port: int) -> subprocess.Popen[bytes]:
    log = (data_dir / "pos.log").open("ab")
    try:
        return subprocess.Popen(  # noqa: S603 - our own interpreter and module, fixed arguments
            [
                sys.executable, "-m", "agent.cli", "--log-format", "json", "pos",
                "--profile", str(profile), "--data-dir", str(data_dir),
                "--reader-url", reader, "--listen", f"127.0.0.1:{port}",
            ],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )  # fmt: skip
    finally:
        log.close()


def _wait_until_serving(url: str, process: subprocess.Popen[bytes]) -> None:
    end = time.monotonic() + SERVE_BOUND_S
    while time.monotonic() < end:
        if process.poll() is not None:
            raise ConfigurationError(f"cardagent pos exited with {process.returncode} (pos.log)")
        try:
            if httpx.get(f"{url}/v1/transactions", timeout=5.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise ConfigurationError(f"cardagent pos did not serve within {SERVE_BOUND_S:g} s")


def yuan(fen: int | None) -> str:
    return "-" if fen is None else f"{fen / 100:.2f}"


class Counter:
    """The shop counter: the customer's cards on the reader and the POS software's requests."""

    def __init__(self, url: str, field: Any, keys: Any, seed: int) -> None:
        from tests.fake_reader.scenario import make_card

        self.http = httpx.Client(base_url=url, timeout=httpx.Timeout(90.0))
        self.field = field
        number = 30 + seed % 10
        self.alice = make_card("tunion", number, keys, balance=5_000)
        self.bob = make_card("cjt166", number + 1, keys, balance=300)
        self.carol = make_card("legacy1001", number + 2, keys, balance=4_000)
        self.problems: list[str] = []

    def check(self, condition: bool, what: str) -> None:
        if not condition:
            self.problems.append(what)
            print(f"     !! unexpected: {what}")

    def purchase(self, order: str, amount: int, note: str = "") -> dict[str, Any]:
        answer = self.http.post(
            "/v1/purchases", json={"order_id": order, "amount": amount, "wait_s": 10}
        )
        body: dict[str, Any] = answer.json()
        if answer.status_code != 200:
            print(
                f"POS  POST /v1/purchases {order:<6} {yuan(amount):>7}  -> HTTP "
                f"{answer.status_code} {body.get('error')}: {body.get('detail')}"
            )
            return {"http": answer.status_code, **body}
        moved = {True: "yes", False: "no"}.get(body["money_moved"], "unknown yet")
        line = (
            f"POS  POST /v1/purchases {order:<6} {yuan(amount):>7}  -> {body['status']:<10} "
            f"money moved: {moved:<11}"
        )
        if body["status"] == "paid":
            line += f" balance {yuan(body['balance_after'])}  record #{body['record_seq']}"
        if body["reason"]:
            line += f" {body['reason']}"
        print(line + (f"\n     ({note})" if note else ""))
        return body

    def card(self) -> dict[str, Any]:
        body: dict[str, Any] = self.http.get("/v1/card", params={"wait_s": 10}).json()
        print(
            f"POS  GET  /v1/card                   -> card {body.get('card_id')} "
            f"{body.get('product')}, balance {yuan(body.get('balance'))}, {body.get('status')}"
        )
        return body

    def session(self) -> bool:
        from tests.fake_reader.scenario import TearOnDebit

        print("customer 1 puts a T-Union card on the reader")
        self.field.insert(self.alice)
        info = self.card()
        self.check(info.get("balance") == 5_000, "the card reads 50.00")
        first = self.purchase("A1001", 1_250)
        self.check(first.get("status") == "paid", "A1001 paid")
        again = self.purchase(
            "A1001", 1_250, "the POS timed out and sent the same order again: same answer, "
            "same record, the card was debited once"
        )  # fmt: skip
        self.check(again.get("record_seq") == first.get("record_seq"), "A1001 one record")
        self.check(self.alice.balance == 3_750, "A1001 debited once")
        over = self.purchase("A1002", 60_000)
        self.check(over.get("error") == "amount_out_of_range", "over the per-purchase limit")
        self.field.remove()

        print("\ncustomer 2 puts a CJ/T 166 card holding 3.00 on the reader")
        self.field.insert(self.bob)
        short = self.purchase("B2001", 1_000)
        self.check(
            short.get("status") == "refused" and "insufficient_balance" in short.get("reason", ""),
            "B2001 refused for the balance",
        )
        self.field.remove()

        print("\ncustomer 3 pulls the card away in the middle of the debit")
        self.field.insert(TearOnDebit(self.carol, "tear_after"))
        torn = self.purchase("C3001", 800, "the card committed the debit, its answer was lost")
        self.check(torn.get("status") == "pending", "C3001 pending")
        self.field.remove()
        asked = self.http.get("/v1/orders/C3001").json()
        print(f"POS  GET  /v1/orders/C3001           -> {asked['status']}: {asked['message']}")
        print("customer 3 presents the same card again; the cashier sends the same order")
        self.field.insert(self.carol)
        settled = self.purchase(
            "C3001", 800, "the journal proved the torn debit from the card: paid once, "
            "not charged again"
        )  # fmt: skip
        self.check(settled.get("status") == "paid", "C3001 paid after re-presentation")
        self.check(self.carol.balance == 3_200, "C3001 debited exactly once")
        self.field.remove()

        print("\ncustomer 1 brings the noodles back: a partial refund of order A1001")
        refund = self.http.post(
            "/v1/refunds", json={"refund_id": "R-A1001-1", "order_id": "A1001", "amount": 250}
        ).json()
        print(
            f"POS  POST /v1/refunds R-A1001-1  {yuan(250):>7}  -> {refund.get('status')}, "
            f"money moved: no, record #{refund.get('record_seq')}\n     ({refund.get('message')})"
        )
        self.check(refund.get("status") == "requested", "refund requested")

        listed = self.http.get("/v1/transactions", params={"limit": 10}).json()["transactions"]
        print("\nPOS  GET  /v1/transactions (newest first)")
        for t in listed:
            print(
                f"     #{t['seq']:<3} {t['kind']:<15} {t['card_id']:<22} {yuan(t['amount']):>7}"
                f"  order {t.get('order_id') or '-'}"
            )
        self.check(
            [t["kind"] for t in listed] == ["refund_request", "purchase", "purchase"],
            "three records",
        )
        self.http.close()
        return not self.problems


def _upload_and_clear(local: LocalSync, device: DataDir) -> bool:
    with OfflineStore.open_for_reading(device.store_path) as store:
        report = store.verify()
        records = list(store.records())
    end = time.monotonic() + UPLOAD_BOUND_S
    while local.records_at_host() < len(records) and time.monotonic() < end:
        time.sleep(0.2)
    held = local.records_at_host()
    print(
        f"\n[sync] the clearing host holds {held} of the terminal's {len(records)} records "
        f"(chain {'verified' if report.ok else 'BROKEN'})"
    )
    if held < len(records) or not report.ok:
        return False
    zone = city_zone(TIME_ZONE)
    days = sorted({business_day(r.created_at, zone) for r in records})
    # Tonight, once the day is over in the city, the host clears it: the demo runs that now.
    after = datetime.combine(days[-1], datetime.min.time(), tzinfo=zone).timestamp() + 86_400 * 1.5
    clearing = dataclasses.replace(local.host.merchant_clearing(), clock=lambda: after)
    ok = True
    for day in days:
        _created, answer = clearing.clear(day.isoformat(), "demo")
        ok = _print_settlement(answer, clearing) and ok
    return ok


def _print_settlement(answer: dict[str, Any], clearing: Any) -> bool:
    day = answer["day"]
    stored = clearing.stored(day, answer["version"])
    signed = verify_signature(
        clearing.key.public_key_bytes,
        bytes.fromhex(stored["signature"]),
        signed_message(stored["content"].encode("utf-8")),
    )
    print(
        f"\nmerchant clearing of {day} ({TIME_ZONE}), version {answer['version']}, settlement "
        f"file signed by the host key: {'verified' if signed else 'BAD SIGNATURE'}"
    )
    for m in answer["merchants"]:
        print(
            f"  merchant {m['merchant_id']} {m['name']} ({m['category']}): "
            f"{m['count']} purchases {yuan(m['purchases'])}, fee {m['rate_bp'] / 100:.2f} % "
            f"{yuan(m['fee'])}, net {yuan(m['net'])} to account {m['settlement_account']}"
        )
    for a in answer["apart"]:
        print(
            f"  apart    {a['line']:<11} {a['terminal_id']}/{a['seq']} {yuan(a['amount'])} "
            f"merchant {a['merchant_id']} {a['reference']}"
        )
    t = answer["totals"]
    reconciles = t["purchases"] == t["net"] + t["fees"] + t["commissions"]
    print(
        f"  totals   purchases {yuan(t['purchases'])} = net {yuan(t['net'])} + fees "
        f"{yuan(t['fees'])} + commissions {yuan(t['commissions'])}: "
        f"{'reconciles' if reconciles else 'DOES NOT RECONCILE'}; credits owed to card "
        f"holders {yuan(t['credits_owed'])}"
    )
    print("  settlement file:")
    for line in stored["content"].splitlines():
        print(f"    {line}")
    return signed and reconciles
