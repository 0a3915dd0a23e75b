"""Two people behind one company number (ext. 12 and ext. 34) are two contacts.

The attack/bug (issue 17): extensions were dropped, so ``+1 415 555 0100 ext. 12``
and ``ext. 34`` were one identity, and two customers collapsed into one contact.
Through the real web hook, broker and router on PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from switchboard.settings import KafkaSettings, WebhookSettings
from tests import local_http
from tests.http_helpers import http_ingest
from tests.imap_helpers import wait_for
from tests.router_helpers import fresh_kafka, processed, running_router, snapshot, store_for

pytestmark = pytest.mark.integration


@pytest.fixture
def kafka() -> Iterator[KafkaSettings]:
    with fresh_kafka() as settings:
        yield settings


@pytest.mark.slow
def test_extensions_are_distinct_contacts_and_never_the_bare_number(
    kafka: KafkaSettings, migrated_postgres: Engine, tmp_path: Path
) -> None:
    hook = WebhookSettings.model_validate(
        {
            "name": "form",
            "auth": {"kind": "none"},
            "map": {"phone": "phone", "text": "message"},
            "default_region": "US",
        }
    )
    numbers = ["+1 415 555 0100 ext. 12", "(415) 555-0100 x34", "+1 415 555 0100"]
    with http_ingest(kafka, tmp_path, hooks=[hook]) as http:
        ids = []
        for number in numbers:
            answer = local_http.post(
                f"{http.base}/webhooks/form",
                json={"phone": number, "message": f"hello from {number}"},
                timeout=15,
            )
            assert answer.status_code == 202, answer.text
            ids.append(answer.json()["id"])
    store = store_for(migrated_postgres)
    with running_router(kafka, store):
        wait_for(lambda: len(processed(migrated_postgres)) == 3, 60)
    snap = snapshot(migrated_postgres)
    keys = {
        "phone:+14155550100;ext=12",
        "phone:+14155550100;ext=34",
        "phone:+14155550100",
    }
    contacts = {snap.contact_of(key) for key in keys}
    assert None not in contacts
    assert len(contacts) == 3, snap.contacts
    assert snap.merged == {}
