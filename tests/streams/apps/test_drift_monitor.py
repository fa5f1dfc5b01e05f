"""The drift monitor's windows, fed results directly: stationary traffic raises no alarm over 3,600 windows at
the README's expected run time, and each kind of injected drift is flagged within two windows of its start."""

from __future__ import annotations

import numpy as np
import pytest

from schemas.records import InferenceResult
from streams.apps.drift import Reference, Window, detect_drift
from streams.apps.drift_monitor import ALL_DEVICES, DriftTracker, WindowVerdicts, _Rows
from streams.apps.settings import DriftSettings
from tests.records import make_result

WINDOW_US = 10_000_000
CLASSES = ["circle", "square", "triangle", "cross"]


class Traffic:
    """Results as a camera fleet's would be: probabilities around a per-class mean, input statistics around
    theirs, `per_window` results a window spread over `devices` devices."""

    def __init__(self, seed: int, per_window: int = 60, devices: int = 3) -> None:
        self.rng = np.random.default_rng(seed)
        self.per_window = per_window
        self.devices = devices
        self.offset = 0

    def window(self, index: int, *, darker: bool = False, new_class: bool = False) -> list[InferenceResult]:
        results = []
        for i in range(self.per_window):
            logits = self.rng.normal(0, 1, 5)
            logits[self.rng.integers(4)] += 4  # a confident frame of one of the four known classes
            logits[4] = 8 if new_class else -8  # a fifth output the reference never saw win
            probabilities = np.exp(logits) / np.exp(logits).sum()
            result = make_result(self.offset, device_id=f"cam-{i % self.devices}")
            result.capture_time_us = index * WINDOW_US + int((i + 0.5) * WINDOW_US / self.per_window)
            result.probabilities = probabilities.tolist()
            result.input_stats = {
                "brightness": float(self.rng.normal(60 if darker else 130, 12)),
                "contrast": float(self.rng.normal(40, 5)),
            }
            results.append(result)
            self.offset += 1
        return results


def _run(tracker: DriftTracker, windows: list[list[InferenceResult]]) -> list[WindowVerdicts]:
    found = []
    for window in windows:
        for result in window:
            found += tracker.add(result)
    return found


def _tracker(**settings: object) -> DriftTracker:
    return DriftTracker(DriftSettings(lateness_s=0.0, **settings), lambda name, version: None)


def test_stationary_traffic_raises_no_alarm_over_3600_windows() -> None:
    """The README's setting: windows of 10 s, an expected run time of 30 days (3.9e-6 false alarms a window)."""
    settings = DriftSettings()
    assert (settings.window_s, settings.expected_run_time_s) == (10.0, 30 * 24 * 3600.0)
    tracker = _tracker(group_by="all")
    traffic = Traffic(seed=1, per_window=40)
    found = _run(tracker, [traffic.window(i) for i in range(3600 + 4)])
    assert len(found) >= 3600, "every window past the reference is evaluated"
    assert [f for f in found if f.flagged] == []


@pytest.mark.parametrize("kind", ["darker", "new_class"])
def test_injected_drift_is_flagged_within_two_windows_of_its_start(kind: str) -> None:
    tracker = _tracker(group_by="both")
    traffic = Traffic(seed=2, per_window=120)  # 40 a device: each device's windows are evaluated too
    drift_from = 8
    windows = [traffic.window(i, **({kind: True} if i >= drift_from else {})) for i in range(drift_from + 4)]
    found = _run(tracker, windows)
    flagged = [f for f in found if f.flagged]
    assert flagged, f"{kind} was not flagged"
    assert min(f.start_us for f in flagged) // WINDOW_US <= drift_from + 1, "within two windows of the start"
    assert all(f.start_us >= drift_from * WINDOW_US for f in flagged), "nothing before the drift"
    statistics = {v.statistic for f in flagged for v in f.flagged}
    if kind == "darker":
        assert "brightness" in statistics and "contrast" not in statistics
    else:
        assert "label_mix" in statistics and any(s.startswith("probability") for s in statistics)
    assert {f.key.device_group for f in flagged} >= {ALL_DEVICES, "cam-0"}, "the fleet and each device"


