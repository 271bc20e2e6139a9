"""
docs/architecture.md stays true: it names every module of the package, and
its module list is an order in which every import points to a module listed
before it (imports point down the layers). Read from the sources' own
import statements; nothing is imported or run.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "notifyd"
MAP = ROOT / "docs" / "architecture.md"

# Entry points and package markers: not rooms of their own.
_NOT_MODULES = {"__init__.py", "__main__.py"}


def listed_rows() -> list[list[str]]:
    """
    The names in each row of the map's module tables, in order: a name is
    a file (``db.py``, ``sinks/policy.py``) or a package (``sinks/``).
    """
    text = MAP.read_text()
    section = text.split("## Modules", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = line.split("|")
        if len(cells) < 3 or not cells[1].strip().startswith("`"):
            continue
        names = re.findall(r"`([^`]+)`", cells[1])
        rows.append([name for name in names if name.endswith((".py", "/"))])
    return [row for row in rows if row]


def modules() -> dict[str, set[str]]:
    """
    Each module of the package (path relative to it) and the modules of the
    package it imports.
    """
    result: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if path.name in _NOT_MODULES:
            continue
        folder = relative.split("/")[:-1]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                base = folder[: len(folder) - (node.level - 1)]
                names = [node.module] if node.module else [a.name for a in node.names]
                for name in names:
                    target = "/".join([*base, *name.split(".")])
                    if (PACKAGE / f"{target}.py").exists():
                        targets.add(f"{target}.py")
                    elif (PACKAGE / target).is_dir():
                        targets.add(f"{target}/")
        result[relative] = targets
    return result


def position(name: str, rows: list[list[str]]) -> int | None:
    """
    The row that names a module, by its own name or by its package's.
    """
    for index, row in enumerate(rows):
        if name in row:
            return index
    package = name.split("/")[0] + "/"
    for index, row in enumerate(rows):
        if package in row:
            return index
    return None


def test_the_map_names_every_module() -> None:
    """Every module of notifyd/ has a row in docs/architecture.md (or its package has)."""
    rows = listed_rows()
    missing = [name for name in modules() if position(name, rows) is None]
    assert missing == [], f"modules missing from docs/architecture.md: {missing}"


def test_the_map_names_no_module_that_is_gone() -> None:
    """Every file the map names exists."""
    named = [name for row in listed_rows() for name in row]
    gone = [name for name in named if not (PACKAGE / name).exists()]
    assert gone == [], f"docs/architecture.md names modules that do not exist: {gone}"


def test_imports_point_down_the_map() -> None:
    """Each module imports only modules listed before it (or in its own package's row)."""
    rows = listed_rows()
    upward = []
    for name, targets in modules().items():
        here = position(name, rows)
        for target in targets:
            there = position(target.rstrip("/") + ("" if target.endswith(".py") else "/"), rows)
            if here is None or there is None or there > here:
                upward.append(f"{name} -> {target}")
    assert upward == [], f"imports that point up the map: {upward}"


def test_only_the_cli_imports_the_daemon() -> None:
    """The daemon is wired by the command line alone; nothing reaches up into it."""
    importers = sorted(name for name, targets in modules().items() if "daemon.py" in targets)
    assert importers == ["cli.py"]


def test_only_the_database_edge_imports_asyncpg() -> None:
    """asyncpg is spoken in db.py and the LISTEN connection only (the asyncpg boundary)."""
    speakers = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import) and any(a.name == "asyncpg" for a in node.names):
                speakers.append(path.relative_to(PACKAGE).as_posix())
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("asyncpg"):
                speakers.append(path.relative_to(PACKAGE).as_posix())
    assert sorted(set(speakers)) == ["db.py", "listener.py"]
