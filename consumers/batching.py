"""Dynamic batching across partitions, by size and deadline.

A batch closes when it holds `max_size` messages or when its oldest message has
waited `max_delay_s` since it was polled, whichever comes first. The deadline
runs from the poll, not from when the engine asked for work, so messages that
queued while the engine was busy do not wait a second time; under load batches
fill to max_size, and when idle a lone message waits at most max_delay_s.
(A max delay of 0 would disable batching, as Ray Serve's old default did.)
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from aiokafka import ConsumerRecord, TopicPartition

from schemas.records import Source


@dataclass(slots=True)
class Polled:
    """A message as the worker polled it."""

    message: ConsumerRecord
    polled_at: float = field(default_factory=time.monotonic)
    polled_time_us: int = field(default_factory=lambda: time.time_ns() // 1000)

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.message.topic, self.message.partition)

    @property
    def source(self) -> Source:
        return Source(self.message.topic, self.message.partition, self.message.offset)

    @property
    def size(self) -> int:
        return len(self.message.value or b"")


class Batcher:
    def __init__(self, max_size: int, max_delay_s: float) -> None:
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        self.max_size = max_size
        self.max_delay_s = max_delay_s
        # Unbounded here: the worker bounds what it polls (messages and bytes) before it gets here.
        self._queue: asyncio.Queue[Polled] = asyncio.Queue()

    def put(self, item: Polled) -> None:
        self._queue.put_nowait(item)

    def pending(self) -> int:
        return self._queue.qsize()

    async def next_batch(self) -> list[Polled]:
        """Wait for the first message, then gather until the batch is full or its deadline passes."""
        batch = [await self._queue.get()]
        deadline = batch[0].polled_at + self.max_delay_s
        while len(batch) < self.max_size:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return batch
