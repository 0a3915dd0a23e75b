"""Deployment settings, read from ``SWITCHBOARD_*`` environment variables.

One pydantic-settings class per component; every field has a description and
credentials are ``SecretStr``, so :func:`masked_dump` (``switchboard config
show``) never prints a secret. Nothing is read at import time: call
:func:`load_settings` from the CLI.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

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
    linger_ms: int = Field(default=20, ge=0, le=1000, description="Producer batching delay.")
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


class Settings(BaseSettings):
    """Process-wide settings for `switchboard run` and the role commands."""

    model_config = SettingsConfigDict(env_prefix="SWITCHBOARD_", extra="ignore")

    bind_host: str = Field(
        default="127.0.0.1", description="Address the SMTP and HTTP servers listen on."
    )
    smtp_port: int = Field(default=2525, ge=0, le=65535, description="SMTP server port.")
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
    kafka: KafkaSettings = Field(default_factory=KafkaSettings, description="Kafka connection.")

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    def resolved_database_url(self) -> str:
        if self.database_url is not None:
            return self.database_url.get_secret_value()
        return f"sqlite:///{(self.data_dir / 'switchboard.db').resolve()}"


def load_settings() -> Settings:
    return Settings()


def _settings_classes() -> Iterator[type[BaseSettings]]:
    yield Settings
    yield KafkaSettings


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
            names.add(f"{prefix}{name}".upper())
    return names


def masked_dump(settings: Settings) -> dict[str, Any]:
    """Settings as JSON-ready data with every secret replaced by asterisks."""
    data: dict[str, Any] = settings.model_dump(mode="json")
    return data
