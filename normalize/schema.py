"""The one schema every channel is normalized into.

Every model here is frozen and forbids unknown fields, so a producer cannot
smuggle data past the contract and a consumer can trust what it reads. Every
top-level model carries ``schema_version``; the JSON Schema files under
``schemas/`` are generated from these models (``switchboard schema export``) and
a test fails when the two drift apart.

Compatibility: the major version is in the topic and event type names (``.v1``);
within it, changes are additive only (new optional fields with defaults, new
contact event kinds), and ``schema_version`` counts them. A reader accepts every
revision up to its own (a revision 1 message reads as one whose identities are
all claimed), so consumers are upgraded before producers: the rolling order of
Kafka's BACKWARD compatibility mode. A breaking change gets new topics (``.v2``).

Canonical forms are checked here, not only produced in :mod:`normalize.identity`:
an ``Identity`` whose value is not canonical cannot be constructed, so two
spellings of one address can never become two contacts downstream.
"""

from __future__ import annotations

import re
import types
from collections.abc import Iterable
from datetime import UTC, datetime
from enum import Enum, StrEnum
from typing import Annotated, Any, ClassVar, Literal, Self, Union, get_args, get_origin
from uuid import UUID

import annotated_types
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
    field_validator,
    model_validator,
)

#: The major version, in the topic and event type names and the schema file names.
SCHEMA_MAJOR: Literal[1] = 1
#: The revision written now; readers accept every one in :data:`SchemaVersion`.
SCHEMA_VERSION: Literal[2] = 2
SchemaVersion = Literal[1, 2]

# E.164, with an RFC 3966 extension when the number has one: "+14155550100;ext=12".
_E164 = re.compile(r"^\+[1-9][0-9]{1,14}(;ext=[0-9]{1,10})?$")
# Canonical email: lower-case local part, ASCII (IDNA) domain, no whitespace.
_EMAIL = re.compile(r"^[^\s@A-Z]{1,64}@[a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?$")
# External identities are namespaced by the system that owns them: "crm:12345".
_EXTERNAL = re.compile(r"^[a-z][a-z0-9_.-]{0,31}:\S.{0,254}$")

Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
# Channels are open-ended (adapters from other packages add their own), but shaped.
ChannelName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_-]{0,31}$")]
ShortText = Annotated[str, StringConstraints(max_length=998)]


# C0 control characters. PostgreSQL text cannot hold NUL at all (one such Message-ID
# stalled routing for good), and the others are terminal escapes and header
# smuggling in a log or a page. Bodies keep tab, CR and LF; nothing else keeps any.
CONTROLS = re.compile(r"[\x00-\x1f]")
BODY_CONTROLS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")


# A UTF-16 surrogate alone is not a character: JSON's "\ud83d" (a backend that cut a
# text mid-emoji) and UTF-7's "+2AA-" decode to one, and no UTF-8 can carry it, so the
# event could not be serialized (a 500, every retry; or the mail kept for review).
SURROGATES = re.compile("[\ud800-\udfff]")


def without_surrogates(value: str) -> str:
    """``value`` with each lone surrogate replaced by U+FFFD, as a decoder would."""
    if value.isascii():  # a flag of the string: O(1)
        return value
    try:
        value.encode("utf-8")  # in C, about 1 ns a character: 5 times the regex's speed
    except UnicodeEncodeError:
        return SURROGATES.sub("\ufffd", value)
    return value


def strip_controls(value: str, *, body: bool = False) -> str:
    """``value`` without the control characters the schema refuses, and with lone
    surrogates replaced by U+FFFD: what a normalizer calls on every string it takes
    from outside (``body=True`` for text bodies and metadata values, which keep tab,
    CR and LF)."""
    return without_surrogates((BODY_CONTROLS if body else CONTROLS).sub("", value))


