"""Deployment settings, read from ``SWITCHBOARD_*`` environment variables.

One pydantic-settings class per component; every field has a description and
credentials are ``SecretStr``, so :func:`masked_dump` (``switchboard config
show``) never prints a secret. Nothing is read at import time: call
:func:`load_settings` from the CLI.

Adapters, the four built-in channels included, are configured one way: their
``[adapters.<name>]`` table, which this loader checks and keeps, and which the
adapter turns into its own settings (``Adapter.settings_from``). The historic
``[smtp]``, ``[twilio]``, ``[imap]`` and ``[[webhooks]]`` sections are aliases
(:data:`ALIASES`), folded into those tables here.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import make_url

from ingest.registry import AdapterError, discover, get
from ingest.settings import (
    SECRETS,
    BearerAuth,
    HmacAuth,
    ImapSettings,
    MailboxSettings,
    NoAuth,
    SmtpSettings,
    TwilioSettings,
    WebhookSettings,
    WebhooksSettings,
)
from router.settings import RouterSettings, RuleMatch, RuleSettings, TeamSettings, _one_team
from sinks.settings import AgentSettings, ArchiveSettings
from switchboard.config import (
    MIN_POLL_TIMEOUT_MS,
    ConfigError,
    ConsumerSettings,
    KafkaSettings,
    adapter_settings,
    section_settings,
    validation_errors,
)
from switchboard.limits import HttpLimitSettings

# Settings classes that live with their owners, re-exported for the loader's users.
__all__ = [
    "MIN_POLL_TIMEOUT_MS",
    "AgentSettings",
    "ArchiveSettings",
    "BearerAuth",
    "ConfigError",
    "ConsumerSettings",
    "HmacAuth",
    "ImapSettings",
    "KafkaSettings",
    "MailboxSettings",
    "NoAuth",
    "RouterSettings",
    "RuleMatch",
    "RuleSettings",
    "Settings",
    "SmtpSettings",
    "TeamSettings",
    "TwilioSettings",
    "WebhookSettings",
    "WebhooksSettings",
    "adapter_settings",
    "config_path",
    "known_env_vars",
    "load_settings",
    "masked_dump",
    "read_config",
    "section_settings",
]


class EvidenceSettings(BaseSettings):
    """What is kept of refused requests that are recorded as dead letters ([evidence])."""

    model_config = SettingsConfigDict(env_prefix="SWITCHBOARD_EVIDENCE_", extra="ignore")

    per_minute: int = Field(
        default=10,
        ge=0,
        description=(
            "Refused requests kept as dead letters per route in any minute; the rest are "
            "only counted (switchboard_evidence_dropped_total). 0 keeps none."
        ),
    )
    max_bytes: int = Field(
        default=4096, ge=0, description="Bytes of a refused request's body that are stored."
    )
    log_every_s: float = Field(
        default=60.0, gt=0, description="At most one log line per route per this, when over."
    )


class BlobSettings(BaseSettings):
    """Retention of the blob store ([blobs]): what `switchboard blobs gc` deletes."""

    model_config = SettingsConfigDict(env_prefix="SWITCHBOARD_BLOBS_", extra="ignore")

    retention_days: float = Field(
        default=30,
        gt=0,
        description=(
            "Blobs no stored message references are deleted once older than this; a "
            "younger one is kept (its message may still be in the spool or on Kafka)."
        ),
    )
    gc_interval_h: float = Field(
        default=24, gt=0, description="How often `switchboard run` collects blobs."
    )
    gc_enabled: bool = Field(
        default=True, description="Collect blobs periodically in `run` and `router`."
    )
    layout: Literal["packs", "files"] = Field(
        default="packs",
        description=(
            "How blobs under 1 MiB are written: `packs` (appended to each process's "
            "pack files, one sync for many) or `files` (a file each). Either reads both."
        ),
    )


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
    journal: bool = Field(
        default=True,
        description=(
            "On the embedded broker only: keep every accepted message in the spool file "
            "until the queue has it, and publish it again after a crash or a broker restart."
        ),
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
    worker_timeout_s: float = Field(
        default=30.0,
        ge=5,
        le=3600,
        description=(
            "A worker of `ingest http|smtp --workers N` whose event loop has not "
            "answered its supervisor for this long is killed and replaced."
        ),
    )
    shutdown_timeout_s: float = Field(
        default=8.0, gt=0, le=60, description="Longest a graceful stop may take before forcing."
    )
    event_loop: Literal["auto", "asyncio"] = Field(
        default="auto",
        description=(
            "auto: uvloop in every process (the SMTP edge's too since 2026-12-02); "
            "asyncio: asyncio's own loop everywhere."
        ),
    )
    public_url: str | None = Field(
        default=None,
        description=(
            "Public base URL the HTTP app is reached at (https://hooks.example.com), "
            "for signature checks behind a TLS-terminating proxy."
        ),
    )
    http: HttpLimitSettings = Field(
        default_factory=HttpLimitSettings, description="HTTP server limits ([http])."
    )
    kafka: KafkaSettings = Field(default_factory=KafkaSettings, description="Kafka connection.")
    router: RouterSettings = Field(default_factory=RouterSettings, description="Routing.")
    spool: SpoolSettings = Field(default_factory=SpoolSettings, description="Ingest spool.")
    consumers: ConsumerSettings = Field(
        default_factory=ConsumerSettings, description="Consumer runtime: retries, poison policy."
    )
    evidence: EvidenceSettings = Field(
        default_factory=EvidenceSettings, description="Evidence of refused requests."
    )
    blobs: BlobSettings = Field(default_factory=BlobSettings, description="Blob retention.")
    archive: ArchiveSettings = Field(
        default_factory=ArchiveSettings, description="Archive sink ([archive])."
    )
    agents: AgentSettings = Field(
        default_factory=AgentSettings, description="Agents' sign-in ([agents])."
    )
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "Host names the HTTP app answers to (comma-separated); always also the "
            "loopback names and the public URL's host. Others get 400."
        ),
    )
    teams: list[TeamSettings] = Field(
        default_factory=_one_team,
        description="Teams ([[teams]]); without any, one team 'support' owns everything.",
    )
    rules: list[RuleSettings] = Field(default_factory=list, description="Rules ([[rules]]).")
    adapters: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description=(
            "[adapters.<name>] tables: enable and configure an installed adapter, the "
            "built-in channels included (`enabled = false` switches any adapter off). "
            "The historic [smtp], [twilio], [imap] and [[webhooks]] arrive here too."
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

    @field_validator("database_url", "queue_database_url")
    @classmethod
    def _known_database(cls, value: SecretStr | None) -> SecretStr | None:
        """A URL SQLAlchemy has a dialect for, checked here and not named (it holds
        the password): `postgresq://...` passed `config check` and failed at start
        with a traceback (operator review, 2026-12-01)."""
        if value is None:
            return value
        try:
            make_url(value.get_secret_value()).get_dialect()
        except Exception as exc:  # noqa: BLE001 - any refusal: not a usable URL
            raise ValueError(
                f"not a database URL SQLAlchemy knows ({type(exc).__name__}): use "
                "sqlite:///path/to/file.db or postgresql://user:password@host:5432/db"
            ) from None
        return value

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _host_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

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

    def archive_root(self) -> str:
        return self.archive.root or str(self.data_dir / "archive")

    def resolved_database_url(self) -> str:
        if self.database_url is not None:
            return self.database_url.get_secret_value()
        return f"sqlite:///{(self.data_dir / 'switchboard.db').resolve()}"


#: Config-file sections and the settings class each one fills.
SECTIONS: dict[str, type[BaseSettings]] = {
    "http": HttpLimitSettings,
    "kafka": KafkaSettings,
    "router": RouterSettings,
    "spool": SpoolSettings,
    "consumers": ConsumerSettings,
    "evidence": EvidenceSettings,
    "blobs": BlobSettings,
    "archive": ArchiveSettings,
    "agents": AgentSettings,
}
#: Config-file sections that are arrays of tables ([[teams]]).
LIST_SECTIONS: dict[str, type[BaseModel]] = {
    "teams": TeamSettings,
    "rules": RuleSettings,
}
#: The historic sections of the four built-in channels, kept so that existing files
#: keep working: each is another spelling of an adapter's table (name, and the field
#: an array of tables fills: [[webhooks]] is [[adapters.webhook.hooks]]). A fixed
#: list, not an extension point: new adapters have only [adapters.<name>].
ALIASES: dict[str, tuple[str, str | None]] = {
    "smtp": ("smtp", None),
    "twilio": ("twilio", None),
    "imap": ("imap", None),
    "webhooks": ("webhook", "hooks"),
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


def read_config(path: Path, *, secrets: bool = True) -> dict[str, Any]:
    """Parse and shape-check the file; errors name the file and the exact key.
    ``secrets``: every ``*_env`` variable the file names must be set."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    # Every problem at once, named as the file spells it: someone setting up a new
    # deployment fixes them in one go. (It stopped at the first: a file with a
    # missing secret and two misspelt keys took three runs; operator review.)
    problems: list[str] = []
    missing = list(_unset_secrets(data)) if secrets else []
    if missing:
        problems.append(f"{path}: environment variables not set: {', '.join(missing)}")
    sections: dict[str, Any] = {}
    for name, section in data.items():
        try:
            _check_shape(path, name, section)
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        if name in LIST_SECTIONS:
            sections[name] = section
        elif name in SECTIONS:
            unknown = [key for key in section if key not in SECTIONS[name].model_fields]
            problems += [f"{path}: unknown key {name}.{key}" for key in unknown]
            sections[name] = section
    # The secrets already named missing are not named again by each table's check.
    required, SECRETS.required = SECRETS.required, SECRETS.required and not missing
    try:
        sections["adapters"] = _adapter_tables(path, data, problems)
    finally:
        SECRETS.required = required
    if problems:
        raise ConfigError("; ".join(problems))
    return sections


