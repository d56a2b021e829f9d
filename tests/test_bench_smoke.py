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


def test_bench_ingest_writes_its_section_and_keeps_the_others(tmp_path: Path, capsys) -> None:
    """A tiny run of the ingest benchmark on both backends: every figure is there (no
    timings checked), and the other sections of the results file are kept."""
    from bench import bench_ingest

    output = tmp_path / "RESULTS-sync.md"
    output.write_text("# Sync benchmark\n\n## Upload\n\nkept\n\n## Blacklist\n\nkept too\n")
    config_before = structlog.get_config()

    argv = ["--records", "60", "--batch-size", "20", "--output", str(output)]
    assert bench_ingest.main(argv) == 0
    assert bench_ingest.main(argv) == 0  # a second run replaces its section, once

    report = output.read_text(encoding="utf-8")
    assert report.count("## Ingest: 60 records") == 1
    assert "## Upload\n\nkept\n" in report and "## Blacklist\n\nkept too\n" in report
    for backend in ("sqlite", "postgresql"):
        assert (
            f"| signed batches (1 batch signature + hash chain; executemany/COPY) | {backend} |"
            in report
        )
        assert f"| v1: every record's Ed25519 signature verified | {backend} |" in report
        assert f"| bare httpx POST loop, same bodies, sink endpoint | {backend} |" in report
        assert f"`cardhost audit` of the 60 stored records ({backend}" in report
    assert "Ed25519 verify x 60 (one per record: v1)" in report
    assert "Ed25519 verify x 3 (one per batch: signed)" in report
    assert "end to end: `cardsync` `upload_pending`" in report
    assert "## Ingest" in capsys.readouterr().out
    assert structlog.get_config() == config_before
