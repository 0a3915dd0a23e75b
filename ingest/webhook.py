"""Generic web hooks: one route per configured hook, ``POST /webhooks/{name}``.

Each request is bounded (size, rate), authenticated (HMAC-SHA256 or bearer),
parsed (JSON or form), mapped onto the schema by dotted paths and answered
``202`` only once durable. Every refusal is ``application/problem+json`` with
a title and a detail the integrating team can act on.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import time
from datetime import UTC, datetime
from urllib.parse import parse_qsl

import uuid6
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from ingest.errors import RetryLater
from ingest.handoff import HandOff
from normalize.content import Blob
from normalize.errors import NormalizeError
from normalize.webhook import WebhookContext, normalize_webhook
from switchboard.http import counted, problem, read_body, unavailable
from switchboard.settings import BearerAuth, HmacAuth, Settings, WebhookSettings

log = logging.getLogger(__name__)

JSON = "application/json"
FORM = "application/x-www-form-urlencoded"


class TokenBucket:
    """``rate`` requests per second sustained, ``burst`` at once."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.capacity = float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def take(self) -> float:
        """0 if allowed, else the seconds until a request would be."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class AuthError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def check_auth(hook: WebhookSettings, request: Request, body: bytes) -> None:
    """Raise AuthError(401) for missing credentials, AuthError(403) for wrong ones."""
    auth = hook.auth
    if isinstance(auth, BearerAuth):
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise AuthError(401, "missing 'Authorization: Bearer <token>'")
        # Resolved from token_env at load; an unresolved one can never match.
        expected_token = auth.token.get_secret_value() if auth.token else ""
        if not expected_token or not hmac.compare_digest(token.encode(), expected_token.encode()):
            raise AuthError(403, "the bearer token is not valid for this hook")
    elif isinstance(auth, HmacAuth):
        signature = request.headers.get(auth.header)
        if not signature:
            raise AuthError(401, f"missing signature header {auth.header}")
        signed = body
        if auth.timestamp_header:
            stamp = request.headers.get(auth.timestamp_header, "")
            if not stamp.isdigit():
                raise AuthError(401, f"missing or non-numeric {auth.timestamp_header}")
            if abs(time.time() - int(stamp)) > auth.tolerance_s:
                raise AuthError(401, f"{auth.timestamp_header} is outside the accepted window")
            signed = stamp.encode() + b"." + body
        if auth.secret is None:  # resolved from secret_env at load
            raise AuthError(403, "this hook has no secret configured")
        expected = (
            auth.prefix
            + hmac.new(auth.secret.get_secret_value().encode(), signed, hashlib.sha256).hexdigest()
        )
        if not hmac.compare_digest(signature.strip().encode(), expected.encode()):
            raise AuthError(403, f"{auth.header} does not match the body")


def _content_kind(request: Request) -> str | None:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media == JSON or (media.startswith("application/") and media.endswith("+json")):
        return "json"
    if media == FORM:
        return "form"
    return None


def _finite_float(text: str) -> float:
    # Python reads 1e999999 as inf; no sender means that, and "inf" in a
    # customer's message would be a silent corruption.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number out of range: {text[:40]}")
    return value


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def parse_payload(kind: str, body: bytes) -> dict[str, object]:
    """The payload as an object; NormalizeError('malformed') for anything else."""
    if kind == "form":
        try:
            return dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True))
        except UnicodeDecodeError as exc:
            raise NormalizeError("malformed", "the form is not UTF-8") from exc
    try:
        payload = json.loads(body, parse_float=_finite_float, parse_constant=_no_constant)
    except RecursionError as exc:
        raise NormalizeError("malformed", "the JSON is nested too deeply") from exc
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, huge integers
        raise NormalizeError("malformed", f"the body is not valid JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise NormalizeError("malformed", "the JSON body must be an object")
    return payload


class WebhookAdapter:
    """All configured generic hooks."""

    name = "webhook"
    summary = "Generic web hooks: [[webhooks]] in the config, each at POST /webhooks/<name>"
    settings_class = WebhookSettings

    @staticmethod
    def enabled_in(settings: Settings) -> bool:
        return bool(settings.webhooks)

    def __init__(self, hooks: list[WebhookSettings], handoff: HandOff) -> None:
        self.hooks = {hook.name: hook for hook in hooks}
        self.handoff = handoff
        self._buckets = {hook.name: TokenBucket(hook.rate_per_s, hook.burst) for hook in hooks}

    def router(self) -> APIRouter:
        router = APIRouter(tags=["webhooks"])
        for hook in self.hooks.values():
            router.add_api_route(
                f"/webhooks/{hook.name}",
                self._endpoint(hook),
                methods=["POST"],
                name=f"webhook_{hook.name}",
                summary=f"Web hook '{hook.name}'",
                description=self._describe(hook),
                status_code=202,
                responses={
                    202: {"description": "Durable: `{id, dedupe_key}`"},
                    400: {"description": "Malformed body or no identity"},
                    401: {"description": "Missing credentials"},
                    403: {"description": "Wrong credentials"},
                    413: {"description": f"Body over {hook.max_body_bytes} bytes"},
                    415: {"description": "Unsupported content type"},
                    429: {"description": "Rate limit; see Retry-After"},
                    503: {"description": "Not durable; retry after Retry-After"},
                },
            )

        async def unknown(name: str) -> Response:
            return problem(404, "Not Found", f"no web hook named {name!r} is configured")

        router.add_api_route("/webhooks/{name}", unknown, methods=["POST"], include_in_schema=False)
        return router

    @staticmethod
    def _describe(hook: WebhookSettings) -> str:
        mapping = ", ".join(
            f"{k} <- `{v}`" for k, v in hook.map.model_dump(exclude_defaults=True).items()
        )
        types = " or ".join({"json": JSON, "form": FORM}[c] for c in hook.content_types)
        return (
            f"Accepts {types}; authentication: {hook.auth.kind}; mapping: {mapping}. "
            "Dedupe key: the Idempotency-Key header, else the mapped id, else a "
            "fingerprint of the payload."
        )

    def _endpoint(self, hook: WebhookSettings):  # type: ignore[no-untyped-def]  # noqa: ANN202
        async def endpoint(request: Request) -> Response:
            return await self.receive(hook, request)

        return endpoint

    async def receive(self, hook: WebhookSettings, request: Request) -> Response:
        return await counted(f"webhook:{hook.name}", self._receive(hook, request))

    async def _receive(self, hook: WebhookSettings, request: Request) -> Response:
        wait = self._buckets[hook.name].take()
        if wait:
            retry = str(max(1, round(wait)))
            return problem(
                429,
                "Too many requests",
                f"hook {hook.name!r} is over its rate limit",
                headers={"Retry-After": retry},
            )
        kind = _content_kind(request)
        if kind is None or kind not in hook.content_types:
            accepted = ", ".join({"json": JSON, "form": FORM}[c] for c in hook.content_types)
            return problem(415, "Unsupported media type", f"this hook accepts {accepted}")
        body = await read_body(request, hook.max_body_bytes)
        try:
            check_auth(hook, request, body)
        except AuthError as exc:
            headers = {"WWW-Authenticate": "Bearer"} if isinstance(hook.auth, BearerAuth) else None
            title = "Unauthorized" if exc.status == 401 else "Forbidden"
            return problem(exc.status, title, exc.detail, headers=headers)
        message_id = uuid6.uuid7()
        try:
            payload = parse_payload(kind, body)
            normalized = normalize_webhook(
                payload,
                WebhookContext(
                    hook=hook.name,
                    message_id=message_id,
                    received_at=datetime.now(UTC),
                    raw=Blob.of(body, JSON if kind == "json" else FORM),
                    fields=hook.map,
                    channel=hook.channel,
                    external_namespace=hook.external_namespace,
                    default_region=hook.default_region,
                    idempotency_key=request.headers.get("idempotency-key"),
                ),
            )
        except NormalizeError as exc:
            return problem(400, "Bad request", exc.detail, reason=exc.reason)
        try:
            await self.handoff.deliver(normalized)
        except RetryLater as exc:
            return unavailable(exc.retry_after_s)
        return JSONResponse(
            {"id": str(message_id), "dedupe_key": normalized.message.dedupe_key}, status_code=202
        )
