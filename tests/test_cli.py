"""The cardagent command line: provisioning, records list/export/verify, profile check."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import main
from agent.errors import StoreError
from agent.offline_store import DeviceKey, OfflineStore, RecordBody
from agent.wiring import DataDir
from tests.fake_reader.scenario import DEMO_PROFILE, REPO
from tests.test_profile import BAD_FIELD_CASES, DEMO_TEXT, bad_literal, names_field


def cardagent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "--log-format", "json", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def make_store(tmp_path: Path, count: int = 5) -> Path:
    data = DataDir(tmp_path / "device")
    data.provision("CLI-0001")
    with data.open_store() as store:
        for i in range(count):
            store.append_record(RecordBody("purchase", f"CARD{i}", 100 + i, {"counter": i}))
    return data.store_path


def test_provision_twice_is_refused(tmp_path: Path) -> None:
    """Provisioning creates a 0600 key and refuses to run twice on the same directory."""
    first = cardagent("provision", "--data-dir", str(tmp_path / "d"), "--terminal-id", "T1")
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "d" / "device.key").stat().st_mode & 0o777 == 0o600
    again = cardagent("provision", "--data-dir", str(tmp_path / "d"), "--terminal-id", "T1")
    assert again.returncode == 2
    assert "already provisioned" in again.stderr


def test_records_list_export_verify(tmp_path: Path) -> None:
    """list shows every record, export writes JSON Lines, verify says OK and exits 0."""
    db = make_store(tmp_path)
    listed = cardagent("records", "list", "--db", str(db))
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[0] for line in listed.stdout.splitlines()] == ["1", "2", "3", "4", "5"]
    out = tmp_path / "export.jsonl"
    exported = cardagent("records", "export", "--db", str(db), "--out", str(out))
    assert exported.returncode == 0, exported.stderr
    lines = out.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["seq"] for line in lines] == [1, 2, 3, 4, 5]
    verified = cardagent("records", "verify", "--db", str(db))
    assert verified.returncode == 0
    assert "OK: 5 records" in verified.stdout


def tamper(db: Path, sql: str) -> None:
    conn = sqlite3.connect(db)
    with conn:
        conn.execute(sql)
    conn.close()


def test_verify_names_a_removed_record(tmp_path: Path) -> None:
    """Deleting a record in the middle: verify exits 1 and names it."""
    db = make_store(tmp_path)
    tamper(db, "DELETE FROM records WHERE seq = 3")
    result = cardagent("records", "verify", "--db", str(db))
    assert result.returncode == 1
    assert "record 3 missing" in result.stdout


def test_verify_names_an_altered_record(tmp_path: Path) -> None:
    """Changing an amount: verify exits 1 and names the record."""
    db = make_store(tmp_path)
    tamper(db, "UPDATE records SET amount = 1 WHERE seq = 2")
    result = cardagent("records", "verify", "--db", str(db))
    assert result.returncode == 1
    assert "record 2 altered" in result.stdout


def test_verify_names_reordered_records(tmp_path: Path) -> None:
    """Swapping the contents of two records: verify exits 1 and names them."""
    db = make_store(tmp_path)
    conn = sqlite3.connect(db)
    with conn:
        rows = {
            seq: row
            for seq, *row in conn.execute(
                "SELECT seq, created_at, card_id, amount, fields, prev_hash, hash, signature "
                "FROM records WHERE seq IN (2, 3)"
            )
        }
        for seq, other in ((2, 3), (3, 2)):
            conn.execute(
                "UPDATE records SET created_at=?, card_id=?, amount=?, fields=?, prev_hash=?, "
                "hash=?, signature=? WHERE seq=?",
                (*rows[other], seq),
            )
    conn.close()
    result = cardagent("records", "verify", "--db", str(db))
    assert result.returncode == 1
    assert "record 2" in result.stdout


def test_verify_with_a_missing_store_is_a_clear_error(tmp_path: Path) -> None:
    """A store that does not exist: exit 2 and a message naming the file."""
    result = cardagent("records", "verify", "--db", str(tmp_path / "nope.db"))
    assert result.returncode == 2
    assert "does not exist" in result.stderr


def test_profile_check(tmp_path: Path) -> None:
    """profile validates the demo profile and rejects a broken one with the field's name."""
    ok = cardagent("profile", str(DEMO_PROFILE))
    assert ok.returncode == 0
    assert "test profile 'test-city-demo'" in ok.stdout
    assert "issuer dialects, tried in this order: t-union, cjt166, legacy1001" in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text(DEMO_PROFILE.read_text().replace("flat_fare = 200", "flat_fare = -5"))
    result = cardagent("profile", str(bad))
    assert result.returncode == 2
    assert "fare.flat_fare" in result.stderr


def test_run_unprovisioned_is_a_clear_error(tmp_path: Path) -> None:
    """run on a directory that was never provisioned says what to do."""
    result = cardagent("run", "--profile", str(DEMO_PROFILE), "--data-dir", str(tmp_path / "x"))
    assert result.returncode == 2
    assert "cardagent provision" in result.stderr


def test_store_refuses_foreign_device_key(tmp_path: Path) -> None:
    """The store opened with another device's key is refused (not silently re-signed)."""
    db = make_store(tmp_path)
    other = DeviceKey.create(tmp_path / "other.key")
    with pytest.raises(StoreError, match="refusing to open"):
        OfflineStore.open(db, other, "CLI-0001")


@pytest.mark.parametrize(("field", "kind", "literal"), BAD_FIELD_CASES)
def test_profile_check_refuses_bad_numbers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], field, kind, literal
) -> None:
    """`cardagent profile` (its main) refuses NaN, +inf, -inf and an out-of-range value in
    every numeric field of the demo profile ([m1_purse], [reader], test keys...) by name."""
    bad = tmp_path / "bad.toml"
    bad.write_text(field.with_value(DEMO_TEXT, bad_literal(field, kind, literal)))
    assert main(["--log-format", "json", "profile", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "configuration error" in err
    assert str(bad) in err
    assert names_field(err, field.name), err


@pytest.mark.parametrize(
    ("old", "new", "name"),
    [
        ("double_tap_window_s = 5.0", "double_tap_window_s = nan", "terminal.double_tap_window_s"),
        ("recovery_window_s = 300.0", "recovery_window_s = inf", "terminal.recovery_window_s"),
        ("purse_backup = 2", "purse_backup = 1", "purse_backup"),  # same block as the primary
        ("record_sectors = [3, 4, 5]", "record_sectors = [3, 2]", "record_sectors"),
        ("[reader]", "[reader.framing]\nlength_bytes = 3\n[reader]", "reader.framing.length_bytes"),
    ],
    ids=["double-tap-nan", "recovery-inf", "m1-backup-is-primary", "m1-records-overlap", "framing"],
)
def test_profile_check_subprocess_refuses_what_the_agent_would(
    tmp_path: Path, old: str, new: str, name: str
) -> None:
    """The real command: NaN/inf windows, a broken M1 layout and a broken reader framing (both
    validated only at first use before) are refused at load, naming the field."""
    bad = tmp_path / "bad.toml"
    text = DEMO_PROFILE.read_text()
    assert old in text
    bad.write_text(text.replace(old, new, 1))
    result = cardagent("profile", str(bad))
    assert result.returncode == 2, result.stdout
    assert name in result.stderr
    assert "OK" not in result.stdout
