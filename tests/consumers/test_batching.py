import asyncio
import time

from aiokafka import ConsumerRecord

from consumers.batching import Batcher, Polled


def _polled(offset: int, polled_at: float | None = None) -> Polled:
    message = ConsumerRecord("t", 0, offset, 0, 0, b"k", b"v", None, 1, 1, [])
    return Polled(message) if polled_at is None else Polled(message, polled_at=polled_at)


async def test_a_full_batch_closes_at_once() -> None:
    batcher = Batcher(max_size=4, max_delay_s=10.0)
    for offset in range(6):
        batcher.put(_polled(offset))
    started = time.monotonic()
    batch = await batcher.next_batch()
    assert [p.message.offset for p in batch] == [0, 1, 2, 3]
    assert time.monotonic() - started < 0.5
    assert batcher.pending() == 2


async def test_a_partial_batch_closes_at_the_deadline() -> None:
    batcher = Batcher(max_size=16, max_delay_s=0.05)
    batcher.put(_polled(0))
    started = time.monotonic()
    batch = await batcher.next_batch()
    waited = time.monotonic() - started
    assert len(batch) == 1
    assert 0.04 <= waited < 0.5


async def test_late_arrivals_join_before_the_deadline() -> None:
    batcher = Batcher(max_size=16, max_delay_s=0.2)
    batcher.put(_polled(0))

    async def arrive_later() -> None:
        await asyncio.sleep(0.05)
        batcher.put(_polled(1))

    task = asyncio.create_task(arrive_later())
    batch = await batcher.next_batch()
    await task
    assert [p.message.offset for p in batch] == [0, 1]


async def test_the_deadline_runs_from_the_poll_not_from_the_request() -> None:
    """Messages that queued while the engine was busy must not wait a second time."""
    batcher = Batcher(max_size=16, max_delay_s=0.5)
    batcher.put(_polled(0, polled_at=time.monotonic() - 1.0))
    started = time.monotonic()
    await batcher.next_batch()
    assert time.monotonic() - started < 0.1
