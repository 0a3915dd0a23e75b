"""MIME bytes -> InboundMessage. Pure: no I/O; the caller stores the blobs.

Real mail is full of defects (missing boundaries, unknown charsets, 8-bit
headers, broken encoded words). Every access to a header or a part goes
through a helper that falls back instead of raising, so the only exception
that leaves :func:`normalize_email` is :class:`NormalizeError`, for a message
that has no usable sender at all. The adapter dead-letters those with the raw
bytes kept.
"""

from __future__ import annotations

import hashlib
import html as htmllib
import re
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import policy
from email.header import decode_header, make_header
from email.message import Message
from email.parser import BytesParser
from email.utils import getaddresses, parsedate_to_datetime
from uuid import UUID

import lxml.html
import nh3
from inscriptis import get_text
from mailparser_reply import EmailReplyParser
from pydantic import JsonValue

from normalize.content import Blob, Normalized, Serialized
from normalize.errors import NormalizeError
from normalize.identity import (
    EmailPolicy,
    IdentityError,
    canonical_email,
    email_identity,
    verified,
)
from normalize.schema import (
    Attachment,
    Authentication,
    Channel,
    Flags,
    Identity,
    IdentityKind,
    InboundMessage,
    Recipient,
    RecipientRole,
    Thread,
    strip_controls,
    without_surrogates,
)

MAX_RECIPIENTS = 1000
MAX_ATTACHMENTS = 1000
_MSGID = re.compile(r"<([^<>\s]{1,996})>")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_FILENAME_BAD = re.compile(r'[\x00-\x1f\x7f<>:"|?*]')
# Each language costs about 0.15 ms per 2 KB of text (measured); these four cover
# most inbound support mail. Markers of other languages stay in text_new.
_REPLY_PARSER = EmailReplyParser(languages=["en", "de", "fr", "es"])
_MACHINE_SENDERS = {"mailer-daemon", "postmaster", "mail-daemon", "mailerdaemon"}
_BULK_PRECEDENCE = {"bulk", "junk", "list", "auto_reply"}

# Tags and attributes a queue UI may render. No style (CSS can load remote
# content), no forms, no media; images only from the message itself (cid:).
_ALLOWED_TAGS = set(nh3.ALLOWED_TAGS) | {"font", "center"}
_ALLOWED_ATTRIBUTES = {
    **{tag: set(attrs) for tag, attrs in nh3.ALLOWED_ATTRIBUTES.items()},
    "img": {"src", "alt", "width", "height", "title"},
    "font": {"color", "face", "size"},
    "td": {"colspan", "rowspan", "align", "valign"},
    "th": {"colspan", "rowspan", "align", "valign"},
}


@dataclass(frozen=True)
class EmailVerdict:
    """What sender authentication concluded, computed by the adapter (DNS, a trusted
    upstream's header, a provider's payload) and recorded here without I/O.

    ``dmarc_domain`` is the From domain that passed DMARC (or the upstream's or
    provider's equivalent); the sender becomes verified only when it was read from
    a single-address From header in exactly that domain.
    """

    authentication: Authentication
    dmarc_domain: str | None = None
    evidence: str | None = None


@dataclass(frozen=True)
class EmailContext:
    """What the receiving adapter knows besides the bytes."""

    adapter: str
    message_id: UUID
    received_at: datetime
    mail_from: str | None = None  # SMTP MAIL FROM; "" or "<>" is the null reverse path
    rcpt_tos: Sequence[str] = ()  # SMTP RCPT TO
    delivered_to: Sequence[str] = ()  # the mailbox an IMAP poller read it from
    email_policy: EmailPolicy | None = None
    metadata: Mapping[str, JsonValue] = field(default_factory=dict)
    verdict: EmailVerdict | None = None  # sender authentication, when the adapter has one


def serialize_email(raw: bytes, ctx: EmailContext) -> Serialized:
    """:func:`normalize_email`, serialized where it ran (the SMTP parse process),
    without the raw message's bytes (the caller has them: ``.restoring(raw)``): a
    25 MB message no longer comes back through the socket and its pickle."""
    return Serialized.of(normalize_email(raw, ctx)).eliding(raw)


