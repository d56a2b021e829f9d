"""The POS plugin (issue 11) against real stacks: httpx against a real ``cardagent pos`` HTTP
server (in-process thread, or a subprocess for the kill -9 tests), the serial reader module
emulator over TCP with the simulated card and PSAM behind the real serial driver, real SQLite.

Every answer says whether money moved; an order id is debited at most once, whatever happens
to the card, the POS or the agent. No assertion depends on timing: waits are bounded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.errors import ConfigurationError
from agent.offline_store import OfflineStore
from agent.profile import load_profile, parse_profile
from agent.wiring import DataDir
from tests.fake_reader.cpu_card import SimulatedCpuCard
from tests.fake_reader.scenario import (
    DEMO_PROFILE,
    m1_layout,
    m1_purse_of,
    make_card,
    make_m1_card,
)
from tests.pos_stack import (
    TERMINAL_ID,
    Field,
    PosClient,
    PosStack,
    free_port,
    start_pos,
    wait_until_serving,
    write_profile,
)

BALANCE = 5000
AMOUNT = 1234


@pytest.fixture
def field() -> Iterator[Field]:
    f = Field()
    yield f
    f.close()


@pytest.fixture
def stack(tmp_path: Path, field: Field) -> Iterator[PosStack]:
    s = PosStack(tmp_path, field)
    yield s
    s.close()


def asn(card: SimulatedCpuCard) -> str:
    """The card's ASN in hex: the end of its card id (the application serial)."""
    return card.asn.hex().upper()


def purchases(stack: PosStack, order_id: str | None = None) -> list[Any]:
    return [
        r
        for r in stack.store.records()
        if r.kind == "purchase" and (order_id is None or r.fields.get("pos_order") == order_id)
    ]


# --- paid, idempotent, refused -----------------------------------------------------------


@pytest.mark.parametrize("family", ["tunion", "cjt166", "legacy1001"])
def test_paid_once_and_the_record_names_the_order(
    stack: PosStack, field: Field, family: str
) -> None:
    card = make_card(family, 1, field.keyset, balance=BALANCE)  # type: ignore[arg-type]
    field.present(card)
    answer = stack.pos.purchase("ORD-1", AMOUNT).json()
    assert answer["status"] == "paid" and answer["money_moved"] is True, answer
    assert answer["balance_after"] == BALANCE - AMOUNT
    assert card.balance == BALANCE - AMOUNT and len(card.debits) == 1
    (record,) = purchases(stack, "ORD-1")
    assert record.seq == answer["record_seq"] and record.amount == AMOUNT
    assert stack.store.verify().ok


def test_same_order_twice_debits_once(stack: PosStack, field: Field) -> None:
    """The card stays on the reader and the POS sends the order again (a timeout, a double
    click): the same answer, no second debit."""
    card = make_card("tunion", 1, field.keyset, balance=BALANCE)
    field.present(card)
    first = stack.pos.purchase("ORD-2", AMOUNT).json()
    again = stack.pos.purchase("ORD-2", AMOUNT).json()
    assert first["status"] == again["status"] == "paid"
    assert first["record_seq"] == again["record_seq"]
    assert len(card.debits) == 1 and card.balance == BALANCE - AMOUNT
    assert stack.pos.order("ORD-2").json()["record_seq"] == first["record_seq"]


def test_same_order_other_amount_is_refused(stack: PosStack, field: Field) -> None:
    card = make_card("tunion", 1, field.keyset, balance=BALANCE)
    field.present(card)
    assert stack.pos.purchase("ORD-3", AMOUNT).json()["status"] == "paid"
    answer = stack.pos.purchase("ORD-3", AMOUNT + 1)
    assert answer.status_code == 409
    assert answer.json()["error"] == "order_amount_mismatch"
    assert len(card.debits) == 1


def test_same_order_other_amount_before_any_card(stack: PosStack, field: Field) -> None:
    """A refused order (no card) keeps its amount: the order id names one purchase."""
    answer = stack.pos.purchase("ORD-3b", AMOUNT).json()
    assert answer["status"] == "refused" and answer["reason"].startswith("no_card")
    assert stack.pos.purchase("ORD-3b", 99).status_code == 409


