"""The queue's HTTP face: ``/api/...`` for tools and ``/queue`` for agents.

Authentication: ``Authorization: Bearer <SWITCHBOARD_API_TOKEN>`` (or, for the
page, the same token in an HttpOnly cookie set by ``/queue/login``). Without a
configured token the API answers loopback clients only, and says so.

The page shows customer HTML only in its sanitized form, inside a sandboxed
frame without scripts, under a Content-Security-Policy that allows no script at
all: nothing a customer writes can run in the agent's browser.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal
from uuid import UUID

from fastapi import APIRouter, Depends, FastAPI, Form, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from normalize.schema import ConversationStatus
from sinks.queue import BadCursor, NotFound, QueueStore
from switchboard.blobs import BlobStore
from switchboard.events import TYPE_CONVERSATION_STATUS, Event, new_event_id
from switchboard.http import problem
from switchboard.kafka import Publisher, PublishError
from switchboard.topics import ROUTED

log = logging.getLogger(__name__)

COOKIE = "switchboard_token"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# No script anywhere; frames only from this document (srcdoc); styles inline.
CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
    "frame-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
_templates = Environment(
    loader=FileSystemLoader(Path(__file__).with_name("templates")),
    autoescape=select_autoescape(["html"]),
)


class StatusChange(BaseModel):
    status: Literal["open", "waiting", "closed"]
    changed_by: str | None = None


class _Denied(Exception):
    def __init__(self, status: int, detail: str) -> None:
        self.status = status
        self.detail = detail


def _loopback(request: Request) -> bool:
    host = request.client.host if request.client else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Access:
    """The bearer token, or loopback-only without one."""

    def __init__(self, token: str | None) -> None:
        self.token = token
        if token is None:
            log.warning(
                "SWITCHBOARD_API_TOKEN is not set: the queue API answers loopback clients only"
            )

    def authorize(self, request: Request) -> None:
        token = self.token
        if token is None:
            if not _loopback(request):
                raise _Denied(
                    403, "no API token is configured: set SWITCHBOARD_API_TOKEN to allow remote use"
                )
            return
        given = request.headers.get("authorization", "")
        bearer = given[7:] if given.lower().startswith("bearer ") else ""
        supplied = bearer or request.cookies.get(COOKIE, "")
        if not supplied or not hmac.compare_digest(supplied.encode(), token.encode()):
            raise _Denied(401, "a valid bearer token is required")

    def valid(self, supplied: str) -> bool:
        return self.token is not None and hmac.compare_digest(
            supplied.encode(), self.token.encode()
        )


def queue_router(
    store: QueueStore,
    blobs: BlobStore,
    publisher: Publisher | None,
    token: str | None,
) -> APIRouter:
    """The /api and /queue routes over a queue store."""
    access = Access(token)
    router = APIRouter()
    router.include_router(_api_routes(store, blobs, publisher, access))
    router.include_router(_page_routes(store, publisher, access))
    return router


def _api_routes(
    store: QueueStore, blobs: BlobStore, publisher: Publisher | None, access: Access
) -> APIRouter:
    api = APIRouter(prefix="/api", tags=["queue"], dependencies=[Depends(access.authorize)])

    @api.get("/queue", summary="Open conversations of an owner, oldest waiting first")
    def get_queue(
        owner: Annotated[str, Query(min_length=1, max_length=128)],
        status: Annotated[Literal["open", "waiting", "closed", "all"], Query()] = "open",
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
        cursor: Annotated[str | None, Query(max_length=1000)] = None,
    ) -> dict[str, Any]:
        try:
            page = store.queue(owner, status=status, limit=limit, cursor=cursor)
        except BadCursor as exc:
            raise StarletteHTTPException(422, str(exc)) from exc
        return {"owner": owner, "items": page.items, "next_cursor": page.next_cursor}

    @api.get("/conversations/{conversation_id}", summary="A conversation with all its messages")
    def get_conversation(conversation_id: UUID) -> dict[str, Any]:
        try:
            return store.conversation(conversation_id)
        except NotFound as exc:
            raise StarletteHTTPException(404, f"no conversation {conversation_id}") from exc

    @api.post(
        "/conversations/{conversation_id}/status",
        summary="Mark a conversation open, waiting on the customer, or closed",
    )
    async def set_status(conversation_id: UUID, change: StatusChange) -> dict[str, Any]:
        return await _change_status(store, publisher, conversation_id, change)

    @api.get("/contacts", summary="Look a contact up by identity, e.g. email:ann@example.com")
    def find_contact(
        identity: Annotated[str, Query(pattern=r"^(email|phone|external):.+", max_length=400)],
    ) -> dict[str, Any]:
        try:
            return store.contact_by_identity(identity)
        except NotFound as exc:
            raise StarletteHTTPException(404, f"no contact with identity {identity}") from exc

    @api.get("/contacts/{contact_id}", summary="A contact (merged ids answer with the survivor)")
    def get_contact(contact_id: UUID) -> dict[str, Any]:
        try:
            return store.contact(contact_id)
        except NotFound as exc:
            raise StarletteHTTPException(404, f"no contact {contact_id}") from exc

    @api.get("/attachments/{sha256}", summary="An attachment, as a download")
    def get_attachment(sha256: str) -> Response:
        if not _SHA256.match(sha256):
            raise StarletteHTTPException(422, "sha256 must be 64 lower-case hex digits")
        recorded = store.attachment(sha256)
        if recorded is None or not blobs.exists(sha256):
            raise StarletteHTTPException(404, f"no attachment {sha256}")
        name = re.sub(r"[^A-Za-z0-9._ -]", "_", recorded.get("filename") or sha256)[:200]
        return Response(
            blobs.get(sha256),
            media_type=recorded.get("content_type") or "application/octet-stream",
            headers={
                "Content-Disposition": f'attachment; filename="{name}"',
                "X-Content-Type-Options": "nosniff",
                "Content-Security-Policy": "default-src 'none'; sandbox",
            },
        )

    return api


def _page_routes(store: QueueStore, publisher: Publisher | None, access: Access) -> APIRouter:
    router = APIRouter()

    def page(name: str, **context: Any) -> HTMLResponse:  # noqa: ANN401 - template values
        html = _templates.get_template(name).render(**context)
        return HTMLResponse(
            html,
            headers={
                "Content-Security-Policy": CSP,
                "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer",
            },
        )

    def page_auth(request: Request) -> HTMLResponse | None:
        try:
            access.authorize(request)
        except _Denied as exc:
            if exc.status == 401:
                return page("login.html", error=None)
            return page("denied.html", detail=exc.detail)
        return None

    @router.get("/queue", include_in_schema=False)
    def queue_page(request: Request, owner: str | None = None, status: str = "open") -> Response:
        if (denied := page_auth(request)) is not None:
            return denied
        status = status if status in ("open", "waiting", "closed", "all") else "open"
        items = store.queue(owner, status=status, limit=200).items if owner else []
        return page("queue.html", owners=store.owners(), owner=owner, status=status, items=items)

    @router.get("/queue/conversations/{conversation_id}", include_in_schema=False)
    def conversation_page(request: Request, conversation_id: UUID) -> Response:
        if (denied := page_auth(request)) is not None:
            return denied
        try:
            conversation = store.conversation(conversation_id)
        except NotFound:
            return page("denied.html", detail=f"no conversation {conversation_id}")
        return page("conversation.html", c=conversation)

    @router.post("/queue/conversations/{conversation_id}/status", include_in_schema=False)
    async def conversation_status_form(
        request: Request,
        conversation_id: UUID,
        status: Annotated[Literal["open", "waiting", "closed"], Form()],
    ) -> Response:
        if (denied := page_auth(request)) is not None:
            return denied
        await _change_status(store, publisher, conversation_id, StatusChange(status=status))
        return RedirectResponse(f"/queue/conversations/{conversation_id}", status_code=303)

    @router.post("/queue/login", include_in_schema=False)
    def login(token_field: Annotated[str, Form(alias="token")]) -> Response:
        if not access.valid(token_field):
            return page("login.html", error="That token is not valid.")
        response = RedirectResponse("/queue", status_code=303)
        response.set_cookie(COOKIE, token_field, httponly=True, samesite="strict")
        return response

    return router


async def _change_status(
    store: QueueStore, publisher: Publisher | None, conversation_id: UUID, change: StatusChange
) -> dict[str, Any]:
    """Publish ``conversation.status`` (so a rebuild keeps it), then apply it here."""
    try:
        contact_id = store.conversation_contact(conversation_id)
    except NotFound as exc:
        raise StarletteHTTPException(404, f"no conversation {conversation_id}") from exc
    event_id = new_event_id()
    data = ConversationStatus(
        event_id=UUID(event_id),
        conversation_id=conversation_id,
        contact_id=contact_id,
        status=change.status,
        changed_by=change.changed_by,
        occurred_at=datetime.now(UTC),
    )
    event = Event(
        type=TYPE_CONVERSATION_STATUS,
        source="switchboard/queue",
        key=str(contact_id),
        data=data,
        id=event_id,
    )
    if publisher is not None:
        try:
            await publisher.apublish(ROUTED, event)
        except PublishError as exc:
            raise StarletteHTTPException(
                503, "the change could not be stored; retry", headers={"Retry-After": "5"}
            ) from exc
    store.apply(event.type, event.id, event.value())
    return store.conversation(conversation_id)


def install_denied_handler(app: FastAPI) -> None:
    """401/403 from the API's authorization as problem+json."""

    @app.exception_handler(_Denied)
    async def denied(_request: Request, exc: _Denied) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        title = "Unauthorized" if exc.status == 401 else "Forbidden"
        return problem(exc.status, title, exc.detail, headers=headers)
