"""The ClickHouse sink: results topic -> `inference_results`, in batches, with stated guarantees.

It sits on the same `Checkpoint` as the worker (`checkpoint.py`); a message's
outcome is safe once its row is inserted, or its dead letter acknowledged. Per
flush (the checkpoint's "settle" step):

    1. insert the buffered rows, with insert_deduplication_token = hash of their offset ranges
    2. acknowledge their offsets in the checkpoint
    3. commit the acknowledged prefix of each owned partition

So a row is in ClickHouse before its offset is committed (no loss), and a crash
between 1 and 3 re-reads the batch: re-inserted identically it is dropped by the
token; re-batched differently, ReplacingMergeTree collapses it (the
`inference_results_dedup` view, or `FINAL`). A failing insert is retried with
backoff while the sink keeps polling, so it stays in its group; at
`max_buffered_rows` in flight the checkpoint pauses its partitions (bounded
memory) until inserts land. A message that is not an InferenceResult goes to
the dead-letter topic and its offset commits with the rest. Unlike ClickHouse's
Kafka engine, nothing is skipped silently.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable

from aiokafka import TopicPartition
from prometheus_client import CollectorRegistry

from consumers.checkpoint import Checkpoint
from consumers.clickhouse import RESULT_COLUMNS, RESULTS_TABLE, apply_migrations, connect, result_row
from consumers.kafka import KafkaSettings, ensure_topics, make_consumer, make_producer
from consumers.lifecycle import OwnThread, run_until_done
from consumers.metrics import SinkMetrics, serve_metrics
from consumers.outcomes import Outcomes
from consumers.settings import ClickHouseSettings, SinkSettings
from schemas.codec import Codec, SchemaError
from schemas.records import InferenceResult

log = logging.getLogger(__name__)


class _Buffer:
    """Rows not yet inserted, with the Kafka coordinates of the result each came from."""

    def __init__(self) -> None:
        self.entries: list[tuple[TopicPartition, int, list]] = []
        self.started_at: float | None = None

    def add(self, tp: TopicPartition, offset: int, row: list) -> None:
        self.entries.append((tp, offset, row))
        if self.started_at is None:
            self.started_at = time.monotonic()

    def row_count(self) -> int:
        return len(self.entries)

    def token(self) -> str:
        """Same batch, same token: what makes a retried insert idempotent."""
        ranges: dict[TopicPartition, tuple[int, int]] = {}
        for tp, offset, _ in self.entries:
            first, last = ranges.get(tp, (offset, offset))
            ranges[tp] = (min(first, offset), max(last, offset))
        spans = ",".join(f"{tp.topic}:{tp.partition}:{a}-{b}" for tp, (a, b) in sorted(ranges.items()))
        return hashlib.sha256(spans.encode()).hexdigest()

    def without(self, tps: set[TopicPartition]) -> _Buffer:
        kept = _Buffer()
        for entry in self.entries:
            if entry[0] not in tps:
                kept.add(*entry)
        kept.started_at = self.started_at if kept.entries else None
        return kept


class ClickHouseSink:
    def __init__(
        self, kafka: KafkaSettings, settings: SinkSettings, clickhouse: ClickHouseSettings, metrics: SinkMetrics
    ) -> None:
        self._kafka = kafka
        self._sink = settings
        self._clickhouse = clickhouse
        self._metrics = metrics
        self._codec = Codec()
        self._table = f"{clickhouse.database}.{RESULTS_TABLE}"
        self._producer = make_producer(kafka, role="sink")
        self.checkpoint = Checkpoint(
            make_consumer(kafka, settings.group_id, role="sink"), "sink",
            max_messages=settings.max_buffered_rows, max_bytes=None, drain_timeout_s=settings.drain_timeout_s,
            settle=self._settle, on_revoke=self._drop,
        )  # fmt: skip
        self._outcomes = Outcomes(
            self._producer, self._codec, self.checkpoint, kafka.topics.dead_letters, component="sink",
            on_failure=self._fail,
        )  # fmt: skip
        # The embedded engine allows one engine per process; one thread owns the client.
        self._thread = OwnThread("clickhouse")
        self._client = None
        self._buffer = _Buffer()
        self._next_attempt = 0.0
        self._failures_in_row = 0
        self._failure: BaseException | None = None
        self.joined = self.checkpoint.joined

    async def run(self, stopping: asyncio.Event) -> None:
        ch = self._clickhouse
        self._client = await self._thread.call(connect, ch.dsn)
        applied = await self._thread.call(apply_migrations, self._client, ch.migrations_dir, ch.database)
        log.info("ClickHouse ready (migrations applied now: %s)", applied or "none")
        await ensure_topics(self._kafka)
        consumer = self.checkpoint.consumer
        await self._producer.start()
        await consumer.start()
        self.checkpoint.subscribe([self._kafka.topics.results])
        try:
            while not stopping.is_set() and self._failure is None:
                await self._poll_once()
                if self._flush_due():
                    await self.flush()
        finally:
            await self._final_flush()
            await consumer.stop()
            await self._producer.stop()
            await self._thread.call(self._client.close)
            self._thread.close(wait=True)
        if self._failure is not None:
            raise self._failure

    def _fail(self, exc: BaseException) -> None:
        if self._failure is None:
            log.error("sink failing: %s", exc)
            self._failure = exc

    async def _poll_once(self) -> None:
        self.checkpoint.apply_budget()
        records = await self.checkpoint.consumer.getmany(
            timeout_ms=self._poll_timeout_ms(), max_records=self._sink.batch_rows
        )
        for tp, messages in records.items():
            for message in messages:
                self.checkpoint.track(tp, message.offset)
                try:
                    row = result_row(self._codec.read(message.value, InferenceResult))
                except (SchemaError, KeyError, TypeError, ValueError) as exc:
                    await self._outcomes.dead_letter(message, "decode", type(exc).__name__, str(exc))
                    continue
                self._buffer.add(tp, message.offset, row)
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

    async def flush(self) -> bool:
        """Insert the buffer, acknowledge its offsets, commit. Returns whether the buffer is now empty."""
        if not await self._insert_buffer():
            return False
        await self.checkpoint.commit()
        return True

    async def _insert_buffer(self) -> bool:
        buffer = self._buffer
        if not buffer.entries:
            return True
        rows = [row for _, _, row in buffer.entries]
        started = time.perf_counter()
        try:
            await self._thread.call(self._insert, rows, buffer.token())
        except Exception as exc:  # any failure: the rows stay buffered and unacknowledged
            self._failures_in_row += 1
            backoff = min(30.0, self._sink.insert_retry_backoff_ms / 1000 * 2 ** (self._failures_in_row - 1))
            self._next_attempt = time.monotonic() + backoff
            self._metrics.insert_failures.inc()
            log.error("insert of %d rows failed (attempt %d, retry in %.1fs): %s", len(rows), self._failures_in_row,
                      backoff, exc)  # fmt: skip
            return False
        self._metrics.insert_seconds.observe(time.perf_counter() - started)
        self._failures_in_row = 0
        self._metrics.rows_inserted.inc(len(rows))
        self._buffer = _Buffer()
        self._metrics.buffered_rows.set(0)
        for tp, offset, _ in buffer.entries:
            self.checkpoint.ack(tp, offset)
        return True

    def _insert(self, rows: list[list], token: str) -> None:
        self._client.insert(
            self._table, rows, column_names=RESULT_COLUMNS, settings={"insert_deduplication_token": token}
        )

    async def _settle(self) -> None:
        """The checkpoint's settle step: one insert attempt once the retry backoff allows it."""
        await asyncio.sleep(max(0.01, self._next_attempt - time.monotonic()))
        await self._insert_buffer()

    def _drop(self, revoked: set[TopicPartition]) -> None:
        """Revoked: rows of those partitions that are not inserted are the next owner's to re-read."""
        kept = self._buffer.without(revoked)
        if kept.row_count() < self._buffer.row_count():
            log.warning("revoked with %d rows not inserted; they will be re-read",
                        self._buffer.row_count() - kept.row_count())  # fmt: skip
        self._buffer = kept

    async def _final_flush(self) -> None:
        left = await self.checkpoint.drain()
        if left:
            log.error("stopping with %d results not inserted; they stay uncommitted and will be re-read", left)


async def run_sink(
    kafka: KafkaSettings,
    settings: SinkSettings,
    clickhouse: ClickHouseSettings,
    stopping: asyncio.Event,
    on_ready: Callable[[], None] | None = None,
    metrics_host: str = "127.0.0.1",
) -> None:
    registry = CollectorRegistry()
    serve_metrics(registry, metrics_host, settings.metrics_port)
    sink = ClickHouseSink(kafka, settings, clickhouse, SinkMetrics(registry))
    await run_until_done([asyncio.create_task(sink.run(stopping))], [sink.joined], on_ready)
