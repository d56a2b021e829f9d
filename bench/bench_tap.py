"""Tap benchmark: the agent's own time per CPU tap next to the card's modelled RF time.

``python -m bench.bench_tap [--taps N]`` runs N purchase taps (the three card families, simple and
compound flows) through :meth:`agent.transaction.TransactionEngine.process_tap` with the
in-process reader, the real :class:`agent.sam.psam.PsamDriver` over a simulated PSAM, and a real
:class:`agent.offline_store.OfflineStore` file (WAL, ``synchronous=FULL``) on the real disk, and
again on tmpfs when ``/dev/shm`` exists. Per tap it measures:

* the agent's own time: wall time of ``process_tap`` minus the wall time spent inside the
  simulators' ``process()`` (the card's and the PSAM's);
* the modelled card + PSAM time: the simulators' ``modelled_seconds`` advance (ISO-DEP and T=0
  timing models, ``tests/fake_reader``) — what a real card and PSAM would take;
* the store's two durable commits (``intent_commit`` + ``record_commit`` phases) against a bare
  ``sqlite3`` loop doing the same two transactions on a WAL + ``synchronous=FULL`` file in the
  same directory, interleaved tap by tap so both see the same disk.

The report goes to ``bench/RESULTS.md`` (overwritten) and to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import logging
import os
import platform
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from agent.offline_store import DeviceKey, OfflineStore
from agent.profile import Family, Flow, Profile
from agent.sam.keys import KeySet
from agent.sam.psam import PsamConfig, PsamDriver
from agent.transaction import TransactionEngine
from tests.fake_reader.inprocess import CardField, InProcessReader, InProcessSamSlot
from tests.fake_reader.psam import SimulatedPsam
from tests.fake_reader.scenario import demo_keyset, demo_profile, make_card, make_psam

DEFAULT_TAPS = 400
DEFAULT_WARMUP = 20
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "RESULTS.md"
TMPFS_DIR = Path("/dev/shm")
MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})
COMMIT_PHASES = ("intent_commit", "record_commit")
PHASE_ORDER = (
    "read",
    "security_code",
    "recover",
    "qualify",
    "init",
    "sam_mac1",
    "intent_commit",
    "capp",
    "debit",
    "sam_mac2",
    "record_commit",
)
CARD_BALANCE = 5000  # fen: every tap uses a fresh card, so one fare always fits

# --- measurement ----------------------------------------------------------------------------


class Stopwatch:
    """Accumulates the wall time spent inside the functions it wraps."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, process: Callable[[bytes], bytes]) -> Callable[[bytes], bytes]:
        def timed(apdu: bytes) -> bytes:
            start = time.perf_counter()
            try:
                return process(apdu)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


@dataclass(frozen=True)
class TapSample:
    family: str
    flow: str
    status: str
    wall_ms: float  # process_tap, end to end
    sim_ms: float  # wall time inside the card's and the PSAM's process()
    modelled_ms: float  # the simulators' timing model: card RF + PSAM T=0
    phases_ms: dict[str, float]

    @property
    def own_ms(self) -> float:
        return self.wall_ms - self.sim_ms

    @property
    def commits_ms(self) -> float:
        return sum(self.phases_ms.get(name, 0.0) for name in COMMIT_PHASES)


@dataclass
class RunResult:
    label: str
    directory: Path
    filesystem: str
    samples: list[TapSample] = field(default_factory=list)
    raw_ms: list[float] = field(default_factory=list)  # bare sqlite3, per tap (two commits)
    fsync_ms: list[float] = field(default_factory=list)  # 4 KiB write + fsync, the disk's floor
    payload_chars: int = 0


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100), linear between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def p50(values: Sequence[float]) -> float:
    return percentile(values, 50)


def p99(values: Sequence[float]) -> float:
    return percentile(values, 99)


# --- the bare sqlite3 baseline --------------------------------------------------------------


