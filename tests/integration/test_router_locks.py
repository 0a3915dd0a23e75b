"""The router's advisory locks stay within PostgreSQL's shared lock table.

PostgreSQL keeps every lock of every session in one table of
max_locks_per_transaction x (max_connections + max_prepared_transactions) entries
(6,400 by default). A poll of form posts carrying many identities each used to want
a lock per identity: past the table, "out of shared memory" (SQLSTATE 53200), an
outage the consumer retries forever while the partition stalls. Past the lock
budget a batch now takes one exclusive lock instead.
"""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import Engine, exc, text

from normalize.identity import email_identity, external_identity
from router.directory import lock_keys
from tests.factories import inbound_message
from tests.router_helpers import snapshot, store_for

pytestmark = pytest.mark.integration


def _lock_table_size(engine: Engine) -> int:
    with engine.connect() as c:
        per_tx = int(c.execute(text("SHOW max_locks_per_transaction")).scalar_one())
        conns = int(c.execute(text("SHOW max_connections")).scalar_one())
        prepared = int(c.execute(text("SHOW max_prepared_transactions")).scalar_one())
    return per_tx * (conns + prepared)


@pytest.mark.slow
def test_a_poll_with_more_identities_than_the_lock_table_is_routed(
    migrated_postgres: Engine,
) -> None:
    """More identity keys in one poll than the server's whole lock table holds."""
    per_message = 20
    # Three times the nominal size: the table borrows spare shared memory (7,000 locks
    # on a 6,400 table went through; 15,000 did not).
    messages = 3 * _lock_table_size(migrated_postgres) // per_message
    batch = [
        inbound_message(
            sender=email_identity(f"form{n}@example.org"),
            identities=tuple(external_identity("crm", f"{n}-{i}") for i in range(per_message - 1)),
            dedupe_key=f"webhook:form:fp:{n}",
        )
        for n in range(messages)
    ]
    before = REGISTRY.get_sample_value("switchboard_router_all_keys_locks_total") or 0.0
    outcomes = store_for(migrated_postgres).route_batch(batch)
    assert len(outcomes) == messages
    snap = snapshot(migrated_postgres)
    assert len(snap.messages) == messages
    after = REGISTRY.get_sample_value("switchboard_router_all_keys_locks_total") or 0.0
    assert after == before + 1


def test_a_batch_over_the_budget_excludes_every_other_batch_and_only_while_it_runs(
    migrated_postgres: Engine,
) -> None:
    """The exclusive all-keys lock conflicts with a small batch's shared one, even on
    keys it did not name; two small batches on other keys do not wait for each other."""
    with migrated_postgres.connect() as big, migrated_postgres.connect() as small:
        with big.begin():
            assert lock_keys(big, {f"id:k{i}" for i in range(10)}, budget=5)
            with small.begin():
                small.execute(text("SET LOCAL lock_timeout = '300ms'"))
                with pytest.raises(exc.OperationalError, match="lock timeout"):
                    lock_keys(small, {"id:other"})
        with small.begin():  # the big batch committed: the small one gets its locks
            small.execute(text("SET LOCAL lock_timeout = '300ms'"))
            assert not lock_keys(small, {"id:other"})
            with big.begin():
                big.execute(text("SET LOCAL lock_timeout = '300ms'"))
                assert not lock_keys(big, {"id:another"})  # shared with the other small one
                with pytest.raises(exc.OperationalError, match="lock timeout"):
                    lock_keys(big, {"id:other"})  # the same key: waits