def normalize_email(raw: bytes, ctx: EmailContext) -> Normalized:
    raw_blob = Blob.of(raw, "message/rfc822")
    # compat32 parses structure about 10x faster than policy.default (which re-parses
    # a header on every access); the few headers we use are decoded explicitly below.
    msg = BytesParser(policy=policy.compat32).parsebytes(raw)

    sender, sender_notes = _sender(msg, ctx)
    if ctx.verdict is not None and _dmarc_vouches(msg, sender, sender_notes, ctx.verdict):
        sender = verified(
            sender, ctx.verdict.evidence or f"dmarc=pass header.from={_domain(sender)}"
        )
    plain_part, html_part = _body_parts(msg)
    plain = _text_of(plain_part) if plain_part is not None else None
    html_raw = _text_of(html_part) if html_part is not None else None
    text = _clean_text(plain) if plain else None
    if not text and html_raw:
        text = _clean_text(_html_to_text(html_raw))
    html = sanitize_html(html_raw) if html_raw else None

    attachments, blobs, bounced_id = _attachments(msg, skip=(plain_part, html_part))
    thread = Thread(
        message_id=_first_msgid(_header(msg, "Message-ID")),
        in_reply_to=_msgids(_header(msg, "In-Reply-To"))[:100],
        references=_msgids(_header(msg, "References"))[-500:],
    )
    flags = _flags(msg, sender, ctx, bounced_id)
    subject = _clean_line(_header(msg, "Subject"))
    sent_at = _date(msg)
    dedupe_key = (
        f"email-mid:{thread.message_id[:990]}#{_content_digest(sender, subject, text, attachments)}"
        if thread.message_id
        else _fingerprint(sender, _header(msg, "Date"), subject, text)
    )
    metadata: dict[str, JsonValue] = {**ctx.metadata, **sender_notes}
    defects = _defects(msg)
    if defects:
        metadata["defects"] = list[JsonValue](defects)
    if ctx.mail_from is not None:
        metadata["mail_from"] = strip_controls(ctx.mail_from)

    message = InboundMessage(
        id=ctx.message_id,
        channel=Channel.EMAIL,
        adapter=ctx.adapter,
        received_at=ctx.received_at,
        sent_at=sent_at,
        sender=sender,
        recipients=_recipients(msg, ctx),
        subject=subject[:998] if subject else None,
        text=text,
        text_new=_text_new(text) if text else None,
        html=html,
        attachments=tuple(attachments),
        thread=thread,
        dedupe_key=dedupe_key,
        flags=flags,
        raw=raw_blob.ref,
        metadata=metadata,
        authentication=ctx.verdict.authentication if ctx.verdict is not None else None,
    )
    return Normalized(message=message, blobs=(raw_blob, *blobs))


def _domain(identity: Identity) -> str:
    return identity.value.rsplit("@", 1)[-1]


def _dmarc_vouches(
    msg: Message, sender: Identity, notes: Mapping[str, JsonValue], verdict: EmailVerdict
) -> bool:
    """DMARC speaks for the one From address only: not for a Sender or envelope
    fallback, and not for a From with several addresses (RFC 7489 section 6.6.1)."""
    if not verdict.dmarc_domain or notes.get("sender_from_fallback"):
        return False
    if len(_raw_values(msg, "From")) != 1 or len(_addresses(msg, "From")) != 1:
        return False
    return _domain(sender) == verdict.dmarc_domain


# -- headers ---------------------------------------------------------------


#: Encoded words are decoded in the first this many characters of a header; the rest
#: is kept as it came. The standard library decodes them in quadratic time: a Subject
#: of 130,000 encoded words (1.8 MB) held the parse process past its timeout, twice
#: (attacker review, 2026-12-02; 20,000 words 0.75 s). A subject is cut to 998
#: characters and a display name to 256 anyway.
DECODED_HEADER_MAX = 16 * 1024


def _decode_words(value: str) -> str:
    """RFC 2047 encoded words to text; undecodable input is kept as it is."""
    if "=?" not in value:
        return value
    rest = ""
    if len(value) > DECODED_HEADER_MAX:
        # Cut between words, not inside an encoded one.
        cut = value.rfind(" ", 0, DECODED_HEADER_MAX)
        cut = cut if cut > 0 else DECODED_HEADER_MAX
        value, rest = value[:cut], value[cut:]
    try:
        return without_surrogates(str(make_header(decode_header(value)))) + rest
    except Exception:  # noqa: BLE001 - bad charsets, bad base64, ...: keep the raw text
        return value + rest


