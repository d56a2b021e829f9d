"""Shared helpers of the sync tests (no tests here): terminals with real stores, a real clearing
host served by uvicorn on 127.0.0.1, and a fault-injecting ASGI layer in front of it.

Host keys used by these tests are generated per run (``HostKey.generate()``): TEST KEYS ONLY.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.offline_store import DeviceKey, OfflineStore, Record, RecordBody
from agent.wiring import DataDir
from clearinghost.keys import HostKey
from clearinghost.server import ClearingHost, create_app
from clearinghost.storage import SqliteStorage, Storage
from sync import protocol
from sync.daemon import SyncDaemon, SyncSettings, open_daemon


@dataclass
class Terminal:
    """A provisioned data directory with the agent's own store handle (the writer)."""

    terminal_id: str
    data_dir: Path
    store: OfflineStore
    written: dict[int, str] = field(default_factory=dict)  # seq -> hash of every record written
    counter: int = 0

    @classmethod
    def provision(cls, root: Path, terminal_id: str) -> Terminal:
        data_dir = root / terminal_id
        DataDir(data_dir).provision(terminal_id)
        return cls(terminal_id, data_dir, DataDir(data_dir).open_store())

    def tap(self, amount: int = 200) -> Record:
        self.counter += 1
        record = self.store.append_record(
            RecordBody(
                "purchase",
                f"03105170070{self.counter % 100000:09d}",
                amount,
                {"product": "test", "n": self.counter},
            )
        )
        self.written[record.seq] = record.hash
        return record

    def anchor_seq(self) -> int:
        """The seq just before the oldest record still in the store (what was compacted)."""
        first = next(iter(self.store.records(limit=1)), None)
        return self.store.last_seq() if first is None else first.seq - 1


def fast_settings(url: str, host_key: HostKey, **overrides: Any) -> SyncSettings:
    values: dict[str, Any] = {
        "upload_interval_s": 0.05,
        "upload_threshold": 1,
        "batch_size": 5,
        "check_interval_s": 0.05,
        "blacklist_interval_s": 0.2,
        "params_interval_s": 0.5,
        "heartbeat_interval_s": 0.5,
        "compact_after_s": 0.0,
        "timeout_s": 2.0,
        "retries": 2,
        "backoff_base_s": 0.001,
        "backoff_max_s": 0.01,
        # these tests inject 503/507s by the hundred: honour the host's Retry-After, briefly
        "retry_after_max_s": 0.01,
    }
    values.update(overrides)
    return SyncSettings(url, host_key.public_key_bytes, **values)


def daemon_for(terminal: Terminal, settings: SyncSettings, **options: Any) -> SyncDaemon:
    return open_daemon(terminal.data_dir, settings, rng=random.Random(0), **options)


def make_host(storage: Storage, key: HostKey | None = None, **options: Any) -> ClearingHost:
    """A host for the sync tests: open registration (the dev opt-in), since these test the
    upload and list mechanics; enrolment itself is tests/test_enrolment.py."""
    options.setdefault("open_registration", True)
    return ClearingHost(storage, key or HostKey.generate(), **options)


def enrol_body(terminal_id: str, key: DeviceKey, code: str | None = None) -> dict[str, Any]:
    """A signed enrolment request, as the daemon sends it."""
    return protocol.enrolment_request(
        terminal_id, key.public_key_bytes, key.sign, code, int(time.time())
    )


# --- faults ------------------------------------------------------------------------------------

UPLOAD_FAULTS = (
    "error_before",  # 503 before the host sees the batch
    "error_after",  # the host stored the batch, the answer became a 500
    "reset_before",  # connection cut before the host saw the batch
    "reset_after",  # the host committed, the connection was cut: response lost
    "timeout_after",  # the host committed, the answer came after the client gave up
    "duplicate",  # the batch is delivered twice
    "hold",  # the batch is delayed (the client sees a reset); delivered later, out of order
    "release",  # held batches are delivered (stale, reordered) before this one
    "host_restart",  # the host's storage is closed and reopened before this request
    "disk_full_host",  # the host's database cannot grow during this request
)


class FaultInjector:
    """Raw ASGI layer in front of the real host app: applies one scheduled fault per upload."""

    def __init__(self, host: ClearingHost, host_db: Path | None, *, stall_s: float = 0.3) -> None:
        self.host = host
        self.host_db = host_db
        self.app = create_app(host)
        self.faults: deque[str] = deque()
        self.held: list[tuple[dict[str, Any], bytes]] = []
        self.stall_s = stall_s
        self.applied: list[str] = []

    def schedule(self, faults: list[str]) -> None:
        self.faults = deque(faults)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if not (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"].endswith("/records")
        ):
            await self.app(scope, receive, send)
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        fault = self.faults.popleft() if self.faults else "none"
        self.applied.append(fault)
        if fault == "release":
            await self.release()
        elif fault == "host_restart" and self.host_db is not None:
            old = self.host.storage
            self.host.storage = SqliteStorage(self.host_db)
            old.close()
        if fault == "error_before":
            await _respond(send, 503, b'{"error":"injected","detail":"before"}')
            return
        if fault == "reset_before":
            await _reset(send)
            return
        if fault == "hold":
            self.held.append((dict(scope), body))
            await _reset(send)
            return
        storage = self.host.storage
        if fault == "disk_full_host" and isinstance(storage, SqliteStorage):
            storage.set_max_pages(storage.page_count())
        try:
            status, headers, answer = await self.deliver(scope, body)
            if fault == "duplicate":
                status, headers, answer = await self.deliver(scope, body)
        finally:
            if fault == "disk_full_host" and isinstance(storage, SqliteStorage):
                storage.set_max_pages(None)
        if fault == "error_after":
            await _respond(send, 500, b'{"error":"injected","detail":"after"}')
            return
        if fault == "reset_after":
            await _reset(send)
            return
        if fault == "timeout_after":
            await asyncio.sleep(self.stall_s)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": answer})

    async def release(self) -> None:
        held, self.held = self.held, []
        random.Random(len(held)).shuffle(held)
        for scope, body in held:
            await self.deliver(scope, body)

    async def deliver(
        self, scope: dict[str, Any], body: bytes
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """Run the real app on a buffered request; capture its answer."""
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if sent:
                await asyncio.sleep(3600)
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        status = 500
        headers: list[tuple[bytes, bytes]] = []
        chunks: list[bytes] = []

        async def capture(message: MutableMapping[str, Any]) -> None:
            nonlocal status, headers
            if message["type"] == "http.response.start":
                status, headers = message["status"], list(message.get("headers", []))
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(dict(scope), receive, capture)
        return status, headers, b"".join(chunks)


async def _respond(send: Any, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


class InjectedReset(ConnectionResetError):
    """Raised inside the ASGI app so that uvicorn cuts the connection mid-response."""


async def _reset(send: Any) -> None:
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"999")]}
    )
    await send({"type": "http.response.body", "body": b"{", "more_body": True})
    raise InjectedReset("injected connection reset")