def strip_controls_deep(value: object) -> object:
    """A JSON-like value with control characters stripped from every string: all of
    them from object keys, all but tab, CR and LF from values."""
    if isinstance(value, str):
        return strip_controls(value, body=True)
    if isinstance(value, list | tuple):
        return [strip_controls_deep(item) for item in value]
    if isinstance(value, dict):
        return {strip_controls(str(k)): strip_controls_deep(v) for k, v in value.items()}
    return value


def json_needs_no_stripping(data: bytes) -> bool:
    """True when every string of the JSON document in ``data`` (as ``json.loads``
    reads bytes) is already what :func:`strip_controls_deep` would make of it, so a
    caller may skip that walk (5 of a small hook's µs, 2026-12-02).

    A JSON string holds a control character only as an escape (a raw one is not
    JSON), and every escape has a backslash; a lone surrogate comes either from an
    escape or from bytes that are not UTF-8 (``json.loads`` lets encoded surrogates
    through), which strict UTF-8 refuses. Without NUL bytes the document is UTF-8,
    not UTF-16 or 32, whose bytes could pass as UTF-8 with a surrogate in them.
    """
    if b"\\" in data or b"\x00" in data:
        return False
    if data.isascii():
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# Field values that hold no string: the control-character check skips them.
_PLAIN = frozenset({type(None), bool, int, float, datetime, UUID})
_TIMES = AwareDatetime  # pydantic's marker type: a datetime once validated


def _holds_no_string(annotation: Any) -> bool:  # noqa: ANN401 - any annotation
    """True when no value the annotation admits can carry a string of a stranger's:
    numbers, times, ids, enum members (fixed values), models (which check their own
    fields), and optionals and tuples of those."""
    origin = get_origin(annotation)
    if origin is Union or origin is types.UnionType or origin is tuple:
        return all(_holds_no_string(a) for a in get_args(annotation) if a is not Ellipsis)
    if origin is Annotated:
        return _holds_no_string(get_args(annotation)[0])
    if origin is Literal:
        return not any(isinstance(a, str) for a in get_args(annotation))
    if isinstance(annotation, type):
        return annotation in _PLAIN or issubclass(annotation, _Frozen | Enum | _TIMES)
    return False


def _refuse_controls(value: object, pattern: re.Pattern[str], field: str) -> None:
    if isinstance(value, str):
        found = pattern.search(value)
        if found is not None:
            raise ValueError(
                f"{field} contains the control character U+{ord(found.group()):04X}; "
                "normalizers strip control characters (normalize.schema.strip_controls)"
            )
    elif isinstance(value, tuple | list | set | frozenset):
        _refuse_in_items(value, pattern, field)
    elif isinstance(value, dict):
        _refuse_in_items(value.keys(), CONTROLS, field)
        _refuse_in_items(value.values(), pattern, field)


def _refuse_in_items(items: Iterable[object], pattern: re.Pattern[str], field: str) -> None:
    """:func:`_refuse_controls` for each item. Strings only (the common case: a flat
    mapping of a form's fields) are searched as one text, since none holds a control
    if their concatenation holds none, and one by one only to name the one that does:
    a Twilio form's 20 metadata fields took 7 µs one by one, 3 joined (2026-12-02)."""
    text = None
    if isinstance(next(iter(items), ""), str):  # else not all strings: no join tried
        try:
            text = "".join(items)  # type: ignore[arg-type]
        except TypeError:  # a later item is not a string
            text = None
    if text is None or pattern.search(text) is not None:
        for item in items:
            _refuse_controls(item, pattern, field)


def _check_canonical(kind: IdentityKind, value: str) -> None:
    pattern = {
        IdentityKind.EMAIL: _EMAIL,
        IdentityKind.PHONE: _E164,
        IdentityKind.EXTERNAL: _EXTERNAL,
    }[kind]
    if not pattern.match(value):
        raise ValueError(
            f"{kind.value} identity value {value!r} is not in canonical form; "
            "build identities with normalize.identity"
        )