def _unfold(value: str) -> str:
    return re.sub(r"\r?\n[ \t]+", " ", value).replace("\r", "").replace("\n", "")


def _raw_values(msg: Message, name: str) -> list[str]:
    """A header's values as received. ``raw_items`` keeps 8-bit bytes as surrogate
    escapes, where ``get`` would wrap them in a Header that renders them as U+FFFD."""
    wanted = name.lower()
    return [_unescape(_unfold(str(v))) for k, v in msg.raw_items() if k.lower() == wanted]


def _header(msg: Message, name: str) -> str | None:
    """A header's decoded text, or None. Never raises, whatever the bytes. Control
    characters (raw or hidden in an encoded word) are gone, tabs become spaces."""
    values = _raw_values(msg, name)
    return strip_controls(_decode_words(values[0]).replace("\t", " ")) if values else None


def _unescape(text: str) -> str:
    """Undo the parser's surrogate escapes of raw 8-bit header bytes.

    Such bytes are UTF-8 (SMTPUTF8 mail) or, from older clients, almost always cp1252.
    """
    if not any("\udc80" <= ch <= "\udcff" for ch in text):
        return text
    data = text.encode("utf-8", "surrogateescape")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", "replace")


def _clean_line(value: str | None) -> str | None:
    if value is None:
        return None
    text = unicodedata.normalize("NFC", _CONTROL.sub("", value))
    text = " ".join(text.replace("\r", " ").replace("\n", " ").split())
    return text or None


def _addresses(msg: Message, name: str) -> list[tuple[str, str]]:
    """(display name, addr-spec) pairs of an address header, tolerant of junk."""
    values = _raw_values(msg, name)
    if not values:
        return []
    try:
        pairs = getaddresses(values)
    except Exception:  # noqa: BLE001 - malformed beyond the lenient parser
        return []
    return [(_decode_words(display), addr) for display, addr in pairs]


def _identity(pairs: list[tuple[str, str]], ctx: EmailContext) -> Identity | None:
    for display, address in pairs:
        try:
            return email_identity(address, display or None, ctx.email_policy)
        except IdentityError:
            continue
    return None


def _sender(msg: Message, ctx: EmailContext) -> tuple[Identity, dict[str, JsonValue]]:
    notes: dict[str, JsonValue] = {}
    sender = _identity(_addresses(msg, "From"), ctx)
    for name, key in (("Reply-To", "reply_to"), ("Sender", "sender_header")):
        other = _identity(_addresses(msg, name), ctx)
        if other is not None and (sender is None or other.value != sender.value):
            notes[key] = other.value
    if sender is None:
        # No usable From: fall back to Sender, Reply-To, then the envelope.
        sender = _identity(_addresses(msg, "Sender"), ctx) or _identity(
            _addresses(msg, "Reply-To"), ctx
        )
        if sender is None and ctx.mail_from and ctx.mail_from.strip("<>"):
            sender = _identity([("", ctx.mail_from.strip("<>"))], ctx)
        if sender is None:
            raise NormalizeError(
                "no-sender",
                f"no valid sender address in From {_header(msg, 'From')!r}, Sender, "
                f"Reply-To or the envelope ({ctx.mail_from!r})",
            )
        notes["sender_from_fallback"] = True
    return sender, notes


def _recipients(msg: Message, ctx: EmailContext) -> tuple[Recipient, ...]:
    found: dict[tuple[str, RecipientRole], Recipient] = {}
    sources: list[tuple[RecipientRole, list[tuple[str, str]]]] = [
        (RecipientRole.TO, _addresses(msg, "To")),
        (RecipientRole.CC, _addresses(msg, "Cc")),
        (RecipientRole.ENVELOPE, [("", a) for a in ctx.rcpt_tos]),
        (RecipientRole.DELIVERED_TO, [("", a) for a in ctx.delivered_to]),
    ]
    for role, pairs in sources:
        for display, address in pairs:
            if len(found) >= MAX_RECIPIENTS:
                break
            try:
                value = canonical_email(address.strip("<>"), ctx.email_policy)
            except IdentityError:
                continue
            name = _clean_line(display)
            found.setdefault(
                (value, role),
                Recipient(
                    kind=IdentityKind.EMAIL,
                    value=value,
                    display_name=name[:256] if name else None,
                    role=role,
                ),
            )
    return tuple(found.values())


