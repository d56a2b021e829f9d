"""Admission control at the host and Retry-After in the daemon (issue 14, "1,000 terminals").

The host admits ``max_uploads`` uploads at once (receiving, verifying, storing); one beyond waits
``upload_wait_s`` for a slot, then is answered 503 ``busy`` with ``Retry-After``. The daemon
honours it: never sooner, at most ``retry_after_max_s``, with jitter. Against a real host on
127.0.0.1 (uvicorn, a SQLite file), real daemons with their own stores and device keys, each
terminal enrolled through an operator's pre-registered key. A slot is held deterministically by
a raw socket that sends an upload's head and only part of its body (the body read waits).
"""

from __future__ import annotations

import itertools
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path

import httpx
import pytest

from agent.offline_store import DeviceKey
from agent.wiring import DEVICE_KEY_FILE
from clearinghost.keys import HostKey
from clearinghost.server import (
    BoundedCache,
    ClearingHost,
    HostLimits,
    HostServer,
    UploadGate,
    create_app,
)
from clearinghost.storage import SqliteStorage
from sync import protocol
from sync.client import SyncClient, retry_after_seconds
from sync.daemon import SyncDaemon
from sync.errors import HostBusy
from sync.protocol import encode_batch
from tests.test_sync_support import Terminal, daemon_for, fast_settings

WAIT_S = 120.0  # a bound on hangs, never an expectation


@dataclass
class Seen:
    """One answer to an upload, as the terminal's HTTP transport received it."""

    at: float
    terminal_id: str
    status: int
    retry_after: str | None


@dataclass
class Wire:
    """What every terminal's transport saw (a real httpx transport that notes each answer)."""

    answers: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def uploads(self, terminal_id: str | None = None) -> list[Seen]:
        with self.lock:
            return [a for a in self.answers if terminal_id in (None, a.terminal_id)]


class NotingTransport(httpx.HTTPTransport):
    def __init__(self, wire: Wire, terminal_id: str) -> None:
        super().__init__(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        self.wire, self.terminal_id = wire, terminal_id

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if request.method == "POST" and request.url.path.endswith("/records"):
            seen = Seen(
                time.monotonic(),
                self.terminal_id,
                response.status_code,
                response.headers.get("retry-after"),
            )
            with self.wire.lock:
                self.wire.answers.append(seen)
        return response


def held_upload_slot(server: HostServer, terminal_id: str) -> socket.socket:
    """An upload whose body never finishes: it holds one admission slot until closed."""
    sock = socket.create_connection((server.host, server.port), timeout=WAIT_S)
    sock.sendall(
        (
            f"POST {protocol.records_path(terminal_id)} HTTP/1.1\r\nHost: x\r\n"
            "Content-Type: application/x-ndjson\r\nContent-Encoding: gzip\r\n"
            f"{protocol.IDEMPOTENCY_HEADER}: held\r\nContent-Length: 100000\r\n\r\n"
        ).encode()
        + b"\x1f\x8b"
    )
    return sock


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.02)


def host_with(tmp_path: Path, **limits: object) -> tuple[ClearingHost, HostServer]:
    values: dict[str, object] = {"body_timeout_s": WAIT_S, "header_timeout_s": WAIT_S}
    values.update(limits)
    host = ClearingHost(SqliteStorage(tmp_path / "host.db"), HostKey.generate())
    host.limits = HostLimits(**values)  # type: ignore[arg-type]
    server = HostServer(create_app(host), limits=host.limits).start()
    return host, server


def enrolled(host: ClearingHost, root: Path, terminal_id: str, taps: int) -> Terminal:
    """A provisioned terminal whose key an operator pre-registered, with ``taps`` records."""
    terminal = Terminal.provision(root, terminal_id)
    key = DeviceKey.load(terminal.data_dir / DEVICE_KEY_FILE)
    status, _ = host.add_terminal(
        "ops", {"terminal_id": terminal_id, "public_key": key.public_key_bytes.hex()}
    )
    assert status == 201
    for _ in range(taps):
        terminal.tap()
    return terminal


