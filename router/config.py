"""Routing configuration from settings: teams, rules, guards, windows."""

from __future__ import annotations

from datetime import timedelta

from normalize.identity import IdentityError, email_identity, parse_identity_key, phone_identity
from router.decide import RoutingConfig, Rule, Team
from switchboard.settings import Settings


def _identity_key(value: str) -> str:
    """``sales@example.com`` or ``+1 415 555 0199`` (or an explicit key) as an identity key."""
    if value.startswith(("email:", "phone:", "external:")):
        return parse_identity_key(value).key
    if "@" in value:
        return email_identity(value).key
    return phone_identity(value).key


def routing_config(settings: Settings) -> RoutingConfig:
    """Raises IdentityError for an inbox or blocked identity that is not an address."""
    rules = []
    for index, rule in enumerate(settings.rules):
        rules.append(
            Rule(
                name=rule.name or f"rule-{index + 1}",
                team=rule.team,
                inbox=_identity_key(rule.match.inbox) if rule.match.inbox else None,
                channel=rule.match.channel,
                keywords=tuple(rule.match.keywords),
            )
        )
    try:
        blocked = frozenset(_identity_key(v) for v in settings.router.blocked_identities)
    except IdentityError as exc:
        raise IdentityError(f"router.blocked_identities: {exc}") from exc
    return RoutingConfig(
        teams={
            t.name: Team(t.name, tuple(t.agents), t.assignment, t.capacity) for t in settings.teams
        },
        default_team=settings.router.default_team,
        rules=tuple(rules),
        blocked_identities=blocked,
        max_identities_per_kind=settings.router.max_identities_per_kind,
        idle_window=timedelta(hours=settings.router.idle_window_h),
    )
