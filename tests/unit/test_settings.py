from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError

from ingest.imap import ImapAdapter
from ingest.sdk import Adapter
from ingest.smtp import SmtpAdapter
from ingest.twilio import TwilioAdapter
from ingest.webhook import WebhookAdapter
from switchboard.settings import (
    ConfigError,
    KafkaSettings,
    Settings,
    SmtpSettings,
    config_path,
    known_env_vars,
    load_settings,
    masked_dump,
)


def test_defaults_are_local_and_safe(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    settings = Settings()
    assert settings.bind_host == "127.0.0.1"
    smtp = SmtpAdapter.settings_from(settings)
    assert (smtp.port, settings.http_port) == (2525, 8080)
    assert smtp.domains == []
    assert settings.kafka.bootstrap is None
    assert settings.kafka.session_timeout_ms == 2000
    assert settings.kafka.heartbeat_interval_ms == 500
    assert settings.kafka.poll_timeout_ms >= 1500
    assert settings.resolved_database_url() == f"sqlite:///{tmp_path / 'var' / 'switchboard.db'}"


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWITCHBOARD_HTTP_PORT", "9090")
    monkeypatch.setenv("SWITCHBOARD_KAFKA_BOOTSTRAP", "k1:9092, k2:9092")
    monkeypatch.setenv("SWITCHBOARD_DATABASE_URL", "postgresql://u:pw@db/sb")
    monkeypatch.setenv("SWITCHBOARD_LOG_LEVEL", "debug")
    settings = Settings()
    assert settings.http_port == 9090
    assert settings.kafka.bootstrap_servers() == ["k1:9092", "k2:9092"]
    assert settings.resolved_database_url() == "postgresql://u:pw@db/sb"
    assert settings.log_level == "DEBUG"


def test_poll_timeout_below_the_join_floor_is_refused() -> None:
    with pytest.raises(ValidationError, match="1500"):
        KafkaSettings(poll_timeout_ms=500)


def test_bad_values_name_the_field(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SWITCHBOARD_CONFIG", raising=False)
    monkeypatch.setenv("SWITCHBOARD_SMTP_PORT", "seventy")
    # No file at all: the environment alone configures the SMTP server, and loading
    # builds it, so the variable is named before anything starts.
    with pytest.raises(ConfigError, match=r"adapters\.smtp\.port"):
        load_settings()


def test_masked_dump_never_shows_secrets() -> None:
    settings = Settings(
        database_url=SecretStr("postgresql://u:hunter2@db/sb"),
        kafka=KafkaSettings(sasl_password=SecretStr("kafka-s3cret")),
    )
    text = repr(masked_dump(settings)) + repr(settings) + str(settings)
    assert "hunter2" not in text
    assert "kafka-s3cret" not in text
    assert masked_dump(settings)["database_url"] == "postgresql://u:***@db/sb"


def test_sasl_options_reach_the_client_config() -> None:
    settings = KafkaSettings(
        bootstrap="k:9093",
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="sb",
        sasl_password=SecretStr("pw"),
    )
    config = settings.client_config()
    assert config["sasl_plain_password"] == "pw"
    assert config["security_protocol"] == "SASL_SSL"


def test_known_env_vars_lists_every_setting() -> None:
    names = known_env_vars()
    assert {"SWITCHBOARD_HTTP_PORT", "SWITCHBOARD_KAFKA_BOOTSTRAP", "SWITCHBOARD_DATA_DIR"} <= names
    assert "SWITCHBOARD_KAFKA" not in names


def test_smtp_domains_from_a_comma_list_become_idna(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWITCHBOARD_SMTP_DOMAINS", "Example.com, bücher.de ,")
    assert SmtpAdapter.settings_from(Settings()).domains == ["example.com", "xn--bcher-kva.de"]


def test_tls_cert_and_key_go_together() -> None:
    with pytest.raises(ValidationError, match="together"):
        SmtpSettings(tls_cert=Path("cert.pem"))


def test_config_file_fills_what_the_environment_leaves_unset(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "switchboard.toml"
    path.write_text(
        '[smtp]\ndomains = ["example.com"]\nmax_recipients = 10\n[kafka]\npartitions = 6\n'
    )
    monkeypatch.setenv("SWITCHBOARD_SMTP_MAX_RECIPIENTS", "20")
    settings = load_settings(path)
    smtp = SmtpAdapter.settings_from(settings)
    assert smtp.domains == ["example.com"]
    assert smtp.max_recipients == 20  # the environment wins
    assert settings.kafka.partitions == 6
    assert settings.config == path


def test_default_config_file_is_switchboard_toml_in_the_cwd(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SWITCHBOARD_CONFIG", raising=False)
    assert config_path() is None
    (tmp_path / "switchboard.toml").write_text("[smtp]\n")
    assert config_path() == Path("switchboard.toml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[smtp]\ndomian = ["x"]\n', "unknown key smtp.domian"),
        ("[smpt]\n", "unknown section [smpt]"),
        ("[smtp]\nmax_recipients = 0\n", "smtp.max_recipients"),
        ("[smtp\n", "not valid TOML"),
        ("smtp = 3\n", "must be a table"),
        ('[twilio]\naccount_sids = ["AC1"]\n', "twilio.account_sids"),
        ("[evidence]\nper_minute = -1\n", "evidence.per_minute"),
        ("[blobs]\nretention_days = 0\n", "blobs.retention_days"),
        (
            '[[webhooks]]\nname = "f"\nmap = { email = "e" }\n'
            'auth = { kind = "hmac-sha256", secret_env = "HOME", signed_headers = ["a b"] }\n',
            "webhooks[f].auth.signed_headers",
        ),
        (
            '[[webhooks]]\nname = "f"\nmap = { email = "e" }\n'
            'auth = { kind = "hmac-sha256", secret_env = "HOME" }\n',
            "webhooks[f].auth: auth.timestamp_header is not set",
        ),
        (
            '[[webhooks]]\nname = "f"\nmap = { email = "e" }\n'
            'auth = { kind = "none" }\nverified = ["email"]\n',
            "verified: a hook with auth = none can be posted by anyone",
        ),
        ('[router]\nmerge_policy = "trusting"\n', "router.merge_policy"),
        ("[consumers]\nmax_attempts = 0\n", "consumers.max_attempts"),
    ],
)
def test_config_errors_name_the_exact_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_settings(path)


def test_twilio_accounts_and_signed_headers_are_normalized(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    account = "AC" + "0123456789abcdef" * 2
    monkeypatch.setenv("SWITCHBOARD_TWILIO_ACCOUNT_SIDS", f"{account}, {account}")
    monkeypatch.setenv("FORM_SECRET", "s")
    path = tmp_path / "ok.toml"
    path.write_text(
        '[[webhooks]]\nname = "f"\nmap = { email = "e" }\n'
        'auth = { kind = "hmac-sha256", secret_env = "FORM_SECRET", '
        'timestamp_header = "X-Timestamp", signed_headers = ["Idempotency-Key"] }\n'
    )
    settings = load_settings(path)
    assert TwilioAdapter.settings_from(settings).account_sids == [account, account]
    auth = WebhookAdapter.settings_from(settings).hooks[0].auth
    assert getattr(auth, "signed_headers", None) == ["idempotency-key"]
    assert (settings.evidence.per_minute, settings.evidence.max_bytes) == (10, 4096)
    assert settings.blobs.retention_days == 30


def test_every_unset_secret_is_named_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("FORM_SECRET", "CHAT_TOKEN", "BOX_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "switchboard.toml"
    path.write_text(
        '[[imap.mailboxes]]\nname = "support"\nhost = "imap.example.com"\n'
        'username = "s@example.com"\npassword_env = "BOX_PASSWORD"\n'
        '[[webhooks]]\nname = "form"\nmap = { email = "e" }\n'
        'auth = { kind = "hmac-sha256", secret_env = "FORM_SECRET", allow_replay = true }\n'
        '[[webhooks]]\nname = "chat"\nmap = { email = "e" }\n'
        'auth = { kind = "bearer", token_env = "CHAT_TOKEN" }\n'
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert str(caught.value) == f"{path}: " + (
        "environment variables not set: BOX_PASSWORD (imap.mailboxes[support].password_env), "
        "FORM_SECRET (webhooks[form].auth.secret_env), CHAT_TOKEN (webhooks[chat].auth.token_env)"
    )


def test_errors_name_the_key_as_the_readme_writes_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # not the checkout's own ./switchboard.toml
    monkeypatch.delenv("SWITCHBOARD_CONFIG", raising=False)
    monkeypatch.setenv("SWITCHBOARD_HTTP_PORT", "eighty")
    # The variable the value came from first (it was only the setting's name).
    with pytest.raises(
        ConfigError, match=r"^SWITCHBOARD_HTTP_PORT \(http_port\): Input should be a valid integer"
    ):
        load_settings()


# The four built-in channels are adapters configured like any other, in
# [adapters.<name>]; their historic sections are aliases of those tables.
HISTORIC_AND_ADAPTER_SPELLINGS = {
    "smtp": (
        '[smtp]\ndomains = ["example.com"]\nmax_recipients = 10\nverify = false\n',
        '[adapters.smtp]\ndomains = ["example.com"]\nmax_recipients = 10\nverify = false\n',
    ),
    "twilio": (
        '[twilio]\ndefault_region = "GB"\ndownload_media = true\n',
        '[adapters.twilio]\ndefault_region = "GB"\ndownload_media = true\n',
    ),
    "imap": (
        '[imap]\npoll_interval_s = 5\n[[imap.mailboxes]]\nname = "support"\n'
        'host = "imap.example.com"\nusername = "s@example.com"\npassword_env = "HOME"\n',
        '[adapters.imap]\npoll_interval_s = 5\n[[adapters.imap.mailboxes]]\nname = "support"\n'
        'host = "imap.example.com"\nusername = "s@example.com"\npassword_env = "HOME"\n',
    ),
    "webhook": (
        '[[webhooks]]\nname = "form"\nmap = { email = "e" }\nauth = { kind = "none" }\n',
        '[[adapters.webhook.hooks]]\nname = "form"\nmap = { email = "e" }\n'
        'auth = { kind = "none" }\n',
    ),
}
ADAPTERS: dict[str, type[Adapter[Any]]] = {
    "smtp": SmtpAdapter,
    "twilio": TwilioAdapter,
    "imap": ImapAdapter,
    "webhook": WebhookAdapter,
}


@pytest.mark.parametrize("name", sorted(HISTORIC_AND_ADAPTER_SPELLINGS))
def test_historic_sections_and_adapter_tables_give_the_same_settings(
    name: str, tmp_path: Path
) -> None:
    historic, table = HISTORIC_AND_ADAPTER_SPELLINGS[name]
    adapter = ADAPTERS[name]
    built = []
    for text in (historic, table):
        path = tmp_path / "switchboard.toml"
        path.write_text(text)
        settings = load_settings(path)
        assert adapter.enabled_in(settings)
        built.append(adapter.settings_from(settings))
    assert built[0] == built[1]
    assert built[0] != adapter.settings_from(Settings())  # the file did say something


def test_the_environment_wins_over_either_spelling(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SWITCHBOARD_SMTP_PORT", "2626")
    path = tmp_path / "switchboard.toml"
    for text in ("[smtp]\nport = 2727\n", "[adapters.smtp]\nport = 2727\n"):
        path.write_text(text)
        assert SmtpAdapter.settings_from(load_settings(path)).port == 2626


@pytest.mark.parametrize(
    "text",
    [
        '[smtp]\ndomains = ["a.example"]\n[adapters.smtp]\nmax_recipients = 5\n',
        "[twilio]\nenabled = true\n[adapters.twilio]\nenabled = false\n",
        '[[webhooks]]\nname = "f"\nmap = { email = "e" }\nauth = { kind = "none" }\n'
        '[[adapters.webhook.hooks]]\nname = "g"\nmap = { email = "e" }\nauth = { kind = "none" }\n',
        "[imap]\npoll_interval_s = 5\n[adapters.imap]\npoll_interval_s = 5\n",
    ],
)
def test_both_spellings_at_once_are_a_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "both.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"is configured twice, in \[\w+\] and \[adapters\.\w+\]"):
        load_settings(path)


def test_enabled_false_beside_a_historic_section_still_switches_it_off(tmp_path: Path) -> None:
    # The documented way to switch a built-in off before [adapters.<name>] took settings.
    path = tmp_path / "off.toml"
    path.write_text('[twilio]\ndefault_region = "GB"\n[adapters.twilio]\nenabled = false\n')
    settings = load_settings(path)
    assert not TwilioAdapter.enabled_in(settings)
    assert TwilioAdapter.settings_from(settings).default_region == "GB"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[adapters.smtp]\nmax_recipients = 0\n", "adapters.smtp.max_recipients"),
        ('[adapters.smtp]\ndomian = ["x"]\n', "[adapters.smtp]: unknown key domian"),
        (
            '[[adapters.webhook.hooks]]\nname = "f"\nmap = { email = "e" }\n'
            'auth = { kind = "hmac-sha256", secret_env = "HOME" }\n',
            "adapters.webhook.hooks[f].auth: auth.timestamp_header is not set",
        ),
        (
            '[[webhooks]]\nname = "f"\nmap = { email = "e" }\nauth = { kind = "none" }\n'
            '[[webhooks]]\nname = "f"\nmap = { email = "e" }\nauth = { kind = "none" }\n',
            "webhooks: web hook names must be unique",
        ),
        ("[[adapters.imap.mailboxes]]\nname = 3\n", "adapters.imap.mailboxes[0].name"),
    ],
)
def test_adapter_table_errors_name_the_key_as_spelled(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_settings(path)
