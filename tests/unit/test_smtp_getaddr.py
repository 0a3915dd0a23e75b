"""Our overrides of aiosmtpd's session behave exactly as aiosmtpd's own: the MAIL FROM /
RCPT TO address parse, and the dispatch tables a session builds when it starts."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from aiosmtpd.smtp import SMTP

from ingest.smtp import SmtpHandler, _Protocol

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


class _FullDir(_Protocol):
    """aiosmtpd's own discovery: every attribute name, properties included."""

    def __dir__(self) -> list[str]:
        return list(object.__dir__(self))


def _session(cls: type[_Protocol]) -> _Protocol:
    adapter = SimpleNamespace(settings=SimpleNamespace(junk_command_limit=10))
    adapter.handler = SmtpHandler(adapter)  # type: ignore[arg-type]
    return cls(adapter, hostname="mx.example", loop=asyncio.new_event_loop())  # type: ignore[arg-type]


def _func(method: object) -> object:
    """The function behind a bound method."""
    return getattr(method, "__func__", None)


def test_a_session_dispatches_the_same_verbs_mechanisms_and_hooks() -> None:
    ours, stock = _session(_Protocol), _session(_FullDir)
    assert len(dir(stock)) > 100 > len(dir(ours))  # the full listing is really the other one

    def verbs(session: _Protocol) -> dict[str, object]:
        return {name: _func(method) for name, method in session._smtp_methods.items()}

    def mechanisms(session: _Protocol) -> dict[str, object]:
        return {
            name: (_func(impl.method), impl.is_builtin)
            for name, impl in session._auth_methods.items()
        }

    assert verbs(ours) == verbs(stock)
    assert None not in verbs(ours).values()
    assert {"EHLO", "MAIL", "RCPT", "DATA", "STARTTLS", "AUTH"} <= set(verbs(ours))
    assert mechanisms(ours) == mechanisms(stock)
    assert {"LOGIN", "PLAIN"} <= set(mechanisms(ours))
    assert {k: _func(v) for k, v in ours._handle_hooks.items()} == {
        k: _func(v) for k, v in stock._handle_hooks.items()
    }
