"""[router], [[teams]] and [[rules]] in the config file, into a RoutingConfig."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import pytest

from router.config import routing_config
from router.decide import Routed, route
from router.settings import RouterSettings, RuleSettings, TeamSettings
from switchboard.settings import ConfigError, Settings, load_settings
from tests.factories import inbound_message
from tests.unit.test_router_decide import FakeDirectory

CONFIG = """
[router]
default_team = "support"
blocked_identities = ["Support@ACME.example.com", "+1 415 555 0199"]
max_identities_per_kind = 5
idle_window_h = 48

[[teams]]
name = "support"
agents = ["alice", "bob"]

[[teams]]
name = "sales"
agents = ["sam"]
assignment = "least-loaded"
capacity = 20

[[rules]]
name = "sales-inbox"
match = { inbox = "Sales@ACME.example.com" }
team = "sales"

[[rules]]
match = { channel = "sms", keywords = ["quote"] }
team = "sales"
"""


def _sections(
    settings: Settings,
) -> tuple[RouterSettings, list[TeamSettings], list[RuleSettings]]:
    return settings.router, list(settings.teams), list(settings.rules)


def test_defaults_without_a_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SWITCHBOARD_CONFIG", raising=False)
    config = routing_config(*_sections(load_settings()))
    assert list(config.teams) == ["support"]
    assert config.default_team == "support"
    assert config.idle_window == timedelta(hours=72)


def test_a_full_routing_file(tmp_path: Path) -> None:
    path = tmp_path / "switchboard.toml"
    path.write_text(CONFIG)
    config = routing_config(*_sections(load_settings(path)))
    assert config.teams["sales"].assignment == "least-loaded"
    assert config.teams["sales"].capacity == 20
    assert config.rules[0].inbox == "email:sales@acme.example.com"
    assert config.rules[1].name == "rule-2"
    assert config.blocked_identities == {"email:support@acme.example.com", "phone:+14155550199"}
    assert config.max_identities_per_kind == 5
    assert config.idle_window == timedelta(hours=48)
    message = inbound_message(recipients=())
    assert isinstance(route(message, FakeDirectory(), config), Routed)


EXTRA_RULE = '\n[[rules]]\nmatch = { inbox = "x" }\nteam = "sales"\nweight = 2\n'


@pytest.mark.parametrize(
    ("old", "new", "error"),
    [
        ('team = "sales"', 'team = "salez"', "rules[sales-inbox].team 'salez'"),
        ('agents = ["sam"]', 'agents = ["alice"]', "unique across teams: ['alice']"),
        ('default_team = "support"', 'default_team = "nobody"', "not a team"),
        ('{ inbox = "Sales@ACME.example.com" }', "{}", "rules[sales-inbox]"),
        ("capacity = 20", "capacity = 0", "teams[sales].capacity"),
    ],
)
def test_routing_errors_name_the_entry(tmp_path: Path, old: str, new: str, error: str) -> None:
    path = tmp_path / "switchboard.toml"
    assert old in CONFIG
    path.write_text(CONFIG.replace(old, new, 1))
    with pytest.raises(ConfigError, match=re.escape(error)):
        load_settings(path)


def test_an_unknown_key_in_a_rule_is_named(tmp_path: Path) -> None:
    path = tmp_path / "switchboard.toml"
    path.write_text(CONFIG + EXTRA_RULE)  # a third rule, index 2
    with pytest.raises(ConfigError, match=re.escape("rules[2].weight")):
        load_settings(path)
