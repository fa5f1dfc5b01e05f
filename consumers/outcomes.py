"""The outcome of each consumed message (a result, or a dead letter with why) on its way to the broker.

An outcome is produced, and once the broker acknowledges it (acks=all) the
message's offset is acknowledged in the checkpoint, so it may be committed. A
refused or cancelled delivery halts the checkpoint and fails the process: its
offsets stay uncommitted and the next owner redoes them, rather than skipping an
input whose outcome was lost.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aiokafka import AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import MessageSizeTooLargeError

from consumers.checkpoint import Checkpoint
from schemas.codec import Codec
from schemas.errors import SluiceError
from schemas.records import DeadLetter, Record, Source, dead_letter_for

log = logging.getLogger(__name__)


class DeliveryFailed(SluiceError):
    """The broker refused an outcome after the producer's retries; the process stops without committing it."""


def source_of(message: ConsumerRecord) -> Source:
    return Source(message.topic, message.partition, message.offset)


class Outcomes:
    def __init__(
        self,
        producer: AIOKafkaProducer,
        codec: Codec,
        checkpoint: Checkpoint,
        dead_letter_topic: str,
        component: str,
        on_failure: Callable[[BaseException], None],
    ) -> None:
        self._producer = producer
        self._codec = codec
        self._checkpoint = checkpoint
        self._dead_letter_topic = dead_letter_topic
        self.component = component
        self._on_failure = on_failure

    async def publish(
        self, topic: str, record: Record, key: bytes | None, message: ConsumerRecord,
        on_delivered: Callable[[], None] | None = None,
    ) -> None:
        """Queue `record` as the outcome of `message`; its offset is acknowledged once the broker has it."""
        delivery = await self._producer.send(topic, self._codec.write(record), key=key)
        delivery.add_done_callback(lambda future: self._settled(future, message, on_delivered))

    async def dead_letter(
        self, message: ConsumerRecord, stage: str, error_type: str, reason: str,
        on_delivered: Callable[[], None] | None = None,
    ) -> None:
        """Send `message` to the dead-letter topic with why; that is its outcome."""
        log.warning("dead letter %s[%d]@%d (%s): %s", message.topic, message.partition, message.offset, stage, reason)
        letter = dead_letter_for(
            source_of(message), message.key, message.value, stage, error_type, reason, self.component,
            message.headers or (),
        )  # fmt: skip
        try:
            await self.publish(self._dead_letter_topic, letter, message.key, message, on_delivered)
        except MessageSizeTooLargeError:
            await self.publish(self._dead_letter_topic, _without_value(letter), message.key, message, on_delivered)

    def _settled(self, future: asyncio.Future, message: ConsumerRecord, on_delivered: Callable[[], None] | None) -> None:
        if future.cancelled() or future.exception() is not None:
            why = "cancelled" if future.cancelled() else future.exception()
            self._checkpoint.halt()
            self._on_failure(DeliveryFailed(f"outcome of {message.topic}[{message.partition}]@{message.offset} "
                                            f"was not delivered: {why}"))  # fmt: skip
            return
        self._checkpoint.ack(TopicPartition(message.topic, message.partition), message.offset)
        if on_delivered is not None:
            on_delivered()


def _without_value(letter: DeadLetter) -> DeadLetter:
    """The input filled a whole request by itself: keep the why and the coordinates, drop the bytes."""
    size = len(letter.value or b"")
    letter.value = None
    letter.reason = f"{letter.reason} (original value of {size} bytes dropped: too large for a dead letter)"
    return letter
