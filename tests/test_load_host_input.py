"""The load host against bad input, pending loads, vouchers and POS refunds (issue 10).

A real clearing host (uvicorn on 127.0.0.1) with the load authority on a real SQLite file (and,
for the races, on a real PostgreSQL server as ``tests/test_sync_storage.py`` starts it), reached
by the kiosk's HTTP client with the card simulator behind the in-process reader driver. Every
refusal is checked for what did not move: the card's balance, the voucher or pending load, the
host's load rows.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import socket
import sqlite3
import threading
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from agent.crypto import datetime7
from agent.offline_store import DeviceKey, OfflineStore, RecordBody
from agent.offline_store.records import FieldValue
from agent.products import cpu_load, cpu_purse
from agent.sam.keys import KeySet
from agent.tap.load import KioskLoader, LoadRequest, LoadResult, _Exchanger
from agent.tap.load_http import SIGNATURE_HEADER, HttpLoadHost, load_signed_bytes
from clearinghost.cli import main as cardhost
from clearinghost.keys import HostKey
from clearinghost.keystore import SoftwareKeyStore, load_test_keys
from clearinghost.loads import LoadAuthority, LoadRefused
from clearinghost.operators import OPERATOR, TOKEN_ENV, VIEWER, Operator, Operators, hash_token
from clearinghost.server import ClearingHost, HostServer, create_app
from clearinghost.storage import SqliteStorage, open_storage
from sync import protocol
from tests.fake_reader.cpu_card import SimulatedCpuCard
from tests.fake_reader.inprocess import CardField, InProcessReader
from tests.fake_reader.scenario import TERMINAL_NUMBER, demo_keyset, demo_profile, make_card

KIOSK = "KIOSK-0001"
OPERATOR_TOKEN = "loads-operator-token-0123456789"
VIEWER_TOKEN = "loads-viewer-token-0123456789"
AMOUNT = 2000
BALANCE = 500
MAX_BALANCE = 100000
HOME_ISSUERS = ("01011000", "1000")
NOW = dt.datetime(2026, 11, 30, 12, 0, 0, tzinfo=dt.UTC)


class DroppingProxy:
    """A TCP proxy on 127.0.0.1 in front of the host that loses what it is told to: ``drop``
    holds, per connection in order, ``"answer"`` (the request reaches the host, its answer never
    reaches the kiosk), ``"request"`` (the request never reaches the host) or ``"pass"``."""

    def __init__(self, upstream: str, drop: list[str]) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.drop = drop
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            mode = self.drop.pop(0) if self.drop else "pass"
            threading.Thread(target=self._one, args=(client, mode), daemon=True).start()

    def _one(self, client: socket.socket, mode: str) -> None:
        client.settimeout(30)
        with client:
            request = _read_http(client)
            if mode == "request" or not request:
                return
            with socket.create_connection(self.upstream, timeout=30) as up:
                up.sendall(request)
                answer = _read_http(up)
            if mode == "answer":
                return  # the host authorised; the kiosk hears nothing
            client.sendall(answer)

    def close(self) -> None:
        self.listener.close()


def _read_http(sock: socket.socket) -> bytes:
    """One HTTP/1.1 message (head + Content-Length body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


@dataclasses.dataclass
class Stack:
    url: str
    host: ClearingHost
    device: DeviceKey
    store: OfflineStore
    keyset: KeySet
    authority: LoadAuthority
    field: CardField
    reader: InProcessReader
    clients: list[HttpLoadHost]

    def loader(self, url: str | None = None, **client_options: Any) -> KioskLoader:
        client = HttpLoadHost(url or self.url, KIOSK, self.device, **client_options)
        self.clients.append(client)
        profile = dataclasses.replace(demo_profile(), max_balance=MAX_BALANCE)
        return KioskLoader(profile, self.store, client, TERMINAL_NUMBER, clock=lambda: NOW)

    def card(self, number: int, **options: Any) -> SimulatedCpuCard:
        return make_card("tunion", number, self.keyset, balance=BALANCE, **options)

    def present(
        self,
        card: SimulatedCpuCard,
        key: str,
        payment: dict[str, Any] | None = None,
        loader: KioskLoader | None = None,
        amount: int = AMOUNT,
    ) -> LoadResult:
        self.field.insert(card)
        assert self.reader.wait_for_card(0) is not None
        try:
            return (loader or self.loader()).load(
                self.reader, amount, payment or {"kind": "cash", "amount": amount}, key
            )
        finally:
            self.field.remove()

    def signed_post(self, path: str, payload: dict[str, Any]) -> httpx.Response:
        body = json.dumps(payload).encode()
        signature = self.device.sign(load_signed_bytes(KIOSK, "POST", path, body))
        return httpx.post(
            self.url + path,
            content=body,
            headers={"Content-Type": "application/json", SIGNATURE_HEADER: signature.hex()},
        )


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    keyset = KeySet([*demo_keyset(), *load_test_keys()])
    authority = LoadAuthority(
        tmp_path / "loads.db",
        SoftwareKeyStore(keyset),
        max_balance=MAX_BALANCE,
        issuers=HOME_ISSUERS,
    )
    host = ClearingHost(
        SqliteStorage(tmp_path / "host.db"),
        HostKey.generate(),
        operators=Operators(
            [
                Operator("alice", OPERATOR, hash_token(OPERATOR_TOKEN)),
                Operator("wall", VIEWER, hash_token(VIEWER_TOKEN)),
            ]
        ),
        loads=authority,
    )
    key_path = tmp_path / "device.key"
    DeviceKey.create(key_path)
    device = DeviceKey.load(key_path)
    host.storage.register_terminal(KIOSK, device.public_key_bytes.hex())
    store = OfflineStore.open(tmp_path / "agent.db", device, KIOSK)
    field = CardField()
    with HostServer(create_app(host), log_level="critical") as server:
        s = Stack(
            server.url, host, device, store, keyset, authority, field, InProcessReader(field), []
        )
        yield s
        for client in s.clients:
            client.close()
    store.close()
    authority.close()
    host.storage.close()


def _request(
    stack: Stack, card: SimulatedCpuCard, key: str, payment: dict[str, Any], amount: int = AMOUNT
) -> dict[str, Any]:
    """INITIALIZE FOR LOAD on the card through the reader: the request a kiosk would send."""
    stack.field.insert(card)
    assert stack.reader.wait_for_card(0) is not None
    try:
        io = _Exchanger(stack.reader)
        app = demo_profile().applications[0]
        fci = io.run(cpu_purse.select_application(app))
        info = io.run(cpu_purse.read_card(app, fci, demo_profile().dialects))
        init = io.run(cpu_load.initialize_for_load(1, amount, TERMINAL_NUMBER, 10**9))
    finally:
        stack.field.remove()
    request = LoadRequest(
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
        amount=amount,
        terminal=TERMINAL_NUMBER.hex().upper(),
        datetime=datetime7(NOW).hex().upper(),
        payment=payment,
    )
    return dataclasses.asdict(request) | {"factors": list(request.factors)}


def _cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *argv: str) -> str:
    monkeypatch.setenv(TOKEN_ENV, OPERATOR_TOKEN)
    capsys.readouterr()
    assert cardhost(["--log-level", "warning", *argv]) == 0, capsys.readouterr()
    return capsys.readouterr().out


