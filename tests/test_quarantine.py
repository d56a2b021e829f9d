"""A corrupted record is quarantined, never a silent stop (issue 9).

The fault: one record's content in the agent's SQLite file changed behind its back (the file
still passes ``PRAGMA integrity_check``). Before quarantine, an unparsable record failed every
later tap of its card and stopped the daemon's upload locally; an altered one was trusted by
the double-tap lookup and refused by the host (422) at every upload, blocking everything after
it. Now, for each fault of the matrix, on real stores, the real engine over the simulated card
and PSAM, and the real host served by uvicorn on 127.0.0.1:

* the agent starts (the data directory is opened as ``cardagent run`` opens it) and logs an
  error naming terminal and seq;
* the next tap of that card is paid (the corrupted record is skipped), another card's double
  tap is still refused;
* ``records verify`` and ``cardsync status`` name / count it;
* the upload goes past it: the host holds a ``quarantined`` slot at its seq, an anomaly naming
  terminal and seq, every other record, and acknowledges them all; the verbatim row stays in
  the terminal's quarantine table after compaction.

Forged notices (another key, a seq the host holds with another hash, a gap) are refused and
replace nothing. Keys are generated per test: TEST KEYS ONLY.
"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import hashlib
import json
import sqlite3
from collections.abc import Iterator, MutableMapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from agent import cli as agent_cli
from agent.offline_store import DeviceKey, OfflineStore, QuarantineNotice
from agent.offline_store.records import format_timestamp, seal_notice
from agent.transaction import TransactionEngine
from agent.wiring import DEVICE_KEY_FILE, TERMINAL_FILE, DataDir
from clearinghost.keys import HostKey
from clearinghost.server import HostServer, create_app, operator_page
from clearinghost.storage import SqliteStorage
from sync import cli as sync_cli
from sync import protocol
from tests.fake_reader.scenario import make_card
from tests.rig import TERMINAL_ID, Rig
from tests.test_sync_support import Terminal, daemon_for, fast_settings, make_host

CARDS = 4  # card n pays record n
COLUMNS = (
    "seq",
    "created_at",
    "terminal_id",
    "kind",
    "card_id",
    "amount",
    "fields",
    "prev_hash",
    "hash",
    "signature",
)

# (name, seq, SQL run on that seq): content changes the hash or signature no longer covers
FAULTS = {
    "amount": (2, "UPDATE records SET amount = amount + 100 WHERE seq = ?"),
    "signature": (2, f"UPDATE records SET signature = '{'7' * 128}' WHERE seq = ?"),
    "unparsable_body": (2, "UPDATE records SET fields = '{\"tac\": ' WHERE seq = ?"),
    "hash_column": (2, f"UPDATE records SET hash = '{'ab' * 32}' WHERE seq = ?"),
    "newest": (CARDS, f"UPDATE records SET prev_hash = '{'cd' * 32}' WHERE seq = ?"),
    "first": (1, "UPDATE records SET created_at = '2099-01-01T00:00:00.000Z' WHERE seq = ?"),
}


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    rig = Rig(tmp_path / "rig")
    (rig.directory / TERMINAL_FILE).write_text(json.dumps({"terminal_id": TERMINAL_ID}))
    # a window that no test outlasts: a second tap of a card is refused unless its record
    # is skipped (no timing: the outcome does not depend on how long the test takes)
    rig.profile = dataclasses.replace(rig.profile, double_tap_window_s=3600.0)
    rig.engine = TransactionEngine(rig.profile, rig.store, rig.sam)
    yield rig
    rig.close()


def corrupt(db_path: Path, sql: str, seq: int) -> None:
    """Change one record with plain SQL, as a disk fault or a careless hand would."""
    raw = sqlite3.connect(db_path)
    try:
        assert raw.execute(sql, (seq,)).rowcount == 1
        raw.commit()
        assert raw.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        raw.close()


def start_agent(rig: Rig) -> OfflineStore:
    """Open the data directory as ``cardagent run`` does and put the engine on it."""
    rig.abandoned.append(rig.store)
    rig.store = DataDir(rig.directory).open_store()
    rig.engine = TransactionEngine(rig.profile, rig.store, rig.sam)
    return rig.store


def quarantine_errors(logs: Sequence[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["log_level"] == "error" and e["event"].startswith("record quar")]


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_corrupted_record_is_quarantined_and_nothing_stops(
    rig: Rig, tmp_path: Path, fault: str
) -> None:
    cards = [make_card("tunion", n, rig.keyset) for n in range(1, CARDS + 1)]
    for card in cards:
        assert rig.tap(card).status == "paid"
    seq, sql = FAULTS[fault]
    before = dict(sqlite3.connect(rig.db_path).execute("SELECT seq, hash FROM records").fetchall())
    corrupt(rig.db_path, sql, seq)
    stored_row = (
        sqlite3.connect(rig.db_path)
        .execute("SELECT * FROM records WHERE seq = ?", (seq,))
        .fetchone()
    )

    # the agent starts and says which record
    with capture_logs() as logs:
        store = start_agent(rig)
    (error,) = quarantine_errors(logs)
    assert (error["terminal_id"], error["seq"]) == (TERMINAL_ID, seq), error
    assert error["problem"], error
    assert [q.seq for q in store.quarantined()] == [seq]

    # the next tap of that card works; another card's double tap is still caught
    retap = rig.tap(cards[seq - 1])
    assert (retap.status, retap.record_seq) == ("paid", CARDS + 1), retap.reason
    other = cards[seq % CARDS]
    assert rig.tap(other).reason.startswith("double_tap"), "lookups of intact records still work"

    # records verify names it (and only it); the chain goes on past it
    report = store.verify()
    assert not report.ok
    assert report.problems == [
        f"record {seq} quarantined: {error['problem']} (kept verbatim, reported)"
    ], report.problems

    # the upload goes past it and the host reports it
    host_key = HostKey.generate()
    host = make_host(SqliteStorage(tmp_path / "host.db"), host_key)
    with HostServer(create_app(host)) as server:
        daemon = daemon_for(
            Terminal(TERMINAL_ID, rig.directory, store), fast_settings(server.url, host_key)
        )
        with capture_logs() as logs:
            upload = daemon.upload_pending()
        daemon.close()
    assert upload.ack_seq == CARDS + 1 and upload.quarantined == [seq]
    assert [e["seq"] for e in logs if e["event"] == "quarantined record sent as a notice"] == [seq]
    held = host.storage.terminal(TERMINAL_ID)
    assert held is not None and held.ack_seq == CARDS + 1
    slots = {r["seq"]: r for r in host.storage.records(TERMINAL_ID, 0, 100)}
    assert sorted(slots) == list(range(1, CARDS + 2))
    notice = slots.pop(seq)
    assert notice["notice"] == "quarantine" and notice["terminal_id"] == TERMINAL_ID
    # the hash the next record chains onto is the one the record was written with
    assert notice["chain_hash"] == before[seq]
    raw_row = json.loads(base64.b64decode(notice["raw"]))
    assert raw_row == dict(zip(COLUMNS, stored_row, strict=True)), "the row travels verbatim"
    assert all("notice" not in r and r["kind"] == "purchase" for r in slots.values())
    anomalies = [(a["seq"], a["kind"]) for a in host.storage.anomalies(TERMINAL_ID)]
    assert anomalies == [(seq, "quarantined")]
    (anomaly,) = host.storage.anomalies(TERMINAL_ID)
    assert f"terminal {TERMINAL_ID} record {seq}" in anomaly["detail"]
    assert f"record {seq} is corrupted" in operator_page(host)
    host.storage.close()

    # acknowledged and compacted: the corrupted row is still kept, verbatim, on the terminal
    assert store.acknowledged_seq() == CARDS + 1
    if fault != "first":  # a record "created" in 2099 holds compaction back (double-tap data)
        assert store.count_records() == 0
    raw = sqlite3.connect(rig.db_path)
    kept = raw.execute(f"SELECT {', '.join(COLUMNS)} FROM quarantine").fetchall()
    raw.close()
    assert kept == [stored_row]


def test_cli_tools_name_and_count_quarantined_records(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    for n in (1, 2, 3):
        assert rig.tap(make_card("tunion", n, rig.keyset)).status == "paid"
    corrupt(rig.db_path, FAULTS["amount"][1], 2)
    start_agent(rig)
    capsys.readouterr()

    assert agent_cli.main(["records", "verify", "--db", str(rig.db_path)]) == 1
    out = capsys.readouterr().out
    assert "FAIL record 2 quarantined: its content does not match its hash" in out, out
    assert "record 3" not in out, "the chain goes on past the quarantined record"

    assert sync_cli.main(["status", "--data-dir", str(rig.directory)]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert (figures["quarantined_records"], figures["quarantined_seqs"]) == (1, [2])


def test_a_record_corrupted_while_running_is_quarantined_where_it_is_read(
    rig: Rig, tmp_path: Path
) -> None:
    """No restart: the card's lookup finds it on its next tap, the daemon's upload too."""
    cards = [make_card("tunion", n, rig.keyset) for n in (1, 2, 3)]
    store = start_agent(rig)
    host_key = HostKey.generate()
    host = make_host(SqliteStorage(tmp_path / "host.db"), host_key)
    with HostServer(create_app(host)) as server:
        daemon = daemon_for(
            Terminal(TERMINAL_ID, rig.directory, store), fast_settings(server.url, host_key)
        )
        for card in cards:
            assert rig.tap(card).status == "paid"
        corrupt(rig.db_path, FAULTS["unparsable_body"][1], 1)
        corrupt(rig.db_path, FAULTS["signature"][1], 3)
        with capture_logs() as logs:
            assert rig.tap(cards[0]).status == "paid"  # was: a store error, every tap
            upload = daemon.upload_pending()  # was: a store error before sending anything
        daemon.close()
    assert [e["seq"] for e in quarantine_errors(logs)] == [1, 3]
    assert upload.ack_seq == 4 and upload.quarantined == [1, 3]
    assert sorted((a["seq"], a["kind"]) for a in host.storage.anomalies()) == [
        (1, "quarantined"),
        (3, "quarantined"),
    ]
    host.storage.close()


# --- forged notices ------------------------------------------------------------------------------


def post(client: httpx.Client, entries: Sequence[Any]) -> httpx.Response:
    raw = "".join(protocol.entry_to_json(e) + "\n" for e in entries).encode()
    key = f"{entries[0].seq}-{entries[-1].seq}-{hashlib.sha256(raw).hexdigest()[:32]}"
    return client.post(
        protocol.records_path(entries[0].terminal_id),
        content=gzip.compress(raw),
        headers={"Content-Encoding": "gzip", protocol.IDEMPOTENCY_HEADER: key},
    )


def notice(seq: int, chain_hash: str, sign: Any, terminal_id: str = "BUS-Q") -> QuarantineNotice:
    return seal_notice(
        seq=seq,
        terminal_id=terminal_id,
        quarantined_at=format_timestamp(datetime.now(UTC)),
        reason="forged for the test",
        chain_hash=chain_hash,
        raw=b"{}",
        sign=sign,
    )


def test_forged_notices_are_refused_and_replace_nothing(tmp_path: Path) -> None:
    host_key = HostKey.generate()
    terminal = Terminal.provision(tmp_path, "BUS-Q")
    device = DeviceKey.load(terminal.data_dir / DEVICE_KEY_FILE)
    stranger = DeviceKey.generate()
    host = make_host(SqliteStorage(tmp_path / "host.db"), host_key)
    with HostServer(create_app(host)) as server, httpx.Client(base_url=server.url) as client:
        daemon = daemon_for(terminal, fast_settings(server.url, host_key, compact_after_s=None))
        for _ in range(3):
            terminal.tap()
        assert daemon.upload_pending().ack_seq == 3
        held = host.storage.record_keys("BUS-Q")
        attempts = {
            # another key: a thief without the device key cannot fill a slot
            "bad_signature": (422, notice(4, "cd" * 32, stranger.sign)),
            # the device key cannot replace a record the host holds
            "conflict": (409, notice(2, "cd" * 32, device.sign)),
            # nor skip ahead of the acknowledgement
            "gap": (409, notice(5, "cd" * 32, device.sign)),
        }
        for reason, (status, forged) in attempts.items():
            answer = post(client, [forged])
            assert answer.status_code == status, (reason, answer.text)
            assert (answer.json()["seq"], answer.json()["reason"]) == (forged.seq, reason)
            assert host.storage.record_keys("BUS-Q") == held, reason
        # a notice another terminal's URL carries is refused too
        other = notice(4, "cd" * 32, device.sign, terminal_id="BUS-OTHER")
        raw = (protocol.entry_to_json(other) + "\n").encode()
        answer = client.post(
            protocol.records_path("BUS-Q"),
            content=raw,
            headers={protocol.IDEMPOTENCY_HEADER: f"4-4-{hashlib.sha256(raw).hexdigest()[:32]}"},
        )
        assert answer.status_code == 422 and answer.json()["reason"] == "wrong_terminal"
        # a notice naming the hash the host holds is a harmless duplicate: the record stays
        answer = post(client, [notice(2, dict(held)[2], device.sign)])
        assert answer.status_code == 200 and answer.json()["duplicates"] == 1, answer.text
        assert host.storage.records("BUS-Q", 1, 1)[0]["kind"] == "purchase"
        assert host.storage.record_keys("BUS-Q") == held
        assert [
            a["seq"] for a in host.storage.anomalies("BUS-Q") if a["kind"] == "quarantined"
        ] == []
        # the terminal's own records still go through
        terminal.tap()
        assert daemon.upload_pending().ack_seq == 4
        assert dict(host.storage.record_keys("BUS-Q")) == terminal.written
        daemon.close()
    host.storage.close()
    terminal.store.close()


def test_the_start_scan_checks_what_the_host_does_not_hold_yet(rig: Rig) -> None:
    """Records the host has acknowledged are its evidence already: the start scan covers the
    unacknowledged backlog (its cost does not grow with history); ``records verify`` checks all."""
    for n in (1, 2, 3):
        assert rig.tap(make_card("tunion", n, rig.keyset)).status == "paid"
    assert rig.store.mark_acknowledged(2) >= 0
    corrupt(rig.db_path, FAULTS["amount"][1], 1)  # acknowledged: the host holds the original
    corrupt(rig.db_path, FAULTS["signature"][1], 3)  # not acknowledged: must be caught at start
    with capture_logs() as logs:
        store = start_agent(rig)
    assert [e["seq"] for e in quarantine_errors(logs)] == [3]
    assert [q.seq for q in store.quarantined()] == [3]
    report = store.verify()
    assert not report.ok
    assert any(p.startswith("record 1 ") for p in report.problems), report.problems
