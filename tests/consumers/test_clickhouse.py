"""What the sink relies on, shown on the real embedded engine (chDB): the migrations
are idempotent, both deduplication mechanisms in the DDL work, `row_problem` refuses
exactly what the table cannot hold, and `rows_at_fault` tells bad rows from an outage."""

import dataclasses
import uuid
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client

from consumers.clickhouse import (
    RESULT_COLUMNS, apply_migrations, apply_retention, connect, result_partition, result_row, row_problem,
    rows_at_fault,
)  # fmt: skip
from consumers.settings import ClickHouseSettings
from schemas.records import InferenceResult
from tests.records import make_result

FIRST_US = -2_208_988_800_000_000  # 1900-01-01 00:00:00 UTC, the first time DateTime64 holds
LAST_US = 10_413_791_999_999_999  # 2299-12-31 23:59:59.999999 UTC, the last


@pytest.fixture
def database(chdb_dsn: str) -> tuple[Client, str]:
    client = connect(chdb_dsn)
    name = f"t_{uuid.uuid4().hex[:8]}"
    apply_migrations(client, ClickHouseSettings().migrations_dir, name)
    return client, name


def _count(client: Client, sql: str) -> int:
    return int(client.command(sql))


def test_migrations_are_recorded_and_not_reapplied(database: tuple[Client, str]) -> None:
    client, name = database
    assert apply_migrations(client, ClickHouseSettings().migrations_dir, name) == []
    tables = {row[0] for row in client.query(f"SHOW TABLES FROM {name}").result_rows}
    assert {"inference_results", "inference_results_dedup", "schema_migrations"} <= tables


def test_same_batch_with_same_token_is_inserted_once(database: tuple[Client, str]) -> None:
    client, name = database
    rows = [result_row(make_result(i)) for i in range(100)]
    for _ in range(2):  # a retry of an insert whose first attempt did land
        client.insert(f"{name}.inference_results", rows, column_names=RESULT_COLUMNS,
                      settings={"insert_deduplication_token": "frames:0:0-99"})  # fmt: skip
    assert _count(client, f"SELECT count() FROM {name}.inference_results") == 100


def test_rebatched_redelivery_is_collapsed_by_replacing_merge_tree(database: tuple[Client, str]) -> None:
    client, name = database
    table = f"{name}.inference_results"
    client.insert(table, [result_row(make_result(i)) for i in range(0, 60)], column_names=RESULT_COLUMNS,
                  settings={"insert_deduplication_token": "a"})  # fmt: skip
    # After a crash the sink re-reads 40..99 and batches it differently: a different token.
    client.insert(table, [result_row(make_result(i)) for i in range(40, 100)], column_names=RESULT_COLUMNS,
                  settings={"insert_deduplication_token": "b"})  # fmt: skip
    assert _count(client, f"SELECT count() FROM {table}") == 120, "both inserts landed"
    assert _count(client, f"SELECT count() FROM {table} FINAL") == 100
    assert _count(client, f"SELECT count() FROM {name}.inference_results_dedup") == 100
    client.command(f"OPTIMIZE TABLE {table} FINAL")
    assert _count(client, f"SELECT count() FROM {table}") == 100, "merges remove the duplicates for good"


def test_rows_keep_what_analysts_query(database: tuple[Client, str]) -> None:
    client, name = database
    client.insert(f"{name}.inference_results", [result_row(make_result(7, label="square"))], column_names=RESULT_COLUMNS)
    row = client.query(
        f"SELECT label, score, top_labels, ground_truth, toUnixTimestamp64Micro(capture_time), batch_size "
        f"FROM {name}.inference_results"
    ).result_rows[0]
    assert row[0] == "square" and row[2] == ["square", "triangle"] and row[3] == "circle"
    assert row[4] == 1_800_000_000_000_007 and row[5] == 4


def _changed(latency: dict[str, Any] | None = None, **changes: Any) -> InferenceResult:
    result = dataclasses.replace(make_result(1), **changes)
    result.latency = dataclasses.replace(result.latency, **(latency or {}))
    return result


@pytest.mark.parametrize(
    ("result", "named"),
    [
        (_changed(seq=-1), "seq is -1"),
        (_changed(source_partition=-1), "source_partition is -1"),
        (_changed(source_offset=-1), "source_offset is -1"),
        (_changed(model_version=-1), "model_version is -1"),
        (_changed(model_version=2**32), "model_version is 4294967296"),
        (_changed(latency={"batch_size": 65_536}), "latency.batch_size is 65536"),
        (_changed(latency={"batch_size": -1}), "latency.batch_size is -1"),
        (_changed(capture_time_us=FIRST_US - 1), "capture_time_us"),
        (_changed(result_time_us=LAST_US + 1), "result_time_us"),
        (_changed(capture_time_us=2**63 - 1), "capture_time_us"),
        (_changed(modality="VIDEO"), "modality 'VIDEO'"),
        (_changed(latency={"queue_ms": 1e39}), "latency.queue_ms"),
        (_changed(trace_id="t\ud800"), "trace_id"),
    ],
)
def test_row_problem_names_what_the_table_cannot_hold(result: InferenceResult, named: str) -> None:
    problem = row_problem(result)
    assert problem is not None and problem.startswith(named), problem


