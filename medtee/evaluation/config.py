"""Schema of the `evaluation` section: what `medtee eval run` compares (the base model and a sealed adapter) and
how it generates. Imports nothing heavy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from medtee.schema import below_minimums

#: What `medtee eval run` compares per dialogue (base model vs. adapter), and what it says of each comparison: the
#: metrics `eval/<measure>_<statistic>` (the tracking allow-list is built from these).
EVAL_MEASURES = ("loss", "perplexity", "chrf", "rouge_l", "words", "length_ratio")
EVAL_STATISTICS = ("base", "tuned", "delta", "ci_low", "ci_high", "n")


@dataclass
class EvalConfig:
    # adapter.sealed of a training run on this same sealed dataset (it opens only under this dataset's release);
    # the digest covers its content, not its path
    adapter: Optional[str] = None
    generate: bool = True  # also generate the doctor's reply for held-out dialogues and score it (chrF, ROUGE-L)
    max_items: int = 64  # held-out dialogues generated for (all are scored for loss)
    max_new_tokens: int = 64  # tokens generated per reply
    do_sample: bool = False  # False: greedy decoding; True: sampling with temperature and top_p
    temperature: float = 1.0  # sampling temperature (do_sample only)
    top_p: float = 1.0  # nucleus sampling mass (do_sample only)
    seed: int = 0  # sampling and bootstrap seed
    resamples: int = 10_000  # bootstrap resamples for each 95% confidence interval
    # `medtee generate`: the study owner's public key (`medtee keys new`) the rating packet and its blinding are
    # encrypted to; the digest covers its content
    study_recipient: Optional[str] = None
    # `medtee generate`: a custodian's public key (another `medtee keys new` key) the blinding is sealed to instead,
    # so the study owner cannot open it before handing the ratings over; the digest covers its content
    blinding_recipient: Optional[str] = None

    def problems(self) -> list[str]:
        out = below_minimums(self, "evaluation", {"max_items": 1, "max_new_tokens": 1, "resamples": 100})
        if not self.temperature > 0:
            out.append(f"evaluation.temperature={self.temperature} must be positive")
        if not 0 < self.top_p <= 1:
            out.append(f"evaluation.top_p={self.top_p} must be in (0, 1]")
        return out
