"""Mailgun's signature is read from a body anyone may post, so it is read by a
streaming scan of three fields (ingest.mailgun.signature_fields), never by the
whole-form parse; the mail is parsed only once the signature holds."""

from __future__ import annotations

import hashlib
import hmac
import pickle
from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

import httpx
import pytest
from pydantic import SecretStr

from ingest.errors import Rejected
from ingest.mailgun import MailgunForm, MailgunSettings, _verify, signature_fields
from ingest.sdk import MULTIPART, HttpRoute, InboundRequest
from normalize.errors import NormalizeError
from tests.provider_payloads import MAILGUN_KEY, Mail, mailgun_mime, mailgun_parsed

SIGNED = ("timestamp", "token", "signature")


def _request(body: bytes, content_type: str) -> InboundRequest:
    return InboundRequest(
        route=HttpRoute("/webhooks/mailgun", summary="test", content_types=(MULTIPART,)),
        body=body,
        headers={"content-type": content_type},
        query={},
        url="http://test/webhooks/mailgun",
        media_type=content_type.split(";", maxsplit=1)[0].strip().lower(),
        content_type=content_type,
        peer="127.0.0.1",
        message_id=uuid4(),
        received_at=datetime.now(UTC),
    )


def _as_sent(arguments: dict[str, Any]) -> InboundRequest:
    sent = httpx.Request("POST", "http://test/webhooks/mailgun", **arguments)
    return _request(sent.read(), sent.headers["content-type"])


@pytest.mark.parametrize(
    "arguments",
    [
        mailgun_parsed(Mail("plain")),
        mailgun_parsed(Mail("files", attachments=(("a.txt", "text/plain", b"x" * 5000),))),
        mailgun_mime(Mail("mime")),
    ],
    ids=["urlencoded", "multipart with a file", "raw MIME"],
)
def test_the_scan_reads_what_the_whole_form_parse_reads(arguments: dict[str, Any]) -> None:
    request = _as_sent(arguments)
    form = MailgunForm(request)
    assert signature_fields(request) == {name: form.get(name) for name in SIGNED}


def test_the_first_of_a_repeated_field_counts_and_files_are_not_fields() -> None:
    boundary = "xyz"
    parts = [
        ('name="signature"; filename="signature"', b"from-a-file"),
        ('name="token"', b"first"),
        ('name="token"', b"second"),
        ('name="timestamp"', b"1700000000"),
    ]
    body = b"".join(
        f"--{boundary}\r\nContent-Disposition: form-data; {disposition}\r\n\r\n".encode()
        + value
        + b"\r\n"
        for disposition, value in parts
    )
    body += f"--{boundary}--\r\n".encode()
    found = signature_fields(_request(body, f"multipart/form-data; boundary={boundary}"))
    assert found == {"token": "first", "timestamp": "1700000000"}
    urlencoded = b"token=a%2Bb+c&timestamp=1&token=later&x=signature%3D1"
    found = signature_fields(_request(urlencoded, "application/x-www-form-urlencoded"))
    assert found == {"token": "a+b c", "timestamp": "1"}


def test_a_body_of_empty_parts_stops_at_the_part_limit() -> None:
    """10 MB of empty parts: the whole-form parse took 16 s and 461 MB here (review of
    2026-12-01); the scan stops after 1,000 parts, and a signature placed after them
    is not read (Mailgun's requests have a few dozen parts)."""
    bomb = b"--b\r\n\r\n\r\n" * 1_200_000
    tail = b'--b\r\nContent-Disposition: form-data; name="token"\r\n\r\nlate\r\n--b--\r\n'
    # The late token is not read: the scan stopped at part 1,001 (milliseconds here).
    assert signature_fields(_request(bomb + tail, "multipart/form-data; boundary=b")) == {}
    assert signature_fields(_request(tail, "multipart/form-data; boundary=b")) == {"token": "late"}


def test_an_overlong_value_is_cut_and_a_missing_boundary_is_malformed() -> None:
    body = b"signature=" + b"a" * 100_000
    found = signature_fields(_request(body, "application/x-www-form-urlencoded"))
    assert len(found["signature"]) == 768  # cut at three times the longest read
    with pytest.raises(NormalizeError):
        signature_fields(_request(b"--b\r\n", "multipart/form-data"))


def test_the_whole_form_parse_refuses_too_many_parts_before_parsing() -> None:
    bomb = b"--b\r\n\r\n\r\n" * 2_000 + b"--b--\r\n"
    with pytest.raises(NormalizeError, match="more than 1000 parts"):
        _request(bomb, "multipart/form-data; boundary=b").parts()


class _Refusal(Rejected):
    def __init__(self, code: int) -> None:
        super().__init__("custom", f"code {code}", status=422, record=True)


class _Unparsable(NormalizeError):
    def __init__(self) -> None:
        super().__init__("custom-reason", "its own detail")


def test_refusals_and_normalize_errors_cross_pickle_as_themselves() -> None:
    """They come back from a parse process pickled; a subclass with its own
    ``__init__`` came back as a 500 before (its pickle called ``__init__`` wrong)."""
    for error in (
        Rejected("stale", "old", status=406, record=True, headers={"Retry-After": "1"}),
        _Refusal(7),
        NormalizeError("no-sender", "none"),
        _Unparsable(),
    ):
        copy = pickle.loads(pickle.dumps(error))  # noqa: S301 - our own bytes
        assert type(copy) is type(error)
        assert vars(copy) == vars(error)
        assert str(copy) == str(error)


def test_a_signed_timestamp_of_other_digits_is_stale_not_a_500() -> None:
    """ "¹⁷" is isdigit() to Python and not an int(): a correctly signed one raised
    ValueError, a 500 (review of 2026-12-02; it needs the signing key)."""
    settings = MailgunSettings(signing_key=SecretStr(MAILGUN_KEY))
    stamp, token = "\u00b9\u2077", "t" * 50
    digest = hmac.new(MAILGUN_KEY.encode(), (stamp + token).encode(), hashlib.sha256).hexdigest()
    with pytest.raises(Rejected) as refused:
        _verify(settings, {"timestamp": stamp, "token": token, "signature": digest})
    assert (refused.value.reason, refused.value.status) == ("stale", 406)


def test_urlencoded_escapes_are_read_byte_for_byte_and_fields_are_bounded() -> None:
    body = b"subject=Caf%C3%A9+cr%C3%A8me&body-plain=a%00b%2Bc&%ff=x&bad=%ff%fe"
    form = MailgunForm(_request(body, "application/x-www-form-urlencoded"))
    assert form.get("subject") == "Café crème"
    assert form.raw("body-plain") == b"a\x00b+c"
    assert form.raw("bad") == b"\xff\xfe"
    assert form.get("\ufffd") == "x"
    with pytest.raises(NormalizeError):
        MailgunForm(_request(b"a=1&" * 1001, "application/x-www-form-urlencoded"))
