"""The offline store on real SQLite files: intents, records, durability settings, device key."""

from __future__ import annotations

import itertools
import sqlite3
import stat
import tempfile
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

from agent.errors import StoreError
from agent.offline_store import (
    DeviceKey,
    Intent,
    IntentNotFoundError,
    OfflineStore,
    RecordBody,
    verify_signature,
)

TERMINAL = "T-0001"
START = datetime(2024, 5, 1, 8, 30, tzinfo=UTC)


class FakeClock:
    def __init__(self, start: datetime = START) -> None:
        self.now = start
        self.fail = False

    def __call__(self) -> datetime:
        if self.fail:
            raise RuntimeError("clock exploded")
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@pytest.fixture
def key() -> DeviceKey:
    return DeviceKey.generate()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "store.db"


@pytest.fixture
def store(store_path: Path, key: DeviceKey, clock: FakeClock):
    with OfflineStore.open(store_path, key, TERMINAL, clock=clock) as opened:
        yield opened


def purchase(card_id: str = "3101000012345678", amount: int = 200, **fields) -> RecordBody:
    return RecordBody("purchase", card_id, amount, {"tac": "A1B2C3D4", **fields})


# --- intents -------------------------------------------------------------------------------


def test_intent_round_trip(store: OfflineStore, clock: FakeClock) -> None:
    clock.advance(microseconds=123_456)
    first = store.add_intent("card-a", "cpu_purse", {"amount": 200, "ttc": 7, "mac1": "0A0B"})
    second = store.add_intent("card-b", "m1_purse", {"amount": 150, "note": "换乘"})

    pending = store.pending_intents()

    assert [intent.id for intent in pending] == [first, second]
    assert pending[0] == Intent(
        id=first,
        card_id="card-a",
        product="cpu_purse",
        created_at=datetime(2024, 5, 1, 8, 30, 0, 123_000, tzinfo=UTC),
        payload={"amount": 200, "ttc": 7, "mac1": "0A0B"},
    )
    assert pending[0].created_at.tzinfo is not None
    assert pending[0].created_at.utcoffset() == timedelta(0)
    assert store.pending_intents("card-b") == [pending[1]]
    assert store.pending_intents("card-c") == []


def test_intent_ids_are_never_reused(store: OfflineStore) -> None:
    first = store.add_intent("card-a", "cpu_purse", {})
    store.finalize_intent(first, purchase("card-a"))
    second = store.add_intent("card-a", "cpu_purse", {})

    assert second > first
    with pytest.raises(IntentNotFoundError):
        store.finalize_intent(first, purchase("card-a"))


def test_finalize_intent_appends_one_record_and_removes_the_intent(store: OfflineStore) -> None:
    intent_id = store.add_intent("card-a", "cpu_purse", {"amount": 200})

    record = store.finalize_intent(intent_id, purchase("card-a", intent_id=intent_id))

    assert store.pending_intents() == []
    assert list(store.records()) == [record]
    assert record.seq == 1
    assert record.fields["intent_id"] == intent_id


def test_finalizing_the_same_intent_twice_is_refused(store: OfflineStore) -> None:
    intent_id = store.add_intent("card-a", "cpu_purse", {"amount": 200})
    store.finalize_intent(intent_id, purchase("card-a"))

    with pytest.raises(StoreError, match=f"intent {intent_id} does not exist"):
        store.finalize_intent(intent_id, purchase("card-a"))

    assert store.count_records() == 1
    assert store.last_seq() == 1
    assert store.verify().ok


def test_failed_finalize_leaves_the_intent_pending_and_appends_nothing(
    store: OfflineStore, clock: FakeClock
) -> None:
    intent_id = store.add_intent("card-a", "cpu_purse", {"amount": 200})
    clock.fail = True  # fails inside the transaction, after the intent row was deleted

    with pytest.raises(RuntimeError, match="clock exploded"):
        store.finalize_intent(intent_id, purchase("card-a"))

    clock.fail = False
    assert [intent.id for intent in store.pending_intents()] == [intent_id]
    assert store.count_records() == 0
    assert store.finalize_intent(intent_id, purchase("card-a")).seq == 1


def test_finalize_refuses_a_record_for_another_card(store: OfflineStore) -> None:
    intent_id = store.add_intent("card-a", "cpu_purse", {})

    with pytest.raises(ValueError, match="card-b"):
        store.finalize_intent(intent_id, purchase("card-b"))

    assert len(store.pending_intents()) == 1
    assert store.count_records() == 0


