"""The error families, as senders see them through the real servers.

One adapter made only for this test raises each family from its normalizer; the
SMTP adapter gets a hand-off that raises them, since nothing in the built-in
email path raises ``Rejected`` or ``Stop`` today. The answers are what
``ingest/errors.py`` documents.
"""

from __future__ import annotations

import json
import smtplib
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pytest
from pydantic import BaseModel

from ingest.errors import Rejected, Stop
from ingest.handoff import HandOff, Receipt
from ingest.sdk import JSON, HttpAdapter, HttpRoute, InboundRequest
from normalize.content import Normalized, Serialized
from normalize.errors import NormalizeError
from normalize.schema import BlobRef
from switchboard.settings import KafkaSettings
from tests import local_http
from tests.dovecot import Dovecot
from tests.http_helpers import http_ingest
from tests.imap_helpers import imap_adapter, mailbox, wait_for
from tests.smtp_helpers import collect, smtp_server

pytestmark = pytest.mark.integration


class FamilySettings(BaseModel):
    key: str = "family-key"


class FamilyAdapter(HttpAdapter[FamilySettings]):
    name = "family"
    summary = "raises what the request asks for"
    settings_class = FamilySettings

    def routes(self) -> list[HttpRoute]:
        return [HttpRoute("/webhooks/family", summary="test", content_types=(JSON,))]

    def authenticate(self, request: InboundRequest) -> None:
        given = request.headers.get("x-key")
        if given is None:
            raise Rejected("auth", "no X-Key", status=401)
        if given != self.settings.key:  # recorded: someone should look at it
            raise Rejected("auth", "wrong X-Key", status=403, record=True, metadata={"k": 1})

    async def normalize(self, request: InboundRequest) -> Normalized:
        action = json.loads(request.body)["do"]
        if action == "stop":
            raise Stop("credentials revoked upstream")
        if action == "reject":
            raise Rejected("policy", "this account may not write here", status=422)
        if action == "query":  # what the adapter sees of the URL's query
            raise NormalizeError("malformed", f"query {sorted(request.query.items())}")
        if action == "invalid":  # a normalizer letting through what the schema refuses
            BlobRef(sha256="0" * 64, size=1, content_type="x" * 300)
        raise NormalizeError("malformed", f"cannot {action}")


def test_http_answers_for_each_family(
    kafka_settings: KafkaSettings, tmp_path: Path, unique: str
) -> None:
    stops: list[str] = []
    with http_ingest(
        kafka_settings,
        tmp_path,
        providers=[(FamilyAdapter, FamilySettings())],
        on_stop=stops.append,
    ) as http:
        url = f"{http.base}/webhooks/family"

        def send(action: str, key: str | None = "family-key") -> httpx.Response:
            headers = {"x-key": key} if key is not None else {}
            return local_http.post(
                url, json={"do": action, "t": unique}, headers=headers, timeout=30
            )

        stopped = send("stop")
        assert stopped.status_code == 503
        assert stopped.headers["retry-after"]
        assert stops == ["family: credentials revoked upstream"]
        rejected = send("reject")
        assert rejected.status_code == 422
        assert rejected.json()["reason"] == "policy"
        assert rejected.headers["content-type"] == "application/problem+json"
        malformed = send("explode")
        assert (malformed.status_code, malformed.json()["reason"]) == (400, "malformed")
        invalid = send("invalid")  # was a bare 500, nothing kept
        assert (invalid.status_code, invalid.json()["reason"]) == (400, "normalizer-error")
        assert "content_type" in invalid.json()["detail"]
        # The query as the adapter reads it: parsed when there is one, empty when not.
        asked = local_http.post(
            f"{url}?a=1&b=two%20words", json={"do": "query"}, headers={"x-key": "family-key"}
        )
        assert asked.json()["detail"] == "query [('a', '1'), ('b', 'two words')]"
        assert send("query").json()["detail"] == "query []"
        assert send("reject", key=None).status_code == 401
        wrong = send("reject", key="guess")
        assert wrong.status_code == 403
        assert "id" in wrong.json()  # a recorded refusal names its dead letter
        _, dead = collect(kafka_settings, f"family-{unique}", {UUID(wrong.json()["id"])})
    [letter] = dead.values()
    assert (letter.adapter, letter.reason, letter.metadata["k"]) == ("family", "auth", 1)
    assert letter.raw is not None
    assert unique.encode() in http.blobs.get(letter.raw.sha256)


class RaisingHandOff(HandOff):
    """Raises the family the subject names, else delivers."""

    async def deliver(self, normalized: Normalized | Serialized) -> Receipt:
        if isinstance(normalized, Normalized):
            subject = normalized.message.subject or ""
        else:  # SMTP hands over the event's JSON, made in its parse process
            subject = json.loads(normalized.value).get("subject") or ""
        if subject == "stop":
            raise Stop("disk is read-only")
        if subject == "reject":
            raise Rejected("policy", "sender is blocked")
        return await super().deliver(normalized)


def _mail(subject: str) -> bytes:
    return (
        f"From: ann@example.org\r\nTo: support@example.com\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject}@x.example.org>\r\n\r\nbody\r\n"
    ).encode()


def test_smtp_answers_for_each_family(kafka_settings: KafkaSettings, tmp_path: Path) -> None:
    stops: list[str] = []
    with smtp_server(
        kafka_settings, tmp_path, handoff_type=RaisingHandOff, on_stop=stops.append
    ) as server:
        answers: dict[str, Any] = {}
        for subject in ("reject", "stop", "fine"):
            try:
                with smtplib.SMTP("127.0.0.1", server.adapter.port, timeout=20) as client:
                    client.sendmail("ann@example.org", ["support@example.com"], _mail(subject))
                answers[subject] = 250
            except smtplib.SMTPResponseException as exc:
                error = exc.smtp_error
                text = error.decode() if isinstance(error, bytes) else error
                answers[subject] = (exc.smtp_code, text)
    assert answers["reject"] == (554, "5.6.0 Message refused: sender is blocked")
    assert answers["stop"][0] == 421
    assert answers["fine"] == 250
    assert stops == ["smtp: disk is read-only"]


def test_imap_stops_polling_and_asks_the_process_to_stop(
    kafka_settings: KafkaSettings, tmp_path: Path, dovecot: Dovecot, monkeypatch: pytest.MonkeyPatch
) -> None:
    stops: list[str] = []
    dovecot.deliver(_mail("fine"))
    dovecot.deliver(_mail("stop"))
    box = mailbox(dovecot, "support", monkeypatch.setenv)
    with imap_adapter(
        kafka_settings, tmp_path, [box], handoff_type=RaisingHandOff, on_stop=stops.append
    ) as store:
        wait_for(lambda: bool(stops), 15)
        checkpoint = store.checkpoint("support", "INBOX")
    assert stops == ["imap support: disk is read-only"]
    # The first mail was made durable and checkpointed; the one that stopped was not.
    assert checkpoint is not None
    assert checkpoint.last_uid == 1
