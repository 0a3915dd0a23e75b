"""Generic web hooks: one route per configured hook, ``POST /webhooks/{name}``.

Each request is bounded (size, rate), authenticated (HMAC-SHA256 or bearer),
parsed (JSON or form), mapped onto the schema by dotted paths and answered
``202`` only once durable. Every refusal is ``application/problem+json`` with
a title and a detail the integrating team can act on.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from ingest.errors import Rejected, RetryLater
from ingest.jsonbody import load_json
from ingest.ratelimit import TokenBucket
from ingest.sdk import (
    FORM,
    JSON,
    AdapterContext,
    AdapterTables,
    HttpAdapter,
    HttpRoute,
    InboundRequest,
    parse_form,
)
from ingest.settings import BearerAuth, HmacAuth, NoAuth, WebhookSettings, WebhooksSettings
from normalize.content import Blob, Normalized
from normalize.errors import NormalizeError
from normalize.schema import json_needs_no_stripping
from normalize.webhook import WebhookContext, normalize_webhook

log = logging.getLogger(__name__)

#: A hook body longer than this is parsed and mapped on a thread, off the event loop.
#: Forms and backends' events are a few KB. 16 KB of the costliest shape (small keys)
#: takes 1-5 ms of walks, 1 MB 0.1-0.3 s; the hop to a thread about 0.1 ms.
INLINE_PARSE_BYTES = 16 * 1024
#: Bytes of such bodies one hook holds for its parse thread at once (the one being
#: parsed included); past it, 503 with Retry-After. One body is always taken, however
#: large the hook allows.
MAX_LARGE_PARSE_BYTES = 4 * 1024 * 1024


@dataclass
class _LargeParses:
    """One hook's large bodies: parsed one at a time, at most MAX_LARGE_PARSE_BYTES
    held. Without the bound, strangers posting faster than the thread parses filled
    the process's body budget with queued documents (review, 2026-12-02)."""

    turn: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(1))
    held: int = 0


KINDS = {"json": JSON, "form": FORM}


def check_auth_headers(hook: WebhookSettings, headers: Mapping[str, str]) -> None:
    """Raise Rejected(401) for missing credentials, Rejected(403) for wrong ones, as far
    as the headers alone decide, before the body is read: a bearer token whole; for
    HMAC the signature's presence, its timestamp's window and a configured secret (the
    signature over the body is :func:`_check_hmac`'s, once the body is read)."""
    auth = hook.auth
    if isinstance(auth, HmacAuth):
        if not headers.get(auth.header):
            raise Rejected("signature", f"missing signature header {auth.header}", status=401)
        if auth.timestamp_header:
            stamp = headers.get(auth.timestamp_header, "")
            if not stamp.isdigit():
                raise Rejected(
                    "signature", f"missing or non-numeric {auth.timestamp_header}", status=401
                )
            if abs(time.time() - int(stamp)) > auth.tolerance_s:
                raise Rejected(
                    "stale", f"{auth.timestamp_header} is outside the accepted window", status=401
                )
        if auth.secret is None:  # resolved from secret_env at load
            raise Rejected("signature", "this hook has no secret configured", status=403)
    if isinstance(auth, BearerAuth):
        header = headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        challenge = {"WWW-Authenticate": "Bearer"}
        if scheme.lower() != "bearer" or not token:
            raise Rejected(
                "auth", "missing 'Authorization: Bearer <token>'", status=401, headers=challenge
            )
        # Resolved from token_env at load; an unresolved one can never match.
        expected_token = auth.token.get_secret_value() if auth.token else ""
        if not expected_token or not hmac.compare_digest(token.encode(), expected_token.encode()):
            raise Rejected(
                "auth", "the bearer token is not valid for this hook", status=403, headers=challenge
            )


