"""The worker, sink and ClickHouse sections of the settings (`SLUICE_WORKER__<KNOB>`, ...)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

# A checkout's root: where the local ClickHouse data and the DDL files live by default.
_CHECKOUT = Path(__file__).resolve().parent.parent


class WorkerSettings(BaseModel):
    group_prefix: str = "sluice-worker"  # one group per modality: <group_prefix>-<modality>
    # A batch closes at max_batch_size messages or max_delay_ms after its first
    # message was polled, whichever comes first.
    max_batch_size: int = 16
    max_delay_ms: float = 10.0
    # Polled but not yet acknowledged work. Above either bound the worker pauses
    # its partitions (it keeps polling, so it stays in the group) and resumes
    # below half of it.
    max_inflight_messages: int = 512
    max_inflight_bytes: int = 256 * 1024 * 1024
    commit_interval_ms: int = 250
    top_k: int = 3
    # Frames declaring more pixels than this are dead-lettered before decoding (a small JPEG can
    # declare 10000x10000 pixels and cost a gigabyte to decode).
    max_frame_pixels: int = 4096 * 4096
    # How long an outcome refused for a transient reason (a broker restart, a leader change) is
    # sent again before the worker gives up and exits without committing it.
    delivery_retry_s: float = 120.0
    # How long a revoke or a stop waits for in-flight results before giving the partitions up uncommitted.
    drain_timeout_s: float = 10.0
    metrics_port: int | None = None

    def group_id(self, modality: str) -> str:
        return f"{self.group_prefix}-{modality}"


class ClickHouseSettings(BaseModel):
    # chdb:///abs/path (embedded engine, one process per path) or http(s)://user:pass@host:8123
    dsn: str = f"chdb://{(_CHECKOUT / '.sluice' / 'clickhouse').as_posix()}"
    database: str = "sluice"
    migrations_dir: Path = _CHECKOUT / "deploy" / "clickhouse" / "migrations"


class SinkSettings(BaseModel):
    group_id: str = "sluice-sink"
    # ClickHouse prefers few large inserts: flush at batch_rows or every flush_interval_ms.
    batch_rows: int = 10_000
    flush_interval_ms: int = 1_000
    # What bounds the sink's memory: at this many results in flight (polled, not yet inserted
    # nor dead-lettered; many only while inserts fail) the checkpoint pauses the partitions,
    # and resumes them below half of it. Each holds its row (~1-2 KB) and its Kafka message
    # (~1 KB, kept for a dead letter should ClickHouse refuse the row): some 300 MB at the
    # default, plus what one poll (batch_rows) and the consumer's fetch buffers add before
    # the pause takes hold.
    max_buffered_rows: int = 100_000
    # At most this many ClickHouse partitions (capture days) per insert: keep it within the
    # server's max_partitions_per_insert_block (100 by default). A flush of results from more
    # days is inserted in several chunks.
    max_partitions_per_insert: int = 100
    insert_retry_backoff_ms: int = 500
    # How long a stopping sink keeps retrying its last insert before leaving the rows to be re-read.
    drain_timeout_s: float = 10.0
    metrics_port: int | None = None