def _date(msg: Message) -> datetime | None:
    raw = _header(msg, "Date")
    if not raw:
        return None
    try:
        parsed = parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if parsed.tzinfo is None:  # "-0000": zone unknown; RFC 5322 says treat as UTC
        parsed = parsed.replace(tzinfo=UTC)
    return parsed


def _first_msgid(value: str | None) -> str | None:
    if not value:
        return None
    ids = _msgids(value)
    if ids:
        return ids[0]
    bare = value.strip()
    return bare[:998] if bare and " " not in bare else None


def _msgids(value: str | None) -> tuple[str, ...]:
    if not value:
        return ()
    seen: dict[str, None] = {}
    for found in _MSGID.findall(value):
        seen.setdefault(found, None)
    return tuple(seen)


def _defects(msg: Message) -> list[str]:
    names: dict[str, None] = {}
    for part in _walk(msg):
        for defect in getattr(part, "defects", []):
            names.setdefault(type(defect).__name__, None)
    return list(names)[:20]


# -- flags -----------------------------------------------------------------


def _flags(msg: Message, sender: Identity, ctx: EmailContext, bounced_id: str | None) -> Flags:
    auto_submitted = (_header(msg, "Auto-Submitted") or "").strip().lower()
    precedence = (_header(msg, "Precedence") or "").strip().lower()
    suppress = (_header(msg, "X-Auto-Response-Suppress") or "").strip().lower()
    auto_reply = (
        (auto_submitted not in ("", "no"))
        or _header(msg, "X-Autoreply") is not None
        or _header(msg, "X-Autorespond") is not None
        or precedence in _BULK_PRECEDENCE
        or suppress not in ("", "none")
    )
    report = msg.get_content_type() == "multipart/report" and (
        (msg.get_param("report-type") or "") == "delivery-status"
    )
    null_sender = ctx.mail_from is not None and ctx.mail_from.strip() in ("", "<>")
    return_path = (_header(msg, "Return-Path") or "").strip()
    null_return = return_path == "<>"
    machine = sender.value.split("@", 1)[0] in _MACHINE_SENDERS
    bounce = bool(report or machine or ((null_sender or null_return) and not auto_reply))
    return Flags(
        auto_reply=auto_reply and not bounce,
        bounce=bounce,
        bounced_message_id=bounced_id if bounce else None,
    )


# -- bodies ------------------------------------------------------------------


def _walk(part: Message) -> Iterator[Message]:
    """Every part, treating message/* parts as leaves (attached messages stay whole)."""
    yield part
    if part.get_content_maintype() == "message":
        return
    if part.is_multipart():
        payload = part.get_payload()
        if isinstance(payload, list):
            for child in payload:
                if isinstance(child, Message):
                    yield from _walk(child)


def _is_attachment(part: Message) -> bool:
    try:
        disposition = part.get_content_disposition()
    except Exception:  # noqa: BLE001
        disposition = None
    return disposition == "attachment"


def _body_parts(msg: Message) -> tuple[Message | None, Message | None]:
    """The text/plain and text/html parts that are the body, not attachments."""
    plain: Message | None = None
    html: Message | None = None
    for part in _walk(msg):
        if part.is_multipart() or part.get_content_maintype() == "message":
            continue
        if _is_attachment(part):
            continue
        ctype = part.get_content_type()
        if ctype == "text/plain" and plain is None:
            plain = part
        elif ctype == "text/html" and html is None:
            html = part
        if plain is not None and html is not None:
            break
    return plain, html


