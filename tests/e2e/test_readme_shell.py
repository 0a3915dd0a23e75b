"""Every shell example of the README is run, or says why it is not.

The README's fences all name their language: ```toml blocks are configurations
(tests/e2e/test_docs.py checks each), ```text blocks are output, ```console blocks
show a command (`$ ...`) and what it prints, ```sh blocks are commands. Each ```sh
block is one of:

- the quick start's (tests/e2e/test_quickstart.py runs them as written);
- marked `# not run by the tests: <reason>` on its first line;
- run here, through bash, against one `switchboard run`, with `switchboard` and the
  project's Python on PATH, `$TOKEN` the API token, `$ID`/`$OTHER` two contacts'
  ids, and the README's `127.0.0.1:8080` replaced by the test's free port.

A new ```sh block that is none of these fails `test_every_shell_block_is_run_or_says_why`.
"""

from __future__ import annotations

import os
import re
import smtplib
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import local_http, needs
from tests.e2e.test_cli import ROOT
from tests.e2e.test_quickstart import quickstart
from tests.e2e.test_run import _env, _stop, _wait_healthy, running
from tests.provider_payloads import Mail, mailgun_parsed

pytestmark = pytest.mark.e2e

README = ROOT / "README.md"
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.DOTALL | re.MULTILINE)
NOT_RUN = "# not run by the tests: "
TOKEN = "readme-shell-token"
CONFIG = """
[smtp]
domains = ["example.com"]

[[teams]]
name = "support"
agents = ["alice", "bob"]

[adapters.mailgun]
"""


def _fences() -> list[tuple[int, str, str]]:
    """(line, info string, text) of every fenced block of the README."""
    text = README.read_text(encoding="utf-8")
    return [
        (text.count("\n", 0, m.start()) + 1, m.group(1).strip(), m.group(2))
        for m in FENCE.finditer(text)
    ]


def _quickstart_blocks() -> set[str]:
    readme = README.read_text(encoding="utf-8")
    start = readme.index("## Quick start")
    section = readme[start : readme.index("\n## ", start + 1)]
    return {m.group(2) for m in FENCE.finditer(section) if m.group(1).strip() == "sh"}


def _run_here(block: str) -> bool:
    first = next(line for line in block.splitlines() if line.strip())
    return any(first.startswith(p) for p in RUNNERS)


def test_every_fence_names_its_language() -> None:
    unnamed = [line for line, info, _ in _fences() if not info]
    assert not unnamed, f"README.md fences without a language at lines {unnamed}"
    known = {info.split()[0] for _, info, _ in _fences()}
    assert known <= {"toml", "sh", "console", "text"}, known


def test_every_shell_block_is_run_or_says_why() -> None:
    quick = _quickstart_blocks()
    assert quick, "the quick start has no sh blocks"
    assert len(quickstart()[2]) == 3  # test_quickstart finds its three sends there
    for line, info, block in _fences():
        if info != "sh" or block in quick:
            continue
        if block.startswith(NOT_RUN):
            reason = block.splitlines()[0][len(NOT_RUN) :].strip()
            assert len(reason) > 10, f"README.md:{line}: say why it is not run"
            continue
        assert _run_here(block), (
            f"README.md:{line}: a shell example no test runs; add it to RUNNERS in "
            f"{Path(__file__).name} or mark it '{NOT_RUN}<reason>'"
        )


def _blocks_starting(prefix: str) -> list[str]:
    found = [b for _, info, b in _fences() if info == "sh" and b.lstrip().startswith(prefix)]
    assert found, f"no README sh block starts with {prefix!r}"
    return found


#: The first line each block run here starts with (comments included).
RUNNERS = (
    "switchboard agents set-password alice",
    'curl -H "Authorization: Bearer $(switchboard agents token alice)"',
    "# $TOKEN: the API token; $ID and $OTHER",
)


def _bash(block: str, env: dict[str, str], cwd: Path, port: str, stdin: str = "") -> str:
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block.replace("127.0.0.1:8080", f"127.0.0.1:{port}")],
        input=stdin,
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        # No controlling terminal: `set-password` reads its two prompts from stdin.
        start_new_session=True,
    )
    assert done.returncode == 0, f"{block}\nexit {done.returncode}\n{done.stdout}{done.stderr}"
    return done.stdout


