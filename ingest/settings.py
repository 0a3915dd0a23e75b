"""The channels' settings: SMTP, Twilio, web hooks, IMAP. Each is its adapter's
``[adapters.<name>]`` table (``[adapters.smtp]``, ``[adapters.twilio]``,
``[adapters.webhook]``, ``[adapters.imap]``), also spelled as the historic
``[smtp]``, ``[twilio]``, ``[[webhooks]]`` and ``[imap]`` sections. Read from the
file by ``switchboard.settings``; built by the adapters (``Adapter.settings_from``)."""

from __future__ import annotations

import ipaddress
import os
import re
from datetime import date
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from normalize.webhook import FieldMap
from switchboard.limits import parse_memory_field


class _Secrets:
    """Whether the secrets a config file names by variable must be set in this
    process. A process that runs no adapter (the router, a sink, `switchboard
    status`) reads the adapters' tables for what it needs of them (the IMAP
    mailboxes' names, Twilio's default region) and never their secrets: every such
    process refused to start without every hook's and mailbox's secret, and a
    compose stack whose edges alone had them never started (operator review,
    2026-12-01). Set once at start (:func:`secrets_not_needed`)."""

    required = True


SECRETS = _Secrets()


def secrets_not_needed() -> None:
    """This process runs no adapter: an unset secret variable is left unresolved."""
    SECRETS.required = False


def _secret_from(env: str, what: str) -> SecretStr | None:
    value = os.environ.get(env)
    if value:
        return SecretStr(value)
    if SECRETS.required:
        raise ValueError(f"environment variable {env} ({what}) is not set")
    return None


