"""A host process's PostgreSQL storage under concurrent requests: one connection against a pool.

``python -m bench.bench_pgpool [--ops 4000] [--threads 8] [--delay-ms 0.1]`` measures, side by
side in one run, the storage work of the city's small requests (:mod:`clearinghost.storage`,
the calls ``ClearingHost`` makes: an upload's terminal row read, a heartbeat's one write
transaction, a list pull's version read) from ``--threads`` threads at once (the host runs
storage calls in a thread pool), with ``--db-connections`` 1 (every transaction in turn, as
before the pool) and 4 (the default), over two links:

* the database on the same machine (a unix socket, as the other benches);
* a database on another machine, simulated by a TCP proxy that holds every chunk
  ``--delay-ms`` in each direction (a LAN's round trip is 0.1-0.5 ms). The proxy is this
  module run with ``--proxy``, in a process of its own; it spins while it holds a chunk, so it
  takes CPU from the same 2 cores: the figures are ratios, not a remote server's capacity.

Figures: storage calls a second (wall), and the host process's CPU per call. PostgreSQL is a
throw-away cluster (``initdb``, :class:`bench.bench_city.PgCluster`).
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.bench_city import PgCluster, _free_port
from bench.machine import speed_probe
from clearinghost.storage import PostgresStorage

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "RESULTS-pgpool.md"
TERMINALS = 200


def run_proxy(listen_port: int, target_port: int, delay_s: float) -> None:
    """Forward 127.0.0.1:listen_port to 127.0.0.1:target_port, each chunk held ``delay_s``."""

    def pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                due = time.perf_counter() + delay_s
                while time.perf_counter() < due:  # a sleep this short oversleeps by 50 µs+
                    time.sleep(0)
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    server = socket.create_server(("127.0.0.1", listen_port))
    while True:
        client, _ = server.accept()
        upstream = socket.create_connection(("127.0.0.1", target_port))
        for end in (client, upstream):
            end.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=pump, args=(client, upstream), daemon=True).start()
        threading.Thread(target=pump, args=(upstream, client), daemon=True).start()


def measure(dsn: str, connections: int, ops: int, threads: int) -> tuple[float, float]:
    """(calls a second, host CPU µs a call) for ``ops`` calls from ``threads`` threads: an
    upload's terminal read, a heartbeat, a list pull's version read, in turn."""
    storage = PostgresStorage(dsn, connections)
    try:
        ids = [f"T{n:04d}" for n in range(TERMINALS)]
        for terminal_id in ids:
            storage.register_terminal(terminal_id, f"{len(terminal_id):02x}" * 32)
        figures = {"unsent_records": 0, "blacklist_version": 1, "uptime_s": 3600}

        def work(first: int) -> None:
            for n in range(first, ops, threads):
                terminal_id = ids[n % TERMINALS]
                kind = n % 3
                if kind == 0:
                    storage.terminal(terminal_id)
                elif kind == 1:
                    storage.heartbeat(terminal_id, figures)
                else:
                    storage.blacklist_version()

        workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        cpu, wall = time.process_time(), time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        storage.close()
    return ops / wall, cpu / ops * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--ops", type=int, default=4000, help="storage calls per measurement")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--delay-ms", type=float, default=0.1, help="each way, through the proxy")
    parser.add_argument("--rounds", type=int, default=2, help="alternated rounds; the best kept")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--proxy", nargs=3, type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.proxy:
        run_proxy(int(args.proxy[0]), int(args.proxy[1]), args.proxy[2])
        return 0

    probe_before = speed_probe()
    cluster = PgCluster().start()
    proxy_port = _free_port()
    proxy = subprocess.Popen(
        [sys.executable, "-m", "bench.bench_pgpool", "--proxy", str(proxy_port),
         str(cluster.port), str(args.delay_ms / 1000)]
    )  # fmt: skip
    results: dict[tuple[str, int], tuple[float, float]] = {}
    try:
        deadline = time.monotonic() + 60
        while True:  # the proxy listens
            try:
                socket.create_connection(("127.0.0.1", proxy_port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proxy.poll() is not None:
                    raise SystemExit("bench_pgpool: the proxy did not start") from None
                time.sleep(0.05)
        local, remote = (
            f"host={cluster.dir} port={cluster.port}",
            f"host=127.0.0.1 port={proxy_port}",
        )
        links = {
            "same machine (unix socket)": local,
            f"through the proxy, {args.delay_ms:g} ms each way": remote,
        }
        for _ in range(args.rounds):
            for link, address in links.items():
                for connections in (1, 4):
                    dsn = cluster.new_database().replace(local, address)
                    rate, cpu_us = measure(dsn, connections, args.ops, args.threads)
                    best = results.get((link, connections))
                    if best is None or rate > best[0]:
                        results[(link, connections)] = (rate, cpu_us)
                    print(f"{link}, {connections} connection(s): {rate:,.0f} calls/s")
    finally:
        proxy.kill()
        proxy.wait(timeout=30)
        cluster.stop()
    probe_after = speed_probe()

    lines = [
        "# PostgreSQL storage of one host process: one connection against a pool",
        "",
        f"Generated by `python -m bench.bench_pgpool --ops {args.ops} --threads {args.threads} "
        f"--delay-ms {args.delay_ms:g}`: {args.threads} threads at once make the storage calls "
        "of the city's small requests in turn (an upload's terminal row read, a heartbeat's "
        "write transaction, a list pull's version read: `clearinghost.storage`), with "
        "`--db-connections` 1 (every transaction in turn, as before the pool) and 4 (the "
        f"default); {args.rounds} rounds alternated, the best of each kept. The proxy stands "
        "for a database on another machine; it runs on the same 2 cores and spins while it "
        f"holds a chunk. Speed probe: {probe_before:.3f} s before, {probe_after:.3f} s after.",
        "",
        "| link | connections | calls/s | host CPU per call (µs) | calls/s, 4 / 1 |",
        "|---|---:|---:|---:|---:|",
    ]
    for link in links:
        one = results[(link, 1)][0]
        for connections in (1, 4):
            rate, cpu_us = results[(link, connections)]
            ratio = f"**{rate / one:.2f}×**" if connections == 4 else ""
            lines.append(f"| {link} | {connections} | {rate:,.0f} | {cpu_us:.0f} | {ratio} |")
    lines += [
        "",
        "With one connection a transaction waits for the previous one's round trips, so the "
        "link's delay caps a worker whatever its CPU; with four, the round trips of different "
        "requests overlap. On the same machine there is little to overlap, and the threads "
        "that run at once pay for the GIL they pass between them (the CPU per call).",
        "",
    ]
    args.output.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
