"""Drift detection on synthetic traffic: false alarms at or below the rate the expected run time sets, each
kind of drift flagged, the thresholds derived as the module says; then the simulator's own drift, through
the input statistics and the bundled models."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import pytest
from scipy import stats

from consumers.input_stats import audio_stats, frame_stats
from engines.onnxruntime import OnnxRuntimeEngine
from engines.repository import ModelRepository
from engines.settings import EngineSettings
from producers.settings import SimulatorSettings
from producers.synth import AUDIO_LABELS, FRAME_LABELS, SAMPLE_RATE, audio_dataset, frame_dataset
from streams.apps.drift import (
    EMBEDDING_CENTROID,
    LABEL_MIX,
    DriftConfig,
    DriftVerdict,
    Reference,
    Window,
    _weighted_chi_square_quantile,
    detect_drift,
)

WEEK_S = 7 * 24 * 3600.0
README = DriftConfig(window_s=60.0, expected_run_time_s=WEEK_S)  # what the module docstring works through
CLASSES = ("circle", "square", "triangle", "cross")
SHARES = (0.4, 0.3, 0.2, 0.1)
DIMENSIONS = 16


def _traffic(
    rng: np.random.Generator,
    windows: int,
    size: int,
    shares: Sequence[float] = SHARES,
    brightness_shift: float = 0.0,
    rotation_deg: float = 0.0,
) -> list[Window]:
    """`windows` windows of `size` results from a model that sees one of four classes per input: drawn all
    at once, then cut. Probabilities are a softmax of noisy logits, 5 higher for the true class; input
    statistics are a continuous one, a skewed one and a nearly always zero (tied) one; embeddings have a
    clear mean direction, a class-dependent part and a spread that differs by direction."""
    n = windows * size
    truth = rng.choice(len(CLASSES), size=n, p=shares)
    logits = rng.normal(size=(n, len(CLASSES)))
    logits[np.arange(n), truth] += 5.0
    probabilities = np.exp(logits)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    embeddings = rng.normal(size=(n, DIMENSIONS)) * np.geomspace(0.3, 1.5, DIMENSIONS)
    embeddings[:, 0] += 3.0
    embeddings[np.arange(n), 1 + truth] += 0.5
    angle = math.radians(rotation_deg)
    turn = np.array([[math.cos(angle), math.sin(angle)], [-math.sin(angle), math.cos(angle)]])
    embeddings[:, :2] = embeddings[:, :2] @ turn
    columns = {
        "brightness": rng.normal(120.0 + brightness_shift, 25.0, n),
        "sharpness": rng.lognormal(5.0, 0.5, n),
        "clipping_ratio": np.where(rng.random(n) < 0.05, rng.poisson(3.0, n), 0) / 4000,
    }
    probabilities, embeddings = probabilities.astype(np.float32), embeddings.astype(np.float32)
    return [
        Window(
            probabilities[rows],
            probabilities[rows].argmax(axis=1),
            {name: values[rows].astype(np.float32) for name, values in columns.items()},
            embeddings[rows],
        )
        for rows in (slice(i * size, (i + 1) * size) for i in range(windows))
    ]


def _flagged(verdicts: Iterable[DriftVerdict]) -> set[str]:
    return {v.statistic for v in verdicts if v.drifted}


def _reference(config: DriftConfig, seed: int = 1, size: int = 3000) -> Reference:
    (window,) = _traffic(np.random.default_rng(seed), 1, size)
    return Reference(window, config, class_names=CLASSES)


# (c) The thresholds follow from the expected run time as the module docstring says


def test_the_window_false_alarm_rate_is_the_window_over_the_expected_run_time() -> None:
    assert README.alpha_window == pytest.approx(60 / 604_800)
    assert 1 / README.alpha_window == pytest.approx(10_080)  # windows between false alarms
    assert DriftConfig(window_s=30.0, expected_run_time_s=3600.0).alpha_window == pytest.approx(1 / 120)


def test_each_test_gets_the_window_rate_over_the_number_of_tests() -> None:
    # The docstring's frame model: 4 classes, 4 input statistics, no embedding: 9 tests.
    (window,) = _traffic(np.random.default_rng(0), 1, 500)
    frame_like = Window(
        window.probabilities, window.labels, {**window.stats, "colourfulness": window.stats["brightness"]}
    )
    reference = Reference(frame_like, README, class_names=CLASSES)
    assert reference.tests_per_window == 9
    assert reference.alpha_per_test == pytest.approx(1.10e-5, rel=3e-3)
    assert reference.p_value_threshold == pytest.approx(-math.log10(60 / 604_800 / 9))

    with_embeddings = Reference(window, README)  # 4 classes + label mix + 3 statistics + embedding
    assert with_embeddings.tests_per_window == 9
    verdicts = detect_drift(with_embeddings, _traffic(np.random.default_rng(1), 1, 500)[0])
    assert len(verdicts) == 9
    for verdict in verdicts:
        assert verdict.drifted == (verdict.score > verdict.threshold)
        if verdict.p_value is not None:
            assert verdict.threshold == pytest.approx(with_embeddings.p_value_threshold)
            assert verdict.drifted == (verdict.p_value < with_embeddings.alpha_per_test)


def test_a_longer_expected_run_time_raises_every_threshold() -> None:
    week, month = _reference(README), _reference(DriftConfig(expected_run_time_s=30 * 24 * 3600.0))
    assert month.p_value_threshold > week.p_value_threshold
    assert month.psi_threshold(600) > week.psi_threshold(600)
    assert month.cosine_threshold(600) > week.cosine_threshold(600)
    # A smaller current window is noisier, so it needs a higher threshold to keep the same rate.
    assert week.psi_threshold(200) > week.psi_threshold(600)
    assert week.cosine_threshold(200) > week.cosine_threshold(600)


def test_the_saddlepoint_quantile_matches_the_exact_chi_square_one() -> None:
    # With k equal weights, sum w z² is w chi2(k): the tail approximation the cosine threshold uses is exact
    # there to within a percent, out to the alpha of the docstring's example.
    for k in (1, 5, 30):
        for alpha in (1e-2, 1e-5):
            expected = 0.2 * stats.chi2.isf(alpha, k)
            assert _weighted_chi_square_quantile(alpha, np.full(k, 0.2)) == pytest.approx(expected, rel=0.01)


def test_ks_p_values_are_those_of_scipy() -> None:
    reference = _reference(DriftConfig(window_s=60.0, expected_run_time_s=600.0))
    (current,) = _traffic(np.random.default_rng(2), 1, 600, brightness_shift=4.0)
    verdicts = {v.statistic: v for v in detect_drift(reference, current)}
    ref = reference.window
    for name in ("brightness", "sharpness"):
        p = verdicts[name].p_value
        assert p is not None
        # Far from the threshold the asymptotic p-value is kept; near or past it, ks_2samp's exact one.
        near = p < 4 * reference.alpha_per_test
        method = "exact" if near else "asymp"
        assert p == pytest.approx(stats.ks_2samp(ref.stats[name], current.stats[name], method=method).pvalue)
    assert verdicts["brightness"].p_value < 4 * reference.alpha_per_test, "the shift exercises the exact path"


# (a) Without drift, false alarms come at most as often as the expected run time allows
#
# The rates are over draws of the reference as well as of the windows (one reference alone can sit above
# or below them, see the module docstring), so each test spreads its windows over several references.


def _stationary_verdicts(config: DriftConfig, references: int, windows_each: int) -> list[list[DriftVerdict]]:
    verdicts = []
    for seed in range(references):
        reference = _reference(config, seed=100 + seed)
        windows = _traffic(np.random.default_rng(200 + seed), windows_each, 600)
        verdicts += [detect_drift(reference, w) for w in windows]
    return verdicts


@pytest.mark.parametrize("stats_test", ["ks", "cvm"])
def test_stationary_windows_raise_false_alarms_at_most_at_the_window_rate(stats_test: str) -> None:
    # An expected run time of 20 windows, so that a few hundred windows measure the rate: alpha_window = 0.05.
    config = DriftConfig(window_s=60.0, expected_run_time_s=20 * 60.0, stats_test=stats_test)
    verdicts = _stationary_verdicts(config, references=4, windows_each=100)
    alarms = sum(bool(_flagged(window)) for window in verdicts)
    # At most what a true rate of alpha_window gives 999 times in 1000.
    assert alarms <= stats.binom.ppf(0.999, len(verdicts), config.alpha_window), alarms
    tests = {v.statistic: v.test for v in verdicts[0]}
    assert tests["brightness"] == stats_test
    assert tests["clipping_ratio"] == "ks", "tied values never go to Cramér-von Mises"


def test_psi_and_cosine_thresholds_hold_their_share_of_the_rate() -> None:
    # PSI and the cosine shift have no p-value: their calibrated thresholds alone must keep to alpha_test.
    # 4 classes + label mix + 3 statistics + embedding = 9 tests; alpha_test = 0.09 / 9 = 0.01.
    config = DriftConfig(window_s=60.0, expected_run_time_s=60.0 / 0.09)
    assert _reference(config).alpha_per_test == pytest.approx(0.01)
    verdicts = _stationary_verdicts(config, references=5, windows_each=200)
    bound = stats.binom.ppf(0.999, len(verdicts), 0.01)
    for statistic in (LABEL_MIX, EMBEDDING_CENTROID):
        alarms = sum(statistic in _flagged(window) for window in verdicts)
        assert 0 < alarms <= bound, (statistic, alarms)  # calibrated, not merely high


# (b) Each kind of drift is flagged, by the test meant for it, at the docstring's expected run time


def test_a_shift_of_an_input_statistic_is_flagged() -> None:
    reference = _reference(README)
    (current,) = _traffic(np.random.default_rng(4), 1, 600, brightness_shift=12.5)  # half a standard deviation
    assert _flagged(detect_drift(reference, current)) == {"brightness"}


def test_a_change_of_the_label_mix_is_flagged_by_psi() -> None:
    reference = _reference(README)
    (current,) = _traffic(np.random.default_rng(5), 1, 600, shares=(0.25, 0.25, 0.25, 0.25))
    flagged = _flagged(detect_drift(reference, current))
    assert LABEL_MIX in flagged
    assert not flagged & {"brightness", "sharpness", "clipping_ratio"}


def test_a_class_never_seen_in_the_reference_is_flagged() -> None:
    (window,) = _traffic(np.random.default_rng(6), 1, 3000, shares=(0.45, 0.35, 0.2, 0.0))
    reference = Reference(window, README, class_names=CLASSES)
    assert reference.label_counts[3] <= 1, "the reference (next to) never predicts a cross"
    (current,) = _traffic(np.random.default_rng(7), 1, 600, shares=(0.3, 0.25, 0.15, 0.3))
    verdicts = {v.statistic: v for v in detect_drift(reference, current)}
    assert verdicts["probability[cross]"].drifted, "probability mass moved to a new argmax"
    assert verdicts[LABEL_MIX].drifted
    assert verdicts[LABEL_MIX].score > 10 * verdicts[LABEL_MIX].threshold


def test_a_rotation_of_the_embedding_centroid_is_flagged() -> None:
    reference = _reference(README)
    (current,) = _traffic(np.random.default_rng(8), 1, 600, rotation_deg=10.0)
    verdicts = {v.statistic: v for v in detect_drift(reference, current)}
    assert verdicts[EMBEDDING_CENTROID].drifted
    assert verdicts[EMBEDDING_CENTROID].score == pytest.approx(1 - math.cos(math.radians(10)), rel=0.3)
    assert _flagged(verdicts.values()) == {EMBEDDING_CENTROID}


def test_windows_that_cannot_be_compared_are_refused() -> None:
    reference = _reference(README, size=500)
    (current,) = _traffic(np.random.default_rng(9), 1, 100)
    with pytest.raises(ValueError, match="statistics"):
        detect_drift(reference, Window(current.probabilities, current.labels, {}, current.embeddings))
    with pytest.raises(ValueError, match="embeddings"):
        detect_drift(reference, Window(current.probabilities, current.labels, current.stats))
    with pytest.raises(ValueError, match="labels must lie"):
        Window(current.probabilities, current.labels + 4)
    with pytest.raises(ValueError, match="under 10 windows"):
        DriftConfig(window_s=60.0, expected_run_time_s=300.0)


# The simulator's drift, through the input statistics and the bundled models

SIM = SimulatorSettings()  # its default drift: frames at 0.45 brightness, audio with 0.08 of full scale noise
REPOSITORY = ModelRepository(EngineSettings().model_repository)


def _model_window(model: str, batch: np.ndarray, stats_columns: dict[str, np.ndarray]) -> Window:
    engine = OnnxRuntimeEngine(REPOSITORY.resolve(model))
    try:
        probabilities = engine.infer(batch)
    finally:
        engine.close()
    return Window(probabilities, probabilities.argmax(axis=1), stats_columns)


def test_darker_frames_are_flagged_by_their_statistics_not_by_the_model() -> None:
    def window(seed: int, size: int, brightness: float = 1.0) -> Window:
        frames, _ = frame_dataset(size, np.random.default_rng(seed), brightness=brightness)
        return _model_window("frame_classifier", frames, frame_stats(frames).columns())

    reference = Reference(window(1, 200), README, class_names=FRAME_LABELS)
    assert not _flagged(detect_drift(reference, window(2, 64)))
    flagged = _flagged(detect_drift(reference, window(2, 64, brightness=SIM.drift_brightness)))
    assert {"brightness", "contrast", "colourfulness", "sharpness"} <= flagged
    # The frame model standardises each image: its outputs do not see the darkening.
    assert not any(name.startswith("probability") for name in flagged) and LABEL_MIX not in flagged


def test_added_audio_noise_is_flagged_by_level_zero_crossings_and_centroid() -> None:
    def window(seed: int, size: int, extra_noise: float = 0.0) -> Window:
        chunks, _ = audio_dataset(size, np.random.default_rng(seed), extra_noise=extra_noise)
        return _model_window("audio_classifier", chunks, audio_stats(chunks, SAMPLE_RATE).columns())

    # A window as the demo fills it: 4 microphones, 4 chunks a second, 60 s.
    reference = Reference(window(1, 2000), README, class_names=AUDIO_LABELS)
    assert not _flagged(detect_drift(reference, window(2, 960)))
    flagged = _flagged(detect_drift(reference, window(2, 960, extra_noise=SIM.drift_extra_noise)))
    assert {"rms_dbfs", "zero_crossing_rate", "spectral_centroid_hz"} <= flagged
