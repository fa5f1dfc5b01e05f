"""ClickHouse access for the sink: client, migrations, the result row layout, and what the table refuses.

The DSN decides the backend: `chdb:///path` is the embedded engine (one engine
per process, one process per data directory, so only the sink process opens
it), `http(s)://user:pass@host:8123` a server. The DDL is the same for both.

A row the table cannot hold must not reach an insert: one such row fails its
whole batch, and a batch retried forever stops the sink. `row_problem` says
why a result cannot be a row (the worker asks before producing one, the sink
before buffering one); `rows_at_fault` tells an insert that failed because of
its rows (split it, dead-letter the culprits) from one that failed because of
ClickHouse (retry it).
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import struct
from pathlib import Path
from string import Template
from typing import Any

import clickhouse_connect
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError as DriverError
from clickhouse_connect.driver.exceptions import DatabaseError, DataError

from schemas.errors import ConfigError, SluiceError, redact_url
from schemas.records import DriftEvent, InferenceResult

log = logging.getLogger(__name__)

RESULTS_TABLE = "inference_results"
SHADOW_RESULTS_TABLE = "shadow_results"  # results of a version in shadow (0002_shadow_results.sql)

RESULT_COLUMNS = (
    "source_topic", "source_partition", "source_offset", "trace_id", "device_id", "modality", "seq",
    "capture_time", "result_time", "model_name", "model_version", "label", "score", "top_labels", "top_scores",
    "ground_truth", "queue_ms", "batch_wait_ms", "decode_ms", "inference_ms", "batch_size", "worker_id",
    "input_stats", "probabilities", "prediction_entropy", "embedding",
)  # fmt: skip


class ClickHouseUnavailable(SluiceError):
    """ClickHouse could not be opened or reached (check SLUICE_CLICKHOUSE__DSN)."""


def connect(dsn: str) -> Client:
    if dsn.startswith("chdb://"):
        Path(dsn.removeprefix("chdb://")).mkdir(parents=True, exist_ok=True)
    try:
        return clickhouse_connect.get_client(dsn=dsn)
    except (DriverError, OSError) as exc:
        raise ClickHouseUnavailable(f"cannot open ClickHouse at {redact_url(dsn)}: {exc}") from exc


def _statements(sql: str) -> list[str]:
    without_comments = "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--"))
    return [s.strip() for s in without_comments.split(";") if s.strip()]


def apply_migrations(client: Client, migrations_dir: Path, database: str) -> list[str]:
    """Apply, in file-name order, the `*.sql` files not yet recorded in `<database>.schema_migrations`.
    Return the versions applied now. `${database}` in a file is replaced by the configured database."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", database):
        raise ConfigError(f"database name {database!r} is not a plain identifier")
    client.command(f"CREATE DATABASE IF NOT EXISTS {database}")
    client.command(
        f"CREATE TABLE IF NOT EXISTS {database}.schema_migrations "
        "(version String, checksum String, applied_at DateTime64(3, 'UTC') DEFAULT now64(3)) "
        "ENGINE = MergeTree ORDER BY version"
    )
    applied = {row[0]: row[1] for row in client.query(f"SELECT version, checksum FROM {database}.schema_migrations").result_rows}
    done = []
    files = sorted(migrations_dir.glob("*.sql"))
    if not files:
        raise ConfigError(f"no migrations in {migrations_dir} (set SLUICE_CLICKHOUSE__MIGRATIONS_DIR)")
    for path in files:
        sql = path.read_text()
        checksum = hashlib.sha256(sql.encode()).hexdigest()
        if path.stem in applied:
            if applied[path.stem] != checksum:
                log.warning("migration %s changed after it was applied; add a new migration instead", path.name)
            continue
        for statement in _statements(Template(sql).substitute(database=database)):
            client.command(statement)
        client.insert(f"{database}.schema_migrations", [[path.stem, checksum]], column_names=["version", "checksum"])
        done.append(path.stem)
        log.info("applied migration %s", path.name)
    return done


# Table -> the time its rows expire from, and whether it holds aggregates (kept longer) or results. Results
# expire from when they were inserted, not captured: a device with a wrong clock (a capture time in 1970) must
# not have its rows dropped at the next merge.
_RETENTION = {
    RESULTS_TABLE: ("toDateTime(inserted_at)", False),
    SHADOW_RESULTS_TABLE: ("toDateTime(inserted_at)", False),
    "results_per_minute": ("minute", True),
    "input_stats_per_minute": ("minute", True),
}


