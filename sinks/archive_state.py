"""How the archive's writes are going, for `switchboard status` and `/metrics`.

The archive commits offsets only after a file is written, so a sink that cannot
write (a full disk, a bucket whose credentials expired) loses nothing: it retries
with the consumer runtime's back-off, for ever. Until 2026-12-01 the only sign of
that was a warning in its log; the consumer still counted as alive (waiting out an
outage is work), and its lag is normally up to ``roll_s`` of traffic anyway. Now the
sink keeps a small JSON report in its data directory (``archive-state.json``) and
two metrics, so an operator sees "failing since" next to "last file written".

The report is advice, not state the sink reads back: written with a rename (a
reader sees the old report or the new one), not fsynced. On a host that runs
`switchboard sink archive` apart, `switchboard status` there shows it.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge

from sinks.archive_files import Part
from switchboard.files import read_json_object

log = logging.getLogger(__name__)

STATE_FILE = "archive-state.json"

FILES_WRITTEN = Counter(
    "switchboard_archive_files_written", "Archive files written (Parquet, one partition each)."
)
WRITE_FAILURES = Counter(
    "switchboard_archive_write_failures",
    "Archive files that could not be written (retried; nothing is committed past them).",
)
LAST_FILE = Gauge(
    "switchboard_archive_last_file_timestamp_seconds",
    "When the archive last wrote a file (Unix time).",
    multiprocess_mode="livemax",
)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class ArchiveState:
    """The last file written, and the failures since (cleared by the next file)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._report: dict[str, Any] = {
            "started_at": _now(),
            "files": 0,
            "last_file": None,
            "last_file_at": None,
            "failing_since": None,
            "failures": 0,
            "last_error": None,
        }
        self._save()

    def written(self, part: Part) -> None:
        FILES_WRITTEN.inc()
        LAST_FILE.set(time.time())
        if self._report["failing_since"] is not None:
            log.info("archive files written again", extra={"failures": self._report["failures"]})
        self._report.update(
            files=self._report["files"] + 1,
            last_file=part.relative,
            last_file_at=_now(),
            failing_since=None,
            failures=0,
            last_error=None,
        )
        self._save()

    def failed(self, exc: BaseException) -> None:
        WRITE_FAILURES.inc()
        if self._report["failing_since"] is None:
            self._report["failing_since"] = _now()
        self._report["failures"] += 1
        self._report["last_error"] = f"{type(exc).__name__}: {exc}"[:300]
        self._save()

    def _save(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            tmp.write_text(json.dumps(self._report, indent=2) + "\n")
            tmp.replace(self.path)
        except OSError as exc:  # the data dir's disk may be the one that is full
            log.warning("archive state not saved", extra={"error": repr(exc)[:300]})


def read_archive_state(data_dir: Path) -> dict[str, Any] | None:
    """The archive sink's last report, for `switchboard status`; None if there is none."""
    return read_json_object(data_dir / STATE_FILE)
