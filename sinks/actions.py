"""What an agent does to the queue, for the API and the page alike: mark a
conversation, reassign a customer, merge or unmerge, dismiss a suggestion. Each
is an event (published first, or recorded in the router's outbox), then applied
to the read model here so the agent sees it at once. Errors are HTTP errors with
the status the API answers (the page shows their detail)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Literal, Protocol
from uuid import UUID

from fastapi.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from normalize.schema import ContactEvent, ContactEventKind, ConversationStatus
from sinks.queue import NotFound, QueueStore
from switchboard.consumer import is_outage
from switchboard.events import (
    TYPE_CONVERSATION_STATUS,
    Event,
    contact_event_type,
    new_event_id,
)
from switchboard.kafka import Publisher, PublishError
from switchboard.topics import CONTACTS, ROUTED

log = logging.getLogger(__name__)


class ContactDirectory(Protocol):
    """The router's contact directory, for an agent's reassign, merge and unmerge.
    The application package hands one in (a sink never imports the router). Raises
    LookupError for an unknown contact or owner, ValueError when the action cannot
    be done as asked; returns the recorded event, pending until
    :meth:`mark_published`."""

    def assign(self, contact_id: UUID, owner: str, *, by: str | None = None) -> Event: ...

    def merge(self, contact_id: UUID, other_id: UUID, *, by: str | None = None) -> Event: ...

    def unmerge(self, contact_id: UUID, merged_id: UUID, *, by: str | None = None) -> Event: ...

    def mark_published(self, event_ids: Sequence[str]) -> None: ...


class QueueActions:
    def __init__(
        self,
        store: QueueStore,
        publisher: Publisher | None,
        directory: ContactDirectory | None = None,
    ) -> None:
        self.store = store
        self.publisher = publisher
        self.directory = directory

    async def _publish(self, topic: str, event: Event) -> None:
        """An agent's change goes on the topics first, so a rebuild keeps it."""
        if self.publisher is None:
            return
        try:
            await self.publisher.apublish(topic, event)
        except PublishError as exc:
            raise HTTPException(
                503, "the change could not be stored; retry", headers={"Retry-After": "5"}
            ) from exc

    async def status(
        self, conversation_id: UUID, status: Literal["open", "waiting", "closed"], by: str
    ) -> dict[str, Any]:
        """Publish ``conversation.status`` (so a rebuild keeps it), then apply it here."""
        try:
            contact_id = self.store.conversation_contact(conversation_id)
        except NotFound as exc:
            raise HTTPException(404, f"no conversation {conversation_id}") from exc
        event_id = new_event_id()
        data = ConversationStatus(
            event_id=UUID(event_id),
            conversation_id=conversation_id,
            contact_id=contact_id,
            status=status,
            changed_by=by,
            occurred_at=datetime.now(UTC),
        )
        event = Event(
            type=TYPE_CONVERSATION_STATUS,
            source="switchboard/queue",
            key=str(contact_id),
            data=data,
            id=event_id,
        )
        await self._publish(ROUTED, event)
        await run_in_threadpool(self.store.apply, event.type, event.id, event.value())
        return self.store.conversation(conversation_id)

    async def dismiss(self, suggestion_id: UUID, by: str) -> dict[str, Any]:
        try:
            contact_id, other = self.store.suggestion(suggestion_id)
        except NotFound as exc:
            raise HTTPException(404, f"no merge suggestion {suggestion_id}") from exc
        event_id = new_event_id()
        data = ContactEvent(
            event_id=UUID(event_id),
            kind=ContactEventKind.MERGE_DISMISSED,
            contact_id=contact_id,
            other_contact_id=other,
            suggestion_id=suggestion_id,
            by=by,
            occurred_at=datetime.now(UTC),
        )
        # Keyed like the suggestion, so it is applied after it, in a rebuild too.
        event = Event(
            type=contact_event_type(ContactEventKind.MERGE_DISMISSED),
            source="switchboard/queue",
            key=str(contact_id),
            data=data,
            id=event_id,
        )
        await self._publish(CONTACTS, event)
        await run_in_threadpool(self.store.apply, event.type, event.id, event.value())
        return {"id": str(suggestion_id), "dismissed": True, "by": by}

    async def _recorded(self, event: Event) -> bool:
        """A directory event: published now, or by the router's relay if Kafka is
        away (False); the read model shows it at once either way."""
        directory = self._directory()
        published = True
        if self.publisher is not None:
            try:
                await self.publisher.apublish(CONTACTS, event)
                await run_in_threadpool(directory.mark_published, [event.id])
            except PublishError as exc:
                published = False
                log.warning(
                    "an agent's contact change is recorded, not yet published",
                    extra={"event_id": event.id, "error": str(exc)},
                )
        await run_in_threadpool(self.store.apply, event.type, event.id, event.value())
        return published

    def _directory(self) -> ContactDirectory:
        if self.directory is None:
            raise HTTPException(503, "this process has no access to the contact directory")
        return self.directory

    async def contact_change(
        self, action: str, contact_id: UUID, other_id: UUID, by: str
    ) -> tuple[dict[str, Any], bool]:
        """merge: ``other_id`` into ``contact_id``; unmerge: ``other_id`` back out."""
        directory = self._directory()
        act = directory.merge if action == "merge" else directory.unmerge
        try:
            event = await run_in_threadpool(act, contact_id, other_id, by=by)
        except LookupError as exc:
            raise HTTPException(404, f"no contact {exc}") from exc
        except ValueError as exc:
            raise HTTPException(409, str(exc)) from exc
        except Exception as exc:
            if not is_outage(exc):
                raise
            raise HTTPException(
                503, "the contact directory is unavailable; retry", headers={"Retry-After": "5"}
            ) from exc
        published = await self._recorded(event)
        shown = contact_id if action == "merge" else other_id
        return {
            "contact_id": str(contact_id),
            "event_id": event.id,
            "type": event.type,
            "published": published,
            "by": by,
            "contact": await run_in_threadpool(self.store.contact, shown),
        }, published

    def owners(self) -> list[str]:
        """Who may own a contact: the configured teams and agents."""
        teams = self.store.teams
        return sorted({*teams, *(a for agents in teams.values() for a in agents)})

    async def reassign(self, contact_id: UUID, owner: str, by: str) -> tuple[dict[str, Any], bool]:
        """As ``switchboard contacts assign``: a configured agent or team, the
        contact followed to its survivor, ``owner.assigned`` recorded and published."""
        directory = self._directory()
        if owner not in self.owners():
            raise HTTPException(422, f"{owner!r} is not an agent or team of the configuration")
        try:
            event = await run_in_threadpool(directory.assign, contact_id, owner, by=by)
        except LookupError as exc:
            raise HTTPException(404, f"no contact {contact_id}") from exc
        except Exception as exc:
            if not is_outage(exc):
                raise
            raise HTTPException(
                503, "the contact directory is unavailable; retry", headers={"Retry-After": "5"}
            ) from exc
        log.info(
            "contact reassigned",
            extra={"contact_id": str(contact_id), "owner": owner, "by": by, "event_id": event.id},
        )
        published = await self._recorded(event)
        return {
            "contact_id": event.key,
            "owner": owner,
            "event_id": event.id,
            "type": event.type,
            "published": published,
            "by": by,
            "contact": await run_in_threadpool(self.store.contact, contact_id),
        }, published
