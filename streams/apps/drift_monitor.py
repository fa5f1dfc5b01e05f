"""The drift monitor: results in, windows per model version and device group, verdicts and alerts out.

Why a stream app rather than scheduled SQL over the aggregates: the verdict is wanted within a window of
the drift's start, the tests need every result's values (a Kolmogorov-Smirnov test on the quantiles the
aggregates keep would be an approximation of an approximation), and the embedded ClickHouse has one
reader-writer process, the sink. So the monitor reads the results topic like the notifier (Faust), and
publishes what it finds: every verdict as a `DriftEvent` on the drift events topic (the sink stores them
in `drift_events`), and a flagged window as an `Alert` on the alerts topic, beside the rules' alerts.

Windows (`DriftTracker`, pure, tested without Kafka): tumbling, `window_s` long, by capture time, per
(model name, model version, modality) and per device group (each device, and "all" of them). A window
closes when the newest capture time seen for its model passes its end by `lateness_s`. The first
`reference_windows` windows of a group with at least `min_window_results` results are pooled into its
reference; every later window is tested against it (`streams/apps/drift.py`, thresholds from the
expected run time), each test counting its results as the independent draws they amount to
(`design_effects`: a camera's frames are correlated for as long as a scene lasts). A new model version
starts its own references: its outputs differ by design. The
windows live in memory: after a restart the monitor learns its references again, so for the first
`reference_windows` windows nothing is evaluated.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faust
import numpy as np
from prometheus_client import CollectorRegistry, Counter

from consumers.kafka import KafkaSettings
from consumers.metrics import Health, serve_metrics
from engines import ModelNotFound, ModelRepository
from schemas.codec import SchemaError
from schemas.records import Alert, DriftEvent, InferenceResult, alert_id, now_us
from schemas.registry import SchemaRegistrySettings, codec_for
from streams.apps.drift import LABEL_MIX, PROBABILITY, DriftConfig, DriftVerdict, Reference, Window, detect_drift
from streams.apps.notifier import stateless_app
from streams.apps.settings import DriftSettings

log = logging.getLogger(__name__)

ALL_DEVICES = "all"


@dataclass(frozen=True, slots=True)
class GroupKey:
    model_name: str
    model_version: int
    modality: str
    device_group: str  # a device id, or ALL_DEVICES


@dataclass
class _Rows:
    """The results of one group in one window, as columns."""

    probabilities: list[list[float]] = field(default_factory=list)
    stats: list[dict[str, float]] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)
    captured_us: list[int] = field(default_factory=list)
    last: InferenceResult | None = None  # the latest result: what an alert points at

    def add(self, result: InferenceResult) -> None:
        self.probabilities.append(result.probabilities)
        self.stats.append(result.input_stats)
        self.devices.append(result.device_id)
        self.captured_us.append(result.capture_time_us)
        self.last = result

    def extend(self, other: _Rows) -> None:
        self.probabilities += other.probabilities
        self.stats += other.stats
        self.devices += other.devices
        self.captured_us += other.captured_us

    def window(self) -> Window:
        classes = {len(p) for p in self.probabilities}
        if len(classes) > 1:
            raise ValueError(f"results of one model version with {sorted(classes)} classes")
        probabilities = np.asarray(self.probabilities, dtype=np.float64)
        names = set.intersection(*(set(s) for s in self.stats)) if self.stats else set()
        stats = {name: np.array([s[name] for s in self.stats], dtype=np.float64) for name in sorted(names)}
        return Window(probabilities, probabilities.argmax(axis=1), stats)


@dataclass
class WindowVerdicts:
    """What one evaluated window found."""

    key: GroupKey
    start_us: int
    end_us: int
    reference_size: int
    current_size: int
    verdicts: list[DriftVerdict]
    last: InferenceResult

    @property
    def flagged(self) -> list[DriftVerdict]:
        return [v for v in self.verdicts if v.drifted]

    def events(self, detected_at_us: int) -> list[DriftEvent]:
        key = self.key
        return [
            DriftEvent(
                window_start_us=self.start_us, window_end_us=self.end_us, device_group=key.device_group,
                modality=key.modality, model_name=key.model_name, model_version=key.model_version,
                statistic=v.statistic, test=v.test, score=v.score, threshold=v.threshold, p_value=v.p_value,
                drifted=v.drifted, reference_size=self.reference_size, current_size=self.current_size,
                detected_at_us=detected_at_us,
            )  # fmt: skip
            for v in self.verdicts
        ]

    def alert(self, critical_at: int) -> Alert | None:
        """One alert for a flagged window: the test furthest over its threshold names it; CRITICAL when
        `critical_at` tests or more flag the same window."""
        flagged = self.flagged
        if not flagged:
            return None
        worst = max(flagged, key=lambda v: v.score / v.threshold if v.threshold else float("inf"))
        last, key = self.last, self.key
        rule = f"drift:{key.model_name}"
        return Alert(
            alert_id=alert_id(f"{rule}:{key.device_group}:{self.end_us}", last.source), rule=rule,
            device_id=key.device_group, modality=key.modality, label=worst.statistic,
            score=float(worst.score / worst.threshold) if worst.threshold else float(worst.score),
            trace_id=last.trace_id, capture_time_us=last.capture_time_us, source_topic=last.source_topic,
            source_partition=last.source_partition, source_offset=last.source_offset, cooldown_s=0.0,
            alert_time_us=now_us(), severity="CRITICAL" if len(flagged) >= critical_at else "WARNING",
            details={
                "statistics": ",".join(sorted({v.statistic for v in flagged})), "test": worst.test,
                "threshold": f"{worst.threshold:.4g}", "window_start_us": str(self.start_us),
                "window_end_us": str(self.end_us), "device_group": key.device_group,
                "model_version": str(key.model_version),
            },
        )  # fmt: skip


@dataclass
class _Group:
    reference_rows: _Rows = field(default_factory=_Rows)
    reference_windows: int = 0
    reference: Reference | None = None


class DriftTracker:
    """Windows of results per group, closed by capture time, evaluated against each group's reference."""

    def __init__(self, settings: DriftSettings, class_names: Callable[[str, int], list[str] | None]) -> None:
        self.settings = settings
        self.config = DriftConfig(
            window_s=settings.window_s, expected_run_time_s=settings.expected_run_time_s,
            stats_test=settings.stats_test,
        )  # fmt: skip
        self._window_us = int(settings.window_s * 1e6)
        self._lateness_us = int(settings.lateness_s * 1e6)
        self._class_names = class_names
        self._open: dict[tuple[str, int, str], dict[int, dict[GroupKey, _Rows]]] = defaultdict(dict)
        self._newest: dict[tuple[str, int, str], int] = {}
        self._groups: dict[GroupKey, _Group] = defaultdict(_Group)
        self._classes: dict[tuple[str, int, str], int] = {}  # each model version's class count, as first seen
        self.skipped = 0  # results without a probability vector of their model's length: nothing to compare

    def add(self, result: InferenceResult) -> list[WindowVerdicts]:
        """Take one result; return the verdicts of the windows it closed."""
        if not result.probabilities:
            self.skipped += 1
            return []
        model = (result.model_name, result.model_version, result.modality)
        if self._classes.setdefault(model, len(result.probabilities)) != len(result.probabilities):
            self.skipped += 1  # not this model version's output (a foreign producer): it would spoil the windows
            return []
        index = result.capture_time_us // self._window_us
        windows = self._open[model]
        if index in windows or self._newest.get(model, -1) - self._lateness_us < (index + 1) * self._window_us:
            rows = windows.setdefault(index, {})
            for group in self._group_names(result.device_id):
                rows.setdefault(GroupKey(*model, group), _Rows()).add(result)
        # A result later than its window's close is dropped from the windows (it has its result and row).
        self._newest[model] = max(self._newest.get(model, result.capture_time_us), result.capture_time_us)
        return self._close(model)

    def _group_names(self, device_id: str) -> list[str]:
        return {"all": [ALL_DEVICES], "device": [device_id], "both": [ALL_DEVICES, device_id]}[self.settings.group_by]

    def _close(self, model: tuple[str, int, str]) -> list[WindowVerdicts]:
        watermark = self._newest[model] - self._lateness_us
        windows = self._open[model]
        found = []
        for index in sorted(i for i in windows if (i + 1) * self._window_us <= watermark):
            for key, rows in windows.pop(index).items():
                try:
                    found += self._evaluate(key, rows, index * self._window_us, (index + 1) * self._window_us)
                except ValueError as exc:  # results unlike their window's (another class count): that window only
                    log.warning("drift window of %s not evaluated: %s", key, exc)
        return found

    def _evaluate(self, key: GroupKey, rows: _Rows, start_us: int, end_us: int) -> list[WindowVerdicts]:
        if len(rows.probabilities) < self.settings.min_window_results:
            return []
        group = self._groups[key]
        if group.reference is None:
            group.reference_rows.extend(rows)
            group.reference_windows += 1
            if group.reference_windows >= self.settings.reference_windows:
                names = self._class_names(key.model_name, key.model_version)
                window = group.reference_rows.window()
                if names is not None and len(names) != window.probabilities.shape[1]:
                    names = None
                names = names or [str(c) for c in range(window.probabilities.shape[1])]
                effects = design_effects(group.reference_rows, window, names)
                group.reference = Reference(window, self.config, names, effects)
                group.reference_rows = _Rows()
                log.info("drift reference for %s: %d results, design effects %s", key, len(window),
                         {k: round(v, 1) for k, v in effects.items()})  # fmt: skip
            return []
        current = rows.window()
        if set(current.stats) != set(group.reference.window.stats):  # a statistic came or went: compare the rest
            current = Window(current.probabilities, current.labels,
                             {n: v for n, v in current.stats.items() if n in group.reference.window.stats})  # fmt: skip
            if set(current.stats) != set(group.reference.window.stats):
                return []
        verdicts = detect_drift(group.reference, current)
        assert rows.last is not None
        return [WindowVerdicts(key, start_us, end_us, len(group.reference.window), len(current), verdicts, rows.last)]


