"""The tap benchmark runs end to end on a handful of taps and writes its report (no timings)."""

from __future__ import annotations

import re
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


def test_bench_fares_writes_its_figures(tmp_path: Path, capsys) -> None:
    from bench import bench_fares

    output = tmp_path / "RESULTS-fares.md"
    config_before = structlog.get_config()

    assert bench_fares.main(["--taps", "4", "--calls", "50", "--warmup", "1",
                             "--output", str(output)]) == 0  # fmt: skip

    report = output.read_text(encoding="utf-8")
    for heading in ("## `decide()` alone (µs per call)", "## In real taps",
                    "## Fraction of the tap", "## Outcomes", "## Reading"):  # fmt: skip
        assert f"\n{heading}\n" in report
    for case in bench_fares.CASES:
        rows = [line for line in report.splitlines() if line.startswith(f"| {case.name} |")]
        assert len(rows) == 3, (case.name, rows)  # decide, taps, fraction
        assert f"- {case.name}: {{'paid': 4}}" in report  # every measured tap was paid
    # the policies priced the taps: the section bus pre-authorises at boarding, seniors ride
    # free, and the transfer + cap policy charged something on every card type mix
    assert "fares 2.00: 4" in report  # flat: 2 yuan every tap
    assert report in capsys.readouterr().out
    assert structlog.get_config() == config_before


def test_bench_load_writes_its_report(tmp_path: Path, capsys) -> None:
    from bench import bench_load

    output = tmp_path / "RESULTS-load.md"
    config_before = structlog.get_config()

    assert bench_load.main(["--requests", "5", "--warmup", "1", "--output", str(output)]) == 0

    report = output.read_text(encoding="utf-8")
    for heading in ("# Load authorisation benchmark", "## Machine", "## Figures per call"):
        assert f"\n{heading}\n" in f"\n{report}"
    assert "N = 5 measured per variant" in report
    for store in ("software", "SoftHSM2"):
        for algorithm in ("TDES", "SM4"):
            assert f"| round trip, {store}, {algorithm} |" in report
            assert f"| round trip, {store}, {algorithm} / bare MAC, {algorithm} |" in report
    assert "| bare MAC, TDES |" in report and "| bare MAC, SM4 |" in report
    # every round trip was a real authorisation the host recorded
    assert "'software': ['authorised'], 'SoftHSM2': ['authorised']" in report
    assert report in capsys.readouterr().out
    assert structlog.get_config() == config_before


def test_bench_pos_writes_round_trips_and_clearing(tmp_path: Path, capsys) -> None:
    """A tiny run of the POS bench: the purchase round trip beside the bare tap on the same
    simulated field, and a day's clearing on a real PostgreSQL server (figures, no timings)."""
    from bench import bench_pos

    output = tmp_path / "RESULTS-pos.md"
    config_before = structlog.get_config()

    args = ["--purchases", "4", "--warmup", "1", "--records", "300", "--output", str(output)]
    assert bench_pos.main(args) == 0

    report = output.read_text(encoding="utf-8")
    for heading in ("# POS benchmark", "## Round trip", "## Round-trip ratios", "## Clearing"):
        assert f"\n{heading}\n" in f"\n{report}"
    assert "N = 4 measured purchases" in report
    assert report.count("{'paid': 4}") == 2  # the POS and the bare tap both paid every time
    assert "POS / bare tap, p50" in report and "POS / bare tap, p99" in report
    assert "`--records 300`" in report
    rows = [line for line in report.splitlines() if line.startswith("| clear (SQL) |")]
    assert [row.split("|")[2].strip() for row in rows] == ["30", "300", "30"]
    assert "| old path: all records in Python | 30 |" in report
    assert report.count(": reconciles") == 2 and "DOES NOT RECONCILE" not in report
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
    # the machine's speed at the start and the end of the run, to compare runs by
    probe = re.search(
        r"a fixed pure-Python loop, took ([0-9.]+) s at the start and ([0-9.]+) s", report
    )
    assert probe is not None and float(probe[1]) > 0 and float(probe[2]) > 0, report[:800]
    for backend in ("sqlite", "postgresql"):
        assert (
            f"| signed batches (1 batch signature + hash chain; executemany/COPY) | {backend} |"
            in report
        )
        assert f"| v1: every record's Ed25519 signature verified | {backend} |" in report
        assert f"| bare httpx POST loop, same bodies, sink endpoint | {backend} |" in report
        assert (
            "| the host's work alone: `ClearingHost.upload` called in process, no HTTP | "
            f"{backend} |" in report
        )
        assert f"`cardhost audit` of the 60 stored records ({backend}" in report
    assert "Ed25519 verify x 60 (one per record: v1)" in report
    assert "Ed25519 verify x 3 (one per batch: signed)" in report
    assert "end to end: `cardsync` `upload_pending`" in report
    assert "## Ingest" in capsys.readouterr().out
    assert structlog.get_config() == config_before


