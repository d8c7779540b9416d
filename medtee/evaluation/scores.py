"""Scores of one reply against its reference: sentence-level chrF (sacreBLEU), ROUGE-L F (rouge-score), word counts
and the length ratio. Numbers only: nothing here keeps, logs or returns text. Pure Python, CPU only.

Words are `\\w+` runs (Unicode letters and digits), lower-cased, for the counts and for ROUGE-L alike: rouge-score's
default tokenizer drops every non-ASCII letter, which would score a German or Greek reply as empty.
"""

from __future__ import annotations

import functools
import re

_WORD = re.compile(r"\w+")


class _Words:
    """The tokenizer rouge-score calls: lower-cased Unicode words, no stemming."""

    @staticmethod
    def tokenize(text: str) -> list[str]:
        return _WORD.findall(text.lower())


@functools.cache
def _chrf():
    from sacrebleu.metrics import CHRF

    return CHRF()  # chrF: character 6-grams, beta 2, no word n-grams (not chrF++)


@functools.cache
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Words())


def chrf_signature() -> str:
    """sacreBLEU's signature of the chrF settings (record it beside the scores: it names version and parameters)."""
    return str(_chrf().get_signature())


def word_count(text: str) -> int:
    """The number of words (`\\w+` runs) in `text`."""
    return len(_WORD.findall(text))


def score_pair(hypothesis: str, reference: str) -> dict[str, float]:
    """`{chrf, rouge_l_f, hypothesis_words, reference_words, length_ratio}` of `hypothesis` against `reference`.

    chrf is on sacreBLEU's 0-100 scale, rouge_l_f on 0-1, length_ratio = hypothesis words / reference words.
    A reference with no word (a reply of "?" or an emoji) still scores: chrF compares characters as always;
    ROUGE-L F and the length ratio count an empty word sequence like any other, so two texts without a word agree
    (1.0 each), and a reply with words against one without has ROUGE-L F 0.0 and length ratio = its words (as
    against a one-word reference). ValueError (naming no text) if either is not a string.
    """
    if not isinstance(hypothesis, str) or not isinstance(reference, str):
        raise ValueError("score_pair takes two strings (hypothesis, reference)")
    ref_words, hyp_words = word_count(reference), word_count(hypothesis)
    if ref_words == 0:
        rouge_l_f = 1.0 if hyp_words == 0 else 0.0
        length_ratio = float(hyp_words) if hyp_words else 1.0
    else:
        rouge_l_f = float(_rouge().score(reference, hypothesis)["rougeL"].fmeasure)
        length_ratio = hyp_words / ref_words
    return {
        "chrf": float(_chrf().sentence_score(hypothesis, [reference]).score),
        "rouge_l_f": rouge_l_f,
        "hypothesis_words": hyp_words,
        "reference_words": ref_words,
        "length_ratio": length_ratio,
    }
