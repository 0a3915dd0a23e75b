"""Pure parts of the agents' page and sign-in: reply links, how addresses and times
are shown, the sign-in throttle, host names."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher
from hypothesis import given, settings
from hypothesis import strategies as st
from markupsafe import escape
from starlette.requests import Request
from starlette.responses import Response

from sinks.agents import AgentStore, Session, Throttle
from sinks.auth import Access, Denied
from sinks.pages import (
    CARD_HTML_PAGE,
    CARD_TEXT,
    CARD_TEXT_PAGE,
    _escaped_len,
    _within,
    address_of,
    clip,
    clip_html,
    reply_link,
    when,
)
from switchboard import http as http_module
from switchboard.databases import upgrade
from switchboard.db import make_engine
from switchboard.http import TrustedHosts, _host_name


def _message(**fields: object) -> dict[str, object]:
    return {"sender": "email:carol@example.org", "flags": {}, **fields}


def test_an_email_reply_link_carries_re_subject_and_the_threading_headers() -> None:
    link = reply_link(
        _message(
            subject="Refund",
            mail_message_id="m2@example.org",
            mail_references=["m1@example.org"],
        )
    )
    assert link == (
        "mailto:carol@example.org?subject=Re%3A%20Refund"
        "&In-Reply-To=%3Cm2%40example.org%3E"
        "&References=%3Cm1%40example.org%3E%20%3Cm2%40example.org%3E"
    )
    # No second "Re:", and no headers for a message without a Message-ID.
    assert reply_link(_message(subject="RE: Refund")) == (
        "mailto:carol@example.org?subject=RE%3A%20Refund"
    )


def test_sms_replies_by_sms_and_a_form_without_an_address_offers_nothing() -> None:
    assert reply_link(_message(sender="phone:+14155550123;ext=12")) == "sms:+14155550123"
    assert reply_link(_message(sender="external:crm:42")) is None
    assert reply_link(_message(flags={"bounce": True})) is None
    assert reply_link(_message(flags={"auto_reply": True})) is None


def test_addresses_and_times_as_the_agent_reads_them() -> None:
    assert address_of("phone:+14155550123") == "+1 415-555-0123"
    assert address_of("phone:+14155550100;ext=12") == "+1 415-555-0100 ext. 12"
    assert address_of("email:carol@example.org") == "carol@example.org"
    assert when("2026-11-29T01:02:03+00:00") == "2026-11-29 01:02 UTC"
    assert when(None) == ""


def test_the_throttle_counts_failures_in_a_sliding_window() -> None:
    now = [0.0]
    throttle = Throttle(2, 60, clock=lambda: now[0])
    throttle.failed("k")
    assert throttle.retry_after("k") == 0
    throttle.failed("k")
    assert throttle.retry_after("k") == 60
    now[0] = 30
    assert throttle.retry_after("k") == 30
    now[0] = 61
    assert throttle.retry_after("k") == 0
    throttle.failed("k")
    assert throttle.retry_after("k") == 0


def test_host_names_with_ports_and_ipv6_literals() -> None:
    assert _host_name("Example.COM:8080") == "example.com"
    assert _host_name("[::1]:8080") == "::1"
    assert _host_name("::1") == "::1"
    hosts = TrustedHosts(None, ["localhost", "[::1]", "*.example.com"])
    assert hosts.allowed("localhost:8080")
    assert hosts.allowed("[::1]:80")
    assert hosts.allowed("queue.example.com")
    assert not hosts.allowed("example.com.evil.net")
    assert not hosts.allowed("")


def test_each_host_header_is_answered_by_its_own_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    """TrustedHosts remembers verdicts by the header's bytes; the app is reached only
    for an allowed name, the second time as the first, past the table's bound too."""
    monkeypatch.setattr(http_module, "HOSTS_KEPT", 4)
    reached: list[bytes] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:  # noqa: ANN401
        reached.append(dict(scope["headers"]).get(b"host", b""))

    async def send(message: dict[str, Any]) -> None:
        return None

    hosts = TrustedHosts(app, ["localhost", "*.example.com"])

    def call(host: bytes | None) -> None:
        headers = [] if host is None else [(b"host", host)]
        scope = {"type": "http", "path": "/queue", "headers": headers, "method": "GET"}
        asyncio.run(hosts(scope, None, send))

    allowed = [b"localhost:8080", b"a.example.com", b"LOCALHOST"]
    refused = [b"evil.net", b"example.com.evil.net", b"", None, b"x" * 300 + b".example.org"]
    for _ in range(3):
        for i in range(10):  # more names than are kept
            for host in [*allowed, *refused, f"q{i}.example.com".encode(), f"q{i}.net".encode()]:
                call(host)
    # Three rounds of ten: each allowed name 30 times, each q<i>.example.com 3 times.
    expected = Counter(dict.fromkeys(allowed, 30))
    expected.update({f"q{i}.example.com".encode(): 3 for i in range(10)})
    assert Counter(reached) == expected
    assert hosts._verdict.cache_info().currsize <= 4
    # A header over 255 bytes is judged each time, never kept.
    looked_up = hosts._verdict.cache_info()
    call(b"x" * 300 + b".example.org")
    assert hosts._verdict.cache_info()[:2] == looked_up[:2]


