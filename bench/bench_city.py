"""City bench: N terminals upload their backlog at once into a real host (issue 14).

``python -m bench.bench_city [--terminals 1000] [--records 50] [--backends sqlite,postgresql]
[--workers 1,2]`` measures, for each backend and worker count, against a real ``cardhost host``
process (``--workers N``: a supervisor and N workers on one socket) on 127.0.0.1:

* each terminal has its own Ed25519 device key and its own chain of signed purchase records
  (the fields a CPU purchase record carries), created at times drawn from a transit day's
  hourly shape (:data:`HOURLY_SHARE`: morning and evening peaks), pre-registered by an operator
  and enrolled by the terminal's signed proof of possession, as a real terminal does;
* all N terminals then upload their whole backlog at once (the morning after an outage):
  asyncio + httpx speaking the sync protocol (:func:`sync.protocol.encode_batch`, the signed
  acknowledgement checked by :func:`sync.protocol.parse_ack`), one connection per terminal,
  honouring ``Retry-After`` with the daemon's own rule (:func:`sync.daemon.honour_retry_after`);
* figures: time to drain every backlog, records/s, the host's peak RSS (``VmHWM`` of every
  host process, the supervisor's workers summed), its RSS before the storm, every answer by
  status (503 ``busy`` with ``Retry-After`` is the only refusal expected), transport errors,
  and exactly-once checked in the host's storage (per terminal: count == records sent, the
  (seq, hash) list equal to the terminal's, no (terminal, seq) twice);
* stored bytes per record: SQLite (file growth over the run / records) and PostgreSQL
  (``pg_total_relation_size`` of ``records`` and ``batches`` / records), for docs/city-scale.md.

PostgreSQL is a throw-away cluster made with ``initdb`` in a temporary directory (the Debian
package's binaries, as the tests use), unless ``--pg-dsn`` names a database to use (emptied
tables are not assumed: give a fresh database). The report goes to ``bench/RESULTS-city.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import random
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from glob import glob
from pathlib import Path
from typing import Any

import httpx
import psycopg
import structlog

from agent.offline_store import DeviceKey, Record, RecordBody
from agent.offline_store.records import GENESIS_HASH, seal_record
from clearinghost.keys import HostKey
from clearinghost.operators import TOKEN_ENV
from clearinghost.storage import open_storage
from sync import protocol
from sync.daemon import SyncSettings, honour_retry_after
from sync.errors import ProtocolError

RESULTS = Path(__file__).with_name("RESULTS-city.md")
TOKEN = "bench-city-operator-token-0123456789abcdef"
# Share of a weekday's taps in each hour (0h..23h), a two-peak transit day: the morning peak
# hour carries 11 % of the day, the evening one 9 % (docs/city-scale.md cites the sources).
HOURLY_SHARE = (
    0.002, 0.001, 0.001, 0.001, 0.003, 0.012, 0.045, 0.095, 0.110, 0.065, 0.045, 0.040,
    0.042, 0.040, 0.040, 0.045, 0.060, 0.085, 0.090, 0.060, 0.045, 0.035, 0.025, 0.013,
)  # fmt: skip
BATCH = 25
# a terminal waiting out its Retry-After keeps its connection (the host's default is 5 s)
KEEP_ALIVE_S = 75


@dataclass
class Fleet:
    """Every terminal's key and signed records (made once, uploaded to each host)."""

    keys: dict[str, DeviceKey]
    records: dict[str, list[Record]]
    make_s: float

    @property
    def count(self) -> int:
        return sum(len(r) for r in self.records.values())


