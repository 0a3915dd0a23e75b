"""The checked-in JSON Schema files must match the models, and mean something."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from switchboard.schemas import drift, export, schema_documents
from tests.factories import inbound_message

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"


def test_checked_in_schemas_match_the_models() -> None:
    stale = drift(SCHEMAS)
    assert stale == [], (
        f"schemas/ is out of date for {stale}: run `switchboard schema export` and commit"
    )


def test_drift_is_detected(tmp_path: Path) -> None:
    export(tmp_path)
    assert drift(tmp_path) == []
    target = tmp_path / "inbound_message.v1.json"
    document = json.loads(target.read_text())
    document["properties"].pop("subject")
    target.write_text(json.dumps(document))
    (tmp_path / "leftover.v0.json").write_text("{}")
    assert drift(tmp_path) == ["inbound_message.v1.json", "leftover.v0.json"]


def test_a_real_message_validates_against_the_checked_in_schema() -> None:
    schema = json.loads((SCHEMAS / "inbound_message.v1.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    message = json.loads(inbound_message().model_dump_json())
    jsonschema.validate(message, schema)
    message["sender"]["kind"] = "fax"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(message, schema)


def test_every_published_model_has_a_file() -> None:
    files = [*SCHEMAS.glob("*.json"), *SCHEMAS.glob("*.yaml")]
    assert sorted(schema_documents()) == sorted(p.name for p in files)
