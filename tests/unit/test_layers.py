"""The floors of the house, checked on every import (also inside functions).

- the core (``switchboard`` minus the application modules) imports no stage and
  no application module;
- a stage (``ingest``, ``normalize``, ``router``, ``sinks``) imports no other
  stage except ``normalize`` (the schema), and no application module;
- ``normalize`` imports nothing of ours but the core.

``KNOWN`` lists today's exceptions, each with its reason: the test fails on any
other, and on an exception that is no longer needed, so the list only shrinks.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("ingest", "normalize", "router", "sinks")
APPLICATION = frozenset(
    {
        "switchboard.cli",
        "switchboard.bootstrap",
        "switchboard.status",
        "switchboard.recovery",
        "switchboard.databases",
        "switchboard.settings",
        "switchboard.schemas",
        "switchboard.asyncapi",
        "switchboard.tail",
        "switchboard.send",
    }
)

# (importer, imported): why it is still allowed.
_SCHEMA = "the core builds dead letters and content digests with normalize's schema"
KNOWN: dict[tuple[str, str], str] = {
    ("ingest.testing", "switchboard.schemas"): (
        "the adapter test kit validates against the exported JSON Schemas"
    ),
    ("switchboard.blobs", "normalize.content"): _SCHEMA,
    ("switchboard.blobs", "normalize.schema"): _SCHEMA,
    ("switchboard.packs", "normalize.content"): _SCHEMA,
    ("switchboard.consumer", "normalize.schema"): _SCHEMA,
}


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _owner(module: str) -> str:
    """core, application, or the stage's name; '' for what is not ours."""
    top = module.split(".", maxsplit=1)[0]
    if top in STAGES:
        return top
    if top != "switchboard":
        return ""
    if any(module == m or module.startswith(m + ".") for m in APPLICATION):
        return "application"
    return "core"


def _application_module(imported: str) -> str | None:
    return next((m for m in APPLICATION if imported == m or imported.startswith(m + ".")), None)


def violations() -> dict[tuple[str, str], str]:
    found: dict[tuple[str, str], str] = {}
    for package in ("switchboard", *STAGES):
        for path in sorted((ROOT / package).rglob("*.py")):
            if "versions" in path.parts and "migrations" in path.parts:
                continue  # Alembic scripts: only alembic and sqlalchemy
            importer = _module(path)
            mine = _owner(importer)
            for imported in _imports(path):
                theirs = _owner(imported)
                app = _application_module(imported)
                target = app or ".".join(imported.split(".")[:2])
                if mine == "core" and (theirs in STAGES or theirs == "application"):
                    found[(importer, target)] = "the core imports a stage or the application"
                elif mine in STAGES and theirs == "application":
                    found[(importer, target)] = "a stage imports the application"
                elif mine in STAGES and theirs in STAGES and theirs not in (mine, "normalize"):
                    found[(importer, target)] = "a stage imports another stage"
                elif mine == "normalize" and theirs in STAGES and theirs != "normalize":
                    found[(importer, target)] = "normalize imports a stage"
    return found


def test_no_import_crosses_a_floor() -> None:
    new = {pair: why for pair, why in violations().items() if pair not in KNOWN}
    assert new == {}


def test_every_known_exception_is_still_needed() -> None:
    stale = sorted(set(KNOWN) - set(violations()))
    assert stale == [], "remove these from KNOWN: they no longer happen"


def test_the_check_sees_imports_inside_functions(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from router.store import RouterStore\n")
    assert "router.store" in _imports(sample)
