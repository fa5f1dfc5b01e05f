"""The inference worker: Kafka in, batched inference, one result per input out.

`run_worker` runs one `ModalityPipeline` per modality in one process, each with
its own consumer group (`<group_prefix>-<modality>`) and these tasks:

- poll: `getmany` in a loop; each message is tracked in the checkpoint and queued
  for the batcher. Over the in-flight budget the checkpoint pauses the partitions
  and polling goes on, so the consumer stays in its group however long the
  engine takes (aiokafka #848).
- decode: closes a batch (size or deadline, `batching.py`) and decodes it on the
  decode pool's threads straight into one contiguous array (`decode.py`), while
  the previous batch is inferred: decoding overlaps with inference and polling.
- infer: runs the engine on its own thread (`engine_runner.py`), and publishes
  one result per input, or a dead letter for an input that cannot be used
  (`outcomes.py`).
- commit: every commit interval, the checkpoint commits the acknowledged prefix.
- models (when Redis holds model plans): follows the model's plan, loading and
  warming a new version beside the serving one and swapping between two batches
  (`model_swap.py`). A batch runs on one serving set: the active version, a
  canary for the devices its share hashes to, and a shadow on sampled batches
  whose results go to the shadow topic only.

The commit order and the rebalance handling are `checkpoint.py`'s, shared with the sink.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from prometheus_client import CollectorRegistry

from consumers.batching import Batcher, Polled
from consumers.checkpoint import Checkpoint
from consumers.clickhouse import row_problem
from consumers.decode import DecodedBatch, DecodedInput, DecodePool, InvalidInput, decode_threads, decoder_for
from consumers.engine_runner import EngineRunner
from consumers.input_stats import InputStats, input_stats
from consumers.kafka import KafkaSettings, ensure_topics, make_consumer, make_producer
from consumers.lifecycle import run_until_done
from consumers.metrics import Health, WorkerMetrics, serve_metrics
from consumers.model_control import ModelControl, canary_bucket
from consumers.model_swap import ModelSwap, PlanWatch, ServingSet, VersionLoader
from consumers.outcomes import Outcomes
from consumers.settings import WorkerSettings
from engines import Engine, ModelNotFound, ModelSpec
from engines.repository import AudioPreprocessing
from schemas.codec import Codec
from schemas.errors import SluiceError
from schemas.records import InferenceResult, LabelScore, LatencyBreakdown, result_for
from schemas.registry import SchemaRegistrySettings, codec_for
from schemas.topics import modality

log = logging.getLogger(__name__)


class WorkerFailed(SluiceError):
    """The worker cannot go on without risking loss (a result the broker refused, an engine that fails on
    every input). It stops without committing what is not safe; a restart resumes from the last commit."""


class ModalityPipeline:
    def __init__(
        self,
        kafka: KafkaSettings,
        settings: WorkerSettings,
        engine: Engine,
        codec: Codec,
        producer: AIOKafkaProducer,
        metrics: WorkerMetrics,
        worker_id: str,
        control: ModelControl | None = None,
        load: VersionLoader | None = None,
    ) -> None:
        """`control` and `load` (a version number -> its engine) make the pipeline follow its model's plan in
        Redis; without them it serves `engine` alone."""
        self.spec = engine.spec
        self.modality = modality(self.spec.modality)
        self.name = self.modality.name
        self._settings = settings
        self._topic = self.modality.input_topic(kafka.topics)
        self._results_topic = kafka.topics.results
        self._shadow_topic = kafka.topics.shadow_results
        self._producer = producer
        self._codec = codec
        # Held by a batch from its first inference to its last result, and by a swap: a batch runs on one set.
        self._batch_lock = asyncio.Lock()
        self.batching = settings.batching_for(self.spec.batching)
        self.models = ModelSwap(engine, load or _fixed(engine), self.batching.max_batch_size, self._batch_lock)
        self._watch = (
            PlanWatch(control, self.models, worker_id, self.name, settings.model_poll_s, self._applied)
            if control is not None and load is not None else None
        )  # fmt: skip
        self._sampler = random.Random()
        self._shown_roles: set[str] = set()
        self._lag_shown: set[TopicPartition] = set()
        self._metrics = metrics
        self._worker_id = worker_id
        self._decode_pool = DecodePool(
            decoder_for(self.spec, codec, settings.max_frame_pixels), decode_threads(settings.decode_threads)
        )
        preprocessing = self.spec.preprocessing
        self._sample_rate = preprocessing.sample_rate if isinstance(preprocessing, AudioPreprocessing) else None
        # One decoded batch waits while the engine runs the one before: enough to overlap, and it bounds memory.
        self._decoded: asyncio.Queue[_DecodedWork] = asyncio.Queue(maxsize=1)
        consumer = make_consumer(kafka, settings.group_id(self.name), role=f"{self.name}-{worker_id}")
        self._checkpoint = Checkpoint(
            consumer, f"worker-{self.name}",
            max_messages=settings.max_inflight_messages, max_bytes=settings.max_inflight_bytes,
            drain_timeout_s=settings.drain_timeout_s,
        )  # fmt: skip
        self._outcomes = Outcomes(
            producer, codec, self._checkpoint, kafka.topics.dead_letters,
            component=f"worker-{self.name}@{worker_id}", on_failure=self._fail, retry_for_s=settings.delivery_retry_s,
        )  # fmt: skip
        self._batcher = Batcher(self.batching.max_batch_size, self.batching.max_delay_ms / 1000)
        self._failure: BaseException | None = None
        self._failed = asyncio.Event()
        self.joined = self._checkpoint.joined

    async def warmup(self) -> None:
        """Every batch size once, before joining: no partition waits on a cold engine (Triton #7776)."""
        await self.models.warmup()
        self._show_versions()
        if self._watch is not None:  # serve the plan's versions from the first batch on
            await self._watch.check()

    def close(self) -> None:
        self.models.close()
        self._decode_pool.close()

    def _applied(self, served: bool) -> None:
        self._metrics.model_swaps.labels(self.name, "ok" if served else "failed").inc()
        self._show_versions()

    def _show_versions(self) -> None:
        gauge = self._metrics.model_version
        versions = self.models.current.versions()
        for role in self._shown_roles - versions.keys():
            gauge.remove(self.name, self.spec.name, role)
        for role, version in versions.items():
            gauge.labels(self.name, self.spec.name, role).set(version)
        self._shown_roles = set(versions)

    async def run(self, stopping: asyncio.Event) -> None:
        """Consume until `stopping` is set, then drain and commit. Raises WorkerFailed on an unsafe failure."""
        consumer = self._checkpoint.consumer
        await consumer.start()
        self._checkpoint.subscribe([self._topic])
        tasks = [
            asyncio.create_task(self._poll_loop(), name=f"poll-{self.name}"),
            asyncio.create_task(self._infer_loop(), name=f"infer-{self.name}"),
            asyncio.create_task(self._decode_loop(), name=f"decode-{self.name}"),
            asyncio.create_task(self._commit_loop(), name=f"commit-{self.name}"),
        ]
        if self._watch is not None:
            tasks.append(asyncio.create_task(self._watch.run(), name=f"models-{self.name}"))
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
            raise WorkerFailed(f"{self.name} pipeline failed: {self._failure}") from self._failure

    async def _shutdown(self, tasks: list[asyncio.Task]) -> None:
        poll, infer, decode, *others = tasks
        poll.cancel()
        for task in others:
            task.cancel()
        # Finish what was polled, so its offsets are committed now rather than redone by the next owner.
        left = await self._checkpoint.drain()
        infer.cancel()
        decode.cancel()
        self._outcomes.close()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._checkpoint.consumer.stop()  # leaves the group, so the others rebalance at once
        log.info("%s pipeline stopped; %d messages left uncommitted", self.name, left)

    def _fail(self, exc: BaseException) -> None:
        if self._failure is None:
            log.error("%s pipeline failing: %s", self.name, exc)
            self._failure = exc
            self._checkpoint.halt()
            self._failed.set()

    async def _poll_loop(self) -> None:
        consumer = self._checkpoint.consumer
        polled_to: dict[TopicPartition, int] = {}  # one past the last offset polled, per partition
        while True:
            paused = self._checkpoint.apply_budget()
            self._metrics.paused.labels(self.name).set(int(paused))
            room = max(1, self._settings.max_inflight_messages - self._checkpoint.inflight())
            records = await consumer.getmany(timeout_ms=100, max_records=room)
            for tp, messages in records.items():
                for message in messages:
                    polled = Polled(message)
                    self._checkpoint.track(tp, message.offset, polled.size)
                    self._batcher.put(polled)
                if messages:
                    polled_to[tp] = messages[-1].offset + 1
                self._metrics.messages.labels(self.name).inc(len(messages))
            self._metrics.inflight.labels(self.name).set(self._checkpoint.inflight())
            self._metrics.inflight_bytes.labels(self.name).set(self._checkpoint.inflight_bytes)
            self._show_lag(consumer, polled_to)

    def _show_lag(self, consumer: AIOKafkaConsumer, polled_to: dict[TopicPartition, int]) -> None:
        """Per assigned partition: the high watermark the last fetch returned (no request of its own) minus
        one past the last offset polled. A partition not polled from yet is left out rather than shown as 0,
        and one given up in a rebalance drops out of the gauge."""
        assigned = consumer.assignment()
        for tp in self._lag_shown - assigned:
            self._metrics.lag.remove(self.name, str(tp.partition))
            polled_to.pop(tp, None)
        self._lag_shown = set()
        for tp in assigned:
            highwater = consumer.highwater(tp)
            if highwater is not None and tp in polled_to:
                self._metrics.lag.labels(self.name, str(tp.partition)).set(max(0, highwater - polled_to[tp]))
                self._lag_shown.add(tp)

    async def _commit_loop(self) -> None:
        while True:
            await asyncio.sleep(self._settings.commit_interval_ms / 1000)
            if await self._checkpoint.commit():
                self._metrics.commits.labels(self.name).inc()

    async def _decode_loop(self) -> None:
        while True:
            batch = await self._batcher.next_batch()
            closed_at = time.monotonic()
            started = time.perf_counter()
            decoded = await self._decode_pool.decode([polled.message.value for polled in batch])
            decode_ms = (time.perf_counter() - started) * 1000
            for position, exc in decoded.failures:
                polled = batch[position]
                if isinstance(exc, InvalidInput):
                    await self._dead_letter(polled, exc.stage, type(exc).__name__, exc.reason)
                else:  # whatever one message raises is that message's fault, not the worker's
                    log.error("unexpected error decoding %s: %r", polled.source, exc)
                    await self._dead_letter(polled, "decode", type(exc).__name__, str(exc) or repr(exc))
            if decoded.inputs:
                polled = [batch[i] for i in decoded.positions]
                # What drift detection compares; on a thread, beside the engine's batch (a few ms for 32 frames).
                stats = await asyncio.to_thread(input_stats, self.name, decoded.batch, self._sample_rate)
                await self._decoded.put(_DecodedWork(polled, decoded, stats, closed_at, decode_ms))

    async def _infer_loop(self) -> None:
        while True:
            await self._process(await self._decoded.get())

    async def _process(self, work: _DecodedWork) -> None:
        closed_at, decode_ms = work.closed_at, work.decode_ms
        decoded = list(zip(work.polled, work.decoded.inputs, strict=True))
        items = work.decoded.batch
        async with self._batch_lock:
            serving = self.models.current
            for runner, chosen in self._route(serving, decoded):
                started = time.perf_counter()
                rows = await runner.infer(items if len(chosen) == len(decoded) else items[chosen])
                inference_ms = (time.perf_counter() - started) * 1000
                self._metrics.batch_size.labels(self.name).observe(len(chosen))
                self._metrics.inference_seconds.labels(self.name).observe(inference_ms / 1000)
                for index, row in zip(chosen, rows, strict=True):
                    polled, item = decoded[index]
                    if row is None:
                        await self._dead_letter(polled, "infer", "EngineError", "the engine fails on this input alone")
                        continue
                    latency = LatencyBreakdown(
                        queue_ms=(polled.polled_time_us - item.record.capture_time_us) / 1000,
                        batch_wait_ms=(closed_at - polled.polled_at) * 1000,
                        decode_ms=decode_ms,
                        inference_ms=inference_ms,
                        batch_size=len(chosen),
                    )
                    self._metrics.queue_seconds.labels(self.name).observe(max(0.0, latency.queue_ms / 1000))
                    self._metrics.batch_wait_seconds.labels(self.name).observe(latency.batch_wait_ms / 1000)
                    await self._publish_result(polled, item, runner.spec, row, latency, work.stats.item(index))
            if serving.shadow is not None and self._sampler.random() < serving.shadow_share:
                await self._shadow(serving.shadow, work)

    def _route(
        self, serving: ServingSet, decoded: list[tuple[Polled, DecodedInput]]
    ) -> list[tuple[EngineRunner, list[int]]]:
        """Which inputs each serving version takes: the canary those whose device hashes into its share."""
        everyone = list(range(len(decoded)))
        if serving.canary is None:
            return [(serving.active, everyone)]
        in_canary = [canary_bucket(self.spec.name, item.record.device_id) < serving.canary_share for _, item in decoded]
        groups = [
            (serving.active, [i for i in everyone if not in_canary[i]]),
            (serving.canary, [i for i in everyone if in_canary[i]]),
        ]
        return [(runner, chosen) for runner, chosen in groups if chosen]

    async def _shadow(self, runner: EngineRunner, work: _DecodedWork) -> None:
        """The shadow version on the same inputs. Its results go to the shadow topic at most once: they are
        not what the input's offset waits for, so a shadow that fails costs the serving path nothing."""
        started = time.perf_counter()
        rows = await runner.infer(work.decoded.batch)
        inference_ms = (time.perf_counter() - started) * 1000
        for index, (polled, item, row) in enumerate(zip(work.polled, work.decoded.inputs, rows, strict=True)):
            if row is None:
                continue
            latency = LatencyBreakdown(
                queue_ms=(polled.polled_time_us - item.record.capture_time_us) / 1000,
                batch_wait_ms=(work.closed_at - polled.polled_at) * 1000,
                decode_ms=work.decode_ms, inference_ms=inference_ms, batch_size=len(rows),
            )  # fmt: skip
            result = self._result(polled, item, runner.spec, row, latency, work.stats.item(index))
            try:
                delivery = await self._producer.send(
                    self._shadow_topic, self._codec.write(result, topic=self._shadow_topic),
                    key=result.device_id.encode(),
                )
            except Exception as exc:
                log.warning("shadow result of %s not sent: %s", polled.source, exc)
                self._metrics.shadow_results.labels(self.name, "failed").inc()
                continue
            delivery.add_done_callback(self._shadow_settled)

    def _shadow_settled(self, delivery: asyncio.Future) -> None:
        lost = delivery.cancelled() or delivery.exception() is not None
        self._metrics.shadow_results.labels(self.name, "failed" if lost else "ok").inc()

    def _result(
        self, polled: Polled, item: DecodedInput, spec: ModelSpec, probabilities: np.ndarray, latency: LatencyBreakdown,
        stats: dict[str, float],
    ) -> InferenceResult:  # fmt: skip
        top = np.argsort(-probabilities)[: self._settings.top_k]
        whole = len(probabilities) <= self._settings.max_probabilities
        return result_for(
            item.record, self.modality.symbol, polled.source, spec.name, spec.version,
            [LabelScore(spec.labels[i], float(probabilities[i])) for i in top], latency, self._worker_id,
            input_stats=stats, probabilities=probabilities.tolist() if whole else None,
            prediction_entropy=_entropy(probabilities),
        )  # fmt: skip

    async def _publish_result(
        self, polled: Polled, item: DecodedInput, spec: ModelSpec, probabilities: np.ndarray, latency: LatencyBreakdown,
        stats: dict[str, float],
    ) -> None:  # fmt: skip
        result = self._result(polled, item, spec, probabilities, latency, stats)
        problem = row_problem(result)
        if problem is not None:  # the sink could never store it: say so now, at the source
            await self._dead_letter(polled, "validate", "RowRejected", problem)
            return
        capture_time_us = result.capture_time_us

        def delivered() -> None:
            self._metrics.results.labels(self.name).inc()
            self._metrics.capture_to_result_seconds.labels(self.name).observe(
                max(0.0, time.time() - capture_time_us / 1e6)
            )

        try:
            await self._outcomes.publish(
                self._results_topic, result, result.device_id.encode(), polled.message, on_delivered=delivered
            )
        except Exception as exc:  # e.g. a result over the producer's request size: this input's fault alone
            await self._dead_letter(polled, "result", type(exc).__name__, str(exc) or repr(exc))

    async def _dead_letter(self, polled: Polled, stage: str, error_type: str, reason: str) -> None:
        def delivered() -> None:
            self._metrics.dead_letters.labels(self.name, stage, error_type).inc()

        await self._outcomes.dead_letter(polled.message, stage, error_type, reason, on_delivered=delivered)


async def run_worker(
    kafka: KafkaSettings,
    settings: WorkerSettings,
    engines: dict[str, Engine],
    stopping: asyncio.Event,
    on_ready: Callable[[], None] | None = None,
    registry: CollectorRegistry | None = None,
    metrics_host: str = "127.0.0.1",
    *,
    control: ModelControl | None = None,
    loaders: dict[str, VersionLoader] | None = None,
    schema_registry: SchemaRegistrySettings | None = None,
) -> None:
    """Run one pipeline per engine (keyed by modality) in this process until `stopping` is set.
    With `control` and a loader per modality, each pipeline follows its model's plan in Redis.
    The engines are closed on the way out; `registry` is where the metrics go (a fresh one by default)."""
    registry = registry if registry is not None else CollectorRegistry()
    metrics = WorkerMetrics(registry)
    health = Health()
    serve_metrics(registry, metrics_host, settings.metrics_port, health)
    beating = asyncio.create_task(health.keep_beating(stopping), name="heartbeat")
    worker_id = f"{socket.gethostname()}:{os.getpid()}"
    codec = codec_for(schema_registry)
    pipelines: list[ModalityPipeline] = []
    producer = make_producer(kafka, role=f"worker-{worker_id}")
    loaders = loaders or {}
    try:
        await ensure_topics(kafka)
        await producer.start()
        pipelines = [
            ModalityPipeline(kafka, settings, engine, codec, producer, metrics, worker_id, control, loaders.get(modality))
            for modality, engine in engines.items()
        ]
        for pipeline in pipelines:
            await pipeline.warmup()
        runs = [asyncio.create_task(p.run(stopping), name=f"pipeline-{p.name}") for p in pipelines]
        for run in runs:  # one modality failed: stop the others cleanly too
            run.add_done_callback(lambda task: task.cancelled() or task.exception() is None or stopping.set())
        await run_until_done(runs, [p.joined for p in pipelines], health.ready_then(on_ready))
    finally:
        beating.cancel()
        await producer.stop()  # flushes: every queued result reaches the broker or fails loudly
        for pipeline in pipelines:
            pipeline.close()
        for engine in engines.values():
            engine.close()
        if control is not None:
            await control.close()


@dataclass(slots=True)
class _DecodedWork:
    """A batch on its way from the decode pool to the engine: the inputs that decoded, in batch order."""

    polled: list[Polled]
    decoded: DecodedBatch
    stats: InputStats  # per input, in batch order
    closed_at: float  # monotonic time the batch closed
    decode_ms: float


def _entropy(probabilities: np.ndarray) -> float:
    """Shannon entropy in nats; a zero probability contributes nothing."""
    p = probabilities[probabilities > 0]
    return float(-(p * np.log(p)).sum())


def _fixed(engine: Engine) -> VersionLoader:
    """A pipeline that follows no plan serves the engine it was given, and nothing else."""

    def refuse(version: int) -> Engine:
        raise ModelNotFound(f"this worker serves {engine.spec.name} v{engine.spec.version} only (no model plans)")

    return refuse
