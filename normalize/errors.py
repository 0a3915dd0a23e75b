"""The one error normalizers raise: the input cannot become an InboundMessage."""

from __future__ import annotations


class NormalizeError(ValueError):
    """``reason`` is machine-readable (``no-sender``, ``no-identity``); ``detail`` for people."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[type[NormalizeError], tuple[str, str]]:
        # Pickled from the SMTP parse process back to the server: without this the
        # round trip called __init__ with one argument, failed, and the dead letter
        # said "normalizer-error" instead of the reason (attacker review, 2026-11-30).
        return (type(self), (self.reason, self.detail))
