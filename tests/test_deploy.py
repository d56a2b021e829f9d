"""What a device builder installs: the systemd units (checked by ``systemd-analyze verify``),
the wheel (it builds, and carries the firmware profiles with their dialect fragments, the units
and the sample configuration), ``deploy/install.sh`` (parses), ``--version`` and help texts."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from agent import __version__
from agent.profile import load_profile

REPO = Path(__file__).resolve().parents[1]
UNITS = REPO / "deploy" / "systemd"
BUILD_BOUND_S = 600  # a wheel build on a loaded machine (hang bound, not a speed check)


def unit_settings(path: Path) -> dict[str, list[str]]:
    """``Key`` → every value it has in the unit (systemd units repeat keys)."""
    settings: dict[str, list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


@pytest.mark.parametrize("name", ["cardagent.service", "cardsync.service"])
def test_daemon_units_are_notify_watchdog_restart_and_hardened(name: str) -> None:
    s = unit_settings(UNITS / name)
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    assert float(s["WatchdogSec"][0]) > 0
    assert s["Restart"] == ["always"] and s["StartLimitIntervalSec"] == ["0"]
    assert s["User"] == ["cardagent"] and s["Group"] == ["cardagent"]
    assert s["ProtectSystem"] == ["strict"] and s["ReadWritePaths"] == ["/var/lib/cardagent"]
    assert s["PrivateTmp"] == ["yes"] and s["NoNewPrivileges"] == ["yes"]
    assert s["StateDirectory"] == ["cardagent"] and s["ConfigurationDirectory"] == ["cardagent"]
    assert "--log-format json" in s["ExecStart"][0]
    assert "--data-dir /var/lib/cardagent" in s["ExecStart"][0]
    assert s["StandardError"] == ["journal"]


def test_the_agent_unit_reaches_readers_and_pcscd() -> None:
    s = unit_settings(UNITS / "cardagent.service")
    assert s["SupplementaryGroups"] == ["dialout"]
    assert "pcscd.socket" in s["Wants"][0]
    assert "AF_UNIX" in s["RestrictAddressFamilies"][0]
    rule = (REPO / "deploy" / "polkit" / "60-cardagent-pcscd.rules").read_text(encoding="utf-8")
    assert "org.debian.pcsc-lite.access_pcsc" in rule and '"cardagent"' in rule


def _units_with_binaries(tmp_path: Path) -> Path:
    """The units with /opt/cardagent/bin replaced by a directory of real executables (verify
    checks that every ExecStart= binary exists and is executable)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, module in (("cardagent", "agent.cli"), ("cardsync", "sync.cli")):
        shim = bin_dir / name
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m {module} "$@"\n', encoding="utf-8")
        shim.chmod(0o755)
    units = tmp_path / "units"
    units.mkdir()
    for unit in UNITS.glob("*.service"):
        text = unit.read_text(encoding="utf-8").replace("/opt/cardagent/bin", str(bin_dir))
        (units / unit.name).write_text(text, encoding="utf-8")
    return units


def _verify(units: Path, *names: str) -> subprocess.CompletedProcess[str]:
    # --man=no: Documentation= is not looked up (no man-db needed); verify loads the units
    # without talking to a running systemd, so it works in a container where PID 1 is not
    # systemd. SYSTEMD_LOG_LEVEL keeps the output to the units' own problems.
    return subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(str(units / n) for n in names)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "notice"},
    )


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    # never skipped: CI must run it (scripts/bootstrap installs the systemd package)
    assert shutil.which("systemd-analyze"), "systemd-analyze missing: apt-get install systemd"
    units = _units_with_binaries(tmp_path)
    result = _verify(
        units, "cardagent.service", "cardsync.service", "cardagent-frontend@pos.service"
    )
    ours = [line for line in result.stderr.splitlines() if str(units) in line or ".service" in line]
    assert result.returncode == 0 and not ours, result.stderr
    # the check is real: a typo in a key and a missing binary are both reported
    bad = units / "broken.service"
    bad.write_text(
        (units / "cardagent.service")
        .read_text(encoding="utf-8")
        .replace("WatchdogSec=", "WatchdogSecs=")
        .replace(str(tmp_path / "bin"), str(tmp_path / "nowhere")),
        encoding="utf-8",
    )
    broken = _verify(units, "broken.service")
    assert broken.returncode != 0
    assert "WatchdogSecs" in broken.stderr and "not executable" in broken.stderr


