"""Replays past dedupe, and refused requests that fill the disk (issue 16).

Each test names the attack it runs. They use the real HTTP server, the real
broker, the real CLI and PostgreSQL where the behaviour touches them.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pytest
from prometheus_client import REGISTRY
from pydantic import SecretStr
from sqlalchemy import Engine, delete, select, update
from twilio.request_validator import RequestValidator

from ingest.evidence import EvidenceBudget
from ingest.mailgun import MailgunAdapter, MailgunSettings
from ingest.replay import Claim, UsedTokens, webhook_tokens
from normalize.content import Blob
from normalize.schema import Attachment, DeadLetter, InboundMessage
from router.tables import outbox
from sinks.queue import QueueStore
from switchboard.blobs import BlobCollector, FileBlobStore, collect_garbage
from switchboard.bootstrap import blob_references
from switchboard.databases import upgrade
from switchboard.db import make_engine
from switchboard.events import TYPE_ROUTED
from switchboard.settings import KafkaSettings, Settings, TwilioSettings, WebhookSettings
from switchboard.topics import DEADLETTER, INBOUND
from tests.factories import inbound_message
from tests.http_helpers import find, http_ingest
from tests.provider_payloads import (
    MAILGUN_KEY,
    Mail,
    mailgun_mime,
    mailgun_parsed,
    mailgun_signature,
)
from tests.router_helpers import store_for
from tests.smtp_helpers import collect

pytestmark = pytest.mark.integration

TOKEN = "twilio-replay-token-0123456789abcdef"
ACCOUNT = "AC" + "a" * 32
PATH = "/webhooks/twilio/sms"
SECRET = "hook-replay-secret"
ROOT = Path(__file__).resolve().parents[2]


def twilio(**overrides: object) -> TwilioSettings:
    return TwilioSettings(auth_token=[SecretStr(TOKEN)], **overrides)  # type: ignore[arg-type]


def signed_post(client: httpx.Client, url: str, form: dict[str, str], signature: str) -> int:
    response = client.post(url, data=form, headers={"x-twilio-signature": signature})
    return response.status_code


def test_a_folded_message_sid_replay_is_refused_and_dead_lettered(
    kafka_settings: KafkaSettings, tmp_path: Path, unique: str
) -> None:
    # Attack: Twilio signs keys and values concatenated without separators, so a
    # captured request re-sent with NumMedia folded into MessageSid validates and,
    # before the SID shape check, got a new dedupe key (a second message).
    sid = f"SM{unique:0<32}"
    form = {"AccountSid": ACCOUNT, "MessageSid": sid, "NumMedia": "0", "From": "+14155550100"}
    folded = {"AccountSid": ACCOUNT, "MessageSid": f"{sid}NumMedia0", "From": "+14155550100"}
    with (
        http_ingest(kafka_settings, tmp_path, twilio=twilio()) as app,
        httpx.Client(timeout=30) as client,
    ):
        url = app.base + PATH
        signature = RequestValidator(TOKEN).compute_signature(url, form)
        assert RequestValidator(TOKEN).validate(url, folded, signature)  # the attack's premise
        assert signed_post(client, url, form, signature) == 200
        refused = client.post(url, data=folded, headers={"x-twilio-signature": signature})
    assert refused.status_code == 403
    assert refused.json()["reason"] == "invalid-sid"
    [dead] = find(
        kafka_settings,
        f"fold-{unique}",
        DEADLETTER,
        DeadLetter,
        lambda d: str(d.id) == refused.json()["id"],
    )
    assert dead.reason == "invalid-sid"
    assert dead.raw is not None
    assert dead.metadata["truncated"] is False  # a small body is kept whole
    assert dead.metadata["size"] == dead.raw.size


def test_a_message_from_another_account_is_refused_when_accounts_are_configured(
    kafka_settings: KafkaSettings, tmp_path: Path, unique: str
) -> None:
    # Attack: a request signed with a token we accept (a shared or leaked one) that
    # names an account of someone else's.
    settings = twilio(account_sids=[ACCOUNT])
    with (
        http_ingest(kafka_settings, tmp_path, twilio=settings) as app,
        httpx.Client(timeout=30) as client,
    ):
        url = app.base + PATH
        answers = {}
        for name, account in (("ours", ACCOUNT), ("theirs", "AC" + "b" * 32)):
            form = {
                "AccountSid": account,
                "MessageSid": f"SM{unique}{name.encode().hex():0<22}",
                "From": "+14155550100",
            }
            signature = RequestValidator(TOKEN).compute_signature(url, form)
            answers[name] = client.post(url, data=form, headers={"x-twilio-signature": signature})
    assert answers["ours"].status_code == 200
    assert answers["theirs"].status_code == 403
    assert answers["theirs"].json()["reason"] == "account"
    [dead] = find(
        kafka_settings,
        f"acct-{unique}",
        DEADLETTER,
        DeadLetter,
        lambda d: str(d.id) == answers["theirs"].json()["id"],
    )
    assert dead.metadata["account_sid"] == "AC" + "b" * 32


def hmac_hook(monkeypatch: pytest.MonkeyPatch, **auth: object) -> WebhookSettings:
    monkeypatch.setenv("REPLAY_SECRET", SECRET)
    return WebhookSettings.model_validate(
        {
            "name": "signed",
            "auth": {
                "kind": "hmac-sha256",
                "secret_env": "REPLAY_SECRET",
                "timestamp_header": "X-Timestamp",
                **auth,
            },
            "map": {"email": "email", "text": "text"},
            "content_types": ["json"],
        }
    )


def hook_signature(body: bytes, stamp: str, *lines: str) -> str:
    signed = stamp.encode() + b"." + "".join(f"{line}\n" for line in lines).encode() + body
    return hmac.new(SECRET.encode(), signed, hashlib.sha256).hexdigest()


def test_a_signed_hook_replayed_with_new_idempotency_keys_is_one_message(
    kafka_settings: KafkaSettings, tmp_path: Path, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Attack: the Idempotency-Key header is not covered by the HMAC; the same signed
    # body re-sent (within the timestamp window) with 4 fresh keys used to be 4 messages.
    body = json.dumps({"email": "ann@example.com", "text": f"replay {unique}"}).encode()
    stamp = str(int(time.time()))
    headers = {
        "content-type": "application/json",
        "x-timestamp": stamp,
        "x-signature": hook_signature(body, stamp),
    }
    with (
        http_ingest(kafka_settings, tmp_path, hooks=[hmac_hook(monkeypatch)]) as app,
        httpx.Client(timeout=30) as client,
    ):
        answers = [
            client.post(
                f"{app.base}/webhooks/signed",
                content=body,
                headers={**headers, "idempotency-key": f"{unique}-{n}"},
            )
            for n in range(4)
        ]
    assert [a.status_code for a in answers] == [202] * 4
    keys = {a.json()["dedupe_key"] for a in answers}
    assert len(keys) == 1
    assert keys.pop().startswith("webhook:signed:fp:")
    published = find(
        kafka_settings,
        f"idem-{unique}",
        INBOUND,
        InboundMessage,
        lambda m: m.text == f"replay {unique}",
        count=4,
    )
    assert len({m.dedupe_key for m in published}) == 1


def test_an_idempotency_key_the_signature_covers_is_the_dedupe_key(
    kafka_settings: KafkaSettings, tmp_path: Path, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Attack: swap the key of a hook that signs it: the signature no longer matches.
    hook = hmac_hook(monkeypatch, signed_headers=["Idempotency-Key"])
    body = json.dumps({"email": "ann@example.com", "text": unique}).encode()
    stamp = str(int(time.time()))
    key = f"order-{unique}"
    headers = {
        "content-type": "application/json",
        "x-timestamp": stamp,
        "idempotency-key": key,
        "x-signature": hook_signature(body, stamp, f"idempotency-key:{key}"),
    }
    with (
        http_ingest(kafka_settings, tmp_path, hooks=[hook]) as app,
        httpx.Client(timeout=30) as client,
    ):
        url = f"{app.base}/webhooks/signed"
        kept = client.post(url, content=body, headers=headers)
        swapped = client.post(url, content=body, headers={**headers, "idempotency-key": "other"})
    assert kept.status_code == 202, kept.text
    assert kept.json()["dedupe_key"].startswith(f"webhook:signed:email:ann@example.com:key:{key}#")
    assert swapped.status_code == 403


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
    return subprocess.run(
        [sys.executable, "-m", "switchboard.cli", *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )


@pytest.mark.slow
def test_config_check_refuses_an_hmac_hook_that_can_be_replayed_forever(tmp_path: Path) -> None:
    # Attack: without a timestamp, a captured signed request stays valid forever
    # (and once the router forgot its dedupe key, it is a new message again).
    config = tmp_path / "switchboard.toml"
    hook = (
        '[[webhooks]]\nname = "contact"\nmap = { email = "email" }\n'
        'auth = { kind = "hmac-sha256", secret_env = "FORM_SECRET"%s }\n'
    )
    config.write_text(hook % "")
    refused = _cli("config", "check", str(config), FORM_SECRET="s")
    config.write_text(hook % ", allow_replay = true")
    accepted = _cli("config", "check", str(config), FORM_SECRET="s")
    assert refused.returncode == 2
    assert "webhooks[contact].auth" in refused.stderr
    assert "auth.timestamp_header" in refused.stderr
    assert "auth.allow_replay" in refused.stderr
    assert accepted.returncode == 0, accepted.stderr
    assert accepted.stdout.startswith("ok: ")


def _dir_size(root: Path) -> tuple[int, list[int]]:
    sizes = [p.stat().st_size for p in root.rglob("*") if p.is_file()]
    return sum(sizes), sizes


def test_unsigned_large_posts_keep_bounded_evidence(
    kafka_settings: KafkaSettings, tmp_path: Path, unique: str
) -> None:
    # Attack: 200 unsigned 250 KB posts to the Twilio route; each used to be stored
    # whole as an fsynced blob plus a dead letter (+50 MB from one connection).
    # The budget's clock stands still, so all 200 fall in one minute. (The route takes
    # 64 KB since 2026-11-30; the posts are just under it.)
    budget = EvidenceBudget(per_minute=10, max_bytes=4096, clock=lambda: 1000.0)
    labels = {"adapter": "twilio"}
    before = REGISTRY.get_sample_value("switchboard_evidence_dropped_total", labels) or 0.0
    size = 60 * 1024
    with (
        http_ingest(kafka_settings, tmp_path, twilio=twilio(), evidence=budget) as app,
        httpx.Client(timeout=30) as client,
    ):
        answers = []
        for n in range(200):
            head = f"MessageSid=SM{unique}{n:0>22x}&Body=".encode()
            body = head + b"x" * (size - len(head))
            answers.append(
                client.post(
                    app.base + PATH,
                    content=body,
                    headers={"content-type": "application/x-www-form-urlencoded"},
                )
            )
    assert {a.status_code for a in answers} == {403}
    recorded = [a for a in answers if "id" in a.json()]
    assert len(recorded) == 10  # the rest are answered alike, without a record id
    total, sizes = _dir_size(tmp_path / "blobs")
    assert len(sizes) == 10
    assert max(sizes) <= 4096
    assert total <= 10 * 4096
    after = REGISTRY.get_sample_value("switchboard_evidence_dropped_total", labels) or 0.0
    assert after - before == 190
    ids = {a.json()["id"] for a in recorded}
    dead = find(
        kafka_settings, f"ev-{unique}", DEADLETTER, DeadLetter, lambda d: str(d.id) in ids, count=10
    )
    assert len(dead) == 10
    for record in dead:
        assert record.metadata["truncated"] is True
        assert record.metadata["size"] == size
        assert record.raw is not None
        assert record.raw.size == 4096
        assert "truncated" in record.detail


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "postgresql":
        yield request.getfixturevalue("postgres_schema_url")
    else:
        yield f"sqlite:///{tmp_path / 'gc.db'}"


MAILGUN = [(MailgunAdapter, MailgunSettings(signing_key=SecretStr(MAILGUN_KEY)))]


def _signed(request: dict[str, Any], signature: dict[str, str]) -> dict[str, Any]:
    """httpx arguments ``request`` (mailgun_parsed/_mime) under ``signature``."""
    return {**request, "data": {**request["data"], **signature}}


def test_a_captured_mailgun_signature_vouches_for_no_other_mail(
    kafka_settings: KafkaSettings, migrated_postgres: Engine, tmp_path: Path, unique: str
) -> None:
    # Attack: Mailgun signs timestamp + token, not the mail. With one signed request
    # seen (a proxy's log), a stranger posts their own mail under its signature,
    # "from" a customer, with Mailgun's SPF and DKIM results set to Pass: before the
    # token memory it was taken as Mailgun's, those results recorded as its
    # authentication for agents to read. Now it is taken as any stranger's mail on
    # port 25 is: no provider's results, and marked.
    genuine = Mail(f"genuine-{unique}", html="<p>Hello, my order has not arrived.</p>")
    forged = Mail(f"forged-{unique}", sender="victim@example.org", text="Send my refund to …")
    signature = mailgun_signature()
    with (
        http_ingest(kafka_settings, tmp_path, providers=MAILGUN, engine=migrated_postgres) as app,
        httpx.Client(timeout=30) as client,
    ):
        url = f"{app.base}/webhooks/mailgun"
        first = client.post(url, **_signed(mailgun_parsed(genuine), signature))
        assert first.status_code == 200, first.text
        # The same dedupe key (Message-ID, sender, subject, text) with another HTML,
        # other recipients, another thread: passed as Mailgun's while the token was
        # bound to the dedupe key alone (review of 2026-12-02).
        same_key = _signed(mailgun_parsed(genuine), signature)
        headers = [*genuine.headers(), ("Cc", "billing@example.com"), ("In-Reply-To", "<x@y>")]
        same_key["data"].update(
            {
                "body-html": '<p>Pay here: <a href="https://evil.example/pay">pay</a></p>',
                "recipient": "billing@example.com",
                "message-headers": json.dumps([[n, v] for n, v in headers]),
            }
        )
        # And on the raw MIME route: the genuine headers, another HTML part.
        mime = (
            f"From: {genuine.name} <{genuine.sender}>\r\nTo: {genuine.to}\r\n"
            f"Subject: {genuine.subject}\r\nMessage-ID: {genuine.message_id}\r\n"
            "MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=b\r\n\r\n"
            f"--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{genuine.text}\r\n"
            '--b\r\nContent-Type: text/html\r\n\r\n<a href="https://evil.example/">click</a>'
            "\r\n--b--\r\n"
        ).encode()
        other_mime = _signed(mailgun_mime(genuine), signature)
        other_mime["files"] = {"body-mime": (None, mime, "text/plain")}
        reused = [
            client.post(url, **_signed(mailgun_parsed(forged), signature)),
            client.post(url, **same_key),
            client.post(f"{url}/mime", **other_mime),
        ]
        # Mailgun's own retry of the same mail under the same signature (after a 503,
        # or an answer it did not see) is taken as it is; the router deduplicates it.
        retried = client.post(url, **_signed(mailgun_parsed(genuine), signature))
        # A new signature is a new token: the next genuine mail passes.
        assert client.post(url, **mailgun_parsed(Mail(f"next-{unique}"))).status_code == 200
    answers = [first, *reused, retried]
    assert [a.status_code for a in answers] == [200] * 5, [a.text for a in answers]
    inbound, dead = collect(
        kafka_settings, f"mailgun-replay-{unique}", {UUID(a.json()["id"]) for a in answers}
    )
    assert dead == {}
    taken = [inbound[UUID(a.json()["id"])] for a in answers]
    for message in (taken[0], taken[4]):  # the genuine mail and its retry
        assert message.authentication is not None
        assert message.authentication.source == "provider:mailgun"
        assert "token_reused" not in message.metadata
    for n, message in enumerate(taken[1:4], start=1):
        assert message.authentication is None
        assert message.metadata["token_reused"] == {
            "first_message_id": first.json()["id"],
            "conflicts": n,
        }
    assert taken[1].sender.key == "email:victim@example.org"
    with migrated_postgres.connect() as connection:
        rows = connection.execute(select(webhook_tokens)).all()
    assert len(rows) == 2  # the captured token and the next one, digests only
    assert signature["token"] not in {row.token for row in rows}


def test_a_genuine_mail_after_a_stranger_s_copy_is_still_taken(
    kafka_settings: KafkaSettings, migrated_postgres: Engine, tmp_path: Path, unique: str
) -> None:
    """Whoever posts under a token first owns it: should a stranger hold a signature
    not used yet (its first post was cut off, or they sit on the path) and post
    twice first, the genuine mail after them is still taken, unvouched and naming
    the first arrival. Refused (406), it was lost: Mailgun does not retry a 406."""
    signature = mailgun_signature()
    genuine = Mail(f"real-{unique}", text="Real text")
    with (
        http_ingest(kafka_settings, tmp_path, providers=MAILGUN, engine=migrated_postgres) as app,
        httpx.Client(timeout=30) as client,
    ):
        url = f"{app.base}/webhooks/mailgun"
        junk = [
            client.post(url, **_signed(mailgun_parsed(Mail(f"junk{n}-{unique}")), signature))
            for n in range(2)
        ]
        real = client.post(url, **_signed(mailgun_parsed(genuine), signature))
    assert [r.status_code for r in (*junk, real)] == [200, 200, 200]
    inbound, _ = collect(kafka_settings, f"mailgun-first-{unique}", {UUID(real.json()["id"])})
    [message] = inbound.values()
    assert message.text == "Real text"
    assert message.authentication is None
    assert message.metadata["token_reused"] == {
        "first_message_id": junk[0].json()["id"],
        "conflicts": 2,
    }


def test_an_unreadable_body_under_a_used_token_is_a_replay_not_30_mb_kept(
    kafka_settings: KafkaSettings, migrated_postgres: Engine, tmp_path: Path, unique: str
) -> None:
    # Attack: under a used token, a body that fails to parse skipped the token check
    # and was kept whole as a malformed dead letter, 200 each time: 20 posts of 1 MB
    # kept 21 MB (review of 2026-12-02).
    signature = mailgun_signature()
    junk = "J" * (1024 * 1024)
    with (
        http_ingest(kafka_settings, tmp_path, providers=MAILGUN, engine=migrated_postgres) as app,
        httpx.Client(timeout=60) as client,
    ):
        url = f"{app.base}/webhooks/mailgun"
        first = client.post(url, **_signed(mailgun_parsed(Mail(f"ok-{unique}")), signature))
        assert first.status_code == 200, first.text
        answers = [
            client.post(url, data={**signature, "message-headers": "not json", "body-plain": junk})
            for _ in range(5)
        ]
        # An unreadable mail under a fresh token is still kept whole, as before.
        fresh = client.post(url, data={**mailgun_signature(), "message-headers": "not json"})
    assert [a.status_code for a in answers] == [406] * 5
    assert {a.json()["reason"] for a in answers} == {"replay"}
    assert fresh.status_code == 200, fresh.text
    ids = {UUID(a.json()["id"]) for a in answers} | {UUID(fresh.json()["id"])}
    _, dead = collect(kafka_settings, f"mailgun-junk-{unique}", ids)
    assert dead[UUID(fresh.json()["id"])].reason == "malformed"
    replays = [d for d in dead.values() if d.reason == "replay"]
    assert len(replays) == 5
    for letter in replays:  # bounded evidence, naming the token's first message
        assert letter.raw is not None
        assert len(app.blobs.get(letter.raw.sha256)) <= 4096
        assert letter.metadata["first_message_id"] == first.json()["id"]


@pytest.mark.parametrize("variant", ["multipart", "reordered", "mime-reordered", "resigned"])
def test_mailgun_s_retry_of_one_mail_is_the_same_mail_in_any_encoding_and_order(
    kafka_settings: KafkaSettings,
    migrated_postgres: Engine,
    tmp_path: Path,
    unique: str,
    variant: str,
) -> None:
    """What a token is bound to must not change between Mailgun's first post and its
    retry: not with the multipart boundary, the field order, urlencoded against
    multipart, the order of the attachments, or a timestamp signed anew for the
    same token (a timestamp is part of the stored metadata, not of the binding)."""
    mail = Mail(
        f"retry-{unique}",
        text="Où est ma commande ?\r\nMerci.\r\n",
        html="<b>Où</b> est",
        attachments=(("a.txt", "text/plain", b"A"), ("b.txt", "text/plain", b"B")),
    )
    signature = mailgun_signature()
    with (
        http_ingest(kafka_settings, tmp_path, providers=MAILGUN, engine=migrated_postgres) as app,
        httpx.Client(timeout=30) as client,
    ):
        url = f"{app.base}/webhooks/mailgun"
        if variant.startswith("mime"):
            request, url = _signed(mailgun_mime(mail), signature), f"{url}/mime"
        else:
            request = _signed(mailgun_parsed(mail), signature)
        first = client.post(url, **request)
        data = dict(reversed(list(request["data"].items())))
        files = dict(reversed(list(request.get("files", {}).items())))
        if variant == "multipart":  # every field a part, none urlencoded
            files |= {name: (None, value.encode()) for name, value in data.items()}
            data = {}
        if variant == "resigned":
            stamp = str(int(signature["timestamp"]) + 5)
            digest = hmac.new(
                MAILGUN_KEY.encode(), (stamp + signature["token"]).encode(), hashlib.sha256
            )
            data |= {"timestamp": stamp, "signature": digest.hexdigest()}
        retry = client.post(url, data=data, files=files)
    assert (first.status_code, retry.status_code) == (200, 200), (first.text, retry.text)
    assert first.json()["dedupe_key"] == retry.json()["dedupe_key"]
    ids = {UUID(first.json()["id"]), UUID(retry.json()["id"])}
    inbound, _ = collect(kafka_settings, f"mailgun-retry-{unique}", ids)
    for message in inbound.values():
        assert "token_reused" not in message.metadata
        assert message.authentication is not None


def test_used_tokens_are_one_memory_for_every_process_and_forget_after_their_window(
    database_url: str,
) -> None:
    """Two engines on one database are two `--workers` processes (or two hosts on one
    PostgreSQL): a token one of them took is refused to the other for another
    message. Eight threads racing one token with eight messages: exactly one wins."""
    engines = [make_engine(database_url) for _ in range(2)]
    upgrade(engines[0], ["ingest"])
    try:
        first, second = (UsedTokens(e, keep_s=600, prune_every_s=3600) for e in engines)
        assert first.claim("mailgun", "t1", "email-mid:a", "id-a") == Claim(True, "id-a", 0)
        # The same mail again (a retry, its own arrival id): taken, naming the first.
        assert second.claim("mailgun", "t1", "email-mid:a", "id-a2") == Claim(True, "id-a", 0)
        # Other mails: refused, counted, each naming the first arrival.
        assert second.claim("mailgun", "t1", "email-mid:b", "id-b") == Claim(False, "id-a", 1)
        assert first.claim("mailgun", "t1", "email-mid:c", "id-c") == Claim(False, "id-a", 2)
        assert second.claim("sendgrid", "t1", "email-mid:b", "id-b").fresh  # per adapter
        won: list[str] = []
        barrier = threading.Barrier(8)

        def race(n: int) -> None:
            barrier.wait()
            if (first if n % 2 else second).claim("mailgun", "t2", f"email-mid:{n}", f"{n}").fresh:
                won.append(f"email-mid:{n}")

        threads = [threading.Thread(target=race, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert len(won) == 1, won
        # Past its window a row is deleted by the next claim that prunes, and the
        # token is then new again (its timestamp is refused as stale by then).
        with engines[0].begin() as connection:
            connection.execute(
                update(webhook_tokens)
                .where(webhook_tokens.c.token == hashlib.sha256(b"t1").hexdigest())
                .values(first_seen=datetime.now(UTC) - timedelta(seconds=601))
            )
        pruning = UsedTokens(engines[1], keep_s=600, prune_every_s=0)
        assert pruning.claim("mailgun", "t3", "email-mid:c", "id-t3").fresh
        with engines[0].connect() as connection:
            left = connection.execute(select(webhook_tokens.c.adapter)).scalars().all()
        assert sorted(left) == ["mailgun", "mailgun"]  # t2 and t3; both t1 rows gone
        assert first.claim("mailgun", "t1", "email-mid:z", "id-z").fresh
    finally:
        for engine in engines:
            engine.dispose()


def test_used_tokens_without_a_database_are_the_process_s_own() -> None:
    tokens = UsedTokens(None, keep_s=0.2, prune_every_s=0.1)
    assert tokens.claim("mailgun", "t", "a", "1") == Claim(True, "1", 0)
    assert tokens.claim("mailgun", "t", "a", "2") == Claim(True, "1", 0)
    assert tokens.claim("mailgun", "t", "b", "3") == Claim(False, "1", 1)
    assert tokens.claim("mailgun", "t", "c", "4") == Claim(False, "1", 2)
    time.sleep(0.35)
    assert tokens.claim("mailgun", "t", "b", "5") == Claim(True, "5", 0)  # forgotten


@pytest.mark.slow
def test_blobs_gc_deletes_only_old_unreferenced_blobs(database_url: str, tmp_path: Path) -> None:
    # Attack (on the disk): blobs were never collected, so whatever was stored,
    # refused evidence included, stayed forever.
    store = FileBlobStore(tmp_path / "blobs")
    raw, attachment, old, young = (
        Blob.of(f"{name} {tmp_path}".encode(), "text/plain")
        for name in ("raw", "attachment", "old", "young")
    )
    for blob in (raw, attachment, old, young):
        store.put(blob)
    engine: Engine = make_engine(database_url)
    upgrade(engine)
    try:
        router = store_for(engine)
        router.sync_owners()
        # The raw payload of a routed message: referenced by the router's events.
        [routed] = router.route_batch([inbound_message(raw=raw.ref, attachments=())])
        # An attachment the queue shows; the router already forgot its events.
        shown = inbound_message(
            dedupe_key="email-mid:shown@example.com",
            raw=None,
            attachments=(
                Attachment(
                    content_type="text/plain", blob=attachment.ref, sha256=attachment.ref.sha256
                ),
            ),
        )
        [queued] = router.route_batch([shown])
        event = next(e for e in queued.events if e.type == TYPE_ROUTED)
        assert QueueStore(engine).apply(event.type, event.id, event.value())
        with engine.begin() as c:
            c.execute(delete(outbox).where(outbox.c.message_id == shown.id))
        assert routed.result == "routed"
    finally:
        engine.dispose()
    for blob in (raw, attachment, old):
        _aged(_blob_path(tmp_path / "blobs", blob))
    env = {"SWITCHBOARD_DATA_DIR": str(tmp_path), "SWITCHBOARD_DATABASE_URL": database_url}

    dry = _cli("blobs", "gc", "--dry-run", **env)
    assert dry.returncode == 0, dry.stderr
    assert f"would delete {old.ref.sha256}" in dry.stdout
    assert dry.stdout.count("would delete ") == 2  # the line above and the summary
    assert all(store.exists(b.ref.sha256) for b in (raw, attachment, old, young))

    done = _cli("blobs", "gc", **env)
    assert done.returncode == 0, done.stderr
    assert f"deleted {old.ref.sha256}" in done.stdout
    assert "kept 2 referenced and 1 younger" in done.stdout
    assert not store.exists(old.ref.sha256)
    assert all(store.exists(b.ref.sha256) for b in (raw, attachment, young))


def _aged(path: Path, days: float = 40) -> None:
    """Set ``path``'s modification time ``days`` back: the age `blobs gc` reads."""
    then = time.time() - timedelta(days=days).total_seconds()
    os.utime(path, (then, then))


