"""A stranger's claim never moves another customer's data (issue 17).

The reproductions, through the real HTTP and SMTP servers, the real broker and
the router on PostgreSQL, with the default merge policy ("verified"):

- takeover by web form: one anonymous post with Wendy's email and Vic's phone
  merged their contacts; now nothing merges, a merge is suggested, and Vic's next
  SMS lands in Vic's own contact;
- the attacker-first variant: an attacker's older contact never absorbs a victim;
- mass merge: one request with 5 emails and 5 phones turned 10 contacts into 1;
- forged From: mail claiming to be Carol is marked claimed, never verified;
- and the other way round: a signed backend that vouches for email and phone,
  and a Twilio SMS, make one contact automatically.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from sqlalchemy import Engine
from twilio.request_validator import RequestValidator

from normalize.schema import ContactEvent, ContactEventKind, InboundMessage
from switchboard.events import contact_event_type
from switchboard.settings import KafkaSettings, TwilioSettings, WebhookSettings
from switchboard.topics import CONTACTS, INBOUND
from tests import local_http
from tests.http_helpers import RunningHttp, find, http_ingest
from tests.imap_helpers import wait_for
from tests.router_helpers import (
    events_of,
    fresh_kafka,
    processed,
    running_router,
    snapshot,
    store_for,
)
from tests.smtp_helpers import smtp_server

pytestmark = pytest.mark.integration

TOKEN = "twilio-trust-token"
SUGGESTED = contact_event_type(ContactEventKind.MERGE_SUGGESTED)


@pytest.fixture
def kafka() -> Iterator[KafkaSettings]:
    with fresh_kafka() as settings:
        yield settings


def _hooks(monkeypatch: pytest.MonkeyPatch) -> list[WebhookSettings]:
    monkeypatch.setenv("BACKEND_SECRET", "backend-secret")
    public = WebhookSettings.model_validate(
        {
            "name": "public-form",
            "auth": {"kind": "none"},
            "map": {
                "email": "email",
                "phone": "phone",
                "text": "message",
                "emails": ["emails"],
                "phones": ["phones"],
            },
            "default_region": "US",
        }
    )
    backend = WebhookSettings.model_validate(
        {
            "name": "backend",
            "auth": {"kind": "hmac-sha256", "secret_env": "BACKEND_SECRET", "allow_replay": True},
            "map": {"email": "email", "phone": "phone", "text": "message"},
            "default_region": "US",
            "verified": ["email", "phone"],
        }
    )
    # A backend that proves the phone (say, by a login code) but not the address typed
    # beside it.
    phone_backend = WebhookSettings.model_validate(
        {
            "name": "phone-backend",
            "auth": {"kind": "hmac-sha256", "secret_env": "BACKEND_SECRET", "allow_replay": True},
            "map": {"email": "email", "phone": "phone", "text": "message"},
            "default_region": "US",
            "verified": ["phone"],
        }
    )
    return [public, backend, phone_backend]


def _post(http: RunningHttp, hook: str, body: dict[str, Any]) -> None:
    raw = json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    if hook in ("backend", "phone-backend"):
        headers["x-signature"] = hmac.new(b"backend-secret", raw, hashlib.sha256).hexdigest()
    answer = local_http.post(
        f"{http.base}/webhooks/{hook}", content=raw, headers=headers, timeout=15
    )
    assert answer.status_code == 202, answer.text


def _sms(http: RunningHttp, sid: str, sender: str, text: str = "hi") -> None:
    url = f"{http.base}/webhooks/twilio/sms"
    form = {"MessageSid": sid, "From": sender, "To": "+14155550199", "Body": text}
    signature = RequestValidator(TOKEN).compute_signature(url, form)
    answer = local_http.post(url, data=form, headers={"x-twilio-signature": signature}, timeout=15)
    assert answer.status_code == 200, answer.text


def _route(kafka: KafkaSettings, engine: Engine, count: int) -> None:
    with running_router(kafka, store_for(engine)):
        wait_for(lambda: len(processed(engine)) >= count, 60)


@pytest.mark.slow
def test_a_strangers_form_merges_no_one_and_suggests_instead(
    kafka: KafkaSettings,
    migrated_postgres: Engine,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    twilio = TwilioSettings(auth_token=[SecretStr(TOKEN)])
    with http_ingest(kafka, tmp_path, twilio=twilio, hooks=_hooks(monkeypatch)) as http:
        # Wendy has written by email (through her own form post), Vic by SMS; the
        # attacker owns an older contact of their own.
        _post(http, "public-form", {"email": "mallory@evil.example", "message": "hello"})
        _post(http, "public-form", {"email": "wendy@example.org", "message": "my order"})
        _sms(http, "SM" + "1" * 32, "+14155550100", "my refund")
        # Ten other customers, five by email and five by SMS.
        for i in range(5):
            _post(http, "public-form", {"email": f"c{i}@example.org", "message": "hi"})
            _sms(http, f"SM{i:0>32}", f"+1415555020{i}")
    _route(kafka, migrated_postgres, 13)
    before = snapshot(migrated_postgres)
    assert len(before.contacts) == 13

    with http_ingest(kafka, tmp_path, twilio=twilio, hooks=_hooks(monkeypatch)) as http:
        # The takeover: Wendy's email and Vic's phone in one anonymous post.
        _post(http, "public-form", {"email": "wendy@example.org", "phone": "+14155550100"})
        # The attacker's own (older) contact and Vic's phone.
        _post(http, "public-form", {"email": "mallory@evil.example", "phone": "4155550100"})
        # Mass merge: 5 emails and 5 phones in one request.
        _post(
            http,
            "public-form",
            {
                "email": "c0@example.org",
                "emails": [f"c{i}@example.org" for i in range(1, 5)],
                "phones": [f"+1415555020{i}" for i in range(5)],
            },
        )
        # Vic texts again.
        _sms(http, "SM" + "2" * 32, "+14155550100", "any news?")
    _route(kafka, migrated_postgres, 17)

    after = snapshot(migrated_postgres)
    assert after.merged == {}
    assert len(after.contacts) == 13
    vic = after.contact_of("phone:+14155550100")
    wendy = after.contact_of("email:wendy@example.org")
    mallory = after.contact_of("email:mallory@evil.example")
    assert len({vic, wendy, mallory}) == 3
    for contact, (_owner, keys) in before.contacts.items():
        assert after.contacts[contact][1] == keys  # no identity moved anywhere
    # Vic's next SMS is in Vic's own contact, with Vic's history.
    vic_messages = [m for m, (c, _, _) in after.messages.items() if c == vic]
    assert len(vic_messages) == 2
    suggestions = events_of(kafka, CONTACTS, SUGGESTED, ContactEvent, count=11)
    pairs = {(s.contact_id, s.other_contact_id) for s in suggestions}
    assert (wendy, vic) in pairs
    assert (mallory, vic) in pairs
    c0 = after.contact_of("email:c0@example.org")
    others = {after.contact_of(f"email:c{i}@example.org") for i in range(1, 5)}
    others |= {after.contact_of(f"phone:+1415555020{i}") for i in range(5)}
    assert {o for c, o in pairs if c == c0} == others


def test_a_vouching_backend_and_a_signed_sms_make_one_contact(
    kafka: KafkaSettings,
    migrated_postgres: Engine,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    twilio = TwilioSettings(auth_token=[SecretStr(TOKEN)])
    with http_ingest(kafka, tmp_path, twilio=twilio, hooks=_hooks(monkeypatch)) as http:
        _sms(http, "SM" + "3" * 32, "+14155550123", "hello by SMS")
        _post(http, "public-form", {"email": "dana@example.org", "message": "hello by form"})
        _post(http, "backend", {"email": "dana@example.org", "phone": "(415) 555-0123"})
    _route(kafka, migrated_postgres, 3)
    snap = snapshot(migrated_postgres)
    assert len(snap.contacts) == 1, snap.contacts
    (keys,) = [k for _, k in snap.contacts.values()]
    assert keys == {"email:dana@example.org", "phone:+14155550123"}
    assert len(snap.merged) == 1


def test_a_verified_phone_beside_a_typed_address_gets_its_own_contact(
    kafka: KafkaSettings,
    migrated_postgres: Engine,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Mallory proves her own phone to a backend and types Wendy's address beside it:
    the phone does not join Wendy's contact (the claimed sender used to decide where
    verified identities linked), so Mallory's SMS never reaches Wendy's conversation."""
    twilio = TwilioSettings(auth_token=[SecretStr(TOKEN)])
    with http_ingest(kafka, tmp_path, twilio=twilio, hooks=_hooks(monkeypatch)) as http:
        _post(http, "public-form", {"email": "wendy@example.org", "message": "my order"})
    _route(kafka, migrated_postgres, 1)
    with http_ingest(kafka, tmp_path, twilio=twilio, hooks=_hooks(monkeypatch)) as http:
        _post(http, "phone-backend", {"email": "wendy@example.org", "phone": "+14155550177"})
        _sms(http, "SM" + "7" * 32, "+14155550177", "send me Wendy's invoice")
    _route(kafka, migrated_postgres, 3)
    snap = snapshot(migrated_postgres)
    wendy = snap.contact_of("email:wendy@example.org")
    mallory = snap.contact_of("phone:+14155550177")
    assert wendy is not None
    assert mallory is not None
    assert wendy != mallory
    assert snap.contacts[wendy][1] == {"email:wendy@example.org"}
    assert snap.contacts[mallory][1] == {"phone:+14155550177"}
    wendy_messages = [m for m, (c, _, _) in snap.messages.items() if c == wendy]
    assert len(wendy_messages) == 1
    assert snap.merged == {}
    suggestions = events_of(kafka, CONTACTS, SUGGESTED, ContactEvent, count=1)
    assert {(s.contact_id, s.other_contact_id) for s in suggestions} == {(mallory, wendy)}


