"""The queue's HTTP API, ``/api/...``, for tools and for the page's agents.

Who asks (see :mod:`sinks.auth`): the admin token (``SWITCHBOARD_API_TOKEN``), an
agent's personal token, or an agent's sign-in session. Every action is recorded
as the agent who did it; only the admin token may name someone else (``by``,
``changed_by``), for integrations that act for an agent.

The page (``/queue``) lives in :mod:`sinks.pages`; what actions do, in
:mod:`sinks.actions`.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from typing import Annotated, Any, Literal
from urllib.parse import quote
from uuid import UUID

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sinks.actions import ContactDirectory, QueueActions
from sinks.agents import ADMIN
from sinks.auth import Access, Denied, Principal, Who, denied_response
from sinks.pages import page_routes
from sinks.queue import BadCursor, NotFound, QueueStore
from sinks.queue_read import MESSAGES_PAGE
from switchboard.blobs import BlobStore
from switchboard.kafka import Publisher

__all__ = ["Access", "ContactDirectory", "install_denied_handler", "queue_router"]

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# RFC 6838's type/subtype names (restricted-name), lower case, no parameters.
_MEDIA_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,126}/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}")


class StatusChange(BaseModel):
    status: Literal["open", "waiting", "closed"]
    changed_by: str | None = Field(
        default=None,
        max_length=128,
        pattern=r"^[^\x00-\x1f\x7f]*$",
        description="Only the admin token may name someone; an agent's change is theirs.",
    )


# Who did it, when the admin token acts for someone: never a control character (a
# NUL would stop PostgreSQL, a newline would forge a log line).
_AGENT = r"^[^\x00-\x1f\x7f]*$"


class Dismissal(BaseModel):
    by: str | None = Field(
        default=None, max_length=128, pattern=_AGENT, description="Who dismissed it (admin only)."
    )


class MergeRequest(BaseModel):
    model_config = {"extra": "forbid"}
    contact_id: UUID = Field(
        description="merge: the contact to merge in; unmerge: the one to restore."
    )
    by: str | None = Field(
        default=None, max_length=128, pattern=_AGENT, description="The agent (admin only)."
    )


class OwnerChange(BaseModel):
    model_config = {"extra": "forbid"}
    owner: str = Field(min_length=1, max_length=128, description="An agent or a team.")


def acting(principal: Principal, named: str | None) -> str:
    """Who an action is recorded as: the agent; the admin token may name someone."""
    if principal.agent is not None:
        return principal.agent
    return named or ADMIN


Canonical = Callable[[str], list[str]]


def queue_router(
    store: QueueStore,
    blobs: BlobStore,
    publisher: Publisher | None,
    access: Access | str | None,
    directory: ContactDirectory | None = None,
    *,
    canonical: Canonical | None = None,
) -> APIRouter:
    """The /api and /queue routes over a queue store. ``access`` is an
    :class:`Access`, or just the admin token (no agents). ``canonical`` turns what
    an agent typed into identity keys as ingest would (the application package
    knows the email policy and phone region)."""
    if not isinstance(access, Access):
        access = Access(access)
    canonical = canonical or _keys_as_typed
    actions = QueueActions(store, publisher, directory)
    router = APIRouter()
    router.include_router(_api_routes(store, blobs, actions, access, canonical))
    router.include_router(_merge_routes(actions, access))
    router.include_router(page_routes(store, actions, access, canonical))
    return router


#: How many messages one read of a card or a conversation returns: at most 50, as the
#: API does not clip texts and a message may hold 576 K characters of them (text,
#: new text, HTML), so a read stays under about 30 MB whatever strangers sent.
Limit = Annotated[int, Query(ge=1, le=50)]
#: The ``older`` cursor of the page after the one wanted.
Before = Annotated[str | None, Query(max_length=400)]


def _keys_as_typed(query: str) -> list[str]:
    query = query.strip()
    return [query] if query.split(":", 1)[0] in ("email", "phone", "external") else []


def _api_routes(
    store: QueueStore,
    blobs: BlobStore,
    actions: QueueActions,
    access: Access,
    canonical: Canonical,
) -> APIRouter:
    api = APIRouter(
        prefix="/api",
        tags=["queue"],
        dependencies=[Depends(access.authorize)],
    )

    @api.get("/me", summary="Who this request acts as, and the teams the agent is in")
    def me(who: Who) -> dict[str, Any]:
        return {
            "agent": who.agent,
            "admin": who.admin,
            "via": who.via,
            "teams": store.teams_of(who.agent) if who.agent else [],
        }

    @api.get(
        "/queue",
        summary="Customers with open work for an owner (default: the signed-in agent)",
    )
    def get_queue(
        who: Who,
        owner: Annotated[str | None, Query(min_length=1, max_length=128)] = None,
        status: Annotated[Literal["open", "waiting", "closed", "all"], Query()] = "open",
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
        cursor: Annotated[str | None, Query(max_length=1000)] = None,
    ) -> dict[str, Any]:
        owner = owner or who.agent
        if owner is None:
            raise StarletteHTTPException(
                422,
                "owner: the admin has no queue of its own; name an agent or a team: "
                f"?owner=<name> (teams: {', '.join(sorted(store.teams)) or 'none'})",
            )
        if not store.known_owner(owner):
            raise StarletteHTTPException(
                404, f"no owner {owner!r}: not an agent or team of the configuration"
            )
        try:
            page = store.customers(owner, status=status, limit=limit, cursor=cursor)
        except BadCursor as exc:
            raise StarletteHTTPException(422, str(exc)) from exc
        return {"owner": owner, "items": page.items, "next_cursor": page.next_cursor}

    @api.get("/search", summary="Customers by name, any identity, or words of their messages")
    def search(_who: Who, q: Annotated[str, Query(min_length=1, max_length=200)]) -> dict[str, Any]:
        return {"q": q, "items": store.search(q, canonical(q))}

    @api.get(
        "/conversations/{conversation_id}",
        summary="A conversation with its newest messages; `older` pages back",
    )
    def get_conversation(
        _who: Who, conversation_id: UUID, limit: Limit = MESSAGES_PAGE, before: Before = None
    ) -> dict[str, Any]:
        try:
            return store.conversation(conversation_id, limit=limit, before=before)
        except NotFound as exc:
            raise StarletteHTTPException(404, f"no conversation {conversation_id}") from exc
        except BadCursor as exc:
            raise StarletteHTTPException(422, str(exc)) from exc

    @api.get("/messages/{message_id}", summary="One message, whole (the card clips long texts)")
    def get_message(_who: Who, message_id: UUID) -> dict[str, Any]:
        try:
            return store.message(message_id)
        except NotFound as exc:
            raise StarletteHTTPException(404, f"no message {message_id}") from exc

    @api.post(
        "/conversations/{conversation_id}/status",
        summary="Mark a conversation open, waiting on the customer, or closed",
    )
    async def set_status(who: Who, conversation_id: UUID, change: StatusChange) -> dict[str, Any]:
        return await actions.status(conversation_id, change.status, acting(who, change.changed_by))

    @api.get(
        "/contacts",
        summary="Look a contact up by identity, e.g. email:ann@example.com (canonicalized)",
    )
    def find_contact(
        _who: Who,
        identity: Annotated[str, Query(pattern=r"^(email|phone|external):.+", max_length=400)],
    ) -> dict[str, Any]:
        for key in canonical(identity) or [identity]:
            try:
                return store.contact_by_identity(key)
            except NotFound:
                continue
        raise StarletteHTTPException(404, f"no contact with identity {identity}")

    @api.get("/contacts/{contact_id}", summary="A contact (merged ids answer with the survivor)")
    def get_contact(_who: Who, contact_id: UUID) -> dict[str, Any]:
        try:
            return store.contact(contact_id)
        except NotFound as exc:
            raise StarletteHTTPException(404, f"no contact {contact_id}") from exc

    @api.get(
        "/contacts/{contact_id}/card",
        summary="The customer card: the contact, its newest messages in their conversations "
        "(or in one, `conversation`); `older` pages back",
    )
    def get_card(
        _who: Who,
        contact_id: UUID,
        limit: Limit = MESSAGES_PAGE,
        before: Before = None,
        conversation: UUID | None = None,
    ) -> dict[str, Any]:
        # ``conversation``: only that conversation of the customer, as the page's
        # card shows it (the page took it, the API ignored it; review, 2026-12-01).
        try:
            return store.card(contact_id, limit=limit, before=before, conversation=conversation)
        except NotFound as exc:
            raise _no_card(contact_id, conversation) from exc
        except BadCursor as exc:
            raise StarletteHTTPException(422, str(exc)) from exc

    @api.post(
        "/merge-suggestions/{suggestion_id}/dismiss",
        summary="Dismiss a merge suggestion: the two contacts are different people",
        status_code=202,
    )
    async def dismiss(who: Who, suggestion_id: UUID, change: Dismissal) -> dict[str, Any]:
        return await actions.dismiss(suggestion_id, acting(who, change.by))

    @api.get(
        "/attachments/{sha256}",
        summary="An attachment, as a download: named and typed as `message` carried it",
    )
    def get_attachment(_who: Who, sha256: str, message: UUID | None = None) -> Response:
        if not _SHA256.match(sha256):
            raise StarletteHTTPException(422, "sha256 must be 64 lower-case hex digits")
        recorded = store.attachment(sha256, message)
        if recorded is None or not blobs.exists(sha256):
            raise StarletteHTTPException(404, f"no attachment {sha256}")
        disposition = _disposition(recorded.get("filename") or sha256)
        declared = str(recorded.get("content_type") or "").lower()
        return Response(
            blobs.get(sha256),
            # What the sender declared, when it is a media type at all: anything else
            # (an 8-bit byte, a parameter, a header break) made the answer a 500.
            media_type=declared if _MEDIA_TYPE.fullmatch(declared) else "application/octet-stream",
            headers={
                "Content-Disposition": disposition,
                "X-Content-Type-Options": "nosniff",
                "Content-Security-Policy": "default-src 'none'; sandbox",
                "Cache-Control": "no-store",
            },
        )

    return api


def _no_card(contact_id: UUID, conversation: UUID | None) -> StarletteHTTPException:
    if conversation is not None:
        return StarletteHTTPException(
            404, f"no conversation {conversation} of contact {contact_id}"
        )
    return StarletteHTTPException(404, f"no contact {contact_id}")


def _disposition(filename: str) -> str:
    """``attachment`` with the sender's file name: an ASCII ``filename`` (anything
    else an underscore) and, when the name is not ASCII, its UTF-8 form in
    ``filename*`` (RFC 6266), as browsers prefer: "Überweisung.pdf" downloaded as
    "_berweisung.pdf" (review, 2026-12-01). Controls, format characters (a bidi
    override turns "\u202etxt.exe" into "exe.txt" on screen) and path or quoting
    characters are dropped or replaced in both."""
    shown = "".join(ch for ch in filename if unicodedata.category(ch)[0] != "C")
    shown = re.sub(r'[\\/:*?"<>|]', "_", shown).strip()[:200] or "attachment"
    plain = re.sub(r"[^A-Za-z0-9._ -]", "_", shown)
    if shown.isascii():
        return f'attachment; filename="{plain}"'
    return f"attachment; filename=\"{plain}\"; filename*=UTF-8''{quote(shown, safe='')}"


def _merge_routes(actions: QueueActions, access: Access) -> APIRouter:
    """An agent confirms a merge, or undoes one (issue 17), or reassigns (issue 18)."""
    api = APIRouter(prefix="/api", tags=["contacts"], dependencies=[Depends(access.authorize)])

    @api.post(
        "/contacts/{contact_id}/merge",
        summary="Merge another contact into this one (an agent confirms: one person)",
    )
    async def merge(who: Who, contact_id: UUID, request: MergeRequest) -> Any:  # noqa: ANN401
        body, published = await actions.contact_change(
            "merge", contact_id, request.contact_id, acting(who, request.by)
        )
        return JSONResponse(body, status_code=200 if published else 202)

    @api.post(
        "/contacts/{contact_id}/unmerge",
        summary="Undo the merge of contact_id into this one: it lives again, with what is its",
    )
    async def unmerge(who: Who, contact_id: UUID, request: MergeRequest) -> Any:  # noqa: ANN401
        body, published = await actions.contact_change(
            "unmerge", contact_id, request.contact_id, acting(who, request.by)
        )
        return JSONResponse(body, status_code=200 if published else 202)

    @api.post(
        "/contacts/{contact_id}/owner",
        summary="Reassign a contact to an agent or team (as `switchboard contacts assign`)",
    )
    async def reassign(who: Who, contact_id: UUID, change: OwnerChange) -> Any:  # noqa: ANN401
        body, published = await actions.reassign(contact_id, change.owner, acting(who, None))
        return JSONResponse(body, status_code=200 if published else 202)

    return api


class _PrivateApi:
    """Every answer under /api (errors and the merge routes' own JSONResponse too):
    customer data, kept by no cache, read as the type it says it is. Pure ASGI."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/api/"):
            await self.app(scope, receive, send)
            return

        async def private(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["cache-control"] = "no-store"
                headers["x-content-type-options"] = "nosniff"
            await send(message)

        await self.app(scope, receive, private)


def install_denied_handler(app: FastAPI) -> None:
    """401/403/429 from authorization as problem+json; no-store on every /api answer."""
    app.add_middleware(_PrivateApi)

    @app.exception_handler(Denied)
    async def denied(_request: Request, exc: Denied) -> Response:
        return denied_response(exc)