class _Frozen(BaseModel):
    """Frozen, closed to unknown fields, and no control characters in any string:
    none at all, except tab, CR and LF in the fields named in ``_bodies``."""

    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=False)
    _bodies: ClassVar[frozenset[str]] = frozenset()

    def revised(self, **changes: object) -> Self:
        """A copy with ``changes``, validated like a new instance (``model_copy``
        validates nothing, so it could carry what the schema refuses)."""
        fields = {name: getattr(self, name) for name in type(self).model_fields}
        return self.model_validate({**fields, **changes})

    @classmethod
    def _string_fields(cls) -> tuple[tuple[str, re.Pattern[str]], ...]:
        """The fields that may hold a string, with the pattern each must not match;
        worked out once per class from the annotations (:func:`_holds_no_string`)."""
        found = _STRING_FIELDS.get(cls)
        if found is None:
            # A validator of ours, or metadata other than annotated_types' bounds
            # (PlainValidator, SkipValidation), can leave any value in a field whose
            # annotation says int: such fields are always checked.
            validated = {
                name
                for decorator in cls.__pydantic_decorators__.field_validators.values()
                for name in decorator.info.fields
            }
            found = tuple(
                (name, BODY_CONTROLS if name in cls._bodies else CONTROLS)
                for name, info in cls.model_fields.items()
                if not _holds_no_string(info.annotation)
                or name in validated
                or "*" in validated
                or not all(isinstance(m, annotated_types.BaseMetadata) for m in info.metadata)
            )
            _STRING_FIELDS[cls] = found
        return found

    @model_validator(mode="after")
    def _no_controls(self) -> Self:
        # One call per model, not one per field, and only over the fields that can
        # hold a string: the check was 7% of the router's time as a validator per
        # field, and still two thirds of parsing an event when it visited them all.
        values = self.__dict__
        for field, pattern in self._string_fields():
            value = values[field]
            if type(value) is str:
                if pattern.search(value) is not None:
                    _refuse_controls(value, pattern, field)
            elif value is not None and type(value) not in _PLAIN:
                # Containers, str subclasses, anything new; not the times a
                # field validator of ours returns (received_at).
                _refuse_controls(value, pattern, field)
        return self


_STRING_FIELDS: dict[type[_Frozen], tuple[tuple[str, re.Pattern[str]], ...]] = {}


class Channel(StrEnum):
    """The built-in channels. Third-party adapters may use other names."""

    EMAIL = "email"
    SMS = "sms"
    MMS = "mms"
    WHATSAPP = "whatsapp"
    WEBHOOK = "webhook"


class IdentityKind(StrEnum):
    EMAIL = "email"
    PHONE = "phone"
    EXTERNAL = "external"


class Assurance(StrEnum):
    """How much an identity can be trusted to be the sender's."""

    VERIFIED = "verified"  # DMARC pass, a Twilio-signed carrier number, a vouching hook
    CLAIMED = "claimed"  # everything a stranger can type


class Identity(_Frozen):
    """One way to reach a person: an email address, a phone number, or an id in
    another system. ``value`` is canonical; :attr:`key` is what the router and
    the Kafka partitioner use. ``assurance`` says whether the channel proved the
    sender holds it (only verified identities link and merge contacts)."""

    kind: IdentityKind = Field(description="What kind of identity this is.")
    value: str = Field(
        min_length=1,
        max_length=320,
        description=(
            "Canonical value: lower-cased email with IDNA (ASCII) domain; "
            "E.164 phone number; 'namespace:id' for external identities."
        ),
    )
    display_name: str | None = Field(
        default=None, max_length=256, description="Name as the sender presented it, if any."
    )
    assurance: Assurance = Field(
        default=Assurance.CLAIMED,
        description="'verified' when the channel proved it; 'claimed' otherwise (the default).",
    )
    evidence: str | None = Field(
        default=None,
        max_length=200,
        description=(
            "Why it is verified: 'dmarc=pass header.from=example.com', 'twilio-signature', "
            "'hook:<name>', 'authserv:<id> dmarc=pass', 'provider:mailgun dmarc=pass'."
        ),
    )

    @model_validator(mode="after")
    def _value_is_canonical(self) -> Identity:
        _check_canonical(self.kind, self.value)
        return self

    @property
    def key(self) -> str:
        """``kind:value``, e.g. ``email:alice@example.com`` or ``phone:+14155550100``."""
        # StrEnum concatenates as its value; ``.value`` is a slow descriptor and this
        # runs ten times per routed record.
        return self.kind + ":" + self.value


