"""The house rules of docs/architecture.md that an import graph can check: no import circle in
``agent/``, and the card products (``agent/products/``) import nothing that does I/O."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

AGENT = Path(__file__).resolve().parent.parent / "agent"

# What a sans-I/O product may import from the agent: pure modules only.
PURE_FOR_PRODUCTS: tuple[str, ...] = (
    "agent.products",
    "agent.apdu",
    "agent.crypto",
    "agent.tlv",
    "agent.errors",
    "agent.profile",
    "agent.offline_store.records",
    "agent.readers.storage",  # the storage-card seam's types (KeyType), no I/O
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(AGENT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every ``agent…`` module this file imports, at module level or inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("agent"))
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.level == 0
            and node.module.startswith("agent")
        ):
            if node.module != "agent":  # ``from agent import crypto`` imports agent.crypto only
                found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in AGENT.rglob("*.py")}
    return {
        name: {m for m in imports_of(path) if m in modules} - {name}
        for name, path in modules.items()
    }


def test_no_import_circle_in_agent() -> None:
    edges = graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    circles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                circles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    # A package's __init__ re-exporting its own modules is not a circle between layers.
    real = [c for c in circles if not all(m.startswith(c[0].rsplit(".", 1)[0]) for m in c)]
    assert not real, "\n".join(" -> ".join(c) for c in real)


def test_card_products_do_no_io() -> None:
    edges = graph()
    offenders = {
        name: sorted(m for m in deps if not m.startswith(PURE_FOR_PRODUCTS))
        for name, deps in edges.items()
        if name.startswith("agent.products")
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_products_import_no_io_library() -> None:
    io_libraries = ("smartcard", "nfc", "serial", "sqlite3", "sqlite_utils", "httpx", "socket")
    for path in (AGENT / "products").glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            bad = [n for n in names if n.split(".")[0] in io_libraries]
            assert not bad, f"{path.name} imports {bad}"


HOST_ONLY = ("clearinghost", "starlette", "uvicorn", "psycopg")


def test_terminal_side_never_imports_the_clearing_host() -> None:
    """A validator installs ``agent`` and ``sync`` only: neither may import the host package."""
    root = AGENT.parent
    for path in [*AGENT.rglob("*.py"), *(root / "sync").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            bad = [n for n in names if n.split(".")[0] in HOST_ONLY]
            assert not bad, f"{path.relative_to(root)} imports {bad}"


def test_terminal_commands_load_without_the_host_extra() -> None:
    """``cardagent`` and ``cardsync`` start with starlette, uvicorn and psycopg absent."""
    probe = (
        "import sys\n"
        "class Absent:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {HOST_ONLY!r}:\n"
        "            raise ImportError(f'{name} is not installed on a terminal')\n"
        "sys.meta_path.insert(0, Absent())\n"
        "import agent.cli, agent.validator, sync.cli, sync.daemon\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=AGENT.parent,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
