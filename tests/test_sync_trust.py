"""Records must verify to count, and acknowledgements must be the host's (issue 9).

* the real host on 127.0.0.1 refuses, with a 4xx naming the seq, a record signed by another key,
  a record whose chain link is broken and a record of another terminal; none of them takes a
  ``(terminal, seq)`` slot or moves the acknowledgement, and the terminal's genuine records are
  then stored and acknowledged: nothing is lost;
* forged records sent ahead of the terminal are refused and do not block its genuine ones;
* a stand-in host (``http.server`` on 127.0.0.1) answering ``ack_seq = last, stored = 0``
  unsigned, signed with another key, or signed but inconsistent, makes the daemon mark and
  compact nothing (a logged error, then backoff).

Keys here are generated per test: TEST KEYS ONLY.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from agent.blacklist import key_id_of
from agent.offline_store import DeviceKey, Record, RecordBody
from agent.offline_store.records import (
    canonical_json,
    record_from_json,
    record_to_json,
    seal_record,
)
from agent.wiring import DEVICE_KEY_FILE
from clearinghost.keys import HostKey
from clearinghost.server import HostServer, create_app
from clearinghost.storage import SqliteStorage
from sync import protocol
from sync.errors import ProtocolError
from tests.test_sync_support import Terminal, daemon_for, fast_settings, make_host


def post_records(client: httpx.Client, url_terminal: str, records: list[Record]) -> httpx.Response:
    """What an attacker sends: any records, any terminal in the URL, a matching key."""
    raw = "".join(record_to_json(r) + "\n" for r in records).encode()
    key = f"{records[0].seq}-{records[-1].seq}-{hashlib.sha256(raw).hexdigest()[:32]}"
    return client.post(
        protocol.records_path(url_terminal),
        content=gzip.compress(raw),
        headers={"Content-Encoding": "gzip", protocol.IDEMPOTENCY_HEADER: key},
    )


def forge(
    genuine: Record,
    *,
    sign: Any,
    prev_hash: str | None = None,
    terminal_id: str | None = None,
    amount: int = 1,
) -> Record:
    return seal_record(
        seq=genuine.seq,
        created_at=genuine.created_at,
        terminal_id=terminal_id or genuine.terminal_id,
        body=RecordBody(genuine.kind, genuine.card_id, amount, dict(genuine.fields)),
        prev_hash=genuine.prev_hash if prev_hash is None else prev_hash,
        sign=sign,
    )


def test_records_that_do_not_verify_are_refused_and_lose_nothing(tmp_path: Path) -> None:
    host_key = HostKey.generate()
    terminal = Terminal.provision(tmp_path, "BUS-TRUST")
    device = DeviceKey.load(terminal.data_dir / DEVICE_KEY_FILE)
    host = make_host(SqliteStorage(tmp_path / "host.db"), host_key)
    with HostServer(create_app(host)) as server, httpx.Client(base_url=server.url) as client:
        daemon = daemon_for(terminal, fast_settings(server.url, host_key))
        for _ in range(3):
            terminal.tap()
        assert daemon.upload_pending().ack_seq == 3
        genuine = [terminal.tap() for _ in range(3)]  # 4, 5, 6: not uploaded yet
        four = genuine[0]
        attacks = {
            "bad_signature": forge(four, sign=DeviceKey.generate().sign),
            "chain_break": forge(four, sign=device.sign, prev_hash="ab" * 32),
            "wrong_terminal": forge(four, sign=device.sign, terminal_id="BUS-OTHER"),
        }
        for reason, record in attacks.items():
            answer = post_records(client, "BUS-TRUST", [record])
            assert 400 <= answer.status_code < 500, (reason, answer.status_code, answer.text)
            body = answer.json()
            assert (body["seq"], body["reason"]) == (4, reason), body
            held = host.storage.terminal("BUS-TRUST")
            assert held is not None and held.ack_seq == 3, reason
            assert [s for s, _ in host.storage.record_keys("BUS-TRUST")] == [1, 2, 3], reason
        # a captured genuine #4 followed by a forged #5: #4 counts, nothing from #5 on
        forged_five = forge(genuine[1], sign=DeviceKey.generate().sign)
        answer = post_records(client, "BUS-TRUST", [four, forged_five, genuine[2]])
        assert answer.status_code == 422 and answer.json()["seq"] == 5, answer.text
        assert answer.json()["stored"] == 1 and answer.json()["ack_seq"] == 4
        assert dict(host.storage.record_keys("BUS-TRUST")) == {
            s: terminal.written[s] for s in (1, 2, 3, 4)
        }
        # the terminal's own upload: everything stored and acknowledged, nothing lost
        assert daemon.upload_pending().ack_seq == 6
        assert dict(host.storage.record_keys("BUS-TRUST")) == terminal.written
        assert terminal.store.acknowledged_seq() == 6
        daemon.close()
    host.storage.close()
    terminal.store.close()


def test_forged_records_ahead_of_the_terminal_do_not_block_it(tmp_path: Path) -> None:
    host_key = HostKey.generate()
    terminal = Terminal.provision(tmp_path, "BUS-AHEAD")
    host = make_host(SqliteStorage(tmp_path / "host.db"), host_key)
    with HostServer(create_app(host)) as server, httpx.Client(base_url=server.url) as client:
        daemon = daemon_for(terminal, fast_settings(server.url, host_key, batch_size=4))
        for _ in range(6):
            terminal.tap()
        assert daemon.upload_pending().ack_seq == 6
        # an attacker who saw record 6 builds 7..12 ahead of the terminal with another key
        sixth = next(terminal.store.records(since_seq=5, limit=1), None)
        prev = sixth.hash if sixth is not None else "00" * 32
        liar = DeviceKey.generate()
        forged: list[Record] = []
        for seq in range(7, 13):
            forged.append(
                seal_record(
                    seq=seq,
                    created_at="2024-05-01T08:00:00.000Z",
                    terminal_id="BUS-AHEAD",
                    body=RecordBody("purchase", "0310000000000001", 1, {"n": seq}),
                    prev_hash=prev,
                    sign=liar.sign,
                )
            )
            prev = forged[-1].hash
        for batch in (forged, forged[2:], forged[-1:]):
            answer = post_records(client, "BUS-AHEAD", batch)
            assert 400 <= answer.status_code < 500, answer.text
            assert answer.json()["seq"] == batch[0].seq
        assert [s for s, _ in host.storage.record_keys("BUS-AHEAD")] == list(range(1, 7))
        for _ in range(6):
            terminal.tap()
        assert daemon.upload_pending().ack_seq == 12
        assert dict(host.storage.record_keys("BUS-AHEAD")) == terminal.written
        daemon.close()
    host.storage.close()
    terminal.store.close()


# --- a stand-in host ------------------------------------------------------------------------------


def signed(fields: dict[str, Any], key: HostKey) -> dict[str, Any]:
    """An answer signed as clearinghost/openapi.json documents it (computed here independently)."""
    names = (
        "terminal_id",
        "idempotency_key",
        "last_seq",
        "last_hash",
        "ack_seq",
        "ack_hash",
        "stored",
        "duplicates",
    )
    data = b"CARDSYNC-ACK-V1\n" + canonical_json({n: fields[n] for n in names}).encode()
    return dict(
        fields, key_id=key_id_of(key.public_key_bytes).hex(), signature=key.sign(data).hex()
    )


class StandIn:
    """A host impostor on 127.0.0.1: registers anyone, acknowledges every batch in full."""

    def __init__(self, mode: str, pinned: HostKey) -> None:
        self.mode, self.pinned, self.uploads = mode, pinned, 0
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                if self.path.endswith("/register"):
                    self.answer(201, {"ack_seq": 0})
                    return
                stand_in.uploads += 1
                self.answer(200, stand_in.ack(self.path, self.headers, body))

            def answer(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def ack(self, path: str, headers: Any, body: bytes) -> dict[str, Any]:
        key = headers.get(protocol.IDEMPOTENCY_HEADER)
        lines = gzip.decompress(body).decode().splitlines()
        last = record_from_json(lines[-1])
        fields: dict[str, Any] = {
            "terminal_id": last.terminal_id,
            "idempotency_key": key,
            "last_seq": last.seq,
            "last_hash": last.hash,
            "ack_seq": last.seq,
            "ack_hash": last.hash,
            "stored": 0,
            "duplicates": 0,
            "conflicts": 0,
            "anomalies": 0,
        }
        if self.mode == "unsigned":
            return fields
        if self.mode == "other_key":
            return signed(dict(fields, stored=len(lines)), HostKey.generate())
        if self.mode == "inconsistent":  # the pinned key, but stored = 0 over unsent records
            return signed(fields, self.pinned)
        if self.mode == "other_batch":  # the pinned key, an answer to another batch
            return signed(dict(fields, stored=len(lines), last_hash="cd" * 32), self.pinned)
        raise AssertionError(self.mode)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> StandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(params=["unsigned", "other_key", "inconsistent", "other_batch"])
def stand_in(request: pytest.FixtureRequest) -> Iterator[tuple[StandIn, HostKey]]:
    pinned = HostKey.generate()
    with StandIn(request.param, pinned) as server:
        yield server, pinned


def test_daemon_marks_and_compacts_nothing_on_an_untrusted_ack(
    tmp_path: Path, stand_in: tuple[StandIn, HostKey]
) -> None:
    server, pinned = stand_in
    terminal = Terminal.provision(tmp_path, "BUS-IMPOSTOR")
    for _ in range(6):
        terminal.tap()
    settings = fast_settings(server.url, pinned, retries=0, compact_after_s=0.0, batch_size=10)
    daemon = daemon_for(terminal, settings)
    with pytest.raises(ProtocolError):
        daemon.upload_pending()
    assert server.uploads == 1
    assert terminal.store.acknowledged_seq() == 0
    assert terminal.store.count_unsent() == 6
    assert [r.seq for r in terminal.store.records()] == [1, 2, 3, 4, 5, 6]  # nothing compacted
    # through the scheduler's job: a logged error, then backoff
    with capture_logs() as logs:
        assert daemon._job("upload", daemon.upload_pending) is None
    assert any(e["log_level"] == "error" and "refused" in e["event"] for e in logs), logs
    state = daemon._jobs["upload"]
    assert state.failures == 1 and state.last_error and state.not_before > 0
    assert terminal.store.acknowledged_seq() == 0 and terminal.store.count_records() == 6
    daemon.close()
    terminal.store.close()
