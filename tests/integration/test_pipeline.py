"""The walking skeleton end to end, on the real local stack: device SDK -> broker ->
worker (ONNX Runtime) -> results topic -> sink (embedded ClickHouse) and notifier (Faust + Redis).

One run serves every test here: K frames and K audio chunks from the synthetic
scenes, plus malformed inputs, published while a worker, a sink and a notifier run
as their own processes (`sluice worker|sink|notifier`)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest

from consumers.kafka import make_producer
from schemas.codec import Codec
from schemas.records import FrameChunk, Source
from streams.local import processes
from streams.local.harness import Components, publish_audio, publish_frames, scoped
from streams.local.observer import Observed, OutputObserver
from streams.settings import SluiceSettings, settings_env

K = 200
RULES = """
[[rules]]
name = "circle-seen"
modality = "frame"
labels = ["circle"]
min_score = 0.5
cooldown_s = 600
"""


@dataclass
class PipelineRun:
    settings: SluiceSettings
    valid_sources: set[Source]
    malformed: dict[str, Source]  # why it is malformed -> its coordinates
    observed: Observed
    clickhouse: dict[str, int]
    sink_stopped_gracefully: bool


async def _publish(settings: SluiceSettings) -> tuple[set, dict]:
    kafka = settings.kafka
    # Seed 2028: the four cameras show every class, circles included (the rule under test needs them).
    valid = await publish_frames(settings, K, seed=2028, cameras=4) | await publish_audio(settings, K, seed=2028)

    wrong_shape = Codec().write(FrameChunk(
        device_id="cam-bad", trace_id="t-bad", seq=0, capture_time_us=0, encoding="RAW",
        height=224, width=224, channels=3, dtype="uint8", data=b"\x00" * 1000,
    ))  # fmt: skip
    producer = make_producer(kafka, "test")
    await producer.start()
    try:
        malformed = {}
        for why, value in (("not avro", b"this is not an avro record"), ("wrong shape", wrong_shape)):
            m = await producer.send_and_wait(kafka.topics.frames, value, key=b"cam-bad")
            malformed[why] = Source(m.topic, m.partition, m.offset)
    finally:
        await producer.stop()
    return valid, malformed


def _clickhouse_counts(settings: SluiceSettings) -> dict[str, int]:
    """Query through `sluice clickhouse query`: the embedded engine allows one data path per process."""
    table = f"{settings.clickhouse.database}.inference_results"
    counts = {}
    for name, sql in (
        ("raw", f"SELECT count() AS n FROM {table}"),
        ("final", f"SELECT count() AS n FROM {table} FINAL"),
        ("view", f"SELECT count() AS n FROM {table}_dedup"),
        ("distinct_sources", f"SELECT uniqExact(source_topic, source_partition, source_offset) AS n FROM {table}"),
    ):
        out = subprocess.run(
            [sys.executable, "-m", "streams.cli", "clickhouse", "query", sql],
            env=os.environ | settings_env(settings), capture_output=True, text=True, check=True,
        )  # fmt: skip
        counts[name] = int(json.loads(out.stdout.strip().splitlines()[-1])[0]["n"])
    return counts


@pytest.fixture(scope="module")
def run(stack_settings: SluiceSettings, tmp_path_factory: pytest.TempPathFactory) -> PipelineRun:
    tmp = tmp_path_factory.mktemp("pipeline")
    rules = tmp / "rules.toml"
    rules.write_text(RULES)
    settings = scoped(stack_settings, tmp, "pipeline")
    settings = settings.model_copy(update={"notifier": settings.notifier.model_copy(update={"rules_path": rules})})
    components = Components(settings)
    try:
        components.start("worker", ["worker"])
        sink = components.start("sink", ["sink"])
        components.start("notifier", ["notifier"])

        async def publish_and_observe() -> tuple[set, dict, Observed]:
            observer = OutputObserver(settings)
            await observer.start()
            try:
                valid, malformed = await _publish(settings)
                await observer.wait_for(
                    lambda o: len(o.unique_sources()) >= len(valid) and len(o.dead_letters) >= len(malformed)
                    and o.alerts, timeout_s=90,
                )  # fmt: skip
                await asyncio.sleep(2)  # anything extra (a duplicate, a second alert) would show up by now
                return valid, malformed, observer.observed
            finally:
                await observer.stop()

        valid, malformed, observed = asyncio.run(publish_and_observe())
        graceful = processes.stop(sink, timeout_s=30)  # the sink flushes on SIGTERM
        return PipelineRun(settings, valid, malformed, observed, _clickhouse_counts(settings), graceful)
    finally:
        components.stop_all()


def test_every_input_yields_exactly_one_distinct_result(run: PipelineRun) -> None:
    sources = run.observed.sources()
    assert len(run.valid_sources) == 2 * K
    assert set(sources) == run.valid_sources
    assert len(sources) == len(set(sources)), "no crash happened, so no input should have two results"


def test_results_carry_model_trace_and_latency(run: PipelineRun) -> None:
    result = run.observed.results[0]
    assert result.model_name in ("frame_classifier", "audio_classifier") and result.model_version >= 1
    assert len(result.top_k) == 3 and result.top_k[0].score >= result.top_k[1].score
    assert len(result.trace_id) == 32
    assert result.latency.batch_size >= 1 and result.latency.inference_ms > 0
    assert result.result_time_us > result.capture_time_us
    for result in run.observed.results:  # what drift detection reads, on every result
        expected = {"brightness", "contrast", "colourfulness", "sharpness"} if result.modality == "FRAME" else {
            "rms_dbfs", "zero_crossing_rate", "spectral_centroid_hz", "clipping_ratio"}  # fmt: skip
        assert set(result.input_stats) == expected
        classes = 4 if result.modality == "FRAME" else 3  # the bundled models' labels
        assert len(result.probabilities) == classes and abs(sum(result.probabilities) - 1) < 1e-3
        assert result.prediction_entropy is not None and 0 <= result.prediction_entropy <= 1.39  # log 4


def test_accuracy_at_least_95_percent(run: PipelineRun) -> None:
    assert run.observed.accuracy("frame") >= 0.95
    assert run.observed.accuracy("audio") >= 0.95


def test_malformed_inputs_go_to_the_dead_letter_topic_with_a_reason(run: PipelineRun) -> None:
    letters = {d.source: d for d in run.observed.dead_letters}
    assert len(letters) == len(run.malformed)
    not_avro = letters[run.malformed["not avro"]]
    assert not_avro.stage == "decode" and "magic byte" in not_avro.reason
    assert not_avro.value == b"this is not an avro record", "the original bytes travel for replay"
    wrong_shape = letters[run.malformed["wrong shape"]]
    assert wrong_shape.stage == "validate" and "wrong shape" in wrong_shape.reason
    assert wrong_shape.component.startswith("worker-frame@")


def test_rule_produces_alerts_once_per_device_within_the_cooldown(run: PipelineRun) -> None:
    circles = {r.device_id for r in run.observed.results if r.top_k[0].label == "circle"
               and r.top_k[0].score >= 0.5}  # fmt: skip
    assert circles, "the scenes should show circles"
    alerts = run.observed.alerts
    assert {a.device_id for a in alerts} == circles
    assert len(alerts) == len(circles), "a 600 s cooldown allows one alert per device"
    assert all(a.rule == "circle-seen" and a.label == "circle" for a in alerts)


def test_clickhouse_holds_one_row_per_input(run: PipelineRun) -> None:
    assert run.sink_stopped_gracefully
    assert run.clickhouse["final"] == 2 * K
    assert run.clickhouse["view"] == 2 * K
    assert run.clickhouse["distinct_sources"] == 2 * K
