"""Record encoding, chain verification (including tampering through raw SQLite), export."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import sqlite3
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from agent.errors import StoreError
from agent.offline_store import (
    GENESIS_HASH,
    DeviceKey,
    OfflineStore,
    Record,
    RecordBody,
    export_records,
    load_exported,
    verify_chain,
    verify_signature,
)
from agent.offline_store.records import (
    canonical_bytes,
    format_timestamp,
    record_to_json,
    seal_record,
)

TERMINAL = "T-0001"
FIXED_KEY = DeviceKey(Ed25519PrivateKey.from_private_bytes(bytes(range(32))))


@pytest.fixture
def key() -> DeviceKey:
    return DeviceKey.generate()


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "store.db"


@pytest.fixture
def store(store_path: Path, key: DeviceKey):
    with OfflineStore.open(store_path, key, TERMINAL) as opened:
        for n in range(5):
            opened.append_record(RecordBody("purchase", f"card-{n}", 100 + n, {"tac": f"{n:08X}"}))
        yield opened


@pytest.fixture
def raw(store_path: Path, store: OfflineStore):
    connection = sqlite3.connect(store_path, isolation_level=None)
    yield connection
    connection.close()


def chain_of(count: int, key: DeviceKey = FIXED_KEY) -> list[Record]:
    records: list[Record] = []
    prev_hash = GENESIS_HASH
    for n in range(1, count + 1):
        record = seal_record(
            seq=n,
            created_at=f"2024-05-01T08:30:{n:02d}.000Z",
            terminal_id=TERMINAL,
            body=RecordBody("purchase", "card-a", n, {"tac": f"{n:08X}"}),
            prev_hash=prev_hash,
            sign=key.sign,
        )
        records.append(record)
        prev_hash = record.hash
    return records


# --- canonical encoding --------------------------------------------------------------------


def test_canonical_bytes_are_sorted_compact_utf8_json_without_hash_and_signature() -> None:
    body = RecordBody(
        "purchase",
        "3101000012345678",
        200,
        {
            "tac": "A1B2C3D4",
            "站": "人民广场",
            "balance_after": 1800,
            "transfer": True,
            "line": None,
        },
    )

    encoded = canonical_bytes(1, "2024-05-01T08:30:00.005Z", TERMINAL, body, GENESIS_HASH)

    assert (
        encoded
        == (
            '{"amount":200,"card_id":"3101000012345678","created_at":"2024-05-01T08:30:00.005Z",'
            '"fields":{"balance_after":1800,"line":null,"tac":"A1B2C3D4","transfer":true,'
            '"站":"人民广场"},"kind":"purchase","prev_hash":"' + "0" * 64 + '","seq":1,'
            '"terminal_id":"T-0001"}'
        ).encode()
    )


def test_seal_hashes_the_canonical_bytes_and_signs_the_digest() -> None:
    body = RecordBody("purchase", "card-a", 200, {"tac": "A1B2C3D4"})

    record = seal_record(
        seq=7,
        created_at="2024-05-01T08:30:00.000Z",
        terminal_id=TERMINAL,
        body=body,
        prev_hash="ab" * 32,
        sign=FIXED_KEY.sign,
    )

    digest = hashlib.sha256(record.canonical_bytes()).digest()
    assert record.hash == digest.hex()
    assert verify_signature(FIXED_KEY.public_key_bytes, bytes.fromhex(record.signature), digest)
    assert record.body == body
    assert record == seal_record(
        seq=7,
        created_at="2024-05-01T08:30:00.000Z",
        terminal_id=TERMINAL,
        body=body,
        prev_hash="ab" * 32,
        sign=FIXED_KEY.sign,
    )
    assert len({record}) == 1


def test_record_body_fields_are_frozen_copies() -> None:
    fields: dict[str, str | int | bool | None] = {"tac": "A1B2C3D4"}
    body = RecordBody("purchase", "card-a", 200, fields)
    fields["tac"] = "changed"

    assert body.fields == {"tac": "A1B2C3D4"}
    with pytest.raises(TypeError):
        body.fields["tac"] = "changed"  # type: ignore[index]


@pytest.mark.parametrize(
    ("kind", "card_id", "amount", "fields", "error"),
    [
        ("purchase", "card-a", -1, {}, ValueError),
        ("purchase", "card-a", 2**63, {}, ValueError),
        ("purchase", "card-a", True, {}, TypeError),
        ("purchase", "card-a", 1.5, {}, TypeError),
        ("", "card-a", 1, {}, ValueError),
        ("purchase", "", 1, {}, ValueError),
        ("purchase", "card-a", 1, {"balance": 1.5}, TypeError),
        ("purchase", "card-a", 1, {"nested": {"a": 1}}, TypeError),
        ("purchase", "card-a", 1, {"mac": b"\x01"}, TypeError),
        ("purchase", "card-a", 1, {"": "x"}, ValueError),
        ("purchase", "card-\ud800", 1, {}, ValueError),
    ],
)
def test_record_body_rejects_values_without_a_canonical_encoding(
    kind: object, card_id: object, amount: object, fields: object, error: type[Exception]
) -> None:
    with pytest.raises(error):
        RecordBody(kind, card_id, amount, fields)  # type: ignore[arg-type]


def test_timestamps_are_utc_with_milliseconds() -> None:
    beijing = timezone(timedelta(hours=8))

    assert format_timestamp(datetime(2024, 5, 1, 16, 30, 0, 123_999, tzinfo=beijing)) == (
        "2024-05-01T08:30:00.123Z"
    )
    assert format_timestamp(datetime(2024, 5, 1, tzinfo=UTC)) == "2024-05-01T00:00:00.000Z"
    with pytest.raises(ValueError, match="timezone-aware"):
        format_timestamp(datetime(2024, 5, 1))


# --- verify_chain --------------------------------------------------------------------------


def test_a_clean_chain_verifies() -> None:
    records = chain_of(5)

    report = verify_chain(records, FIXED_KEY.public_key_bytes, expected_last_seq=5)

    assert report.ok
    assert report.checked == 5
    assert report.problems == []


def test_a_compacted_chain_verifies_from_its_anchor() -> None:
    records = chain_of(5)

    good = verify_chain(
        records[2:], FIXED_KEY.public_key_bytes, anchor_seq=2, anchor_hash=records[1].hash
    )
    bad = verify_chain(
        records[2:], FIXED_KEY.public_key_bytes, anchor_seq=2, anchor_hash=records[0].hash
    )

    assert good.ok
    assert bad.problems == [
        "record 3 does not link to the chain anchor (seq 2): prev_hash mismatch "
        "(records reordered, replaced or re-linked)"
    ]


def test_reordered_records_are_named() -> None:
    records = chain_of(5)
    records[1], records[2] = records[2], records[1]

    report = verify_chain(records, FIXED_KEY.public_key_bytes, expected_last_seq=5)

    assert report.problems == [
        "record 2 missing: sequence jumps from 1 to 3",
        "record 2 out of order: it comes after record 3",
    ]


def test_records_signed_by_another_key_are_named() -> None:
    report = verify_chain(chain_of(2), DeviceKey.generate().public_key_bytes)

    assert report.problems == [
        "record 1 has a bad signature (forged, or signed by another key)",
        "record 2 has a bad signature (forged, or signed by another key)",
    ]


def test_an_empty_chain_with_an_expected_tail_is_truncated() -> None:
    report = verify_chain([], FIXED_KEY.public_key_bytes, expected_last_seq=2)

    assert not report.ok
    assert report.problems == ["records 1..2 missing at the end"]


def test_verify_chain_rejects_a_malformed_public_key() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        verify_chain(chain_of(1), b"\x00" * 31)


# --- the stored chain, tampered with through raw SQLite ------------------------------------


def test_a_clean_store_verifies(store: OfflineStore) -> None:
    report = store.verify()

    assert report.ok
    assert report.checked == 5


def test_a_deleted_middle_record_is_named(store: OfflineStore, raw: sqlite3.Connection) -> None:
    raw.execute("DELETE FROM records WHERE seq = 3")

    assert store.verify().problems == ["record 3 missing: sequence jumps from 2 to 4"]


def test_a_deleted_last_record_is_named(store: OfflineStore, raw: sqlite3.Connection) -> None:
    raw.execute("DELETE FROM records WHERE seq = 5")
    assert store.verify().problems == ["record 5 missing at the end"]

    raw.execute("DELETE FROM records WHERE seq = 4")
    assert store.verify().problems == ["records 4..5 missing at the end"]


def test_an_altered_amount_is_named(store: OfflineStore, raw: sqlite3.Connection) -> None:
    raw.execute("UPDATE records SET amount = 1 WHERE seq = 3")

    assert store.verify().problems == ["record 3 altered: its contents do not match its hash"]


def test_swapped_record_contents_are_named(store: OfflineStore, raw: sqlite3.Connection) -> None:
    columns = "created_at, terminal_id, kind, card_id, amount, fields, prev_hash, hash, signature"
    rows = {
        seq: raw.execute(f"SELECT {columns} FROM records WHERE seq = ?", (seq,)).fetchone()
        for seq in (2, 4)
    }
    assignments = ", ".join(f"{column} = ?" for column in columns.split(", "))
    raw.execute("BEGIN")
    raw.execute(f"UPDATE records SET {assignments} WHERE seq = 2", rows[4])
    raw.execute(f"UPDATE records SET {assignments} WHERE seq = 4", rows[2])
    raw.execute("COMMIT")

    problems = store.verify().problems

    relink = "prev_hash mismatch (records reordered, replaced or re-linked)"
    assert problems == [
        f"record 2 does not link to record 1: {relink}",
        "record 2 altered: its contents do not match its hash",
        f"record 3 does not link to record 2: {relink}",
        f"record 4 does not link to record 3: {relink}",
        "record 4 altered: its contents do not match its hash",
        f"record 5 does not link to record 4: {relink}",
    ]


def test_a_forged_signature_is_named(store: OfflineStore, raw: sqlite3.Connection) -> None:
    (hash_hex,) = raw.execute("SELECT hash FROM records WHERE seq = 3").fetchone()
    forged = DeviceKey.generate().sign(bytes.fromhex(hash_hex)).hex()
    raw.execute("UPDATE records SET signature = ? WHERE seq = 3", (forged,))

    assert store.verify().problems == [
        "record 3 has a bad signature (forged, or signed by another key)"
    ]


def test_a_rewritten_and_resealed_record_is_named(
    store: OfflineStore, raw: sqlite3.Connection
) -> None:
    original = list(store.records())[2]
    attacker = DeviceKey.generate()
    resealed = seal_record(
        seq=original.seq,
        created_at=original.created_at,
        terminal_id=original.terminal_id,
        body=RecordBody(original.kind, original.card_id, 1, original.fields),
        prev_hash=original.prev_hash,
        sign=attacker.sign,
    )
    raw.execute(
        "UPDATE records SET amount = ?, hash = ?, signature = ? WHERE seq = 3",
        (resealed.amount, resealed.hash, resealed.signature),
    )

    assert store.verify().problems == [
        "record 3 has a bad signature (forged, or signed by another key)",
        "record 4 does not link to record 3: prev_hash mismatch "
        "(records reordered, replaced or re-linked)",
    ]


def test_an_unreadable_row_is_named(store: OfflineStore, raw: sqlite3.Connection) -> None:
    raw.execute("UPDATE records SET fields = 'not json' WHERE seq = 3")

    problems = store.verify().problems

    assert len(problems) == 1
    assert problems[0].startswith("record 3 unreadable: ")
    with pytest.raises(StoreError, match="record 3 is unreadable"):
        list(store.records())


def test_records_hidden_behind_a_rewound_last_seq_are_named(
    store: OfflineStore, raw: sqlite3.Connection
) -> None:
    raw.execute("UPDATE meta SET value = '3' WHERE key = 'last_seq'")

    problems = store.verify().problems

    assert "records 4..5 beyond the store's last sequence 3" in problems
    assert "record 3 does not match the store's last hash" in problems


# --- export --------------------------------------------------------------------------------


def test_export_writes_one_canonical_record_per_line(store: OfflineStore, key: DeviceKey) -> None:
    out = io.StringIO()

    written = export_records(store, out)

    lines = out.getvalue().splitlines()
    assert written == len(lines) == 5
    stored = list(store.records())
    for line, record in zip(lines, stored, strict=True):
        parsed = json.loads(line)
        assert parsed["hash"] == record.hash
        assert parsed["signature"] == record.signature
        assert line == json.dumps(parsed, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    loaded = load_exported(io.StringIO(out.getvalue()))
    assert loaded == stored
    assert verify_chain(loaded, key.public_key_bytes, expected_last_seq=5).ok


def test_export_since_a_sequence_number(store: OfflineStore) -> None:
    out = io.StringIO()

    assert export_records(store, out, since_seq=3) == 2
    assert [r.seq for r in load_exported(out.getvalue().splitlines())] == [4, 5]


def test_load_exported_skips_blank_lines_and_names_the_bad_line() -> None:
    good = record_to_json(chain_of(1)[0])

    assert len(load_exported(["", good + "\n", "  \n"])) == 1
    with pytest.raises(StoreError, match="exported line 2 is not a record"):
        load_exported([good, good.replace('"amount":1', '"amount":1.0')])


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=10,
)


@given(st.lists(st.text()))
def test_load_exported_on_garbage_text_raises_only_store_error(lines: list[str]) -> None:
    with contextlib.suppress(StoreError):
        load_exported(lines)


@given(st.sampled_from(sorted(chain_of(1)[0].to_dict())), json_values | st.just(...))
def test_load_exported_on_corrupted_records_raises_only_store_error(
    key_name: str, value: object
) -> None:
    record = chain_of(1)[0].to_dict()
    if value is ...:
        del record[key_name]
    else:
        record[key_name] = value
    with contextlib.suppress(StoreError):
        load_exported([json.dumps(record)])
