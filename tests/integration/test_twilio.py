"""The Twilio hook over a real socket, signed with the real RequestValidator."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr
from twilio.request_validator import RequestValidator

from ingest import sdk
from normalize.schema import DeadLetter, InboundMessage
from switchboard.broker import free_port
from switchboard.settings import KafkaSettings, TwilioSettings
from switchboard.topics import DEADLETTER, INBOUND
from tests import local_http
from tests.http_helpers import find, find_until_end, http_ingest

pytestmark = pytest.mark.integration

TOKEN = "twilio-test-token-0123456789abcdef"
PATH = "/webhooks/twilio/sms"
ACCOUNT = "AC" + "1" * 32
FORM = {"content-type": "application/x-www-form-urlencoded"}


def settings(**overrides: object) -> TwilioSettings:
    return TwilioSettings(auth_token=[SecretStr(TOKEN)], **overrides)  # type: ignore[arg-type]


def params(sid: str, **extra: str) -> dict[str, str]:
    return {
        "MessageSid": sid,
        "AccountSid": ACCOUNT,
        "MessagingServiceSid": "MG1",
        "From": "+14155550100",
        "To": "+14155550199",
        "Body": "Where is my order?",
        "NumMedia": "0",
        "FromCountry": "US",
        "FromCity": "SAN FRANCISCO",
        **extra,
    }


def post(
    url: str, form: dict[str, str], signature: str | None, token: str = TOKEN
) -> httpx.Response:
    headers = dict(FORM)
    if signature is not None:
        headers["x-twilio-signature"] = signature
    return local_http.post(url, data=form, headers=headers, timeout=15)


def sign(url: str, form: dict[str, str], token: str = TOKEN) -> str:
    return str(RequestValidator(token).compute_signature(url, form))


def test_a_signed_sms_is_published_and_answered_with_twiml(
    kafka_settings: KafkaSettings, tmp_path: Path, unique: str
) -> None:
    sid = f"SM{unique:0<32}"
    with http_ingest(kafka_settings, tmp_path, twilio=settings()) as app:
        url = app.base + PATH
        form = params(sid, Body="")  # an empty Body is legal
        response = post(url, form, sign(url, form))
        again = post(url, form, sign(url, form))  # Twilio retries deliver the same webhook
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/xml")
    assert "<Response" in response.text
    assert again.status_code == 200
    messages = find(
        kafka_settings,
        f"tw-{unique}",
        INBOUND,
        InboundMessage,
        lambda m: m.provider_message_id == sid,
        count=2,
    )
    assert len(messages) == 2
    assert {m.dedupe_key for m in messages} == {f"twilio:{sid}"}
    message = messages[0]
    assert message.sender.key == "phone:+14155550100"
    assert message.recipients[0].value == "+14155550199"
    assert message.text is None
    twilio_meta = message.metadata["twilio"]
    assert isinstance(twilio_meta, dict)
    assert twilio_meta["FromCity"] == "SAN FRANCISCO"
    assert twilio_meta["AccountSid"] == ACCOUNT


def test_whatsapp_and_mms(kafka_settings: KafkaSettings, tmp_path: Path, unique: str) -> None:
    sid = f"SM{unique:0<32}"
    with http_ingest(kafka_settings, tmp_path, twilio=settings()) as app:
        url = app.base + PATH
        form = params(
            sid,
            From="whatsapp:+14155550100",
            NumMedia="1",
            MediaUrl0="https://api.twilio.com/2010-04-01/Accounts/AC123/Messages/MM1/Media/ME1",
            MediaContentType0="image/jpeg",
        )
        assert post(url, form, sign(url, form)).status_code == 200
    [message] = find(
        kafka_settings,
        f"wa-{unique}",
        INBOUND,
        InboundMessage,
        lambda m: m.provider_message_id == sid,
    )
    assert message.channel == "whatsapp"
    assert message.sender.key == "phone:+14155550100"
    [media] = message.attachments
    assert media.url is not None
    assert media.blob is None  # downloading is off by default


@pytest.mark.parametrize(
    "case", ["tampered body", "wrong url scheme", "missing header", "wrong token"]
)
@pytest.mark.slow
def test_bad_signatures_are_refused_and_dead_lettered(
    kafka_settings: KafkaSettings, tmp_path: Path, unique: str, case: str
) -> None:
    sid = f"SM{unique:0<32}"
    with http_ingest(kafka_settings, tmp_path, twilio=settings()) as app:
        url = app.base + PATH
        form = params(sid)
        signature: str | None = sign(url, form)
        if case == "tampered body":
            form = {**form, "Body": "Send money to ..."}
        elif case == "wrong url scheme":
            signature = sign(url.replace("http://", "https://"), form)
        elif case == "missing header":
            signature = None
        else:
            signature = sign(url, form, token="another-accounts-token")
        response = post(url, form, signature)
    assert response.status_code == 403
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["title"] == "Forbidden"
    [letter] = find(
        kafka_settings,
        f"sig-{unique}",
        DEADLETTER,
        DeadLetter,
        lambda d: d.metadata.get("message_sid") == sid,
    )
    assert letter.reason == "signature"
    assert letter.raw is not None
    # The server answered before the test read the topic: whatever it published is
    # there by now (the same read finds the dead letter).
    assert find_until_end(
        kafka_settings, DEADLETTER, DeadLetter, lambda d: d.metadata.get("message_sid") == sid
    ) == [letter]
    nothing = find_until_end(
        kafka_settings, INBOUND, InboundMessage, lambda m: m.provider_message_id == sid
    )
    assert nothing == []


def test_public_url_behind_a_proxy_and_token_rotation(
    kafka_settings: KafkaSettings, tmp_path: Path, unique: str
) -> None:
    public = "https://hooks.example.com"
    rotated = TwilioSettings(auth_token=[SecretStr("old-token"), SecretStr(TOKEN)])
    with http_ingest(kafka_settings, tmp_path, twilio=rotated, public_url=public) as app:
        form = params(f"SM{unique:0<32}")
        # Twilio signed the public https URL; the request reaches us as plain http.
        response = post(app.base + PATH, form, sign(public + PATH, form))
        assert response.status_code == 200, response.text
        assert post(app.base + PATH, form, sign(app.base + PATH, form)).status_code == 403


def test_each_request_is_checked_against_its_own_url(
    kafka_settings: KafkaSettings, tmp_path: Path, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hook remembers the URLs it was called at (ingest.sdk.URLS_KEPT); a
    signature still only passes for the URL, query and Host the request came with,
    and past the bound the table starts over without a wrong answer."""
    monkeypatch.setattr(sdk, "URLS_KEPT", 3)
    with http_ingest(kafka_settings, tmp_path, twilio=settings()) as app:
        by_name = app.base.replace("127.0.0.1", "localhost")
        for n in range(8):  # more URLs than are kept
            for i, base in enumerate((app.base, by_name)):
                url = f"{base}{PATH}?n={n}"
                form = params(f"SM{n:02d}{i}{unique}"[:34].ljust(34, "0"))
                assert post(url, form, sign(url, form)).status_code == 200
                # The same signature under the next query, the other Host, no query:
                for elsewhere in (
                    f"{base}{PATH}?n={n + 1}",
                    f"{by_name if base == app.base else app.base}{PATH}?n={n}",
                    f"{base}{PATH}",
                ):
                    assert post(elsewhere, form, sign(url, form)).status_code == 403, elsewhere
        # A Host and query past what is remembered are read each time, and still right.
        url = f"{app.base}{PATH}?pad={'x' * sdk.URL_KEPT_BYTES}"
        form = params(f"SM999{unique}"[:34].ljust(34, "0"))
        assert post(url, form, sign(url, form)).status_code == 200
        assert post(url + "y", form, sign(url, form)).status_code == 403


