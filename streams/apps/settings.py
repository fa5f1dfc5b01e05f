"""The notifier and drift monitor sections of the settings (`SLUICE_NOTIFIER__<KNOB>`, `SLUICE_DRIFT__<KNOB>`)."""

from __future__ import annotations

from pathlib import Path

from typing import Literal

from pydantic import BaseModel, Field, NonNegativeFloat, PositiveFloat, PositiveInt


class NotifierSettings(BaseModel):
    app_id: str = "sluice-notifier"
    rules_path: Path = Path(__file__).resolve().parent / "rules.toml"
    # Labels are a model's class names: a result with a longer one was not made by a Sluice worker
    # (a producer that bypasses the worker wrote it), and goes to the dead-letter topic unevaluated.
    max_label_chars: PositiveInt = 256
    metrics_port: int | None = Field(None, ge=0, le=65535)


class DriftSettings(BaseModel):
    """The drift monitor (`streams/apps/drift_monitor.py`, `streams/apps/drift.py`)."""

    app_id: str = "sluice-drift"
    # Tumbling windows of results by capture time; one evaluation per window and group.
    window_s: PositiveFloat = 10.0
    # The mean time between false alarms of one group's detector when nothing drifts. It sets every test's
    # threshold: a window's false-alarm probability is window_s / expected_run_time_s, shared by its tests
    # (Bonferroni). 30 days with 10 s windows: 3.9e-6 a window, one false alarm in 259,200 windows.
    expected_run_time_s: PositiveFloat = 30 * 24 * 3600.0
    stats_test: Literal["ks", "cvm"] = "ks"
    # The first windows of each group (per model version) with enough results make its reference.
    reference_windows: PositiveInt = 3
    min_window_results: PositiveInt = 30
    # Groups: the whole fleet ("all"), each device, or both. G groups raise a false alarm every ERT / G. A
    # device's window holds few independent draws (a camera shows a scene for ~3 s, so a 10 s window is
    # ~3 scenes): per-device groups need windows of minutes to be tested honestly, hence "all" by default.
    group_by: Literal["all", "device", "both"] = "all"
    # A window closes once results this much newer than its end have arrived.
    lateness_s: NonNegativeFloat = 2.0
    # An alert is CRITICAL when this many tests flag the same window, else WARNING.
    critical_tests: PositiveInt = 3
    metrics_port: int | None = Field(None, ge=0, le=65535)
