"""Driving the whole system on the local stack: the one harness the demo, the benchmarks and the tests share.

- settings on free loopback ports (`isolated_settings`), or with topics, groups
  and ClickHouse data of their own on a shared stack (`scoped`);
- Sluice components as their own processes, started with exactly these settings
  and waited for until they have joined their groups (`Components`);
- inputs from the synthetic scenes, published through the device SDK
  (`publish_frames`, `publish_audio`), returning where each landed.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import uuid
from pathlib import Path

import numpy as np

from consumers.kafka import device_client
from producers.synth import CameraScene, MicrophoneScene
from schemas.records import Source
from streams.local import processes
from streams.local.processes import ManagedProcess
from streams.settings import SluiceSettings, settings_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def isolated_settings(settings: SluiceSettings, base: Path) -> SluiceSettings:
    """The same settings on free loopback ports, with run files and ClickHouse data under `base`."""
    return settings.model_copy(
        update={
            "kafka": settings.kafka.model_copy(update={"bootstrap_servers": f"127.0.0.1:{free_port()}"}),
            "redis": settings.redis.model_copy(update={"url": f"redis://127.0.0.1:{free_port()}/0"}),
            "stack": settings.stack.model_copy(update={"run_dir": base / "run"}),
            "clickhouse": settings.clickhouse.model_copy(update={"dsn": f"chdb://{(base / 'clickhouse').as_posix()}"}),
        }
    )


def fast_groups(settings: SluiceSettings) -> SluiceSettings:
    """Short group timeouts: tests wait for every join, and a test machine is not loaded like production."""
    kafka = settings.kafka.model_copy(
        update={"session_timeout_ms": 6_000, "heartbeat_interval_ms": 300, "rebalance_timeout_ms": 2_000}
    )
    return settings.model_copy(update={"kafka": kafka})


def scoped(settings: SluiceSettings, base: Path, tag: str | None = None) -> SluiceSettings:
    """Settings on the same stack with topics, groups, run files and ClickHouse data of their own,
    so runs sharing a broker never see each other's messages."""
    tag = tag or uuid.uuid4().hex[:8]
    s = settings
    return s.model_copy(
        update={
            "kafka": s.kafka.model_copy(update={"topics": s.kafka.topics.prefixed(tag)}),
            "worker": s.worker.model_copy(update={"group_prefix": f"{tag}-worker"}),
            "sink": s.sink.model_copy(update={"group_id": f"{tag}-sink"}),
            "notifier": s.notifier.model_copy(update={"app_id": f"{tag}-notifier"}),
            "stack": s.stack.model_copy(update={"run_dir": base / "run"}),
            "clickhouse": s.clickhouse.model_copy(update={"dsn": f"chdb://{(base / 'clickhouse').as_posix()}"}),
        }
    )


def start_sluice(settings: SluiceSettings, name: str, args: list[str]) -> ManagedProcess:
    """Start `sluice <args>` as its own process, seeing exactly these settings."""
    argv = [sys.executable, "-m", "streams.cli", *args]
    return processes.start(name, argv, settings.stack.run_dir, env=settings_env(settings))


class Components:
    """Sluice processes started with one set of settings; each is stopped by PID in `stop_all`."""

    def __init__(self, settings: SluiceSettings) -> None:
        self.settings = settings
        self.started: list[ManagedProcess] = []

    def launch(self, name: str, args: list[str], settings: SluiceSettings | None = None) -> tuple[ManagedProcess, Path]:
        """Start `sluice <args> --ready-file F` without waiting; return it and F."""
        settings = settings or self.settings
        ready = settings.stack.run_dir / f"{name}.ready"
        ready.unlink(missing_ok=True)
        process = start_sluice(settings, name, [*args, "--ready-file", str(ready)])
        self.started.append(process)
        return process, ready

    @staticmethod
    def wait_ready(launched: list[tuple[ManagedProcess, Path]], timeout_s: float = 120) -> None:
        """Until each has touched its ready file (it has joined its consumer groups)."""
        for process, ready in launched:
            processes.wait_ready(process, ready.exists, timeout_s)

    def start(self, name: str, args: list[str], settings: SluiceSettings | None = None,
              timeout_s: float = 90) -> ManagedProcess:  # fmt: skip
        """Start one component and wait until it is ready."""
        launched = self.launch(name, args, settings)
        self.wait_ready([launched], timeout_s)
        return launched[0]

    def stop_all(self, timeout_s: float = 15.0) -> dict[str, bool]:
        """Stop every started process (gracefully where it can). Returns name -> stopped gracefully."""
        return {process.name: processes.stop(process, timeout_s) for process in self.started}


async def publish_frames(
    settings: SluiceSettings, count: int, *, seed: int = 0, cameras: int = 8, poison_at: frozenset[int] = frozenset(),
    pause_every: int | None = None,
) -> set[Source]:  # fmt: skip
    """`count` frames from `cameras` synthetic cameras (device ids cam-0..), with ground truth. Frames whose
    index is in `poison_at` are all white; with `pause_every`, a 0.2 s pause after that many, so the
    frames arrive as a stream rather than one burst."""
    scenes = [CameraScene(np.random.default_rng(seed + i)) for i in range(cameras)]
    async with device_client(settings.kafka, "harness") as client:
        deliveries = []
        for i in range(count):
            frame, label = scenes[i % cameras].next_frame()
            if i in poison_at:
                frame = np.full_like(frame, 255)
            deliveries.append(await client.publish_frame(f"cam-{i % cameras}", frame, label=label))
            if pause_every and i % pause_every == pause_every - 1:
                await asyncio.sleep(0.2)
        return {Source(m.topic, m.partition, m.offset) for m in await asyncio.gather(*deliveries)}


async def publish_audio(settings: SluiceSettings, count: int, *, seed: int = 0, microphones: int = 4) -> set[Source]:
    """`count` audio chunks from `microphones` synthetic microphones (mic-0..), with ground truth."""
    scenes = [MicrophoneScene(np.random.default_rng(seed + i)) for i in range(microphones)]
    async with device_client(settings.kafka, "harness") as client:
        deliveries = []
        for i in range(count):
            scene = scenes[i % microphones]
            chunk, label = scene.next_chunk()
            deliveries.append(await client.publish_audio(f"mic-{i % microphones}", chunk, scene.sample_rate,
                                                         label=label))  # fmt: skip
        return {Source(m.topic, m.partition, m.offset) for m in await asyncio.gather(*deliveries)}
