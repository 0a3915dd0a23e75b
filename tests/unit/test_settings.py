from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

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
    assert (settings.smtp.port, settings.http_port) == (2525, 8080)
    assert settings.smtp.domains == []
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


def test_bad_values_name_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWITCHBOARD_SMTP_PORT", "seventy")
    with pytest.raises(ValidationError, match="port"):
        Settings()


def test_masked_dump_never_shows_secrets() -> None:
    settings = Settings(
        database_url=SecretStr("postgresql://u:hunter2@db/sb"),
        kafka=KafkaSettings(sasl_password=SecretStr("kafka-s3cret")),
    )
    text = repr(masked_dump(settings)) + repr(settings) + str(settings)
    assert "hunter2" not in text
    assert "kafka-s3cret" not in text
    assert masked_dump(settings)["database_url"] == "**********"


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
    assert Settings().smtp.domains == ["example.com", "xn--bcher-kva.de"]


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
    assert settings.smtp.domains == ["example.com"]
    assert settings.smtp.max_recipients == 20  # the environment wins
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
    ],
)
def test_config_errors_name_the_exact_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_settings(path)
