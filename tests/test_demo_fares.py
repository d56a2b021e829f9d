"""``cardhost demo --role fares`` (issue 13): the whole system (host, sync daemon, the agent's
engine, PSAM driver, simulated cards) prices a bus line's taps by the published fare policy and
says so in words. Run as a user runs it: a subprocess, bounded by a timeout."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from agent.offline_store import OfflineStore
from clearinghost.cli import _parser

REPO = Path(__file__).resolve().parent.parent


def test_role_defaults_to_the_bus_demo() -> None:
    parser = _parser()
    assert parser.parse_args(["demo"]).role == "bus"
    assert parser.parse_args(["demo", "--role", "fares"]).role == "fares"


def test_fares_demo_prices_boarding_alighting_transfer_card_types_and_an_unfinished_trip(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "demo"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-m", "clearinghost.cli", "demo", "--role", "fares",
         "--data-dir", str(data_dir)],
        capture_output=True, text=True, timeout=300, cwd=REPO, env=env, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    out = done.stdout
    taps = [line for line in out.splitlines() if line.startswith("        -> ")]
    assert len(taps) == 11, out
    assert all(t.startswith("        -> paid ") for t in taps), out
    expected = [
        # adult: 4.00 pre-authorised at stop 1, a 2-yuan trip: 2.00 back through the host
        "paid 4.00. boarding: the dearest ride from this stop is 4.00: 4.00 pre-authorised",
        "the trip costs this card 2.00, 4.00 was taken at boarding: 2.00 to be refunded",
        # transfer to line 9 ten minutes after alighting: 1 yuan off
        "paid 3.00. boarding",
        "table price is 3.00, less 1.00 for the transfer from line 8; "
        "the trip costs this card 2.00",
        # senior rides free, student pays half
        "paid 0.00. boarding: the dearest ride from this stop is 4.00 (seniors ride free)",
        "(seniors ride free); the trip costs this card 0.00",
        "paid 2.00. boarding: the dearest ride from this stop is 4.00 (students pay half)",
        "(students pay half); the trip costs this card 1.50, 2.00 was taken at boarding: 0.50",
        # never tapped off: the next boarding closes that trip at the maximum fare
        "paid 3.00. boarding: the dearest ride from this stop is 3.00",
        "paid 4.00. the card's last trip was never tapped off: closed at the maximum fare "
        "(max_fare rule, 1.00 more than its boarding took), plus 3.00 pre-authorised",
        "the trip costs this card 2.00, 3.00 was taken at boarding: 1.00 to be refunded",
    ]
    for tap, words in zip(taps, expected, strict=True):
        assert words in tap, (words, tap)
    assert "11 records signed, chain verified; the clearing host received and verified 11" in out
    assert "fares taken from the cards 16.00; refunds due from the host 4.50; net 11.50" in out
    # every refund is a pending load at the host, one per alighting record; the adult takes
    # theirs at a kiosk (online loads paid by the pending loads)
    assert "pending loads at the clearing host (what the operator lists), 4:" in out
    for line in (
        "fare-DEMO-FARES-1-2  adult card  2.00",
        "fare-DEMO-FARES-1-4  adult card  1.00",
        "fare-DEMO-FARES-1-8  student card  0.50",
        "fare-DEMO-FARES-1-11  forgetful card  1.00",
        "fare-DEMO-FARES-1-2: loaded 2.00, balance 43.00 -> 45.00",
        "fare-DEMO-FARES-1-4: loaded 1.00, balance 45.00 -> 46.00",
        "the adult card's open pending loads now: 0",
    ):
        assert line in out, (line, out)
    with sqlite3.connect(data_dir / "clearing-host" / "loads.db") as db:
        rows = db.execute("SELECT id, amount, source, load_key FROM pending_loads ORDER BY id")
        assert sorted(rows) == [
            ("fare-DEMO-FARES-1-11", 100, "fare", None),
            ("fare-DEMO-FARES-1-2", 200, "fare", "fare-1"),
            ("fare-DEMO-FARES-1-4", 100, "fare", "fare-2"),
            ("fare-DEMO-FARES-1-8", 50, "fare", None),
        ]

    # what the demo left behind: the signed records say the same, the files are the real ones
    with OfflineStore.open_for_reading(data_dir / "agent.db") as store:
        assert store.verify().ok
        records = [r for r in store.records() if r.kind == "purchase"]
    assert [r.fields["fare_kind"] for r in records] == [
        "entry", "exit", "entry", "exit", "entry", "exit", "entry", "exit",
        "entry", "unfinished_then_entry", "exit",
    ]  # fmt: skip
    assert records[3].fields["fare_transfer_from"] == 8
    assert records[9].fields["fare_unfinished"] == "max_fare"
    assert sum(r.amount for r in records) == 1600
    assert json.loads((data_dir / "position.json").read_text()) == {
        "line": 9, "stop": 3, "role": "both"
    }  # fmt: skip
    params = json.loads((data_dir / "params.json").read_bytes())["payload"]
    assert params["fare_policy"]["mode"] == "section"
