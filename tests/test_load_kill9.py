"""The load tear matrix, kill -9 column (issue 10): every card command of a load × the card
removed before / after that command's commit, at which moment the agent process is killed with
SIGKILL; the agent is started again on the same data directory and the card re-presented; then
the kiosk's records reach the host through the sync protocol (the host's reconciliation).
3DES and SM4 cards. Never a double load, never a lost one: the card is credited exactly when the
host holds a completed load record.

The agent is the real ``cardagent load`` process (``python -m agent.cli`` from this worktree)
talking to an emulated serial reader module over TCP on 127.0.0.1 (the simulated card behind
it) and to a real clearing host (uvicorn on 127.0.0.1, loads on a real SQLite file). The kill
is sent by the card itself: when the agent's command ``n`` reaches it, before or after the card
commits, so the agent dies while it waits for that answer, deterministically.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.crypto import Algorithm
from agent.offline_store import DeviceKey, OfflineStore
from agent.sam.keys import KeySet
from agent.wiring import DEVICE_KEY_FILE, DataDir
from clearinghost.keys import HostKey
from clearinghost.keystore import SoftwareKeyStore, load_test_keys
from clearinghost.loads import LoadAuthority
from clearinghost.server import ClearingHost, HostServer, create_app
from clearinghost.storage import SqliteStorage
from sync import protocol
from tests.fake_reader.cpu_card import SimulatedCpuCard
from tests.fake_reader.faults import CardTorn
from tests.fake_reader.inprocess import CardField
from tests.fake_reader.module_server import ModuleEmulator
from tests.fake_reader.scenario import DEMO_PROFILE, REPO, demo_keyset, make_card

KIOSK = "KIOSK-KILL"
BALANCE = 5000
AMOUNT = 3000
LOAD_COMMANDS = 6  # PPSE, AID, EF17, GET BALANCE, INITIALIZE FOR LOAD, CREDIT FOR LOAD
HANG_BOUND_S = 120.0  # a hang bound, never a speed limit


class KillingCard:
    """The simulated card; at its ``at``-th APDU it has the agent process killed (SIGKILL),
    before (``tear_before``) or after (``tear_after``) it processes and commits the command,
    and answers nothing (it left the field). ``at = 0``: an ordinary card."""

    def __init__(self, card: SimulatedCpuCard) -> None:
        self.card = card
        self.at = 0
        self.mode = ""
        self.count = 0
        self.victim: Callable[[], None] = lambda: None
        self.fired = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.card, name)

    def power_on(self) -> None:
        self.card.power_on()

    def process(self, apdu: bytes) -> bytes:
        self.count += 1
        if self.count != self.at:
            return self.card.process(apdu)
        if self.mode == "tear_after":
            self.card.process(apdu)  # committed; its answer is lost with the agent
        self.fired = True
        self.victim()
        raise CardTorn(f"agent killed at command {self.at} ({self.mode})")


class Rig:
    def __init__(self, root: Path, keyset: KeySet) -> None:
        self.root = root
        self.data_dir = root / "kiosk"
        DataDir(self.data_dir).provision(KIOSK)
        device = DeviceKey.load(self.data_dir / DEVICE_KEY_FILE)
        self.authority = LoadAuthority(
            root / "loads.db", SoftwareKeyStore(keyset), max_balance=100000
        )
        self.host = ClearingHost(
            SqliteStorage(root / "host.db"), HostKey.generate(), loads=self.authority
        )
        self.host.storage.register_terminal(KIOSK, device.public_key_bytes.hex())
        self.field = CardField()
        self.emulator = ModuleEmulator(self.field, {}, torn_exc=CardTorn)
        _thread, self.port = self.emulator.serve_tcp("127.0.0.1", 0)
        self.server = HostServer(create_app(self.host), log_level="critical")
        self.url = self.server.__enter__().url

    def start(self, load_key: str, *, capture: bool = False) -> subprocess.Popen[bytes]:
        log = (self.root / "agent.log").open("ab")
        try:
            return subprocess.Popen(
                [
                    sys.executable, "-m", "agent.cli", "--log-format", "json", "load",
                    "--profile", str(DEMO_PROFILE), "--data-dir", str(self.data_dir),
                    "--reader-url", f"socket://127.0.0.1:{self.port}", "--host", self.url,
                    "--amount", str(AMOUNT), "--load-key", load_key,
                    "--terminal-number", "000000000024", "--wait", str(HANG_BOUND_S),
                ],
                cwd=REPO,
                stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
                stderr=log,
            )  # fmt: skip
        finally:
            log.close()

    def run_to_end(self, load_key: str) -> dict[str, Any]:
        agent = self.start(load_key, capture=True)
        out, _ = agent.communicate(timeout=HANG_BOUND_S)
        lines = out.decode().strip().splitlines()
        assert lines, (agent.returncode, (self.root / "agent.log").read_text()[-3000:])
        result: dict[str, Any] = json.loads(lines[-1])
        return result

    def upload(self) -> None:
        """The kiosk's records reach the host (what ``cardsync`` does)."""
        with OfflineStore.open_for_reading(DataDir(self.data_dir).store_path) as store:
            records = list(store.records())
        if not records:
            return
        batch = protocol.encode_batch(KIOSK, records)
        answer = httpx.post(
            self.url + protocol.records_path(KIOSK),
            content=batch.body,
            headers={
                "Content-Encoding": "gzip",
                protocol.IDEMPOTENCY_HEADER: batch.idempotency_key,
            },
            timeout=60,
        )
        assert answer.status_code == 200, answer.text

    def close(self) -> None:
        self.server.__exit__(None, None, None)
        self.emulator.stop()
        self.authority.close()
        self.host.storage.close()


