"""Memory benchmark: peak RSS of the clearing host under hostile clients, and of the sync daemon
under a hostile host.

``python -m bench.bench_memory [--scale 1.0] [--output bench/RESULTS-memory.md]``

* host: the real host (uvicorn, SQLite) runs in a child process; before each attack its peak RSS
  is reset (``/proc/PID/clear_refs``) and after it read (``VmHWM`` in ``/proc/PID/status``).
  Attacks: a gzip of 200,000 short record lines; a 300 MiB chunked upload without
  ``Content-Length``; six concurrent gzip bombs (96 MiB inflated each); a deeply nested JSON
  body (8 MiB of ``[``) to an admin route; 300 connections stalled mid-body, held open. After
  each the host must still answer ``/healthz``.
* daemon: the real sync daemon's calls (``SyncDaemon.pull_blacklist``, ``pull_params``,
  ``send_heartbeat``) run in a child process against a stand-in host in this one that answers
  with a gzip bomb (1 GiB of zeros), a huge body (1 GiB, with and without ``Content-Length``) or
  an endless stream; the child reports its own peak RSS over the call.
* daemon, genuine lists: the same child applies a genuine signed snapshot of 10 M cards (80 MB
  on the wire), then a 100,000-card delta onto it; the figure is the growth of its peak RSS
  over the call (budget 64 MB: the list streams to disk, it is never held).

Budgets: host below 200 MB, daemon below 100 MB (peak resident set, whole process), a genuine
list's apply below 64 MB of growth. ``--scale``
shrinks every attack (the smoke test runs at 0.01). The report goes to the output file and to
stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from array import array
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import structlog

from agent import blacklist as bl
from agent.blacklist import KIND_DELTA, KIND_SNAPSHOT, ApplyResult, encode_list
from agent.offline_store import DeviceKey, RecordBody
from agent.offline_store.records import GENESIS_HASH, record_to_json, seal_record
from agent.wiring import DataDir
from clearinghost.keys import HostKey
from clearinghost.operators import OPERATOR, Operators
from clearinghost.server import ClearingHost, HostLimits, HostServer, create_app
from clearinghost.storage import SqliteStorage
from sync import protocol
from sync.daemon import SyncSettings, open_daemon

RESULTS = Path(__file__).with_name("RESULTS-memory.md")
HOST_BUDGET_MB = 200
DAEMON_BUDGET_MB = 100
APPLY_BUDGET_MB = 64  # growth of the daemon's peak RSS while it applies a genuine list
TERMINAL = "BENCH-MEM"
TOKEN = "bench-memory-operator-token-0123456789"
MIB = 1 << 20


def quiet() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))


def status_kb(pid: int | str, field: str) -> int:
    """A ``kB`` figure of ``/proc/PID/status`` (``VmHWM``: peak RSS; ``VmRSS``: now)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def reset_peak(pid: int | str) -> None:
    """Reset the peak RSS (``VmHWM``) to the current RSS (Linux ``clear_refs`` 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


# --- the host, in a child process ------------------------------------------------------------


def serve_host(root: Path) -> None:
    """Child: run the real host until stdin closes; its port goes to ``root/port``."""

    quiet()
    limits = HostLimits(body_timeout_s=10, header_timeout_s=10)
    host = ClearingHost(
        SqliteStorage(root / "host.db"),
        HostKey.generate(),
        operators=Operators.with_token("bench", OPERATOR, TOKEN),
        limits=limits,
    )
    device = DeviceKey.load(root / "device.key")  # written by the parent
    host.storage.register_terminal(TERMINAL, device.public_key_bytes.hex())
    with HostServer(create_app(host), limits=limits, log_level="critical") as server:
        (root / "port.tmp").write_text(str(server.port))
        os.replace(root / "port.tmp", root / "port")
        sys.stdin.read()
    host.storage.close()


@dataclass
class HostChild:
    process: subprocess.Popen[bytes]
    url: str
    port: int
    root: Path

    @classmethod
    def start(cls, root: Path) -> HostChild:

        DeviceKey.create(root / "device.key")
        process = subprocess.Popen(
            [sys.executable, "-m", "bench.bench_memory", "--serve-host", str(root)],
            stdin=subprocess.PIPE,
        )
        deadline = time.monotonic() + 120
        while not (root / "port").exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the host child did not start")
            time.sleep(0.05)
        port = int((root / "port").read_text())
        return cls(process, f"http://127.0.0.1:{port}", port, root)

    def stop(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def gzip_stream(block: bytes, repeat: int) -> bytes:
    deflater = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts = [deflater.compress(block) for _ in range(repeat)]
    parts.append(deflater.flush())
    return b"".join(parts)


def record_line(root: Path) -> bytes:

    device = DeviceKey.load(root / "device.key")
    record = seal_record(
        seq=1,
        created_at="2024-01-01T00:00:00.000Z",
        terminal_id=TERMINAL,
        body=RecordBody("purchase", "03105170070100000009", 200, {"product": "test"}),
        prev_hash=GENESIS_HASH,
        sign=device.sign,
    )
    return (record_to_json(record) + "\n").encode()


def post_upload(url: str, body: Any, **headers: str) -> str:
    """POST an upload; the status, or how the host cut it off."""

    headers.setdefault(protocol.IDEMPOTENCY_HEADER, "1-1-" + "0" * 32)
    try:
        with httpx.Client(timeout=120) as client:
            answer = client.post(
                url + protocol.records_path(TERMINAL), content=body, headers=headers
            )
    except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError) as exc:
        return f"cut off ({type(exc).__name__})"
    return str(answer.status_code)


def attack_short_lines(host: HostChild, scale: float) -> str:
    lines = max(10, int(200_000 * scale))
    body = gzip_stream(record_line(host.root), lines)
    return post_upload(host.url, body, **{"Content-Encoding": "gzip"})


def attack_chunked(host: HostChild, scale: float) -> str:
    total = max(MIB, int(300 * MIB * scale))
    block = b"x" * (256 * 1024)

    def body() -> Iterator[bytes]:
        for _ in range(total // len(block)):
            yield block

    return post_upload(host.url, body(), **{"Content-Encoding": "identity"})


def attack_bombs(host: HostChild, scale: float) -> str:
    inflated = max(MIB, int(96 * MIB * scale))
    bomb = gzip_stream(b" " * 60_000 + b"\n", inflated // 60_001)
    with ThreadPoolExecutor(6) as pool:
        answers = list(
            pool.map(
                lambda _: post_upload(host.url, bomb, **{"Content-Encoding": "gzip"}), range(6)
            )
        )
    return ", ".join(sorted(set(answers)))


def attack_nested(host: HostChild, scale: float) -> str:
    body = b"[" * max(10_000, int((8 * MIB - 1) * scale))
    with httpx.Client(timeout=120) as client:
        answer = client.post(
            host.url + "/v1/admin/params",
            content=body,
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        )
    return f"{answer.status_code} {answer.json()['error']}"


def attack_stalled(host: HostChild, scale: float) -> str:
    count = max(5, int(300 * scale))
    stalled = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", host.port), timeout=120)
        sock.sendall(
            f"POST /v1/terminals/{TERMINAL}/heartbeat HTTP/1.1\r\nHost: x\r\n"
            "Content-Type: application/json\r\nContent-Length: 60000\r\n\r\n{".encode()
            + b" " * 30_000
        )
        stalled.append(sock)
    time.sleep(1)  # held open while the peak is read
    closed = 0
    for sock in stalled:  # then the host closes them (body timeout)
        try:
            while sock.recv(65536):
                pass
            closed += 1
        except OSError:
            closed += 1
        sock.close()
    return f"{count} held; {closed} closed by the host"


HOST_ATTACKS: list[tuple[str, Callable[[HostChild, float], str]]] = [
    ("gzip of 200,000 short record lines", attack_short_lines),
    ("300 MiB chunked upload, no Content-Length", attack_chunked),
    ("six concurrent gzip bombs, 96 MiB inflated each", attack_bombs),
    ("deeply nested JSON, 8 MiB of `[` (admin route)", attack_nested),
    ("300 connections stalled mid-body", attack_stalled),
]


def bench_host(root: Path, scale: float) -> tuple[int, list[dict[str, Any]]]:
    host = HostChild.start(root)
    pid = host.process.pid
    rows = []
    try:
        with httpx.Client(timeout=60) as client:
            assert client.get(host.url + "/healthz").status_code == 200
        idle_kb = status_kb(pid, "VmRSS")
        for name, attack in HOST_ATTACKS:
            reset_peak(pid)
            before = status_kb(pid, "VmRSS")
            outcome = attack(host, scale)
            with httpx.Client(timeout=60) as client:
                healthy = client.get(host.url + "/healthz").status_code == 200
            rows.append(
                {
                    "attack": name,
                    "outcome": outcome,
                    "before_mb": before / 1024,
                    "peak_mb": status_kb(pid, "VmHWM") / 1024,
                    "healthy": healthy,
                }
            )
            print(rows[-1], flush=True)
    finally:
        host.stop()
    return idle_kb, rows


# --- the daemon, in a child process, against a hostile stand-in host -------------------------


def daemon_call(data_dir: Path, url: str, key_hex: str, call: str) -> None:
    """Child: one daemon call against ``url``; prints its outcome and peak RSS as JSON."""

    quiet()
    settings = SyncSettings(url, bytes.fromhex(key_hex), retries=0, timeout_s=60)
    daemon = open_daemon(data_dir, settings)
    before = status_kb("self", "VmRSS")
    reset_peak("self")
    started = time.monotonic()
    try:
        result = getattr(daemon, call)()
        outcome = "accepted (!)"
        if isinstance(result, ApplyResult):
            outcome = f"applied: {result.kind} v{result.version}, {result.count:,} cards"
    except Exception as exc:  # noqa: BLE001 - the outcome is what is reported
        outcome = f"{type(exc).__name__}: {str(exc)[:110]}"
    peak = status_kb("self", "VmHWM")
    daemon.close()
    print(
        json.dumps(
            {
                "outcome": outcome,
                "before_mb": before / 1024,
                "peak_mb": peak / 1024,
                "seconds": time.monotonic() - started,
            }
        )
    )


def hostile_app(scale: float, documents: dict[str, bytes]) -> Callable[..., Any]:
    """The stand-in host: each path answers one way no real host should (and ``/genuine-NAME``
    with the genuine signed list ``documents[NAME]``)."""
    gib = max(4 * MIB, int((1 << 30) * scale))
    zeros = gzip_stream(b"\0" * MIB, gib // MIB)

    async def app(
        scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]
    ) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        query = scope.get("query_string", b"").decode()
        mode = dict(p.split("=", 1) for p in query.split("&") if "=" in p).get("mode", "")
        headers: list[tuple[bytes, bytes]] = [(b"content-type", b"application/octet-stream")]
        if path == protocol.ROOT_PATH:  # no root statements: the pinned key signs
            body = b'{"error": "no_root", "detail": "none"}'
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": body})
            return
        if path.startswith("/genuine-"):
            document = documents[path.removeprefix("/genuine-")]
            headers.append((b"content-length", str(len(document)).encode()))
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            for start in range(0, len(document), MIB):
                piece = document[start : start + MIB]
                await send({"type": "http.response.body", "body": piece, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return
        if path.startswith("/bomb"):
            headers.append((b"content-encoding", b"gzip"))
            headers.append((b"content-length", str(len(zeros)).encode()))
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": zeros})
            return
        block = b"\0" * MIB
        prefix = bytearray()
        if path.startswith("/listcap"):  # a well-formed list header declaring 12 M entries
            prefix = bytearray(list_header())
            prefix[73:77] = (12_000_000).to_bytes(4, "big")  # n_add
        if path.startswith("/listforged"):  # 12 M ascending entries, a signature of nothing
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            for piece in forged_list(max(1000, int(12_000_000 * scale))):
                await send({"type": "http.response.body", "body": piece, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return
        if path.startswith("/huge") and mode == "declared":
            headers.append((b"content-length", str(gib).encode()))
        gone = asyncio.Event()

        async def watch() -> None:  # the daemon hangs up once it has refused the answer
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.create_task(watch())
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        if prefix:
            await send({"type": "http.response.body", "body": bytes(prefix), "more_body": True})
        sent = 0
        while (path.startswith("/endless") or sent < gib) and not gone.is_set():
            await send({"type": "http.response.body", "body": block, "more_body": True})
            await asyncio.sleep(0)
            sent += len(block)
        if not gone.is_set():
            await send({"type": "http.response.body", "body": b""})
        watcher.cancel()

    return app


def list_header() -> bytes:
    """The header (magic to entry counts, 81 bytes) of a genuine signed list."""
    signer = HostKey.generate()
    return encode_list(
        kind=KIND_SNAPSHOT,
        version=1,
        base_version=0,
        issued_at=1,
        expires_at=2,
        add=[1],
        sign=signer.sign,
        public_key_raw=signer.public_key_bytes,
    )[:81]


def forged_list(count: int) -> Iterator[bytes]:
    """A list header declaring ``count`` entries, that many ascending entries (1 MiB at a time)
    and a trailer naming a key that is not in force: everything checks until the signature."""
    header = bytearray(list_header())
    header[73:77] = count.to_bytes(4, "big")  # n_add
    yield bytes(header)
    stride = (1 << 64) // count
    step = MIB // 8
    for first in range(0, count, step):
        yield pack(range(first * stride, min(count, first + step) * stride, stride))
    yield bytes(72)


def genuine_lists(key: HostKey, scale: float) -> dict[str, bytes]:
    """A signed snapshot of 10 M cards (spread over every bucket) and a 100,000-card delta
    onto it (additions between listed cards, and removals), both signed by ``key``."""
    count = max(1000, int(10_000_000 * scale))
    changes = max(100, int(100_000 * scale))
    stride = (1 << 64) // count
    base = array("Q", range(0, count * stride, stride))
    picked = random.Random(14).sample(range(count), 2 * changes)
    add = sorted(base[k] + 1 for k in picked[:changes])
    remove = sorted(base[k] for k in picked[changes:])
    now = int(time.time())
    common: dict[str, Any] = {
        "issued_at": now,
        "expires_at": now + 86400,
        "sign": key.sign,
        "public_key_raw": key.public_key_bytes,
    }
    snapshot = signed_document(KIND_SNAPSHOT, 1, 0, pack(base), b"", common)
    gone = set(remove)
    result = sorted([v for v in base if v not in gone] + add)
    delta = signed_document(KIND_DELTA, 2, 1, pack(add), pack(remove), common, pack(result))
    return {"snapshot": snapshot, "delta": delta}


def pack(values: Any) -> bytes:
    packed = array("Q", values)
    if sys.byteorder == "little":
        packed.byteswap()
    return packed.tobytes()


def signed_document(
    kind: int,
    version: int,
    base: int,
    add: bytes,
    remove: bytes,
    common: dict[str, Any],
    result: bytes | None = None,
) -> bytes:
    """A CBLIST03 document built from packed sections (``encode_list`` takes Python ints: too
    slow and large at 10 M); ``encode_list`` of a small list checks the framing matches."""
    digest = bl._image_digest(*bl._image_from_sorted_u64(add if result is None else result))
    header = bl._LIST_HEADER.pack(
        bl.LIST_MAGIC,
        kind,
        version,
        base,
        common["issued_at"],
        common["expires_at"],
        digest,
        len(add) // 8,
        len(remove) // 8,
    )
    entries = hashlib.sha256(add)
    entries.update(remove)
    signature = common["sign"](bl.signed_message(header, entries.digest()))
    return b"".join((header, add, remove, bl.key_id_of(common["public_key_raw"]), signature))


class Rewrite:
    """Routes the daemon's protocol paths to the hostile answer chosen for this run."""

    def __init__(self, inner: Callable[..., Any]) -> None:
        self.inner = inner
        self.target = "/bomb"
        self.mode = ""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] != protocol.ROOT_PATH:
            scope = dict(scope, path=self.target, query_string=f"mode={self.mode}".encode())
        await self.inner(scope, receive, send)


