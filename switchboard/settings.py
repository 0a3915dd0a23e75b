"""Deployment settings, read from ``SWITCHBOARD_*`` environment variables.

One pydantic-settings class per component; every field has a description and
credentials are ``SecretStr``, so :func:`masked_dump` (``switchboard config
show``) never prints a secret. Nothing is read at import time: call
:func:`load_settings` from the CLI.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ingest.registry import AdapterError, discover, get
from normalize.webhook import FieldMap

# kafka-python 3 discards a group join that completes outside poll(); polls shorter
# than this never join on the embedded broker (measured), so it is a floor.
MIN_POLL_TIMEOUT_MS = 1500


class KafkaSettings(BaseSettings):
    """How to reach Kafka. Unset ``bootstrap`` means: start the embedded broker."""

    model_config = SettingsConfigDict(env_prefix="SWITCHBOARD_KAFKA_", extra="ignore")

    bootstrap: str | None = Field(
        default=None,
        description=(
            "Comma-separated host:port list. Unset: `switchboard run` starts an embedded "
            "in-memory broker (development only)."
        ),
    )
    client_id: str = Field(default="switchboard", description="Kafka client id prefix.")
    partitions: int = Field(default=3, ge=1, le=1000, description="Partitions per created topic.")
    replication_factor: int = Field(
        default=1,
        ge=1,
        le=10,
        description="Replication factor for created topics (3 in production).",
    )
    session_timeout_ms: int = Field(
        default=2000,
        ge=1000,
        description="Consumer group session timeout; a group join takes about half of it.",
    )
    heartbeat_interval_ms: int = Field(
        default=500, ge=100, description="Consumer heartbeat interval."
    )
    poll_timeout_ms: int = Field(
        default=MIN_POLL_TIMEOUT_MS,
        ge=MIN_POLL_TIMEOUT_MS,
        description="Consumer poll timeout; at least 1500 ms or group joins are lost.",
    )
    # 5 ms, not 20: ingest answers its senders after the acknowledgement, and under
    # load batches fill anyway (measured: same throughput at 64 connections, 3x at 16).
    linger_ms: int = Field(default=5, ge=0, le=1000, description="Producer batching delay.")
    batch_size: int = Field(default=262_144, ge=1024, description="Producer batch size in bytes.")
    request_timeout_ms: int = Field(default=5000, ge=500, description="Broker request timeout.")
    max_block_ms: int = Field(
        default=5000, ge=100, description="Longest a send may wait for metadata or buffer space."
    )
    delivery_timeout_ms: int = Field(
        default=30_000, ge=1000, description="Give up on a record not acknowledged after this."
    )
    publish_timeout_s: float = Field(
        default=10.0, gt=0, description="Longest a caller waits for a broker acknowledgement."
    )
    max_request_size: int = Field(
        default=4 * 1024 * 1024, ge=1024, description="Largest produce request (events stay small)."
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        default="PLAINTEXT", description="Kafka security protocol."
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        default=None, description="SASL mechanism, with SASL_* protocols."
    )
    sasl_username: str | None = Field(default=None, description="SASL user name.")
    sasl_password: SecretStr | None = Field(default=None, description="SASL password.")
    ssl_cafile: Path | None = Field(default=None, description="CA bundle for SSL listeners.")

    def bootstrap_servers(self) -> list[str]:
        if not self.bootstrap:
            raise ValueError("no Kafka bootstrap configured (SWITCHBOARD_KAFKA_BOOTSTRAP)")
        return [part.strip() for part in self.bootstrap.split(",") if part.strip()]

    def client_config(self) -> dict[str, Any]:
        """Connection options shared by producers, consumers and the admin client."""
        config: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers(),
            "security_protocol": self.security_protocol,
            "request_timeout_ms": self.request_timeout_ms,
        }
        if self.sasl_mechanism:
            config["sasl_mechanism"] = self.sasl_mechanism
            config["sasl_plain_username"] = self.sasl_username
            if self.sasl_password is not None:
                config["sasl_plain_password"] = self.sasl_password.get_secret_value()
        if self.ssl_cafile:
            config["ssl_cafile"] = str(self.ssl_cafile)
        return config


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
    max_sessions: int = Field(default=200, ge=1, description="Concurrent SMTP connections.")
    timeout_s: int = Field(default=300, ge=5, description="Idle timeout of a session.")
    tls_cert: Path | None = Field(default=None, description="PEM certificate for STARTTLS.")
    tls_key: Path | None = Field(default=None, description="PEM private key for STARTTLS.")
    require_tls: bool = Field(
        default=False, description="Refuse mail until the client has used STARTTLS."
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

    @field_validator("auth_token", mode="before")
    @classmethod
    def _tokens(cls, value: object) -> object:
        return _comma_list(value)

    _hosts = field_validator("media_hosts", mode="before")(_comma_list)


class HmacAuth(BaseModel):
    """HMAC-SHA256 of the raw body (or of ``timestamp.body``) in a header, hex."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["hmac-sha256"]
    secret_env: str = Field(description="Environment variable holding the shared secret.")
    header: str = Field(default="X-Signature", description="Header carrying the hex digest.")
    prefix: str = Field(default="", description="Digest prefix, e.g. 'sha256='.")
    timestamp_header: str | None = Field(
        default=None, description="If set, signed content is '<timestamp>.<body>'."
    )
    tolerance_s: int = Field(default=300, ge=1, description="Accepted timestamp skew.")
    secret: SecretStr | None = Field(default=None, exclude=True)


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
    max_body_bytes: int = Field(default=1024 * 1024, ge=64)
    rate_per_s: float = Field(default=50.0, gt=0, description="Sustained requests per second.")
    burst: int = Field(default=100, ge=1, description="Requests allowed at once.")

    @model_validator(mode="after")
    def _resolve_secret(self) -> WebhookSettings:
        auth = self.auth
        env = getattr(auth, "secret_env", None) or getattr(auth, "token_env", None)
        if env is None:
            return self
        value = os.environ.get(env)
        if not value:
            raise ValueError(f"environment variable {env} (auth of hook {self.name!r}) is not set")
        if isinstance(auth, HmacAuth):
            auth.secret = SecretStr(value)
        elif isinstance(auth, BearerAuth):
            auth.token = SecretStr(value)
        return self


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
        value = os.environ.get(self.password_env)
        if not value:
            raise ValueError(
                f"environment variable {self.password_env} (password of mailbox "
                f"{self.name!r}) is not set"
            )
        self.password = SecretStr(value)
        return self

    def resolved_port(self) -> int:
        return self.port or (993 if self.security == "tls" else 143)


