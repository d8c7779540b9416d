"""Statistics of an evaluation: means and paired differences with bootstrap confidence intervals, a share with its
Wilson interval, and Krippendorff's alpha (inter-rater agreement) with a bootstrap interval over units.

Every interval is a 95% **percentile** bootstrap from `scipy.stats.bootstrap`, seeded (`numpy.random.default_rng(
seed)`), so equal inputs and seed give equal intervals. Percentile rather than BCa: it is defined for every sample
with some variation (BCa's jackknife acceleration degenerates on small samples of discrete ratings, the clinician
study's case), it is transformation-respecting, and it can be re-computed independently with numpy alone. A sample
without variation gets the point interval [value, value].

Krippendorff's alpha follows the coincidence-matrix formulation of Krippendorff (2011), "Computing Krippendorff's
Alpha-Reliability" (https://repository.upenn.edu/asc_papers/43), written here (the `krippendorff` and `pingouin`
packages are GPL-3).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import stats as _scipy_stats

CONFIDENCE = 0.95
LEVELS = ("nominal", "ordinal", "interval", "ratio")
MIN_RESAMPLES = 100
_BATCH_VALUES = 1 << 20  # resampled values held at once by a vectorized bootstrap (8 MiB of float64)
_UNPAIRABLE = "no unit has values from two raters; alpha needs units rated at least twice"


def _sample(values: Sequence[float], what: str) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    if array.ndim != 1:
        raise ValueError(f"{what} must be a flat sequence of numbers, got shape {array.shape}")
    if len(array) < 2:
        raise ValueError(f"{what} has {len(array)} value(s); a confidence interval needs at least 2")
    if not np.isfinite(array).all():
        raise ValueError(f"{what} contains NaN or infinity; drop or fix those values first")
    return array


def _check_resamples(resamples: int) -> None:
    if resamples < MIN_RESAMPLES:
        raise ValueError(f"resamples={resamples} is too few for a 95% interval; use at least {MIN_RESAMPLES}")


def _mean_interval(values: np.ndarray, seed: int, resamples: int) -> tuple[float, float]:
    if np.ptp(values) == 0:
        return float(values[0]), float(values[0])
    result = _scipy_stats.bootstrap((values,), np.mean, n_resamples=resamples, method="percentile",
                                    confidence_level=CONFIDENCE, rng=np.random.default_rng(seed),
                                    batch=max(1, _BATCH_VALUES // len(values)))  # same draws, bounded memory
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def mean_ci(values: Sequence[float], *, seed: int = 0, resamples: int = 10_000) -> dict:
    """`{mean, ci_low, ci_high, n}`: the mean of `values` and its 95% percentile bootstrap interval."""
    _check_resamples(resamples)
    array = _sample(values, "values")
    low, high = _mean_interval(array, seed, resamples)
    return {"mean": float(array.mean()), "ci_low": low, "ci_high": high, "n": len(array)}


def paired(base: Sequence[float], tuned: Sequence[float], *, seed: int = 0, resamples: int = 10_000) -> dict:
    """`{base, tuned, delta, ci_low, ci_high, n}`: the means of both, the mean paired difference tuned - base and
    its 95% percentile bootstrap interval (resampling pairs, i.e. the differences)."""
    _check_resamples(resamples)
    if len(base) != len(tuned):
        raise ValueError(f"paired samples differ in length (base {len(base)}, tuned {len(tuned)}); "
                         "pass one value per example for each model, in the same order")
    b, t = _sample(base, "base"), _sample(tuned, "tuned")
    low, high = _mean_interval(t - b, seed, resamples)
    return {"base": float(b.mean()), "tuned": float(t.mean()), "delta": float((t - b).mean()),
            "ci_low": low, "ci_high": high, "n": len(b)}


def share(prefer: Sequence[bool]) -> dict:
    """`{share, ci_low, ci_high, k, n}`: the share of True in `prefer` and its 95% Wilson score interval."""
    n, k = len(prefer), sum(bool(p) for p in prefer)
    if n == 0:
        raise ValueError("share of an empty sequence: there is no decided comparison to count")
    ci = _scipy_stats.binomtest(k, n).proportion_ci(confidence_level=CONFIDENCE, method="wilson")
    return {"share": k / n, "ci_low": float(ci.low), "ci_high": float(ci.high), "k": k, "n": n}


def _reliability_matrix(reliability_data) -> np.ndarray:
    try:
        rows = [[math.nan if v is None else float(v) for v in row] for row in reliability_data]
        data = np.array(rows, dtype=float)
    except (TypeError, ValueError):
        raise ValueError("reliability data must be raters x units of numbers, with None or NaN for a missing "
                         "value, and every rater row of the same length") from None
    if data.ndim != 2 or data.shape[0] < 2:
        raise ValueError(f"reliability data must be raters x units with at least 2 raters, got shape {data.shape}")
    if np.isinf(data).any():
        raise ValueError("reliability data contains infinity; use None or NaN for a missing value")
    return data


def _pairable(data: np.ndarray) -> np.ndarray:
    """The columns (units) with at least two values: only those enter alpha."""
    return data[:, (~np.isnan(data)).sum(axis=0) >= 2]


def _value_counts(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct values and the units x values matrix of how many raters gave each value to each unit."""
    values = np.unique(data[~np.isnan(data)])
    counts = (data.T[:, :, None] == values[None, None, :]).sum(axis=1).astype(float)
    return values, counts


