"""The ClickHouse sink: results topic -> `inference_results`, in batches, with stated guarantees.

Checkpoint order, per flush:

    1. insert the buffered rows, with insert_deduplication_token = hash of the batch's offset ranges
    2. commit, per partition, the offset after the last message in the batch

So a row is in ClickHouse before its offset is committed (no loss), and a crash
between 1 and 2 re-reads the batch: re-inserted identically it is dropped by the
token; re-batched differently, ReplacingMergeTree collapses it (the
`inference_results_dedup` view, or `FINAL`). A failing insert is retried with
backoff while the sink keeps polling, so it stays in its group; above
`max_buffered_rows` it pauses its partitions (bounded memory) until an insert
lands. A message that is not an InferenceResult goes to the dead-letter topic
and its offset commits with the batch. Unlike ClickHouse's Kafka engine, nothing
is skipped silently.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from prometheus_client import CollectorRegistry

from consumers.clickhouse import RESULT_COLUMNS, RESULTS_TABLE, apply_migrations, connect, result_row
from consumers.dead_letter import DeadLetterPublisher
from consumers.kafka import RebalanceForwarder, ensure_topics, make_consumer, make_producer
from consumers.metrics import SinkMetrics, serve_metrics
from schemas.codec import INFERENCE_RESULT, Codec, SchemaError
from streams.config import SluiceSettings

log = logging.getLogger(__name__)


class _Buffer:
    """Rows since the last successful flush, and the offset range per partition they came from."""

    def __init__(self) -> None:
        self.rows: list[list] = []
        self.ranges: dict[TopicPartition, tuple[int, int]] = {}
        self.started_at: float | None = None

    def add(self, message: ConsumerRecord, row: list | None) -> None:
        tp = TopicPartition(message.topic, message.partition)
        first, _ = self.ranges.get(tp, (message.offset, message.offset))
        self.ranges[tp] = (first, message.offset)
        if row is not None:
            self.rows.append(row)
        if self.started_at is None:
            self.started_at = time.monotonic()

    def row_count(self) -> int:
        return len(self.rows)

    def token(self) -> str:
        """Same batch, same token: what makes a retried insert idempotent."""
        spans = ",".join(f"{tp.topic}:{tp.partition}:{a}-{b}" for tp, (a, b) in sorted(self.ranges.items()))
        return hashlib.sha256(spans.encode()).hexdigest()


class ClickHouseSink:
    def __init__(self, settings: SluiceSettings, metrics: SinkMetrics) -> None:
        self._settings = settings
        self._sink = settings.sink
        self._metrics = metrics
        self._codec = Codec()
        self._table = f"{settings.clickhouse.database}.{RESULTS_TABLE}"
        self._consumer = make_consumer(settings.kafka, self._sink.group_id, client_id=f"{settings.kafka.client_id}-sink")
        self._producer = make_producer(settings.kafka, client_id=f"{settings.kafka.client_id}-sink")
        self._dead_letters = DeadLetterPublisher(
            self._producer, self._codec, settings.kafka.topics.dead_letters, component="sink"
        )
        # The embedded engine allows one engine per process; one thread owns the client.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clickhouse")
        self._client = None
        self._buffer = _Buffer()
        self._pending_dead_letters: list[asyncio.Future] = []
        self._next_attempt = 0.0
        self._failures_in_row = 0
        self._paused = False
        self.joined = asyncio.Event()

    async def _call(self, fn: Callable, *args: object) -> object:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def run(self, stopping: asyncio.Event) -> None:
        ch = self._settings.clickhouse
        self._client = await self._call(connect, ch.dsn)
        applied = await self._call(apply_migrations, self._client, ch.migrations_dir, ch.database)
        log.info("ClickHouse ready at %s (migrations applied now: %s)", ch.dsn, applied or "none")
        await ensure_topics(self._settings.kafka)
        await self._producer.start()
        await self._consumer.start()
        self._consumer.subscribe([self._settings.kafka.topics.results], listener=RebalanceForwarder(self))
        try:
            while not stopping.is_set():
                await self._poll_once()
                if self._flush_due():
                    await self._flush()
        finally:
            await self._final_flush()
            await self._consumer.stop()
            await self._producer.stop()
            await self._call(self._client.close)
            self._executor.shutdown(wait=True)

    async def _poll_once(self) -> None:
        rows = self._buffer.row_count()
        assignment = self._consumer.assignment()
        if rows >= self._sink.max_buffered_rows:
            self._consumer.pause(*assignment)
            self._paused = True
        elif self._paused:
            self._consumer.resume(*assignment)
            self._paused = False
        records = await self._consumer.getmany(timeout_ms=self._poll_timeout_ms(), max_records=self._sink.batch_rows)
        for messages in records.values():
            for message in messages:
                try:
                    _, result = self._codec.decode(message.value, expect=INFERENCE_RESULT)
                    row = result_row(result)
                except (SchemaError, KeyError, TypeError, ValueError) as exc:
                    delivery = await self._dead_letters.publish(message, "decode", type(exc).__name__, str(exc))
                    self._pending_dead_letters.append(delivery)
                    row = None
                self._buffer.add(message, row)
        self._metrics.buffered_rows.set(self._buffer.row_count())

    def _poll_timeout_ms(self) -> int:
        if self._buffer.started_at is None:
            return 100
        # The next flush, or the next retry of a failed one: polling faster would only spin.
        due = max(self._buffer.started_at + self._sink.flush_interval_ms / 1000, self._next_attempt)
        return int(max(0.0, min(due - time.monotonic(), 0.1)) * 1000)

    def _flush_due(self) -> bool:
        if self._buffer.started_at is None or time.monotonic() < self._next_attempt:
            return False
        age_ms = (time.monotonic() - self._buffer.started_at) * 1000
        return self._buffer.row_count() >= self._sink.batch_rows or age_ms >= self._sink.flush_interval_ms

    async def _flush(self) -> bool:
        """Insert, then commit. Returns whether the buffer is now empty."""
        buffer = self._buffer
        rows = buffer.rows
        try:
            if self._pending_dead_letters:
                await asyncio.gather(*self._pending_dead_letters)  # dead letters are part of the batch's outcome
                self._pending_dead_letters.clear()
            if rows:
                started = time.perf_counter()
                await self._call(self._insert, rows, buffer.token())
                self._metrics.insert_seconds.observe(time.perf_counter() - started)
        except Exception as exc:  # any failure: the batch stays, nothing is committed
            self._failures_in_row += 1
            backoff = min(30.0, self._sink.insert_retry_backoff_ms / 1000 * 2 ** (self._failures_in_row - 1))
            self._next_attempt = time.monotonic() + backoff
            self._metrics.insert_failures.inc()
            log.error("insert of %d rows failed (attempt %d, retry in %.1fs): %s", len(rows), self._failures_in_row,
                      backoff, exc)
            return False
        self._failures_in_row = 0
        self._metrics.rows_inserted.inc(len(rows))
        offsets = {tp: last + 1 for tp, (_, last) in buffer.ranges.items()}
        self._buffer = _Buffer()
        self._metrics.buffered_rows.set(0)
        await self._commit(offsets)
        return True

    def _insert(self, rows: list[list], token: str) -> None:
        self._client.insert(
            self._table, rows, column_names=RESULT_COLUMNS, settings={"insert_deduplication_token": token}
        )

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        assignment = self._consumer.assignment()
        owned = {tp: o for tp, o in offsets.items() if tp in assignment}
        if not owned:
            return
        try:
            await self._consumer.commit(owned)
        except (CommitFailedError, IllegalStateError, KafkaError) as exc:
            # The rows are in; the next owner re-reads them and deduplication absorbs it.
            log.warning("commit after insert failed (rows will be re-read and deduplicated): %s", exc)

    async def _final_flush(self) -> None:
        deadline = time.monotonic() + self._sink.drain_timeout_s
        while self._buffer.started_at is not None and time.monotonic() < deadline:
            if await self._flush():
                return
            await asyncio.sleep(max(0.0, self._next_attempt - time.monotonic()))
        if self._buffer.started_at is not None:
            log.error("stopping with %d rows not inserted; they stay uncommitted and will be re-read",
                      self._buffer.row_count())

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        if self._buffer.started_at is not None and not await self._flush():
            # Could not insert: hand the partitions over uncommitted. (aiokafka revokes the whole
            # assignment and the next assignment starts from committed offsets, so nothing is skipped.)
            log.warning("revoked with %d rows not inserted; they will be re-read", self._buffer.row_count())
            self._buffer = _Buffer()

    def on_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info("sink assigned %s", sorted((tp.topic, tp.partition) for tp in assigned))
        self.joined.set()


async def run_sink(
    settings: SluiceSettings, stopping: asyncio.Event, on_ready: Callable[[], None] | None = None
) -> None:
    registry = CollectorRegistry()
    serve_metrics(registry, settings.metrics_host, settings.sink.metrics_port)
    sink = ClickHouseSink(settings, SinkMetrics(registry))
    run = asyncio.create_task(sink.run(stopping))
    joined = asyncio.create_task(sink.joined.wait())
    await asyncio.wait([run, joined], return_when=asyncio.FIRST_COMPLETED)
    if joined.done() and on_ready is not None:
        on_ready()
    joined.cancel()
    await run
