"""Drift detection: a reference window against a current one, with thresholds set by an expected run time.

The tests, one verdict each (`DriftVerdict`):

- `probability[<class>]`, KS: the model's probability of each class, reference vs current, by the
  two-sample Kolmogorov-Smirnov test: "black-box shift detection", the detector that Rabanser et al.
  ("Failing Loudly", NeurIPS 2019) found strongest, Bonferroni-corrected like everything below;
- `label_mix`, PSI: the population stability index of the predicted labels,
  PSI = sum over classes of (q - p) ln(q / p), p and q the reference and current shares;
- each input statistic (`consumers/input_stats.py`: brightness, rms_dbfs, ...), KS or Cramér-von Mises
  (`scipy.stats.cramervonmises_2samp`), as `DriftConfig.stats_test` says. Cramér-von Mises runs only
  where at least 99 % of the values are distinct: scipy's version over-reports with ties (1 % of the
  values tied kept its rate; 5 % more than doubled it at p < 0.05; a clipping ratio that is nearly
  always 0 reads p = 0 for two samples of one distribution), so tied statistics get KS, which stays valid;
- `embedding_centroid`, cosine: 1 - cos(reference centroid, current centroid), when the model gives embeddings.

Thresholds from the expected run time (ERT) between false alarms
-----------------------------------------------------------------
Windows of W seconds are evaluated every W seconds. Without drift each raises a false alarm with some
probability alpha_window, independently, so the number of windows up to the first false alarm is
geometric with mean 1 / alpha_window, and the expected time between false alarms is
ERT = W / alpha_window. Configuring the ERT therefore sets

    alpha_window = W / ERT.

A window runs m tests (one per class, one for the label mix, one per input statistic, one for the
embedding). Each flags at alpha_test = alpha_window / m (Bonferroni): the chance that any of them flags
is at most m * alpha_test = alpha_window, so the false alarms come at most that often, whatever the
tests' dependence. Worked through for ERT = 7 days = 604,800 s and W = 60 s:
alpha_window = 60 / 604,800 = 9.92e-5 (one window in 10,080). The frame model has 4 classes and 4
input statistics and no embedding, so m = 4 + 1 + 4 = 9 and alpha_test = 1.10e-5: a KS test flags at
p < 1.10e-5. The ERT holds per detector (one reference, one model version, one device group); G groups
monitored side by side raise a false alarm somewhere every ERT / G on average. Windows evaluated more
often than they are long (hopping) are not independent; put the evaluation period for W, and the union
bound still holds.

How each threshold is met
-------------------------
- KS: p from `scipy.stats.kstwo` (the asymptotic p-value of `scipy.stats.ks_2samp`) for every column at
  once against a reference sorted once; a column within a factor of 4 of its threshold is re-tested with
  `ks_2samp` itself, whose p-value is exact up to 10,000 items a window (the asymptotic one reads 5-25 %
  low there). KS assumes continuous data: with ties (a clipping ratio that is nearly always 0, values
  stored as float32) its statistic's null distribution is smaller than the one the p-value is computed
  from, so the p-values are conservative: fewer false alarms than stated, and some power lost.
  Bonferroni is conservative too when the tests are correlated, as the class probabilities (which sum
  to 1) are.
- PSI has no p-value. Its null distribution is bootstrapped from the reference: B pairs of label counts
  drawn from the reference's shares, one of the reference's size and one of the current window's, with
  the same smoothing (each count + 0.5, which keeps PSI finite for a class missing from a window). B
  draws cannot reach a quantile as far out as alpha_test (1e-5 needs millions), so the threshold is
  that of a scaled chi-square c * chi2(k) matched to the bootstrap's mean and variance: PSI is
  asymptotically (1/n + 1/m) chi2(C - 1), and the match carries the smoothing and small-sample effects
  the asymptote misses. It is not exact in the far tail, which is heavier than the chi-square's: in
  simulations (4 to 16 classes, windows of 600 against references of 600 to 6,000) the false-alarm
  rate at 1e-5 came out between 0.4x and 2.5x the nominal one when every class averaged 30 or more
  items a window, and up to 4x when one averaged 6.
- The cosine shift has no p-value either, and its bootstrap tail fitted the same way ran 2-12x over
  the nominal rate for embeddings whose spread differs by direction, so its threshold comes from its
  large-sample null instead: with delta the difference of the two centroids, 1 - cos ~= |delta across
  the centroid direction|² / (2 |centroid|²), a weighted sum of chi-square(1) variables whose weights
  are the eigenvalues of the reference's covariance across the centroid direction, times
  (1/n + 1/m) / (2 |centroid|²). Its quantile comes from the Lugannani-Rice saddlepoint approximation
  (within about 1 % of the exact quantile out to 1e-5), once per reference. This holds while the
  centroid's noise is small next to its norm, as it is for windows of hundreds of items from a model
  whose embeddings have a clear mean direction.

Both thresholds are cached per reference (PSI's per current-window size). All these rates are over
draws of the reference as well as of the current window. Given one particular reference, a test's rate
differs from its nominal one by as much as that reference differs from the population, so make the
reference many windows long: with a reference 5 windows long, single tests at 0.01 ran at 0.3x to 2.5x
of it, depending on the reference drawn (the window's rate, summed over its tests, stayed within 1.1x).

Pure library code: windows in, verdicts out. The app that builds windows from results, stores the
verdicts in `drift_events` and raises alerts sits on top of it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy import optimize, stats

PROBABILITY = "probability"  # statistic name prefix: probability[<class>]
LABEL_MIX = "label_mix"
EMBEDDING_CENTROID = "embedding_centroid"

# Pseudo-count added to every class count before PSI: a class absent from one window keeps PSI finite.
_PSI_PSEUDO_COUNT = 0.5
# A KS column whose asymptotic p-value is within this factor of its threshold gets ks_2samp's own
# (exact) p-value: the asymptotic one reads at most ~25 % low, so nothing the exact test flags escapes.
_KS_CONFIRM_FACTOR = 4.0
_SMALLEST_P = np.finfo(float).tiny  # p-values are clamped here so that -log10(p) stays finite


@dataclass(frozen=True, slots=True)
class Window:
    """What one window of results holds, one row per result.

    probabilities: [n, C] the model's class probabilities; labels: [n] the predicted class indices
    (0..C-1); stats: input statistics by name, each [n]; embeddings: [n, d], when the model gives them.
    """

    probabilities: np.ndarray
    labels: np.ndarray
    stats: Mapping[str, np.ndarray] = field(default_factory=dict)
    embeddings: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.probabilities.ndim != 2 or len(self.probabilities) == 0:
            raise ValueError(f"probabilities must be [n, C] with n >= 1, not {list(self.probabilities.shape)}")
        n, classes = self.probabilities.shape
        if self.labels.shape != (n,) or not np.issubdtype(self.labels.dtype, np.integer):
            raise ValueError(f"labels must be {n} class indices, not {self.labels.dtype} {list(self.labels.shape)}")
        if np.any(self.labels < 0) or np.any(self.labels >= classes):
            raise ValueError(f"labels must lie in 0..{classes - 1}")
        for name, values in self.stats.items():
            if values.shape != (n,):
                raise ValueError(f"input statistic {name!r} must hold {n} values, not {list(values.shape)}")
        if self.embeddings is not None and (self.embeddings.ndim != 2 or len(self.embeddings) != n):
            raise ValueError(f"embeddings must be [{n}, d], not {list(self.embeddings.shape)}")

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True, slots=True)
class DriftVerdict:
    """One test of one statistic over one window. `score` and `threshold` share units and `drifted` is
    `score > threshold`: for the tests with a p-value (KS, Cramér-von Mises) the score is -log10(p) and the
    threshold -log10(alpha_test); for PSI and the cosine shift, the statistic and its calibrated threshold."""

    statistic: str  # probability[<class>], label_mix, an input statistic's name, embedding_centroid
    test: str  # ks, cvm, psi, cosine
    score: float
    threshold: float
    p_value: float | None
    drifted: bool


@dataclass(frozen=True, slots=True)
class DriftConfig:
    window_s: float = 60.0  # a window's length, and the time between evaluations
    expected_run_time_s: float = 7 * 24 * 3600.0  # mean time between false alarms without drift
    stats_test: Literal["ks", "cvm"] = "ks"  # the test on each input statistic
    bootstrap_resamples: int = 4000  # draws of PSI's null distribution, per reference and window size
    seed: int = 0  # of the bootstrap: the same reference gives the same thresholds

    def __post_init__(self) -> None:
        if self.window_s <= 0:
            raise ValueError(f"window_s must be positive, not {self.window_s}")
        if self.expected_run_time_s < 10 * self.window_s:
            raise ValueError(
                f"an expected run time of {self.expected_run_time_s} s is under 10 windows of {self.window_s} s: "
                "every few windows would raise a false alarm"
            )
        if self.stats_test not in ("ks", "cvm"):
            raise ValueError(f"stats_test must be 'ks' or 'cvm', not {self.stats_test!r}")
        if self.bootstrap_resamples < 100:
            raise ValueError(f"bootstrap_resamples must be at least 100, not {self.bootstrap_resamples}")

    @property
    def alpha_window(self) -> float:
        """The false-alarm probability of one window: W / ERT."""
        return self.window_s / self.expected_run_time_s


class Reference:
    """A reference window, ready to be compared with current ones: the tests it sets (a current window
    must carry the same classes, statistics and embeddings), its sorted columns, and the thresholds
    calibrated on it."""

    def __init__(
        self, window: Window, config: DriftConfig, class_names: Sequence[str] | None = None,
        design_effects: Mapping[str, float] | None = None,
    ) -> None:  # fmt: skip
        """`design_effects`, by statistic name (missing: 1): how many results carry the information of one
        independent draw. Results of a camera are not independent (a scene lasts many frames), and a test
        that takes n such results for n draws flags stationary traffic; each test then counts n / effect."""
        classes = window.probabilities.shape[1]
        names = list(class_names) if class_names is not None else [str(c) for c in range(classes)]
        if len(names) != classes:
            raise ValueError(f"{len(names)} class names for {classes} classes")
        self.window = window
        self.config = config
        self.class_names = names
        self.tests_per_window = classes + 1 + len(window.stats) + (window.embeddings is not None)
        self.alpha_per_test = config.alpha_window / self.tests_per_window
        self.sorted_probabilities = np.sort(window.probabilities, axis=0)  # each class's column, sorted once
        self.sorted_stats = {name: np.sort(values) for name, values in window.stats.items()}
        self.label_counts = np.bincount(window.labels, minlength=classes)
        self.centroid: np.ndarray | None = None
        self._cosine_quantile = 0.0  # of the weighted chi-square sum; times 1/n + 1/m gives the threshold
        if window.embeddings is not None:
            self.centroid, self._cosine_quantile = _cosine_null(window.embeddings, self.alpha_per_test)
        self._psi_thresholds: dict[int, float] = {}
        self.design_effects = {name: max(1.0, float(e)) for name, e in (design_effects or {}).items()}

    def effect(self, statistic: str) -> float:
        return self.design_effects.get(statistic, 1.0)

    @property
    def p_value_threshold(self) -> float:
        """The score above which a test with a p-value flags: -log10(alpha_test)."""
        return -math.log10(self.alpha_per_test)

    def psi_threshold(self, current_size: int) -> float:
        """PSI's threshold against a current window of `current_size` items (bootstrapped once per size)."""
        if current_size not in self._psi_thresholds:
            effect = self.effect(LABEL_MIX)
            n = max(1, round(len(self.window) / effect))  # the independent draws the counts stand for
            m = max(1, round(current_size / effect))
            shares = self.label_counts / len(self.window)
            rng = np.random.default_rng([self.config.seed, current_size])
            resamples = self.config.bootstrap_resamples
            null = _psi(rng.multinomial(n, shares, size=resamples), rng.multinomial(m, shares, size=resamples))
            self._psi_thresholds[current_size] = _scaled_chi_square_quantile(null, self.alpha_per_test)
        return self._psi_thresholds[current_size]

    def cosine_threshold(self, current_size: int) -> float:
        """The cosine shift's threshold against a current window of `current_size` items."""
        if self.centroid is None:
            raise ValueError("this reference has no embeddings")
        return (1.0 / len(self.window) + 1.0 / current_size) * self._cosine_quantile