def test_void_intent_removes_it_without_a_record(store: OfflineStore) -> None:
    intent_id = store.add_intent("card-a", "cpu_purse", {})

    store.void_intent(intent_id, "card counter unchanged: debit did not happen")

    assert store.pending_intents() == []
    assert store.count_records() == 0
    with pytest.raises(IntentNotFoundError):
        store.void_intent(intent_id, "again")
    with pytest.raises(IntentNotFoundError):
        store.finalize_intent(intent_id, purchase("card-a"))


def test_expire_intents_turns_old_intents_into_records(
    store: OfflineStore, clock: FakeClock
) -> None:
    old = store.add_intent("card-a", "cpu_purse", {"amount": 200})
    clock.advance(minutes=10)
    recent = store.add_intent("card-b", "cpu_purse", {"amount": 300})
    clock.advance(minutes=1)
    seen: list[Intent] = []

    def unresolved(intent: Intent) -> RecordBody:
        seen.append(intent)
        return RecordBody(
            "unresolved",
            intent.card_id,
            intent.payload["amount"],
            {"intent_id": intent.id, "reason": "card never returned"},
        )

    expired = store.expire_intents(clock.now - timedelta(minutes=5), unresolved)

    assert [intent.id for intent in seen] == [old]
    assert [(r.kind, r.card_id, r.amount, r.fields["intent_id"]) for r in expired] == [
        ("unresolved", "card-a", 200, old)
    ]
    assert [intent.id for intent in store.pending_intents()] == [recent]
    assert store.expire_intents(clock.now - timedelta(minutes=5), unresolved) == []


# --- records -------------------------------------------------------------------------------


def test_record_round_trip(store: OfflineStore, key: DeviceKey, clock: FakeClock) -> None:
    clock.advance(milliseconds=5)
    body = RecordBody(
        "purchase",
        "card-a",
        200,
        {
            "tac": "A1B2C3D4",
            "balance_after": 1800,
            "transfer": True,
            "line": None,
            "站": "人民广场",
        },
    )

    record = store.append_record(body)

    assert record.seq == 1
    assert record.created_at == "2024-05-01T08:30:00.005Z"
    assert record.terminal_id == TERMINAL
    assert record.body == body
    assert record.prev_hash == "0" * 64
    assert verify_signature(
        key.public_key_bytes, bytes.fromhex(record.signature), bytes.fromhex(record.hash)
    )
    assert list(store.records()) == [record]
    assert store.last_record_for_card("card-a") == record


def test_records_are_chained_and_paged(store: OfflineStore) -> None:
    appended = [store.append_record(purchase(f"card-{n % 7}", amount=n)) for n in range(620)]

    read = list(store.records())

    assert read == appended
    assert [r.seq for r in read] == list(range(1, 621))
    assert all(later.prev_hash == earlier.hash for earlier, later in itertools.pairwise(read))
    assert list(store.records(since_seq=500, limit=3)) == appended[500:503]
    assert list(store.records(since_seq=600)) == appended[600:]
    assert list(store.records(limit=0)) == []
    assert store.count_records() == 620


def test_last_record_for_card_filters_by_kind(store: OfflineStore) -> None:
    first = store.append_record(purchase("card-a", amount=100))
    store.append_record(purchase("card-b", amount=100))
    lock = store.append_record(RecordBody("lock", "card-a", 0, {"reason": "blacklisted"}))

    assert store.last_record_for_card("card-a") == first
    assert store.last_record_for_card("card-a", kinds=("purchase", "lock")) == lock
    assert store.last_record_for_card("card-a", kinds="lock") == lock
    assert store.last_record_for_card("card-a", kinds=()) is None
    assert store.last_record_for_card("card-z") is None


def test_a_reopened_store_continues_the_sequence(
    store_path: Path, key: DeviceKey, clock: FakeClock
) -> None:
    with OfflineStore.open(store_path, key, TERMINAL, clock=clock) as first:
        before = [first.append_record(purchase()) for _ in range(3)]
        pending = first.add_intent("card-a", "cpu_purse", {"amount": 200})

    with OfflineStore.open(store_path, key, TERMINAL, clock=clock) as reopened:
        assert [intent.id for intent in reopened.pending_intents()] == [pending]
        after = reopened.finalize_intent(pending, purchase("card-a"))
        assert after.seq == 4
        assert after.prev_hash == before[-1].hash
        assert reopened.verify().ok


def test_opening_with_another_device_key_is_refused(
    store_path: Path, key: DeviceKey, clock: FakeClock
) -> None:
    with OfflineStore.open(store_path, key, TERMINAL, clock=clock) as store:
        store.append_record(purchase())
    other = DeviceKey.generate()

    with pytest.raises(StoreError, match=f"belongs to device key {key.key_id}, not {other.key_id}"):
        OfflineStore.open(store_path, other, TERMINAL, clock=clock)


