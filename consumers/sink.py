"""The ClickHouse sink: results topic -> `inference_results`, in batches, with stated guarantees.
(The shadow results topic -> `shadow_results`, and the drift events topic -> `drift_events`, the same way.)

It sits on the same `Checkpoint` as the worker (`checkpoint.py`); a message's
outcome is safe once its row is inserted, or its dead letter acknowledged. Per
flush (the checkpoint's "settle" step):

    1. insert the buffered rows, in chunks of at most `max_partitions_per_insert` days, each with
       insert_deduplication_token = hash of its exact offsets
    2. acknowledge their offsets in the checkpoint
    3. commit the acknowledged prefix of each owned partition

So a row is in ClickHouse before its offset is committed (no loss), and a crash
between 1 and 3 re-reads the batch: re-inserted identically it is dropped by the
token; re-batched differently, ReplacingMergeTree collapses it (the
`inference_results_dedup` view, or `FINAL`). An insert that fails for a reason
that may pass (ClickHouse down, the table missing) is retried with backoff while
the sink keeps polling, so it stays in its group; at `max_buffered_rows` in
flight the checkpoint pauses its partitions (bounded memory) until inserts land.

No row stops the sink. A message that is not an InferenceResult, or a result the
table cannot hold (`row_problem`), goes to the dead-letter topic instead of the
buffer. An insert that fails because of its rows (`rows_at_fault`) is split in
halves until each bad row is alone: those are dead-lettered, the rest inserted.
Their offsets commit with the rest. Unlike ClickHouse's Kafka engine, nothing
is skipped silently.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiokafka import ConsumerRecord, TopicPartition
from clickhouse_connect.driver.exceptions import DataError
from prometheus_client import CollectorRegistry

from consumers.checkpoint import Checkpoint
from consumers.clickhouse import (
    DRIFT_EVENT_COLUMNS, DRIFT_EVENTS_TABLE, RESULT_COLUMNS, RESULTS_TABLE, SHADOW_RESULTS_TABLE, apply_migrations,
    apply_retention, connect, drift_event_partition, drift_event_problem, drift_event_row, result_partition,
    result_row, row_problem, rows_at_fault,
)  # fmt: skip
from consumers.kafka import KafkaSettings, ensure_topics, make_consumer, make_producer
from consumers.lifecycle import OwnThread, run_until_done
from consumers.metrics import Health, SinkMetrics, serve_metrics
from consumers.outcomes import Outcomes
from consumers.query_endpoint import QueryEndpoint, QueryResult, run_readonly
from consumers.settings import ClickHouseSettings, SinkSettings
from schemas.codec import Codec, SchemaError
from schemas.records import DriftEvent, InferenceResult, Record
from schemas.registry import SchemaRegistrySettings, codec_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Route:
    """Where the records of one topic go: their type, table and columns, and how one becomes a row."""

    record_type: type[Record]
    table: str
    columns: tuple[str, ...]
    row: Callable[[Any], list]
    problem: Callable[[Any], str | None]  # why the table cannot hold a record, or None
    partition: Callable[[Any], int]  # the row's ClickHouse partition, as a day number


@dataclass(slots=True, eq=False)  # compared by identity: the buffer forgets the very entries it settled
class _Entry:
    tp: TopicPartition
    message: ConsumerRecord  # kept for the dead letter, should ClickHouse refuse the row
    row: list
    day: int  # the row's ClickHouse partition (`result_partition`)
    route: _Route  # where the row goes: results, shadow results and drift events have tables of their own


class _Buffer:
    """Rows not yet inserted, each with the Kafka message it came from."""

    def __init__(self) -> None:
        self.entries: list[_Entry] = []
        self.started_at: float | None = None

    def add(self, entry: _Entry) -> None:
        self.entries.append(entry)
        if self.started_at is None:
            self.started_at = time.monotonic()

    def row_count(self) -> int:
        return len(self.entries)

    def remove(self, settled: list[_Entry]) -> None:
        """Forget entries whose row is inserted or whose dead letter is on its way."""
        gone = set(settled)
        self.entries = [entry for entry in self.entries if entry not in gone]
        if not self.entries:
            self.started_at = None

    def chunks(self, max_partitions: int) -> list[list[_Entry]]:
        """The entries as inserts of at most `max_partitions` ClickHouse partitions each, day by day.

        ClickHouse refuses an insert that touches more than max_partitions_per_insert_block partitions (100 by
        default), and results captured over many days (a backfill, a device with a wrong clock) would otherwise
        fail every retry. Chunking keeps each insert within the server's limit rather than raising it per
        insert: the limit guards the server (each partition an insert touches becomes a part of its own), a
        settings profile may forbid changing it, and the usual batch spans one or two days, so it stays one
        insert. Each chunk carries its own rows' token, so a retried chunk is as idempotent as a retried batch."""
        by_table: dict[str, dict[int, list[_Entry]]] = {}
        for entry in self.entries:
            by_table.setdefault(entry.route.table, {}).setdefault(entry.day, []).append(entry)
        chunks = []
        for by_day in by_table.values():  # an insert goes to one table
            days = sorted(by_day)
            chunks += [
                [entry for day in days[i : i + max_partitions] for entry in by_day[day]]
                for i in range(0, len(days), max_partitions)
            ]
        return chunks

    def without(self, tps: set[TopicPartition]) -> _Buffer:
        kept = _Buffer()
        for entry in self.entries:
            if entry.tp not in tps:
                kept.add(entry)
        kept.started_at = self.started_at if kept.entries else None
        return kept


