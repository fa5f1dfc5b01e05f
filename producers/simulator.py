"""The fleet simulator behind `sluice simulate`: N cameras and M microphones publishing
through the device SDK at a set rate (or a fixed count), ground truth in every record.

Devices are scheduled on one event loop by due time, with their phases staggered
so a fleet does not fire in lockstep. A device that falls behind resumes from
now rather than bursting to catch up, as a real camera drops frames.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from producers.sdk import DeviceClient
from producers.synth import CameraScene, MicrophoneScene
from streams.config import KafkaSettings, SimulatorSettings

log = logging.getLogger(__name__)


def client_for(kafka: KafkaSettings, role: str = "simulator") -> DeviceClient:
    """A DeviceClient on the configured cluster and topics, with the configured producer options."""
    return DeviceClient(
        frames_topic=kafka.topics.frames,
        audio_topic=kafka.topics.audio,
        client_id=f"{kafka.client_id}-{role}",
        **kafka.producer_options(),
    )


@dataclass
class FleetReport:
    frames_published: int = 0
    audio_published: int = 0
    failed: int = 0
    duration_s: float = 0.0
    drift_started_at_s: float | None = None
    labels: dict[str, int] = field(default_factory=dict)

    @property
    def inputs_published(self) -> int:
        return self.frames_published + self.audio_published

    def as_dict(self) -> dict:
        return {**asdict(self), "inputs_published": self.inputs_published}


@dataclass(order=True)
class _Due:
    at: float
    index: int
    device_id: str = field(compare=False)
    period: float = field(compare=False)
    remaining: int | None = field(compare=False)  # None: unlimited


async def run_fleet(
    client: DeviceClient,
    sim: SimulatorSettings,
    *,
    seconds: float | None = None,
    frames_per_camera: int | None = None,
    chunks_per_microphone: int | None = None,
    realtime: bool = True,
    stopping: asyncio.Event | None = None,
) -> FleetReport:
    """Publish until `seconds` pass, every device has sent its count, or `stopping` is set.
    With realtime=False, counts are sent as fast as the broker takes them."""
    if seconds is None and frames_per_camera is None and chunks_per_microphone is None:
        raise ValueError("give seconds, or a count of frames and/or audio chunks")
    rng = np.random.default_rng(sim.seed)
    cameras = {f"cam-{i:02d}": CameraScene(np.random.default_rng(rng.integers(2**63))) for i in range(sim.cameras)}
    microphones = {
        f"mic-{i:02d}": MicrophoneScene(np.random.default_rng(rng.integers(2**63))) for i in range(sim.microphones)
    }
    counted = frames_per_camera is not None or chunks_per_microphone is not None
    start = time.monotonic()
    queue: list[_Due] = []
    for devices, rate, count in (
        (cameras, sim.camera_fps, frames_per_camera),
        (microphones, sim.chunks_per_s, chunks_per_microphone),
    ):
        if counted and not count:
            continue
        period = 1.0 / rate
        for i, device_id in enumerate(devices):
            heapq.heappush(queue, _Due(start + period * i / max(1, len(devices)), len(queue), device_id, period, count))

    report = FleetReport()
    labels: Counter[str] = Counter()
    pending: set[asyncio.Future] = set()

    def delivered(future: asyncio.Future, kind: str) -> None:
        pending.discard(future)
        if future.cancelled() or future.exception() is not None:
            report.failed += 1
            log.error("publish failed: %s", "cancelled" if future.cancelled() else future.exception())
        elif kind == "frame":
            report.frames_published += 1
        else:
            report.audio_published += 1

    while queue and not (stopping is not None and stopping.is_set()):
        due = heapq.heappop(queue)
        now = time.monotonic()
        if seconds is not None and now - start >= seconds:
            break
        if realtime and due.at > now:
            await asyncio.sleep(due.at - now)
        elapsed = time.monotonic() - start
        drifting = sim.drift_at_s is not None and elapsed >= sim.drift_at_s
        if drifting and report.drift_started_at_s is None:
            report.drift_started_at_s = elapsed
            log.info("drift starts at %.1fs", elapsed)
        if due.device_id in cameras:
            frame, label = cameras[due.device_id].next_frame(brightness=sim.drift_brightness if drifting else 1.0)
            future = await client.publish_frame(due.device_id, frame, encoding=sim.frame_encoding, label=label)
            kind = "frame"
        else:
            microphone = microphones[due.device_id]
            chunk, label = microphone.next_chunk(extra_noise=sim.drift_extra_noise if drifting else 0.0)
            future = await client.publish_audio(due.device_id, chunk, microphone.sample_rate, label=label)
            kind = "audio"
        labels[label] += 1
        pending.add(future)
        future.add_done_callback(lambda f, k=kind: delivered(f, k))
        if due.remaining is not None:
            due.remaining -= 1
            if due.remaining == 0:
                continue
        # Behind by more than a period: skip ahead instead of bursting.
        due.at = max(due.at + due.period, time.monotonic() - due.period) if realtime else due.at
        heapq.heappush(queue, due)

    await client.flush()
    if pending:
        await asyncio.wait(pending)
    report.duration_s = time.monotonic() - start
    report.labels = dict(sorted(labels.items()))
    return report
