"""Durable IMAP progress: UIDVALIDITY + last ingested UID per folder, and status.

A checkpoint only moves forward after the message it names was acknowledged by
Kafka; the poller reads it on every (re)connect, so a crash at any point
re-fetches at most the messages after the last checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

metadata = MetaData()

checkpoints = Table(
    "imap_checkpoints",
    metadata,
    Column("mailbox", String(64), primary_key=True),
    Column("folder", String(255), primary_key=True),
    Column("uidvalidity", BigInteger, nullable=False),
    Column("last_uid", BigInteger, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

mailbox_status = Table(
    "imap_status",
    metadata,
    Column("mailbox", String(64), primary_key=True),
    Column("connected", Boolean, nullable=False, default=False),
    Column("last_success", DateTime(timezone=True)),
    Column("last_error", String(1000)),
    Column("last_error_at", DateTime(timezone=True)),
    Column("ingested", Integer, nullable=False, default=0),
)


@dataclass(frozen=True)
class Checkpoint:
    uidvalidity: int
    last_uid: int
    updated_at: datetime


def _now() -> datetime:
    return datetime.now(UTC)


def _upsert(engine: Engine, table: Table, keys: dict[str, object], values: dict[str, object]):  # type: ignore[no-untyped-def]  # noqa: ANN202
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(table).values(**keys, **values)
    return statement.on_conflict_do_update(index_elements=list(keys), set_=values)


class ImapStateStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def checkpoint(self, mailbox: str, folder: str) -> Checkpoint | None:
        with self.engine.connect() as connection:
            row = connection.execute(
                select(checkpoints).where(
                    checkpoints.c.mailbox == mailbox, checkpoints.c.folder == folder
                )
            ).first()
        if row is None:
            return None
        return Checkpoint(int(row.uidvalidity), int(row.last_uid), row.updated_at)

    def advance(self, mailbox: str, folder: str, uidvalidity: int, uid: int) -> None:
        """Record ``uid`` as ingested; never moves a checkpoint backwards."""
        with self.engine.begin() as connection:
            current = connection.execute(
                select(checkpoints.c.uidvalidity, checkpoints.c.last_uid).where(
                    checkpoints.c.mailbox == mailbox, checkpoints.c.folder == folder
                )
            ).first()
            if (
                current is not None
                and current.uidvalidity == uidvalidity
                and current.last_uid >= uid
            ):
                return
            connection.execute(
                _upsert(
                    self.engine,
                    checkpoints,
                    {"mailbox": mailbox, "folder": folder},
                    {"uidvalidity": uidvalidity, "last_uid": uid, "updated_at": _now()},
                )
            )

    def set_status(
        self,
        mailbox: str,
        *,
        connected: bool,
        error: str | None = None,
        success: bool = False,
        ingested: int = 0,
    ) -> None:
        values: dict[str, object] = {"connected": connected}
        if error is not None:
            values["last_error"] = error[:1000]
            values["last_error_at"] = _now()
        if success:
            values["last_success"] = _now()
        with self.engine.begin() as connection:
            connection.execute(_upsert(self.engine, mailbox_status, {"mailbox": mailbox}, values))
            if ingested:
                connection.execute(
                    update(mailbox_status)
                    .where(mailbox_status.c.mailbox == mailbox)
                    .values(ingested=mailbox_status.c.ingested + ingested)
                )

    def status(self) -> list[dict[str, object]]:
        """Every mailbox's state and per-folder checkpoints, for the CLI and the API."""
        with self.engine.connect() as connection:
            boxes = connection.execute(select(mailbox_status).order_by(mailbox_status.c.mailbox))
            folders = connection.execute(select(checkpoints).order_by(checkpoints.c.folder)).all()
            result = []
            for box in boxes:
                result.append(
                    {
                        "mailbox": box.mailbox,
                        "connected": box.connected,
                        "last_success": box.last_success.isoformat() if box.last_success else None,
                        "last_error": box.last_error,
                        "last_error_at": box.last_error_at.isoformat()
                        if box.last_error_at
                        else None,
                        "ingested": box.ingested,
                        "folders": {
                            f.folder: {"uidvalidity": f.uidvalidity, "last_uid": f.last_uid}
                            for f in folders
                            if f.mailbox == box.mailbox
                        },
                    }
                )
        return result
