"""Single-use signature tokens: a captured signed request cannot carry another message.

Mailgun signs ``timestamp + token``, not the body. Anyone who sees one signed
request (a proxy log, a debugging dump) could post any mail under its signature
for as long as the timestamp is fresh, with Mailgun's SPF and DKIM verdict
fields saying whatever they like. Mailgun's own advice is to remember the tokens
and refuse one that comes again; this is that memory, with one refinement: a
token is bound to what it first carried (the adapter says what: for Mailgun a
digest of the whole normalized message), so Mailgun's own retry of the same mail
(after a 503, or an answer it did not see) passes, and only a token carrying
*something else* is a conflict, which the adapter decides what to do with (Mailgun
takes the mail without its results, since the genuine mail may be the one that
came second). Each claim also says which arrival the token first carried and how
many other things came under it, for the adapter to record.

The tokens live in the process database (``webhook_tokens``, ingest's chain):
every ``--workers`` process of a host, and every host on one PostgreSQL, sees the
same memory. Rows older than ``keep_s`` (twice the adapter's ``max_age_s`` and a
minute: a timestamp may be that far in the past or the future and still pass)
are deleted as claims come in; a token that old is refused as stale anyway. On
PostgreSQL the rows are stamped and pruned by the database's clock, so hosts whose
clocks differ agree on a row's age (hosts sharing one database should share
``max_age_s`` too: each prunes with its own). Without a database (an adapter built
in a test without one) the memory is this process's own.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import (
    Column,
    DateTime,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    case,
    delete,
    func,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.elements import ColumnElement

metadata = MetaData()

webhook_tokens = Table(
    "webhook_tokens",
    metadata,
    Column("adapter", String(64), primary_key=True),
    # SHA-256 hex of the token and of what it carried: fixed-size rows, whatever a
    # provider's token or a mail look like.
    Column("token", String(64), primary_key=True),
    Column("message", String(64), nullable=False),
    # The arrival (message id) it first carried, and how many other things came
    # under it since: what a conflict reports.
    Column("message_id", String(36), nullable=False),
    Column("conflicts", Integer, nullable=False),
    Column("first_seen", DateTime(timezone=True), nullable=False, index=True),
)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class Claim:
    """What a token's claim found."""

    fresh: bool  # new, or first carried this same thing: take the request
    first_message_id: str  # the arrival it first carried (this one when new)
    conflicts: int  # other things tried under it, this one included (0 when fresh)


class UsedTokens:
    """Which message each signature token carried first (see the module docstring)."""

    def __init__(self, engine: Engine | None, keep_s: float, prune_every_s: float = 60.0) -> None:
        self.engine = engine
        self.keep_s = keep_s
        self.prune_every_s = prune_every_s
        self._lock = threading.Lock()
        self._memory: dict[tuple[str, str], tuple[str, str, int, float]] = {}
        self._pruned = 0.0

    def claim(self, adapter: str, token: str, carried: str, message_id: str) -> Claim:
        """Bind ``token`` to ``carried`` (what the request holds) unless it is bound
        to something else already. Blocking: call it on a thread."""
        key, message = _digest(token), _digest(carried)
        if self.engine is None:
            return self._claim_in_memory(adapter, key, message, message_id)
        postgres = self.engine.dialect.name == "postgresql"
        # The database's clock on PostgreSQL (one clock for every host); SQLite is a
        # file on this host, whose clock is the only one.
        now: ColumnElement[datetime] | datetime = func.now() if postgres else datetime.now(UTC)
        dialect = postgresql if postgres else sqlite
        table = webhook_tokens
        # One statement: a new token is inserted; a known one keeps its row, counting
        # a conflict when it came with something else; either way the row comes back
        # (SQLite 3.35+ and PostgreSQL both return it). Under concurrency the second
        # insert of one token waits for the first's commit, then updates that row.
        insert = dialect.insert(table).values(
            adapter=adapter,
            token=key,
            message=message,
            message_id=message_id,
            conflicts=0,
            first_seen=now,
        )
        claim = insert.on_conflict_do_update(
            index_elements=["adapter", "token"],
            set_={
                "conflicts": case(
                    (table.c.message == insert.excluded.message, table.c.conflicts),
                    else_=table.c.conflicts + 1,
                )
            },
        ).returning(table.c.message, table.c.message_id, table.c.conflicts)
        with self.engine.begin() as connection:
            row = connection.execute(claim).one()
            if self._prune_due():
                cutoff = now - timedelta(seconds=self.keep_s)
                connection.execute(delete(table).where(table.c.first_seen < cutoff))
        fresh = row.message == message
        return Claim(fresh, row.message_id, 0 if fresh else row.conflicts)

    def _prune_due(self) -> bool:
        now = time.monotonic()
        with self._lock:
            if now - self._pruned < self.prune_every_s:
                return False
            self._pruned = now
            return True

    def _claim_in_memory(self, adapter: str, key: str, message: str, message_id: str) -> Claim:
        now = time.monotonic()
        prune = self._prune_due()
        with self._lock:
            if prune:
                self._memory = {k: v for k, v in self._memory.items() if now - v[3] < self.keep_s}
            first, first_id, conflicts, seen = self._memory.setdefault(
                (adapter, key), (message, message_id, 0, now)
            )
            if first == message:
                return Claim(True, first_id, 0)
            conflicts += 1
            self._memory[(adapter, key)] = (first, first_id, conflicts, seen)
            return Claim(False, first_id, conflicts)
