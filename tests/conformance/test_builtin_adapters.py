"""The conformance kit on the four built-in adapters, each through its real protocol:
SMTP with smtplib, IMAP against Dovecot, Twilio and the web hooks over HTTP."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import smtplib
import time
from collections.abc import Iterator
from typing import Any

import pytest
from imapclient import IMAPClient
from pydantic import SecretStr
from twilio.request_validator import RequestValidator

from ingest.imap import ImapAdapter
from ingest.smtp import SmtpAdapter
from ingest.testing import Answer, Malformed, Running, adapter_conformance, post
from ingest.twilio import PATH as TWILIO_PATH
from ingest.twilio import TwilioAdapter
from ingest.webhook import WebhookAdapter
from switchboard.settings import (
    ImapSettings,
    SmtpSettings,
    TwilioSettings,
    WebhookSettings,
    WebhooksSettings,
)
from tests.dovecot import PASSWORD, USER, Dovecot, running_dovecot

pytestmark = pytest.mark.integration


def email(tag: str, sender: str = "Ann <ann@example.org>") -> bytes:
    return (
        f"From: {sender}\r\nTo: support@example.com\r\nSubject: Order {tag}\r\n"
        f"Message-ID: <{tag}@kit.example.org>\r\nDate: Sun, 22 Nov 2026 10:00:00 +0000\r\n"
        f"\r\nWhere is order {tag}?\r\n"
    ).encode()


NO_SENDER = b"From: nobody\r\nSubject: ?\r\n\r\nthere is no sender here\r\n"


# -- SMTP --------------------------------------------------------------------


def smtp_deliver(running: Running, sample: dict[str, Any]) -> Answer:
    assert isinstance(running.adapter, SmtpAdapter)
    try:
        with smtplib.SMTP("127.0.0.1", running.adapter.port, timeout=30) as client:
            client.sendmail(sample.get("from", "ann@example.org"), [sample["to"]], sample["raw"])
    except smtplib.SMTPRecipientsRefused as exc:
        code, text = next(iter(exc.recipients.values()))
        return Answer(False, str(code), text.decode() if isinstance(text, bytes) else text)
    except smtplib.SMTPResponseException as exc:
        error = exc.smtp_error
        return Answer(
            False, str(exc.smtp_code), error.decode() if isinstance(error, bytes) else error
        )
    return Answer(True, "250")


TestSmtpConformance = adapter_conformance(
    SmtpAdapter,
    settings=SmtpSettings(port=0, domains=["example.com"], hostname="mx.kit", parse_workers=0),
    deliver=smtp_deliver,
    samples=[
        {"to": "support@example.com", "raw": email("smtp-1")},
        {"to": "billing@example.com", "raw": email("smtp-2", "bob@example.net")},
    ],
    malformed=[
        # Documented: relaying is refused at RCPT; unreadable mail is kept (250) and
        # dead-lettered, because the sender did nothing wrong.
        Malformed({"to": "someone@elsewhere.example", "raw": email("relay")}, status="550"),
        Malformed(
            {"to": "support@example.com", "raw": NO_SENDER, "from": ""},
            status="250",
            expect="dead-letter",
            reason="no-sender",
        ),
    ],
)


# -- IMAP --------------------------------------------------------------------


@pytest.fixture(scope="class")
def kit_dovecot() -> Iterator[Dovecot]:
    with running_dovecot() as server:
        yield server


def imap_settings(request: pytest.FixtureRequest) -> ImapSettings:
    dovecot: Dovecot = request.getfixturevalue("kit_dovecot")
    os.environ["KIT_IMAP_PASSWORD"] = PASSWORD
    return ImapSettings.model_validate(
        {
            "poll_interval_s": 1,
            "idle_resync_s": 1,
            "backoff_max_s": 1,
            "mailboxes": [
                {
                    "name": "support",
                    "host": "127.0.0.1",
                    "port": dovecot.imap_port,
                    "security": "none",
                    "username": USER,
                    "password_env": "KIT_IMAP_PASSWORD",
                    "backfill": "all",
                }
            ],
        }
    )


def imap_deliver(running: Running, raw: bytes) -> Answer:
    """APPEND the mail; acknowledged once the adapter's checkpoint passed its UID."""
    assert isinstance(running.adapter, ImapAdapter)
    box = running.adapter.settings.mailboxes[0]
    with IMAPClient(box.host, port=box.port, ssl=False) as client:
        client.login(USER, PASSWORD)
        response = client.append("INBOX", raw)
    uid = int(response.split(b"]")[0].split()[-1])  # [APPENDUID <validity> <uid>]
    # The negative test (no broker: never checkpointed) waits the whole deadline.
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        checkpoint = running.adapter.store.checkpoint(box.name, "INBOX")
        if checkpoint is not None and checkpoint.last_uid >= uid:
            return Answer(True, "checkpoint")
        time.sleep(0.1)
    return Answer(False, "not-advanced", f"UID {uid} not checkpointed")


