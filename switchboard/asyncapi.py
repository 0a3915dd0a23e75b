"""The AsyncAPI 3.0 document of the event stream, generated from the models.

Four channels (the topics), their record keys, the CloudEvents headers, and one
message per event type with the model's JSON Schema as its payload. Written by
`switchboard schema export` as ``schemas/asyncapi.yaml`` and drift-checked with
the JSON Schema files; self-contained (every ``$ref`` points into the document).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from normalize.schema import (
    SCHEMA_MAJOR,
    ContactEvent,
    ContactEventKind,
    ConversationStatus,
    DeadLetter,
    InboundMessage,
    MessageDuplicate,
    MessageRouted,
)
from switchboard.events import (
    CONTENT_TYPE,
    SPECVERSION,
    TYPE_CONVERSATION_STATUS,
    TYPE_DEADLETTER,
    TYPE_DUPLICATE,
    TYPE_INBOUND,
    TYPE_ROUTED,
    contact_event_type,
)
from switchboard.topics import CONTACTS, DEADLETTER, INBOUND, ROUTED

_REF = "#/components/schemas/{model}"

#: channel id -> (topic, what the key is, what it carries)
CHANNELS: dict[str, tuple[str, str, str]] = {
    "inbound": (
        INBOUND,
        "The sender's identity key, e.g. email:alice@example.com or phone:+14155550100.",
        "Every normalized inbound message.",
    ),
    "routed": (
        ROUTED,
        "The contact id.",
        "Routing decisions and conversation status changes.",
    ),
    "contacts": (
        CONTACTS,
        "The contact id.",
        "The contact lifecycle: created, identity linked, merged and unmerged, owner "
        "assigned, merges suggested and dismissed.",
    ),
    "deadletter": (
        DEADLETTER,
        "Varies: the original record's key, or the failing record's coordinates.",
        "What could not be normalized, routed or applied, with the stage and the reason.",
    ),
}


def _event_types() -> list[tuple[str, str, type[BaseModel]]]:
    """(channel id, CloudEvents type, model) for every event Switchboard publishes."""
    types: list[tuple[str, str, type[BaseModel]]] = [
        ("inbound", TYPE_INBOUND, InboundMessage),
        ("routed", TYPE_ROUTED, MessageRouted),
        ("routed", TYPE_DUPLICATE, MessageDuplicate),
        ("routed", TYPE_CONVERSATION_STATUS, ConversationStatus),
    ]
    types += [("contacts", contact_event_type(k), ContactEvent) for k in ContactEventKind]
    types.append(("deadletter", TYPE_DEADLETTER, DeadLetter))
    return types


def _message_id(event_type: str) -> str:
    short = event_type.removeprefix("io.switchboard.").removesuffix(f".v{SCHEMA_MAJOR}")
    return "".join(part.capitalize() for part in short.replace("_", ".").split("."))


def _headers(event_type: str) -> dict[str, Any]:
    text = {"type": "string"}
    return {
        "type": "object",
        "description": "CloudEvents 1.0 attributes in Kafka binary mode (record headers).",
        "required": ["ce_specversion", "ce_id", "ce_type", "ce_source", "ce_time"],
        "properties": {
            "ce_specversion": {**text, "const": SPECVERSION},
            "ce_id": {
                **text,
                "description": "The event id (a UUID); stable when the event is re-emitted: "
                "consumers de-duplicate on it.",
            },
            "ce_type": {**text, "const": event_type},
            "ce_source": {**text, "description": "The component that published it."},
            "ce_time": {**text, "format": "date-time"},
            "ce_subject": {**text, "description": "Optional."},
            "content-type": {**text, "const": CONTENT_TYPE},
        },
    }


def document() -> dict[str, Any]:
    """The AsyncAPI 3.0.0 document as data, deterministic."""
    models = sorted({m for _, _, m in _event_types()}, key=lambda m: m.__name__)
    refs, defs = models_json_schema([(m, "validation") for m in models], ref_template=_REF)
    schemas = dict(sorted(defs.get("$defs", {}).items()))
    messages: dict[str, Any] = {}
    by_channel: dict[str, dict[str, Any]] = {c: {} for c in CHANNELS}
    for channel, event_type, model in _event_types():
        name = _message_id(event_type)
        key = CHANNELS[channel][1]
        messages[name] = {
            "name": event_type,
            "title": event_type,
            "contentType": CONTENT_TYPE,
            "headers": _headers(event_type),
            "payload": refs[(model, "validation")],
            "bindings": {
                "kafka": {"key": {"type": "string", "description": key}, "bindingVersion": "0.5.0"}
            },
        }
        by_channel[channel][name] = {"$ref": f"#/components/messages/{name}"}
    channels = {
        channel: {
            "address": topic,
            "description": f"{carries} Key: {key}",
            "messages": by_channel[channel],
        }
        for channel, (topic, key, carries) in CHANNELS.items()
    }
    operations = {
        f"receive{channel.capitalize()}": {
            "action": "receive",
            "summary": f"Consume {topic} (a consumer group of your own).",
            "channel": {"$ref": f"#/channels/{channel}"},
            "messages": [
                {"$ref": f"#/channels/{channel}/messages/{name}"} for name in by_channel[channel]
            ],
        }
        for channel, (topic, _, _) in CHANNELS.items()
    }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "Switchboard event stream",
            "version": f"{SCHEMA_MAJOR}",
            "description": (
                "Every event Switchboard publishes on Kafka, as CloudEvents 1.0 in binary "
                "mode. Delivery is at least once: de-duplicate on ce_id."
            ),
        },
        "defaultContentType": CONTENT_TYPE,
        "servers": {
            "kafka": {
                "host": "localhost:9092",
                "protocol": "kafka",
                "description": "Your Kafka cluster (SWITCHBOARD_KAFKA_BOOTSTRAP).",
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": schemas},
    }


def yaml_text() -> str:
    import yaml  # noqa: PLC0415 - only the export needs it

    text: str = yaml.safe_dump(document(), sort_keys=False, allow_unicode=True, width=100)
    return "# Generated by `switchboard schema export`; do not edit.\n" + text
