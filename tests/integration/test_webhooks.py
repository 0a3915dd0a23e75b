"""Generic web hooks over a real socket, against the real broker."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from normalize.schema import InboundMessage
from switchboard.broker import free_port
from switchboard.settings import KafkaSettings, TwilioSettings, WebhookSettings
from switchboard.topics import INBOUND
from tests import local_http
from tests.http_helpers import RunningHttp, find, http_ingest

pytestmark = pytest.mark.integration

SECRET = "form-secret"
TOKEN = "chat-token"
FORM_MAP = {
    "email": "contact.email",
    "phone": "contact.phone",
    "name": "contact.name",
    "subject": "topic",
    "text": "message",
    "id": "submission_id",
}


def hooks(monkeypatch: pytest.MonkeyPatch, **contact_form: object) -> list[WebhookSettings]:
    monkeypatch.setenv("FORM_SECRET", SECRET)
    monkeypatch.setenv("CHAT_TOKEN", TOKEN)
    return [
        WebhookSettings.model_validate(
            {
                "name": "contact-form",
                "auth": {
                    "kind": "hmac-sha256",
                    "secret_env": "FORM_SECRET",
                    "header": "X-Signature",
                    "prefix": "sha256=",
                    "timestamp_header": "X-Timestamp",
                },
                "map": FORM_MAP,
                "content_types": ["json"],
                "default_region": "US",
                **contact_form,
            }
        ),
        WebhookSettings.model_validate(
            {
                "name": "chat",
                "auth": {"kind": "bearer", "token_env": "CHAT_TOKEN"},
                "map": {"email": "email", "text": "text", "name": "name"},
                "content_types": ["form"],
            }
        ),
        WebhookSettings.model_validate(
            {
                "name": "open",
                "auth": {"kind": "none"},
                "map": {"email": "email", "phone": "phone", "text": "text"},
                "content_types": ["json"],
                "burst": 100_000,
                "rate_per_s": 100_000,
            }
        ),
    ]


def signed(body: bytes, stamp: int | None = None, secret: str = SECRET) -> dict[str, str]:
    stamp = int(time.time()) if stamp is None else stamp
    digest = hmac.new(secret.encode(), str(stamp).encode() + b"." + body, hashlib.sha256)
    return {
        "content-type": "application/json",
        "x-timestamp": str(stamp),
        "x-signature": "sha256=" + digest.hexdigest(),
    }


def submit(app: RunningHttp, payload: object, **headers: str) -> httpx.Response:
    body = json.dumps(payload).encode()
    return local_http.post(
        f"{app.base}/webhooks/contact-form",
        content=body,
        headers={**signed(body), **headers},
        timeout=15,
    )


def test_a_form_with_email_and_phone_is_one_message_with_both_identities(
    kafka_settings: KafkaSettings, tmp_path: Path, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    payload = {
        "submission_id": unique,
        "topic": "Refund",
        "contact": {"email": "Ann@Example.com", "phone": "(415) 555-0100", "name": "Ann"},
        "message": "Please call me back.",
    }
    with http_ingest(kafka_settings, tmp_path, hooks=hooks(monkeypatch)) as app:
        response = submit(app, payload)
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["dedupe_key"].startswith(f"webhook:contact-form:email:ann@example.com:id:{unique}#")
    [message] = find(
        kafka_settings, f"wh-{unique}", INBOUND, InboundMessage, lambda m: str(m.id) == body["id"]
    )
    assert message.sender.key == "email:ann@example.com"
    assert [i.key for i in message.identities] == ["phone:+14155550100"]
    assert message.subject == "Refund"
    assert message.text == "Please call me back."
    assert message.channel == "webhook"
    assert message.adapter == "webhook:contact-form"


def test_bodies_with_and_without_controls_arrive_clean(
    kafka_settings: KafkaSettings, tmp_path: Path, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A JSON body whose bytes cannot hold a control character or a lone surrogate
    skips the stripping walk (normalize.schema.json_needs_no_stripping); every other
    body still gets it. Each kind, through the real server to the real broker."""

    def document(text: str) -> str:
        return json.dumps({"email": f"{unique}@example.org", "text": text}, ensure_ascii=False)

    bodies = {
        # No backslash, valid UTF-8: no walk, the text as sent.
        "clean": (document(f"Grüße € {unique}").encode(), f"Grüße € {unique}"),
        # Escaped controls: walked, stripped (the body keeps tab and LF).
        "escaped": (
            json.dumps({"email": f"{unique}@example.org", "text": "a\x07b\x00c\td\ne"}).encode(),
            "abc\td\ne",
        ),
        # A surrogate encoded in the UTF-8 bytes, which json reads through.
        "encoded-surrogate": (
            document("x\ud83dy").encode("utf-8", "surrogatepass"),
            "x\ufffdy",
        ),
        # UTF-16 whose bytes would pass as UTF-8, a lone surrogate among them.
        "utf-16": (
            document("\ud800\u0080").encode("utf-16-le", "surrogatepass"),
            "\ufffd\u0080",
        ),
    }
    with http_ingest(kafka_settings, tmp_path, hooks=hooks(monkeypatch)) as app:
        ids = {}
        for name, (body, _) in bodies.items():
            response = local_http.post(
                f"{app.base}/webhooks/open",
                content=body,
                headers={"content-type": "application/json"},
                timeout=15,
            )
            assert response.status_code == 202, (name, response.text)
            ids[response.json()["id"]] = name
    found = find(
        kafka_settings,
        f"wh-clean-{unique}",
        INBOUND,
        InboundMessage,
        lambda m: str(m.id) in ids,
        count=len(ids),
    )
    texts = {ids[str(m.id)]: m.text for m in found}
    assert texts == {name: text for name, (_, text) in bodies.items()}