DAEMON_ATTACKS = [
    ("blacklist answered with a gzip bomb (1 GiB of zeros)", "pull_blacklist", "/bomb", ""),
    ("parameters answered with 1 GiB, Content-Length declared", "pull_params", "/huge", "declared"),
    ("parameters answered with 1 GiB, chunked", "pull_params", "/huge", ""),
    ("blacklist answered with 1 GiB, chunked", "pull_blacklist", "/huge", ""),
    (
        "blacklist: a list header declaring 12 M entries (96 MB), then zeros",
        "pull_blacklist",
        "/listcap",
        "",
    ),
    (
        "blacklist: a list header declaring 12 M entries, 12 M ascending entries (96 MB), "
        "a forged signature",
        "pull_blacklist",
        "/listforged",
        "",
    ),
    ("register + heartbeat answered with an endless stream", "send_heartbeat", "/endless", ""),
]


GENUINE = [
    ("a snapshot of 10 M cards (80 MB), onto no list", "pull_blacklist", "/genuine-snapshot", ""),
    (
        "a delta of 100,000 added and 100,000 removed cards, onto the 10 M list",
        "pull_blacklist",
        "/genuine-delta",
        "",
    ),
]


def bench_daemon(root: Path, scale: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:

    data_dir = root / "terminal"
    DataDir(data_dir).provision(TERMINAL)
    key = HostKey.generate()
    rewrite = Rewrite(hostile_app(scale, genuine_lists(key, scale)))
    rows: list[dict[str, Any]] = []
    genuine: list[dict[str, Any]] = []
    with HostServer(rewrite, log_level="critical") as server:
        for name, call, target, mode in DAEMON_ATTACKS + GENUINE:
            rewrite.target, rewrite.mode = target, mode
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "bench.bench_memory",
                    "--daemon-call",
                    call,
                    str(data_dir),
                    server.url,
                    key.public_key_hex(),
                ],
                capture_output=True,
                timeout=600,
                check=True,
            )
            result = json.loads(done.stdout.decode().strip().splitlines()[-1])
            table = genuine if target.startswith("/genuine-") else rows
            table.append({"attack": name, "call": call, **result})
            print(table[-1], flush=True)
    return rows, genuine


