"""`sluice bench`: speed figures as ratios measured side by side in one run.

The machine is shared and noisy, so absolute numbers from different runs do not
compare; variants measured back to back in the same run do.

- `engines`: items/s of each bundled model at several batch sizes, in this
  process, relative to batch size 1.
- `pipeline`: a worker process draining the same backlog of frames from the
  broker with batching off (max_batch_size=1) and on (the configured size):
  throughput from the workers' own result timestamps, and the ratio; with
  several encodings (raw, jpeg), the same for each, and the ratio to raw.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
from rich.console import Console
from rich.table import Table

from consumers.kafka import device_client, ensure_topics
from engines import ModelRepository, load_engines
from producers.synth import CameraScene, MicrophoneScene
from schemas.topics import AUDIO, FRAME, MODALITY_NAMES
from streams.local.harness import Components, isolated_settings
from streams.local.observer import OutputObserver
from streams.local.stack import LocalStack
from streams.settings import SluiceSettings

# One synthetic model input per modality, drawn from the simulator's scenes.
_SAMPLE: dict[str, Callable[[np.random.Generator], np.ndarray]] = {
    FRAME.name: lambda rng: CameraScene(rng).next_frame()[0],
    AUDIO.name: lambda rng: MicrophoneScene(rng).next_chunk()[0],
}


def bench_engines(settings: SluiceSettings, batch_sizes: tuple[int, ...], seconds: float) -> list[dict[str, Any]]:
    rows = []
    engines = load_engines(settings.engine, MODALITY_NAMES)
    rng = np.random.default_rng(0)
    samples = {name: np.stack([_SAMPLE[name](rng) for _ in range(max(batch_sizes))]) for name in engines}
    for modality, engine in engines.items():
        engine.warmup(max(batch_sizes))
        base = None
        for size in batch_sizes:
            batch = samples[modality][:size]
            calls, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                engine.infer(batch)
                calls += 1
            rate = calls * size / (time.perf_counter() - started)
            base = base or rate
            rows.append({"modality": modality, "batch_size": size, "items_per_s": round(rate, 1),
                         "vs_batch_1": round(rate / base, 2)})  # fmt: skip
        engine.close()
    return rows


async def _drain_rate(settings: SluiceSettings, messages: int) -> dict[str, Any]:
    observer = OutputObserver(settings)
    await observer.start()
    try:
        if not await observer.wait_for(lambda o: len(o.unique_sources()) >= messages, timeout_s=300):
            raise RuntimeError(f"worker drained only {len(observer.observed.unique_sources())} of {messages}")
        results = observer.observed.results
    finally:
        await observer.stop()
    stamps = sorted(r.result_time_us for r in results)
    window_s = (stamps[-1] - stamps[0]) / 1e6
    sizes = [r.latency.batch_size for r in results]
    return {"items_per_s": round(len(results) / window_s, 1) if window_s > 0 else float("inf"),
            "mean_batch_size": round(float(np.mean(sizes)), 1),
            # The worker's decode time per batch, as each result reports it.
            "decode_ms_p50": round(float(np.median([r.latency.decode_ms for r in results])), 2)}  # fmt: skip


async def _publish_frames(settings: SluiceSettings, count: int, encoding: Literal["raw", "jpeg"]) -> None:
    """`count` frames from 8 synthetic cameras, as `harness.publish_frames` publishes them, in `encoding`."""
    scenes = [CameraScene(np.random.default_rng(i)) for i in range(8)]
    async with device_client(settings.kafka, "bench") as client:
        deliveries = []
        for i in range(count):
            frame, label = scenes[i % 8].next_frame()
            deliveries.append(await client.publish_frame(f"cam-{i % 8}", frame, encoding=encoding, label=label))
        await asyncio.gather(*deliveries)


def bench_pipeline(
    settings: SluiceSettings, messages: int, encodings: tuple[Literal["raw", "jpeg"], ...] = ("raw",)
) -> list[dict[str, Any]]:
    """The same backlog drained by a frame worker with batching off, then on, on one fresh local stack; for each
    of `encodings` in turn (a fresh backlog and worker each), so raw and JPEG frames compare in one run."""
    base_dir = settings.stack.run_dir.parent / "bench"
    shutil.rmtree(base_dir, ignore_errors=True)
    settings = isolated_settings(settings, base_dir)
    stack = LocalStack(settings)
    rows = []
    try:
        stack.up()
        frame_model = ModelRepository(settings.engine.model_repository).resolve(*settings.engine.model_for(FRAME.name))
        configured = settings.worker.batching_for(frame_model.batching).max_batch_size
        for encoding in encodings:
            for label, batch_size in (("batching off", 1), ("batching on", configured)):
                tag = f"bench{encoding}{batch_size}"
                variant = settings.model_copy(update={
                    "kafka": settings.kafka.model_copy(update={"topics": settings.kafka.topics.prefixed(tag)}),
                    "worker": settings.worker.model_copy(update={"max_batch_size": batch_size, "group_prefix": tag}),
                })  # fmt: skip
                asyncio.run(ensure_topics(variant.kafka))
                asyncio.run(_publish_frames(variant, messages, encoding))
                worker = Components(variant)
                try:
                    worker.start(f"worker-{tag}", ["worker", "--modality", FRAME.name], timeout_s=120)
                    measured = asyncio.run(_drain_rate(variant, messages))
                finally:
                    worker.stop_all()
                rows.append({"encoding": encoding, "variant": label, "max_batch_size": batch_size, **measured})
        for row in rows:
            off = next(r for r in rows if r["encoding"] == row["encoding"])
            row["vs_batching_off"] = round(row["items_per_s"] / off["items_per_s"], 2)
            if len(encodings) > 1:  # e.g. vs_raw: the same variant with frames in the first encoding
                first = next(r for r in rows if r["variant"] == row["variant"])
                row[f"vs_{encodings[0]}"] = round(row["items_per_s"] / first["items_per_s"], 2)
    finally:
        stack.down()
    return rows


def print_rows(console: Console, title: str, rows: list[dict[str, Any]]) -> None:
    table = Table(*rows[0].keys(), title=title)
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    console.print(table)
