"""Several host processes on one PostgreSQL (issue 14): exactly once across processes.

Real processes only: ``cardhost host --workers 2`` (a supervisor and two workers on one
socket) and separate ``cardhost host`` processes on one database, against a real PostgreSQL
server (tests/test_sync_storage.py's throw-away cluster), with real sync daemons uploading.

- a worker SIGKILLed while it holds an upload transaction open (seen in ``pg_stat_activity`` by
  its ``application_name``): the supervisor starts it again, the daemons retry, and the host
  holds every record of every terminal exactly once, in order;
- the same batch sent at the same moment to two processes (a retry racing its original): both
  answer with a signed acknowledgement, the records are stored once;
- two blacklist publications (or two parameter sets) on two processes at the same moment,
  held at the same point by a table lock the test takes: two distinct versions, never one
  version with two contents.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from clearinghost.keys import HostKey
from clearinghost.operators import TOKEN_ENV
from clearinghost.storage import PostgresStorage
from sync.client import SyncClient
from sync.daemon import SyncDaemon
from sync.protocol import encode_batch
from tests.test_sync_storage import PgServer, _free_port, pg  # noqa: F401  (fixture)
from tests.test_sync_support import Terminal, daemon_for, fast_settings

WAIT_S = 180.0  # a bound on hangs, never an expectation
TOKEN = "workers-operator-token-0123456789abcdef"


def wait_for(condition: Callable[[], bool], what: str) -> None:
    give_up_at = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > give_up_at:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.05)


class HostProcess:
    """``cardhost host`` as a real process (``workers`` > 1: the supervisor and its workers)."""

    def __init__(self, tmp: Path, dsn: str, key: Path, *, workers: int = 1, port: int = 0) -> None:
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = (tmp / f"host-{self.port}.log").open("wb")
        argv = [
            sys.executable,
            "-m",
            "clearinghost.cli",
            "--log-format",
            "json",
            "host",
            "--db",
            dsn,
            "--key",
            str(key),
            "--listen",
            f"127.0.0.1:{self.port}",
            "--open-registration",
            "--workers",
            str(workers),
        ]
        env = dict(os.environ, **{TOKEN_ENV: TOKEN})
        self.process = subprocess.Popen(argv, stdout=self.log, stderr=self.log, env=env)
        self.workers = workers
        wait_for(self.healthy, f"the host on port {self.port}")
        if workers > 1:
            wait_for(lambda: len(self.children()) == workers, "every worker")

    def healthy(self) -> bool:
        if self.process.poll() is not None:
            pytest.fail(f"cardhost host exited with {self.process.returncode}")
        try:
            return httpx.get(f"{self.url}/healthz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def children(self) -> list[int]:
        pid = self.process.pid
        try:
            text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
        except OSError:
            return []
        return [int(p) for p in text.split()]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


@pytest.fixture
def database(pg: PgServer) -> str:  # noqa: F811
    return pg.new_database()


def host_key(tmp_path: Path) -> tuple[Path, HostKey]:
    path = tmp_path / "host.key"
    return path, HostKey.load_or_create(path)


def in_transaction_workers(dsn: str) -> list[int]:
    """Host processes that hold a transaction open right now (their ``application_name``)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT application_name FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name LIKE 'cardhost[%' AND xact_start IS NOT NULL "
            "AND state <> 'idle'"
        ).fetchall()
    return [int(str(name)[9:-1]) for (name,) in rows]


TERMINALS = 4
TAPS = 250


def test_a_worker_killed_mid_batch_loses_and_duplicates_nothing(
    tmp_path: Path, database: str
) -> None:
    key_file, key = host_key(tmp_path)
    host = HostProcess(tmp_path, database, key_file, workers=2)
    terminals = [Terminal.provision(tmp_path / "t", f"K{n}") for n in range(TERMINALS)]
    for terminal in terminals:
        for _ in range(TAPS):
            terminal.tap()
    daemons: list[SyncDaemon] = []
    try:
        for terminal in terminals:
            settings = fast_settings(host.url, key, batch_size=10, retries=3, timeout_s=30.0)
            daemons.append(daemon_for(terminal, settings))

        def drain(daemon: SyncDaemon) -> None:
            give_up_at = time.monotonic() + WAIT_S
            while daemon.store.count_unsent() and time.monotonic() < give_up_at:
                if daemon._job("upload", daemon.upload_pending) is None:
                    time.sleep(0.02)

        workers = [threading.Thread(target=drain, args=(d,), daemon=True) for d in daemons]
        for worker in workers:
            worker.start()
        kills: list[int] = []
        rng = random.Random(14)
        while len(kills) < 4 and any(w.is_alive() for w in workers):
            holding = [p for p in in_transaction_workers(database) if p in host.children()]
            if not holding:
                time.sleep(0.005)
                continue
            victim = rng.choice(holding)
            os.kill(victim, signal.SIGKILL)
            kills.append(victim)

            def replaced(victim: int = victim) -> bool:
                children = host.children()
                return victim not in children and len(children) == 2

            wait_for(replaced, "the supervisor to start the killed worker again")
        for worker in workers:
            worker.join(WAIT_S)
            assert not worker.is_alive()
        assert kills  # each one while that worker held an upload transaction open
        storage = PostgresStorage(database)
        try:
            for terminal, daemon in zip(terminals, daemons, strict=True):
                assert daemon.store.acknowledged_seq() == TAPS
                assert storage.record_keys(terminal.terminal_id) == sorted(terminal.written.items())
            assert storage.count_records() == TERMINALS * TAPS
        finally:
            storage.close()
    finally:
        for daemon in daemons:
            daemon.close()
        host.stop()
    log = (tmp_path / f"host-{host.port}.log").read_text()
    assert log.count('"worker died; starting it again"') == len(kills)