class ImapSettings(BaseSettings):
    """The IMAP poller: shared timing; the mailboxes come from the config file."""

    model_config = SettingsConfigDict(env_prefix="SWITCHBOARD_IMAP_", extra="ignore")

    enabled: bool = Field(default=True, description="Poll the configured mailboxes in `run`.")
    mailboxes: list[MailboxSettings] = Field(default_factory=list)
    poll_interval_s: float = Field(
        default=60.0, gt=0, description="Between polls when the server has no IDLE."
    )
    idle_renew_s: float = Field(
        default=25 * 60, gt=0, le=29 * 60, description="Re-issue IDLE before the 29-minute limit."
    )
    batch_size: int = Field(default=50, ge=1, le=1000, description="Messages fetched at once.")
    backoff_max_s: float = Field(default=300.0, ge=1, description="Cap of the reconnect backoff.")
    timeout_s: float = Field(default=60.0, gt=0, description="Network timeout of one command.")

    @field_validator("mailboxes")
    @classmethod
    def _unique(cls, boxes: list[MailboxSettings]) -> list[MailboxSettings]:
        names = [b.name for b in boxes]
        if len(names) != len(set(names)):
            raise ValueError(f"mailbox names must be unique: {names}")
        return boxes


class TeamSettings(BaseModel):
    """A team that owns contacts ([[teams]]); its agents are the possible owners."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
    agents: list[str] = Field(default_factory=list)
    assignment: Literal["round-robin", "least-loaded"] = "round-robin"
    capacity: int | None = Field(default=None, ge=1, description="Open conversations per agent.")


def _one_team() -> list[TeamSettings]:
    return [TeamSettings(name="support")]


class RuleMatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inbox: str | None = Field(default=None, description="A support address or company number.")
    channel: str | None = None
    keywords: list[str] = Field(default_factory=list)


class RuleSettings(BaseModel):
    """First matching rule picks a new contact's team ([[rules]])."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    match: RuleMatch
    team: str

    @model_validator(mode="after")
    def _has_condition(self) -> RuleSettings:
        m = self.match
        if m.inbox is None and m.channel is None and not m.keywords:
            raise ValueError(
                "a rule needs at least one of match.inbox, match.channel, match.keywords"
            )
        return self