def _text_of(part: Message) -> str:
    """A text part's content as str, whatever its charset claims."""
    try:
        data = part.get_payload(decode=True)
    except Exception:  # noqa: BLE001
        data = None
    if not isinstance(data, bytes):
        payload = part.get_payload()
        return payload if isinstance(payload, str) else ""
    charset = (part.get_content_charset() or "utf-8").strip().lower()
    for candidate in (charset, "utf-8"):
        try:
            return without_surrogates(data.decode(candidate))  # UTF-7 can make them
        except (LookupError, UnicodeDecodeError):
            continue
    # cp1252 is what mislabelled 8-bit mail almost always is; latin-1 never fails.
    try:
        return data.decode("cp1252")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _clean_text(text: str) -> str | None:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = unicodedata.normalize("NFC", _CONTROL.sub("", text)).strip()
    return text or None


#: The HTML inscriptis lays out (tables, lists, line breaks as a mail client shows
#: them). It merges the text of one block in quadratic time: one <p> of 300,000 tiny
#: tags (4 MB) took 50-58 s, 1 MB 2.2 s, 2 MB 9.4 s (2026-12-02, loaded machine), so a
#: stranger's mail held a parse process up to its timeout, twice. Just under 256 KB the
#: worst measured was 1.2-1.5 s (one table row of cells; a review, the same day);
#: anything larger has its text taken in linear time instead.
LAYOUT_HTML_MAX = 256 * 1024
# Elements whose end is a line break in the linear extraction.
_BLOCKS = frozenset(
    {
        *("address", "article", "aside", "blockquote", "br", "dd", "div", "dl", "dt"),
        *("fieldset", "figcaption", "figure", "footer", "form", "h1", "h2", "h3", "h4"),
        *("h5", "h6", "header", "hr", "li", "main", "nav", "ol", "p", "pre", "section"),
        *("table", "td", "th", "tr", "ul"),
    }
)
_BLANK_LINES = re.compile(r"\n(?:[ \t]*\n)+")
# Runs of spaces and tabs, as HTML collapses them (a review found the linear text
# keeping the source's indentation and every &nbsp;).
_SPACES = re.compile(r"[ \t]+")
_UNSEEN = ("script", "style", "head", "template", "noscript")
# A tag without its closing ">" stops at the next "<": each character is looked at a
# bounded number of times ("<[^>]*>" rescanned to the end after every lone "<").
_TAG = re.compile(r"<[^<>]*>")


def _html_to_text(html: str) -> str:
    if len(html) <= LAYOUT_HTML_MAX:
        try:
            return str(get_text(html))
        except Exception:  # noqa: BLE001, S110 - lxml on hostile markup: the linear way
            pass
    return _html_to_text_linear(html)


def _html_to_text_linear(html: str) -> str:
    """The text of any HTML in linear time: lxml's parser (C), a line break after
    each block element, nothing of scripts and styles; tags stripped by a regular
    expression when lxml cannot read it."""
    try:
        root = lxml.html.fromstring(html)
    except Exception:  # noqa: BLE001 - empty or hostile markup
        return htmllib.unescape(_TAG.sub(" ", html))
    for unseen in list(root.iter(*_UNSEEN)):
        unseen.drop_tree()  # its tail (the text after it) stays
    for element in root.iter():
        if isinstance(element.tag, str) and element.tag.lower() in _BLOCKS:
            element.text = "\n" + (element.text or "")
            element.tail = "\n" + (element.tail or "")
    text = str(root.text_content()).replace("\xa0", " ")
    return _BLANK_LINES.sub("\n", _SPACES.sub(" ", text).replace(" \n", "\n").replace("\n ", "\n"))


def _img_only_from_message(tag: str, attribute: str, value: str) -> str | None:
    if tag == "img" and attribute == "src" and not value.lower().startswith("cid:"):
        return None  # remote images are trackers; data: URIs can hide payloads
    return value


#: HTML with more start tags than this is not rendered (the text is still taken from
#: it). The sanitizer, nh3, takes quadratic time in the nesting depth: 10,000 nested
#: <div> 0.24-0.34 s, 40,000 7.4 s, and a stranger's 650 KB mail of 130,000 held the
#: parse process for its whole timeout, twice (attacker review, 2026-12-02). No count of
#: the depth by pattern is safe: one that skipped "<div/>" (a <div> to an HTML parser),
#: lowered it at stray end tags and missed tags with a "<" in an attribute was fooled by
#: each (review of that fix, the same day). The depth cannot exceed the start tags, and
#: "<" not followed by "/" counts at least those, whatever the markup. A mail's HTML
#: with more than 10,000 tags (several hundred KB; clients clip far below) is rare.
MAX_HTML_START_TAGS = 10_000


