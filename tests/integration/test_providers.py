"""Mailgun, SendGrid and Postmark through the real HTTP server, broker and blob
store, with payloads in the providers' documented formats (tests/provider_payloads)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from pydantic import SecretStr

from ingest.mailgun import MailgunAdapter, MailgunSettings
from ingest.postmark import PostmarkAdapter, PostmarkSettings
from ingest.sendgrid import SendgridAdapter, SendgridSettings
from switchboard.settings import KafkaSettings
from tests import local_http
from tests.conformance.test_provider_adapters import PNG
from tests.http_helpers import RunningHttp, http_ingest
from tests.provider_payloads import (
    MAILGUN_KEY,
    POSTMARK_PASSWORD,
    SENDGRID_PASSWORD,
    Mail,
    mailgun_mime,
    mailgun_parsed,
    postmark,
    sendgrid,
)
from tests.smtp_helpers import collect, queued_id, smtp_server

pytestmark = pytest.mark.integration

PROVIDERS = [
    (MailgunAdapter, MailgunSettings(signing_key=SecretStr(MAILGUN_KEY))),
    (SendgridAdapter, SendgridSettings(password=SecretStr(SENDGRID_PASSWORD))),
    (PostmarkAdapter, PostmarkSettings(password=SecretStr(POSTMARK_PASSWORD))),
]


def _post(http: RunningHttp, path: str, request: dict[str, Any]) -> UUID:
    response = local_http.post(f"{http.base}{path}", timeout=30, **request)
    assert response.status_code == 200, response.text
    return UUID(response.json()["id"])


def test_one_email_through_smtp_and_every_provider_variant_has_one_dedupe_key(
    kafka_settings: KafkaSettings, tmp_path: Path, unique: str
) -> None:
    mail = Mail(f"same-{unique}")
    postmark_id = f"b7bc2f4a-{unique}"
    with smtp_server(kafka_settings, tmp_path / "smtp") as smtp:
        code, reply = smtp.send(mail.mime(), mail_from=mail.sender)
        assert code == 250, reply
        ids = {"smtp": queued_id(reply)}
    with http_ingest(kafka_settings, tmp_path / "http", providers=PROVIDERS) as http:
        ids["mailgun parsed"] = _post(http, "/webhooks/mailgun", mailgun_parsed(mail))
        ids["mailgun mime"] = _post(http, "/webhooks/mailgun/mime", mailgun_mime(mail))
        ids["sendgrid parsed"] = _post(http, "/webhooks/sendgrid", sendgrid(mail))
        ids["sendgrid raw"] = _post(http, "/webhooks/sendgrid", sendgrid(mail, raw=True))
        ids["postmark parsed"] = _post(
            http, "/webhooks/postmark", postmark(mail, postmark_id=postmark_id)
        )
        ids["postmark raw"] = _post(
            http, "/webhooks/postmark", postmark(mail, raw=True, postmark_id=postmark_id)
        )
    inbound, dead = collect(kafka_settings, f"providers-{unique}", set(ids.values()))
    assert dead == {}
    messages = {variant: inbound[i] for variant, i in ids.items()}
    assert len({m.dedupe_key for m in messages.values()}) == 1
    assert next(iter(messages.values())).dedupe_key.startswith(
        f"email-mid:same-{unique}@mail.example.org#"
    )
    for variant, message in messages.items():
        assert message.sender.key == "email:ann@example.org", variant
        assert message.sender.display_name == "Ann Example", variant
        assert message.subject == mail.subject, variant
        assert message.text == mail.text, variant
        assert message.channel == "email", variant
        assert message.thread.message_id == f"same-{unique}@mail.example.org", variant
    # Postmark's own id is kept, but it is not what deduplicates.
    assert messages["postmark parsed"].provider_message_id == postmark_id
    assert messages["postmark raw"].provider_message_id == postmark_id
    for variant, message in messages.items():  # the envelope recipient, from each format
        roles = {(r.value, r.role.value) for r in message.recipients}
        assert ("support@example.com", "envelope") in roles, (variant, roles)
        assert ("support@example.com", "to") in roles, (variant, roles)


def test_attachments_and_declared_charsets_survive_the_parsed_forms(
    kafka_settings: KafkaSettings, tmp_path: Path, unique: str
) -> None:
    with_png = Mail(f"att-{unique}", attachments=(("dot.png", "image/png", PNG),))
    latin = Mail(f"latin-{unique}", subject="Café crème", text="Où est ma commande ? Merci.")
    with http_ingest(kafka_settings, tmp_path, providers=PROVIDERS) as http:
        ids = {
            "mailgun": _post(http, "/webhooks/mailgun", mailgun_parsed(with_png)),
            "sendgrid": _post(http, "/webhooks/sendgrid", sendgrid(with_png)),
            "postmark": _post(http, "/webhooks/postmark", postmark(with_png)),
            "latin": _post(http, "/webhooks/sendgrid", sendgrid(latin, charset="iso-8859-1")),
            # Mailgun's urlencoded form with escaped UTF-8 (a normalizer-error dead
            # letter until 2026-12-02: parse_qsl on bytes cannot decode an escape).
            "mailgun latin": _post(http, "/webhooks/mailgun", mailgun_parsed(latin)),
        }
        inbound, _ = collect(kafka_settings, f"attach-{unique}", set(ids.values()))
        for provider in ("mailgun", "sendgrid", "postmark"):
            message = inbound[ids[provider]]
            [attachment] = message.attachments
            assert attachment.filename == "dot.png", provider
            assert attachment.content_type == "image/png", provider
            assert attachment.sha256 == hashlib.sha256(PNG).hexdigest(), provider
            assert attachment.blob is not None
            assert http.blobs.get(attachment.blob.sha256) == PNG, provider
            assert message.raw is not None  # the provider's payload, as received
            assert http.blobs.get(message.raw.sha256), provider
        for variant in ("latin", "mailgun latin"):
            assert inbound[ids[variant]].subject == "Café crème", variant
            assert inbound[ids[variant]].text == "Où est ma commande ? Merci.", variant


def test_mailgun_refuses_bad_signatures_and_keeps_stale_signed_requests(
    kafka_settings: KafkaSettings, tmp_path: Path, unique: str
) -> None:
    mail = Mail(f"old-{unique}")
    with http_ingest(kafka_settings, tmp_path, providers=PROVIDERS) as http:
        url = f"{http.base}/webhooks/mailgun"
        forged = local_http.post(url, **mailgun_parsed(mail, key="not-the-key"), timeout=30)
        assert forged.status_code == 403, forged.text
        unsigned = local_http.post(url, data={"subject": "hi"}, timeout=30)
        assert unsigned.status_code == 403, unsigned.text
        stale = local_http.post(url, **mailgun_parsed(mail, timestamp=1_700_000_000), timeout=30)
        assert stale.status_code == 406, stale.text
        assert stale.json()["reason"] == "stale"
        wrong_type = local_http.post(url, json={"a": 1}, timeout=30)
        assert wrong_type.status_code == 415
    _, dead = collect(kafka_settings, f"stale-{unique}", {UUID(stale.json()["id"])})
    [letter] = dead.values()
    assert (letter.adapter, letter.reason) == ("mailgun", "stale")
    assert letter.raw is not None
    assert mail.tag.encode() in http.blobs.get(letter.raw.sha256)
    # The forged and unsigned requests are refused and not recorded: only what
    # carries Mailgun's valid signature may fill the dead-letter topic.


def test_a_postmark_document_nested_too_deeply_is_refused_not_a_500(
    kafka_settings: KafkaSettings, tmp_path: Path, unique: str
) -> None:
    """Parsed by json (under its own ~1,000 levels), deeper than any provider nests: a
    malformed request like any other (200, so Postmark does not retry it, and a dead
    letter that says why), and the next mail goes through."""
    mail = Mail(tag=f"deep-{unique}")
    request = postmark(mail)
    request["json"]["Headers"] = json.loads("[" * 700 + "]" * 700)
    with http_ingest(kafka_settings, tmp_path, providers=PROVIDERS) as http:
        deep = _post(http, "/webhooks/postmark", request)
        fine = _post(http, "/webhooks/postmark", postmark(mail))
    inbound, dead = collect(kafka_settings, f"deep-{unique}", {deep, fine})
    assert set(inbound) == {fine}
    assert dead[deep].reason == "malformed"
    assert "nested too deeply" in (dead[deep].detail or "")