def _coincidences(counts: np.ndarray) -> np.ndarray:
    """o_ck = sum over units u of n_uc (n_uk - [c = k]) / (m_u - 1) (Krippendorff 2011, section E)."""
    weights = 1.0 / (counts.sum(axis=1) - 1.0)
    weighted = counts * weights[:, None]
    return weighted.T @ counts - np.diag(weighted.sum(axis=0))


def _squared_differences(values: np.ndarray, n_c: np.ndarray, level: str) -> np.ndarray:
    """The metric difference delta^2 between every pair of values (Krippendorff 2011, section F)."""
    c, k = values[:, None], values[None, :]
    if level == "nominal":
        return (c != k).astype(float)
    if level == "interval":
        return (c - k) ** 2
    if level == "ratio":
        if (values < 0).any():
            raise ValueError("the ratio level needs non-negative values; use level='interval' for these data")
        total = c + k
        return np.divide((c - k) ** 2, total ** 2, out=np.zeros_like(total), where=total != 0)
    cumulative = np.cumsum(n_c)  # ordinal: counts between the two ranks, each end counted half
    rank = np.arange(len(values))
    lo, hi = np.minimum.outer(rank, rank), np.maximum.outer(rank, rank)
    between = cumulative[hi] - cumulative[lo] + n_c[lo]
    return (between - (n_c[lo] + n_c[hi]) / 2.0) ** 2


def _alpha(data: np.ndarray, level: str) -> float:
    pairable = _pairable(data)
    if pairable.shape[1] == 0:
        raise ValueError(_UNPAIRABLE)
    return _alpha_of_counts(*_value_counts(pairable), level)


def _alpha_of_counts(values: np.ndarray, counts: np.ndarray, level: str) -> float:
    """Alpha from `_value_counts` of pairable units; a value no unit holds changes nothing (its count is 0)."""
    o = _coincidences(counts)
    n_c = o.sum(axis=1)
    n = n_c.sum()
    delta = _squared_differences(values, n_c, level)
    expected = (np.outer(n_c, n_c) * delta).sum()
    if expected == 0:
        raise ValueError("all pairable values are equal: alpha is undefined without variation")
    return float(1.0 - (n - 1.0) * (o * delta).sum() / expected)


def _check_level(level: str) -> None:
    if level not in LEVELS:
        raise ValueError(f"unknown level of measurement {level!r}; use one of: {', '.join(LEVELS)}")


