"""`switchboard send` signs as each real sender does, checked by the real HTTP role.

One `switchboard ingest http` on the session broker serves hooks of every scheme
(bearer; HMAC with a prefix, a timestamp and a signed Idempotency-Key; HMAC without
a timestamp; a form-only hook) and Twilio behind a public URL that differs from the
address posted to, as behind a TLS proxy. `send` is run as a user runs it.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from switchboard.broker import EmbeddedBroker
from tests.e2e.test_run import SWITCHBOARD, _env, _stop, _wait_healthy, running

pytestmark = pytest.mark.e2e

CONFIG = """
[[webhooks]]
name = "bearer"
auth = { kind = "bearer", token_env = "SEND_BEARER" }
map = { email = "email", text = "message" }

[[webhooks]]
name = "signed"
map = { email = "email", text = "message" }
[webhooks.auth]
kind = "hmac-sha256"
secret_env = "SEND_SECRET"
header = "X-Hub-Signature-256"
prefix = "sha256="
timestamp_header = "X-Request-Timestamp"
signed_headers = ["Idempotency-Key"]

[[webhooks]]
name = "replayable"
auth = { kind = "hmac-sha256", secret_env = "SEND_SECRET", allow_replay = true }
map = { email = "email", text = "message" }

[[webhooks]]
name = "form"
auth = { kind = "none" }
map = { email = "email", text = "message" }
content_types = ["form"]
"""


@pytest.mark.slow
def test_every_scheme_is_accepted_and_a_wrong_secret_is_refused(
    tmp_path: Path, kafka_broker: EmbeddedBroker, unique: str
) -> None:
    (tmp_path / "switchboard.toml").write_text(CONFIG)
    env = _env(
        tmp_path,
        SWITCHBOARD_KAFKA_BOOTSTRAP=kafka_broker.bootstrap,
        SWITCHBOARD_TWILIO_AUTH_TOKEN="send-twilio-token",
        SWITCHBOARD_PUBLIC_URL="https://hooks.example.com/",
        SEND_BEARER="send-bearer-token",
        SEND_SECRET="send-hmac-secret",
        # One process: the default here is a supervisor and two workers
        # (tests/e2e/test_workers.py covers those), which `send` does not need.
        SWITCHBOARD_HTTP_WORKERS="1",
    )
    base = f"http://127.0.0.1:{env['SWITCHBOARD_HTTP_PORT']}"

    def send(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*SWITCHBOARD, "send", *args],
            env={**env, **extra},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    body = json.dumps({"email": "erin@example.org", "message": f"hello {unique}"})
    with running(env, tmp_path, "ingest", "http") as process:
        _wait_healthy(base, process)
        for hook in ("bearer", "signed", "replayable"):
            sent = send("hook", hook, "--json", body, "--idempotency-key", f"key-{unique}")
            assert sent.returncode == 0, (hook, sent.stdout, sent.stderr)
            assert sent.stdout.startswith("202 Accepted"), (hook, sent.stdout)
            answer = json.loads(sent.stdout.splitlines()[1])
            # Only a hook whose signature covers the key may dedupe on it.
            keyed = f"key-{unique}" in answer["dedupe_key"]
            assert keyed == (hook != "replayable"), (hook, answer)
        sent = send("hook", "form", "--form", "email=erin@example.org", "--form", "message=hi")
        assert sent.returncode == 0, sent.stdout + sent.stderr
        sent = send("hook", "form", "--json", body)
        assert sent.returncode == 2
        assert "accepts form only" in sent.stderr
        # Twilio signs the public URL it called; send signs that and posts locally.
        sent = send("sms", "--from", "+14155550100", "--text", f"sms {unique}")
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert sent.stdout.startswith("200 OK"), sent.stdout
        # A sender with the wrong secret or token is refused, and send says so.
        sent = send("hook", "signed", "--json", body, SEND_SECRET="not-the-secret")
        assert sent.returncode == 1
        assert sent.stdout.startswith("403 Forbidden"), sent.stdout
        sent = send(
            "sms", "--from", "+14155550100", "--text", "x", SWITCHBOARD_TWILIO_AUTH_TOKEN="wrong"
        )
        assert sent.returncode == 1
        assert sent.stdout.startswith("403 Forbidden"), sent.stdout
        code, _, stderr = _stop(process)
    assert code == 0, stderr[-3000:]
