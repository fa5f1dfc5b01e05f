"""The worker, sink, ClickHouse and Redis sections of the settings (`SLUICE_WORKER__<KNOB>`, ...)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt

from engines.repository import Batching

# A checkout's root: where the local ClickHouse data and the DDL files live by default.
_CHECKOUT = Path(__file__).resolve().parent.parent


class WorkerSettings(BaseModel):
    group_prefix: str = "sluice-worker"  # one group per modality: <group_prefix>-<modality>
    # A batch closes at max_batch_size messages or max_delay_ms after its first
    # message was polled, whichever comes first. None: what the model's config.json
    # says (`batching`; 16 and 10 ms where it says nothing). Set, they override every model's.
    max_batch_size: PositiveInt | None = None
    max_delay_ms: NonNegativeFloat | None = None
    # Polled but not yet acknowledged work. Above either bound the worker pauses
    # its partitions (it keeps polling, so it stays in the group) and resumes
    # below half of it.
    max_inflight_messages: PositiveInt = 512
    max_inflight_bytes: PositiveInt = 256 * 1024 * 1024
    commit_interval_ms: PositiveInt = 250
    top_k: PositiveInt = 3
    # Results carry the whole probability vector (what drift detection compares) for models of at most this
    # many classes; above it (an ImageNet model's 1000) only the top_k and the entropy, to keep results small.
    max_probabilities: NonNegativeInt = 64
    # Frames declaring more pixels than this are dead-lettered before decoding (a small JPEG can
    # declare 10000x10000 pixels and cost a gigabyte to decode).
    max_frame_pixels: PositiveInt = 4096 * 4096
    # How long an outcome refused for a transient reason (a broker restart, a leader change) is
    # sent again before the worker gives up and exits without committing it.
    delivery_retry_s: NonNegativeFloat = 120.0
    # How long a revoke or a stop waits for in-flight results before giving the partitions up uncommitted.
    drain_timeout_s: NonNegativeFloat = 10.0
    # Threads decoding inputs beside the event loop and the engine (JPEG decode releases the GIL).
    # None: sized from the machine's cores (`consumers.decode.decode_threads`).
    decode_threads: PositiveInt | None = None
    # The model plans in Redis (`sluice models activate`) reach a worker by a notice at once; it also
    # re-reads them this often, in case a notice was missed while Redis or the worker was away.
    model_poll_s: PositiveFloat = 5.0
    metrics_port: int | None = Field(None, ge=0, le=65535)

    def batching_for(self, batching: Batching) -> Batching:
        """The batching a worker applies to a model whose config.json declares `batching`."""
        size = self.max_batch_size or batching.max_batch_size
        return Batching(
            max_batch_size=size,
            max_delay_ms=batching.max_delay_ms if self.max_delay_ms is None else self.max_delay_ms,
            preferred_batch_sizes=[s for s in batching.preferred_batch_sizes if s <= size],
        )

    def group_id(self, modality: str) -> str:
        return f"{self.group_prefix}-{modality}"


class ClickHouseSettings(BaseModel):
    # chdb:///abs/path (embedded engine, one process per path) or http(s)://user:pass@host:8123
    dsn: str = f"chdb://{(_CHECKOUT / '.sluice' / 'clickhouse').as_posix()}"
    database: str = "sluice"
    migrations_dir: Path = _CHECKOUT / "deploy" / "clickhouse" / "migrations"
    # Retention, applied by the sink at every start (a TTL on each table; None keeps rows forever): results
    # and shadow results from when they were inserted, the per-minute aggregates (what dashboards read) for longer.
    retention_days: PositiveInt | None = 90
    aggregate_retention_days: PositiveInt | None = 730


class SinkSettings(BaseModel):
    group_id: str = "sluice-sink"
    # ClickHouse prefers few large inserts: flush at batch_rows or every flush_interval_ms.
    batch_rows: PositiveInt = 10_000
    flush_interval_ms: PositiveInt = 1_000
    # What bounds the sink's memory: at this many results in flight (polled, not yet inserted
    # nor dead-lettered; many only while inserts fail) the checkpoint pauses the partitions,
    # and resumes them below half of it. Each holds its row (~1-2 KB) and its Kafka message
    # (~1 KB, kept for a dead letter should ClickHouse refuse the row): some 300 MB at the
    # default, plus what one poll (batch_rows) and the consumer's fetch buffers add before
    # the pause takes hold.
    max_buffered_rows: PositiveInt = 100_000
    # At most this many ClickHouse partitions (capture days) per insert: keep it within the
    # server's max_partitions_per_insert_block (100 by default). A flush of results from more
    # days is inserted in several chunks.
    max_partitions_per_insert: PositiveInt = 100
    insert_retry_backoff_ms: NonNegativeInt = 500
    # How long a stopping sink keeps retrying its last insert before leaving the rows to be re-read.
    drain_timeout_s: NonNegativeFloat = 10.0
    metrics_port: int | None = Field(None, ge=0, le=65535)
    # With the embedded engine (a chdb:// DSN) only the sink may open the data directory, so it serves
    # read-only SQL at http://query_host:query_port/query for `sluice clickhouse query` and the dashboard
    # (`consumers/query_endpoint.py`). None: not served. Queries share the inserts' thread: a long one
    # delays inserts meanwhile (the buffer budget still bounds memory).
    query_host: str = "127.0.0.1"
    query_port: int | None = Field(8124, ge=0, le=65535)


class RedisSettings(BaseModel):
    url: str = "redis://127.0.0.1:6379/0"
    # Prefix of the model plans' keys and notice channel (`<namespace>:models:...`): one per deployment
    # sharing a Redis.
    namespace: str = "sluice"
    # A Redis that stops answering (a partition, a hung host) counts as unreachable after this long,
    # for connecting and for each command, rather than holding the notifier or a worker's model watch
    # until TCP gives up.
    timeout_s: PositiveFloat = 2.0
    # While Redis cannot answer, a cooldown command is retried after 0.1 s, then after twice as long
    # each time, up to this: a long outage costs one attempt (and one logged failure) per this long.
    retry_max_s: PositiveFloat = 5.0