def _check_shape(path: Path, name: str, section: object) -> None:
    """A known section, a table or an array of tables as it should be."""
    if name == "adapters":
        if not isinstance(section, dict) or not all(isinstance(t, dict) for t in section.values()):
            raise ConfigError(f"{path}: adapters must hold tables, like [adapters.mailgun]")
    elif name in LIST_SECTIONS or ALIASES.get(name, ("", None))[1] is not None:
        if not isinstance(section, list):
            raise ConfigError(f"{path}: {name} must be an array of tables, like [[{name}]]")
    elif name not in SECTIONS and name not in ALIASES:
        known = ", ".join(sorted([*SECTIONS, *LIST_SECTIONS, *ALIASES, "adapters"]))
        raise ConfigError(f"{path}: unknown section [{name}] (known: {known})")
    elif not isinstance(section, dict):
        raise ConfigError(f"{path}: {name} must be a table, like [{name}]")


def _adapter_tables(
    path: Path, data: dict[str, Any], problems: list[str]
) -> dict[str, dict[str, Any]]:
    """Every [adapters.<name>] table, the historic sections folded in, each checked
    against the installed adapter's settings; what is wrong is added to ``problems``,
    in the spelling of the file."""
    adapters = data.get("adapters", {})
    if not isinstance(adapters, dict):
        adapters = {}  # its shape is reported already
    tables: dict[str, dict[str, Any]] = {
        n: dict(t) for n, t in adapters.items() if isinstance(t, dict)
    }
    spelled = {name: f"adapters.{name}" for name in tables}
    for alias, (name, field) in ALIASES.items():
        if alias not in data or not isinstance(data[alias], list if field else dict):
            continue  # absent, or its wrong shape is reported already
        table: dict[str, Any] = {field: data[alias]} if field else dict(data[alias])
        given = tables.get(name)
        if given is not None:
            # [adapters.<name>] enabled = false beside the historic section was the
            # way to switch a built-in off; anything more is the same table twice.
            twice = sorted((set(given) - {"enabled"}) | (set(given) & set(table)))
            if twice:
                problems.append(
                    f"{path}: {name} is configured twice, in [{alias}] and [adapters.{name}] "
                    f"({', '.join(twice)}): use one ([{alias}] is the historic spelling of "
                    f"[adapters.{name}])"
                )
                continue
            table.update(given)
        tables[name] = table
        spelled[name] = alias
    for name, table in tables.items():
        try:
            _check_adapter_table(path, name, table, spelled[name])
        except ConfigError as exc:
            problems.append(str(exc))
    return tables