class RouterSettings(BaseSettings):
    """Routing: default team, guards, windows ([router]; teams and rules are their own)."""

    model_config = SettingsConfigDict(env_prefix="SWITCHBOARD_ROUTER_", extra="ignore")

    default_team: str = Field(default="support", description="Team when no rule matches.")
    blocked_identities: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Identities never used to find a contact: your own addresses and numbers.",
    )
    max_identities_per_kind: int = Field(
        default=10, ge=1, description="Links beyond this per kind are refused, not merged."
    )
    idle_window_h: float = Field(
        default=72, gt=0, description="A message joins the open conversation within this."
    )
    dedupe_retention_days: int = Field(default=30, ge=1, description="How long keys are kept.")

    _split = field_validator("blocked_identities", mode="before")(_comma_list)


class SpoolSettings(BaseSettings):
    """Ingest's local spool, used while Kafka does not acknowledge ([spool])."""

    model_config = SettingsConfigDict(env_prefix="SWITCHBOARD_SPOOL_", extra="ignore")

    enabled: bool = Field(
        default=True,
        description="Spool when Kafka is away; off: senders get retry-later answers instead.",
    )
    after_s: float = Field(
        default=2.0, gt=0, le=60, description="How long Kafka may take to acknowledge first."
    )
    max_bytes: int = Field(
        default=1024**3, ge=1024, description="Size bound; past it SMTP answers 451, HTTP 503."
    )
    max_messages: int = Field(
        default=1_000_000, ge=1, description="Message bound; past it SMTP answers 451, HTTP 503."
    )
    dir: Path | None = Field(
        default=None, description="Where spool files live (default: <data dir>/spool)."
    )


class Settings(BaseSettings):
    """Process-wide settings for `switchboard run` and the role commands."""

    model_config = SettingsConfigDict(env_prefix="SWITCHBOARD_", extra="ignore")

    bind_host: str = Field(
        default="127.0.0.1", description="Address the SMTP and HTTP servers listen on."
    )
    http_port: int = Field(default=8080, ge=0, le=65535, description="HTTP server port.")
    data_dir: Path = Field(
        default=Path("var"), description="Local state: SQLite database, blobs, spool, broker log."
    )
    database_url: SecretStr | None = Field(
        default=None,
        description=(
            "SQLAlchemy URL. Default: a SQLite file in the data dir. "
            "postgresql://user@host/db uses psycopg 3."
        ),
    )
    api_token: SecretStr | None = Field(
        default=None,
        description=(
            "Bearer token of the queue API and page. Unset: they answer loopback clients only."
        ),
    )
    queue_database_url: SecretStr | None = Field(
        default=None,
        description="Database of the queue read model (default: the database URL).",
    )
    config: Path | None = Field(
        default=None,
        description=(
            "TOML file for mailboxes, web hooks, teams and rules (default ./switchboard.toml)."
        ),
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Log level."
    )
    log_format: Literal["json", "text"] = Field(
        default="json", description="json: one JSON object per line; text: for humans."
    )
    shutdown_timeout_s: float = Field(
        default=8.0, gt=0, le=60, description="Longest a graceful stop may take before forcing."
    )
    public_url: str | None = Field(
        default=None,
        description=(
            "Public base URL the HTTP app is reached at (https://hooks.example.com), "
            "for signature checks behind a TLS-terminating proxy."
        ),
    )
    kafka: KafkaSettings = Field(default_factory=KafkaSettings, description="Kafka connection.")
    smtp: SmtpSettings = Field(default_factory=SmtpSettings, description="SMTP server.")
    twilio: TwilioSettings = Field(default_factory=TwilioSettings, description="Twilio hook.")
    imap: ImapSettings = Field(default_factory=ImapSettings, description="IMAP poller.")
    router: RouterSettings = Field(default_factory=RouterSettings, description="Routing.")
    spool: SpoolSettings = Field(default_factory=SpoolSettings, description="Ingest spool.")
    teams: list[TeamSettings] = Field(
        default_factory=_one_team,
        description="Teams ([[teams]]); without any, one team 'support' owns everything.",
    )
    rules: list[RuleSettings] = Field(default_factory=list, description="Rules ([[rules]]).")
    adapters: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description=(
            "[adapters.<name>] tables: enable and configure an installed adapter "
            "(`enabled = false` switches any adapter off)."
        ),
    )

    @model_validator(mode="after")
    def _routing_is_consistent(self) -> Settings:
        teams = [t.name for t in self.teams]
        agents = [a for t in self.teams for a in t.agents]
        clashes = sorted({n for n in teams + agents if (teams + agents).count(n) > 1})
        if clashes:
            raise ValueError(f"team and agent names must be unique across teams: {clashes}")
        if self.router.default_team not in teams:
            raise ValueError(f"router.default_team {self.router.default_team!r} is not a team")
        for index, rule in enumerate(self.rules):
            if rule.team not in teams:
                raise ValueError(f"rules[{rule.name or index}].team {rule.team!r} is not a team")
        return self

    webhooks: list[WebhookSettings] = Field(
        default_factory=list, description="Generic web hooks ([[webhooks]] in the file)."
    )

    @field_validator("webhooks")
    @classmethod
    def _unique_names(cls, hooks: list[WebhookSettings]) -> list[WebhookSettings]:
        names = [h.name for h in hooks]
        duplicates = sorted({n for n in names if names.count(n) > 1} | ({"twilio"} & set(names)))
        if duplicates:
            raise ValueError(f"web hook names must be unique and not 'twilio': {duplicates}")
        return hooks

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    def resolved_queue_database_url(self) -> str:
        if self.queue_database_url is not None:
            return self.queue_database_url.get_secret_value()
        return self.resolved_database_url()

    def spool_dir(self) -> Path:
        return self.spool.dir or self.data_dir / "spool"

    def resolved_database_url(self) -> str:
        if self.database_url is not None:
            return self.database_url.get_secret_value()
        return f"sqlite:///{(self.data_dir / 'switchboard.db').resolve()}"


