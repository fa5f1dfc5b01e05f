"""Model lifecycle under flowing traffic, on the real local stack: a worker and a sink as their own processes,
plans changed with `sluice models activate` while frames stream in.

One run, in phases 6 s apart: v1 serves (configured) -> activate v2 (a warm hot-swap) -> activate v4, a
corrupt upload (refused; v2 serves on) -> the operator rolls back to v2 and starts v3 as a canary on 25% of
the devices -> v1 as a shadow on every batch. Every test reads that run."""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiokafka import TopicPartition

from consumers.kafka import make_consumer
from consumers.model_control import canary_bucket
from schemas.codec import Codec
from schemas.records import InferenceResult
from streams.local import processes
from streams.local.harness import Components, Published, _clickhouse_query, publish_stream, scoped
from streams.local.observer import Observed, OutputObserver
from streams.settings import SluiceSettings, settings_env
from tests.model_versions import MODEL, repository

RATE = 60  # frames/s: well under one worker's capacity, so every phase sees results promptly
PHASE_S = 6.0
CANARY_SHARE = 0.25


@dataclass
class LifecycleRun:
    settings: SluiceSettings
    published: Published
    observed: Observed
    shadow: list[InferenceResult]
    shadow_rows: int
    status: str  # `sluice models status` after the run
    worker_log: str
    activated_at: dict[str, float] = field(default_factory=dict)


def _sluice(settings: SluiceSettings, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "streams.cli", *args], env=os.environ | settings_env(settings) | {"COLUMNS": "200"},
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return out.stdout


async def _read_all(settings: SluiceSettings, topic: str) -> list[InferenceResult]:
    """Every record of `topic`, read until nothing new arrives for 3 s (the broker's end offsets may fall short)."""
    consumer = make_consumer(settings.kafka, None, role="shadow-reader")
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        if not partitions:
            await consumer.topics()
            partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        codec, found, quiet_since = Codec(), [], time.monotonic()
        while time.monotonic() - quiet_since < 3:
            batches = await consumer.getmany(timeout_ms=200)
            for messages in batches.values():
                found += [codec.read(m.value, InferenceResult) for m in messages]
                quiet_since = time.monotonic()
        return found
    finally:
        await consumer.stop()


@pytest.fixture(scope="module")
def run(stack_settings: SluiceSettings, tmp_path_factory: pytest.TempPathFactory) -> LifecycleRun:
    tmp = tmp_path_factory.mktemp("lifecycle")
    models = repository(tmp / "models", {1: "good", 2: "good", 3: "good", 4: "corrupt"})
    settings = scoped(stack_settings, tmp, "lifecycle")
    settings = settings.model_copy(update={
        "engine": settings.engine.model_copy(update={"model_repository": models, "frame_model_version": 1}),
        "worker": settings.worker.model_copy(update={"model_poll_s": 2.0}),
    })  # fmt: skip
    components = Components(settings)
    activated_at: dict[str, float] = {}
    try:
        worker = components.start("worker", ["worker", "--modality", "frame"])
        sink = components.start("sink", ["sink"])

        async def stream_and_change_plans() -> tuple[Published, Observed]:
            observer = OutputObserver(settings)
            await observer.start()
            try:
                frames = int(RATE * PHASE_S * 6)
                streaming = asyncio.create_task(publish_stream(settings, frames, 0, rate=RATE, cameras=8))
                for phase, args, wait_s in (
                    ("v2", ["2"], PHASE_S), ("v4", ["4"], PHASE_S),
                    ("rollback", ["2"], PHASE_S),  # the operator rolls the broken release back
                    ("canary", ["3", "--canary", str(CANARY_SHARE)], 0), ("shadow", ["1", "--shadow", "1"], PHASE_S),
                ):  # fmt: skip
                    await asyncio.sleep(wait_s)
                    await asyncio.to_thread(_sluice, settings, "models", "activate", MODEL, *args)
                    activated_at[phase] = time.time()
                published = await streaming
                await observer.wait_for(lambda o: o.unique_sources() >= published.sources, timeout_s=90)
                await asyncio.sleep(2)  # a duplicate or a late result would show by now
                return published, observer.observed
            finally:
                await observer.stop()

        published, observed = asyncio.run(stream_and_change_plans())
        status = _sluice(settings, "models", "status", MODEL)
        shadow = asyncio.run(_read_all(settings, settings.kafka.topics.shadow_results))
        assert processes.stop(sink, timeout_s=30), "the sink flushes and stops on SIGTERM"
        table = f"{settings.clickhouse.database}.shadow_results_dedup"
        (row,) = _clickhouse_query(settings, f"SELECT count() AS n FROM {table}")
        processes.stop(worker, timeout_s=30)
        worker_log = Path(worker.log_path).read_text()
        return LifecycleRun(settings, published, observed, shadow, int(row["n"]), status, worker_log, activated_at)
    finally:
        components.stop_all()


