from __future__ import annotations

from collections.abc import Callable

import pytest

from normalize.identity import (
    GMAIL_POLICY,
    IdentityError,
    canonical_email,
    canonical_external,
    canonical_phone,
    email_identity,
    external_identity,
    parse_identity_key,
    phone_identity,
    verified,
)
from normalize.schema import Assurance, Identity, IdentityKind


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("alice@example.com", "alice@example.com"),
        ("Alice@Example.COM", "alice@example.com"),
        ("  alice@example.com\n", "alice@example.com"),
        ("alice+billing@example.com", "alice+billing@example.com"),
        ("a.lice@example.com", "a.lice@example.com"),
        ("alice@bücher.de", "alice@xn--bcher-kva.de"),
        ("alice@BÜCHER.de", "alice@xn--bcher-kva.de"),
        ("alice@xn--bcher-kva.de", "alice@xn--bcher-kva.de"),
        ("Ünïcode@example.com", "ünïcode@example.com"),
        ("o'brien@example.ie", "o'brien@example.ie"),
    ],
)
def test_canonical_email(raw: str, canonical: str) -> None:
    assert canonical_email(raw) == canonical


def test_email_unicode_is_nfc_normalized() -> None:
    decomposed = "Jose\u0301@example.com"  # e + combining acute
    assert canonical_email(decomposed) == "jos\u00e9@example.com"


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("Al.Ice+news@gmail.com", "alice@gmail.com"),
        ("alice@googlemail.com", "alice@googlemail.com"),
        ("al.ice+x@example.com", "al.ice+x@example.com"),
    ],
)
def test_per_domain_plus_and_dot_rules(raw: str, canonical: str) -> None:
    assert canonical_email(raw, GMAIL_POLICY) == canonical


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("alice", "invalid email"),
        ("alice@", "invalid email"),
        ("@example.com", "invalid email"),
        ("a..b@example.com", "two periods"),
        ("bad@@example.com", "invalid email"),
        ("alice@localhost", "invalid email"),
        ('"quoted local"@example.com', "invalid email"),
        ("alice\x00@example.com", "control characters"),
        ("alice@exa mple.com", "invalid email"),
        ("x" * 65 + "@example.com", "invalid email"),
    ],
)
def test_invalid_email_raises_a_clear_error(raw: str, reason: str) -> None:
    with pytest.raises(IdentityError, match=reason):
        canonical_email(raw)


@pytest.mark.parametrize(
    ("raw", "region", "canonical"),
    [
        ("+14155550100", None, "+14155550100"),
        ("+1 (415) 555-0100", None, "+14155550100"),
        ("(415) 555-0100", "US", "+14155550100"),
        ("415.555.0100", "us", "+14155550100"),
        ("020 7946 0958", "GB", "+442079460958"),
        ("+44 20 7946 0958", "US", "+442079460958"),
        ("whatsapp:+14155550100", None, "+14155550100"),
        ("tel:+33 1 42 68 53 00", None, "+33142685300"),
        ("+1 800 FLOWERS", None, "+18003569377"),
    ],
)
def test_canonical_phone(raw: str, region: str | None, canonical: str) -> None:
    assert canonical_phone(raw, region) == canonical


@pytest.mark.parametrize(
    ("raw", "region", "reason"),
    [
        ("", "US", "empty"),
        ("not a number", "US", "did not seem to be a phone number"),
        ("4155550100", None, "no country code and no default region"),
        ("12345", "US", "not a valid number"),
        ("+999123", None, "invalid phone number"),
        ("+1 415 555 01", None, "not a valid number"),
    ],
)
def test_invalid_phone_raises_a_clear_error(raw: str, region: str | None, reason: str) -> None:
    with pytest.raises(IdentityError, match=reason):
        canonical_phone(raw, region)


def test_external_identities_are_namespaced() -> None:
    assert canonical_external("CRM", " 42 ") == "crm:42"
    with pytest.raises(IdentityError, match="namespace"):
        canonical_external("has space", "1")
    with pytest.raises(IdentityError, match="external id"):
        canonical_external("crm", "  ")


def test_identity_builders_clean_display_names() -> None:
    identity = email_identity("alice@example.com", "  Alice\r\nInjected  ")
    assert identity.display_name == "Alice  Injected"
    assert email_identity("alice@example.com", "   ").display_name is None


