"""Exactly-once upload under random fault schedules, against the real host over loopback.

Each schedule appends a few records to one of a pool of terminals (real SQLite stores written by
the agent-side handle), then drives that terminal's sync daemon through a random list of
faults — 5xx before/after the host commits, connection resets before/after, a response that
arrives after the client timed out, duplicated deliveries, delayed batches delivered later out
of order, host storage restarts, a host disk that cannot grow, a daemon "killed" between send
and ack, a terminal disk failing on the ack — until everything is acknowledged. After every
schedule: the host's (seq, hash) set for the terminal equals the terminal's, nothing lost,
nothing duplicated or conflicting, and the terminal compacted only what the host acknowledged.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import AgentError, StoreError
from clearinghost.keys import HostKey
from clearinghost.server import HostServer
from clearinghost.storage import SqliteStorage
from sync.daemon import SyncDaemon
from tests.test_sync_support import (
    UPLOAD_FAULTS,
    FaultInjector,
    Terminal,
    daemon_for,
    fast_settings,
    make_host,
)

SCHEDULES = int(os.environ.get("CARDSYNC_FAULT_SCHEDULES", "1000"))
TERMINALS = 24
CLIENT_FAULTS = ("crash_after_send", "disk_full_terminal")


class SimulatedCrash(BaseException):
    """The daemon process dies (kill -9) after the host answered, before the ack is stored."""


@pytest.fixture
def fast_dir() -> Iterator[Path]:
    # tmpfs when the machine has one: the schedules make thousands of fsync'd commits.
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="cardsync-faults-", dir=base) as name:
        yield Path(name)


class Harness:
    def __init__(self, root: Path, url: str, key: HostKey, injector: FaultInjector) -> None:
        self.root, self.url, self.key, self.injector = root, url, key, injector
        self.terminals: list[Terminal] = []
        self.daemons: dict[str, SyncDaemon] = {}
        self.client_faults: list[str] = []
        self.crashes = 0
        self.stats: dict[str, int] = {}

    def daemon(self, terminal: Terminal, batch_size: int) -> SyncDaemon:
        daemon = self.daemons.get(terminal.terminal_id)
        if daemon is None or daemon.settings.batch_size != batch_size:
            if daemon is not None:
                daemon.close()
            settings = fast_settings(self.url, self.key, batch_size=batch_size, timeout_s=0.3)
            daemon = daemon_for(terminal, settings, after_send_hook=self._after_send)
            self.daemons[terminal.terminal_id] = daemon
        return daemon

    def _after_send(self, ack_seq: int) -> None:
        if not self.client_faults:
            return
        fault = self.client_faults.pop(0)
        if fault == "crash_after_send":
            raise SimulatedCrash(f"killed after the host acknowledged {ack_seq}")
        if fault == "disk_full_terminal":
            raise StoreError("store: could not mark records acknowledged: database or disk is full")

    def crash(self, terminal: Terminal) -> None:
        daemon = self.daemons.pop(terminal.terminal_id)
        daemon.close()  # the process is gone; a new one opens the same files
        self.crashes += 1


def check_invariants(harness: Harness, terminal: Terminal, where: str) -> None:
    storage = harness.injector.host.storage
    host_terminal = storage.terminal(terminal.terminal_id)
    host_ack = host_terminal.ack_seq if host_terminal else 0
    anchor = terminal.anchor_seq()
    assert anchor <= host_ack, (
        f"{where}: terminal compacted through {anchor}, host acked {host_ack}"
    )
    assert terminal.store.acknowledged_seq() <= host_ack, f"{where}: terminal ack beyond host ack"
    held = dict(storage.record_keys(terminal.terminal_id))
    for seq, hash_ in held.items():
        assert terminal.written.get(seq) == hash_, f"{where}: host holds a record never written"


def run_schedule(harness: Harness, index: int) -> None:
    injector = harness.injector
    rng = random.Random(index)
    terminal = rng.choice(harness.terminals)
    for _ in range(rng.randint(1, 8)):
        terminal.tap()
    batch_size = rng.randint(1, 5)
    weights = [3, 3, 3, 3, 0.5, 3, 2, 2, 1, 2]
    faults = rng.choices(UPLOAD_FAULTS, weights=weights, k=rng.randint(0, 5))
    harness.client_faults = [rng.choice(CLIENT_FAULTS) for _ in range(rng.choice((0, 0, 0, 1, 2)))]
    injector.schedule(list(faults))
    for fault in [*faults, *harness.client_faults]:
        harness.stats[fault] = harness.stats.get(fault, 0) + 1
    where = f"schedule {index} ({terminal.terminal_id}, {faults} {harness.client_faults})"
    for _attempt in range(60):
        daemon = harness.daemon(terminal, batch_size)
        try:
            daemon.upload_pending()
        except SimulatedCrash:
            harness.crash(terminal)
        except AgentError:
            pass  # logged by the daemon; the next run retries
        check_invariants(harness, terminal, where)
        if terminal.store.count_unsent() == 0:
            if not injector.faults and not harness.client_faults:
                break
            terminal.tap()  # traffic goes on until every fault has been met
    else:
        pytest.fail(f"{where}: upload did not complete")
    if rng.random() < 0.2:  # stale deliveries may arrive at any time: deliver them now
        injector.schedule(["release"])
        terminal.tap()
        harness.daemon(terminal, batch_size).upload_pending()
    check_invariants(harness, terminal, where)
    held = dict(harness.injector.host.storage.record_keys(terminal.terminal_id))
    assert held == terminal.written, f"{where}: host set differs from terminal set"
    assert terminal.store.acknowledged_seq() == terminal.store.last_seq()


def test_exactly_once_under_random_fault_schedules(fast_dir: Path) -> None:
    key = HostKey.generate()
    host_db = fast_dir / "host.db"
    host = make_host(SqliteStorage(host_db), key)
    injector = FaultInjector(host, host_db, stall_s=0.35)
    started = time.monotonic()
    with HostServer(injector, log_level="critical") as server:
        harness = Harness(fast_dir, server.url, key, injector)
        harness.terminals = [Terminal.provision(fast_dir, f"BUS-{n:03d}") for n in range(TERMINALS)]
        try:
            for index in range(SCHEDULES):
                run_schedule(harness, index)
            # Deliver whatever is still held; nothing may change.
            injector.schedule(["release"])
            for terminal in harness.terminals:
                terminal.tap()
                harness.daemon(terminal, 5).upload_pending()
            for terminal in harness.terminals:
                held_keys = host.storage.record_keys(terminal.terminal_id)
                assert dict(held_keys) == terminal.written, f"{terminal.terminal_id}: sets differ"
                assert len(held_keys) == len({s for s, _ in held_keys}), "duplicate seq at host"
                report = terminal.store.verify()
                assert report.ok, f"{terminal.terminal_id}: {report.problems}"
            bad = [a for a in host.storage.anomalies(limit=10_000) if a["kind"] != "unresolved"]
            assert bad == [], f"anomalies at the host: {bad[:5]}"
        finally:
            for daemon in harness.daemons.values():
                daemon.close()
            for terminal in harness.terminals:
                terminal.store.close()
    host.storage.close()
    total = sum(len(t.written) for t in harness.terminals)
    print(
        f"\n{SCHEDULES} schedules, {total} records, {harness.crashes} daemon crashes, "
        f"faults {harness.stats}, {time.monotonic() - started:.1f} s"
    )