class RawSqlite:
    """The store's two durable transactions per tap, without JSON, hashing or signing."""

    def __init__(self, path: Path, payload_chars: int) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute("PRAGMA synchronous = FULL")
        self.conn.executescript(
            """
            CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            CREATE TABLE intents (
                id INTEGER PRIMARY KEY AUTOINCREMENT, card_id TEXT NOT NULL,
                product TEXT NOT NULL, created_at TEXT NOT NULL, payload TEXT NOT NULL);
            CREATE TABLE records (
                seq INTEGER PRIMARY KEY, created_at TEXT NOT NULL, terminal_id TEXT NOT NULL,
                kind TEXT NOT NULL, card_id TEXT NOT NULL, amount INTEGER NOT NULL,
                fields TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL,
                signature TEXT NOT NULL);
            CREATE INDEX idx_records_card_id_seq ON records (card_id, seq);
            INSERT INTO meta VALUES ('last_seq', '0');
            """
        )
        self.payload = "p" * payload_chars
        self.fields = "f" * payload_chars
        self.seq = 0

    def tap(self, card_id: str) -> float:
        """One intent commit and one record commit; returns their wall time in ms."""
        conn = self.conn
        self.seq += 1
        created_at = "2025-01-01T00:00:00.000000Z"
        start = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        cursor = conn.execute(
            "INSERT INTO intents (card_id, product, created_at, payload) VALUES (?, ?, ?, ?)",
            (card_id, "cpu", created_at, self.payload),
        )
        conn.execute("COMMIT")
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("DELETE FROM intents WHERE id = ?", (cursor.lastrowid,))
        conn.execute(
            "INSERT INTO records VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                self.seq,
                created_at,
                "BENCH-0001",
                "purchase",
                card_id,
                200,
                self.fields,
                "0" * 64,
                "1" * 64,
                "2" * 128,
            ),
        )
        conn.execute("UPDATE meta SET value = ? WHERE key = 'last_seq'", (str(self.seq),))
        conn.execute("COMMIT")
        return (time.perf_counter() - start) * 1000.0

    def close(self) -> None:
        self.conn.close()


# --- the agent run --------------------------------------------------------------------------


def flipped_flows(profile: Profile) -> Profile:
    """The same profile with simple and compound swapped wherever a CAPP file exists."""
    swap = {Flow.SIMPLE: Flow.COMPOUND, Flow.COMPOUND: Flow.SIMPLE}
    apps = tuple(
        app if app.family is Family.LEGACY_1001 else dataclasses.replace(app, flow=swap[app.flow])
        for app in profile.applications
    )
    return dataclasses.replace(profile, applications=apps)


@dataclass(frozen=True)
class Variant:
    engine: TransactionEngine
    family: str
    flow: str


def variants(profile: Profile, store: OfflineStore, sam: PsamDriver) -> list[Variant]:
    """Every family under the demo profile and under its flow-flipped twin: tunion and cjt166
    each run once simple and once compound, legacy1001 (no CAPP file) twice simple."""
    out: list[Variant] = []
    for prof in (profile, flipped_flows(profile)):
        engine = TransactionEngine(prof, store, sam)
        out.extend(Variant(engine, app.family.value, app.flow.value) for app in prof.applications)
    return out


def filesystem_of(path: Path) -> tuple[str, str]:
    """(fstype, source) of the mount holding ``path``, from /proc/mounts."""
    resolved = str(path.resolve())
    best, found = "", ("unknown", "unknown")
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text(encoding="utf-8").splitlines():
            parts = line.split()
            if len(parts) < 3:
                continue
            source, mount, fstype = parts[0], parts[1], parts[2]
            inside = resolved == mount or resolved.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) >= len(best):
                best, found = mount, (fstype, source)
    return found


def disk_directory(requested: Path | None) -> Path:
    """A directory on a real (non-memory) filesystem for the durable run."""
    if requested is not None:
        return requested
    candidates = [Path(tempfile.gettempdir()), Path("/var/tmp"), Path(__file__).resolve().parent]
    for candidate in candidates:
        if candidate.is_dir() and filesystem_of(candidate)[0] not in MEMORY_FILESYSTEMS:
            return candidate
    return candidates[0]


