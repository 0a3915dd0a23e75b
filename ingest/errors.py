"""Error families that decide what an adapter answers its sender.

Raised, never returned as flags. An adapter maps each to its protocol:
SMTP 451/5xx, HTTP 503/4xx, IMAP "do not advance the checkpoint".
"""

from __future__ import annotations


class RetryLater(Exception):
    """Nothing is durable yet (broker or disk away): the sender must retry."""

    def __init__(self, detail: str, retry_after_s: int = 30) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after_s = retry_after_s


class Rejected(Exception):
    """This input is refused for a reason the sender can act on."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