def _too_many_start_tags(html: str) -> bool:
    """More possible start tags than MAX_HTML_START_TAGS (two counts, in C)."""
    return html.count("<") - html.count("</") > MAX_HTML_START_TAGS


def sanitize_html(html: str) -> str | None:
    """HTML an agent's page may render (in a sandboxed frame): no scripts, styles,
    forms, media or remote images; None when nothing is left, or when it has more
    than ``MAX_HTML_START_TAGS`` tags."""
    if _too_many_start_tags(html):
        return None
    cleaned = nh3.clean(
        strip_controls(html, body=True),
        tags=_ALLOWED_TAGS,
        attributes=_ALLOWED_ATTRIBUTES,
        attribute_filter=_img_only_from_message,
        url_schemes={"http", "https", "mailto", "tel", "cid"},
        link_rel="noopener noreferrer nofollow",
        strip_comments=True,
    ).strip()
    return cleaned or None


# Cues that a text may hold quoted history or a signature. The reply parser costs
# about 30% of SMTP ingest CPU when run on every message (measured with py-spy);
# a message with none of these has nothing for it to cut.
# What suggests quoted history, checked before the (slower) reply parser runs. Two
# parts: words anywhere (a substring test of the lowered text) and patterns at the
# start of a line. One regex with both took 380 µs on a 2 KB mail (the unanchored
# words are tried at every position); the two parts take 31 µs and find the same.
_REPLY_WORDS = ("wrote:", "schrieb", "a écrit", "escribió", "original message")
# Only horizontal whitespace ([^\S\n]) inside a line: a `\s*` here crossed newlines,
# so each of n blank lines rescanned all those after it (16,000 blank lines: 5 s of
# one core with the GIL held; found by an attacker review).
_REPLY_LINES = re.compile(
    r"(?im)^(?:[^\S\n]*>|[^\S\n]*(?:from|von|de|sent|gesendet|envoyé|enviado)[^\S\n]*:|"
    r"_{10,}|-{2,}[^\S\n]*$|—[^\S\n]*$|(?:sent|envoyé|gesendet|enviado) (?:from|de|von|desde)|"
    r"get outlook|von meinem)"
)
# mail-parser-reply's own patterns start with `\s*^` and are quadratic in a run of
# whitespace (2,000 lines of one space each: 190 ms; 16,000: 11 s). Its input is
# therefore bounded: the first REPLY_PARSE_LIMIT characters (the new part of a reply is
# at the top), runs of horizontal whitespace cut to 64 and runs of blank lines to one.
# Both substitutions are linear: a run either matches whole or fails within 65 steps.
REPLY_PARSE_LIMIT = 32_768
_LONG_SPACE = re.compile(r"[^\S\n]{65,}")
_BLANK_RUN = re.compile(r"\n(?:[^\S\n]*\n){2,}")


def _has_reply_cues(text: str) -> bool:
    lowered = text.lower()
    return any(word in lowered for word in _REPLY_WORDS) or _REPLY_LINES.search(text) is not None


def _text_new(text: str) -> str | None:
    head = text[:REPLY_PARSE_LIMIT]
    if not _has_reply_cues(head):
        return text
    bounded = _BLANK_RUN.sub("\n\n", _LONG_SPACE.sub(" " * 64, head))
    try:
        parsed = _REPLY_PARSER.read(bounded)
        latest = parsed.replies[0].body if parsed.replies else bounded
    except Exception:  # noqa: BLE001 - a heuristic; never worth losing the message over
        latest = text
    lines = [line for line in (latest or "").splitlines() if not line.lstrip().startswith(">")]
    result = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    return result or text


# -- attachments -------------------------------------------------------------