def _check_adapter_table(path: Path, name: str, table: dict[str, Any], spelled: str) -> None:
    where = f"{path}: [{spelled}]"
    try:
        adapter = get(name)
    except AdapterError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    if not isinstance(table.get("enabled", True), bool):
        raise ConfigError(f"{where}: enabled must be true or false")
    cls = adapter.settings_class
    _, field = ALIASES.get(spelled, (name, None))
    if field is not None:  # an array of tables at the top ([[webhooks]])
        values = {k: v for k, v in table.items() if k != "enabled" or k in cls.model_fields}
        section_settings(cls, values, spelled, wrapped=field)
        return
    unknown = sorted(set(table) - {"enabled"} - set(cls.model_fields))
    if unknown and spelled in ALIASES:
        raise ConfigError(f"{path}: unknown key {spelled}.{unknown[0]}")
    if unknown:
        raise ConfigError(f"{where}: unknown key {', '.join(unknown)}")
    if spelled in ALIASES:
        section_settings(cls, table, spelled)
    else:
        adapter_settings(cls, table, name)


def _tables(section: str, items: list[Any]) -> list[Any]:
    """Validate an array of tables; errors name the entry by its name or index."""
    model = LIST_SECTIONS[section]
    parsed = []
    for index, item in enumerate(items):
        label = item.get("name", index) if isinstance(item, dict) else index
        try:
            parsed.append(model.model_validate(item))
        except ValidationError as exc:
            raise ConfigError(validation_errors(exc, f"{section}[{label}]", item)) from exc
    return parsed


