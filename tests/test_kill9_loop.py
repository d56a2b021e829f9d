"""kill -9 loop against the running agent (issue #2).

The real ``cardagent run`` process talks to an emulated serial reader module (cards + PSAM,
served over TCP on 127.0.0.1 by this test process) while a presenter thread taps random cards.
The agent is killed with SIGKILL at random moments, ``KILL_CYCLES`` times (default 100).
After each kill: ``PRAGMA integrity_check`` is ok, the chain verifies, no record is lost
(the count never drops, every acknowledged tap has its record) and none is duplicated.
Finally every card is presented once more: each card debit has exactly one record.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from agent.offline_store import OfflineStore
from agent.wiring import DataDir
from tests.fake_reader.faults import CardTorn
from tests.fake_reader.inprocess import CardField
from tests.fake_reader.module_server import ModuleEmulator
from tests.fake_reader.scenario import DEMO_PROFILE, REPO, demo_keyset, make_card, make_psam

CYCLES = int(os.environ.get("KILL_CYCLES", "100"))
BALANCE = 100_000


class Presenter:
    """Puts random cards in the field, one at a time, like passengers boarding."""

    def __init__(self, cards: list[Any], field: CardField) -> None:
        self.cards = cards
        self.field = field
        self.feedback = threading.Event()
        self.acks: list[str] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.rng = random.Random(1234)

    def on_feedback(self, ok: bool, text: str) -> None:
        if ok and text.startswith("OK"):
            with self.lock:
                self.acks.append(text)
        self.feedback.set()

    def ack_count(self) -> int:
        with self.lock:
            return len(self.acks)

    def present(self, card, wait_s: float = 1.0) -> bool:
        self.feedback.clear()
        self.field.insert(card)
        got = self.feedback.wait(wait_s)
        self.field.remove()
        time.sleep(0.05)
        return got

    def run(self) -> None:
        while not self.stop.is_set():
            self.present(self.rng.choice(self.cards), wait_s=0.6)


def start_agent(profile: Path, data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    log = (data_dir / "agent.log").open("ab")
    try:
        return subprocess.Popen(
            [
                sys.executable, "-m", "agent.cli", "--log-format", "json", "--log-level", "info",
                "run", "--profile", str(profile), "--data-dir", str(data_dir),
                "--reader-url", f"socket://127.0.0.1:{port}",
            ],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )  # fmt: skip
    finally:
        log.close()


def wait_for_ack(
    presenter: Presenter, acks_before: int, bound_s: float, agent: subprocess.Popen[bytes]
) -> None:
    end = time.monotonic() + bound_s
    while presenter.ack_count() <= acks_before:
        assert agent.poll() is None, f"the agent exited ({agent.returncode}) before a tap"
        assert time.monotonic() < end, f"no tap paid within {bound_s} s (hang bound)"
        time.sleep(0.02)


def check_store(path: Path, last_count: int, acks: int) -> int:
    if not path.exists():  # killed before it opened its store (a slow start on a busy machine)
        assert last_count == 0 and acks == 0, "the store vanished"
        return 0
    with OfflineStore.open_for_reading(path) as store:
        assert store.integrity_check() == "ok"
        report = store.verify()
        assert report.ok, report.problems
        records = list(store.records())
    purchases = [r for r in records if r.kind == "purchase"]
    keys = [(r.fields["asn"], r.fields["counter"]) for r in purchases]
    assert len(keys) == len(set(keys)), "a debit was recorded twice"
    assert len(records) >= last_count, "records were lost"
    assert len(purchases) >= acks, f"{acks} taps acknowledged but {len(purchases)} records"
    return len(records)


def test_kill9_loop(tmp_path: Path) -> None:
    profile = tmp_path / "profile.toml"
    profile.write_text(
        DEMO_PROFILE.read_text(encoding="utf-8").replace(
            "double_tap_window_s = 5.0", "double_tap_window_s = 0.0"
        ),
        encoding="utf-8",
    )
    data_dir = tmp_path / "device"
    DataDir(data_dir).provision("KILL-0001")
    store_path = DataDir(data_dir).store_path
    keys = demo_keyset()
    families = ("tunion", "cjt166", "legacy1001")
    cards = [make_card(families[i % 3], i, keys, balance=BALANCE) for i in range(6)]  # type: ignore[arg-type]
    field = CardField()
    presenter = Presenter(cards, field)
    emulator = ModuleEmulator(
        field, {1: make_psam(keys)}, torn_exc=CardTorn, on_feedback=presenter.on_feedback
    )
    _thread, port = emulator.serve_tcp("127.0.0.1", 0)
    rng = random.Random(99)
    presenting = threading.Thread(target=presenter.run, daemon=True)
    presenting.start()
    count = 0
    try:
        for cycle in range(CYCLES):
            with presenter.lock:
                acks_before = len(presenter.acks)
            agent = start_agent(profile, data_dir, port)
            if cycle % 2:  # anywhere, start-up included
                time.sleep(rng.uniform(0.05, 1.0))
            else:  # after this agent has paid a tap, however slowly it started (60 s hang bound)
                wait_for_ack(presenter, acks_before, 60.0, agent)
                time.sleep(rng.uniform(0.0, 0.4))
            agent.send_signal(signal.SIGKILL)
            agent.wait(10)
            with presenter.lock:
                acks = len(presenter.acks)
            count = check_store(store_path, count, acks)
        presenter.stop.set()
        presenting.join(5)

        # Final pass, no kill: every card comes back once and every pending debit resolves.
        agent = start_agent(profile, data_dir, port)
        time.sleep(1.0)
        for card in cards:
            assert presenter.present(card, wait_s=30.0), f"no answer for {card}"  # hang bound
        agent.send_signal(signal.SIGTERM)
        agent.wait(15)
        assert agent.returncode == 0, (data_dir / "agent.log").read_text()[-2000:]
    finally:
        presenter.stop.set()
        emulator.stop()

    with OfflineStore.open_for_reading(store_path) as store:
        assert store.verify().ok
        assert not store.pending_intents()
        records = list(store.records())
    assert not [r for r in records if r.kind == "unresolved"]
    purchases = [r for r in records if r.kind == "purchase"]
    for card in cards:
        asn = card.asn.hex().upper()
        counters = sorted(int(r.fields["counter"]) for r in purchases if r.fields["asn"] == asn)  # type: ignore[arg-type]
        assert counters == sorted(d.counter for d in card.debits), card
    assert sum(BALANCE - c.balance for c in cards) == sum(r.amount for r in purchases)
    assert len(purchases) >= CYCLES // 2, "every other agent pays a tap before its kill"