def _token(entries: list[_Entry]) -> str:
    """Same rows, same token: what makes a retried insert idempotent. Built from each partition's exact offsets,
    as runs, not from their range: a chunk or a bisected half holds only some offsets of its range, and must not
    pass for another set of rows with the same range (ClickHouse would drop those as a retry). A contiguous batch gets
    the token it got when batches were inserted whole."""
    offsets: dict[TopicPartition, list[int]] = {}
    for entry in entries:
        offsets.setdefault(entry.tp, []).append(entry.message.offset)
    runs = []
    for tp in sorted(offsets):
        ordered = sorted(offsets[tp])
        starts = [o for i, o in enumerate(ordered) if i == 0 or ordered[i - 1] != o - 1]
        ends = [o for i, o in enumerate(ordered) if i == len(ordered) - 1 or ordered[i + 1] != o + 1]
        runs += [f"{tp.topic}:{tp.partition}:{a}-{b}" for a, b in zip(starts, ends, strict=True)]
    return hashlib.sha256(",".join(runs).encode()).hexdigest()


def _why_refused(exc: BaseException) -> str:
    reason = f"ClickHouse cannot take this row: {exc}"
    if isinstance(exc, DataError) and exc.__cause__ is not None:
        # The driver's DataError names the column; its cause says what was wrong with the value.
        cause = exc.__cause__
        reason += f" ({type(cause).__module__}.{type(cause).__qualname__}: {cause})"
    return reason


