"""What the three commands (``cardagent``, ``cardsync``, ``cardhost``) share on their command
line: ``--version`` and help texts that keep their layout (tables of commands, paragraphs)."""

from __future__ import annotations

import argparse
import platform
import re

from agent import __version__


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
    return parser
