"""The router's tables (the contact directory, merges, its outbox): its own Alembic chain."""

from __future__ import annotations

from pathlib import Path

from switchboard.db import Chain

#: The old single chain created the directory in 0002 and the merge records in
#: 0006 (whose queue half is the queue's chain now).
CHAIN = Chain(
    "router",
    Path(__file__).with_name("versions"),
    legacy={
        "0001": None,
        "0002": "router_0001",
        "0003": "router_0001",
        "0004": "router_0001",
        "0005": "router_0001",
        "0006": "router_0002",
        "0007": "router_0002",
    },
)
