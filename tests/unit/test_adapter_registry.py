"""The adapter registry: entry points in, classes or clear errors out."""

from __future__ import annotations

import os
import tomllib
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from ingest.mailgun import MailgunAdapter
from ingest.registry import GROUP, AdapterError, discover, get, load
from ingest.smtp import SmtpAdapter
from switchboard.cli import DISTRIBUTION
from switchboard.settings import load_settings

BUILT_IN = {"smtp", "imap", "twilio", "webhook", "mailgun", "sendgrid", "postmark"}


def test_the_built_in_adapters_are_registered_like_any_other() -> None:
    found = discover()
    assert set(found) >= BUILT_IN
    for name in BUILT_IN:
        info = found[name]
        assert info.error is None, info
        assert info.package == "switchboard-inbound"
        assert info.adapter.name == name
    assert get("smtp") is SmtpAdapter


def test_adapters_depend_on_the_distributions_own_name_not_pypis_switchboard() -> None:
    """On PyPI "switchboard" is an unrelated project: an adapter package that
    depended on it, as the guide said, installed that (review, 2026-12-01)."""
    root = Path(__file__).parents[2]
    ours = tomllib.loads((root / "pyproject.toml").read_text())["project"]["name"]
    assert ours == DISTRIBUTION == "switchboard-inbound"
    example = tomllib.loads((root / "tests/example_adapter/pyproject.toml").read_text())
    assert example["project"]["dependencies"] == [ours]
    guide = (root / "docs/adding-a-channel.md").read_text()
    assert f'dependencies = ["{ours}"]' in guide
    assert 'dependencies = ["switchboard"]' not in guide


def test_an_unknown_adapter_is_a_clear_error_naming_what_is_installed() -> None:
    with pytest.raises(AdapterError, match=r"unknown adapter 'telegram' \(installed: .*smtp"):
        get("telegram")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("no_such_module_here:Adapter", "cannot import: ModuleNotFoundError"),
        ("json:dumps", "json:dumps is not an adapter: it has no name, settings_class"),
        ("ingest.smtp:SmtpAdapter", "registered as 'mail', but the class is named 'smtp'"),
    ],
)
def test_a_broken_adapter_is_listed_with_its_error_and_refused_by_name(
    value: str, message: str
) -> None:
    info = load(EntryPoint(name="mail", value=value, group=GROUP))
    assert info.adapter is None
    assert info.error is not None
    assert message in info.error
    with pytest.raises(AdapterError, match=r"adapter 'mail' from \? is broken"):
        get("mail", {"mail": info})


def test_the_config_file_enables_disables_and_configures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [n for n in os.environ if n.startswith("SWITCHBOARD_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("SWITCHBOARD_MAILGUN_SIGNING_KEY", "from-the-env")
    config = tmp_path / "switchboard.toml"
    config.write_text("[adapters.mailgun]\nmax_age_s = 120\n\n[adapters.twilio]\nenabled = false\n")
    settings = load_settings(config)
    enabled = {name: info.adapter.enabled_in(settings) for name, info in discover().items()}
    assert {k: v for k, v in enabled.items() if k in BUILT_IN} == {
        "smtp": True,  # built-ins run by their own sections' rules, as before
        "imap": False,  # no mailboxes
        "webhook": False,  # no [[webhooks]]
        "twilio": False,  # switched off here
        "mailgun": True,  # its table exists
        "sendgrid": False,  # installed, never run unasked
        "postmark": False,
    }
    mailgun = MailgunAdapter.settings_from(settings)
    assert mailgun.max_age_s == 120
    assert mailgun.signing_key is not None
    assert mailgun.signing_key.get_secret_value() == "from-the-env"