AuthResult = Literal[
    "pass", "fail", "softfail", "neutral", "none", "temperror", "permerror", "policy"
]


class AuthCheck(_Frozen):
    """One sender-authentication result (RFC 8601 vocabulary)."""

    method: Literal["spf", "dkim", "dmarc", "arc"]
    result: AuthResult
    domain: str | None = Field(
        default=None,
        max_length=255,
        description="spf: the MAIL FROM domain; dkim: d=; dmarc: the From domain; arc: the sealer.",
    )
    detail: str | None = Field(default=None, max_length=500, description="Why, when known.")


class Authentication(_Frozen):
    """How the sender of a message was authenticated, and by whom."""

    source: str = Field(
        min_length=1,
        max_length=200,
        description=(
            "'local' (checked here), 'authserv:<id>' (a trusted upstream's "
            "Authentication-Results), 'provider:<name>', 'twilio-signature', 'hook:<name>'."
        ),
    )
    checks: tuple[AuthCheck, ...] = Field(default=(), max_length=50)


class RecipientRole(StrEnum):
    TO = "to"
    CC = "cc"
    ENVELOPE = "envelope"  # SMTP RCPT TO; a Bcc'd support address appears only here
    DELIVERED_TO = "delivered-to"  # the mailbox an IMAP poller read it from


class Recipient(_Frozen):
    """An address the message was sent to: a support inbox or a company number.
    Never a customer identity; an input to routing rules."""

    kind: IdentityKind
    value: str = Field(min_length=1, max_length=320)
    display_name: str | None = Field(default=None, max_length=256)
    role: RecipientRole

    @model_validator(mode="after")
    def _value_is_canonical(self) -> Recipient:
        _check_canonical(self.kind, self.value)
        return self

    @property
    def key(self) -> str:
        # StrEnum concatenates as its value; ``.value`` is a slow descriptor and this
        # runs ten times per routed record.
        return self.kind + ":" + self.value


class BlobRef(_Frozen):
    """A claim check: raw bytes stored in the content-addressed blob store."""

    sha256: Sha256Hex = Field(description="Hex SHA-256 of the stored bytes; also the address.")
    size: int = Field(ge=0, description="Size in bytes.")
    content_type: str = Field(max_length=255, description="MIME type of the stored bytes.")


class Attachment(_Frozen):
    """A non-body part of a message. Stored bytes are referenced, never inlined."""

    filename: str | None = Field(
        default=None, max_length=255, description="Sanitized file name: no path, no controls."
    )
    content_type: str = Field(max_length=255, description="Declared MIME type, lower-cased.")
    size: int | None = Field(default=None, ge=0, description="Bytes, when known.")
    sha256: Sha256Hex | None = Field(default=None, description="Digest of the bytes, when stored.")
    blob: BlobRef | None = Field(
        default=None, description="Where the bytes are stored, if they are."
    )
    url: str | None = Field(
        default=None,
        max_length=2048,
        description="Provider URL of media not (yet) downloaded, e.g. Twilio MMS media.",
    )
    inline: bool = Field(default=False, description="Shown inside the body (e.g. an inline image).")
    content_id: str | None = Field(
        default=None, max_length=998, description="MIME Content-ID without angle brackets."
    )

    @model_validator(mode="after")
    def _stored_or_linked(self) -> Attachment:
        if self.blob is None and self.url is None:
            raise ValueError("an attachment needs a blob reference or a provider url")
        if self.blob is not None and self.sha256 not in (None, self.blob.sha256):
            raise ValueError("attachment sha256 differs from its blob reference")
        return self


