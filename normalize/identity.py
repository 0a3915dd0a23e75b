"""Identity canonicalization: one person, one spelling.

Two spellings of one address must never become two contacts, so every identity
goes through here before it reaches the schema. Invalid input raises
:class:`IdentityError` with a message that names the input and the reason.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field

import phonenumbers
from email_validator import EmailNotValidError, validate_email

from normalize.schema import Assurance, Identity, IdentityKind

_EXTERNAL_NAMESPACE = re.compile(r"^[a-z][a-z0-9_.-]{0,31}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_EXTENSION = re.compile(r"^[0-9]{1,10}$")


class IdentityError(ValueError):
    """The input cannot be turned into a canonical identity."""


@dataclass(frozen=True)
class DomainRule:
    """How a mail domain treats address variants that reach the same mailbox."""

    strip_plus: bool = False  # alice+tag@ == alice@
    strip_dots: bool = False  # a.lice@ == alice@ (Gmail)


@dataclass(frozen=True)
class EmailPolicy:
    """Per-domain canonicalization rules, keyed by ASCII (IDNA) domain.

    Off by default: collapsing variants is only right where the provider is
    known to deliver them to one mailbox, otherwise two people become one.
    """

    domains: Mapping[str, DomainRule] = field(default_factory=dict)

    def rule_for(self, ascii_domain: str) -> DomainRule:
        return self.domains.get(ascii_domain, DomainRule())


GMAIL_POLICY = EmailPolicy(
    domains={
        "gmail.com": DomainRule(strip_plus=True, strip_dots=True),
        "googlemail.com": DomainRule(strip_plus=True, strip_dots=True),
    }
)


def canonical_email(address: str, policy: EmailPolicy | None = None) -> str:
    """Return the canonical form of a bare email address.

    Lower-cased NFC local part, IDNA (punycode) lower-case domain, and the
    domain's plus/dot rules applied. Quoted local parts are refused: they are
    vanishingly rare from real customers and ambiguous to compare.
    """
    if not isinstance(address, str):
        raise IdentityError(f"email address must be text, got {type(address).__name__}")
    candidate = unicodedata.normalize("NFC", address.strip())
    if not candidate:
        raise IdentityError("email address is empty")
    if _CONTROL.search(candidate):
        raise IdentityError(f"email address {address!r} contains control characters")
    # Cached only up to the longest address a mailbox can have (RFC 5321's 254 plus
    # room): a stranger's 100 KB "addresses" must not sit in the cache by thousands.
    checked = _validated(candidate) if len(candidate) <= 320 else _validated.__wrapped__(candidate)
    if isinstance(checked, str):
        raise IdentityError(f"invalid email address {address!r}: {checked}")
    local, domain = checked
    if len(local) > 64:
        raise IdentityError(f"invalid email address {address!r}: local part over 64 characters")
    rule = (policy or EmailPolicy()).rule_for(domain)
    if rule.strip_plus and "+" in local:
        local = local.split("+", 1)[0]
    if rule.strip_dots:
        local = local.replace(".", "")
    if not local:
        raise IdentityError(f"email address {address!r} has an empty local part after rules")
    return f"{local}@{domain}"


@functools.lru_cache(maxsize=8192)
def _validated(candidate: str) -> tuple[str, str] | str:
    """(lower-case local part, lower-case ASCII domain), or why the address is invalid.

    Cached: email_validator took 5-7% of an edge's CPU (2026-11-29), and the same
    addresses come back on every message (a company's own support address in To,
    customers who write again). Bounded; a stranger's new addresses only evict.
    """
    try:
        parsed = validate_email(candidate, check_deliverability=False, allow_quoted_local=False)
    except EmailNotValidError as exc:
        return str(exc)
    return parsed.local_part.lower(), parsed.ascii_domain.lower()


def canonical_phone(number: str, default_region: str | None = None) -> str:
    """Return the E.164 form of a phone number, e.g. ``+14155550100``, with its
    extension in RFC 3966 form when it has one: ``+14155550100;ext=12``.

    ``default_region`` (ISO 3166 alpha-2, e.g. ``US``) applies to numbers
    written without a country code. A ``whatsapp:`` or ``tel:`` prefix is
    accepted. Numbers that are not valid for their region are refused: a
    wrong number linked to a contact would merge strangers. An extension is part
    of the identity: two people behind one company switchboard number (ext. 12
    and ext. 34) are two identities, and neither is the bare number.
    """
    if not isinstance(number, str):
        raise IdentityError(f"phone number must be text, got {type(number).__name__}")
    text = number.strip()
    for prefix in ("whatsapp:", "tel:", "sms:"):
        if text.lower().startswith(prefix):
            text = text[len(prefix) :].strip()
    if not text:
        raise IdentityError("phone number is empty")
    region = default_region.upper() if default_region else None
    # Cached like email addresses (a company's own number is in every SMS); phone
    # parsing took 4-5% of the HTTP edge's CPU (2026-11-29). Real numbers are short.
    checked = _phone(text, region) if len(text) <= 64 else _phone.__wrapped__(text, region)
    if isinstance(checked, _Refusal):
        raise IdentityError(f"invalid phone number {number!r}: {checked.detail}")
    return checked


@dataclass(frozen=True)
class _Refusal:
    detail: str


@functools.lru_cache(maxsize=8192)
def _phone(text: str, region: str | None) -> str | _Refusal:
    try:
        parsed = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException as exc:
        hint = "" if region or text.startswith("+") else " (no country code and no default region)"
        return _Refusal(f"{exc}{hint}")
    if not phonenumbers.is_valid_number(parsed):
        return _Refusal("not a valid number for its region")
    e164 = phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
    extension = parsed.extension
    if extension:
        if not _EXTENSION.match(extension):
            return _Refusal(f"extension {extension!r}")
        return f"{e164};ext={extension}"
    return e164


def canonical_external(namespace: str, external_id: str) -> str:
    """Return ``namespace:id`` for an identity owned by another system."""
    ns = namespace.strip().lower()
    if not _EXTERNAL_NAMESPACE.match(ns):
        raise IdentityError(
            f"invalid external namespace {namespace!r}: use 1-32 of a-z, 0-9, '_', '.', '-'"
        )
    value = external_id.strip()
    if not value or _CONTROL.search(value) or any(c.isspace() for c in value[:1]):
        raise IdentityError(f"invalid external id {external_id!r} in namespace {ns!r}")
    if len(value) > 255:
        raise IdentityError(f"external id in namespace {ns!r} is longer than 255 characters")
    return f"{ns}:{value}"


def _display_name(name: str | None) -> str | None:
    if name is None:
        return None
    cleaned = _CONTROL.sub(" ", unicodedata.normalize("NFC", name)).strip()
    return cleaned[:256] or None


# ``verified_by`` (the evidence of an identity its channel proved) makes a verified
# identity in one validation, where ``verified(email_identity(...), evidence)`` makes
# two: an edge builds one or two verified identities a request.
def _assurance(verified_by: str | None) -> Assurance:
    return Assurance.CLAIMED if verified_by is None else Assurance.VERIFIED


def _evidence(verified_by: str | None) -> str | None:
    return None if verified_by is None else verified_by[:200]


def email_identity(
    address: str,
    display_name: str | None = None,
    policy: EmailPolicy | None = None,
    *,
    verified_by: str | None = None,
) -> Identity:
    return Identity(
        kind=IdentityKind.EMAIL,
        value=canonical_email(address, policy),
        display_name=_display_name(display_name),
        assurance=_assurance(verified_by),
        evidence=_evidence(verified_by),
    )


def phone_identity(
    number: str,
    default_region: str | None = None,
    display_name: str | None = None,
    *,
    verified_by: str | None = None,
) -> Identity:
    return Identity(
        kind=IdentityKind.PHONE,
        value=canonical_phone(number, default_region),
        display_name=_display_name(display_name),
        assurance=_assurance(verified_by),
        evidence=_evidence(verified_by),
    )


def external_identity(
    namespace: str,
    external_id: str,
    display_name: str | None = None,
    *,
    verified_by: str | None = None,
) -> Identity:
    return Identity(
        kind=IdentityKind.EXTERNAL,
        value=canonical_external(namespace, external_id),
        display_name=_display_name(display_name),
        assurance=_assurance(verified_by),
        evidence=_evidence(verified_by),
    )


def verified(identity: Identity, evidence: str) -> Identity:
    """``identity`` as proven by the channel, with the evidence that proves it (where
    the proof is known before the identity is built, pass ``verified_by`` to the
    constructor instead: one validation, not two)."""
    return identity.revised(assurance=Assurance.VERIFIED, evidence=evidence[:200])


def parse_identity_key(key: str, default_region: str | None = None) -> Identity:
    """Parse ``email:...``, ``phone:...`` or ``external:ns:id`` into an Identity.

    Used by the CLI and the API (``?identity=email:alice@example.com``).
    """
    kind, sep, rest = key.partition(":")
    if not sep or not rest:
        raise IdentityError(f"identity key {key!r} must look like 'email:alice@example.com'")
    if kind == IdentityKind.EMAIL:
        return email_identity(rest)
    if kind == IdentityKind.PHONE:
        return phone_identity(rest, default_region)
    if kind == IdentityKind.EXTERNAL:
        namespace, sep, external_id = rest.partition(":")
        if not sep:
            raise IdentityError(f"external identity key {key!r} must be 'external:namespace:id'")
        return external_identity(namespace, external_id)
    raise IdentityError(f"unknown identity kind {kind!r} in {key!r}: use email, phone or external")