def _check_hmac(auth: HmacAuth, request: InboundRequest) -> None:
    """The signature over the body; :func:`check_auth_headers` has passed (a signature
    header, a timestamp in its window, a secret)."""
    signature = request.headers.get(auth.header, "")
    stamp = request.headers.get(auth.timestamp_header, "") if auth.timestamp_header else ""
    if auth.secret is None:  # checked with the headers; here for the type checker
        raise Rejected("signature", "this hook has no secret configured", status=403)
    mac = hmac.new(auth.secret.get_secret_value().encode(), digestmod=hashlib.sha256)
    if auth.timestamp_header:
        mac.update(stamp.encode() + b".")
    for name in auth.signed_headers:
        mac.update(f"{name}:{request.headers.get(name, '')}\n".encode())
    mac.update(request.body)  # fed in pieces: the body is not copied
    expected = auth.prefix + mac.hexdigest()
    if not hmac.compare_digest(signature.strip().encode(), expected.encode()):
        raise Rejected("signature", f"{auth.header} does not match the body", status=403)


def trusted_idempotency_key(hook: WebhookSettings, request: InboundRequest) -> str | None:
    """The Idempotency-Key header, when the hook's authentication vouches for it.

    An HMAC hook vouches for its body and for the headers it lists in
    ``signed_headers`` only: a captured request re-sent with fresh keys must
    dedupe as one (the mapped id or the body's fingerprint). A bearer token's
    holder, and anyone at an ``auth = none`` hook, could send any body anyway, so
    those keep the header as before.
    """
    auth = hook.auth
    if isinstance(auth, HmacAuth) and not auth.signs("idempotency-key"):
        return None
    return request.headers.get("idempotency-key") or None


def parse_payload(
    kind: str, body: bytes, *, max_fields: int = 1000, max_field_bytes: int | None = None
) -> dict[str, object]:
    """The payload as an object; NormalizeError('malformed') for anything else,
    Rejected (413) for a form past its field count or field size."""
    if kind == "form":
        limit = max_field_bytes if max_field_bytes is not None else len(body)
        return dict(parse_form(body, max_fields=max_fields, max_field_bytes=limit))
    payload = load_json(body)
    if not isinstance(payload, dict):
        raise NormalizeError("malformed", "the JSON body must be an object")
    return payload