def detect_drift(reference: Reference, current: Window) -> list[DriftVerdict]:
    """Every test the reference sets, on `current`: one verdict per class probability, the label mix,
    each input statistic and the embedding centroid (when the reference has embeddings)."""
    _check_comparable(reference, current)
    alpha = reference.alpha_per_test
    class_statistics = [f"{PROBABILITY}[{name}]" for name in reference.class_names]
    verdicts = _ks_verdicts(
        class_statistics,
        list(reference.sorted_probabilities.T),
        list(current.probabilities.T),
        alpha,
        [reference.effect(name) for name in class_statistics],
    )
    score = float(_psi(reference.label_counts, np.bincount(current.labels, minlength=len(reference.class_names))))
    threshold = reference.psi_threshold(len(current))
    verdicts.append(DriftVerdict(LABEL_MIX, "psi", score, threshold, None, score > threshold))
    use_cvm = reference.config.stats_test == "cvm"
    cvm_names = [
        n for n in reference.sorted_stats if use_cvm and _mostly_distinct(reference.sorted_stats[n], current.stats[n])
    ]
    ks_names = [n for n in reference.sorted_stats if n not in cvm_names]
    verdicts += _ks_verdicts(
        ks_names, [reference.sorted_stats[n] for n in ks_names], [current.stats[n] for n in ks_names], alpha,
        [reference.effect(n) for n in ks_names],
    )
    for name in cvm_names:
        result = stats.cramervonmises_2samp(reference.sorted_stats[name], current.stats[name])
        verdicts.append(_p_value_verdict(name, "cvm", result.pvalue, alpha))
    if reference.centroid is not None and current.embeddings is not None:
        score = _cosine_distance(reference.centroid, current.embeddings.mean(axis=0))
        threshold = reference.cosine_threshold(len(current))
        verdicts.append(DriftVerdict(EMBEDDING_CENTROID, "cosine", score, threshold, None, score > threshold))
    return verdicts


