"""Poison at volume: thousands of malformed messages mixed into good traffic, against a worker, a sink and a
notifier running as their own processes. Every malformed message ends in the dead-letter topic with its
stage, reason, coordinates and headers; no process restarts (same PIDs); worker memory stays bounded;
every good input still gets its result.

Good inputs include valid frames with a null and with an empty key: a key is optional, so they are good."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import numpy as np
import pytest

from consumers.kafka import make_producer
from producers.synth import CameraScene
from schemas.codec import Codec
from schemas.records import AudioChunk, FrameChunk, Source
from streams.local.harness import Components, RssSampler, publish_audio, publish_frames
from streams.local.observer import OutputObserver, percentiles
from streams.settings import SluiceSettings
from tests.records import declaring, jpeg, make_result

pytestmark = pytest.mark.slow

POISON = 10_000
GOOD_FRAMES, GOOD_AUDIO = 300, 300
HEADERS = [("origin", b"fuzzer"), ("attempt", None)]
RSS_BOUND_MB = 1024  # the worker holds a few hundred MB; a decompression bomb alone used to add 900


def _frame(**overrides: object) -> FrameChunk:
    record = FrameChunk(device_id="cam-p", trace_id="t", seq=1, capture_time_us=time.time_ns() // 1000,
                        encoding="RAW", height=224, width=224, channels=3, dtype="uint8", data=bytes(224 * 224 * 3))  # fmt: skip
    for name, value in overrides.items():
        setattr(record, name, value)
    return record


def _audio(**overrides: object) -> AudioChunk:
    record = AudioChunk(device_id="mic-p", trace_id="t", seq=1, capture_time_us=time.time_ns() // 1000,
                        encoding="PCM_S16LE", sample_rate=16_000, channels=1, data=bytes(8000))  # fmt: skip
    for name, value in overrides.items():
        setattr(record, name, value)
    return record


def poison_kinds(codec: Codec) -> dict[str, tuple[str, bytes | None, bytes | None, int]]:
    """kind -> (topic name field, key, value, copies). Cheap kinds are repeated to make up the volume."""
    good = codec.write(_frame())
    kinds = {
        "bad magic byte": ("frames", b"cam-p", b"\x01" + good[1:], 0),
        "unknown schema id": ("frames", b"cam-p", b"\x00\x00\x00\x03\xe7" + good[5:], 0),
        "truncated avro": ("frames", b"cam-p", good[: len(good) // 2], 0),
        "wrong shape": ("frames", b"cam-p", codec.write(_frame(data=bytes(1000))), 0),
        "wrong dtype": ("frames", b"cam-p", codec.write(_frame(dtype="float32")), 0),
        "huge declared dims": ("frames", b"cam-p", codec.write(_frame(height=60_000, width=60_000, data=b"")), 0),
        "negative dims": ("frames", b"cam-p", codec.write(_frame(height=-1, data=b"")), 0),
        "invalid device id": ("frames", b"cam-p", codec.write(_frame(device_id="cam\n7")), 0),
        "negative seq": ("frames", b"cam-p", codec.write(_frame(seq=-1)), 0),
        "capture time in year 2500": ("frames", b"cam-p", codec.write(_frame(capture_time_us=16_725_225_600 * 10**6)), 0),
        "truncated jpeg": ("frames", b"cam-p", codec.write(_frame(encoding="JPEG", data=jpeg(64, 64)[:-300])), 0),
        "jpeg bomb": ("frames", b"cam-p", codec.write(_frame(encoding="JPEG", data=declaring(jpeg(16, 16), 30_000,
                                                                                             30_000))), 20),  # fmt: skip
        "oversized payload": ("frames", b"cam-p", codec.write(_frame(data=bytes(3_900_000))), 5),
        "empty value": ("frames", b"cam-p", b"", 0),
        "null value": ("frames", b"cam-p", None, 0),
        "garbage with null key": ("frames", None, b"garbage", 0),
        "garbage with empty key": ("frames", b"", b"garbage", 0),
        "audio wrong sample rate": ("audio", b"mic-p", codec.write(_audio(sample_rate=44_100)), 0),
        "audio odd byte count": ("audio", b"mic-p", codec.write(_audio(data=bytes(7))), 0),
        "audio zero channels": ("audio", b"mic-p", codec.write(_audio(channels=0)), 0),
        "garbage result": ("results", b"x", b"\x00\x00\x00\x03\xebnot a result", 0),
        "result ClickHouse cannot hold": ("results", b"cam-p", codec.write(replace(make_result(1), seq=-1)), 0),
    }
    cheap = [k for k, (_, _, _, copies) in kinds.items() if copies == 0]
    each, extra = divmod(POISON - sum(copies for *_, copies in kinds.values()), len(cheap))
    for i, kind in enumerate(cheap):
        topic, key, value, _ = kinds[kind]
        kinds[kind] = (topic, key, value, each + (i < extra))
    return kinds


async def _publish_poison(settings: SluiceSettings) -> dict[Source, str]:
    """Publish every kind; return where each landed and what it is."""
    codec = Codec()
    topics = settings.kafka.topics
    producer = make_producer(settings.kafka, "poison")
    await producer.start()
    try:
        pending = []
        for kind, (topic_field, key, value, copies) in poison_kinds(codec).items():
            for _ in range(copies):
                delivery = await producer.send(getattr(topics, topic_field), value, key=key, headers=HEADERS)
                pending.append((kind, delivery))
        return {Source(m.topic, m.partition, m.offset): kind for kind, m in
                zip((k for k, _ in pending), await asyncio.gather(*(d for _, d in pending)), strict=True)}  # fmt: skip
    finally:
        await producer.stop()


async def _publish_good(settings: SluiceSettings) -> set[Source]:
    """Good frames (a few with a null or empty key) and audio."""
    good = await publish_frames(settings, GOOD_FRAMES, seed=40) | await publish_audio(settings, GOOD_AUDIO, seed=40)
    codec = Codec()
    producer = make_producer(settings.kafka, "keyless")
    await producer.start()
    try:
        frame, label = CameraScene(np.random.default_rng(1)).next_frame()
        value = codec.write(_frame(device_id="cam-k", data=frame.tobytes(), label=label))
        for key in (None, b""):
            m = await producer.send_and_wait(settings.kafka.topics.frames, value, key=key)
            good.add(Source(m.topic, m.partition, m.offset))
    finally:
        await producer.stop()
    return good


def test_poison_at_volume_is_dead_lettered_and_stops_nothing(settings: SluiceSettings, components: Components) -> None:
    worker = components.start("worker", ["worker"])
    sink = components.start("sink", ["sink"])
    notifier = components.start("notifier", ["notifier"])
    pids = {p.name: p.pid for p in (worker, sink, notifier)}

    async def scenario() -> tuple[dict[Source, str], set[Source], OutputObserver]:
        observer = OutputObserver(settings)
        await observer.start()
        try:
            poison_task = asyncio.create_task(_publish_poison(settings))
            good = await _publish_good(settings)
            poison = await poison_task
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                o = observer.observed
                if len(o.unique_sources() & good) >= len(good) and len({d.source for d in o.dead_letters}) >= len(poison):
                    break
                await asyncio.sleep(0.5)
            await asyncio.sleep(1.0)
            return poison, good, observer
        finally:
            await observer.stop()

    with RssSampler(components) as sampled:
        poison, good, observer = asyncio.run(scenario())
    observed = observer.observed
    letters: dict[Source, list] = {}  # a bad result is dead-lettered by the sink and by the notifier alike
    for letter in observed.dead_letters:
        letters.setdefault(letter.source, []).append(letter)
    good_results = [r for r in observed.results if r.source in good]
    latency = percentiles([(r.result_time_us - r.capture_time_us) / 1000 for r in good_results])
    by_kind: dict[str, int] = {}
    for source, kind in poison.items():
        if source in letters:
            by_kind[kind] = by_kind.get(kind, 0) + 1
    print(f"poison={len(poison)} dead_lettered={len(set(poison) & set(letters))} good={len(good)} "
          f"good_results={len({r.source for r in good_results})} rss_mb={sampled.peaks()} "
          f"good_capture_to_result_ms={latency} by_kind={by_kind}")  # fmt: skip

    assert len(poison) == POISON
    missing = {kind for source, kind in poison.items() if source not in letters}
    assert not missing, f"never dead-lettered: {missing}"
    for source, kind in poison.items():
        for letter in letters[source]:
            assert letter.stage and letter.reason and letter.error_type, kind
            assert [(h.key, h.value) for h in letter.headers] == HEADERS, (kind, letter.component)
    assert {r.source for r in good_results} == good, "good traffic is unaffected"
    assert not set(letters) & good, "no good input was dead-lettered"
    assert {p.name: p.pid for p in components.started if p.alive()} == pids, "no process died or restarted"
    assert sampled.peak("worker") < RSS_BOUND_MB