TestImapConformance = adapter_conformance(
    ImapAdapter,
    settings=imap_settings,
    deliver=imap_deliver,
    samples=[email("imap-1"), email("imap-2", "Bob <bob@example.net>")],
    malformed=[Malformed(NO_SENDER, status="checkpoint", expect="dead-letter", reason="no-sender")],
    secrets=[PASSWORD],
)


# -- Twilio ------------------------------------------------------------------

TWILIO_TOKEN = "kit-twilio-auth-token"


def twilio_deliver(running: Running, sample: dict[str, Any]) -> Answer:
    assert running.base_url is not None
    form = sample["form"]
    url = f"{running.base_url}{TWILIO_PATH}"
    token = sample.get("token", TWILIO_TOKEN)
    headers = {"x-twilio-signature": RequestValidator(token).compute_signature(url, form)}
    return post(running, TWILIO_PATH, data=form, headers=headers)


def sms(sid: str, sender: str = "+14155550100", body: str = "Where is my order?") -> dict[str, Any]:
    return {"form": {"MessageSid": sid, "From": sender, "To": "+14155550199", "Body": body}}


TestTwilioConformance = adapter_conformance(
    TwilioAdapter,
    settings=TwilioSettings(auth_token=[SecretStr(TWILIO_TOKEN)], enabled=True),
    deliver=twilio_deliver,
    samples=[sms("SM" + "1" * 32), sms("SM" + "2" * 32, "+14155550101", "second")],
    malformed=[
        # Documented: a bad signature is 403 (and kept as a dead letter); a signed
        # request that cannot be read is kept and answered 200 so Twilio stops.
        Malformed({**sms("SM" + "3" * 32), "token": "not-the-token"}, status="403"),
        Malformed(
            {"form": {"From": "+14155550100", "Body": "no sid"}},
            status="200",
            expect="dead-letter",
            reason="missing-field",
        ),
    ],
)


# -- generic web hooks ---------------------------------------------------------

HOOK_SECRET = "kit-hook-secret-value"


def hook_settings(_request: pytest.FixtureRequest) -> WebhooksSettings:
    os.environ["KIT_HOOK_SECRET"] = HOOK_SECRET
    hook = WebhookSettings.model_validate(
        {
            "name": "kit-form",
            "auth": {
                "kind": "hmac-sha256",
                "secret_env": "KIT_HOOK_SECRET",
                "allow_replay": True,  # the kit signs the body alone
            },
            "map": {"email": "email", "name": "name", "text": "message", "id": "id"},
        }
    )
    return WebhooksSettings(hooks=[hook])


def hook_deliver(running: Running, sample: dict[str, Any]) -> Answer:
    body = json.dumps(sample).encode()
    digest = hmac.new(HOOK_SECRET.encode(), body, hashlib.sha256).hexdigest()
    headers = {"content-type": "application/json", "x-signature": digest}
    return post(running, "/webhooks/kit-form", content=body, headers=headers)


TestWebhookConformance = adapter_conformance(
    WebhookAdapter,
    settings=hook_settings,
    deliver=hook_deliver,
    samples=[
        {"id": "f-1", "email": "ann@example.org", "name": "Ann", "message": "hello"},
        {"id": "f-2", "email": "bob@example.net", "message": "second"},
    ],
    malformed=[Malformed({"id": "f-3", "message": "nobody"}, status="400")],
)
