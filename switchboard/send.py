"""`switchboard send`: one message into a running pipeline, as the real sender sends it.

Email goes over SMTP; an SMS is a Twilio web hook request signed as Twilio signs
it (``X-Twilio-Signature`` with the configured auth token over the public URL);
a web hook is signed with the hook's own secret and scheme, exactly as
``ingest/webhook.py`` checks it. Each returns the server's answer; nothing here
bypasses an edge's checks, so what arrives is what a real sender would make.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import smtplib
import time
import uuid
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from urllib.parse import urlencode

import httpx
from twilio.request_validator import RequestValidator

from ingest.settings import BearerAuth, HmacAuth, WebhookSettings
from ingest.smtp import SmtpAdapter
from ingest.twilio import TwilioAdapter
from ingest.webhook import WebhookAdapter
from switchboard.settings import Settings

TWILIO_PATH = "/webhooks/twilio/sms"
#: Twilio's magic test number: the "To" of an SMS when none is given.
DEFAULT_SMS_TO = "+15005550006"


_HINT = " (is `switchboard run` running here, with the same {port}?)"


class SendError(Exception):
    """The message could not be sent as asked (nothing was sent, or no answer)."""


@dataclass(frozen=True)
class Answer:
    """What the server said: ``ok`` when it accepted the message."""

    ok: bool
    text: str


def _local_host(settings: Settings) -> str:
    host = settings.bind_host
    if host in ("0.0.0.0", "", "::"):  # noqa: S104 - a listening address, not a bind
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def http_base(settings: Settings) -> str:
    """Where this machine reaches the pipeline's HTTP server."""
    return f"http://{_local_host(settings)}:{settings.http_port}"


def default_recipient(settings: Settings) -> str | None:
    """support@ the first domain the SMTP server receives mail for, if any."""
    domains = SmtpAdapter.settings_from(settings).domains
    return f"support@{domains[0]}" if domains else None