# --- refusals: nothing moves ------------------------------------------------------------------


@pytest.mark.parametrize("case", ["voucher_unknown", "voucher_used", "payment_mismatch"])
def test_refused_authorisation_moves_no_money(stack: Stack, case: str) -> None:
    stack.authority.add_voucher("VOUCHER-USED-1", AMOUNT)
    stack.authority.add_voucher("VOUCHER-SMALL-1", AMOUNT - 1)
    if case == "voucher_used":
        first = stack.present(stack.card(9), "first", {"kind": "voucher", "code": "VOUCHER-USED-1"})
        assert first.status == "loaded", first
    code = {
        "voucher_unknown": "VOUCHER-NONE-1",
        "voucher_used": "VOUCHER-USED-1",
        "payment_mismatch": "VOUCHER-SMALL-1",
    }[case]
    rows_before = len(stack.authority.loads())
    card = stack.card(1)
    result = stack.present(card, "refused-1", {"kind": "voucher", "code": code})
    assert result.status == "refused" and result.reason == case, result
    assert card.balance == BALANCE and not card.loads  # the card: untouched
    assert len(stack.authority.loads()) == rows_before  # the host: no load row
    assert not stack.store.pending_intents()  # the kiosk: the refusal proved nothing changed
    vouchers = {v["code"]: v["load_key"] for v in stack.authority.vouchers()}
    assert vouchers["VOUCHER-SMALL-1"] is None
    assert vouchers["VOUCHER-USED-1"] == ("first" if case == "voucher_used" else None)


def test_forged_or_altered_mac1_is_refused(stack: Stack) -> None:
    card = stack.card(2)
    stack.authority.add_voucher("VOUCHER-MAC-1", AMOUNT + 1000)
    request = _request(stack, card, "mac-1", {"kind": "voucher", "code": "VOUCHER-MAC-1"})
    path = f"/v1/terminals/{KIOSK}/loads"
    forged = stack.signed_post(path, {**request, "mac1": "00000000"})
    assert forged.status_code == 422 and forged.json()["error"] == "bad_mac1"
    # MAC1 covers the amount (§5.7): a request raised after INITIALIZE FOR LOAD does not verify
    raised = stack.signed_post(path, {**request, "amount": AMOUNT + 1000})
    assert raised.status_code == 422 and raised.json()["error"] == "bad_mac1"
    assert not stack.authority.loads()
    assert stack.authority.vouchers()[0]["load_key"] is None


def test_balance_over_the_purse_limit_is_refused_before_money_is_taken(
    tmp_path: Path, stack: Stack
) -> None:
    from clearinghost.cli import _parser
    from clearinghost.load_setup import load_authority_from
    from tests.fake_reader.scenario import DEMO_PROFILE

    # the limit is the profile's terminal.max_balance
    profile = tmp_path / "limit.toml"
    text = DEMO_PROFILE.read_text(encoding="utf-8")
    assert "max_balance = 100000" in text
    profile.write_text(text.replace("max_balance = 100000", "max_balance = 2400"), "utf-8")
    args = _parser().parse_args(
        [
            "host",
            "--key",
            str(tmp_path / "k"),
            "--profile",
            str(profile),
            "--loads-db",
            str(tmp_path / "limit.db"),
        ]
    )
    authority = load_authority_from(args)
    assert authority is not None and authority.max_balance == 2400
    try:
        authority.add_voucher("VOUCHER-LIMIT-1", AMOUNT)
        card = stack.card(3)  # balance 500 + 2000 > 2400
        request = _request(stack, card, "limit-1", {"kind": "voucher", "code": "VOUCHER-LIMIT-1"})
        with pytest.raises(LoadRefused) as refused:
            authority.authorise(KIOSK, request)
        assert refused.value.reason == "balance_limit"
        assert "2400" in refused.value.detail
        assert authority.vouchers()[0]["load_key"] is None  # not taken
        assert not authority.loads()
    finally:
        authority.close()


