"""Two host processes on one PostgreSQL inserting the same key at the same moment (issue 14):
the loser answers what a retry would (idempotent) or a clear 409, never a 500.

Each race is made certain, not likely: the test holds the table in EXCLUSIVE mode, so both
requests (on two real ``cardhost host`` processes) read "not there yet" and then wait at their
INSERT (seen in ``pg_stat_activity``); the test lets go, one insert commits and the other meets
the unique key the first one wrote. The old code answered that one 500.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from clearinghost.demo_kiosk import DEMO_BILLS
from clearinghost.storage import PostgresStorage
from sync import protocol
from tests.test_host_workers import (
    ADMIN,
    WAIT_S,
    HostProcess,
    database,  # noqa: F401  (fixture)
    host_key,
    wait_for,
    waiting_on_locks,
)
from tests.test_sync_storage import PgServer, pg  # noqa: F401  (fixture)


def at_once(
    dsn: str, table: str, requests: list[Callable[[], httpx.Response]]
) -> list[httpx.Response]:
    """Run both requests while ``table`` is locked, let go once both wait on the lock."""
    answers: list[httpx.Response | None] = [None] * len(requests)

    def run(i: int) -> None:
        answers[i] = requests[i]()

    with psycopg.connect(dsn) as holder:
        holder.execute(f"LOCK TABLE {table} IN EXCLUSIVE MODE")
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
        for thread in threads:
            thread.start()
        wait_for(lambda: waiting_on_locks(dsn) == len(requests), f"both writers of {table}")
        holder.rollback()
    for thread in threads:
        thread.join(WAIT_S)
        assert not thread.is_alive()
    done = [a for a in answers if a is not None]
    assert len(done) == len(requests)
    return done


@pytest.fixture
def hosts(tmp_path: Path, database: str) -> Any:  # noqa: F811
    key_file, _ = host_key(tmp_path)
    started = [HostProcess(tmp_path, database, key_file) for _ in range(2)]
    yield started
    for host in started:
        host.stop()


def post(
    url: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> Callable[[], httpx.Response]:
    return lambda: httpx.post(url, json=body, headers=headers, timeout=WAIT_S)


def enrolment(terminal_id: str, key: Ed25519PrivateKey) -> dict[str, Any]:
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return protocol.enrolment_request(terminal_id, public, key.sign, None, int(time.time()))


def statuses(answers: list[httpx.Response]) -> list[int]:
    return sorted(a.status_code for a in answers)


def test_two_operators_adding_one_terminal_get_201_and_409(hosts: Any, database: str) -> None:  # noqa: F811
    body = {"terminal_id": "RACE-1", "kind": "bus", "site": "depot"}
    answers = at_once(
        database,
        "terminal_entries",
        [post(f"{h.url}/v1/admin/terminals", body, ADMIN) for h in hosts],
    )
    assert statuses(answers) == [201, 409], [a.text for a in answers]
    loser = next(a for a in answers if a.status_code == 409)
    assert loser.json()["error"] == "terminal_exists" and "RACE-1" in loser.json()["detail"]
    retry = httpx.post(
        f"{hosts[0].url}/v1/admin/terminals", json=body, headers=ADMIN, timeout=WAIT_S
    )
    assert retry.status_code == 409  # the loser's answer is a retry's answer


def test_one_terminal_registering_on_two_processes_at_once_is_enrolled_once(
    hosts: Any,
    database: str,  # noqa: F811
) -> None:
    key = Ed25519PrivateKey.generate()
    body = enrolment("RACE-2", key)
    path = protocol.register_path("RACE-2")
    answers = at_once(database, "terminals", [post(f"{h.url}{path}", body) for h in hosts])
    assert statuses(answers) == [200, 201], [a.text for a in answers]
    assert sorted(a.json()["status"] for a in answers) == ["enrolled", "known"]
    storage = PostgresStorage(database)
    try:
        assert [t.terminal_id for t in storage.terminals()] == ["RACE-2"]
    finally:
        storage.close()


def test_two_keys_racing_for_one_terminal_id_get_201_and_409(hosts: Any, database: str) -> None:  # noqa: F811
    path = protocol.register_path("RACE-3")
    bodies = [enrolment("RACE-3", Ed25519PrivateKey.generate()) for _ in hosts]
    answers = at_once(
        database,
        "terminals",
        [post(f"{h.url}{path}", b) for h, b in zip(hosts, bodies, strict=True)],
    )
    assert statuses(answers) == [201, 409], [a.text for a in answers]
    assert next(a for a in answers if a.status_code == 409).json()["error"] == "key_conflict"


def test_two_rotation_authorisations_for_an_entryless_terminal_both_answer(
    hosts: Any,
    database: str,  # noqa: F811
) -> None:
    """A terminal enrolled by open registration has no entry; authorising a new key creates
    it. Two operators doing so at once: both get an authorisation (the later one in force)."""
    first = httpx.post(
        f"{hosts[0].url}{protocol.register_path('RACE-4')}",
        json=enrolment("RACE-4", Ed25519PrivateKey.generate()),
        timeout=WAIT_S,
    )
    assert first.status_code == 201
    answers = at_once(
        database,
        "terminal_entries",
        [post(f"{h.url}/v1/admin/terminals/RACE-4/rotate-key", {}, ADMIN) for h in hosts],
    )
    assert statuses(answers) == [200, 200], [a.text for a in answers]
    assert all(a.json()["enrolment_code"] for a in answers)


def test_one_bill_book_loaded_on_two_processes_at_once_is_loaded_once(
    hosts: Any,
    database: str,  # noqa: F811
) -> None:
    body = {"csv": DEMO_BILLS}
    answers = at_once(
        database, "bills", [post(f"{h.url}/v1/admin/bills", body, ADMIN) for h in hosts]
    )
    assert statuses(answers) == [200, 200], [a.text for a in answers]
    counts = sorted((a.json()["added"], a.json()["updated"]) for a in answers)
    assert counts == [(0, 4), (4, 0)]  # the loser ran again and found the winner's bills
    listed = httpx.get(f"{hosts[1].url}/v1/admin/bills", headers=ADMIN, timeout=WAIT_S)
    assert len(listed.json()["bills"]) == 4