def test_a_retry_racing_its_original_on_two_processes_is_stored_once(
    tmp_path: Path, database: str
) -> None:
    key_file, key = host_key(tmp_path)
    first = HostProcess(tmp_path, database, key_file)
    second = HostProcess(tmp_path, database, key_file)
    terminal = Terminal.provision(tmp_path / "t", "R1")
    for _ in range(90):
        terminal.tap()
    daemon = daemon_for(terminal, fast_settings(first.url, key))
    clients = [SyncClient(first.url, "R1"), SyncClient(second.url, "R1")]
    try:
        daemon._ensure_registered()
        entries = list(terminal.store.unsent_entries(90))
        for start in range(0, 90, 30):
            batch = encode_batch("R1", entries[start : start + 30])
            gate = threading.Barrier(2)
            answers: list[Any] = [None, None]

            def send(
                i: int, batch: Any = batch, gate: threading.Barrier = gate, out: Any = answers
            ) -> None:
                gate.wait(WAIT_S)
                out[i] = clients[i].upload(batch, 90, key.public_key_bytes)

            racers = [threading.Thread(target=send, args=(i,)) for i in (0, 1)]
            for racer in racers:
                racer.start()
            for racer in racers:
                racer.join(WAIT_S)
            assert all(a is not None for a in answers)  # both answered with a signed ack
            assert [a.ack_seq for a in answers] == [start + 30, start + 30]
            assert sorted(a.stored for a in answers) == [0, 30]
            assert sorted(a.duplicates for a in answers) == [0, 30]
        storage = PostgresStorage(database)
        try:
            assert storage.record_keys("R1") == sorted(terminal.written.items())
        finally:
            storage.close()
    finally:
        for client in clients:
            client.close()
        daemon.close()
        first.stop()
        second.stop()


ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def waiting_on_locks(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name LIKE 'cardhost[%' AND wait_event_type = 'Lock'"
        ).fetchone()
    return int(row[0]) if row else 0


@pytest.mark.parametrize(
    ("table", "path", "bodies"),
    [
        (
            "blacklist_current",
            "/v1/admin/blacklist",
            ({"add": ["01"]}, {"add": ["00000000000000AA"]}, {"add": ["00000000000000BB"]}),
        ),
        (
            "params",
            "/v1/admin/params",
            tuple({"fare_table": {"flat_fare": fare}} for fare in (100, 200, 300)),
        ),
    ],
)
def test_two_processes_publishing_at_once_get_two_versions(
    tmp_path: Path, database: str, table: str, path: str, bodies: tuple[dict[str, Any], ...]
) -> None:
    """Both publications are held by the test's table lock after reading what they read (the
    old code read the version counter first, so both computed the same next version)."""
    key_file, _ = host_key(tmp_path)
    hosts = [HostProcess(tmp_path, database, key_file) for _ in range(2)]
    try:
        first = httpx.post(f"{hosts[0].url}{path}", json=bodies[0], headers=ADMIN, timeout=WAIT_S)
        assert first.status_code == 200 and first.json()["version"] == 1
        with psycopg.connect(database) as holder:
            holder.execute(f"LOCK TABLE {table} IN EXCLUSIVE MODE")
            answers: list[httpx.Response | None] = [None, None]

            def publish(i: int) -> None:
                answers[i] = httpx.post(
                    f"{hosts[i].url}{path}", json=bodies[i + 1], headers=ADMIN, timeout=WAIT_S
                )

            threads = [threading.Thread(target=publish, args=(i,)) for i in (0, 1)]
            for thread in threads:
                thread.start()
            wait_for(lambda: waiting_on_locks(database) == 2, "both publications to wait")
            holder.rollback()
        for thread in threads:
            thread.join(WAIT_S)
        statuses = [a.status_code if a is not None else None for a in answers]
        assert statuses == [200, 200], [a.text if a is not None else None for a in answers]
        versions = sorted(a.json()["version"] for a in answers if a is not None)
        assert versions == [2, 3]
        if table == "blacklist_current":
            listed = PostgresStorage(database)
            try:
                assert listed.blacklist_snapshot() == (3, [0x01, 0xAA, 0xBB])
                _, add, remove = listed.blacklist_delta(2)
                assert len(add) == 1 and not remove  # version 3 is one change, not both
            finally:
                listed.close()
    finally:
        for host in hosts:
            host.stop()