def test_card_of_another_city_is_refused_with_the_reason(stack: Stack) -> None:
    foreign = stack.card(4, issuer_id=bytes.fromhex("02012000FFFFFFFF"), city_code="2000")
    # the kiosk refuses it before asking anyone
    result = stack.present(foreign, "city-1")
    assert result.status == "refused" and result.reason.startswith("not_loadable_here"), result
    assert "2000" in result.reason and not foreign.loads
    # the host refuses it too, whatever a kiosk sends (the issuer factor is bound by MAC1)
    request = _request(stack, foreign, "city-2", {"kind": "cash", "amount": AMOUNT})
    answer = stack.signed_post(f"/v1/terminals/{KIOSK}/loads", request)
    assert answer.status_code == 422 and answer.json()["error"] == "not_loadable_here"
    assert "02012000FFFFFFFF" in answer.json()["detail"]
    assert not stack.authority.loads() and foreign.balance == BALANCE


# --- lost answers, answers twice ------------------------------------------------------------


@pytest.mark.parametrize("lost", ["answer", "request"])
def test_a_lost_authorisation_is_asked_again_with_the_same_key(stack: Stack, lost: str) -> None:
    """The kiosk's request timed out: the host may (answer lost) or may not (request lost) have
    authorised. The kiosk sends the same request again: one authorisation, the same MAC2."""
    proxy = DroppingProxy(stack.url, [lost])
    try:
        card = stack.card(5)
        result = stack.present(card, "lost-1", loader=stack.loader(proxy.url, attempts=3))
    finally:
        proxy.close()
    assert result.status == "loaded", result
    assert len(card.loads) == 1 and card.balance == BALANCE + AMOUNT
    (load,) = stack.authority.loads()
    assert load.load_key == "lost-1" and load.state == "completed"


def test_every_host_answer_lost_leaves_the_load_torn_then_resolved(stack: Stack) -> None:
    proxy = DroppingProxy(stack.url, ["answer", "answer"])
    try:
        card = stack.card(6)
        torn = stack.present(card, "lost-2", loader=stack.loader(proxy.url, attempts=2))
    finally:
        proxy.close()
    assert torn.status == "torn", torn
    (held,) = stack.authority.loads("unresolved")
    assert held.state == "authorised" and held.unresolved  # the money is held, shown so
    again = stack.present(card, "lost-2")
    assert again.status == "loaded", again  # the first attempt voided on the card's counter
    assert len(card.loads) == 1
    states = {v.load_key: v.state for v in stack.authority.loads()}
    assert states == {"lost-2": "not_credited", "lost-2.r1": "completed"}


def test_a_completion_arriving_twice_changes_nothing(stack: Stack) -> None:
    card = stack.card(7)
    assert stack.present(card, "twice-1").status == "loaded"
    (done,) = stack.authority.loads()
    path = f"/v1/terminals/{KIOSK}/loads/twice-1/completion"
    report = {"outcome": "credited", "counter": done.counter, "tac": done.tac}
    again = stack.signed_post(path, report)
    assert again.status_code == 200 and again.json()["state"] == "completed"
    other = stack.signed_post(path, {**report, "tac": "00000000"})
    assert other.status_code == 409 and other.json()["error"] == "load_closed"
    late_void = stack.signed_post(path, {**report, "outcome": "not_credited", "tac": ""})
    assert late_void.status_code == 409  # a completed load is never given back
    assert stack.authority.view("twice-1") == done


def test_authorisation_answered_twice_is_one_load(stack: Stack) -> None:
    card = stack.card(8)
    request = _request(stack, card, "dup-1", {"kind": "cash", "amount": AMOUNT})
    path = f"/v1/terminals/{KIOSK}/loads"
    first, second = stack.signed_post(path, request), stack.signed_post(path, request)
    assert first.status_code == second.status_code == 200
    assert first.json()["mac2"] == second.json()["mac2"]
    assert len(stack.authority.loads()) == 1


# --- unresolved loads, reconciliation ---------------------------------------------------------


