"""Process hygiene: children die with switchboard, Ctrl-C stops it, status tells the truth."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata

from router.service import GROUP as ROUTER_GROUP
from switchboard.broker import EmbeddedBroker
from switchboard.settings import KafkaSettings, Settings
from switchboard.status import LAG_UNKNOWN, collect, format_lag, group_lag, partition_lag, render
from switchboard.topics import INBOUND, ensure_topics
from tests.e2e.test_run import (
    SWITCHBOARD,
    _alive,
    _children,
    _env,
    _wait_healthy,
    running,
    switchboard_status,
)

pytestmark = pytest.mark.e2e


def _descendants(pid: int) -> list[int]:
    found = []
    for child in _children(pid):
        found += [child, *_descendants(child)]
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return ""


def _wait_gone(pids: list[int], within_s: float = 10.0) -> list[int]:
    deadline = time.monotonic() + within_s
    while (alive := [p for p in pids if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


@pytest.mark.slow
def test_a_sigkilled_smtp_server_takes_its_parse_worker_and_broker_along(tmp_path: Path) -> None:
    env = _env(tmp_path, SWITCHBOARD_SMTP_DOMAINS="example.com", SWITCHBOARD_SMTP_PARSE_WORKERS="1")
    base = f"http://127.0.0.1:{env['SWITCHBOARD_HTTP_PORT']}"
    with running(env, tmp_path, "ingest", "smtp") as process:
        _wait_healthy(base, process, within_s=60)
        children = _descendants(process.pid)
        workers = [p for p in children if "from ingest.workers import _serve" in _cmdline(p)]
        brokers = [p for p in children if "tansu" in _cmdline(p) or "broker" in _cmdline(p)]
        # The worker starts with the server (warm), not with the first mail.
        assert workers, [_cmdline(p) for p in children]
        assert brokers, [_cmdline(p) for p in children]
        # The worker left the terminal's process group; so did the broker.
        for pid in workers + brokers:
            assert os.getpgid(pid) != os.getpgid(process.pid)

        process.kill()
        process.wait(10)
        assert _wait_gone(children) == [], [_cmdline(p) for p in children if _alive(p)]


def _kafka_close_race(line: str) -> bool:
    """kafka-python 3.0.12's own race at close, not what this test is about.

    ``KafkaTCPTransport._close`` sets ``_sock = None`` without a lock ("idempotent;
    no lock") while its network thread may be about to ``recv`` on it; the thread
    then logs the AttributeError with a traceback. Seen once in about eight runs of
    this test (2026-11-28); SIGINT takes SIGTERM's shutdown path, where eight runs
    did not show it. The same race seen from the selector: a socket closed (fd -1)
    while the network thread still had it registered, once in a full suite run on
    a loaded machine (2026-11-29), not in five runs of this test alone.
    """
    transport = (
        "kafka.net.transport" in line
        and "Error receiving network data" in line
        and "'NoneType' object has no attribute 'recv'" in line
    )
    selector = (
        '"logger": "kafka.net.selector"' in line
        and "Unhandled exception" in line
        and "Invalid file descriptor: -1" in line
    )
    return transport or selector


@pytest.mark.slow
def test_ctrl_c_in_a_terminal_stops_run_like_sigterm(tmp_path: Path) -> None:
    env = _env(tmp_path, SWITCHBOARD_SMTP_DOMAINS="example.com", SWITCHBOARD_SMTP_PARSE_WORKERS="1")
    base = f"http://127.0.0.1:{env['SWITCHBOARD_HTTP_PORT']}"
    # As a shell starts a foreground job: its own process group, which Ctrl-C signals whole.
    process = subprocess.Popen(
        [*SWITCHBOARD, "run"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _wait_healthy(base, process, within_s=60)
        children = _descendants(process.pid)
        os.killpg(process.pid, signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    assert process.returncode == 0, stderr[-3000:]
    assert "KeyboardInterrupt" not in stderr, stderr[-3000:]
    assert "ECONNREFUSED" not in stderr, stderr[-3000:]
    lines = stderr.splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert not [line for line in lines if "Traceback" in line and not _kafka_close_race(line)]
    problems = [
        r
        for r in records
        if r.get("level") in {"error", "critical"} and not _kafka_close_race(json.dumps(r))
    ]
    assert problems == [], problems
    assert any(
        r.get("msg") == "signal received, shutting down" and r.get("signal") == "SIGINT"
        for r in records
    ), stderr[-3000:]
    assert _wait_gone(children) == []


def test_lag_formatting_never_goes_negative() -> None:
    assert partition_lag(end=10, committed=4) == 6
    assert partition_lag(end=10, committed=10) == 0
    assert partition_lag(end=3, committed=10) is None
    assert group_lag({"a/0": 2, "a/1": 3}) == 5
    assert group_lag({"a/0": 2, "a/1": None}) is None
    assert format_lag(5) == "5"
    assert format_lag(None) == LAG_UNKNOWN
    assert LAG_UNKNOWN == "unknown (committed offset ahead of the log: the broker lost data?)"


def test_status_reports_a_group_it_cannot_read_on_that_groups_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kafka-python's end offsets raised a KeyError for a partition whose leader it
    did not know yet (right after a consumer died), and the whole report said
    "kafka: unavailable", hiding the router's lag (operator review, 2026-12-01)."""
    with EmbeddedBroker() as broker:
        kafka = KafkaSettings(bootstrap=broker.bootstrap)
        ensure_topics(kafka)
        real = KafkaConsumer.end_offsets

        def end_offsets(self: KafkaConsumer, tps: list[TopicPartition]) -> Any:  # noqa: ANN401
            if any(tp.topic == INBOUND for tp in tps):
                raise KeyError(TopicPartition(INBOUND, 0))
            return real(self, tps)

        monkeypatch.setattr(KafkaConsumer, "end_offsets", end_offsets)
        settings = Settings(kafka=kafka, data_dir=tmp_path)
        report = collect(settings)
    groups = report["kafka"]["groups"]
    assert report["kafka"]["bootstrap"] == broker.bootstrap
    assert groups[ROUTER_GROUP]["error"].startswith("KeyError")
    assert groups["switchboard-queue"]["lag"] == 0
    text = render(report)
    assert "kafka: unavailable" not in text
    assert f"  {ROUTER_GROUP}: lag not read (KeyError" in text


def test_status_after_the_broker_lost_data_says_unknown_not_a_negative_lag(
    tmp_path: Path,
) -> None:
    # Its own broker: the committed offset below would confuse the shared broker's router tests.
    with EmbeddedBroker() as broker:
        kafka = KafkaSettings(bootstrap=broker.bootstrap)
        ensure_topics(kafka)
        # What an in-memory broker's restart leaves: a group's offset past the empty log.
        consumer = KafkaConsumer(**kafka.client_config(), group_id=ROUTER_GROUP)
        try:
            partitions = sorted(consumer.partitions_for_topic(INBOUND) or ())
            tps = [TopicPartition(INBOUND, p) for p in partitions]
            consumer.assign(tps)
            consumer.commit({tp: OffsetAndMetadata(7, "", -1) for tp in tps})
        finally:
            consumer.close()
        env = _env(tmp_path, SWITCHBOARD_KAFKA_BOOTSTRAP=broker.bootstrap)
        status = switchboard_status(env, tmp_path)
    assert status.returncode == 0, status.stderr
    assert f"  {ROUTER_GROUP}: lag {LAG_UNKNOWN}" in status.stdout.splitlines(), status.stdout
    assert "lag -" not in status.stdout