def test_the_edges_row_problem_allows_go_in_unchanged(database: tuple[Client, str]) -> None:
    client, name = database
    edges = [
        _changed(seq=0, source_partition=0, source_offset=0, model_version=0, capture_time_us=FIRST_US,
                 latency={"batch_size": 0}),
        _changed(source_offset=2, seq=2**63 - 1, source_partition=2**31 - 1, model_version=2**31 - 1,
                 capture_time_us=LAST_US, result_time_us=LAST_US,
                 latency={"batch_size": 65_535, "queue_ms": float("inf")}),
    ]  # fmt: skip
    assert [row_problem(result) for result in edges] == [None, None]
    client.insert(f"{name}.inference_results", [result_row(r) for r in edges], column_names=RESULT_COLUMNS)
    rows = client.query(
        f"SELECT seq, batch_size, toUnixTimestamp64Micro(capture_time), toUnixTimestamp64Micro(result_time), "
        f"toYYYYMMDD(capture_time) FROM {name}.inference_results ORDER BY source_offset"
    ).result_rows
    assert [row[:4] for row in rows] == [
        (0, 0, FIRST_US, edges[0].result_time_us), (2**63 - 1, 65_535, LAST_US, LAST_US),
    ]  # fmt: skip
    # The sink counts a batch's partitions by `result_partition`: the same days as the table's.
    assert [row[4] for row in rows] == [19000101, 22991231]
    assert result_partition(edges[1]) - result_partition(edges[0]) == 146_096  # days from 1900-01-01 to 2299-12-31


def _insert_error(client: Client, table: str, result: InferenceResult) -> Exception:
    with pytest.raises(Exception) as raised:
        client.insert(table, [result_row(result)], column_names=RESULT_COLUMNS)
    return raised.value


def test_rows_at_fault_tells_bad_rows_from_a_missing_table(database: tuple[Client, str]) -> None:
    client, name = database
    table = f"{name}.inference_results"
    # What row_problem refuses, the driver refuses too (were it let through): the row is at fault.
    assert rows_at_fault(_insert_error(client, table, _changed(seq=-1)))
    assert rows_at_fault(_insert_error(client, table, _changed(latency={"batch_size": 65_536})))
    assert rows_at_fault(_insert_error(client, table, _changed(latency={"queue_ms": 1e39})))
    assert rows_at_fault(_insert_error(client, table, _changed(device_id="cam-\udc80")))
    client.command(f"ALTER TABLE {table} ADD CONSTRAINT plausible_seq CHECK seq < 1000000000")
    assert rows_at_fault(_insert_error(client, table, _changed(seq=10**12)))
    # ClickHouse's fault, which passes: retried, not dead-lettered.
    assert not rows_at_fault(_insert_error(client, f"{name}.missing", make_result(1)))


def test_aggregates_fill_as_results_are_inserted(database: tuple[Client, str]) -> None:
    """The per-minute materialized views: volume, label mix and quantiles, and each input statistic by name."""
    client, name = database
    results = []
    for i in range(60):
        result = make_result(i, label="circle" if i % 3 else "square")
        result.input_stats = {"brightness": float(i), "contrast": 10.0}
        result.prediction_entropy = 0.5
        results.append(result)
    client.insert(f"{name}.inference_results", [result_row(r) for r in results], column_names=RESULT_COLUMNS)
    (row,) = client.query(
        f"SELECT sum(results), sumMap(label_counts), quantilesMerge(0.5, 0.9, 0.99)(entropy_quantiles) "
        f"FROM {name}.results_per_minute"
    ).result_rows
    assert row[0] == 60 and row[1] == {"circle": 40, "square": 20} and row[2][0] == pytest.approx(0.5)
    stats = dict(client.query(
        f"SELECT statistic, avgMerge(mean) FROM {name}.input_stats_per_minute GROUP BY statistic"
    ).result_rows)  # fmt: skip
    assert stats == {"brightness": pytest.approx(29.5), "contrast": pytest.approx(10.0)}


def test_retention_is_set_from_the_settings_and_set_again_only_when_it_changes(database: tuple[Client, str]) -> None:
    client, name = database

    def ttl(table: str) -> str:
        query = client.command(f"SELECT create_table_query FROM system.tables WHERE database = '{name}' AND name = '{table}'")
        return str(query).partition(" TTL ")[2].partition(" SETTINGS")[0]

    apply_retention(client, name, 30, 400)
    assert ttl("inference_results") == "toDateTime(inserted_at) + toIntervalDay(30)"
    assert ttl("shadow_results") == "toDateTime(inserted_at) + toIntervalDay(30)"
    assert ttl("results_per_minute") == "minute + toIntervalDay(400)"
    apply_retention(client, name, None, 400)
    assert ttl("inference_results") == "" and ttl("input_stats_per_minute") == "minute + toIntervalDay(400)"
