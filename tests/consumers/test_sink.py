"""The ClickHouse sink in this process, against the real broker and the embedded engine:
a crash between insert and commit, an insert outage, a result that is not a result, results
the table cannot hold, and a batch spanning more days than one insert may."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable

import pytest
from aiokafka import ConsumerRecord, TopicPartition
from clickhouse_connect.driver.client import Client
from prometheus_client import CollectorRegistry

from consumers.clickhouse import apply_migrations, connect
from consumers.kafka import make_consumer, make_producer
from consumers.metrics import SinkMetrics
from consumers.query_endpoint import QueryFailed, query_endpoint
from consumers.sink import ClickHouseSink, _Entry, _token
from schemas.codec import Codec
from schemas.records import DeadLetter, DriftEvent, InferenceResult
from streams.local.stack import LocalStack
from streams.settings import SluiceSettings, settings_env
from tests.records import make_result

N = 300


@pytest.fixture
def sink_settings(settings: SluiceSettings, chdb_dsn: str) -> SluiceSettings:
    ch = settings.clickhouse.model_copy(update={"dsn": chdb_dsn, "database": f"sink_{uuid.uuid4().hex[:8]}"})
    sink = settings.sink.model_copy(update={"flush_interval_ms": 200, "insert_retry_backoff_ms": 100})
    return settings.model_copy(update={"clickhouse": ch, "sink": sink})


def _results(n: int = N) -> list[InferenceResult]:
    return [make_result(i, device_id=f"cam-{i % 3}", partition=i % 2) for i in range(n)]


async def _produce_results(settings: SluiceSettings, garbage: bool = False) -> None:
    await _produce(settings, _results(), garbage)


async def _produce(settings: SluiceSettings, results: list[InferenceResult], garbage: bool = False) -> None:
    codec = Codec()
    producer = make_producer(settings.kafka, "test")
    await producer.start()
    try:
        for result in results:
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


def _migrated(client: Client, settings: SluiceSettings) -> bool:
    """Whether the sink has set ClickHouse up: every migration applied, and the retention set on the last
    table it sets (a test that takes a table away must wait for that)."""
    db = settings.clickhouse.database
    if not client.command(f"EXISTS TABLE {db}.schema_migrations"):
        return False
    applied = int(client.command(f"SELECT count() FROM {db}.schema_migrations"))
    if applied != len(list(settings.clickhouse.migrations_dir.glob("*.sql"))):
        return False
    last = client.command(f"SELECT create_table_query FROM system.tables WHERE database = '{db}' "
                          "AND name = 'input_stats_per_minute'")  # fmt: skip
    return " TTL " in str(last)


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


async def _dead_letters(settings: SluiceSettings) -> list[DeadLetter]:
    """Every dead letter on this test's topic, read to its end."""
    consumer = make_consumer(settings.kafka, None, role="test-dlq")
    await consumer.start()
    try:
        topics = settings.kafka.topics
        tps = [TopicPartition(topics.dead_letters, p) for p in range(topics.dead_letters_partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        messages = []
        deadline = time.monotonic() + 10
        for tp in tps:
            while await consumer.position(tp) < ends[tp]:
                assert time.monotonic() < deadline, "the dead letters could not be read back"
                messages += [m for batch in (await consumer.getmany(tp, timeout_ms=500)).values() for m in batch]
    finally:
        await consumer.stop()
    return [Codec().read(m.value, DeadLetter) for m in messages]


def _offset_of(letter: DeadLetter) -> int:
    """The input offset of the result a dead letter carries (its own offset is the results topic's)."""
    return Codec().read(letter.value, InferenceResult).source_offset


def _failures(registry: CollectorRegistry) -> float:
    return registry.get_sample_value("sluice_sink_insert_failures_total") or 0


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
        """Take the table away once the sink has migrated it; bring it back after two failed inserts."""
        nonlocal hidden, restored
        if not hidden and _migrated(client, sink_settings):
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
    (letter,) = await _dead_letters(sink_settings)
    assert letter.component == "sink" and "unknown schema id" in letter.reason


async def test_results_the_table_cannot_hold_are_dead_lettered_and_the_rest_inserted(
    sink_settings: SluiceSettings,
) -> None:
    """seq = -1 is valid Avro (a device without the SDK sent it) but no UInt64: before, its batch failed
    every retry and nothing behind it was ever committed."""
    bad = {0, 7, 150, 299}
    results = _results()
    for i in bad:
        results[i].seq = -1
    await _produce(sink_settings, results)
    registry = await _run_sink(sink_settings, lambda r: _rows(r) >= N - len(bad))
    assert _rows(registry) == N - len(bad)
    assert _count(sink_settings, final=True) == N - len(bad)
    assert await _committed(sink_settings) == N, "the dead-lettered offsets are committed with the rest"
    letters = await _dead_letters(sink_settings)
    assert sorted(_offset_of(letter) for letter in letters) == sorted(bad)
    for letter in letters:
        assert (letter.stage, letter.error_type, letter.component) == ("validate", "RowRejected", "sink")
        assert letter.reason.startswith("seq is -1") and "UInt64" in letter.reason
    assert _failures(registry) == 0, "no insert carried a bad row"


async def test_a_batch_spanning_400_days_is_inserted_in_chunks(sink_settings: SluiceSettings) -> None:
    """The table is partitioned by day, and ClickHouse refuses an insert into more than 100 partitions:
    the sink inserts such a batch in chunks of at most 100 days."""
    days = 400
    results = _results(days)
    for day, result in enumerate(results):
        result.capture_time_us += day * 86_400_000_000
    await _produce(sink_settings, results)
    # One batch: every result is polled before the first flush is due.
    one_batch = sink_settings.sink.model_copy(update={"flush_interval_ms": 3_000})
    registry = await _run_sink(sink_settings.model_copy(update={"sink": one_batch}), lambda r: _rows(r) >= days)
    assert _rows(registry) == days
    assert _count(sink_settings, final=True) == days
    client = connect(sink_settings.clickhouse.dsn)
    table = f"{sink_settings.clickhouse.database}.inference_results"
    assert int(client.command(f"SELECT uniqExact(_partition_id) FROM {table}")) == days
    assert await _committed(sink_settings) == days
    assert _failures(registry) == 0, "no insert went over the partition limit"
    assert (registry.get_sample_value("sluice_sink_insert_seconds_count") or 0) >= days / 100


async def test_a_row_the_driver_cannot_serialize_is_found_by_bisection(
    sink_settings: SluiceSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row that passes `row_problem` yet fails its insert (here: row_problem is switched off) must not
    hold the others back: the batch is split until the row is alone, dead-lettered, and the rest inserted."""
    monkeypatch.setattr("consumers.sink.row_problem", lambda result: None)
    results = _results()
    results[123].seq = -1
    await _produce(sink_settings, results)
    registry = await _run_sink(sink_settings, lambda r: _rows(r) >= N - 1)
    assert _rows(registry) == N - 1
    assert _count(sink_settings, final=True) == N - 1
    assert await _committed(sink_settings) == N
    (letter,) = await _dead_letters(sink_settings)
    assert _offset_of(letter) == 123
    assert (letter.stage, letter.error_type) == ("insert", "DataError")
    assert "column `seq`" in letter.reason and "out of range" in letter.reason
    assert _failures(registry) == 0, "a refused row is not retried"


async def test_a_row_the_server_refuses_is_found_by_bisection(sink_settings: SluiceSettings) -> None:
    """The same for a refusal by ClickHouse itself: a CHECK constraint (a later migration could add one)."""
    client = connect(sink_settings.clickhouse.dsn)
    db = sink_settings.clickhouse.database
    apply_migrations(client, sink_settings.clickhouse.migrations_dir, db)
    client.command(f"ALTER TABLE {db}.inference_results ADD CONSTRAINT plausible_seq CHECK seq < 1000000000")
    results = _results()
    results[42].seq = 10**12
    await _produce(sink_settings, results)
    registry = await _run_sink(sink_settings, lambda r: _rows(r) >= N - 1)
    assert _count(sink_settings, final=True) == N - 1
    assert await _committed(sink_settings) == N
    (letter,) = await _dead_letters(sink_settings)
    assert _offset_of(letter) == 42
    assert (letter.stage, letter.error_type) == ("insert", "DatabaseError")
    assert "VIOLATED_CONSTRAINT" in letter.reason
    assert _failures(registry) == 0


def _entries(offsets: list[int], partition: int = 0) -> list[_Entry]:
    tp = TopicPartition("results", partition)
    return [
        # No route: a token reads only the entries' coordinates.
        _Entry(tp, ConsumerRecord("results", partition, o, 0, 0, None, b"", None, 0, 0, ()), [], 0, None)  # type: ignore[arg-type]
        for o in offsets
    ]


def test_an_insert_token_names_exactly_its_rows() -> None:
    whole = _entries(list(range(10)))
    assert _token(whole) == hashlib.sha256(b"results:0:0-9").hexdigest(), "a whole batch keeps its token"
    assert _token(list(reversed(whole))) == _token(whole), "a retried chunk gets the same token"
    # A chunk of some days holds some offsets of a range: another set with the same range is other rows.
    assert _token(_entries([0, 9])) != _token(_entries([0, 4, 9]))
    assert _token(_entries([0, 1, 5]) + _entries([3], partition=1)) == hashlib.sha256(
        b"results:0:0-1,results:0:5-5,results:1:3-3"
    ).hexdigest()


async def test_analysts_query_while_the_sink_runs_and_cannot_write(sink_settings: SluiceSettings) -> None:
    """The sink holds the embedded engine (one process per data directory) and serves read-only SQL:
    through the endpoint and through `sluice clickhouse query`, while it inserts."""
    await _produce_results(sink_settings)
    url = f"http://{sink_settings.sink.query_host}:{sink_settings.sink.query_port}"
    table = f"{sink_settings.clickhouse.database}.inference_results"
    answers: dict[str, object] = {}

    async def ask() -> None:
        result = await asyncio.to_thread(query_endpoint, url, f"SELECT count() AS n FROM {table}")
        answers["endpoint"] = result.as_dicts()[0]["n"]
        cli = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "streams.cli", "clickhouse", "query", f"SELECT count() AS n FROM {table}"],
            env=os.environ | settings_env(sink_settings), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        answers["cli"] = json.loads(cli.stdout.strip().splitlines()[-1])[0]["n"] if cli.returncode == 0 else cli.stderr
        for name, sql in (("drop", f"DROP TABLE {table}"), ("insert", f"INSERT INTO {table} (trace_id) VALUES ('x')"),
                          ("typo", f"SELEC count() FROM {table}")):  # fmt: skip
            with pytest.raises(QueryFailed) as refused:
                await asyncio.to_thread(query_endpoint, url, sql)
            answers[name] = str(refused.value)
        rows = await asyncio.to_thread(LocalStack(sink_settings).status)
        answers["stack"] = next(row for row in rows if row.name == "clickhouse")

    asked: list[asyncio.Task] = []

    def once_inserted(registry: CollectorRegistry) -> None:
        if _rows(registry) >= N and not asked:
            asked.append(asyncio.get_running_loop().create_task(ask()))

    await _run_sink(sink_settings, until=lambda _: bool(asked) and asked[0].done(), during=once_inserted)
    asked[0].result()
    assert answers["endpoint"] == N
    assert answers["cli"] == N, answers["cli"]
    assert "READONLY" in str(answers["drop"]) and "READONLY" in str(answers["insert"])
    assert "Syntax error" in str(answers["typo"])
    stack_row = answers["stack"]
    assert stack_row.running and "a sink holds it" in stack_row.endpoint, "sluice stack status sees the sink's engine"
    assert _count(sink_settings) == N, "nothing was dropped or written by the queries"


async def test_drift_events_are_stored_in_their_own_table(sink_settings: SluiceSettings) -> None:
    """The drift monitor publishes its verdicts; the sink stores them beside the results, as it stores results."""
    now = int(time.time() * 1e6)
    events = [
        DriftEvent(window_start_us=now - 10_000_000, window_end_us=now, device_group=f"cam-{i}", modality="FRAME",
                   model_name="frame_classifier", model_version=1, statistic="brightness", test="cvm",
                   score=0.5 + i, threshold=1.0, p_value=None, drifted=i > 0, reference_size=300, current_size=100,
                   detected_at_us=now)  # fmt: skip
        for i in range(3)
    ]
    codec = Codec()
    producer = make_producer(sink_settings.kafka, "test")
    await producer.start()
    try:
        for event in events:
            await producer.send_and_wait(sink_settings.kafka.topics.drift_events, codec.write(event), key=b"g")
    finally:
        await producer.stop()
    await _run_sink(sink_settings, lambda r: _rows(r) >= 3)
    client = connect(sink_settings.clickhouse.dsn)
    rows = client.query(
        f"SELECT device_group, drifted, score, p_value FROM {sink_settings.clickhouse.database}.drift_events FINAL "
        "ORDER BY device_group"
    ).result_rows
    assert rows == [("cam-0", False, 0.5, None), ("cam-1", True, 1.5, None), ("cam-2", True, 2.5, None)]
