"""The router's settings: teams, rules, the merge policy ([router], [[teams]],
[[rules]]). Read by ``switchboard.settings``; turned into a RoutingConfig by
``router/config.py``."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _comma_list(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


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
    max_poll_records: int | None = Field(
        default=None,
        ge=1,
        le=20_000,
        description=(
            "Records routed in one transaction at most (one consumer poll); default "
            "2,000 on PostgreSQL, 1,000 on SQLite. A poll takes what has arrived: "
            "batches are small under light load and grow to this when routing is behind."
        ),
    )
    merge_policy: Literal["verified", "manual", "any"] = Field(
        default="verified",
        description=(
            "Who may link and merge contacts: 'verified' identities only (default); "
            "'manual': nothing merges by itself, agents confirm suggestions; 'any': every "
            "identity, even a stranger's form (closed deployments only)."
        ),
    )

    _split = field_validator("blocked_identities", mode="before")(_comma_list)

    def poll_records(self, backend: str) -> int:
        """``max_poll_records``, or the default for the database ``backend``: larger
        polls share their reads and commit among more records, and hold their locks
        longer. SQLite has one write lock for the whole file (agents' actions wait
        for a poll): 1,000 there, about 0.3 s of routing at saturation; measured
        with bench/routing.py, one SQLite router did 3,040-3,099 msg/s with polls of
        500, 3,329 with 1,000, 3,387-3,667 with 2,000."""
        if self.max_poll_records is not None:
            return self.max_poll_records
        return 1000 if backend == "sqlite" else 2000
