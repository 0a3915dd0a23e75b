"""The agents' page, ``/queue``: sign in, my queue of customers, the customer card,
search. Server-rendered (Jinja2, autoescaped), no script of its own.

The page shows customer HTML only in its sanitized form, inside a sandboxed frame
without scripts, under a Content-Security-Policy that allows no script at all:
nothing a customer writes can run in the agent's browser. Every form that changes
state carries the session's CSRF token and must come from our own origin.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlsplit
from uuid import UUID

import phonenumbers
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException

from normalize.email import sanitize_html
from sinks.actions import QueueActions
from sinks.auth import CSRF_FIELD, Access, Denied, Principal, account_of
from sinks.queue import BadCursor, NotFound, QueueStore

# The page's forms have a few short fields (a token, a status, an owner): anything
# past these is not the page talking. Starlette's defaults are 1,000 fields of 1 MB.
PAGE_FORM_MAX_FIELDS = 8
PAGE_FORM_MAX_FIELD_BYTES = 4096
# No script anywhere; frames only from this document (srcdoc); styles inline.
CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
    "frame-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
STATUSES = ("open", "waiting", "closed", "all")
_templates = Environment(
    loader=FileSystemLoader(Path(__file__).with_name("templates")),
    autoescape=select_autoescape(["html"]),
)
# Bidirectional overrides, embeddings, isolates and marks: "invoice<U+202E>fdp.exe"
# displays as "invoiceexe.pdf". On the page they are shown as what they are.
_BIDI = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def visible(value: object) -> str:
    """Text as the agent must see it: bidi controls made visible, e.g. ``[U+202E]``."""
    if value is None:
        return ""
    return _BIDI.sub(lambda m: f"[U+{ord(m.group()):04X}]", str(value))


def address_of(sender_key: str) -> str:
    """``email:carol@example.com`` -> ``carol@example.com``; ``phone:+14155550100``
    -> ``+1 415-555-0100`` (an extension kept)."""
    kind, _, value = sender_key.partition(":")
    if not value:
        return sender_key
    if kind == "phone":
        number, _, ext = value.partition(";ext=")
        try:
            shown = phonenumbers.format_number(
                phonenumbers.parse(number), phonenumbers.PhoneNumberFormat.INTERNATIONAL
            )
        except phonenumbers.NumberParseException:
            shown = number
        return f"{shown} ext. {ext}" if ext else shown
    return value


def looks_like_an_address(name: object) -> bool:
    """A display name that could pass for an address (``Carol <carol@x.example>``)."""
    return isinstance(name, str) and ("@" in name or "<" in name or ">" in name)


def when(value: str | None) -> str:
    """An ISO time as the page shows it: minutes, in UTC, labelled so (the page has
    no script to learn the viewer's time zone)."""
    if not value:
        return ""
    return datetime.fromisoformat(value).strftime("%Y-%m-%d %H:%M UTC")


def reply_link(message: dict[str, Any]) -> str | None:
    """The natural way back to where the customer wrote: ``mailto:`` with ``Re:``
    and the threading headers (RFC 6068 lets a mailto URI carry them; clients that
    know them thread the reply), ``sms:`` for a phone; nothing else. Switchboard
    itself sends nothing."""
    kind, _, value = str(message.get("sender", "")).partition(":")
    if message.get("flags", {}).get("bounce") or message.get("flags", {}).get("auto_reply"):
        return None
    if kind == "email" and value:
        subject = message.get("subject") or ""
        if subject and not subject.lower().startswith("re:"):
            subject = f"Re: {subject}"
        fields = []
        if subject:
            fields.append(f"subject={quote(subject, safe='')}")
        own = message.get("mail_message_id")
        if own:
            references = [*message.get("mail_references", []), own]
            fields.append(f"In-Reply-To={quote(f'<{own}>', safe='')}")
            fields.append(
                "References=" + quote(" ".join(f"<{r}>" for r in references[-10:]), safe="")
            )
        query = "?" + "&".join(fields) if fields else ""
        return f"mailto:{quote(value, safe='@+')}{query}"
    if kind == "phone" and value:
        return f"sms:{value.partition(';')[0]}"
    return None


#: What the card shows of one message's text (each of the new text and the quoted
#: history) and of its HTML: a message may hold 256 KB of each, and thirty of them
#: rendered whole were tens of megabytes of page. The whole message is one link
#: away (GET /api/messages/{id}).
CARD_TEXT = 20_000
CARD_HTML = 30_000
#: What each may take of the page, in bytes once escaped and encoded: a character the
#: page must escape (& < > " ') is an entity of four or five, so 20,000 quotation
#: marks were 100,000 bytes of page and thirty such messages 13.5 MB (review of
#: 2026-12-01); an emoji is four bytes of UTF-8.
CARD_TEXT_PAGE = 2 * CARD_TEXT
CARD_HTML_PAGE = 2 * CARD_HTML


def _escaped_len(text: str) -> int:
    """How many bytes of page ``text`` is once the template escapes it (markupsafe:
    ``&amp;``, ``&#34;``, ``&#39;`` add four characters, ``&lt;``, ``&gt;`` three)
    and the page is encoded (UTF-8)."""
    return (
        len(text.encode("utf-8", "surrogatepass"))
        + 4 * (text.count("&") + text.count('"') + text.count("'"))
        + 3 * (text.count("<") + text.count(">"))
    )


def _within(text: str, budget: int) -> str:
    """The longest start of ``text`` whose escaped size is at most ``budget``."""
    if _escaped_len(text) <= budget:
        return text
    low, high = 0, len(text)  # escaped_len(text[:low]) <= budget < escaped_len(text[:high])
    while high - low > 1:
        middle = (low + high) // 2
        if _escaped_len(text[:middle]) <= budget:
            low = middle
        else:
            high = middle
    return text[:low]


def clip(text: str | None) -> str:
    return _within((text or "")[:CARD_TEXT], CARD_TEXT_PAGE)


def clip_html(html: str) -> str:
    """The message's HTML, or a start of it sanitized again (so a cut tag or entity
    cannot leave the markup unbalanced): at most CARD_HTML characters, and at most
    CARD_HTML_PAGE once escaped into the frame's ``srcdoc``."""
    if len(html) <= CARD_HTML and _escaped_len(html) <= CARD_HTML_PAGE:
        return html
    cut = html[:CARD_HTML]
    while cut:
        shown = sanitize_html(cut) or ""
        size = _escaped_len(shown)
        if size <= CARD_HTML_PAGE:
            return shown
        # Sanitizing can lengthen what it keeps (a bare < becomes &lt;): cut again
        # in proportion, a little under, until it fits.
        cut = cut[: len(cut) * CARD_HTML_PAGE * 9 // (size * 10)]
    return ""


@dataclass(frozen=True)
class Shown:
    """What the card shows of one message's bodies, each clipped once per render
    (a long HTML body is sanitized again when clipped: not twice)."""

    text: str  # the new text (or the whole text when there is none)
    history: str  # the whole text, quoted history included
    html: str
    clipped: bool  # less than the whole message


def shown(message: dict[str, Any]) -> Shown:
    text, new = message.get("text") or "", message.get("text_new") or ""
    html = message.get("html") or ""
    history, new_shown = clip(text), clip(new)
    html_shown = clip_html(html)
    return Shown(
        text=new_shown if new else history,
        history=history,
        html=html_shown,
        clipped=len(history) < len(text) or len(new_shown) < len(new) or html_shown is not html,
    )


_templates.globals["shown"] = shown
_templates.filters["visible"] = visible
_templates.filters["address"] = address_of
_templates.filters["when"] = when
_templates.filters["reply_link"] = reply_link
_templates.tests["address_like"] = looks_like_an_address


def _page(name: str, status_code: int = 200, **context: Any) -> HTMLResponse:  # noqa: ANN401
    html = _templates.get_template(name).render(**context)
    return HTMLResponse(
        html,
        status_code=status_code,
        headers={
            "Content-Security-Policy": CSP,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "same-origin",
            "Cache-Control": "no-store",
        },
    )


async def _form(request: Request) -> FormData:
    """The page's form, parsed with the page's bounds (400 past them: Starlette
    answers too many fields or too large a field that way)."""
    return await request.form(
        max_files=0, max_fields=PAGE_FORM_MAX_FIELDS, max_part_size=PAGE_FORM_MAX_FIELD_BYTES
    )


def _field(form: FormData, name: str) -> str:
    value = form.get(name)
    if not isinstance(value, str):
        raise HTTPException(422, f"the form field {name!r} is missing")
    return value


def _contact_field(form: FormData) -> UUID:
    """The form's ``contact_id``, or 422."""
    try:
        return UUID(_field(form, "contact_id"))
    except ValueError as exc:
        raise HTTPException(422, "contact_id must be a contact id") from exc


class _Pages:
    """What every page route needs: who asks, rendering, the form checks."""

    def __init__(self, store: QueueStore, actions: QueueActions, access: Access) -> None:
        self.store = store
        self.actions = actions
        self.access = access

    def render(
        self,
        name: str,
        who: Principal,
        status_code: int = 200,
        **context: Any,  # noqa: ANN401
    ) -> HTMLResponse:
        csrf = who.session.csrf if who.session else ""
        return _page(name, status_code, me=who, csrf=csrf, **context)

    def signed_in(self, request: Request) -> Principal | Response:
        """The principal, or the page to show instead (sign-in, refusal)."""
        try:
            return self.access.principal(request)
        except Denied as exc:
            if exc.status == 401:
                # Back to this page once signed in: the sign-in led to /queue, and a
                # card's link sent by a colleague was lost (review, 2026-12-01).
                here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                return _page("login.html", error=None, me=None, csrf="", next=safe_next(here))
            return _page("denied.html", exc.status, detail=exc.detail, me=None, csrf="")

    async def posted(self, request: Request) -> tuple[Principal, FormData] | Response:
        """A state-changing form: from our origin, by someone, with their CSRF token."""
        try:
            self.access.check_origin(request)
            form = await _form(request)
            csrf = form.get(CSRF_FIELD)
            who = self.access.principal(request, csrf=csrf if isinstance(csrf, str) else "")
        except Denied as exc:
            return _page("denied.html", exc.status, detail=exc.detail, me=None, csrf="")
        return who, form

    async def acted(self, who: Principal, act: Callable[[], Awaitable[Any]], back: str) -> Response:
        """Run an action; back to the page, or its refusal shown."""
        try:
            await act()
        except HTTPException as exc:
            return self.render("denied.html", who, exc.status_code, detail=exc.detail)
        return RedirectResponse(back, status_code=303)


def page_routes(
    store: QueueStore,
    actions: QueueActions,
    access: Access,
    canonical: Callable[[str], list[str]],
) -> APIRouter:
    router = APIRouter(include_in_schema=False)
    pages = _Pages(store, actions, access)
    _reading_routes(router, pages, canonical)
    _action_routes(router, pages)
    _session_routes(router, pages)
    return router


def _reading_routes(
    router: APIRouter, pages: _Pages, canonical: Callable[[str], list[str]]
) -> None:
    store, actions, render, signed_in = pages.store, pages.actions, pages.render, pages.signed_in

    @router.get("/queue")
    def queue_page(
        request: Request,
        owner: str | None = None,
        status: str = "open",
        cursor: str | None = None,
    ) -> Response:
        who = signed_in(request)
        if isinstance(who, Response):
            return who
        status = status if status in STATUSES else "open"
        owner = owner or who.agent
        choices: dict[str, Any] = {
            "mine": who.agent,
            "teams": store.teams_of(who.agent) if who.agent else [],
            "all": actions.owners(),
        }
        if owner is None:
            return render("queue.html", who, owner=None, status=status, items=[], **choices)
        if not store.known_owner(owner):
            detail = f"no owner {owner!r}: not an agent or team of the configuration"
            return render("denied.html", who, 404, detail=detail)
        try:
            page = store.customers(owner, status=status, limit=50, cursor=cursor)
        except BadCursor:
            page = store.customers(owner, status=status, limit=50)
        return render(
            "queue.html",
            who,
            owner=owner,
            status=status,
            items=page.items,
            next_cursor=page.next_cursor,
            **choices,
        )

    @router.get("/queue/contacts/{contact_id}")
    def card_page(request: Request, contact_id: UUID) -> Response:
        who = signed_in(request)
        if isinstance(who, Response):
            return who
        before = request.query_params.get("before")
        raw = request.query_params.get("conversation")
        try:
            conversation = UUID(raw) if raw else None
        except ValueError:
            return render("denied.html", who, 422, detail="not a conversation id")
        try:
            card = store.card(contact_id, before=before, conversation=conversation)
        except NotFound:
            return render("denied.html", who, 404, detail=f"no such card for {contact_id}")
        except BadCursor:
            return render("denied.html", who, 422, detail="not a page of this card")
        # A merged contact's link shows its survivor's card, and says so (it did not).
        return render(
            "card.html", who, c=card, owners=actions.owners(), before=before, asked=str(contact_id)
        )

    @router.get("/queue/conversations/{conversation_id}")
    def conversation_page(request: Request, conversation_id: UUID) -> Response:
        """Old links: a conversation is a section of its customer's card."""
        who = signed_in(request)
        if isinstance(who, Response):
            return who
        try:
            contact = store.conversation_contact(conversation_id)
        except NotFound:
            return render("denied.html", who, 404, detail=f"no conversation {conversation_id}")
        return RedirectResponse(
            f"/queue/contacts/{contact}?conversation={conversation_id}#c-{conversation_id}",
            status_code=303,
        )

    @router.get("/queue/search")
    def search_page(request: Request, q: str = "") -> Response:
        who = signed_in(request)
        if isinstance(who, Response):
            return who
        q = q.strip()[:200]
        items = store.search(q, canonical(q)) if q else []
        return render("search.html", who, q=q, items=items)


def _action_routes(router: APIRouter, pages: _Pages) -> None:
    store, actions, render, posted, acted = (
        pages.store,
        pages.actions,
        pages.render,
        pages.posted,
        pages.acted,
    )

    @router.post("/queue/conversations/{conversation_id}/status")
    async def status_form(request: Request, conversation_id: UUID) -> Response:
        got = await posted(request)
        if isinstance(got, Response):
            return got
        who, form = got
        status = _field(form, "status")
        statuses: dict[str, Literal["open", "waiting", "closed"]] = {
            "open": "open",
            "waiting": "waiting",
            "closed": "closed",
        }
        if status not in statuses:
            raise HTTPException(422, "status must be open, waiting or closed")

        async def act() -> Any:  # noqa: ANN401
            return await actions.status(conversation_id, statuses[status], who.name)

        try:
            contact = store.conversation_contact(conversation_id)
        except NotFound:
            return render("denied.html", who, 404, detail=f"no conversation {conversation_id}")
        return await acted(who, act, f"/queue/contacts/{contact}#c-{conversation_id}")

    @router.post("/queue/contacts/{contact_id}/owner")
    async def owner_form(request: Request, contact_id: UUID) -> Response:
        got = await posted(request)
        if isinstance(got, Response):
            return got
        who, form = got
        owner = _field(form, "owner")

        async def act() -> Any:  # noqa: ANN401
            return await actions.reassign(contact_id, owner, who.name)

        return await acted(who, act, f"/queue/contacts/{contact_id}")

    @router.post("/queue/contacts/{contact_id}/{action}")
    async def merge_form(request: Request, contact_id: UUID, action: str) -> Response:
        if action not in ("merge", "unmerge"):
            raise HTTPException(404, "no such action")
        got = await posted(request)
        if isinstance(got, Response):
            return got
        who, form = got
        other = _contact_field(form)

        async def act() -> Any:  # noqa: ANN401
            return await actions.contact_change(action, contact_id, other, who.name)

        back = contact_id if action == "merge" else other
        return await acted(who, act, f"/queue/contacts/{back}")

    @router.post("/queue/merge-suggestions/{suggestion_id}/dismiss")
    async def dismiss_form(request: Request, suggestion_id: UUID) -> Response:
        got = await posted(request)
        if isinstance(got, Response):
            return got
        who, form = got
        contact = _contact_field(form)

        async def act() -> Any:  # noqa: ANN401
            return await actions.dismiss(suggestion_id, who.name)

        return await acted(who, act, f"/queue/contacts/{contact}")


# Password checks at once, per page: Argon2 (argon2-cffi's defaults) takes 64 MiB and
# tens of milliseconds of CPU a check. They run on threads (the C call lets go of the
# GIL), so the event loop serves everyone else meanwhile: a stranger's failed
# sign-ins ran on the loop and held every request of the server behind them
# (attacker review, 2026-11-30). The bound keeps a burst from taking 64 MiB per try.
# Two lanes of that many: one for browsers that prove they signed in as the account
# before (the device cookie, an HMAC checked without Argon2), one for everyone else,
# so strangers queueing failed guesses cannot keep an agent's own browser waiting.
SIGN_IN_CONCURRENCY = 2


def safe_next(value: object) -> str:
    """Where a sign-in goes back to: a page of the queue on this site, else /queue.
    Anything else (another site, ``//host``, a backslash, a scheme) would make the
    sign-in form an open redirect."""
    if not isinstance(value, str) or len(value) > 2000 or not value.isprintable():
        return "/queue"
    parts = urlsplit(value)
    if parts.scheme or parts.netloc or "\\" in value or value.startswith("//"):
        return "/queue"
    if parts.path != "/queue" and not parts.path.startswith("/queue/"):
        return "/queue"
    if parts.path == "/queue/login" or ".." in parts.path.split("/"):
        return "/queue"
    return value


def _session_routes(router: APIRouter, pages: _Pages) -> None:
    access, posted = pages.access, pages.posted
    strangers = asyncio.Semaphore(SIGN_IN_CONCURRENCY)
    known = asyncio.Semaphore(SIGN_IN_CONCURRENCY)

    @router.get("/queue/login")
    def login_page() -> Response:
        """The sign-in form is shown on any page of the queue to a stranger; its own
        address (where a failed sign-in leaves the browser) was a 405 in JSON."""
        return RedirectResponse("/queue", status_code=303)

    @router.post("/queue/login")
    async def login(request: Request) -> Response:
        back = "/queue"
        try:
            access.check_origin(request)
            form = await _form(request)
            back = safe_next(form.get("next"))
            name, password = _field(form, "name"), _field(form, "password")
            # The throttles are read inside sign_in, once a check's turn has come: a
            # burst waiting here is judged by the failures before it.
            device = await asyncio.to_thread(access.known_device, request, account_of(name))
            async with known if device is not None else strangers:
                session_id, session, device = await asyncio.to_thread(
                    access.sign_in_from, request, name, password, device
                )
        except Denied as exc:
            error = exc.detail if exc.status in (401, 429) else None
            if error is None:
                return _page("denied.html", exc.status, detail=exc.detail, me=None, csrf="")
            headers = {"Retry-After": str(int(exc.retry_after) + 1)} if exc.retry_after else {}
            refused = _page("login.html", exc.status, error=error, me=None, csrf="", next=back)
            refused.headers.update(headers)
            return refused
        response = RedirectResponse(back, status_code=303)
        access.set_cookie(response, session_id, session, device)
        return response

    @router.post("/queue/logout")
    async def logout(request: Request) -> Response:
        got = await posted(request)
        if isinstance(got, Response):
            return got
        response = RedirectResponse("/queue", status_code=303)
        access.sign_out(request, response)
        return response