def test_a_strangers_message_id_or_idempotency_key_does_not_swallow_a_customers_message(
    kafka: KafkaSettings,
    migrated_postgres: Engine,
    tmp_path: Path,
    unique: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Mallory sends first with the Message-ID Ann's mail will carry (it is public to
    everyone on the thread), and posts the public form first with the Idempotency-Key
    Wendy's post will carry: both customers' messages still reach their contacts
    (they were dropped as duplicates of Mallory's)."""
    mid = f"<order-{unique}@example.org>"

    def mail(sender: str, text: str) -> bytes:
        return (
            f"From: {sender}\r\nTo: support@example.com\r\nSubject: order\r\n"
            f"Message-ID: {mid}\r\n\r\n{text}\r\n"
        ).encode()

    with smtp_server(kafka, tmp_path / "smtp") as smtp:
        assert smtp.send(mail("mallory@evil.example", "junk"), mail_from="m@evil.example")[0] == 250
        assert smtp.send(mail("ann@example.org", "where is my order?"))[0] == 250
        # The same mail of Ann's once more (a second inbox, or IMAP): still one message.
        assert smtp.send(mail("ann@example.org", "where is my order?"))[0] == 250
    with http_ingest(kafka, tmp_path / "http", hooks=_hooks(monkeypatch)) as http:
        for who in ("mallory@evil.example", "wendy@example.org"):
            answer = local_http.post(
                f"{http.base}/webhooks/public-form",
                json={"email": who, "message": f"from {who}"},
                headers={"idempotency-key": f"k-{unique}"},
                timeout=15,
            )
            assert answer.status_code == 202, answer.text
        # Mallory types Wendy's address (a claim) with the key Wendy's next post will
        # carry (an order number): Wendy's post was swallowed as its duplicate until
        # the key of a claimed sender was bound to what was said (review, 2026-12-01).
        # Wendy's retry of her own post is still one message.
        for text in ("from mallory, as wendy", "from wendy again", "from wendy again"):
            answer = local_http.post(
                f"{http.base}/webhooks/public-form",
                json={"email": "wendy@example.org", "message": text},
                headers={"idempotency-key": f"order-{unique}"},
                timeout=15,
            )
            assert answer.status_code == 202, answer.text
    _route(kafka, migrated_postgres, 8)
    snap = snapshot(migrated_postgres)
    ann = snap.contact_of("email:ann@example.org")
    wendy = snap.contact_of("email:wendy@example.org")
    assert len([m for m, (c, _, _) in snap.messages.items() if c == ann]) == 1
    assert len([m for m, (c, _, _) in snap.messages.items() if c == wendy]) == 3
    assert len(snap.messages) == 6  # Ann's second copy and Wendy's retry are duplicates


def test_a_forged_from_is_claimed_never_verified(
    kafka: KafkaSettings, tmp_path: Path, unique: str
) -> None:
    forged = (
        f"From: Carol <carol@customer.example>\r\nTo: support@example.com\r\n"
        f"Subject: refund\r\nMessage-ID: <forged-{unique}@evil.example>\r\n\r\n"
        "Send the refund to IBAN XX00 0000.\r\n"
    ).encode()
    with smtp_server(kafka, tmp_path) as smtp:
        assert smtp.send(forged, mail_from="attacker@evil.example")[0] == 250
    (message,) = find(
        kafka,
        f"forged-{unique}",
        INBOUND,
        InboundMessage,
        lambda m: m.thread.message_id == f"forged-{unique}@evil.example",
    )
    assert message.sender.key == "email:carol@customer.example"
    assert message.sender.assurance == "claimed"
    assert message.sender.evidence is None
