"""The outcome of each consumed message (a result, or a dead letter with why) on its way to the broker.

An outcome is produced, and once the broker acknowledges it (acks=all) the
message's offset is acknowledged in the checkpoint, so it may be committed.

A delivery that fails for a transient reason (the broker restarting, a leader
moving, a timeout) is sent again with backoff until `retry_for_s` has passed
since its first failure; meanwhile its offset stays unacknowledged, so nothing
behind it is committed and the in-flight budget bounds what waits. Retried
outcomes can arrive after later ones: consumers key on the input's coordinates,
not on order. A refusal that retrying cannot cure (authorization, an invalid
topic), or a transient one that outlasts the retry window, halts the checkpoint
and fails the process: its offsets stay uncommitted and the next owner redoes
them, rather than skipping an input whose outcome was lost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from aiokafka import AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordTooLargeError,
    TopicAuthorizationFailedError,
    UnsupportedVersionError,
)

from consumers.checkpoint import Checkpoint
from schemas.codec import Codec
from schemas.errors import SluiceError
from schemas.records import DeadLetter, Record, Source, dead_letter_for

log = logging.getLogger(__name__)

# Refusals that the same record would get again, however long we waited.
_PERMANENT = (
    MessageSizeTooLargeError, RecordTooLargeError, TopicAuthorizationFailedError, ClusterAuthorizationFailedError,
    InvalidTopicError, UnsupportedVersionError,
)  # fmt: skip
_BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0)


class DeliveryFailed(SluiceError):
    """The broker refused an outcome for good; the process stops without committing it."""


def source_of(message: ConsumerRecord) -> Source:
    return Source(message.topic, message.partition, message.offset)


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, KafkaError) and not isinstance(exc, _PERMANENT)


class Outcomes:
    def __init__(
        self,
        producer: AIOKafkaProducer,
        codec: Codec,
        checkpoint: Checkpoint,
        dead_letter_topic: str,
        component: str,
        on_failure: Callable[[BaseException], None],
        retry_for_s: float = 120.0,
    ) -> None:
        self._producer = producer
        self._codec = codec
        self._checkpoint = checkpoint
        self._dead_letter_topic = dead_letter_topic
        self.component = component
        self._on_failure = on_failure
        self._retry_for_s = retry_for_s
        self._retries: set[asyncio.Task] = set()
        self.retried = 0  # deliveries sent again after a transient failure

    async def publish(
        self, topic: str, record: Record, key: bytes | None, message: ConsumerRecord,
        on_delivered: Callable[[], None] | None = None,
    ) -> None:  # fmt: skip
        """Queue `record` as the outcome of `message`; its offset is acknowledged once the broker has it.
        Raises the producer's error at once where no retry can help (MessageSizeTooLargeError)."""
        await _Delivery(self, topic, self._codec.write(record, topic=topic), key, message, on_delivered).send()

    async def dead_letter(
        self, message: ConsumerRecord, stage: str, error_type: str, reason: str,
        on_delivered: Callable[[], None] | None = None,
    ) -> None:  # fmt: skip
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

    def close(self) -> None:
        """Stop retrying: what is still unacknowledged stays uncommitted and is redone by the next owner."""
        for task in self._retries:
            task.cancel()

    def _fail(self, message: ConsumerRecord, why: object) -> None:
        self._checkpoint.halt()
        self._on_failure(DeliveryFailed(f"outcome of {message.topic}[{message.partition}]@{message.offset} "
                                        f"was not delivered: {why}"))  # fmt: skip


class _Delivery:
    """One outcome's way to the broker, sent again after transient failures."""

    def __init__(
        self, outcomes: Outcomes, topic: str, value: bytes, key: bytes | None, message: ConsumerRecord,
        on_delivered: Callable[[], None] | None,
    ) -> None:  # fmt: skip
        self.outcomes = outcomes
        self.topic, self.value, self.key, self.message = topic, value, key, message
        self.on_delivered = on_delivered
        self.attempts = 0
        self.give_up_at: float | None = None

    async def send(self) -> None:
        self.attempts += 1
        try:
            future = await self.outcomes._producer.send(self.topic, self.value, key=self.key)
        except KafkaError as exc:
            if self.attempts == 1 and not _transient(exc):
                raise  # the caller decides (a result too large becomes a dead letter)
            self._retry_or_fail(exc)
            return
        future.add_done_callback(self._settled)

    def _settled(self, future: asyncio.Future) -> None:
        if future.cancelled():
            self.outcomes._fail(self.message, "cancelled")
        elif (exc := future.exception()) is not None:
            self._retry_or_fail(exc)
        else:
            self.outcomes._checkpoint.ack(TopicPartition(self.message.topic, self.message.partition),
                                          self.message.offset)  # fmt: skip
            if self.on_delivered is not None:
                self.on_delivered()

    def _retry_or_fail(self, exc: BaseException) -> None:
        now = time.monotonic()
        if self.give_up_at is None:
            self.give_up_at = now + self.outcomes._retry_for_s
        if not _transient(exc) or now >= self.give_up_at:
            self.outcomes._fail(self.message, f"{type(exc).__name__}: {exc} (after {self.attempts} attempts)")
            return
        delay = _BACKOFF_S[min(self.attempts, len(_BACKOFF_S)) - 1]
        log.warning("delivery to %s for %s[%d]@%d failed (%s: %s); retrying in %.1fs", self.topic, self.message.topic,
                    self.message.partition, self.message.offset, type(exc).__name__, exc, delay)  # fmt: skip
        self.outcomes.retried += 1
        task = asyncio.get_running_loop().create_task(self._resend(delay))
        self.outcomes._retries.add(task)
        task.add_done_callback(self.outcomes._retries.discard)

    async def _resend(self, delay: float) -> None:
        await asyncio.sleep(delay)
        await self.send()


def _without_value(letter: DeadLetter) -> DeadLetter:
    """The input filled a whole request by itself: keep the why and the coordinates, drop the bytes."""
    size = len(letter.value or b"")
    letter.value = None
    letter.reason = f"{letter.reason} (original value of {size} bytes dropped: too large for a dead letter)"
    return letter
