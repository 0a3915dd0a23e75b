"""Requests as Mailgun, SendGrid and Postmark send them, built from their documented
formats, with signatures computed here (not by the adapters' code).

- Mailgun routes, forward(): urlencoded, or multipart with attachments; fields
  ``recipient, sender, from, subject, body-plain, body-html, message-headers``
  (JSON list of [name, value]), ``attachment-count``, ``attachment-N``; raw MIME
  (URL ending in ``mime``): ``body-mime``. ``signature`` = hex HMAC-SHA256 of
  ``timestamp + token`` under the HTTP webhook signing key.
- SendGrid Inbound Parse: multipart; ``headers`` (raw header block), ``text``,
  ``html``, ``from``, ``to``, ``subject``, ``envelope`` (JSON), ``charsets`` (JSON),
  ``attachments``, ``attachment-info`` (JSON), ``attachmentN``; raw mode: ``email``.
- Postmark inbound: JSON with ``FromFull``, ``ToFull``, ``CcFull``, ``Subject``,
  ``Date``, ``MessageID`` (Postmark's own), ``TextBody``, ``HtmlBody``, ``Headers``
  ([{Name, Value}], the mail's Message-ID among them), ``Attachments`` (base64),
  optionally ``RawEmail``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

MAILGUN_KEY = "key-mailgun-signing-0123456789"
SENDGRID_PASSWORD = "sendgrid-basic-password"
POSTMARK_PASSWORD = "postmark-basic-password"


@dataclass(frozen=True)
class Mail:
    """One customer email, to be sent through any channel."""

    tag: str
    sender: str = "ann@example.org"
    name: str = "Ann Example"
    to: str = "support@example.com"
    subject: str = "Where is my order?"
    text: str = "Hello, my order has not arrived."
    html: str | None = None
    attachments: tuple[tuple[str, str, bytes], ...] = field(default_factory=tuple)

    @property
    def message_id(self) -> str:
        return f"<{self.tag}@mail.example.org>"

    def headers(self) -> list[tuple[str, str]]:
        return [
            ("From", f"{self.name} <{self.sender}>"),
            ("To", self.to),
            ("Subject", self.subject),
            ("Date", "Sun, 22 Nov 2026 10:00:00 +0000"),
            ("Message-ID", self.message_id),
        ]

    def mime(self) -> bytes:
        head = "".join(f"{n}: {v}\r\n" for n, v in self.headers())
        if not self.attachments:
            return (
                head + "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
                f"\r\n{self.text}\r\n"
            ).encode()
        boundary = "b-" + self.tag
        body = f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{self.text}\r\n"
        for filename, content_type, data in self.attachments:
            body += (
                f"--{boundary}\r\nContent-Type: {content_type}\r\n"
                f'Content-Disposition: attachment; filename="{filename}"\r\n'
                "Content-Transfer-Encoding: base64\r\n\r\n"
                f"{base64.b64encode(data).decode()}\r\n"
            )
        body += f"--{boundary}--\r\n"
        return (
            head + f'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="{boundary}"\r\n'
            f"\r\n{body}"
        ).encode()


# -- Mailgun -------------------------------------------------------------------


def mailgun_signature(key: str = MAILGUN_KEY, timestamp: int | None = None) -> dict[str, str]:
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    token = secrets.token_hex(25)  # 50 characters, as Mailgun's
    digest = hmac.new(key.encode(), (stamp + token).encode(), hashlib.sha256).hexdigest()
    return {"timestamp": stamp, "token": token, "signature": digest}


def _mailgun_base(mail: Mail, signature: dict[str, Any]) -> dict[str, str]:
    """The fields both of Mailgun's formats carry: the envelope, and the signature."""
    return {
        "recipient": mail.to,
        "sender": mail.sender,
        "from": f"{mail.name} <{mail.sender}>",
        "subject": mail.subject,
        # Mailgun's own verdicts (its docs: "X-Mailgun-Spf", "X-Mailgun-Dkim-Check-Result").
        "X-Mailgun-Spf": "Pass",
        "X-Mailgun-Dkim-Check-Result": "Pass",
        **mailgun_signature(**signature),
    }


def mailgun_parsed(mail: Mail, **signature: Any) -> dict[str, Any]:  # noqa: ANN401
    """httpx arguments for the parsed form (multipart when there are attachments)."""
    fields = {
        **_mailgun_base(mail, signature),
        "body-plain": mail.text,
        "stripped-text": mail.text,
        "message-headers": json.dumps([[n, v] for n, v in mail.headers()]),
    }
    if mail.html is not None:
        fields["body-html"] = mail.html
    if not mail.attachments:
        return {"data": fields}
    fields["attachment-count"] = str(len(mail.attachments))
    files = {
        f"attachment-{i}": (name, data, content_type)
        for i, (name, content_type, data) in enumerate(mail.attachments, start=1)
    }
    return {"data": fields, "files": files}


