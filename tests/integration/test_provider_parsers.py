"""The providers' mail is parsed in a parse process beside the HTTP server: input
that makes the parser crawl or crash costs one killable process two time limits,
never the server, never a thread for good, and never another sender's mail.

The adapters below are the real ones with one change: a marker in the body makes
their parse hang or the parse process die, standing in for the next pathological
input to the standard library's MIME parser (the last one, quadratic parameters,
is fixed in normalize/mimeparams.py). Real HTTP server, real parse process, real
broker."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from uuid import UUID

import httpx
import pytest
from pydantic import SecretStr

from ingest.mailgun import MailgunAdapter, MailgunSettings
from ingest.postmark import PostmarkAdapter, PostmarkSettings
from ingest.sdk import InboundRequest
from ingest.sendgrid import SendgridAdapter, SendgridSettings
from normalize.content import Normalized
from switchboard.settings import KafkaSettings
from tests.http_helpers import http_ingest
from tests.provider_payloads import (
    MAILGUN_KEY,
    POSTMARK_PASSWORD,
    SENDGRID_PASSWORD,
    Mail,
    mailgun_parsed,
    postmark,
    sendgrid,
)
from tests.smtp_helpers import collect

pytestmark = pytest.mark.integration

HANG = b"HANG-THE-PARSER"
CRASH = b"CRASH-THE-PARSER"


class HangingMailgun(MailgunAdapter):
    """Mailgun, whose signature check (a multipart parse of what anyone posts) hangs."""

    def authenticate(self, request: InboundRequest) -> None:
        if HANG in request.body:
            time.sleep(3600)
        super().authenticate(request)


class CrashingSendgrid(SendgridAdapter):
    def parse(self, request: InboundRequest) -> Normalized:
        if CRASH in request.body:
            os._exit(3)  # as a segfault in a C extension would
        return super().parse(request)


class HangingPostmark(PostmarkAdapter):
    def parse(self, request: InboundRequest) -> Normalized:
        if HANG in request.body:
            time.sleep(3600)
        return super().parse(request)


PROVIDERS = [
    (HangingMailgun, MailgunSettings(signing_key=SecretStr(MAILGUN_KEY))),
    (CrashingSendgrid, SendgridSettings(password=SecretStr(SENDGRID_PASSWORD))),
    (HangingPostmark, PostmarkSettings(password=SecretStr(POSTMARK_PASSWORD))),
]


def test_a_request_that_hangs_the_signature_check_is_refused_and_the_next_is_taken(
    kafka_settings: KafkaSettings, tmp_path: Path, unique: str
) -> None:
    """Before, the check ran on a thread of the server with no limit: the request was
    never answered and the thread was held for good. Now its parse process is killed
    at the limit, the request tried once more and refused 406 (Mailgun does not retry
    a 406) with bounded evidence; a signed mail sent meanwhile is accepted."""
    bad = Mail(f"hang-{unique}", text=f"{HANG.decode()} {'x' * 10_000}")
    good = Mail(f"good-{unique}")
    with (
        http_ingest(kafka_settings, tmp_path, providers=PROVIDERS, parse_timeout_s=1.0) as http,
        ThreadPoolExecutor(2) as pool,
    ):
        url = f"{http.base}/webhooks/mailgun"
        hanging = pool.submit(httpx.post, url, **mailgun_parsed(bad), timeout=60)
        time.sleep(0.3)  # the bad request is in the parse process first
        taken = pool.submit(httpx.post, url, **mailgun_parsed(good), timeout=60)
        refused, accepted = hanging.result(), taken.result()
    assert refused.status_code == 406, refused.text
    assert refused.json()["reason"] == "unreadable"
    assert accepted.status_code == 200, accepted.text
    refused_id, accepted_id = UUID(refused.json()["id"]), UUID(accepted.json()["id"])
    inbound, dead = collect(kafka_settings, f"hang-{unique}", {refused_id, accepted_id})
    assert set(inbound) == {accepted_id}
    assert inbound[accepted_id].thread.message_id == f"good-{unique}@mail.example.org"
    letter = dead[refused_id]
    assert (letter.adapter, letter.reason) == ("mailgun", "unreadable")
    assert "1 s, twice" in (letter.detail or "")
    # Evidence of a request nobody authenticated is bounded: its first bytes only.
    assert letter.raw is not None
    assert letter.metadata["truncated"] is True


def test_mail_that_crashes_or_hangs_the_parser_is_kept_whole_and_others_go_on(
    kafka_settings: KafkaSettings, tmp_path: Path, unique: str
) -> None:
    """Authenticated provider mail that kills its parse process (SendGrid) or
    outlasts the limit (Postmark) is tried once more on a fresh process, then kept
    as a dead letter with the whole body and answered 200, so the provider stops
    retrying what would never parse; mail after it goes through."""
    crash = Mail(f"crash-{unique}", text=f"{CRASH.decode()} {'y' * 20_000}")
    hang = Mail(f"hang-{unique}", text=f"{HANG.decode()} {'z' * 20_000}")
    fine = Mail(f"fine-{unique}")
    with (
        http_ingest(kafka_settings, tmp_path, providers=PROVIDERS, parse_timeout_s=1.0) as http,
        ThreadPoolExecutor(4) as pool,
    ):
        posts = {
            "crash": pool.submit(
                httpx.post, f"{http.base}/webhooks/sendgrid", **sendgrid(crash), timeout=60
            ),
            "hang": pool.submit(
                httpx.post, f"{http.base}/webhooks/postmark", **postmark(hang), timeout=60
            ),
        }
        time.sleep(0.3)
        posts["fine"] = pool.submit(
            httpx.post, f"{http.base}/webhooks/sendgrid", **sendgrid(fine), timeout=60
        )
        answers = {name: post.result() for name, post in posts.items()}
        blobs = http.blobs
        for name, answer in answers.items():
            assert answer.status_code == 200, (name, answer.text)
        ids = {name: UUID(answer.json()["id"]) for name, answer in answers.items()}
        inbound, dead = collect(kafka_settings, f"crash-{unique}", set(ids.values()))
        assert set(inbound) == {ids["fine"]}
        assert inbound[ids["fine"]].thread.message_id == f"fine-{unique}@mail.example.org"
        for name, mail in (("crash", crash), ("hang", hang)):
            letter = dead[ids[name]]
            assert letter.reason == "normalizer-error", (name, letter)
            assert "twice" in (letter.detail or "")
            assert letter.raw is not None
            assert mail.text.encode() in blobs.get(letter.raw.sha256)  # whole, not clipped