class WebhookAdapter(HttpAdapter[WebhooksSettings]):
    """All configured generic hooks, one route each."""

    name = "webhook"
    summary = "Generic web hooks: [[adapters.webhook.hooks]], each at POST /webhooks/<name>"
    settings_class = WebhooksSettings

    @classmethod
    def configured_in(cls, settings: AdapterTables) -> bool:
        return bool(cls.settings_from(settings).hooks)

    def __init__(self, settings: WebhooksSettings, context: AdapterContext) -> None:
        super().__init__(settings, context)
        self.hooks = {hook.name: hook for hook in settings.hooks}
        # Per hook: a partner's signed hook never waits behind a public form's strangers.
        self._large = {hook.name: _LargeParses() for hook in settings.hooks}
        # Each worker of a fleet takes its part of the hook's budget.
        self._buckets = {
            h.name: TokenBucket(context.share_rate(h.rate_per_s), context.share(h.burst))
            for h in settings.hooks
        }

    def routes(self) -> list[HttpRoute]:
        return [
            HttpRoute(
                f"/webhooks/{hook.name}",
                summary=f"Web hook '{hook.name}'",
                description=self._describe(hook),
                content_types=tuple(KINDS[c] for c in hook.content_types),
                max_body_bytes=hook.max_body_bytes,
                status_code=202,
                responses={
                    202: "Durable: `{id, dedupe_key}`",
                    400: "Malformed body or no identity",
                    401: "Missing credentials",
                    403: "Wrong credentials",
                    413: f"Body over {hook.max_body_bytes} bytes",
                    415: "Unsupported content type",
                    429: "Rate limit; see Retry-After",
                    503: "Not durable; retry after Retry-After",
                },
                metric=f"webhook:{hook.name}",
                options=hook,
                client_rate=hook.client_limits(),
                max_form_fields=hook.max_form_fields,
                max_field_bytes=hook.max_field_bytes,
            )
            for hook in self.hooks.values()
        ]

    @staticmethod
    def _describe(hook: WebhookSettings) -> str:
        mapping = ", ".join(
            f"{k} <- `{v}`" for k, v in hook.map.model_dump(exclude_defaults=True).items()
        )
        types = " or ".join(KINDS[c] for c in hook.content_types)
        return (
            f"Accepts {types}; authentication: {hook.auth.kind}; mapping: {mapping}. "
            "Dedupe key: the Idempotency-Key header (for an HMAC hook only when "
            "`signed_headers` lists it), else the mapped id, else a fingerprint of the payload."
        )

    def authenticate_headers(self, route: HttpRoute, headers: Mapping[str, str]) -> None:
        check_auth_headers(route.options, headers)

    async def admit(self, route: HttpRoute) -> None:
        # An open hook's budget is everyone's; an authenticated hook's is spent only
        # by requests that passed authentication (admit_authenticated): a stranger's
        # unsigned junk drained a signed hook's budget and its backend got 429
        # (attacker review, 2026-11-30). Strangers stay bounded by their per-client
        # limit and, before the body, by authenticate_headers.
        if isinstance(route.options.auth, NoAuth):
            self._take_hook_budget(route)

    async def admit_authenticated(self, route: HttpRoute) -> None:
        if not isinstance(route.options.auth, NoAuth):
            self._take_hook_budget(route)

    def _take_hook_budget(self, route: HttpRoute) -> None:
        hook: WebhookSettings = route.options
        wait = self._buckets[hook.name].take()
        if wait:
            raise Rejected(
                "rate-limit",
                f"hook {hook.name!r} is over its rate limit",
                status=429,
                headers={"Retry-After": str(max(1, round(wait)))},
            )

    def authenticate(self, request: InboundRequest) -> None:
        # The headers passed authenticate_headers before the body was read; what is
        # left is an HMAC hook's signature over the body.
        hook: WebhookSettings = request.route.options
        if isinstance(hook.auth, HmacAuth):
            _check_hmac(hook.auth, request)

    async def normalize(self, request: InboundRequest) -> Normalized:
        size = len(request.body)
        if size <= INLINE_PARSE_BYTES:
            return self._normalized_now(request)
        # A large document costs Python walks in proportion to its values (the shape
        # check, stripping controls, the mapping): 80,000 keys in 1 MB took 0.1-0.3 s.
        # On a thread the event loop keeps its turns (the interpreter hands the lock
        # over every 5 ms); one at a time per hook, so a stranger's large posts queue
        # behind each other instead of taking every thread and the loop's share, and
        # a bounded queue: past it the sender retries later.
        large = self._large[request.route.options.name]
        if large.held and large.held + size > MAX_LARGE_PARSE_BYTES:
            raise RetryLater(
                "this hook holds as many large documents as it parses at once; retry shortly",
                retry_after_s=1,
            )
        large.held += size
        try:
            async with large.turn:
                return await asyncio.to_thread(self._normalized_now, request)
        finally:
            large.held -= size

    def _normalized_now(self, request: InboundRequest) -> Normalized:
        hook: WebhookSettings = request.route.options
        kind = "form" if request.media_type == FORM else "json"
        return normalize_webhook(
            parse_payload(
                kind,
                request.body,
                max_fields=hook.max_form_fields,
                max_field_bytes=hook.max_field_bytes,
            ),
            WebhookContext(
                hook=hook.name,
                message_id=request.message_id,
                received_at=request.received_at,
                raw=Blob.of(request.body, JSON if kind == "json" else FORM),
                fields=hook.map,
                channel=hook.channel,
                external_namespace=hook.external_namespace,
                default_region=hook.default_region,
                idempotency_key=trusted_idempotency_key(hook, request),
                verified=frozenset(hook.verified),
                clean=kind == "json" and json_needs_no_stripping(request.body),
            ),
        )
