"""POS benchmark: the purchase round trip against the bare tap, and a day's merchant clearing.

``python -m bench.bench_pos [--purchases N] [--records N]`` writes ``bench/RESULTS-pos.md``
(overwritten) and prints it. Two parts, one run:

* **round trip**: ``POST /v1/purchases`` through httpx (keep-alive, as a POS would) to the POS
  API served on 127.0.0.1 in this process — HTTP in, order book, journal, card debit over the
  real serial-module driver to the simulated card field on TCP, signed record, HTTP out —
  interleaved purchase by purchase with the *bare tap*: ``TransactionEngine.process_tap`` on the
  same reader connection, the same PSAM and the same cards, with its own store. Both take the
  same amount from the same card families, so the difference is what the POS front end adds.
* **clearing**: a PostgreSQL server of its own (``initdb`` in a temporary directory, ``fsync
  off``), the host's schema, and ``--records`` purchase records for one business day (plus a
  tenth of that the day before), written straight into ``records`` with ``COPY`` (bodies as the
  host stores them, merchant ids, a few unresolved records, refund requests and purchases from
  unbound terminals). Each day is cleared by ``MerchantClearing.clear`` in a child process of
  its own, which reports its wall time and its peak RSS (``VmHWM``); beside it the same child
  times the database's bare scan of the day (``COUNT(*), SUM(amount)``): the floor any clearing
  pays. At the smallest size the old path (every record of the day loaded into Python, then
  :func:`clearinghost.settlement.settle_day`) is measured too.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from glob import glob
from pathlib import Path
from typing import Any

import psycopg

from agent.transaction import TransactionEngine
from agent.wiring import DataDir
from bench.bench_tap import percentile, quiet_structlog
from clearinghost.keys import HostKey
from clearinghost.merchant_clearing import MerchantClearing
from clearinghost.settlement import FeeSchedule, Merchant, city_zone, day_bounds, settle_day
from clearinghost.storage import CREATED_AT_INDEX, PostgresStorage
from tests.fake_reader.scenario import make_card
from tests.pos_stack import Field, PosStack

DEFAULT_PURCHASES = 300
DEFAULT_WARMUP = 10
DEFAULT_RECORDS = 10_000_000
OLD_PATH_RECORDS = 50_000  # the old all-in-Python path needs ~3 kB a record: kept small
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "RESULTS-pos.md"
AMOUNT = 150  # fen, both paths
CARD_BALANCE = 99_000  # the plausible maximum is 100000 fen; 150 fen a purchase
FAMILIES = ("tunion", "cjt166", "legacy1001")

# The cleared day: 2024-05-01 in Asia/Shanghai; the day before holds a tenth as many records.
DAY = dt.date(2024, 5, 1)
MERCHANTS = 500
TERMINALS = 2_000  # four per merchant; a few more terminals are left unbound
UNBOUND_TERMINALS = 5
CATEGORY_CYCLE = ("dining", "department_store", "retail", "tourism", "other", "utility")


# --- part 1: the POS round trip against the bare tap ------------------------------------------


@dataclass
class RoundTrips:
    pos_ms: list[float] = field(default_factory=list)
    bare_ms: list[float] = field(default_factory=list)
    pos_status: dict[str, int] = field(default_factory=dict)
    bare_status: dict[str, int] = field(default_factory=dict)


def run_round_trips(directory: Path, purchases: int, warmup: int) -> RoundTrips:
    field_ = Field()
    stack = PosStack(directory / "pos", field_, reader_timeout_s=1.0)
    # the bare tap writes to a store of its own (same disk), so the POS's journal is its own
    bare_dir = DataDir(directory / "bare")
    bare_dir.provision("BARE-0001")
    bare_store = bare_dir.open_store()
    profile = dataclasses.replace(stack.profile, double_tap_window_s=0.0)
    bare = TransactionEngine(profile, bare_store, stack.hardware.sams)
    bare.fare_for = lambda _profile: AMOUNT
    result = RoundTrips()
    cards = [
        make_card(family, 100 + n, field_.keyset, balance=CARD_BALANCE)  # type: ignore[arg-type]
        for n, family in enumerate(FAMILIES)
    ]
    try:
        for number in range(warmup + purchases):
            card = cards[number % len(cards)]
            field_.present(card)
            start = time.perf_counter()
            answer = stack.pos.purchase(f"B-{number}", AMOUNT, wait_s=5.0)
            pos_ms = (time.perf_counter() - start) * 1000.0
            status = str(answer.json().get("status")) if answer.status_code == 200 else "http"
            presence = stack.hardware.reader.wait_for_card(5.0)
            start = time.perf_counter()
            outcome = bare.process_tap(stack.hardware.reader, presence) if presence else None
            bare_ms = (time.perf_counter() - start) * 1000.0
            bare.presence.left()
            field_.take_away()
            if number < warmup:
                continue
            bare_status = "no_card" if outcome is None else str(outcome.status)
            result.pos_ms.append(pos_ms)
            result.bare_ms.append(bare_ms)
            result.pos_status[status] = result.pos_status.get(status, 0) + 1
            result.bare_status[bare_status] = result.bare_status.get(bare_status, 0) + 1
    finally:
        bare_store.close()
        stack.close()
        field_.close()
    return result


# --- part 2: a day's clearing on PostgreSQL ----------------------------------------------------


def _pg_bin(name: str) -> str:
    found = sorted(glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name) or ""]
    if not found[-1]:
        raise SystemExit(f"bench_pos: PostgreSQL's {name} is missing (apt-get install postgresql)")
    return found[-1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def postgres(directory: Path) -> Iterator[str]:
    """A PostgreSQL server of the bench's own; yields its DSN; stopped by its data directory."""
    as_root = os.geteuid() == 0
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
    if as_root:
        shutil.chown(directory, "postgres", "postgres")
    data, port = directory / "data", _free_port()

    def run(*argv: str) -> None:
        done = subprocess.run(
            [*prefix, *argv], capture_output=True, text=True, timeout=300, check=False
        )
        if done.returncode != 0:
            raise SystemExit(f"bench_pos: {argv[0]} failed: {done.stdout}\n{done.stderr}")

    run(_pg_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
    options = (
        f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={directory} "
        "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_wal_size=4GB "
        "-c wal_level=minimal -c max_wal_senders=0 -c maintenance_work_mem=256MB"
    )
    run(_pg_bin("pg_ctl"), "-D", str(data), "-o", options, "-l", str(directory / "log"), "-w",
        "start")  # fmt: skip
    try:
        yield f"host={directory} port={port} user=postgres dbname=postgres"
    finally:
        run(_pg_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "stop")


def _stamp(moment: dt.datetime) -> str:
    utc = moment.astimezone(dt.UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


@dataclass
class Generated:
    records: int
    seconds: float  # COPY of every day's records
    index_seconds: float  # the primary key and created_at index built afterwards
    apart: dict[dt.date, int]  # per day: records the clearing lists apart
    days: dict[dt.date, int] = field(default_factory=dict)  # per day: records


def _stamps(day: dt.date, count: int) -> Iterator[str]:
    """``count`` record timestamps spread over ``day`` in Asia/Shanghai (UTC+8, no DST)."""
    first = dt.datetime.combine(day, dt.time(0)) - dt.timedelta(hours=8)  # in UTC
    step_ms = max(1, 86_400_000 // max(1, count))
    dates = (first.date().isoformat(), day.isoformat())
    for n in range(count):
        ms = 16 * 3_600_000 + (n * step_ms) % 86_400_000  # 16:00Z of the day before, onwards
        which, ms = divmod(ms, 86_400_000)
        hours, ms = divmod(ms, 3_600_000)
        minutes, ms = divmod(ms, 60_000)
        seconds, ms = divmod(ms, 1000)
        yield f"{dates[which]}T{hours:02d}:{minutes:02d}:{seconds:02d}.{ms:03d}Z"


def generate(dsn: str, days: Sequence[tuple[dt.date, int]]) -> Generated:
    """``count`` records of each ``day`` over the bench's terminals, written with ``COPY`` in
    one transaction that truncated the table (``wal_level=minimal``: no WAL for the rows),
    indexes built afterwards. Bodies are the host's JSON lines (fields with the merchant; hash
    and signature of the real lengths); ``merchant_id`` is filled as ingest fills it."""
    sig = "5" * 128
    apart: dict[dt.date, int] = {}
    terminals = TERMINALS + UNBOUND_TERMINALS
    per_terminal = [0] * terminals
    began = time.perf_counter()
    with psycopg.connect(dsn) as conn:
        with conn.transaction(), conn.cursor() as cur:
            cur.execute("TRUNCATE records")
            cur.execute("ALTER TABLE records DROP CONSTRAINT records_pkey")
            cur.execute("DROP INDEX records_created_at")
            with cur.copy(
                "COPY records (terminal_id, seq, hash, prev_hash, created_at, kind, card_id, "
                "amount, body, received_at, merchant_id) FROM STDIN"
            ) as copy:
                n = 0
                for number, (day, count) in enumerate(days):
                    rng = random.Random(number)
                    apart[day] = 0
                    chunk: list[str] = []
                    for created in _stamps(day, count):
                        n += 1
                        t = n % terminals
                        per_terminal[t] += 1
                        seq = per_terminal[t]
                        terminal = f"POS-{t:05d}"
                        own = merchant = f"M-{t % MERCHANTS:04d}"
                        roll = rng.random()
                        kind = "purchase"
                        if roll < 0.001:
                            kind = "unresolved"
                        elif roll < 0.0015:
                            kind = "refund_request"
                        elif roll < 0.0017:
                            merchant = f"M-{(t + 1) % MERCHANTS:04d}"  # another shop's id
                        if t >= TERMINALS or kind != "purchase" or merchant != own:
                            apart[day] += 1
                        amount = 100 + (n * 7919) % 20_000
                        card = f"0310{n:016d}"
                        digest = f"{n:064x}"
                        body = (
                            f'{{"seq": {seq}, "created_at": "{created}", "terminal_id": '
                            f'"{terminal}", "kind": "{kind}", "card_id": "{card}", "amount": '
                            f'{amount}, "fields": {{"family": "tunion", "balance_after": 4850, '
                            f'"pos_order": "O{n}", "refund_id": "R{n}", "merchant_id": '
                            f'"{merchant}", "merchant_category": "retail", "psam_serial": '
                            f'"23010101000000212241", "tac": "1A2B3C4D"}}, "prev_hash": '
                            f'"{digest}", "hash": "{digest}", "signature": "{sig}"}}'
                        )
                        chunk.append(
                            f"{terminal}\t{seq}\t{digest}\t{digest}\t{created}\t{kind}\t"
                            f"{card}\t{amount}\t{body}\t0\t{merchant}\n"
                        )
                        if len(chunk) >= 20_000:
                            copy.write("".join(chunk))
                            chunk.clear()
                    if chunk:
                        copy.write("".join(chunk))
        copied = time.perf_counter() - began
        began = time.perf_counter()
        conn.autocommit = True
        conn.execute("ALTER TABLE records ADD PRIMARY KEY (terminal_id, seq)")
        conn.execute(CREATED_AT_INDEX["postgresql"])  # the host's own (BRIN)
        conn.execute("VACUUM ANALYZE records")
        indexed = time.perf_counter() - began
    return Generated(sum(c for _d, c in days), copied, indexed, apart, dict(days))


def prepare(dsn: str) -> None:
    """The host's schema (opened once by the storage), the register and the bindings."""
    storage = PostgresStorage(dsn)
    try:
        storage.load_merchants(
            [
                Merchant(f"M-{m:04d}", f"Shop {m}", CATEGORY_CYCLE[m % 6], f"6222{m:012d}")
                for m in range(MERCHANTS)
            ],
            "bench",
        )
        storage.bind_terminals(
            [(f"POS-{t:05d}", f"M-{t % MERCHANTS:04d}") for t in range(TERMINALS)], "bench"
        )
    finally:
        storage.close()


def clear_in_child(dsn: str, day: dt.date, reference: bool) -> dict[str, Any]:
    """Run :func:`_child` in a fresh interpreter; its answer is one JSON line."""
    argv = [sys.executable, "-m", "bench.bench_pos", "--child-clear", dsn, day.isoformat()]
    if reference:
        argv.append("--child-reference")
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        timeout=6 * 3600,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"bench_pos: the clearing child failed:\n{done.stderr[-4000:]}")
    answer: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return answer


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise SystemExit(f"bench_pos: no {key} in /proc/self/status")


def _child(dsn: str, day_text: str, reference: bool) -> int:
    """In the child: clear the day (or run the reference path) and report time and RSS."""

    day = dt.date.fromisoformat(day_text)
    zone = city_zone("Asia/Shanghai")
    bounds = day_bounds(day, zone)
    with quiet_structlog():
        storage = PostgresStorage(dsn)
        try:
            with storage._transaction() as tx:
                began = time.perf_counter()
                row = tx.one(
                    "SELECT COUNT(*), SUM(amount) FROM records WHERE created_at >= ? "
                    "AND created_at < ? AND kind = 'purchase'",
                    bounds,
                )
                bare_s = time.perf_counter() - began
            assert row is not None
            base_kb = _status_kb("VmRSS")
            began = time.perf_counter()
            if reference:
                register = {m.merchant_id: m for m in storage.merchants()}
                bindings = dict(storage.terminal_bindings())
                records = storage.day_records(*bounds)
                settlement = settle_day(
                    day, records, register, FeeSchedule(), zone, bindings=bindings
                )
                totals = settlement.totals()
            else:
                clearing = MerchantClearing(
                    storage,
                    HostKey.generate(),
                    FeeSchedule(),
                    "Asia/Shanghai",
                    lambda: dt.datetime(2030, 1, 1, tzinfo=dt.UTC).timestamp(),
                )
                _created, answer = clearing.clear(day_text, "bench")
                totals = answer["totals"]
            seconds = time.perf_counter() - began
        finally:
            storage.close()
    print(
        json.dumps(
            {
                "seconds": seconds,
                "bare_scan_seconds": bare_s,
                "day_purchases": int(row[0]),
                "base_kb": base_kb,
                "peak_kb": _status_kb("VmHWM"),
                "totals": totals,
            }
        )
    )
    return 0


@dataclass
class ClearingRun:
    label: str
    day: dt.date
    records: int
    generated: Generated
    figures: dict[str, Any]


def run_clearing(directory: Path, records: int, dsn: str | None = None) -> list[ClearingRun]:
    """Days of ``records // 10`` and ``records`` records, each cleared in a child process; and
    a small day cleared by both the SQL path and the old all-in-Python path. With ``dsn``, a
    database this bench generated before is reused (its days counted, nothing regenerated)."""
    small, large = max(1, records // 10), records
    day_small = DAY - dt.timedelta(days=1)
    day_old, old = DAY - dt.timedelta(days=2), min(small, OLD_PATH_RECORDS)
    with contextlib.ExitStack() as stack:
        if dsn is None:
            dsn = stack.enter_context(postgres(directory))
            prepare(dsn)
            generated = generate(dsn, [(day_old, old), (day_small, small), (DAY, large)])
        else:
            generated = _counted(dsn, [day_old, day_small, DAY])
            old, small, large = (generated.days[d] for d in (day_old, day_small, DAY))
        runs: list[ClearingRun] = []
        for day, count in ((day_small, small), (DAY, large)):
            figures = clear_in_child(dsn, day, False)
            runs.append(ClearingRun("clear (SQL)", day, count, generated, figures))
        # the old path (every record of the day in Python) beside the SQL path on a small day
        for label, reference in (("clear (SQL)", False), ("old path: all records in Python", True)):
            figures = clear_in_child(dsn, day_old, reference)
            runs.append(ClearingRun(label, day_old, old, generated, figures))
    return runs


def _counted(dsn: str, days: Sequence[dt.date]) -> Generated:
    """What a reused database holds per day (generation not timed in this run)."""
    zone = city_zone("Asia/Shanghai")
    counts: dict[dt.date, int] = {}
    apart: dict[dt.date, int] = {}
    with psycopg.connect(dsn) as conn:
        for day in days:
            start, end = day_bounds(day, zone)
            row = conn.execute(
                "SELECT COUNT(*), COUNT(*) FILTER (WHERE r.kind <> 'purchase' OR b.merchant_id "
                "IS NULL OR b.merchant_id <> r.merchant_id) FROM records r LEFT JOIN "
                "merchant_terminals b ON b.terminal_id = r.terminal_id "
                "WHERE r.created_at >= %s AND r.created_at < %s",
                (start, end),
            ).fetchone()
            assert row is not None
            counts[day], apart[day] = int(row[0]), int(row[1])
    return Generated(sum(counts.values()), -1.0, -1.0, apart, counts)


# --- the report ---------------------------------------------------------------------------------


def _ms(values: Sequence[float], q: float) -> str:
    return f"{percentile(values, q):.2f}"


def report(trips: RoundTrips, runs: list[ClearingRun], purchases: int, records: int) -> str:
    pos, bare = trips.pos_ms, trips.bare_ms
    lines = [
        "# POS benchmark",
        "",
        "Generated by `python -m bench.bench_pos` (both parts in one run, one process and its "
        "clearing children).",
        "",
        "## Machine",
        "",
        f"- platform: {platform.platform()} ({platform.machine()}), {os.cpu_count()} CPUs",
        f"- Python {platform.python_version()}",
        "",
        "## Round trip",
        "",
        f"N = {purchases} measured purchases of {AMOUNT} fen each way, interleaved one by one "
        "(the three CPU card families in turn), on the same serial-module connection to the "
        "simulated card field and PSAM over TCP.",
        "",
        "| path | p50 ms | p99 ms | mean ms | outcomes |",
        "|---|---:|---:|---:|---|",
        f"| POS: HTTP in, order book, card, record, HTTP out | {_ms(pos, 50)} | {_ms(pos, 99)} "
        f"| {sum(pos) / len(pos):.2f} | {dict(sorted(trips.pos_status.items()))} |",
        f"| bare tap: `process_tap` on the same reader | {_ms(bare, 50)} | {_ms(bare, 99)} "
        f"| {sum(bare) / len(bare):.2f} | {dict(sorted(trips.bare_status.items()))} |",
        "",
        "## Round-trip ratios",
        "",
        f"- POS / bare tap, p50: {percentile(pos, 50) / percentile(bare, 50):.2f}",
        f"- POS / bare tap, p99: {percentile(pos, 99) / percentile(bare, 99):.2f}",
        f"- POS front end's own cost, p50: {percentile(pos, 50) - percentile(bare, 50):.2f} ms "
        "(HTTP parsing and answer; the order book's rows, each a durable SQLite commit "
        "like the journal's; the order's evidence read back from the journal)",
        "",
        "## Clearing",
        "",
        f"`--records {records:,}`: the cleared day holds that many records, the day before a "
        f"tenth; {MERCHANTS} merchants, {TERMINALS} bound terminals and {UNBOUND_TERMINALS} "
        "unbound ones; about 0.1 % unresolved records, 0.05 % refund requests, 0.02 % "
        "purchases naming another terminal's merchant. PostgreSQL with fsync off (the bench "
        "measures the clearing, not the disk). Each clearing runs in a fresh child process; "
        "peak RSS is that process's `VmHWM`, base RSS its `VmRSS` just before clearing.",
        "",
        "| path | day's records | clearing s | bare scan s | "
        "clearing / bare scan | base RSS MB | peak RSS MB | listed apart |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        f = run.figures
        totals = f["totals"]
        apart_fen = sum(totals[k] for k in ("credits_owed", "unresolved", "unassigned", "unbound"))
        lines.append(
            f"| {run.label} | {run.records:,} | "
            f"{f['seconds']:.2f} | {f['bare_scan_seconds']:.2f} | "
            f"{f['seconds'] / max(f['bare_scan_seconds'], 1e-9):.2f} | "
            f"{f['base_kb'] / 1024:.1f} | {f['peak_kb'] / 1024:.1f} | "
            f"{run.generated.apart[run.day]:,} records, {apart_fen:,} fen |"
        )
    if runs and runs[0].generated.seconds < 0:
        lines += [
            "",
            f"Setup: a database generated earlier by this bench (`COPY`) was reused "
            f"(`--dsn`): {runs[0].generated.records:,} records; generation not timed in this run.",
        ]
    elif runs:
        g = runs[0].generated
        lines += [
            "",
            f"Setup (not measured as clearing): {g.records:,} records written with `COPY` in "
            f"{g.seconds:.1f} s ({g.records / max(g.seconds, 1e-9):,.0f} records/s), primary "
            f"key and `created_at` index built in {g.index_seconds:.1f} s.",
        ]
    sql = [r for r in runs if r.label == "clear (SQL)"][:2]
    lines += ["", "## Clearing scaling", ""]
    if len(sql) == 2 and sql[0].records and sql[1].records:
        a, b = sql
        size = b.records / a.records
        lines += [
            f"- records ×{size:.0f}: clearing time ×"
            f"{b.figures['seconds'] / max(a.figures['seconds'], 1e-9):.1f}, peak RSS ×"
            f"{b.figures['peak_kb'] / max(a.figures['peak_kb'], 1):.2f}, growth above base "
            f"{(a.figures['peak_kb'] - a.figures['base_kb']) / 1024:.1f} MB → "
            f"{(b.figures['peak_kb'] - b.figures['base_kb']) / 1024:.1f} MB",
        ]
        for run in sql:
            t = run.figures["totals"]
            ok = t["purchases"] == t["net"] + t["fees"] + t["commissions"]
            lines.append(
                f"- {run.day}: purchases {t['purchases']:,} fen = net {t['net']:,} + fees "
                f"{t['fees']:,} + commissions {t['commissions']:,}: "
                f"{'reconciles' if ok else 'DOES NOT RECONCILE'}"
            )
    old = [r for r in runs if r.label != "clear (SQL)"]
    same_day = [r for r in runs[2:] if r.label == "clear (SQL)"]
    if old and same_day:
        o, n = old[0], same_day[0]
        lines += [
            f"- old path / SQL path at {o.records:,} records: time "
            f"{o.figures['seconds'] / max(n.figures['seconds'], 1e-9):.1f}×, growth above base "
            f"{(o.figures['peak_kb'] - o.figures['base_kb']) / 1024:.1f} MB vs "
            f"{(n.figures['peak_kb'] - n.figures['base_kb']) / 1024:.1f} MB",
        ]
    lines += [
        "",
        "## Reading",
        "",
        "The POS round trip is the bare tap plus what the front end adds around it: the order "
        "book's durable commits (the order's row created, marked attempted, pending, settled) "
        "make most of the difference. Clearing sums the day's payable purchases in the "
        "database (one `GROUP BY` over the day's range, joined with the register and the "
        "terminal bindings) and streams only the records it lists apart into Python, so its "
        "memory is the register, the bindings and the apart lines: it grows with the records "
        "listed apart (here the unbound terminals' and the unresolved ones), never with the "
        "purchases; its time follows the database's scans of the day. The old path parsed "
        "every record's "
        "body into Python objects: its memory grows with the day.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--purchases", type=int, default=DEFAULT_PURCHASES)
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP)
    parser.add_argument("--records", type=int, default=DEFAULT_RECORDS)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument(
        "--dsn", help="reuse a PostgreSQL database this bench generated (skip the generation)"
    )
    parser.add_argument("--child-clear", nargs=2, metavar=("DSN", "DAY"), help=argparse.SUPPRESS)
    parser.add_argument("--child-reference", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_clear:
        return _child(args.child_clear[0], args.child_clear[1], args.child_reference)
    if args.purchases < 1 or args.warmup < 0 or args.records < 10:
        parser.error("--purchases ≥ 1, --warmup ≥ 0, --records ≥ 10")
    with quiet_structlog(), tempfile.TemporaryDirectory(prefix="bench-pos-") as tmp:
        root = Path(tmp)
        trips = run_round_trips(root, args.purchases, args.warmup)
        pg_dir = Path(tempfile.mkdtemp(prefix="bench-pos-pg-"))  # its own: postgres owns it
        try:
            runs = run_clearing(pg_dir, args.records, args.dsn)
        finally:
            shutil.rmtree(pg_dir, ignore_errors=True)
    text = report(trips, runs, args.purchases, args.records)
    args.output.write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
