"""Agents as people: their passwords, personal API tokens and sign-in sessions.

Passwords are Argon2id hashes (argon2-cffi). Personal tokens and session ids are
256 random bits, so a SHA-256 of them is stored and looked up (a slow hash buys
nothing against a secret nobody can guess, and every request would pay it). The
tables live beside the queue read model (the API's database); they are not built
from the topics, so a rebuild of the read model leaves them alone.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import (
    Column,
    DateTime,
    Engine,
    Index,
    MetaData,
    String,
    Table,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

_TS = DateTime(timezone=True)
TOKEN_PREFIX = "sbt_"  # noqa: S105 - a marker, not a secret

metadata = MetaData()

agents = Table(
    "agents",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("password_hash", String(256)),
    Column("updated_at", _TS, nullable=False),
)
agent_tokens = Table(
    "agent_tokens",
    metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("agent", String(128), nullable=False),
    Column("created_at", _TS, nullable=False),
    Column("revoked_at", _TS),
    Index("ix_agent_tokens_agent", "agent"),
)
agent_sessions = Table(
    "agent_sessions",
    metadata,
    Column("id_hash", String(64), primary_key=True),
    Column("agent", String(128), nullable=False),
    Column("csrf", String(64), nullable=False),
    Column("created_at", _TS, nullable=False),
    Column("expires_at", _TS, nullable=False),
    Index("ix_agent_sessions_agent", "agent"),
)

#: The admin signs in to the page with this name and SWITCHBOARD_API_TOKEN as the
#: password; no agent may be called so.
ADMIN = "admin"


class UnknownAgent(LookupError):
    """Not an agent of the configured teams."""


@dataclass(frozen=True)
class Session:
    agent: str
    csrf: str
    expires_at: datetime


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _bound(key: str, session_id: str) -> str:
    """An admin session's CSRF value: tied to the token it signed in with."""
    return hmac.new(key.encode(), b"admin-session:" + session_id.encode(), "sha256").hexdigest()


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


