"""CI runs on loaded 2-core machines: timing must never fail a test (issue 8, item 8)."""

from __future__ import annotations

import re
from pathlib import Path

from hypothesis import HealthCheck, settings

TESTS = Path(__file__).resolve().parent


def test_hypothesis_profile_has_no_deadline_and_no_too_slow_check() -> None:
    """tests/conftest.py loads a profile every @settings(...) inherits from."""
    current = settings()
    assert current.deadline is None
    assert HealthCheck.too_slow in current.suppress_health_check


def test_no_test_re_enables_timing_checks() -> None:
    """An explicit deadline must be None, and an explicit suppress_health_check list (which
    replaces the profile's) must keep too_slow."""
    for path in sorted(TESTS.rglob("*.py")):
        if path.name == Path(__file__).name:
            continue
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"\bdeadline\s*=\s*([^,)\s]+)", text):
            if "settings(" in text[max(0, match.start() - 400) : match.start()]:
                assert match.group(1) == "None", f"{path.name}: deadline={match.group(1)}"
        for match in re.finditer(r"suppress_health_check\s*=\s*\[([^\]]*)\]", text):
            if path.name != "conftest.py":
                assert "too_slow" in match.group(1), f"{path.name}: {match.group(0)}"
