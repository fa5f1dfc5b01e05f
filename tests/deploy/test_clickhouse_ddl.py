"""The ClickHouse panels of the Grafana dashboards query tables and columns the
migrations (deploy/clickhouse/migrations) create."""

from __future__ import annotations

import pytest

from tests.deploy.readers import (
    CLICKHOUSE_DATABASE,
    CLICKHOUSE_TABLES,
    TABLE_REF_RE,
    clickhouse_queries,
    migration_columns,
    sql_columns,
)


def test_sql_column_extraction() -> None:
    sql = "SELECT $__timeInterval(ts) AS time, model, count() / $__interval_s AS n FROM sluice.t WHERE $__timeFilter(ts) AND label = 'x y' GROUP BY time, model"
    assert sql_columns(sql) == {"ts", "model", "label"}


def test_clickhouse_panels_query_sluice_tables() -> None:
    queries = clickhouse_queries()
    assert queries, "the dashboard should have a ClickHouse panel"
    for where, sql in queries:
        refs = set(TABLE_REF_RE.findall(sql))
        assert refs, f"{where}: name the table with its database"
        for db, table in refs:
            assert db == CLICKHOUSE_DATABASE and table in CLICKHOUSE_TABLES, f"{where}: unexpected table {db}.{table}"


def test_clickhouse_panel_columns_exist_in_migrations() -> None:
    tables = migration_columns()
    used = {col for _, sql in clickhouse_queries() for col in sql_columns(sql)}
    if not tables:
        pytest.skip(f"no ClickHouse migrations yet; the dashboard assumes columns {sorted(used)}")
    for where, sql in clickhouse_queries():
        for _, table in TABLE_REF_RE.findall(sql):
            assert table in tables, f"{where}: the migrations create no table {table}"
            columns = tables[table] or tables.get("inference_results", set())
            missing = sql_columns(sql) - columns
            assert not missing, f"{where}: columns {sorted(missing)} are not in {table} ({sorted(columns)})"
