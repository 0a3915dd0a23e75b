"""An adapter from a separate installed package is discovered and runs.

``tests/example_adapter`` is a package as a third party ships it. It is
"installed" the way pip would leave it, its code and a ``.dist-info`` with its
entry points, on the path of a fresh ``switchboard`` process; nothing in this
repository names it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from normalize.schema import InboundMessage
from switchboard.broker import EmbeddedBroker
from switchboard.settings import KafkaSettings
from switchboard.topics import INBOUND
from tests import local_http
from tests.e2e.test_cli import ROOT, _cli
from tests.e2e.test_run import _env, _stop, _wait_healthy, running
from tests.http_helpers import find

# slow: among the longest scenarios, left to `make test` (not `make test-quick`).
pytestmark = [pytest.mark.e2e, pytest.mark.slow]

EXAMPLE = ROOT / "tests" / "example_adapter"


def install_example(target: Path) -> Path:
    """The example package and its dist-info under ``target``; returns ``target``."""
    shutil.copytree(EXAMPLE / "switchboard_example", target / "switchboard_example")
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    info = target / f"switchboard_example-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n"
    )
    points = project["entry-points"]["switchboard.adapters"]
    (info / "entry_points.txt").write_text(
        "[switchboard.adapters]\n" + "".join(f"{k} = {v}\n" for k, v in points.items())
    )
    return target


def test_adapters_list_finds_it_and_only_the_config_enables_it(tmp_path: Path) -> None:
    site = install_example(tmp_path / "site")
    listed = _cli("adapters", "list", "--json", env={"PYTHONPATH": str(site)})
    assert listed.returncode == 0, listed.stderr
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert rows["widget"] == {
        "name": "widget",
        "enabled": False,  # installed is not enabled: it never runs unasked
        "package": "switchboard-example",
        "target": "switchboard_example:WidgetAdapter",
        "summary": "Website chat widget: JSON at POST /webhooks/widget (example package)",
        "error": None,
    }
    assert {"smtp", "imap", "twilio", "webhook", "mailgun", "sendgrid", "postmark"} <= set(rows)
    config = tmp_path / "switchboard.toml"
    config.write_text("[adapters.widget]\nmax_body_bytes = 4096\n")
    env = {"PYTHONPATH": str(site), "SWITCHBOARD_CONFIG": str(config)}
    enabled = json.loads(_cli("adapters", "list", "--json", env=env).stdout)
    assert {r["name"]: r["enabled"] for r in enabled}["widget"] is True
    shown = _cli("config", "show", env={**env, "SWITCHBOARD_WIDGET_TOKEN": "widget-secret"})
    assert json.loads(shown.stdout)["adapter_settings"]["widget"] == {
        "token": "**********",  # from the environment, masked
        "max_body_bytes": 4096,  # from the file
    }
    assert "widget-secret" not in shown.stdout
    config.write_text("[adapters.widget]\nenabled = false\n")
    disabled = json.loads(_cli("adapters", "list", "--json", env=env).stdout)
    assert {r["name"]: r["enabled"] for r in disabled}["widget"] is False


def test_config_errors_name_the_adapter_and_the_key(tmp_path: Path) -> None:
    site = install_example(tmp_path / "site")
    config = tmp_path / "switchboard.toml"
    env = {"PYTHONPATH": str(site), "SWITCHBOARD_CONFIG": str(config)}
    cases = {
        "[adapters.telegram]\n": "unknown adapter 'telegram' (installed: ",
        "[adapters.widget]\nmax_body_byte = 1\n": "[adapters.widget]: unknown key max_body_byte",
        "[adapters.widget]\nmax_body_bytes = 1\n": "adapters.widget.max_body_bytes",
        "[adapters.widget]\nenabled = 1\n": "enabled must be true or false",
        "[smtp]\nport = 26\n[adapters.smtp]\nport = 25\n": "smtp is configured twice",
    }
    for text, expected in cases.items():
        config.write_text(text)
        result = _cli("config", "check", env=env)
        assert result.returncode == 2, (text, result.stdout, result.stderr)
        assert expected in result.stderr, (text, result.stderr)


def test_the_installed_adapter_runs_in_the_pipeline(
    tmp_path: Path, kafka_broker: EmbeddedBroker, unique: str
) -> None:
    site = install_example(tmp_path / "site")
    config = tmp_path / "switchboard.toml"
    config.write_text("[adapters.widget]\n")
    env = _env(
        tmp_path,
        PYTHONPATH=str(site),
        SWITCHBOARD_CONFIG=str(config),
        SWITCHBOARD_KAFKA_BOOTSTRAP=kafka_broker.bootstrap,
        SWITCHBOARD_WIDGET_TOKEN="widget-token",
    )
    base = f"http://127.0.0.1:{env['SWITCHBOARD_HTTP_PORT']}"
    body = {"id": f"w-{unique}", "visitor": {"email": "Ann@Example.org"}, "text": "hi"}
    with running(env, tmp_path, "ingest", "http") as process:
        _wait_healthy(base, process)
        url = f"{base}/webhooks/widget"
        refused = local_http.post(
            url, json=body, headers={"authorization": "Bearer nope"}, timeout=30
        )
        assert refused.status_code == 403, refused.text
        accepted = local_http.post(
            url, json=body, headers={"authorization": "Bearer widget-token"}, timeout=30
        )
        assert accepted.status_code == 202, accepted.text
        assert accepted.json()["dedupe_key"] == f"widget:w-{unique}"
        code, _, stderr = _stop(process)
        assert code == 0, stderr
    assert "widget-token" not in stderr
    found = find(
        KafkaSettings(bootstrap=kafka_broker.bootstrap),
        f"e2e-widget-{unique}",
        INBOUND,
        InboundMessage,
        lambda m: m.dedupe_key == f"widget:w-{unique}",
    )
    assert [(m.adapter, m.channel, m.sender.key) for m in found] == [
        ("widget", "chat", "email:ann@example.org")
    ]


def test_the_kit_runs_as_a_pytest_plugin_in_the_adapters_own_package(tmp_path: Path) -> None:
    # The example package's own test suite, run from its own directory with the
    # package installed (on the path): the kit's fixtures come from the plugin entry
    # point, not from Switchboard's conftest.
    site = install_example(tmp_path / "site")
    shutil.copytree(EXAMPLE / "tests", tmp_path / "project" / "tests")
    shutil.copy(EXAMPLE / "pyproject.toml", tmp_path / "project" / "pyproject.toml")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SWITCHBOARD_", "PYTEST_"))}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider"],
        cwd=tmp_path / "project",
        env={**env, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "9 passed" in result.stdout, result.stdout[-2000:]
    # The plugin filters kafka-python's import-time deprecations (218 warnings in an
    # adapter package's run before it did).
    assert "warning" not in result.stdout.splitlines()[-1], result.stdout[-2000:]
