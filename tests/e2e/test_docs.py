"""Every configuration example of the README and of docs/ is a valid configuration.

Each ```toml block is written to a file and run through `switchboard config
check`, as a reader who copies it would, with the secrets it names (``*_env``)
set to dummy values and the example adapter package of the guide installed. A
block fenced as ```toml pyproject.toml is a package's pyproject, not a
configuration: it must parse and register what the example package registers.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_cli import ROOT, _cli
from tests.e2e.test_external_adapter import EXAMPLE, install_example

pytestmark = pytest.mark.e2e

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```toml([^\n]*)\n(.*?)^```", re.DOTALL | re.MULTILINE)


def _blocks() -> Iterator[Any]:
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for match in BLOCK.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            where = f"{doc.relative_to(ROOT)}:{line}"
            yield pytest.param(where, match.group(1).strip(), match.group(2), id=where)


def _secret_names(value: object) -> Iterator[str]:
    """The environment variables a configuration names for its secrets."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key.endswith("_env") and isinstance(item, str):
                yield item
            else:
                yield from _secret_names(item)
    elif isinstance(value, list):
        for item in value:
            yield from _secret_names(item)


def test_the_docs_have_examples() -> None:
    assert len(list(_blocks())) >= 5


@pytest.mark.slow
@pytest.mark.parametrize(("where", "info", "text"), list(_blocks()))
def test_config_example_passes_config_check(
    tmp_path: Path, where: str, info: str, text: str
) -> None:
    try:
        parsed = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        pytest.fail(f"{where}: not valid TOML: {exc}")
    if info == "pyproject.toml":
        example = tomllib.loads((EXAMPLE / "pyproject.toml").read_text(encoding="utf-8"))
        assert parsed["project"]["entry-points"] == example["project"]["entry-points"], where
        return
    assert not info, f"{where}: unknown fence info {info!r}"
    config = tmp_path / "switchboard.toml"
    config.write_text(text, encoding="utf-8")
    site = install_example(tmp_path / "site")
    env = {name: f"dummy-{name.lower()}" for name in _secret_names(parsed)}
    result = _cli("config", "check", str(config), env={**env, "PYTHONPATH": str(site)})
    assert result.returncode == 0, f"{where}: {result.stderr}"
    assert result.stdout.startswith("ok: "), result.stdout
