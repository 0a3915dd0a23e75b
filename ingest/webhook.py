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
from urllib.parse import parse_qsl

from ingest.errors import Rejected
from ingest.sdk import FORM, JSON, AdapterContext, HttpAdapter, HttpRoute, InboundRequest
from normalize.content import Blob, Normalized
from normalize.errors import NormalizeError
from normalize.webhook import WebhookContext, normalize_webhook
from switchboard.settings import BearerAuth, HmacAuth, Settings, WebhookSettings

log = logging.getLogger(__name__)

KINDS = {"json": JSON, "form": FORM}


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


def check_auth(hook: WebhookSettings, request: InboundRequest) -> None:
    """Raise Rejected(401) for missing credentials, Rejected(403) for wrong ones."""
    auth = hook.auth
    if isinstance(auth, BearerAuth):
        header = request.headers.get("authorization", "")
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
    elif isinstance(auth, HmacAuth):
        _check_hmac(auth, request)


def _check_hmac(auth: HmacAuth, request: InboundRequest) -> None:
    signature = request.headers.get(auth.header)
    if not signature:
        raise Rejected("signature", f"missing signature header {auth.header}", status=401)
    signed = request.body
    if auth.timestamp_header:
        stamp = request.headers.get(auth.timestamp_header, "")
        if not stamp.isdigit():
            raise Rejected(
                "signature", f"missing or non-numeric {auth.timestamp_header}", status=401
            )
        if abs(time.time() - int(stamp)) > auth.tolerance_s:
            raise Rejected(
                "stale", f"{auth.timestamp_header} is outside the accepted window", status=401
            )
        signed = stamp.encode() + b"." + request.body
    if auth.secret is None:  # resolved from secret_env at load
        raise Rejected("signature", "this hook has no secret configured", status=403)
    expected = (
        auth.prefix
        + hmac.new(auth.secret.get_secret_value().encode(), signed, hashlib.sha256).hexdigest()
    )
    if not hmac.compare_digest(signature.strip().encode(), expected.encode()):
        raise Rejected("signature", f"{auth.header} does not match the body", status=403)


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


class WebhookAdapter(HttpAdapter[list[WebhookSettings]]):
    """All configured generic hooks, one route each."""

    name = "webhook"
    summary = "Generic web hooks: [[webhooks]] in the config, each at POST /webhooks/<name>"
    settings_class = WebhookSettings  # of one [[webhooks]] table
    config_section = "webhooks"

    @classmethod
    def settings_from(cls, settings: Settings) -> list[WebhookSettings]:
        return settings.webhooks

    @classmethod
    def configured_in(cls, settings: Settings) -> bool:
        return bool(settings.webhooks)

    def __init__(self, settings: list[WebhookSettings], context: AdapterContext) -> None:
        super().__init__(settings, context)
        self.hooks = {hook.name: hook for hook in settings}
        self._buckets = {hook.name: TokenBucket(hook.rate_per_s, hook.burst) for hook in settings}

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
            "Dedupe key: the Idempotency-Key header, else the mapped id, else a "
            "fingerprint of the payload."
        )

    async def admit(self, route: HttpRoute) -> None:
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
        check_auth(request.route.options, request)

    async def normalize(self, request: InboundRequest) -> Normalized:
        hook: WebhookSettings = request.route.options
        kind = "form" if request.media_type == FORM else "json"
        return normalize_webhook(
            parse_payload(kind, request.body),
            WebhookContext(
                hook=hook.name,
                message_id=request.message_id,
                received_at=request.received_at,
                raw=Blob.of(request.body, JSON if kind == "json" else FORM),
                fields=hook.map,
                channel=hook.channel,
                external_namespace=hook.external_namespace,
                default_region=hook.default_region,
                idempotency_key=request.headers.get("idempotency-key"),
            ),
        )