def _comma_list(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class SmtpSettings(BaseSettings):
    """The SMTP server: who may receive mail here, and how much."""

    model_config = SettingsConfigDict(env_prefix="SWITCHBOARD_SMTP_", extra="ignore")

    enabled: bool = Field(default=True, description="Run the SMTP server in `switchboard run`.")
    port: int = Field(default=2525, ge=0, le=65535, description="SMTP server port.")
    hostname: str | None = Field(
        default=None, description="Name in the greeting and EHLO reply (default: the FQDN)."
    )
    domains: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "Recipient domains accepted, comma-separated (example.com,example.org). "
            "Mail to any other domain is refused at RCPT: never an open relay."
        ),
    )
    addresses: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Individual recipient addresses accepted besides the domains.",
    )
    max_message_size: int = Field(
        default=25 * 1024 * 1024, ge=1024, description="Largest message in bytes (SIZE)."
    )
    max_recipients: int = Field(default=100, ge=1, description="Recipients per message.")
    max_data_in_flight: int = Field(
        default=1024 * 1024 * 1024,
        ge=1024 * 1024,
        description=(
            "Bytes of message data all sessions together may hold in memory while "
            "receiving and handing off (each DATA starts with its declared SIZE plus a "
            "tenth and 64 KiB, at most 1 MiB, and grows as data arrives; one client "
            "address's other sessions may hold a quarter); past it DATA gets 452 4.3.1. "
            "Divided among the --workers processes."
        ),
    )
    max_sessions: int = Field(default=200, ge=1, description="Concurrent SMTP connections.")
    max_sessions_per_client: int = Field(
        default=10,
        ge=1,
        description=(
            "Concurrent SMTP connections from one client address; more get 421 "
            "(Postfix's smtpd_client_connection_count_limit)."
        ),
    )
    junk_command_limit: int = Field(
        default=100,
        ge=1,
        description=(
            "Commands outside a mail transaction (NOOP, RSET, VRFY, EXPN, HELP, unknown) "
            "per session before 421 and close (Postfix's smtpd_junk_command_limit)."
        ),
    )
    timeout_s: int = Field(default=300, ge=5, description="Idle timeout of a session.")
    session_deadline_s: float = Field(
        default=600,
        gt=0,
        description=(
            "Longest a session may last, however active: then 421 and close (a mail "
            "being handed off gets its reply first)."
        ),
    )
    tls_cert: Path | None = Field(default=None, description="PEM certificate for STARTTLS.")
    tls_key: Path | None = Field(default=None, description="PEM private key for STARTTLS.")
    require_tls: bool = Field(
        default=False, description="Refuse mail until the client has used STARTTLS."
    )
    workers: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description=(
            "Processes serving the port in `switchboard ingest smtp` (also --workers); "
            "default one per CPU core. `switchboard run` always runs one."
        ),
    )
    parse_workers: int = Field(
        default=1,
        ge=0,
        le=64,
        description=(
            "Processes that parse MIME beside the server (0: a thread in the server "
            "process). More than the spare CPU cores gains nothing."
        ),
    )
    parse_timeout_s: float = Field(
        default=60.0,
        ge=1,
        le=3600,
        description=(
            "A parse process still busy with one message after this long is killed and "
            "replaced; the message is tried once more, then dead-lettered "
            "(`normalizer-error`). Only with parse_workers >= 1: a thread cannot be stopped."
        ),
    )
    parse_memory_mb: int = parse_memory_field("message")

    # -- sender authentication (issue 17; ingest/mailauth.py) --
    verify: bool = Field(
        default=True,
        description=(
            "Check SPF, DKIM, ARC and DMARC here; the From address is verified only on a "
            "DMARC pass. Off behind an upstream that checks (see trusted_authserv_ids)."
        ),
    )
    dns_servers: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "Resolvers for the checks, 'ip' or 'ip:port', comma-separated (default: the system's)."
        ),
    )
    dns_timeout_s: float = Field(default=2.0, gt=0, description="Longest wait for one DNS answer.")
    verify_timeout_s: float = Field(
        default=5.0,
        gt=0,
        description="Longest time all checks of one message may take; then temperror (claimed).",
    )
    dns_cache_size: int = Field(
        default=10000, ge=0, description="DNS answers cached (each for at most its TTL); 0: none."
    )
    trusted_authserv_ids: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "Authserv-ids (e.g. mx.example.com) whose Authentication-Results header is believed "
            "when the mail comes from a trusted_relays address; the topmost such header counts."
        ),
    )
    trusted_relays: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "Peer addresses or networks (CIDR) of the upstream MTAs that write those headers."
        ),
    )
    trusted_arc_sealers: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "ARC sealer domains (forwarders, mailing lists) whose sealed dmarc=pass is believed "
            "when the chain validates and DMARC fails only because they forwarded it."
        ),
    )

    _split_auth = field_validator(
        "dns_servers",
        "trusted_authserv_ids",
        "trusted_relays",
        "trusted_arc_sealers",
        mode="before",
    )(_comma_list)

    @field_validator("trusted_relays")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        return [str(ipaddress.ip_network(v.strip(), strict=False)) for v in value]

    @field_validator("trusted_authserv_ids", "trusted_arc_sealers")
    @classmethod
    def _lower_ids(cls, value: list[str]) -> list[str]:
        return [v.strip().lower().rstrip(".") for v in value if v.strip()]

    _split = field_validator("domains", "addresses", mode="before")(_comma_list)

    @field_validator("domains")
    @classmethod
    def _idna_domains(cls, value: list[str]) -> list[str]:
        return [d.strip().lower().rstrip(".").encode("idna").decode("ascii") for d in value]

    @model_validator(mode="after")
    def _tls_pair(self) -> SmtpSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be set together")
        return self