def _unset_secrets(value: object, where: str = "") -> Iterator[str]:
    """``NAME (key)`` for every ``*_env`` key of the file whose variable is unset or empty."""
    if isinstance(value, dict):
        for key, item in value.items():
            path = f"{where}.{key}" if where else str(key)
            if str(key).endswith("_env") and isinstance(item, str):
                if not os.environ.get(item):
                    yield f"{item} ({path})"
            else:
                yield from _unset_secrets(item, path)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            label = item.get("name", index) if isinstance(item, dict) else index
            yield from _unset_secrets(item, f"{where}[{label}]")


def load_settings(path: Path | None = None, *, secrets: bool = True) -> Settings:
    """Environment variables, then the optional TOML file for what they leave unset.

    ``secrets=False``: for a process that runs no adapter (the router, a sink,
    `status`): the adapters' secrets need not be in its environment. Every role
    checked every hook's and mailbox's secret, so a router, `status` or `topics
    create` without the edges' secrets refused to start (operator review, 2026-12-01)."""
    file = config_path(path)
    sections = read_config(file, secrets=secrets) if file is not None else {}
    try:
        settings = Settings(
            config=file,
            http=section_settings(HttpLimitSettings, sections.get("http", {}), "http"),
            kafka=section_settings(KafkaSettings, sections.get("kafka", {}), "kafka"),
            router=section_settings(RouterSettings, sections.get("router", {}), "router"),
            spool=section_settings(SpoolSettings, sections.get("spool", {}), "spool"),
            consumers=section_settings(
                ConsumerSettings, sections.get("consumers", {}), "consumers"
            ),
            evidence=section_settings(EvidenceSettings, sections.get("evidence", {}), "evidence"),
            blobs=section_settings(BlobSettings, sections.get("blobs", {}), "blobs"),
            archive=section_settings(ArchiveSettings, sections.get("archive", {}), "archive"),
            agents=section_settings(AgentSettings, sections.get("agents", {}), "agents"),
            teams=_tables("teams", sections["teams"]) if "teams" in sections else _one_team(),
            rules=_tables("rules", sections.get("rules", [])),
            adapters=sections.get("adapters", {}),
        )
    except ValidationError as exc:
        raise ConfigError(validation_errors(exc, "", env_prefix="SWITCHBOARD_")) from exc
    # The environment alone configures the built-in channels (SWITCHBOARD_SMTP_PORT):
    # build every adapter that will run, so a bad variable stops here, by its name.
    for info in discover().values():
        if info.adapter is not None and info.adapter.enabled_in(settings):
            info.adapter.settings_from(settings)
    return settings


def _settings_classes() -> Iterator[type[BaseSettings]]:
    yield Settings
    yield from SECTIONS.values()
    for info in discover().values():  # installed adapters read SWITCHBOARD_<NAME>_*
        cls = getattr(info.adapter, "settings_class", None)
        if isinstance(cls, type) and issubclass(cls, BaseSettings) and cls not in SECTIONS.values():
            yield cls


def _holds_secret(annotation: Any) -> bool:  # noqa: ANN401 - any annotation
    if annotation is SecretStr:
        return True
    return any(_holds_secret(arg) for arg in get_args(annotation))


def secrets_in_file(settings: Settings) -> list[str]:
    """``[adapters.<name>] <key>`` for every credential (a ``SecretStr`` setting) the
    config file writes itself instead of leaving to the environment: the file is read
    by every process and often kept in version control. A third-party adapter's
    token written there passed `config check` silently (adapter engineer's review,
    2026-12-01)."""
    found = []
    for name, table in sorted(settings.adapters.items()):
        try:
            cls = get(name).settings_class
        except (AdapterError, AttributeError):
            continue  # reported by the loader already
        prefix = str(cls.model_config.get("env_prefix", ""))
        for key in sorted(table):
            info = cls.model_fields.get(key)
            if info is not None and _holds_secret(info.annotation):
                found.append(f"[adapters.{name}] {key} (set {(prefix + key).upper()} instead)")
    return found


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


def _shown_url(url: str) -> str:
    """A database URL without its secrets: password and secret-looking query values."""
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - unparsable: show nothing of it
        return "**********"
    query = {
        k: "***" if any(w in k.lower() for w in ("pass", "secret", "key")) else v
        for k, v in parsed.query.items()
    }
    return parsed.set(query=query).render_as_string(hide_password=True)


def masked_dump(settings: Settings) -> dict[str, Any]:
    """Settings as JSON-ready data with every secret replaced by asterisks; the
    database URLs as used (the SQLite default included), with their passwords masked."""
    data: dict[str, Any] = settings.model_dump(mode="json")
    data["database_url"] = _shown_url(settings.resolved_database_url())
    data["queue_database_url"] = _shown_url(settings.resolved_queue_database_url())
    return data
