"""ClickHouse access for the sink: client, migrations, and the result row layout.

The DSN decides the backend: `chdb:///path` is the embedded engine (one engine
per process, one process per data directory, so only the sink process opens
it), `http(s)://user:pass@host:8123` a server. The DDL is the same for both.
"""

from __future__ import annotations

import hashlib
import logging
import re
from datetime import UTC, datetime
from pathlib import Path
from string import Template
from typing import Any

import clickhouse_connect
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError as DriverError

from schemas.errors import ConfigError, SluiceError, redact_url
from schemas.records import InferenceResult

log = logging.getLogger(__name__)

RESULTS_TABLE = "inference_results"

RESULT_COLUMNS = (
    "source_topic", "source_partition", "source_offset", "trace_id", "device_id", "modality", "seq",
    "capture_time", "result_time", "model_name", "model_version", "label", "score", "top_labels", "top_scores",
    "ground_truth", "queue_ms", "batch_wait_ms", "decode_ms", "inference_ms", "batch_size", "worker_id",
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


def _utc(us: int) -> datetime:
    return datetime.fromtimestamp(us / 1e6, tz=UTC)


def result_row(result: InferenceResult) -> list[Any]:
    """One result as a row in RESULT_COLUMNS order."""
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
        _utc(result.capture_time_us),
        _utc(result.result_time_us),
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
    ]