def _blob_path(root: Path, blob: Blob) -> Path:
    """Where FileBlobStore keeps ``blob`` under ``root``."""
    return root / blob.ref.sha256[:2] / blob.ref.sha256[2:4] / blob.ref.sha256


def test_a_blob_stored_again_is_young_again(tmp_path: Path) -> None:
    # Attack (on ourselves): a new message whose bytes equal an old unreferenced
    # blob must not lose them to the collector while it is still in flight.
    store = FileBlobStore(tmp_path / "blobs")
    blob = Blob.of(b"the same attachment again", "text/plain")
    store.put(blob)
    _aged(_blob_path(tmp_path / "blobs", blob))
    store.put(blob)  # the new message's hand-off
    report = collect_garbage(store, [lambda _among: set()], timedelta(days=30))
    assert report.deleted == []
    assert report.young == 1
    assert store.exists(blob.ref.sha256)


@pytest.mark.parametrize("write", ["put", "put_many"])
def test_a_renewal_never_lands_between_the_collectors_check_and_delete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write: str
) -> None:
    # Attack (on ourselves, racing): the collector has found an old unreferenced blob
    # and is about to delete it when a new message with the same bytes arrives. Its
    # hand-off must not answer "stored" for a file deleted the next moment.
    store = FileBlobStore(tmp_path / "blobs")
    blob = Blob.of(b"old bytes, sent again", "text/plain")
    store.put(blob)
    path = _blob_path(tmp_path / "blobs", blob)
    _aged(path)

    hand_off = threading.Thread(
        target=store.put if write == "put" else store.put_many,
        args=(blob,) if write == "put" else ([blob],),
    )
    waited: list[bool] = []
    real_unlink = Path.unlink

    def unlink(self: Path, missing_ok: bool = False) -> None:
        if self == path and not waited:
            # Between the collector's age check and its delete: the message arrives.
            hand_off.start()
            hand_off.join(0.5)
            waited.append(hand_off.is_alive())
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    cutoff = time.time() - timedelta(days=30).total_seconds()
    assert store.delete_if_older(blob.ref.sha256, cutoff)
    hand_off.join(10)
    assert waited == [True]  # the hand-off waited for the collector's delete
    assert path.read_bytes() == blob.data  # and then wrote the blob again
    assert path.stat().st_mtime >= cutoff


