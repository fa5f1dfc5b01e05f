"""Drift end to end on the real stack: `sluice simulate --drift-at` -> worker -> drift monitor -> a flagged row in
drift_events (through the sink) and a drift alert on the alerts topic; nothing flagged before the drift."""

from __future__ import annotations

import asyncio

import pytest

from schemas.records import DriftEvent
from streams.local import processes
from streams.local.harness import Components, _clickhouse_query, scoped, start_sluice
from streams.local.observer import OutputObserver
from streams.settings import SluiceSettings

DRIFT_AT_S = 20.0
SECONDS = 36.0


@pytest.mark.slow
def test_injected_drift_becomes_a_drift_event_row_and_an_alert(
    stack_settings: SluiceSettings, tmp_path_factory: pytest.TempPathFactory
) -> None:
    tmp = tmp_path_factory.mktemp("drift")
    settings = scoped(stack_settings, tmp, "drift")
    settings = settings.model_copy(update={
        "drift": settings.drift.model_copy(update={"window_s": 5.0, "lateness_s": 1.0, "group_by": "all"}),
        "simulator": settings.simulator.model_copy(update={"cameras": 4, "microphones": 2}),
    })  # fmt: skip
    components = Components(settings)
    try:
        components.wait_ready([components.launch(name, [name]) for name in ("worker", "sink", "drift")])

        async def simulate_and_watch() -> list[DriftEvent]:
            observer = OutputObserver(settings)
            await observer.start()
            try:
                simulator = start_sluice(settings, "simulator", ["simulate", "--seconds", str(SECONDS),
                                                                 "--drift-at", str(DRIFT_AT_S)])  # fmt: skip
                while simulator.alive():
                    await asyncio.sleep(0.5)
                assert simulator.returncode == 0, simulator.log_tail()
                assert await observer.wait_for(lambda o: any(a.rule.startswith("drift:") for a in o.alerts), 30)
                await asyncio.sleep(3)  # the sink flushes every second
                return observer.observed.drift_events, observer.observed.alerts, observer.observed.results
            finally:
                await observer.stop()

        events, alerts, results = asyncio.run(simulate_and_watch())
        sink = components.process("sink")
        assert processes.stop(sink, timeout_s=30)
        rows = _clickhouse_query(settings, f"SELECT statistic, drifted, window_end FROM "
                                           f"{settings.clickhouse.database}.drift_events FINAL")  # fmt: skip
    finally:
        components.stop_all()

    start_us = min(r.capture_time_us for r in results)
    drift_us = start_us + DRIFT_AT_S * 1e6
    flagged = [e for e in events if e.drifted]
    early = [(e.statistic, e.test, round((e.window_end_us - drift_us) / 1e6, 1), e.p_value) for e in flagged
             if e.window_end_us <= drift_us]  # fmt: skip
    assert flagged and not early, f"nothing flagged before the drift: {early}"
    assert min(e.window_end_us for e in flagged) <= drift_us + 2 * 5e6 + 1e6, "flagged within two windows"
    assert {"brightness"} <= {e.statistic for e in flagged}
    drift_alerts = [a for a in alerts if a.rule.startswith("drift:")]
    assert drift_alerts and all(a.severity in ("WARNING", "CRITICAL") and a.details["statistics"] for a in drift_alerts)
    assert len(rows) == len({(e.model_name, e.model_version, e.device_group, e.window_end_us, e.statistic, e.test)
                             for e in events}), "one row per verdict in drift_events"  # fmt: skip
    assert sum(1 for row in rows if row["drifted"]) == len(flagged)
