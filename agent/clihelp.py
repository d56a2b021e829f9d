"""What the three commands (``cardagent``, ``cardsync``, ``cardhost``) share on their command
line: ``--version`` and help texts that keep their layout (tables of commands, paragraphs)."""

from __future__ import annotations

import argparse
import platform
import re
import sys
from collections.abc import Callable, Sequence

from agent import __version__
from agent.errors import AgentError
from agent.logs import LogFormat


def plain(doc: str | None) -> str:
    """A module docstring as help text: reST's ``literal`` quotes and ``::`` markers removed,
    indentation and paragraphs kept."""
    text = (doc or "").strip("\n")
    text = re.sub(r":(?:mod|class|func|meth):`~?([^`]+)`", r"\1", text)
    text = text.replace("``", "")
    text = re.sub(r"(?m)^::\n", "", text)
    text = re.sub(r"::$", ":", text, flags=re.MULTILINE)
    return text


def version_text(prog: str) -> str:
    return f"{prog} {__version__} (Python {platform.python_version()})"


def make_parser(prog: str, doc: str | None, epilog: str | None = None) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` whose description is ``doc`` laid out as written, with
    ``--version``."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=plain(doc),
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=version_text(prog))
    parser.add_argument("--log-format", choices=("auto", "console", "json"), default="auto")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning"))
    return parser


def run_command(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    configure_logging: Callable[[LogFormat, str], None],
) -> int:
    """Parse, configure logging, run the chosen command; an :class:`AgentError` becomes one
    line on standard error naming the party that failed, and exit status 2."""
    args = parser.parse_args(argv)
    configure_logging(args.log_format, args.log_level)
    try:
        return int(args.func(args))
    except AgentError as exc:
        err(f"{parser.prog}: {exc.party} error: {exc}")
        return 2


def out(text: str) -> None:
    """For the operator: standard output (logs go to standard error)."""
    sys.stdout.write(text + "\n")


def err(text: str) -> None:
    sys.stderr.write(text + "\n")