def run(label: str, parent: Path, taps: int, warmup: int) -> RunResult:
    """``warmup`` + ``taps`` taps in a fresh store under ``parent``; only ``taps`` are kept."""
    profile = demo_profile()
    keys = demo_keyset(profile)
    fstype, source = filesystem_of(parent)
    with tempfile.TemporaryDirectory(prefix="bench-tap-", dir=parent) as tmp:
        directory = Path(tmp)
        result = RunResult(label, directory, f"{fstype} ({source})")
        result.fsync_ms = fsync_probe(directory / "fsync.probe")
        psam = make_psam(keys)
        psam_watch = Stopwatch()
        psam.process = psam_watch.wrap(psam.process)  # type: ignore[method-assign,assignment]
        sam = PsamDriver(
            InProcessSamSlot(psam), PsamConfig.for_application(profile.sam_application)
        )
        sam.open()
        store = OfflineStore.open(directory / "agent.db", DeviceKey.generate(), "BENCH-0001")
        try:
            mix = variants(profile, store, sam)
            taps_iter = _taps(mix, keys, psam, psam_watch)
            for _ in range(warmup):
                next(taps_iter)
            result.payload_chars = _mean_fields_chars(store) or 340
            raw = RawSqlite(directory / "raw.db", result.payload_chars)
            try:
                for _ in range(warmup):
                    raw.tap("warmup")
                for _ in range(taps):
                    sample = next(taps_iter)
                    result.samples.append(sample)
                    result.raw_ms.append(raw.tap(f"card-{len(result.samples)}"))
            finally:
                raw.close()
        finally:
            store.close()
            sam.close()
    return result


def _taps(
    mix: list[Variant], keys: KeySet, psam: SimulatedPsam, psam_watch: Stopwatch
) -> Iterator[TapSample]:
    """One tap per step, each with a fresh card, rotating through the variants."""
    field_ = CardField()
    reader = InProcessReader(field_)
    number = 0
    while True:
        variant = mix[number % len(mix)]
        number += 1
        card = make_card(variant.family, number, keys, balance=CARD_BALANCE)  # type: ignore[arg-type]
        card_watch = Stopwatch()
        card.process = card_watch.wrap(card.process)  # type: ignore[method-assign,assignment]
        field_.insert(card)
        presence = reader.wait_for_card(0)
        assert presence is not None
        reader.transmitted.clear()
        reader.feedback_log.clear()
        psam.commands.clear()
        psam_before, psam_modelled_before = psam_watch.seconds, psam.modelled_seconds
        start = time.perf_counter()
        outcome = variant.engine.process_tap(reader, presence)
        wall = time.perf_counter() - start
        field_.remove()
        variant.engine.presence.left()
        sim = card_watch.seconds + psam_watch.seconds - psam_before
        modelled = card.modelled_seconds + psam.modelled_seconds - psam_modelled_before
        yield TapSample(
            family=variant.family,
            flow=variant.flow,
            status=str(outcome.status),
            wall_ms=wall * 1000.0,
            sim_ms=sim * 1000.0,
            modelled_ms=modelled * 1000.0,
            phases_ms=dict(outcome.phases_ms),
        )


def fsync_probe(path: Path, count: int = 50) -> list[float]:
    """Wall time of rewriting 4 KiB and fsyncing it: what one durable commit cannot beat."""
    block = b"\0" * 4096
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        times = []
        for _ in range(count):
            start = time.perf_counter()
            os.pwrite(fd, block, 0)
            os.fsync(fd)
            times.append((time.perf_counter() - start) * 1000.0)
    finally:
        os.close(fd)
    return times


def _mean_fields_chars(store: OfflineStore) -> int:
    """Mean length of the stored records' ``fields`` JSON: sizes the bare-sqlite3 rows."""
    conn = sqlite3.connect(f"file:{store.path}?mode=ro", uri=True)
    try:
        (mean,) = conn.execute("SELECT AVG(LENGTH(fields)) FROM records").fetchone()
    finally:
        conn.close()
    return round(mean) if mean is not None else 0


# --- the report -----------------------------------------------------------------------------


def _ms(value: float) -> str:
    return f"{value:.3f}"


def _ratio(numerator: float, denominator: float) -> str:
    if denominator <= 0 or numerator != numerator or denominator != denominator:
        return "n/a"
    return f"{numerator / denominator:.3f}"


def _pct(numerator: float, denominator: float) -> str:
    return f"{100.0 * numerator / denominator:.1f} %" if denominator > 0 else "n/a"