def test_enforcement_can_be_switched_off(
    kafka_settings: KafkaSettings, tmp_path: Path, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    with http_ingest(kafka_settings, tmp_path, twilio=settings(enforce_signature=False)) as app:
        assert post(app.base + PATH, params(f"SM{unique:0<32}"), None).status_code == 200
    assert "SIGNATURE CHECK IS OFF" in caplog.text


def test_not_durable_answers_503_with_retry_after(tmp_path: Path, unique: str) -> None:
    nowhere = KafkaSettings(
        bootstrap=f"127.0.0.1:{free_port()}",
        max_block_ms=300,
        request_timeout_ms=500,
        publish_timeout_s=1.0,
    )
    with http_ingest(nowhere, tmp_path, twilio=settings()) as app:
        url = app.base + PATH
        form = params(f"SM{unique:0<32}")
        response = post(url, form, sign(url, form))
    assert response.status_code == 503
    assert int(response.headers["retry-after"]) > 0


def test_wrong_content_type_and_size(kafka_settings: KafkaSettings, tmp_path: Path) -> None:
    with http_ingest(kafka_settings, tmp_path, twilio=settings()) as app:
        url = app.base + PATH
        assert local_http.post(url, json={"a": 1}, timeout=30).status_code == 415
        big = local_http.post(url, content=b"Body=" + b"x" * 70_000, headers=FORM, timeout=30)
        assert big.status_code == 413
        # Many empty fields: refused before a field is built or a signature computed.
        fields = "&".join(f"k{i}=" for i in range(201)).encode()
        many = local_http.post(url, content=fields, headers=FORM, timeout=30)
        assert many.status_code == 413
        assert "200 form fields" in many.json()["detail"]


class _Media(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/redirect":
            self.send_response(307)
            port = self.server.socket.getsockname()[1]  # type: ignore[attr-defined]
            self.send_header("Location", f"http://127.0.0.1:{port}/image")
            self.end_headers()
            return
        body = b"\xff\xd8JPEG" if self.path == "/image" else b"x" * 50_000
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def media_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Media)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_port
    finally:
        server.shutdown()


def test_media_download_is_allowlisted_and_bounded(
    kafka_settings: KafkaSettings, tmp_path: Path, unique: str
) -> None:
    sid = f"SM{unique:0<32}"
    with media_server() as port:
        twilio = settings(download_media=True, media_hosts=["127.0.0.1"], media_max_bytes=10_000)
        with http_ingest(kafka_settings, tmp_path, twilio=twilio) as app:
            url = app.base + PATH
            form = params(
                sid,
                NumMedia="3",
                MediaUrl0=f"http://127.0.0.1:{port}/redirect",
                MediaContentType0="image/jpeg",
                MediaUrl1=f"http://127.0.0.1:{port}/big",
                MediaContentType1="video/mp4",
                MediaUrl2=f"http://localhost:{port}/image",
                MediaContentType2="image/jpeg",
            )
            assert post(url, form, sign(url, form)).status_code == 200
            [message] = find(
                kafka_settings,
                f"media-{unique}",
                INBOUND,
                InboundMessage,
                lambda m: m.provider_message_id == sid,
            )
            fetched, too_big, not_allowed = message.attachments
            assert fetched.blob is not None
            assert app.blobs.get(fetched.blob.sha256) == b"\xff\xd8JPEG"
            assert too_big.blob is None
            assert not_allowed.blob is None  # "localhost" is not on the allowlist
            errors = str(message.metadata["media_errors"])
            assert "larger than 10000" in errors
            assert "not allowed: 'localhost'" in errors
