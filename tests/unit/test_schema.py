from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from pydantic import ValidationError

from normalize.schema import (
    Attachment,
    BlobRef,
    Identity,
    IdentityKind,
    InboundMessage,
    Recipient,
    RecipientRole,
)
from tests.factories import SHA, inbound_message


def test_json_round_trip_gives_an_equal_model() -> None:
    message = inbound_message()
    assert InboundMessage.model_validate_json(message.model_dump_json()) == message


def test_models_are_frozen() -> None:
    message = inbound_message()
    with pytest.raises(ValidationError, match="frozen"):
        message.subject = "changed"  # type: ignore[misc]


def test_unknown_fields_are_rejected() -> None:
    data = inbound_message().model_dump(mode="json")
    data["surprise"] = 1
    with pytest.raises(ValidationError, match="surprise"):
        InboundMessage.model_validate(data)


def test_schema_version_is_carried_and_older_revisions_still_read() -> None:
    data = inbound_message().model_dump(mode="json")
    assert data["schema_version"] == 2
    # A revision 1 message (no assurance, no authentication) reads as all claimed.
    old = {**data, "schema_version": 1}
    del old["authentication"]
    for identity in [old["sender"], *old["identities"]]:
        del identity["assurance"]
        del identity["evidence"]
    message = InboundMessage.model_validate(old)
    assert message.schema_version == 1
    assert message.sender.assurance == "claimed"
    data["schema_version"] = 3
    with pytest.raises(ValidationError, match="schema_version"):
        InboundMessage.model_validate(data)


@pytest.mark.parametrize(
    ("kind", "value"),
    [
        (IdentityKind.EMAIL, "Alice@example.com"),
        (IdentityKind.EMAIL, "alice@Example.com"),
        (IdentityKind.EMAIL, "alice example@example.com"),
        (IdentityKind.EMAIL, "alice@bücher.de"),
        (IdentityKind.PHONE, "4155550100"),
        (IdentityKind.PHONE, "+1 415 555 0100"),
        (IdentityKind.EXTERNAL, "12345"),
        (IdentityKind.EXTERNAL, "CRM:1"),
    ],
)
def test_non_canonical_identity_values_cannot_be_constructed(
    kind: IdentityKind, value: str
) -> None:
    with pytest.raises(ValidationError, match="canonical"):
        Identity(kind=kind, value=value)


def test_identity_key() -> None:
    assert Identity(kind=IdentityKind.PHONE, value="+14155550100").key == "phone:+14155550100"
    assert Identity(kind=IdentityKind.EXTERNAL, value="crm:42").key == "external:crm:42"


def test_recipients_are_canonical_too() -> None:
    with pytest.raises(ValidationError, match="canonical"):
        Recipient(kind=IdentityKind.EMAIL, value="Support@Acme.test", role=RecipientRole.TO)


def test_attachment_needs_a_blob_or_a_url() -> None:
    with pytest.raises(ValidationError, match="blob reference or a provider url"):
        Attachment(content_type="image/png")
    Attachment(content_type="image/jpeg", url="https://api.twilio.com/media/ME1")


def test_attachment_digest_must_match_its_blob() -> None:
    blob = BlobRef(sha256=SHA, size=1, content_type="text/plain")
    with pytest.raises(ValidationError, match="differs"):
        Attachment(content_type="text/plain", sha256="00" * 32, blob=blob)


def test_naive_datetimes_are_refused_and_aware_ones_stored_in_utc() -> None:
    with pytest.raises(ValidationError, match="timezone"):
        inbound_message(received_at=datetime(2026, 1, 1))  # noqa: DTZ001 - the point of the test
    paris = timezone(timedelta(hours=1))
    message = inbound_message(received_at=datetime(2026, 1, 1, 13, 0, tzinfo=paris))
    assert message.received_at.utcoffset() == timedelta(0)
    assert message.received_at.hour == 12


def test_partition_key_is_the_sender_identity_key() -> None:
    assert inbound_message().partition_key == "email:alice@example.com"


def test_all_identities_puts_the_sender_first_without_repeats() -> None:
    message = inbound_message()
    keys = [i.key for i in message.all_identities()]
    assert keys == ["email:alice@example.com", "phone:+14155550100"]
    repeated = inbound_message(identities=(message.sender, *message.identities))
    assert [i.key for i in repeated.all_identities()] == keys


def test_channel_names_are_open_but_shaped() -> None:
    assert inbound_message(channel="telegram").channel == "telegram"
    with pytest.raises(ValidationError, match="channel"):
        inbound_message(channel="Tele Gram")