def test_bench_ingest_concurrent_rows_store_every_record_once(tmp_path: Path, capsys) -> None:
    """The concurrent rows on a tiny run: the one terminal's 400 records into a real
    ``cardhost host``, then 2 terminals x 200 records at once into ``cardhost host --workers 1``
    and ``--workers 2``, on both backends; the run itself checks
    that every record is stored exactly once (it raises otherwise), the table has a row per
    backend and worker count with the workers-2 / workers-1 ratio on the second, and the
    database server's CPU on PostgreSQL's rows."""
    from bench import bench_ingest

    output = tmp_path / "RESULTS-sync.md"
    argv = ["--records", "400", "--batch-size", "100", "--terminals", "2", "--no-v1"]
    argv += ["--no-daemon", "--output", str(output)]
    assert bench_ingest.main(argv) == 0

    report = output.read_text(encoding="utf-8")
    assert "The same 400 records sent by the one terminal, and split over 2 terminals" in report
    rows = [line for line in report.splitlines() if line.startswith("| 1 terminal |")]
    # one terminal's backlog into a `cardhost host` process, per backend, before the fleets
    assert [[c.strip() for c in row.split("|")[2:4]] for row in rows] == [
        ["sqlite", "1"],
        ["postgresql", "1"],
    ]
    rows += [line for line in report.splitlines() if line.startswith("| 2 terminals |")]
    cells = [[c.strip() for c in row.split("|")[1:-1]] for row in rows]
    assert [c[1:3] for c in cells[2:]] == [
        ["sqlite", "1"],
        ["sqlite", "2"],
        ["postgresql", "1"],
        ["postgresql", "2"],
    ]
    for row in cells:
        assert float(row[3].strip("*")) > 0 and float(row[5]) > 0, row  # wall s, host CPU s
        assert len(row[6].split(" / ")) == int(row[2]), row  # each serving process's CPU
        # the PostgreSQL server's own CPU, measured (it may round to 0.00: /proc counts 10 ms
        # ticks and this run is tiny); SQLite runs inside the workers
        assert row[8] == "—" if row[1] == "sqlite" else float(row[8]) >= 0, row
        assert row[-1] == "—" if row[2] == "1" else row[-1].startswith("**"), row
        assert row[10].endswith("x"), row  # against the one terminal into one process
    assert "## Ingest" in capsys.readouterr().out

    fleet = bench_ingest.make_fleet(7, 3, 2)  # the first terminal takes the remainder
    assert [len(records) for _key, records, _batches in fleet.values()] == [3, 2, 2]
    assert [[b.count for b in batches] for _k, _r, batches in fleet.values()] == [
        [2, 1],
        [2],
        [2],
    ]
    assert {r.terminal_id for _k, records, _b in fleet.values() for r in records} == set(fleet)


