"""The host serves the same signed list answer to every terminal asking the same question within
the reissue window (``ClearingHost.reissue_window_s``): one signature, one storage read and one
compression per (key space, delta base or snapshot, version) instead of one per pull.

The host's clock is held by the test (no timing); the storage is a real SQLite file. The terminal
side is the real agent code (:class:`agent.blacklist.Blacklist`): a reused answer is the same
bytes, a later one a re-issue it may take or harmlessly ignore.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.blacklist import (
    KIND_DELTA,
    KIND_SNAPSHOT,
    SPACE_PRINTED,
    SPACE_SERIAL,
    Blacklist,
    SignedList,
    decode_list,
    printed_key,
)
from clearinghost.keys import HostKey
from clearinghost.server import ClearingHost, HostServer, create_app
from clearinghost.storage import SqliteStorage
from sync import protocol
from sync.params import verify_params
from tests.test_sync_support import make_host

T0 = 1_800_000_000
SERIALS = [0x5180_0000_0000_0000 + 7 * n for n in range(1, 400)]  # a snapshot above 1 KiB
PRINTED = [printed_key("1000", str(881146306 + n)) for n in range(3)]


class CountingKey(HostKey):
    """A host key that counts its signatures."""

    signatures = 0

    def sign(self, data: bytes) -> bytes:
        self.signatures += 1
        return super().sign(data)


class CountingStorage(SqliteStorage):
    """A storage that counts how often a whole key space, or the stored parameter sets, are
    read."""

    snapshots = 0
    param_reads = 0

    def blacklist_snapshot(self, space: str = SPACE_SERIAL) -> tuple[int, list[int]]:
        self.snapshots += 1
        return super().blacklist_snapshot(space)

    def recent_params(self, limit: int) -> list[dict[str, Any]]:
        self.param_reads += 1
        return super().recent_params(limit)


class Clock:
    def __init__(self) -> None:
        self.now = float(T0)

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def host(tmp_path: Path, clock: Clock) -> Iterator[Any]:
    """A host (CountingKey, CountingStorage) with serial and printed lists at version 1."""
    storage = CountingStorage(tmp_path / "host.db")
    storage.publish_blacklist(SERIALS[:200], [], printed_add=PRINTED[:2])
    yield make_host(storage, CountingKey.generate(), clock=clock)
    storage.close()


def document(host: ClearingHost, since: int, space: str = SPACE_SERIAL) -> bytes:
    """The signed list as the route serves it (uncompressed)."""
    return host.blacklist_answer(since, space).document


def read(host: ClearingHost, signed: bytes, space: str = SPACE_SERIAL) -> SignedList:
    return decode_list(signed, host.key.public_key_bytes, space)


def test_a_pull_within_the_window_is_the_same_answer_signed_once(host: Any, clock: Clock) -> None:
    key, storage = host.key, host.storage
    first = document(host, 0)
    assert (key.signatures, storage.snapshots) == (1, 1)
    clock.now += 59.5  # the window is 60 s
    again = document(host, 0)
    assert again is first  # the same bytes: neither signed nor read again
    assert (key.signatures, storage.snapshots) == (1, 1)
    assert read(host, again).issued_at == T0 and read(host, again).version == 1
    # the empty re-issue every up-to-date terminal pulls: signed once too
    reissue = document(host, 1)
    assert document(host, 1) is reissue and key.signatures == 2
    signed = read(host, reissue)
    assert (signed.kind, signed.version, signed.base_version) == (KIND_DELTA, 1, 1)
    assert signed.added() == signed.removed() == []


def test_after_the_window_the_answer_is_signed_again_and_the_agent_takes_it(
    host: Any, clock: Clock, tmp_path: Path
) -> None:
    public = host.key.public_key_bytes
    first = document(host, 0)
    terminal = Blacklist(tmp_path / "blacklist.bin")
    assert terminal.apply(first, public, now=clock.now).kind == "snapshot"
    clock.now += 60
    later = document(host, 0)
    assert later != first and host.key.signatures == 2
    assert read(host, later).issued_at == T0 + 60
    assert read(host, later).content_digest == read(host, first).content_digest
    # the same version issued later: nothing to write while the list in force is young ...
    assert terminal.apply(later, public, now=clock.now).kind == "unchanged"
    assert terminal.issued_at == T0
    # ... a re-issue that extends the expiry once half its life is gone
    halfway = T0 + host.list_ttl_s * 0.6
    assert terminal.apply(later, public, now=halfway).version == 1
    assert (terminal.issued_at, terminal.expires_at) == (T0 + 60, T0 + 60 + host.list_ttl_s)
    # the earlier answer (what another host process might still serve): harmless
    assert terminal.apply(first, public, now=halfway).kind == "unchanged"
    assert terminal.expires_at == T0 + 60 + host.list_ttl_s
    # an empty re-issue, reused within the window, then signed again
    reissue = document(host, 1)
    assert document(host, 1) is reissue
    clock.now += 60
    assert read(host, document(host, 1)).issued_at == T0 + 120


def test_a_new_version_is_served_at_once(host: Any, clock: Clock) -> None:
    old_snapshot = document(host, 0)
    old_reissue = document(host, 1)
    assert document(host, 0) is old_snapshot  # kept ...
    assert document(host, 1) is old_reissue
    assert host.key.signatures == 2
    host.storage.publish_blacklist(SERIALS[200:210], SERIALS[:5])
    clock.now += 1  # well within the window
    delta = read(host, document(host, 1))  # ... but never served for version 2
    assert (delta.kind, delta.version, delta.base_version) == (KIND_DELTA, 2, 1)
    assert delta.added() == SERIALS[200:210] and delta.removed() == SERIALS[:5]
    snapshot = read(host, document(host, 0))
    assert (snapshot.kind, snapshot.version) == (KIND_SNAPSHOT, 2)
    assert snapshot.added() == sorted(SERIALS[5:210])
    # the answers of version 1 are forgotten, not kept beside those of version 2
    assert {k[2] for k in host._answers} == {2}


def test_deltas_are_kept_per_base_version(host: Any, clock: Clock) -> None:
    host.storage.publish_blacklist(SERIALS[200:201], [])
    host.storage.publish_blacklist(SERIALS[201:202], [SERIALS[0]])
    answers = {since: document(host, since) for since in (1, 2, 3)}
    clock.now += 30
    for since in (3, 2, 1):
        assert document(host, since) is answers[since]
    assert host.key.signatures == 3
    expected = {
        1: (SERIALS[200:202], [SERIALS[0]]),
        2: (SERIALS[201:202], [SERIALS[0]]),
        3: ([], []),
    }
    for since, (added, removed) in expected.items():
        signed = read(host, answers[since])
        assert (signed.kind, signed.version, signed.base_version) == (KIND_DELTA, 3, since)
        assert (signed.added(), signed.removed()) == (added, removed)


def test_the_key_spaces_are_kept_apart(host: Any, clock: Clock) -> None:
    for since in (0, 1):
        serial = document(host, since, SPACE_SERIAL)
        printed = document(host, since, SPACE_PRINTED)
        assert printed[:8] != serial[:8]  # each its own magic
        clock.now += 1
        assert document(host, since, SPACE_PRINTED) is printed
        assert document(host, since, SPACE_SERIAL) is serial
        assert read(host, printed, SPACE_PRINTED).version == 1
        assert read(host, serial, SPACE_SERIAL).version == 1
    assert read(host, document(host, 0, SPACE_PRINTED), SPACE_PRINTED).added() == sorted(
        PRINTED[:2]
    )
    host.storage.publish_blacklist([], [], printed_add=PRINTED[2:])
    printed_delta = read(host, document(host, 1, SPACE_PRINTED), SPACE_PRINTED)
    serial_delta = read(host, document(host, 1, SPACE_SERIAL), SPACE_SERIAL)
    assert printed_delta.version == serial_delta.version == 2
    assert printed_delta.added() == PRINTED[2:] and serial_delta.added() == []


def test_the_route_serves_the_same_gzip_body(host: Any, clock: Clock) -> None:
    def pull(client: httpx.Client, since: int, encoding: str) -> tuple[httpx.Headers, bytes]:
        """The answer's headers and its body as sent (not decoded)."""
        with client.stream(
            "GET",
            protocol.BLACKLIST_PATH,
            params={"since": since},
            headers={"Accept-Encoding": encoding},
        ) as answer:
            assert answer.status_code == 200
            return answer.headers, b"".join(answer.iter_raw())

    with HostServer(create_app(host)) as server, httpx.Client(base_url=server.url) as client:
        (first, packed), (second, packed_again) = pull(client, 0, "gzip"), pull(client, 0, "gzip")
        plain, body = pull(client, 0, "identity")
        for headers in (first, second):
            assert headers["content-encoding"] == "gzip"
            assert headers["cache-control"] == "no-store"
            assert headers["content-type"] == protocol.BLACKLIST_MEDIA_TYPE
        assert "content-encoding" not in plain and plain["cache-control"] == "no-store"
        assert packed == packed_again
        assert gzip.decompress(packed) == body == document(host, 0)
        assert read(host, body).added() == SERIALS[:200]
        assert host.key.signatures == 1 and host.storage.snapshots == 1
        small, reissue = pull(client, 1, "gzip")  # an empty re-issue: under 1 KiB, sent as is
        assert "content-encoding" not in small and reissue == document(host, 1)


