"""The anomaly table stays bounded (issue 9: every refused upload added one anomaly row, so a
terminal, or anyone uploading for it, could grow the host's database without limit).

A refusal of a kind a terminal already had is counted (repeats, last seen, last seq and detail)
on its first occurrence's row, which is never lost. Real host (uvicorn) on 127.0.0.1.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agent.offline_store import DeviceKey, RecordBody
from agent.offline_store.records import GENESIS_HASH, Record, seal_record
from clearinghost.keys import HostKey
from clearinghost.operators import VIEWER, Operators
from clearinghost.server import ClearingHost, HostServer, create_app
from clearinghost.storage import SqliteStorage
from sync import protocol

TERMINAL = "BUS-ANOMALY"
TOKEN = "anomaly-viewer-token-0123456789"


def record(seq: int, sign: DeviceKey, prev_hash: str = GENESIS_HASH) -> Record:
    return seal_record(
        seq=seq,
        created_at="2024-01-01T00:00:00.000Z",
        terminal_id=TERMINAL,
        body=RecordBody("purchase", "03105170070100000009", 200, {"product": "test"}),
        prev_hash=prev_hash,
        sign=sign.sign,
    )


class Site:
    def __init__(self, root: Path) -> None:
        self.device = DeviceKey.generate()
        self.host = ClearingHost(
            SqliteStorage(root / "host.db"),
            HostKey.generate(),
            operators=Operators.with_token("wall", VIEWER, TOKEN),
        )
        self.server = HostServer(create_app(self.host))
        self.client: httpx.Client

    def upload(self, records: list[Record]) -> httpx.Response:
        batch = protocol.encode_batch(TERMINAL, records)
        headers = {
            "Content-Encoding": "gzip",
            protocol.IDEMPOTENCY_HEADER: batch.idempotency_key,
        }
        return self.client.post(
            protocol.records_path(TERMINAL), content=batch.body, headers=headers
        )

    def rows(self) -> int:
        with self.host.storage._transaction() as tx:  # the table itself, not the API's view
            row = tx.one("SELECT COUNT(*) FROM anomalies")
        assert row is not None
        return int(row[0])


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    site = Site(tmp_path)
    with site.server, httpx.Client(base_url=site.server.url, timeout=30) as client:
        site.client = client
        key = site.device.public_key_bytes.hex()
        site.host.storage.register_terminal(TERMINAL, key)  # enrolled (tests/test_enrolment.py)
        yield site
    site.host.storage.close()


def test_repeated_refusals_count_on_the_first_row(site: Site) -> None:
    forger = DeviceKey.generate()
    for seq in range(1, 61):  # 60 forged uploads, each refused
        answer = site.upload([record(seq, forger)])
        assert answer.status_code == 422, answer.text
        assert answer.json()["reason"] == "bad_signature"
    assert site.rows() == 1
    listed = site.client.get("/v1/anomalies", headers={"Authorization": f"Bearer {TOKEN}"})
    (only,) = listed.json()["anomalies"]
    assert (only["kind"], only["seq"], only["repeats"], only["last_seq"]) == (
        "bad_signature",
        1,  # the first occurrence is kept as it was
        59,
        60,
    )
    assert "record 1" in only["detail"] and "record 60" in only["last_detail"]
    assert only["last_seen"] >= only["found_at"]


def test_each_kind_keeps_its_first_occurrence(site: Site) -> None:
    first = record(1, site.device)
    for _ in range(20):
        assert site.upload([record(5, site.device)]).status_code == 409  # gap
        assert site.upload([record(1, DeviceKey.generate())]).status_code == 422
    assert site.upload([first]).status_code == 200
    for _ in range(20):  # a different record at a held seq
        assert site.upload([record(1, site.device, "1" * 64)]).status_code == 409
    kinds = {a["kind"]: a for a in site.host.storage.anomalies()}
    assert set(kinds) == {"gap", "bad_signature", "conflict"}
    assert site.rows() == 3
    assert [kinds[k]["repeats"] for k in ("gap", "bad_signature", "conflict")] == [19, 19, 19]


def test_findings_of_stored_records_are_not_folded(site: Site) -> None:
    previous = GENESIS_HASH
    records = []
    for seq in range(1, 4):
        unresolved = seal_record(
            seq=seq,
            created_at="2024-01-01T00:00:00.000Z",
            terminal_id=TERMINAL,
            body=RecordBody("unresolved", "03105170070100000009", 200, {"product": "test"}),
            prev_hash=previous,
            sign=site.device.sign,
        )
        previous = unresolved.hash
        records.append(unresolved)
    assert site.upload(records).status_code == 200
    found = site.host.storage.anomalies()
    assert sorted(a["seq"] for a in found) == [1, 2, 3]
    assert all(a["kind"] == "unresolved" and a["repeats"] == 0 for a in found)
