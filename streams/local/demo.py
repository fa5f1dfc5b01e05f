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
from rich.markup import escape
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

COMPONENTS = {"worker": ["worker"], "sink": ["sink"], "notifier": ["notifier"], "drift": ["drift"]}


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


async def _observe_run(
    settings: SluiceSettings, seconds: float, report_path: Path, drift_at: float | None
) -> dict[str, Any]:
    observer = OutputObserver(settings)
    await observer.start()
    admin = make_admin(settings.kafka, "demo-admin")
    await admin.start()
    groups = {settings.worker.group_id(m.name): m.input_topic(settings.kafka.topics) for m in MODALITIES.values()}
    lag_samples: list[tuple[float, int]] = []
    drift = ["--drift-at", str(drift_at)] if drift_at is not None else []
    simulator = start_sluice(
        settings, "simulator", ["simulate", "--seconds", str(seconds), "--report", str(report_path), *drift]
    )
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
        # Alerts trail results by the notifier's own hop, drift verdicts by a window's lateness: give them a
        # moment once results are complete.
        await asyncio.sleep(3.0 + settings.drift.lateness_s)
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


def run_demo(
    settings: SluiceSettings, seconds: float, json_path: Path | None, console: Console, drift_at: float | None = None
) -> dict[str, Any]:
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
        with console.status("starting worker, sink, notifier and drift monitor; waiting for them to join their groups"):
            components.wait_ready([components.launch(name, args) for name, args in COMPONENTS.items()])
        with console.status(f"simulating {settings.simulator.cameras} cameras at {settings.simulator.camera_fps:g} fps "
                            f"and {settings.simulator.microphones} microphones at {settings.simulator.chunks_per_s:g} "
                            f"chunks/s for {seconds:g}s"):
            run = asyncio.run(_observe_run(settings, seconds, base / "simulator-report.json", drift_at))
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
        "drift": _drift_summary(settings, observed, published),
    }
    summary["checks"] = {
        "every_input_has_one_distinct_result": unique == summary["inputs_published"] and run["drained"],
        "clickhouse_rows_match_inputs": rows == summary["inputs_published"],
        "frame_accuracy_at_least_0.95": (frame_accuracy or 0) >= 0.95,
        "audio_accuracy_at_least_0.95": (audio_accuracy or 0) >= 0.95,
        "e2e_p99_under_100ms": latency["p99"] < 100,
        "lag_not_growing": lag["growing"] is False,
        "no_drift_flagged_before_drift": summary["drift"]["flags_before_drift"] == 0,
    }
    if summary["drift"]["drift_at_s"] is not None:
        first = summary["drift"]["first_flag_after_drift_s"]
        # Flagged by the second window after the drift's start, closed once results a lateness newer arrive.
        summary["checks"]["drift_flagged_within_2_windows"] = first is not None and first <= 2 * (
            settings.drift.window_s + settings.drift.lateness_s) + settings.drift.window_s  # fmt: skip
    correctness = [k for k in summary["checks"] if k not in ("e2e_p99_under_100ms", "lag_not_growing")]
    summary["ok"] = all(summary["checks"][k] for k in correctness)
    return summary


def _drift_summary(settings: SluiceSettings, observed: Any, published: dict[str, Any]) -> dict[str, Any]:
    """What the drift monitor found, against when the simulator started drifting: its start is the first
    capture of the run plus the simulator's own drift offset."""
    events = observed.drift_events
    drift_at = published.get("drift_started_at_s")
    first_capture_us = min((r.capture_time_us for r in observed.results), default=0)
    drift_start_us = None if drift_at is None else first_capture_us + int(drift_at * 1e6)
    windows = {(e.model_name, e.model_version, e.device_group, e.window_end_us) for e in events}
    flagged = [e for e in events if e.drifted]
    before = {
        (e.device_group, e.window_end_us)
        for e in flagged
        if drift_start_us is None or e.window_end_us <= drift_start_us
    }
    after = [e for e in flagged if drift_start_us is not None and e.window_end_us > drift_start_us]
    first_after = min((e.detected_at_us for e in after), default=None)
    return {
        "window_s": settings.drift.window_s,
        "expected_run_time_s": settings.drift.expected_run_time_s,
        "drift_at_s": drift_at,
        "windows_evaluated": len(windows),
        "flags_before_drift": len(before),
        "flagged_before": sorted(
            {f"{e.device_group}:{e.statistic}" for e in flagged if (e.device_group, e.window_end_us) in before}
        ),
        "first_flag_after_drift_s": None if first_after is None else round((first_after - drift_start_us) / 1e6, 1),
        "statistics_flagged": sorted({e.statistic for e in after}),
        "groups_flagged": len({e.device_group for e in after}),
    }


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
    drift = summary["drift"]
    evaluated = f"{drift['windows_evaluated']} / {drift['flags_before_drift']}"
    table.add_row("drift windows evaluated / flagged before drift", evaluated)
    if drift["drift_at_s"] is not None:
        table.add_row("drift: first flag after its start (s), statistics",
                      escape(f"{drift['first_flag_after_drift_s']}, " + ", ".join(drift["statistics_flagged"])))  # fmt: skip
    console.print(table)
    for check, passed in summary["checks"].items():
        console.print(f"{'[green]PASS' if passed else '[red]FAIL'}[/] {check}")
