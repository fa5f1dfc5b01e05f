"""The dead-letter topic: where an input goes when it cannot be processed, with why.

The original key and value travel in the dead letter, so a fixed worker (or a
human) can replay it. A dead letter counts as the input's outcome: once the
broker acknowledges it, the input's offset may be committed.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiokafka import AIOKafkaProducer, ConsumerRecord
from aiokafka.errors import MessageSizeTooLargeError

from schemas.codec import DEAD_LETTER, Codec

log = logging.getLogger(__name__)


def dead_letter_record(
    topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None,
    stage: str, error_type: str, reason: str, component: str,
) -> dict:
    log.warning("dead letter %s[%d]@%d (%s): %s", topic, partition, offset, stage, reason)
    return {
        "source_topic": topic,
        "source_partition": partition,
        "source_offset": offset,
        "key": key,
        "value": value,
        "stage": stage,
        "error_type": error_type,
        "reason": reason,
        "component": component,
        "failed_time_us": time.time_ns() // 1000,
    }


class DeadLetterPublisher:
    def __init__(self, producer: AIOKafkaProducer, codec: Codec, topic: str, component: str) -> None:
        self._producer = producer
        self._codec = codec
        self.topic = topic
        self.component = component

    async def publish(self, message: ConsumerRecord, stage: str, error_type: str, reason: str) -> asyncio.Future:
        """Queue a dead letter for `message`; the returned future resolves when the broker has it."""
        record = dead_letter_record(
            message.topic, message.partition, message.offset, message.key, message.value,
            stage, error_type, reason, self.component,
        )  # fmt: skip
        try:
            return await self._send(record, message.key)
        except MessageSizeTooLargeError:
            # The input filled a whole request by itself; keep the why and the coordinates, drop the bytes.
            size = len(message.value or b"")
            record["value"] = None
            record["reason"] = f"{reason} (original value of {size} bytes dropped: too large for a dead letter)"
            return await self._send(record, message.key)

    async def _send(self, record: dict, key: bytes | None) -> asyncio.Future:
        return await self._producer.send(self.topic, self._codec.encode(DEAD_LETTER, record), key=key)
