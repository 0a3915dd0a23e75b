"""Control characters through every adapter: accepted, stripped, published.

The attack: a NUL (or an escape sequence) in a Message-ID, a subject, an SMS or a
form's text. Before, the edge answered 250/2xx and the record then failed every
PostgreSQL write downstream. Now each adapter's normalizer strips C0 controls
(bodies keep tab, CR and LF), the message arrives, and nothing on the topic
holds a control character the schema forbids.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from twilio.request_validator import RequestValidator

from ingest.mailgun import MailgunAdapter, MailgunSettings
from ingest.postmark import PostmarkAdapter, PostmarkSettings
from ingest.sendgrid import SendgridAdapter, SendgridSettings
from normalize.schema import InboundMessage
from normalize.webhook import FieldMap
from switchboard.settings import KafkaSettings, NoAuth, TwilioSettings, WebhookSettings
from switchboard.topics import INBOUND
from tests import local_http
from tests.dovecot import Dovecot
from tests.http_helpers import find, http_ingest
from tests.imap_helpers import imap_adapter, mailbox
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
from tests.unit.test_controls import no_controls

pytestmark = pytest.mark.integration

BODIES = frozenset({"text", "text_new", "html", "metadata"})
ESC = "\x1b[2J\x07"  # clear the agent's terminal, ring its bell
TWILIO_TOKEN = "twilio-controls-token"


def _mail(unique: str) -> Mail:
    return Mail(
        tag=f"ctl\x00{unique}",
        name=f"Ann{ESC} Example",
        subject=f"Where is\x00 my order?{ESC}",
        text=f"Hello\x00, my order{ESC} has not arrived.",
    )


def test_smtp(kafka_settings: KafkaSettings, tmp_path: Path, unique: str) -> None:
    mail = _mail(unique)
    with smtp_server(kafka_settings, tmp_path) as smtp:
        code, reply = smtp.send(mail.mime(), mail_from=mail.sender)
    assert code == 250, reply
    inbound, dead = collect(kafka_settings, f"ctl-smtp-{unique}", {queued_id(reply)})
    assert dead == {}
    (message,) = inbound.values()
    no_controls(message, BODIES)
    assert message.thread.message_id == f"ctl{unique}@mail.example.org"
    assert message.text == "Hello, my order[2J has not arrived."


@pytest.mark.parametrize(
    "variant", ["mailgun", "mailgun-mime", "sendgrid", "sendgrid-raw", "postmark", "postmark-raw"]
)
@pytest.mark.slow
def test_email_providers(
    kafka_settings: KafkaSettings, tmp_path: Path, unique: str, variant: str
) -> None:
    mail = _mail(unique)
    requests: dict[str, tuple[str, dict[str, Any]]] = {
        "mailgun": ("/webhooks/mailgun", mailgun_parsed(mail)),
        "mailgun-mime": ("/webhooks/mailgun/mime", mailgun_mime(mail)),
        "sendgrid": ("/webhooks/sendgrid", sendgrid(mail)),
        "sendgrid-raw": ("/webhooks/sendgrid", sendgrid(mail, raw=True)),
        "postmark": ("/webhooks/postmark", postmark(mail)),
        "postmark-raw": ("/webhooks/postmark", postmark(mail, raw=True)),
    }
    path, request = requests[variant]
    providers = [
        (MailgunAdapter, MailgunSettings(signing_key=SecretStr(MAILGUN_KEY))),
        (SendgridAdapter, SendgridSettings(password=SecretStr(SENDGRID_PASSWORD))),
        (PostmarkAdapter, PostmarkSettings(password=SecretStr(POSTMARK_PASSWORD))),
    ]
    with http_ingest(kafka_settings, tmp_path, providers=providers) as http:
        response = local_http.post(f"{http.base}{path}", timeout=30, **request)
    assert response.status_code == 200, response.text
    inbound, dead = collect(
        kafka_settings, f"ctl-{variant}-{unique}", {uuid.UUID(response.json()["id"])}
    )
    assert dead == {}
    (message,) = inbound.values()
    no_controls(message, BODIES)
    assert message.sender.key == "email:ann@example.org"
    assert message.thread.message_id == f"ctl{unique}@mail.example.org"


def test_twilio(kafka_settings: KafkaSettings, tmp_path: Path, unique: str) -> None:
    sid = "SM" + uuid.uuid4().hex
    form = {
        "MessageSid": sid,
        "AccountSid": "AC" + uuid.uuid4().hex,
        "From": "+14155550100",
        "To": "+14155550199",
        "Body": f"Where is\x00 my order?{ESC}\nThanks",
        "NumMedia": "0",
        f"Odd{ESC}Field": "odd\x00value",
    }
    twilio = TwilioSettings(auth_token=[SecretStr(TWILIO_TOKEN)])
    with http_ingest(kafka_settings, tmp_path, twilio=twilio) as http:
        url = f"{http.base}/webhooks/twilio/sms"
        signature = RequestValidator(TWILIO_TOKEN).compute_signature(url, form)
        response = local_http.post(
            url, data=form, headers={"x-twilio-signature": signature}, timeout=30
        )
    assert response.status_code == 200, response.text
    (message,) = find(
        kafka_settings,
        f"ctl-twilio-{unique}",
        INBOUND,
        InboundMessage,
        lambda m: m.provider_message_id == sid,
    )
    no_controls(message, BODIES)
    assert message.text == "Where is my order?[2J\nThanks"


def test_web_hook(kafka_settings: KafkaSettings, tmp_path: Path, unique: str) -> None:
    hook = WebhookSettings(
        name="form",
        auth=NoAuth(kind="none"),
        map=FieldMap(email="email", name="name", text="message", subject="subject"),
    )
    body = {
        "email": f"wendy-{unique}@example.org",
        "name": f"Wendy{ESC}",
        "subject": f"Sub\x00ject{ESC}",
        "message": f"hi\x00there{ESC}\r\nline two",
        f"extra\x00{ESC}": [f"x\x00{ESC}"],
    }
    with http_ingest(kafka_settings, tmp_path, hooks=[hook]) as http:
        response = local_http.post(f"{http.base}/webhooks/form", json=body, timeout=15)
    assert response.status_code == 202, response.text
    inbound, dead = collect(
        kafka_settings, f"ctl-hook-{unique}", {uuid.UUID(response.json()["id"])}
    )
    assert dead == {}
    (message,) = inbound.values()
    no_controls(message, BODIES)
    assert message.text == "hithere[2J\r\nline two"


def test_imap(
    kafka_settings: KafkaSettings,
    tmp_path: Path,
    unique: str,
    dovecot: Dovecot,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    raw = (
        f"From: Alice{ESC} <alice-{unique}@example.org>\r\nTo: support@example.com\r\n"
        f"Subject: Help{ESC}\x00\r\nMessage-ID: <imap\x01{unique}@example.org>\r\n"
        f"Date: Sun, 22 Nov 2026 10:00:00 +0000\r\n\r\nbody{ESC}\x00\r\n"
    ).encode()
    # Dovecot's own delivery, as its LDA would store it (it turns NUL into 0x80 itself).
    dovecot.deliver(raw)
    box = mailbox(dovecot, f"ctl{unique}", monkeypatch.setenv)
    with imap_adapter(kafka_settings, tmp_path, [box]):
        (message,) = find(
            kafka_settings,
            f"ctl-imap-{unique}",
            INBOUND,
            InboundMessage,
            lambda m: m.sender.key == f"email:alice-{unique}@example.org",
            timeout_s=30,
        )
    no_controls(message, BODIES)
    assert message.thread.message_id == f"imap{unique}@example.org"
