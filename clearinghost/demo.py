"""``cardhost demo``: the production validator against a stream of simulated cards.

The simulated card field (CPU and M1 cards + PSAM behind an emulated serial reader module) runs
in its own process from ``tests/fake_reader``; the agent reaches it only through the
serial-module driver over a TCP socket, exactly as it would reach a module on ``/dev/ttyS5``.
Beside the agent run the reference clearing host (HTTP on 127.0.0.1) and the sync daemon, which
uploads the records as they are made and pulls the blacklist: one card of the stream is
blacklisted at the host before the stream starts, and the agent locks and refuses it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from agent.errors import ConfigurationError
from agent.offline_store import OfflineStore
from agent.profile import Profile, load_profile
from agent.runner import print_summary, run_agent
from agent.validator import LoopStats
from agent.wiring import DataDir
from clearinghost.local import LocalSync, start_local_sync

REPO = Path(__file__).resolve().parent.parent
PROFILE = REPO / "firmware_profiles" / "test-city-demo.toml"
# Card 9 of the simulated stream (tests/fake_reader/demo_field.py), a T-Union card.
BLACKLISTED_CARD_ID = "03105170070100000009"


def run_demo(data_dir: Path, seed: int = 7) -> int:
    if not (REPO / "tests" / "fake_reader" / "demo_field.py").is_file():
        raise ConfigurationError("the demo needs a source checkout (tests/fake_reader)")
    if data_dir.exists():
        shutil.rmtree(data_dir)
    device = DataDir(data_dir)
    device.provision("DEMO-0001")
    profile = load_profile(PROFILE)
    local = start_local_sync(data_dir, profile=profile, blacklist_interval_s=1.0)
    try:
        version = local.blacklist_card(BLACKLISTED_CARD_ID)
        local.wait_for_blacklist(version)
        print(
            f"clearing host on {local.url}; card {BLACKLISTED_CARD_ID} blacklisted there "
            f"(list version {version}), pulled by the sync daemon"
        )
        stats = _run_against_field(profile, device, seed, local)
        _wait_for_upload(local, device)
        at_host = local.records_at_host()
        anomalies = local.host.storage.anomalies(limit=1000)
    finally:
        local.stop()
    print_summary(stats)
    with OfflineStore.open_for_reading(device.store_path) as store:
        report = store.verify()
        pending = len(store.pending_intents())
        print(
            f"records: {report.checked} signed, chain "
            f"{'verified' if report.ok else 'BROKEN: ' + '; '.join(report.problems)}; "
            f"{pending} pending intent(s) awaiting their card "
            f"(they become 'unresolved' records after the recovery window)"
        )
    kinds: dict[str, int] = {}
    for anomaly in anomalies:
        kinds[str(anomaly.get("kind"))] = kinds.get(str(anomaly.get("kind")), 0) + 1
    flagged = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())) or "none"
    print(f"clearing host: {at_host} records received and verified; anomalies flagged: {flagged}")
    print(f"inspect: cardagent records list --db {device.store_path}")
    return 0 if report.ok else 1


def _run_against_field(profile: Profile, device: DataDir, seed: int, local: LocalSync) -> LoopStats:
    port_file = device.path / "field.port"
    field = subprocess.Popen(  # noqa: S603 - our own interpreter and module, fixed arguments
        [
            sys.executable,
            "-m",
            "tests.fake_reader.demo_field",
            "--port-file",
            str(port_file),
            "--seed",
            str(seed),
        ],
        cwd=REPO,
    )
    try:
        port = _wait_for_port(port_file, field)
        print(f"simulated reader module + PSAM on socket://127.0.0.1:{port}; taps:\n")
        stop = threading.Event()
        done_file = port_file.with_suffix(".done")
        threading.Thread(target=_stop_when_done, args=(field, done_file, stop), daemon=True).start()
        threading.Thread(target=_report_uploads, args=(local, stop), daemon=True).start()
        return run_agent(profile, device, f"socket://127.0.0.1:{port}", None, stop)
    finally:
        field.terminate()
        field.wait(5)


def _report_uploads(local: LocalSync, stop: threading.Event) -> None:
    """A line whenever the clearing host has received more records."""
    seen = 0
    while not stop.wait(1.0):
        count = local.records_at_host()
        if count != seen:
            print(f"          [sync] clearing host now holds {count} records", flush=True)
            seen = count


def _wait_for_upload(local: LocalSync, device: DataDir, timeout_s: float = 15.0) -> None:
    with OfflineStore.open_for_reading(device.store_path) as store:
        total = store.count_records()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and local.records_at_host() < total:
        time.sleep(0.2)


def _wait_for_port(port_file: Path, field: subprocess.Popen[bytes]) -> int:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if port_file.exists():
            return int(port_file.read_text(encoding="ascii"))
        if field.poll() is not None:
            raise ConfigurationError(f"the simulated card field exited with {field.returncode}")
        time.sleep(0.05)
    raise ConfigurationError("the simulated card field did not start within 20 s")


def _stop_when_done(field: subprocess.Popen[bytes], done: Path, stop: threading.Event) -> None:
    while field.poll() is None and not done.exists():
        time.sleep(0.1)
    stop.set()
