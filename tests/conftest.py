"""Shared fixtures: structlog isolation, and the real reader stacks (see :mod:`tests.stacks`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from hypothesis import HealthCheck, settings

from tests.stacks import PcscStack

# CI machines are loaded (2 cores, other jobs): timing must never fail a test. No deadlines and
# no too_slow health check, on top of whatever profile is active (Hypothesis' own "ci" profile
# when CI is set). Loaded before any test module builds its @settings, which inherit from it.
# An explicit suppress_health_check=[...] in a test replaces this list: keep too_slow in it.
settings.register_profile(
    "cardagent",
    parent=settings(),
    deadline=None,
    suppress_health_check=[*settings().suppress_health_check, HealthCheck.too_slow],
)
settings.load_profile("cardagent")


_configure_structlog = structlog.configure


def _configure_without_logger_cache(**settings: Any) -> None:
    """``structlog.configure`` for in-process CLI runs under test: never cache loggers.

    A CLI's ``main`` configures ``cache_logger_on_first_use=True`` (right for a process); in a
    test session that freezes every module logger first used afterwards with that test's
    processors, so a later test's ``capture_logs`` sees nothing."""
    settings["cache_logger_on_first_use"] = False
    _configure_structlog(**settings)


structlog.configure = _configure_without_logger_cache  # type: ignore[assignment]


@pytest.fixture(autouse=True)
def _restore_structlog() -> Iterator[None]:
    """A test that configures structlog (a CLI's main) must not leak that into later tests."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.fixture(scope="session")
def pcsc_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PcscStack]:
    """pcscd + vpcd for the whole session (libpcsclite reads its socket path once per process)."""
    stack = PcscStack(tmp_path_factory.mktemp("pcscd"))
    try:
        stack.start_pcscd()
        yield stack
    finally:
        stack.close()


@pytest.fixture
def pcsc(pcsc_stack: PcscStack) -> Iterator[PcscStack]:
    """The session's pcscd, running, with both vpcd slots empty before and after the test."""
    pcsc_stack.start_pcscd()
    pcsc_stack.clear_slots()
    yield pcsc_stack
    pcsc_stack.clear_slots()
