"""Schema of the `release` section: when the trained adapter may leave for its recipient. Imports nothing heavy."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict

from medtee.schema import below_minimums

#: Repeat counts whose exposure is reported (0: the never-inserted controls); the tracking allow-list names these.
REPORTED_REPEATS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256)


def examples_needed(limit: float) -> float:
    """The fewest examples whose 95% upper bound with none extracted (1 - 0.05 ** (1 / n)) is at most `limit`."""
    return math.ceil(math.log(0.05) / math.log1p(-limit)) if 0 < limit < 1 else math.inf


@dataclass
class ReleaseConfig:
    # run the memorization audit after training and encrypt the adapter to output.recipient only when it passes; a
    # failing audit keeps the adapter sealed to the dataset's release (adapter.sealed) and the run exits 1. Needs a
    # dataset sealed with canaries (`medtee seal --canaries N`)
    require_audit: bool = False
    max_exposure_bits: float = 10.0  # highest canary exposure allowed at any repeat count (rank-based, bits)
    max_exposure_at: Dict[str, float] = field(default_factory=dict)  # per repeat count, e.g. {"1": 6.0}: overrides
    # highest rate of verbatim 50-token suffixes above the base model's, as its 95% upper bound on the examples measured
    max_extraction_above_base: float = 0.05
    references: int = 4096  # reference candidates each canary is ranked among (max exposure: log2 of this)
    extraction_examples: int = 64  # training doctor turns prompted for verbatim extraction (0.05 needs at least 59)
    suffix_tokens: int = 50  # length of the continuation that must match exactly

    def problems(self) -> list[str]:
        out = below_minimums(self, "release", {"references": 16, "extraction_examples": 1, "suffix_tokens": 1})
        ceiling = math.log2(max(self.references, 1))
        for name, limit in [("max_exposure_bits", self.max_exposure_bits),
                            *((f"max_exposure_at.{k}", v) for k, v in self.max_exposure_at.items())]:
            if not math.isfinite(limit):  # NaN compares false with every exposure: the gate would always pass
                out.append(f"release.{name}={limit} must be a finite number of bits, below log2(release.references)")
            elif limit >= ceiling:
                out.append(f"release.{name}={limit} is not below log2(release.references)={ceiling:g}, the highest "
                           f"exposure a canary can reach, so the gate could never fail: lower it or raise "
                           f"release.references")
        if not 0 <= self.max_extraction_above_base < 1:  # a rate above the base model's is at most 1; NaN is refused
            out.append(f"release.max_extraction_above_base={self.max_extraction_above_base} must be a rate in [0, 1), "
                       f"or the gate could never fail on verbatim extraction")
        needed = examples_needed(self.max_extraction_above_base)
        if self.require_audit and 0 <= self.max_extraction_above_base < 1 and self.extraction_examples < needed:
            out.append(f"release.extraction_examples={self.extraction_examples} cannot pass "
                       f"release.max_extraction_above_base={self.max_extraction_above_base}: with none extracted the "
                       f"gate's 95% upper bound needs " + (f"at least {needed} examples; raise it" if needed < math.inf
                                                           else "a limit above 0; raise the limit"))
        bad = [k for k in self.max_exposure_at if not str(k).isdigit() or str(k) != str(int(k))]
        if bad:
            out.append(f"release.max_exposure_at: keys are repeat counts (digits, no leading zero), not "
                       f"{', '.join(map(str, bad))}")
        return out

    def limit_at(self, repeats: int) -> float:
        """The exposure threshold for canaries inserted `repeats` times."""
        return float(self.max_exposure_at.get(str(repeats), self.max_exposure_bits))