def test_insufficient_balance_is_refused_then_a_retry_pays(stack: PosStack, field: Field) -> None:
    poor = make_card("cjt166", 2, field.keyset, balance=AMOUNT - 1)
    field.present(poor)
    answer = stack.pos.purchase("ORD-4", AMOUNT).json()
    assert answer["status"] == "refused" and answer["money_moved"] is False
    assert answer["reason"].startswith("insufficient_balance"), answer
    assert not poor.debits and not purchases(stack)
    field.take_away()
    rich = make_card("cjt166", 3, field.keyset, balance=BALANCE)
    field.present(rich)  # the customer pays with another card: the same order id
    assert stack.pos.purchase("ORD-4", AMOUNT).json()["status"] == "paid"
    assert len(rich.debits) == 1


def test_blacklisted_card_is_refused_and_locked(stack: PosStack, field: Field) -> None:
    card = make_card("tunion", 5, field.keyset, balance=BALANCE)

    class Listed:
        def contains(self, card_id: str) -> bool:
            return card_id.endswith(asn(card))

    stack.engine.blacklist = Listed()
    field.present(card)
    answer = stack.pos.purchase("ORD-5", AMOUNT).json()
    assert answer["status"] == "refused" and answer["money_moved"] is False
    assert answer["reason"].startswith("blacklisted"), answer
    assert not card.debits
    assert [r.kind for r in stack.store.records()] == ["lock"]


def test_no_card_is_refused(stack: PosStack) -> None:
    answer = stack.pos.purchase("ORD-6", AMOUNT, wait_s=0).json()
    assert answer["status"] == "refused" and answer["money_moved"] is False
    assert answer["reason"].startswith("no_card")


# --- the card pulled at every command -------------------------------------------------


def clean_purchase_commands(stack: PosStack, field: Field, family: str) -> int:
    card = make_card(family, 90, field.keyset, balance=BALANCE)  # type: ignore[arg-type]
    field.present(card)
    card.reset_command_count()
    assert stack.pos.purchase(f"probe-{family}", AMOUNT).json()["status"] == "paid"
    count = card.command_count
    field.take_away()
    return int(count)


@pytest.mark.parametrize("family", ["tunion", "cjt166"])
@pytest.mark.parametrize("mode", ["tear_before", "tear_after"])
def test_card_pulled_at_each_command(stack: PosStack, field: Field, family: str, mode: str) -> None:
    """The card leaves at command n (before or after its commit): the POS is told the truth
    (``pending`` once the intent is durable, else ``refused``), and after the card is
    presented again with the same order id the order is paid with exactly one debit."""
    commands = clean_purchase_commands(stack, field, family)
    assert commands >= 7
    pending = 0
    for position in range(1, commands + 1):
        order = f"T-{family}-{mode}-{position}"
        card = make_card(family, position, field.keyset, balance=BALANCE)  # type: ignore[arg-type]
        field.present(card)
        card.reset_command_count()
        card.faults.add(position, mode)  # type: ignore[arg-type]
        torn = stack.pos.purchase(order, AMOUNT).json()
        label = (order, torn)
        intent = any(i.payload.get("pos_order") == order for i in stack.store.pending_intents())
        if intent:
            pending += 1
            assert torn["status"] == "pending" and torn["money_moved"] is None, label
            assert torn["card_id"].endswith(asn(card)) and "SAME card" in torn["message"], label
            assert stack.pos.order(order).json()["status"] == "pending", label
        else:
            assert torn["status"] in ("refused", "paid"), label
            assert torn["money_moved"] is (torn["status"] == "paid"), label
        assert len(card.debits) <= 1, label
        field.present(card)
        again = stack.pos.purchase(order, AMOUNT).json()
        assert again["status"] == "paid" and again["money_moved"] is True, (label, again)
        assert len(card.debits) == 1, label
        assert card.balance == BALANCE - AMOUNT, label
        (record,) = purchases(stack, order)
        assert record.fields["counter"] == card.debits[0].counter, label
        assert stack.pos.order(order).json()["record_seq"] == record.seq, label
        field.take_away()
    assert pending >= 1  # the commands after the intent: CAPP update / DEBIT
    assert not stack.store.pending_intents()
    assert stack.store.verify().ok


