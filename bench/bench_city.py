"""City bench: N terminals upload their backlog at once into a real host (issue 14).

``python -m bench.bench_city [--terminals 1000] [--records 50] [--backends sqlite,postgresql]
[--workers 1,2] [--load-s 60] [--city-daemons 40000]`` measures, for each backend and worker
count, against a real ``cardhost host`` process (``--workers N``: a supervisor and N workers on
one socket) on 127.0.0.1:

* each terminal has its own Ed25519 device key and its own chain of signed purchase records
  (the fields a CPU purchase record carries), created at times drawn from a transit day's
  hourly shape (:data:`HOURLY_SHARE`: morning and evening peaks), pre-registered by an operator
  and enrolled by the terminal's signed proof of possession, as a real terminal does;
* all N terminals then upload their whole backlog at once (the morning after an outage):
  asyncio + httpx speaking the sync protocol (:func:`sync.protocol.encode_batch`, batches
  signed by the device key as the daemon signs them, the signed acknowledgement checked by
  :func:`sync.protocol.parse_ack`), one connection per terminal, honouring ``Retry-After``
  with the daemon's own rule (:func:`sync.daemon.honour_retry_after`);
* then the city's steady load (``--load-s`` seconds): the same terminals run the daemon's four
  jobs (upload, heartbeat, blacklist and parameter pulls) on the intervals a city configures
  (docs/city-scale.md section 2), ``--city-daemons`` / N times as often, so they send the
  requests of that many daemons; figures: requests sent and answered per second, answers by
  status, latency per request kind, the CPU of the host, of the PostgreSQL server and of the
  simulated daemons over the phase;
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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from glob import glob
from math import ceil
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import httpx
import psycopg
import structlog

from agent.offline_store import DeviceKey, Record, RecordBody
from agent.offline_store.records import GENESIS_HASH, seal_record
from bench.machine import cpu_spent, postgres_cpu_s, tree_cpu_s
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
    """Every terminal's key and signed records (made once, uploaded to each host): each chain's
    first ``backlog`` records are the storm's, the rest the live ones of the city load."""

    keys: dict[str, DeviceKey]
    records: dict[str, list[Record]]
    make_s: float
    backlog: int

    @property
    def count(self) -> int:
        """The storm's records, all terminals."""
        return self.backlog * len(self.records)


