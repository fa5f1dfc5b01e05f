"""A read-only view of what Sluice produced: results, alerts and dead letters.

The demo's summary and the integration tests read the output topics through
this, as any downstream service would. It assigns partitions directly (no group,
no commits), so watching never changes what the real consumers see, and it
stamps each result with its receive time for the capture-to-result latency.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from consumers.kafka import make_consumer
from schemas.codec import SchemaError
from schemas.records import Alert, DeadLetter, DriftEvent, InferenceResult, Record, Source
from schemas.registry import codec_for
from schemas.topics import modality
from streams.settings import SluiceSettings


_POINTS = (50, 95, 99)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {f"p{p}": float("nan") for p in _POINTS} | {"max": float("nan")}
    array = np.asarray(values)
    return {f"p{p}": round(float(np.percentile(array, p)), 2) for p in _POINTS} | {"max": round(float(array.max()), 2)}


@dataclass
class Observed:
    results: list[InferenceResult] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    drift_events: list[DriftEvent] = field(default_factory=list)
    undecodable: list[Source] = field(default_factory=list)  # messages on the output topics that are not Sluice's
    e2e_ms: list[float] = field(default_factory=list)
    first_result_at: float | None = None
    last_result_at: float | None = None
    # One past the highest offset read from each output partition: where a consumer group of the results topic
    # must have committed to have seen everything read here (the broker's reported end offsets can fall short).
    ends: dict[TopicPartition, int] = field(default_factory=dict)

    def sources(self) -> list[Source]:
        """The input (topic, partition, offset) of each result, duplicates included."""
        return [r.source for r in self.results]

    def unique_sources(self) -> set[Source]:
        return set(self.sources())

    def topic_ends(self, topic: str) -> dict[TopicPartition, int]:
        return {tp: end for tp, end in self.ends.items() if tp.topic == topic}

    def accuracy(self, modality_name: str) -> float | None:
        """Top-1 accuracy over distinct inputs of a modality that carry ground truth."""
        symbol = modality(modality_name).symbol
        latest = {r.source: r for r in self.results if r.modality == symbol and r.ground_truth is not None}
        if not latest:
            return None
        correct = sum(r.top_k[0].label == r.ground_truth for r in latest.values())
        return correct / len(latest)


class OutputObserver:
    def __init__(self, settings: SluiceSettings) -> None:
        self._settings = settings
        self._codec = codec_for(settings.schema_registry)
        topics = settings.kafka.topics
        self._kinds: dict[str, type[Record]] = {
            topics.results: InferenceResult, topics.alerts: Alert, topics.dead_letters: DeadLetter,
            topics.drift_events: DriftEvent,
        }  # fmt: skip
        self._consumer: AIOKafkaConsumer = make_consumer(settings.kafka, None, role="observer")
        self.observed = Observed()
        self._changed = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._partitions: dict[str, list[TopicPartition]] = {}

    async def start(self) -> None:
        await self._consumer.start()
        await self._consumer.topics()  # loads metadata for every topic, ours included
        # Kept now: once assigned, the client's metadata only follows the assigned topics.
        self._partitions = {
            topic: [TopicPartition(topic, p) for p in sorted(self._consumer.partitions_for_topic(topic) or ())]
            for topic in self._settings.kafka.topics.names()
        }
        partitions = [tp for topic in self._kinds for tp in self._partitions[topic]]
        self._consumer.assign(partitions)
        await self._consumer.seek_to_beginning(*partitions)
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._consumer.stop()

    async def _run(self) -> None:
        observed = self.observed
        while True:
            batches = await self._consumer.getmany(timeout_ms=100)
            now_us = time.time_ns() // 1000
            for tp, messages in batches.items():
                kind = self._kinds[tp.topic]
                if messages:
                    observed.ends[tp] = max(observed.ends.get(tp, 0), messages[-1].offset + 1)
                for message in messages:
                    try:
                        record = self._codec.read(message.value, kind)
                    except SchemaError:  # a foreign message on an output topic: the sink dead-letters it
                        observed.undecodable.append(Source(message.topic, message.partition, message.offset))
                        continue
                    if isinstance(record, InferenceResult):
                        observed.results.append(record)
                        observed.e2e_ms.append((now_us - record.capture_time_us) / 1000)
                        observed.first_result_at = observed.first_result_at or time.monotonic()
                        observed.last_result_at = time.monotonic()
                    elif isinstance(record, Alert):
                        observed.alerts.append(record)
                    elif isinstance(record, DriftEvent):
                        observed.drift_events.append(record)
                    else:
                        observed.dead_letters.append(record)
            if batches:
                self._changed.set()

    async def wait_for(self, predicate: Any, timeout_s: float) -> bool:
        """Wait until `predicate(observed)` holds; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while not predicate(self.observed):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.5))
            except TimeoutError:
                pass
        return True

    async def end_offsets(self, topic: str) -> dict[TopicPartition, int]:
        return await self._consumer.end_offsets(self._partitions[topic])


async def group_lag(admin: AIOKafkaAdminClient, observer: OutputObserver, group: str, topic: str) -> int:
    """Messages of `topic` not yet committed by `group` (uncommitted partitions count from 0)."""
    ends = await observer.end_offsets(topic)
    committed = await admin.list_consumer_group_offsets(group, partitions=list(ends))
    lag = 0
    for tp, end in ends.items():
        meta = committed.get(tp)
        lag += end - (meta.offset if meta is not None and meta.offset >= 0 else 0)
    return lag


def latency_breakdown(results: list[InferenceResult]) -> dict[str, dict[str, float]]:
    fields = defaultdict(list)
    for r in results:
        for name, value in r.latency.to_avro().items():
            fields[name].append(float(value))
    return {name: percentiles(values) for name, values in fields.items()}