def test_bench_city_writes_its_figures(tmp_path: Path, capsys) -> None:
    from bench import bench_city

    output = tmp_path / "RESULTS-city.md"
    config_before = structlog.get_config()

    argv = ["--terminals", "12", "--records", "30", "--workers", "2", "--output", str(output)]
    argv += ["--load-s", "3", "--city-daemons", "240"]  # 20x the city intervals
    assert bench_city.main(argv) == 0  # 0: every record acknowledged and stored exactly once

    report = output.read_text(encoding="utf-8")
    assert "## The storm" in report and "## Stored bytes per record" in report
    storm = report[report.index("## The storm") : report.index("## Stored bytes")]
    storms = [line for line in storm.splitlines() if line.startswith(("| sqlite", "| postgres"))]
    assert [r.split("|")[1:3] for r in storms] == [[" sqlite ", " 1 "], [" postgresql ", " 2 "]]
    for row in storms:
        cells = [c.strip() for c in row.split("|")]
        assert cells[7] == "24" and cells[-3] == "yes", row  # 30 records: 2 batches of <= 25
    assert "12 terminals × 30 records = 360 signed purchase records" in report
    assert "| sqlite | file growth / record |" in report
    assert "| postgresql | records table + indexes / record |" in report
    # the city load phase after each storm: every request answered 200, none lost
    assert "the requests of **240 daemons**" in report
    city = report[report.index("## The city's steady load") :]
    loads = [line for line in city.splitlines() if line.count("|") == 13 and "---" not in line]
    assert [r.split("|")[1:3] for r in loads[1:]] == [[" sqlite ", " 1 "], [" postgresql ", " 2 "]]
    for row in loads[1:]:
        cells = [c.strip() for c in row.split("|")]
        sent, answered, ok = (float(cells[i].replace(",", "")) for i in (3, 4, 5))
        assert sent > 0 and answered == sent and cells[6] == "0" and cells[7] == "0", row
        assert ok > 0 and float(cells[9].strip("*")) >= 0, row  # host CPU per request: a figure
    kinds = [line.split("|")[3].strip() for line in city.splitlines() if line.count("|") == 8]
    assert kinds[2:] == ["upload", "heartbeat", "blacklist", "params"] * 2  # after the head
    assert report in capsys.readouterr().out
    assert structlog.get_config() == config_before


def test_bench_sync_all_measures_every_section_in_one_run(tmp_path: Path, capsys) -> None:
    """``bench.bench_sync --all``: upload, blacklist, the ingest section (both backends) and
    the city section measured in the one run and written to one file; a stale ingest section
    is replaced, not kept (no timings checked)."""
    from bench import bench_sync

    output = tmp_path / "RESULTS-sync.md"
    output.write_text("# Sync benchmark\n\n## Ingest: stale figures\n\nold\n")
    config_before = structlog.get_config()

    argv = ["--all", "--records", "40", "--batch-size", "20", "--sizes", "100000"]
    city = "--terminals 6 --records 30 --workers 1 --load-s 2 --city-daemons 120"
    bench_sync.main([*argv, "--city-args", city, "--output", str(output)])

    report = output.read_text(encoding="utf-8")
    assert "stale figures" not in report and "\nold\n" not in report
    machine = report.splitlines()[2]  # with the machine's speed at the start and the end
    assert re.search(r"loop\): [0-9.]+ s at the start, [0-9.]+ s at the end", machine), machine
    assert "## Upload of 40 queued records (batches of 20)" in report
    assert "\n| 100,000 | " in report  # the blacklist row of that size
    assert report.count("## Ingest: 40 records") == 1
    # the city bench of this run: its own file beside, and its figures in this one
    assert (tmp_path / "RESULTS-city.md").exists()
    assert report.count("## City: a fleet's backlogs at once") == 1
    assert "### The storm" in report and "### The city's steady load" in report
    assert "6 terminals × 30 records = 180 signed purchase records" in report
    for backend in ("sqlite", "postgresql"):
        assert (
            f"| signed batches (1 batch signature + hash chain; executemany/COPY) | {backend} |"
            in report
        )
        assert f"| bare httpx POST loop, same bodies, sink endpoint | {backend} |" in report
        assert f"| 1 terminal | {backend} | 1 | " in report  # into a `cardhost host` process
        for workers in (1, 2):  # the concurrent rows: 10 terminals of 4 records by default
            assert f"| 10 terminals | {backend} | {workers} | " in report
    assert "| **ratio** per-record / per-batch verification |" in report
    assert report.rstrip("\n") in capsys.readouterr().out
    structlog.configure(**config_before)  # bench_sync leaves its quiet logging configured


def test_bench_pgpool_writes_its_figures(tmp_path: Path) -> None:
    from bench import bench_pgpool

    output = tmp_path / "RESULTS-pgpool.md"
    argv = ["--ops", "300", "--threads", "4", "--rounds", "1", "--output", str(output)]
    assert bench_pgpool.main(argv) == 0
    report = output.read_text(encoding="utf-8")
    rows = [line for line in report.splitlines() if line.startswith(("| same", "| through"))]
    assert [r.split("|")[2].strip() for r in rows] == ["1", "4", "1", "4"]
    for row in rows:
        cells = [c.strip() for c in row.split("|")]
        assert float(cells[3].replace(",", "")) > 0 and float(cells[4]) > 0, row
    assert "through the proxy, 0.1 ms each way" in report
