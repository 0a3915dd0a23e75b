"""The sinks' settings: the archive ([archive]), agents' sign-in ([agents]). Read by
``switchboard.settings``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ArchiveSettings(BaseSettings):
    """The archive sink: every topic as Parquet files ([archive])."""

    model_config = SettingsConfigDict(env_prefix="SWITCHBOARD_ARCHIVE_", extra="ignore")

    enabled: bool = Field(
        default=True, description="Run the archive sink inside `switchboard run`."
    )
    root: str | None = Field(
        default=None,
        description=(
            "Directory or fsspec URL of the archive, e.g. s3://bucket/prefix "
            "(default: archive/ in the data dir)."
        ),
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "fsspec options for a URL root, e.g. {endpoint_url = ...} for S3; credentials "
            "belong in the file system's own variables (AWS_ACCESS_KEY_ID...), not here."
        ),
    )
    roll_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1,
        description="A partition's file is written once its buffered events reach this size.",
    )
    roll_s: float = Field(
        default=300.0,
        gt=0,
        description="... or once its oldest buffered event has waited this long (seconds).",
    )
    compression: Literal["zstd", "snappy", "gzip", "none"] = Field(
        default="zstd", description="Parquet compression codec."
    )
    iceberg: bool = Field(
        default=False,
        description=(
            "Keep the Apache Iceberg table switchboard.events over the files (local or s3:// "
            "roots; needs switchboard-inbound[iceberg])."
        ),
    )
    iceberg_catalog: str | None = Field(
        default=None,
        description=(
            "SQLAlchemy URL of the Iceberg SQL catalog (default: the project's database)."
        ),
    )
    # 1000, not the consumers' 100: the archive writes a file every roll_s (300 s), so
    # a second more to see a record costs nothing, while its fetches, every partition
    # of every topic at once, were about a third of an idle `switchboard run`'s CPU
    # (15.6% of a core with the broker at 100 ms; measured 2026-12-01, slow boot).
    fetch_max_wait_ms: int = Field(
        default=1000,
        ge=10,
        le=5000,
        description=(
            "Longest the archive's fetch waits for records (its own; the router and the "
            "queue use [kafka] fetch_max_wait_ms, 100 ms, for latency)."
        ),
    )
    group_id: str = Field(
        default="switchboard-archive",
        min_length=1,
        description="Consumer group; a second archive (another root) needs its own.",
    )


class AgentSettings(BaseSettings):
    """Agents' sign-in to the queue page ([agents])."""

    model_config = SettingsConfigDict(env_prefix="SWITCHBOARD_AGENTS_", extra="ignore")

    session_hours: float = Field(
        default=12.0, gt=0, le=24 * 30, description="A sign-in session ends after this long."
    )
    login_failures_per_client: int = Field(
        default=20, ge=1, description="Failed sign-ins from one address before it must wait."
    )
    login_failures_per_account: int = Field(
        default=5, ge=1, description="Failed sign-ins of one account before it must wait."
    )
    login_window_s: float = Field(
        default=900.0, gt=0, description="The window the failed sign-ins are counted in."
    )
