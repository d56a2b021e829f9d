"""A progress bar on standard error for long operations a person watches (nothing if not a TTY)."""

from __future__ import annotations

import sys
import time

WIDTH = 30


class ProgressBar:
    """``bar(done, total)`` redraws at most ten times a second; ``close()`` ends the line."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.enabled = sys.stderr.isatty()
        self._last = 0.0
        self._drawn = False

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self._last < 0.1 and done < total):
            return
        self._last = now
        fraction = done / total if total > 0 else 1.0
        filled = int(WIDTH * min(fraction, 1.0))
        sys.stderr.write(
            f"\r{self.label} [{'#' * filled}{' ' * (WIDTH - filled)}] {done}/{total} "
            f"({fraction:.0%})"
        )
        sys.stderr.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            sys.stderr.write("\n")
            sys.stderr.flush()