class TwilioSettings(BaseSettings):
    """The Twilio SMS/MMS/WhatsApp webhook."""

    model_config = SettingsConfigDict(env_prefix="SWITCHBOARD_TWILIO_", extra="ignore")

    enabled: bool = Field(default=True, description="Serve POST /webhooks/twilio/sms.")
    auth_token: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description=(
            "Auth token(s) that sign Twilio's requests, comma-separated (several accounts, "
            "or old and new during a rotation)."
        ),
    )
    enforce_signature: bool = Field(
        default=True,
        description="Refuse unsigned or badly signed requests (403). Off only for debugging.",
    )
    default_region: str = Field(
        default="US", description="Region for numbers Twilio sends without a country code."
    )
    download_media: bool = Field(
        default=False, description="Fetch MMS media into the blob store (else keep the URLs)."
    )
    media_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["api.twilio.com", "media.twiliocdn.com"],
        description="Hosts media may be fetched from, redirects included; nothing else.",
    )
    media_max_bytes: int = Field(default=5 * 1024 * 1024, ge=1, description="Per media item.")
    media_timeout_s: float = Field(default=10.0, gt=0, description="Per media item.")
    account_sids: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "Twilio accounts (AC...) whose messages are accepted, comma-separated; a request "
            "naming another is refused (403) and dead-lettered. Empty: any (warned at start)."
        ),
    )

    @field_validator("auth_token", mode="before")
    @classmethod
    def _tokens(cls, value: object) -> object:
        return _comma_list(value)

    _hosts = field_validator("media_hosts", "account_sids", mode="before")(_comma_list)

    @field_validator("account_sids")
    @classmethod
    def _account_shape(cls, value: list[str]) -> list[str]:
        for sid in value:
            if not re.fullmatch(r"AC[0-9a-f]{32}", sid):
                raise ValueError(f"{sid!r} is not a Twilio account SID (AC + 32 hex digits)")
        return value


class HmacAuth(BaseModel):
    """HMAC-SHA256 of the raw body (or of ``timestamp.body``) in a header, hex.

    Signed content: ``<timestamp>.`` when ``timestamp_header`` is set, then one
    ``<lower-case name>:<value>\n`` line per ``signed_headers`` entry (in that order;
    an absent header signs an empty value), then the raw body. HTTP header values
    cannot hold a newline, so the lines cannot be shifted into the body.
    """

    model_config = ConfigDict(extra="forbid")
    kind: Literal["hmac-sha256"]
    secret_env: str = Field(description="Environment variable holding the shared secret.")
    header: str = Field(default="X-Signature", description="Header carrying the hex digest.")
    prefix: str = Field(default="", description="Digest prefix, e.g. 'sha256='.")
    timestamp_header: str | None = Field(
        default=None, description="If set, signed content is '<timestamp>.<body>'."
    )
    tolerance_s: int = Field(default=300, ge=1, description="Accepted timestamp skew.")
    signed_headers: list[str] = Field(
        default_factory=list,
        description=(
            "Headers the signature also covers, e.g. ['Idempotency-Key']; only a signed "
            "Idempotency-Key is used as the dedupe key."
        ),
    )
    allow_replay: bool = Field(
        default=False,
        description=(
            "Accept a hook without timestamp_header, whose captured requests can be "
            "replayed forever (refused by config check unless true)."
        ),
    )
    secret: SecretStr | None = Field(default=None, exclude=True)

    @field_validator("signed_headers")
    @classmethod
    def _header_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", name):
                raise ValueError(f"{name!r} is not an HTTP header name")
        return [name.lower() for name in value]

    def signs(self, header: str) -> bool:
        return header.lower() in self.signed_headers


class BearerAuth(BaseModel):
    """``Authorization: Bearer <token>``."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["bearer"]
    token_env: str = Field(description="Environment variable holding the token.")
    token: SecretStr | None = Field(default=None, exclude=True)


class NoAuth(BaseModel):
    """Explicitly unauthenticated (a public form behind other protection)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["none"]


ContentKind = Literal["json", "form"]


def _both_content_kinds() -> list[ContentKind]:
    return ["json", "form"]