def test_pending_order_accepts_only_its_card(stack: PosStack, field: Field) -> None:
    card = make_card("tunion", 7, field.keyset, balance=BALANCE)
    field.present(card)
    card.reset_command_count()
    card.faults.add(7, "tear_after")  # DEBIT committed, its answer lost
    assert stack.pos.purchase("ORD-7", AMOUNT).json()["status"] == "pending"
    other = make_card("tunion", 8, field.keyset, balance=BALANCE)
    field.present(other)
    wrong = stack.pos.purchase("ORD-7", AMOUNT).json()
    assert wrong["status"] == "pending" and "wrong_card" in wrong["reason"], wrong
    assert not other.debits
    field.take_away()
    field.present(card)
    paid = stack.pos.purchase("ORD-7", AMOUNT).json()
    assert paid["status"] == "paid" and "recovered" in paid["reason"], paid
    assert len(card.debits) == 1


def test_pending_debit_of_an_earlier_order_is_settled_first(stack: PosStack, field: Field) -> None:
    """The POS gives up on a pending order and starts another with the same card: the card's
    pending debit is proven first (the earlier order is paid), the new order is not charged
    by that tap and says so; tried again it pays once."""
    card = make_card("cjt166", 30, field.keyset, balance=BALANCE)
    field.present(card)
    card.reset_command_count()
    card.faults.add(7, "tear_after")  # DEBIT committed on the card, its answer lost
    assert stack.pos.purchase("OLD", AMOUNT).json()["status"] == "pending"
    field.present(card)
    new = stack.pos.purchase("NEW", 500).json()
    assert new["status"] == "refused" and new["money_moved"] is False, new
    assert new["reason"].startswith("earlier_debit_settled"), new
    old = stack.pos.order("OLD").json()
    assert old["status"] == "paid" and old["money_moved"] is True, old
    assert len(card.debits) == 1
    assert stack.pos.purchase("NEW", 500).json()["status"] == "paid"
    assert len(card.debits) == 2 and card.balance == BALANCE - AMOUNT - 500


def test_card_that_never_returns_becomes_unresolved_never_debited_again(
    stack: PosStack, field: Field
) -> None:
    card = make_card("tunion", 31, field.keyset, balance=BALANCE)
    field.present(card)
    card.reset_command_count()
    card.faults.add(7, "tear_after")
    assert stack.pos.purchase("GONE", AMOUNT).json()["status"] == "pending"
    stack.engine.profile = dataclasses.replace(stack.engine.profile, recovery_window_s=-1.0)
    stack.engine.expire_stale_intents()  # the recovery window has passed
    gone = stack.pos.order("GONE").json()
    assert gone["status"] == "unresolved" and gone["money_moved"] is None, gone
    (record,) = [r for r in stack.store.records() if r.kind == "unresolved"]
    assert record.fields["pos_order"] == "GONE" and gone["record_seq"] == record.seq
    field.present(card)
    again = stack.pos.purchase("GONE", AMOUNT).json()
    assert again["status"] == "unresolved", again  # the clearing centre settles it
    assert len(card.debits) == 1


def test_unix_socket(tmp_path: Path, stack: PosStack, field: Field) -> None:
    """``--listen unix:PATH``: the same API on a Unix socket of mode 0660."""
    import stat

    from agent.pos.http import PosUnixServer

    path = tmp_path / "pos.sock"
    server = PosUnixServer(path, stack.service)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        transport = httpx.HTTPTransport(uds=str(path))
        with httpx.Client(transport=transport, base_url="http://localhost", timeout=30) as pos:
            card = make_card("tunion", 40, field.keyset, balance=BALANCE)
            field.present(card)
            answer = pos.post("/v1/purchases", json={"order_id": "UDS-1", "amount": AMOUNT})
            assert answer.json()["status"] == "paid", answer.text
            assert pos.get("/v1/orders/UDS-1").json()["record_seq"] == answer.json()["record_seq"]
    finally:
        server.shutdown()
        server.server_close()
    assert not path.exists()
    path.write_text("not a socket")
    with pytest.raises(ConfigurationError, match="not a socket"):
        PosUnixServer(path, stack.service)


# --- one request at a time ---------------------------------------------------------------


def test_concurrent_request_is_busy_not_queued(stack: PosStack, field: Field) -> None:
    """One request waits for a card; another meanwhile is answered 423 at once and never
    debits later."""
    results: dict[str, Any] = {}

    def first() -> None:
        results["first"] = stack.pos.purchase("ORD-A", AMOUNT, wait_s=60).json()

    waiting = threading.Thread(target=first)
    waiting.start()
    second = PosClient(stack.url)
    try:
        for _attempt in range(10_000):  # until the first request holds the reader (bounded)
            answer = second.purchase("ORD-B", 500, wait_s=0)
            if answer.status_code == 423:
                break
            assert answer.json()["status"] == "refused", answer.json()  # it came first
        else:
            pytest.fail("the second request was never answered busy")
        body = answer.json()
        assert body["error"] == "busy" and body["money_moved"] is False
        card = make_card("tunion", 9, field.keyset, balance=BALANCE)
        field.present(card)
        waiting.join(90)
        assert not waiting.is_alive()
        assert results["first"]["status"] == "paid"
        assert len(card.debits) == 1 and card.balance == BALANCE - AMOUNT
        # the busy request was not queued: it never ran, and it does not debit later
        assert not purchases(stack, "ORD-B")
    finally:
        second.close()


