"""Trust between terminals and the clearing host: enrolment (issue 9).

The attack suite against the real host (uvicorn on 127.0.0.1, SQLite file): a terminal id is
no longer first come, first served; codes are single use and expire; the terminal proves it
holds the key it enrols; a client certificate speaks for one terminal only; lookalike ids are
refused at provisioning, in the daemon and at the host; a new device key needs an operator;
a viewer cannot create terminals. Keys and certificates are generated per test: TEST KEYS ONLY.
"""

from __future__ import annotations

import gzip
import json
import ssl
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from structlog.testing import capture_logs

from agent.offline_store import DeviceKey, Record, RecordBody
from agent.offline_store.records import GENESIS_HASH, record_to_json, seal_record
from agent.terminal_id import BadTerminalId
from agent.wiring import DEVICE_KEY_FILE, TERMINAL_FILE, DataDir
from clearinghost import cli as host_cli
from clearinghost.keys import HostKey
from clearinghost.local import start_local_sync
from clearinghost.operators import OPERATOR, TOKEN_ENV, VIEWER, Operator, Operators, hash_token
from clearinghost.server import ClearingHost, HostServer, ServerTls, create_app
from clearinghost.storage import SqliteStorage
from sync import cli as sync_cli
from sync import protocol
from sync.client import ClientTls
from sync.daemon import open_daemon
from sync.errors import HostError
from tests.test_sync_daemon import _cert, _write
from tests.test_sync_support import Terminal, daemon_for, enrol_body, fast_settings

