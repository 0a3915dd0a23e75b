"""The conformance kit on the three inbound-parse providers, built only with the SDK."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import SecretStr

from ingest.mailgun import MailgunAdapter, MailgunSettings
from ingest.postmark import PostmarkAdapter, PostmarkSettings
from ingest.sendgrid import SendgridAdapter, SendgridSettings
from ingest.testing import Answer, Deliver, Malformed, Running, adapter_conformance, post
from tests.provider_payloads import (
    MAILGUN_KEY,
    POSTMARK_PASSWORD,
    SENDGRID_PASSWORD,
    Mail,
    basic,
    mailgun_mime,
    mailgun_parsed,
    mailgun_signature,
    postmark,
    sendgrid,
)

pytestmark = pytest.mark.integration

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII="
)


Build = Callable[[Mail], dict[str, Any]]


def deliverer(path: str, variants: dict[str, tuple[str, Build]]) -> Deliver:
    """Samples are (variant, Mail): the variant names the path and builds the request.
    Any other kind is a hand-made request to ``path``, its httpx arguments as given."""

    def deliver(running: Running, sample: tuple[str, Any]) -> Answer:
        kind, value = sample
        if kind in variants:
            variant_path, build = variants[kind]
            return post(running, variant_path, **build(value))
        return post(running, path, **value)

    return deliver


mailgun_deliver = deliverer(
    "/webhooks/mailgun",
    {
        "parsed": ("/webhooks/mailgun", mailgun_parsed),
        "mime": ("/webhooks/mailgun/mime", mailgun_mime),
        # Signed when delivered, not when collected: a long run reaches this case
        # minutes after collection, past Mailgun's 300 s freshness window.
        "unreadable": (
            "/webhooks/mailgun",
            lambda _mail: {"data": {"subject": "no headers", **mailgun_signature()}},
        ),
    },
)

TestMailgunConformance = adapter_conformance(
    MailgunAdapter,
    settings=MailgunSettings(signing_key=SecretStr(MAILGUN_KEY)),
    deliver=mailgun_deliver,
    samples=[
        ("parsed", Mail("mg-1")),
        ("mime", Mail("mg-2", sender="bob@example.net", name="Bob")),
        ("parsed", Mail("mg-3", attachments=(("dot.png", "image/png", PNG),))),
    ],
    malformed=[
        # Documented: wrong signature 403 (Mailgun retries), stale 406 (it does not;
        # the request is kept), signed but unreadable: kept and answered 200.
        Malformed(("parsed-raw", mailgun_parsed(Mail("mg-x"), key="wrong-key")), status="403"),
        Malformed(
            ("parsed-raw", mailgun_parsed(Mail("mg-old"), timestamp=int(time.time()) - 3600)),
            status="406",
        ),
        Malformed(
            ("unreadable", Mail("mg-unreadable")),
            status="200",
            expect="dead-letter",
            reason="malformed",
        ),
    ],
)


sendgrid_deliver = deliverer(
    "/webhooks/sendgrid",
    {
        "parsed": ("/webhooks/sendgrid", sendgrid),
        "raw": ("/webhooks/sendgrid", lambda mail: sendgrid(mail, raw=True)),
    },
)

TestSendgridConformance = adapter_conformance(
    SendgridAdapter,
    settings=SendgridSettings(password=SecretStr(SENDGRID_PASSWORD)),
    deliver=sendgrid_deliver,
    samples=[
        ("parsed", Mail("sg-1", html="<p>Hello</p>")),
        ("raw", Mail("sg-2", sender="bob@example.net")),
        ("parsed", Mail("sg-3", attachments=(("dot.png", "image/png", PNG),))),
    ],
    malformed=[
        Malformed(
            ("other", {**sendgrid(Mail("sg-x")), "headers": basic("sendgrid", "wrong")}),
            status="401",
        ),
        Malformed(
            (
                "other",
                {
                    "files": {"envelope": (None, b"{not json"), "text": (None, b"hi")},
                    "headers": basic("sendgrid", SENDGRID_PASSWORD),
                },
            ),
            status="200",
            expect="dead-letter",
            reason="malformed",
        ),
    ],
)


postmark_deliver = deliverer(
    "/webhooks/postmark",
    {
        "parsed": ("/webhooks/postmark", postmark),
        "raw": ("/webhooks/postmark", lambda mail: postmark(mail, raw=True)),
    },
)

TestPostmarkConformance = adapter_conformance(
    PostmarkAdapter,
    settings=PostmarkSettings(password=SecretStr(POSTMARK_PASSWORD)),
    deliver=postmark_deliver,
    samples=[
        ("parsed", Mail("pm-1")),
        ("raw", Mail("pm-2", sender="bob@example.net")),
        ("parsed", Mail("pm-3", attachments=(("dot.png", "image/png", PNG),))),
    ],
    malformed=[
        Malformed(("other", {**postmark(Mail("pm-x")), "headers": {}}), status="401"),
        Malformed(
            (
                "other",
                {
                    "content": b'{"From": ',
                    "headers": {
                        "content-type": "application/json",
                        **basic("postmark", POSTMARK_PASSWORD),
                    },
                },
            ),
            status="200",
            expect="dead-letter",
            reason="malformed",
        ),
    ],
)