class Thread(_Frozen):
    """Email threading headers, as bare ids without angle brackets."""

    message_id: str | None = Field(default=None, max_length=998)
    in_reply_to: tuple[str, ...] = Field(default=(), max_length=100)
    references: tuple[str, ...] = Field(default=(), max_length=500)


class Flags(_Frozen):
    """Machine-mail markers. Set from headers and structure, never guessed from
    wording, so the router can avoid mail loops and not alert on robots."""

    auto_reply: bool = Field(default=False, description="RFC 3834 auto-reply or equivalent.")
    bounce: bool = Field(default=False, description="Delivery status notification / bounce.")
    bounced_message_id: str | None = Field(
        default=None, max_length=998, description="Message-ID of the message that bounced."
    )


# The defaults of a message without threading headers or markers (every SMS and
# form): one shared instance each, frozen like every model here. A new one per
# message cost 3 µs of a hook request's validation (2026-12-02). A factory, not a
# default, so the JSON Schema files stay as they are.
_NO_THREAD = Thread()
_NO_FLAGS = Flags()


class InboundMessage(_Frozen):
    """One message from a customer, whatever channel it came in on.

    Published to ``switchboard.inbound.v1`` keyed by ``sender.key``. ``dedupe_key``
    is stable across redeliveries and across channels that carry the same
    message (an email seen over SMTP and IMAP has one Message-ID).

    No string holds a C0 control character (U+0000 to U+001F), except tab, CR
    and LF in ``text``, ``text_new``, ``html`` and ``metadata`` values.
    """

    _bodies: ClassVar[frozenset[str]] = frozenset({"text", "text_new", "html", "metadata"})

    schema_version: SchemaVersion = SCHEMA_VERSION
    id: UUID = Field(description="UUIDv7 assigned at ingest; unique per arrival.")
    channel: ChannelName = Field(description="email, sms, mms, whatsapp, webhook, or an adapter's.")
    adapter: str = Field(
        min_length=1, max_length=64, description="Name of the adapter instance that received it."
    )
    received_at: AwareDatetime = Field(description="When Switchboard received it.")
    sent_at: AwareDatetime | None = Field(default=None, description="When the sender says it sent.")
    sender: Identity = Field(description="Who sent it.")
    identities: tuple[Identity, ...] = Field(
        default=(),
        max_length=50,
        description="Further identities of the same person the payload revealed.",
    )
    recipients: tuple[Recipient, ...] = Field(default=(), max_length=1000)
    subject: ShortText | None = None
    text: str | None = Field(default=None, description="Best plain-text body, NFC.")
    text_new: str | None = Field(
        default=None, description="Only the new part of a reply: quotes and signature removed."
    )
    html: str | None = Field(default=None, description="Sanitized HTML body, safe to display.")
    attachments: tuple[Attachment, ...] = Field(default=(), max_length=1000)
    thread: Thread = Field(default_factory=lambda: _NO_THREAD)
    provider_message_id: str | None = Field(
        default=None, max_length=998, description="The provider's id: Twilio MessageSid, etc."
    )
    dedupe_key: str = Field(
        min_length=1,
        max_length=1024,
        description="Stable key of this message, e.g. 'email-mid:<id>#<digest>', 'twilio:SM...'.",
    )
    flags: Flags = Field(default_factory=lambda: _NO_FLAGS)
    authentication: Authentication | None = Field(
        default=None, description="Sender authentication results, when the channel has any."
    )
    raw: BlobRef | None = Field(default=None, description="The raw payload as received.")
    metadata: dict[str, JsonValue] = Field(
        default_factory=dict, description="Channel-specific extras, kept verbatim."
    )

    @field_validator("received_at", "sent_at")
    @classmethod
    def _to_utc(cls, value: datetime | None) -> datetime | None:
        # One representation on the wire: equal instants serialize equally.
        return None if value is None else value.astimezone(UTC)

    @property
    def partition_key(self) -> str:
        """Kafka key: all of one sender's messages stay in order on one partition."""
        return self.sender.key

    def all_identities(self) -> tuple[Identity, ...]:
        """Sender first, then the extra identities, without repeats."""
        seen: dict[str, Identity] = {self.sender.key: self.sender}
        for identity in self.identities:
            seen.setdefault(identity.key, identity)
        return tuple(seen.values())


