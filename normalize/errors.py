"""The one error normalizers raise: the input cannot become an InboundMessage."""

from __future__ import annotations


class NormalizeError(ValueError):
    """``reason`` is machine-readable (``no-sender``, ``no-identity``); ``detail`` for people."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