def daemon_on_wire(terminal: Terminal, daemon: SyncDaemon, url: str, wire: Wire) -> SyncDaemon:
    daemon.client.close()
    daemon.client = SyncClient(
        url, terminal.terminal_id, transport=NotingTransport(wire, terminal.terminal_id)
    )
    return daemon


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[ClearingHost, HostServer]]:
    host, server = host_with(tmp_path, max_uploads=1, upload_wait_s=0.0, retry_after_s=1)
    yield host, server
    server.stop()
    host.storage.close()


def test_an_upload_beyond_the_slots_is_answered_503_busy_with_retry_after(
    served: tuple[ClearingHost, HostServer], tmp_path: Path
) -> None:
    host, server = served
    terminal = enrolled(host, tmp_path / "terminals", "T1", 3)
    daemon = daemon_for(terminal, fast_settings(server.url, host.key))
    try:
        daemon._ensure_registered()
        batch = encode_batch("T1", list(terminal.store.unsent_entries(10)))
        held = held_upload_slot(server, "T1")
        wait_for(lambda: server_gate(server).active == 1, "the held upload to take its slot")
        with pytest.raises(HostBusy) as refused:
            daemon.client.upload(batch, terminal.store.last_seq(), host.key.public_key_bytes)
        assert refused.value.status == 503 and refused.value.code == "busy"
        assert refused.value.retry_after_s is not None and refused.value.retry_after_s >= 1
        assert "retry after" in str(refused.value)
        assert host.storage.count_records("T1") == 0  # refused before anything was stored
        held.close()
        wait_for(lambda: server_gate(server).active == 0, "the held slot to be given back")
        ack = daemon.client.upload(batch, terminal.store.last_seq(), host.key.public_key_bytes)
        assert ack.ack_seq == 3 and host.storage.count_records("T1") == 3
        assert server_gate(server).refused == 1
    finally:
        daemon.close()


def server_gate(server: HostServer) -> UploadGate:
    gate: UploadGate = server._app.state.upload_gate
    return gate


def test_the_daemon_waits_at_least_what_retry_after_asks_then_finishes(
    served: tuple[ClearingHost, HostServer], tmp_path: Path
) -> None:
    host, server = served
    terminal = enrolled(host, tmp_path / "terminals", "T2", 12)
    wire = Wire()
    settings = fast_settings(server.url, host.key, batch_size=4, retries=6, retry_after_max_s=30)
    daemon = daemon_on_wire(terminal, daemon_for(terminal, settings), server.url, wire)
    held = held_upload_slot(server, "T2")
    try:
        wait_for(lambda: server_gate(server).active == 1, "the held upload to take its slot")
        worker = threading.Thread(target=daemon.upload_pending, daemon=True)
        worker.start()
        wait_for(lambda: len(wire.uploads()) >= 2, "two refusals")
        held.close()
        worker.join(WAIT_S)
        assert not worker.is_alive()
        answers = wire.uploads()
        refusals = [a for a in answers if a.status == 503]
        assert len(refusals) >= 2 and {a.status for a in answers} == {200, 503}
        for refusal, following in itertools.pairwise(answers):
            if refusal.status == 503:
                assert refusal.retry_after is not None
                # never sooner than asked (a lower bound: no wall-clock upper bound here)
                assert following.at - refusal.at >= int(refusal.retry_after)
        assert terminal.store.acknowledged_seq() == 12
        assert host.storage.record_keys("T2") == sorted(terminal.written.items())
    finally:
        held.close()
        daemon.close()


def test_retry_after_is_a_floor_capped_and_jittered(tmp_path: Path) -> None:
    terminal = Terminal.provision(tmp_path, "T3")
    key = HostKey.generate()
    settings = fast_settings(
        "http://127.0.0.1:9", key, backoff_base_s=0.5, backoff_max_s=4.0, retry_after_max_s=300
    )
    daemon = daemon_for(terminal, settings)
    daemon.rng = random.Random(14)
    try:
        for asked in (1.0, 10.0, 120.0):
            delays = [
                daemon._retry_delay(1, HostBusy("busy", 503, "busy", asked)) for _ in range(200)
            ]
            assert min(delays) >= asked and max(delays) <= asked * 1.5
            assert len({round(d, 6) for d in delays}) > 100  # spread, not one instant
        huge = [daemon._retry_delay(1, HostBusy("busy", 503, "busy", 86400.0)) for _ in range(50)]
        assert min(huge) >= 300 and max(huge) <= 450  # a host cannot park the terminal for a day
        plain = [daemon._retry_delay(3, HostBusy("busy", 503, "busy")) for _ in range(200)]
        assert max(plain) <= 2.0  # no Retry-After: the exponential backoff alone
    finally:
        daemon.close()


