"""A per-terminal rate limit at the host (issue 14): a terminal sending uploads or list pulls
faster than ``client_rate`` (burst ``client_burst``) is answered 429 ``rate_limited`` with
Retry-After, and the daemon honours it as it does 503 ``busy``: it waits at least what was
asked, and every record is acknowledged exactly once.

The token bucket is sans I/O (the caller passes the time); against the real host on 127.0.0.1
its clock is a logical one that moves a fixed step per request, so which request is refused
does not depend on how fast this machine runs.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from clearinghost.server import ClientRateLimit, HostLimits, HostServer
from sync import protocol
from sync.client import SyncClient
from sync.errors import HostBusy
from tests.test_host_admission import WAIT_S, Wire, daemon_on_wire, enrolled, host_with
from tests.test_sync_support import daemon_for, fast_settings


def test_a_bucket_admits_its_burst_then_one_request_per_token() -> None:
    limit = ClientRateLimit(rate=2.0, burst=3)
    assert [limit.take("T1", 100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limit.take("T1", 100.0) == pytest.approx(0.5)  # the next token in 1/rate
    assert limit.take("T1", 100.1) == pytest.approx(0.4)  # 0.2 tokens now; none taken
    assert limit.take("T2", 100.1) == 0.0  # another terminal has its own bucket
    assert limit.take("T1", 100.5) == 0.0  # refilled by one token
    assert limit.take("T1", 100.5) > 0
    assert limit.take("T1", 1000.0) == 0.0  # idle: full again, never more than the burst
    assert [limit.take("T1", 1000.0) > 0 for _ in range(3)] == [False, False, True]
    assert limit.limited == 4


def test_rate_zero_is_no_limit_and_the_buckets_are_bounded() -> None:
    off = ClientRateLimit(rate=0.0, burst=1)
    assert all(off.take("T1", 0.0) == 0.0 for _ in range(1000))
    limit = ClientRateLimit(rate=1.0, burst=2, max_clients=100)
    for n in range(1000):
        assert limit.take(f"T{n}", float(n) / 1000) == 0.0  # a new terminal: a full bucket
        assert len(limit) <= 100
    # a busy terminal keeps its bucket while idle ones are forgotten
    for n in range(300):
        limit.take("BUSY", 5.0)
        limit.take(f"U{n}", 5.0)
    assert limit.take("BUSY", 5.0) > 0


def test_limits_are_checked_and_cardhost_host_refuses_bad_ones(tmp_path: Path) -> None:
    assert HostLimits().client_rate == 50.0 and HostLimits().client_burst == 200
    for bad in ({"client_rate": -1.0}, {"client_rate": float("inf")}, {"client_burst": 0}):
        with pytest.raises(ValueError, match="client_"):
            HostLimits(**bad)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "clearinghost.cli",
            "host",
            "--db",
            str(tmp_path / "h.db"),
            "--key",
            str(tmp_path / "h.key"),
            "--client-burst",
            "0",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )
    assert run.returncode == 2 and "client_burst must be at least 1" in run.stderr


class LogicalClock(ClientRateLimit):
    """The host's bucket with a clock that moves ``step`` seconds per request it sees."""

    def __init__(self, rate: float, burst: int, step: float) -> None:
        super().__init__(rate, burst)
        self.step, self.now, self.lock = step, 0.0, threading.Lock()

    def take(self, client: str, now: float) -> float:
        with self.lock:
            self.now += self.step
            return super().take(client, self.now)


def limited(server: HostServer, rate: float, burst: int, step: float) -> LogicalClock:
    clock = LogicalClock(rate, burst, step)
    server._app.state.client_rate = clock
    return clock


def test_list_pulls_beyond_the_rate_get_429_with_retry_after(tmp_path: Path) -> None:
    host, server = host_with(tmp_path)
    try:
        clock = limited(server, rate=1.0, burst=2, step=0.0)  # time stands still: no refill
        client = SyncClient(server.url, "P1")
        other = SyncClient(server.url, "P2")
        try:
            client.fetch_blacklist(0)
            client.fetch_params(0)  # params and blacklist share the terminal's bucket
            with pytest.raises(HostBusy) as refused:
                client.fetch_blacklist(0)
            assert refused.value.status == 429 and refused.value.code == "rate_limited"
            assert refused.value.retry_after_s == 1.0
            assert "'P1'" in str(refused.value)  # the answer names who is over the rate
            other.fetch_blacklist(0)  # another terminal is not held back
            bare = httpx.get(f"{server.url}{protocol.PARAMS_PATH}", timeout=WAIT_S)
            bare2 = httpx.get(f"{server.url}{protocol.PARAMS_PATH}", timeout=WAIT_S)
            third = httpx.get(f"{server.url}{protocol.PARAMS_PATH}", timeout=WAIT_S)
            assert 429 not in (bare.status_code, bare2.status_code)  # its own bucket
            assert third.status_code == 429 and third.headers["retry-after"] == "1"
            assert third.json()["error"] == "rate_limited"  # anonymous: by peer address
            assert clock.limited == 2
        finally:
            client.close()
            other.close()
    finally:
        server.stop()
        host.storage.close()


def test_the_daemon_honours_429_and_every_record_is_acknowledged_once(tmp_path: Path) -> None:
    host, server = host_with(tmp_path)
    try:
        # one token a second, two at once, half a second per request: every other refused
        clock = limited(server, rate=1.0, burst=2, step=0.5)
        terminal = enrolled(host, tmp_path / "terminals", "Q1", 14)
        wire = Wire()
        settings = fast_settings(
            server.url, host.key, batch_size=2, retries=8, retry_after_max_s=30.0
        )
        daemon = daemon_on_wire(terminal, daemon_for(terminal, settings), server.url, wire)
        try:
            daemon._ensure_registered()
            report = daemon.upload_pending()
            answers = wire.uploads()
            refusals = [a for a in answers if a.status == 429]
            assert refusals and {a.status for a in answers} == {200, 429}
            assert len(refusals) == clock.limited
            for refusal, following in itertools.pairwise(answers):
                if refusal.status == 429:
                    assert refusal.retry_after is not None and int(refusal.retry_after) >= 1
                    # never sooner than asked (a lower bound: no wall-clock upper bound here)
                    assert following.at - refusal.at >= int(refusal.retry_after)
            assert report.records == 14
            assert terminal.store.acknowledged_seq() == 14
            assert host.storage.record_keys("Q1") == sorted(terminal.written.items())
            assert host.storage.count_records() == 14
        finally:
            daemon.close()
    finally:
        server.stop()
        host.storage.close()