def apply_retention(client: Client, database: str, retention_days: int | None, aggregate_days: int | None) -> None:
    """Set each table's TTL to the configured retention (idempotent; run at every sink start). Rows past it
    go at the next merge; existing parts are not rewritten now (materialize_ttl_after_modify=0), which on a
    big table would be a long mutation at start-up."""
    for table, (expires_from, aggregate) in _RETENTION.items():
        days = aggregate_days if aggregate else retention_days
        ttl = None if days is None else f"{expires_from} + toIntervalDay({int(days)})"
        statement = f"ALTER TABLE {database}.{table} " + (f"MODIFY TTL {ttl}" if ttl else "REMOVE TTL")
        current = client.command(f"SELECT create_table_query FROM system.tables WHERE database = '{database}' "
                                 f"AND name = '{table}'")  # fmt: skip
        if (ttl is None and " TTL " not in str(current)) or (ttl is not None and f"TTL {ttl}" in str(current)):
            continue
        client.command(statement, settings={"materialize_ttl_after_modify": 0})
        log.info("%s.%s: %s", database, table, f"rows kept {days} days" if ttl else "rows kept forever")


def result_row(result: InferenceResult) -> list[Any]:
    """One result as a row in RESULT_COLUMNS order. The times go as DateTime64(6) ticks, whole microseconds:
    the driver converts a datetime through a float of seconds, which loses microseconds after 2106 and can round
    a row into the next day (another partition than `result_partition` says)."""
    best = result.best
    latency = result.latency
    return [
        result.source_topic,
        result.source_partition,
        result.source_offset,
        result.trace_id,
        result.device_id,
        result.modality,
        result.seq,
        result.capture_time_us,
        result.result_time_us,
        result.model_name,
        result.model_version,
        best.label if best else "",
        best.score if best else 0.0,
        [t.label for t in result.top_k],
        [t.score for t in result.top_k],
        result.ground_truth,
        latency.queue_ms,
        latency.batch_wait_ms,
        latency.decode_ms,
        latency.inference_ms,
        latency.batch_size,
        result.worker_id,
        result.input_stats,
        result.probabilities,
        result.prediction_entropy,
        result.embedding,
    ]


DRIFT_EVENTS_TABLE = "drift_events"
DRIFT_EVENT_COLUMNS = (
    "window_start", "window_end", "device_group", "modality", "model_name", "model_version", "statistic", "test",
    "score", "threshold", "p_value", "drifted", "reference_size", "current_size", "detected_at",
)  # fmt: skip


def drift_event_row(event: DriftEvent) -> list[Any]:
    """One drift verdict as a row in DRIFT_EVENT_COLUMNS order (times as DateTime64(3) ticks, milliseconds)."""
    return [
        event.window_start_us // 1000, event.window_end_us // 1000, event.device_group, event.modality,
        event.model_name, event.model_version, event.statistic, event.test, event.score, event.threshold,
        event.p_value, event.drifted, event.reference_size, event.current_size, event.detected_at_us // 1000,
    ]  # fmt: skip


def drift_event_problem(event: DriftEvent) -> str | None:
    """Why `drift_events` cannot hold `event`, or None."""
    if event.modality not in _MODALITY_SYMBOLS:
        return f"modality {event.modality!r} is not one of the table's {', '.join(_MODALITY_SYMBOLS)}"
    if not 0 <= event.model_version <= _UINT_MAX["UInt32"] or event.reference_size < 0 or event.current_size < 0:
        return "model_version and the window sizes must be non-negative"
    for name, us in (("window_start_us", event.window_start_us), ("window_end_us", event.window_end_us)):
        if not _DATETIME64_MIN_US <= us <= _DATETIME64_MAX_US:
            return f"{name} is {us}, not a time from 1900 to 2299 in microseconds since 1970"
    return None


def drift_event_partition(event: DriftEvent) -> int:
    """The event's ClickHouse partition: `PARTITION BY toYYYYMM(window_end)`, as a day number is enough to
    keep an insert's partitions under the limit (a month holds at most 31 days)."""
    return event.window_end_us // 86_400_000_000


def result_partition(result: InferenceResult) -> int:
    """The partition of the result's row, as a number: its capture day in UTC, which is what the table's
    `PARTITION BY toYYYYMMDD(capture_time)` on a `DateTime64(6, 'UTC')` column groups by."""
    return result.capture_time_us // 86_400_000_000


# -- what the columns hold (deploy/clickhouse/migrations) ---------------------------------------------------

_UINT_MAX = {"UInt16": 2**16 - 1, "UInt32": 2**32 - 1, "UInt64": 2**64 - 1}
# DateTime64's documented range. Servers from before the range was widened (ClickHouse #107907) clamp a value
# outside it to the nearest end without an error, so such a row would be stored with a wrong time.
_DATETIME64_MIN_US = -2_208_988_800 * 10**6  # 1900-01-01 00:00:00 UTC
_DATETIME64_MAX_US = 10_413_792_000 * 10**6 - 1  # 2299-12-31 23:59:59.999999 UTC
_FLOAT32_MAX = 3.4028234663852886e38  # beyond it (but finite) the driver cannot pack a Float32; NaN and inf it can
# The modality column's Enum8. The driver sends a symbol it does not know as 0, which the server stores as is.
_MODALITY_SYMBOLS = ("FRAME", "AUDIO")
_NOT_FROM_A_WORKER = "Kafka coordinates are never negative, so no Sluice worker made this result"


