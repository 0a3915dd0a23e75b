"""The adapter registry: entry points in, classes or clear errors out."""

from __future__ import annotations

from importlib.metadata import EntryPoint

import pytest

from ingest.registry import GROUP, AdapterError, discover, get, load
from ingest.smtp import SmtpAdapter

BUILT_IN = {"smtp", "imap", "twilio", "webhook"}


def test_the_built_in_adapters_are_registered_like_any_other() -> None:
    found = discover()
    assert set(found) >= BUILT_IN
    for name in BUILT_IN:
        info = found[name]
        assert info.error is None, info
        assert info.package == "switchboard"
        assert info.adapter.name == name
    assert get("smtp") is SmtpAdapter


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
