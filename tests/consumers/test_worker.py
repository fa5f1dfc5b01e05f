"""The inference worker in this process, against the real broker, with engines that are
slow, poisoned or broken on purpose (the Kafka side is never faked)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from consumers.kafka import device_client
from consumers.worker import WorkerFailed, run_worker
from engines import Engine, EngineError, load_engines
from producers.synth import CameraScene
from schemas.records import Source
from streams.local.harness import publish_frames
from streams.local.observer import Observed, OutputObserver
from streams.settings import SluiceSettings


class ScriptedEngine(Engine):
    """The real bundled engine, plus a delay or a failure on the batches `script` picks."""

    kind = "scripted"

    def __init__(self, inner: Engine, script: Callable[[int, np.ndarray], float | Exception | None]) -> None:
        super().__init__(inner.spec)
        self._inner = inner
        self._script = script
        self.calls = 0
        self.warming = True

    def infer(self, batch: np.ndarray) -> np.ndarray:
        if not self.warming:
            self.calls += 1
            action = self._script(self.calls, batch)
            if isinstance(action, Exception):
                raise action
            if action:
                time.sleep(action)
        return self._inner.infer(batch)

    def warmup(self, max_batch_size: int) -> None:
        super().warmup(max_batch_size)
        self.warming = False

    def close(self) -> None:
        self._inner.close()


async def _publish_frames(settings: SluiceSettings, count: int, poison_at: frozenset[int] = frozenset()) -> set:
    return await publish_frames(settings, count, seed=11, cameras=4, poison_at=poison_at)


async def _run(
    settings: SluiceSettings, engine: Engine, until: Callable[[Observed], bool], publish: Callable,
    registry: CollectorRegistry | None = None, timeout_s: float = 60,
) -> tuple[Observed, object]:
    """Run a frame worker in this loop, publish, and wait until `until(observed)`; return what was observed."""
    stopping = asyncio.Event()
    joined = asyncio.Event()
    observer = OutputObserver(settings)
    await observer.start()
    worker = asyncio.create_task(run_worker(settings.kafka, settings.worker, {"frame": engine}, stopping, joined.set, registry))
    try:
        await asyncio.wait([worker, asyncio.create_task(joined.wait())], return_when=asyncio.FIRST_COMPLETED)
        published = await publish()
        done = asyncio.create_task(observer.wait_for(until, timeout_s))
        await asyncio.wait([worker, done], return_when=asyncio.FIRST_COMPLETED)
        await asyncio.sleep(1.0)  # late duplicates would show up by now
        return observer.observed, published
    finally:
        stopping.set()
        await asyncio.gather(worker, return_exceptions=True)
        await observer.stop()


def _fast(settings: SluiceSettings, **worker: object) -> SluiceSettings:
    return settings.model_copy(update={"worker": settings.worker.model_copy(update=worker)})


async def test_engine_calls_longer_than_max_poll_interval_keep_the_group(settings: SluiceSettings) -> None:
    """aiokafka #848: a consumer that stops polling for max_poll_interval_ms is thrown out of its
    group and its commits fail, so the same messages come back. Polling runs apart from the engine."""
    settings = settings.model_copy(update={"kafka": settings.kafka.model_copy(update={"max_poll_interval_ms": 2_000})})
    engine = ScriptedEngine(load_engines(settings.engine, ["frame"])["frame"], lambda call, _: 3.0 if call <= 2 else None)
    published: set = set()

    async def publish() -> set:
        published.update(await _publish_frames(settings, 30))
        return published

    observed, _ = await _run(settings, engine, lambda o: published and len(o.unique_sources()) >= len(published), publish)
    sources = observed.sources()
    assert set(sources) == published
    assert len(sources) == len(set(sources)), "a consumer thrown out of its group would redo messages"
    assert engine.calls >= 3


async def test_in_flight_work_stays_within_the_budget(settings: SluiceSettings) -> None:
    settings = _fast(settings, max_inflight_messages=8, max_batch_size=4)
    engine = ScriptedEngine(load_engines(settings.engine, ["frame"])["frame"], lambda call, _: 0.15)
    registry = CollectorRegistry()
    samples: list[tuple[float, float]] = []
    lags: list[float] = []
    published: set = set()

    async def publish() -> set:
        published.update(await _publish_frames(settings, 60))
        return published

    async def sample() -> None:
        while True:
            inflight = registry.get_sample_value("sluice_worker_inflight_messages", {"modality": "frame"}) or 0
            paused = registry.get_sample_value("sluice_worker_paused", {"modality": "frame"}) or 0
            samples.append((inflight, paused))
            lags.append(_lag(registry))
            await asyncio.sleep(0.02)

    sampler = asyncio.create_task(sample())
    try:
        observed, _ = await _run(
            settings, engine, lambda o: published and len(o.unique_sources()) >= len(published), publish, registry
        )
    finally:
        sampler.cancel()
    assert observed.unique_sources() == published
    assert max(s[0] for s in samples) <= 8
    assert any(s[1] == 1 for s in samples), "the worker paused its partitions at the bound"
    assert max(lags) > 0, "held at the bound, the worker lags behind the backlog, and says so"
    assert _lag(registry) == 0, "and catches up"


def _lag(registry: CollectorRegistry) -> float:
    """sluice_worker_consumer_lag summed over the partitions it shows."""
    return sum(
        sample.value for metric in registry.collect() if metric.name == "sluice_worker_consumer_lag"
        for sample in metric.samples
    )  # fmt: skip


async def test_a_poison_input_is_isolated_and_dead_lettered(settings: SluiceSettings) -> None:
    def poison(_: int, batch: np.ndarray) -> Exception | None:
        return EngineError("kernel fault") if (batch.reshape(len(batch), -1).min(axis=1) == 255).any() else None

    engine = ScriptedEngine(load_engines(settings.engine, ["frame"])["frame"], poison)
    published: set = set()

    async def publish() -> set:
        published.update(await _publish_frames(settings, 20, poison_at=frozenset({7})))
        return published

    observed, _ = await _run(
        settings, engine, lambda o: published and len(o.unique_sources()) + len(o.dead_letters) >= 20, publish
    )
    assert len(observed.unique_sources()) == 19
    (letter,) = observed.dead_letters
    assert letter.stage == "infer" and "fails on this input alone" in letter.reason
    assert letter.source in published


async def test_a_broken_engine_stops_the_worker_without_committing(settings: SluiceSettings) -> None:
    """Failing every input is not the inputs' fault: nothing is dead-lettered, nothing committed,
    and a healthy worker started next processes everything."""
    broken = ScriptedEngine(load_engines(settings.engine, ["frame"])["frame"], lambda *_: EngineError("device lost"))
    published = await _publish_frames(settings, 12)
    stopping = asyncio.Event()
    with pytest.raises(WorkerFailed, match="blank input"):
        await asyncio.wait_for(run_worker(settings.kafka, settings.worker, {"frame": broken}, stopping), 60)

    healthy = load_engines(settings.engine, ["frame"])["frame"]

    async def nothing() -> set:
        return published

    observed, _ = await _run(settings, healthy, lambda o: len(o.unique_sources()) >= len(published), nothing)
    assert observed.unique_sources() == published
    assert observed.dead_letters == []


async def test_a_result_too_large_for_the_producer_is_dead_lettered_and_the_worker_goes_on(
    settings: SluiceSettings,
) -> None:
    """The input fits the broker's limit but its result (which repeats the input's 2 MB label) does not fit
    the worker's producer limit: that input is dead-lettered, the worker and every other input carry on."""
    small = settings.model_copy(update={"kafka": settings.kafka.model_copy(update={"max_request_size": 1024 * 1024})})
    engine = load_engines(settings.engine, ["frame"])["frame"]
    published: set = set()
    scene = CameraScene(np.random.default_rng(5))

    async def publish() -> set:
        async with device_client(settings.kafka, "test") as client:  # the devices' limit: 4 MB
            deliveries = [await client.publish_frame("cam-1", scene.next_frame()[0], label="x" * 2_000_000)]
            deliveries += [await client.publish_frame("cam-2", scene.next_frame()[0]) for _ in range(9)]
            published.update(Source(m.topic, m.partition, m.offset) for m in await asyncio.gather(*deliveries))
        return published

    observed, _ = await _run(
        small, engine, lambda o: published and len(o.unique_sources()) + len(o.dead_letters) >= 10, publish
    )
    assert len(observed.unique_sources()) == 9
    (letter,) = observed.dead_letters
    assert letter.stage == "result" and letter.error_type == "MessageSizeTooLargeError"
    assert letter.value is None and "dropped" in letter.reason, "the 2 MB input itself cannot travel in the letter"
    assert letter.source in published