def test_retry_after_header_forms() -> None:
    now = 1_700_000_000.0
    assert retry_after_seconds("7", now) == 7.0
    assert retry_after_seconds(" 0 ", now) == 0.0
    assert retry_after_seconds(formatdate(now + 90, usegmt=True), now) == 90.0
    assert retry_after_seconds(formatdate(now - 90, usegmt=True), now) == 0.0  # past: now
    assert retry_after_seconds("9" * 40, now) == 24 * 3600.0
    for bad in (None, "", "soon", "-5", "1.5", "Mon, 99 Foo"):
        assert retry_after_seconds(bad, now) is None


def test_storage_trouble_answers_carry_retry_after(tmp_path: Path) -> None:
    storage = SqliteStorage(tmp_path / "host.db")
    host = ClearingHost(storage, HostKey.generate())
    terminal = enrolled(host, tmp_path / "terminals", "T4", 40)
    with HostServer(create_app(host)) as server:
        daemon = daemon_for(terminal, fast_settings(server.url, host.key, batch_size=40))
        try:
            daemon._ensure_registered()
            storage.set_max_pages(storage.page_count())  # the host's disk is full
            batch = encode_batch("T4", list(terminal.store.unsent_entries(40)))
            with pytest.raises(HostBusy) as full:
                daemon.client.upload(batch, 40, host.key.public_key_bytes)
            assert full.value.status == 507 and full.value.retry_after_s == 2.0
        finally:
            daemon.close()


TERMINALS = 120
TAPS = 20


def test_a_crowd_of_terminals_uploading_at_once_is_stored_exactly_once(tmp_path: Path) -> None:
    """120 terminals, each its own device key, store and daemon, upload their backlogs at
    once into a host with one upload slot: the only refusals are 503 busy with Retry-After,
    and every record is stored once, in order, none missing."""
    host, server = host_with(tmp_path, max_uploads=1, upload_wait_s=0.5, retry_after_s=1)
    wire = Wire()
    daemons: list[SyncDaemon] = []
    terminals = [
        enrolled(host, tmp_path / "terminals", f"C{n:03d}", TAPS) for n in range(TERMINALS)
    ]
    try:
        for terminal in terminals:
            settings = fast_settings(
                server.url,
                host.key,
                batch_size=8,
                retries=2,
                timeout_s=WAIT_S,
                retry_after_max_s=2.0,
            )
            daemon = daemon_on_wire(terminal, daemon_for(terminal, settings), server.url, wire)
            daemon._ensure_registered()
            daemons.append(daemon)
        held = held_upload_slot(server, "C000")
        wait_for(lambda: server_gate(server).active == 1, "the held upload to take its slot")
        start = threading.Barrier(TERMINALS + 1)

        def drain(daemon: SyncDaemon) -> None:
            start.wait(WAIT_S)
            deadline = time.monotonic() + 10 * WAIT_S
            while daemon.store.count_unsent() and time.monotonic() < deadline:
                if daemon._job("upload", daemon.upload_pending) is None:
                    time.sleep(0.05)

        workers = [threading.Thread(target=drain, args=(d,), daemon=True) for d in daemons]
        for worker in workers:
            worker.start()
        start.wait(WAIT_S)
        wait_for(lambda: len(wire.uploads()) >= TERMINALS, "every terminal to be refused once")
        held.close()
        for worker in workers:
            worker.join(10 * WAIT_S)
            assert not worker.is_alive()
        answers = wire.uploads()
        assert {a.status for a in answers} == {200, 503}
        refusals = [a for a in answers if a.status == 503]
        assert len(refusals) >= TERMINALS
        assert all(a.retry_after is not None and int(a.retry_after) >= 1 for a in refusals)
        for terminal, daemon in zip(terminals, daemons, strict=True):
            assert daemon.store.acknowledged_seq() == TAPS
            assert host.storage.record_keys(terminal.terminal_id) == sorted(
                terminal.written.items()
            )
        assert host.storage.count_records() == TERMINALS * TAPS
        assert server_gate(server).refused == len(refusals)
    finally:
        for daemon in daemons:
            daemon.close()
        server.stop()
        host.storage.close()


