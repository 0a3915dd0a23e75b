"""A configured web hook's payload -> InboundMessage, by dotted paths. Pure.

The mapping is data, not code: ``contact.email`` walks objects, ``items.0.id``
indexes lists, and a key that itself contains dots (form fields) matches first.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from normalize.content import Blob, Normalized
from normalize.errors import NormalizeError
from normalize.identity import (
    IdentityError,
    email_identity,
    external_identity,
    phone_identity,
)
from normalize.schema import (
    Assurance,
    Authentication,
    Identity,
    InboundMessage,
    strip_controls,
    strip_controls_deep,
)

MAX_TEXT = 100_000


class FieldMap(BaseModel):
    """Dotted paths from a payload to the schema (``contact.email``, ``items.0.id``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    email: str | None = None
    phone: str | None = None
    external: str | None = None
    name: str | None = None
    subject: str | None = None
    text: str | None = None
    id: str | None = None
    emails: tuple[str, ...] = Field(default=(), description="Further email paths.")
    phones: tuple[str, ...] = Field(default=(), description="Further phone paths.")


@dataclass(frozen=True)
class WebhookContext:
    hook: str
    message_id: UUID
    received_at: datetime
    raw: Blob
    fields: FieldMap
    channel: str = "webhook"
    external_namespace: str = "ext"
    default_region: str | None = None
    idempotency_key: str | None = None
    metadata: Mapping[str, JsonValue] = field(default_factory=dict)
    # Identity kinds the hook vouches for (a signed backend of the company's own,
    # after its user logged in); every other identity it carries is claimed.
    verified: frozenset[str] = frozenset()
    # True when the payload's strings need no stripping (a JSON body that
    # normalize.schema.json_needs_no_stripping passed): the walk is skipped.
    clean: bool = False


def lookup(payload: object, path: str) -> object:
    """The value at a dotted path, or None."""
    if isinstance(payload, dict) and path in payload:
        return payload[path]
    current = payload
    for part in path.split("."):
        if isinstance(current, dict):
            current = current.get(part)
        elif isinstance(current, list) and part.isdigit() and int(part) < len(current):
            current = current[int(part)]
        else:
            return None
    return current


def _texts(value: object) -> list[str]:
    """Scalars as text; lists flattened one level; objects and booleans ignored."""
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if isinstance(item, str) and item.strip():
            out.append(item.strip())
        elif isinstance(item, int | float) and not isinstance(item, bool):
            out.append(str(item))
    return out


def _first(payload: object, path: str | None) -> str | None:
    if path is None:
        return None
    found = _texts(lookup(payload, path))
    return found[0] if found else None


def _dedupe_key(
    ctx: WebhookContext,
    payload: object,
    sender: Identity,
    *,
    subject: str | None,
    text: str | None,
    id_value: str | None,
) -> str:
    # A key or id the poster chooses is scoped to the sender: else a stranger at a
    # public form could post first with the key or id a customer's post will carry,
    # and the customer's post would be dropped as a duplicate of the stranger's. A
    # claimed sender is anyone's to type, so there the key is also bound to what was
    # said (as an email's Message-ID is): a retry of the same post still dedupes, a
    # stranger's post under the customer's address and a guessable id (an order
    # number) no longer swallows the customer's own (attacker review, 2026-12-01).
    bound = ""
    if sender.assurance != Assurance.VERIFIED:
        said = "\x1f".join([subject or "", text or ""])
        bound = "#" + hashlib.sha256(said.encode("utf-8", "replace")).hexdigest()[:16]
    if ctx.idempotency_key:
        return f"webhook:{ctx.hook}:{sender.key}:key:{ctx.idempotency_key[:255]}{bound}"
    if id_value:
        return f"webhook:{ctx.hook}:{sender.key}:id:{id_value[:255]}{bound}"
    canonical = json.dumps(payload, sort_keys=True, ensure_ascii=False, default=str)
    digest = hashlib.sha256(canonical.encode("utf-8", "replace")).hexdigest()[:40]
    return f"webhook:{ctx.hook}:fp:{digest}"


def normalize_webhook(payload: object, ctx: WebhookContext) -> Normalized:
    # Identities are read as sent: an address with a control character in it is not
    # an address (refused below), not a different address once stripped. Every
    # other string loses its controls, so the message still arrives.
    as_sent = payload
    if not ctx.clean:
        payload = strip_controls_deep(payload)
    fm = ctx.fields
    name = _first(payload, fm.name)
    name = name[:256] if name else None
    identities: list[Identity] = []
    problems: list[str] = []

    def add(kind: str, path: str | None) -> None:
        if path is None:
            return
        proof = f"hook:{ctx.hook}" if kind in ctx.verified else None
        for value in _texts(lookup(as_sent, path))[:10]:
            try:
                if kind == "email":
                    identity = email_identity(value, name, verified_by=proof)
                elif kind == "phone":
                    identity = phone_identity(value, ctx.default_region, name, verified_by=proof)
                else:
                    identity = external_identity(
                        ctx.external_namespace, value, name, verified_by=proof
                    )
            except IdentityError as exc:
                problems.append(f"{path}: {exc}")
                continue
            identities.append(identity)

    add("email", fm.email)
    add("phone", fm.phone)
    add("external", fm.external)
    for path in fm.emails:
        add("email", path)
    for path in fm.phones:
        add("phone", path)
    if not identities:
        detail = "; ".join(problems) or (
            "none of the mapped identity fields "
            f"({', '.join(p for p in (fm.email, fm.phone, fm.external) if p)}) has a value"
        )
        raise NormalizeError("no-identity", f"the payload identifies no sender: {detail}")

    unique: dict[str, Identity] = {}
    for identity in identities:
        unique.setdefault(identity.key, identity)
    sender, *others = unique.values()

    text = _first(payload, fm.text)
    subject = _first(payload, fm.subject)
    id_value = _first(payload, fm.id)
    id_value = strip_controls(id_value) if id_value else None
    dedupe_key = _dedupe_key(ctx, payload, sender, subject=subject, text=text, id_value=id_value)

    metadata: dict[str, JsonValue] = {"hook": ctx.hook, **ctx.metadata}
    if problems:
        metadata["invalid_identities"] = list[JsonValue](problems[:10])
    message = InboundMessage(
        id=ctx.message_id,
        channel=ctx.channel,
        adapter=f"webhook:{ctx.hook}",
        received_at=ctx.received_at,
        sender=sender,
        identities=tuple(others),
        subject=" ".join(subject.split())[:998] if subject else None,
        text=text[:MAX_TEXT] if text else None,
        text_new=text[:MAX_TEXT] if text else None,
        provider_message_id=id_value[:998] if id_value else None,
        dedupe_key=dedupe_key,
        authentication=(
            Authentication(source=f"hook:{ctx.hook}")
            if any(i.assurance == Assurance.VERIFIED for i in unique.values())
            else None
        ),
        raw=ctx.raw.ref,
        metadata=metadata,
    )
    return Normalized(message=message, blobs=(ctx.raw,))