def design_effects(rows: _Rows, window: Window, class_names: list[str]) -> dict[str, float]:
    """Per statistic, how many consecutive results of one device carry the information of one independent
    draw: 1 + 2 * (the sum of the autocorrelations of its sequence, lag by lag, up to the first that is not
    positive: Geyer's initial positive sequence), the median over devices. A camera shows one scene for many
    frames, so its results are far from independent, and a two-sample test that counted each as a draw
    would flag stationary traffic; `Reference` has each test count n / effect. Devices are independent of
    one another, so a fleet window's effect is its devices'."""
    order = np.lexsort((np.asarray(rows.captured_us), np.asarray(rows.devices)))
    devices = np.asarray(rows.devices)[order]
    starts = np.flatnonzero(np.r_[True, devices[1:] != devices[:-1]])
    sequences = [order[a:b] for a, b in zip(starts, np.r_[starts[1:], len(order)], strict=True)]
    columns = {f"{PROBABILITY}[{name}]": window.probabilities[:, c] for c, name in enumerate(class_names)}
    columns.update(window.stats)
    one_hot = np.eye(window.probabilities.shape[1])[window.labels]
    effects = {name: _median_effect(values, sequences) for name, values in columns.items()}
    effects[LABEL_MIX] = max(_median_effect(one_hot[:, c], sequences) for c in range(one_hot.shape[1]))
    return effects


