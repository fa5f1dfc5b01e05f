"""Fault injection on the ClickHouse sink, a real process writing to the embedded engine, with a real worker
producing its results: the sink killed with SIGKILL again and again while results flow, and a ClickHouse
outage while inputs keep flowing. Nothing may be lost; what is re-inserted is removed by the insert token or
by ReplacingMergeTree (`inference_results_dedup`, or FINAL), so the dedup view holds exactly one row per input.

The inputs are 500 frames and 9,500 audio chunks: the sink's cost is per result, whatever the modality, and
audio keeps the publisher and the worker cheap (a raw frame is 150 KB, an audio chunk 8 KB)."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from streams.local import processes
from streams.local.harness import (
    Components, RssSampler, free_port, group_lag_from, publish_stream, rss_mb, scrape,
)  # fmt: skip
from streams.local.observer import OutputObserver
from streams.settings import SluiceSettings
from tests.integration.scenario import counts, sink_caught_up, stop_sink_and_count, until_every_input_has_a_result

pytestmark = pytest.mark.slow

FRAMES, AUDIO = 500, 9_500
KILLS = 3


@pytest.fixture
def sink_settings(settings: SluiceSettings) -> SluiceSettings:
    """Metrics on, so the test can see the sink insert; smaller inserts than the default 10,000 rows, so that a
    kill can land between an insert and its commit and the bound on re-inserted rows means something."""
    sink = settings.sink.model_copy(update={"metrics_port": free_port(), "batch_rows": 500})
    return settings.model_copy(update={"sink": sink})


def _inserted(settings: SluiceSettings) -> float:
    try:
        return scrape(settings.sink.metrics_port).get_value("sluice_sink_rows_inserted_total")
    except OSError:
        return 0.0


def test_sink_killed_repeatedly_loses_nothing_and_duplicates_nothing(sink_settings: SluiceSettings) -> None:
    settings = sink_settings
    started = time.monotonic()
    components = Components(settings)
    rng = random.Random(7)
    try:
        components.start("worker", ["worker"])
        components.start("sink", ["sink"])

        async def scenario() -> tuple:
            observer = OutputObserver(settings)
            await observer.start()
            try:
                # ~45 s of stream at 220 inputs/s: three kill-and-restart cycles fit inside it. A cycle takes some
                # 15 s: the new sink opens ClickHouse (~3 s), then its group waits out the killed member's session
                # (6 s here) before handing the partitions over.
                stream = asyncio.create_task(publish_stream(settings, FRAMES, AUDIO, rate=220, seed=3))
                kills = []
                for _ in range(KILLS):
                    # Once this sink has inserted something, at a random point of its 1 s flush cycle.
                    deadline = time.monotonic() + 30
                    while _inserted(settings) == 0 and time.monotonic() < deadline:
                        await asyncio.sleep(0.1)
                    await asyncio.sleep(rng.uniform(0, 1.0))
                    inserted = _inserted(settings)
                    processes.kill(components.process("sink"))
                    kills.append({"at_s": round(time.monotonic() - started, 1), "rows_inserted_before": inserted,
                                  "results_seen": len(observer.observed.results)})  # fmt: skip
                    await asyncio.to_thread(components.start, "sink", ["sink"])
                assert not stream.done(), "the kills happened while results were flowing"
                published = await stream
                missing = await until_every_input_has_a_result(observer, published, timeout_s=90)
                lag = await sink_caught_up(settings, observer.observed)
                kills.append({"rows_inserted_before": _inserted(settings)})  # the last sink's, before it stops
                return published, observer.observed, missing, lag, kills
            finally:
                await observer.stop()

        published, observed, missing, sink_lag, kills = asyncio.run(scenario())
        clickhouse = stop_sink_and_count(settings, components)
    finally:
        components.stop_all()
    # Each kill can leave uninserted-or-uncommitted at most what the sink had polled past its last commit: one
    # flush's rows (batch_rows, plus up to one poll of batch_rows arriving before the flush).
    raw_bound = len(observed.unique_sources()) + KILLS * 2 * settings.sink.batch_rows
    # Rows the sinks sent to ClickHouse, each sink's count read just before it was killed or stopped: what
    # reached the table before the insert token and ReplacingMergeTree's merges took duplicates out (the
    # table's raw count() is read after merges, so it can hide them).
    rows_sent = int(sum(kill["rows_inserted_before"] for kill in kills))
    run = counts("sink kill -9 x3", published, observed, clickhouse, started, kills=kills[:-1], rows_sent=rows_sent,
                 raw_rows_bound=raw_bound, sink_lag=sink_lag)  # fmt: skip
    run.print()

    assert published.refused == 0 and len(published.sources) == FRAMES + AUDIO
    assert not missing and run.dead_letters == 0
    assert sink_lag == 0, "the last sink committed every result"
    assert clickhouse.view == clickhouse.final == clickhouse.distinct_sources == len(observed.unique_sources())
    assert set(clickhouse.dedup_sources) == observed.unique_sources() >= published.sources
    assert clickhouse.raw <= raw_bound and rows_sent <= raw_bound, "what was re-inserted is bounded"


OUTAGE_S = 30
MAX_BUFFERED_ROWS, BATCH_ROWS = 2_000, 500


def test_clickhouse_outage_keeps_the_backlog_in_kafka_and_loses_nothing(settings: SluiceSettings) -> None:
    """Inserts fail for 30 s while inputs keep flowing (the sink's table renamed away inside its process: see
    `outage_sink.py` for why there). The sink keeps its group and retries; at `max_buffered_rows` in flight it
    pauses, so its memory stays bounded while the backlog grows in Kafka as consumer lag; after the outage the
    retried insert lands and every input has exactly one row."""
    sink = settings.sink.model_copy(
        update={"metrics_port": free_port(), "max_buffered_rows": MAX_BUFFERED_ROWS, "batch_rows": BATCH_ROWS}
    )
    settings = settings.model_copy(update={"sink": sink})
    outage = settings.stack.run_dir / "clickhouse-outage"
    started = time.monotonic()
    components = Components(settings)
    try:
        components.start("worker", ["worker"])
        sink_process = components.start("sink", ["--outage-file", str(outage)], module="tests.integration.outage_sink")

        async def scenario() -> tuple:
            observer = OutputObserver(settings)
            await observer.start()
            samples: list[dict] = []

            async def sample(phase: str) -> None:
                metrics = scrape(sink.metrics_port)
                ends = observer.observed.topic_ends(settings.kafka.topics.results)
                samples.append({
                    "phase": phase, "t": time.monotonic(),
                    "buffered": metrics.get_value("sluice_sink_buffered_rows"),
                    "failures": metrics.get_value("sluice_sink_insert_failures_total"),
                    "lag": await group_lag_from(settings, sink.group_id, ends),
                    "rss_mb": rss_mb(sink_process.pid),
                })  # fmt: skip

            try:
                # ~45 s of stream at 220 inputs/s, the outage in the middle of it.
                stream = asyncio.create_task(publish_stream(settings, 300, 9_700, rate=220, seed=5))
                for _ in range(10):
                    await asyncio.sleep(0.5)
                    await sample("before")
                outage.touch()
                until = time.monotonic() + OUTAGE_S
                while time.monotonic() < until:
                    await asyncio.sleep(0.5)
                    await sample("outage")
                outage.unlink()
                assert not stream.done(), "inputs kept flowing through the outage"
                published = await stream
                missing = await until_every_input_has_a_result(observer, published, timeout_s=90)
                lag = await sink_caught_up(settings, observer.observed, timeout_s=90)
                await sample("after")
                return published, observer.observed, missing, lag, samples
            finally:
                await observer.stop()

        with RssSampler(components) as rss:
            published, observed, missing, sink_lag, samples = asyncio.run(scenario())
        assert sink_process.alive(), "the sink rode the outage out in the same process"
        clickhouse = stop_sink_and_count(settings, components)
    finally:
        components.stop_all()

    before = [s for s in samples if s["phase"] == "before"]
    during = [s for s in samples if s["phase"] == "outage"]
    baseline_mb = max(s["rss_mb"] for s in before)
    outage_start, outage_end = during[0]["t"], during[-1]["t"]
    # The bound: the sink's memory before the outage plus what the budget lets it hold: the buffered rows, each
    # a row (~1-2 KB) and its Kafka message (~1 KB), at most max_buffered_rows plus one poll (batch_rows) before
    # the pause takes hold, doubled; the consumer's fetch buffers (max_partition_fetch_bytes per partition,
    # compressed and decompressed); and 32 MB of allocator slack. None of it grows with the outage's length.
    fetch_mb = 2 * settings.kafka.topics.results_partitions * settings.kafka.max_partition_fetch_bytes / 1024 / 1024
    rss_bound_mb = baseline_mb + 2 * 3 * (MAX_BUFFERED_ROWS + BATCH_ROWS) / 1024 + fetch_mb + 32
    buffered_bound = MAX_BUFFERED_ROWS + BATCH_ROWS
    run = counts(
        "clickhouse outage 30 s", published, observed, clickhouse, started,
        max_buffered_rows=MAX_BUFFERED_ROWS, peak_buffered=max(s["buffered"] for s in during),
        lag_at_outage_start=during[0]["lag"], peak_lag=max(s["lag"] for s in during),
        insert_failures=samples[-1]["failures"], sink_rss_baseline_mb=round(baseline_mb, 1),
        sink_rss_peak_outage_mb=round(rss.peak("sink", outage_start, outage_end), 1),
        sink_rss_peak_outage_halves_mb=[round(rss.peak("sink", a, b), 1) for a, b in (
            (outage_start, (outage_start + outage_end) / 2), ((outage_start + outage_end) / 2, outage_end))],
        sink_rss_bound_mb=round(rss_bound_mb, 1), sink_lag=sink_lag,
    )  # fmt: skip
    run.print()

    assert published.refused == 0 and not missing and run.dead_letters == 0
    assert run.extra["insert_failures"] >= 2, "inserts failed during the outage and were retried"
    assert run.extra["peak_buffered"] <= buffered_bound, "the sink paused at its in-flight budget"
    assert run.extra["peak_lag"] > buffered_bound, "the excess stayed in Kafka, as consumer lag"
    assert run.extra["peak_lag"] > 2 * run.extra["lag_at_outage_start"] + 1_000, "lag grew during the outage"
    assert run.extra["sink_rss_peak_outage_mb"] <= rss_bound_mb, "the sink's memory stayed bounded"
    assert sink_lag == 0, "after the outage the sink caught up and committed every result"
    assert clickhouse.view == clickhouse.final == len(observed.unique_sources()) == len(published.sources)
    assert set(clickhouse.dedup_sources) == observed.unique_sources()
