"""The whole test suite of the example adapter: the conformance kit, one statement."""

from __future__ import annotations

from pydantic import SecretStr
from switchboard_example import WidgetAdapter, WidgetSettings

from ingest.testing import Answer, Malformed, Running, adapter_conformance, post

TOKEN = "widget-secret-token"


def deliver(running: Running, sample: dict[str, object]) -> Answer:
    body = dict(sample)
    token = body.pop("_token", TOKEN)
    return post(
        running, "/webhooks/widget", json=body, headers={"authorization": f"Bearer {token}"}
    )


TestWidgetAdapter = adapter_conformance(
    WidgetAdapter,
    settings=WidgetSettings(token=SecretStr(TOKEN)),
    deliver=deliver,
    samples=[
        {"id": "m-1", "visitor": {"email": "ann@example.org", "name": "Ann"}, "text": "Hi"},
        {"id": "m-2", "visitor": {"email": "bob@example.net"}, "text": "Order 42?"},
    ],
    malformed=[
        Malformed({"id": "m-3", "text": "who am I?"}, status="400"),
        Malformed({"id": "m-4", "visitor": {"email": "not an address"}, "text": "x"}, status="400"),
        Malformed({"_token": "wrong", "id": "m-5", "visitor": {}, "text": "x"}, status="403"),
    ],
)