def test_no_input_is_lost_or_doubled_through_the_swaps(run: LifecycleRun) -> None:
    assert run.published.refused == 0 and len(run.published.sources) == int(RATE * PHASE_S * 6)
    assert run.observed.unique_sources() == run.published.sources
    assert len(run.observed.results) == len(run.published.sources), "one result per input, none twice"
    assert not run.observed.dead_letters


def test_every_result_names_the_version_that_made_it_and_the_swap_is_clean(run: LifecycleRun) -> None:
    by_version: dict[int, list[InferenceResult]] = {}
    for result in run.observed.results:
        assert result.model_name == MODEL
        by_version.setdefault(result.model_version, []).append(result)
    assert set(by_version) == {1, 2, 3}, "v4 never served"
    # Swapped between two batches: every v1 result came before every v2 result.
    assert max(r.result_time_us for r in by_version[1]) < min(r.result_time_us for r in by_version[2])
    # Served from the moment the plan changed, give or take the load and warm-up.
    assert min(r.result_time_us for r in by_version[2]) / 1e6 < run.activated_at["v2"] + 5


def test_the_first_batch_after_the_swap_is_as_fast_as_the_rest(run: LifecycleRun) -> None:
    """Warmed at every batch size before the swap: no first-call stall (Triton #7776). A figure, with a loose
    bound: this 2-core machine is shared, and one batch's time is noisy."""
    v2 = sorted((r for r in run.observed.results if r.model_version == 2), key=lambda r: r.result_time_us)
    first = v2[0].latency.inference_ms
    typical = statistics.median(r.latency.inference_ms for r in v2)
    print(f"first batch after the swap: {first:.1f} ms of inference; median of v2 batches: {typical:.1f} ms")
    assert first <= max(5 * typical, typical + 50)


def test_a_corrupt_version_is_refused_and_reported(run: LifecycleRun) -> None:
    assert "active v2" in run.status and "v4 at" in run.status, run.status
    assert "InvalidProtobuf" in run.status or "INVALID_PROTOBUF" in run.status, run.status
    assert "v4 failed to load or warm; v2 keeps serving" in run.worker_log


def test_the_canary_serves_the_devices_its_share_hashes_to(run: LifecycleRun) -> None:
    canary_devices = {f"cam-{i}" for i in range(8) if canary_bucket(MODEL, f"cam-{i}") < CANARY_SHARE}
    assert 0 < len(canary_devices) < 8
    first_canary = min(r.result_time_us for r in run.observed.results if r.model_version == 3)
    after = [r for r in run.observed.results if r.result_time_us >= first_canary]
    assert {r.device_id for r in after if r.model_version == 3} == canary_devices
    assert all(r.model_version == 2 for r in after if r.device_id not in canary_devices)
    assert all(r.model_version == 3 for r in after if r.device_id in canary_devices), "a device meets one version"


def test_shadow_results_go_to_their_own_topic_and_table_only(run: LifecycleRun) -> None:
    assert run.shadow, "the shadow ran"
    assert {r.model_version for r in run.shadow} == {1}
    assert all(r.result_time_us / 1e6 >= run.activated_at["shadow"] - 1 for r in run.shadow)
    shadow_sources = {r.source for r in run.shadow}
    assert shadow_sources <= run.published.sources
    served = {r.source: r for r in run.observed.results}
    assert all(served[s].model_version in (2, 3) for s in shadow_sources), "the served results are the others'"
    assert run.shadow_rows == len(shadow_sources), "one shadow row per mirrored input in shadow_results"
