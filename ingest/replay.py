"""Single-use signature tokens: a captured signed request cannot carry another message.

Mailgun signs ``timestamp + token``, not the body. Anyone who sees one signed
request (a proxy log, a debugging dump) could post any mail under its signature
for as long as the timestamp is fresh, with Mailgun's SPF and DKIM verdict
fields saying whatever they like. Mailgun's own advice is to remember the tokens
and refuse one that comes again; this is that memory, with one refinement: a
token is bound to the message it first carried (its dedupe key), so Mailgun's
own retry of the same mail (after a 503, or an answer it did not see) passes,
and only a token carrying *another* message is refused.

The tokens live in the process database (``webhook_tokens``, ingest's chain):
every ``--workers`` process of a host, and every host on one PostgreSQL, sees the
same memory. Rows older than ``keep_s`` (twice the adapter's ``max_age_s`` and a
minute: a timestamp may be that far in the past or the future and still pass)
are deleted as claims come in; a token that old is refused as stale anyway.
Without a database (an adapter built in a test without one) the memory is this
process's own.
"""

from __future__ import annotations

import hashlib
import threading
import time
from datetime import UTC, datetime, timedelta

from sqlalchemy import Column, DateTime, Engine, MetaData, String, Table, delete
from sqlalchemy.dialects import postgresql, sqlite

metadata = MetaData()

webhook_tokens = Table(
    "webhook_tokens",
    metadata,
    Column("adapter", String(64), primary_key=True),
    # SHA-256 hex of the token and of the message's dedupe key: fixed-size rows,
    # whatever a provider's token or a mail's Message-ID look like.
    Column("token", String(64), primary_key=True),
    Column("message", String(64), nullable=False),
    Column("first_seen", DateTime(timezone=True), nullable=False, index=True),
)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


class UsedTokens:
    """Which message each signature token carried first (see the module docstring)."""

    def __init__(self, engine: Engine | None, keep_s: float, prune_every_s: float = 60.0) -> None:
        self.engine = engine
        self.keep_s = keep_s
        self.prune_every_s = prune_every_s
        self._lock = threading.Lock()
        self._memory: dict[tuple[str, str], tuple[str, float]] = {}
        self._pruned = 0.0

    def claim(self, adapter: str, token: str, message_key: str) -> bool:
        """True when ``token`` is new, or first carried this same message; False when
        it already carried another one (a replay with another body). Blocking: call
        it on a thread."""
        key, message = _digest(token), _digest(message_key)
        if self.engine is None:
            return self._claim_in_memory(adapter, key, message)
        now = datetime.now(UTC)
        dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite
        # One statement: a new token is inserted, a known one keeps its row (the
        # update writes back what is there), and either way the row's message comes
        # back (SQLite 3.35+ and PostgreSQL both return it). Under concurrency the
        # second insert of one token waits for the first's commit, then reads it.
        claim = (
            dialect.insert(webhook_tokens)
            .values(adapter=adapter, token=key, message=message, first_seen=now)
            .on_conflict_do_update(
                index_elements=["adapter", "token"],
                set_={"message": webhook_tokens.c.message},
            )
            .returning(webhook_tokens.c.message)
        )
        with self.engine.begin() as connection:
            first = connection.execute(claim).scalar_one()
            if self._prune_due():
                old = webhook_tokens.c.first_seen < now - timedelta(seconds=self.keep_s)
                connection.execute(delete(webhook_tokens).where(old))
        return bool(first == message)

    def _prune_due(self) -> bool:
        now = time.monotonic()
        with self._lock:
            if now - self._pruned < self.prune_every_s:
                return False
            self._pruned = now
            return True

    def _claim_in_memory(self, adapter: str, key: str, message: str) -> bool:
        now = time.monotonic()
        with self._lock:
            if now - self._pruned >= self.prune_every_s:
                self._pruned = now
                self._memory = {k: v for k, v in self._memory.items() if now - v[1] < self.keep_s}
            first, _ = self._memory.setdefault((adapter, key), (message, now))
        return first == message