def test_the_session_cookie_is_secure_behind_an_https_public_url() -> None:
    session = Session("alice", "csrf", datetime(2030, 1, 1, tzinfo=UTC))
    for url, secure in (("https://queue.example.com", True), (None, False)):
        response = Response()
        Access("t", public_url=url).set_cookie(response, "id", session)
        cookie = response.headers["set-cookie"].lower()
        assert "httponly" in cookie
        assert "samesite=lax" in cookie
        assert ("secure" in cookie.split("; ")) is secure


def _request_from(host: str) -> Request:
    return Request({"type": "http", "method": "POST", "headers": [], "client": (host, 5000)})


def test_failed_sign_ins_are_throttled_per_ipv6_64(tmp_path: Path) -> None:
    """One customer's line has a whole /64: counting single addresses was no limit."""
    engine = make_engine(f"sqlite:///{tmp_path / 'agents.db'}")
    upgrade(engine)
    agents = AgentStore(
        engine, ["alice"], hasher=PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
    )
    access = Access("token", agents, login_failures_per_client=2, login_failures_per_account=99)
    for host in ("2001:db8:1:2::1", "2001:db8:1:2::2"):
        with pytest.raises(Denied) as failed:
            access.sign_in(_request_from(host), "alice", "guess")
        assert failed.value.status == 401
    with pytest.raises(Denied) as throttled:
        access.sign_in(_request_from("2001:db8:1:2:ffff::3"), "alice", "guess")
    assert throttled.value.status == 429
    with pytest.raises(Denied) as other:  # another /64 is another client
        access.sign_in(_request_from("2001:db8:1:3::1"), "alice", "guess")
    assert other.value.status == 401
    engine.dispose()


def test_a_device_cookie_carries_any_agent_name(tmp_path: Path) -> None:
    """An agent named with a character outside Latin-1 got a 500 on a right password
    (the name went into the Set-Cookie header as is; review, 2026-12-01)."""
    engine = make_engine(f"sqlite:///{tmp_path / 'agents.db'}")
    upgrade(engine)
    agents = AgentStore(
        engine,
        ["łukasz", "o'neil,x y"],
        hasher=PasswordHasher(time_cost=1, memory_cost=8, parallelism=1),
    )
    access = Access("token", agents)
    for name in ("łukasz", "o'neil,x y"):
        agents.set_password(name, "a-password")
        session_id, session, device = access.sign_in(_request_from("192.0.2.1"), name, "a-password")
        assert device is not None
        response = Response()
        access.set_cookie(response, session_id, session, device)  # raised UnicodeEncodeError
        cookie = response.headers.getlist("set-cookie")[-1]
        assert cookie.startswith(f"switchboard_device={device};")
        back = Request(
            {
                "type": "http",
                "method": "POST",
                "headers": [(b"cookie", f"switchboard_device={device}".encode())],
                "client": ("192.0.2.1", 5000),
            }
        )
        assert access.known_device(back, name) == device.split(".")[1]
        assert access.known_device(back, "alice") is None
    engine.dispose()


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab<>&\"'\u00e9\U0001f600"), max_size=200))
def test_the_escaped_length_is_what_the_template_writes(text: str) -> None:
    assert _escaped_len(text) == len(str(escape(text)).encode())
    for budget in (0, 1, 5, 17, 60):
        start = _within(text, budget)
        assert text.startswith(start)
        assert _escaped_len(start) <= budget
        if len(start) < len(text):  # the longest such start: one more would not fit
            assert _escaped_len(text[: len(start) + 1]) > budget


def test_a_text_of_characters_the_page_escapes_is_clipped_by_its_escaped_size() -> None:
    quotes = '"' * CARD_TEXT
    plain = "x" * CARD_TEXT
    assert clip(plain) == plain
    assert len(str(escape(clip(quotes)))) <= CARD_TEXT_PAGE
    assert len(clip(quotes)) == CARD_TEXT_PAGE // 5
    emoji = "\U0001f600" * CARD_TEXT
    assert len(clip(emoji)) == CARD_TEXT_PAGE // 4  # four bytes each


def test_html_of_entities_is_clipped_by_its_escaped_size_and_stays_balanced() -> None:
    html = "<p>" + "&amp;&quot;<b>'</b>" * 10_000 + "</p>"
    shown = clip_html(html)
    assert 0 < len(str(escape(shown)).encode()) <= CARD_HTML_PAGE
    assert shown.count("<b>") == shown.count("</b>")
    assert shown.endswith("</p>")
    small = "<p>fine &amp; short</p>"
    assert clip_html(small) is small
