"""The clearing host's storage and its HTTP API, on SQLite and on a real PostgreSQL server.

The PostgreSQL server is the Debian package's (``scripts/bootstrap`` installs ``postgresql``):
a throw-away cluster is created with initdb in a temporary directory and started with pg_ctl
(as the ``postgres`` user when the tests run as root), listening on 127.0.0.1 and a unix socket
in that directory only. Missing binaries fail the tests with a clear message.
"""

from __future__ import annotations

import gzip
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from glob import glob
from pathlib import Path

import httpx
import psycopg
import pytest
import structlog.testing

from agent.offline_store import DeviceKey, RecordBody
from agent.offline_store.records import Record, record_to_json, seal_record
from clearinghost.clearing import Finding
from clearinghost.keys import HostKey
from clearinghost.operators import OPERATOR, Operators
from clearinghost.server import HostServer, create_app
from clearinghost.storage import (
    IngestResult,
    PostgresStorage,
    SqliteStorage,
    Storage,
    StorageFailure,
    Terminal,
    TerminalKeyConflict,
    pg_index_method,
)
from sync import protocol
from sync.params import verify_params
from tests.test_sync_support import enrol_body, make_host

BACKENDS = ["sqlite", "postgresql"]
_database_numbers = itertools.count()


def _pg_bin(name: str) -> str:
    found = sorted(glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name) or ""]
    if not found[-1]:
        pytest.fail(
            f"PostgreSQL's {name} is not installed: scripts/bootstrap installs the Debian "
            "package 'postgresql' (apt-get install postgresql)"
        )
    return found[-1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="cardsync-pg-"))
        self.port = _free_port()
        self.as_root = os.geteuid() == 0
        if self.as_root:
            shutil.chown(self.dir, "postgres", "postgres")
        self.data = self.dir / "data"

    def _run(self, *argv: str) -> None:
        command = list(argv)
        if self.as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            pytest.fail(f"{' '.join(argv[:2])} failed: {done.stdout}\n{done.stderr}")

    def start(self) -> PgServer:
        self._run(
            _pg_bin("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8"
        )
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.dir} "
            "-c fsync=off -c max_connections=40"
        )
        self._run(
            _pg_bin("pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.dir / "log"),
            "-w",
            "start",
        )
        return self

    def dsn(self, database: str = "postgres") -> str:
        return f"host={self.dir} port={self.port} user=postgres dbname={database}"

    def new_database(self) -> str:
        name = f"host_{next(_database_numbers)}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.dsn(name)

    def stop(self) -> None:
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def pg() -> Iterator[PgServer]:
    server = PgServer().start()
    yield server
    server.stop()


@pytest.fixture(params=BACKENDS)
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    if request.param == "sqlite":
        store: Storage = SqliteStorage(tmp_path / "host.db")
    else:
        store = PostgresStorage(request.getfixturevalue("pg").new_database())
    yield store
    store.close()


def chain(key: DeviceKey, terminal: str, count: int, start: int = 1, prev: str = "0" * 64):
    records: list[Record] = []
    for seq in range(start, start + count):
        record = seal_record(
            seq=seq,
            created_at=f"2024-05-01T08:{seq // 60 % 60:02d}:{seq % 60:02d}.000Z",
            terminal_id=terminal,
            body=RecordBody("purchase", f"0310{seq:016X}", 200, {"n": seq}),
            prev_hash=prev,
            sign=key.sign,
        )
        records.append(record)
        prev = record.hash
    return records


# --- storage ------------------------------------------------------------------------------------


def test_ingest_is_idempotent_and_acknowledges_cumulatively(storage: Storage) -> None:
    key = DeviceKey.generate()
    assert storage.register_terminal("T1", key.public_key_bytes.hex())
    assert not storage.register_terminal("T1", key.public_key_bytes.hex())
    with pytest.raises(TerminalKeyConflict):
        storage.register_terminal("T1", DeviceKey.generate().public_key_bytes.hex())
    records = chain(key, "T1", 10)
    first = storage.ingest("T1", "k1", records[:4], {})
    assert (first.ack_seq, first.stored, first.duplicates) == (4, 4, 0)
    # a batch beyond the acknowledgement (a gap) is refused: nothing stored, the ack unmoved
    later = storage.ingest("T1", "k3", records[7:], {})
    assert (later.ack_seq, later.stored) == (4, 0)
    assert later.refused is not None and (later.refused.seq, later.refused.reason) == (8, "gap")
    replay = storage.ingest("T1", "k1", records[:4], {})
    assert replay.replay and replay.duplicates == 4 and replay.stored == 0
    gap = storage.ingest("T1", "k2", records[3:7], {})
    assert (gap.ack_seq, gap.stored, gap.duplicates) == (7, 3, 1)
    rest = storage.ingest("T1", "k3", records[7:], {})
    assert (rest.ack_seq, rest.stored, rest.refused) == (10, 3, None)
    assert storage.record_keys("T1") == [(r.seq, r.hash) for r in records]
    assert storage.terminal("T1").ack_hash == records[-1].hash  # type: ignore[union-attr]
    assert [a["kind"] for a in storage.anomalies()] == ["gap"]


def test_conflicts_and_chain_breaks_are_refused(storage: Storage) -> None:
    key = DeviceKey.generate()
    storage.register_terminal("T2", key.public_key_bytes.hex())
    records = chain(key, "T2", 3)
    other = chain(key, "T2", 1, start=2)  # seq 2, linking to genesis instead of record 1
    storage.ingest("T2", "a", records[:1], {})
    result = storage.ingest("T2", "b", other, {2: [Finding("bad_tac", "record 2: test")]})
    assert result.ack_seq == 1 and result.stored == 0
    assert result.refused is not None and (result.refused.seq, result.refused.reason) == (
        2,
        "chain_break",
    )
    assert [s for s, _ in storage.record_keys("T2")] == [1]  # the slot stays free
    good = storage.ingest("T2", "c", records[1:], {2: [Finding("bad_tac", "record 2: test")]})
    assert (good.ack_seq, good.stored, good.refused) == (3, 2, None)
    assert sorted(a["kind"] for a in storage.anomalies("T2")) == ["bad_tac", "chain_break"]
    clash = storage.ingest("T2", "d", other, {})  # another record at an acknowledged seq
    assert clash.refused is not None and clash.refused.reason == "conflict"
    assert (clash.ack_seq, clash.stored) == (3, 0)
    assert storage.record_keys("T2") == [(r.seq, r.hash) for r in records]


def test_blacklist_versions_and_net_deltas(storage: Storage) -> None:
    assert storage.blacklist_version() == 0
    v1 = storage.publish_blacklist([1, 2, 3], [])
    v2 = storage.publish_blacklist([4], [2])
    v3 = storage.publish_blacklist([2], [4, 99])  # 99 was never listed: no change
    assert (v1, v2, v3) == (1, 2, 3)
    assert storage.blacklist_snapshot() == (3, [1, 2, 3])
    assert storage.blacklist_delta(1) == (3, [], [])  # 2 removed then re-added, 4 added+removed
    version, add, remove = storage.blacklist_delta(2)
    assert (version, sorted(add), sorted(remove)) == (3, [2], [4])
    assert storage.blacklist_delta(3) == (3, [], [])
    big = [(1 << 63) + n for n in range(5)]  # ASNs above the signed 64-bit range
    storage.publish_blacklist(big, [])
    assert storage.blacklist_snapshot()[1][-5:] == big


def test_params_and_heartbeats(storage: Storage) -> None:
    assert storage.latest_params() is None
    assert storage.publish_params({"fare_table": {"flat_fare": 200}}) == 1
    assert storage.publish_params({"fare_table": {"flat_fare": 300}}) == 2
    assert storage.latest_params() == {"fare_table": {"flat_fare": 300}, "version": 2}
    assert storage.heartbeat("T3", {"unsent_records": 5}) is None  # unknown: nothing kept
    storage.register_terminal("T3", "ab" * 32)
    storage.publish_blacklist([7], [])
    # one transaction keeps the figures and reads the acknowledgement and the list's version
    assert storage.heartbeat("T3", {"unsent_records": 5}) == (0, 1)
    assert storage.terminal("T3").heartbeat == {"unsent_records": 5}  # type: ignore[union-attr]


# --- the HTTP API against both backends ----------------------------------------------------------


def upload(client: httpx.Client, terminal: str, records: list[Record], **headers: str):
    batch = protocol.encode_batch(terminal, records)
    sent = {
        "Content-Encoding": "gzip",
        "Content-Type": protocol.NDJSON,
        protocol.IDEMPOTENCY_HEADER: batch.idempotency_key,
    }
    sent.update(headers)
    return client.post(protocol.records_path(terminal), content=batch.body, headers=sent)


def test_http_api(storage: Storage) -> None:
    host_key = HostKey.generate()
    token = "test-operator-token-0123456789"
    host = make_host(storage, host_key, operators=Operators.with_token("ops", OPERATOR, token))
    key = DeviceKey.generate()
    records = chain(key, "BUS-7", 6)
    auth = {"Authorization": f"Bearer {token}"}
    with (
        HostServer(create_app(host)) as server,
        httpx.Client(base_url=server.url, headers=auth) as client,
    ):
        assert upload(client, "BUS-7", records[:2]).status_code == 404  # not registered
        path = protocol.register_path("BUS-7")
        assert client.post(path, json={"public_key": "zz"}).status_code == 400
        assert client.post(path, json=enrol_body("BUS-7", key)).status_code == 201
        other = client.post(path, json=enrol_body("BUS-7", DeviceKey.generate()))
        assert other.status_code == 409 and other.json()["error"] == "key_conflict"
        answer = upload(client, "BUS-7", records[:3])
        assert answer.status_code == 200 and answer.json()["ack_seq"] == 3
        bad = upload(
            client, "BUS-7", records[3:], **{protocol.IDEMPOTENCY_HEADER: "1-2-" + "0" * 32}
        )
        assert bad.status_code == 400 and bad.json()["error"] == "bad_batch"
        plain = "".join(record_to_json(r) + "\n" for r in records[3:]).encode()
        wrong = client.post(
            protocol.records_path("OTHER"),
            content=gzip.compress(plain),
            headers={"Content-Encoding": "gzip"},
        )
        assert wrong.status_code == 404
        garbage = client.post(
            protocol.records_path("BUS-7"),
            content=b"\x1f\x8b not gzip",
            headers={"Content-Encoding": "gzip", protocol.IDEMPOTENCY_HEADER: "1-1-" + "0" * 32},
        )
        assert garbage.status_code == 400
        forged = list(records[3:])
        forged[0] = seal_record(
            seq=4,
            created_at=forged[0].created_at,
            terminal_id="BUS-7",
            body=forged[0].body,
            prev_hash=forged[0].prev_hash,
            sign=DeviceKey.generate().sign,
        )
        answer = upload(client, "BUS-7", forged)  # refused: never stored, the ack unmoved
        assert answer.status_code == 422 and answer.json()["ack_seq"] == 3
        assert (answer.json()["seq"], answer.json()["reason"]) == (4, "bad_signature")
        anomalies = client.get("/v1/anomalies").json()["anomalies"]
        assert [a["kind"] for a in anomalies] == ["bad_signature"]
        answer = upload(client, "BUS-7", records[3:])
        assert answer.status_code == 200 and answer.json()["ack_seq"] == 6
        assert answer.json()["key_id"] == host_key.key_id and answer.json()["signature"]
        listed = client.get("/v1/terminals/BUS-7/records", params={"after": 4}).json()
        assert [r["seq"] for r in listed["records"]] == [5, 6]
        assert client.get("/v1/terminals").json()["terminals"][0]["ack_seq"] == 6
        page = client.get("/")
        assert page.status_code == 200 and "BUS-7" in page.text and "bad_signature" in page.text
        spec = client.get("/openapi.json").json()
        assert spec["openapi"].startswith("3.") and "/v1/blacklist" in spec["paths"]
        assert client.get("/v1/params").status_code == 404
        client.post("/v1/admin/params", json={"fare_table": {"flat_fare": 250}})
        params = verify_params(client.get("/v1/params").content, host_key.public_key_bytes)
        assert params.version == 1 and params.fare_table == {"flat_fare": 250}
        beat = client.post("/v1/terminals/BUS-7/heartbeat", json={"unsent_records": 0})
        assert beat.status_code == 200 and beat.json()["ack_seq"] == 6


def test_admin_token_is_required_when_configured(tmp_path: Path) -> None:
    operators = Operators.with_token("ops", OPERATOR, "s3cret-test-token")
    host = make_host(SqliteStorage(tmp_path / "h.db"), operators=operators)
    with HostServer(create_app(host)) as server, httpx.Client(base_url=server.url) as client:
        assert client.post("/v1/admin/blacklist", json={"add": ["01"]}).status_code == 401
        ok = client.post(
            "/v1/admin/blacklist",
            json={"add": ["01"]},
            headers={"Authorization": "Bearer s3cret-test-token"},
        )
        assert ok.status_code == 200 and ok.json() == {"version": 1}
    host.storage.close()


def test_full_disk_answers_507_and_stores_nothing(tmp_path: Path) -> None:
    storage = SqliteStorage(tmp_path / "h.db")
    host = make_host(storage)
    key = DeviceKey.generate()
    storage.register_terminal("T", key.public_key_bytes.hex())
    records = chain(key, "T", 400)
    with HostServer(create_app(host)) as server, httpx.Client(base_url=server.url) as client:
        storage.set_max_pages(storage.page_count())
        full = upload(client, "T", records)
        assert full.status_code == 507 and full.json()["error"] == "storage_full"
        assert storage.count_records("T") == 0
        storage.set_max_pages(None)
        assert upload(client, "T", records).json()["ack_seq"] == 400
    storage.close()


HOLD_WRITER_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
"""


def test_sqlite_writers_in_several_processes_take_turns_on_the_writer_lock(
    tmp_path: Path,
) -> None:
    """Workers sharing one SQLite file queue on ``<db>-writer`` (an flock) before each
    transaction: while another process holds it a write waits, past the busy timeout it is
    refused naming the file (503 at the host), and once the holder lets go it goes through."""
    import threading

    storage = SqliteStorage(tmp_path / "host.db")
    key = DeviceKey.generate().public_key_bytes.hex()
    holder = subprocess.Popen(
        ["python3", "-c", HOLD_WRITER_LOCK, str(tmp_path / "host.db-writer")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        storage._writers.timeout_s = 0.2
        with pytest.raises(StorageFailure, match=r"host\.db-writer: another process"):
            storage.register_terminal("T1", key)
        storage._writers.timeout_s = 120.0  # a bound on hangs, never an expectation
        done: list[bool] = []
        writer = threading.Thread(target=lambda: done.append(storage.register_terminal("T1", key)))
        writer.start()
        writer.join(timeout=0.5)
        assert writer.is_alive() and not done  # still waiting its turn
    finally:
        assert holder.stdin is not None and holder.stdout is not None
        holder.stdin.close()
        holder.wait(timeout=60)
        holder.stdout.close()
    writer.join(timeout=120)
    assert done == [True]
    terminal = storage.terminal("T1")
    assert terminal is not None and terminal.public_key == key
    storage.close()


def test_postgres_copies_record_rows_in_their_columns_binary_formats(pg: PgServer) -> None:
    """The records COPY sends each value in its column's binary format: text (non-ASCII too),
    64-bit integers at their limit, a float, NULL come back as sent; a value its column cannot
    take is refused as a storage failure naming the table, and nothing of the batch stays."""
    from clearinghost.storage import _RECORD_ROW_COLUMNS

    store = PostgresStorage(pg.new_database())
    try:
        row = ("T-中", 2**63 - 1, "a" * 64, "b" * 64, "2026-12-01T08:00:00.000Z", "purchase",
               "卡-1", 2**63 - 1, '{"x":"é"}', 1764576000.25, None)  # fmt: skip
        with store._transaction() as tx:
            tx.insert_rows("records", _RECORD_ROW_COLUMNS, [row])
        with store._transaction() as tx:
            held = tx.all(f"SELECT {', '.join(_RECORD_ROW_COLUMNS)} FROM records")
        assert held == [row]

        bad = (*row[:1], "not a seq", *row[2:])
        with (
            pytest.raises(StorageFailure, match="PostgreSQL: a records row"),
            store._transaction() as tx,
        ):
            tx.insert_rows("records", _RECORD_ROW_COLUMNS, [(*row[:1], 1, *row[2:]), bad])
        assert store.count_records() == 1
    finally:
        store.close()


def test_postgres_indexes_record_time_with_brin_and_finds_every_day_through_it(
    pg: PgServer,
) -> None:
    """A new PostgreSQL database indexes ``records.created_at`` with BRIN. A day's records are
    found whole through it, over summarised ranges, a range not yet summarised, and a late
    record of an earlier day written among later ones (it widens its range, it is not lost)."""
    from clearinghost.storage import _RECORD_ROW_COLUMNS

    store = PostgresStorage(pg.new_database())
    body = '{"fields":{"pad":"' + "x" * 600 + '"}}'  # a few rows a page: several 128-page ranges

    def rows(day: str, first: int, count: int) -> list[tuple[object, ...]]:
        return [
            (
                "T1",
                seq,
                "a" * 64,
                "b" * 64,
                f"{day}T{seq % 24:02d}:00:00.000Z",
                "purchase",
                "C1",
                1,
                body,
                0.0,
                None,
            )
            for seq in range(first, first + count)
        ]

    try:
        with store._transaction() as tx:
            assert pg_index_method(tx, "records_created_at") == "brin"
            tx.insert_rows("records", _RECORD_ROW_COLUMNS, rows("2024-05-01", 1, 3000))
            tx.insert_rows("records", _RECORD_ROW_COLUMNS, rows("2024-05-02", 3001, 3000))
        with store._transaction() as tx:
            summarised = tx.one("SELECT brin_summarize_new_values('records_created_at')")
            assert summarised is not None and summarised[0] >= 2
            tx.insert_rows("records", _RECORD_ROW_COLUMNS, rows("2024-05-02", 6001, 500))
            tx.insert_rows("records", _RECORD_ROW_COLUMNS, rows("2024-04-30", 6501, 1))  # late
            tx.run("SET LOCAL enable_seqscan = off")  # the plan goes through the index
            plan = " ".join(
                str(r[0])
                for r in tx.all(
                    "EXPLAIN SELECT seq FROM records WHERE created_at >= ? AND created_at < ?",
                    ("2024-05-01", "2024-05-02"),
                )
            )
            assert "records_created_at" in plan
        bounds = {
            "2024-04-30": "2024-05-01",
            "2024-05-01": "2024-05-02",
            "2024-05-02": "2024-05-03",
        }
        days = {day: [r.seq for r in store.day_records(day, end)] for day, end in bounds.items()}
        assert days["2024-04-30"] == [6501]
        assert days["2024-05-01"] == list(range(1, 3001))
        assert days["2024-05-02"] == list(range(3001, 6501))
    finally:
        store.close()


def test_a_postgres_database_with_the_old_btree_time_index_keeps_it_and_says_so(
    pg: PgServer,
) -> None:
    """A database made before the BRIN index opens with its btree untouched (replacing it would
    lock the records table while the workers wait) and a warning that names the way out."""
    dsn = pg.new_database()
    PostgresStorage(dsn).close()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP INDEX records_created_at")
        conn.execute("CREATE INDEX records_created_at ON records (created_at)")
    with structlog.testing.capture_logs() as logs:
        store = PostgresStorage(dsn)
    try:
        warned = [e for e in logs if e["event"].startswith("records_created_at is not BRIN")]
        assert len(warned) == 1 and warned[0]["method"] == "btree"
        assert "docs/city-scale.md" in warned[0]["event"]
        with store._transaction() as tx:
            method = pg_index_method(tx, "records_created_at")
        assert method == "btree"
    finally:
        store.close()


# --- transactions side by side ---------------------------------------------------------------


def test_a_read_does_not_wait_for_a_write_in_progress(storage: Storage) -> None:
    """While one request's write transaction is open (an upload's ingest), another request's
    read (a heartbeat's terminal row, a list pull's version) is answered from the last commit:
    SQLite reads on a connection of its own, PostgreSQL takes another connection of its pool.
    Both waited for the write before (one connection, one lock)."""
    storage.register_terminal("T1", "ab" * 32)
    storage.publish_blacklist([7], [])
    opened, release = threading.Event(), threading.Event()

    def write() -> None:
        with storage._transaction() as tx:
            tx.run("UPDATE terminals SET last_seen = 1 WHERE terminal_id = ?", ("T1",))
            opened.set()
            release.wait(timeout=60)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        assert opened.wait(timeout=60)
        read: list[object] = []
        reader = threading.Thread(
            target=lambda: read.extend([storage.terminal("T1"), storage.blacklist_version()])
        )
        reader.start()
        reader.join(timeout=30)
        assert not reader.is_alive(), "the read waited for the write transaction"
        held = read[0]
        assert isinstance(held, Terminal) and held.last_seen != 1  # the last commit's row
        assert read[1] == 1
    finally:
        release.set()
        writer.join(timeout=60)
    terminal = storage.terminal("T1")
    assert terminal is not None and terminal.last_seen == 1


def test_postgres_ingests_of_one_terminal_on_two_connections_store_each_record_once(
    pg: PgServer,
) -> None:
    """Two requests of one terminal ingest the same records at once, each on its own pool
    connection (a retry racing its original): the terminal row lock orders them, the second
    sees the first's records as duplicates, every record is stored once."""
    store = PostgresStorage(pg.new_database(), connections=4)
    key = DeviceKey.generate()
    store.register_terminal("T1", key.public_key_bytes.hex())
    records = chain(key, "T1", 40)
    results: list[IngestResult] = []
    start = threading.Barrier(4)

    def ingest(number: int) -> None:
        start.wait(timeout=60)
        results.append(store.ingest("T1", f"k{number}", records, {}))

    threads = [threading.Thread(target=ingest, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    try:
        assert len(results) == 4
        assert sorted(r.stored for r in results) == [0, 0, 0, 40]
        assert all(r.ack_seq == 40 for r in results)
        assert [seq for seq, _ in store.record_keys("T1")] == list(range(1, 41))
    finally:
        store.close()


def test_postgres_replaces_a_connection_the_server_dropped(pg: PgServer) -> None:
    """The server ends the host's connections (a restart, an administrator, an idle timeout):
    the transaction that meets a dead one fails as a storage failure (503, the terminal
    retries), and the pool replaces it, so the host serves again without a restart. With one
    connection the host failed every request from then on."""
    store = PostgresStorage(pg.new_database(), connections=2)
    store.register_terminal("T1", "ab" * 32)
    try:
        with psycopg.connect(pg.dsn(), autocommit=True) as admin:
            ended = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = %s",
                (f"cardhost[{os.getpid()}]",),
            ).fetchall()
        assert ended, "the host held no connection to end"
        failures = 0
        for _ in range(10):
            try:
                terminal = store.terminal("T1")
            except StorageFailure as exc:
                assert "PostgreSQL" in str(exc)
                failures += 1
                continue
            assert terminal is not None and terminal.public_key == "ab" * 32
            break
        else:
            pytest.fail("the host never served again after its connections were ended")
        assert failures <= 2  # at most once per dead connection
        assert store.heartbeat("T1", {"up": 1}) == (0, 0)
    finally:
        store.close()


def test_a_list_read_sees_one_state_while_a_list_is_published(storage: Storage) -> None:
    """The version and the entries of a signed list are read in one snapshot: a publication
    that commits between the two reads (another request, another host process) is not seen
    by the second, so a list is never signed under a version that is not its own. On
    PostgreSQL each statement of a READ COMMITTED transaction had its own snapshot."""
    storage.publish_blacklist([1, 2], [])
    with storage._transaction() as tx:
        held = tx.all("SELECT asn FROM blacklist_current ORDER BY asn")
    with storage._snapshot() as tx:
        version = tx.one("SELECT value FROM host_meta WHERE key = 'blacklist_version'")
        publisher = threading.Thread(target=storage.publish_blacklist, args=([3], [1]))
        publisher.start()
        publisher.join(timeout=60)
        assert not publisher.is_alive(), "the publication waited for the read"
        listed = tx.all("SELECT asn FROM blacklist_current ORDER BY asn")
    assert version is not None and int(version[0]) == 1
    assert listed == held  # version 1's entries, not version 2's
    assert storage.blacklist_snapshot() == (2, [2, 3])


def test_cardhost_host_db_connections_sizes_each_process_pool(pg: PgServer, tmp_path: Path) -> None:
    """``cardhost host --db-connections N``: each host process keeps up to N PostgreSQL
    connections (default 4); fewer than one is a configuration error, not a host that hangs."""
    from agent.errors import ConfigurationError
    from clearinghost.cli import _parser, build_host

    base = ["host", "--db", pg.new_database(), "--key", str(tmp_path / "host.key")]
    for argv, size in ((base, 4), ([*base, "--db-connections", "2"], 2)):
        host = build_host(_parser().parse_args(argv), Operators())
        try:
            assert isinstance(host.storage, PostgresStorage)
            assert host.storage._pool.max_size == size
        finally:
            host.storage.close()
    with pytest.raises(ConfigurationError, match="--db-connections must be at least 1"):
        build_host(_parser().parse_args([*base, "--db-connections", "0"]), Operators())
