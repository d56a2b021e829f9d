"""Bounded inputs at the reference clearing host (issue 9: ``text.splitlines()`` before the record
cap, a body cap that held only with ``Content-Length``, unbounded heartbeats, 500s on nested JSON,
odd query numbers and out-of-range ASNs).

Every test runs the real host (uvicorn) on 127.0.0.1 and checks the answer: a 4xx naming the
problem, never a 500, and the host still answers afterwards. Keys are generated per test: TEST
KEYS ONLY.
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from agent.offline_store import DeviceKey, RecordBody
from agent.offline_store.records import record_to_json, seal_record
from clearinghost.keys import HostKey
from clearinghost.operators import OPERATOR, Operators
from clearinghost.server import (
    MAX_ADMIN_BODY_BYTES,
    MAX_SMALL_BODY_BYTES,
    MAX_UPLOAD_BYTES,
    ClearingHost,
    HostServer,
    create_app,
)
from clearinghost.storage import SqliteStorage
from sync import protocol
from tests.test_sync_support import enrol_body

TERMINAL = "BUS-BOUNDS"
TOKEN = "bounds-operator-token-0123456789"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


class Site:
    def __init__(self, root: Path) -> None:
        self.device = DeviceKey.generate()
        self.host = ClearingHost(
            SqliteStorage(root / "host.db"),
            HostKey.generate(),
            operators=Operators.with_token("alice", OPERATOR, TOKEN),
            open_registration=True,
        )
        self.server = HostServer(create_app(self.host))
        self.client: httpx.Client


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    site = Site(tmp_path)
    with site.server, httpx.Client(base_url=site.server.url, timeout=30) as client:
        site.client = client
        answer = client.post(
            protocol.register_path(TERMINAL), json=enrol_body(TERMINAL, site.device)
        )
        assert answer.status_code == 201, answer.text
        yield site
    site.host.storage.close()


def still_answers(site: Site) -> None:
    assert site.client.get("/healthz").status_code == 200
    beat = site.client.post(protocol.heartbeat_path(TERMINAL), json={"unsent_records": 0})
    assert beat.status_code == 200, beat.text


def record_line(device: DeviceKey, seq: int = 1) -> bytes:
    record = seal_record(
        seq=seq,
        created_at="2024-01-01T00:00:00.000Z",
        terminal_id=TERMINAL,
        body=RecordBody("purchase", "03105170070100000009", 200, {"product": "test"}),
        prev_hash="0" * 64,
        sign=device.sign,
    )
    return (record_to_json(record) + "\n").encode()


def upload(site: Site, content: object, **headers: str) -> httpx.Response:
    headers.setdefault(protocol.IDEMPOTENCY_HEADER, "1-1-" + "0" * 32)
    return site.client.post(protocol.records_path(TERMINAL), content=content, headers=headers)  # type: ignore[arg-type]


def chunks(total: int, size: int = 256 * 1024) -> Iterator[bytes]:
    block = b"x" * size
    for _ in range(total // size):
        yield block


def post_or_refused(send: Callable[[], httpx.Response]) -> httpx.Response | None:
    """A streaming POST the host may cut off after answering: its answer, or ``None`` when
    the connection closed before the client read it (the host refused to read on)."""
    try:
        return send()
    except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError):
        return None


# --- body caps ---------------------------------------------------------------------------------


def test_chunked_upload_without_content_length_stops_at_the_cap(site: Site) -> None:
    total = MAX_UPLOAD_BYTES + 8 * 1024 * 1024
    sent = 0

    def body() -> Iterator[bytes]:
        nonlocal sent
        for chunk in chunks(total):
            sent += len(chunk)
            yield chunk

    answer = post_or_refused(lambda: upload(site, body(), **{"Content-Encoding": "identity"}))
    if answer is not None:
        assert "content-length" not in answer.request.headers
        assert answer.status_code == 413, answer.text
        assert answer.json()["error"] == "too_large"
    still_answers(site)
    assert [s for s, _ in site.host.storage.record_keys(TERMINAL)] == []


def test_declared_length_above_the_cap_is_refused_unread(site: Site) -> None:
    answer = upload(site, b"x" * (MAX_UPLOAD_BYTES + 1))
    assert answer.status_code == 413, answer.text
    still_answers(site)


def test_a_20_mb_heartbeat_is_refused_and_not_stored(site: Site) -> None:
    figures = b'{"unsent_records": 1, "pad": "' + b"y" * 20_000_000 + b'"}'
    declared = site.client.post(
        protocol.heartbeat_path(TERMINAL),
        content=figures,
        headers={"Content-Type": "application/json"},
    )
    assert declared.status_code == 413, declared.text

    def streamed() -> Iterator[bytes]:
        for start in range(0, len(figures), 1 << 20):
            yield figures[start : start + (1 << 20)]

    answer = post_or_refused(
        lambda: site.client.post(protocol.heartbeat_path(TERMINAL), content=streamed())
    )
    if answer is not None:
        assert answer.status_code == 413, answer.text
    held = site.host.storage.terminal(TERMINAL)
    assert held is not None and "pad" not in (held.heartbeat or {})
    still_answers(site)


@pytest.mark.parametrize("route", ["register", "heartbeat"])
def test_register_and_heartbeat_have_a_small_cap(site: Site, route: str) -> None:
    path = getattr(protocol, f"{route}_path")(TERMINAL)
    body = b'{"public_key": "' + b"a" * MAX_SMALL_BODY_BYTES + b'"}'
    assert site.client.post(path, content=body).status_code == 413
    assert MAX_SMALL_BODY_BYTES < MAX_ADMIN_BODY_BYTES <= MAX_UPLOAD_BYTES


# --- uploads: bounded inflation, per-line limits -----------------------------------------------


def gzip_of(block: bytes, repeat: int) -> bytes:
    """gzip of ``block * repeat`` without holding the inflated bytes."""
    deflater = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts = [deflater.compress(block) for _ in range(repeat)]
    parts.append(deflater.flush())
    return b"".join(parts)


@pytest.mark.parametrize(
    ("block", "names"),
    [
        # lines within the line and record caps, too many bytes: the inflation cap
        (b" " * 60_000 + b"\n", "uncompressed body exceeds"),
        (b"\0" * (1 << 20), "longer than"),  # one endless line: the line cap
        (b"\n" * (1 << 20), "more than"),  # a million blank lines: the line count
    ],
)
def test_a_gzip_bomb_is_refused_and_the_host_still_answers(
    site: Site, block: bytes, names: str
) -> None:
    bomb = gzip_of(block, (96 << 20) // len(block))  # 96 MiB inflated, 3 x the cap
    assert len(bomb) < 256 * 1024
    answer = upload(site, bomb, **{"Content-Encoding": "gzip"})
    assert answer.status_code == 413, answer.text
    assert names in answer.json()["detail"]
    still_answers(site)


def test_many_short_lines_stop_at_the_record_cap(site: Site) -> None:
    line = record_line(site.device)
    lines = 200_000  # 40 times the cap; inflated well below the byte cap per line read
    body = gzip_of(line, lines)
    answer = upload(site, body, **{"Content-Encoding": "gzip"})
    assert answer.status_code == 413, answer.text
    detail = answer.json()["detail"]
    cap = protocol.MAX_BATCH_RECORDS
    # refused at the first record above the cap, not after reading the other 195,000 lines
    assert f"more than {cap} records" in detail and f"line {cap + 1})" in detail, detail
    still_answers(site)


def test_a_long_line_is_refused_by_its_length(site: Site) -> None:
    line = b'{"pad":"' + b"z" * (protocol.MAX_LINE_BYTES + 10) + b'"}\n'
    answer = upload(site, gzip.compress(line), **{"Content-Encoding": "gzip"})
    assert answer.status_code == 413, answer.text
    assert "line 1 is longer than" in answer.json()["detail"]


@pytest.mark.parametrize(
    ("body", "encoding"),
    [
        (b"not gzip at all", "gzip"),
        (gzip.compress(b"{}\n")[:-6], "gzip"),  # truncated
        (b"[[[[[[[[[[" * 5000 + b"\n", "identity"),  # nested record line
        (b"\xff\xfe\n", "identity"),
        (b"\n\n", "identity"),
        (b"{}", "br"),
    ],
)
def test_malformed_uploads_are_400s(site: Site, body: bytes, encoding: str) -> None:
    answer = upload(site, body, **{"Content-Encoding": encoding})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == "bad_batch"


def test_a_genuine_upload_still_goes_through(site: Site) -> None:
    raw = record_line(site.device)
    key = f"1-1-{hashlib.sha256(raw).hexdigest()[:32]}"
    answer = upload(
        site, gzip.compress(raw), **{"Content-Encoding": "gzip", protocol.IDEMPOTENCY_HEADER: key}
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["ack_seq"] == 1


# --- JSON bodies -------------------------------------------------------------------------------

NESTED = b"[" * 30_000 + b"]" * 30_000
NESTED_OBJECT = b'{"a":' * 10_000 + b"1" + b"}" * 10_000
SHALLOW_BUT_DEEP = b'{"x":' + b"[" * 100 + b"]" * 100 + b"}"  # parses, deeper than allowed


def json_routes() -> list[tuple[str, dict[str, str]]]:
    admin = {**ADMIN, "Content-Type": "application/json"}
    return [
        (protocol.register_path(TERMINAL), {}),
        (protocol.heartbeat_path(TERMINAL), {}),
        ("/v1/admin/blacklist", admin),
        ("/v1/admin/params", admin),
    ]


@pytest.mark.parametrize("body", [NESTED, NESTED_OBJECT, SHALLOW_BUT_DEEP])
@pytest.mark.parametrize("route", range(4))
def test_nested_json_is_a_400(site: Site, body: bytes, route: int) -> None:
    path, headers = json_routes()[route]
    answer = site.client.post(path, content=body, headers=headers)
    assert answer.status_code == 400, (path, answer.status_code, answer.text)
    assert answer.json()["error"] == "too_deep"
    still_answers(site)


@pytest.mark.parametrize(
    "body", [b"{", b"nope", b"\xff", b'{"a": NaN}', b"", b"[1, 2]", b'"text"', b"42", b"null"]
)
@pytest.mark.parametrize("route", range(4))
def test_malformed_and_mistyped_json_is_a_400(site: Site, body: bytes, route: int) -> None:
    path, headers = json_routes()[route]
    answer = site.client.post(path, content=body, headers=headers)
    assert answer.status_code == 400, (path, body, answer.status_code, answer.text)
    assert answer.json()["error"] in ("bad_json", "bad_request", "bad_heartbeat")


@pytest.mark.parametrize(
    "payload",
    [
        {"public_key": 12},
        {"public_key": ["aa"]},
        {"public_key": {"k": "v"}},
        {"public_key": None},
        {},
    ],
)
def test_register_with_wrong_types_is_a_400(site: Site, payload: object) -> None:
    answer = site.client.post(protocol.register_path("BUS-OTHER"), json=payload)
    assert answer.status_code == 400, answer.text
    assert site.host.storage.terminal("BUS-OTHER") is None


# --- query numbers and ASNs --------------------------------------------------------------------


@pytest.mark.parametrize("value", ["²", "-1", "1.5", "1e3", str(10**30), "", " 1", "٣"])
@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("/v1/blacklist", "since"),
        ("/v1/params", "since"),
        (f"/v1/terminals/{TERMINAL}/records", "after"),
        (f"/v1/terminals/{TERMINAL}/records", "limit"),
    ],
)
def test_bad_query_numbers_are_400s(site: Site, path: str, name: str, value: str) -> None:
    answer = site.client.get(path, params={name: value}, headers=ADMIN)
    assert answer.status_code == 400, (path, name, value, answer.status_code, answer.text)
    assert name in answer.json()["detail"]


def test_good_query_numbers_still_work(site: Site) -> None:
    assert site.client.get("/v1/blacklist", params={"since": "0"}).status_code == 200
    largest = str(2**63 - 1)
    assert site.client.get("/v1/blacklist", params={"since": largest}).status_code == 200
    records = site.client.get(
        f"/v1/terminals/{TERMINAL}/records", params={"after": largest}, headers=ADMIN
    )
    assert records.status_code == 200 and records.json() == {"records": []}


@pytest.mark.parametrize(
    "asn", ["-1", "1" + "0" * 16, "F" * 17, "0x10", "1_0", " 10", "", "G1", 16, None, ["10"]]
)
@pytest.mark.parametrize("field", ["add", "remove"])
def test_asns_out_of_range_or_mistyped_are_400s(site: Site, asn: object, field: str) -> None:
    before = site.host.storage.blacklist_version()
    answer = site.client.post("/v1/admin/blacklist", json={field: [asn]}, headers=ADMIN)
    assert answer.status_code == 400, (asn, answer.status_code, answer.text)
    assert answer.json()["error"] == "bad_asn"
    assert site.host.storage.blacklist_version() == before


@pytest.mark.parametrize("payload", [{"add": "0A"}, {"add": {"a": 1}}, {"remove": 5}, ["0A"]])
def test_blacklist_publication_with_wrong_types_is_a_400(site: Site, payload: object) -> None:
    answer = site.client.post("/v1/admin/blacklist", json=payload, headers=ADMIN)
    assert answer.status_code == 400, answer.text


def test_the_asn_range_edges_are_accepted(site: Site) -> None:
    answer = site.client.post("/v1/admin/blacklist", json={"add": ["0", "f" * 16]}, headers=ADMIN)
    assert answer.status_code == 200, answer.text
    assert site.host.storage.blacklist_snapshot()[1] == [0, 2**64 - 1]