def krippendorff_alpha(reliability_data, level: str = "interval") -> float:
    """Krippendorff's alpha of `reliability_data` (raters x units; None or NaN where a rater did not rate a unit) at
    `level` ("nominal", "ordinal", "interval" or "ratio"). 1 is perfect agreement, 0 agreement at chance level,
    below 0 systematic disagreement. ValueError when no unit is rated twice or the values do not vary."""
    _check_level(level)
    return _alpha(_reliability_matrix(reliability_data), level)


def alpha_ci(reliability_data, level: str = "interval", *, seed: int = 0, resamples: int = 10_000) -> dict:
    """`{alpha, ci_low, ci_high, n_units}`: Krippendorff's alpha and its 95% percentile bootstrap interval,
    resampling the pairable units (columns) with replacement. The interval is None when a resample has no variation
    (too few units for an interval)."""
    _check_level(level)
    _check_resamples(resamples)
    data = _pairable(_reliability_matrix(reliability_data))
    if data.shape[1] == 0:
        raise ValueError(_UNPAIRABLE)
    return _alpha_ci(*_value_counts(data), level, seed, resamples)


def alpha_ci_of_units(units: Sequence[Sequence[float]], level: str = "interval", *, clusters: Sequence | None = None,
                      seed: int = 0, resamples: int = 10_000) -> dict:
    """`alpha_ci` from the values each unit received, one per rater (alpha does not depend on which rater gave
    which): memory grows with units x distinct values, not with units x raters. `clusters`, one label per unit,
    makes the bootstrap draw whole clusters (units that are not independent, e.g. two answers to one question)."""
    _check_level(level)
    _check_resamples(resamples)
    if clusters is not None and len(clusters) != len(units):
        raise ValueError(f"clusters has {len(clusters)} labels for {len(units)} units; give one label per unit")
    pairable = [np.asarray(unit, dtype=float) for unit in units if len(unit) >= 2]
    if not pairable:
        raise ValueError(_UNPAIRABLE)
    flat = np.concatenate(pairable)
    if not np.isfinite(flat).all():
        raise ValueError("a unit's values contain NaN or infinity; leave a missing value out of its unit")
    values, column = np.unique(flat, return_inverse=True)
    counts = np.zeros((len(pairable), len(values)))
    np.add.at(counts, (np.repeat(np.arange(len(pairable)), [len(u) for u in pairable]), column), 1.0)
    groups = None
    if clusters is not None:  # rows of the pairable units, by their unit's label
        index: dict = {}
        for row, label in enumerate(c for unit, c in zip(units, clusters) if len(unit) >= 2):
            index.setdefault(label, []).append(row)
        groups = [np.asarray(rows) for rows in index.values()]
    return _alpha_ci(values, counts, level, seed, resamples, groups)


def _alpha_ci(values: np.ndarray, counts: np.ndarray, level: str, seed: int, resamples: int,
              groups: list[np.ndarray] | None = None) -> dict:
    """Alpha of units x values `counts` and its percentile bootstrap interval over units (rows), or over `groups`
    of rows drawn whole."""
    if len(counts) < 2:  # a single unit's alpha is 0 whatever its values, and resampling it varies nothing
        raise ValueError("only one unit has values from two raters; alpha and its interval need at least two")
    if groups is not None and len(groups) < 2:  # resampling one cluster varies nothing
        raise ValueError("all units with values from two raters are in one cluster; an interval needs at least two")
    point = _alpha_of_counts(values, counts, level)

    def statistic(drawn: np.ndarray) -> float:
        rows = drawn.astype(int) if groups is None else np.concatenate([groups[i] for i in drawn.astype(int)])
        try:
            return _alpha_of_counts(values, counts[rows], level)
        except ValueError:
            return math.nan

    draws = len(counts) if groups is None else len(groups)
    result = _scipy_stats.bootstrap((np.arange(draws),), statistic, n_resamples=resamples, vectorized=False,
                                    method="percentile", confidence_level=CONFIDENCE,
                                    rng=np.random.default_rng(seed))
    low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    if not (math.isfinite(low) and math.isfinite(high)):
        low = high = None
    return {"alpha": point, "ci_low": low, "ci_high": high, "n_units": len(counts)}
