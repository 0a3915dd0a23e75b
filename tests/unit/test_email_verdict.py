"""The normalizer records a sender verdict without I/O, and lets DMARC speak only for
the one From address it judged (RFC 7489 section 6.6.1)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from normalize.email import EmailContext, EmailVerdict, normalize_email
from normalize.schema import AuthCheck, Authentication
from switchboard.ids import uuid7

VERDICT = EmailVerdict(
    Authentication(
        source="local",
        checks=(AuthCheck(method="dmarc", result="pass", domain="customer.example"),),
    ),
    dmarc_domain="customer.example",
    evidence="dmarc=pass header.from=customer.example",
)


def _normalize(headers: str, verdict: EmailVerdict | None = VERDICT) -> tuple[str, str, bool]:
    raw = f"{headers}To: support@example.com\r\nSubject: hi\r\n\r\nHello\r\n".encode()
    ctx = EmailContext(
        adapter="smtp",
        message_id=uuid7(),
        received_at=datetime.now(UTC),
        mail_from="carol@customer.example",
        verdict=verdict,
    )
    message = normalize_email(raw, ctx).message
    return message.sender.value, message.sender.assurance, message.authentication is not None


def test_a_dmarc_pass_verifies_the_single_from_address() -> None:
    assert _normalize("From: Carol <carol@customer.example>\r\n") == (
        "carol@customer.example",
        "verified",
        True,
    )


@pytest.mark.parametrize(
    "headers",
    [
        # Two addresses in From: DMARC cannot say which one it judged.
        "From: carol@customer.example, mallory@customer.example\r\n",
        # Two From headers: the one shown may not be the one signed.
        "From: carol@customer.example\r\nFrom: mallory@evil.example\r\n",
        # Another domain than the one that passed.
        "From: carol@other.example\r\n",
        # No usable From: the sender falls back to Sender, which DMARC never judged.
        "Sender: carol@customer.example\r\n",
    ],
)
def test_a_dmarc_pass_speaks_for_no_other_address(headers: str) -> None:
    _, assurance, recorded = _normalize(headers)
    assert assurance == "claimed"
    assert recorded  # the checks are still on the message for the agent to see


def test_without_a_verdict_there_is_no_authentication() -> None:
    assert _normalize("From: carol@customer.example\r\n", None)[1:] == ("claimed", False)