class ConfigError(ValueError):
    """The configuration file is unreadable or names an unknown or invalid key."""


#: Config-file sections and the settings class each one fills.
SECTIONS: dict[str, type[BaseSettings]] = {
    "kafka": KafkaSettings,
    "smtp": SmtpSettings,
    "twilio": TwilioSettings,
    "imap": ImapSettings,
    "router": RouterSettings,
    "spool": SpoolSettings,
}
#: Config-file sections that are arrays of tables ([[webhooks]]).
LIST_SECTIONS: dict[str, type[BaseModel]] = {
    "webhooks": WebhookSettings,
    "teams": TeamSettings,
    "rules": RuleSettings,
}


def config_path(explicit: Path | None = None) -> Path | None:
    """The TOML file in use: explicit, ``SWITCHBOARD_CONFIG``, or ./switchboard.toml."""
    if explicit is not None:
        return explicit
    env = os.environ.get("SWITCHBOARD_CONFIG")
    if env:
        return Path(env)
    default = Path("switchboard.toml")
    return default if default.is_file() else None


def read_config(path: Path) -> dict[str, Any]:
    """Parse and shape-check the file; errors name the file and the exact key."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    sections: dict[str, Any] = {}
    for name, section in data.items():
        if name == "adapters":
            sections[name] = _adapter_tables(path, section)
            continue
        if name in LIST_SECTIONS:
            if not isinstance(section, list):
                raise ConfigError(f"{path}: {name} must be an array of tables, like [[{name}]]")
            sections[name] = section
            continue
        if name not in SECTIONS:
            known = ", ".join(sorted([*SECTIONS, *LIST_SECTIONS, "adapters"]))
            raise ConfigError(f"{path}: unknown section [{name}] (known: {known})")
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: {name} must be a table, like [{name}]")
        fields = SECTIONS[name].model_fields
        for key in section:
            if key not in fields:
                raise ConfigError(f"{path}: unknown key {name}.{key}")
        sections[name] = section
    return sections


def _adapter_tables(path: Path, section: object) -> dict[str, dict[str, Any]]:
    """[adapters.<name>] tables, each checked against the installed adapter's settings."""
    if not isinstance(section, dict) or not all(isinstance(t, dict) for t in section.values()):
        raise ConfigError(f"{path}: adapters must hold tables, like [adapters.mailgun]")
    for name, table in section.items():
        where = f"{path}: [adapters.{name}]"
        try:
            adapter = get(name)
        except AdapterError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
        if not isinstance(table.get("enabled", True), bool):
            raise ConfigError(f"{where}: enabled must be true or false")
        keys = set(table) - {"enabled"}
        own = getattr(adapter, "config_section", None)
        if own is not None and keys:
            raise ConfigError(f"{where}: only `enabled` goes here; configure {name} in [{own}]")
        if own is None:
            unknown = sorted(keys - set(adapter.settings_class.model_fields))
            if unknown:
                raise ConfigError(f"{where}: unknown key {', '.join(unknown)}")
            adapter_settings(adapter.settings_class, table, name)
    return section


