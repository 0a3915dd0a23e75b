"""Switchboard's partitioner puts every keyed record where kafka-python's default would."""

from __future__ import annotations

import random

import pytest
from kafka.partitioner.default import DefaultPartitioner

from switchboard import kafka as sk
from switchboard.kafka import KeyPartitioner


class _Cluster:
    """The three questions a partitioner asks of kafka-python's ClusterMetadata."""

    def __init__(self, partitions: dict[str, set[int]]) -> None:
        self._partitions = partitions

    def topics(self) -> set[str]:
        return set(self._partitions)

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        found = self._partitions.get(topic)
        return None if found is None else set(found)

    def available_partitions_for_topic(self, topic: str) -> set[int] | None:
        return self.partitions_for_topic(topic)


def _keys(count: int) -> list[bytes]:
    rng = random.Random(7)
    made = [b"", b"phone:+14155550100", "email:zoë@exämple.org".encode()]
    made += [rng.randbytes(rng.randint(1, 200)) for _ in range(count)]
    return made


@pytest.mark.parametrize("partitions", [{0}, {0, 1, 2}, {0, 1, 2, 3, 4, 5, 6}, {3, 1, 7, 2}])
def test_every_key_goes_where_the_default_partitioner_puts_it(partitions: set[int]) -> None:
    cluster = _Cluster({"t": partitions})
    ours, theirs = KeyPartitioner(), DefaultPartitioner()
    for key in _keys(3000) * 2:  # the second pass answers from the remembered hashes
        assert ours.partition("t", None, key, None, b"v", cluster) == theirs.partition(
            "t", None, key, None, b"v", cluster
        )


def test_the_remembered_hashes_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sk, "KEY_HASHES", 50)
    cluster = _Cluster({"t": {0, 1, 2}})
    ours, theirs = KeyPartitioner(), DefaultPartitioner()
    for key in _keys(400):
        looked_up = ours._hash.cache_info()
        assert ours.partition("t", None, key, None, b"v", cluster) == theirs.partition(
            "t", None, key, None, b"v", cluster
        )
        assert ours._hash.cache_info().currsize <= 50
        if len(key) > sk.KEY_HASHED_BYTES:
            # A stranger's long key (an address of 320 characters) is hashed, not kept.
            assert ours._hash.cache_info()[:2] == looked_up[:2]
    assert any(len(key) > sk.KEY_HASHED_BYTES for key in _keys(400))


def test_an_unknown_topic_and_an_unkeyed_record_are_the_default_s() -> None:
    cluster = _Cluster({"t": {0, 1, 2}})
    with pytest.raises(ValueError, match="not found"):
        KeyPartitioner().partition("gone", None, b"k", None, b"v", cluster)
    chosen = {KeyPartitioner().partition("t", None, None, None, b"v", cluster) for _ in range(200)}
    assert chosen == {0, 1, 2}  # at random, as the default
