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
from typing import Any

import pytest

from agent.blacklist import KIND_SNAPSHOT, encode_list
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