class ClickHouseSink:
    def __init__(
        self, kafka: KafkaSettings, settings: SinkSettings, clickhouse: ClickHouseSettings, metrics: SinkMetrics,
        codec: Codec | None = None,
    ) -> None:  # fmt: skip
        self._kafka = kafka
        self._sink = settings
        self._clickhouse = clickhouse
        self._metrics = metrics
        self._codec = codec or Codec()
        db, topics = clickhouse.database, kafka.topics
        results = (InferenceResult, RESULT_COLUMNS, result_row, row_problem, result_partition)
        self._routes = {
            topics.results: _Route(results[0], f"{db}.{RESULTS_TABLE}", *results[1:]),
            topics.shadow_results: _Route(results[0], f"{db}.{SHADOW_RESULTS_TABLE}", *results[1:]),
            topics.drift_events: _Route(DriftEvent, f"{db}.{DRIFT_EVENTS_TABLE}", DRIFT_EVENT_COLUMNS, drift_event_row,
                                        drift_event_problem, drift_event_partition),
        }  # fmt: skip
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
        # The revoke handler's drain runs in aiokafka's coordinator task, beside the main loop's flush: one
        # insert attempt at a time, so that no row is inserted or dead-lettered twice over.
        self._inserting = asyncio.Lock()
        self._next_attempt = 0.0
        self._failures_in_row = 0
        self._failure: BaseException | None = None
        self.joined = self.checkpoint.joined

    async def run(self, stopping: asyncio.Event) -> None:
        ch = self._clickhouse
        consumer = self.checkpoint.consumer
        try:
            self._client = await self._thread.call(connect, ch.dsn)
            applied = await self._thread.call(apply_migrations, self._client, ch.migrations_dir, ch.database)
            await self._thread.call(
                apply_retention, self._client, ch.database, ch.retention_days, ch.aggregate_retention_days
            )
            log.info("ClickHouse ready (migrations applied now: %s)", applied or "none")
            await ensure_topics(self._kafka)
        except BaseException:
            # Not started yet, but built: closed, so that the one line of the error is all a user sees.
            await consumer.stop()
            await self._producer.stop()
            self._thread.close(wait=True)
            raise
        endpoint = self._serve_queries()
        await self._producer.start()
        await consumer.start()
        self.checkpoint.subscribe(list(self._routes))
        try:
            while not stopping.is_set() and self._failure is None:
                await self._poll_once()
                if self._flush_due():
                    await self.flush()
        finally:
            await self._final_flush()
            await consumer.stop()
            await self._producer.stop()
            if endpoint is not None:
                endpoint.stop()
            await self._thread.call(self._client.close)
            self._thread.close(wait=True)
        if self._failure is not None:
            raise self._failure

    def _serve_queries(self) -> QueryEndpoint | None:
        """The read-only SQL endpoint, where the sink holds the only handle on an embedded engine. A port
        in use costs analysts their endpoint, not the results their sink: logged, and the sink goes on."""
        if not self._clickhouse.dsn.startswith("chdb://") or self._sink.query_port is None:
            return None
        try:
            endpoint = QueryEndpoint(self._sink.query_host, self._sink.query_port, self.query,
                                     asyncio.get_running_loop())  # fmt: skip
        except OSError as exc:
            log.error("read-only SQL endpoint not started on %s:%s: %s", self._sink.query_host, self._sink.query_port,
                      exc)  # fmt: skip
            return None
        endpoint.start()
        return endpoint

    async def query(self, sql: str) -> QueryResult:
        """Read-only SQL on the sink's own client, between its inserts."""
        return await self._thread.call(run_readonly, self._client, sql)

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
                route = self._routes[tp.topic]
                try:
                    record = self._codec.read(message.value, route.record_type)
                except (SchemaError, KeyError, TypeError, ValueError) as exc:
                    await self._outcomes.dead_letter(message, "decode", type(exc).__name__, str(exc))
                    continue
                problem = route.problem(record)
                if problem is not None:  # in the buffer it would fail the insert of every row beside it
                    await self._outcomes.dead_letter(message, "validate", "RowRejected", problem)
                    continue
                self._buffer.add(_Entry(tp, message, route.row(record), route.partition(record), route))
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
        """One attempt to insert the buffer, chunk by chunk. Returns whether all of it is settled: False after
        a failure that may pass, retried once the backoff allows."""
        async with self._inserting:
            for chunk in self._buffer.chunks(self._sink.max_partitions_per_insert):
                if not await self._insert(chunk):
                    return False
        self._failures_in_row = 0
        self._metrics.buffered_rows.set(self._buffer.row_count())
        return True

    async def _insert(self, entries: list[_Entry]) -> bool:
        """Insert `entries` and acknowledge them. If ClickHouse refuses them because of their rows, split them
        in halves until each bad row is alone: it goes to the dead-letter topic, the others go in. Returns False
        after a failure that may pass; what is not settled by then stays buffered."""
        rows = [entry.row for entry in entries]
        started = time.perf_counter()
        try:
            await self._thread.call(self._insert_rows, entries[0].route, rows, _token(entries))
        except Exception as exc:
            if not rows_at_fault(exc):
                self._back_off(len(rows), exc)
                return False
            if len(entries) == 1:
                await self._outcomes.dead_letter(entries[0].message, "insert", type(exc).__name__, _why_refused(exc))
                self._buffer.remove(entries)
                return True
            log.warning("insert of %d rows refused because of its rows (%s: %s); splitting it to find them",
                        len(rows), type(exc).__name__, exc)  # fmt: skip
            half = len(entries) // 2
            return await self._insert(entries[:half]) and await self._insert(entries[half:])
        self._metrics.insert_seconds.observe(time.perf_counter() - started)
        self._metrics.rows_inserted.inc(len(rows))
        self._buffer.remove(entries)
        for entry in entries:
            self.checkpoint.ack(entry.tp, entry.message.offset)
        return True

    def _back_off(self, rows: int, exc: Exception) -> None:
        """An insert failed for a reason that may pass: its rows stay buffered and unacknowledged."""
        self._failures_in_row += 1
        backoff = min(30.0, self._sink.insert_retry_backoff_ms / 1000 * 2 ** (self._failures_in_row - 1))
        self._next_attempt = time.monotonic() + backoff
        self._metrics.insert_failures.inc()
        log.error("insert of %d rows failed (attempt %d, retry in %.1fs): %s", rows, self._failures_in_row, backoff,
                  exc)  # fmt: skip

    def _insert_rows(self, route: _Route, rows: list[list], token: str) -> None:
        self._client.insert(
            route.table, rows, column_names=route.columns, settings={"insert_deduplication_token": token}
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
    schema_registry: SchemaRegistrySettings | None = None,
) -> None:
    registry = CollectorRegistry()
    health = Health()
    serve_metrics(registry, metrics_host, settings.metrics_port, health)
    beating = asyncio.create_task(health.keep_beating(stopping), name="heartbeat")
    sink = ClickHouseSink(kafka, settings, clickhouse, SinkMetrics(registry), codec_for(schema_registry))
    try:
        await run_until_done([asyncio.create_task(sink.run(stopping))], [sink.joined], health.ready_then(on_ready))
    finally:
        beating.cancel()
