"""Even at DEBUG, logs never hold a customer's message.

aiosmtpd logs every DATA line and imapclient every FETCH response at DEBUG; with
`SWITCHBOARD_LOG_LEVEL=DEBUG` those loggers stay at INFO. Real SMTP server, real
Dovecot, real broker; the process's own logging configured as `switchboard` does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from switchboard.logs import CONTENT_LOGGERS, PROCESS_WIDE, LineWriter, configure_logging
from switchboard.settings import KafkaSettings
from tests.dovecot import Dovecot
from tests.imap_helpers import imap_adapter, mailbox, wait_for
from tests.smtp_helpers import smtp_server

pytestmark = pytest.mark.integration

SECRET_TEXT = "my card number is 4111 1111 1111 1111"


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def text(self) -> str:
        return "\n".join(f"{r.name} {r.getMessage()}" for r in self.records)


@pytest.fixture
def debug_logs() -> Iterator[_Collect]:
    """`switchboard`'s logging at DEBUG, collected; the previous set-up restored after."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    levels = {name: logging.getLogger(name).level for name in (*CONTENT_LOGGERS, "kafka")}
    # configure_logging switches off the records' caller, thread and process fields
    # for the whole process; pytest's own log sections show file and line.
    switches = {name: getattr(logging, name) for name in PROCESS_WIDE}
    configure_logging("DEBUG", "json")
    collect = _Collect()
    root.addHandler(collect)
    try:
        yield collect
    finally:
        for handler in root.handlers:
            if isinstance(handler, LineWriter):
                handler.close()  # its thread ended with it
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        for name, value in switches.items():
            setattr(logging, name, value)


def test_smtp_bodies_stay_out_of_debug_logs(
    kafka_settings: KafkaSettings, tmp_path: Path, unique: str, debug_logs: _Collect
) -> None:
    raw = (
        f"From: <alice@example.org>\r\nTo: support@example.com\r\nSubject: card\r\n"
        f"Message-ID: <{unique}@example.org>\r\n\r\n{SECRET_TEXT}\r\n"
    ).encode()
    with smtp_server(kafka_settings, tmp_path) as server:
        # Asked while the mail goes through: on uvloop no library logs a DEBUG line
        # of its own here (asyncio's loop logged its selector).
        assert logging.getLogger().isEnabledFor(logging.DEBUG), "DEBUG is on"
        code, _ = server.send(raw)
    assert code == 250
    text = debug_logs.text()
    assert "mail.log" in text, "the SMTP session was logged (at INFO)"
    assert SECRET_TEXT not in text


def test_envelope_addresses_stay_out_of_the_smtp_servers_info_log(
    kafka_settings: KafkaSettings, tmp_path: Path, unique: str, debug_logs: _Collect
) -> None:
    raw = (
        f"From: <carol-{unique}@example.org>\r\nTo: support@example.com\r\n"
        f"Subject: hi\r\nMessage-ID: <{unique}@example.org>\r\n\r\nhello\r\n"
    ).encode()
    with smtp_server(kafka_settings, tmp_path) as server:
        code, _ = server.send(raw, mail_from=f"carol-{unique}@example.org")
    assert code == 250
    session = [r for r in debug_logs.records if r.name == "mail.log"]
    lines = "\n".join(r.getMessage() for r in session)
    # The session is still logged, verb by verb (smtplib sends them lower-case).
    assert ">> b'mail'" in lines.lower(), lines
    assert ">> b'rcpt'" in lines.lower(), lines
    assert f"carol-{unique}" not in lines
    assert "support@example.com" not in lines


def test_imap_bodies_stay_out_of_debug_logs(
    kafka_settings: KafkaSettings,
    tmp_path: Path,
    dovecot: Dovecot,
    unique: str,
    monkeypatch: pytest.MonkeyPatch,
    debug_logs: _Collect,
) -> None:
    dovecot.deliver(
        (
            f"From: <alice@example.org>\r\nTo: support@example.com\r\nSubject: card\r\n"
            f"Message-ID: <{unique}@example.org>\r\n\r\n{SECRET_TEXT}\r\n"
        ).encode()
    )
    box = mailbox(dovecot, f"dbg{unique}", monkeypatch.setenv)
    with imap_adapter(kafka_settings, tmp_path, [box]) as store:
        wait_for(lambda: any(s["ingested"] for s in store.status()), 20)
    text = debug_logs.text()
    assert any(r.levelno == logging.DEBUG for r in debug_logs.records), "DEBUG was on"
    assert SECRET_TEXT not in text
