"""JSON Schema documents generated from the models, checked in under ``schemas/``."""

from __future__ import annotations

import json
import re
from pathlib import Path

from normalize.schema import PUBLISHED_MODELS, SCHEMA_MAJOR
from switchboard.asyncapi import yaml_text


def _file_name(model_name: str) -> str:
    snake = re.sub(r"(?<!^)(?=[A-Z])", "_", model_name).lower()
    return f"{snake}.v{SCHEMA_MAJOR}.json"


def schema_documents() -> dict[str, str]:
    """File name -> JSON text, deterministic so a diff means a real change."""
    documents: dict[str, str] = {}
    for model in PUBLISHED_MODELS:
        schema = model.model_json_schema(mode="validation")
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["$id"] = f"urn:switchboard:schema:{_file_name(model.__name__)}"
        documents[_file_name(model.__name__)] = (
            json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        )
    # The AsyncAPI document of the topics and every event type (switchboard/asyncapi.py).
    documents["asyncapi.yaml"] = yaml_text()
    return documents


def drift(directory: Path) -> list[str]:
    """Names of schema files that are missing, stale or unexpected in ``directory``."""
    expected = schema_documents()
    problems = [
        name
        for name, text in expected.items()
        if not (directory / name).is_file() or (directory / name).read_text() != text
    ]
    problems += sorted(
        p.name
        for p in [*directory.glob("*.json"), *directory.glob("*.yaml")]
        if p.name not in expected
    )
    return problems


def export(directory: Path) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in schema_documents().items():
        path = directory / name
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
            written.append(name)
    return written
