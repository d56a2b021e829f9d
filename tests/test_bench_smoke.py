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
