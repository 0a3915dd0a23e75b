"""Our overrides of aiosmtpd's session behave exactly as aiosmtpd's own: the MAIL FROM /
RCPT TO address parse, and the dispatch tables a session builds when it starts."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import given, settings
from hypothesis import strategies as st

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
    # After a plain address (the fast path): the full parse drops folding white space
    # (all that str.lstrip drops, once it starts with a space or a tab) and comments.
    "<a@b>\tX",
    "<a@b> \x0bX",
    "<a@b> \u3000X",
    "<a@b> \x85\xa0\x1cX",
    "<a@b>\x0bX",
    "<a@b>\nX",
    "<a@b> (c) X",
    "<a@b>(c)X",
    "<a@b>>",
    "<a@b>  ",
    '<"a"@b>',
    "<.a@b>",
    # RFC 2047 encoded words, which the full parse decodes (a review found the fast
    # path taking them raw).
    "<=?utf-8?q?alice?=@example.org>",
    "<a@=?utf-8?q?example.org?=>",
    "<=?utf-8?q?root=40evil.example?=@example.org>",
    "<=?x?q?a?=.b@c>",
    "<=?utf-8?q?" + "a" * 70 + "?=@b>",
    "<a=b?c@d>",
]


def _same_answer(arg: str, limit: int) -> None:
    session = SimpleNamespace(local_part_limit=limit)
    try:
        expected: object = SMTP._getaddr(session, arg)  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001 - compared, not swallowed
        expected = type(exc)
    try:
        got: object = _Protocol._getaddr(session, arg)  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001 - compared, not swallowed
        got = type(exc)
    assert got == expected, arg


@pytest.mark.parametrize("limit", [0, 64])
@pytest.mark.parametrize("arg", ARGS)
def test_the_same_answer_as_aiosmtpd(arg: str, limit: int) -> None:
    _same_answer(arg, limit)


# Pieces of addresses around the shape the fast path takes (<local@domain>rest):
# dots where a dot-atom forbids them, white space of many kinds, comments, quotes,
# brackets, encoded words, NUL, non-ASCII.
_PIECE = st.sampled_from(
    [
        "a",
        "Z",
        "9",
        "!",
        "~",
        "-",
        ".",
        "..",
        " ",
        "\t",
        "\r",
        "\x0b",
        "\u2003",
        "\n",
        "\x0c",
        "\x1c",
        "\x85",
        "\xa0",
        "=?",
        "?=",
        "(",
        ")",
        "(c)",
        '"',
        "[",
        "]",
        "\\",
        ",",
        ";",
        ":",
        "<",
        ">",
        "@",
        "\x00",
        "é",
        "SIZE=5",
    ]
)
_TEXT = st.lists(_PIECE, max_size=6).map("".join)
_WORD = st.text("aZ9!#$%&'*+/=?^_`{|}~-", min_size=1, max_size=4)
_DOT_ATOM = st.lists(_WORD, min_size=1, max_size=3).map(".".join)


@settings(max_examples=600, deadline=None)
@given(
    # Mostly the fast path's own shape, so that what follows ">" is what varies.
    local=st.one_of(_DOT_ATOM, _DOT_ATOM, _DOT_ATOM, _TEXT),
    domain=st.one_of(_DOT_ATOM, _DOT_ATOM, _DOT_ATOM, _TEXT),
    before=st.sampled_from(["", "", "", "", " ", "<"]),
    after=_TEXT,
    limit=st.sampled_from([0, 3]),
)
def test_addresses_near_the_plain_shape_parse_as_aiosmtpd_does(
    local: str, domain: str, before: str, after: str, limit: int
) -> None:
    _same_answer(f"{before}<{local}@{domain}>{after}", limit)


class _FullDir(_Protocol):
    """aiosmtpd's own discovery: every attribute name, properties included."""

    def __dir__(self) -> list[str]:
        return list(object.__dir__(self))


class _FullDirHandler(SmtpHandler):
    def __dir__(self) -> list[str]:
        return list(object.__dir__(self))


def _session(
    cls: type[_Protocol], handler: type[SmtpHandler], loop: asyncio.AbstractEventLoop
) -> _Protocol:
    adapter = SimpleNamespace(settings=SimpleNamespace(junk_command_limit=10))
    adapter.handler = handler(adapter)  # type: ignore[arg-type]
    return cls(adapter, hostname="mx.example", loop=loop)  # type: ignore[arg-type]


def _func(method: object) -> object:
    """The function behind a bound method."""
    return getattr(method, "__func__", None)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def test_a_session_dispatches_the_same_verbs_mechanisms_and_hooks(
    loop: asyncio.AbstractEventLoop,
) -> None:
    ours = _session(_Protocol, SmtpHandler, loop)
    stock = _session(_FullDir, _FullDirHandler, loop)
    # The full listings really are the other ones.
    assert len(dir(stock)) > 100 > len(dir(ours))
    assert len(dir(stock.event_handler)) > 20 > len(dir(ours.event_handler))

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
    hooks = {k: _func(v) for k, v in ours._handle_hooks.items()}
    assert hooks == {k: _func(v) for k, v in stock._handle_hooks.items()}
    assert {"DATA", "RCPT"} <= set(hooks)
