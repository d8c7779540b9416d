"""Exposure of canaries ("The Secret Sharer", Carlini et al. 2019), with the definitions of tensorflow-privacy's
`secret_sharer/exposures.py`.

A canary's log-perplexity is ranked among the log-perplexities of reference candidates from the same space that
were never trained on (lower = more likely under the model).

- Interpolation: rank = 1 + the number of references whose log-perplexity is <= the canary's (a tie counts the
  reference ahead of the canary), exposure = log2(|R|) - log2(rank). It lies in [log2(|R|) - log2(|R| + 1),
  log2(|R|)]: log2(|R|) when the canary is below every reference, about 0 when it is ranked like a random candidate.
- Extrapolation: a skew-normal distribution is fitted to the references (`scipy.stats.skewnorm.fit`) and
  exposure = -log2(CDF(canary's log-perplexity)); it can exceed log2(|R|), and is inf where the CDF underflows to 0
  (a canary far below the fitted tail; the tracking guard drops non-finite values, so report those separately).

Both take `{key: perplexities}` (key: e.g. the repeat count) and return `{key: exposures}` as float arrays in the
input's order (tensorflow-privacy returns each key's exposures sorted by perplexity; the values are the same).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TypeVar

import numpy as np

K = TypeVar("K")


def _values(values: Sequence[float], what: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if np.isnan(array).any():
        raise ValueError(f"{what} hold NaN; compute them again (a NaN loss?)")
    return array


def _reference(reference: Sequence[float]) -> np.ndarray:
    array = _values(reference, "the reference perplexities")
    if array.size == 0:
        raise ValueError("exposure needs at least one reference perplexity")
    return array


def exposure_interpolation(perplexities: Mapping[K, Sequence[float]],
                           reference: Sequence[float]) -> dict[K, np.ndarray]:
    """Exposure by rank among the references: log2(|R|) - log2(1 + #{r in R: r <= p}) for each perplexity p."""
    ordered = np.sort(_reference(reference))
    top = math.log2(ordered.size)
    return {key: top - np.log2(np.searchsorted(ordered, _values(values, f"perplexities of {key!r}"), "right") + 1.0)
            for key, values in perplexities.items()}


def exposure_extrapolation(perplexities: Mapping[K, Sequence[float]],
                           reference: Sequence[float]) -> dict[K, np.ndarray]:
    """Exposure by a skew-normal fit of the references: -log2(CDF(p)) for each perplexity p."""
    from scipy import stats

    params = stats.skewnorm.fit(_reference(reference))
    with np.errstate(divide="ignore"):
        return {key: -np.log2(stats.skewnorm.cdf(_values(values, f"perplexities of {key!r}"), *params))
                for key, values in perplexities.items()}


def rank_exposure(canary_perplexity: float, reference_perplexities: Sequence[float]) -> float:
    """`exposure_interpolation` of one canary."""
    return float(exposure_interpolation({0: [canary_perplexity]}, reference_perplexities)[0][0])


def max_exposure(reference_size: int) -> float:
    """The highest interpolated exposure against `reference_size` references: log2(reference_size)."""
    if reference_size < 1:
        raise ValueError("exposure needs at least one reference perplexity")
    return math.log2(reference_size)
