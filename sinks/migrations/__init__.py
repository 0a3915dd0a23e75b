"""The queue read model's tables: its own Alembic chain, so that a queue database of
its own (SWITCHBOARD_QUEUE_DATABASE_URL) holds these and nothing else."""

from __future__ import annotations

from pathlib import Path

from switchboard.db import Chain

#: The old single chain built the queue in 0003-0007 (0006 shared with the router).
CHAIN = Chain(
    "queue",
    Path(__file__).with_name("versions"),
    legacy={
        "0001": None,
        "0002": None,
        "0003": "queue_0001",
        "0004": "queue_0002",
        "0005": "queue_0003",
        "0006": "queue_0004",
        "0007": "queue_0005",
    },
)
