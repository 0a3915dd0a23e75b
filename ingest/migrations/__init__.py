"""Ingest's tables (IMAP checkpoints and mailbox state, used signature tokens): its own
Alembic chain."""

from __future__ import annotations

from pathlib import Path

from switchboard.db import Chain

#: Every revision of the old single chain had created the IMAP tables (its 0001).
CHAIN = Chain(
    "ingest",
    Path(__file__).with_name("versions"),
    legacy=dict.fromkeys(("0001", "0002", "0003", "0004", "0005", "0006", "0007"), "ingest_0001"),
)
