"""Terminal ids: one rule for provisioning, the sync daemon and the clearing host.

A terminal id is 1 to 32 characters: upper-case ASCII letters ``A-Z``, digits ``0-9``, ``-``
and ``_``, the first a letter or a digit (``BUS-0042``, ``DEMO-0001``, ``T1``). The id travels
in URL paths, log lines and the operator page, so anything that could be read two ways is
refused rather than normalised: a ``/`` (another path), lower case (``t1`` next to ``T1``),
fullwidth or other compatibility forms (``Ｔ2``: its NFKC form differs), invisible or
direction-changing characters (``T2`` + U+200B, a right-to-left override). Two terminals that
look the same on the operator page must be the same terminal.
"""

from __future__ import annotations

import re
import unicodedata

from agent.errors import ConfigurationError

TERMINAL_ID_MAX = 32
TERMINAL_ID_RULE = (
    f"a terminal id is 1 to {TERMINAL_ID_MAX} characters: upper-case ASCII letters A-Z, "
    "digits 0-9, '-' and '_', starting with a letter or a digit"
)
_PATTERN = re.compile(r"[A-Z0-9][A-Z0-9_-]{0,31}", re.ASCII)  # TERMINAL_ID_MAX in all


class BadTerminalId(ConfigurationError):
    """A terminal id outside :data:`TERMINAL_ID_RULE`."""


def terminal_id_problem(value: object) -> str | None:
    """Why ``value`` is not a terminal id (naming the first offending character), or ``None``."""
    if not isinstance(value, str):
        return f"a terminal id must be a string, not {type(value).__name__}; {TERMINAL_ID_RULE}"
    shown = repr(value[:40]) + ("…" if len(value) > 40 else "")
    if _PATTERN.fullmatch(value):
        return None
    if not value:
        return f"the terminal id is empty; {TERMINAL_ID_RULE}"
    if len(value) > TERMINAL_ID_MAX:
        return f"terminal id {shown} is {len(value)} characters long; {TERMINAL_ID_RULE}"
    if unicodedata.normalize("NFKC", value) != value:
        return (
            f"terminal id {shown} is not in NFKC form (fullwidth or compatibility characters); "
            f"{TERMINAL_ID_RULE}"
        )
    for position, char in enumerate(value):
        if _PATTERN.fullmatch(char) or (position and char in "-_"):
            continue
        name = unicodedata.name(char, unicodedata.category(char))
        return (
            f"terminal id {shown}: character {position + 1} is U+{ord(char):04X} ({name}); "
            f"{TERMINAL_ID_RULE}"
        )
    return f"terminal id {shown} does not follow the rule; {TERMINAL_ID_RULE}"  # pragma: no cover


def check_terminal_id(value: object) -> str:
    """``value`` if it is a terminal id, else :class:`BadTerminalId` naming the problem."""
    problem = terminal_id_problem(value)
    if problem is not None:
        raise BadTerminalId(problem)
    assert isinstance(value, str)
    return value
