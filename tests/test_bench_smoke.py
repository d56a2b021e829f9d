"""The tap benchmark runs end to end on a handful of taps and writes its report (no timings)."""

from __future__ import annotations

from pathlib import Path

import structlog

from bench import bench_tap


def test_bench_tap_writes_its_report(tmp_path: Path, capsys) -> None:
    output = tmp_path / "RESULTS.md"
    config_before = structlog.get_config()

    assert bench_tap.main(["--taps", "10", "--warmup", "2", "--output", str(output)]) == 0

    report = output.read_text(encoding="utf-8")
    for heading in (
        "# Tap benchmark",
        "## Machine",
        "## Figures per tap",
        "## Ratios",
        "## Per-phase breakdown",
        "## Reading",
    ):
        assert f"\n{heading}\n" in f"\n{report}"
    assert "N = 10 measured" in report
    assert "agent-own / modelled, p50" in report
    assert "store commits / bare sqlite3, p50" in report
    assert "| intent_commit |" in report
    assert "| record_commit |" in report
    assert "'paid': 10" in report
    assert capsys.readouterr().out == report
    assert structlog.get_config() == config_before


def test_bench_memory_writes_its_figures(tmp_path: Path, capsys) -> None:
    from bench import bench_memory

    output = tmp_path / "RESULTS-memory.md"
    config_before = structlog.get_config()

    assert bench_memory.main(["--scale", "0.01", "--output", str(output)]) == 0

    report = output.read_text(encoding="utf-8")
    assert "## Clearing host under hostile clients" in report
    assert "## Sync daemon under a hostile host" in report
    rows = [line for line in report.splitlines() if line.startswith("| ") and "**" in line]
    attacks = len(bench_memory.HOST_ATTACKS) + len(bench_memory.DAEMON_ATTACKS)
    assert len(rows) == attacks + len(bench_memory.GENUINE), report
    assert "## Sync daemon applying genuine lists" in report
    # the genuine lists are applied (streamed, verified, merged), the hostile ones never
    assert "applied: snapshot v1, 100,000 cards" in report
    assert "applied: delta v2, 100,000 cards" in report
    peaks = [float(line.rsplit("**", 2)[1]) for line in rows]
    # figures, not timings; a memory bound only with a wide margin (twice the budgets)
    assert all(0 < peak < 2 * bench_memory.HOST_BUDGET_MB for peak in peaks), peaks
    assert "| NO |" not in report  # the host still answered after every attack
    assert "accepted (!)" not in report  # the daemon applied nothing a hostile host sent
    assert report in capsys.readouterr().out
    assert structlog.get_config() == config_before


def test_bench_city_writes_its_figures(tmp_path: Path, capsys) -> None:
    from bench import bench_city

    output = tmp_path / "RESULTS-city.md"
    config_before = structlog.get_config()

    argv = ["--terminals", "12", "--records", "30", "--workers", "2", "--output", str(output)]
    assert bench_city.main(argv) == 0  # 0: every record acknowledged and stored exactly once

    report = output.read_text(encoding="utf-8")
    assert "## The storm" in report and "## Stored bytes per record" in report
    rows = [line for line in report.splitlines() if line.startswith("| sqlite |")]
    rows += [line for line in report.splitlines() if line.startswith("| postgresql |")]
    storms = [r for r in rows if r.count("|") > 8]
    assert [r.split("|")[1:3] for r in storms] == [[" sqlite ", " 1 "], [" postgresql ", " 2 "]]
    for row in storms:
        cells = [c.strip() for c in row.split("|")]
        assert cells[7] == "24" and cells[-3] == "yes", row  # 30 records: 2 batches of <= 25
    assert "12 terminals × 30 records = 360 signed purchase records" in report
    assert "| sqlite | file growth / record |" in report
    assert "| postgresql | records table + indexes / record |" in report
    assert report in capsys.readouterr().out
    assert structlog.get_config() == config_before