def test_parameter_sets_are_signed_once_per_window(host: Any, clock: Clock) -> None:
    public = host.key.public_key_bytes
    host.storage.publish_params({"fare_table": {"flat_fare": 200}})
    first = host.params_document(0)
    assert host.params_document(1) is first and host.key.signatures == 1
    clock.now += 60
    later = host.params_document(1)
    assert verify_params(later, [public]).issued_at == T0 + 60
    host.storage.publish_params({"fare_table": {"flat_fare": 250}})
    newer = verify_params(host.params_document(1), [public])  # at once, within the window
    assert newer.version == 2 and newer.fare_table == {"flat_fare": 250}


def test_a_pull_within_the_window_reads_only_the_newest_parameter_version(
    host: Any, clock: Clock
) -> None:
    """A city publishes parameter sets for years: a pull within the window reads the newest
    version number, not the stored sets (it read and decoded up to 50 of them every pull)."""
    for fare in range(100, 160):
        host.storage.publish_params({"fare_table": {"flat_fare": fare}})
    first = host.params_document(0)
    assert host.storage.param_reads == 1 and host.key.signatures == 1
    for since in (0, 59, 60, 61):  # 61: a terminal ahead of the host, answered all the same
        assert host.params_document(since) is first
    assert host.storage.param_reads == 1 and host.key.signatures == 1
    assert verify_params(first, [host.key.public_key_bytes]).fare_table == {"flat_fare": 159}
    clock.now += 60
    assert host.params_document(60) != first and host.storage.param_reads == 2


def test_a_zero_window_signs_every_pull(host: Any) -> None:
    host.reissue_window_s = 0
    assert document(host, 1) == document(host, 1)  # same second, same bytes
    assert host.key.signatures == 2 and not host._answers