def make_fleet(root: Path, terminals: int, per_terminal: int, seed: int = 14) -> Fleet:
    rng = random.Random(seed)
    keys: dict[str, DeviceKey] = {}
    records: dict[str, list[Record]] = {}
    started = time.perf_counter()
    hours = list(range(24))
    for n in range(terminals):
        terminal_id = f"BUS-{n:05d}"
        key = DeviceKey.create(root / f"{terminal_id}.key")
        times = sorted(
            (rng.choices(hours, HOURLY_SHARE)[0], rng.randrange(60), rng.randrange(60))
            for _ in range(per_terminal)
        )
        chain: list[Record] = []
        prev = GENESIS_HASH
        for seq, (h, m, s) in enumerate(times, start=1):
            balance = rng.randrange(200, 100_000)
            fields: dict[str, Any] = {
                "product": "cpu",
                "family": "tunion",
                "transaction_type": "06",
                "asn": f"{rng.getrandbits(64):016X}",
                "counter": rng.randrange(65536),
                "balance_before": balance,
                "balance_after": balance - 200,
                "ttc": seq,
                "terminal": f"{n:012d}",
                "sam": "0000000000A1",
                "datetime": f"20260504{h:02d}{m:02d}{s:02d}",
                "factors": None,
                "key_version": 1,
                "algorithm": "3des",
                "tac": f"{rng.getrandbits(32):08X}",
                "mac2": f"{rng.getrandbits(32):08X}",
                "mac2_verified": True,
                "recovered": False,
            }
            record = seal_record(
                seq=seq,
                created_at=f"2026-05-04T{h:02d}:{m:02d}:{s:02d}.000Z",
                terminal_id=terminal_id,
                body=RecordBody(
                    "purchase", f"03105170{rng.getrandbits(40):012d}"[:20], 200, fields
                ),
                prev_hash=prev,
                sign=key.sign,
            )
            chain.append(record)
            prev = record.hash
        keys[terminal_id], records[terminal_id] = key, chain
    return Fleet(keys, records, time.perf_counter() - started)


# --- PostgreSQL ---------------------------------------------------------------------------------


