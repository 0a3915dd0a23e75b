"""Mailgun, SendGrid and Postmark verdicts, through the real HTTP server and broker
(issue 17): recorded as ``provider:<name>``; the From address is verified only
where the provider's verdict amounts to a DMARC pass (a DKIM pass for exactly the
From domain), never on SPF, which speaks for the envelope."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from normalize.schema import InboundMessage
from switchboard.settings import KafkaSettings
from tests import local_http
from tests.http_helpers import RunningHttp, http_ingest
from tests.integration.test_providers import PROVIDERS
from tests.provider_payloads import Mail, mailgun_mime, mailgun_parsed, postmark, sendgrid
from tests.smtp_helpers import collect

pytestmark = pytest.mark.integration


def _post(http: RunningHttp, path: str, request: dict[str, Any]) -> UUID:
    response = local_http.post(f"{http.base}{path}", timeout=30, **request)
    assert response.status_code == 200, response.text
    return UUID(response.json()["id"])


def _checks(message: InboundMessage) -> set[tuple[str, str, str | None]]:
    assert message.authentication is not None
    return {(c.method, c.result, c.domain) for c in message.authentication.checks}


def test_provider_verdicts_are_mapped_and_only_an_aligned_dkim_pass_verifies(
    kafka_settings: KafkaSettings, tmp_path: Path, unique: str
) -> None:
    mail = Mail(f"auth-{unique}")
    aligned = "{@example.org : pass}"
    foreign = "{@bulk-sender.example : pass, @example.org : fail}"
    with http_ingest(kafka_settings, tmp_path, providers=PROVIDERS) as http:
        ids = {
            "sendgrid aligned": _post(http, "/webhooks/sendgrid", sendgrid(mail, dkim=aligned)),
            "sendgrid raw aligned": _post(
                http, "/webhooks/sendgrid", sendgrid(mail, raw=True, dkim=aligned)
            ),
            "sendgrid foreign": _post(http, "/webhooks/sendgrid", sendgrid(mail, dkim=foreign)),
            "sendgrid spf only": _post(http, "/webhooks/sendgrid", sendgrid(mail)),
            "mailgun parsed": _post(http, "/webhooks/mailgun", mailgun_parsed(mail)),
            "mailgun mime": _post(http, "/webhooks/mailgun/mime", mailgun_mime(mail)),
            "postmark": _post(http, "/webhooks/postmark", postmark(mail)),
        }
    inbound, dead = collect(kafka_settings, f"provider-auth-{unique}", set(ids.values()))
    assert dead == {}
    got = {variant: inbound[i] for variant, i in ids.items()}

    for variant in ("sendgrid aligned", "sendgrid raw aligned"):
        message = got[variant]
        assert message.sender.assurance == "verified", variant
        assert message.sender.evidence == "provider:sendgrid dkim=pass header.d=example.org"
        assert message.authentication is not None
        assert message.authentication.source == "provider:sendgrid"
        assert ("dkim", "pass", "example.org") in _checks(message)

    assert _checks(got["sendgrid foreign"]) == {
        ("spf", "pass", "example.org"),
        ("dkim", "pass", "bulk-sender.example"),
        ("dkim", "fail", "example.org"),
    }
    assert _checks(got["sendgrid spf only"]) == {("spf", "pass", "example.org")}
    for variant in ("mailgun parsed", "mailgun mime"):
        assert _checks(got[variant]) == {("spf", "pass", "example.org"), ("dkim", "pass", None)}
        assert got[variant].authentication.source == "provider:mailgun"  # type: ignore[union-attr]
    assert _checks(got["postmark"]) == {("spf", "pass", "example.org")}
    for variant in ("sendgrid foreign", "sendgrid spf only", "mailgun parsed", "postmark"):
        assert got[variant].sender.assurance == "claimed", variant
        assert got[variant].sender.evidence is None, variant
