"""The core's own settings: the Kafka clients and the consumer runtime. Each
stage's settings live in its package (``ingest/settings.py``,
``router/settings.py``); ``switchboard.settings`` reads the environment and the
TOML file and hands each section to its owner.

Also the one way a settings class is built from its table of the file
(:func:`section_settings`): the loader uses it for every section, and every
adapter (built-in or installed) for its ``[adapters.<name>]`` table, so both read
the environment and report errors the same way."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from switchboard.selector import QuietSelector

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
    embedded: bool = Field(
        default=False,
        description=(
            "One role alone (`switchboard ingest`, `router`, `sink`) without `bootstrap` "
            "starts an in-memory broker of its own only when this is true: everything it "
            "accepts is gone when it stops (only `switchboard run` keeps a journal). "
            "Without it such a role refuses to start (a missing or misspelt bootstrap "
            "variable lost every message an edge answered 2xx)."
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
    # 100, not kafka-python's 500: on Tansu a consumer hop waited up to 500 ms (end to
    # end p50 at 40 msg/s 248-253 ms with 500, 69-71 ms with 100; saturated throughput
    # the same within the spread: bench/e2e.py, 2026-11-29, README "End to end").
    fetch_max_wait_ms: int = Field(
        default=100,
        ge=10,
        le=5000,
        description=(
            "Longest a consumer's fetch waits for records. Tansu (the embedded broker) "
            "holds a fetch that found nothing for all of it, even when records arrive "
            "meanwhile, so there it adds up to this much to each consumer hop; Kafka "
            "answers as soon as records arrive."
        ),
    )
    # The router's and the sinks' producers: 5 ms batches a few more records a
    # produce request than 1 ms (end to end, every role on two cores: 656-765 msg/s at
    # 5 ms, 572-711 at 1 ms, 2026-11-30), and nobody waits on their acknowledgement.
    linger_ms: int = Field(
        default=5,
        ge=0,
        le=1000,
        description="Producer batching delay (the router and the sinks; see edge_linger_ms).",
    )
    # A process that runs an edge answers each sender only after the acknowledgement,
    # so its linger is every sender's wait, and at 64 connections two `ingest http`
    # processes sat at 65-75% CPU waiting on it. Both served at once and loaded in
    # alternation (bench/http_ab.py, 2026-12-02, medians of 4-5 rounds), 1 ms against
    # 5: +39-51% req/s at 16 connections; +14-24% at 64 where the edges had CPU to
    # spare, within the bench's ±20% spread (an A/A check); the same where they were
    # near their CPU's limit; 0.85-1.01 at 128-256 (pairs of 2026-11-30 had 5 ms 3-43%
    # better there); 0 ms took 17-19% less than 1, within that spread.
    # README "HTTP ingest", "The edge's linger, measured in alternation".
    edge_linger_ms: int = Field(
        default=1,
        ge=0,
        le=1000,
        description=(
            "Producer batching delay in a process that runs an edge (http, smtp, imap), "
            "whose senders wait for each acknowledgement."
        ),
    )
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
            "selector": QuietSelector,  # the default, minus a repr per wait (see there)
        }
        if self.sasl_mechanism:
            config["sasl_mechanism"] = self.sasl_mechanism
            config["sasl_plain_username"] = self.sasl_username
            if self.sasl_password is not None:
                config["sasl_plain_password"] = self.sasl_password.get_secret_value()
        if self.ssl_cafile:
            config["ssl_cafile"] = str(self.ssl_cafile)
        return config


class ConsumerSettings(BaseSettings):
    """The consumer runtime under the router and every sink ([consumers])."""

    model_config = SettingsConfigDict(env_prefix="SWITCHBOARD_CONSUMERS_", extra="ignore")

    max_attempts: int = Field(
        default=3,
        ge=1,
        le=100,
        description=(
            "Tries of a record that fails for a reason other than an outage; then it goes "
            "to the dead letter topic and the partition moves on."
        ),
    )
    backoff_max_s: float = Field(
        default=5.0, gt=0, le=300, description="Longest wait between retries during an outage."
    )
    stuck_after_s: float = Field(
        default=120.0,
        ge=5,
        description="/readyz reports a consumer that has made no progress for this long.",
    )


class ConfigError(ValueError):
    """The configuration file is unreadable or names an unknown or invalid key."""


def _where(prefix: str, loc: Sequence[int | str], data: object) -> str:
    """``prefix.a.b``, with a list entry named by its ``name`` (``hooks[form]``)."""
    where = prefix
    for part in loc:
        if isinstance(part, int) and isinstance(data, list) and part < len(data):
            data = data[part]
            named = data.get("name") if isinstance(data, dict) else None
            label = named if isinstance(named, str) else part
            where += f"[{label}]"
            continue
        if isinstance(data, dict) and part not in data and data.get("kind") == part:
            # A tagged union's chosen member (auth.hmac-sha256.header): the file has
            # only auth.header, with kind = "hmac-sha256" beside it.
            continue
        data = data.get(part) if isinstance(data, dict) else None
        where = f"{where}.{part}" if where else str(part)
    return where


def validation_errors(
    exc: ValidationError, prefix: str, data: object = None, env_prefix: str = ""
) -> str:
    """One line naming every wrong key of ``data`` under ``prefix``; an error of a
    check over the whole model (no key) is its message alone. A value that came from
    an environment variable (``env_prefix`` + the field) is named by that variable
    first: `SWITCHBOARD_SMTP_PORT=abc` was reported as the file's
    `adapters.smtp.port`, a key the file did not have (operator review, 2026-12-01)."""
    lines = []
    for error in exc.errors():
        where = _where(prefix, error["loc"], data)
        loc = error["loc"]
        variable = f"{env_prefix}{loc[0]}".upper() if env_prefix and loc else ""
        if variable and variable in os.environ:
            where = f"{variable} ({where})" if where else variable
        message = error["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {message}" if where else message)
    return "; ".join(lines)


def section_settings(
    cls: type[Any],
    section: Mapping[str, Any],
    name: str,
    *,
    wrapped: str | None = None,
) -> Any:  # noqa: ANN401
    """One settings class from its config-file table; environment variables (with the
    class's prefix) win over the file. ConfigError names the key that is wrong, under
    ``name``; ``wrapped``: the table's one field was spelled as the section itself (an
    array of tables at the top, [[webhooks]] for ``hooks``), so errors leave it out."""
    from_file = dict(section)
    env_prefix = ""
    if issubclass(cls, BaseSettings):
        env_prefix = str(cls.model_config.get("env_prefix", ""))
        from_file = {
            k: v for k, v in from_file.items() if f"{env_prefix}{k}".upper() not in os.environ
        }
    try:
        return cls(**from_file)
    except ValidationError as exc:
        if wrapped is None:
            raise ConfigError(validation_errors(exc, name, from_file, env_prefix)) from exc
        errors = [
            f"{_where(name, e['loc'][1:], from_file.get(wrapped))}: "
            f"{e['msg'].removeprefix('Value error, ')}"
            if e["loc"][:1] == (wrapped,)
            else f"{_where(name, e['loc'], from_file)}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        ]
        raise ConfigError("; ".join(errors)) from exc


def adapter_settings(cls: type[Any], table: Mapping[str, Any], name: str) -> Any:  # noqa: ANN401
    """An adapter's settings from its ``[adapters.<name>]`` table. ``enabled`` there
    belongs to the registry, unless the adapter's settings class has it too."""
    if "enabled" not in cls.model_fields:
        table = {k: v for k, v in table.items() if k != "enabled"}
    return section_settings(cls, table, f"adapters.{name}")
