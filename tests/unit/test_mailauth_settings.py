"""The sender-authentication settings, as an operator writes them."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from ingest.mailauth import Resolver, in_networks
from switchboard.settings import SmtpSettings


def test_lists_come_comma_separated_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWITCHBOARD_SMTP_DNS_SERVERS", "127.0.0.1:5353, [::1]:53,9.9.9.9")
    monkeypatch.setenv("SWITCHBOARD_SMTP_TRUSTED_RELAYS", "10.0.0.5, 10.0.1.0/24")
    monkeypatch.setenv("SWITCHBOARD_SMTP_TRUSTED_AUTHSERV_IDS", "MX.Example.com.")
    settings = SmtpSettings()
    assert settings.verify is True  # on unless said otherwise
    assert settings.dns_servers == ["127.0.0.1:5353", "[::1]:53", "9.9.9.9"]
    assert settings.trusted_relays == ["10.0.0.5/32", "10.0.1.0/24"]
    assert settings.trusted_authserv_ids == ["mx.example.com"]
    assert in_networks("10.0.1.77", settings.trusted_relays)
    assert not in_networks("10.0.2.1", settings.trusted_relays)
    assert not in_networks("not-an-address", settings.trusted_relays)
    resolver = Resolver(settings.dns_servers, 1.0, 10)
    servers = [str(n) for n in resolver._resolver.nameservers]
    assert servers == ["Do53:127.0.0.1@5353", "Do53:::1@53", "Do53:9.9.9.9@53"]


def test_a_relay_that_is_not_an_address_is_refused_at_start() -> None:
    with pytest.raises(ValidationError, match="trusted_relays"):
        SmtpSettings(trusted_relays=["mx.example.com"])


def test_a_resolver_named_by_host_name_is_refused() -> None:
    with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6 address"):
        Resolver(["dns.example.com"], 1.0, 10)