# --- refunds, transactions, card, validation ------------------------------------------


def test_refund_is_a_signed_host_side_request(stack: PosStack, field: Field) -> None:
    card = make_card("tunion", 10, field.keyset, balance=BALANCE)
    field.present(card)
    assert stack.pos.purchase("ORD-R", AMOUNT).json()["status"] == "paid"
    http = stack.pos.http
    refund = {"refund_id": "RF-1", "order_id": "ORD-R", "amount": 300}
    answer = http.post("/v1/refunds", json=refund).json()
    assert answer["status"] == "requested" and answer["money_moved"] is False
    assert "clearing host" in answer["message"]
    assert http.post("/v1/refunds", json=refund).json()["record_seq"] == answer["record_seq"]
    assert card.balance == BALANCE - AMOUNT  # nothing credited offline
    (rec,) = [r for r in stack.store.records() if r.kind == "refund_request"]
    assert rec.amount == 300 and rec.fields["pos_order"] == "ORD-R"
    assert rec.card_id.endswith(asn(card))
    assert stack.store.verify().ok
    too_much = {"refund_id": "RF-2", "order_id": "ORD-R", "amount": AMOUNT}
    assert http.post("/v1/refunds", json=too_much).status_code == 422
    other = {"refund_id": "RF-1", "order_id": "ORD-R", "amount": 301}
    assert http.post("/v1/refunds", json=other).status_code == 409
    unknown = {"refund_id": "RF-3", "order_id": "NOPE", "amount": 1}
    assert http.post("/v1/refunds", json=unknown).status_code == 404


def test_transactions_and_card_read(stack: PosStack, field: Field) -> None:
    card = make_card("cjt166", 11, field.keyset, balance=BALANCE)
    field.present(card)
    info = stack.pos.http.get("/v1/card").json()
    assert info["card_id"].endswith(asn(card)) and info["balance"] == BALANCE
    assert info["product"] == "cjt166" and info["status"] == "ok"
    assert stack.pos.purchase("ORD-T", AMOUNT).json()["status"] == "paid"
    listed = stack.pos.http.get("/v1/transactions", params={"limit": 5}).json()["transactions"]
    assert listed[0]["order_id"] == "ORD-T" and listed[0]["amount"] == AMOUNT
    assert stack.pos.http.get("/v1/card").json()["balance"] == BALANCE - AMOUNT
    field.take_away()
    assert stack.pos.http.get("/v1/card").status_code == 404


BAD_REQUESTS: list[tuple[str, bytes, dict[str, str], int, str]] = [
    ("malformed", b"{not json", {}, 400, "malformed_json"),
    ("array", b"[1, 2]", {}, 400, "malformed_json"),
    ("nan", b'{"order_id": "X", "amount": NaN}', {}, 400, "malformed_json"),
    ("duplicate", b'{"order_id": "X", "amount": 1, "amount": 2}', {}, 400, "malformed_json"),
    ("unknown field", b'{"order_id": "X", "amount": 1, "tip": 5}', {}, 422, "unknown_field"),
    ("missing", b'{"order_id": "X"}', {}, 422, "missing_field"),
    ("float", b'{"order_id": "X", "amount": 12.5}', {}, 422, "invalid_amount"),
    ("float integral", b'{"order_id": "X", "amount": 1250.0}', {}, 422, "invalid_amount"),
    ("string", b'{"order_id": "X", "amount": "1250"}', {}, 422, "invalid_amount"),
    ("bool", b'{"order_id": "X", "amount": true}', {}, 422, "invalid_amount"),
    ("zero", b'{"order_id": "X", "amount": 0}', {}, 422, "invalid_amount"),
    ("over limit", b'{"order_id": "X", "amount": 50001}', {}, 422, "amount_out_of_range"),
    ("bad order id", b'{"order_id": "a b", "amount": 1}', {}, 422, "invalid_order_id"),
    ("not json type", b'{"order_id": "X", "amount": 1}', {"Content-Type": "text/plain"}, 415, ""),
    (
        "foreign origin",
        b'{"order_id": "X", "amount": 1}',
        {"Origin": "https://evil.example"},
        403,
        "foreign_origin",
    ),
    (
        "foreign host",
        b'{"order_id": "X", "amount": 1}',
        {"Host": "rebound.example:8800"},
        403,
        "foreign_host",
    ),
    ("huge", b'{"order_id": "X", "pad": "' + b"x" * 20000 + b'"}', {}, 413, "body_too_large"),
    ("deep", b"[" * 5000 + b"]" * 5000, {}, 400, "malformed_json"),
]


