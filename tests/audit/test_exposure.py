"""Exposure as tensorflow-privacy's secret sharer defines it: their published test cases, ties, order, bounds."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from medtee.audit.exposure import exposure_extrapolation, exposure_interpolation, max_exposure, rank_exposure


def test_interpolation_reproduces_tensorflow_privacy():
    """`exposures_test.test_exposure_interpolation`: references 1..16; ranks 1, 17 and 4 (3.5 ties nothing)."""
    perplexities = {"1": [0, 0.1], "2": [20.0], "5": [3.5], "8": [3.5]}
    reference = [float(x) for x in range(1, 17)]
    result = exposure_interpolation(perplexities, reference)
    largest, smallest, rank4 = math.log2(16), math.log2(16) - math.log2(17), math.log2(16) - math.log2(4)
    expected = {"1": [largest] * 2, "2": [smallest], "5": [rank4], "8": [rank4]}
    assert result.keys() == expected.keys()
    for key in expected:
        np.testing.assert_almost_equal(result[key], expected[key])


def test_extrapolation_reproduces_tensorflow_privacy():
    """`exposures_test.test_exposure_extrapolation`: skew-normal(4, 0, 1) samples, -log2 of the fitted CDF."""
    rng = np.random.default_rng(2021)
    parameters = (4, 0, 1)
    perplexities = {"1": stats.skewnorm.rvs(*parameters, size=(2,), random_state=rng),
                    "10": stats.skewnorm.rvs(*parameters, size=(5,), random_state=rng)}
    reference = stats.skewnorm.rvs(*parameters, size=(10000,), random_state=rng)
    result = exposure_extrapolation(perplexities, reference)
    fitted = stats.skewnorm.fit(reference)
    assert result.keys() == perplexities.keys()
    for key in perplexities:
        np.testing.assert_almost_equal(result[key], -np.log2(stats.skewnorm.cdf(perplexities[key], *fitted)))


def test_a_tie_counts_the_reference_ahead_of_the_canary():
    reference = [1.0, 2.0, 2.0, 3.0]
    assert rank_exposure(2.0, reference) == pytest.approx(2 - math.log2(4))  # 1, 2, 2 ahead: rank 4
    assert rank_exposure(np.nextafter(2.0, 0), reference) == pytest.approx(2 - math.log2(2))
    assert rank_exposure(1.0, reference) == pytest.approx(2 - 1)


def test_exposures_keep_the_input_order():
    result = exposure_interpolation({64: [20.0, 0.0, 3.5]}, [float(x) for x in range(1, 17)])
    np.testing.assert_almost_equal(result[64], [4 - math.log2(17), 4.0, 4 - math.log2(4)])


def test_extrapolation_is_inf_where_the_cdf_underflows():
    reference = stats.skewnorm.rvs(4, 0, 1, size=2000, random_state=np.random.default_rng(0))
    result = exposure_extrapolation({0: [-60.0, 0.5]}, reference)[0]
    assert result[0] == np.inf and 0 < result[1] < 10


def test_bounds_and_bad_input():
    assert max_exposure(1024) == 10.0
    assert rank_exposure(-1e9, range(1024)) == 10.0
    assert rank_exposure(1e9, range(1024)) == pytest.approx(10 - math.log2(1025))
    with pytest.raises(ValueError, match="at least one reference"):
        exposure_interpolation({0: [1.0]}, [])
    with pytest.raises(ValueError, match="NaN"):
        exposure_interpolation({0: [float("nan")]}, [1.0])
    with pytest.raises(ValueError, match="NaN"):
        exposure_extrapolation({0: [1.0]}, [1.0, float("nan")])
