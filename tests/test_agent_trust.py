"""The agent verifies what it applies, and the daemon reads bounded answers (issue 9, Medium).

* ``params.json`` is applied only when signed by the host key the daemon pinned for the agent
  (``host-key.pub``): an unsigned, badly signed, other-key or tampered set is refused with an
  error naming the file, and the profile's values stay in force;
* a data directory that others can write and a device key that others can read are refused
  when the store is opened (by the agent and by the daemon); provisioning creates safe modes;
* a stand-in host on 127.0.0.1 answering with a gzip bomb, an encoding the client did not ask
  for, or a body past the cap (with or without ``Content-Length``) makes the daemon raise
  :class:`ProtocolError` with its memory bounded, and nothing is applied.

Keys here are generated per test: TEST KEYS ONLY.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent.errors import ConfigurationError, StoreError
from agent.offline_store import DeviceKey
from agent.params import (
    HOST_KEY_FILE,
    PARAMS_FILE,
    ActiveParams,
    params_signed_bytes,
    verify_envelope,
)
from agent.wiring import DEVICE_KEY_FILE, TERMINAL_FILE, DataDir
from clearinghost.keys import HostKey, sign_params
from sync.client import SyncClient
from sync.daemon import open_daemon
from sync.errors import ProtocolError
from tests.test_sync_support import Terminal, daemon_for, fast_settings


def payload(**fields: object) -> dict[str, Any]:
    now = int(time.time())
    body: dict[str, Any] = {
        "version": 1,
        "issued_at": now - 10,
        "expires_at": now + 3600,
        "effective_from": now - 5,
        "fare_table": {"flat_fare": 1},
        "issuer_allow_list": [],
    }
    body.update(fields)
    return body


# --- 1. the agent verifies params.json ---------------------------------------------------------


@pytest.fixture
def pinned(tmp_path: Path) -> Iterator[tuple[Path, HostKey]]:
    """A provisioned data directory whose daemon has pinned its host key (``open_daemon``)."""
    host_key = HostKey.generate()
    terminal = Terminal.provision(tmp_path, "BUS-PARAMS")
    daemon = daemon_for(terminal, fast_settings("http://127.0.0.1:9", host_key))
    daemon.close()
    terminal.store.close()
    yield terminal.data_dir, host_key


def test_daemon_pins_the_host_key_and_the_agent_applies_a_signed_set(
    pinned: tuple[Path, HostKey],
) -> None:
    data_dir, host_key = pinned
    assert (data_dir / HOST_KEY_FILE).read_text().strip() == host_key.public_key_bytes.hex()
    (data_dir / PARAMS_FILE).write_bytes(sign_params(payload(), host_key))
    in_force = ActiveParams(data_dir / PARAMS_FILE).current()
    assert in_force is not None and in_force.flat_fare == 1


def tampered(host_key: HostKey) -> bytes:
    envelope = json.loads(sign_params(payload(), host_key))
    envelope["payload"]["fare_table"]["flat_fare"] = 0
    return json.dumps(envelope).encode()


def not_a_signature(host_key: HostKey) -> bytes:
    envelope = json.loads(sign_params(payload(), host_key))
    envelope["signature"] = "not-a-signature"
    return json.dumps(envelope).encode()


FORGERIES = {
    "not_a_signature": not_a_signature,
    "no_signature": lambda key: json.dumps({"payload": payload()}).encode(),
    "other_key": lambda key: sign_params(payload(), HostKey.generate()),
    "tampered": tampered,
}


@pytest.mark.parametrize("forgery", sorted(FORGERIES))
def test_agent_refuses_a_params_file_that_does_not_verify(
    pinned: tuple[Path, HostKey], forgery: str
) -> None:
    data_dir, host_key = pinned
    path = data_dir / PARAMS_FILE
    path.write_bytes(FORGERIES[forgery](host_key))
    with capture_logs() as logs:
        assert ActiveParams(path).current() is None  # the profile's values stay in force
    errors = [e for e in logs if e["log_level"] == "error"]
    assert errors and errors[0]["path"] == str(path), logs


def test_agent_refuses_params_without_a_pinned_host_key(tmp_path: Path) -> None:
    """No ``host-key.pub``: nothing to verify against, so nothing is applied."""
    path = tmp_path / PARAMS_FILE
    path.write_bytes(sign_params(payload(), HostKey.generate()))
    with capture_logs() as logs:
        assert ActiveParams(path).current() is None
    assert any(e["log_level"] == "error" and HOST_KEY_FILE in e["error"] for e in logs), logs


def test_agent_verifies_what_the_host_signs() -> None:
    body = payload(fare_table={"flat_fare": 150, "currency": "CNY"}, issuer_allow_list=["Ä"])
    key = HostKey.generate()
    signed = sign_params(body, key)
    assert verify_envelope(signed, bytes.fromhex(key.public_key_hex())) == body
    assert json.loads(signed)["signature"] == key.sign(params_signed_bytes(body)).hex()


# --- 2. modes of the data directory and the device key -----------------------------------------


def test_data_directory_writable_by_others_is_refused(tmp_path: Path) -> None:
    data = DataDir(tmp_path / "dev")
    data.provision("BUS-MODE")
    os.chmod(data.path, 0o777)
    with pytest.raises(ConfigurationError, match=r"dev has mode 0777"):
        data.open_store()
    with pytest.raises(ConfigurationError, match=r"mode 0777"):
        open_daemon(data.path, fast_settings("http://127.0.0.1:9", HostKey.generate()))


def test_provisioning_refuses_an_existing_directory_writable_by_others(tmp_path: Path) -> None:
    path = tmp_path / "dev"
    path.mkdir()
    os.chmod(path, 0o777)
    with pytest.raises(ConfigurationError, match=r"mode 0777"):
        DataDir(path).provision("BUS-MODE")
    assert not (path / DEVICE_KEY_FILE).exists()


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_device_key_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    data = DataDir(tmp_path / "dev")
    data.provision("BUS-KEY")
    key_file = data.path / DEVICE_KEY_FILE
    os.chmod(key_file, mode)
    with pytest.raises(StoreError, match=rf"{DEVICE_KEY_FILE} has mode {mode:04o}"):
        DeviceKey.load(key_file)
    with pytest.raises(StoreError, match=rf"mode {mode:04o}"):
        data.open_store()


def test_provisioning_creates_safe_modes_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        data = DataDir(tmp_path / "new" / "dev")
        data.provision("BUS-UMASK")
    finally:
        os.umask(old)
    assert os.stat(data.path).st_mode & 0o022 == 0
    assert os.stat(data.path / DEVICE_KEY_FILE).st_mode & 0o077 == 0
    assert os.stat(data.path / TERMINAL_FILE).st_mode & 0o022 == 0
    data.open_store().close()


# --- 3. bounded answers ------------------------------------------------------------------------


def gzip_of_zeros(size: int) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(1 << 20)
    parts = [packer.compress(block) for _ in range(size >> 20)]
    return b"".join(parts) + packer.flush()


BOMB = gzip_of_zeros(256 << 20)  # ~250 KB on the wire, 256 MiB inflated


class Hostile:
    """A stand-in host on 127.0.0.1 answering every GET and upload with one fixed answer."""

    def __init__(self, body: bytes, headers: dict[str, str], *, length: bool = True) -> None:
        self.gets = 0
        hostile = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                hostile.gets += 1
                self.bad_answer()

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", "0")))
                if self.path.endswith("/register"):
                    data = b'{"ack_seq": 0}'
                    self.send_response(201)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                self.bad_answer()

            def bad_answer(self) -> None:
                self.send_response(200)
                for name, value in headers.items():
                    self.send_header(name, value)
                if length:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()  # HTTP/1.0: without a length the body ends at close
                # the client stops reading past its cap: that is the point
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


ANSWERS = {
    "gzip_bomb": (BOMB, {"Content-Encoding": "gzip"}, True),
    "gzip_bomb_no_length": (BOMB, {"Content-Encoding": "gzip"}, False),
    "deflate_not_asked_for": (zlib.compress(b"{}"), {"Content-Encoding": "deflate"}, True),
    "huge_plain_no_length": (bytes(130 << 20), {}, False),
    "huge_plain_declared": (bytes(130 << 20), {}, True),
    "truncated_gzip": (gzip.compress(b'{"a": 1}')[:-12], {"Content-Encoding": "gzip"}, True),
}


@pytest.fixture(params=sorted(ANSWERS))
def hostile(request: pytest.FixtureRequest) -> Iterator[Hostile]:
    body, headers, length = ANSWERS[request.param]
    server = Hostile(body, headers, length=length)
    yield server
    server.close()


def test_client_reads_answers_bounded(hostile: Hostile) -> None:
    client = SyncClient(hostile.url, "BUS-BOMB", timeout_s=5.0)
    try:
        calls: dict[str, Callable[[], object]] = {
            "params": lambda: client.fetch_params(0),
            "blacklist": lambda: client.fetch_blacklist(0),
            "heartbeat": lambda: client.heartbeat({}),
        }
        for name, call in calls.items():
            tracemalloc.start()
            try:
                with pytest.raises(ProtocolError, match="nothing applied"):
                    call()
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert peak < 128 << 20, f"{name}: {peak / 2**20:.0f} MiB held"
    finally:
        client.close()


def test_daemon_applies_nothing_from_a_bomb(tmp_path: Path) -> None:
    server = Hostile(BOMB, {"Content-Encoding": "gzip"})
    try:
        host_key = HostKey.generate()
        terminal = Terminal.provision(tmp_path, "BUS-BOMB")
        for _ in range(3):
            terminal.tap()
        daemon = daemon_for(terminal, fast_settings(server.url, host_key, retries=0))
        with pytest.raises(ProtocolError):
            daemon.pull_params()
        with pytest.raises(ProtocolError):
            daemon.pull_blacklist()
        with pytest.raises(ProtocolError):
            daemon.upload_pending()
        assert not (terminal.data_dir / PARAMS_FILE).exists()
        assert daemon.params.version == 0 and daemon.blacklist.version == 0
        assert terminal.store.acknowledged_seq() == 0 and terminal.store.count_unsent() == 3
        daemon.close()
        terminal.store.close()
    finally:
        server.close()
