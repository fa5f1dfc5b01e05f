"""The ClickHouse sink in this process, against the real broker and the embedded engine:
a crash between insert and commit, an insert outage, and a result that is not a result."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import pytest
from aiokafka import TopicPartition
from prometheus_client import CollectorRegistry

from consumers.clickhouse import connect
from consumers.kafka import make_consumer, make_producer
from consumers.metrics import SinkMetrics
from consumers.sink import ClickHouseSink
from schemas.codec import Codec
from schemas.records import DeadLetter
from streams.settings import SluiceSettings
from tests.records import make_result

N = 300


@pytest.fixture
def sink_settings(settings: SluiceSettings, chdb_dsn: str) -> SluiceSettings:
    ch = settings.clickhouse.model_copy(update={"dsn": chdb_dsn, "database": f"sink_{uuid.uuid4().hex[:8]}"})
    sink = settings.sink.model_copy(update={"flush_interval_ms": 200, "insert_retry_backoff_ms": 100})
    return settings.model_copy(update={"clickhouse": ch, "sink": sink})


async def _produce_results(settings: SluiceSettings, garbage: bool = False) -> None:
    codec = Codec()
    producer = make_producer(settings.kafka, "test")
    await producer.start()
    try:
        for i in range(N):
            result = make_result(i, device_id=f"cam-{i % 3}", partition=i % 2)
            await producer.send(settings.kafka.topics.results, codec.write(result), key=b"k")
        if garbage:
            await producer.send(settings.kafka.topics.results, b"\x00\x00\x00\x00\x07not a result", key=b"k")
    finally:
        await producer.stop()


async def _run_sink(
    settings: SluiceSettings, until: Callable[[CollectorRegistry], bool], sink_class: type[ClickHouseSink] = ClickHouseSink,
    during: Callable[[CollectorRegistry], None] | None = None, timeout_s: float = 60,
) -> CollectorRegistry:
    registry = CollectorRegistry()
    sink = sink_class(settings.kafka, settings.sink, settings.clickhouse, SinkMetrics(registry))
    stopping = asyncio.Event()
    task = asyncio.create_task(sink.run(stopping))
    deadline = time.monotonic() + timeout_s
    try:
        while not until(registry):
            assert not task.done(), task.exception()
            assert time.monotonic() < deadline, "sink did not get there in time"
            if during is not None:
                during(registry)
            await asyncio.sleep(0.05)
    finally:
        stopping.set()
        await task
    return registry


def _rows(registry: CollectorRegistry) -> float:
    return registry.get_sample_value("sluice_sink_rows_inserted_total") or 0


def _count(settings: SluiceSettings, final: bool = False) -> int:
    client = connect(settings.clickhouse.dsn)
    table = f"{settings.clickhouse.database}.inference_results"
    return int(client.command(f"SELECT count() FROM {table}{' FINAL' if final else ''}"))


async def _committed(settings: SluiceSettings) -> int:
    consumer = make_consumer(settings.kafka, settings.sink.group_id, role="test-committed")
    await consumer.start()
    try:
        total = 0
        for p in range(settings.kafka.topics.results_partitions):
            total += await consumer.committed(TopicPartition(settings.kafka.topics.results, p)) or 0
        return total
    finally:
        await consumer.stop()


class CrashesBeforeCommit(ClickHouseSink):
    """Inserts, then 'crashes' before committing: its commits never happen."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)

        async def never() -> bool:
            return False

        self.checkpoint.commit = never  # type: ignore[method-assign]

    async def _final_flush(self) -> None:
        return None


async def test_a_crash_between_insert_and_commit_is_absorbed(sink_settings: SluiceSettings) -> None:
    await _produce_results(sink_settings)
    await _run_sink(sink_settings, lambda r: _rows(r) >= N, sink_class=CrashesBeforeCommit)
    assert _count(sink_settings) == N
    assert await _committed(sink_settings) == 0

    # Restarted with another batch size, the re-read rows form other batches: the insert
    # token cannot catch them, ReplacingMergeTree does.
    rebatched = sink_settings.model_copy(update={"sink": sink_settings.sink.model_copy(update={"batch_rows": 64})})
    registry = await _run_sink(rebatched, lambda r: _rows(r) >= N)
    assert _rows(registry) == N, "every row was read and inserted a second time"
    assert _count(sink_settings, final=True) == N, "yet queries see each input once"
    assert await _committed(sink_settings) == N


async def test_an_insert_outage_loses_nothing(sink_settings: SluiceSettings) -> None:
    """ClickHouse's own Kafka engine skips or loses data when inserts fail (#5749, #9378);
    this sink keeps the batch, retries, and commits only after the insert lands."""
    client = connect(sink_settings.clickhouse.dsn)
    db = sink_settings.clickhouse.database
    hidden, restored = False, False

    def outage(registry: CollectorRegistry) -> None:
        """Take the table away once the sink has created it; bring it back after two failed inserts."""
        nonlocal hidden, restored
        if not hidden and client.command(f"EXISTS TABLE {db}.inference_results"):
            client.command(f"RENAME TABLE {db}.inference_results TO {db}.hidden_results")
            hidden = True
        if hidden and not restored and (registry.get_sample_value("sluice_sink_insert_failures_total") or 0) >= 2:
            client.command(f"RENAME TABLE {db}.hidden_results TO {db}.inference_results")
            restored = True

    producer = asyncio.create_task(_produce_results(sink_settings))
    registry = await _run_sink(sink_settings, lambda r: _rows(r) >= N, during=outage)
    await producer
    assert restored
    assert (registry.get_sample_value("sluice_sink_insert_failures_total") or 0) >= 2
    assert _count(sink_settings, final=True) == N
    assert await _committed(sink_settings) == N


async def test_a_message_that_is_not_a_result_is_dead_lettered_and_committed(sink_settings: SluiceSettings) -> None:
    await _produce_results(sink_settings, garbage=True)
    await _run_sink(sink_settings, lambda r: _rows(r) >= N)
    assert _count(sink_settings, final=True) == N
    assert await _committed(sink_settings) == N + 1, "the garbage message's offset is committed too"
    consumer = make_consumer(sink_settings.kafka, None, role="test-dlq")
    await consumer.start()
    try:
        tps = [TopicPartition(sink_settings.kafka.topics.dead_letters, p) for p in range(2)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        letters = [m for batch in (await consumer.getmany(timeout_ms=2000)).values() for m in batch]
    finally:
        await consumer.stop()
    (letter,) = [Codec().read(m.value, DeadLetter) for m in letters]
    assert letter.component == "sink" and "unknown schema id" in letter.reason
