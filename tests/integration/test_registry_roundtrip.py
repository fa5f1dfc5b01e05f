"""A worker pointed at a schema registry, on the real local stack: a frame written by confluent-kafka's
`AvroSerializer` (registry id, not Sluice's pinned one) and published with aiokafka is inferred, and its
result, written with the registry's id for the results subject, decodes with confluent-kafka's
`AvroDeserializer`. The registry is the registry-protocol double (`tests/schemas/registry_double.py`):
no registry server installs from the package registries here."""

from __future__ import annotations

import asyncio
import struct
import time
import uuid
from collections.abc import Iterator

import numpy as np
import pytest
from aiokafka import TopicPartition
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from consumers.kafka import make_consumer, make_producer
from consumers.worker import run_worker
from producers.synth import CameraScene
from schemas.codec import SCHEMA_DIR
from schemas.records import FrameChunk, Source, now_us
from schemas.registry import SchemaRegistrySettings
from streams.local.harness import Components
from streams.settings import SluiceSettings
from tests.schemas.registry_double import RegistryDouble

DEVICE = "cam-registry"


@pytest.fixture
def registry() -> Iterator[RegistryDouble]:
    with RegistryDouble() as double:
        yield double


async def _publish_with_confluent_serializer(settings: SluiceSettings, client: SchemaRegistryClient) -> Source:
    frame, label = CameraScene(np.random.default_rng(7)).next_frame()
    chunk = FrameChunk(
        device_id=DEVICE, trace_id=uuid.uuid4().hex, seq=0, capture_time_us=now_us(), encoding="RAW",
        height=frame.shape[0], width=frame.shape[1], channels=3, dtype="uint8", data=frame.tobytes(), label=label,
    )  # fmt: skip
    topic = settings.kafka.topics.frames
    serializer = AvroSerializer(client, (SCHEMA_DIR / "frame_chunk.avsc").read_text())
    value = serializer(chunk.to_avro(), SerializationContext(topic, MessageField.VALUE))
    producer = make_producer(settings.kafka, "registry-test")
    await producer.start()
    try:
        sent = await producer.send_and_wait(topic, value, key=DEVICE.encode())
    finally:
        await producer.stop()
    return Source(sent.topic, sent.partition, sent.offset)


async def _first_output(settings: SluiceSettings, timeout_s: float) -> tuple[str, bytes]:
    """(topic, value) of the first message on the results or dead-letter topic."""
    topics = settings.kafka.topics
    consumer = make_consumer(settings.kafka, None, role="registry-test")
    await consumer.start()
    try:
        await consumer.topics()
        partitions = [
            TopicPartition(topic, p)
            for topic in (topics.results, topics.dead_letters)
            for p in sorted(consumer.partitions_for_topic(topic) or ())
        ]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for tp, messages in (await consumer.getmany(timeout_ms=200)).items():
                if messages:
                    return tp.topic, messages[0].value
        raise AssertionError(f"no result nor dead letter within {timeout_s} s")
    finally:
        await consumer.stop()


def test_a_frame_from_confluent_serializer_is_inferred_and_its_result_decodes_with_confluent_deserializer(
    settings: SluiceSettings, components: Components, registry: RegistryDouble
) -> None:
    with_registry = settings.model_copy(update={"schema_registry": SchemaRegistrySettings(url=registry.url)})
    components.start("worker", ["worker", "--modality", "frame"], settings=with_registry)
    client = SchemaRegistryClient({"url": registry.url})

    source = asyncio.run(_publish_with_confluent_serializer(settings, client))
    topic, value = asyncio.run(_first_output(settings, timeout_s=60))

    topics = settings.kafka.topics
    frames_id, result_id = (registry.subject_ids(f"{t}-value") for t in (topics.frames, topics.results))
    assert frames_id == [1]  # the registry's own ids, not Sluice's pinned 1001
    assert topic == topics.results, f"the frame was dead-lettered: {value!r}"
    result = AvroDeserializer(client)(value, SerializationContext(topic, MessageField.VALUE))
    assert struct.unpack(">I", value[1:5])[0] == result_id[0] < 1000
    assert (result["device_id"], result["source_topic"], result["source_partition"], result["source_offset"]) == (
        DEVICE, *source,
    )  # fmt: skip
    assert result["top_k"] and result["model_name"]
