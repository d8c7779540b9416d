"""Statistics: Krippendorff's alpha against published worked examples and hand-computed cases; bootstrap intervals
against an independent numpy computation and their known properties; the Wilson interval against its formula."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medtee.evaluation.stats import LEVELS, alpha_ci, alpha_ci_of_units, krippendorff_alpha, mean_ci, paired, share

N = None
#: Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", example C: 4 observers x 12 units, missing data.
KRIPPENDORFF_2011_C = [
    [1, 2, 3, 3, 2, 1, 4, 1, 2, N, N, N],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, N, 3],
    [N, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, N],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, N],
]
#: Krippendorff (2011), example A: 2 observers x 10 units, binary.
KRIPPENDORFF_2011_A = [[0, 1, 0, 0, 0, 0, 0, 0, 1, 0], [1, 1, 1, 0, 0, 1, 0, 0, 0, 0]]
#: Wikipedia, "Krippendorff's alpha", a computational example: 3 coders x 15 units.
WIKIPEDIA = [
    [N, N, N, N, N, 3, 4, 1, 2, 1, 1, 3, 3, N, 3],
    [1, N, 2, 1, 3, 3, 4, 3, N, N, N, N, N, N, N],
    [N, N, 2, 1, 3, 4, 4, N, 2, 1, 1, 3, 3, N, 4],
]


@pytest.mark.parametrize("level, published", [("nominal", 0.743), ("ordinal", 0.815), ("interval", 0.849),
                                              ("ratio", 0.797)])
def test_alpha_reproduces_krippendorff_2011_example_c(level, published):
    assert round(krippendorff_alpha(KRIPPENDORFF_2011_C, level), 3) == published


def test_alpha_reproduces_the_binary_example_and_the_wikipedia_example():
    assert round(krippendorff_alpha(KRIPPENDORFF_2011_A, "nominal"), 3) == 0.095
    assert round(krippendorff_alpha(WIKIPEDIA, "nominal"), 3) == 0.691
    assert round(krippendorff_alpha(WIKIPEDIA, "interval"), 3) == 0.811


@pytest.mark.parametrize("level", LEVELS)
def test_perfect_agreement_is_one(level):
    assert krippendorff_alpha([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, N]], level) == pytest.approx(1.0)


def test_hand_computed_systematic_disagreement_and_chance():
    # units (1,2) and (2,1): o_12 = o_21 = 2, n_1 = n_2 = 2, n = 4 -> alpha = 1 - 3 * 4 / (2 * 2 * 2) = -0.5
    assert krippendorff_alpha([[1, 2], [2, 1]], "nominal") == pytest.approx(-0.5)
    # same data, interval: delta^2 = 1 for the only differing pair -> the same -0.5
    assert krippendorff_alpha([[1, 2], [2, 1]], "interval") == pytest.approx(-0.5)
    # one unit (1,2): o_12 = o_21 = 1, n = 2 -> alpha = 1 - 1 * 2 / 2 = 0
    assert krippendorff_alpha([[1], [2]], "nominal") == pytest.approx(0.0)


def test_units_rated_once_do_not_count():
    extra = [row + [v] for row, v in zip(KRIPPENDORFF_2011_C, [N, 5, N, N])]
    assert krippendorff_alpha(extra, "interval") == krippendorff_alpha(KRIPPENDORFF_2011_C, "interval")


@pytest.mark.parametrize("level", ["nominal", "interval"])
def test_alpha_agrees_with_nltk_on_random_data_with_missing_values(level):
    """An independent implementation (NLTK's AnnotationTask, Apache-2.0, installed with rouge-score)."""
    agreement = pytest.importorskip("nltk.metrics.agreement")
    from nltk.metrics.distance import binary_distance, interval_distance

    rng = np.random.default_rng(7)
    for _ in range(20):
        raters, units = rng.integers(2, 6), rng.integers(4, 16)
        data = np.where(rng.random((raters, units)) < 0.3, np.nan, rng.integers(1, 11, (raters, units)).astype(float))
        pairable = (~np.isnan(data)).sum(axis=0) >= 2
        triples = [(f"r{r}", f"u{u}", float(data[r, u])) for r in range(raters) for u in range(units)
                   if pairable[u] and not np.isnan(data[r, u])]
        distance = binary_distance if level == "nominal" else interval_distance
        expected = agreement.AnnotationTask(triples, distance=distance).alpha()
        assert krippendorff_alpha(data.tolist(), level) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("level", LEVELS)
def test_alpha_of_units_equals_alpha_of_the_matrix(level):
    units = [[v for v in column if v is not None] for column in zip(*KRIPPENDORFF_2011_C)]
    assert alpha_ci_of_units(units, level, seed=3, resamples=500) == alpha_ci(KRIPPENDORFF_2011_C, level, seed=3,
                                                                               resamples=500)
    with pytest.raises(ValueError, match="no unit has values from two raters"):
        alpha_ci_of_units([[1], [2], []], level)


def test_alpha_interval_over_clusters_draws_whole_clusters():
    """Singleton clusters resample exactly as units do; clusters of units that agree with each other (two answers
    to one question) give a wider interval than treating those units as independent; bad clusters are named."""
    units = [[v for v in column if v is not None] for column in zip(*KRIPPENDORFF_2011_C)]
    alone = alpha_ci_of_units(units, seed=3, resamples=500)
    assert alpha_ci_of_units(units, clusters=list(range(len(units))), seed=3, resamples=500) == alone
    rng = np.random.default_rng(0)
    pairs = [[float(v) for v in rng.integers(1, 11, 3)] for _ in range(30)]
    twins = [unit for unit in pairs for _ in range(2)]  # each question's two answers rated alike
    clustered = alpha_ci_of_units(twins, clusters=[i // 2 for i in range(60)], seed=1, resamples=2000)
    independent = alpha_ci_of_units(twins, seed=1, resamples=2000)
    assert clustered["alpha"] == independent["alpha"]
    width = {name: r["ci_high"] - r["ci_low"] for name, r in (("clustered", clustered), ("independent", independent))}
    assert width["clustered"] > 1.2 * width["independent"]
    with pytest.raises(ValueError, match="clusters has 2 labels for 3 units"):
        alpha_ci_of_units([[1, 2], [2, 3], [3, 4]], clusters=["a", "b"])
    with pytest.raises(ValueError, match="in one cluster"):
        alpha_ci_of_units([[1, 2], [2, 3], [3]], clusters=["a", "a", "b"])
    labels = [i // 2 for i in range(60)]  # an array of labels, as numpy gives them ("truth value ... ambiguous")
    assert alpha_ci_of_units(twins, clusters=np.array(labels), seed=1, resamples=2000) == clustered


def test_nan_and_none_both_mean_missing():
    as_nan = [[math.nan if v is None else v for v in row] for row in KRIPPENDORFF_2011_C]
    assert krippendorff_alpha(as_nan, "ordinal") == krippendorff_alpha(KRIPPENDORFF_2011_C, "ordinal")


@pytest.mark.parametrize("data, level, words", [
    ([[1, N], [N, 2]], "interval", "no unit has values from two raters"),
    ([[3, 3], [3, 3]], "interval", "undefined without variation"),
    ([[1, 2], [1, 2]], "cardinal", "unknown level"),
    ([[1, 2]], "interval", "at least 2 raters"),
    ([[1, 2], [1]], "interval", "same length"),
    ([[-1, 2], [-1, 2]], "ratio", "non-negative"),
])
def test_alpha_refuses_what_it_cannot_measure(data, level, words):
    with pytest.raises(ValueError, match=words):
        krippendorff_alpha(data, level)


def test_alpha_ci_of_a_single_pairable_unit_is_refused_by_name():
    for call in (lambda: alpha_ci([[3, 5], [4, N]], resamples=100), lambda: alpha_ci_of_units([[3, 4], [5]])):
        with pytest.raises(ValueError, match="only one unit has values from two raters"):
            call()


def test_alpha_ci_is_seeded_and_contains_alpha():
    a = alpha_ci(KRIPPENDORFF_2011_C, "interval", seed=3, resamples=2000)
    assert a == alpha_ci(KRIPPENDORFF_2011_C, "interval", seed=3, resamples=2000)
    assert a != alpha_ci(KRIPPENDORFF_2011_C, "interval", seed=4, resamples=2000)
    assert a["alpha"] == krippendorff_alpha(KRIPPENDORFF_2011_C, "interval")
    assert a["ci_low"] <= a["alpha"] <= a["ci_high"] <= 1.0
    assert a["n_units"] == 11  # unit 12 has a single value


def _numpy_percentile_bootstrap(x: np.ndarray, seed: int, resamples: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), (resamples, len(x)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def test_paired_matches_an_independent_numpy_bootstrap():
    rng = np.random.default_rng(0)
    base = rng.integers(1, 11, 40).astype(float)
    tuned = np.clip(base + rng.integers(-1, 3, 40), 1, 10)
    result = paired(base.tolist(), tuned.tolist(), seed=11, resamples=5000)
    low, high = _numpy_percentile_bootstrap(tuned - base, 11, 5000)
    assert result["ci_low"] == pytest.approx(low) and result["ci_high"] == pytest.approx(high)
    assert result["delta"] == pytest.approx((tuned - base).mean())
    assert result["base"] == pytest.approx(base.mean()) and result["tuned"] == pytest.approx(tuned.mean())
    assert result["n"] == 40
    assert result["ci_low"] <= result["delta"] <= result["ci_high"]


def test_intervals_shrink_with_n_and_are_deterministic():
    rng = np.random.default_rng(1)
    small, large = rng.normal(5, 2, 20), rng.normal(5, 2, 2000)
    a, b = mean_ci(small, seed=0, resamples=2000), mean_ci(large, seed=0, resamples=2000)
    assert (b["ci_high"] - b["ci_low"]) < (a["ci_high"] - a["ci_low"]) / 5
    assert a == mean_ci(small, seed=0, resamples=2000)
    assert a["ci_low"] <= a["mean"] <= a["ci_high"]


def test_no_variation_gives_the_point_interval():
    assert mean_ci([4, 4, 4]) == {"mean": 4.0, "ci_low": 4.0, "ci_high": 4.0, "n": 3}
    assert paired([1, 2, 3], [2, 3, 4])["ci_low"] == paired([1, 2, 3], [2, 3, 4])["ci_high"] == 1.0


@pytest.mark.parametrize("call, words", [
    (lambda: paired([1, 2, 3], [1, 2]), "differ in length"),
    (lambda: paired([1], [2]), "at least 2"),
    (lambda: mean_ci([1.0, math.nan]), "NaN"),
    (lambda: mean_ci([1, 2], resamples=10), "at least 100"),
    (lambda: share([]), "empty"),
])
def test_refusals_name_the_problem(call, words):
    with pytest.raises(ValueError, match=words):
        call()


def test_share_has_the_wilson_interval():
    result = share([True] * 14 + [False] * 6)
    n, p, z = 20, 0.7, 1.959963984540054
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert result["share"] == 0.7 and result["k"] == 14 and result["n"] == 20
    assert result["ci_low"] == pytest.approx(centre - half) and result["ci_high"] == pytest.approx(centre + half)