def make_fleet(
    root: Path, terminals: int, per_terminal: int, live: int = 0, seed: int = 14
) -> Fleet:
    """``terminals`` terminals, each with ``per_terminal`` backlog records and ``live`` more
    (the same chain, the next day)."""
    rng = random.Random(seed)
    keys: dict[str, DeviceKey] = {}
    records: dict[str, list[Record]] = {}
    started = time.perf_counter()
    hours = list(range(24))
    for n in range(terminals):
        terminal_id = f"BUS-{n:05d}"
        key = DeviceKey.create(root / f"{terminal_id}.key")
        times = sorted(
            (4, rng.choices(hours, HOURLY_SHARE)[0], rng.randrange(60), rng.randrange(60))
            for _ in range(per_terminal)
        )
        # the live records: one every 20 s from the next day's evening peak (17:00) on
        for k in range(live):
            at = 17 * 3600 + 20 * k
            times.append((5 + at // 86400, at // 3600 % 24, at // 60 % 60, at % 60))
        chain: list[Record] = []
        prev = GENESIS_HASH
        for seq, (day, h, m, s) in enumerate(times, start=1):
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
                "datetime": f"202605{day:02d}{h:02d}{m:02d}{s:02d}",
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
                created_at=f"2026-05-{day:02d}T{h:02d}:{m:02d}:{s:02d}.000Z",
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
    return Fleet(keys, records, time.perf_counter() - started, per_terminal)


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
                    # signed by the device key, as the daemon signs its batches
                    batch = protocol.encode_batch(
                        terminal_id, records[ack : ack + BATCH], sign=fleet.keys[terminal_id].sign
                    )
                asked: float | None = None
                try:
                    answer = await client.post(
                        protocol.records_path(terminal_id),
                        content=batch.body,
                        headers=batch.headers(),
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

    tasks = [asyncio.create_task(terminal(t, r[: fleet.backlog])) for t, r in fleet.records.items()]
    await asyncio.sleep(0.5)  # every client built and waiting
    started = time.perf_counter()
    start.set()
    await asyncio.gather(*tasks)
    return time.perf_counter() - started


# --- the city's steady load --------------------------------------------------------------------

# The intervals docs/city-scale.md section 2 has a city configure its daemons with, in seconds,
# and the records one upload carries at the design peak (500 records a terminal a day, 12 % of
# them in the peak hour, an upload every 300 s: 5).
CITY_INTERVALS_S = {"upload": 300.0, "heartbeat": 300.0, "blacklist": 600.0, "params": 300.0}
LIVE_RECORDS_PER_UPLOAD = 5
CITY_BLACKLIST_ENTRIES = 1000  # published before the load: every pull is since its version
REQUEST_KINDS = tuple(CITY_INTERVALS_S)


@dataclass
class LoadTally:
    """What the simulated daemons saw, per request kind."""

    sent: Counter[str] = field(default_factory=Counter)
    statuses: dict[str, Counter[int]] = field(
        default_factory=lambda: {kind: Counter() for kind in REQUEST_KINDS}
    )
    latencies_s: dict[str, list[float]] = field(
        default_factory=lambda: {kind: [] for kind in REQUEST_KINDS}
    )
    transport_errors: int = 0
    bad_answers: int = 0
    late_starts: int = 0  # requests sent more than 1 s after they were due (the client lagged)
    acked: dict[str, int] = field(default_factory=dict)
    cpu_s: float = 0.0  # this process's CPU over the phase (the simulated daemons)

    @property
    def answered(self) -> int:
        return sum(sum(c.values()) for c in self.statuses.values())


def live_records_per_terminal(seconds: float, speedup: float) -> int:
    """Records one terminal may upload in ``seconds`` at ``speedup`` times the city intervals."""
    uploads = ceil(seconds * speedup / CITY_INTERVALS_S["upload"]) + 1
    return uploads * LIVE_RECORDS_PER_UPLOAD


def publish_city_lists(db: str) -> tuple[int, int]:
    """A blacklist and a parameter set in the host's storage, as an operator publishes them;
    their versions (the daemons are up to date: each pull is answered with a re-issue)."""
    storage = open_storage(db)
    try:
        rng = random.Random(5)
        blacklist = storage.publish_blacklist(
            sorted({rng.getrandbits(64) for _ in range(CITY_BLACKLIST_ENTRIES)}), []
        )
        return blacklist, storage.publish_params({"fare_table": {"flat_fare": 200}})
    finally:
        storage.close()


class Answer(NamedTuple):
    status: int
    body: bytes


class LoopbackHttp:
    """One terminal's keep-alive HTTP/1.1 connection to the bench's host, its requests one at a
    time. Written for the city load: a simulated daemon's CPU is not the host's, and httpx
    spends about ten times as much a request (:func:`bench.bench_ingest.upload_terminal` uses
    ``http.client`` for the same reason). The host answers with a Content-Length (Starlette);
    a connection it closes (``Connection: close``, an idle keep-alive) is opened again for the
    next request. Errors are ``OSError`` (a transport error) or ``ValueError`` (an answer
    this does not read)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._lock = asyncio.Lock()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(
        self, method: str, target: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> Answer:
        head = [f"{method} {target} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        head += [f"{name}: {value}" for name, value in (headers or {}).items()]
        if body or method == "POST":
            head.append(f"Content-Length: {len(body)}")
        data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
        async with self._lock:
            try:
                return await self._exchange(data)
            except (OSError, ValueError, asyncio.IncompleteReadError):
                self.close()
                raise

    async def _exchange(self, data: bytes) -> Answer:
        if self._writer is None or self._reader is None:
            self._reader, self._writer = await asyncio.open_connection(
                self.host, self.port, limit=1 << 20
            )
        self._writer.write(data)
        await self._writer.drain()
        status_line = await self._reader.readuntil(b"\r\n")
        length, close = 0, False
        while (line := await self._reader.readuntil(b"\r\n")) != b"\r\n":
            name, _, value = line.decode("latin-1").partition(":")
            name, value = name.strip().lower(), value.strip()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and value.lower() == "close":
                close = True
        answer = Answer(int(status_line.split()[1]), await self._reader.readexactly(length))
        if close:
            self.close()
        return answer

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


async def city_load(
    url: str,
    fleet: Fleet,
    host_key: bytes,
    versions: tuple[int, int],
    seconds: float,
    speedup: float,
    tally: LoadTally,
    seed: int,
) -> float:
    """Every terminal runs the daemon's four jobs on the city intervals divided by
    ``speedup`` (so N terminals send the requests of N × speedup daemons) for ``seconds``,
    each job at its own random phase: an upload of the records made since the last one (signed
    batches of :data:`LIVE_RECORDS_PER_UPLOAD`), a heartbeat with the daemon's figures, a
    blacklist and a parameter pull since the versions it holds. Returns the phase's length."""
    blacklist_version, params_version = versions
    rng = random.Random(seed)
    start = asyncio.Event()
    began = 0.0
    address = urlsplit(url)

    async def job(kind: str, send: Callable[[], Awaitable[int | None]], phase: float) -> None:
        period = CITY_INTERVALS_S[kind] / speedup
        due = began + phase * period
        while due < began + seconds:
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -1.0:
                tally.late_starts += 1
            due += period
            sent = time.perf_counter()
            try:
                status = await send()
            except (OSError, ValueError, asyncio.IncompleteReadError):
                tally.sent[kind] += 1
                tally.transport_errors += 1
                continue
            if status is None:  # nothing to send this time
                continue
            tally.sent[kind] += 1
            tally.latencies_s[kind].append(time.perf_counter() - sent)
            tally.statuses[kind][status] += 1

    async def terminal(terminal_id: str, records: list[Record]) -> None:
        key = fleet.keys[terminal_id]
        ack = fleet.backlog
        tally.acked[terminal_id] = ack
        http = LoopbackHttp(address.hostname or "127.0.0.1", address.port or 80)
        pull_headers = {protocol.TERMINAL_HEADER: terminal_id, "Accept-Encoding": "gzip"}

        async def upload() -> int | None:
            nonlocal ack
            batch_records = records[ack : ack + LIVE_RECORDS_PER_UPLOAD]
            if not batch_records:
                return None  # nothing made since the last upload: the daemon sends nothing
            batch = protocol.encode_batch(terminal_id, batch_records, sign=key.sign)
            answer = await http.request(
                "POST", protocol.records_path(terminal_id), batch.body, batch.headers()
            )
            if answer.status == 200:
                try:
                    signed = json.loads(answer.body)
                    ack = protocol.parse_ack(signed, batch, len(records), host_key).ack_seq
                except (ProtocolError, ValueError):
                    tally.bad_answers += 1
                tally.acked[terminal_id] = ack
            return answer.status

        async def heartbeat() -> int:
            figures = {
                "terminal_id": terminal_id,
                "last_seq": len(records),
                "acknowledged_seq": ack,
                "unsent_records": len(records) - ack,
                "quarantined_records": 0,
                "oldest_unsent_age_s": None,
                "store_bytes": 1_048_576,
                "params_version": params_version,
                "root_version": 0,
                "uptime_s": round(time.perf_counter() - began, 1),
                "clock_offset_s": 0.01,
                "errors": {},
                "blacklist_version": blacklist_version,
                "blacklist_count": CITY_BLACKLIST_ENTRIES,
                "blacklist_expired": False,
            }
            answer = await http.request(
                "POST",
                protocol.heartbeat_path(terminal_id),
                json.dumps(figures).encode(),
                {"Content-Type": "application/json"},
            )
            return answer.status

        async def pull(path: str, since: int) -> int:
            answer = await http.request("GET", f"{path}?since={since}", headers=pull_headers)
            if answer.status == 200 and not answer.body:
                tally.bad_answers += 1
            return answer.status

        async def blacklist() -> int:
            return await pull(protocol.BLACKLIST_PATH, blacklist_version)

        async def params() -> int:
            return await pull(protocol.PARAMS_PATH, params_version)

        sends = {"upload": upload, "heartbeat": heartbeat, "blacklist": blacklist, "params": params}
        phases = {kind: rng.random() for kind in REQUEST_KINDS}
        await start.wait()
        try:
            await asyncio.gather(*(job(k, sends[k], phases[k]) for k in REQUEST_KINDS))
        finally:
            http.close()

    tasks = [asyncio.create_task(terminal(t, r)) for t, r in fleet.records.items()]
    await asyncio.sleep(0.5)  # every terminal waiting
    began, cpu = time.perf_counter(), time.process_time()
    start.set()
    await asyncio.gather(*tasks)
    tally.cpu_s = time.process_time() - cpu
    return time.perf_counter() - began


@dataclass
class Load:
    """The city load phase of one run."""

    seconds: float
    speedup: float
    tally: LoadTally
    host_cpu_s: float
    database_cpu_s: float | None
    client_cpu_s: float


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
    city: Load | None = None  # the city load phase after the storm (``--load-s``)


def check_storage(db: str, fleet: Fleet, sent: dict[str, int]) -> list[str]:
    """Exactly once: each terminal's stored (seq, hash) list is its first ``sent`` records'."""
    storage = open_storage(db)
    problems = []
    try:
        for terminal_id, records in fleet.records.items():
            held = storage.record_keys(terminal_id)
            expected = records[: sent.get(terminal_id, 0)]
            if held != [(r.seq, r.hash) for r in expected]:
                problems.append(f"{terminal_id}: holds {len(held)} of {len(expected)}")
        total = storage.count_records()
        if total != sum(sent.values()):
            problems.append(f"{total} records held, {sum(sent.values())} acknowledged")
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


def run_one(
    root: Path,
    fleet: Fleet,
    backend: str,
    db: str,
    workers: int,
    args: argparse.Namespace,
) -> Run:
    key_path = root / f"host-{backend}-{workers}.key"
    host_key = HostKey.load_or_create(key_path)
    host = HostProcess(root, db, key_path, workers, args.max_uploads)
    tally = Tally()
    load: Load | None = None
    try:
        asyncio.run(enrol_all(host.url, fleet))
        base = database_bytes(backend, db)
        rss_before = host.memory_mb("VmRSS")
        load_before = os.getloadavg()[0]
        drain_s = asyncio.run(storm(host.url, fleet, host_key.public_key_bytes, tally, seed=7))
        load_after = os.getloadavg()[0]
        peak = host.memory_mb("VmHWM")
        stored = stored_bytes(backend, db, base, fleet.count)
        acked = dict(tally.acked)
        if args.load_s > 0:
            load = measure_city_load(host, fleet, host_key.public_key_bytes, backend, db, args)
            acked = dict(load.tally.acked)
    finally:
        host.stop()
    problems = check_storage(db, fleet, acked)
    if not all(tally.acked.get(t) == fleet.backlog for t in fleet.records):
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
        bytes_per_record=stored,
        load=(load_before, load_after),
        city=load,
    )


def measure_city_load(
    host: HostProcess,
    fleet: Fleet,
    host_key: bytes,
    backend: str,
    db: str,
    args: argparse.Namespace,
) -> Load:
    """The city load phase against ``host``, with the CPU of the host's processes, of the
    PostgreSQL server (its processes) and of this process (the simulated daemons) over it."""
    versions = publish_city_lists(db)
    speedup = args.city_daemons / len(fleet.records)
    tally = LoadTally()
    pids = [host.process.pid, *host.children()]
    on_postgres = backend != "sqlite"
    before, database_before = tree_cpu_s(pids), postgres_cpu_s() if on_postgres else {}
    seconds = asyncio.run(
        city_load(host.url, fleet, host_key, versions, args.load_s, speedup, tally, seed=9)
    )
    after, database_after = tree_cpu_s(pids), postgres_cpu_s() if on_postgres else {}
    return Load(
        seconds=seconds,
        speedup=speedup,
        tally=tally,
        host_cpu_s=cpu_spent(before, after),
        database_cpu_s=cpu_spent(database_before, database_after) if on_postgres else None,
        client_cpu_s=tally.cpu_s,
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
    cities = [run for run in runs if run.city is not None]
    if cities:
        lines += city_load_report(cities, args)
    return "\n".join(lines)


def _percentile_ms(values: list[float], share: float) -> str:
    if not values:
        return "—"
    ordered = sorted(values)
    return f"{1000 * ordered[min(len(ordered) - 1, int(share * len(ordered)))]:.1f}"


def city_load_report(runs: list[Run], args: argparse.Namespace) -> list[str]:
    first = runs[0].city
    assert first is not None
    per_daemon = sum(1 / s for s in CITY_INTERVALS_S.values())
    intervals = ", ".join(f"{kind} {s:g} s" for kind, s in CITY_INTERVALS_S.items())
    lines = [
        "## The city's steady load",
        "",
        f"Right after each storm, the same {runs[0].terminals:,} terminals run the daemon's "
        f"four jobs for {args.load_s:g} s on the intervals `docs/city-scale.md` section 2 has a "
        f"city configure ({intervals}), each {first.speedup:g}× as often: the requests of "
        f"**{args.city_daemons:,} daemons**, {args.city_daemons * per_daemon:,.0f} a second "
        "offered. Each job starts at its own random phase. An upload carries the "
        f"{LIVE_RECORDS_PER_UPLOAD} records made since the last one (the design peak: 500 "
        "records a terminal a day, 12 % in the peak hour), in a batch signed by the device key; "
        "a heartbeat carries the daemon's figures; the blacklist "
        f"({CITY_BLACKLIST_ENTRIES:,} entries) and parameter pulls ask since the versions the "
        "terminal holds (the steady state: a signed re-issue, gzip accepted). The simulated "
        "daemons (asyncio, one keep-alive connection each, a minimal HTTP/1.1 client: httpx "
        "would spend more CPU than the host) run in the bench process on the same "
        "2 cores as the host and the database. CPU is utime + stime from /proc over the phase: "
        "the host's processes (supervisor and workers), the PostgreSQL server's, the bench "
        "process's.",
        "",
        "| backend | workers | sent req/s | answered req/s | 200 | other answers | "
        "transport errors | **host CPU, cores** | **host CPU per request (ms)** | database "
        "server CPU, cores | simulated daemons' CPU, cores | requests sent > 1 s late |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        city = run.city
        assert city is not None
        t = city.tally
        answered = t.answered
        ok = sum(c.get(200, 0) for c in t.statuses.values())
        other = {
            f"{kind} {status}": n
            for kind, c in t.statuses.items()
            for status, n in c.items()
            if status != 200
        }
        database = (
            "—" if city.database_cpu_s is None else f"{city.database_cpu_s / city.seconds:.2f}"
        )
        lines.append(
            f"| {run.backend} | {run.workers} | {sum(t.sent.values()) / city.seconds:,.0f} | "
            f"{answered / city.seconds:,.0f} | {ok:,} | "
            f"{', '.join(f'{k}: {n}' for k, n in other.items()) or '0'} | "
            f"{t.transport_errors} | **{city.host_cpu_s / city.seconds:.2f}** | "
            f"**{1000 * city.host_cpu_s / max(1, answered):.2f}** | {database} | "
            f"{city.client_cpu_s / city.seconds:.2f} | {t.late_starts} |"
        )
    lines += [
        "",
        "Latency as the simulated daemon saw it (from sending the request to the whole answer):",
        "",
        "| backend | workers | request | answered | p50 (ms) | p99 (ms) | max (ms) |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for run in runs:
        assert run.city is not None
        for kind in REQUEST_KINDS:
            taken = run.city.tally.latencies_s[kind]
            lines.append(
                f"| {run.backend} | {run.workers} | {kind} | {len(taken):,} | "
                f"{_percentile_ms(taken, 0.5)} | {_percentile_ms(taken, 0.99)} | "
                f"{_percentile_ms(taken, 1.0)} |"
            )
    lines.append("")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_city", description=__doc__)
    parser.add_argument("--terminals", type=int, default=1000)
    parser.add_argument("--records", type=int, default=50, help="per terminal")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--workers", default="1,2", help="worker counts (PostgreSQL)")
    parser.add_argument("--max-uploads", type=int, default=8)
    parser.add_argument("--pg-dsn", help="a fresh database instead of a throw-away cluster")
    parser.add_argument(
        "--load-s", type=float, default=60.0, help="the city load phase's length (0: none)"
    )
    parser.add_argument(
        "--city-daemons",
        type=int,
        default=40_000,
        help="the daemons whose requests the terminals send in the city load phase",
    )
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
        live = (
            live_records_per_terminal(args.load_s, args.city_daemons / args.terminals)
            if args.load_s > 0
            else 0
        )
        fleet = make_fleet(root / "keys", args.terminals, args.records, live)
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
                    runs.append(run_one(root, fleet, backend, db, workers, args))
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
