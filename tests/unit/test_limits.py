"""The pure parts of the HTTP limits: client keys, bucket memory, the limit table,
form bounds, trusted proxies. The behaviour over sockets is in
tests/integration/test_hostile_http.py."""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

import pytest
from pydantic import ValidationError

from ingest.errors import Rejected
from ingest.ratelimit import ClientBuckets, client_key
from ingest.sdk import parse_form
from normalize.errors import NormalizeError
from switchboard.limits import (
    BodyBudget,
    BodyLimitMiddleware,
    BodyLimits,
    ConnectionGuard,
    HttpLimitSettings,
    _Body,
    trusted,
)


def test_an_ipv6_client_is_limited_by_its_64() -> None:
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:bbbb::2")
    assert client_key("2001:db8:1:2::1") != client_key("2001:db8:1:3::1")
    assert client_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert client_key("192.0.2.1") != client_key("192.0.2.2")


def test_client_buckets_are_per_address_and_bounded() -> None:
    buckets = ClientBuckets(rate=0.001, burst=2, max_clients=3)
    assert [buckets.take("192.0.2.1") for _ in range(2)] == [0.0, 0.0]
    assert buckets.take("192.0.2.1") > 0
    assert buckets.take("192.0.2.2") == 0.0  # another client has its own budget
    for n in range(3, 10):  # a spray of addresses forgets the oldest, never grows
        buckets.take(f"192.0.2.{n}")
    assert len(buckets._buckets) == 3


def test_the_limit_table_falls_back_to_the_default() -> None:
    limits = BodyLimits(default=1000)
    limits.set("/webhooks/form", 5000)
    assert limits.for_path("/webhooks/form") == 5000
    assert limits.for_path("/api/queue") == 1000


def test_the_body_budget_is_shared_and_one_request_always_fits() -> None:
    budget = BodyBudget(100)  # a client may hold a quarter: 25
    assert budget.take(60, "a")  # alone: over its client's share, and still served
    assert budget.take(90, "a", own=60)  # the same request, growing past the budget
    assert not budget.take(1, "b")  # anyone else waits
    budget.give(150, "a")
    assert budget.clients == {}
    assert budget.take(20, "a")
    assert not budget.take(10, "a")  # a second request of a's: past its share
    assert budget.take(25, "b")
    assert budget.take(25, "c")
    assert budget.take(25, "d")
    assert not budget.take(20, "e")  # 95 held: past the budget
    budget.give(20, "a")
    assert budget.take(20, "e")
    assert budget.held == 95
    # An address's only request, growing while others hold bytes, is bound by its
    # share too (waived for it, one address's one request held most of the budget).
    other = BodyBudget(100)
    assert other.take(10, "a")
    assert other.take(20, "f")
    assert not other.take(10, "f", own=20)
    other.give(10, "a")
    assert other.take(60, "f", own=20)  # nobody else holds anything: it fits
    # ... unless its route takes bodies past the quarter: an address's only request
    # may grow to its route's limit beside others, within the budget.
    large = BodyBudget(100)
    assert large.take(10, "a")
    assert large.take(20, "f", route_limit=60)
    assert large.take(40, "f", own=20, route_limit=60)
    assert not large.take(1, "f", own=60, route_limit=60)  # the route's limit bounds it
    assert not large.take(10, "f", route_limit=60)  # a second request of f: the quarter
    assert not large.take(31, "g", route_limit=200)  # and the budget bounds everything
    with pytest.raises(ValidationError):
        HttpLimitSettings(max_body_in_flight=1000)  # below 64 KiB: a typo, not a budget


def test_form_bounds() -> None:
    assert parse_form(b"a=1&b=", max_fields=2, max_field_bytes=10) == {"a": "1", "b": ""}
    with pytest.raises(Rejected) as many:
        parse_form(b"a=1&b=2&c=3", max_fields=2, max_field_bytes=10)
    assert many.value.status == 413
    with pytest.raises(Rejected):
        parse_form(b"a=" + b"x" * 11, max_fields=2, max_field_bytes=10)
    with pytest.raises(NormalizeError):
        parse_form(b"a=\xff", max_fields=2, max_field_bytes=10)