def _filename(part: Message) -> str | None:
    try:
        name = part.get_filename()
    except Exception:  # noqa: BLE001
        name = part.get_param("name")  # type: ignore[assignment]
        name = name if isinstance(name, str) else None
    if not name:
        return None
    name = unicodedata.normalize("NFC", without_surrogates(str(name)))
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = _FILENAME_BAD.sub("_", name).strip().lstrip(".").strip()
    while len(name.encode("utf-8")) > 255:
        stem, dot, ext = name.rpartition(".")
        name = (stem[:-1] + dot + ext) if dot and stem else name[:-1]
    return name or None


def _part_bytes(part: Message) -> bytes:
    if part.get_content_maintype() == "message":
        payload = part.get_payload()
        chunks: list[bytes] = []
        for item in payload if isinstance(payload, list) else [payload]:
            if isinstance(item, Message):
                try:
                    chunks.append(item.as_bytes(policy=policy.compat32))
                except Exception:  # noqa: BLE001
                    chunks.append(str(item).encode("utf-8", "replace"))
            elif isinstance(item, str):
                chunks.append(item.encode("utf-8", "surrogateescape"))
        return b"\n".join(chunks)
    try:
        data = part.get_payload(decode=True)
    except Exception:  # noqa: BLE001
        data = None
    if isinstance(data, bytes):
        return data
    payload = part.get_payload()
    return payload.encode("utf-8", "surrogateescape") if isinstance(payload, str) else b""


def _bounced_message_id(part: Message) -> str | None:
    ctype = part.get_content_type()
    if ctype in ("message/rfc822", "message/global"):
        payload = part.get_payload()
        if isinstance(payload, list) and payload and isinstance(payload[0], Message):
            return _first_msgid(_header(payload[0], "Message-ID"))
    if ctype == "text/rfc822-headers":
        match = re.search(r"(?im)^message-id:\s*(<[^>]+>)", _text_of(part))
        return _first_msgid(match.group(1)) if match else None
    return None


def _attachments(
    msg: Message, skip: tuple[Message | None, ...]
) -> tuple[list[Attachment], list[Blob], str | None]:
    attachments: list[Attachment] = []
    blobs: list[Blob] = []
    bounced_id: str | None = None
    for part in _walk(msg):
        if part.is_multipart() and part.get_content_maintype() != "message":
            continue  # containers; their leaves come next
        if any(part is s for s in skip if s is not None):
            continue  # the body parts
        bounced_id = bounced_id or _bounced_message_id(part)
        if len(attachments) >= MAX_ATTACHMENTS:
            continue
        # A declared type over the schema's 255 characters lost the whole mail
        # (review, 2026-12-01): RFC 6838 names are at most 127 + 1 + 127.
        ctype = strip_controls(part.get_content_type())[:255]
        blob = Blob.of(_part_bytes(part), ctype)
        content_id = _first_msgid(_header(part, "Content-ID"))
        try:
            inline = part.get_content_disposition() == "inline" or (
                content_id is not None and not _is_attachment(part)
            )
        except Exception:  # noqa: BLE001
            inline = False
        attachments.append(
            Attachment(
                filename=_filename(part),
                content_type=ctype,
                size=blob.ref.size,
                sha256=blob.ref.sha256,
                blob=blob.ref,
                inline=inline,
                content_id=content_id,
            )
        )
        blobs.append(blob)
    return attachments, blobs, bounced_id


def _content_digest(
    sender: Identity, subject: str | None, text: str | None, attachments: list[Attachment]
) -> str:
    """What binds a Message-ID key to its mail: a Message-ID is public (everyone on the
    thread has it) and anyone can send one, so a stranger's mail naming a customer's
    Message-ID must not make the customer's own mail a duplicate. The same mail read
    twice (two inboxes, SMTP and IMAP, a provider) has the same sender, subject, text
    and attachments, so it still shares the key; its headers differ, so they are not in it."""
    material = "\x1f".join(
        [sender.key, subject or "", text or "", *sorted(a.sha256 or "" for a in attachments)]
    )
    return hashlib.sha256(material.encode("utf-8", "replace")).hexdigest()[:16]


def _fingerprint(sender: Identity, date: str | None, subject: str | None, text: str | None) -> str:
    material = "\x1f".join([sender.key, date or "", subject or "", text or ""])
    return "email-fp:" + hashlib.sha256(material.encode("utf-8", "replace")).hexdigest()[:40]