@pytest.fixture
def keyset() -> KeySet:
    return KeySet([*demo_keyset(), *load_test_keys()])


@pytest.fixture
def rig(tmp_path: Path, keyset: KeySet) -> Iterator[Rig]:
    r = Rig(tmp_path, keyset)
    yield r
    r.close()


def _kill(agent: subprocess.Popen[bytes]) -> Callable[[], None]:
    return lambda: os.kill(agent.pid, signal.SIGKILL)


@pytest.mark.parametrize("algorithm", [Algorithm.TDES, Algorithm.SM4], ids=["3des", "sm4"])
@pytest.mark.parametrize("mode", ["tear_before", "tear_after"])
@pytest.mark.parametrize("position", range(1, LOAD_COMMANDS + 1))
def test_load_torn_by_a_kill9_of_the_agent(
    rig: Rig, keyset: KeySet, algorithm: Algorithm, mode: str, position: int
) -> None:
    label = f"{algorithm.name} command {position} {mode}"
    card = KillingCard(make_card("tunion", position, keyset, balance=BALANCE, algorithm=algorithm))
    card.at, card.mode = position, mode
    rig.field.insert(card)
    agent = rig.start("order-1")
    card.victim = _kill(agent)
    agent.wait(HANG_BOUND_S)
    rig.field.remove()
    assert card.fired and agent.returncode == -signal.SIGKILL, (label, agent.returncode)
    credited_by_torn = len(card.card.loads) == 1
    assert len(card.card.loads) <= 1, label

    # the agent starts again on the same data directory; the card comes back
    card.at = 0
    rig.field.insert(card)
    result = rig.run_to_end("order-1")
    rig.field.remove()
    expected = "recovered" if credited_by_torn else "loaded"
    assert result["status"] == expected, (label, result)
    check_exactly_one_load(rig, card.card, label)


def test_load_killed_while_the_host_authorises(rig: Rig, keyset: KeySet) -> None:
    """The host authorised (money taken, MAC2 made), the agent dies before CREDIT FOR LOAD: the
    restarted agent's probe shows the counter unchanged, the first attempt is given back and a
    second one loads the card once."""
    card = KillingCard(make_card("tunion", 50, keyset, balance=BALANCE))
    authorise = rig.authority.authorise
    agent_box: list[subprocess.Popen[bytes]] = []

    def authorise_then_kill(terminal_id: str, request: Mapping[str, Any]) -> bytes:
        mac2 = authorise(terminal_id, request)
        os.kill(agent_box[0].pid, signal.SIGKILL)
        return mac2

    rig.authority.authorise = authorise_then_kill  # type: ignore[method-assign]
    rig.field.insert(card)
    agent_box.append(rig.start("order-h"))
    agent_box[0].wait(HANG_BOUND_S)
    rig.field.remove()
    rig.authority.authorise = authorise  # type: ignore[method-assign]
    assert agent_box[0].returncode == -signal.SIGKILL
    assert not card.card.loads
    (held,) = rig.authority.loads("unresolved")  # the money is held, the operator sees it
    assert held.load_key == "order-h"
    rig.field.insert(card)
    result = rig.run_to_end("order-h")
    rig.field.remove()
    assert result["status"] == "loaded", result
    check_exactly_one_load(rig, card.card, "host")


def check_exactly_one_load(rig: Rig, card: SimulatedCpuCard, label: str) -> None:
    assert len(card.loads) == 1, f"{label}: loaded {len(card.loads)} times"
    assert card.balance == BALANCE + AMOUNT, label
    with OfflineStore.open_for_reading(DataDir(rig.data_dir).store_path) as store:
        assert store.integrity_check() == "ok", label
        assert store.verify().ok, label
        assert not store.pending_intents(), label
        records = list(store.records())
    (record,) = [r for r in records if r.kind == "load"]
    assert record.fields["tac"] == card.loads[0].tac.hex().upper(), label
    assert not [r for r in records if r.kind == "unresolved"], label
    # the host's reconciliation: the records arrive through sync
    rig.upload()
    views = rig.authority.loads()
    completed = [v for v in views if v.state == "completed"]
    assert len(completed) == 1, (label, views)
    assert completed[0].tac == card.loads[0].tac.hex().upper(), label
    assert completed[0].load_key == record.fields["load_key"], label
    assert {v.state for v in views} <= {"completed", "not_credited"}, (label, views)
    assert not rig.authority.loads("unresolved"), label
