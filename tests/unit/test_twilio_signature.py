"""ingest.twilio.signed: one HMAC for the URL as received, the library's full check
(the URL without and with its port) only when that fails; the same verdicts."""

from __future__ import annotations

import pytest
from twilio.request_validator import RequestValidator

from ingest.twilio import _Form, signed

TOKEN = "twilio-test-token"
FORM = {"MessageSid": "SM" + "a" * 32, "From": "+14155550100", "Body": "héllo", "Empty": ""}
URL = "https://hooks.example.com/webhooks/twilio/sms"


def sign(url: str, form: dict[str, str] = FORM, token: str = TOKEN) -> str:
    return str(RequestValidator(token).compute_signature(url, form))


@pytest.mark.parametrize(
    ("received", "signature", "expected"),
    [
        (URL, sign(URL), True),
        # Twilio signed the URL with its port, the request names none, and the reverse:
        # only the library's fallback accepts these.
        (URL, sign("https://hooks.example.com:443/webhooks/twilio/sms"), True),
        ("https://hooks.example.com:443/webhooks/twilio/sms", sign(URL), True),
        (URL + "?a=1", sign(URL + "?a=1"), True),
        (URL, sign(URL.replace("https", "http")), False),
        (URL, sign(URL, token="another-token"), False),
        (URL, sign(URL, {**FORM, "Body": "tampered"}), False),
        (URL, "", False),
        (URL, "sîgnature\x00", False),  # not ASCII: refused, not an exception
    ],
)
def test_same_verdict_as_the_library(received: str, signature: str, expected: bool) -> None:
    validator = RequestValidator(TOKEN)
    for form in (FORM, _Form(FORM)):
        assert signed(validator, received, form, signature) is expected
        assert validator.validate(received, form, signature) is expected


def test_the_form_reads_the_same_to_the_library() -> None:
    validator = RequestValidator(TOKEN)
    assert validator.compute_signature(URL, _Form(FORM)) == validator.compute_signature(URL, FORM)
    assert _Form(FORM).getall("Body") == ["héllo"]