def test_the_per_key_signature_checkers_are_bounded(tmp_path: Path) -> None:
    """A host process keeps a signature checker per device key; with tens of thousands of
    terminals that cache must not grow without end (it forgets the oldest, and a forgotten
    key's records still verify: the checker is made again)."""
    cache = BoundedCache(2)
    for n in range(5):
        cache[n] = str(n)
    assert cache == {3: "3", 4: "4"}
    host = ClearingHost(SqliteStorage(tmp_path / "host.db"), HostKey.generate())
    assert isinstance(host._seal_checkers, BoundedCache)
    assert isinstance(host._notice_checkers, BoundedCache)
    host._seal_checkers = BoundedCache(2)
    terminals = [enrolled(host, tmp_path / "terminals", f"B{n}", 2) for n in range(3)]
    for _round in range(2):  # the second round finds B0's checker forgotten
        for terminal in terminals:
            key = DeviceKey.load(terminal.data_dir / DEVICE_KEY_FILE)
            host.register(
                terminal.terminal_id,
                protocol.enrolment_request(
                    terminal.terminal_id, key.public_key_bytes, key.sign, None, int(time.time())
                ),
            )
            batch = encode_batch(terminal.terminal_id, list(terminal.store.unsent_entries(2)))
            status, answer = host.upload(
                terminal.terminal_id, batch.body, "gzip", batch.idempotency_key
            )
            assert status == 200 and answer["ack_seq"] == 2
            assert len(host._seal_checkers) <= 2
    for terminal in terminals:
        assert host.storage.record_keys(terminal.terminal_id) == sorted(terminal.written.items())
    for terminal in terminals:
        terminal.store.close()
    host.storage.close()


@pytest.mark.parametrize("shed", [True, False])
def test_a_worker_busy_with_other_uploads_closes_the_answered_connection(
    tmp_path: Path, shed: bool
) -> None:
    """``close_busy_connections`` (each worker of ``--workers N``): an upload answered while the
    process verifies another closes its connection, so the terminal's next batch is accepted
    by whichever worker is free; answered alone, or with the limit off, it keeps alive."""
    host, server = host_with(tmp_path, max_uploads=2, close_busy_connections=shed)
    terminal = enrolled(host, tmp_path / "terminals", "T1", 4)
    key = DeviceKey.load(terminal.data_dir / DEVICE_KEY_FILE)
    try:
        host.register(
            "T1",
            protocol.enrolment_request(
                "T1", key.public_key_bytes, key.sign, None, int(time.time())
            ),
        )
        first, second = (
            encode_batch("T1", list(terminal.store.unsent_entries(4))[i : i + 2], sign=key.sign)
            for i in (0, 2)
        )
        with httpx.Client(base_url=server.url, timeout=WAIT_S) as client:
            held = held_upload_slot(server, "T1")
            wait_for(lambda: server_gate(server).active == 1, "the held upload to take its slot")
            busy = client.post(
                protocol.records_path("T1"), content=first.body, headers=first.headers()
            )
            held.close()
            wait_for(lambda: server_gate(server).active == 0, "the held slot to be given back")
            alone = client.post(
                protocol.records_path("T1"), content=second.body, headers=second.headers()
            )
        assert busy.status_code == 200 and busy.json()["ack_seq"] == 2
        assert alone.status_code == 200 and alone.json()["ack_seq"] == 4
        assert (busy.headers.get("connection") == "close") is shed
        assert alone.headers.get("connection") != "close"
        assert host.storage.record_keys("T1") == sorted(terminal.written.items())
    finally:
        server.stop()
        terminal.store.close()
        host.storage.close()
