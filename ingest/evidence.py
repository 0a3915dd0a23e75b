"""How much of a refused request is kept: bounded, so refusals cannot fill the disk.

A refused provider request (a bad Twilio signature, a folded SID) is worth a dead
letter: it is how a misconfigured token shows up. But every such record used to
store the whole body as an fsynced blob, so a stranger posting large unsigned
bodies wrote 25 MB/s to disk from one connection. The evidence now keeps the
first ``max_bytes`` of a body, and at most ``per_minute`` records per route in
any sliding minute; the rest is counted (``switchboard_evidence_dropped_total``)
and logged at most once per ``log_every_s``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from switchboard.metrics import EVIDENCE_DROPPED

log = logging.getLogger(__name__)


class EvidenceBudget:
    """At most ``per_minute`` records per key in any 60 s window; bodies clipped."""

    def __init__(
        self,
        per_minute: int = 10,
        max_bytes: int = 4096,
        *,
        log_every_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_minute = per_minute
        self.max_bytes = max_bytes
        self.log_every_s = log_every_s
        self._clock = clock
        self._kept: dict[str, deque[float]] = {}
        self._dropped: dict[str, int] = {}  # since the last log line, per key
        self._logged_at: dict[str, float] = {}
        # Refusals run on the event loop, or on worker threads for offloaded adapters.
        self._lock = threading.Lock()

    def admit(self, key: str) -> bool:
        """True if a record for ``key`` may be kept now (and counts it)."""
        now = self._clock()
        with self._lock:
            kept = self._kept.setdefault(key, deque())
            while kept and now - kept[0] >= 60.0:
                kept.popleft()
            if len(kept) < self.per_minute:
                kept.append(now)
                return True
            dropped = self._dropped.get(key, 0) + 1
            self._dropped[key] = dropped
            last = self._logged_at.get(key)
            should_log = last is None or now - last >= self.log_every_s
            if should_log:
                self._logged_at[key] = now
                self._dropped[key] = 0
        EVIDENCE_DROPPED.labels(key).inc()
        if should_log:
            log.warning(
                "refused requests over the evidence budget: counted, not stored",
                extra={"route": key, "dropped": dropped, "per_minute": self.per_minute},
            )
        return False

    def clip(self, body: bytes) -> bytes:
        return body[: self.max_bytes]
