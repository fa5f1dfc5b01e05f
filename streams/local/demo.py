"""`sluice demo`: the whole system on a fresh local stack, then a summary.

It starts the broker and Redis on free loopback ports, one worker process (both
modalities), the sink and the notifier, waits until each has joined its group,
runs the simulator at the default load for `seconds`, waits until every input
has a result, stops everything by PID (components first, gracefully, so the sink
flushes), then counts the ClickHouse rows and prints what it measured:

- counts: inputs published, results (all and distinct inputs), rows, alerts, dead letters;
- accuracy per modality against the simulator's ground truth;
- capture-to-result latency, as seen by a consumer of the results topic
  (an upper bound on "result on the topic": it includes that consumer's fetch);
- the worker groups' lag over the run, sampled every second, and whether it grows.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from consumers.clickhouse import RESULTS_TABLE, connect
from consumers.kafka import ensure_topics, make_admin
from schemas.topics import AUDIO, FRAME, MODALITIES
from streams.local import processes
from streams.local.harness import Components, isolated_settings, start_sluice
from streams.local.observer import OutputObserver, group_lag, latency_breakdown, percentiles
from streams.local.processes import ProcessError
from streams.local.stack import LocalStack
from streams.settings import SluiceSettings

COMPONENTS = {"worker": ["worker"], "sink": ["sink"], "notifier": ["notifier"]}


def _lag_trend(samples: list[tuple[float, int]]) -> dict[str, Any]:
    if len(samples) < 3:
        return {"samples": len(samples), "max": max((s[1] for s in samples), default=0), "growing": None}
    t = np.array([s[0] for s in samples])
    lag = np.array([s[1] for s in samples], dtype=float)
    slope = float(np.polyfit(t, lag, 1)[0])
    third = max(1, len(lag) // 3)
    first, last = float(lag[:third].mean()), float(lag[-third:].mean())
    # Growing: the backlog rises steadily through the run, not just jitters around the commit interval.
    growing = slope > 1.0 and last > 2 * first + 50
    return {
        "samples": len(samples),
        "max": int(lag.max()),
        "mean_first_third": round(first, 1),
        "mean_last_third": round(last, 1),
        "slope_per_s": round(slope, 3),
        "growing": growing,
    }


async def _observe_run(settings: SluiceSettings, seconds: float, report_path: Path) -> dict[str, Any]:
    observer = OutputObserver(settings)
    await observer.start()
    admin = make_admin(settings.kafka, "demo-admin")
    await admin.start()
    groups = {settings.worker.group_id(m.name): m.input_topic(settings.kafka.topics) for m in MODALITIES.values()}
    lag_samples: list[tuple[float, int]] = []
    simulator = start_sluice(settings, "simulator", ["simulate", "--seconds", str(seconds), "--report", str(report_path)])
    started = time.monotonic()
    try:
        while simulator.alive():
            lag = 0
            for group, topic in groups.items():
                lag += await group_lag(admin, observer, group, topic)
            lag_samples.append((time.monotonic() - started, lag))
            await asyncio.sleep(1.0)
        if simulator.returncode != 0 or not report_path.exists():
            raise ProcessError(f"simulator failed (exit {simulator.returncode}):\n{simulator.log_tail()}")
        published = json.loads(report_path.read_text())
        expected = published["inputs_published"]
        drained = await observer.wait_for(lambda o: len(o.unique_sources()) >= expected, timeout_s=60)
        # Alerts trail results by the notifier's own hop; give it a moment once results are complete.
        await asyncio.sleep(3.0)
    finally:
        processes.stop(simulator)  # stopped already unless something failed; this also drops its PID file
        await admin.close()
        await observer.stop()
    return {"published": published, "drained": drained, "observed": observer.observed, "lag_samples": lag_samples}


def _clickhouse_rows(settings: SluiceSettings) -> int:
    client = connect(settings.clickhouse.dsn)
    try:
        table = f"{settings.clickhouse.database}.{RESULTS_TABLE}"
        return int(client.command(f"SELECT count() FROM {table} FINAL"))
    finally:
        client.close()


def run_demo(settings: SluiceSettings, seconds: float, json_path: Path | None, console: Console) -> dict[str, Any]:
    base = settings.stack.run_dir.parent / "demo"
    shutil.rmtree(base, ignore_errors=True)
    settings = isolated_settings(settings, base)
    stack = LocalStack(settings)
    components = Components(settings)
    console.rule("[bold]Sluice demo")
    try:
        with console.status("starting the local stack"):
            stack.up()
            asyncio.run(ensure_topics(settings.kafka))
        console.print(f"broker {settings.kafka.bootstrap_servers}, redis {settings.redis.url}, "
                      f"clickhouse {settings.clickhouse.dsn}")
        with console.status("starting worker, sink and notifier; waiting for them to join their groups"):
            components.wait_ready([components.launch(name, args) for name, args in COMPONENTS.items()])
        with console.status(f"simulating {settings.simulator.cameras} cameras at {settings.simulator.camera_fps:g} fps "
                            f"and {settings.simulator.microphones} microphones at {settings.simulator.chunks_per_s:g} "
                            f"chunks/s for {seconds:g}s"):
            run = asyncio.run(_observe_run(settings, seconds, base / "simulator-report.json"))
        with console.status("stopping components (the sink flushes)"):
            graceful = components.stop_all(timeout_s=30)
        rows = _clickhouse_rows(settings)
    finally:
        components.stop_all()
        stack.down()

    summary = _summarise(settings, seconds, run, rows, graceful)
    _print(console, summary)
    if json_path is not None:
        json_path.write_text(json.dumps(summary, indent=2))
        console.print(f"summary written to {json_path}")
    return summary


def _summarise(
    settings: SluiceSettings, seconds: float, run: dict[str, Any], rows: int, graceful: dict[str, bool]
) -> dict[str, Any]:
    observed = run["observed"]
    published = run["published"]
    unique = len(observed.unique_sources())
    window = (observed.last_result_at or 0) - (observed.first_result_at or 0)
    frame_accuracy, audio_accuracy = observed.accuracy(FRAME.name), observed.accuracy(AUDIO.name)
    latency = percentiles(observed.e2e_ms)
    lag = _lag_trend(run["lag_samples"])
    sim = settings.simulator
    summary = {
        "inputs_published": published["inputs_published"],
        "frames_published": published["frames_published"],
        "audio_published": published["audio_published"],
        "results_received": len(observed.results),
        "results_unique_sources": unique,
        "clickhouse_rows": rows,
        "dead_letters": len(observed.dead_letters),
        "alerts": len(observed.alerts),
        "frame_accuracy": None if frame_accuracy is None else round(frame_accuracy, 4),
        "audio_accuracy": None if audio_accuracy is None else round(audio_accuracy, 4),
        "e2e_latency_ms": latency,
        "throughput_per_s": round(len(observed.results) / window, 1) if window > 0 else 0.0,
        "lag": lag,
        "worker_latency_ms": latency_breakdown(observed.results),
        "load": {
            "seconds": seconds,
            "cameras": sim.cameras, "camera_fps": sim.camera_fps,
            "microphones": sim.microphones, "chunks_per_s": sim.chunks_per_s,
            "max_batch_size": settings.worker.max_batch_size, "max_delay_ms": settings.worker.max_delay_ms,
        },  # fmt: skip
        "stopped_gracefully": graceful,
    }
    summary["checks"] = {
        "every_input_has_one_distinct_result": unique == summary["inputs_published"] and run["drained"],
        "clickhouse_rows_match_inputs": rows == summary["inputs_published"],
        "frame_accuracy_at_least_0.95": (frame_accuracy or 0) >= 0.95,
        "audio_accuracy_at_least_0.95": (audio_accuracy or 0) >= 0.95,
        "e2e_p99_under_100ms": latency["p99"] < 100,
        "lag_not_growing": lag["growing"] is False,
    }
    correctness = [k for k in summary["checks"] if k not in ("e2e_p99_under_100ms", "lag_not_growing")]
    summary["ok"] = all(summary["checks"][k] for k in correctness)
    return summary


def _print(console: Console, summary: dict[str, Any]) -> None:
    table = Table("measure", "value", title="Sluice demo summary")
    for key in ("inputs_published", "results_received", "results_unique_sources", "clickhouse_rows", "dead_letters",
                "alerts", "frame_accuracy", "audio_accuracy", "throughput_per_s"):  # fmt: skip
        table.add_row(key, str(summary[key]))
    e2e = summary["e2e_latency_ms"]
    table.add_row("e2e latency ms (p50 / p95 / p99 / max)", f"{e2e['p50']} / {e2e['p95']} / {e2e['p99']} / {e2e['max']}")
    lag = summary["lag"]
    table.add_row("worker lag (max, slope/s, growing)", f"{lag['max']}, {lag.get('slope_per_s')}, {lag['growing']}")
    for stage, values in summary["worker_latency_ms"].items():
        table.add_row(f"  worker {stage} (p50 / p99)", f"{values['p50']} / {values['p99']}")
    console.print(table)
    for check, passed in summary["checks"].items():
        console.print(f"{'[green]PASS' if passed else '[red]FAIL'}[/] {check}")