def test_trusted_proxies_are_checked_and_exempt_from_the_connection_cap() -> None:
    with pytest.raises(ValidationError):
        HttpLimitSettings(trusted_proxies=["not-an-address"])
    networks = HttpLimitSettings(trusted_proxies=["10.0.0.0/8"]).networks()
    assert networks == (ipaddress.ip_network("10.0.0.0/8"),)
    assert trusted("10.1.2.3", networks)
    assert not trusted("192.0.2.1", networks)
    guard = ConnectionGuard(max_per_client=1, header_timeout_s=1, trusted=networks)
    assert guard.admit("192.0.2.1")
    assert not guard.admit("192.0.2.1")
    assert guard.admit("10.1.2.3")
    assert guard.admit("10.1.2.3")
    guard.release("192.0.2.1")
    assert guard.admit("192.0.2.1")


def test_the_connection_cap_counts_an_ipv6_client_by_its_64() -> None:
    """One customer's line has a whole /64: capping single addresses was no cap."""
    guard = ConnectionGuard(max_per_client=2, header_timeout_s=1)
    assert guard.admit("2001:db8:1:2::1")
    assert guard.admit("2001:db8:1:2::2")
    assert not guard.admit("2001:db8:1:2:ffff::3")
    assert guard.admit("2001:db8:1:3::1")  # another /64
    guard.release("2001:db8:1:2::2")
    assert guard.admit("2001:db8:1:2::9")
    assert guard.admit("::ffff:192.0.2.1")
    assert guard.admit("192.0.2.1")
    assert not guard.admit("192.0.2.1")  # the mapped address is the same client


def _waiting_body(timeout_s: float) -> tuple[Any, list[Any], list[str]]:
    """A _Body over a receive that waits until its event is set; what it sent and
    whether the receive's own cleanup ran."""
    arrived = asyncio.Event()
    sent: list[Any] = []
    cleaned: list[str] = []

    async def receive() -> dict[str, Any]:
        try:
            await arrived.wait()
        except BaseException as exc:  # what the server's receive was told
            cleaned.append(type(exc).__name__)
            raise
        cleaned.append("receive")
        return {"type": "http.request", "body": b"hello", "more_body": False}

    async def send(message: Any) -> None:  # noqa: ANN401 - an ASGI message
        sent.append(message)

    async def app(scope: Any, receive: Any, send: Any) -> None:  # noqa: ANN401 - never called
        raise AssertionError

    middleware = BodyLimitMiddleware(app, BodyLimits(default=100), body_timeout_s=timeout_s)
    scope = {"type": "http", "path": "/", "headers": [], "client": ("127.0.0.1", 1)}
    body = _Body(middleware, scope, receive, send, 100)
    body.arrived = arrived  # type: ignore[attr-defined]
    return body, sent, cleaned


def test_a_receive_that_waits_is_resumed_cancelled_or_timed_out() -> None:
    async def main() -> None:
        # Resumed: the body arrives after the first step waited.
        body, sent, cleaned = _waiting_body(5)
        task = asyncio.create_task(body.receive())
        await asyncio.sleep(0.02)
        assert not task.done()
        body.arrived.set()
        assert (await task)["body"] == b"hello"
        assert cleaned == ["receive"]
        assert sent == []
        # Cancelled: the cancellation reaches the server's receive.
        body, sent, cleaned = _waiting_body(5)
        task = asyncio.create_task(body.receive())
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert cleaned == ["CancelledError"]
        assert sent == []
        # Timed out: 408 answered, the receive stopped (asyncio.timeout cancels it).
        body, sent, cleaned = _waiting_body(0.05)
        assert (await body.receive()) == {"type": "http.disconnect"}
        assert sent[0]["status"] == 408
        assert cleaned == ["CancelledError"]
        # Closed while waiting (a request's task dropped): the server's receive closed too.
        body, sent, cleaned = _waiting_body(5)
        receiving = body.receive()
        receiving.send(None)
        receiving.close()
        assert cleaned == ["GeneratorExit"]

    asyncio.run(main())