def _check_comparable(reference: Reference, current: Window) -> None:
    ref = reference.window
    if current.probabilities.shape[1] != ref.probabilities.shape[1]:
        raise ValueError(
            f"the current window has {current.probabilities.shape[1]} classes, the reference {ref.probabilities.shape[1]}"
        )
    if set(current.stats) != set(ref.stats):
        raise ValueError(
            f"the current window has statistics {sorted(current.stats)}, the reference {sorted(ref.stats)}"
        )
    if (current.embeddings is None) != (ref.embeddings is None):
        raise ValueError("embeddings must be in both windows or in neither")
    if (
        ref.embeddings is not None
        and current.embeddings is not None
        and current.embeddings.shape[1] != ref.embeddings.shape[1]
    ):
        raise ValueError(f"embeddings of {current.embeddings.shape[1]} dimensions against {ref.embeddings.shape[1]}")


def _mostly_distinct(reference: np.ndarray, current: np.ndarray) -> bool:
    """Whether at least 99 % of the values of the two samples together are distinct (a continuous statistic
    stored as float32 repeats a few values by chance; that leaves Cramér-von Mises' p-value sound)."""
    pooled = np.concatenate([reference, current])
    return np.unique(pooled).size >= 0.99 * pooled.size


def _p_value_verdict(statistic: str, test: str, p_value: float, alpha: float) -> DriftVerdict:
    p = float(p_value)
    score = max(0.0, -math.log10(max(p, _SMALLEST_P)))  # max: -log10(1.0) is -0.0
    return DriftVerdict(statistic, test, score, -math.log10(alpha), p, p < alpha)