class DeadLetter(_Frozen):
    """What could not be normalized or routed, with why, and where the raw bytes are.

    Published to ``switchboard.deadletter.v1``; nothing is dropped silently. No
    string holds a C0 control character, except tab, CR and LF in ``detail`` and
    ``metadata`` values.
    """

    _bodies: ClassVar[frozenset[str]] = frozenset({"detail", "metadata"})

    schema_version: SchemaVersion = SCHEMA_VERSION
    id: UUID
    stage: Literal["ingest", "normalize", "router", "sink"] = Field(
        description="Where it failed; 'sink' for any consumer of the routed and contacts topics."
    )
    adapter: str | None = Field(default=None, max_length=64)
    reason: str = Field(
        min_length=1, max_length=64, description="Machine-readable cause, e.g. 'signature'."
    )
    detail: str = Field(max_length=4000, description="Human-readable explanation.")
    occurred_at: AwareDatetime
    raw: BlobRef | None = Field(default=None, description="The payload as received, if stored.")
    source_event_id: str | None = Field(
        default=None, max_length=256, description="ce_id of the event that failed, if any."
    )
    metadata: dict[str, JsonValue] = Field(default_factory=dict)


class MessageRouted(_Frozen):
    """``message.routed`` on ``switchboard.routed.v1`` (key: contact id): one message,
    the one contact it belongs to, its conversation and the contact's one owner.

    ``event_id`` is derived from the message id: a redelivered message re-emits
    this event with the same id, so consumers stay idempotent on it.
    """

    schema_version: SchemaVersion = SCHEMA_VERSION
    event_id: UUID
    message: InboundMessage
    contact_id: UUID
    conversation_id: UUID
    owner: str = Field(min_length=1, max_length=128, description="An agent or a team.")
    reason: str = Field(
        min_length=1,
        max_length=160,
        description=(
            "Why this owner: 'rule:<name>', 'default', 'sticky', 'merged', "
            "'owner-removed', 'bounce' or 'auto-reply'."
        ),
    )
    new_contact: bool
    new_conversation: bool
    merged_contact_ids: tuple[UUID, ...] = Field(
        default=(), description="Contacts this message merged into contact_id."
    )
    routed_at: AwareDatetime


class MessageDuplicate(_Frozen):
    """``message.duplicate`` on ``switchboard.routed.v1``: a second arrival of a message
    already routed (the same email over SMTP and IMAP, or to two inboxes). For
    analytics and for recording the inbox; it never creates a queue item."""

    schema_version: SchemaVersion = SCHEMA_VERSION
    event_id: UUID
    message_id: UUID = Field(description="The id of this (duplicate) arrival.")
    original_message_id: UUID
    contact_id: UUID
    conversation_id: UUID
    dedupe_key: str = Field(min_length=1, max_length=1024)
    channel: ChannelName
    adapter: str = Field(min_length=1, max_length=64)
    recipients: tuple[Recipient, ...] = Field(default=(), max_length=1000)
    received_at: AwareDatetime


class ContactEventKind(StrEnum):
    CREATED = "contact.created"
    IDENTITY_LINKED = "identity.linked"
    MERGED = "contact.merged"
    OWNER_ASSIGNED = "owner.assigned"
    MERGE_SUGGESTED = "merge.suggested"
    MERGE_DISMISSED = "merge.dismissed"
    UNMERGED = "contact.unmerged"


class MessageMove(_Frozen):
    """One message an unmerge moved to another conversation (its contact follows)."""

    message_id: UUID
    conversation_id: UUID


