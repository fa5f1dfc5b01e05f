"""The inference worker: Kafka in, batched inference, one result per input out,
and offsets committed only once every result before them is safe.

One `ModalityPipeline` per modality, each with its own consumer group, runs
three tasks:

- poll: `getmany` in a loop. Each polled offset is tracked; above the in-flight
  budget (messages or bytes) the partitions are paused, and polling goes on so
  the consumer stays in its group however long the engine takes (aiokafka #848).
- infer: closes batches (size or deadline), decodes them into one contiguous
  array, runs the engine in its own thread, and produces a result per input, or a
  dead letter for an input that cannot be used.
- commit: every commit interval, commits the acknowledged prefix of each partition.

The commit order for one message, which is what makes delivery at-least-once
and a crash lossless:

    result (or dead letter) produced -> broker acknowledges it -> tracker.ack
    -> offset committed, once every earlier offset of the partition is acked too

A partition being revoked first waits (bounded) for its in-flight results and
commits them, so the next owner starts where this one stopped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from prometheus_client import CollectorRegistry

from consumers.batching import Batcher, Polled
from consumers.dead_letter import DeadLetterPublisher
from consumers.decode import DecodedInput, InvalidInput, decoder_for
from consumers.kafka import RebalanceForwarder, ensure_topics, make_consumer, make_producer
from consumers.metrics import WorkerMetrics, serve_metrics
from consumers.offsets import OffsetTracker
from engines import Engine, EngineError, ModelRepository, ModelSpec, load_engine
from schemas.codec import INFERENCE_RESULT, Codec, SchemaError
from streams.config import SluiceSettings

log = logging.getLogger(__name__)

MODALITIES = ("frame", "audio")


class WorkerFailed(RuntimeError):
    """The worker cannot go on without risking loss (a result the broker refused,
    an engine that fails on every input). It stops without committing what is not
    safe; a restart resumes from the last commit."""


@dataclass(slots=True)
class _BatchTimings:
    closed_at: float
    decode_ms: float
    inference_ms: float
    size: int


class ModalityPipeline:
    def __init__(
        self,
        settings: SluiceSettings,
        engine: Engine,
        codec: Codec,
        producer: AIOKafkaProducer,
        metrics: WorkerMetrics,
        worker_id: str,
    ) -> None:
        spec = engine.spec
        self.modality = spec.modality
        self.spec: ModelSpec = spec
        self._settings = settings.worker
        topics = settings.kafka.topics
        self.topic = topics.frames if self.modality == "frame" else topics.audio
        self._results_topic = topics.results
        self.group_id = f"{self._settings.group_prefix}-{self.modality}"
        self._engine = engine
        self._codec = codec
        self._producer = producer
        self._metrics = metrics
        self._worker_id = worker_id
        self._decoder = decoder_for(spec, codec)
        self._dead_letters = DeadLetterPublisher(
            producer, codec, topics.dead_letters, component=f"worker-{self.modality}@{worker_id}"
        )
        self._consumer = make_consumer(
            settings.kafka, self.group_id, client_id=f"{settings.kafka.client_id}-{self.modality}-{worker_id}"
        )
        self._tracker = OffsetTracker()
        self._batcher = Batcher(self._settings.max_batch_size, self._settings.max_delay_ms / 1000)
        # One thread per engine: engine calls are serial, and the event loop keeps polling meanwhile.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{self.modality}")
        self._inflight_bytes = 0
        self._paused = False
        self._batch_in_progress = False
        self._failure: BaseException | None = None
        self._failed = asyncio.Event()
        self.joined = asyncio.Event()

    # -- lifecycle -----------------------------------------------------------------------------------

    async def warmup(self) -> None:
        await asyncio.get_running_loop().run_in_executor(
            self._executor, self._engine.warmup, self._settings.max_batch_size
        )

    async def run(self, stopping: asyncio.Event) -> None:
        """Consume until `stopping` is set, then drain and commit. Raises WorkerFailed on an unsafe failure."""
        await self._consumer.start()
        self._consumer.subscribe([self.topic], listener=RebalanceForwarder(self))
        tasks = [
            asyncio.create_task(self._poll_loop(), name=f"poll-{self.modality}"),
            asyncio.create_task(self._infer_loop(), name=f"infer-{self.modality}"),
            asyncio.create_task(self._commit_loop(), name=f"commit-{self.modality}"),
        ]
        stop_wait = asyncio.create_task(stopping.wait())
        fail_wait = asyncio.create_task(self._failed.wait())
        try:
            await asyncio.wait([*tasks, stop_wait, fail_wait], return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                if task.done() and not task.cancelled() and task.exception() is not None:
                    self._fail(task.exception())  # type: ignore[arg-type]
        finally:
            stop_wait.cancel()
            fail_wait.cancel()
            await self._shutdown(tasks)
        if self._failure is not None:
            raise WorkerFailed(f"{self.modality} pipeline failed: {self._failure}") from self._failure

    async def _shutdown(self, tasks: list[asyncio.Task]) -> None:
        poll, infer, commit = tasks
        poll.cancel()
        if self._failure is None:
            # Finish what was polled, so its offsets can be committed now rather than redone by the next owner.
            deadline = time.monotonic() + self._settings.drain_timeout_s
            while (self._batcher.pending() or self._batch_in_progress or self._tracker.inflight()) and (
                time.monotonic() < deadline and not infer.done()
            ):
                await asyncio.sleep(0.01)
        infer.cancel()
        commit.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._failure is None:
            await self._commit()
        await self._consumer.stop()  # leaves the group, so the others rebalance at once
        self._executor.shutdown(wait=False, cancel_futures=True)
        log.info("%s pipeline stopped; %d messages left uncommitted", self.modality, self._tracker.inflight())

    def _fail(self, exc: BaseException) -> None:
        if self._failure is None:
            log.error("%s pipeline failing: %s", self.modality, exc)
            self._failure = exc
            self._failed.set()

    # -- poll ----------------------------------------------------------------------------------------

    async def _poll_loop(self) -> None:
        budget = self._settings.max_inflight_messages
        while True:
            self._apply_backpressure()
            room = max(1, budget - self._tracker.inflight())
            records = await self._consumer.getmany(timeout_ms=100, max_records=room)
            for tp, messages in records.items():
                for message in messages:
                    self._tracker.track(tp, message.offset)
                    polled = Polled(message)
                    self._inflight_bytes += polled.size
                    self._batcher.put(polled)
                self._metrics.messages.labels(self.modality).inc(len(messages))
            self._metrics.inflight.labels(self.modality).set(self._tracker.inflight())

    def _apply_backpressure(self) -> None:
        """Pause every assigned partition above the budget; resume below half of it.
        Paused, the loop keeps calling getmany, which keeps the consumer in its group."""
        s = self._settings
        inflight = self._tracker.inflight()
        over = inflight >= s.max_inflight_messages or self._inflight_bytes >= s.max_inflight_bytes
        under = inflight <= s.max_inflight_messages // 2 and self._inflight_bytes <= s.max_inflight_bytes // 2
        assignment = self._consumer.assignment()
        if over or (self._paused and not under):
            self._consumer.pause(*assignment)  # again each time: partitions assigned since the last pause
            if not self._paused:
                log.info("%s over its in-flight budget (%d messages, %d bytes): pausing", self.modality, inflight,
                         self._inflight_bytes)
            self._paused = True
        elif self._paused:
            self._consumer.resume(*assignment)
            self._paused = False
        self._metrics.paused.labels(self.modality).set(int(self._paused))

    # -- infer ---------------------------------------------------------------------------------------

    async def _infer_loop(self) -> None:
        while True:
            batch = await self._batcher.next_batch()
            self._batch_in_progress = True
            try:
                await self._process(batch)
            finally:
                self._inflight_bytes -= sum(p.size for p in batch)
                self._batch_in_progress = False

    async def _process(self, batch: list[Polled]) -> None:
        closed_at = time.monotonic()
        started = time.perf_counter()
        decoded: list[tuple[Polled, DecodedInput]] = []
        for polled in batch:
            try:
                decoded.append((polled, self._decoder.decode(polled.message.value)))
            except InvalidInput as exc:
                await self._dead_letter(polled, exc.stage, type(exc).__name__, exc.reason)
        decode_ms = (time.perf_counter() - started) * 1000
        if not decoded:
            return
        items = np.stack([d.item for _, d in decoded])
        started = time.perf_counter()
        try:
            probabilities = await self._infer(items)
            rows: list[np.ndarray | None] = list(probabilities)
        except EngineError as exc:
            log.warning("%s batch of %d failed (%s); retrying its inputs one by one", self.modality, len(items), exc)
            rows = await self._isolate_poison(items)
        inference_ms = (time.perf_counter() - started) * 1000
        self._metrics.batch_size.labels(self.modality).observe(len(items))
        self._metrics.inference_seconds.labels(self.modality).observe(inference_ms / 1000)
        timings = _BatchTimings(closed_at, decode_ms, inference_ms, len(items))
        for (polled, item), row in zip(decoded, rows, strict=True):
            if row is None:
                await self._dead_letter(polled, "infer", "EngineError", "the engine fails on this input alone")
            else:
                await self._publish_result(polled, item.record, row, timings)

    async def _infer(self, items: np.ndarray) -> np.ndarray:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._engine.infer, items)

    async def _isolate_poison(self, items: np.ndarray) -> list[np.ndarray | None]:
        """Run a failed batch item by item; an input that fails alone is poison. If every
        input fails and so does a blank probe, the engine itself is broken: fail the worker
        rather than dead-letter good data."""
        rows: list[np.ndarray | None] = []
        for item in items:
            try:
                rows.append((await self._infer(item[None]))[0])
            except EngineError:
                rows.append(None)
        if all(row is None for row in rows):
            try:
                await self._infer(np.zeros_like(items[:1]))
            except EngineError as exc:
                raise WorkerFailed(f"engine {self._engine.kind} fails on a blank input too: {exc}") from exc
        return rows

    # -- publish -------------------------------------------------------------------------------------

    async def _publish_result(
        self, polled: Polled, record: dict[str, Any], probabilities: np.ndarray, timings: _BatchTimings
    ) -> None:
        message = polled.message
        top = np.argsort(-probabilities)[: self._settings.top_k]
        result = {
            "trace_id": record["trace_id"],
            "device_id": record["device_id"],
            "modality": self.modality.upper(),
            "seq": record["seq"],
            "capture_time_us": record["capture_time_us"],
            "source_topic": message.topic,
            "source_partition": message.partition,
            "source_offset": message.offset,
            "model_name": self.spec.name,
            "model_version": self.spec.version,
            "top_k": [{"label": self.spec.labels[i], "score": float(probabilities[i])} for i in top],
            "ground_truth": record.get("label"),
            "latency": {
                "queue_ms": (polled.polled_time_us - record["capture_time_us"]) / 1000,
                "batch_wait_ms": (timings.closed_at - polled.polled_at) * 1000,
                "decode_ms": timings.decode_ms,
                "inference_ms": timings.inference_ms,
                "batch_size": timings.size,
            },
            "worker_id": self._worker_id,
            "result_time_us": time.time_ns() // 1000,
        }
        try:
            value = self._codec.encode(INFERENCE_RESULT, result)
        except SchemaError as exc:
            await self._dead_letter(polled, "result", type(exc).__name__, str(exc))
            return
        delivery = await self._producer.send(self._results_topic, value, key=record["device_id"].encode())
        capture_time_us = record["capture_time_us"]

        def delivered(future: asyncio.Future) -> None:
            if self._delivery_failed(future, polled):
                return
            self._metrics.results.labels(self.modality).inc()
            self._metrics.capture_to_result_seconds.labels(self.modality).observe(
                max(0.0, time.time() - capture_time_us / 1e6)
            )

        delivery.add_done_callback(delivered)

    async def _dead_letter(self, polled: Polled, stage: str, error_type: str, reason: str) -> None:
        delivery = await self._dead_letters.publish(polled.message, stage, error_type, reason)
        delivery.add_done_callback(lambda future: self._dead_lettered(future, polled, stage))

    def _dead_lettered(self, future: asyncio.Future, polled: Polled, stage: str) -> None:
        if not self._delivery_failed(future, polled):
            self._metrics.dead_letters.labels(self.modality, stage).inc()

    def _delivery_failed(self, future: asyncio.Future, polled: Polled) -> bool:
        """Ack the input once its outcome is on the broker; a refused outcome fails the worker."""
        if future.cancelled():
            self._fail(WorkerFailed(f"delivery for {polled.tp}@{polled.message.offset} was cancelled"))
            return True
        if future.exception() is not None:
            self._fail(future.exception())  # type: ignore[arg-type]
            return True
        self._tracker.ack(polled.tp, polled.message.offset)
        return False

    # -- commit --------------------------------------------------------------------------------------

    async def _commit_loop(self) -> None:
        while True:
            await asyncio.sleep(self._settings.commit_interval_ms / 1000)
            await self._commit()

    async def _commit(self) -> None:
        assignment = self._consumer.assignment()
        offsets = {tp: offset for tp, offset in self._tracker.committable().items() if tp in assignment}
        if not offsets:
            return
        try:
            await self._consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError, KafkaError) as exc:
            # Typically a rebalance in progress; the revoke handler or the next round commits.
            log.warning("%s commit of %s failed: %s", self.modality, offsets, exc)
            return
        self._tracker.mark_committed(offsets)
        self._metrics.commits.labels(self.modality).inc()

    # -- rebalance -----------------------------------------------------------------------------------

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        deadline = time.monotonic() + self._settings.drain_timeout_s
        while self._tracker.inflight(revoked) and time.monotonic() < deadline and self._failure is None:
            await asyncio.sleep(0.01)
        left = self._tracker.inflight(revoked)
        if left:
            log.warning("%s giving up %s with %d results in flight: they will be redone", self.modality, revoked, left)
        if self._failure is None:
            await self._commit()
        self._tracker.forget(revoked)

    def on_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info("%s assigned %s", self.modality, sorted((tp.topic, tp.partition) for tp in assigned))
        self.joined.set()


def load_engines(settings: SluiceSettings, modalities: list[str]) -> dict[str, Engine]:
    repository = ModelRepository(settings.engine.model_repository)
    e = settings.engine
    wanted = {"frame": (e.frame_model, e.frame_model_version), "audio": (e.audio_model, e.audio_model_version)}
    engines = {}
    for modality in modalities:
        name, version = wanted[modality]
        spec = repository.resolve(name, version)
        if spec.modality != modality:
            raise ValueError(f"model {name} v{spec.version} is for {spec.modality}, configured for {modality}")
        engines[modality] = load_engine(e.kind, spec, intra_op_threads=e.intra_op_threads)
    return engines


async def run_worker(
    settings: SluiceSettings,
    modalities: list[str],
    stopping: asyncio.Event,
    on_ready: Callable[[], None] | None = None,
    engines: dict[str, Engine] | None = None,
    registry: CollectorRegistry | None = None,
) -> None:
    """Run one pipeline per modality in this process until `stopping` is set.
    `engines` replaces the configured ones (tests inject slow or failing engines);
    `registry` is where the metrics go (a fresh one by default)."""
    registry = registry if registry is not None else CollectorRegistry()
    metrics = WorkerMetrics(registry)
    serve_metrics(registry, settings.metrics_host, settings.worker.metrics_port)
    worker_id = f"{socket.gethostname()}:{os.getpid()}"
    engines = engines if engines is not None else load_engines(settings, modalities)
    codec = Codec()
    await ensure_topics(settings.kafka)
    producer = make_producer(settings.kafka, client_id=f"{settings.kafka.client_id}-worker-{worker_id}")
    await producer.start()
    try:
        pipelines = [ModalityPipeline(settings, engines[m], codec, producer, metrics, worker_id) for m in modalities]
        for pipeline in pipelines:
            await pipeline.warmup()  # before joining: no partition waits on a cold engine
        runs = [asyncio.create_task(p.run(stopping), name=f"pipeline-{p.modality}") for p in pipelines]
        joined = asyncio.gather(*(p.joined.wait() for p in pipelines))
        await asyncio.wait([joined, *runs], return_when=asyncio.FIRST_COMPLETED)
        if joined.done() and on_ready is not None:
            on_ready()
        done, _ = await asyncio.wait(runs, return_when=asyncio.FIRST_EXCEPTION)
        if any(t.exception() for t in done):
            stopping.set()  # one modality failed: stop the others cleanly too
        results = await asyncio.gather(*runs, return_exceptions=True)
        joined.cancel()
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            raise failures[0]
    finally:
        await producer.stop()  # flushes: every queued result reaches the broker or fails loudly
        for engine in engines.values():
            engine.close()