def render(results: list[RunResult], taps: int, warmup: int, elapsed_s: float) -> str:
    figures: list[tuple[str, Callable[[TapSample], float]]] = [
        ("agent's own time (wall − simulators' `process()`)", lambda s: s.own_ms),
        ("modelled card + PSAM time (simulators' timing model)", lambda s: s.modelled_ms),
        ("`process_tap` wall time (incl. simulators' host CPU)", lambda s: s.wall_ms),
        ("simulators' host CPU inside `process()`", lambda s: s.sim_ms),
        ("store commits: `intent_commit` + `record_commit`", lambda s: s.commits_ms),
    ]
    lines: list[str] = [
        "# Tap benchmark",
        "",
        "Generated by `.venv/bin/python -m bench.bench_tap` (overwritten on every run).",
        "",
        "## Machine",
        "",
        f"- date: {dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- platform: {platform.platform()} ({platform.machine()})",
        f"- CPUs (os.cpu_count): {os.cpu_count()}",
        f"- Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}",
        f"- taps: N = {taps} measured per run, after {warmup} warm-up taps; each tap a fresh card, "
        "rotating tunion/cjt166/legacy1001 under the demo profile and its flow-flipped twin "
        "(tunion and cjt166 once simple, once compound; legacy1001 simple)",
        f"- whole benchmark: {elapsed_s:.1f} s",
    ]
    lines.extend(
        f"- run **{r.label}**: `{r.directory}` on {r.filesystem}; "
        f"statuses {dict(Counter(s.status for s in r.samples))}; "
        f"bare-sqlite3 rows sized like the agent's records ({r.payload_chars}-char JSON)"
        for r in results
    )
    header = "| per tap, ms | " + " | ".join(f"{r.label} p50 | {r.label} p99" for r in results)
    rule = "|---|" + "---:|---:|" * len(results)
    lines += ["", "## Figures per tap", "", header + " |", rule]
    for name, get in figures:
        cells = " | ".join(
            f"{_ms(p50([get(s) for s in r.samples]))} | {_ms(p99([get(s) for s in r.samples]))}"
            for r in results
        )
        lines.append(f"| {name} | {cells} |")
    cells = " | ".join(f"{_ms(p50(r.raw_ms))} | {_ms(p99(r.raw_ms))}" for r in results)
    lines.append(f"| bare `sqlite3`: the same two durable transactions | {cells} |")
    cells = " | ".join(f"{_ms(p50(r.fsync_ms))} | {_ms(p99(r.fsync_ms))}" for r in results)
    lines.append(f"| one 4 KiB write + `fsync` (the disk's floor, 50 probes) | {cells} |")

    lines += [
        "",
        "## Ratios",
        "",
        "| ratio | " + " | ".join(r.label for r in results) + " |",
        "|---|" + "---:|" * len(results),
    ]
    ratio_rows: list[tuple[str, Callable[[RunResult], str]]] = [
        (
            "agent-own / modelled, p50 ÷ p50",
            lambda r: _ratio(p50(_own(r)), p50(_modelled(r))),
        ),
        (
            "agent-own / modelled, p99 ÷ p99",
            lambda r: _ratio(p99(_own(r)), p99(_modelled(r))),
        ),
        (
            "agent-own / modelled, p99 of the per-tap ratio",
            lambda r: _ratio(p99([s.own_ms / s.modelled_ms for s in r.samples]), 1.0),
        ),
        (
            "store commits / bare sqlite3, p50 ÷ p50",
            lambda r: _ratio(p50(_commits(r)), p50(r.raw_ms)),
        ),
        (
            "store commits / bare sqlite3, p99 ÷ p99",
            lambda r: _ratio(p99(_commits(r)), p99(r.raw_ms)),
        ),
        (
            "store commits / agent-own, p50 ÷ p50",
            lambda r: _ratio(p50(_commits(r)), p50(_own(r))),
        ),
    ]
    lines.extend(
        f"| {name} | " + " | ".join(get(r) for r in results) + " |" for name, get in ratio_rows
    )

    lines += [
        "",
        "## Per-phase breakdown",
        "",
        "p50 in ms of `TapOutcome.phases_ms`, over the taps that have the phase. Card and PSAM "
        "phases include the simulators' host CPU (real crypto), not their modelled time.",
        "",
        "| phase | taps | " + " | ".join(f"{r.label} p50" for r in results) + " |",
        "|---|---:|" + "---:|" * len(results),
    ]
    seen = {name for r in results for s in r.samples for name in s.phases_ms}
    for phase in [p for p in PHASE_ORDER if p in seen] + sorted(seen - set(PHASE_ORDER)):
        count = sum(phase in s.phases_ms for s in results[0].samples) if results else 0
        cells = " | ".join(
            _ms(p50([s.phases_ms[phase] for s in r.samples if phase in s.phases_ms]))
            for r in results
        )
        lines.append(f"| {phase} | {count} | {cells} |")

    first = results[0]
    lines += [
        "",
        "### By family and flow (first run)",
        "",
        "| family | flow | taps | agent-own p50 | modelled p50 | ratio |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for family, flow in sorted({(s.family, s.flow) for s in first.samples}):
        group = [s for s in first.samples if (s.family, s.flow) == (family, flow)]
        own, modelled = p50([s.own_ms for s in group]), p50([s.modelled_ms for s in group])
        lines.append(
            f"| {family} | {flow} | {len(group)} | {_ms(own)} | {_ms(modelled)} | "
            f"{_ratio(own, modelled)} |"
        )

    lines += ["", "## Reading", "", _reading(results), ""]
    return "\n".join(lines)


def _own(r: RunResult) -> list[float]:
    return [s.own_ms for s in r.samples]


def _modelled(r: RunResult) -> list[float]:
    return [s.modelled_ms for s in r.samples]


def _commits(r: RunResult) -> list[float]:
    return [s.commits_ms for s in r.samples]


def _reading(results: list[RunResult]) -> str:
    disk = results[0]
    own50, own99 = p50(_own(disk)), p99(_own(disk))
    mod50, mod99 = p50(_modelled(disk)), p99(_modelled(disk))
    com50, raw50 = p50(_commits(disk)), p50(disk.raw_ms)
    size = "a small fraction" if own50 < 0.1 * mod50 else "not a small fraction"
    text = (
        f"On the {disk.label} run the agent's own work per tap is {own50:.2f} ms at p50 and "
        f"{own99:.2f} ms at p99, against {mod50:.1f} ms (p50) and {mod99:.1f} ms (p99) that the "
        f"card's ISO-DEP exchange and the PSAM's T=0 exchanges take in the simulators' timing "
        f"model: {_pct(own50, mod50)} at p50 and {_pct(own99, mod99)} at p99, {size} of the "
        f"time the card has to stay in the field. Of that own time, the two durable commits "
        f"take {com50:.2f} ms at p50 ({_pct(com50, own50)}), {_ratio(com50, raw50)}× what a bare "
        f"`sqlite3` loop needs for the same two WAL + synchronous=FULL transactions "
        f"({raw50:.2f} ms); the difference is the store's own reads, canonical JSON, SHA-256 "
        f"chaining, the Ed25519 signature and the store's Python plumbing. One bare 4 KiB "
        f"write + fsync takes {p50(disk.fsync_ms):.2f} ms on this disk."
    )
    if len(results) > 1:
        mem = results[1]
        text += (
            f" The {mem.label} run, where fsync costs nothing, puts the agent's own time at "
            f"{p50(_own(mem)):.2f} ms (p50) and the commits at {p50(_commits(mem)):.2f} ms, so "
            f"the disk's durability adds about {com50 - p50(_commits(mem)):.2f} ms per tap here."
        )
    text += (
        " Caveats: the modelled time is the simulators' model, not a measured card or PSAM; "
        "a virtual disk may acknowledge fsync from a cache, so a terminal's flash can be slower; "
        "and p99 on two shared cores is sensitive to neighbours."
    )
    return text


# --- entry point ----------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_structlog() -> Iterator[None]:
    """Drop structlog events below warning for the run, then restore the previous setup."""
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    try:
        yield
    finally:
        structlog.configure(**saved)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--taps", type=int, default=DEFAULT_TAPS, help="measured taps per run")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help="unmeasured taps")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="markdown report")
    parser.add_argument("--dir", type=Path, default=None, help="directory on the real disk")
    parser.add_argument("--no-tmpfs", action="store_true", help="skip the /dev/shm run")
    args = parser.parse_args(argv)
    if args.taps < 1 or args.warmup < 0:
        parser.error("--taps must be at least 1 and --warmup at least 0")

    started = time.perf_counter()
    with quiet_structlog():
        results = [run("disk", disk_directory(args.dir), args.taps, args.warmup)]
        if not args.no_tmpfs and TMPFS_DIR.is_dir() and os.access(TMPFS_DIR, os.W_OK):
            results.append(run("tmpfs", TMPFS_DIR, args.taps, args.warmup))
    report = render(results, args.taps, args.warmup, time.perf_counter() - started)
    args.output.write_text(report, encoding="utf-8")
    sys.stdout.write(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
