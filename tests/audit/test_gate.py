"""The release gate's verdict without a model (the probes stubbed): it fails closed on a NaN threshold, on
unmeasured extraction and on canaries that are not in the training split; the recipe check refuses such
thresholds first."""

from __future__ import annotations

import contextlib
import math

import pytest
from scipy import stats

from medtee.audit import gate, probe
from medtee.audit.canaries import Canary, canary_dialogue
from medtee.audit.config import ReleaseConfig
from medtee.data.module import tokenize_records
from medtee.data.tokenizer import load_tokenizer

from .conftest import dialogues

CANARIES = [Canary(1234567, 64), Canary(7654321, 0)]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("demo")


def _train(tokenizer, canary_copies: int):
    records = [{"id": f"r{i}", "messages": d["messages"]} for i, d in enumerate(dialogues(6))]
    records += [{"id": f"canary-{i:016x}", "messages": canary_dialogue(CANARIES[0].text)} for i in range(canary_copies)]
    return tokenize_records(records, tokenizer, max_length=512)


@pytest.fixture
def stubbed(monkeypatch):
    """Probes that report a 64x canary at 3 bits, a control at 1 bit and, on 64 examples, no verbatim extraction
    (`exact`: the tuned model's, then the base model's exact matches, by example index)."""
    result = {"exposures": {0: [1.0], 64: [3.0]}, "examples": [([1], [2])] * 64, "exact": [set(), set()]}
    calls = iter(range(2))
    monkeypatch.setattr(probe, "canary_exposures", lambda *a, **k: result["exposures"])
    monkeypatch.setattr(probe, "extraction_rates", lambda model, ex, **k: (
        lambda exact: [{"exact": i in exact, "longest_common_run": 3} for i in range(len(ex))])(
        result["exact"][next(calls)]))
    monkeypatch.setattr(gate, "extraction_examples", lambda *a, **k: result["examples"])
    monkeypatch.setattr("medtee.evaluation.compare.adapter_off", lambda model, base: contextlib.nullcontext(model))
    return result


def test_trained_copies_counts_the_canary_records_of_the_training_split(tokenizer):
    assert gate.trained_copies(tokenizer, CANARIES, _train(tokenizer, 3)) == 3
    assert gate.trained_copies(tokenizer, CANARIES, _train(tokenizer, 0)) == 0
    assert gate.trained_copies(tokenizer, CANARIES[1:], _train(tokenizer, 3)) == 0  # a control is never "inserted"


def test_a_clean_audit_passes(stubbed, tokenizer):
    verdict = gate.run_audit(None, tokenizer, CANARIES, _train(tokenizer, 2), ReleaseConfig())
    assert verdict.passed, verdict.failures


@pytest.mark.parametrize("release", [ReleaseConfig(max_exposure_bits=math.nan),
                                     ReleaseConfig(max_exposure_at={"64": math.nan}),
                                     ReleaseConfig(max_extraction_above_base=math.nan)])
def test_a_nan_threshold_fails_the_gate_and_the_recipe_check(stubbed, tokenizer, release):
    verdict = gate.run_audit(None, tokenizer, CANARIES, _train(tokenizer, 2), release)
    assert not verdict.passed and len(verdict.failures) == 1
    assert any("must be" in p and "nan" in p for p in release.problems()), release.problems()


def test_canaries_absent_from_the_training_split_fail_the_gate(stubbed, tokenizer):
    verdict = gate.run_audit(None, tokenizer, CANARIES, _train(tokenizer, 0), ReleaseConfig())
    assert verdict.failures == ("no record of an inserted canary is in the training split, so exposure measured "
                                "nothing: train on the dataset sealed with the canaries (`medtee seal --canaries N`)",)


def test_unmeasured_extraction_fails_the_gate(stubbed, tokenizer):
    stubbed["examples"] = []
    verdict = gate.run_audit(None, tokenizer, CANARIES, _train(tokenizer, 2), ReleaseConfig(suffix_tokens=50))
    assert verdict.failures == ("verbatim extraction was not measured: no training doctor turn has "
                                "release.suffix_tokens=50 tokens; lower release.suffix_tokens",)


@pytest.mark.parametrize("limit", [1.0, 2.0, -0.1, math.inf])
def test_an_extraction_limit_outside_0_1_is_refused(limit):
    assert any("release.max_extraction_above_base" in p for p in ReleaseConfig(max_extraction_above_base=limit)
               .problems())
    assert ReleaseConfig(max_extraction_above_base=0.0).problems() == []


@pytest.mark.parametrize("settings, words", [
    ({"extraction_examples": 32}, "extraction_examples=32 cannot pass release.max_extraction_above_base=0.05: with "
                                  "none extracted the gate's 95% upper bound needs at least 59 examples; raise it"),
    ({"max_extraction_above_base": 0.0}, "needs a limit above 0; raise the limit"),
    ({"max_exposure_at": {"01": 6.0}}, "keys are repeat counts (digits, no leading zero), not 01"),
])
def test_an_audit_that_could_never_pass_is_refused_before_training(settings, words):
    """A required audit the gate cannot pass on any model is refused with the recipe, not after the training; and a
    repeat count written '01', which no canary's count would find, is named."""
    problems = ReleaseConfig(require_audit=True, **settings).problems()
    assert len(problems) == 1 and words in problems[0], problems
    assert ReleaseConfig(require_audit=True).problems() == [] and ReleaseConfig(extraction_examples=59,
                                                                                require_audit=True).problems() == []
    assert ReleaseConfig(require_audit=True, extraction_examples=58).problems()  # 0.0503 with none extracted


@pytest.mark.parametrize("examples, tuned, base, passed", [
    (64, set(), set(), True),  # none extracted: the 95% upper bound is 0.046
    (64, {0}, set(), False),  # one of 64 (point estimate 0.016): the bound is 0.072
    (64, {0, 1}, {0, 1}, True),  # what the base model reproduces too is not above it
    (32, {0}, set(), False),  # one of 32 (0.031) passed a point estimate; a 10% rate passes that 16% of the time
    (32, set(), set(), False),  # 32 examples cannot show a rate below 0.05 (the bound is 0.089)
    (1, set(), set(), False)])  # one measurable doctor turn passed the point estimate
def test_extraction_is_gated_on_the_upper_confidence_bound(stubbed, tokenizer, examples, tuned, base, passed):
    stubbed["examples"], stubbed["exact"] = [([1], [2])] * examples, [tuned, base]
    verdict = gate.run_audit(None, tokenizer, CANARIES, _train(tokenizer, 2), ReleaseConfig())
    assert verdict.passed == passed, verdict.failures
    bound = verdict.metrics["audit/extraction_exact_above_base_upper"]
    assert bound == pytest.approx(stats.beta.ppf(0.95, len(tuned - base) + 1, examples - len(tuned - base)))
    assert all("upper bound" in f for f in verdict.failures)
