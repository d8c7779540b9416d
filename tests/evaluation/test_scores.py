"""Reply scores: chrF (sacreBLEU), ROUGE-L F (rouge-score) on Unicode words, word counts, length ratio."""

from __future__ import annotations

import pytest

from medtee.evaluation.scores import chrf_signature, score_pair, word_count


def test_identical_reply_scores_full_marks():
    s = score_pair("Take ibuprofen 400 mg twice a day.", "Take ibuprofen 400 mg twice a day.")
    assert s == {"chrf": pytest.approx(100.0), "rouge_l_f": pytest.approx(1.0), "hypothesis_words": 7,
                 "reference_words": 7, "length_ratio": 1.0}


def test_rouge_l_matches_the_hand_computed_lcs():
    # LCS of "the cat sat on the mat" / "the cat is on the mat" is "the cat on the mat": 5 of 6 words each side
    s = score_pair("the cat sat on the mat", "the cat is on the mat")
    assert s["rouge_l_f"] == pytest.approx(5 / 6)
    assert 0 < s["chrf"] < 100


def test_length_ratio_and_word_counts():
    s = score_pair("one two three", "one two three four five six")
    assert (s["hypothesis_words"], s["reference_words"], s["length_ratio"]) == (3, 6, 0.5)
    assert word_count("Blutdruck: 120/80, gut.") == 4  # Blutdruck, 120, 80, gut


def test_non_ascii_words_count_for_rouge():
    assert score_pair("Übelkeit und Schwindel", "übelkeit und schwindel")["rouge_l_f"] == pytest.approx(1.0)


def test_scores_are_numbers_only():
    assert all(isinstance(v, (int, float)) for v in score_pair("a reply", "the reference").values())


def test_a_reference_without_a_word_scores_instead_of_failing_the_run():
    assert score_pair("?", "?") == {"chrf": 100.0, "rouge_l_f": 1.0, "hypothesis_words": 0, "reference_words": 0,
                                    "length_ratio": 1.0}
    s = score_pair("take two tablets", "\N{THUMBS UP SIGN}")
    assert s["rouge_l_f"] == 0.0 and s["length_ratio"] == 3.0 and s["reference_words"] == 0
    assert all(isinstance(v, (int, float)) and v == v for v in score_pair("CANARY-7731 reply", "  ").values())


def test_a_non_string_is_refused_without_quoting_text():
    with pytest.raises(ValueError, match="two strings") as err:
        score_pair("CANARY-7731 reply", None)
    assert "CANARY" not in str(err.value)


def test_the_chrf_signature_names_its_settings():
    assert "nc:6" in chrf_signature() and "nw:0" in chrf_signature()
