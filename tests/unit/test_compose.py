"""docker-compose.yml stays correct without a Docker engine.

`docker-compose config` (Debian's docker-compose 1.29) validates the file
offline; the rest checks that every Switchboard service runs a real CLI
command and sets only real settings.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from switchboard.cli import build_parser
from switchboard.settings import known_env_vars
from tests import needs

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"


def _rendered(**extra: str) -> dict[str, Any]:
    """The file as docker-compose resolves it (anchors, merges, interpolation)."""
    docker_compose = needs.program("docker-compose")
    result = subprocess.run(
        [docker_compose, "-f", str(COMPOSE), "config"],
        env={
            **os.environ,
            "POSTGRES_PASSWORD": "compose-test",
            "SWITCHBOARD_SMTP_DOMAINS": "example.com",
            "SWITCHBOARD_PUBLIC_URL": "https://hooks.example.com",
            "SWITCHBOARD_API_TOKEN": "compose-test-token",
            "SWITCHBOARD_QUEUE_URL": "https://queue.example.com",
            **extra,
        },
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    rendered: dict[str, Any] = yaml.safe_load(result.stdout)
    return rendered


def _switchboard_services(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in config["services"].items()
        if service.get("image", "").startswith("switchboard")
    }


def test_compose_file_is_valid_and_has_the_production_pieces() -> None:
    config = _rendered()
    assert {"kafka", "postgres"} <= set(config["services"])
    assert "broker,controller" in str(config["services"]["kafka"]["environment"])
    assert _switchboard_services(config), "no switchboard service in docker-compose.yml"


def test_the_secrets_the_config_names_reach_every_switchboard_service(tmp_path: Path) -> None:
    """.env only fills ${...}: a hook's token_env or a mailbox's password_env never
    reached a container, and a stack with a signed hook could not start (operator
    review, 2026-12-01). The file SWITCHBOARD_ENV_FILE names is every service's."""
    secrets = tmp_path / "secrets.env"
    secrets.write_text("CHAT_TOKEN=from-the-env-file\n")
    services = _switchboard_services(_rendered(SWITCHBOARD_ENV_FILE=str(secrets)))
    assert services
    for name, service in services.items():
        assert service["environment"].get("CHAT_TOKEN") == "from-the-env-file", name
    # Without one, the committed example: no secret at all.
    for name, service in _switchboard_services(_rendered()).items():
        assert "CHAT_TOKEN" not in service["environment"], name


def test_the_queue_answers_to_the_host_agents_use() -> None:
    """Without a public URL the queue refused every Host but its own (400), and its
    session cookie was never Secure (operator review, 2026-12-01)."""
    queue = _rendered()["services"]["queue"]
    assert queue["environment"]["SWITCHBOARD_PUBLIC_URL"] == "https://queue.example.com"


def test_compose_refuses_to_start_without_a_database_password() -> None:
    docker_compose = needs.program("docker-compose")
    env = {k: v for k, v in os.environ.items() if k != "POSTGRES_PASSWORD"}
    env["SWITCHBOARD_SMTP_DOMAINS"] = "example.com"
    env["SWITCHBOARD_PUBLIC_URL"] = "https://hooks.example.com"
    env["SWITCHBOARD_API_TOKEN"] = "compose-test-token"
    result = subprocess.run(
        [docker_compose, "-f", str(COMPOSE), "config", "-q"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode != 0
    assert "POSTGRES_PASSWORD" in result.stderr


def test_every_switchboard_service_runs_a_real_command() -> None:
    parser = build_parser()
    for name, service in _switchboard_services(_rendered()).items():
        command = service.get("command")
        assert isinstance(command, list), f"{name}: command must be an argv list"
        assert command, f"{name}: empty command"
        try:
            args = parser.parse_args(command)
        except SystemExit:
            pytest.fail(f"service {name!r} runs `switchboard {' '.join(command)}`, not a command")
        assert callable(args.func), name


def test_every_switchboard_env_var_is_a_real_setting() -> None:
    known = known_env_vars()
    for name, service in _switchboard_services(_rendered()).items():
        for variable in service.get("environment", {}):
            if variable.startswith("SWITCHBOARD_"):
                assert variable in known, f"{name}: {variable} is not a setting"


def test_each_role_has_its_service() -> None:
    commands = {tuple(s["command"]) for s in _switchboard_services(_rendered()).values()}
    expected = {
        ("ingest", "smtp"),
        ("ingest", "http"),
        ("ingest", "imap"),
        ("topics", "create"),
        ("router",),
        ("sink", "queue"),
    }
    assert expected <= commands


def test_the_image_runs_the_switchboard_cli() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["switchboard"]' in dockerfile
    for package in ("switchboard", "ingest", "normalize", "router", "sinks"):
        assert f"COPY {package} ./{package}" in dockerfile