def _ks_verdicts(
    names: list[str], sorted_references: list[np.ndarray], currents: list[np.ndarray], alpha: float,
    effects: list[float] | None = None,
) -> list[DriftVerdict]:
    """Two-sample KS of each current column against its (sorted) reference column; a column with a design
    effect e is tested as n / e and m / e independent draws."""
    if not names:
        return []
    effects = effects or [1.0] * len(names)
    n, m = len(sorted_references[0]), len(currents[0])
    distances = np.array([_ks_distance(ref, cur) for ref, cur in zip(sorted_references, currents, strict=True)])
    # What ks_2samp computes in its asymptotic mode, for all columns at once.
    sizes = np.array([max(1, round(n * m / (n + m) / e)) for e in effects])
    p_values = stats.kstwo.sf(distances, sizes)
    verdicts = []
    for name, ref, cur, p, effect in zip(names, sorted_references, currents, p_values, effects, strict=True):
        if effect == 1.0 and p < _KS_CONFIRM_FACTOR * alpha:  # ks_2samp's exact p-value assumes independent draws
            p = stats.ks_2samp(ref, cur).pvalue
        verdicts.append(_p_value_verdict(name, "ks", p, alpha))
    return verdicts


def _ks_distance(sorted_reference: np.ndarray, current: np.ndarray) -> float:
    """The largest gap between the two empirical distribution functions, over every observed value."""
    sorted_current = np.sort(current)
    pooled = np.concatenate([sorted_reference, sorted_current])
    cdf_reference = np.searchsorted(sorted_reference, pooled, side="right") / len(sorted_reference)
    cdf_current = np.searchsorted(sorted_current, pooled, side="right") / len(sorted_current)
    return float(np.max(np.abs(cdf_reference - cdf_current)))


