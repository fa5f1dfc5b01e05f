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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from producers.sdk import DeviceClient
from producers.settings import SimulatorSettings
from producers.synth import CameraScene, MicrophoneScene
from schemas.topics import AUDIO, FRAME

log = logging.getLogger(__name__)

# A device renders its next input (drifting or not) and publishes it; it returns the delivery future and the label.
Publish = Callable[[DeviceClient, bool], Awaitable[tuple[asyncio.Future, str]]]


def _camera(device_id: str, scene: CameraScene, sim: SimulatorSettings) -> Publish:
    async def publish(client: DeviceClient, drifting: bool) -> tuple[asyncio.Future, str]:
        frame, label = scene.next_frame(brightness=sim.drift_brightness if drifting else 1.0)
        return await client.publish_frame(device_id, frame, encoding=sim.frame_encoding, label=label), label

    return publish


def _microphone(device_id: str, scene: MicrophoneScene, sim: SimulatorSettings) -> Publish:
    async def publish(client: DeviceClient, drifting: bool) -> tuple[asyncio.Future, str]:
        chunk, label = scene.next_chunk(extra_noise=sim.drift_extra_noise if drifting else 0.0)
        return await client.publish_audio(device_id, chunk, scene.sample_rate, label=label), label

    return publish


@dataclass
class FleetReport:
    published: Counter[str] = field(default_factory=Counter)  # modality name -> inputs the broker took
    failed: int = 0
    duration_s: float = 0.0
    drift_started_at_s: float | None = None
    labels: dict[str, int] = field(default_factory=dict)

    @property
    def frames_published(self) -> int:
        return self.published[FRAME.name]

    @property
    def audio_published(self) -> int:
        return self.published[AUDIO.name]

    @property
    def inputs_published(self) -> int:
        return sum(self.published.values())

    def as_dict(self) -> dict:
        return {
            "frames_published": self.frames_published,
            "audio_published": self.audio_published,
            "inputs_published": self.inputs_published,
            "failed": self.failed,
            "duration_s": self.duration_s,
            "drift_started_at_s": self.drift_started_at_s,
            "labels": self.labels,
        }


@dataclass(order=True)
class _Due:
    at: float
    index: int
    device_id: str = field(compare=False)
    modality: str = field(compare=False)
    publish: Publish = field(compare=False)
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
    on_progress: Callable[[FleetReport, float], None] | None = None,
    progress_every_s: float = 5.0,
) -> FleetReport:
    """Publish until `seconds` pass, every device has sent its count, or `stopping` is set.
    With realtime=False, counts are sent as fast as the broker takes them. `on_progress(report, elapsed_s)`
    is called every `progress_every_s` meanwhile, so a long run is not silent."""
    if seconds is None and frames_per_camera is None and chunks_per_microphone is None:
        raise ValueError("give seconds, or a count of frames and/or audio chunks")
    rng = np.random.default_rng(sim.seed)
    cameras = {
        device_id: _camera(device_id, CameraScene(np.random.default_rng(rng.integers(2**63))), sim)
        for device_id in (f"cam-{i:02d}" for i in range(sim.cameras))
    }
    microphones = {
        device_id: _microphone(device_id, MicrophoneScene(np.random.default_rng(rng.integers(2**63))), sim)
        for device_id in (f"mic-{i:02d}" for i in range(sim.microphones))
    }
    counted = frames_per_camera is not None or chunks_per_microphone is not None
    start = time.monotonic()
    queue: list[_Due] = []
    for modality, devices, rate, count in (
        (FRAME.name, cameras, sim.camera_fps, frames_per_camera),
        (AUDIO.name, microphones, sim.chunks_per_s, chunks_per_microphone),
    ):
        if counted and not count:
            continue
        period = 1.0 / rate
        for i, (device_id, publish) in enumerate(devices.items()):
            at = start + period * i / max(1, len(devices))
            heapq.heappush(queue, _Due(at, len(queue), device_id, modality, publish, period, count))

    report = FleetReport()
    labels: Counter[str] = Counter()
    pending: set[asyncio.Future] = set()

    def delivered(future: asyncio.Future, modality: str) -> None:
        pending.discard(future)
        if future.cancelled() or future.exception() is not None:
            report.failed += 1
            log.error("publish failed: %s", "cancelled" if future.cancelled() else future.exception())
        else:
            report.published[modality] += 1

    next_progress = start + progress_every_s
    while queue and not (stopping is not None and stopping.is_set()):
        due = heapq.heappop(queue)
        now = time.monotonic()
        if on_progress is not None and now >= next_progress:
            on_progress(report, now - start)
            next_progress = now + progress_every_s
        if seconds is not None and now - start >= seconds:
            break
        if realtime and due.at > now:
            await asyncio.sleep(due.at - now)
        elapsed = time.monotonic() - start
        drifting = sim.drift_at_s is not None and elapsed >= sim.drift_at_s
        if drifting and report.drift_started_at_s is None:
            report.drift_started_at_s = elapsed
            log.info("drift starts at %.1fs", elapsed)
        future, label = await due.publish(client, drifting)
        labels[label] += 1
        pending.add(future)
        future.add_done_callback(lambda f, m=due.modality: delivered(f, m))
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
