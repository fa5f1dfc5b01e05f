"""What the sink relies on, shown on the real embedded engine (chDB): the migrations
are idempotent, and both deduplication mechanisms in the DDL work."""

import uuid

import pytest
from clickhouse_connect.driver.client import Client

from consumers.clickhouse import RESULT_COLUMNS, apply_migrations, connect, result_row
from consumers.settings import ClickHouseSettings
from tests.records import make_result


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