def test_install_script_parses_and_is_executable() -> None:
    script = REPO / "deploy" / "install.sh"
    assert script.stat().st_mode & stat.S_IXUSR
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=60)


def test_commands_have_a_version_and_laid_out_help() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for prog, module in (
        ("cardagent", "agent.cli"),
        ("cardsync", "sync.cli"),
        ("cardhost", "clearinghost.cli"),
    ):
        version = subprocess.run(
            [sys.executable, "-m", module, "--version"],
            capture_output=True, text=True, check=True, timeout=120, env=env,
        )  # fmt: skip
        assert version.stdout.startswith(f"{prog} {__version__} ")
        text = subprocess.run(
            [sys.executable, "-m", module, "--help"],
            capture_output=True, text=True, check=True, timeout=120, env=env,
        ).stdout  # fmt: skip
        assert "``" not in text and "::" not in text, text
    # cardsync's command table keeps its lines (it ran together before)
    sync_help = subprocess.run(
        [sys.executable, "-m", "sync.cli", "--help"],
        capture_output=True, text=True, check=True, timeout=120, env=env,
    ).stdout  # fmt: skip
    assert "\n    cardsync status --data-dir DIR" in sync_help
    agent_help = subprocess.run(
        [sys.executable, "-m", "agent.cli", "--help"],
        capture_output=True, text=True, check=True, timeout=120, env=env,
    ).stdout  # fmt: skip
    assert "doctor" in agent_help


def _source_copy(tmp_path: Path) -> Path:
    """The source tree without build products, so that building writes nothing in the repo."""
    src = tmp_path / "src"
    shutil.copytree(
        REPO,
        src,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "run", "build", "dist", "__pycache__", "*.egg-info", ".*_cache",
            ".hypothesis", "*.db", "*.db-*",
        ),
    )  # fmt: skip
    return src


@pytest.mark.stack
def test_wheel_builds_and_carries_what_a_device_needs(tmp_path: Path) -> None:
    out = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "-q", "-w", str(out)],
        cwd=_source_copy(tmp_path),
        check=True,
        timeout=BUILD_BOUND_S,
    )
    (wheel,) = out.glob("cardagent-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        data = f"cardagent-{__version__}.data/data/share/cardagent/"
        for needed in (
            "agent/cli.py",
            "agent/clock.py",
            "agent/doctor.py",
            "agent/sdnotify.py",
            "sync/cli.py",
            "clearinghost/openapi.json",
            data + "firmware_profiles/production-example.toml",
            data + "firmware_profiles/dialects/china-cities.toml",
            data + "deploy/install.sh",
            data + "deploy/systemd/cardagent.service",
            data + "deploy/systemd/cardsync.service",
            data + "deploy/systemd/cardagent-frontend@.service",
            data + "deploy/polkit/60-cardagent-pcscd.rules",
            data + "deploy/etc/cardagent/cardsync.env",
        ):
            assert needed in names, needed
        assert not any(n.startswith("tests/") for n in names)
        entry_points = zf.read(f"cardagent-{__version__}.dist-info/entry_points.txt").decode()
        for script in ("cardagent = agent.cli:main", "cardsync = sync.cli:main"):
            assert script in entry_points
        # the production profiles load from what the wheel installs (their dialect fragment
        # is found next to them), as deploy/install.sh lays them out in /etc/cardagent
        etc = tmp_path / "etc-cardagent"
        for name in names:
            if name.startswith(data + "firmware_profiles/"):
                target = etc / name.removeprefix(data + "firmware_profiles/")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(zf.read(name))
    profile = load_profile(etc / "production-example.toml")
    assert profile.is_production
    assert any(d.name for d in profile.dialects)


def test_bootstrap_installs_systemd_analyze() -> None:
    """CI (.ci/run → scripts/test → scripts/bootstrap) installs the package that provides
    systemd-analyze, so the verify test above runs there instead of skipping."""
    text = (REPO / "scripts" / "bootstrap").read_text(encoding="utf-8")
    install = next(line for line in text.splitlines() if line.strip().startswith("gcc python3-dev"))
    assert " systemd" in install