def _pg_bin(name: str) -> str:
    found = sorted(glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name) or ""]
    if not found[-1]:
        raise SystemExit(f"bench_city: PostgreSQL's {name} is missing (apt-get install postgresql)")
    return found[-1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgCluster:
    """A throw-away PostgreSQL cluster (initdb + pg_ctl), on a unix socket and 127.0.0.1."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="bench-city-pg-"))
        self.port = _free_port()
        self.as_root = os.geteuid() == 0
        if self.as_root:
            shutil.chown(self.dir, "postgres", "postgres")
        self.data = self.dir / "data"
        self.databases = 0

    def _run(self, *argv: str) -> None:
        command = ["runuser", "-u", "postgres", "--", *argv] if self.as_root else list(argv)
        subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)

    def start(self) -> PgCluster:
        self._run(_pg_bin("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust")
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.dir} "
            "-c max_connections=60 -c shared_buffers=128MB"
        )
        log = str(self.dir / "log")
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-o", options, "-l", log, "-w", "start")
        return self

    def new_database(self) -> str:
        self.databases += 1
        name = f"city_{self.databases}"
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.dsn(name)

    def dsn(self, database: str) -> str:
        return f"host={self.dir} port={self.port} user=postgres dbname={database}"

    def stop(self) -> None:
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)


# --- the host -----------------------------------------------------------------------------------


class HostProcess:
    def __init__(self, root: Path, db: str, key: Path, workers: int, max_uploads: int) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = (root / f"host-{self.port}.log").open("wb")
        argv = [
            sys.executable, "-m", "clearinghost.cli", "--log-format", "json",
            "--log-level", "warning", "host", "--db", db, "--key", str(key),
            "--listen", f"127.0.0.1:{self.port}", "--workers", str(workers),
            "--max-connections", "4096", "--max-uploads", str(max_uploads),
            "--keep-alive", str(KEEP_ALIVE_S), "--header-timeout", str(KEEP_ALIVE_S),
        ]  # fmt: skip
        env = dict(os.environ, **{TOKEN_ENV: TOKEN})
        self.process = subprocess.Popen(argv, stdout=self.log, stderr=self.log, env=env)
        self.workers = workers
        deadline = time.monotonic() + 300
        while not self._ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"bench_city: the host did not start (see {self.log.name})")
            time.sleep(0.1)

    def _ready(self) -> bool:
        if self.workers > 1 and len(self.children()) < self.workers:
            return False
        try:
            return httpx.get(f"{self.url}/healthz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def children(self) -> list[int]:
        pid = self.process.pid
        try:
            return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        except OSError:
            return []

    def serving_pids(self) -> list[int]:
        return self.children() if self.workers > 1 else [self.process.pid]

    def memory_mb(self, field_name: str) -> float:
        """``VmHWM`` (peak) or ``VmRSS`` of the serving processes, summed, in MB."""
        total = 0
        for pid in self.serving_pids():
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(field_name + ":"):
                    total += int(line.split()[1])
        return total / 1024

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


# --- the terminals ------------------------------------------------------------------------------


@dataclass
class Tally:
    statuses: Counter[int] = field(default_factory=Counter)
    codes: Counter[str] = field(default_factory=Counter)
    without_retry_after: int = 0
    transport_errors: int = 0
    bad_acks: int = 0
    batches: int = 0
    acked: dict[str, int] = field(default_factory=dict)


async def enrol_all(url: str, fleet: Fleet) -> None:
    limits = httpx.Limits(max_connections=32)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        gate = asyncio.Semaphore(32)

        async def post(path: str, body: dict[str, Any], **options: Any) -> httpx.Response:
            for _attempt in range(10):  # a keep-alive connection the host just closed
                try:
                    return await client.post(path, json=body, **options)
                except httpx.TransportError:
                    await asyncio.sleep(0.5)
            raise SystemExit(f"bench_city: POST {path}: the host does not answer")

        async def one(terminal_id: str, key: DeviceKey) -> None:
            async with gate:
                public = key.public_key_bytes
                entry = {"terminal_id": terminal_id, "kind": "bus", "public_key": public.hex()}
                added = await post("/v1/admin/terminals", entry, headers=auth)
                if added.status_code not in (201, 409):  # 409: a retry after a lost answer
                    raise SystemExit(f"bench_city: add {terminal_id}: {added.text}")
                body = protocol.enrolment_request(
                    terminal_id, public, key.sign, None, int(time.time())
                )
                enrolled = await post(protocol.register_path(terminal_id), body)
                if enrolled.status_code not in (200, 201):
                    raise SystemExit(f"bench_city: enrol {terminal_id}: {enrolled.text}")

        await asyncio.gather(*(one(t, k) for t, k in fleet.keys.items()))


async def storm(url: str, fleet: Fleet, host_key: bytes, tally: Tally, seed: int) -> float:
    """Every terminal uploads its whole backlog at once; seconds until all are acknowledged."""
    settings = SyncSettings(url, host_key, backoff_base_s=0.5, backoff_max_s=30.0)
    rng = random.Random(seed)
    start = asyncio.Event()

    async def terminal(terminal_id: str, records: list[Record]) -> None:
        transport = httpx.AsyncHTTPTransport(
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
        )
        async with httpx.AsyncClient(base_url=url, transport=transport, timeout=300) as client:
            await start.wait()
            ack, failures = 0, 0
            batch = None
            while ack < len(records):
                if batch is None or batch.first_seq != ack + 1:  # re-sent as is after a 503
                    batch = protocol.encode_batch(terminal_id, records[ack : ack + BATCH])
                asked: float | None = None
                try:
                    answer = await client.post(
                        protocol.records_path(terminal_id),
                        content=batch.body,
                        headers={
                            "Content-Type": protocol.NDJSON,
                            "Content-Encoding": "gzip",
                            protocol.IDEMPOTENCY_HEADER: batch.idempotency_key,
                        },
                    )
                except httpx.TransportError:
                    tally.transport_errors += 1
                else:
                    tally.statuses[answer.status_code] += 1
                    if answer.status_code == 200:
                        try:
                            signed = protocol.parse_ack(
                                answer.json(), batch, len(records), host_key
                            )
                        except ProtocolError:
                            tally.bad_acks += 1
                        else:
                            ack, failures = signed.ack_seq, 0
                            tally.batches += 1
                            continue
                    else:
                        try:
                            code = str(answer.json().get("error", "?"))
                        except ValueError:
                            code = "not JSON"
                        tally.codes[f"{answer.status_code} {code}"] += 1
                        header = answer.headers.get("retry-after")
                        if header is None:
                            tally.without_retry_after += 1
                        else:
                            asked = float(header)
                failures += 1
                ceiling = min(settings.backoff_max_s, settings.backoff_base_s * 2 ** (failures - 1))
                delay = honour_retry_after(rng.uniform(0, ceiling), asked, settings, rng)
                await asyncio.sleep(delay)
            tally.acked[terminal_id] = ack

    tasks = [asyncio.create_task(terminal(t, r)) for t, r in fleet.records.items()]
    await asyncio.sleep(0.5)  # every client built and waiting
    started = time.perf_counter()
    start.set()
    await asyncio.gather(*tasks)
    return time.perf_counter() - started


# --- one run ------------------------------------------------------------------------------------


@dataclass
class Run:
    backend: str
    workers: int
    records: int
    terminals: int
    drain_s: float
    rss_before_mb: float
    peak_rss_mb: float
    tally: Tally
    exactly_once: bool
    problems: list[str]
    bytes_per_record: dict[str, float]
    load: tuple[float, float] = (0.0, 0.0)  # the machine's 1-minute load average, start / end


def check_storage(db: str, fleet: Fleet) -> list[str]:
    storage = open_storage(db)
    problems = []
    try:
        for terminal_id, records in fleet.records.items():
            held = storage.record_keys(terminal_id)
            if held != [(r.seq, r.hash) for r in records]:
                problems.append(f"{terminal_id}: holds {len(held)} of {len(records)}")
        total = storage.count_records()
        if total != fleet.count:
            problems.append(f"{total} records held, {fleet.count} sent")
    finally:
        storage.close()
    return problems


def stored_bytes(backend: str, db: str, base_bytes: int, records: int) -> dict[str, float]:
    if backend == "sqlite":
        return {"file growth / record": (sqlite_bytes(db) - base_bytes) / records}
    with psycopg.connect(db, autocommit=True) as conn:
        row = conn.execute(
            "SELECT pg_total_relation_size('records'), pg_relation_size('records'), "
            "pg_total_relation_size('batches'), pg_database_size(current_database())"
        ).fetchone()
    assert row is not None
    total, heap, batches, database = (int(v) for v in row)
    return {
        "records table + indexes / record": total / records,
        "records heap / record": heap / records,
        "batches table / record": batches / records,
        "database growth / record": (database - base_bytes) / records,
    }


def sqlite_bytes(path: str) -> int:
    """The SQLite file's size after a checkpoint (the WAL folded in)."""
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return os.path.getsize(path)


def database_bytes(backend: str, db: str) -> int:
    if backend == "sqlite":
        return sqlite_bytes(db)
    with psycopg.connect(db, autocommit=True) as conn:
        row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
    return int(row[0]) if row else 0


def run_one(root: Path, fleet: Fleet, backend: str, db: str, workers: int, max_uploads: int) -> Run:
    key_path = root / f"host-{backend}-{workers}.key"
    host_key = HostKey.load_or_create(key_path)
    host = HostProcess(root, db, key_path, workers, max_uploads)
    tally = Tally()
    try:
        asyncio.run(enrol_all(host.url, fleet))
        base = database_bytes(backend, db)
        rss_before = host.memory_mb("VmRSS")
        load_before = os.getloadavg()[0]
        drain_s = asyncio.run(storm(host.url, fleet, host_key.public_key_bytes, tally, seed=7))
        load_after = os.getloadavg()[0]
        peak = host.memory_mb("VmHWM")
    finally:
        host.stop()
    problems = check_storage(db, fleet)
    acked_all = all(tally.acked.get(t) == len(r) for t, r in fleet.records.items())
    if not acked_all:
        problems.append("not every terminal saw its last record acknowledged")
    return Run(
        backend=backend,
        workers=workers,
        records=fleet.count,
        terminals=len(fleet.records),
        drain_s=drain_s,
        rss_before_mb=rss_before,
        peak_rss_mb=peak,
        tally=tally,
        exactly_once=not problems,
        problems=problems,
        bytes_per_record=stored_bytes(backend, db, base, fleet.count),
        load=(load_before, load_after),
    )


def report(runs: list[Run], fleet: Fleet, args: argparse.Namespace) -> str:
    lines = [
        "# City bench (`python -m bench.bench_city`)",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}; shared with other jobs (figures are noisy).",
        "",
        f"{len(fleet.records):,} terminals × {args.records:,} records = {fleet.count:,} signed "
        f"purchase records (made in {fleet.make_s:.1f} s), times drawn from a transit day's "
        "hourly shape (peaks 07–09 h and 17–19 h); every terminal pre-registered by an operator "
        "and enrolled with its own device key, then **all upload their whole backlog at once** "
        f"(batches of {BATCH}, one connection each, `Retry-After` honoured with the daemon's "
        f"rule). Host: `cardhost host --workers N --max-uploads {args.max_uploads} --keep-alive "
        f"{KEEP_ALIVE_S}` (a terminal waiting out its Retry-After keeps its connection).",
        "",
        "## The storm",
        "",
        "| backend | workers | drain (s) | records/s | host RSS before (MB) | **peak host RSS "
        "(MB)** | 200 | 503 busy (Retry-After) | other answers | transport errors | exactly "
        "once | load avg (start / end) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for run in runs:
        t = run.tally
        busy = t.statuses.get(503, 0)
        other = sum(n for s, n in t.statuses.items() if s not in (200, 503)) + t.bad_acks
        lines.append(
            f"| {run.backend} | {run.workers} | {run.drain_s:.1f} | "
            f"{run.records / run.drain_s:,.0f} | {run.rss_before_mb:.0f} | "
            f"**{run.peak_rss_mb:.0f}** | {t.statuses.get(200, 0):,} | {busy:,} "
            f"({t.without_retry_after} without) | {other} | {t.transport_errors} | "
            f"{'yes' if run.exactly_once else 'NO: ' + '; '.join(run.problems[:3])} | "
            f"{run.load[0]:.1f} / {run.load[1]:.1f} |"
        )
    lines += [
        "",
        "Exactly once is checked in the host's storage after the run: for every terminal the "
        "stored (seq, hash) list equals the one it sent, and the total equals the records sent "
        "((terminal, seq) is the primary key, so nothing is held twice). Peak RSS is `VmHWM` "
        "of the serving processes (the workers summed), over their whole life (enrolment "
        "included). Other answers: " + (", ".join(
            f"{code}: {n}" for run in runs for code, n in run.tally.codes.items()
            if not code.startswith("503 busy")
        ) or "none") + ".",
        "",
        "## Stored bytes per record",
        "",
        "| backend | measure | bytes |",
        "|---|---|---:|",
    ]  # fmt: skip
    seen = set()
    for run in runs:
        if run.backend in seen:
            continue
        seen.add(run.backend)
        for name, value in run.bytes_per_record.items():
            lines.append(f"| {run.backend} | {name} | {value:,.0f} |")
    lines += [
        "",
        "A record row keeps the terminal id, seq, hash, previous hash, time, kind, card, "
        "amount and the record's whole signed JSON line (the evidence); `batches` keeps one row "
        "per upload. These are the figures `docs/city-scale.md` sizes the database with.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_city", description=__doc__)
    parser.add_argument("--terminals", type=int, default=1000)
    parser.add_argument("--records", type=int, default=50, help="per terminal")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--workers", default="1,2", help="worker counts (PostgreSQL)")
    parser.add_argument("--max-uploads", type=int, default=8)
    parser.add_argument("--pg-dsn", help="a fresh database instead of a throw-away cluster")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    try:
        return _main(args)
    finally:
        structlog.configure(**saved)


def _main(args: argparse.Namespace) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, max(soft, 4 * args.terminals + 256))
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    backends = [b for b in args.backends.split(",") if b]
    worker_counts = [int(w) for w in args.workers.split(",") if w]
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="bench-city-") as name:
        root = Path(name)
        (root / "keys").mkdir()
        fleet = make_fleet(root / "keys", args.terminals, args.records)
        cluster = None
        try:
            for backend in backends:
                for workers in worker_counts if backend == "postgresql" else [1]:
                    if backend == "sqlite":
                        db = str(root / f"host-{workers}.db")
                    elif args.pg_dsn:
                        db = args.pg_dsn
                    else:
                        cluster = cluster or PgCluster().start()
                        db = cluster.new_database()
                    runs.append(run_one(root, fleet, backend, db, workers, args.max_uploads))
                    done = {"run": backend, "workers": workers, "drain_s": runs[-1].drain_s}
                    print(json.dumps(done), file=sys.stderr)
                    # the report so far, after each run (a long bench keeps what it measured)
                    args.output.write_text(report(runs, fleet, args), encoding="utf-8")
        finally:
            if cluster is not None:
                cluster.stop()
    text = report(runs, fleet, args)
    args.output.write_text(text, encoding="utf-8")
    sys.stdout.write(text)
    return 0 if all(r.exactly_once for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