def test_opening_for_another_terminal_is_refused(store_path: Path, key: DeviceKey) -> None:
    OfflineStore.open(store_path, key, TERMINAL).close()

    with pytest.raises(StoreError, match="T-0002"):
        OfflineStore.open(store_path, key, "T-0002")


def test_a_newer_schema_is_refused(store_path: Path, key: DeviceKey) -> None:
    OfflineStore.open(store_path, key, TERMINAL).close()
    with sqlite3.connect(store_path) as raw:
        raw.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    raw.close()

    with pytest.raises(StoreError, match="schema version 99"):
        OfflineStore.open(store_path, key, TERMINAL)


def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path, key: DeviceKey) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not sqlite" * 300)

    with pytest.raises(StoreError, match="file is not a database"):
        OfflineStore.open(path, key, TERMINAL)


def test_meta_holds_the_chain_state(store_path: Path, store: OfflineStore, key: DeviceKey) -> None:
    record = store.append_record(purchase())

    raw = sqlite3.connect(store_path)
    meta = dict(raw.execute("SELECT key, value FROM meta").fetchall())
    raw.close()

    assert meta == {
        "schema_version": "2",
        "public_key": key.public_key_bytes.hex(),
        "terminal_id": TERMINAL,
        "last_seq": "1",
        "last_hash": record.hash,
        "chain_anchor_seq": "0",
        "chain_anchor_hash": "0" * 64,
        # the clock guard's floor, kept when compaction removes the records (agent.clock)
        "last_created_at": record.created_at,
    }
    assert store.last_record_at() == datetime.fromisoformat(record.created_at)


# --- durability and errors -----------------------------------------------------------------


def test_wal_and_synchronous_full_are_in_effect(store: OfflineStore, store_path: Path) -> None:
    assert store.durability_settings() == {
        "journal_mode": "wal",
        "synchronous": 2,  # FULL
        "busy_timeout": 5000,
        "foreign_keys": 1,
    }
    raw = sqlite3.connect(store_path)
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    raw.close()
    assert store.integrity_check() == "ok"


def test_a_full_disk_is_a_store_error_and_leaves_the_chain_intact(store: OfflineStore) -> None:
    store.append_record(purchase())
    (page_count,) = store._conn.execute("PRAGMA page_count").fetchone()
    store._conn.execute(f"PRAGMA max_page_count = {page_count}")

    with pytest.raises(
        StoreError, match=r"^store: could not append record: database or disk is full$"
    ):
        for _ in range(200):
            store.append_record(purchase(note="x" * 2000))

    store._conn.execute("PRAGMA max_page_count = 1073741823")
    last = store.last_seq()
    assert store.count_records() == last
    assert store.append_record(purchase()).seq == last + 1
    assert store.verify().ok


def test_a_closed_store_raises_store_errors(store_path: Path, key: DeviceKey) -> None:
    store = OfflineStore.open(store_path, key, TERMINAL)
    store.close()

    with pytest.raises(StoreError, match=r"^store: could not add intent: "):
        store.add_intent("card-a", "cpu_purse", {})


# --- device key ----------------------------------------------------------------------------


def test_device_key_file_is_private_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "device.pem"

    created = DeviceKey.create(path)
    loaded = DeviceKey.load(path)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert loaded.public_key_bytes == created.public_key_bytes
    assert len(created.public_key_bytes) == 32
    assert len(created.key_id) == 16
    signature = loaded.sign(b"tap")
    assert verify_signature(created.public_key_bytes, signature, b"tap")
    assert not verify_signature(created.public_key_bytes, signature, b"tip")
    assert not verify_signature(created.public_key_bytes, signature[:-1], b"tap")


def test_device_key_repr_reveals_no_key_material(tmp_path: Path) -> None:
    path = tmp_path / "device.pem"
    key = DeviceKey.create(path)
    pem = path.read_text()
    secret_hex = key._private_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    ).hex()

    shown = repr(key) + str(key) + f"{key}"

    assert shown.count(key.key_id) == 3
    assert secret_hex not in shown
    assert pem.splitlines()[1] not in shown
    assert key.public_key_bytes.hex() not in shown


def test_device_key_create_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "device.pem"
    original = DeviceKey.create(path)
    content = path.read_bytes()

    with pytest.raises(StoreError, match="refusing to overwrite"):
        DeviceKey.create(path)

    assert path.read_bytes() == content
    assert DeviceKey.load(path).key_id == original.key_id


