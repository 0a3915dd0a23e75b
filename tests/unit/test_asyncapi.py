"""schemas/asyncapi.yaml: valid AsyncAPI 3.0, self-contained, and true to the events.

The validator is the AsyncAPI initiative's own JSON Schema of the 3.0.0 document
(``tests/data/asyncapi-3.0.0.schema.json``, from the npm package @asyncapi/specs
6.11.1, Apache-2.0, the schema @asyncapi/parser validates with), applied by
``jsonschema``.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from normalize.schema import ContactEvent, ContactEventKind
from switchboard.asyncapi import document
from switchboard.events import TYPE_INBOUND, Event, contact_event_type
from tests.factories import inbound_message

ROOT = Path(__file__).resolve().parents[2]
SPEC = json.loads((ROOT / "tests/data/asyncapi-3.0.0.schema.json").read_text())
DOC_URI = "urn:switchboard:asyncapi"


def _checked_in() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "schemas/asyncapi.yaml").read_text())
    return loaded


def test_the_document_is_valid_asyncapi_3() -> None:
    doc = _checked_in()
    jsonschema.Draft7Validator(SPEC).validate(doc)
    assert doc == json.loads(json.dumps(document()))  # the file is what the code generates


def test_an_invalid_document_is_refused() -> None:
    broken = _checked_in()
    broken["channels"]["inbound"]["addres"] = broken["channels"]["inbound"].pop("address")
    errors = list(jsonschema.Draft7Validator(SPEC).iter_errors(broken))
    assert errors


def _refs(node: object) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for value in node.values() for r in _refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in _refs(value)]
    return []


def test_every_reference_points_into_the_document() -> None:
    doc = _checked_in()
    for ref in set(_refs(doc)):
        assert ref.startswith("#/"), ref
        node: Any = doc
        for part in ref[2:].split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]


def _check(doc: dict[str, Any], message: str, event: Event) -> None:
    """Validate a real event's headers and value against the document's message."""
    registry: Registry[Any] = Registry().with_resource(
        DOC_URI, Resource.from_contents(doc, default_specification=DRAFT202012)
    )
    spec = doc["components"]["messages"][message]
    headers = {name: value.decode() for name, value in event.headers()}
    jsonschema.Draft202012Validator(spec["headers"]).validate(headers)
    payload = {"$ref": f"{DOC_URI}{spec['payload']['$ref']}"}
    jsonschema.Draft202012Validator(payload, registry=registry).validate(json.loads(event.value()))


def test_real_events_match_their_messages() -> None:
    doc = _checked_in()
    inbound = Event(type=TYPE_INBOUND, source="t", key="k", data=inbound_message())
    _check(doc, "MessageInbound", inbound)
    merged = ContactEvent(
        event_id=uuid.uuid4(),
        kind=ContactEventKind.MERGED,
        contact_id=uuid.uuid4(),
        merged_contact_ids=(uuid.uuid4(),),
        occurred_at=datetime.now(UTC),
    )
    _check(
        doc,
        "ContactMerged",
        Event(type=contact_event_type("contact.merged"), source="t", key="k", data=merged),
    )
    bad = json.loads(inbound.value())
    del bad["channel"]
    broken = Event(type=TYPE_INBOUND, source="t", key="k", data=json.dumps(bad).encode())
    with pytest.raises(jsonschema.ValidationError, match="channel"):
        _check(doc, "MessageInbound", broken)