class ContactEvent(_Frozen):
    """Contact lifecycle on ``switchboard.contacts.v1`` (key: contact id).

    - ``contact.created``: ``identities`` and ``owner`` of the new contact;
    - ``identity.linked``: ``identities`` newly attached to an existing contact;
    - ``contact.merged``: ``merged_contact_ids`` now live on as ``contact_id`` (the
      older contact, which keeps its owner, given in ``owner``); ``identities``
      moved with them;
    - ``owner.assigned``: ``owner`` replaces ``previous_owner`` for ``reason``
      ('owner-removed' or 'manual');
    - ``merge.suggested``: ``other_contact_id`` holds ``identities[0]``, which the
      message ``message_id`` also carried for ``contact_id``; they would have
      merged (or linked) had the identity been verified. Nothing moved: an agent
      decides. (Revision 2.)
    - ``merge.dismissed``: an agent (``by``) dismissed the suggestion
      ``suggestion_id`` (the ``event_id`` of its ``merge.suggested``) of
      ``contact_id``. (Revision 2.)
    - ``contact.merged`` by an agent carries ``by`` and no ``message_id``.
      (Revision 2.)
    - ``contact.unmerged``: ``contact_id`` lives again, apart from
      ``other_contact_id`` (the contact it had been merged into), with ``owner``,
      its ``identities``, the contacts merged into it before
      (``merged_contact_ids``), its conversations (``conversation_ids``, with
      every message in them) and ``moved_messages``: messages that arrived during
      the merge and changed conversation (to the one given). Keyed by
      ``other_contact_id``, the key of the merge it undoes. (Revision 2.)
    - ``display_name``: on the events a message causes, the name its sender
      presented, if any. (Revision 2.)
    """

    schema_version: SchemaVersion = SCHEMA_VERSION
    event_id: UUID
    kind: ContactEventKind
    contact_id: UUID
    occurred_at: AwareDatetime
    identities: tuple[str, ...] = Field(default=(), description="Identity keys, kind:value.")
    merged_contact_ids: tuple[UUID, ...] = ()
    owner: str | None = Field(default=None, max_length=128)
    previous_owner: str | None = Field(default=None, max_length=128)
    reason: str | None = Field(default=None, max_length=160)
    message_id: UUID | None = Field(default=None, description="The message that caused it.")
    other_contact_id: UUID | None = Field(
        default=None, description="merge.suggested: the contact that would have merged."
    )
    suggestion_id: UUID | None = Field(
        default=None, description="merge.dismissed: the event_id of the merge.suggested."
    )
    by: str | None = Field(
        default=None, max_length=128, description="The agent who did it, for agents' actions."
    )
    conversation_ids: tuple[UUID, ...] = Field(
        default=(), description="contact.unmerged: the conversations that go back."
    )
    moved_messages: tuple[MessageMove, ...] = Field(
        default=(), description="contact.unmerged: messages that changed conversation."
    )
    display_name: str | None = Field(
        default=None,
        max_length=256,
        description=(
            "contact.created, identity.linked, contact.merged: the name the sender of "
            "``message_id`` presented, when there was one (as presented: not verified)."
        ),
    )


class ConversationStatus(_Frozen):
    """``conversation.status`` on ``switchboard.routed.v1`` (key: contact id): an agent
    marked a conversation waiting on the customer or closed. A new customer message
    reopens it. On the topic, so a read model rebuilt from the topics keeps it."""

    schema_version: SchemaVersion = SCHEMA_VERSION
    event_id: UUID
    conversation_id: UUID
    contact_id: UUID
    status: Literal["open", "waiting", "closed"]
    changed_by: str | None = Field(default=None, max_length=128)
    occurred_at: AwareDatetime


#: Every model whose JSON Schema is checked in under ``schemas/``.
PUBLISHED_MODELS: tuple[type[BaseModel], ...] = (
    InboundMessage,
    DeadLetter,
    MessageRouted,
    MessageDuplicate,
    ContactEvent,
    ConversationStatus,
)