def test_unresolved_loads_are_listed_for_the_operator_until_reconciled(
    stack: Stack, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    card = stack.card(10)
    card.reset_command_count()
    card.faults.add(6, "tear_after")  # CREDIT FOR LOAD committed, its answer lost
    assert stack.present(card, "held-1").status == "torn"
    listing = _cli(capsys, monkeypatch, "loads", "--host", stack.url, "list", "--unresolved")
    (line,) = listing.splitlines()
    assert line.startswith("held-1\tauthorised\t") and "money held" in line
    assert stack.present(card, "held-1").status == "recovered"  # GET TRANSACTION PROVE
    assert _cli(capsys, monkeypatch, "loads", "--host", stack.url, "list", "--unresolved") == ""
    assert stack.authority.view("held-1").state == "completed"  # type: ignore[union-attr]


class SilentCompletions:
    """The kiosk's host client whose completion reports never arrive."""

    def __init__(self, inner: HttpLoadHost) -> None:
        self.inner = inner

    def authorise(self, request: LoadRequest) -> bytes:
        return self.inner.authorise(request)

    def complete(self, load_key: str, outcome: str, counter: int, tac: str) -> None:
        raise httpx.ConnectError("completion lost")


def test_the_load_record_reconciles_a_lost_completion(stack: Stack) -> None:
    loader = stack.loader()
    loader.host = SilentCompletions(loader.host)  # type: ignore[arg-type]
    card = stack.card(11)
    assert stack.present(card, "record-1", loader=loader).status == "loaded"
    assert stack.authority.view("record-1").state == "authorised"  # type: ignore[union-attr]
    batch = protocol.encode_batch(KIOSK, list(stack.store.records()))
    answer = httpx.post(
        stack.url + protocol.records_path(KIOSK),
        content=batch.body,
        headers={"Content-Encoding": "gzip", protocol.IDEMPOTENCY_HEADER: batch.idempotency_key},
    )
    assert answer.status_code == 200, answer.text
    view = stack.authority.view("record-1")
    assert (
        view is not None
        and view.state == "completed"
        and view.tac == card.loads[0].tac.hex().upper()
    )


# --- pending loads, vouchers, refunds ---------------------------------------------------------


def test_pending_load_credited_by_an_operator_is_loaded_once(
    stack: Stack, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    card = stack.card(12)
    asn = card.asn.hex().upper()
    made = json.loads(
        _cli(
            capsys,
            monkeypatch,
            "loads",
            "--host",
            stack.url,
            "credit",
            "--card",
            asn,
            "--amount",
            str(AMOUNT),
            "--source",
            "employer",
            "--reference",
            "welfare 2026-11",
        )
    )
    assert made["asn"] == asn and made["source"] == "employer" and made["load_key"] is None
    client = stack.loader().host
    assert isinstance(client, HttpLoadHost)
    (offered,) = client.pending_loads(asn)
    assert offered["id"] == made["id"]
    payment = {"kind": "pending", "id": made["id"]}
    assert stack.present(card, "pending-1", payment).status == "loaded"
    assert card.balance == BALANCE + AMOUNT
    assert client.pending_loads(asn) == []
    again = stack.present(card, "pending-2", payment)
    assert again.status == "refused" and again.reason == "pending_taken", again
    other = stack.card(13)
    stolen = stack.present(other, "pending-3", payment)
    assert stolen.status == "refused" and stolen.reason == "pending_other_card", stolen
    assert len(card.loads) == 1 and not other.loads


def test_vouchers_issued_by_an_operator_are_redeemed_once(
    stack: Stack, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = _cli(
        capsys,
        monkeypatch,
        "vouchers",
        "--host",
        stack.url,
        "issue",
        "--amount",
        str(AMOUNT),
        "--count",
        "2",
    )
    codes = out.split()
    assert len(codes) == 2 and len(set(codes)) == 2
    first, second = stack.card(14), stack.card(15)
    assert stack.present(first, "v-1", {"kind": "voucher", "code": codes[0]}).status == "loaded"
    used = stack.present(second, "v-2", {"kind": "voucher", "code": codes[0]})
    assert used.status == "refused" and used.reason == "voucher_used"
    assert stack.present(second, "v-3", {"kind": "voucher", "code": codes[1]}).status == "loaded"
    listing = _cli(capsys, monkeypatch, "vouchers", "--host", stack.url, "list")
    assert sorted(line.split("\t")[2] for line in listing.splitlines()) == [
        "redeemed by v-1",
        "redeemed by v-3",
    ]


def test_a_pos_refund_becomes_a_pending_load_at_the_kiosk(stack: Stack) -> None:
    """A POS refund is a host-side credit (agent.pos.service: a signed ``refund_request``); when
    it reaches the host through sync it becomes a pending load for that card."""
    card = stack.card(16)
    stack.store.append_record(
        RecordBody(
            kind="refund_request",
            card_id=card.asn.hex().upper(),
            amount=AMOUNT,
            fields={"order_id": "ORD-9", "refund_id": "RF-9", "original_seq": 1, "credit": "host"},
        )
    )
    batch = protocol.encode_batch(KIOSK, list(stack.store.records()))
    for _ in range(2):  # a replayed upload makes no second credit
        answer = httpx.post(
            stack.url + protocol.records_path(KIOSK),
            content=batch.body,
            headers={
                "Content-Encoding": "gzip",
                protocol.IDEMPOTENCY_HEADER: batch.idempotency_key,
            },
        )
        assert answer.status_code == 200, answer.text
    (pending,) = stack.authority.pending_loads(card.asn.hex().upper())
    assert pending.source == "refund" and pending.reference == "RF-9"
    assert pending.amount == AMOUNT
    result = stack.present(card, "refund-load", {"kind": "pending", "id": pending.id})
    assert result.status == "loaded" and card.balance == BALANCE + AMOUNT


# --- races: two kiosks, one voucher / one pending load (SQLite and PostgreSQL) -----------------


def _race(calls: list[Callable[[], bytes]]) -> list[bytes | LoadRefused]:
    barrier = threading.Barrier(len(calls))
    results: list[bytes | LoadRefused] = [LoadRefused("none", "")] * len(calls)

    def run(i: int) -> None:
        barrier.wait(30)
        try:
            results[i] = calls[i]()
        except LoadRefused as refused:
            results[i] = refused

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "a racing authorisation hung"
    return results


@pytest.fixture(params=["sqlite", "postgresql"])
def two_hosts(
    request: pytest.FixtureRequest, tmp_path: Path, stack: Stack
) -> Iterator[tuple[LoadAuthority, LoadAuthority]]:
    """Two load authorities (two host processes' connections) on one database."""
    if request.param == "sqlite":
        location: Path | str = tmp_path / "shared-loads.db"
    else:
        location = request.getfixturevalue("pg").new_database()
    keystore = SoftwareKeyStore(stack.keyset)
    first = LoadAuthority(location, keystore, max_balance=MAX_BALANCE)
    second = LoadAuthority(location, keystore, max_balance=MAX_BALANCE)
    yield first, second
    first.close()
    second.close()


@pytest.fixture(scope="module")
def pg() -> Iterator[Any]:
    from tests.test_sync_storage import PgServer

    server = PgServer().start()
    yield server
    server.stop()


ROUNDS = 8


def test_two_kiosks_racing_for_one_voucher_exactly_one_wins(
    stack: Stack, two_hosts: tuple[LoadAuthority, LoadAuthority]
) -> None:
    a, b = two_hosts
    for n in range(ROUNDS):
        code = f"VOUCHER-RACE-{n}"
        a.add_voucher(code, AMOUNT)
        payment = {"kind": "voucher", "code": code}
        ra = _request(stack, stack.card(100 + 2 * n), f"race-a-{n}", payment)
        rb = _request(stack, stack.card(101 + 2 * n), f"race-b-{n}", payment)
        results = _race([partial(a.authorise, "KIOSK-A", ra), partial(b.authorise, "KIOSK-B", rb)])
        won = [r for r in results if isinstance(r, bytes)]
        lost = [r for r in results if isinstance(r, LoadRefused)]
        assert len(won) == 1 and len(lost) == 1, results
        assert lost[0].reason == "voucher_used", lost[0]
        (voucher,) = [v for v in a.vouchers() if v["code"] == code]
        assert voucher["load_key"] in (f"race-a-{n}", f"race-b-{n}")
    assert len(a.loads()) == ROUNDS


def test_two_kiosks_racing_for_one_pending_load_exactly_one_wins(
    stack: Stack, two_hosts: tuple[LoadAuthority, LoadAuthority]
) -> None:
    """The card goes from kiosk A to kiosk B: both INITIALIZE FOR LOAD (same online counter),
    both ask for the card's pending load at once."""
    a, b = two_hosts
    for n in range(ROUNDS):
        card = stack.card(200 + n)
        pending = a.credit(card.asn.hex().upper(), AMOUNT, "group", "test", reference=f"g-{n}")
        payment = {"kind": "pending", "id": pending.id}
        ra = _request(stack, card, f"pend-a-{n}", payment)
        rb = _request(stack, card, f"pend-b-{n}", payment)
        results = _race([partial(a.authorise, "KIOSK-A", ra), partial(b.authorise, "KIOSK-B", rb)])
        won = [r for r in results if isinstance(r, bytes)]
        lost = [r for r in results if isinstance(r, LoadRefused)]
        assert len(won) == 1 and len(lost) == 1, results
        assert lost[0].reason in ("pending_taken", "load_in_progress"), lost[0]
        (claimed,) = a.pending_loads(card.asn.hex().upper(), open_only=False)
        winner = [v for v in a.loads() if v.asn == card.asn.hex().upper()]
        assert len(winner) == 1 and claimed.load_key == winner[0].load_key


# --- the SM4 load session key: a profile setting ----------------------------------------------


def _authority_for(tmp_path: Path, variant: str | None) -> LoadAuthority:
    from clearinghost.cli import _parser
    from clearinghost.load_setup import load_authority_from
    from tests.fake_reader.scenario import DEMO_PROFILE

    profile = tmp_path / f"sm4-{variant}.toml"
    lines = [
        line
        for line in DEMO_PROFILE.read_text(encoding="utf-8").splitlines()
        if not line.startswith("sm4_load_session_key")
    ]
    anchor = lines.index("[crypto]")
    if variant is not None:
        lines.insert(anchor + 1, f'sm4_load_session_key = "{variant}"')
    text = "\n".join(lines) + "\n"
    profile.write_text(text, encoding="utf-8")
    args = _parser().parse_args(
        [
            "host", "--key", str(tmp_path / "k"), "--profile", str(profile),
            "--loads-db", str(tmp_path / f"sm4-{variant}.db"),
        ]
    )  # fmt: skip
    authority = load_authority_from(args)
    assert authority is not None
    return authority


@pytest.mark.parametrize("variant", ["pad80", "complement"])
def test_the_sm4_load_session_key_is_a_profile_setting(
    tmp_path: Path, stack: Stack, variant: str
) -> None:
    """No public source gives the SM4 form of SESLK (cpu-purse.md §5.6, §10 item 1): the card's
    profile names it (``[crypto] sm4_load_session_key``), the host follows it."""
    from agent.crypto import Algorithm

    card = stack.card(40, algorithm=Algorithm.SM4)
    card.sm4_load_session_key = variant
    request = _request(stack, card, f"sm4-{variant}", {"kind": "cash", "amount": AMOUNT})
    other = "complement" if variant == "pad80" else "pad80"
    right, wrong = _authority_for(tmp_path, variant), _authority_for(tmp_path, other)
    try:
        assert len(right.authorise(KIOSK, request)) == 4
        with pytest.raises(LoadRefused) as refused:
            wrong.authorise(KIOSK, request)
        assert refused.value.reason == "bad_mac1"
    finally:
        right.close()
        wrong.close()
    default = _authority_for(tmp_path, None)  # a profile without the setting: pad80
    try:
        assert default.keystore.sm4_variant == "pad80"  # type: ignore[attr-defined]
    finally:
        default.close()


def test_an_unknown_sm4_load_variant_is_refused_naming_the_field(tmp_path: Path) -> None:
    from agent.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match=r"crypto\.sm4_load_session_key"):
        _authority_for(tmp_path, "guess").close()


def test_the_sm4_load_variants_differ_and_pad80_is_the_purchase_shape() -> None:
    from agent import crypto
    from agent.crypto import Algorithm

    dlk, random4 = bytes(range(16)), bytes.fromhex("A1B2C3D4")  # TEST values
    pad80 = crypto.load_session_key(dlk, random4, 5, Algorithm.SM4)
    complement = crypto.load_session_key(dlk, random4, 5, Algorithm.SM4, sm4_variant="complement")
    assert pad80 != complement and len(pad80) == len(complement) == 16
    block = random4 + (5).to_bytes(2, "big") + b"\x80" + bytes(9)
    assert pad80 == crypto.sm4_encrypt(dlk, block)
    b8 = random4 + (5).to_bytes(2, "big") + b"\x80\x00"
    assert complement == crypto.sm4_encrypt(dlk, b8 + bytes(x ^ 0xFF for x in b8))
    with pytest.raises(crypto.CryptoError, match="complement, pad80"):
        crypto.load_session_key(dlk, random4, 5, Algorithm.SM4, sm4_variant="guess")


def test_authorise_complete_and_list_on_both_databases(
    stack: Stack, two_hosts: tuple[LoadAuthority, LoadAuthority]
) -> None:
    """One load through both connections: authorised by one host process, its completion (twice)
    and a refund's pending load by the other; the lists agree."""

    a, b = two_hosts
    card = stack.card(300)
    request = _request(stack, card, "both-1", {"kind": "cash", "amount": AMOUNT})
    mac2 = a.authorise("KIOSK-A", request)
    assert b.authorise("KIOSK-A", request) == mac2  # the replay, through the other connection
    (held,) = b.loads("unresolved")
    assert held.load_key == "both-1" and held.state == "authorised"
    unknown = b.complete("KIOSK-A", "both-1", "unknown", held.counter, "")
    assert unknown.state == "unknown" and unknown.unresolved
    bad = a.complete("KIOSK-A", "both-1", "credited", held.counter, "00000000")
    assert bad.state == "tac_mismatch" and bad.unresolved  # a TAC that does not verify: held
    with pytest.raises(LoadRefused) as refused:
        b.complete("KIOSK-B", "both-1", "credited", held.counter, "00000000")
    assert refused.value.reason == "unknown_load"  # another kiosk cannot report it
    pending = b.credit(card.asn.hex().upper(), 500, "refund", "t", pending_id="refund-T-7")
    again = a.credit(card.asn.hex().upper(), 500, "refund", "t", pending_id="refund-T-7")
    assert again == pending and len(a.pending_loads(card.asn.hex().upper())) == 1


def test_a_load_open_at_another_kiosk_waits_for_it_or_for_the_operator(
    stack: Stack, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kiosk A was authorised and went silent (it may still credit the card); the card is at
    kiosk B: B is refused load_in_progress, nothing moves, until the operator decides."""
    card = stack.card(60)
    stack.authority.add_voucher("VOUCHER-A-1", AMOUNT)
    request = _request(stack, card, "kiosk-a-1", {"kind": "voucher", "code": "VOUCHER-A-1"})
    stack.authority.authorise("KIOSK-A", request)  # kiosk A: authorised, never reports
    blocked = stack.present(card, "kiosk-b-1")
    assert blocked.status == "refused" and blocked.reason == "load_in_progress", blocked
    assert not card.loads and not stack.store.pending_intents()
    decided = json.loads(
        _cli(
            capsys, monkeypatch, "loads", "--host", stack.url, "resolve", "--load-key",
            "kiosk-a-1", "--outcome", "not_credited", "--reason", "card read: counter 0",
        )
    )  # fmt: skip
    assert decided["state"] == "not_credited" and "alice" in decided["detail"]
    assert stack.authority.vouchers()[0]["load_key"] is None  # the voucher is given back
    again = stack.present(card, "kiosk-b-1", {"kind": "voucher", "code": "VOUCHER-A-1"})
    assert again.status == "loaded", again
    assert len(card.loads) == 1
    closed = stack.signed_post("/v1/admin/loads/kiosk-a-1/resolve", {})
    assert closed.status_code == 401  # an operator route, not a terminal's


# --- fare refunds and unfinished-trip corrections become pending loads (issue 13) ----------------


def _fare_fields(refund: int | None, **extra: Any) -> dict[str, Any]:
    """A purchase record's fare fields as an alighting tap writes them
    (agent.tap.context.TapContext.fare_fields)."""
    return {
        "product": "cpu",
        "fare_kind": "exit",
        "fare_base": 200,
        "fare_line": 8,
        "fare_stop": 3,
        "fare_unfinished": None,
        "fare_refund_due": refund,
        "fare_still_owed": None,
        "fare_transfer_from": None,
        **extra,
    }


def _upload(stack: Stack, records: list[Any]) -> httpx.Response:
    batch = protocol.encode_batch(KIOSK, records)
    return httpx.post(
        stack.url + protocol.records_path(KIOSK),
        content=batch.body,
        headers={"Content-Encoding": "gzip", protocol.IDEMPOTENCY_HEADER: batch.idempotency_key},
    )


def test_a_fare_refund_becomes_one_pending_load_credited_at_the_next_kiosk_load(
    stack: Stack,
) -> None:
    """An alighting tap that pre-authorised more than the trip cost records ``fare_refund_due``;
    at the host it becomes exactly one pending load for that card (re-uploads, a batch sent
    again in another split, a retry: still one), listed for the operator and loaded once at the
    kiosk. A record without the field, or with it null, owes nothing."""
    card, other = stack.card(40), stack.card(41)
    asn, other_asn = card.asn.hex().upper(), other.asn.hex().upper()
    boarding = stack.store.append_record(
        RecordBody("purchase", asn, 400, _fare_fields(None, fare_kind="entry", fare_stop=1))
    )
    alighting = stack.store.append_record(RecordBody("purchase", asn, 0, _fare_fields(200)))
    stack.store.append_record(RecordBody("purchase", other_asn, 200, {"product": "cpu"}))
    first = list(stack.store.records())
    assert _upload(stack, first[:2]).status_code == 200
    for _ in range(2):  # the same batch again (a lost answer), then the whole backlog
        assert _upload(stack, first[:2]).status_code == 200
        assert _upload(stack, first).status_code == 200
    assert _upload(stack, first[1:2]).status_code == 200  # the refund's record alone
    (pending,) = stack.authority.pending_loads(asn)
    assert (pending.source, pending.amount) == ("fare", 200)
    assert pending.id == f"fare-{KIOSK}-{alighting.seq}" and boarding.seq == alighting.seq - 1
    assert f"seq {alighting.seq}" in pending.reference and "line 8 stop 3" in pending.reference
    assert stack.authority.pending_loads(other_asn, open_only=False) == []
    assert len(stack.authority.pending_loads(open_only=False)) == 1

    listed = httpx.get(
        stack.url + "/v1/admin/loads/credits",
        params={"card": asn},
        headers={"Authorization": f"Bearer {VIEWER_TOKEN}"},
    )
    assert listed.status_code == 200
    assert [p["id"] for p in listed.json()["pending_loads"]] == [pending.id]

    result = stack.present(
        card, "fare-refund-load", {"kind": "pending", "id": pending.id}, amount=200
    )
    assert result.status == "loaded" and card.balance == BALANCE + 200
    assert stack.authority.pending_loads(asn) == []  # loaded: no longer open
    assert _upload(stack, first).status_code == 200
    (taken,) = stack.authority.pending_loads(asn, open_only=False)
    assert taken.load_key == "fare-refund-load"  # a re-upload never makes a second one


def test_forged_conflicting_or_quarantined_fare_records_make_no_pending_load(
    stack: Stack, tmp_path: Path
) -> None:
    """Only a record the host holds credits anything: a record altered after signing (refused
    at screening), a record signed by the terminal's key but conflicting with the record the
    host holds at its seq (a store restored from an old copy), and a quarantined record (its
    notice fills the slot) never become a pending load."""
    card = stack.card(42)
    asn = card.asn.hex().upper()
    held = stack.store.append_record(RecordBody("purchase", asn, 200, {"product": "cpu"}))
    assert _upload(stack, [held]).status_code == 200

    # a copy of the store from before record 1, the same device key: another record 1 (a fare
    # refund; a POS refund, which the host also credits, likewise)
    pos_refund: dict[str, FieldValue] = {
        "order_id": "ORD-1",
        "refund_id": "RF-1",
        "original_seq": 1,
        "credit": "host",
    }
    for n, body in enumerate(
        (
            RecordBody("purchase", asn, 0, _fare_fields(300)),
            RecordBody("refund_request", asn, 200, pos_refund),
        )
    ):
        clone = OfflineStore.open(tmp_path / f"clone-{n}.db", stack.device, KIOSK)
        other = clone.append_record(body)
        clone.close()
        assert other.seq == held.seq and other.hash != held.hash
        answer = _upload(stack, [other])
        assert answer.status_code == 409 and answer.json()["reason"] == "conflict", answer.text
    assert stack.authority.pending_loads(asn, open_only=False) == []

    # altered after signing: the fare refund raised from 100 to 900
    honest = stack.store.append_record(RecordBody("purchase", asn, 0, _fare_fields(100)))
    forged = dataclasses.replace(honest, fields=_fare_fields(900))
    answer = _upload(stack, [forged])
    assert answer.status_code == 422, answer.text

    # quarantined at the terminal (its row changed behind the store's back): the notice goes
    with sqlite3.connect(tmp_path / "agent.db") as conn:
        conn.execute("UPDATE records SET amount = amount + 1 WHERE seq = ?", (honest.seq,))
    assert [q.seq for q in stack.store.quarantine_scan()] == [honest.seq]
    entries = stack.store.unsent_entries(10)
    answer = _upload(stack, entries)
    assert answer.status_code == 200 and answer.json()["ack_seq"] == honest.seq, answer.text
    assert _upload(stack, entries).status_code == 200
    assert stack.authority.pending_loads(asn, open_only=False) == []


def test_a_bad_fare_refund_value_is_logged_naming_the_record_and_credits_nothing(
    stack: Stack,
) -> None:
    """A refund that is not whole fen (a terminal bug): stored as sent, never a pending load of
    a guessed amount; the error names terminal and seq."""
    card = stack.card(43)
    asn = card.asn.hex().upper()
    record = stack.store.append_record(
        RecordBody("purchase", asn, 0, _fare_fields(None, fare_refund_due="2.00"))
    )
    with capture_logs() as logs:
        assert _upload(stack, [record]).status_code == 200
    errors = [e for e in logs if e["log_level"] == "error"]
    assert errors and errors[0]["seq"] == record.seq and errors[0]["terminal_id"] == KIOSK
    assert "fare_refund_due must be a whole number of fen" in errors[0]["error"]
    assert stack.authority.pending_loads(asn, open_only=False) == []
    assert stack.host.storage.count_records(KIOSK) == 1


@pytest.fixture(params=["sqlite", "postgresql"])
def two_workers(
    request: pytest.FixtureRequest, tmp_path: Path, stack: Stack
) -> Iterator[tuple[ClearingHost, ClearingHost]]:
    """Two host workers (``cardhost host --workers 2``: each its own connections) on one
    records database and one loads database."""
    if request.param == "sqlite":
        records: str = f"sqlite:///{tmp_path / 'shared-host.db'}"
        loads: Path | str = tmp_path / "shared-loads.db"
    else:
        pg = request.getfixturevalue("pg")
        records, loads = pg.new_database(), pg.new_database()
    key = HostKey.generate()
    workers = []
    for _ in range(2):
        authority = LoadAuthority(loads, SoftwareKeyStore(stack.keyset), max_balance=MAX_BALANCE)
        workers.append(ClearingHost(open_storage(records), key, loads=authority))
    workers[0].storage.register_terminal(KIOSK, stack.device.public_key_bytes.hex())
    yield workers[0], workers[1]
    for worker in workers:
        worker.storage.close()
        assert worker.loads is not None
        worker.loads.close()


def test_two_workers_storing_one_fare_refund_at_once_make_one_pending_load(
    stack: Stack, two_workers: tuple[ClearingHost, ClearingHost]
) -> None:
    """The daemon's batch reaches two host workers at once (a retry after a timeout lands on
    the other worker): both store or see it, both reconcile it; one pending load per record."""
    a, b = two_workers
    cards = [stack.card(500 + n) for n in range(ROUNDS)]
    for n, card in enumerate(cards):
        stack.store.append_record(
            RecordBody("purchase", card.asn.hex().upper(), 0, _fare_fields(100 + n))
        )
        batch = protocol.encode_batch(KIOSK, [list(stack.store.records())[-1]])
        barrier = threading.Barrier(2)
        answers: list[int] = []

        def send(
            worker: ClearingHost,
            batch: protocol.UploadBatch,
            barrier: threading.Barrier,
            answers: list[int],
        ) -> None:
            barrier.wait(30)
            status, _ = worker.upload(KIOSK, batch.body, "gzip", batch.idempotency_key)
            answers.append(status)

        threads = [threading.Thread(target=send, args=(w, batch, barrier, answers)) for w in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
            assert not t.is_alive(), "an upload hung"
        assert answers == [200, 200]
    assert a.loads is not None and b.loads is not None
    for n, card in enumerate(cards):
        asn = card.asn.hex().upper()
        (pending,) = a.loads.pending_loads(asn, open_only=False)
        assert pending.amount == 100 + n and pending.id == f"fare-{KIOSK}-{n + 1}"
        assert b.loads.pending_loads(asn, open_only=False) == [pending]
    assert len(b.loads.pending_loads()) == ROUNDS


def test_an_unfinished_trip_left_to_the_host_is_corrected_once_by_an_operator(
    stack: Stack, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The policy's ``unfinished: "host"`` rule debits nothing more at the terminal and records
    the trip as the host's to correct; the host lists such records, and an operator's
    correction makes one pending load per record (the same again: the same one; another
    amount: refused), which the card then loads at a kiosk. Other records cannot be
    "corrected"; a correction above the fare policy's max_fare is refused."""
    stack.host.storage.publish_params(
        {"fare_policy": {"mode": "flat", "flat_fare": 200, "max_fare": 400}}
    )
    card = stack.card(44)
    asn = card.asn.hex().upper()
    plain = stack.store.append_record(RecordBody("purchase", asn, 200, {"product": "cpu"}))
    refunded = stack.store.append_record(RecordBody("purchase", asn, 0, _fare_fields(100)))
    unfinished = stack.store.append_record(
        RecordBody(
            "purchase",
            asn,
            400,
            _fare_fields(None, fare_kind="unfinished_then_entry", fare_unfinished="host"),
        )
    )
    assert _upload(stack, list(stack.store.records())).status_code == 200
    operator = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
    viewer = {"Authorization": f"Bearer {VIEWER_TOKEN}"}
    path = stack.url + "/v1/admin/loads/fare-corrections"

    listed = httpx.get(path, headers=viewer)
    assert listed.status_code == 200
    (trip,) = listed.json()["unfinished_trips"]
    assert (trip["terminal_id"], trip["seq"], trip["corrected"]) == (KIOSK, unfinished.seq, None)
    assert trip["fare_kind"] == "unfinished_then_entry" and trip["card_id"] == asn

    def correct(seq: int, amount: int, reason: str = "rider's alighting seen on camera") -> Any:
        body = {"terminal_id": KIOSK, "seq": seq, "amount": amount, "reason": reason}
        return httpx.post(path, json=body, headers=operator)

    assert httpx.post(path, json={}, headers=viewer).status_code == 403
    for seq, amount, status, code in (
        (plain.seq, 100, 422, "not_correctable"),  # not an unfinished trip
        (refunded.seq, 100, 422, "not_correctable"),
        (unfinished.seq, 401, 422, "not_correctable"),  # above max_fare
        (unfinished.seq, 0, 422, "not_correctable"),
        (99, 100, 404, "unknown_record"),
    ):
        answer = correct(seq, amount)
        assert (answer.status_code, answer.json()["error"]) == (status, code), answer.text
    assert correct(unfinished.seq, 150, reason=" ").json()["error"] == "not_correctable"

    first = correct(unfinished.seq, 150)
    assert first.status_code == 201, first.text
    assert correct(unfinished.seq, 150).json() == first.json()  # the same correction again
    again = correct(unfinished.seq, 200)
    assert (again.status_code, again.json()["error"]) == (409, "pending_exists")
    pending = first.json()
    assert pending["id"] == f"fare-{KIOSK}-{unfinished.seq}" and pending["source"] == "fare"
    assert pending["created_by"] == "operator alice" and "camera" in pending["reference"]
    (trip,) = httpx.get(path, headers=viewer).json()["unfinished_trips"]
    assert trip["corrected"] == pending["id"]

    # what the operator's command line shows and does (cardhost loads unfinished / correct)
    listing = _cli(capsys, monkeypatch, "loads", "--host", stack.url, "unfinished")
    assert listing == (
        f"{KIOSK}\t{unfinished.seq}\t{asn}\tunfinished_then_entry\tline 8 stop 3\t{pending['id']}\n"
    )
    argv = ["--terminal", KIOSK, "--seq", str(unfinished.seq), "--amount", "150"]
    shown = _cli(capsys, monkeypatch, "loads", "--host", stack.url, "correct", *argv,
                 "--reason", "rider's alighting seen on camera")  # fmt: skip
    assert json.loads(shown) == pending  # the same correction: the same pending load

    # the refund and the correction, each its own pending load, both loaded at the kiosk
    owed = {p.id: p.amount for p in stack.authority.pending_loads(asn)}
    assert owed == {f"fare-{KIOSK}-{refunded.seq}": 100, pending["id"]: 150}
    for n, (ident, amount) in enumerate(sorted(owed.items())):
        result = stack.present(card, f"fare-{n}", {"kind": "pending", "id": ident}, amount=amount)
        assert result.status == "loaded", result
    assert card.balance == BALANCE + 250 and stack.authority.pending_loads(asn) == []