def test_device_key_load_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        DeviceKey.load(tmp_path / "missing.pem")

    corrupt = tmp_path / "corrupt.pem"
    corrupt.write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    corrupt.chmod(0o600)  # a key others can read is refused before it is parsed
    with pytest.raises(StoreError, match="is corrupt"):
        DeviceKey.load(corrupt)

    wrong_type = tmp_path / "ec.pem"
    wrong_type.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    wrong_type.chmod(0o600)
    with pytest.raises(StoreError, match="not an Ed25519 key"):
        DeviceKey.load(wrong_type)


# --- any sequence of operations keeps the journal and the chain sound -----------------------

cards = st.sampled_from(["card-a", "card-b", "card-c"])
amounts = st.integers(min_value=0, max_value=10_000)


class StoreMachine(RuleBasedStateMachine):
    intents = Bundle("intents")

    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.TemporaryDirectory()
        self.path = Path(self.directory.name) / "store.db"
        self.key = DeviceKey.generate()
        self.clock = FakeClock()
        self.store = OfflineStore.open(self.path, self.key, TERMINAL, clock=self.clock)
        self.card_of: dict[int, str] = {}
        self.created_at: dict[int, datetime] = {}
        self.pending: set[int] = set()
        self.voided: set[int] = set()
        self.recorded: set[int] = set()
        self.records_written = 0

    @rule(target=intents, card=cards, amount=amounts)
    def add_intent(self, card: str, amount: int) -> int:
        intent_id = self.store.add_intent(card, "cpu_purse", {"amount": amount})
        assert intent_id not in self.card_of
        self.card_of[intent_id] = card
        self.created_at[intent_id] = self.clock.now
        self.pending.add(intent_id)
        self.clock.advance(seconds=1)
        return intent_id

    @rule(intent_id=intents, amount=amounts)
    def finalize(self, intent_id: int, amount: int) -> None:
        body = RecordBody("purchase", self.card_of[intent_id], amount, {"intent_id": intent_id})
        if intent_id in self.pending:
            record = self.store.finalize_intent(intent_id, body)
            self._recorded(intent_id, record.seq)
        else:
            with pytest.raises(IntentNotFoundError):
                self.store.finalize_intent(intent_id, body)

    @rule(intent_id=intents)
    def void(self, intent_id: int) -> None:
        if intent_id in self.pending:
            self.store.void_intent(intent_id, "counter unchanged")
            self.pending.remove(intent_id)
            self.voided.add(intent_id)
        else:
            with pytest.raises(IntentNotFoundError):
                self.store.void_intent(intent_id, "counter unchanged")

    @rule(card=cards, amount=amounts)
    def append(self, card: str, amount: int) -> None:
        record = self.store.append_record(RecordBody("load", card, amount, {}))
        self.records_written += 1
        assert record.seq == self.records_written

    @rule(age_seconds=st.integers(min_value=0, max_value=4))
    def expire(self, age_seconds: int) -> None:
        cutoff = self.clock.now - timedelta(seconds=age_seconds)
        due = sorted(i for i in self.pending if self.created_at[i] < cutoff)

        def unresolved(intent: Intent) -> RecordBody:
            return RecordBody(
                "unresolved", intent.card_id, intent.payload["amount"], {"intent_id": intent.id}
            )

        expired = self.store.expire_intents(cutoff, unresolved)

        assert [record.fields["intent_id"] for record in expired] == due
        for record in expired:
            self._recorded(int(str(record.fields["intent_id"])), record.seq)

    @rule(seconds=st.integers(min_value=0, max_value=3))
    def tick(self, seconds: int) -> None:
        self.clock.advance(seconds=seconds)

    @rule()
    def reopen(self) -> None:
        self.store.close()
        self.store = OfflineStore.open(self.path, self.key, TERMINAL, clock=self.clock)

    def _recorded(self, intent_id: int, seq: int) -> None:
        self.pending.remove(intent_id)
        self.recorded.add(intent_id)
        self.records_written += 1
        assert seq == self.records_written

    @invariant()
    def sequence_is_contiguous_and_verifies(self) -> None:
        assert [r.seq for r in self.store.records()] == list(range(1, self.records_written + 1))
        report = self.store.verify()
        assert report.ok, report.problems
        assert report.checked == self.records_written

    @invariant()
    def every_intent_is_pending_voided_or_exactly_one_record(self) -> None:
        assert {intent.id for intent in self.store.pending_intents()} == self.pending
        per_intent = Counter(
            r.fields["intent_id"] for r in self.store.records() if "intent_id" in r.fields
        )
        assert per_intent == Counter({intent_id: 1 for intent_id in self.recorded})
        assert self.pending | self.voided | self.recorded == set(self.card_of)
        assert not (self.pending & self.voided or self.pending & self.recorded)
        assert not self.voided & self.recorded

    def teardown(self) -> None:
        self.store.close()
        self.directory.cleanup()


StoreMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestStoreOperations = StoreMachine.TestCase
