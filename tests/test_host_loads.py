"""The load routes of a real clearing host (uvicorn on 127.0.0.1, SQLite), reached by the
kiosk's HTTP client with the card simulator behind the in-process reader driver."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agent.crypto import Algorithm
from agent.offline_store import DeviceKey, OfflineStore
from agent.sam.keys import KeySet
from agent.tap.load import KioskLoader
from agent.tap.load_http import SIGNATURE_HEADER, HttpLoadHost, load_signed_bytes
from clearinghost.keys import HostKey
from clearinghost.keystore import SoftwareKeyStore, load_test_keys
from clearinghost.loads import LoadAuthority
from clearinghost.operators import VIEWER, Operator, Operators, hash_token
from clearinghost.server import ClearingHost, HostServer, create_app
from clearinghost.storage import SqliteStorage
from tests.fake_reader.inprocess import CardField, InProcessReader
from tests.fake_reader.scenario import TERMINAL_NUMBER, demo_keyset, demo_profile, make_card

KIOSK = "KIOSK-0001"
VIEWER_TOKEN = "loads-viewer-token-0123456789"
AMOUNT = 2000


@dataclasses.dataclass
class Stack:
    url: str
    device: DeviceKey
    loader: KioskLoader
    client: HttpLoadHost
    keyset: KeySet
    authority: LoadAuthority
    reader: InProcessReader
    field: CardField


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    keyset = KeySet([*demo_keyset(), *load_test_keys()])
    authority = LoadAuthority(tmp_path / "loads.db", SoftwareKeyStore(keyset), max_balance=100000)
    host = ClearingHost(
        SqliteStorage(tmp_path / "host.db"),
        HostKey.generate(),
        operators=Operators([Operator("wall", VIEWER, hash_token(VIEWER_TOKEN))]),
        loads=authority,
    )
    key_path = tmp_path / "device.key"
    DeviceKey.create(key_path)
    device = DeviceKey.load(key_path)
    host.storage.register_terminal(KIOSK, device.public_key_bytes.hex())
    store = OfflineStore.open(tmp_path / "agent.db", device, KIOSK)
    with HostServer(create_app(host), log_level="critical") as server:
        client = HttpLoadHost(server.url, KIOSK, device)
        profile = dataclasses.replace(demo_profile(), max_balance=100000)
        loader = KioskLoader(profile, store, client, TERMINAL_NUMBER)
        field = CardField()
        yield Stack(
            server.url, device, loader, client, keyset, authority, InProcessReader(field), field
        )
        client.close()
    store.close()
    authority.close()
    host.storage.close()


def _present(stack: Stack, card: object, key: str) -> str:
    stack.field.insert(card)
    assert stack.reader.wait_for_card(0) is not None
    try:
        result = stack.loader.load(stack.reader, AMOUNT, {"kind": "cash", "amount": AMOUNT}, key)
    finally:
        stack.field.remove()
    return result.status


@pytest.mark.parametrize("algorithm", [Algorithm.TDES, Algorithm.SM4], ids=["3des", "sm4"])
def test_load_over_http_is_authorised_credited_and_tac_verified(
    stack: Stack, algorithm: Algorithm
) -> None:
    card = make_card("tunion", 3, stack.keyset, balance=100, algorithm=algorithm)
    assert _present(stack, card, "kiosk-order-1") == "loaded"
    assert card.balance == 100 + AMOUNT
    answer = httpx.get(stack.url + "/v1/loads", headers={"Authorization": f"Bearer {VIEWER_TOKEN}"})
    assert answer.status_code == 200
    (load,) = answer.json()["loads"]
    assert load["state"] == "completed" and load["tac"] == card.loads[0].tac.hex().upper()


def _signed_post(
    stack: Stack, path: str, payload: dict[str, object], key: DeviceKey
) -> httpx.Response:
    body = json.dumps(payload).encode()
    signature = key.sign(load_signed_bytes(KIOSK, "POST", path, body))
    return httpx.post(
        stack.url + path,
        content=body,
        headers={"Content-Type": "application/json", SIGNATURE_HEADER: signature.hex()},
    )


def test_unsigned_or_foreign_signed_requests_are_refused(stack: Stack) -> None:
    path = f"/v1/terminals/{KIOSK}/loads"
    unsigned = httpx.post(stack.url + path, json={"load_key": "x"})
    assert unsigned.status_code == 401 and unsigned.json()["error"] == "bad_signature"
    foreign = _signed_post(stack, path, {"load_key": "x"}, DeviceKey.generate())
    assert foreign.status_code == 401
    own = _signed_post(stack, path, {"load_key": "x"}, stack.device)
    assert own.status_code == 400 and own.json()["error"] == "bad_request"  # past the signature
    assert not stack.authority.loads()


def test_forged_mac1_over_http_is_422(stack: Stack) -> None:
    payload = {
        "load_key": "forged-1",
        "asn": "5170070100000001",
        "factors": ["5170070100000001", "01011000FFFFFFFF"],
        "key_index": 1,
        "key_version": 1,
        "algorithm": 0,
        "balance": 0,
        "counter": 0,
        "random": "11223344",
        "mac1": "DEADBEEF",
        "amount": AMOUNT,
        "terminal": TERMINAL_NUMBER.hex(),
        "datetime": "20261130120000",
        "payment": {"kind": "cash", "amount": AMOUNT},
    }
    answer = _signed_post(stack, f"/v1/terminals/{KIOSK}/loads", payload, stack.device)
    assert answer.status_code == 422 and answer.json()["error"] == "bad_mac1"


def test_torn_credit_is_recovered_over_http_without_a_second_authorisation(stack: Stack) -> None:
    card = make_card("tunion", 4, stack.keyset, balance=100)
    card.reset_command_count()
    card.faults.add(6, "tear_after")  # CREDIT FOR LOAD committed, its answer lost
    assert _present(stack, card, "kiosk-order-2") == "torn"
    (held,) = stack.authority.loads()
    assert held.state == "authorised"  # the host shows the outcome it does not know yet
    assert _present(stack, card, "kiosk-order-2") == "recovered"
    assert len(card.loads) == 1 and card.balance == 100 + AMOUNT
    (done,) = stack.authority.loads()
    assert done.state == "completed"


def test_cardhost_host_options_turn_loads_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agent.errors import ConfigurationError
    from clearinghost.cli import _parser, build_host
    from tests.fake_reader.scenario import DEMO_PROFILE

    base = ["host", "--db", str(tmp_path / "h.db"), "--key", str(tmp_path / "host.key")]
    plain = build_host(_parser().parse_args(base), Operators())
    assert plain.loads is None  # without --loads-db the load routes answer 503
    plain.storage.close()
    args = _parser().parse_args(
        [*base, "--profile", str(DEMO_PROFILE), "--loads-db", str(tmp_path / "loads.db")]
    )
    host = build_host(args, Operators())
    assert host.loads is not None and host.loads.max_balance == demo_profile().max_balance
    host.loads.close()
    host.storage.close()
    monkeypatch.delenv("CARDHOST_PKCS11_PIN", raising=False)
    with pytest.raises(ConfigurationError, match="pkcs11"):
        build_host(
            _parser().parse_args(
                [*base, "--loads-db", str(tmp_path / "l2.db"), "--load-keys", "pkcs11"]
            ),
            Operators(),
        )