class WebhookSettings(BaseModel):
    """One generic web hook, served at ``POST /webhooks/{name}``."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    auth: Annotated[HmacAuth | BearerAuth | NoAuth, Field(discriminator="kind")]
    map: FieldMap
    content_types: list[ContentKind] = Field(default_factory=_both_content_kinds)
    channel: str = Field(default="webhook", pattern=r"^[a-z][a-z0-9_-]{0,31}$")
    external_namespace: str = Field(default="ext", pattern=r"^[a-z][a-z0-9_.-]{0,31}$")
    default_region: str | None = Field(default=None, description="For national phone numbers.")
    max_body_bytes: int = Field(default=1024 * 1024, ge=64, description="Largest body (413).")
    rate_per_s: float = Field(
        default=50.0, gt=0, description="Sustained requests per second, all clients together."
    )
    burst: int = Field(default=100, ge=1, description="Requests allowed at once, all clients.")
    client_rate_per_s: float | None = Field(
        default=None,
        gt=0,
        description=(
            "Sustained requests per second from one client address (a /64 for IPv6). "
            "Default: a tenth of rate_per_s."
        ),
    )
    client_burst: int | None = Field(
        default=None, ge=1, description="Requests at once from one client. Default: burst / 5."
    )
    max_form_fields: int = Field(
        default=200, ge=1, description="Fields a form-encoded body may have (413 past it)."
    )
    max_field_bytes: int = Field(
        default=64 * 1024, ge=64, description="Largest value of one form field (413 past it)."
    )
    verified: list[Literal["email", "phone", "external"]] = Field(
        default_factory=list,
        description=(
            "Identity kinds this hook vouches for (a backend of yours that signs its "
            "requests after its user logged in); everything else it carries is claimed. "
            "Never with auth = none."
        ),
    )

    @field_validator("auth")
    @classmethod
    def _replay_window(cls, auth: HmacAuth | BearerAuth | NoAuth) -> HmacAuth | BearerAuth | NoAuth:
        if isinstance(auth, HmacAuth) and auth.timestamp_header is None and not auth.allow_replay:
            raise ValueError(
                "auth.timestamp_header is not set, so a captured request can be replayed "
                "forever: set auth.timestamp_header (the sender signs '<timestamp>.<body>'), "
                "or auth.allow_replay = true to accept that"
            )
        return auth

    @model_validator(mode="after")
    def _strangers_vouch_for_nothing(self) -> WebhookSettings:
        if self.verified and isinstance(self.auth, NoAuth):
            raise ValueError(
                "verified: a hook with auth = none can be posted by anyone, so it can "
                "vouch for no identity; sign it (hmac-sha256) or remove verified"
            )
        return self

    def client_limits(self) -> tuple[float, int]:
        """The per-client rate and burst, defaults applied."""
        rate = self.client_rate_per_s
        if rate is None:
            rate = self.rate_per_s / 10
        burst = self.client_burst if self.client_burst is not None else max(1, self.burst // 5)
        return rate, burst

    @model_validator(mode="after")
    def _resolve_secret(self) -> WebhookSettings:
        auth = self.auth
        env = getattr(auth, "secret_env", None) or getattr(auth, "token_env", None)
        if env is None:
            return self
        value = _secret_from(env, f"auth of hook {self.name!r}")
        if isinstance(auth, HmacAuth):
            auth.secret = value
        elif isinstance(auth, BearerAuth):
            auth.token = value
        return self


class WebhooksSettings(BaseModel):
    """The generic web hooks: ``[[adapters.webhook.hooks]]``, historically ``[[webhooks]]``."""

    model_config = ConfigDict(extra="forbid")

    hooks: list[WebhookSettings] = Field(
        default_factory=list, description="One table per hook, each at POST /webhooks/<name>."
    )

    @field_validator("hooks")
    @classmethod
    def _unique_names(cls, hooks: list[WebhookSettings]) -> list[WebhookSettings]:
        names = [h.name for h in hooks]
        duplicates = sorted({n for n in names if names.count(n) > 1} | ({"twilio"} & set(names)))
        if duplicates:
            raise ValueError(f"web hook names must be unique and not 'twilio': {duplicates}")
        return hooks


class MailboxSettings(BaseModel):
    """One IMAP mailbox to poll ([[imap.mailboxes]] in the config file)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
    host: str
    port: int | None = Field(default=None, ge=1, le=65535, description="Default: 993 or 143.")
    security: Literal["tls", "starttls", "none"] = Field(
        default="tls", description="Implicit TLS (993), STARTTLS, or none (loopback only)."
    )
    username: str
    password_env: str = Field(description="Environment variable holding the password.")
    password: SecretStr | None = Field(default=None, exclude=True)
    address: str | None = Field(
        default=None, description="The mailbox's email address (default: the user name)."
    )
    folders: list[str] = Field(default_factory=lambda: ["INBOX"], min_length=1)
    backfill: str = Field(
        default="7d",
        description="On first contact: 'none', 'all', 'YYYY-MM-DD' (since), or '<N>d'.",
    )
    ca_file: Path | None = Field(default=None, description="Trust this CA (self-signed).")
    mark_keyword: str | None = Field(
        default=None, description="Add this IMAP keyword to ingested messages (off by default)."
    )
    move_to: str | None = Field(
        default=None, description="Move ingested messages to this folder (off by default)."
    )
    trusted_authserv_ids: list[str] = Field(
        default_factory=list,
        description=(
            "Authserv-ids of the mailbox provider (e.g. mx.google.com) whose topmost "
            "Authentication-Results header judges the sender; other such headers are ignored."
        ),
    )

    @field_validator("backfill")
    @classmethod
    def _backfill(cls, value: str) -> str:
        value = value.strip().lower()
        if value in ("none", "all") or re.fullmatch(r"\d{1,5}d", value):
            return value
        try:
            date.fromisoformat(value)
        except ValueError as exc:
            raise ValueError("backfill must be 'none', 'all', 'YYYY-MM-DD' or '<N>d'") from exc
        return value

    @model_validator(mode="after")
    def _resolve_password(self) -> MailboxSettings:
        self.password = _secret_from(self.password_env, f"password of mailbox {self.name!r}")
        return self

    def resolved_port(self) -> int:
        return self.port or (993 if self.security == "tls" else 143)


