"""A channel adapter that lives outside Switchboard's repository: a website chat widget.

It is the adapter that ``docs/adding-a-channel.md`` builds step by step. The
tests install this package (its code and its entry point) into a fresh process
to prove that Switchboard discovers and runs it with no change to Switchboard.

The widget's backend posts one JSON object per visitor message::

    POST /webhooks/widget
    Authorization: Bearer <SWITCHBOARD_WIDGET_TOKEN>

    {"id": "m-1", "visitor": {"email": "ann@example.org", "name": "Ann"},
     "text": "Where is my order?", "page": "https://shop.example.com/orders"}
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Mapping

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from ingest.errors import Rejected
from ingest.sdk import JSON, HttpAdapter, HttpRoute, InboundRequest
from normalize.content import Blob, Normalized
from normalize.errors import NormalizeError
from normalize.identity import IdentityError, email_identity
from normalize.schema import InboundMessage


class WidgetSettings(BaseSettings):
    """[adapters.widget] in the config file; the token from the environment."""

    model_config = SettingsConfigDict(env_prefix="SWITCHBOARD_WIDGET_", extra="forbid")

    token: SecretStr | None = Field(
        default=None, description="Bearer token the widget backend sends (keep it in the env)."
    )
    max_body_bytes: int = Field(default=64 * 1024, ge=1024, description="Largest request body.")


class WidgetAdapter(HttpAdapter[WidgetSettings]):
    """Visitor messages from the website chat widget."""

    name = "widget"
    summary = "Website chat widget: JSON at POST /webhooks/widget (example package)"
    settings_class = WidgetSettings

    def routes(self) -> list[HttpRoute]:
        return [
            HttpRoute(
                "/webhooks/widget",
                summary="Chat widget message",
                content_types=(JSON,),
                max_body_bytes=self.settings.max_body_bytes,
                status_code=202,
                responses={202: "Durable", 400: "Malformed", 401: "No token", 403: "Wrong token"},
            )
        ]

    def authenticate_headers(self, route: HttpRoute, headers: Mapping[str, str]) -> None:
        # The token travels in a header: checked before the body is read, so a
        # stranger's large body is refused unread.
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Rejected("auth", "missing 'Authorization: Bearer <token>'", status=401)
        expected = self.settings.token.get_secret_value() if self.settings.token else ""
        if not expected or not hmac.compare_digest(token.encode(), expected.encode()):
            raise Rejected("auth", "the bearer token is not valid", status=403)

    def authenticate(self, request: InboundRequest) -> None:
        """Nothing left to check once the headers passed: the body carries no credential."""

    async def normalize(self, request: InboundRequest) -> Normalized:
        try:
            payload = json.loads(request.body)
            visitor = payload["visitor"]
            text, message_id = str(payload["text"]), str(payload["id"])
            sender = email_identity(str(visitor["email"]), visitor.get("name"))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise NormalizeError("malformed", f"not a widget message: {exc!r}"[:300]) from exc
        except IdentityError as exc:
            raise NormalizeError("no-identity", str(exc)) from exc
        raw = Blob.of(request.body, JSON)
        message = InboundMessage(
            id=request.message_id,
            channel="chat",
            adapter=self.name,
            received_at=request.received_at,
            sender=sender,
            text=text,
            provider_message_id=message_id,
            dedupe_key=f"widget:{message_id}",
            raw=raw.ref,
            metadata={"page": payload.get("page")},
        )
        return Normalized(message=message, blobs=(raw,))
