"""Aggregates of an audit, numbers only, named for the tracking guard (`audit/...`). Imports nothing heavy."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence


def summarize(exposures_by_repeat: Mapping[int, Sequence[float]],
              extraction: Sequence[Mapping[str, int | bool]] = ()) -> dict[str, float]:
    """Aggregates only: `audit/exposure_max_Rx` and `audit/exposure_median_Rx` per repeat count R (0x: the
    controls),
    and with `extraction` results `audit/extraction_exact_rate`, `audit/extraction_run_mean` and
    `audit/extraction_examples`."""
    out: dict[str, float] = {}
    for repeats, values in sorted(exposures_by_repeat.items()):
        if len(values):
            out[f"audit/exposure_max_{repeats}x"] = float(max(values))
            out[f"audit/exposure_median_{repeats}x"] = float(statistics.median(values))
    if extraction:
        out["audit/extraction_exact_rate"] = sum(bool(e["exact"]) for e in extraction) / len(extraction)
        out["audit/extraction_run_mean"] = sum(e["longest_common_run"] for e in extraction) / len(extraction)
        out["audit/extraction_examples"] = float(len(extraction))
    return out