@pytest.mark.parametrize(("name", "body", "headers", "status", "code"), BAD_REQUESTS)
def test_bad_requests_are_4xx_naming_the_problem(
    stack: PosStack,
    field: Field,
    name: str,
    body: bytes,
    headers: dict[str, str],
    status: int,
    code: str,
) -> None:
    card = make_card("tunion", 12, field.keyset, balance=BALANCE)
    field.present(card)
    sent = {"Content-Type": "application/json", **headers}
    answer = stack.pos.http.post("/v1/purchases", content=body, headers=sent)
    assert answer.status_code == status, (name, answer.text)
    if code:
        assert answer.json()["error"] == code, (name, answer.text)
    assert not card.debits, name


def test_other_bad_requests(stack: PosStack) -> None:
    http = stack.pos.http
    assert http.get("/v1/orders/unknown-order").status_code == 404
    assert http.get("/v1/orders/bad%20id").status_code == 422
    assert http.get("/v1/nowhere").status_code == 404
    assert http.delete("/v1/purchases").status_code == 405
    assert http.get("/v1/transactions", params={"limit": "many"}).status_code == 400
    assert http.get("/v1/transactions", params={"since": "1"}).status_code == 400
    assert http.get("/v1/card", params={"wait_s": "999"}).status_code == 400
    with httpx.Client(base_url=stack.url, timeout=30) as raw:
        chunked = raw.post(
            "/v1/purchases",
            content=iter([b'{"order_id": "X", ', b'"amount": 1}']),
            headers={"Content-Type": "application/json"},
        )
        assert chunked.status_code == 411


def test_openapi_document_is_served_and_names_every_route(stack: PosStack) -> None:
    doc = stack.pos.http.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    assert set(doc["paths"]) == {
        "/v1/purchases",
        "/v1/orders/{order_id}",
        "/v1/card",
        "/v1/transactions",
        "/v1/refunds",
        "/openapi.json",
    }
    status = doc["components"]["schemas"]["Order"]["properties"]["status"]["enum"]
    assert set(status) == {"paid", "refused", "pending", "unresolved"}


def test_pos_max_amount_is_validated() -> None:
    import tomllib

    raw = tomllib.loads(DEMO_PROFILE.read_text(encoding="utf-8"))
    assert parse_profile(raw).pos_max_amount == 50000
    for bad in (0, -1, 1.5, "100", 2**32):
        with pytest.raises(ConfigurationError, match=r"pos\.max_amount"):
            parse_profile({**raw, "pos": {"max_amount": bad}})
    with pytest.raises(ConfigurationError, match=r"pos\.maximum"):
        parse_profile({**raw, "pos": {"max_amount": 1, "maximum": 2}})
    without = {k: v for k, v in raw.items() if k != "pos"}
    assert parse_profile(without).pos_max_amount == 0


def test_pos_refuses_a_profile_without_pos_section(tmp_path: Path, field: Field) -> None:
    from agent.pos.orders import OrderBook
    from agent.pos.service import PosService
    from agent.transaction import TransactionEngine
    from agent.wiring import open_hardware

    profile = dataclasses.replace(load_profile(write_profile(tmp_path)), pos_max_amount=0)
    data_dir = DataDir(tmp_path / "device")
    data_dir.provision(TERMINAL_ID)
    store = data_dir.open_store()
    hardware = open_hardware(profile, data_dir, field.url)
    try:
        engine = TransactionEngine(profile, store, hardware.sams)
        with pytest.raises(ConfigurationError, match=r"\[pos\] max_amount"):
            PosService(engine, hardware.reader, OrderBook(store.path))
    finally:
        hardware.close()
        store.close()


