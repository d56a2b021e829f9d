"""Ingest benchmark (issue 14): N records uploaded, verified and committed at the host.

``python -m bench.bench_ingest [--records 100000] [--batch-size 500] [--backends
sqlite,postgresql] [--no-v1] [--no-daemon] [--output bench/RESULTS-sync.md]`` measures, in one
process and one run, side by side:

* host ingest, signed batches: the real host (uvicorn on 127.0.0.1, SQLite on tmpfs or a
  throw-away PostgreSQL cluster) receives N records of one terminal as gzip JSON Lines batches
  with their batch signature, posted by an httpx loop in order; it verifies one device
  signature per batch, each record's hash and chain link, and commits each batch (one
  ``executemany`` on SQLite, ``COPY`` on PostgreSQL) before answering with its signed
  acknowledgement. Wall time from the first POST to the last answer, and the process CPU time;
* host ingest, v1 (no batch signature: every record's Ed25519 signature verified at upload):
  the same bodies into a fresh database, the design before issue 14;
* the bare httpx loop: the same bodies POSTed to a sink endpoint of the same server (transport
  only); the ratios are ingest / bare loop;
* bare library costs: Ed25519 verification x N against one per batch, SHA-256 of the N
  canonical encodings (the chain), and ``json`` decoding + canonical re-encoding of N lines;
* ``cardhost audit`` of the N records (where the per-record verification went);
* end to end: the sync daemon's ``upload_pending`` from a real store of N records (SQLite),
  which also re-verifies every record of its own store before sending (issue 9).

The report replaces the ``## Ingest`` section of the output file (``bench/RESULTS-sync.md``),
keeping its other sections, and goes to stdout.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import http.client
import json
import logging
import os
import platform
import random
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import structlog

from agent.offline_store import DeviceKey, RecordBody
from agent.offline_store.device_key import signature_verifier
from agent.offline_store.records import GENESIS_HASH, Record, record_to_json, seal_record
from agent.wiring import DataDir
from bench.bench_city import HostProcess  # the same `cardhost host` process as the city bench
from bench.machine import cpu_spent, postgres_cpu_s, speed_probe, tree_cpu_s
from clearinghost.audit import audit_storage
from clearinghost.keys import HostKey
from clearinghost.server import ClearingHost, HostLimits, HostServer, create_app
from clearinghost.storage import PostgresStorage, SqliteStorage, Storage, open_storage
from sync import protocol
from sync.daemon import SyncSettings, open_daemon
from tests.test_sync_storage import PgServer

RESULTS = Path(__file__).with_name("RESULTS-sync.md")
SECTION = "## Ingest"
TERMINAL = "BENCH-1"


def quiet() -> Callable[[], None]:
    """Errors only while the bench runs; returns the undo."""
    before = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    return lambda: structlog.configure(**before)


def make_records(key: DeviceKey, count: int, terminal_id: str = TERMINAL) -> list[Record]:
    """N signed, chained purchase records of one terminal (what a bus writes in weeks)."""
    rng = random.Random(14)
    records: list[Record] = []
    prev = GENESIS_HASH
    for n in range(1, count + 1):
        record = seal_record(
            seq=n,
            created_at=f"2026-05-{1 + n // 86400 % 28:02d}T{n // 3600 % 24:02d}:"
            f"{n // 60 % 60:02d}:{n % 60:02d}.000Z",
            terminal_id=terminal_id,
            body=RecordBody(
                "purchase",
                f"0310517007{rng.randrange(10**10):010d}",
                200,
                {"product": "cpu", "counter": n % 65536, "ttc": n, "tac": "0A0B0C0D"},
            ),
            prev_hash=prev,
            sign=key.sign,
        )
        records.append(record)
        prev = record.hash
    return records


@dataclass
class Timed:
    wall_s: float
    cpu_s: float


@contextmanager
def timed() -> Iterator[list[Timed]]:
    out: list[Timed] = []
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    yield out
    out.append(Timed(time.perf_counter() - wall, time.process_time() - cpu))


def with_sink(app: Any) -> Any:
    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/sink":
            while (await receive()).get("more_body"):
                pass
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})
            return
        await app(scope, receive, send)

    return wrapped


def post_all(
    url: str, batches: list[protocol.UploadBatch], path: str | None, signed: bool
) -> Timed:
    """POST every batch in order (to the upload route, or ``path``); every answer must be 200
    (and, at the upload route, acknowledge the batch)."""
    with httpx.Client(base_url=url, timeout=120) as client, timed() as result:
        for batch in batches:
            headers = batch.headers()
            if not signed:
                headers.pop(protocol.BATCH_SIGNATURE_HEADER, None)
            answer = client.post(
                path or protocol.records_path(TERMINAL), content=batch.body, headers=headers
            )
            if answer.status_code != 200:
                raise RuntimeError(f"upload {batch.idempotency_key}: {answer.text[:300]}")
            if path is None and answer.json()["ack_seq"] != batch.last_seq:
                raise RuntimeError(f"upload {batch.idempotency_key}: {answer.text[:300]}")
    return result[0]


def host_ingest(
    open_db: Callable[[str], Storage],
    key: DeviceKey,
    batches: list[protocol.UploadBatch],
    count: int,
    *,
    v1: bool,
) -> dict[str, Any]:
    """Ingest signed (and, with ``v1``, unsigned) batches into fresh databases, the bare loop
    beside them, then the audit of what was stored."""
    figures: dict[str, Any] = {}
    for mode in ("signed", "direct", "v1", "bare") if v1 else ("signed", "direct", "bare"):
        storage = open_db(mode)
        host = ClearingHost(storage, HostKey.generate())
        storage.register_terminal(TERMINAL, key.public_key_bytes.hex())
        if mode == "direct":  # the host's own work: ClearingHost.upload called in process
            figures[mode] = upload_direct(host, batches)
            if storage.count_records() != count:
                raise RuntimeError(f"direct: {storage.count_records()} of {count} stored")
            storage.close()
            continue
        with HostServer(with_sink(create_app(host)), log_level="critical") as server:
            figures[mode] = post_all(
                server.url, batches, "/sink" if mode == "bare" else None, mode == "signed"
            )
        if mode != "bare" and storage.count_records() != count:
            raise RuntimeError(f"{mode}: {storage.count_records()} of {count} records stored")
        if mode == "signed":
            with timed() as audited:
                report = audit_storage(storage)
            if report.records != count or report.findings:
                raise RuntimeError(f"audit: {report.as_dict()}")
            figures["audit"] = audited[0]
        storage.close()
    return figures


def upload_direct(host: ClearingHost, batches: list[protocol.UploadBatch]) -> Timed:
    """The same batches given to ``ClearingHost.upload`` in this thread: no HTTP, no server
    thread; every answer must acknowledge its batch."""
    with timed() as result:
        for batch in batches:
            headers = batch.headers()
            status, answer = host.upload(
                TERMINAL,
                batch.body,
                headers.get("Content-Encoding"),
                headers.get(protocol.IDEMPOTENCY_HEADER),
                headers.get(protocol.BATCH_SIGNATURE_HEADER),
            )
            if status != 200 or answer["ack_seq"] != batch.last_seq:
                raise RuntimeError(f"direct upload {batch.idempotency_key}: {status} {answer}")
    return result[0]


@dataclass
class Concurrent:
    """K terminals uploading at once into one ``cardhost host --workers W`` process tree."""

    workers: int
    terminals: int
    wall_s: float  # the first POST to the last acknowledged batch
    host_cpu_s: float  # the serving processes (supervisor and workers), over the uploads only
    worker_cpu_s: list[float]  # each serving process's share of it (the balance)
    client_cpu_s: float  # this process (the K client threads) over the same span
    database_cpu_s: float | None  # the PostgreSQL server's processes over the same span
    retries: int  # batches sent again: a 429/503 waited out (Retry-After), a broken connection


def upload_terminal(
    url: str, terminal_id: str, batches: list[protocol.UploadBatch], start: threading.Barrier
) -> tuple[float, float, int]:
    """One terminal's batches, one at a time (as a daemon sends them): the time of its first
    POST and of its last acknowledgement, and how many times it sent a batch again (a busy
    answer waited out, a broken connection).

    The simulated terminal speaks through ``http.client``: a terminal's CPU is not the host's,
    and on the bench's 2 cores httpx's own work (about 1.5 ms of CPU a POST, ten times
    ``http.client``'s) would be taken from the host being measured. A connection the host
    closed (``Connection: close``, an idle keep-alive) is opened again; a batch sent on a
    connection that broke is sent again, as the daemon does (uploads are idempotent)."""
    parsed = urlsplit(url)
    connection = http.client.HTTPConnection(parsed.hostname or "", parsed.port, timeout=120)
    path = protocol.records_path(terminal_id)
    retries = 0
    try:
        start.wait(timeout=300)
        first = time.perf_counter()
        for batch in batches:
            headers = batch.headers()
            while True:
                try:
                    connection.request("POST", path, body=batch.body, headers=headers)
                    answer = connection.getresponse()
                    status, text = answer.status, answer.read().decode()
                except (http.client.RemoteDisconnected, ConnectionError):
                    connection.close()  # the next request connects again
                    if retries >= 10_000:
                        raise
                    retries += 1
                    continue
                if status in (429, 503) and retries < 10_000:
                    retries += 1
                    time.sleep(min(5.0, float(answer.getheader("Retry-After") or 0.1)))
                    continue
                break
            if status != 200 or json.loads(text)["ack_seq"] != batch.last_seq:
                raise RuntimeError(
                    f"{terminal_id} upload {batch.idempotency_key}: HTTP {status} {text[:300]}"
                )
        return first, time.perf_counter(), retries
    finally:
        connection.close()


def concurrent_ingest(
    root: Path,
    db: str,
    fleet: dict[str, tuple[DeviceKey, list[Record], list[protocol.UploadBatch]]],
    workers: int,
) -> Concurrent:
    """The fleet's batches uploaded at once, one thread per terminal, into a real ``cardhost
    host --workers W`` on 127.0.0.1 (every terminal pre-registered by its key); afterwards the
    database must hold every record of every terminal exactly once, in order."""
    storage = open_storage(db)
    try:
        for terminal_id, (key, _records, _batches) in fleet.items():
            storage.register_terminal(terminal_id, key.public_key_bytes.hex())
    finally:
        storage.close()
    key_path = root / f"host-{workers}.key"
    HostKey.load_or_create(key_path)
    host = HostProcess(root, db, key_path, workers, HostLimits().max_uploads)
    try:
        pids = [host.process.pid, *host.children()]
        serving = host.serving_pids()
        before = tree_cpu_s(pids)
        on_postgres = isinstance(storage, PostgresStorage)
        database_before = postgres_cpu_s() if on_postgres else {}
        start = threading.Barrier(len(fleet))
        spans: list[tuple[float, float, int]] = []
        errors: list[tuple[str, Exception]] = []

        def run(terminal_id: str, batches: list[protocol.UploadBatch]) -> None:
            try:
                spans.append(upload_terminal(host.url, terminal_id, batches, start))
            except Exception as exc:  # noqa: BLE001  (raised below, with the terminal's name)
                errors.append((terminal_id, exc))
                start.abort()

        threads = [
            threading.Thread(target=run, args=(t, b), name=t) for t, (_k, _r, b) in fleet.items()
        ]
        gc.collect()
        cpu = time.process_time()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=1800)
        client_cpu = time.process_time() - cpu
        if errors or any(thread.is_alive() for thread in threads):
            raise RuntimeError(f"concurrent ingest, {workers} worker(s): {errors[:3]}")
        now = [host.process.pid, *host.children()]
        if sorted(now) != sorted(pids):
            raise RuntimeError(f"a worker was restarted during the run (see {host.log.name})")
        after = tree_cpu_s(pids)
        database_after = postgres_cpu_s() if on_postgres else {}
    finally:
        host.stop()
    storage = open_storage(db)
    try:
        for terminal_id, (_key, records, _batches) in fleet.items():
            held = storage.record_keys(terminal_id)
            if held != [(r.seq, r.hash) for r in records]:
                raise RuntimeError(f"{terminal_id}: holds {len(held)} of {len(records)} records")
        total = sum(len(records) for _k, records, _b in fleet.values())
        if storage.count_records() != total:
            raise RuntimeError(f"{storage.count_records()} records held, {total} sent")
    finally:
        storage.close()
    return Concurrent(
        workers=workers,
        terminals=len(fleet),
        wall_s=max(end for _s, end, _r in spans) - min(first for first, _e, _r in spans),
        host_cpu_s=cpu_spent(before, after),
        worker_cpu_s=[after[pid] - before[pid] for pid in serving],
        client_cpu_s=client_cpu,
        database_cpu_s=cpu_spent(database_before, database_after) if database_after else None,
        retries=sum(r for _s, _e, r in spans),
    )


def make_fleet(
    count: int, terminals: int, batch_size: int
) -> dict[str, tuple[DeviceKey, list[Record], list[protocol.UploadBatch]]]:
    """``count`` records split over ``terminals`` terminals (the first ones take the
    remainder), each with its own device key, signed batches of ``batch_size``."""
    fleet: dict[str, tuple[DeviceKey, list[Record], list[protocol.UploadBatch]]] = {}
    for index in range(terminals):
        terminal_id = f"BENCH-K{index + 1:03d}"
        key = DeviceKey.generate()
        share = count // terminals + (1 if index < count % terminals else 0)
        records = make_records(key, share, terminal_id)
        batches = [
            protocol.encode_batch(terminal_id, records[i : i + batch_size], sign=key.sign)
            for i in range(0, share, batch_size)
        ]
        fleet[terminal_id] = (key, records, batches)
    return fleet


def bare_costs(key: DeviceKey, records: list[Record], batches: int) -> dict[str, float]:
    """The library calls the two designs are made of, on the same records."""
    verify = signature_verifier(key.public_key_bytes)
    pairs = [(bytes.fromhex(r.signature), bytes.fromhex(r.hash)) for r in records]
    out: dict[str, float] = {}
    with timed() as t:
        for signature, digest in pairs:
            verify(signature, digest)
    out["verify_each"] = t[0].wall_s
    with timed() as t:
        for signature, digest in pairs[:batches]:
            verify(signature, digest)
    out["verify_batches"] = t[0].wall_s
    canonical = [r.canonical_bytes() for r in records]
    with timed() as t:
        for data in canonical:
            hashlib.sha256(data).hexdigest()
    out["sha256_chain"] = t[0].wall_s
    lines = [record_to_json(r) for r in records]
    encoder = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    with timed() as t:
        for line in lines:
            value = json.loads(line)
            del value["hash"], value["signature"]
            encoder.encode(value).encode("utf-8")
    out["json"] = t[0].wall_s
    return out


def daemon_upload(root: Path, count: int, batch_size: int) -> dict[str, float]:
    """A real store of ``count`` records uploaded by the sync daemon to the host (SQLite)."""
    data_dir = root / "bus"
    DataDir(data_dir).provision(TERMINAL)
    store = DataDir(data_dir).open_store()
    for n in range(count):
        store.append_record(
            RecordBody(
                "purchase",
                f"0310517007{n:010d}",
                200,
                {"product": "cpu", "counter": n % 65536, "ttc": n, "tac": "0A0B0C0D"},
            )
        )
    store.close()
    key = HostKey.generate()
    host = ClearingHost(SqliteStorage(root / "daemon-host.db"), key, open_registration=True)
    with HostServer(create_app(host), log_level="critical") as server:
        settings = SyncSettings(
            server.url, key.public_key_bytes, batch_size=batch_size, compact_after_s=None
        )
        daemon = open_daemon(data_dir, settings)
        with timed() as t:
            report = daemon.upload_pending()
        daemon.close()
    stored = host.storage.count_records()
    host.storage.close()
    if report.records != count or stored != count:
        raise RuntimeError(f"daemon: {report.records} sent, {stored} stored of {count}")
    return {"wall_s": t[0].wall_s, "cpu_s": t[0].cpu_s}


def kept_section(path: Path, heading: str = SECTION) -> list[str]:
    """The ``## Ingest`` section (or another ``heading``'s) of a results file as it stands
    (``[]`` when absent): what ``bench.bench_sync``, which rewrites the file, keeps."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").rstrip("\n").split("\n")
    start = next((i for i, line in enumerate(lines) if line.startswith(heading)), None)
    if start is None:
        return []
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    section = lines[start:end]
    while section and not section[-1]:
        section.pop()
    return [*section, ""]