def row_problem(result: InferenceResult) -> str | None:
    """Why `inference_results` cannot hold `result`, in a sentence a user can act on, or None if it can."""
    latency = result.latency
    unsigned = (
        ("seq", result.seq, "UInt64", "the device must number its chunks from 0 up, as the SDK does"),
        ("source_partition", result.source_partition, "UInt32", _NOT_FROM_A_WORKER),
        ("source_offset", result.source_offset, "UInt64", _NOT_FROM_A_WORKER),
        ("model_version", result.model_version, "UInt32", "model versions are the repository's version numbers"),
        ("latency.batch_size", latency.batch_size, "UInt16", "lower worker.max_batch_size"),
    )
    for name, number, column_type, hint in unsigned:
        if not 0 <= number <= _UINT_MAX[column_type]:
            return (f"{name} is {number}, outside the 0 to {_UINT_MAX[column_type]} of its ClickHouse column "
                    f"({column_type}): {hint}")  # fmt: skip
    for name, us in (("capture_time_us", result.capture_time_us), ("result_time_us", result.result_time_us)):
        if not _DATETIME64_MIN_US <= us <= _DATETIME64_MAX_US:
            return (f"{name} is {us}, not a time from 1900-01-01 to 2299-12-31 (what ClickHouse's DateTime64 holds): "
                    "it counts microseconds since 1970-01-01 UTC; check the device's clock and unit")  # fmt: skip
    if result.modality not in _MODALITY_SYMBOLS:
        symbols = ", ".join(_MODALITY_SYMBOLS)
        return f"modality {result.modality!r} is not one of the table's {symbols}: a migration must add it"
    floats = [(f"top_k[{i}].score", entry.score) for i, entry in enumerate(result.top_k)] + [
        ("latency.queue_ms", latency.queue_ms), ("latency.batch_wait_ms", latency.batch_wait_ms),
        ("latency.decode_ms", latency.decode_ms), ("latency.inference_ms", latency.inference_ms),
        ("prediction_entropy", result.prediction_entropy or 0.0),
    ] + [(f"input_stats[{name!r}]", value) for name, value in result.input_stats.items()] + [
        (f"{name}[{i}]", value) for name in ("probabilities", "embedding")
        for i, value in enumerate(getattr(result, name))
    ]  # fmt: skip
    for name, number in floats:
        if math.isfinite(number) and abs(number) > _FLOAT32_MAX:
            return f"{name} is {number}, beyond the ±3.4e38 of its ClickHouse column (Float32)"
    texts = [
        ("trace_id", result.trace_id), ("device_id", result.device_id), ("source_topic", result.source_topic),
        ("model_name", result.model_name), ("worker_id", result.worker_id), ("ground_truth", result.ground_truth or ""),
    ] + [(f"top_k[{i}].label", entry.label) for i, entry in enumerate(result.top_k)] + [
        (f"input_stats key {name!r}", name) for name in result.input_stats
    ]  # fmt: skip
    for name, text in texts:
        try:
            text.encode()
        except UnicodeEncodeError as exc:
            return f"{name} holds a lone surrogate ({text[exc.start]!r} at {exc.start}), which UTF-8 cannot encode"
    return None


# Server error codes that blame the inserted rows: the same rows fail the same way however often they are sent.
# Each was raised by the embedded engine (chDB 26.9) when an experiment inserted such a value:
_BAD_DATA_CODES = frozenset({
    6,  # CANNOT_PARSE_TEXT: a string where the column wants a number
    70,  # CANNOT_CONVERT_TYPE: a value the column's type cannot take exactly
    349,  # CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN
    469,  # VIOLATED_CONSTRAINT: a CHECK of the table (a migration may add one)
    691,  # UNKNOWN_ELEMENT_OF_ENUM
})  # fmt: skip
# Not 252 (TOO_MANY_PARTS): besides too many partitions in one insert (the sink stays under that limit) it
# means that merges lag behind inserts, which passes.


def rows_at_fault(exc: BaseException) -> bool:
    """Whether an insert failed because of rows it carried, so that retrying them cannot help; otherwise
    ClickHouse is at fault (unreachable, busy, the table missing) and a retry may succeed."""
    # The driver could not serialize a value into its column: clickhouse-connect raises DataError (the
    # struct.error or OverflowError of a number out of range is its cause), or the conversion's own error.
    if isinstance(exc, DataError | TypeError | ValueError | OverflowError | struct.error):
        return True
    return isinstance(exc, DatabaseError) and exc.code in _BAD_DATA_CODES
