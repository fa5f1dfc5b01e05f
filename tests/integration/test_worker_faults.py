"""Fault injection on real worker processes, with a sink writing to the embedded ClickHouse: a `kill -9` of a
worker mid-stream, and a rebalance storm (members joining, leaving and crashing while inputs flow). Nothing
acknowledged may be lost; duplicates are allowed (at-least-once), counted, bounded by what the killed member
had not committed, and removed downstream (ClickHouse's dedup view holds one row per input).

The streams mix 1,000 frames with 9,000 audio chunks. A raw frame is 150 KB and costs the publisher, the broker
and the worker about ten times an audio chunk (8 KB), so ~10k inputs stay within ~10 s of publishing on two
cores while both modalities' pipelines, and the byte side of the in-flight budget, are exercised."""

from __future__ import annotations

import asyncio
import math
import socket
import time
from collections import Counter

import pytest

from schemas.records import InferenceResult
from streams.local import processes
from streams.local.harness import Components, publish_stream
from streams.local.observer import OutputObserver
from streams.settings import SluiceSettings
from tests.integration.scenario import counts, sink_caught_up, stop_sink_and_count, until_every_input_has_a_result

pytestmark = pytest.mark.slow

FRAMES, AUDIO = 1_000, 9_000
PIPELINES = 2  # a worker started without --modality runs one pipeline (and consumer group) per modality


def worker_id(process: processes.ManagedProcess) -> str:
    return f"{socket.gethostname()}:{process.pid}"


def redo_bound(settings: SluiceSettings, killed_results: list[InferenceResult]) -> int:
    """What a killed worker can have left uncommitted, and so what its successor may redo: per pipeline, its
    in-flight budget (polled, result not yet acknowledged) plus what it acknowledged since its last commit (one
    commit interval, doubled for the commit's round trip), at the rate it delivered in its last second."""
    if not killed_results:
        return PIPELINES * settings.worker.max_inflight_messages
    last = max(r.result_time_us for r in killed_results)
    last_second = sum(r.result_time_us >= last - 1_000_000 for r in killed_results)
    window_s = 2 * settings.worker.commit_interval_ms / 1000
    return PIPELINES * settings.worker.max_inflight_messages + math.ceil(last_second * window_s)


def test_worker_kill_mid_stream_loses_nothing(settings: SluiceSettings, components: Components) -> None:
    started = time.monotonic()
    components.start("worker", ["worker"])
    components.start("sink", ["sink"])

    async def scenario() -> tuple:
        observer = OutputObserver(settings)
        await observer.start()
        try:
            stream = asyncio.create_task(publish_stream(settings, FRAMES, AUDIO, seed=1))
            assert await observer.wait_for(lambda o: len(o.unique_sources()) >= 3_000, timeout_s=60)
            killed = components.process("worker")
            processes.kill(killed)  # SIGKILL: no drain, no commit, no LeaveGroup
            killed_at = len(observer.observed.unique_sources())
            await asyncio.to_thread(components.start, "worker", ["worker"])
            published = await stream
            missing = await until_every_input_has_a_result(observer, published, timeout_s=90)
            lag = await sink_caught_up(settings, observer.observed)
            return published, observer.observed, missing, lag, killed, killed_at
        finally:
            await observer.stop()

    published, observed, missing, sink_lag, killed, killed_at = asyncio.run(scenario())
    clickhouse = stop_sink_and_count(settings, components)
    killed_results = [r for r in observed.results if r.worker_id == worker_id(killed)]
    bound = redo_bound(settings, killed_results)
    run = counts("worker kill -9", published, observed, clickhouse, started, killed_after_results=killed_at,
                 duplicate_bound=bound, sink_lag=sink_lag)  # fmt: skip
    run.print()

    assert published.refused == 0 and len(published.sources) == FRAMES + AUDIO
    assert not missing, f"{len(missing)} acknowledged inputs never got a result"
    assert observed.unique_sources() == published.sources, "no input is lost, and no result is of another"
    assert run.dead_letters == 0
    assert run.duplicates <= bound, "only the killed worker's uncommitted work is redone"
    redone = {source for source, n in Counter(observed.sources()).items() if n > 1}
    assert redone <= {r.source for r in killed_results}, "every duplicate redoes the killed worker's work"
    assert sink_lag == 0, "the sink committed every result"
    assert clickhouse.view == clickhouse.final == len(observed.unique_sources()) == FRAMES + AUDIO
    assert set(clickhouse.dedup_sources) == observed.unique_sources(), "one row per input, no other"


