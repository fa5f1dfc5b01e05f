"""The analyst cookbook's queries (`docs/analytics.md`), on generated results: what the cookbook test runs,
and what `sluice bench cookbook --rows N` times.

The rows are generated inside ClickHouse (`INSERT ... SELECT FROM numbers(N)`), so ten million take seconds,
and go through the same materialized views as the sink's inserts: results over `days` days from `devices`
devices and three model versions, a shadow version on 1% of the inputs, and drift verdicts per hour.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from clickhouse_connect.driver.client import Client

from consumers.clickhouse import RESULT_COLUMNS, apply_migrations, connect
from consumers.settings import ClickHouseSettings

COOKBOOK = Path(__file__).resolve().parents[2] / "docs" / "analytics.md"
_QUERY = re.compile(r"^### (?P<title>.+?)\n\n```sql\n(?P<sql>.+?)\n```", re.MULTILINE | re.DOTALL)


@dataclass
class CookbookQuery:
    title: str
    sql: str  # as written in the cookbook, on the `sluice` database

    def on(self, database: str) -> str:
        return re.sub(r"\bsluice\.", f"{database}.", self.sql)


@dataclass
class Timed:
    title: str
    seconds: float
    rows: int


def cookbook_queries(path: Path = COOKBOOK) -> list[CookbookQuery]:
    return [CookbookQuery(m["title"], m["sql"]) for m in _QUERY.finditer(path.read_text())]


def generate(client: Client, database: str, rows: int, *, days: int = 7, devices: int = 200) -> None:
    """`rows` results ending now, and their shadow results and drift verdicts, in `database` (migrated)."""
    span_us = days * 86_400 * 10**6
    labels = "['circle', 'square', 'triangle', 'cross']"
    columns = ", ".join(RESULT_COLUMNS)
    client.command(f"""
        INSERT INTO {database}.inference_results ({columns})
        SELECT
            'sluice.frames', number % 8, number, hex(number), concat('cam-', toString(number % {devices})),
            'FRAME', intDiv(number, {devices}),
            now64(6) - toIntervalMicrosecond(intDiv(({rows} - number) * {span_us}, {rows})) AS capture_time,
            capture_time + toIntervalMillisecond(15 + number % 40),
            'frame_classifier', 1 + number % 3,
            arrayElement({labels}, 1 + number % 4), toFloat32(0.4 + (number % 60) / 100),
            [arrayElement({labels}, 1 + number % 4)], [toFloat32(0.4 + (number % 60) / 100)],
            if(number % 10 = 0, arrayElement({labels}, 1 + intDiv(number, 10) % 4), NULL),
            toFloat32(5 + number % 20), toFloat32(number % 10), toFloat32(0.1), toFloat32(1 + number % 3),
            toUInt16(1 + number % 16), concat('worker-', toString(number % 4)),
            map('brightness', toFloat32(90 + number % 60), 'contrast', toFloat32(30 + number % 20)),
            [toFloat32(0.7), toFloat32(0.1), toFloat32(0.1), toFloat32(0.1)], toFloat32(0.3 + (number % 10) / 10), []
        FROM numbers({rows})
    """)  # fmt: skip
    client.command(f"""
        INSERT INTO {database}.shadow_results ({columns})
        SELECT {columns.replace("label,", "if(source_offset % 7 = 0, 'cross', label) AS label,")}
        FROM {database}.inference_results WHERE source_offset % 100 = 0
    """)  # fmt: skip
    client.command(f"""
        INSERT INTO {database}.drift_events (window_start, window_end, device_group, modality, model_name,
            model_version, statistic, test, score, threshold, p_value, drifted, reference_size, current_size)
        SELECT now64(3) - toIntervalHour(number + 1), now64(3) - toIntervalHour(number),
            concat('cam-', toString(number % {devices})), 'FRAME', 'frame_classifier', 1 + number % 3,
            if(number % 2 = 0, 'brightness', 'p(circle)'), if(number % 2 = 0, 'cvm', 'ks'),
            0.1 + (number % 10) / 10, 0.8, NULL, 0.1 + (number % 10) / 10 > 0.8, 600, 600
        FROM numbers({days * 24})
    """)  # fmt: skip


def run_cookbook(client: Client, database: str, queries: list[CookbookQuery] | None = None) -> list[Timed]:
    """Each query once, timed; in ClickHouse's read-only mode, as an analyst's reads are."""
    timed = []
    for query in queries or cookbook_queries():
        started = time.perf_counter()
        result = client.query(query.on(database), settings={"readonly": 1})
        timed.append(Timed(query.title, time.perf_counter() - started, len(result.result_rows)))
    return timed


def bench_cookbook(rows: int, clickhouse: ClickHouseSettings) -> tuple[float, list[Timed]]:
    """Generate `rows` results in a fresh embedded engine of its own (a temporary directory), then time each
    cookbook query once. Returns the generation's seconds and the timings."""
    directory = Path(tempfile.mkdtemp(prefix="sluice-cookbook-"))
    try:
        client = connect(f"chdb://{directory.as_posix()}")
        database = f"cookbook_{uuid.uuid4().hex[:8]}"
        apply_migrations(client, clickhouse.migrations_dir, database)
        started = time.perf_counter()
        generate(client, database, rows)
        generated_s = time.perf_counter() - started
        timed = run_cookbook(client, database)
        client.close()
        return generated_s, timed
    finally:
        shutil.rmtree(directory, ignore_errors=True)
