"""How fast the shared machine was during a bench run: a fixed pure-Python workload timed at
the start and at the end. The same code on this machine runs 25-50 % faster or slower from
one hour to the next (other jobs share its cores and caches, which ``/proc/stat`` steal time
does not show), so figures of two runs compare only divided by their runs' probes."""

from __future__ import annotations

import time


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