class AgentStore:
    """Credentials and sessions of the configured agents."""

    def __init__(
        self,
        engine: Engine,
        names: Collection[str],
        *,
        session_ttl: timedelta = timedelta(hours=12),
        hasher: PasswordHasher | None = None,
        clock: Callable[[], datetime] = _now,
    ) -> None:
        self.engine = engine
        self.names = frozenset(names)
        self.session_ttl = session_ttl
        self.hasher = hasher or PasswordHasher()
        self.clock = clock
        self._decoy: str | None = None

    def _known(self, name: str) -> None:
        if name not in self.names or name == ADMIN:
            raise UnknownAgent(name)

    def _upsert(self, name: str, password_hash: str | None) -> None:
        dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite
        row = {"name": name, "password_hash": password_hash, "updated_at": self.clock()}
        statement = dialect.insert(agents).values(**row)
        with self.engine.begin() as c:
            c.execute(
                statement.on_conflict_do_update(
                    index_elements=[agents.c.name],
                    set_={"password_hash": password_hash, "updated_at": row["updated_at"]},
                )
            )

    def set_password(self, name: str, password: str) -> None:
        """Store an Argon2id hash of the password; the agent's sessions end."""
        self._known(name)
        if len(password) < 8:
            raise ValueError("a password needs at least 8 characters")
        self._upsert(name, self.hasher.hash(password))
        with self.engine.begin() as c:
            c.execute(delete(agent_sessions).where(agent_sessions.c.agent == name))

    def _decoy_hash(self) -> str:
        """Verified against when the account has no password, so a wrong name costs
        as long as a wrong password (no account enumeration by timing). Made at the
        first sign-in, not at start-up."""
        if self._decoy is None:
            self._decoy = self.hasher.hash(secrets.token_hex(16))
        return self._decoy

    def password_hash(self, name: str) -> str | None:
        """The agent's stored Argon2 hash (a key only the server knows, which changes
        with the password), None without one."""
        if name not in self.names or name == ADMIN:
            return None
        with self.engine.connect() as c:
            stored = c.execute(select(agents.c.password_hash).where(agents.c.name == name)).scalar()
        return stored if isinstance(stored, str) else None

    def check_password(self, name: str, password: str) -> bool:
        with self.engine.connect() as c:
            stored = c.execute(select(agents.c.password_hash).where(agents.c.name == name)).scalar()
        usable = name in self.names and name != ADMIN and isinstance(stored, str)
        try:
            self.hasher.verify(
                stored if isinstance(stored, str) and usable else self._decoy_hash(), password
            )
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False
        if not usable or not isinstance(stored, str):
            return False
        if self.hasher.check_needs_rehash(stored):
            self._upsert(name, self.hasher.hash(password))
        return True

    def issue_token(self, name: str) -> str:
        """A new personal API token (shown once; only its digest is kept)."""
        self._known(name)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self.engine.begin() as c:
            c.execute(
                insert(agent_tokens).values(
                    token_hash=_digest(token), agent=name, created_at=self.clock()
                )
            )
        return token

    def revoke(self, name: str) -> tuple[int, int]:
        """Revoke every token of the agent and end every session: (tokens, sessions)."""
        with self.engine.begin() as c:
            tokens = c.execute(
                update(agent_tokens)
                .where(agent_tokens.c.agent == name, agent_tokens.c.revoked_at.is_(None))
                .values(revoked_at=self.clock())
            ).rowcount
            sessions = c.execute(
                delete(agent_sessions).where(agent_sessions.c.agent == name)
            ).rowcount
        return int(tokens or 0), int(sessions or 0)

    def token_agent(self, token: str) -> str | None:
        """The agent of a valid, unrevoked personal token (still configured)."""
        if not token.startswith(TOKEN_PREFIX):
            return None
        with self.engine.connect() as c:
            agent = c.execute(
                select(agent_tokens.c.agent).where(
                    agent_tokens.c.token_hash == _digest(token),
                    agent_tokens.c.revoked_at.is_(None),
                )
            ).scalar()
        return agent if agent in self.names else None

    def start_session(self, agent: str, *, admin_key: str | None = None) -> tuple[str, Session]:
        """A new session: (the id for the cookie, the session). Expired ones go. The
        admin's session is bound to ``admin_key`` (the API token it signed in with):
        its CSRF value is an HMAC of the session id under the token, so the session
        ends when the token changes (:meth:`session`)."""
        session_id = secrets.token_urlsafe(32)
        now = self.clock()
        csrf = (
            _bound(admin_key, session_id)
            if agent == ADMIN and admin_key
            else secrets.token_urlsafe(32)
        )
        session = Session(agent, csrf, now + self.session_ttl)
        with self.engine.begin() as c:
            c.execute(delete(agent_sessions).where(agent_sessions.c.expires_at < now))
            c.execute(
                insert(agent_sessions).values(
                    id_hash=_digest(session_id),
                    agent=agent,
                    csrf=session.csrf,
                    created_at=now,
                    expires_at=session.expires_at,
                )
            )
        return session_id, session

    def session(self, session_id: str, *, admin_key: str | None = None) -> Session | None:
        """The live session of this cookie value, if any. An admin session lives only
        while ``admin_key`` is the token it was started with: until 2026-12-01 one
        outlived a rotated (or removed) SWITCHBOARD_API_TOKEN for its 12 hours."""
        if not session_id:
            return None
        with self.engine.connect() as c:
            row = c.execute(
                select(agent_sessions).where(agent_sessions.c.id_hash == _digest(session_id))
            ).first()
        if row is None or _aware(row.expires_at) <= self.clock():
            return None
        if row.agent == ADMIN:
            if not admin_key or not hmac.compare_digest(
                str(row.csrf), _bound(admin_key, session_id)
            ):
                return None  # signed in with a token that is no longer the token
        elif row.agent not in self.names:
            return None  # removed from the configuration since
        return Session(row.agent, row.csrf, _aware(row.expires_at))

    def end_session(self, session_id: str) -> None:
        with self.engine.begin() as c:
            c.execute(delete(agent_sessions).where(agent_sessions.c.id_hash == _digest(session_id)))


class Throttle:
    """Failed sign-ins per key (a client address, an account) in a sliding window.

    In memory, per process: enough to make guessing slow against one server; a
    fleet behind a balancer multiplies the budget by its size.
    """

    def __init__(
        self, limit: int, window_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limit = limit
        self.window_s = window_s
        self.clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> deque[float]:
        found = self._failures.setdefault(key, deque())
        while found and found[0] <= now - self.window_s:
            found.popleft()
        return found

    def retry_after(self, key: str) -> float:
        """Seconds until the key may try again (0: now)."""
        with self._lock:
            now = self.clock()
            found = self._recent(key, now)
            if len(found) < self.limit:
                return 0.0
            return max(found[0] + self.window_s - now, 1.0)

    def failed(self, key: str) -> None:
        with self._lock:
            now = self.clock()
            self._recent(key, now).append(now)
            if len(self._failures) > 100_000:  # bounded: forget the quiet keys
                for stale in [k for k, v in self._failures.items() if not v]:
                    del self._failures[stale]