def test_a_flagged_window_becomes_events_and_one_alert() -> None:
    tracker = _tracker(group_by="all")
    traffic = Traffic(seed=3)
    found = _run(tracker, [traffic.window(i, darker=i >= 5) for i in range(7)])
    window = next(f for f in found if f.flagged)
    events = window.events(detected_at_us=123)
    assert len(events) == len(window.verdicts) and {e.device_group for e in events} == {ALL_DEVICES}
    assert any(e.drifted and e.statistic == "brightness" for e in events)
    alert = window.alert(critical_at=3)
    assert alert is not None and alert.label == "brightness" and alert.score > 1
    assert alert.severity == "WARNING" and alert.details["statistics"] == "brightness"
    assert alert.alert_id == window.alert(critical_at=3).alert_id, "a window re-evaluated gives the same alert id"


def test_a_new_model_version_learns_its_own_reference() -> None:
    tracker = _tracker(group_by="all")
    traffic = Traffic(seed=4)
    windows = [traffic.window(i) for i in range(8)]
    for result in (r for w in windows[5:] for r in w):
        result.model_version = 2
    found = _run(tracker, windows)
    assert {f.key.model_version for f in found} == {1}, "v2 is still learning its reference"
    assert [f.start_us // WINDOW_US for f in found] == [3], "v1's windows after its reference, as long as it served"


class SceneTraffic(Traffic):
    """Like a camera's: each device shows one scene for `dwell` results on average (its brightness, its class),
    so consecutive results of a device are far from independent draws."""

    def __init__(self, seed: int, per_window: int = 80, devices: int = 4, dwell: float = 30) -> None:
        super().__init__(seed, per_window, devices)
        self.dwell = dwell
        self.scenes = [self._scene() for _ in range(devices)]

    def _scene(self) -> tuple[float, int]:
        return float(self.rng.normal(130, 25)), int(self.rng.integers(4))

    def window(self, index: int, *, darker: bool = False, new_class: bool = False) -> list[InferenceResult]:
        results = super().window(index, darker=darker, new_class=new_class)
        for i, result in enumerate(results):
            device = i % self.devices
            if self.rng.random() < 1 / self.dwell:
                self.scenes[device] = self._scene()
            level, label = self.scenes[device]
            result.input_stats["brightness"] = float(self.rng.normal(level * (0.45 if darker else 1), 3))
            logits = self.rng.normal(0, 1, 5)
            logits[label] += 4
            logits[4] = 8 if new_class else -8
            result.probabilities = (np.exp(logits) / np.exp(logits).sum()).tolist()
        return results


def test_correlated_scenes_raise_no_alarm_once_counted_as_the_draws_they_are() -> None:
    """A scene lasting ~30 results makes 80 results a window worth a few independent draws: counted as 80, the
    brightness and label-mix tests flag stationary traffic; with the design effect they do not, and darkening
    is still flagged within two windows."""
    tracker = _tracker(group_by="all", reference_windows=6)
    traffic = SceneTraffic(seed=5)
    found = _run(tracker, [traffic.window(i) for i in range(206)])
    assert len(found) >= 199 and [f for f in found if f.flagged] == []
    reference = next(iter(tracker._groups.values())).reference
    assert reference is not None and reference.effect("brightness") > 5, "the monitor saw the dependence"

    naive = Reference(reference.window, reference.config, reference.class_names)  # every result a draw
    current = SceneTraffic(seed=6)
    windows = [_window_of(current.window(i)) for i in range(200)]
    assert sum(any(v.drifted for v in detect_drift(naive, w)) for w in windows) > 0, "counted naively, it flags"

    windows_with_drift = [traffic.window(i, darker=i >= 12) for i in range(16)]
    darkening = _run(_tracker(group_by="all", reference_windows=6), windows_with_drift)
    flagged = [f for f in darkening if f.flagged]
    assert flagged and min(f.start_us for f in flagged) // WINDOW_US <= 13


def _window_of(results: list[InferenceResult]) -> Window:
    rows = _Rows()
    for result in results:
        rows.add(result)
    return rows.window()


def test_a_result_unlike_its_model_versions_is_skipped_not_fatal() -> None:
    tracker = _tracker(group_by="all")
    traffic = Traffic(seed=7)
    windows = [traffic.window(i) for i in range(6)]
    windows[1][0].probabilities = [0.5, 0.5]  # a foreign producer's result with two classes, in the reference
    windows[4][0].probabilities = [0.5, 0.5]
    found = _run(tracker, windows)
    assert [f.start_us // WINDOW_US for f in found] == [3, 4] and tracker.skipped == 2
