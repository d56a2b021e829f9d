"""The daemon reads a blacklist answer only as far as it can be a list (issue 9: a hostile host
made the daemon hold 96 MiB, the blacklist cap, of zeros before refusing them; the daemon's
budget is 100 MB in all).

Bytes that cannot be a signed list are refused at their header, and a list may not run past the
size its header declares. A stand-in host on 127.0.0.1 (uvicorn) answers; the memory held is
measured with tracemalloc (a wide margin, no timing).
"""

from __future__ import annotations

import gzip
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.blacklist import BLACKLIST_FILE, KIND_SNAPSHOT, Blacklist, encode_list
from clearinghost.keys import HostKey
from clearinghost.server import HostServer
from sync.client import SyncClient
from sync.errors import ProtocolError

MIB = 1 << 20
SIGNER = HostKey.generate()


def signed_list(count: int) -> bytes:
    now = int(time.time())
    return encode_list(
        kind=KIND_SNAPSHOT,
        version=1,
        base_version=0,
        issued_at=now,
        expires_at=now + 3600,
        add=list(range(1, count + 1)),
        sign=SIGNER.sign,
        public_key_raw=SIGNER.public_key_bytes,
    )


def gzip_of(parts: Iterator[bytes]) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return b"".join(packer.compress(part) for part in parts) + packer.flush()


def zeros(size: int) -> Iterator[bytes]:
    for _ in range(size // MIB):
        yield bytes(MIB)


GENUINE = signed_list(2000)
ANSWERS: dict[str, tuple[bytes, bool]] = {
    # name: (body, gzip-encoded)
    "zeros_bomb": (gzip_of(zeros(90 * MIB)), True),
    "zeros_plain": (bytes(90 * MIB), False),
    "list_then_padding": (gzip_of(iter([GENUINE, *zeros(90 * MIB)])), True),
    "list_header_then_garbage": (GENUINE[:46] + bytes(90 * MIB), False),
}


def app_answering(body: bytes, encoded: bool) -> Callable[..., Any]:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        headers = [(b"content-type", b"application/octet-stream")]
        if encoded:
            headers.append((b"content-encoding", b"gzip"))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for start in range(0, len(body), MIB):
            await send(
                {"type": "http.response.body", "body": body[start : start + MIB], "more_body": True}
            )
        await send({"type": "http.response.body", "body": b""})

    return app


@pytest.mark.parametrize("name", sorted(ANSWERS))
def test_a_blacklist_answer_is_read_only_as_far_as_it_can_be_a_list(name: str) -> None:
    body, encoded = ANSWERS[name]
    with HostServer(app_answering(body, encoded), log_level="critical") as server:
        client = SyncClient(server.url, "BUS-LIST", timeout_s=60)
        tracemalloc.start()
        try:
            with pytest.raises(ProtocolError, match="nothing applied"):
                client.fetch_blacklist(0)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
            client.close()
    assert peak < 16 * MIB, f"{name}: {peak / MIB:.0f} MiB held"


@pytest.mark.parametrize("encoded", [False, True])
def test_a_genuine_list_still_arrives_whole(encoded: bool) -> None:
    body = gzip.compress(GENUINE) if encoded else GENUINE
    with HostServer(app_answering(body, encoded), log_level="critical") as server:
        client = SyncClient(server.url, "BUS-LIST", timeout_s=60)
        try:
            assert client.fetch_blacklist(0) == GENUINE
        finally:
            client.close()


@pytest.mark.parametrize("encoded", [False, True])
def test_a_large_list_streams_to_disk_and_applies_without_being_held(
    tmp_path: Path, encoded: bool
) -> None:
    """A 16 MB snapshot (2 M cards) streams through the client into a file beside the blacklist,
    verifies and is applied (issue 14): the daemon's side never holds it whole (tracemalloc peak
    well below the document's size), and the agent's view has it."""
    entries = list(range(7, 7 + 3 * 2_000_000, 3))
    now = int(time.time())
    document = encode_list(
        kind=KIND_SNAPSHOT,
        version=1,
        base_version=0,
        issued_at=now,
        expires_at=now + 3600,
        add=entries,
        sign=SIGNER.sign,
        public_key_raw=SIGNER.public_key_bytes,
    )
    body = gzip.compress(document, 1) if encoded else document
    del document
    path = tmp_path / BLACKLIST_FILE
    listed = Blacklist.open(path, auto_refresh_s=None, lookups=False)
    with HostServer(app_answering(body, encoded), log_level="critical") as server:
        client = SyncClient(server.url, "BUS-LIST", timeout_s=60)
        tracemalloc.start()
        try:
            incoming = listed.incoming()
            assert client.fetch_blacklist(0, incoming.feed) == b""
            result = listed.apply_incoming(incoming, SIGNER.public_key_bytes)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
            client.close()
    assert (result.kind, result.count) == ("snapshot", len(entries))
    assert peak < 8 * MIB, f"{peak / MIB:.0f} MiB held for a 16 MB list"
    assert listed.memory_bytes() < 300_000  # the daemon's view: header and offsets only
    agent_view = Blacklist.open(path, auto_refresh_s=None)
    assert agent_view.contains_asn(7) and agent_view.contains_asn(entries[-1])
    assert not agent_view.contains_asn(8)
    assert sorted(p.name for p in tmp_path.iterdir()) == [BLACKLIST_FILE]


def test_a_list_refused_while_it_streams_leaves_nothing(tmp_path: Path) -> None:
    """Entries out of order are refused as they arrive (before the rest is read); the incoming
    file goes and the old list stays."""
    path = tmp_path / BLACKLIST_FILE
    listed = Blacklist.open(path, auto_refresh_s=None, lookups=False)
    good = signed_list(10)
    listed.apply(good, SIGNER.public_key_bytes)
    before = path.read_bytes()
    bad = bytearray(signed_list(400_000))
    bad[81 + 8 * 200_000 : 81 + 8 * 200_001] = bytes(8)  # one entry goes back to 0
    with HostServer(app_answering(bytes(bad) + bytes(8 * MIB), False), log_level="critical") as s:
        client = SyncClient(s.url, "BUS-LIST", timeout_s=60)
        incoming = listed.incoming()
        try:
            with pytest.raises(ProtocolError, match="not strictly ascending"):
                client.fetch_blacklist(0, incoming.feed)
        finally:
            incoming.discard()
            client.close()
    assert path.read_bytes() == before and listed.version == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [BLACKLIST_FILE]