def adapter_settings(cls: type[Any], table: dict[str, Any], name: str) -> Any:  # noqa: ANN401
    """An adapter's settings from its [adapters.<name>] table. ``enabled`` there
    belongs to the registry, unless the adapter's settings class has it too."""
    if "enabled" not in cls.model_fields:
        table = {k: v for k, v in table.items() if k != "enabled"}
    return section_settings(cls, table, f"adapters.{name}")


def _errors(exc: ValidationError, prefix: str) -> str:
    return "; ".join(
        f"{prefix}.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
    )


def section_settings(cls: type[Any], section: dict[str, Any], name: str) -> Any:  # noqa: ANN401
    """One settings class from its config-file table; environment variables (with the
    class's prefix) win over the file. ConfigError names the key that is wrong."""
    prefix = str(cls.model_config.get("env_prefix", ""))
    from_file = {k: v for k, v in section.items() if f"{prefix}{k}".upper() not in os.environ}
    try:
        return cls(**from_file)
    except ValidationError as exc:
        raise ConfigError(_errors(exc, name)) from exc


def _tables(section: str, items: list[Any]) -> list[Any]:
    """Validate an array of tables; errors name the entry by its name or index."""
    model = LIST_SECTIONS[section]
    parsed = []
    for index, item in enumerate(items):
        label = item.get("name", index) if isinstance(item, dict) else index
        try:
            parsed.append(model.model_validate(item))
        except ValidationError as exc:
            raise ConfigError(_errors(exc, f"{section}[{label}]")) from exc
    return parsed


def load_settings(path: Path | None = None) -> Settings:
    """Environment variables, then the optional TOML file for what they leave unset."""
    file = config_path(path)
    sections = read_config(file) if file is not None else {}
    try:
        return Settings(
            config=file,
            kafka=section_settings(KafkaSettings, sections.get("kafka", {}), "kafka"),
            smtp=section_settings(SmtpSettings, sections.get("smtp", {}), "smtp"),
            twilio=section_settings(TwilioSettings, sections.get("twilio", {}), "twilio"),
            imap=section_settings(ImapSettings, sections.get("imap", {}), "imap"),
            router=section_settings(RouterSettings, sections.get("router", {}), "router"),
            spool=section_settings(SpoolSettings, sections.get("spool", {}), "spool"),
            webhooks=_tables("webhooks", sections.get("webhooks", [])),
            teams=_tables("teams", sections["teams"]) if "teams" in sections else _one_team(),
            rules=_tables("rules", sections.get("rules", [])),
            adapters=sections.get("adapters", {}),
        )
    except ValidationError as exc:
        raise ConfigError(_errors(exc, "settings")) from exc


def _settings_classes() -> Iterator[type[BaseSettings]]:
    yield Settings
    yield from SECTIONS.values()
    for info in discover().values():  # installed adapters read SWITCHBOARD_<NAME>_*
        cls = getattr(info.adapter, "settings_class", None)
        if isinstance(cls, type) and issubclass(cls, BaseSettings) and cls not in SECTIONS.values():
            yield cls


def known_env_vars() -> set[str]:
    """Every environment variable some settings class reads (for config checks)."""
    names: set[str] = set()
    for cls in _settings_classes():
        prefix = str(cls.model_config.get("env_prefix", ""))
        for name, info in cls.model_fields.items():
            if isinstance(info.default_factory, type) and issubclass(
                info.default_factory, BaseSettings
            ):
                continue
            if name in ("webhooks", "mailboxes", "teams", "rules", "adapters"):  # file only
                continue
            names.add(f"{prefix}{name}".upper())
    return names


def masked_dump(settings: Settings) -> dict[str, Any]:
    """Settings as JSON-ready data with every secret replaced by asterisks."""
    data: dict[str, Any] = settings.model_dump(mode="json")
    return data