def mailgun_mime(mail: Mail, **signature: Any) -> dict[str, Any]:  # noqa: ANN401
    """httpx arguments for the raw-MIME variant (multipart, body-mime)."""
    fields = _mailgun_base(mail, signature)
    return {"data": fields, "files": {"body-mime": (None, mail.mime(), "text/plain")}}


# -- SendGrid --------------------------------------------------------------------


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"authorization": f"Basic {token}"}


def sendgrid(
    mail: Mail,
    *,
    raw: bool = False,
    charset: str = "UTF-8",
    spf: str = "pass",
    dkim: str = "none",
) -> dict[str, Any]:
    """httpx arguments for Inbound Parse (always multipart). ``dkim`` as SendGrid
    writes it: ``{@example.org : pass}``, several comma-separated, or ``none``."""
    envelope = json.dumps({"to": [mail.to], "from": mail.sender})
    headers = "".join(f"{n}: {v}\n" for n, v in mail.headers())
    parts: dict[str, Any] = {
        "envelope": (None, envelope.encode()),
        "from": (None, f"{mail.name} <{mail.sender}>".encode(charset)),
        "to": (None, mail.to.encode()),
        "subject": (None, mail.subject.encode(charset)),
        "spam_score": (None, b"0.1"),
        "SPF": (None, spf.encode()),
        "dkim": (None, dkim.encode()),
    }
    if raw:
        parts["email"] = (None, mail.mime())
        parts["charsets"] = (None, json.dumps({"to": "UTF-8", "subject": charset}).encode())
    else:
        parts["headers"] = (None, headers.encode(charset))
        parts["text"] = (None, mail.text.encode(charset))
        if mail.html is not None:
            parts["html"] = (None, mail.html.encode(charset))
        names = ("headers", "text", "html", "from", "to", "subject")
        parts["charsets"] = (None, json.dumps(dict.fromkeys(names, charset)).encode())
        info = {}
        for i, (name, content_type, data) in enumerate(mail.attachments, start=1):
            parts[f"attachment{i}"] = (name, data, content_type)
            info[f"attachment{i}"] = {"filename": name, "name": name, "type": content_type}
        parts["attachments"] = (None, str(len(mail.attachments)).encode())
        if info:
            parts["attachment-info"] = (None, json.dumps(info).encode())
    return {"files": parts, "headers": basic("sendgrid", SENDGRID_PASSWORD)}


# -- Postmark --------------------------------------------------------------------


def postmark(mail: Mail, *, raw: bool = False, postmark_id: str | None = None) -> dict[str, Any]:
    """httpx arguments for the inbound webhook (JSON)."""
    document: dict[str, Any] = {
        "From": mail.sender,
        "FromName": mail.name,
        "FromFull": {"Email": mail.sender, "Name": mail.name, "MailboxHash": ""},
        "To": mail.to,
        "ToFull": [{"Email": mail.to, "Name": "", "MailboxHash": ""}],
        "Cc": "",
        "CcFull": [],
        "OriginalRecipient": mail.to,
        "Subject": mail.subject,
        "MessageID": postmark_id or f"pm-{mail.tag}-0000-4511-8042-341342852c90",
        "ReplyTo": "",
        "MailboxHash": "",
        "Date": "Sun, 22 Nov 2026 10:00:00 +0000",
        "TextBody": mail.text,
        "HtmlBody": mail.html or "",
        "StrippedTextReply": "",
        "Tag": "",
        "MessageStream": "inbound",
        "Headers": [
            {
                "Name": "Received-SPF",
                "Value": (
                    f"pass (mail.example.org: domain of {mail.sender} designates 192.0.2.9 "
                    f"as permitted sender) client-ip=192.0.2.9; envelope-from={mail.sender};"
                ),
            },
            {"Name": "X-Spam-Status", "Value": "No"},
            {"Name": "Message-ID", "Value": mail.message_id},
            {"Name": "MIME-Version", "Value": "1.0"},
        ],
        "Attachments": [
            {
                "Name": name,
                "Content": base64.b64encode(data).decode(),
                "ContentType": content_type,
                "ContentLength": len(data),
            }
            for name, content_type, data in mail.attachments
        ],
    }
    if raw:
        document["RawEmail"] = mail.mime().decode()
    return {"json": document, "headers": basic("postmark", POSTMARK_PASSWORD)}
