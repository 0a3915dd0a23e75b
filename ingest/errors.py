"""Error families that decide what an adapter answers its sender.

Raised, never returned as flags. An adapter maps each to its protocol:

==============  =====================  ==========================  ======================
family          meaning                SMTP                        HTTP
==============  =====================  ==========================  ======================
RetryLater      nothing is durable     451 4.3.0                   503 + Retry-After
Rejected        refused, with reason   5xx with the reason         its status (4xx)
Stop            adapter cannot go on   421, then the process stops 503, the process stops
==============  =====================  ==========================  ======================

An IMAP poller maps RetryLater to "do not advance the checkpoint, retry with
backoff", and Stop to "stop polling and ask the process to stop".
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import JsonValue

from normalize.errors import rebuilt
from switchboard.errors import StartupError


class RetryLater(Exception):
    """Nothing is durable yet (broker or disk away): the sender must retry."""

    def __init__(self, detail: str, retry_after_s: int = 30) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after_s = retry_after_s


class Rejected(Exception):
    """This input is refused for a reason the sender can act on.

    ``status`` is the HTTP answer (400 malformed, 401 no credentials, 403 wrong
    ones, 429 over a limit); ``record=True`` also keeps the raw input as a dead
    letter with ``reason`` and ``metadata`` (a refused provider request someone
    should look at): bounded evidence, the first bytes of the body and a few
    records a minute per route (:mod:`ingest.evidence`), since anyone can send one.
    """

    def __init__(
        self,
        reason: str,
        detail: str,
        *,
        status: int = 400,
        headers: Mapping[str, str] | None = None,
        record: bool = False,
        metadata: Mapping[str, JsonValue] | None = None,
    ) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.status = status
        self.headers = dict(headers or {})
        self.record = record
        self.metadata = dict(metadata or {})

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        # Raised in a parse process and pickled back to the server: the default round
        # trip calls __init__ with the message alone, and fails (so would a subclass's
        # own __init__): rebuilt from its state instead.
        return (rebuilt, (type(self), self.args, self.__dict__))


class Stop(StartupError):
    """This adapter cannot go on (revoked credentials, impossible configuration).

    Raised from ``start()`` the process exits 1 with this message; raised while
    handling input the sender is told to retry and the process stops gracefully.
    """
