"""Device key rotation end to end (issue 9 leftover, issue 12): ``cardagent keys rotate`` on the
device, the agent's cut-over at its next start, the sync daemon against a real clearing host on
127.0.0.1 (closed enrolment, an operator). Records signed before the rotation with the old key
and after it with the new key are all acknowledged; none is lost; the host never receives a
record signed by a key it does not hold; the old private key goes only once the host has
accepted the new key and acknowledged everything the old one signed."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from agent import cli as agent_cli
from agent.console.device import Device
from agent.console.restart import RESTART_FLAG_FILE
from agent.errors import StoreError
from agent.offline_store import DeviceKey, OfflineStore, RecordBody
from agent.offline_store.device_key import verify_signature
from agent.wiring import (
    DEVICE_KEY_FILE,
    NEXT_DEVICE_KEY_FILE,
    OLD_DEVICE_KEY_FILE,
    DataDir,
)
from sync.daemon import open_daemon
from sync.errors import HostError
from tests.test_enrolment import Site
from tests.test_sync_support import fast_settings

TERMINAL = "BUS-ROT1"


def tap(store: OfflineStore, n: int) -> int:
    body = RecordBody("purchase", f"0310517007{n:010d}", 200, {"product": "test", "n": n})
    return store.append_record(body).seq


@pytest.fixture
def site(tmp_path: Path) -> Site:
    (tmp_path / "host").mkdir()
    return Site(tmp_path / "host")


def test_rotation_end_to_end_against_a_real_host(
    tmp_path: Path, site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "device"
    old_key = DataDir(data_dir).provision(TERMINAL)
    agent_store = DataDir(data_dir).open_store(cut_over=True)  # the agent at its start
    before = [tap(agent_store, n) for n in range(6)]
    with site.server:
        code = site.code_for(TERMINAL)
        settings = fast_settings(site.server.url, site.key, enrolment_code=code, batch_size=2)
        daemon = open_daemon(data_dir, settings, rng=random.Random(0))
        try:
            assert daemon.upload_pending(max_batches=1).ack_seq == 2  # part of the old records

            # the technician rotates the key while the agent runs
            assert agent_cli.main(["keys", "rotate", "--data-dir", str(data_dir)]) == 0
            new_key = DeviceKey.load(data_dir / NEXT_DEVICE_KEY_FILE)
            assert new_key.public_key_bytes.hex() in capsys.readouterr().out
            assert (data_dir / RESTART_FLAG_FILE).exists()  # the agent is asked to restart
            shown = dict(Device(data_dir).status())
            assert shown["key_rotation"].startswith("pending")
            assert shown["device_key_next"] == new_key.key_id
            before.append(agent_store.last_seq())  # the rotation's signed maintenance record
            with pytest.raises(StoreError, match="a new device key"):
                DataDir(data_dir).create_next_key()  # one rotation at a time
            before.append(tap(agent_store, 6))  # still the old key until the restart
            agent_store.close()
            console = DataDir(data_dir).open_store()  # another writer, holding the old key

            # the agent's restart: it cuts over, the old key is kept for the daemon
            agent_store = DataDir(data_dir).open_store(cut_over=True)
            assert DeviceKey.load(data_dir / DEVICE_KEY_FILE).key_id == new_key.key_id
            assert DeviceKey.load(data_dir / OLD_DEVICE_KEY_FILE).key_id == old_key.key_id
            assert not (data_dir / NEXT_DEVICE_KEY_FILE).exists()
            assert dict(Device(data_dir).status())["key_rotation"].startswith("in progress")
            after = [tap(agent_store, n) for n in range(10, 15)]
            cut = after[0]
            assert before == list(range(1, cut))  # 7 taps and the maintenance record
            # a handle still holding the old key is refused, nothing written
            with pytest.raises(StoreError, match="a key rotation"):
                tap(console, 99)
            console.close()
            with pytest.raises(StoreError, match="refusing to open it"):
                OfflineStore.open(data_dir / "agent.db", old_key, TERMINAL)

            # the host has not authorised the new key yet: the old key's records all go, the
            # new key is offered and refused, its records wait (nothing lost, nothing marked)
            with pytest.raises(HostError) as refused:
                daemon.upload_pending()
            assert refused.value.status == 409 and refused.value.code == "key_conflict"
            assert daemon.store.acknowledged_seq() == cut - 1
            assert [s for s, _ in site.host.storage.record_keys(TERMINAL)] == before
            assert (data_dir / OLD_DEVICE_KEY_FILE).exists()

            # the operator authorises the new key; the next upload enrols it and sends the rest
            answer = site.rotate(TERMINAL, public_key=new_key.public_key_bytes.hex())
            assert answer.status_code == 200, answer.text
            report = daemon.upload_pending()
            assert report.ack_seq == after[-1] and daemon.store.acknowledged_seq() == after[-1]
            terminal = site.host.storage.terminal(TERMINAL)
            assert terminal is not None
            assert terminal.public_key == new_key.public_key_bytes.hex()
            assert not (data_dir / OLD_DEVICE_KEY_FILE).exists()  # retired
            shown = dict(Device(data_dir).status())
            assert (shown["key_rotation"], shown["device_key_id"]) == ("none", new_key.key_id)
            daemon.send_heartbeat()  # registers nothing old again
        finally:
            daemon.close()
        at_host = site.host.storage.records(TERMINAL, limit=1000)
        assert [r["seq"] for r in at_host] == before + after  # every record, once, in order
        for record in at_host:
            key = old_key if record["seq"] < cut else new_key
            assert verify_signature(
                key.public_key_bytes,
                bytes.fromhex(record["signature"]),
                bytes.fromhex(record["hash"]),
            ), record["seq"]
        assert site.host.storage.anomalies(TERMINAL) == []
    # the device's own chain verifies across both keys; nothing is quarantined at the next start
    assert agent_store.verify().ok
    agent_store.close()
    reopened = DataDir(data_dir).open_store(cut_over=True)
    try:
        assert reopened.quarantined() == [] and reopened.verify().ok
        assert [len(reopened.key_epochs().keys), reopened.key_epochs().firsts[-1]] == [2, cut]
    finally:
        reopened.close()
    assert agent_cli.main(["records", "verify", "--data-dir", str(data_dir)]) == 0
    assert agent_cli.main(["keys", "status", "--data-dir", str(data_dir)]) == 0
    status = capsys.readouterr().out
    assert f"key {old_key.key_id} signs records 1..{cut - 1}" in status
    assert f"key {new_key.key_id} signs records {cut}.." in status
    site.host.storage.close()


def test_a_cut_over_cut_short_is_finished_at_the_next_start(tmp_path: Path) -> None:
    data_dir = tmp_path / "device"
    old_key = DataDir(data_dir).provision(TERMINAL)
    store = DataDir(data_dir).open_store(cut_over=True)
    tap(store, 1)
    new_key = DataDir(data_dir).create_next_key()
    store.rotate_key(new_key)  # the store signs with the new key; the files did not move
    store.close()
    reopened = DataDir(data_dir).open_store(cut_over=True)
    try:
        assert DeviceKey.load(data_dir / DEVICE_KEY_FILE).key_id == new_key.key_id
        assert DeviceKey.load(data_dir / OLD_DEVICE_KEY_FILE).key_id == old_key.key_id
        assert tap(reopened, 2) == 2 and reopened.verify().ok
    finally:
        reopened.close()
    # crashed between the two renames: device.key gone, the new key still waiting
    third = DataDir(data_dir)
    (data_dir / OLD_DEVICE_KEY_FILE).unlink()  # the daemon retired it (host accepted)
    newest = third.create_next_key()
    with third.open_store(cut_over=False) as store:
        store.rotate_key(newest)
    (data_dir / DEVICE_KEY_FILE).replace(data_dir / OLD_DEVICE_KEY_FILE)
    with third.open_store(cut_over=True) as store:
        assert DeviceKey.load(data_dir / DEVICE_KEY_FILE).key_id == newest.key_id
        assert tap(store, 3) == 3 and store.verify().ok
        assert len(store.key_epochs().keys) == 3


def test_keys_rotate_at_the_console(tmp_path: Path) -> None:
    """The technician's console: shown first, applied on confirm, one rotation at a time, a
    signed maintenance record naming both key ids; only public keys on the line."""
    from tests.test_console import FakeClock, fields, maintenance, provisioned, start_console

    data_dir = provisioned(tmp_path)
    old_key = DeviceKey.load(data_dir / DEVICE_KEY_FILE)
    console = start_console(tmp_path, data_dir, FakeClock())
    try:
        assert console.login()[-1] == "OK logged in"
        shown = console.ask("keys rotate")
        assert fields(shown)["old"] == old_key.key_id and fields(shown)["confirm"] == "required"
        assert console.ask("no")[-1].startswith("ERR cancelled")
        assert not (data_dir / NEXT_DEVICE_KEY_FILE).exists()
        applied = console.ask("keys rotate --yes")
        assert applied[-1] == "OK applied", applied
        new_key = DeviceKey.load(data_dir / NEXT_DEVICE_KEY_FILE)
        assert fields(applied)["new_key_id"] == new_key.key_id
        assert fields(applied)["public_key"] == new_key.public_key_bytes.hex()
        assert (data_dir / RESTART_FLAG_FILE).exists()
        assert console.ask("keys rotate --yes")[-1].startswith("ERR rotation_in_progress")
        transcript = "\n".join(shown + applied)
        from cryptography.hazmat.primitives import serialization

        pem = (data_dir / NEXT_DEVICE_KEY_FILE).read_bytes()
        private = serialization.load_pem_private_key(pem, password=None).private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        assert private.hex() not in transcript.lower() and b"PRIVATE" not in transcript.encode()
    finally:
        console.close()
    (record,) = maintenance(data_dir)
    assert (record.fields["what"], record.fields["old"], record.fields["new"]) == (
        "device key rotation",
        old_key.key_id,
        new_key.key_id,
    )
