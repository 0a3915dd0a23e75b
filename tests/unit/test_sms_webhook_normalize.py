"""normalize/sms.py and normalize/webhook.py, pure."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from normalize.content import Blob
from normalize.errors import NormalizeError
from normalize.schema import InboundMessage
from normalize.sms import SmsContext, normalize_twilio
from normalize.webhook import FieldMap, WebhookContext, lookup, normalize_webhook

RAW = Blob.of(b"raw", "application/x-www-form-urlencoded")
NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def sms(form: dict[str, str]) -> InboundMessage:
    ctx = SmsContext(
        adapter="twilio", message_id=uuid.uuid4(), received_at=NOW, raw=RAW, default_region="US"
    )
    return normalize_twilio(form, ctx).message


def test_sms_fields_and_unknown_fields_kept() -> None:
    m = sms(
        {
            "MessageSid": "SM" + "1" * 32,
            "From": "+14155550100",
            "To": "+14155550199",
            "Body": "Hi",
            "NumMedia": "0",
            "FromCountry": "US",
            "BrandNewTwilioField": "x",
        }
    )
    assert m.channel == "sms"
    assert m.sender.key == "phone:+14155550100"
    assert m.recipients[0].value == "+14155550199"
    assert m.dedupe_key == "twilio:SM" + "1" * 32
    assert m.metadata["twilio"] == {"FromCountry": "US", "BrandNewTwilioField": "x"}


def test_whatsapp_mms_and_empty_body() -> None:
    m = sms(
        {
            "MessageSid": "SM" + "2" * 32,
            "From": "whatsapp:+14155550100",
            "Body": "",
            "NumMedia": "2",
            "MediaUrl0": "https://api.twilio.com/m/ME0",
            "MediaContentType0": "image/JPEG",
            "MediaUrl1": "https://api.twilio.com/m/ME1",
        }
    )
    assert m.channel == "whatsapp"
    assert m.sender.key == "phone:+14155550100"
    assert m.text is None
    assert [a.content_type for a in m.attachments] == ["image/jpeg", "application/octet-stream"]
    assert (
        sms(
            {
                "MessageSid": "MM" + "3" * 32,
                "From": "+14155550100",
                "NumMedia": "1",
                "MediaUrl0": "https://x",
            }
        ).channel
        == "mms"
    )


@pytest.mark.parametrize(
    ("form", "reason"),
    [
        ({"From": "+14155550100"}, "missing-field"),
        ({"MessageSid": "SM" + "4" * 32, "From": "ACME"}, "invalid-sender"),
        # The next signed field folded into the SID (a replay past dedupe).
        ({"MessageSid": "SM" + "4" * 32 + "NumMedia0", "From": "+14155550100"}, "invalid-sid"),
        (
            {"MessageSid": "SM" + "4" * 32, "SmsSid": "SMnope", "From": "+14155550100"},
            "invalid-sid",
        ),
    ],
)
def test_sms_without_sid_or_sender(form: dict[str, str], reason: str) -> None:
    with pytest.raises(NormalizeError) as info:
        sms(form)
    assert info.value.reason == reason


def test_lookup_paths() -> None:
    payload = {"contact": {"email": "a@example.com"}, "items": [{"id": 7}], "a.b": "literal"}
    assert lookup(payload, "contact.email") == "a@example.com"
    assert lookup(payload, "items.0.id") == 7
    assert lookup(payload, "a.b") == "literal"
    assert lookup(payload, "items.5.id") is None
    assert lookup(payload, "contact.email.x") is None


def hook(payload: object, key: str | None = None, id: str | None = None) -> InboundMessage:
    fm = FieldMap(
        email="contact.email", phone="contact.phone", name="contact.name", text="message", id=id
    )
    ctx = WebhookContext(
        hook="form",
        message_id=uuid.uuid4(),
        received_at=NOW,
        raw=RAW,
        fields=fm,
        default_region="GB",
        idempotency_key=key,
    )
    return normalize_webhook(payload, ctx).message


def test_a_form_with_email_and_phone_carries_both_identities() -> None:
    m = hook(
        {
            "contact": {"email": "Ann@Example.com", "phone": "020 7946 0958", "name": "Ann"},
            "message": "Call me",
        }
    )
    assert m.sender.key == "email:ann@example.com"
    assert [i.key for i in m.identities] == ["phone:+442079460958"]
    assert m.sender.display_name == "Ann"
    assert m.text == "Call me"


def test_invalid_extra_identity_is_noted_not_fatal() -> None:
    m = hook({"contact": {"email": "ann@example.com", "phone": "not a phone"}})
    assert m.identities == ()
    problems = m.metadata["invalid_identities"]
    assert isinstance(problems, list)
    assert "contact.phone" in str(problems[0])


def test_no_identity_is_refused_with_the_reason() -> None:
    with pytest.raises(NormalizeError, match="identifies no sender"):
        hook({"message": "anonymous"})


def test_dedupe_key_order() -> None:
    payload = {"contact": {"email": "ann@example.com"}, "submission_id": 42}
    # The sender is claimed: the key or id is also bound to what was said ("#...").
    keyed = hook(payload, key="K1", id="submission_id").dedupe_key
    assert keyed.startswith("webhook:form:email:ann@example.com:key:K1#")
    assert hook(payload, key="K1", id="submission_id").dedupe_key == keyed  # a retry
    by_id = hook(payload, id="submission_id").dedupe_key
    assert by_id.startswith("webhook:form:email:ann@example.com:id:42#")
    fp = hook(payload).dedupe_key
    assert fp.startswith("webhook:form:fp:")
    reordered = {"submission_id": 42, "contact": {"email": "ann@example.com"}}
    assert hook(reordered).dedupe_key == fp


def test_a_posted_key_or_id_is_scoped_to_the_sender() -> None:
    """At a public form anyone can send any Idempotency-Key or id: a stranger's post
    with the key a customer's post carries must not make the customer's a duplicate."""
    ann = {"contact": {"email": "ann@example.com"}, "submission_id": 42}
    mallory = {"contact": {"email": "mallory@evil.example"}, "submission_id": 42}
    assert hook(ann, key="K1").dedupe_key != hook(mallory, key="K1").dedupe_key
    assert hook(ann, id="submission_id").dedupe_key != hook(mallory, id="submission_id").dedupe_key
    assert hook(ann, key="K1").dedupe_key == hook(dict(ann), key="K1").dedupe_key
