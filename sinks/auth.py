"""Who is asking: the admin token, an agent's personal token, or an agent's
sign-in session; and the checks a browser's state-changing request must pass.

- ``Authorization: Bearer <token>``: ``SWITCHBOARD_API_TOKEN`` is the admin (tools,
  integrations); an agent's personal token (``switchboard agents token``) is that
  agent.
- The page's cookie holds a random session id; the session (agent, CSRF token,
  expiry) is in the database. HttpOnly, SameSite=Lax, Secure when the public URL
  is https.
- A request authenticated by the cookie that changes state must come from our own
  origin (``Origin``, else ``Referer``) and carry the session's CSRF token.
- Without an admin token configured, loopback clients without a session are the
  admin, as before agents existed (a developer's ``make run``).
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import logging
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI, Request
from starlette.responses import Response

from sinks.agents import ADMIN, AgentStore, Session, Throttle
from switchboard.http import problem
from switchboard.limits import client_key

log = logging.getLogger(__name__)

SESSION_COOKIE = "switchboard_session"
#: Proof that a browser signed in as an account before (:meth:`Access.device_proof`),
#: sent only to the sign-in form; kept half a year.
DEVICE_COOKIE = "switchboard_device"
DEVICE_DAYS = 180
CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"
_SAFE = frozenset({"GET", "HEAD", "OPTIONS"})


class Denied(Exception):
    """401 (who are you?), 403 (not allowed), 429 (too many tries)."""

    def __init__(self, status: int, detail: str, retry_after: float | None = None) -> None:
        self.status = status
        self.detail = detail
        self.retry_after = retry_after


@dataclass(frozen=True)
class Principal:
    """The one the request acts for. ``agent`` is None for the admin."""

    agent: str | None
    via: str  # "token", "agent-token", "session", "loopback"
    session: Session | None = None

    @property
    def name(self) -> str:
        return self.agent or ADMIN

    @property
    def admin(self) -> bool:
        return self.agent is None


def _loopback(request: Request) -> bool:
    host = request.client.host if request.client else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _origin_of(url: str) -> str | None:
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        return None
    return f"{parts.scheme}://{parts.netloc}".lower()


def account_of(name: str) -> str:
    """The account a sign-in form's name means."""
    return name.strip().lower()[:128]


def _device_mac(key: str, account: str, device: str) -> str:
    message = f"device:{device}:".encode() + account.encode()
    return hmac.new(key.encode(), message, "sha256").hexdigest()