class ImapSettings(BaseSettings):
    """The IMAP poller: shared timing; the mailboxes come from the config file."""

    model_config = SettingsConfigDict(env_prefix="SWITCHBOARD_IMAP_", extra="ignore")

    enabled: bool = Field(default=True, description="Poll the configured mailboxes in `run`.")
    mailboxes: list[MailboxSettings] = Field(default_factory=list)
    poll_interval_s: float = Field(
        default=60.0,
        gt=0,
        description="Between polls when the server has no IDLE.",
    )
    idle_resync_s: float = Field(
        default=60.0,
        gt=0,
        description=(
            "With IDLE, the longest a folder goes without a search: a server may not "
            "announce mail that arrived just before IDLE began (Dovecot: 30 s later)."
        ),
    )
    idle_renew_s: float = Field(
        default=25 * 60, gt=0, le=29 * 60, description="Re-issue IDLE before the 29-minute limit."
    )
    batch_size: int = Field(default=50, ge=1, le=1000, description="Messages fetched at once.")
    parse_workers: int = Field(
        default=1,
        ge=0,
        le=8,
        description=(
            "Processes that parse the mailboxes' mail (0: the poller's own thread, which "
            "nothing can stop: a mail that takes the parser minutes freezes the process)."
        ),
    )
    parse_timeout_s: float = Field(
        default=60.0,
        ge=1,
        le=3600,
        description=(
            "A parse process still busy with one mail after this long is killed and "
            "replaced; the mail is tried once more, then dead-lettered (normalizer-error)."
        ),
    )
    parse_memory_mb: int = parse_memory_field("mail")
    max_message_size: int = Field(
        default=25 * 1024 * 1024,
        ge=1024,
        description="Largest message fetched (its RFC822.SIZE, asked first); a larger one "
        "is dead-lettered as 'too-large' without being downloaded.",
    )
    max_fetch_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1024 * 1024,
        description="Most message bytes fetched in one command (a batch is split by size).",
    )
    backoff_max_s: float = Field(default=300.0, ge=1, description="Cap of the reconnect backoff.")
    timeout_s: float = Field(default=60.0, gt=0, description="Network timeout of one command.")

    @field_validator("mailboxes")
    @classmethod
    def _unique(cls, boxes: list[MailboxSettings]) -> list[MailboxSettings]:
        names = [b.name for b in boxes]
        if len(names) != len(set(names)):
            raise ValueError(f"mailbox names must be unique: {names}")
        return boxes
