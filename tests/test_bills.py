"""The utility bill book at the clearing host (一帐通, issue 10): the CSV loader names every bad
line; a bill is paid only when its signed purchase record is ingested (an unresolved record
leaves it payment pending for the operator); a paid bill is refused; the kiosk's look-up and
payment routes are signed by its device key; ``cardhost bills load / list``. Storage tests run
on SQLite and PostgreSQL; the routes on a real host (uvicorn) on 127.0.0.1."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.offline_store import DeviceKey, RecordBody
from agent.offline_store.records import GENESIS_HASH, Record, seal_record
from agent.tap.load_http import SIGNATURE_HEADER, load_signed_bytes
from clearinghost import cli
from clearinghost.bills import BillBookError, parse_bills
from clearinghost.keys import HostKey
from clearinghost.operators import OPERATOR, VIEWER, Operators, add_operator
from clearinghost.server import ClearingHost, HostServer, create_app
from clearinghost.settlement import Merchant
from clearinghost.storage import PendingChangeRefused, SqliteStorage, Storage
from tests.test_sync_storage import pg, storage  # noqa: F401  (fixtures: SQLite + PostgreSQL)

KIOSK = "KIOSK-0001"
BILLS = """bill_id,account,utility,period,amount,merchant_id
W-1,110105-0001,water,2026-11,4250,WATER-01
E-1,110105-0001,electricity,2026-11,12880,POWER-01
G-1,220000-0002,gas,2026-11,6300,GAS-01
"""


def test_every_bad_line_is_named_and_nothing_loads() -> None:
    bad = (
        BILLS
        + "W-1,110105-0001,water,2026-12,100,WATER-01\n"  # duplicate id
        + "X 2,110105-0001,water,2026-12,100,WATER-01\n"  # bad id
        + "X-3,11/05,sewage,2026-12,12.50,WATER 01\n"  # account, utility, amount, merchant
        + "X-4,110105-0001,gas\n"  # columns
        + "X-5,110105-0001,heating,,0,HEAT-01\n"  # period, amount
    )
    with pytest.raises(BillBookError) as refused:
        parse_bills(bad)
    text = str(refused.value)
    assert "line 5: bill_id 'W-1' already on line 2" in text
    assert "line 6: bill_id 'X 2'" in text
    for part in ("account '11/05'", "utility 'sewage'", "amount '12.50'", "merchant_id 'WATER 01'"):
        assert part in text and "line 7" in text
    assert "line 8: 3 columns" in text
    assert "line 9: period must be" in text and "amount '0'" in text
    with pytest.raises(BillBookError, match="header"):
        parse_bills("id,account\nW-1,1\n")
    with pytest.raises(BillBookError, match="no bills"):
        parse_bills(BILLS.splitlines()[0] + "\n")
    assert [b.bill_id for b in parse_bills(BILLS)] == ["W-1", "E-1", "G-1"]


def _records(device: DeviceKey, items: list[tuple[str, int, dict[str, Any]]]) -> list[Record]:
    records: list[Record] = []
    prev = GENESIS_HASH
    for seq, (kind, amount, fields) in enumerate(items, start=1):
        record = seal_record(
            seq=seq,
            created_at=f"2026-11-30T08:00:{seq:02d}.000Z",
            terminal_id=KIOSK,
            body=RecordBody(kind, "03105170070100000001", amount, fields),
            prev_hash=prev,
            sign=device.sign,
        )
        records.append(record)
        prev = record.hash
    return records


def _paying(bill_id: str, merchant: str) -> dict[str, Any]:
    return {"pos_order": f"bill-{bill_id}", "merchant_id": merchant, "merchant_category": "utility"}


def test_a_bill_is_paid_only_by_its_ingested_record(storage: Storage) -> None:  # noqa: F811
    device = DeviceKey.generate()
    storage.register_terminal(KIOSK, device.public_key_bytes.hex())
    assert storage.load_bills(parse_bills(BILLS), "alice") == {"added": 3, "updated": 0, "kept": 0}
    assert [b["state"] for b in storage.bills("110105-0001")] == ["open", "open"]

    started = storage.start_bill_payment("W-1", KIOSK, "03105170070100000001")
    assert started["state"] == "payment_pending" and started["seq"] is None
    assert storage.start_bill_payment("W-1", KIOSK, "03105170070100000001") == started  # again
    with pytest.raises(PendingChangeRefused) as other:
        storage.start_bill_payment("W-1", "KIOSK-0002", "03105170070100000009")
    assert other.value.code == "bill_payment_pending"
    # reloading the book keeps a bill being paid as it is
    changed = BILLS.replace("4250", "9999").replace("6300", "6400")
    assert storage.load_bills(parse_bills(changed), "bob") == {"added": 0, "updated": 2, "kept": 1}
    assert storage.bill("W-1")["amount"] == 4250  # type: ignore[index]

    records = _records(
        device,
        [
            ("purchase", 4250, _paying("W-1", "WATER-01")),  # pays W-1
            ("unresolved", 12880, _paying("E-1", "POWER-01")),  # E-1: unknown outcome
            ("purchase", 100, _paying("G-1", "GAS-01")),  # the wrong amount for G-1
            ("purchase", 200, {"pos_order": "shop-7"}),  # no bill
        ],
    )
    assert storage.ingest(KIOSK, "b1", records, {}).stored == 4
    paid, pending, wrong = storage.bill("W-1"), storage.bill("E-1"), storage.bill("G-1")
    assert paid is not None and pending is not None and wrong is not None
    assert (paid["state"], paid["terminal_id"], paid["seq"]) == ("paid", KIOSK, 1)
    assert pending["state"] == "payment_pending" and "unresolved" in pending["detail"]
    assert wrong["state"] == "payment_pending" and "not the bill's 6400 fen" in wrong["detail"]
    assert [b["bill_id"] for b in storage.bills(state="payment_pending")] == ["E-1", "G-1"]

    with pytest.raises(PendingChangeRefused) as twice:
        storage.start_bill_payment("W-1", KIOSK, "03105170070100000001")
    assert twice.value.code == "bill_paid" and "already paid" in str(twice.value)
    with pytest.raises(PendingChangeRefused):
        storage.release_bill_payment("W-1", KIOSK)
    with pytest.raises(PendingChangeRefused) as unknown:
        storage.start_bill_payment("NOPE", KIOSK, "x")
    assert unknown.value.code == "unknown_bill"
    # a replayed upload changes nothing
    assert storage.ingest(KIOSK, "b1", records, {}).duplicates == 4
    assert storage.bill("W-1") == paid
    # the operator settles the unresolved record: paid
    storage.resolve_record(KIOSK, 2, "paid", "alice")
    assert storage.bill("E-1")["state"] == "paid"  # type: ignore[index]


def test_a_refused_payment_releases_the_bill(storage: Storage) -> None:  # noqa: F811
    storage.load_bills(parse_bills(BILLS), "alice")
    storage.start_bill_payment("G-1", KIOSK, "card-1")
    with pytest.raises(PendingChangeRefused):
        storage.release_bill_payment("G-1", "KIOSK-0002")  # not the terminal paying it
    released = storage.release_bill_payment("G-1", KIOSK)
    assert released["state"] == "open" and "refused" in released["detail"]
    assert storage.start_bill_payment("G-1", "KIOSK-0002", "card-2")["state"] == "payment_pending"


class Site:
    def __init__(self, root: Path) -> None:
        file = root / "operators.txt"
        self.viewer = {"Authorization": f"Bearer {add_operator(file, 'wall', VIEWER)}"}
        self.operator_token = add_operator(file, "alice", OPERATOR)
        self.operator = {"Authorization": f"Bearer {self.operator_token}"}
        self.host = ClearingHost(
            SqliteStorage(root / "host.db"),
            HostKey.generate(),
            operators=Operators.load(file, environ={}),
        )
        self.server = HostServer(create_app(self.host), log_level="critical")
        self.device = DeviceKey.generate()
        self.host.storage.register_terminal(KIOSK, self.device.public_key_bytes.hex())

    def signed(
        self, method: str, path: str, payload: dict[str, Any] | None = None, key: Any = None
    ) -> httpx.Response:
        body = b"" if payload is None else json.dumps(payload).encode()
        signature = (key or self.device).sign(load_signed_bytes(KIOSK, method, path, body))
        headers = {SIGNATURE_HEADER: signature.hex()}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        return httpx.request(
            method, self.server.url + path, content=body or None, headers=headers, timeout=30
        )


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    site = Site(tmp_path)
    with site.server:
        yield site
    site.host.storage.close()


def test_routes_load_look_up_and_pay_signed(site: Site) -> None:
    admin = site.server.url + "/v1/admin/bills"
    assert httpx.post(admin, json={"csv": BILLS}).status_code == 401
    assert httpx.post(admin, json={"csv": BILLS}, headers=site.viewer).status_code == 403
    bad = httpx.post(admin, json={"csv": BILLS + "X,1,lava,1,1,M\n"}, headers=site.operator)
    assert bad.status_code == 422 and bad.json()["error"] == "bad_bills"
    assert "line 5" in bad.json()["detail"] and site.host.storage.bills() == []
    loaded = httpx.post(admin, json={"csv": BILLS}, headers=site.operator)
    assert loaded.json() == {"added": 3, "updated": 0, "kept": 0}

    path = f"/v1/terminals/{KIOSK}/bills/110105-0001"
    unsigned = httpx.get(site.server.url + path)
    assert unsigned.status_code == 401 and unsigned.json()["error"] == "bad_signature"
    assert site.signed("GET", path, key=DeviceKey.generate()).status_code == 401
    found = site.signed("GET", path)
    assert found.status_code == 200
    assert [b["bill_id"] for b in found.json()["bills"]] == ["E-1", "W-1"]
    assert site.signed("GET", f"/v1/terminals/{KIOSK}/bills/11.05").status_code == 400

    pay = f"/v1/terminals/{KIOSK}/bills/W-1/payment"
    started = site.signed("POST", pay, {"action": "start", "card_id": "0310"})
    assert started.status_code == 200 and started.json()["state"] == "payment_pending"
    assert site.signed("POST", pay, {"action": "pay", "card_id": "0310"}).status_code == 400
    missing = site.signed("POST", f"/v1/terminals/{KIOSK}/bills/NOPE/payment",
                          {"action": "start", "card_id": "0310"})  # fmt: skip
    assert missing.status_code == 404 and missing.json()["error"] == "unknown_bill"
    records = _records(site.device, [("purchase", 4250, _paying("W-1", "WATER-01"))])
    site.host.storage.ingest(KIOSK, "b1", records, {})
    again = site.signed("POST", pay, {"action": "start", "card_id": "0310"})
    assert again.status_code == 409 and again.json()["error"] == "bill_paid"
    listed = httpx.get(admin + "?state=paid", headers=site.viewer).json()["bills"]
    assert [(b["bill_id"], b["seq"]) for b in listed] == [("W-1", 1)]
    assert httpx.get(admin + "?state=gone", headers=site.viewer).status_code == 400


def test_cardhost_bills_load_and_list(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = tmp_path / "token"
    token.write_text(site.operator_token + "\n")
    bad = tmp_path / "bad.csv"
    bad.write_text(BILLS + "W-9,110105-0001,water,2026-11,-5,WATER-01\n", encoding="utf-8")
    good = tmp_path / "bills.csv"
    good.write_text(BILLS, encoding="utf-8")
    base = ["--host", site.server.url, "--token-file", str(token)]
    assert cli.main(["bills", *base, "load", str(bad)]) == 2
    assert "line 5: amount '-5'" in capsys.readouterr().err
    assert cli.main(["bills", *base, "load", str(good)]) == 0
    assert "3 bills added" in capsys.readouterr().err
    site.host.storage.start_bill_payment("E-1", KIOSK, "0310")
    assert cli.main(["bills", *base, "list", "--state", "payment_pending"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("bill_id\t") and len(out) == 2
    assert out[1].startswith("E-1\t110105-0001\telectricity\t2026-11\t12880\tpayment_pending\t")
    assert cli.main(["bills", *base, "list"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 4


def test_utility_bills_clear_with_the_agency_commission(site: Site) -> None:
    """A bill's purchase names its utility as merchant: the clearing takes the utility
    category's commission (not a fee). A kiosk collects for every utility of the bill book
    without being bound to any of them: a purchase is paid to a utility because it is the
    recorded payment of that utility's bill; another purchase naming a utility is not."""
    site.host.storage.load_merchants(
        [
            Merchant("WATER-01", "City Water", "utility", "6222000000000001"),
            Merchant("POWER-01", "City Power", "utility", "6222000000000002"),
        ],
        "alice",
    )
    site.host.storage.load_bills(parse_bills(BILLS), "alice")
    records = _records(
        site.device,
        [
            ("purchase", 4250, _paying("W-1", "WATER-01")),
            ("purchase", 12880, _paying("E-1", "POWER-01")),
            # names the water company but pays no bill: the kiosk is bound to nobody
            ("purchase", 999, {**_paying("none", "WATER-01"), "pos_order": "A-7"}),
        ],
    )
    site.host.storage.ingest(KIOSK, "b1", records, {})
    answer = httpx.post(
        site.server.url + "/v1/admin/clearing/2026-11-30", json={}, headers=site.operator
    )
    assert answer.status_code in (200, 201), answer.text
    lines = {line["merchant_id"]: line for line in answer.json()["merchants"]}
    assert sorted(lines) == ["POWER-01", "WATER-01"]
    for merchant, amount in (("WATER-01", 4250), ("POWER-01", 12880)):
        line = lines[merchant]
        assert (line["purchases"], line["fee"]) == (amount, 0), line
        assert line["commission"] == round(amount * line["rate_bp"] / 10000) > 0
    unbound = [a for a in site.host.storage.anomalies(KIOSK) if a["kind"] == "merchant_not_bound"]
    assert [a["seq"] for a in unbound] == [3]


def test_a_bill_book_with_a_lone_carriage_return_is_refused_by_line() -> None:
    """Found by the fuzzer: a lone carriage return inside a field was a 500 at the host (an
    uncaught csv.Error); it now ends a line like any newline, and the book is refused."""
    with pytest.raises(BillBookError, match="line 1: the header must be"):
        parse_bills("\r\u00b6\u0011t")
