"""A real POS stack for the tests: the simulated card field and PSAM behind the emulated serial
reader module on TCP, the real serial driver, a real store, and ``cardagent pos`` served over
HTTP on 127.0.0.1, in this process (:class:`PosStack`) or as a subprocess (:func:`start_pos`).
:class:`PosClient` is a small simulated POS (httpx)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from agent.pos.http import PosHttpServer, serve_in_thread
from agent.pos.orders import OrderBook
from agent.pos.service import PosService
from agent.profile import load_profile
from agent.transaction import TransactionEngine
from agent.wiring import DataDir, open_hardware
from tests.fake_reader.faults import CardTorn
from tests.fake_reader.inprocess import CardField
from tests.fake_reader.module_server import ModuleEmulator
from tests.fake_reader.scenario import DEMO_PROFILE, REPO, demo_keyset, make_psam

TERMINAL_ID = "POS-0001"


def write_profile(directory: Path, reader_timeout_s: float = 1.0) -> Path:
    """The demo profile (``[pos] max_amount = 50000``), with the reader timeout given."""
    path = directory / "profile.toml"
    text = DEMO_PROFILE.read_text(encoding="utf-8").replace(
        "timeout_s = 1.0", f"timeout_s = {reader_timeout_s}"
    )
    path.write_text(text, encoding="utf-8")
    return path


class Field:
    """The card field behind the emulated module, with a PSAM in slot 1."""

    def __init__(self, on_feedback: Any = None) -> None:
        self.keyset = demo_keyset()
        self.field = CardField()
        self.psam = make_psam(self.keyset)
        self.emulator = ModuleEmulator(
            self.field, {1: self.psam}, torn_exc=CardTorn, on_feedback=on_feedback
        )
        _thread, self.port = self.emulator.serve_tcp("127.0.0.1", 0)
        self.url = f"socket://127.0.0.1:{self.port}"

    def present(self, card: Any) -> None:
        self.field.insert(card)

    def take_away(self) -> None:
        self.field.remove()

    def close(self) -> None:
        self.emulator.stop()


class PosClient:
    """A simulated POS: what the shop's software sends (httpx, bounded timeouts)."""

    def __init__(self, base_url: str) -> None:
        self.http = httpx.Client(base_url=base_url, timeout=httpx.Timeout(90.0))

    def purchase(self, order_id: str, amount: int, wait_s: float = 0.0) -> httpx.Response:
        return self.http.post(
            "/v1/purchases", json={"order_id": order_id, "amount": amount, "wait_s": wait_s}
        )

    def order(self, order_id: str) -> httpx.Response:
        return self.http.get(f"/v1/orders/{order_id}")

    def close(self) -> None:
        self.http.close()


class PosStack:
    """``cardagent pos`` in this process: engine, store, driver and HTTP server."""

    def __init__(self, directory: Path, field: Field, reader_timeout_s: float = 1.0) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.profile = load_profile(write_profile(directory, reader_timeout_s))
        self.data_dir = DataDir(directory / "device")
        if not self.data_dir.path.exists():
            self.data_dir.provision(TERMINAL_ID)
        self.field = field
        self.store = self.data_dir.open_store()
        self.hardware = open_hardware(self.profile, self.data_dir, field.url)
        self.engine = TransactionEngine(self.profile, self.store, self.hardware.sams)
        self.service = PosService(self.engine, self.hardware.reader, OrderBook(self.store.path))
        self.server: PosHttpServer = serve_in_thread(self.service)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.pos = PosClient(self.url)

    def close(self) -> None:
        self.pos.close()
        self.server.shutdown()
        self.server.server_close()
        self.service.close()
        self.hardware.close()
        self.store.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_pos(profile: Path, data_dir: Path, reader_url: str, port: int) -> subprocess.Popen[bytes]:
    """``cardagent pos`` as a subprocess (its log in ``data_dir/pos.log``)."""
    log = (data_dir / "pos.log").open("ab")
    try:
        return subprocess.Popen(
            [
                sys.executable, "-m", "agent.cli", "--log-format", "json",
                "pos", "--profile", str(profile), "--data-dir", str(data_dir),
                "--reader-url", reader_url, "--listen", f"127.0.0.1:{port}",
            ],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )  # fmt: skip
    finally:
        log.close()


def wait_until_serving(url: str, process: subprocess.Popen[bytes], bound_s: float = 60.0) -> None:
    """Poll until the POS API answers (hang bound ``bound_s``; no speed assumed)."""
    end = time.monotonic() + bound_s
    while True:
        assert process.poll() is None, f"cardagent pos exited ({process.returncode})"
        try:
            if httpx.get(f"{url}/v1/transactions", timeout=5.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < end, f"cardagent pos did not serve within {bound_s} s"
        time.sleep(0.05)