def test_rebalance_storm_loses_nothing_and_duplicates_are_removed_downstream(
    settings: SluiceSettings, components: Components
) -> None:
    """Three workers share each modality's group. While ~10k inputs flow, twice one worker joins and one leaves:
    first a graceful leave (SIGTERM: it drains, commits and leaves, as in a rolling deploy), then a crash
    (SIGKILL during the rebalance the join started). Every rebalance moves partitions with work in flight."""
    started = time.monotonic()
    components.wait_ready([components.launch(name, ["worker"]) for name in ("worker-a", "worker-b", "worker-c")])
    components.start("sink", ["sink"])
    rounds = (("worker-d", "worker-a", "SIGTERM"), ("worker-e", "worker-b", "SIGKILL"))

    async def scenario() -> tuple:
        observer = OutputObserver(settings)
        await observer.start()
        try:
            # ~30 s of stream: long enough for both rounds to happen while it flows.
            stream = asyncio.create_task(publish_stream(settings, FRAMES, AUDIO, rate=350, seed=2))
            events = []
            for joiner, leaver, how in rounds:
                await asyncio.sleep(3)
                await asyncio.to_thread(components.start, joiner, ["worker"])
                events.append((f"{joiner} joined", len(observer.observed.unique_sources())))
                await asyncio.sleep(2)
                leaving = components.process(leaver)
                if how == "SIGTERM":
                    assert await asyncio.to_thread(processes.stop, leaving, 30), f"{leaver} drains and leaves"
                else:
                    processes.kill(leaving)
                events.append((f"{leaver} {how}", len(observer.observed.unique_sources())))
            assert not stream.done(), "the storm happened while the inputs were flowing"
            published = await stream
            missing = await until_every_input_has_a_result(observer, published, timeout_s=90)
            lag = await sink_caught_up(settings, observer.observed)
            return published, observer.observed, missing, lag, events
        finally:
            await observer.stop()

    published, observed, missing, sink_lag, events = asyncio.run(scenario())
    clickhouse = stop_sink_and_count(settings, components)
    crashed = [r for r in observed.results if r.worker_id == worker_id(components.process("worker-b"))]
    bound = redo_bound(settings, crashed)
    by_worker = Counter(r.worker_id.rsplit(":", 1)[1] for r in observed.results)
    run = counts("rebalance storm", published, observed, clickhouse, started, events=events,
                 duplicate_bound=bound, results_by_worker_pid=dict(by_worker), sink_lag=sink_lag)  # fmt: skip
    run.print()

    assert published.refused == 0 and len(published.sources) == FRAMES + AUDIO
    assert not missing, f"{len(missing)} acknowledged inputs never got a result"
    assert observed.unique_sources() == published.sources, "no input is lost, and no result is of another"
    assert run.dead_letters == 0
    # Graceful leaves and joins drain and commit on revoke: what is redone is the crashed member's uncommitted work.
    assert run.duplicates <= bound
    assert len(by_worker) >= 4, "the joiners took partitions over"
    assert sink_lag == 0, "the sink committed every result"
    assert clickhouse.view == clickhouse.final == len(observed.unique_sources()) == FRAMES + AUDIO
    assert set(clickhouse.dedup_sources) == observed.unique_sources(), "duplicates are removed downstream"
