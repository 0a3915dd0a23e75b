"""The other CLI commands, run as a user runs them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from sqlalchemy import inspect

from switchboard.broker import EmbeddedBroker
from switchboard.databases import describe, head_revisions
from switchboard.db import make_engine
from switchboard.kafka import make_consumer
from switchboard.settings import KafkaSettings
from switchboard.topics import ALL_TOPICS

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


#: Where the CLI runs: not the checkout, whose ./switchboard.toml (the quick start
#: saves one there) the CLI would read (a newcomer's `make test-quick` failed on it).
_NOWHERE = Path(tempfile.mkdtemp(prefix="switchboard-cli-test-"))


def _cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path = _NOWHERE
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
    return subprocess.run(
        [sys.executable, "-m", "switchboard.cli", *args],
        env={**base, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        check=False,
    )


@pytest.mark.slow
def test_broker_prints_its_address_and_stops_on_sigterm(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "switchboard.cli", "broker"],
        env={**os.environ, "SWITCHBOARD_DATA_DIR": str(tmp_path)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        address = process.stdout.readline().strip()  # type: ignore[union-attr]
        assert address.startswith("127.0.0.1:")
        settings = KafkaSettings(bootstrap=address)
        assert (
            _cli("topics", "create", env={"SWITCHBOARD_KAFKA_BOOTSTRAP": address}).returncode == 0
        )
        consumer = make_consumer(settings, group_id="cli", topics=[ALL_TOPICS[0]])
        try:
            assert set(ALL_TOPICS) <= consumer.topics()
        finally:
            consumer.close()
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=10)
        assert process.returncode == 0
        assert "memory only" in stderr
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.slow
def test_topics_create_is_idempotent_and_reports(kafka_broker: EmbeddedBroker) -> None:
    env = {"SWITCHBOARD_KAFKA_BOOTSTRAP": kafka_broker.bootstrap}
    _cli("topics", "create", env=env)
    again = _cli("topics", "create", env=env)
    assert again.returncode == 0, again.stderr
    assert all(f"exists  {t}" in again.stdout for t in ALL_TOPICS)


def test_topics_create_without_a_broker_says_which_setting() -> None:
    result = _cli("topics", "create")
    assert result.returncode == 2
    assert "SWITCHBOARD_KAFKA_BOOTSTRAP" in result.stderr


def test_status_with_another_data_dir_says_so_and_creates_nothing(tmp_path: Path) -> None:
    """`status` run with a data dir `switchboard run` never used created an empty
    SQLite database there and printed SQL errors about missing tables (newcomer
    review, 2026-12-02); it now says where it looked, and writes nothing."""
    data = tmp_path / "data"
    result = _cli("status", env={"SWITCHBOARD_DATA_DIR": str(data)})
    assert result.returncode == 0, result.stderr
    expected = f"no database at {data / 'switchboard.db'} (is SWITCHBOARD_DATA_DIR"
    assert f"router: unavailable ({expected}" in result.stdout, result.stdout
    assert f"queue: unavailable ({expected}" in result.stdout, result.stdout
    assert "OperationalError" not in result.stdout
    assert not data.exists()
    assert not (_NOWHERE / "var").exists()


def test_schema_export_check_passes_on_the_repository() -> None:
    result = _cli("schema", "export", "--check", cwd=ROOT)  # the checkout's schemas/
    assert result.returncode == 0, result.stderr


def test_config_show_masks_secrets_and_names_bad_settings() -> None:
    shown = _cli(
        "config",
        "show",
        env={"SWITCHBOARD_DATABASE_URL": "postgresql://u:hunter2@db/x"},
    )
    assert shown.returncode == 0
    assert "hunter2" not in shown.stdout
    assert json.loads(shown.stdout)["database_url"] == "postgresql://u:***@db/x"
    bad = _cli("config", "show", env={"SWITCHBOARD_HTTP_PORT": "eighty"})
    assert bad.returncode == 2
    assert "http_port" in bad.stderr


@pytest.mark.slow
def test_config_check_names_a_variable_nothing_reads(tmp_path: Path) -> None:
    """A misspelt SWITCHBOARD_KAFKA_BOOTSTRAP passed the check (operator review)."""
    env = {
        "SWITCHBOARD_KAFKA_BOOTSTRAPS": "127.0.0.1:19092",
        "SWITCHBOARD_KAFKA_BOOTSTRAP": "127.0.0.1:19092",
        "SWITCHBOARD_DATA_DIR": str(tmp_path),
    }
    result = _cli("config", "check", env=env)
    assert result.returncode == 0, result.stderr
    assert (
        "warning: SWITCHBOARD_KAFKA_BOOTSTRAPS is set but no setting reads it "
        "(did you mean SWITCHBOARD_KAFKA_BOOTSTRAP?)" in result.stderr
    )
    assert "SWITCHBOARD_DATA_DIR" not in result.stderr


def test_only_the_commands_that_run_adapters_need_their_secrets(tmp_path: Path) -> None:
    """A router, a sink, `status` or `topics create` refused to start without every
    hook's and mailbox's secret, so a compose stack whose edges alone had them never
    started (operator review, 2026-12-01)."""
    config = tmp_path / "switchboard.toml"
    config.write_text(
        '[[webhooks]]\nname = "chat"\nauth = { kind = "bearer", token_env = "CHAT_TOKEN" }\n'
        'map = { email = "email", text = "text" }\n'
    )
    env = {"SWITCHBOARD_CONFIG": str(config), "SWITCHBOARD_DATA_DIR": str(tmp_path / "var")}
    for command in (("config", "check"), ("ingest", "http")):
        refused = _cli(*command, env=env)
        assert refused.returncode == 2, command
        assert "CHAT_TOKEN" in refused.stderr, command
    status = _cli("status", "--json", env=env)
    assert status.returncode == 0, status.stderr
    assert "CHAT_TOKEN" not in status.stderr
    router = _cli("router", env=env)  # past the configuration, to the missing Kafka
    assert router.returncode == 1
    assert "no Kafka: set SWITCHBOARD_KAFKA_BOOTSTRAP" in router.stderr, router.stderr


def test_config_check_refuses_a_database_url_without_a_dialect(tmp_path: Path) -> None:
    """`postgresq://...` passed the check and failed at start with a traceback
    (operator review, 2026-12-01); the URL holds a password, never printed."""
    env = {"SWITCHBOARD_DATABASE_URL": "postgresq://agent:hunter2@db.example.com/switchboard"}
    result = _cli("config", "check", env=env)
    assert result.returncode == 2
    assert (
        "SWITCHBOARD_DATABASE_URL (database_url): not a database URL SQLAlchemy knows"
        in result.stderr
    )
    assert "hunter2" not in result.stderr


def test_config_check_warns_of_a_credential_written_in_the_file(tmp_path: Path) -> None:
    """Secrets belong in the environment; one written in the file passed silently
    (adapter engineer's review, 2026-12-01)."""
    config = tmp_path / "switchboard.toml"
    config.write_text('[adapters.mailgun]\nsigning_key = "in-the-file"\n')
    result = _cli("config", "check", str(config))
    assert result.returncode == 0, result.stderr
    assert (
        "warning: a credential written in the config file: [adapters.mailgun] signing_key "
        "(set SWITCHBOARD_MAILGUN_SIGNING_KEY instead)" in result.stderr
    )
    assert "in-the-file" not in result.stderr


def test_config_check_names_every_problem_of_the_file_at_once(tmp_path: Path) -> None:
    """A file with a missing secret and two misspelt keys took three runs to fix, one
    problem a run (operator review, 2026-12-01)."""
    config = tmp_path / "switchboard.toml"
    config.write_text(
        '[router]\ndefualt_team = "x"\n\n[smtp]\ndomains = ["example.com"]\nmax_recipents = 5\n'
        '\n[[webhooks]]\nname = "f"\nmap = { email = "email", text = "text" }\n'
        'auth = { kind = "bearer", token_env = "FORM_TOKEN" }\n'
    )
    result = _cli("config", "check", str(config))
    assert result.returncode == 2
    for problem in (
        "environment variables not set: FORM_TOKEN (webhooks[f].auth.token_env)",
        "unknown key router.defualt_team",
        "unknown key smtp.max_recipents",
    ):
        assert problem in result.stderr, result.stderr
    assert result.stderr.count("FORM_TOKEN") == 1  # named once, not by each check


def test_config_check_names_the_wrong_key(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[smtp]\ndomains = ["example.com"]\n')
    result = _cli("config", "check", str(good))
    assert result.returncode == 0, result.stderr
    assert str(good) in result.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('[smtp]\ndomains = ["example.com"]\nmax_recipents = 5\n')
    result = _cli("config", "check", str(bad))
    assert result.returncode == 2
    assert "unknown key smtp.max_recipents" in result.stderr


@pytest.mark.slow
def test_db_upgrade_reports_the_revision(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    first = _cli("db", "upgrade", env={"SWITCHBOARD_DATABASE_URL": url})
    again = _cli("db", "upgrade", env={"SWITCHBOARD_DATABASE_URL": url})
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == f"database at revision {describe(head_revisions())}"
    assert "queue queue_0009" in first.stdout  # one database: every stage's tables
    assert again.stdout == first.stdout


def test_db_upgrade_gives_a_queue_database_of_its_own_only_the_queue(tmp_path: Path) -> None:
    env = {
        "SWITCHBOARD_DATABASE_URL": f"sqlite:///{tmp_path / 'main.db'}",
        "SWITCHBOARD_QUEUE_DATABASE_URL": f"sqlite:///{tmp_path / 'queue.db'}",
    }
    result = _cli("db", "upgrade", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"database at revision {describe(head_revisions())}"
    engine = make_engine(env["SWITCHBOARD_QUEUE_DATABASE_URL"])
    main = make_engine(env["SWITCHBOARD_DATABASE_URL"])
    try:
        queue_tables = set(inspect(engine).get_table_names())
        main_tables = set(inspect(main).get_table_names())
    finally:
        engine.dispose()
        main.dispose()
    assert "alembic_version_queue" in queue_tables
    # The queue stage's tables: the read model and the agents who work it.
    queue_stage = ("queue_", "alembic_version_queue", "agent")
    assert all(t.startswith(queue_stage) for t in queue_tables)
    assert {"agents", "agent_sessions", "agent_tokens"} <= queue_tables
    assert {"contacts", "imap_checkpoints", "alembic_version_router"} <= main_tables
    assert not any(t.startswith(queue_stage) for t in main_tables)


@pytest.mark.slow
def test_adapters_list_shows_what_is_installed_and_what_the_config_enables(
    tmp_path: Path,
) -> None:
    config = tmp_path / "switchboard.toml"
    config.write_text(
        '[[webhooks]]\nname = "contact"\nauth = { kind = "none" }\n'
        'map = { email = "email", text = "text" }\n'
    )
    env = {"SWITCHBOARD_CONFIG": str(config), "SWITCHBOARD_TWILIO_ENABLED": "false"}
    result = _cli("adapters", "list", "--json", env=env)
    assert result.returncode == 0, result.stderr
    built_in = {"imap", "smtp", "twilio", "webhook"}  # other packages may add more
    rows = {row["name"]: row for row in json.loads(result.stdout) if row["name"] in built_in}
    assert {name: row["enabled"] for name, row in rows.items()} == {
        "imap": False,  # no mailboxes configured
        "smtp": True,
        "twilio": False,
        "webhook": True,
    }
    assert all(
        row["package"] == "switchboard-inbound" and row["error"] is None for row in rows.values()
    )
    text = _cli("adapters", "list", env=env).stdout
    assert "twilio     disabled  switchboard-inbound  ingest.twilio:TwilioAdapter" in text


def test_a_reader_that_leaves_the_pipe_early_is_no_error(tmp_path: Path) -> None:
    """`switchboard status | head` logged a BrokenPipeError traceback at error level
    (operator review, 2026-12-01)."""
    script = (
        "import sys\n"
        "from switchboard import cli\n"
        "def leaves(settings, args):\n"
        "    raise BrokenPipeError(32, 'Broken pipe')\n"
        "cli._cmd_status = leaves\n"
        "sys.exit(cli.main(['status']))\n"
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
    done = subprocess.run(
        [sys.executable, "-c", script],
        env={**base, "SWITCHBOARD_DATA_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert "failed" not in done.stderr
