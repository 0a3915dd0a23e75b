"""Our MAIL FROM / RCPT TO address parse answers exactly as aiosmtpd's own."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from aiosmtpd.smtp import SMTP

from ingest.smtp import _Protocol

ARGS = [
    "",
    " ",
    "<>",
    "<alice@example.org>",
    "<alice@example.org> SIZE=1000 BODY=8BITMIME",
    "alice@example.org",
    "alice@example.org SIZE=5",
    " <alice@example.org>",
    "<alice@example.org",
    "alice@example.org>",
    "<@relay.example:alice@example.org>",
    '<"quoted local"@example.org>',
    "<bücher@exämple.org> SMTPUTF8",
    "<alice@[192.0.2.1]>",
    "<alice>",
    "<@>",
    "<alice@@example.org>",
    "<alice@example.org>\x00",
    "<al\x00ice@example.org>",
    "<" + "a" * 64 + "@example.org>",
    "<" + "a" * 65 + "@example.org>",
    "<" + "a" * 5000 + "@example.org>",
    "garbage ( with [ brackets",
    "<a@b> <c@d>",
    "(comment) <alice@example.org>",
]


@pytest.mark.parametrize("limit", [0, 64])
@pytest.mark.parametrize("arg", ARGS)
def test_the_same_answer_as_aiosmtpd(arg: str, limit: int) -> None:
    session = SimpleNamespace(local_part_limit=limit)
    try:
        expected: object = SMTP._getaddr(session, arg)  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001 - compared, not swallowed
        expected = type(exc)
    try:
        got: object = _Protocol._getaddr(session, arg)  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001 - compared, not swallowed
        got = type(exc)
    assert got == expected
