import asyncio

import numpy as np
import pytest
from aiokafka import TopicPartition

from consumers.kafka import device_client, make_consumer
from producers.sdk import DeviceClient, PublishError
from producers.simulator import run_fleet
from producers.synth import AUDIO_LABELS, FRAME_LABELS, CameraScene, MicrophoneScene, audio_dataset, frame_dataset
from schemas.codec import AUDIO_CHUNK, FRAME_CHUNK, Codec
from streams.settings import SluiceSettings


async def _read_all(settings: SluiceSettings, topic: str, partitions: int) -> list:
    consumer = make_consumer(settings.kafka, None, role="test-reader")
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        messages = []
        while len(messages) < sum(ends.values()):
            for batch in (await consumer.getmany(timeout_ms=500)).values():
                messages.extend(batch)
        return messages
    finally:
        await consumer.stop()


def test_scenes_are_deterministic_and_cover_every_class() -> None:
    a, la = frame_dataset(40, np.random.default_rng(1))
    b, lb = frame_dataset(40, np.random.default_rng(1))
    assert (a == b).all() and (la == lb).all()
    assert set(la) == set(range(len(FRAME_LABELS)))
    _, audio_labels = audio_dataset(60, np.random.default_rng(2))
    assert set(audio_labels) == set(range(len(AUDIO_LABELS)))


def test_drift_darkens_frames_and_adds_noise_to_audio() -> None:
    bright, _ = CameraScene(np.random.default_rng(3)).next_frame()
    dark, _ = CameraScene(np.random.default_rng(3)).next_frame(brightness=0.4)
    assert dark.mean() < 0.5 * bright.mean()
    clean, _ = MicrophoneScene(np.random.default_rng(4)).next_chunk()
    noisy, _ = MicrophoneScene(np.random.default_rng(4)).next_chunk(extra_noise=0.2)
    assert np.abs(noisy.astype(float) - clean).mean() > 1000


async def test_sdk_rejects_unusable_input_before_sending(settings: SluiceSettings) -> None:
    async with device_client(settings.kafka, "test") as client:
        with pytest.raises(ValueError, match="uint8"):
            await client.publish_frame("cam", np.zeros((4, 4, 3), dtype=np.float32))
        with pytest.raises(ValueError, match="int16"):
            await client.publish_audio("mic", np.zeros(10, dtype=np.float64), 16_000)
        with pytest.raises(ValueError, match="device_id"):
            await client.publish_frame("cam 7; DROP TABLE", np.zeros((4, 4, 3), dtype=np.uint8))
        with pytest.raises(ValueError, match="trace_id"):
            await client.publish_audio("mic", np.zeros(10, dtype=np.int16), 16_000, trace_id="t" * 1000)


async def test_sdk_fails_clearly_without_a_broker() -> None:
    client = DeviceClient("127.0.0.1:1", request_timeout_ms=2000)
    with pytest.raises(PublishError, match="cannot reach"):
        await client.start()


async def test_simulator_publishes_counts_with_ground_truth_keyed_by_device(settings: SluiceSettings) -> None:
    sim = settings.simulator.model_copy(update={"cameras": 3, "microphones": 2, "frame_encoding": "jpeg"})
    async with device_client(settings.kafka, "test") as client:
        report = await run_fleet(client, sim, frames_per_camera=5, chunks_per_microphone=4, realtime=False)
    assert (report.frames_published, report.audio_published, report.failed) == (15, 8, 0)
    assert sum(report.labels.values()) == 23

    codec = Codec()
    topics = settings.kafka.topics
    frames = await _read_all(settings, topics.frames, topics.frames_partitions)
    audio = await _read_all(settings, topics.audio, topics.audio_partitions)
    assert len(frames) == 15 and len(audio) == 8
    for message in frames:
        _, record = codec.decode(message.value, expect=FRAME_CHUNK)
        assert message.key == record["device_id"].encode() and record["label"] in FRAME_LABELS
        assert record["encoding"] == "JPEG"
    seqs = sorted(codec.decode(m.value, expect=AUDIO_CHUNK)[1]["seq"] for m in audio if m.key == b"mic-00")
    assert seqs == [0, 1, 2, 3]


async def test_simulator_paces_devices_at_their_rate(settings: SluiceSettings) -> None:
    sim = settings.simulator.model_copy(update={"cameras": 2, "camera_fps": 20.0, "microphones": 0})
    async with device_client(settings.kafka, "test") as client:
        started = asyncio.get_running_loop().time()
        progress: list[tuple[int, float]] = []
        report = await run_fleet(
            client, sim, seconds=1.0, on_progress=lambda r, at: progress.append((r.inputs_published, at)),
            progress_every_s=0.3,
        )  # fmt: skip
        elapsed = asyncio.get_running_loop().time() - started
    assert 30 <= report.frames_published <= 42, "2 cameras x 20 fps x 1 s"
    assert elapsed < 3
    assert len(progress) >= 2, "a long run reports as it goes"
    assert [at for _, at in progress] == sorted(at for _, at in progress)
    assert progress[-1][0] >= progress[0][0]