def test_gc_removes_temporary_files_of_writes_that_died(tmp_path: Path) -> None:
    # Attack (on the disk): writes killed between creating their temporary file and
    # renaming it (a crash, SIGKILL, a full disk) each left a file nothing removed.
    store = FileBlobStore(tmp_path / "blobs")
    blob = Blob.of(b"a blob beside the leftovers", "text/plain")
    store.put(blob)
    leaf = _blob_path(tmp_path / "blobs", blob).parent
    dead, running = leaf / ".tmp-dead-0", leaf / ".tmp-running-0"
    dead.write_bytes(b"x" * 100)
    running.write_bytes(b"y" * 10)
    _aged(dead, days=2 / 24)

    dry = collect_garbage(store, [lambda _among: set()], timedelta(days=30), dry_run=True)
    assert dry.temporaries == [(".tmp-dead-0", 100)]
    assert dead.exists()

    report = collect_garbage(store, [lambda _among: set()], timedelta(days=30))
    assert report.temporaries == [(".tmp-dead-0", 100)]
    assert not dead.exists()
    assert running.exists()  # younger than an hour: maybe a write still running
    assert store.exists(blob.ref.sha256)
    assert report.scanned == 1  # temporaries are not counted as blobs


def test_run_collects_blobs_periodically(tmp_path: Path) -> None:
    # Attack (on the disk): nobody runs the command; `switchboard run` must.
    store = FileBlobStore(tmp_path / "blobs")
    old = Blob.of(b"evidence nobody references", "text/plain")
    store.put(old)
    path = _blob_path(tmp_path / "blobs", old)
    _aged(path)
    dead = path.parent / ".tmp-dead-1"  # a write killed before its rename
    dead.write_bytes(b"half a blob")
    _aged(dead)
    removed = REGISTRY.get_sample_value("switchboard_blob_temporaries_removed_total") or 0.0
    engine = make_engine(f"sqlite:///{tmp_path / 'gc.db'}")
    upgrade(engine)
    collector = BlobCollector(
        store, blob_references(Settings(), engine, engine), timedelta(days=30), interval_s=0.05
    )

    async def scenario() -> None:
        await collector.start()
        try:
            deadline = time.monotonic() + 10
            # Until the collection's report is counted (after its deletes).
            while (
                time.monotonic() < deadline
                and (REGISTRY.get_sample_value("switchboard_blob_temporaries_removed_total") or 0.0)
                < removed + 1
            ):
                await asyncio.sleep(0.05)
        finally:
            await collector.stop()

    try:
        asyncio.run(scenario())
    finally:
        engine.dispose()
    assert not store.exists(old.ref.sha256)
    assert not dead.exists()
    assert REGISTRY.get_sample_value("switchboard_blob_temporaries_removed_total") == removed + 1