class Access:
    """Authenticates requests and guards sign-in and state changes."""

    def __init__(
        self,
        token: str | None,
        agents: AgentStore | None = None,
        *,
        public_url: str | None = None,
        login_failures_per_client: int = 20,
        login_failures_per_account: int = 5,
        login_window_s: float = 900.0,
    ) -> None:
        self.token = token
        self.agents = agents
        self.public_origin = _origin_of(public_url) if public_url else None
        self.secure_cookie = bool(public_url and public_url.lower().startswith("https:"))
        self.per_client = Throttle(login_failures_per_client, login_window_s)
        self.per_account = Throttle(login_failures_per_account, login_window_s)
        if token is None:
            log.warning(
                "SWITCHBOARD_API_TOKEN is not set: loopback clients without a session "
                "act as the admin; remote ones need an agent's session or token"
            )

    # -- who -------------------------------------------------------------------

    def _bearer(self, supplied: str) -> Principal:
        if self.token is not None and hmac.compare_digest(supplied.encode(), self.token.encode()):
            return Principal(None, "token")
        agent = self.agents.token_agent(supplied) if self.agents is not None else None
        if agent is None:
            raise Denied(401, "a valid bearer token is required")
        return Principal(agent, "agent-token")

    def session_of(self, request: Request) -> Session | None:
        cookie = request.cookies.get(SESSION_COOKIE, "")
        if not cookie or self.agents is None:
            return None
        return self.agents.session(cookie, admin_key=self.token)

    def principal(self, request: Request, *, csrf: str | None = None) -> Principal:
        """Who asks; for a state change by cookie, checked for origin and CSRF token
        (``csrf``: the page's form field; else the ``X-CSRF-Token`` header)."""
        given = request.headers.get("authorization", "")
        if given.lower().startswith("bearer "):
            return self._bearer(given[7:].strip())
        session = self.session_of(request)
        if session is not None:
            agent = None if session.agent == ADMIN else session.agent
            principal = Principal(agent, "session", session)
            if request.method not in _SAFE:
                # The API's own state changes by cookie: same origin and the token.
                self.check_origin(request)
                supplied = csrf if csrf is not None else request.headers.get(CSRF_HEADER, "")
                self.check_csrf(principal, supplied)
            return principal
        if self.token is None:
            if _loopback(request):
                return Principal(None, "loopback")
            raise Denied(
                403, "no API token is configured: set SWITCHBOARD_API_TOKEN to allow remote use"
            )
        raise Denied(401, "sign in, or send a valid bearer token")

    async def authorize(self, request: Request) -> Principal:
        """FastAPI dependency of a router: the principal (kept for :func:`current`),
        or :class:`Denied`."""
        principal = self.principal(request)
        request.state.principal = principal
        return principal

    # -- browser checks -----------------------------------------------------------

    def own_origins(self, request: Request) -> set[str]:
        host = request.headers.get("host", "")
        found = {f"{request.url.scheme}://{host}".lower()} if host else set()
        if self.public_origin:
            found.add(self.public_origin)
        return found

    def check_origin(self, request: Request) -> None:
        """A browser's state change must come from a page of ours: ``Origin`` (every
        current browser sends it on a POST), else ``Referer``; a request with neither
        is left to the CSRF token."""
        origin = request.headers.get("origin")
        if origin is None:
            referer = request.headers.get("referer")
            origin = _origin_of(referer) if referer else None
            if origin is None:
                return
        if origin.lower() not in self.own_origins(request):
            raise Denied(403, f"cross-origin request refused (from {origin[:100]})")

    @staticmethod
    def check_csrf(principal: Principal, supplied: str) -> None:
        session = principal.session
        if session is None:
            return  # a bearer token or loopback: no cookie a third party could ride
        if not supplied or not hmac.compare_digest(supplied.encode(), session.csrf.encode()):
            raise Denied(403, "the form's CSRF token is missing or stale; reload the page")

    # -- sign-in ------------------------------------------------------------------

    def sign_in(
        self, request: Request, name: str, password: str
    ) -> tuple[str, Session, str | None]:
        """Check a name and password (throttled per client and, for a browser that
        never signed in as this account, per account); a new session (its cookie
        value, the session) and the browser's proof that it signed in as the account
        (:meth:`device_proof`), or :class:`Denied`."""
        device = self.known_device(request, account_of(name))
        return self.sign_in_from(request, name, password, device)

    def sign_in_from(
        self, request: Request, name: str, password: str, device: str | None
    ) -> tuple[str, Session, str | None]:
        """:meth:`sign_in`, for a caller that already read the browser's
        :meth:`known_device` (the page, to choose the Argon2 lane)."""
        if self.agents is None:
            raise Denied(403, "this process has no agent directory")
        # An IPv6 client by its /64, as every other per-client limit (one customer's
        # line has all of it; per address was no limit).
        client = client_key(request.client.host) if request.client else "?"
        account = account_of(name)
        wait = self.per_client.retry_after(f"client:{client}")
        # An account's lock holds browsers that never signed in as it: a stranger
        # failing five times from five addresses locked the agent out everywhere
        # (review, 2026-12-01). The agent's own browser carries proof it did, and has
        # a count of its own (a copied device cookie is no unlimited pass).
        counted = f"account:{account}" if device is None else f"device:{account}:{device}"
        wait = max(wait, self.per_account.retry_after(counted))
        if wait:
            raise Denied(429, "too many failed sign-ins; try again later", retry_after=wait)
        if account == ADMIN:
            ok = self.token is not None and hmac.compare_digest(
                password.encode(), self.token.encode()
            )
        else:
            ok = self.agents.check_password(account, password)
        if not ok:
            self.per_client.failed(f"client:{client}")
            self.per_account.failed(counted)
            log.warning("failed sign-in", extra={"agent": account, "client": client})
            raise Denied(401, "That name and password do not match.")
        # The account's count is not cleared by a success: the agent signing in on
        # their own browser would hand a stranger guessing elsewhere a fresh budget.
        session_id, session = self.agents.start_session(account, admin_key=self.token)
        return session_id, session, self.device_proof(account, device)

    def _device_key(self, account: str) -> str | None:
        if account == ADMIN:
            return self.token
        return self.agents.password_hash(account) if self.agents is not None else None

    def device_proof(self, account: str, device: str | None = None) -> str | None:
        """What a browser that signed in as ``account`` keeps (the cookie
        ``switchboard_device``): the account (base64url: a name may hold any
        character, a header only Latin-1), the browser's own random id (``device``,
        new unless given), and an HMAC of both under a key only the server holds
        and that changes with the password (the stored Argon2 hash; the admin's: the
        API token). OWASP's "device cookie": the account's failure lock then stops
        strangers' browsers, not the agent's own."""
        key = self._device_key(account)
        if not key:
            return None
        device = device or secrets.token_urlsafe(12)
        name = base64.urlsafe_b64encode(account.encode()).decode().rstrip("=")
        return f"{name}.{device}.{_device_mac(key, account, device)}"

    def known_device(self, request: Request, account: str) -> str | None:
        """The id of this browser when it signed in as ``account`` before (with the
        password as it is now), else None."""
        name, _, rest = request.cookies.get(DEVICE_COOKIE, "").partition(".")
        device, _, mac = rest.partition(".")
        try:
            named = base64.urlsafe_b64decode(name + "=" * (-len(name) % 4)).decode()
        except (ValueError, UnicodeDecodeError):
            return None
        if named != account or not device or not mac:
            return None  # no look-up for a stranger's browser
        key = self._device_key(account)
        expected = _device_mac(key, account, device).encode() if key else b""
        if not expected or not hmac.compare_digest(mac.encode(), expected):
            return None
        return device

    def set_cookie(
        self, response: Response, session_id: str, session: Session, device: str | None = None
    ) -> None:
        response.set_cookie(
            SESSION_COOKIE,
            session_id,
            expires=session.expires_at,
            httponly=True,
            samesite="lax",
            secure=self.secure_cookie,
            path="/",
        )
        if device is not None:
            response.set_cookie(
                DEVICE_COOKIE,
                device,
                max_age=DEVICE_DAYS * 86400,
                httponly=True,
                samesite="lax",
                secure=self.secure_cookie,
                path="/queue/login",
            )

    def sign_out(self, request: Request, response: Response) -> None:
        cookie = request.cookies.get(SESSION_COOKIE, "")
        if cookie and self.agents is not None:
            self.agents.end_session(cookie)
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="lax")