# --- the agent killed with SIGKILL between the debit and the answer -------------------


class HoldDebit:
    """Wraps a card: its next DEBIT (INS 54) commits on the card, then the answer is held
    until ``release`` (the agent is killed meanwhile)."""

    def __init__(self, card: SimulatedCpuCard) -> None:
        self.card = card
        self.committed = threading.Event()
        self.release = threading.Event()
        self.armed = True

    @property
    def uid(self) -> bytes:
        return self.card.uid

    @property
    def ats(self) -> bytes:
        return self.card.ats

    def power_on(self) -> None:
        self.card.power_on()

    def process(self, apdu: bytes) -> bytes:
        answer = self.card.process(apdu)
        if self.armed and len(apdu) > 1 and apdu[1] == 0x54:
            self.armed = False
            self.committed.set()
            self.release.wait(120)
        return answer


def kill_rig(tmp_path: Path, field: Field) -> tuple[Path, Path, int]:
    profile = write_profile(tmp_path, reader_timeout_s=60.0)  # the agent waits; we kill it
    data_dir = tmp_path / "device"
    DataDir(data_dir).provision(TERMINAL_ID)
    return profile, data_dir, free_port()


def test_kill9_between_debit_and_answer(tmp_path: Path, field: Field) -> None:
    """SIGKILL while the card's DEBIT answer is on its way: after the restart the POS's query
    by order id says ``pending`` (the intent is durable, the card was debited); with the card
    presented again the journal proves the debit: ``paid``, one debit."""
    profile, data_dir, port = kill_rig(tmp_path, field)
    url = f"http://127.0.0.1:{port}"
    card = make_card("tunion", 20, field.keyset, balance=BALANCE)
    held = HoldDebit(card)
    field.present(held)
    agent = start_pos(profile, data_dir, field.url, port)
    pos = PosClient(url)
    try:
        wait_until_serving(url, agent)
        results: dict[str, Any] = {}

        def buy() -> None:
            try:
                results["answer"] = pos.purchase("KILL-1", AMOUNT)
            except httpx.TransportError as exc:
                results["error"] = exc

        buyer = threading.Thread(target=buy)
        buyer.start()
        assert held.committed.wait(60), "the DEBIT never reached the card (hang bound)"
        agent.send_signal(signal.SIGKILL)
        agent.wait(30)
        held.release.set()
        buyer.join(60)
        assert "error" in results, "the killed agent answered"
        assert len(card.debits) == 1  # the card was debited; the POS heard nothing

        agent = start_pos(profile, data_dir, field.url, port)
        wait_until_serving(url, agent)
        after = pos.order("KILL-1").json()
        assert after["status"] == "pending" and after["money_moved"] is None, after
        assert after["card_id"].endswith(asn(card))
        field.take_away()
        field.present(card)
        paid = pos.purchase("KILL-1", AMOUNT).json()
        assert paid["status"] == "paid" and "recovered" in paid["reason"], paid
        assert len(card.debits) == 1 and card.balance == BALANCE - AMOUNT
        assert pos.purchase("KILL-1", AMOUNT).json()["record_seq"] == paid["record_seq"]
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(30) == 0, (data_dir / "pos.log").read_text()[-2000:]
    finally:
        pos.close()
        if agent.poll() is None:
            agent.kill()
            agent.wait(30)
    with OfflineStore.open_for_reading(data_dir / "agent.db") as store:
        assert store.verify().ok
        records = [r for r in store.records() if r.kind == "purchase"]
        assert [r.fields["pos_order"] for r in records] == ["KILL-1"]
        assert not store.pending_intents()


