"""Kafka plumbing shared by the worker and the sink: topic creation and client construction."""

from __future__ import annotations

import logging
from typing import Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from streams.config import KafkaSettings

log = logging.getLogger(__name__)


def topic_plan(kafka: KafkaSettings) -> dict[str, int]:
    """Every topic Sluice uses, with its partition count."""
    t = kafka.topics
    return {
        t.frames: t.frames_partitions,
        t.audio: t.audio_partitions,
        t.results: t.results_partitions,
        t.alerts: t.alerts_partitions,
        t.dead_letters: t.dead_letters_partitions,
    }


async def ensure_topics(kafka: KafkaSettings) -> list[str]:
    """Create the missing topics; return the names created. Safe to run from every process at start,
    so a cluster with auto-creation off works, and so partition counts are ours rather than the broker's default."""
    admin = AIOKafkaAdminClient(**kafka.client_options(), client_id=f"{kafka.client_id}-admin")
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(name, num_partitions=partitions, replication_factor=kafka.topics.replication_factor)
            for name, partitions in topic_plan(kafka).items()
            if name not in existing
        ]
        if not wanted:
            return []
        response = await admin.create_topics(wanted)
        created = []
        for name, code, message in ((e[0], e[1], e[2]) for e in response.topic_errors):
            if code == 0:
                created.append(name)
            elif code != TopicAlreadyExistsError.errno:  # a racing process created it first
                raise RuntimeError(f"could not create topic {name}: error {code}: {message}")
        log.info("created topics %s", created)
        return created
    finally:
        await admin.close()


def make_producer(kafka: KafkaSettings, client_id: str) -> AIOKafkaProducer:
    return AIOKafkaProducer(**kafka.producer_options(), client_id=client_id)


def make_consumer(kafka: KafkaSettings, group_id: str | None, client_id: str, **overrides: object) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(**{**kafka.consumer_options(), **overrides}, group_id=group_id, client_id=client_id)


class RebalanceAware(Protocol):
    async def on_revoked(self, revoked: set[TopicPartition]) -> None: ...

    def on_assigned(self, assigned: set[TopicPartition]) -> None: ...


class RebalanceForwarder(ConsumerRebalanceListener):
    """aiokafka calls a listener object during a rebalance; this one hands the calls to their owner
    (a worker pipeline or the sink), which drains and commits before its partitions move."""

    def __init__(self, owner: RebalanceAware) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._owner.on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._owner.on_assigned(assigned)
