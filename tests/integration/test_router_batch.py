"""The router decides a whole poll from memory (:class:`router.directory.BatchDirectory`),
kept current after each decision. These tests route one tangled population twice,
in polls of 500 and one message at a time (where every decision reads what the
previous ones wrote from the database), and require the very same directory, merge
records and events: whatever the memory forgot to keep current shows up as a
difference. On SQLite and on PostgreSQL.

The population has what the plain load populations lack: replies that join their
thread (and quotes of another person's thread, which must not), bounces of earlier
mail (and of unknown mail), auto-replies, gaps longer than the idle window, claimed
identities (merge suggestions), verified ones (merges, chains of merges in one
poll), a blocked identity, second arrivals in other inboxes, redelivered events, a
rule to a least-loaded team with a capacity, and an agent removed between two runs.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import Engine, text

from normalize.identity import email_identity, phone_identity, verified
from normalize.schema import (
    Flags,
    Identity,
    IdentityKind,
    InboundMessage,
    Recipient,
    RecipientRole,
    Thread,
)
from router.decide import RoutingConfig, Rule, Team
from router.store import RouterStore
from switchboard.databases import upgrade
from switchboard.db import make_engine
from switchboard.ids import uuid7
from tests.postgres import with_search_path
from tests.router_helpers import snapshot as directory_snapshot

SUPPORT = Recipient(kind=IdentityKind.EMAIL, value="support@example.com", role=RecipientRole.TO)
SALES = Recipient(kind=IdentityKind.EMAIL, value="sales@example.com", role=RecipientRole.TO)
BEFORE = RoutingConfig(
    teams={
        "support": Team("support", ("alice", "bob", "dave")),
        "sales": Team("sales", ("erin", "frank"), "least-loaded", capacity=3),
    },
    default_team="support",
    rules=(Rule("sales-inbox", "sales", inbox=SALES.key),),
    blocked_identities=frozenset({"email:support@example.com"}),
    idle_window=timedelta(hours=72),
)
AFTER = RoutingConfig(  # dave has left: his contacts are reassigned at their next message
    teams={**BEFORE.teams, "support": Team("support", ("alice", "bob"))},
    default_team="support",
    rules=BEFORE.rules,
    blocked_identities=BEFORE.blocked_identities,
    idle_window=BEFORE.idle_window,
)


def tangled(people: int, seed: int) -> list[InboundMessage]:
    rng = random.Random(seed)
    start = datetime.now(UTC) - timedelta(days=12)
    out: list[InboundMessage] = []
    mail_ids: list[tuple[int, str]] = []  # (person, Message-ID) of mail sent so far
    for p in range(people):
        email = email_identity(f"c{p}@example.org")
        phone = phone_identity(f"+1415{3000000 + p:07d}")
        when = start + timedelta(hours=rng.uniform(0, 24))
        for n in range(rng.randint(4, 10)):
            when += timedelta(hours=rng.choice((0.5, 2, 30, 80, 100)))
            roll = rng.random()
            recipients = (rng.choice((SUPPORT, SUPPORT, SALES)),)
            common: dict[str, Any] = {
                "id": uuid7(),
                "received_at": when,
                "recipients": recipients,
                "text": "hello",
            }
            sender: Identity = verified(email, "dmarc") if rng.random() < 0.7 else email
            if roll < 0.35:  # mail, perhaps a reply to the person's own or someone's thread
                mid = f"m{p}.{n}@example.org"
                thread = Thread(message_id=mid)
                if mail_ids and rng.random() < 0.6:
                    mine = [m for q, m in mail_ids if q == p]
                    pool = mine if mine and rng.random() < 0.8 else [m for _, m in mail_ids]
                    thread = Thread(
                        message_id=mid,
                        in_reply_to=(rng.choice(pool),),
                        references=tuple(rng.sample(pool, min(3, len(pool)))),
                    )
                mail_ids.append((p, mid))
                out.append(
                    InboundMessage(
                        **common,
                        channel="email",
                        adapter="smtp",
                        sender=sender,
                        subject="Order",
                        thread=thread,
                        dedupe_key=f"email-mid:{mid}",
                        flags=Flags(auto_reply=rng.random() < 0.05),
                    )
                )
            elif roll < 0.6:
                out.append(
                    InboundMessage(
                        **common,
                        channel="sms",
                        adapter="twilio",
                        sender=verified(phone, "twilio") if rng.random() < 0.8 else phone,
                        dedupe_key=f"twilio:SM{p:05d}{n:03d}",
                    )
                )
            elif roll < 0.8:  # a form: links (verified) or suggests (claimed) another person's
                other = rng.randrange(people)
                extra = phone_identity(f"+1415{3000000 + (other if rng.random() < 0.2 else p):07d}")
                out.append(
                    InboundMessage(
                        **common,
                        channel="webhook",
                        adapter="contact-form",
                        sender=sender,
                        identities=(verified(extra, "hook") if rng.random() < 0.7 else extra,),
                        dedupe_key=f"webhook:form:{p}-{n}",
                    )
                )
            elif roll < 0.88 and mail_ids:  # a bounce of some mail, or of mail never seen
                bounced = rng.choice(mail_ids)[1] if rng.random() < 0.8 else f"x{n}@nowhere"
                out.append(
                    InboundMessage(
                        **common,
                        channel="email",
                        adapter="smtp",
                        sender=email_identity("mailer-daemon@mx.example.net"),
                        dedupe_key=f"email-mid:bounce{p}.{n}@mx",
                        flags=Flags(bounce=True, bounced_message_id=bounced),
                    )
                )
            elif roll < 0.9:  # from the company's own address: nobody's customer
                out.append(
                    InboundMessage(
                        **common,
                        channel="email",
                        adapter="smtp",
                        sender=email_identity("support@example.com"),
                        dedupe_key=f"email-mid:loop{p}.{n}@example.com",
                    )
                )
            else:
                out.append(
                    InboundMessage(
                        **common,
                        channel="sms",
                        adapter="twilio",
                        sender=phone,
                        dedupe_key=f"twilio:SMx{p:05d}{n:03d}",
                    )
                )
    rng.shuffle(out)
    out.sort(key=lambda m: m.received_at.date())  # roughly in time, shuffled within a day
    again = [
        m.model_copy(update={"id": uuid7(), "recipients": (SALES,)})
        for m in rng.sample(out, len(out) // 10)
    ]
    same = rng.sample(out, len(out) // 50)
    for repeated in again + same:
        out.insert(rng.randrange(len(out) + 1), repeated)
    return out


TABLES = {
    "contacts": "SELECT id, owner, merged_into FROM contacts",
    "identities": "SELECT key, contact_id FROM contact_identities",
    "conversations": "SELECT id, contact_id, owner, started_at, last_message_at, message_count"
    " FROM conversations",
    "messages": "SELECT id, contact_id, conversation_id, owner, reason, dedupe_key FROM messages",
    "inboxes": "SELECT message_id, inbox FROM message_inboxes",
    "dedupe": "SELECT key, message_id FROM dedupe_keys",
    "merges": "SELECT id, survivor_id, merged_id, message_id FROM contact_merges",
    "items": "SELECT merge_id, kind, ref FROM contact_merge_items",
    "events": "SELECT id, message_id, seq, topic, key, type FROM router_events",
    "owners": "SELECT name, rr_next FROM owners",
}


def _norm(value: object) -> str:
    """One spelling of a uuid whichever way the database hands it back."""
    s = str(value)
    return s.replace("-", "") if len(s) == 36 and s.count("-") == 4 else s


def snapshot(engine: Engine) -> dict[str, set[tuple[str, ...]]]:
    directory_snapshot(engine)  # every conversation carries its contact's owner
    with engine.connect() as c:
        return {
            name: {tuple(_norm(v) for v in row) for row in c.execute(text(query))}
            for name, query in TABLES.items()
        }


@pytest.fixture(params=["sqlite", "postgresql"])
def two_engines(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[tuple[Engine, Engine]]:  # noqa: ANN401
    engines: list[Engine] = []
    schemas: list[str] = []
    # Only the PostgreSQL runs ask for a server (it may have to be started).
    postgres_url = request.getfixturevalue("postgres_url") if request.param == "postgresql" else ""
    admin = make_engine(postgres_url) if postgres_url else None
    for n in range(2):
        if admin is None:
            url = f"sqlite:///{tmp_path}/router{n}.db"
        else:
            schema = f"batch_{uuid7().hex[-12:]}"
            with admin.begin() as c:
                c.execute(text(f'CREATE SCHEMA "{schema}"'))
            schemas.append(schema)
            url = with_search_path(postgres_url, schema)
        engine = make_engine(url, sqlite_immediate=admin is None)
        upgrade(engine)
        engines.append(engine)
    try:
        yield engines[0], engines[1]
    finally:
        for engine in engines:
            engine.dispose()
        if admin is not None:
            with admin.begin() as c:
                for schema in schemas:
                    c.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
            admin.dispose()


def _route(engine: Engine, messages: list[InboundMessage], size: int) -> tuple[int, list[str]]:
    """Route in polls of ``size``, the first half with dave on the team; returns the
    statements sent (the router's own count) and the outcomes."""
    before = REGISTRY.get_sample_value("switchboard_router_sql_statements_total") or 0.0
    results: list[str] = []
    half = len(messages) // 2
    for config, part in ((BEFORE, messages[:half]), (AFTER, messages[half:])):
        store = RouterStore(engine, config)
        store.sync_owners()
        for start in range(0, len(part), size):
            results += [o.result for o in store.route_batch(part[start : start + size])]
    after = REGISTRY.get_sample_value("switchboard_router_sql_statements_total") or 0.0
    return int(after - before), results


@pytest.mark.slow
def test_a_poll_decides_what_its_messages_decide_one_by_one(
    two_engines: tuple[Engine, Engine],
) -> None:
    messages = tangled(120, seed=7)
    batched, one_by_one = two_engines
    statements, results = _route(batched, messages, 500)
    _, results_one = _route(one_by_one, messages, 1)
    assert results == results_one
    # The population does what it is for (else the comparison proves little).
    assert {"routed", "duplicate", "replayed", "unroutable"} <= set(results)
    a, b = snapshot(batched), snapshot(one_by_one)
    for table in TABLES:
        assert a[table] == b[table], (table, sorted(a[table] ^ b[table])[:6])
    assert a["merges"], "no merge happened"
    assert len(a["conversations"]) > len(a["contacts"]) / 2
    reasons = {row[4] for row in a["messages"]}
    assert {"rule:sales-inbox", "owner-removed", "bounce", "auto-reply", "sticky"} <= reasons
    assert any(row[5].endswith("merge.suggested.v1") for row in a["events"])
    # A poll of 500 costs a handful of statements, not a few per message.
    assert statements / len(messages) < 0.1, statements