@pytest.mark.slow
def test_the_readme_shell_examples_run_against_switchboard_run(tmp_path: Path) -> None:
    needs.program("curl")
    (tmp_path / "switchboard.toml").write_text(CONFIG, encoding="utf-8")
    env = _env(
        tmp_path,
        SWITCHBOARD_CONFIG=str(tmp_path / "switchboard.toml"),
        SWITCHBOARD_API_TOKEN=TOKEN,
        SWITCHBOARD_TWILIO_AUTH_TOKEN="readme-twilio",
        SWITCHBOARD_MAILGUN_SIGNING_KEY="readme-mailgun",
        TOKEN=TOKEN,
    )
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    port = env["SWITCHBOARD_HTTP_PORT"]
    base = f"http://127.0.0.1:{port}"
    admin = httpx.Client(base_url=base, headers={"authorization": f"Bearer {TOKEN}"}, timeout=10)

    # `switchboard adapters list` prints the lines the README shows (its `...` skips).
    (console,) = [b for _, info, b in _fences() if info == "console"]
    command, *shown = console.splitlines()
    assert command.startswith("$ ")
    listed = _bash(command[2:], env, tmp_path, port)
    lines = [" ".join(line.split()) for line in listed.splitlines()]
    for want in (" ".join(s.split()) for s in shown if s.strip() != "..."):
        assert want in lines, f"README shows {want!r}; `adapters list` printed:\n{listed}"

    with running(env, tmp_path) as process:
        _wait_healthy(base, process, within_s=60)
        # Mailgun's mail is parsed in `run`'s parse process (settings from the env).
        signed = mailgun_parsed(Mail("readme-mailgun"), key="readme-mailgun")
        mailgun = local_http.post(f"{base}/webhooks/mailgun", **signed, timeout=30)
        assert mailgun.status_code == 200, mailgun.text
        with smtplib.SMTP("127.0.0.1", int(env["SWITCHBOARD_SMTP_PORT"]), timeout=30) as smtp:
            for who in ("ann@example.org", "ann.b@example.net"):
                smtp.sendmail(
                    who,
                    ["support@example.com"],
                    f"From: Ann <{who}>\r\nTo: support@example.com\r\nSubject: hi\r\n"
                    f"Message-ID: <{who}-1>\r\n\r\nHello\r\n".encode(),
                )

        def contact(identity: str) -> dict[str, Any] | None:
            found = admin.get("/api/contacts", params={"identity": identity})
            return found.json() if found.status_code == 200 else None

        ann = _until(lambda: contact("email:ann@example.org"))
        other = _until(lambda: contact("email:ann.b@example.net"))
        env.update(ID=ann["id"], OTHER=other["id"])

        (agents,) = _blocks_starting(RUNNERS[0])
        printed = _bash(agents, env, tmp_path, port, stdin="alice-pass-1\nalice-pass-1\n")
        assert "password of alice set" in printed
        assert len(printed.split()) > 4  # and the token, and the revocation

        (queue,) = _blocks_starting(RUNNERS[1])
        answered = _bash(queue + "\n", env, tmp_path, port)
        assert answered.startswith('{"owner":"alice","items":'), answered

        (merging,) = _blocks_starting(RUNNERS[2])
        printed = _bash(merging, env, tmp_path, port)
        # curl exits 0 on any HTTP answer: what it printed says whether each call worked.
        assert '"type":"io.switchboard.contact.merged.v1","published":true,"by":"alice"' in printed
        assert '"type":"io.switchboard.contact.unmerged.v1","published":true,"by":"bob"' in printed
        assert f"contact {other['id']} merged into {ann['id']}" in printed
        assert f"contact {other['id']} restored, apart from {ann['id']}" in printed
        # Merged by curl, undone by curl, merged by the CLI, undone by the CLI: two again.
        assert _until(lambda: (contact("email:ann.b@example.net") or {}).get("id") == other["id"])
        assert contact("email:ann@example.org")["id"] == ann["id"]  # type: ignore[index]
        records = admin.get(f"/api/contacts/{ann['id']}").json()
        assert "email:ann.b@example.net" not in records["identities"]
        code, _, stderr = _stop(process)
    assert code == 0, stderr[-3000:]


def _until(check: Any, timeout_s: float = 60) -> Any:  # noqa: ANN401
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError("condition not met in time")
