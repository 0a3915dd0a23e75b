"""Routing configuration from settings: teams, rules, guards, windows."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from normalize.identity import IdentityError, email_identity, parse_identity_key, phone_identity
from router.decide import RoutingConfig, Rule, Team
from router.settings import RouterSettings, RuleSettings, TeamSettings


def _identity_key(value: str) -> str:
    """``sales@example.com`` or ``+1 415 555 0199`` (or an explicit key) as an identity key."""
    if value.startswith(("email:", "phone:", "external:")):
        return parse_identity_key(value).key
    if "@" in value:
        return email_identity(value).key
    return phone_identity(value).key


def routing_config(
    router: RouterSettings, teams: Sequence[TeamSettings], rules: Sequence[RuleSettings]
) -> RoutingConfig:
    """The router's own sections (``[router]``, ``[[teams]]``, ``[[rules]]``) as the
    pure router's config. Raises IdentityError for an inbox or blocked identity that
    is not an address."""
    found = []
    for index, rule in enumerate(rules):
        found.append(
            Rule(
                name=rule.name or f"rule-{index + 1}",
                team=rule.team,
                inbox=_identity_key(rule.match.inbox) if rule.match.inbox else None,
                channel=rule.match.channel,
                keywords=tuple(rule.match.keywords),
            )
        )
    try:
        blocked = frozenset(_identity_key(v) for v in router.blocked_identities)
    except IdentityError as exc:
        raise IdentityError(f"router.blocked_identities: {exc}") from exc
    return RoutingConfig(
        teams={t.name: Team(t.name, tuple(t.agents), t.assignment, t.capacity) for t in teams},
        default_team=router.default_team,
        rules=tuple(found),
        blocked_identities=blocked,
        max_identities_per_kind=router.max_identities_per_kind,
        idle_window=timedelta(hours=router.idle_window_h),
        merge_policy=router.merge_policy,
    )