def _median_effect(values: np.ndarray, sequences: list[np.ndarray]) -> float:
    found = [effect for seq in sequences if len(seq) >= 8 and (effect := _integrated_effect(values[seq])) is not None]
    return float(np.median(found)) if found else 1.0


def _integrated_effect(series: np.ndarray) -> float | None:
    centred = series - series.mean()
    variance = float(centred @ centred)
    if variance == 0:
        return None
    n = len(series)
    spectrum = np.fft.rfft(centred, 2 * n)
    autocorrelation = np.fft.irfft(spectrum * np.conj(spectrum))[: n // 2] / variance
    total = 0.0
    for rho in autocorrelation[1:]:
        if rho <= 0:
            break
        total += rho
    return 1.0 + 2.0 * total


class DriftMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.windows = Counter("sluice_drift_windows", "Windows evaluated against their reference",
                               ["model", "device_group_kind"], registry=registry)  # fmt: skip
        self.flags = Counter(
            "sluice_drift_flags", "Tests that flagged drift", ["model", "statistic"], registry=registry
        )


def repository_labels(root: Path) -> Callable[[str, int], list[str] | None]:
    """A model version's class names from the repository, when the monitor can see it."""
    repository = ModelRepository(root)
    cache: dict[tuple[str, int], list[str] | None] = {}

    def labels(name: str, version: int) -> list[str] | None:
        if (name, version) not in cache:
            try:
                cache[(name, version)] = repository.resolve(name, version).labels
            except ModelNotFound:
                cache[(name, version)] = None
        return cache[(name, version)]

    return labels


def create_drift_app(
    kafka: KafkaSettings,
    settings: DriftSettings,
    model_repository: Path,
    metrics_host: str = "127.0.0.1",
    on_ready: Callable[[], None] | None = None,
    schema_registry: SchemaRegistrySettings | None = None,
) -> faust.App:
    topics = kafka.topics
    registry = CollectorRegistry()
    metrics = DriftMetrics(registry)
    health = Health()
    mark_ready = health.ready_then(on_ready)
    tracker = DriftTracker(settings, repository_labels(model_repository))
    codec = codec_for(schema_registry)
    app = stateless_app(settings.app_id, kafka, role="drift")
    results_topic = app.topic(topics.results, value_type=bytes, key_type=bytes)
    events_topic = app.topic(topics.drift_events, value_type=bytes, key_type=bytes)
    alerts_topic = app.topic(topics.alerts, value_type=bytes, key_type=bytes)
    stopping = asyncio.Event()

    @app.on_partitions_assigned.connect
    async def joined(sender: faust.App, assigned: set, **kwargs: Any) -> None:
        log.info("drift monitor assigned %d partitions", len(assigned))
        mark_ready()

    @app.on_before_shutdown.connect
    async def shutting_down(sender: faust.App, **kwargs: Any) -> None:
        stopping.set()

    @app.agent(results_topic)
    async def monitor(stream: faust.StreamT) -> None:
        async for value in stream:
            try:
                result = codec.read(value, InferenceResult)
            except SchemaError as exc:  # not a result: the sink dead-letters it; nothing to compare here
                log.debug("skipping a message that is not a result: %s", exc)
                continue
            for found in tracker.add(result):
                await _publish(found)

    async def _publish(found: WindowVerdicts) -> None:
        key = found.key
        kind = "fleet" if key.device_group == "all" else "device"
        metrics.windows.labels(key.model_name, kind).inc()
        detected_at = now_us()
        for event in found.events(detected_at):
            await events_topic.send(key=key.device_group.encode(), value=codec.write(event, topic=topics.drift_events))
        alert = found.alert(settings.critical_tests)
        if alert is not None:
            for verdict in found.flagged:
                metrics.flags.labels(key.model_name, verdict.statistic).inc()
            log.warning("drift: %s v%d, %s, window ending %s: %s", key.model_name, key.model_version,
                        key.device_group, time.strftime("%H:%M:%S", time.gmtime(found.end_us / 1e6)),
                        alert.details["statistics"])  # fmt: skip
            await alerts_topic.send(key=alert.device_id.encode(), value=codec.write(alert, topic=topics.alerts))

    @app.task
    async def expose_metrics() -> None:
        serve_metrics(registry, metrics_host, settings.metrics_port, health)
        await health.keep_beating(stopping)

    return app