def send_email(
    settings: Settings,
    *,
    sender: str,
    recipients: list[str],
    subject: str,
    text: str,
    server: str | None = None,
) -> Answer:
    """One email over SMTP; the answer is the server's reply to the end of DATA."""
    port_setting = SmtpAdapter.settings_from(settings).port
    host, _, port = (server or f"{_local_host(settings)}:{port_setting}").rpartition(":")
    message = EmailMessage()
    message["From"] = sender
    message["To"] = ", ".join(recipients)
    message["Subject"] = subject
    message["Date"] = formatdate(localtime=True)
    message["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2] or None)
    message.set_content(text)
    try:
        with smtplib.SMTP(host.strip("[]"), int(port), timeout=30) as smtp:
            smtp.ehlo_or_helo_if_needed()
            code, reply = smtp.mail(sender)
            if code != 250:
                return Answer(False, f"MAIL FROM: {code} {reply.decode(errors='replace')}")
            for recipient in recipients:
                code, reply = smtp.rcpt(recipient)
                if code not in (250, 251):
                    smtp.rset()
                    text_reply = reply.decode(errors="replace")
                    return Answer(False, f"RCPT TO {recipient}: {code} {text_reply}")
            code, reply = smtp.data(message.as_bytes())
    except (OSError, smtplib.SMTPException) as exc:
        raise SendError(
            f"SMTP {host}:{port}: {exc}{_HINT.format(port='SWITCHBOARD_SMTP_PORT')}"
        ) from exc
    return Answer(code == 250, f"{code} {reply.decode(errors='replace')}")


def _post(url: str, body: bytes, headers: dict[str, str]) -> Answer:
    try:
        response = httpx.post(url, content=body, headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        raise SendError(f"POST {url}: {exc}{_HINT.format(port='SWITCHBOARD_HTTP_PORT')}") from exc
    answer = f"{response.status_code} {response.reason_phrase}"
    if response.text:
        answer += f"\n{response.text}"
    return Answer(response.is_success, answer)


def send_sms(
    settings: Settings,
    *,
    sender: str,
    text: str,
    to: str = DEFAULT_SMS_TO,
    base: str | None = None,
) -> Answer:
    """One SMS as Twilio delivers it: a form post signed with the account's token
    over the URL Twilio would call (``SWITCHBOARD_PUBLIC_URL`` when set)."""
    twilio = TwilioAdapter.settings_from(settings)
    if not twilio.auth_token:
        raise SendError(
            "SWITCHBOARD_TWILIO_AUTH_TOKEN is not set: the server refuses every Twilio "
            "request without one, and this command signs with it"
        )
    base = (base or http_base(settings)).rstrip("/")
    signed_url = f"{(settings.public_url or base).rstrip('/')}{TWILIO_PATH}"
    account = twilio.account_sids[0] if twilio.account_sids else "AC" + "0" * 32
    form = {
        "MessageSid": f"SM{uuid.uuid4().hex}",
        "AccountSid": account,
        "From": sender,
        "To": to,
        "Body": text,
        "NumMedia": "0",
    }
    token = twilio.auth_token[0].get_secret_value()
    signature = RequestValidator(token).compute_signature(signed_url, form)
    headers = {
        "content-type": "application/x-www-form-urlencoded",
        "x-twilio-signature": signature,
    }
    return _post(f"{base}{TWILIO_PATH}", urlencode(form).encode(), headers)


def hook_headers(
    hook: WebhookSettings, body: bytes, content_type: str, idempotency_key: str | None
) -> dict[str, str]:
    """The headers of a request ``hook`` accepts: its authentication, signed as
    ``ingest/webhook.py`` checks it."""
    headers = {"content-type": content_type}
    if idempotency_key:
        headers["idempotency-key"] = idempotency_key
    auth = hook.auth
    if isinstance(auth, BearerAuth):
        if auth.token is None:
            raise SendError(f"{auth.token_env} is not set (the token of hook {hook.name!r})")
        headers["authorization"] = f"Bearer {auth.token.get_secret_value()}"
    elif isinstance(auth, HmacAuth):
        if auth.secret is None:
            raise SendError(f"{auth.secret_env} is not set (the secret of hook {hook.name!r})")
        mac = hmac.new(auth.secret.get_secret_value().encode(), digestmod=hashlib.sha256)
        if auth.timestamp_header:
            stamp = str(int(time.time()))
            headers[auth.timestamp_header] = stamp
            mac.update(stamp.encode() + b".")
        sent = httpx.Headers(headers)  # header names are case-insensitive, as the server reads
        for name in auth.signed_headers:
            mac.update(f"{name}:{sent.get(name, '')}\n".encode())
        mac.update(body)
        headers[auth.header] = auth.prefix + mac.hexdigest()
    return headers


def send_hook(
    settings: Settings,
    name: str,
    *,
    payload: str | None = None,
    form: list[tuple[str, str]] | None = None,
    idempotency_key: str | None = None,
    base: str | None = None,
) -> Answer:
    """One post to the configured hook ``name``: JSON (``payload``) or a form."""
    hooks = WebhookAdapter.settings_from(settings).hooks
    hook = next((h for h in hooks if h.name == name), None)
    if hook is None:
        known = ", ".join(h.name for h in hooks) or "none: add [[adapters.webhook.hooks]]"
        raise SendError(f"no web hook {name!r} in the configuration (configured: {known})")
    if (payload is None) == (form is None):
        raise SendError("give the body as --json '{...}' or as --form key=value (one of them)")
    if payload is not None:
        try:
            json.loads(payload)
        except ValueError as exc:
            raise SendError(f"--json is not valid JSON: {exc}") from exc
        body, content_type, kind = payload.encode(), "application/json", "json"
    else:
        body = urlencode(form or []).encode()
        content_type, kind = "application/x-www-form-urlencoded", "form"
    if kind not in hook.content_types:
        raise SendError(f"hook {name!r} accepts {', '.join(hook.content_types)} only, not {kind}")
    headers = hook_headers(hook, body, content_type, idempotency_key)
    return _post(f"{(base or http_base(settings)).rstrip('/')}/webhooks/{name}", body, headers)
