"""Every query of the analyst cookbook (docs/analytics.md) runs on the embedded engine, on generated results
that went through the same migrations and materialized views as the sink's, and answers."""

from __future__ import annotations

import uuid

import pytest
from clickhouse_connect.driver.client import Client

from consumers.clickhouse import apply_migrations, connect
from consumers.settings import ClickHouseSettings
from streams.local.cookbook import cookbook_queries, generate, run_cookbook

ROWS = 20_000


@pytest.fixture(scope="module")
def cookbook_database(chdb_dsn: str) -> tuple[Client, str]:
    client = connect(chdb_dsn)
    database = f"cookbook_{uuid.uuid4().hex[:8]}"
    apply_migrations(client, ClickHouseSettings().migrations_dir, database)
    generate(client, database, ROWS)
    return client, database


def test_the_cookbook_answers_at_least_ten_questions() -> None:
    queries = cookbook_queries()
    assert len(queries) >= 10
    assert len({q.title for q in queries}) == len(queries)


@pytest.mark.parametrize("query", cookbook_queries(), ids=lambda q: q.title.split(".")[0])
def test_each_cookbook_query_runs_and_answers(cookbook_database: tuple[Client, str], query) -> None:  # type: ignore[no-untyped-def]
    client, database = cookbook_database
    (timed,) = run_cookbook(client, database, [query])
    assert timed.rows > 0, f"{query.title}: no rows on {ROWS} generated results"


def test_shadow_disagreement_is_what_was_generated(cookbook_database: tuple[Client, str]) -> None:
    """Query 4 against a known answer: shadow labels differ on offsets divisible by 7 (of those by 100)."""
    client, database = cookbook_database
    query = next(q for q in cookbook_queries() if q.title.startswith("4."))
    rows = client.query(query.on(database)).result_rows
    compared = sum(row[3] for row in rows)
    disagreeing = sum(round(row[3] * row[4]) for row in rows)
    expected = sum(1 for offset in range(0, ROWS, 100) if offset % 7 == 0)
    assert compared == ROWS // 100 and disagreeing == expected
