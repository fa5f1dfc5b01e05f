"""Driving the whole system on the local stack: the one harness the demo, the benchmarks and the tests share.

- settings on free loopback ports (`isolated_settings`), or with topics, groups
  and ClickHouse data of their own on a shared stack (`scoped`);
- Sluice components as their own processes, started with exactly these settings
  and waited for until they have joined their groups (`Components`);
- inputs from the synthetic scenes, published through the device SDK
  (`publish_frames`, `publish_audio`), returning where each landed;
- for fault injection: a paced stream of frames and audio that survives a
  broker outage and counts what the broker acknowledged (`publish_stream`), the
  broker killed and restarted (`kill_broker`, `start_broker`, on the durable
  stack of `durable`), ClickHouse counted after the sink stops
  (`clickhouse_counts`), the resident memory of the component processes
  (`RssSampler`), their metrics (`scrape`), and a consumer group's lag counted
  from what was published (`group_lag_from`), never from the broker's reported
  end offsets (Tansu has been seen to under-report them).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import numpy as np
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from PIL import Image

from consumers.kafka import device_client, make_admin
from producers.synth import CHUNK_SAMPLES, SAMPLE_RATE, CameraScene, MicrophoneScene
from schemas.codec import Codec
from schemas.records import AudioChunk, FrameChunk, Source, now_us
from streams.local import processes
from streams.local.processes import ManagedProcess
from streams.local.stack import KAFKA, LocalStack, kafka_endpoint, port_open
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
            "sink": settings.sink.model_copy(update={"query_port": free_port()}),
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
            "sink": s.sink.model_copy(update={"group_id": f"{tag}-sink", "query_port": free_port()}),
            "notifier": s.notifier.model_copy(update={"app_id": f"{tag}-notifier"}),
            "redis": s.redis.model_copy(update={"namespace": tag}),
            "stack": s.stack.model_copy(update={"run_dir": base / "run"}),
            "clickhouse": s.clickhouse.model_copy(update={"dsn": f"chdb://{(base / 'clickhouse').as_posix()}"}),
        }
    )


def durable(settings: SluiceSettings, fetch_max_wait_ms: int = 500) -> SluiceSettings:
    """The same settings with the broker's data in the stack's S3 server on a free loopback port, so that
    topics, data and committed offsets outlive a kill -9 of the broker (`kill_broker`, `start_broker`).

    Every consumer here waits `fetch_max_wait_ms` per fetch. Tansu answers a fetch whose wait ends before its
    S3 read does with nothing, and the next fetch starts over: at the default 10 ms a consumer of the S3-backed
    broker was seen to read nothing at all. And each fetch lists the partition's objects in S3: a short wait
    multiplies those requests until the S3 server (moto, Python, on the same cores) is saturated. At 500 ms
    and 2 partitions per topic the durable stack carried some 75 inputs/s end to end on two cores; it is for
    proving durability, not for throughput."""
    stack = settings.stack.model_copy(
        update={"kafka_storage": "s3://tansu/", "s3_endpoint": f"http://127.0.0.1:{free_port()}"}
    )
    kafka = settings.kafka.model_copy(update={"fetch_max_wait_ms": fetch_max_wait_ms})
    return settings.model_copy(update={"stack": stack, "kafka": kafka})


def start_sluice(settings: SluiceSettings, name: str, args: list[str], module: str = "streams.cli") -> ManagedProcess:
    """Start `sluice <args>` as its own process, seeing exactly these settings (`module`: another entry point
    taking the same settings, such as a test's own wrapper around a component)."""
    argv = [sys.executable, "-m", module, *args]
    return processes.start(name, argv, settings.stack.run_dir, env=settings_env(settings))


class Components:
    """Sluice processes started with one set of settings; each is stopped by PID in `stop_all`."""

    def __init__(self, settings: SluiceSettings) -> None:
        self.settings = settings
        self.started: list[ManagedProcess] = []

    def launch(
        self, name: str, args: list[str], settings: SluiceSettings | None = None, module: str = "streams.cli"
    ) -> tuple[ManagedProcess, Path]:
        """Start `sluice <args> --ready-file F` without waiting; return it and F."""
        settings = settings or self.settings
        ready = settings.stack.run_dir / f"{name}.ready"
        ready.unlink(missing_ok=True)
        process = start_sluice(settings, name, [*args, "--ready-file", str(ready)], module)
        self.started.append(process)
        return process, ready

    @staticmethod
    def wait_ready(launched: list[tuple[ManagedProcess, Path]], timeout_s: float = 120) -> None:
        """Until each has touched its ready file (it has joined its consumer groups)."""
        for process, ready in launched:
            processes.wait_ready(process, ready.exists, timeout_s)

    def start(self, name: str, args: list[str], settings: SluiceSettings | None = None,
              timeout_s: float = 90, module: str = "streams.cli") -> ManagedProcess:  # fmt: skip
        """Start one component and wait until it is ready."""
        launched = self.launch(name, args, settings, module)
        self.wait_ready([launched], timeout_s)
        return launched[0]

    def process(self, name: str) -> ManagedProcess:
        """The latest process started under `name`."""
        return next(p for p in reversed(self.started) if p.name == name)

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


# -- fault injection ---------------------------------------------------------------------------------------------


@dataclass
class Published:
    """What a stream left on the broker: the coordinates it acknowledged, and what it refused."""

    sources: set[Source] = field(default_factory=set)
    refused: int = 0  # sends that failed after the producer's own retries (not acknowledged: not owed a result)
    frames: int = 0  # acknowledged frames
    audio: int = 0  # acknowledged audio chunks
    started_at: float = 0.0
    finished_at: float = 0.0

    @property
    def rate(self) -> float:
        """Acknowledged inputs per second over the stream."""
        return len(self.sources) / max(1e-9, self.finished_at - self.started_at)

    def ends(self) -> dict[TopicPartition, int]:
        """One past the highest acknowledged offset of each partition written to."""
        ends: dict[TopicPartition, int] = {}
        for source in self.sources:
            tp = TopicPartition(source.topic, source.partition)
            ends[tp] = max(ends.get(tp, 0), source.offset + 1)
        return ends


def _frame_pool(count: int, seed: int, cameras: int, size: tuple[int, int] | None) -> list[tuple[str, dict, str]]:
    """(device id, FrameChunk fields, label) rendered once: raw 224x224 frames, or JPEG at `size` (width, height),
    as a camera that encodes in hardware sends them (the worker decodes and resizes them to the model's input)."""
    scenes = [CameraScene(np.random.default_rng(seed + i)) for i in range(cameras)]
    pool = []
    for i in range(count):
        frame, label = scenes[i % cameras].next_frame()
        if size is None:
            fields = {"encoding": "RAW", "height": frame.shape[0], "width": frame.shape[1], "data": frame.tobytes()}
        else:
            buf = io.BytesIO()
            Image.fromarray(frame).resize(size, Image.BILINEAR).save(buf, format="JPEG", quality=90)
            fields = {"encoding": "JPEG", "height": size[1], "width": size[0], "data": buf.getvalue()}
        pool.append((f"cam-{i % cameras}", fields, label))
    return pool


def _audio_pool(count: int, seed: int, microphones: int) -> list[tuple[str, bytes, str]]:
    scenes = [MicrophoneScene(np.random.default_rng(seed + i)) for i in range(microphones)]
    pool = []
    for i in range(count):
        chunk, label = scenes[i % microphones].next_chunk()
        assert chunk.shape == (CHUNK_SAMPLES,)
        pool.append((f"mic-{i % microphones}", np.ascontiguousarray(chunk, dtype="<i2").tobytes(), label))
    return pool


async def publish_stream(
    settings: SluiceSettings, frames: int, audio: int, *, rate: float | None = None, seed: int = 0, cameras: int = 8,
    microphones: int = 4, camera_size: tuple[int, int] | None = None, pool: int = 64,
    stop: asyncio.Event | None = None, into: Published | None = None,
) -> Published:  # fmt: skip
    """`frames` frames and `audio` audio chunks, interleaved evenly, at `rate` inputs/s (None: as fast as the
    producer goes), until done or `stop` is set. The records are the device SDK's (FrameChunk, AudioChunk, keyed
    by device id, with per-device seq, fresh trace ids and capture times), cycled from a pool of `pool` rendered
    scenes per modality so that rendering never limits the rate. A send the broker does not take (it is down
    for longer than the producer retries) is counted in `refused` and the stream goes on: only acknowledged
    inputs are owed a result. `into` is filled as acknowledgements arrive, for a caller that watches it."""
    published = into if into is not None else Published()
    codec = Codec()
    topics = settings.kafka.topics
    frame_pool = _frame_pool(min(frames, pool), seed, cameras, camera_size) if frames else []
    audio_pool = _audio_pool(min(audio, pool), seed, microphones) if audio else []
    seqs: dict[str, int] = {}
    total = frames + audio
    pending: set[asyncio.Future] = set()

    def settled(future: asyncio.Future, is_frame: bool) -> None:
        pending.discard(future)
        if future.cancelled() or future.exception() is not None:
            published.refused += 1
            return
        m = future.result()
        published.sources.add(Source(m.topic, m.partition, m.offset))
        if is_frame:
            published.frames += 1
        else:
            published.audio += 1
        published.finished_at = time.monotonic()

    options = settings.kafka.producer_options()
    # Batches of many inputs (aiokafka's default of 16 KB holds a single VGA JPEG), and JPEG is not compressed
    # again: a camera that encodes in hardware sends what it encoded.
    options["max_batch_size"] = max(1024 * 1024, options.get("max_batch_size", 0))
    if camera_size is not None and not audio:
        options["compression_type"] = None
    producer = AIOKafkaProducer(**options, client_id=f"{settings.kafka.client_id}-harness-stream")
    await producer.start()
    published.started_at = time.monotonic()
    try:
        for i in range(total):
            if stop is not None and stop.is_set():
                break
            if rate is not None and (ahead := published.started_at + i / rate - time.monotonic()) > 0.002:
                await asyncio.sleep(ahead)
            is_frame = (i + 1) * frames // total > i * frames // total
            if is_frame:
                device, fields, label = frame_pool[i % len(frame_pool)]
                record = FrameChunk(device_id=device, trace_id=uuid.uuid4().hex, seq=0, capture_time_us=now_us(),
                                    channels=3, dtype="uint8", label=label, **fields)  # fmt: skip
                topic = topics.frames
            else:
                device, data, label = audio_pool[i % len(audio_pool)]
                record = AudioChunk(device_id=device, trace_id=uuid.uuid4().hex, seq=0, capture_time_us=now_us(),
                                    encoding="PCM_S16LE", sample_rate=SAMPLE_RATE, channels=1, data=data, label=label)  # fmt: skip
                topic = topics.audio
            record.seq = seqs.get(device, 0)
            seqs[device] = record.seq + 1
            try:
                future = await producer.send(topic, codec.write(record), key=device.encode())
            except KafkaError:
                published.refused += 1
                continue
            pending.add(future)
            future.add_done_callback(lambda f, is_frame=is_frame: settled(f, is_frame))
        if pending:
            await asyncio.wait(set(pending))
    finally:
        await producer.stop()
    published.finished_at = time.monotonic()
    return published


def kill_broker(settings: SluiceSettings) -> int:
    """SIGKILL the stack's broker (found by its PID file); return its PID. Its storage decides what survives:
    everything on the durable stack (`durable`), nothing on the default memory storage."""
    process = processes.read(KAFKA, settings.stack.run_dir)
    if process is None or not process.alive():
        raise processes.ProcessError("the broker is not running")
    processes.kill(process)
    # Gone from /proc is not yet gone from the port: a dying process closes its sockets last.
    host, port = kafka_endpoint(settings)
    deadline = time.monotonic() + 10
    while port_open(host, port) and time.monotonic() < deadline:
        time.sleep(0.02)
    return process.pid


def start_broker(settings: SluiceSettings) -> ManagedProcess:
    """Start the stack's broker again, on the same port and storage, and wait until it listens."""
    return next(p for p in LocalStack(settings).up() if p.name == KAFKA)


@dataclass
class ClickHouseCounts:
    raw: int  # rows in the table, duplicates included
    final: int  # SELECT ... FINAL
    view: int  # the inference_results_dedup view
    distinct_sources: int  # distinct input coordinates among the raw rows
    dedup_sources: list[Source]  # the coordinates of each row the view returns

    @property
    def duplicates(self) -> int:
        return self.raw - self.distinct_sources


def _clickhouse_query(settings: SluiceSettings, sql: str) -> list[dict]:
    out = subprocess.run(
        [sys.executable, "-m", "streams.cli", "clickhouse", "query", sql],
        env=os.environ | settings_env(settings), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    if out.returncode != 0:
        raise processes.ProcessError(f"sluice clickhouse query failed: {out.stdout}{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def clickhouse_counts(settings: SluiceSettings) -> ClickHouseCounts:
    """Rows in `inference_results`, read through `sluice clickhouse query`: stop the sink first (the embedded
    engine allows one process per data path)."""
    table = f"{settings.clickhouse.database}.inference_results"
    (counts,) = _clickhouse_query(
        settings,
        f"SELECT (SELECT count() FROM {table}) AS raw, (SELECT count() FROM {table} FINAL) AS final, "
        f"(SELECT count() FROM {table}_dedup) AS view, "
        f"(SELECT uniqExact(source_topic, source_partition, source_offset) FROM {table}) AS distinct_sources",
    )
    rows = _clickhouse_query(
        settings,
        f"SELECT source_topic AS t, source_partition AS p, groupArray(source_offset) AS o FROM {table}_dedup "
        "GROUP BY t, p",
    )
    sources = [Source(row["t"], int(row["p"]), int(o)) for row in rows for o in row["o"]]
    return ClickHouseCounts(int(counts["raw"]), int(counts["final"]), int(counts["view"]),
                            int(counts["distinct_sources"]), sources)  # fmt: skip


def rss_mb(pid: int) -> float | None:
    """Resident memory of a process (VmRSS), in MiB; None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return None


class RssSampler:
    """The resident memory of every process a `Components` started, sampled on a thread of its own every
    `interval_s`: per process name, each sample as (monotonic time, MiB)."""

    def __init__(self, components: Components, interval_s: float = 0.25) -> None:
        self._components = components
        self._interval_s = interval_s
        self.samples: dict[str, list[tuple[float, float]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            now = time.monotonic()
            for process in list(self._components.started):
                if process.popen is not None and process.popen.poll() is not None:
                    continue
                if (mb := rss_mb(process.pid)) is not None:
                    self.samples.setdefault(process.name, []).append((now, mb))

    def peak(self, name: str, since: float = 0.0, until: float = float("inf")) -> float:
        return max((mb for t, mb in self.samples.get(name, []) if since <= t <= until), default=0.0)

    def peaks(self) -> dict[str, float]:
        return {name: round(self.peak(name), 1) for name in self.samples}


class Metrics(dict):
    """One scrape of a process's /metrics: (name, labels) -> value."""

    def get_value(self, name: str, **labels: str) -> float:
        """The sum of the samples of `name` whose labels include `labels`."""
        wanted = set(labels.items())
        return sum(value for (sample, have), value in self.items() if sample == name and wanted <= have)


def scrape(port: int, host: str = "127.0.0.1") -> Metrics:
    """A component's Prometheus metrics (its `metrics_port`), read over loopback."""
    from prometheus_client.parser import text_string_to_metric_families

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{host}:{port}/metrics", timeout=2.0) as response:
        text = response.read().decode()
    metrics = Metrics()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            metrics[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return metrics


async def committed_offsets(
    settings: SluiceSettings, group: str, partitions: Iterable[TopicPartition]
) -> dict[TopicPartition, int]:
    """What `group` has committed on `partitions` (0 where nothing is committed)."""
    admin = make_admin(settings.kafka, "harness-lag")
    await admin.start()
    try:
        committed = await admin.list_consumer_group_offsets(group, partitions=list(partitions))
    finally:
        await admin.close()
    return {tp: max(0, meta.offset) if (meta := committed.get(tp)) is not None else 0 for tp in partitions}


async def group_lag_from(settings: SluiceSettings, group: str, ends: dict[TopicPartition, int]) -> int:
    """Messages below `ends` (what the caller knows was written, e.g. `Published.ends()`) that `group` has not
    committed yet. Counted from known ends, not the broker's reported end offsets, which Tansu can under-report."""
    committed = await committed_offsets(settings, group, ends)
    return sum(max(0, end - committed[tp]) for tp, end in ends.items())


async def wait_for_lag(
    settings: SluiceSettings, group: str, ends: dict[TopicPartition, int], timeout_s: float, at_most: int = 0
) -> int:
    """Until `group` has committed all but `at_most` messages below `ends`; returns the last lag seen."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            lag = await group_lag_from(settings, group, ends)
        except KafkaError:
            lag = -1  # the broker is not answering yet: ask again
        if 0 <= lag <= at_most or time.monotonic() >= deadline:
            return lag
        await asyncio.sleep(0.25)
