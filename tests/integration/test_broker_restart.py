"""Fault injection on the broker: `kill -9` of Tansu mid-stream, restarted about 10 s later on the same port
and storage. The stack is the durable one (`streams/local/harness.py: durable`): Tansu keeps topics, data and
committed offsets in the stack's S3 server (moto), so what the broker acknowledged survives its death. The
worker, the sink and the notifier run throughout and must reconnect by themselves (same processes, no
restarts); every input the broker acknowledged gets a result, ClickHouse holds one row per result, and the
notifier consumes every result.

A producer that loses its broker while a batch is in flight sends it again, so an input can land twice (at two
offsets) or land without its acknowledgement having reached the publisher: results are owed to acknowledged
inputs, and counted for every input that landed.

Volume: 120 frames and 2,280 audio chunks at 60 inputs/s, with 2 partitions per topic. Tansu makes S3 requests
for every produce, fetch, commit and group heartbeat, and moto's S3 server (Python, on the same two cores)
answers a few hundred a second: the durable stack carried about 75 inputs/s end to end when nothing else ran,
and a third of that beside another busy process. ~40 s of stream leaves room to kill the broker in the middle."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from consumers.kafka import ensure_topics
from streams.local.harness import (
    Components, durable, fast_groups, isolated_settings, kill_broker, publish_stream, start_broker, wait_for_lag,
)  # fmt: skip
from streams.local.observer import OutputObserver
from streams.local.stack import LocalStack
from streams.settings import SluiceSettings
from tests.integration.scenario import counts, sink_caught_up, stop_sink_and_count, until_every_input_has_a_result

pytestmark = pytest.mark.slow

FRAMES, AUDIO = 120, 2_280
RATE = 60
DOWN_S = 10


def test_broker_killed_and_restarted_loses_nothing_acknowledged(tmp_path: Path) -> None:
    settings = durable(fast_groups(isolated_settings(SluiceSettings(), tmp_path)))
    few = settings.kafka.topics.model_copy(update={
        "frames_partitions": 2, "audio_partitions": 2, "results_partitions": 2, "alerts_partitions": 1,
        "dead_letters_partitions": 1,
    })  # fmt: skip
    settings = settings.model_copy(update={"kafka": settings.kafka.model_copy(update={"topics": few})})
    stack = LocalStack(settings)
    components = Components(settings)
    started = time.monotonic()
    try:
        stack.up()
        asyncio.run(ensure_topics(settings.kafka))
        components.wait_ready([components.launch(name, [name]) for name in ("worker", "sink", "notifier")])
        pids = {p.name: p.pid for p in components.started}

        async def scenario() -> tuple:
            observer = OutputObserver(settings)
            await observer.start()
            try:
                # ~40 s of stream; the broker is down for 10 s of it.
                stream = asyncio.create_task(publish_stream(settings, FRAMES, AUDIO, rate=RATE, seed=4))
                assert await observer.wait_for(lambda o: len(o.unique_sources()) >= 600, timeout_s=60)
                kill_broker(settings)
                killed = {"at_s": round(time.monotonic() - started, 1), "results_seen": len(observer.observed.results)}
                await asyncio.sleep(DOWN_S)
                await asyncio.to_thread(start_broker, settings)
                restarted_us = time.time_ns() // 1000
                published = await stream
                missing = await until_every_input_has_a_result(observer, published, timeout_s=120)
                sink_lag = await sink_caught_up(settings, observer.observed, timeout_s=120)
                results_ends = observer.observed.topic_ends(settings.kafka.topics.results)
                notifier_lag = await wait_for_lag(settings, settings.notifier.app_id, results_ends, timeout_s=120)
                return published, observer.observed, missing, sink_lag, notifier_lag, killed, restarted_us
            finally:
                await observer.stop()

        published, observed, missing, sink_lag, notifier_lag, killed, restarted_us = asyncio.run(scenario())
        alive = {p.name: p.alive() for p in components.started}
        clickhouse = stop_sink_and_count(settings, components)
    finally:
        components.stop_all()
        stack.down()
    alerts_after = sum(a.alert_time_us >= restarted_us for a in observed.alerts) if observed.alerts else 0
    run = counts(
        "broker kill -9 and restart", published, observed, clickhouse, started, killed=killed, down_s=DOWN_S,
        landed_unacknowledged=len(observed.unique_sources() - published.sources), sink_lag=sink_lag,
        notifier_lag=notifier_lag, alerts=len(observed.alerts), alerts_after_restart=alerts_after,
        components_alive=alive,
    )  # fmt: skip
    run.print()

    assert all(alive.values()) and {p.name: p.pid for p in components.started} == pids, (
        f"every component reconnected by itself, in the same process: {alive} (see {settings.stack.run_dir})"
    )
    assert not missing, f"{len(missing)} inputs the broker acknowledged never got a result"
    assert run.dead_letters == 0
    assert sink_lag == 0 and notifier_lag == 0, "the sink and the notifier consumed every result"
    assert clickhouse.view == clickhouse.final == len(observed.unique_sources())
    assert set(clickhouse.dedup_sources) == observed.unique_sources()
    assert alerts_after >= 1, "the notifier went on alerting after the restart"
