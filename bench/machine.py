"""How fast the shared machine was during a bench run: a fixed pure-Python workload timed at
the start and at the end. The same code on this machine runs 25-50 % faster or slower from
one hour to the next (other jobs share its cores and caches, which ``/proc/stat`` steal time
does not show), so figures of two runs compare only divided by their runs' probes. Also the
CPU a process (or the PostgreSQL server) used, read from /proc."""

from __future__ import annotations

import os
import time
from pathlib import Path


def speed_probe(rounds: int = 3) -> float:
    """Seconds of the fastest of ``rounds`` runs of a fixed interpreter-bound loop (integer
    arithmetic, a dict and a str join: the kind of work the host's per-record path does)."""
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        seen: dict[int, str] = {}
        for n in range(300_000):
            seen[n & 1023] = ",".join((str(n), str(n * n)))
        best = min(best, time.perf_counter() - started)
    return best


def proc_cpu_s(pid: int) -> float:
    """utime + stime of one process (``/proc/PID/stat`` fields 14 and 15, proc(5)), seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()  # after "(comm)", which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_s(pids: list[int]) -> dict[int, float]:
    return {pid: proc_cpu_s(pid) for pid in pids}


def postgres_cpu_s() -> dict[int, float]:
    """CPU of every live ``postgres`` process (the bench's server: its postmaster, background
    processes and the host's backends), by pid."""
    found: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "postgres":
                continue
            found[int(entry.name)] = proc_cpu_s(int(entry.name))
        except OSError:  # gone meanwhile
            continue
    return found


def cpu_spent(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds the processes of ``after`` used since ``before`` (a process that started
    meanwhile counts from 0)."""
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())