def test_kill9_after_the_record_before_the_answer(tmp_path: Path) -> None:
    """SIGKILL after the record is durable (while the module shows the feedback) and before
    the HTTP answer: after the restart the query by order id says ``paid``."""
    feedback = threading.Event()
    release = threading.Event()

    def hold_feedback(ok: bool, text: str) -> None:
        feedback.set()
        release.wait(120)

    field = Field(on_feedback=hold_feedback)
    profile, data_dir, port = kill_rig(tmp_path, field)
    url = f"http://127.0.0.1:{port}"
    card = make_card("cjt166", 21, field.keyset, balance=BALANCE)
    field.present(card)
    agent = start_pos(profile, data_dir, field.url, port)
    pos = PosClient(url)
    try:
        wait_until_serving(url, agent)
        buyer = threading.Thread(target=lambda: _swallow(lambda: pos.purchase("KILL-2", AMOUNT)))
        buyer.start()
        assert feedback.wait(60), "no feedback (hang bound)"
        agent.send_signal(signal.SIGKILL)
        agent.wait(30)
        release.set()
        buyer.join(60)
        agent = start_pos(profile, data_dir, field.url, port)
        wait_until_serving(url, agent)
        after = pos.order("KILL-2").json()
        assert after["status"] == "paid" and after["money_moved"] is True, after
        assert after["balance_after"] == BALANCE - AMOUNT
        assert pos.purchase("KILL-2", AMOUNT).json()["status"] == "paid"
        assert len(card.debits) == 1
        agent.send_signal(signal.SIGTERM)
        agent.wait(30)
    finally:
        pos.close()
        release.set()
        if agent.poll() is None:
            agent.kill()
            agent.wait(30)
        field.close()


def _swallow(call: Any) -> None:
    with contextlib.suppress(httpx.TransportError):
        call()


def test_openapi_file_is_valid_json() -> None:
    path = Path(__file__).resolve().parents[1] / "agent" / "pos" / "openapi.json"
    assert json.loads(path.read_text(encoding="utf-8"))["info"]["title"]


# --- M1 purses ---------------------------------------------------------------------------


def test_m1_card_read_paid_and_torn_at_every_write(stack: PosStack, field: Field) -> None:
    """An M1 purse through the POS: read, paid; then torn at every EEPROM write of the debit,
    presented again with the same order id: paid, the purse debited once."""
    layout = m1_layout()
    probe = make_m1_card(200, balance=BALANCE)
    field.present(probe)
    info = stack.pos.http.get("/v1/card").json()
    assert info["technology"] == "m1" and info["balance"] == BALANCE, info
    before = probe.writes
    assert stack.pos.purchase("M1-probe", AMOUNT).json()["status"] == "paid"
    writes = probe.writes - before
    assert writes >= 2 and m1_purse_of(probe, layout) == (BALANCE - AMOUNT,) * 2
    field.take_away()
    pending = 0
    for at in range(1, writes + 1):
        order = f"M1-{at}"
        card = make_m1_card(200 + at, balance=BALANCE)
        field.present(card)
        card.arm_tear(at, "lost")
        torn = stack.pos.purchase(order, AMOUNT).json()
        assert torn["status"] in ("pending", "refused"), (order, torn)
        pending += torn["status"] == "pending"
        field.present(card)
        again = stack.pos.purchase(order, AMOUNT).json()
        assert again["status"] == "paid", (order, again)
        assert m1_purse_of(card, layout) == (BALANCE - AMOUNT,) * 2, order
        assert len(purchases(stack, order)) == 1, order
        field.take_away()
    assert pending == writes  # every write of the debit comes after its durable intent
    assert not stack.store.pending_intents()
    assert stack.store.verify().ok


def test_listen_is_loopback_only() -> None:
    from agent.pos.cli import parse_listen

    assert parse_listen("127.0.0.1:8800") == ("127.0.0.1", 8800)
    assert parse_listen("[::1]:8800") == ("::1", 8800)
    for bad in ("0.0.0.0:8800", "192.168.1.5:8800", "8800", "localhost:x", "127.0.0.1:70000"):
        with pytest.raises(ConfigurationError):
            parse_listen(bad)


def test_the_tcp_front_end_sends_each_answer_without_waiting_for_an_ack() -> None:
    """An answer's head and body are two writes: on TCP the handler's socket has Nagle's
    algorithm off (``TCP_NODELAY``), else the body waited for the client's delayed ACK of the
    head, 40 ms a purchase on a keep-alive connection (`bench/RESULTS-pos.md`: the round trip
    went from 46 to 4 ms). A unix socket has no Nagle and is left as it is."""
    import socket

    from agent.pos.http import PosHandler

    def set_up(connection: socket.socket) -> PosHandler:
        handler = PosHandler.__new__(PosHandler)  # setup() only, no request to serve
        handler.request = connection
        handler.setup()
        return handler

    with (
        socket.create_server(("127.0.0.1", 0)) as listening,
        socket.create_connection(listening.getsockname()),
    ):
        accepted, _ = listening.accept()
        with accepted:
            set_up(accepted)
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    local, remote = socket.socketpair(socket.AF_UNIX)
    with local, remote:
        set_up(local)  # no TCP option to set: no error