# --- report ----------------------------------------------------------------------------------


def report(
    scale: float,
    idle_kb: int,
    host: list[dict[str, Any]],
    daemon: list[dict[str, Any]],
    genuine: list[dict[str, Any]],
) -> str:
    host_peak = max(r["peak_mb"] for r in host)
    daemon_peak = max(r["peak_mb"] for r in daemon)
    lines = [
        "# Memory benchmark (`python -m bench.bench_memory`)",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, Linux peak RSS (`VmHWM`, reset per attack with "
        f"`clear_refs`). Scale {scale:g} (1 = the sizes named).",
        "",
        f"## Clearing host under hostile clients (budget {HOST_BUDGET_MB} MB)",
        "",
        f"The host process (uvicorn, SQLite, one registered terminal) idles at "
        f"{idle_kb / 1024:.0f} MB resident.",
        "",
        "| attack | host's answer | RSS before (MB) | peak RSS (MB) | still answers |",
        "|---|---|---:|---:|---|",
    ]
    lines += [
        f"| {r['attack']} | {r['outcome']} | {r['before_mb']:.0f} | **{r['peak_mb']:.0f}** | "
        f"{'yes' if r['healthy'] else 'NO'} |"
        for r in host
    ]
    lines += [
        "",
        f"Highest peak: **{host_peak:.0f} MB** "
        f"({'within' if host_peak < HOST_BUDGET_MB else 'ABOVE'} the {HOST_BUDGET_MB} MB budget).",
        "",
        f"## Sync daemon under a hostile host (budget {DAEMON_BUDGET_MB} MB)",
        "",
        "| stand-in host's answer | daemon call | outcome | RSS before (MB) | peak RSS (MB) |",
        "|---|---|---|---:|---:|",
    ]
    lines += [
        f"| {r['attack']} | `{r['call']}` | {r['outcome'].replace('|', '/')} | "
        f"{r['before_mb']:.0f} | **{r['peak_mb']:.0f}** |"
        for r in daemon
    ]
    lines += [
        "",
        f"Highest peak: **{daemon_peak:.0f} MB** "
        f"({'within' if daemon_peak < DAEMON_BUDGET_MB else 'ABOVE'} the {DAEMON_BUDGET_MB} MB "
        "budget).",
        "",
        f"## Sync daemon applying genuine lists (budget {APPLY_BUDGET_MB} MB of growth)",
        "",
        "| signed list from the stand-in host | daemon call | outcome | RSS before (MB) "
        "| peak RSS (MB) | growth (MB) | seconds |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['attack']} | `{r['call']}` | {r['outcome']} | {r['before_mb']:.0f} | "
        f"**{r['peak_mb']:.0f}** | {r['peak_mb'] - r['before_mb']:.0f} | {r['seconds']:.1f} |"
        for r in genuine
    ]
    growth = max(r["peak_mb"] - r["before_mb"] for r in genuine)
    lines += [
        "",
        f"Largest growth: **{growth:.0f} MB** "
        f"({'within' if growth < APPLY_BUDGET_MB else 'ABOVE'} the {APPLY_BUDGET_MB} MB budget).",
        "",
        "Every figure is the whole process's peak resident set during the call (interpreter, "
        "libraries, SQLite cache included), not the attack's share alone. The host reads bodies "
        "in chunks up to each route's cap, inflates uploads in bounded steps and parses them "
        "line by line; the daemon streams every answer with a cap per call (JSON 1 MiB, "
        "parameters 4 MiB, blacklist 96 MiB) and inflates gzip itself in 1 MiB steps. A "
        "blacklist answer is refused at its header when it cannot be a signed list, may not run "
        "past the size its header declares, and streams into a file beside `blacklist.bin` "
        "while it is hashed and checked for order (`CBLIST03` signs the header and the SHA-256 "
        "of the entries, so the list is verified without being held); entries out of order "
        "are refused as they arrive, which is where the 12 M-entry header full of zeros stops. "
        "A genuine list is applied from the files in 1 MiB steps (a delta is merged bucket by "
        "bucket with the old file) and renamed in once its signature and content digest hold; "
        "the daemon keeps only the list's header and 256 KB offset table.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--serve-host", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--daemon-call", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_host is not None:
        serve_host(args.serve_host)
        return 0
    if args.daemon_call is not None:
        call, data_dir, url, key_hex = args.daemon_call
        daemon_call(Path(data_dir), url, key_hex, call)
        return 0
    saved = structlog.get_config()
    quiet()
    try:
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        with tempfile.TemporaryDirectory(dir=base) as name:
            (Path(name) / "host").mkdir()
            idle_kb, host = bench_host(Path(name) / "host", args.scale)
            daemon, genuine = bench_daemon(Path(name), args.scale)
    finally:
        structlog.configure(**saved)
    text = report(args.scale, idle_kb, host, daemon, genuine)
    args.output.write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    threading.current_thread().name = "bench-memory"
    raise SystemExit(main())