def test_identity_keys_round_trip() -> None:
    for identity in (
        email_identity("Alice@Example.com"),
        phone_identity("+14155550100"),
        parse_identity_key("external:crm:42"),
    ):
        assert parse_identity_key(identity.key) == identity
    assert parse_identity_key("phone:(415) 555-0100", "US").value == "+14155550100"
    assert parse_identity_key("external:crm:42").kind is IdentityKind.EXTERNAL


@pytest.mark.parametrize("key", ["alice@example.com", "fax:+1", "email:", "external:nocolon"])
def test_bad_identity_keys_are_refused(key: str) -> None:
    with pytest.raises(IdentityError):
        parse_identity_key(key)


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("+1 415 555 0100 ext. 12", "+14155550100;ext=12"),
        ("(415) 555-0100 x12", "+14155550100;ext=12"),
        ("+1 415 555 0100 extension 34", "+14155550100;ext=34"),
        ("tel:+1-415-555-0100;ext=12", "+14155550100;ext=12"),
        ("+14155550100;ext=12", "+14155550100;ext=12"),
    ],
)
def test_an_extension_is_part_of_the_phone_identity(raw: str, canonical: str) -> None:
    assert canonical_phone(raw, "US") == canonical
    identity = phone_identity(raw, "US")
    assert identity.key == f"phone:{canonical}"
    assert parse_identity_key(identity.key).key == identity.key


def test_two_extensions_and_the_bare_number_are_three_identities() -> None:
    keys = {
        phone_identity(n, "US").key
        for n in ("+1 415 555 0100 ext. 12", "+1 415 555 0100 ext. 34", "+1 415 555 0100")
    }
    assert len(keys) == 3


def test_an_absurd_extension_is_refused() -> None:
    with pytest.raises(IdentityError, match="extension"):
        canonical_phone("+1 415 555 0100 ext. 12345678901234", "US")


def test_address_checks_are_cached_but_not_for_giant_addresses() -> None:
    from normalize import identity  # noqa: PLC0415 - the private cache, for this test only

    identity._validated.cache_clear()
    assert canonical_email("Repeat@Example.com") == canonical_email("Repeat@Example.com")
    assert identity._validated.cache_info().hits >= 1
    giant = "a" * 100_000 + "@example.com"
    before = identity._validated.cache_info().currsize
    with pytest.raises(IdentityError, match="too long"):
        canonical_email(giant)
    assert identity._validated.cache_info().currsize == before


def test_phone_checks_are_cached_with_the_same_answers() -> None:
    from normalize import identity  # noqa: PLC0415 - the private cache, for this test only

    identity._phone.cache_clear()
    first = canonical_phone("+1 415 555 0100")
    assert canonical_phone("+1 415 555 0100") == first == "+14155550100"
    assert identity._phone.cache_info().hits == 1
    for bad in ("12", "+1 415 555 0100 ext. 12345678901"):
        messages = set()
        for _ in range(2):  # refused the same way from the cache, naming the input
            with pytest.raises(IdentityError) as refused:
                canonical_phone(bad)
            messages.add(str(refused.value))
        assert len(messages) == 1
        assert repr(bad) in messages.pop()
    before = identity._phone.cache_info().currsize
    with pytest.raises(IdentityError):
        canonical_phone("+1" + "5" * 200)
    assert identity._phone.cache_info().currsize == before


@pytest.mark.parametrize(
    ("build", "evidence"),
    [
        (lambda by: email_identity("Ann@Example.com", "Ann", verified_by=by), "hook:crm"),
        (lambda by: phone_identity("(415) 555-0100", "US", verified_by=by), "twilio-signature"),
        (lambda by: external_identity("crm", "42", "Ann", verified_by=by), "x" * 300),
    ],
)
def test_verified_at_construction_equals_verified_afterwards(
    build: Callable[[str | None], Identity], evidence: str
) -> None:
    made = build(evidence)
    assert made == verified(build(None), evidence)
    assert made.assurance == Assurance.VERIFIED
    assert made.evidence == evidence[:200]
    assert build(None).assurance == Assurance.CLAIMED
    assert build(None).evidence is None
