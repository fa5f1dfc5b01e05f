"""What the fault-injection scenarios share beyond the harness (`streams/local/harness.py`): the run's counts,
printed and checked the same way in each, and the end of a run (drain, stop the sink, count ClickHouse)."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field

from schemas.records import Source
from streams.local import processes
from streams.local.harness import ClickHouseCounts, Components, Published, clickhouse_counts, wait_for_lag
from streams.local.observer import Observed, OutputObserver
from streams.settings import SluiceSettings


@dataclass
class Counts:
    """What one scenario printed and asserted on."""

    scenario: str
    published: int  # inputs the broker acknowledged
    refused: int  # sends that failed (not acknowledged, so not owed a result)
    results: int  # results read from the results topic, duplicates included
    distinct_results: int  # distinct input coordinates among them
    duplicates: int
    dead_letters: int
    missing: int  # acknowledged inputs without a result
    clickhouse_raw: int
    clickhouse_dedup: int  # rows of inference_results_dedup (FINAL)
    clickhouse_duplicates: int  # raw rows beyond one per input
    seconds: float
    extra: dict = field(default_factory=dict)

    def print(self) -> None:
        print(f"\n[{self.scenario}] " + json.dumps({k: v for k, v in asdict(self).items() if k != "scenario"}))


def counts(
    scenario: str, published: Published, observed: Observed, clickhouse: ClickHouseCounts, started: float, **extra: object
) -> Counts:  # fmt: skip
    sources = observed.sources()
    distinct = set(sources)
    return Counts(
        scenario=scenario,
        published=len(published.sources),
        refused=published.refused,
        results=len(sources),
        distinct_results=len(distinct),
        duplicates=len(sources) - len(distinct),
        dead_letters=len(observed.dead_letters),
        missing=len(published.sources - distinct),
        clickhouse_raw=clickhouse.raw,
        clickhouse_dedup=clickhouse.view,
        clickhouse_duplicates=clickhouse.duplicates,
        seconds=round(time.monotonic() - started, 1),
        extra=extra,
    )


async def until_every_input_has_a_result(
    observer: OutputObserver, published: Published, timeout_s: float, settle_s: float = 2.0
) -> set[Source]:
    """Wait until every acknowledged input has a result (then `settle_s` more, for late duplicates); return the
    acknowledged inputs still without one."""
    await observer.wait_for(lambda o: published.sources <= o.unique_sources(), timeout_s)
    await asyncio.sleep(settle_s)
    return published.sources - observer.observed.unique_sources()


async def sink_caught_up(settings: SluiceSettings, observed: Observed, timeout_s: float = 60) -> int:
    """Wait until the sink's group has committed every result read so far; return its lag (0 when it has)."""
    ends = observed.topic_ends(settings.kafka.topics.results)
    return await wait_for_lag(settings, settings.sink.group_id, ends, timeout_s)


def stop_sink_and_count(settings: SluiceSettings, components: Components, name: str = "sink") -> ClickHouseCounts:
    """Stop the sink (it flushes on SIGTERM), then read ClickHouse: the embedded engine is one process's."""
    assert processes.stop(components.process(name), timeout_s=30), "the sink stops gracefully"
    return clickhouse_counts(settings)
