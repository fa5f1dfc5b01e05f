"""`sluice sink` with a switch that takes its ClickHouse table away: the sink process of the outage scenario
(`test_sink_faults.py`), started by the harness like any component (`python -m tests.integration.outage_sink
--ready-file F --outage-file O`, settings from the environment).

Why inside the sink process: the embedded engine (chDB) opens a data path in one process only, so no other
process can touch the sink's ClickHouse while it runs, and there is no server to stop. While the file
`--outage-file` exists, a thread of this process renames `inference_results` away (a second client on the
same engine, as tests/consumers/test_sink.py does); once the file is gone it renames the table back. Every
insert in between fails with UNKNOWN_TABLE, which the sink treats as ClickHouse being unavailable: it keeps
the rows, retries with backoff, stops polling at `sink.max_buffered_rows` and commits nothing until the
insert lands. The sink itself is the real one (`consumers.sink.run_sink`), unchanged."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import threading
from pathlib import Path

from consumers.clickhouse import connect
from consumers.sink import run_sink
from streams.settings import load_settings

log = logging.getLogger("outage")


def _switch(dsn: str, database: str, outage_file: Path, stopping: threading.Event) -> None:
    table, hidden = f"{database}.inference_results", f"{database}.inference_results_away"
    client = None
    away = False
    while not stopping.wait(0.1):
        wanted = outage_file.exists()
        if wanted == away:
            continue
        client = client or connect(dsn)
        if wanted:
            client.command(f"RENAME TABLE {table} TO {hidden}")
            log.warning("outage: %s renamed away", table)
        else:
            client.command(f"RENAME TABLE {hidden} TO {table}")
            log.warning("outage over: %s is back", table)
        away = wanted


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ready-file", type=Path, required=True)
    parser.add_argument("--outage-file", type=Path, required=True)
    args = parser.parse_args()
    settings = load_settings()
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    done = threading.Event()

    async def run() -> None:
        stopping = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stopping.set)

        def ready() -> None:
            args.ready_file.touch()
            ch = settings.clickhouse
            threading.Thread(target=_switch, args=(ch.dsn, ch.database, args.outage_file, done), daemon=True).start()

        await run_sink(settings.kafka, settings.sink, settings.clickhouse, stopping, ready, settings.metrics_host)

    try:
        asyncio.run(run())
    finally:
        done.set()


if __name__ == "__main__":
    main()
