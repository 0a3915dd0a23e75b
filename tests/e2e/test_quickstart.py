"""The README's quick start, as written: its config, its variables, `switchboard run`
and its three `switchboard send` commands; then one contact with three messages.

The blocks are read from the README, so the test fails when the README changes in a
way a reader following it would trip over. Only the ports (free ones, so tests can
run side by side) and sender verification (this machine reaches no DNS) differ.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests import local_http
from tests.e2e.test_cli import ROOT
from tests.e2e.test_run import SWITCHBOARD, _env, _stop, _wait_healthy, running

pytestmark = pytest.mark.e2e

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.DOTALL | re.MULTILINE)


def quickstart() -> tuple[str, dict[str, str], list[list[str]]]:
    """The quick start's config file, exported variables and `send` commands."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index("## Quick start")
    section = readme[start : readme.index("\n## ", start + 1)]
    blocks = FENCE.findall(section)
    (config,) = [text for lang, text in blocks if lang == "toml"]
    shell = "\n".join(text for lang, text in blocks if lang == "sh")
    exports: dict[str, str] = {}
    commands: list[list[str]] = []
    for line in shell.splitlines():
        words = shlex.split(line)
        if words[:1] == ["export"]:
            exports.update(word.split("=", 1) for word in words[1:])  # type: ignore[misc]
        elif words[:2] == [".venv/bin/switchboard", "send"]:
            commands.append(words[1:])
    assert "make run" in shell
    return config, exports, commands


def _until(check: Any, timeout_s: float = 60) -> Any:  # noqa: ANN401
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError("the quick start's messages did not reach one conversation")


@pytest.mark.slow
def test_the_readme_quick_start_makes_one_contact_of_three_channels(tmp_path: Path) -> None:
    config, exports, commands = quickstart()
    assert [c[1] for c in commands] == ["hook", "email", "sms"]
    (tmp_path / "switchboard.toml").write_text(config, encoding="utf-8")
    env = _env(tmp_path, **exports)
    base = f"http://127.0.0.1:{env['SWITCHBOARD_HTTP_PORT']}"
    with running(env, tmp_path) as process:  # `make run` is `switchboard run` here
        _wait_healthy(base, process, within_s=60)
        answers = []
        for command in commands:
            sent = subprocess.run(
                [*SWITCHBOARD, *command],
                env=env,
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert sent.returncode == 0, f"{command}: {sent.stdout}{sent.stderr}"
            answers.append(sent.stdout)
        assert answers[0].startswith("202 "), answers[0]
        assert re.match(r"250 2\.0\.0 Ok: queued as \S+", answers[1]), answers[1]
        assert answers[2].startswith("200 "), answers[2]

        def alice() -> dict[str, Any] | None:
            found = local_http.get(
                f"{base}/api/contacts", params={"identity": "phone:+14155550100"}, timeout=10
            )
            if found.status_code != 200:
                return None
            body: dict[str, Any] = found.json()
            conversations = body["conversations"]
            if len(conversations) == 1 and conversations[0]["message_count"] == 3:
                return body
            return None

        contact = _until(alice)
        assert contact["identities"] == ["email:alice@example.org", "phone:+14155550100"]
        assert contact["owner"] == "support"
        (summary,) = contact["conversations"]
        conversation = local_http.get(
            f"{base}/api/conversations/{summary['id']}", timeout=10
        ).json()
        assert [m["channel"] for m in conversation["messages"]] == ["webhook", "email", "sms"]
        # The page the README points at shows the customer, and her card the
        # conversation with the three messages.
        queue = local_http.get(f"{base}/queue", params={"owner": "support"}, timeout=10)
        assert queue.status_code == 200
        assert contact["id"] in queue.text
        page = local_http.get(f"{base}/queue/contacts/{contact['id']}", timeout=10)
        assert summary["id"] in page.text
        for text in ("where do I start?", "Where is my order?", "Any news on my order?"):
            assert text in page.text
        code, _, stderr = _stop(process)
    assert code == 0, stderr[-3000:]


@pytest.mark.slow
def test_send_says_what_is_missing_before_sending_anything(tmp_path: Path) -> None:
    env = _env(tmp_path)
    cases = [
        (
            ["send", "sms", "--from", "+14155550100", "--text", "hi"],
            "SWITCHBOARD_TWILIO_AUTH_TOKEN",
        ),
        (["send", "hook", "app", "--json", "{}"], "no web hook 'app' in the configuration"),
        (["send", "email", "--from", "a@example.org"], "--to is needed"),
    ]
    for command, message in cases:
        sent = subprocess.run(
            [*SWITCHBOARD, *command],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert sent.returncode == 2, (command, sent.stdout, sent.stderr)
        assert message in sent.stdout + sent.stderr, (command, sent.stdout, sent.stderr)