def current(request: Request) -> Principal:
    """FastAPI dependency of a route: the principal its router's :meth:`Access.authorize`
    found."""
    principal = getattr(request.state, "principal", None)
    if not isinstance(principal, Principal):
        raise Denied(401, "sign in, or send a valid bearer token")
    return principal


#: A route's parameter: who asks.
Who = Annotated[Principal, Depends(current)]


def denied_response(exc: Denied) -> Response:
    headers: dict[str, str] = {}
    if exc.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if exc.retry_after:
        headers["Retry-After"] = str(int(exc.retry_after) + 1)
    titles = {401: "Unauthorized", 403: "Forbidden", 429: "Too Many Requests"}
    return problem(exc.status, titles.get(exc.status, "Error"), exc.detail, headers=headers)


class _Protected:
    """Pure ASGI (no body buffering, unlike BaseHTTPMiddleware): a principal is
    required for paths under these prefixes."""

    def __init__(self, app: Any, access: Access, prefixes: tuple[str, ...]) -> None:  # noqa: ANN401
        self.app = app
        self.access = access
        self.prefixes = prefixes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:  # noqa: ANN401
        if scope["type"] == "http" and scope["path"].startswith(self.prefixes):
            try:
                self.access.principal(Request(scope))
            except Denied as exc:
                await denied_response(exc)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def protect(app: FastAPI, access: Access, prefixes: Iterable[str]) -> None:
    """Require a principal for these paths (the API docs, operations pages)."""
    app.add_middleware(_Protected, access=access, prefixes=tuple(prefixes))
