"""``cardagent demo``: the production validator against a stream of simulated cards.

The simulated card field (cards + PSAM behind an emulated serial reader module) runs in its own
process from ``tests/fake_reader``; the agent reaches it only through the serial-module driver
over a TCP socket, exactly as it would reach a module on ``/dev/ttyS5``.
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
from agent.profile import load_profile
from agent.runner import print_summary, run_agent
from agent.wiring import DataDir

REPO = Path(__file__).resolve().parent.parent
PROFILE = REPO / "firmware_profiles" / "test-city-demo.toml"


def run_demo(data_dir: Path, seed: int = 7) -> int:
    if not (REPO / "tests" / "fake_reader" / "demo_field.py").is_file():
        raise ConfigurationError("the demo needs a source checkout (tests/fake_reader)")
    if data_dir.exists():
        shutil.rmtree(data_dir)
    device = DataDir(data_dir)
    device.provision("DEMO-0001")
    port_file = data_dir / "field.port"
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
        stats = run_agent(load_profile(PROFILE), device, f"socket://127.0.0.1:{port}", None, stop)
    finally:
        field.terminate()
        field.wait(5)
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
    print(f"inspect: cardagent records list --db {device.store_path}")
    return 0 if report.ok else 1


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