def _psi(reference_counts: np.ndarray, current_counts: np.ndarray) -> np.ndarray:
    """PSI between label counts (the last axis), each count smoothed by the pseudo-count."""
    p = reference_counts + _PSI_PSEUDO_COUNT
    p = p / p.sum(axis=-1, keepdims=True)
    q = current_counts + _PSI_PSEUDO_COUNT
    q = q / q.sum(axis=-1, keepdims=True)
    return np.sum((q - p) * np.log(q / p), axis=-1)


def _scaled_chi_square_quantile(null: np.ndarray, alpha: float) -> float:
    """The (1 - alpha) quantile of c * chi2(k), matched to the mean and variance of the draws `null`."""
    mean, variance = float(np.mean(null)), float(np.var(null))
    if variance == 0.0:  # one class only: every draw is the same, and any other mix exceeds it
        return mean
    scale, dof = variance / (2 * mean), 2 * mean * mean / variance
    return scale * float(stats.chi2.isf(alpha, dof))


def _cosine_distance(a: np.ndarray, b: np.ndarray) -> float:
    norms = float(np.linalg.norm(a) * np.linalg.norm(b))
    if norms == 0.0:  # a centroid at the origin has no direction: count it as wholly turned away
        return 1.0
    return 1.0 - float(a @ b) / norms


def _cosine_null(embeddings: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    """The reference centroid, and the (1 - alpha) quantile of sum w_i z_i² (z_i standard normal) that the
    cosine shift follows, per unit of 1/n + 1/m: w_i are the eigenvalues of the covariance across the
    centroid direction, over 2 |centroid|²."""
    data = embeddings.astype(np.float64)
    centroid = data.mean(axis=0)
    norm_squared = float(centroid @ centroid)
    if norm_squared == 0.0:
        raise ValueError("the reference embeddings' centroid is at the origin: it has no direction to shift from")
    direction = centroid / math.sqrt(norm_squared)
    centred = data - centroid
    across = centred - np.outer(centred @ direction, direction)  # the part that turns the centroid
    eigenvalues = np.linalg.eigvalsh(across.T @ across / max(len(data) - 1, 1))
    if eigenvalues.max() <= 0.0:  # every reference embedding points one way: any turn at all is drift
        return centroid, 0.0
    weights = eigenvalues[eigenvalues > 1e-12 * eigenvalues.max()] / (2 * norm_squared)
    return centroid, _weighted_chi_square_quantile(alpha, weights)


def _weighted_chi_square_quantile(alpha: float, weights: np.ndarray) -> float:
    """The (1 - alpha) quantile of sum w_i z_i², by the Lugannani-Rice saddlepoint approximation of its tail
    (Kuonen 1999, "Saddle point approximations for distributions of quadratic forms in normal variables")."""
    largest = float(weights.max())
    w = weights / largest  # the tail in units of the largest weight: better conditioned
    mean, spread = float(w.sum()), math.sqrt(2 * float(np.sum(w * w)))

    def log_tail(x: float) -> float:
        # The saddlepoint t solves K'(t) = x, K(t) = -1/2 sum log(1 - 2 t w_i) being the cumulant generating
        # function; it lies in (0, 1 / (2 max w)) for x above the mean.
        t = optimize.brentq(lambda s: np.sum(w / (1 - 2 * s * w)) - x, 0.0, 0.5 * (1 - 1e-15))
        cgf = -0.5 * float(np.sum(np.log1p(-2 * t * w)))
        r = math.sqrt(max(2 * (t * x - cgf), 1e-300))
        u = t * math.sqrt(2 * float(np.sum((w / (1 - 2 * t * w)) ** 2)))
        return math.log(max(stats.norm.sf(r) + stats.norm.pdf(r) * (1 / u - 1 / r), _SMALLEST_P))

    # Bracket: half a standard deviation above the mean the tail is above any alpha a config allows (< 0.1);
    # sum w_i z_i² <= chi2(len(w)) since every w_i <= 1, and twice that quantile leaves room for the
    # approximation, which runs a little over the exact tail.
    low, high = mean + 0.5 * spread, 2 * float(stats.chi2.isf(alpha, len(w)))
    quantile = optimize.brentq(lambda x: log_tail(x) - math.log(alpha), low, high)
    return largest * quantile