OPERATOR_TOKEN = "enrolment-operator-token-0123456789"
VIEWER_TOKEN = "enrolment-viewer-token-0123456789"
LOOKALIKES = ("T2\u200b", "\uff342", "\u202eT2", "t2", "T2 ", "BUS/12")


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class Clock:
    """The host's clock, moved by the test (expiry without waiting)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


class Site:
    """A host as deployed: closed enrolment (the default), an operator and a viewer."""

    def __init__(self, root: Path, *, tls: ServerTls | None = None) -> None:
        self.clock = Clock()
        self.key = HostKey.generate()
        self.host = ClearingHost(
            SqliteStorage(root / "host.db"),
            self.key,
            operators=Operators(
                [
                    Operator("alice", OPERATOR, hash_token(OPERATOR_TOKEN)),
                    Operator("wall", VIEWER, hash_token(VIEWER_TOKEN)),
                ]
            ),
            clock=self.clock,
        )
        self.db = root / "host.db"
        self.server = HostServer(create_app(self.host), tls=tls)
        self.verify: ssl.SSLContext | bool = True  # an operator's TLS context (mutual TLS)

    def add(self, terminal_id: str, **fields: Any) -> httpx.Response:
        body = {"terminal_id": terminal_id, "kind": "bus", "site": "depot-3", **fields}
        return httpx.post(
            f"{self.server.url}/v1/admin/terminals",
            json=body,
            headers=auth(OPERATOR_TOKEN),
            verify=self.verify,
        )

    def code_for(self, terminal_id: str, **fields: Any) -> str:
        answer = self.add(terminal_id, **fields)
        assert answer.status_code == 201, answer.text
        return str(answer.json()["enrolment_code"])

    def rotate(self, terminal_id: str, token: str = OPERATOR_TOKEN, **body: Any) -> httpx.Response:
        return httpx.post(
            f"{self.server.url}/v1/admin/terminals/{terminal_id}/rotate-key",
            json=body,
            headers=auth(token),
            verify=self.verify,
        )


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    site = Site(tmp_path)
    with site.server:
        yield site
    site.host.storage.close()


def register(
    client: httpx.Client, terminal_id: str, key: DeviceKey, code: str | None = None
) -> httpx.Response:
    return client.post(protocol.register_path(terminal_id), json=enrol_body(terminal_id, key, code))


def error_of(answer: httpx.Response) -> tuple[int, str]:
    return answer.status_code, answer.json()["error"]


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def chain(key: DeviceKey, terminal_id: str, seqs: range, prev: str = GENESIS_HASH) -> list[Record]:
    records = []
    for seq in seqs:
        record = seal_record(
            seq=seq,
            created_at="2026-01-05T08:00:00.000Z",
            terminal_id=terminal_id,
            body=RecordBody("purchase", "03105170070100000001", 200, {"n": seq}),
            prev_hash=prev,
            sign=key.sign,
        )
        records.append(record)
        prev = record.hash
    return records


def upload(client: httpx.Client, terminal_id: str, records: list[Record]) -> httpx.Response:
    batch = protocol.encode_batch(terminal_id, records)
    return client.post(
        protocol.records_path(terminal_id),
        content=batch.body,
        headers={"Content-Encoding": "gzip", protocol.IDEMPOTENCY_HEADER: batch.idempotency_key},
    )


# --- squatting, codes, proof of possession ---------------------------------------------------


def test_a_terminal_id_cannot_be_squatted(site: Site) -> None:
    squatter, genuine = DeviceKey.generate(), DeviceKey.generate()
    with httpx.Client(base_url=site.server.url) as client:
        # no entry: closed by default, whoever comes first
        assert error_of(register(client, "BUS-0042", squatter)) == (403, "not_enrolled")
        code = site.code_for("BUS-0042")
        # the entry exists: still nothing without its code, or with another code
        assert error_of(register(client, "BUS-0042", squatter)) == (
            403,
            "enrolment_code_required",
        )
        wrong = register(client, "BUS-0042", squatter, "AAAA-BBBB-CCCC-DDDD-EEEE-FFFF")
        assert error_of(wrong) == (403, "bad_code") and "BUS-0042" in wrong.json()["detail"]
        assert site.host.storage.terminal("BUS-0042") is None
        # the genuine terminal with its code (as typed: case and dashes do not matter)
        typed = code.lower().replace("-", " ")
        answer = register(client, "BUS-0042", genuine, typed)
        assert answer.status_code == 201, answer.text
        held = site.host.storage.terminal("BUS-0042")
        assert held is not None and held.public_key == genuine.public_key_bytes.hex()
        # afterwards: the same key again is fine, the squatter is a conflict forever
        assert register(client, "BUS-0042", genuine).status_code == 200
        assert error_of(register(client, "BUS-0042", squatter)) == (409, "key_conflict")


def test_codes_are_single_use_expire_and_are_stored_hashed(site: Site) -> None:
    first, second = DeviceKey.generate(), DeviceKey.generate()
    with httpx.Client(base_url=site.server.url) as client:
        code = site.code_for("BUS-0001")
        assert register(client, "BUS-0001", first, code).status_code == 201
        # a second device with the same code: used
        assert error_of(register(client, "BUS-0001", second, code)) == (403, "code_used")
        # an expired code, then a fresh one from the operator
        late = site.code_for("BUS-0002", code_ttl_s=600)
        site.clock.offset = 601
        assert error_of(register(client, "BUS-0002", second, late)) == (403, "code_expired")
        assert site.host.storage.terminal("BUS-0002") is None
        fresh = site.rotate("BUS-0002")
        assert fresh.status_code == 200, fresh.text
        renewed = fresh.json()["enrolment_code"]
        assert error_of(register(client, "BUS-0002", second, late)) == (403, "bad_code")
        assert register(client, "BUS-0002", second, renewed).status_code == 201
    stored = b"".join(p.read_bytes() for p in site.db.parent.glob("host.db*"))
    for shown in (code, late, renewed):
        assert shown.encode() not in stored
        assert protocol.normalise_code(shown).encode() not in stored


def test_one_device_racing_itself_with_its_code_is_enrolled_once(site: Site) -> None:
    # a daemon's scheduler and a heartbeat may register at once: both send the same key and code
    code = site.code_for("BUS-SELF")
    device = DeviceKey.generate()
    bodies = [enrol_body("BUS-SELF", device, code) for _ in range(8)]
    path = site.server.url + protocol.register_path("BUS-SELF")
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda body: httpx.post(path, json=body), bodies))
    assert sorted(a.status_code for a in answers) == [200] * 7 + [201], [a.text for a in answers]
    held = site.host.storage.terminal("BUS-SELF")
    assert held is not None and held.public_key == device.public_key_bytes.hex()


def test_one_code_enrols_one_device_however_many_race(site: Site) -> None:
    code = site.code_for("BUS-RACE")
    devices = [DeviceKey.generate() for _ in range(8)]
    bodies = [enrol_body("BUS-RACE", device, code) for device in devices]
    path = site.server.url + protocol.register_path("BUS-RACE")
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda body: httpx.post(path, json=body), bodies))
    winners = [n for n, answer in enumerate(answers) if answer.status_code == 201]
    assert len(winners) == 1, [a.text for a in answers]
    losers = [error_of(a) for n, a in enumerate(answers) if n != winners[0]]
    assert losers == [(403, "code_used")] * (len(bodies) - 1)
    held = site.host.storage.terminal("BUS-RACE")
    assert held is not None and held.public_key == devices[winners[0]].public_key_bytes.hex()


def test_cardhost_host_enrolment_is_closed_unless_opened(tmp_path: Path) -> None:
    common = ["host", "--db", str(tmp_path / "h.db"), "--key", str(tmp_path / "h.key")]
    closed = host_cli.build_host(host_cli._parser().parse_args(common), Operators())
    assert closed.open_registration is False
    closed.storage.close()
    args = host_cli._parser().parse_args([*common, "--open-registration"])
    opened = host_cli.build_host(args, Operators())
    assert opened.open_registration is True
    opened.storage.close()


def test_the_terminal_must_prove_it_holds_the_key(site: Site) -> None:
    genuine, other = DeviceKey.generate(), DeviceKey.generate()
    code = site.code_for("BUS-0007")
    now = int(time.time())
    with httpx.Client(base_url=site.server.url) as client:
        path = protocol.register_path("BUS-0007")
        # the genuine public key, signed by another key (someone who saw the key and the code)
        forged = protocol.enrolment_request(
            "BUS-0007", genuine.public_key_bytes, other.sign, code, now
        )
        assert error_of(client.post(path, json=forged)) == (403, "bad_proof")
        # a genuine signature for another terminal id, or for another code
        elsewhere = protocol.enrolment_request(
            "BUS-0008", genuine.public_key_bytes, genuine.sign, code, now
        )
        assert error_of(client.post(path, json=elsewhere)) == (403, "bad_proof")
        swapped = dict(enrol_body("BUS-0007", genuine, "X" * 24), enrolment_code=code)
        assert error_of(client.post(path, json=swapped)) == (403, "bad_proof")
        # no signature at all, a signature that is not hex
        unsigned = {"public_key": genuine.public_key_bytes.hex(), "issued_at": now}
        assert error_of(client.post(path, json=unsigned)) == (400, "bad_request")
        garbage = dict(enrol_body("BUS-0007", genuine, code), signature="zz")
        assert error_of(client.post(path, json=garbage)) == (403, "bad_proof")
        # a message signed two days ago
        stale = protocol.enrolment_request(
            "BUS-0007", genuine.public_key_bytes, genuine.sign, code, now - 2 * 86400
        )
        assert error_of(client.post(path, json=stale)) == (403, "stale_proof")
        assert site.host.storage.terminal("BUS-0007") is None
        # none of that used the code up
        assert register(client, "BUS-0007", genuine, code).status_code == 201


def test_a_pre_registered_key_enrols_without_a_code(site: Site) -> None:
    device, other = DeviceKey.generate(), DeviceKey.generate()
    answer = site.add("POS-0001", public_key=device.public_key_bytes.hex())
    assert answer.status_code == 201 and "enrolment_code" not in answer.json()
    with httpx.Client(base_url=site.server.url) as client:
        assert error_of(register(client, "POS-0001", other)) == (403, "unexpected_key")
        assert register(client, "POS-0001", device).status_code == 201
        assert error_of(register(client, "POS-0001", other)) == (409, "key_conflict")
    assert site.add("POS-0001").status_code == 409  # an id is added once


# --- key rotation -------------------------------------------------------------------------------


def test_key_rotation_needs_an_operator_and_retires_the_old_key(site: Site) -> None:
    old, new, third = DeviceKey.generate(), DeviceKey.generate(), DeviceKey.generate()
    code = site.code_for("BUS-ROT")
    with httpx.Client(base_url=site.server.url) as client:
        assert register(client, "BUS-ROT", old, code).status_code == 201
        before = chain(old, "BUS-ROT", range(1, 4))
        assert upload(client, "BUS-ROT", before).json()["ack_seq"] == 3
        # a plain register with another key, with or without the used code: refused
        assert error_of(register(client, "BUS-ROT", new)) == (409, "key_conflict")
        assert error_of(register(client, "BUS-ROT", new, code)) == (403, "code_used")
        # a viewer cannot authorise it
        assert site.rotate("BUS-ROT", VIEWER_TOKEN).status_code == 403
        assert site.rotate("NOT-THERE").status_code == 404
        rotation = site.rotate("BUS-ROT")
        assert rotation.status_code == 200, rotation.text
        # until the terminal uses it, the old key still counts
        assert register(client, "BUS-ROT", old).status_code == 200
        rotated = register(client, "BUS-ROT", new, rotation.json()["enrolment_code"])
        assert rotated.status_code == 200 and rotated.json()["status"] == "rotated"
        assert rotated.json()["ack_seq"] == 3  # the chain carries on
        # the old key stops working: its records are refused, its register is a conflict
        stale = upload(client, "BUS-ROT", chain(old, "BUS-ROT", range(4, 5), before[-1].hash))
        assert stale.status_code == 422 and stale.json()["reason"] == "bad_signature"
        assert error_of(register(client, "BUS-ROT", old)) == (409, "key_conflict")
        fresh = chain(new, "BUS-ROT", range(4, 6), before[-1].hash)
        assert upload(client, "BUS-ROT", fresh).json()["ack_seq"] == 5
        # a rotation to a pre-registered key
        assert site.rotate("BUS-ROT", public_key=third.public_key_bytes.hex()).status_code == 200
        assert error_of(register(client, "BUS-ROT", old)) == (409, "key_conflict")
        assert register(client, "BUS-ROT", third).json()["status"] == "rotated"
        assert error_of(register(client, "BUS-ROT", new)) == (409, "key_conflict")


# --- operators ----------------------------------------------------------------------------------


def test_viewer_cannot_create_terminals_and_operator_lists_them(site: Site) -> None:
    url = f"{site.server.url}/v1/admin/terminals"
    body = {"terminal_id": "BUS-0100", "kind": "bus", "site": "depot-1"}
    assert httpx.post(url, json=body).status_code == 401
    viewer = httpx.post(url, json=body, headers=auth(VIEWER_TOKEN))
    assert error_of(viewer) == (403, "forbidden")
    assert site.host.storage.terminal_entry("BUS-0100") is None
    assert site.add("BUS-0100").status_code == 201
    listing = httpx.get(url, headers=auth(VIEWER_TOKEN)).json()["terminals"]
    assert listing == [
        {
            "terminal_id": "BUS-0100",
            "kind": "bus",
            "site": "depot-3",
            "enrolled": False,
            "key_id": None,
            "code_pending": True,
            "code_expires_at": listing[0]["code_expires_at"],
            "key_pending": False,
            "created_by": "alice",
        }
    ]
    for bad in ({"terminal_id": "bus-0100"}, {"terminal_id": "BUS-0101", "site": 7}, {}):
        assert httpx.post(url, json=bad, headers=auth(OPERATOR_TOKEN)).status_code == 400, bad


def test_cardhost_terminal_commands(
    site: Site, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(host_cli, "configure_logging", lambda *args: None)
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    base = ["terminal", "--host", site.server.url]
    assert host_cli.main([*base, "add", "BUS-0200"]) == 2  # no operator token
    monkeypatch.setenv(TOKEN_ENV, VIEWER_TOKEN)
    assert host_cli.main([*base, "add", "BUS-0200"]) == 2  # a viewer
    assert site.host.storage.terminal_entry("BUS-0200") is None
    monkeypatch.setenv(TOKEN_ENV, OPERATOR_TOKEN)
    capsys.readouterr()
    assert host_cli.main([*base, "add", "BUS-0200", "--kind", "bus", "--site", "line-9"]) == 0
    shown = capsys.readouterr()
    code = last_line(shown.out)  # (the host's own logs go to this stdout in-process)
    assert "shown once" in shown.err and code not in shown.err
    assert host_cli.main([*base, "add", "BUS/12"]) == 2  # refused before anything is sent
    assert "BUS/12" in capsys.readouterr().err
    device = DeviceKey.generate()
    with httpx.Client(base_url=site.server.url) as client:
        assert register(client, "BUS-0200", device, code).status_code == 201
    assert host_cli.main([*base, "rotate-key", "BUS-0200"]) == 0
    new_code = last_line(capsys.readouterr().out)
    assert new_code and new_code != code
    monkeypatch.setenv(TOKEN_ENV, VIEWER_TOKEN)
    assert host_cli.main([*base, "list"]) == 0
    line = last_line(capsys.readouterr().out).split("\t")
    assert line[:4] == ["BUS-0200", "bus", "line-9", "enrolled, code pending"]


# --- the daemon ------------------------------------------------------------------------------


def test_daemon_enrols_once_with_its_code_file(tmp_path: Path, site: Site) -> None:
    terminal = Terminal.provision(tmp_path, "BUS-0300")
    for _ in range(4):
        terminal.tap()
    settings = fast_settings(site.server.url, site.key, retries=0)
    daemon = daemon_for(terminal, settings)
    with pytest.raises(HostError) as refused:
        daemon.upload_pending()  # no entry, no code: nothing registered, nothing lost
    assert refused.value.code == "not_enrolled"
    daemon.close()
    code_file = tmp_path / "enrolment.code"
    code_file.write_text(site.code_for("BUS-0300") + "\n")
    args = sync_cli._parser().parse_args(
        [
            "run",
            "--data-dir",
            str(terminal.data_dir),
            "--host",
            site.server.url,
            "--host-public-key",
            site.key.public_key_hex(),
            "--enrolment-code-file",
            str(code_file),
        ]
    )
    from_cli = sync_cli.settings_from(args)
    code = code_file.read_text().strip()
    assert from_cli.enrolment_code == code and code not in repr(from_cli)
    with capture_logs() as logs:
        daemon = daemon_for(terminal, fast_settings(site.server.url, site.key, enrolment_code=code))
        assert daemon.upload_pending().ack_seq == 4
        daemon.send_heartbeat()
        daemon.close()
    assert code not in json.dumps(logs, default=str)
    # enrolled: a restarted daemon needs no code (the code is spent anyway)
    terminal.tap()
    daemon = daemon_for(terminal, fast_settings(site.server.url, site.key))
    assert daemon.upload_pending().ack_seq == 5
    daemon.close()
    assert dict(site.host.storage.record_keys("BUS-0300")) == terminal.written
    terminal.store.close()


def test_local_sync_enrols_through_an_entry(tmp_path: Path) -> None:
    data_dir = tmp_path / "device"
    DataDir(data_dir).provision("DEMO-0001")
    local = start_local_sync(data_dir)
    try:
        assert not local.host.open_registration
        local.daemon.send_heartbeat()
        entry = local.host.storage.terminal_entry("DEMO-0001")
        assert entry is not None and entry.code_used_at is not None
        assert local.host.storage.terminal("DEMO-0001") is not None
    finally:
        local.stop()


# --- terminal ids ----------------------------------------------------------------------------


@pytest.mark.parametrize("terminal_id", LOOKALIKES)
def test_lookalike_ids_are_refused_at_provisioning(tmp_path: Path, terminal_id: str) -> None:
    path = tmp_path / "device"
    with pytest.raises(BadTerminalId, match="upper-case ASCII"):
        DataDir(path).provision(terminal_id)
    assert not (path / TERMINAL_FILE).exists() and not (path / DEVICE_KEY_FILE).exists()


def test_the_daemon_refuses_a_data_dir_with_a_bad_id(tmp_path: Path) -> None:
    data_dir = tmp_path / "device"
    DataDir(data_dir).provision("T2")
    (data_dir / TERMINAL_FILE).write_text(json.dumps({"terminal_id": "T2\u200b"}))
    with pytest.raises(BadTerminalId, match="U\\+200B"):
        open_daemon(data_dir, fast_settings("http://127.0.0.1:9", HostKey.generate()))
    assert not (data_dir / "agent.db").exists()


def test_lookalike_ids_are_refused_on_every_host_route(site: Site) -> None:
    device = DeviceKey.generate()
    with httpx.Client(base_url=site.server.url) as client:
        assert error_of(register(client, "T2\u200b", device)) == (400, "bad_terminal_id")
        assert register(client, "T2", device, site.code_for("T2")).status_code == 201
        records = chain(device, "T2", range(1, 2))
        for lookalike in LOOKALIKES[:-1]:  # "BUS/12" cannot even be a path segment
            for answer in (
                site.add(lookalike),
                register(client, lookalike, device),
                client.post(protocol.heartbeat_path(lookalike), json={}),
                client.post(
                    protocol.records_path(lookalike),
                    content=gzip.compress((record_to_json(records[0]) + "\n").encode()),
                    headers={"Content-Encoding": "gzip"},
                ),
                client.get(protocol.records_path(lookalike), headers=auth(VIEWER_TOKEN)),
                site.rotate(lookalike),
            ):
                assert error_of(answer) == (400, "bad_terminal_id"), (lookalike, answer.text)
                assert "upper-case ASCII" in answer.json()["detail"]
        anomalies = client.get(
            "/v1/anomalies", params={"terminal_id": "T2\u200b"}, headers=auth(VIEWER_TOKEN)
        )
        assert error_of(anomalies) == (400, "bad_terminal_id")
    assert [t.terminal_id for t in site.host.storage.terminals()] == ["T2"]
    assert [e.terminal_id for e in site.host.storage.terminal_entries()] == ["T2"]


# --- mutual TLS: a certificate speaks for one terminal ----------------------------------------


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    directory = tmp_path / "pki"
    directory.mkdir()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("cardsync test CA", ca_key, None, ca_key, ca=True)
    paths = {"ca": _write(directory, "ca", ca, ca_key)[0]}
    server_key = ec.generate_private_key(ec.SECP256R1())
    cert = _cert("127.0.0.1", server_key, ca, ca_key, server=True)
    paths["server_cert"], paths["server_key"] = _write(directory, "server", cert, server_key)
    for name in ("BUS-TA", "BUS-TB"):
        key = ec.generate_private_key(ec.SECP256R1())
        paths[f"{name}.crt"], paths[f"{name}.key"] = _write(
            directory, name, _cert(name, key, ca, ca_key), key
        )
    return paths


def test_a_client_certificate_is_bound_to_its_terminal_id(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    tls = ServerTls(pki["server_cert"], pki["server_key"], client_ca_file=pki["ca"])
    site = Site(tmp_path, tls=tls)
    tb = Terminal.provision(tmp_path, "BUS-TB")
    for _ in range(3):
        tb.tap()
    ta_tls = ClientTls(pki["ca"], pki["BUS-TA.crt"], pki["BUS-TA.key"])
    tb_tls = ClientTls(pki["ca"], pki["BUS-TB.crt"], pki["BUS-TB.key"])
    tb_key = DeviceKey.load(tb.data_dir / DEVICE_KEY_FILE)
    site.verify = ta_tls.context()  # operators present a certificate too; any from the CA
    with site.server:
        with httpx.Client(base_url=site.server.url, verify=ta_tls.context()) as client:
            squat = register(client, "BUS-TB", DeviceKey.generate())  # TA speaking as TB
            assert error_of(squat) == (403, "certificate_mismatch"), squat.text
        code = site.code_for("BUS-TB")
        # TB's daemon holding TA's certificate: refused before anything is bound
        wrong_cert = fast_settings(site.server.url, site.key, tls=ta_tls, enrolment_code=code)
        wrong = daemon_for(tb, wrong_cert)
        with pytest.raises(HostError) as refused:
            wrong.upload_pending()
        assert refused.value.code == "certificate_mismatch" and "BUS-TA" in str(refused.value)
        wrong.close()
        assert site.host.storage.terminal("BUS-TB") is None
        right_cert = fast_settings(site.server.url, site.key, tls=tb_tls, enrolment_code=code)
        right = daemon_for(tb, right_cert)
        assert right.upload_pending().ack_seq == 3
        right.close()
        tb.tap()
        pending = list(tb.store.unsent_records(10))
        context: ssl.SSLContext = ta_tls.context()
        with httpx.Client(base_url=site.server.url, verify=context) as client:
            answers = (
                register(client, "BUS-TB", tb_key),
                client.post(protocol.heartbeat_path("BUS-TB"), json={}),
                upload(client, "BUS-TB", pending),
            )
            for answer in answers:
                assert error_of(answer) == (403, "certificate_mismatch"), answer.text
                assert "BUS-TA" in answer.json()["detail"] and "BUS-TB" in answer.json()["detail"]
            # TA's certificate does work for TA
            ta_key = DeviceKey.generate()
            assert register(client, "BUS-TA", ta_key, site.code_for("BUS-TA")).status_code == 201
            assert client.post(protocol.heartbeat_path("BUS-TA"), json={}).status_code == 200
    held = site.host.storage.terminal("BUS-TB")
    assert held is not None and held.ack_seq == 3 and held.heartbeat is None
    site.host.storage.close()
    tb.store.close()


def test_enrolment_is_documented() -> None:
    spec = Path(__file__).resolve().parents[1] / "clearinghost" / "openapi.json"
    paths = json.loads(spec.read_text(encoding="utf-8"))["paths"]
    assert {"/v1/admin/terminals", "/v1/admin/terminals/{terminal_id}/rotate-key"} <= set(paths)
    register_body = paths["/v1/terminals/{terminal_id}/register"]["post"]["requestBody"]
    schema = register_body["content"]["application/json"]["schema"]
    assert {"public_key", "issued_at", "signature"} <= set(schema["required"])
