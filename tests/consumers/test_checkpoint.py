"""The commit protocol on a real consumer group: only the acknowledged prefix is committed, the budget
pauses and resumes the partitions, and a revoke drains, commits and forgets."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer, TopicPartition

from consumers.checkpoint import Checkpoint
from consumers.kafka import make_consumer, make_producer
from streams.settings import SluiceSettings


async def _joined_checkpoint(settings: SluiceSettings, **budget: object) -> tuple[Checkpoint, TopicPartition, list]:
    topic = settings.kafka.topics.results
    producer = make_producer(settings.kafka, "test")
    await producer.start()
    try:
        for i in range(10):
            await producer.send_and_wait(topic, f"m{i}".encode(), partition=0)
    finally:
        await producer.stop()
    consumer = make_consumer(settings.kafka, f"{topic}-checkpoint", role="test")
    options = {"max_messages": 100, "max_bytes": None, "drain_timeout_s": 0.3, **budget}
    checkpoint = Checkpoint(consumer, "test", **options)  # type: ignore[arg-type]
    await consumer.start()
    checkpoint.subscribe([topic])
    tp = TopicPartition(topic, 0)
    messages: list = []
    while len(messages) < 10:
        messages += (await consumer.getmany(tp, timeout_ms=500)).get(tp, [])
    await asyncio.wait_for(checkpoint.joined.wait(), 10)
    return checkpoint, tp, messages


async def _committed(consumer: AIOKafkaConsumer, tp: TopicPartition) -> int | None:
    return await consumer.committed(tp)


async def test_only_the_acknowledged_prefix_is_committed(settings: SluiceSettings) -> None:
    checkpoint, tp, messages = await _joined_checkpoint(settings)
    try:
        for m in messages:
            checkpoint.track(tp, m.offset, len(m.value))
        for offset in (0, 1, 2, 4, 4):  # 3 is not safe yet; a duplicate ack is a no-op
            checkpoint.ack(tp, offset)
        assert await checkpoint.commit()
        assert await _committed(checkpoint.consumer, tp) == 3
        # In flight: everything from 3 on (4 is safe but above the prefix); bytes are released per ack.
        assert checkpoint.inflight() == 7
        assert checkpoint.inflight_bytes == sum(len(m.value) for m in messages[3:]) - len(messages[4].value)

        checkpoint.halt()  # an outcome was refused: nothing more may be committed
        checkpoint.ack(tp, 3)
        assert not await checkpoint.commit()
        assert await _committed(checkpoint.consumer, tp) == 3
    finally:
        await checkpoint.consumer.stop()


async def test_the_budget_pauses_and_resumes_below_half(settings: SluiceSettings) -> None:
    checkpoint, tp, messages = await _joined_checkpoint(settings, max_messages=4)
    try:
        for m in messages[:4]:
            checkpoint.track(tp, m.offset)
        assert checkpoint.apply_budget() and tp in checkpoint.consumer.paused()
        checkpoint.ack(tp, messages[0].offset)
        assert checkpoint.apply_budget(), "3 in flight: not yet below half of 4"
        checkpoint.ack(tp, messages[1].offset)
        assert not checkpoint.apply_budget() and checkpoint.consumer.paused() == set()
    finally:
        await checkpoint.consumer.stop()


async def test_a_revoke_drains_commits_and_forgets(settings: SluiceSettings) -> None:
    checkpoint, tp, messages = await _joined_checkpoint(settings)
    try:
        for m in messages:
            checkpoint.track(tp, m.offset)

        async def ack_while_draining() -> None:
            for m in messages[:6]:
                await asyncio.sleep(0.01)
                checkpoint.ack(tp, m.offset)

        acking = asyncio.create_task(ack_while_draining())
        await checkpoint.on_partitions_revoked({tp})  # waits (bounded) for the acks, then commits
        await acking
        assert await _committed(checkpoint.consumer, tp) == 6
        assert checkpoint.inflight() == 0 and checkpoint.inflight_bytes == 0, "the rest is the next owner's"
        checkpoint.ack(tp, messages[6].offset)  # a late ack for a partition no longer owned
        assert not await checkpoint.commit()
    finally:
        await checkpoint.consumer.stop()