def test_dedupe_key_sources(
    kafka_settings: KafkaSettings, tmp_path: Path, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    payload = {"contact": {"email": "ann@example.com"}, "message": unique}
    with http_ingest(kafka_settings, tmp_path, hooks=hooks(monkeypatch)) as app:
        # The signature does not cover this hook's Idempotency-Key header: ignored.
        keyed = submit(app, payload, **{"idempotency-key": f"k-{unique}"}).json()
        first = submit(app, payload).json()
        second = submit(app, payload).json()
        unsigned = local_http.post(
            f"{app.base}/webhooks/open",
            json={"email": "ann@example.com", "text": unique},
            headers={"idempotency-key": f"k-{unique}"},
            timeout=30,
        ).json()
    assert first["dedupe_key"].startswith("webhook:contact-form:fp:")
    assert keyed["dedupe_key"] == first["dedupe_key"] == second["dedupe_key"]
    assert first["id"] != second["id"]
    # auth = none keeps the header, as before (anyone can post any body there anyway).
    assert unsigned["dedupe_key"].startswith(f"webhook:open:email:ann@example.com:key:k-{unique}#")


def test_form_encoded_hook_with_a_bearer_token(
    kafka_settings: KafkaSettings, tmp_path: Path, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with http_ingest(kafka_settings, tmp_path, hooks=hooks(monkeypatch)) as app:
        url = f"{app.base}/webhooks/chat"
        form = {"email": "bob@example.org", "text": f"chat {unique}", "name": "Bob"}
        ok = local_http.post(
            url, data=form, headers={"authorization": f"Bearer {TOKEN}"}, timeout=30
        )
        missing = local_http.post(url, data=form, timeout=30)
        wrong = local_http.post(
            url, data=form, headers={"authorization": "Bearer nope"}, timeout=30
        )
    assert ok.status_code == 202, ok.text
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert wrong.status_code == 403


def test_every_error_is_a_problem(
    kafka_settings: KafkaSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = {"contact": {"email": "ann@example.com"}}
    with http_ingest(
        kafka_settings,
        tmp_path,
        hooks=hooks(monkeypatch, max_body_bytes=2048, burst=30, rate_per_s=0.01),
    ) as app:
        url = f"{app.base}/webhooks/contact-form"

        def raw(body: bytes, headers: dict[str, str]) -> httpx.Response:
            return local_http.post(url, content=body, headers=headers, timeout=15)

        cases = {
            "malformed": raw(b"{not json", signed(b"{not json")),
            # Refused by size before any parsing or signature work.
            "nesting bomb": raw(
                b"[" * 100_000 + b"]" * 100_000, {"content-type": "application/json"}
            ),
            "not an object": raw(b"[1, 2]", signed(b"[1, 2]")),
            "no identity": raw(b'{"message": "hi"}', signed(b'{"message": "hi"}')),
            "missing signature": raw(
                json.dumps(good).encode(), {"content-type": "application/json"}
            ),
            "bad signature": raw(json.dumps(good).encode(), signed(b"other body")),
            "stale timestamp": raw(
                json.dumps(good).encode(),
                signed(json.dumps(good).encode(), stamp=int(time.time()) - 3600),
            ),
            "too large": raw(b"{" + b" " * 4096 + b"}", signed(b"{}")),
            "content type": raw(b"a=b", {"content-type": "application/x-www-form-urlencoded"}),
            "unknown hook": local_http.post(f"{app.base}/webhooks/nope", json=good, timeout=30),
        }
        expected = {
            "malformed": 400,
            "nesting bomb": 413,
            "not an object": 400,
            "no identity": 400,
            "missing signature": 401,
            "bad signature": 403,
            "stale timestamp": 401,
            "too large": 413,
            "content type": 415,
            "unknown hook": 404,
        }
        for name, response in cases.items():
            assert response.status_code == expected[name], (name, response.text)
            assert response.headers["content-type"] == "application/problem+json", name
            problem = response.json()
            assert problem["status"] == expected[name]
            assert problem["title"]
            assert problem["detail"], name
        assert "identifies no sender" in cases["no identity"].json()["detail"]
        assert "switchboard adapters list" in cases["unknown hook"].json()["detail"]
        limited = [submit(app, good).status_code for _ in range(40)]
        assert 429 in limited
        over = submit(app, good)
        assert over.status_code == 429
        assert int(over.headers["retry-after"]) >= 1


def test_deep_nesting_within_the_size_limit_is_a_400(
    kafka_settings: KafkaSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = b"[" * 200_000 + b"]" * 200_000
    with http_ingest(kafka_settings, tmp_path, hooks=hooks(monkeypatch)) as app:
        response = local_http.post(
            f"{app.base}/webhooks/open",
            content=body,
            headers={"content-type": "application/json"},
            timeout=30,
        )
        huge = local_http.post(
            f"{app.base}/webhooks/open",
            content=b'{"n": ' + b"9" * 5000 + b"}",
            headers={"content-type": "application/json"},
            timeout=30,
        )

        # Deep enough to parse, too deep for what walks the payload after (it was a
        # 500 with a 170 KB traceback), and a form that nests as deep as allowed.
        def nested(depth: int) -> bytes:
            inner = b"[" * (depth - 1) + b"]" * (depth - 1)
            return b'{"email": "ann@example.com", "x": ' + inner + b"}"

        parsed_but_deep = local_http.post(
            f"{app.base}/webhooks/open",
            content=nested(700),
            headers={"content-type": "application/json"},
            timeout=30,
        )
        deepest_allowed = local_http.post(
            f"{app.base}/webhooks/open",
            content=nested(64),
            headers={"content-type": "application/json"},
            timeout=30,
        )
    assert response.status_code == 400
    assert "nested too deeply" in response.json()["detail"]
    assert huge.status_code == 400
    assert parsed_but_deep.status_code == 400, parsed_but_deep.text
    assert "nested too deeply" in parsed_but_deep.json()["detail"]
    assert deepest_allowed.status_code == 202, deepest_allowed.text


def test_503_when_the_message_cannot_be_made_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nowhere = KafkaSettings(
        bootstrap=f"127.0.0.1:{free_port()}",
        max_block_ms=300,
        request_timeout_ms=500,
        publish_timeout_s=1.0,
    )
    with http_ingest(nowhere, tmp_path, hooks=hooks(monkeypatch)) as app:
        response = submit(app, {"contact": {"email": "ann@example.com"}})
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    assert int(response.headers["retry-after"]) > 0


def test_openapi_describes_every_webhook(
    kafka_settings: KafkaSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    twilio = TwilioSettings(auth_token=[SecretStr("t")])
    with http_ingest(kafka_settings, tmp_path, twilio=twilio, hooks=hooks(monkeypatch)) as app:
        document = local_http.get(f"{app.base}/openapi.json", timeout=30).json()
    paths = document["paths"]
    for path in (
        "/webhooks/twilio/sms",
        "/webhooks/contact-form",
        "/webhooks/chat",
        "/webhooks/open",
        "/healthz",
        "/readyz",
    ):
        assert path in paths, path
    contact = paths["/webhooks/contact-form"]["post"]
    assert "hmac-sha256" in contact["description"]
    assert "email <- `contact.email`" in contact["description"]
    assert {"202", "400", "401", "403", "413", "415", "429", "503"} <= set(contact["responses"])
    assert "/webhooks/{name}" not in paths


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)
PAYLOADS = JSON | st.fixed_dictionaries(
    {"email": st.one_of(st.emails(), st.text(max_size=40), st.integers())},
    optional={"phone": st.text(max_size=20), "text": JSON},
)


@pytest.mark.slow
def test_fuzzed_json_never_gets_a_5xx(
    kafka_settings: KafkaSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    statuses: dict[int, int] = {}
    with http_ingest(kafka_settings, tmp_path, hooks=hooks(monkeypatch)) as app:
        client = httpx.Client(base_url=app.base, timeout=15)

        @settings(
            max_examples=300,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        )
        @given(payload=PAYLOADS, raw=st.binary(max_size=64))
        def post(payload: object, raw: bytes) -> None:
            for body in (json.dumps(payload).encode(), raw):
                response = client.post(
                    "/webhooks/open", content=body, headers={"content-type": "application/json"}
                )
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                assert 200 <= response.status_code < 500, (body[:200], response.text)

        post()
        client.close()
    assert statuses.get(202, 0) > 0, statuses
    assert statuses.get(400, 0) > 0, statuses