def replace_section(path: Path, section: list[str]) -> str:
    """The file's text with its ``## Ingest`` section replaced by ``section`` (appended when
    absent); every other section is kept as it is."""
    section = list(section)
    while section and not section[-1]:
        section.pop()
    old = path.read_text(encoding="utf-8") if path.exists() else "# Sync benchmark\n"
    lines = old.rstrip("\n").split("\n")
    start = next((i for i, line in enumerate(lines) if line.startswith(SECTION)), None)
    if start is None:
        kept = [*lines, ""]
        return "\n".join([*kept, *section]).rstrip("\n") + "\n"
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    tail = lines[end:]
    return "\n".join([*lines[:start], *section, *(["", *tail] if tail else [])]).rstrip("\n") + "\n"


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--no-v1", action="store_true", help="skip the v1 (per-record) ingest")
    parser.add_argument("--no-daemon", action="store_true", help="skip the daemon end to end")
    parser.add_argument(
        "--terminals",
        type=int,
        default=10,
        help="the concurrent rows: the same records split over this many terminals uploading "
        "at once into `cardhost host --workers 1` and `--workers 2` (0: skip those rows)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    section = measure(args)
    args.output.write_text(replace_section(args.output, section), encoding="utf-8")
    print("\n".join(section))
    return 0


def measure(args: argparse.Namespace) -> list[str]:
    """Run the ingest bench (``args`` as :func:`parser` reads them) and return its
    ``## Ingest`` section; ``bench.bench_sync --all`` calls this within its own run."""
    undo = quiet()
    try:
        return _run(args)
    finally:
        undo()


def _run(args: argparse.Namespace) -> list[str]:
    n, size = args.records, args.batch_size
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    probes = [speed_probe()]
    key = DeviceKey.generate()
    started = time.perf_counter()
    records = make_records(key, n)
    batches = [
        protocol.encode_batch(TERMINAL, records[i : i + size], sign=key.sign)
        for i in range(0, n, size)
    ]
    compressed = sum(len(b.body) for b in batches)
    raw = sum(b.raw_size for b in batches)
    fleet = make_fleet(n, args.terminals, size) if args.terminals > 0 else {}
    prepare_s = time.perf_counter() - started
    backends = [b for b in args.backends.split(",") if b]
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(dir=base) as name:
        root = Path(name)
        for backend in backends:
            if backend == "sqlite":
                results[backend] = host_ingest(
                    lambda mode: SqliteStorage(root / f"{mode}.db"),
                    key,
                    batches,
                    n,
                    v1=not args.no_v1,
                )
                results[backend]["solo"] = concurrent_ingest(
                    root, str(root / "solo.db"), {TERMINAL: (key, records, batches)}, 1
                )
                for workers in (1, 2) if fleet else ():
                    results[backend][f"workers{workers}"] = concurrent_ingest(
                        root, str(root / f"fleet-{workers}.db"), fleet, workers
                    )
            elif backend == "postgresql":
                pg = PgServer().start()

                def open_pg(_mode: str, server: PgServer = pg) -> Storage:
                    return PostgresStorage(server.new_database())

                try:
                    results[backend] = host_ingest(
                        open_pg,
                        key,
                        batches,
                        n,
                        v1=not args.no_v1,
                    )
                    results[backend]["solo"] = concurrent_ingest(
                        root, pg.new_database(), {TERMINAL: (key, records, batches)}, 1
                    )
                    for workers in (1, 2) if fleet else ():
                        results[backend][f"workers{workers}"] = concurrent_ingest(
                            root, pg.new_database(), fleet, workers
                        )
                finally:
                    pg.stop()
            else:
                raise SystemExit(f"unknown backend {backend!r}")
        bare = bare_costs(key, records, len(batches))
        daemon = None if args.no_daemon else daemon_upload(root, n, size)
    probes.append(speed_probe())
    return report(
        args,
        results,
        bare,
        daemon,
        compressed,
        raw,
        prepare_s,
        len(batches),
        (probes[0], probes[1]),
    )


def report(
    args: argparse.Namespace,
    results: dict[str, dict[str, Any]],
    bare: dict[str, float],
    daemon: dict[str, float] | None,
    compressed: int,
    raw: int,
    prepare_s: float,
    batch_count: int,
    probes: tuple[float, float],
) -> list[str]:
    n = args.records
    lines = [
        f"{SECTION}: {n:,} records uploaded, verified and committed at the host "
        f"(`python -m bench.bench_ingest`)",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, load average at the end "
        f"{' / '.join(f'{x:.1f}' for x in os.getloadavg())} (a machine shared with other jobs: "
        "read the ratios, measured side by side in this one run; the speed probe of "
        f"`bench.machine`, a fixed pure-Python loop, took {probes[0]:.3f} s at the start and "
        f"{probes[1]:.3f} s at the end: another run's figures compare divided by its probe). "
        "One terminal's "
        f"{n:,} records in {batch_count} batches of {args.batch_size}: {compressed / 2**20:.1f} "
        f"MB gzip for {raw / 2**20:.1f} MB of JSON Lines. SQLite on "
        f"{'tmpfs' if os.path.isdir('/dev/shm') else 'disk'} (WAL, synchronous=FULL); "
        "PostgreSQL a throw-away local cluster (fsync off): the protocol and the host's work, "
        "not the disk.",
        "",
        "| host ingest | backend | wall s | records/s | process CPU s | **ratio** / bare loop "
        "| **ratio** v1 / signed |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for backend, figures in results.items():
        bare_s = figures["bare"].wall_s
        signed = figures["signed"]
        v1 = figures.get("v1")
        ratio = f"**{v1.wall_s / signed.wall_s:.1f}x**" if v1 else "—"
        lines.append(
            f"| signed batches (1 batch signature + hash chain; executemany/COPY) | {backend} | "
            f"**{signed.wall_s:.2f}** | {n / signed.wall_s:,.0f} | {signed.cpu_s:.2f} | "
            f"**{signed.wall_s / bare_s:.1f}x** | {ratio} |"
        )
        direct = figures.get("direct")
        if direct:
            lines.append(
                f"| the host's work alone: `ClearingHost.upload` called in process, no HTTP "
                f"| {backend} | {direct.wall_s:.2f} | {n / direct.wall_s:,.0f} | "
                f"{direct.cpu_s:.2f} | {direct.wall_s / bare_s:.1f}x | |"
            )
        if v1:
            lines.append(
                f"| v1: every record's Ed25519 signature verified | {backend} | {v1.wall_s:.2f} "
                f"| {n / v1.wall_s:,.0f} | {v1.cpu_s:.2f} | {v1.wall_s / bare_s:.1f}x | |"
            )
        lines.append(
            f"| bare httpx POST loop, same bodies, sink endpoint | {backend} | {bare_s:.2f} | "
            f"{n / bare_s:,.0f} | {figures['bare'].cpu_s:.2f} | 1.0x | |"
        )
    concurrent = [
        (backend, figures[name])
        for backend, figures in results.items()
        for name in ("solo", "workers1", "workers2")
        if name in figures
    ]
    if concurrent:
        terminals = max(run.terminals for _backend, run in concurrent)
        lines += [
            "",
            f"The same {n:,} records sent by the one terminal, and split over {terminals} "
            "terminals (each its own device key, "
            "pre-registered), each sending its signed batches one at a time, all at once (one "
            "client thread each, through `http.client`: a terminal's CPU is not the host's, and "
            "httpx spends about ten times its CPU a POST), into a real `cardhost host --workers "
            "W` process on 127.0.0.1 "
            "(one SQLite file in WAL, or one PostgreSQL database). Wall time from the first POST "
            "to the last acknowledged batch; host CPU: the supervisor and its workers (utime + "
            "stime from /proc) over the uploads, and each serving process's share (a worker "
            "answering an upload while it verifies others closes that connection, so the "
            "terminal's next batch goes to the less busy worker: `HostLimits."
            "close_busy_connections`); client CPU: the bench process's threads, on the same "
            "2 cores; database server CPU: the PostgreSQL server's processes (— for SQLite, "
            "which runs inside the workers). "
            "Afterwards every terminal's stored (seq, hash) list equals what it sent and the "
            "record count is the total: every record stored exactly once.",
            "",
            "| K terminals at once | backend | workers | wall s | records/s | host CPU s | "
            "host CPU s per worker | client CPU s | database server CPU s | batches sent again "
            "(busy, reconnected) | **ratio** / one terminal, one process | **ratio** / bare loop "
            "| **ratio** wall workers 2 / workers 1 |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for backend, run in concurrent:
            figures = results[backend]
            one = figures.get("workers1")
            ratio = f"**{run.wall_s / one.wall_s:.2f}x**" if run.workers == 2 and one else "—"
            who = "1 terminal" if run.terminals == 1 else f"{run.terminals} terminals"
            lines.append(
                f"| {who} | {backend} | {run.workers} | **{run.wall_s:.2f}** "
                f"| {n / run.wall_s:,.0f} | {run.host_cpu_s:.2f} | "
                f"{' / '.join(f'{c:.2f}' for c in run.worker_cpu_s)} | {run.client_cpu_s:.2f} | "
                f"{'—' if run.database_cpu_s is None else f'{run.database_cpu_s:.2f}'} | "
                f"{run.retries} | {run.wall_s / figures['signed'].wall_s:.2f}x | "
                f"{run.wall_s / figures['bare'].wall_s:.1f}x | {ratio} |"
            )
    lines += [
        "",
        "| bare library cost, same records | seconds | per record (µs) |",
        "|---|---:|---:|",
        f"| Ed25519 verify x {n:,} (one per record: v1) | {bare['verify_each']:.2f} | "
        f"{bare['verify_each'] / n * 1e6:.1f} |",
        f"| Ed25519 verify x {batch_count} (one per batch: signed) | {bare['verify_batches']:.3f} "
        f"| {bare['verify_batches'] / n * 1e6:.2f} |",
        f"| **ratio** per-record / per-batch verification | "
        f"**{bare['verify_each'] / bare['verify_batches']:.0f}x** | |",
        f"| SHA-256 of {n:,} canonical encodings (the chain) | {bare['sha256_chain']:.3f} | "
        f"{bare['sha256_chain'] / n * 1e6:.2f} |",
        f"| `json` decode + canonical re-encode of {n:,} lines | {bare['json']:.2f} | "
        f"{bare['json'] / n * 1e6:.1f} |",
    ]
    audit = [(b, f["audit"]) for b, f in results.items() if "audit" in f]
    for backend, spent in audit:
        lines.append(
            f"| `cardhost audit` of the {n:,} stored records ({backend}: parse, hash, chain, "
            f"each record's own signature, batch signatures) | {spent.wall_s:.2f} | "
            f"{spent.wall_s / n * 1e6:.1f} |"
        )
    if daemon is not None:
        lines.append(
            f"| end to end: `cardsync` `upload_pending` of a real store to the host (SQLite; "
            f"the daemon re-verifies each stored record before sending) | {daemon['wall_s']:.2f} "
            f"| {daemon['wall_s'] / n * 1e6:.1f} |"
        )
    lines += [
        "",
        "Design (issue 14): the terminal signs each batch's head (terminal, first and last "
        "seq, count, the last record's hash, the SHA-256 of the whole body) with its device "
        "key, header `Cardsync-Batch-Signature`. The host verifies that one signature, then "
        "each record's hash (the SHA-256 of its canonical encoding) and every link of the chain "
        "onto what it holds, and stores the batch with one statement. Each record keeps its own "
        "signature, stored verbatim, and `cardhost audit` re-verifies it later (the audit row "
        "above is where the per-record verification went, off the upload path). A daemon's "
        "line is its record's canonical encoding plus `hash` and `signature`: the host matches "
        "it against that layout, parses only its `fields` (re-encoded and compared, so the "
        "line is proven canonical) and hashes the line without those two members "
        "(`sync.protocol`); any other line takes the full parser. The `json` row is what a "
        "full decode and re-encode of each line would cost. The rest of the signed ingest: "
        "gzip and the body's SHA-256, the insert, HTTP; the Ed25519 cost per record fell from "
        "the first bare row to the second. The daemon row includes the terminal's own check of "
        "its store (hash and signature of every record, issue 9), which a terminal pays once "
        "per record, spread over its uploads. Preparing the signed records and batches took "
        f"{prepare_s:.1f} s (not measured above).",
        "",
    ]
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
