"""What on-call uses: /metrics, `switchboard status`, and a graceful SIGTERM."""

from __future__ import annotations

import smtplib
import time
from pathlib import Path

import httpx
import pytest

from tests import local_http
from tests.e2e.test_run import (
    _env,
    _stop,
    _wait_healthy,
    running,
    switchboard_status,
)

# slow: among the longest scenarios, left to `make test` (not `make test-quick`).
pytestmark = [pytest.mark.e2e, pytest.mark.slow]

EMAIL = (
    b"From: Olga <olga@example.org>\r\nTo: support@example.com\r\n"
    b"Subject: metrics\r\nMessage-ID: <ops-1@example.org>\r\n\r\nHello\r\n"
)


def _metric(text: str, name: str, **labels: str) -> float | None:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        key, value = line.rsplit(" ", 1)
        metric, _, rest = key.partition("{")
        found = ",".join(sorted(rest.rstrip("}").split(","))) if rest else ""
        if metric == name and found == want:
            return float(value)
    return None


def test_metrics_status_and_a_graceful_stop(tmp_path: Path) -> None:
    # Archive files roll after 1 s instead of 300: the archive's lag in the status.
    env = _env(tmp_path, SWITCHBOARD_SMTP_DOMAINS="example.com", SWITCHBOARD_ARCHIVE_ROLL_S="1")
    base = f"http://127.0.0.1:{env['SWITCHBOARD_HTTP_PORT']}"
    smtp_port = int(env["SWITCHBOARD_SMTP_PORT"])
    with running(env, tmp_path) as process:
        _wait_healthy(base, process, within_s=60)
        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as smtp:
            smtp.sendmail("olga@example.org", ["support@example.com"], EMAIL)
            smtp.mail("olga@example.org")
            code, _ = smtp.rcpt("someone@elsewhere.example")  # relay refused
            assert code == 550

        deadline = time.monotonic() + 30
        metrics = ""
        while time.monotonic() < deadline:
            metrics = local_http.get(f"{base}/metrics", timeout=5).text
            routed = _metric(
                metrics, "switchboard_router_decisions_total", result="routed", reason="default"
            )
            if routed:
                break
            time.sleep(0.3)
        assert _metric(metrics, "switchboard_messages_received_total", adapter="smtp") == 1
        assert (
            _metric(metrics, "switchboard_messages_accepted_total", adapter="smtp", via="kafka")
            == 1
        )
        assert (
            _metric(metrics, "switchboard_messages_rejected_total", adapter="smtp", reason="relay")
            == 1
        )
        assert _metric(metrics, "switchboard_handoff_seconds_count", adapter="smtp") == 1
        assert (
            _metric(
                metrics, "switchboard_router_decisions_total", result="routed", reason="default"
            )
            == 1
        )
        assert _metric(metrics, "switchboard_spool_messages") == 0

        # Every event is in an archive file within about roll_s and an idle poll, and
        # the archive's committed offsets follow its files though no record follows.
        archived = (
            "  switchboard-archive: lag 0 (events not in a file yet: a file rolls every roll_s)"
        )
        deadline = time.monotonic() + 30
        while True:
            status = switchboard_status(env, tmp_path)
            assert status.returncode == 0, status.stderr
            lines = status.stdout.splitlines()
            if archived in lines or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert archived in lines, status.stdout
        assert lines[0].startswith("kafka: 127.0.0.1:"), status.stdout
        assert "  switchboard-router: lag 0" in lines, status.stdout  # it committed
        assert "router: 1 contacts, 1 messages, 0 events not yet published" in lines
        assert any(line.startswith("spool http-imap-smtp.sqlite3: 0 messages") for line in lines)
        assert any(line.strip().endswith("1 open") for line in lines), status.stdout

        # A session in the middle of a transaction when SIGTERM arrives gets 421.
        session = smtplib.SMTP("127.0.0.1", smtp_port, timeout=30)
        session.ehlo("client.example.org")
        assert session.mail("olga@example.org")[0] == 250
        code, took, stderr = _stop(process)
        reply = session.getreply()
        session.close()
    assert code == 0, stderr[-3000:]
    assert took < 10
    assert reply[0] == 421, reply
    with pytest.raises(httpx.TransportError):
        local_http.get(f"{base}/healthz", timeout=2)
