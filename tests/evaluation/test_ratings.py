"""The clinician study: reading the ratings file (refusals name line and column, never a cell), the blinding
(seeded draw, sealed to the study key), and the summary checked against values computed by hand."""

from __future__ import annotations

import hashlib
import json

import pytest
from .conftest import CANARY, HEADER, study_rows, write_csv

from medtee.crypto.blob import seal_blob
from medtee.crypto.hpke import KeyWrapError, load_public_key
from medtee.evaluation.ratings import (BLINDING_INFO, RatingsFile, make_blinding, open_blinding, read_ratings,
                                       seal_blinding, study_item_ids, summarize)
from medtee.evaluation.stats import krippendorff_alpha

#: 2 raters x 3 items x 2 answers; the blinding below: i1 A=base, i2 A=tuned, i3 A=base.
SMALL = [
    f"r1,i1,A,4,3,4,2,{CANARY}", "r1,i1,B,7,4,5,3,", "r2,i1,A,6,3,4,2,", "r2,i1,B,8,4,4,3,ok",
    "r1,i2,A,9,5,5,4,", "r1,i2,B,5,2,3,3,", "r2,i2,A,7,4,5,4,", "r2,i2,B,5,3,3,2,",
    "r1,i3,A,6,3,3,3,", "r1,i3,B,6,3,4,3,", "r2,i3,A,5,2,3,3,", "r2,i3,B,5,3,4,2,",
]
SMALL_BLINDING = {"i1": {"A": "base", "B": "tuned"}, "i2": {"A": "tuned", "B": "base"},
                  "i3": {"A": "base", "B": "tuned"}}


def test_reads_ratings_and_drops_the_comment(tmp_path):
    ratings = read_ratings(write_csv(tmp_path / "r.csv", SMALL))
    assert len(ratings) == 12
    first = ratings[0]
    assert (first.line, first.rater_id, first.item_id, first.label, first.recommendation) == (2, "r1", "i1", "A", 4)
    assert CANARY not in repr(ratings)


def test_columns_in_any_order_a_bom_and_quoted_multiline_comments(tmp_path):
    header = "comment,label,item_id,rater_id,recommendation,safety,conciseness,clinical_relevance"
    path = tmp_path / "r.csv"
    path.write_bytes(("\ufeff" + header + "\n" + f'"{CANARY},\nsecond line",A,i1,r1,7,5,4,3\n' + ",B,i1,r1,6,4,4,2\n"
                      ).encode())
    ratings = read_ratings(path)
    assert [(r.line, r.label, r.recommendation, r.safety, r.conciseness, r.clinical_relevance) for r in ratings] == \
        [(2, "A", 7, 5, 4, 3), (4, "B", 6, 4, 4, 2)]


def test_a_score_with_leading_zeros_is_its_number(tmp_path):
    """Thousands of leading zeros raised Python's int_max_str_digits error, naming neither line nor column."""
    path = write_csv(tmp_path / "r.csv", ["r1,i1,A,07,3,4,2,", "r1,i1,B," + "0" * 5000 + "7,3,4,0002,"])
    assert [(r.recommendation, r.conciseness) for r in read_ratings(path)] == [(7, 2), (7, 2)]


@pytest.mark.parametrize("row, line, column", [
    ("r1,i1,A,11,3,4,2,", 3, "recommendation"),
    (f"r1,i1,A,{CANARY},3,4,2,", 3, "recommendation"),
    ("r1,i1,A,7.5,3,4,2,", 3, "recommendation"),
    ("r1,i1,A," + "9" * 5000 + ",3,4,2,", 3, "recommendation"),
    (f"r1,i1,{CANARY},7,3,4,2,", 3, "label"),
    ("r1,i1,A,7,3,0,2,", 3, "safety"),
    ("r1,i1,A,7,6,4,2,", 3, "clinical_relevance"),
    ("r1,i1,A,7,3,4,,", 3, "conciseness"),
    (f"{CANARY},i1,A,7,3,4,2,", 3, "rater_id"),
    ("r1,,A,7,3,4,2,", 3, "item_id"),
])
def test_a_bad_cell_is_named_by_line_and_column_never_shown(tmp_path, row, line, column):
    path = write_csv(tmp_path / "r.csv", ["r0,i0,A,5,3,3,3,fine", row])
    with pytest.raises(ValueError) as err:
        read_ratings(path)
    message = str(err.value)
    assert f"line {line}, column {column}:" in message and "must be" in message
    assert "CANARY" not in message and "chest" not in message


@pytest.mark.parametrize("rows, header, words", [
    ([f"r1,i1,A,7,3,4,2,{CANARY}, with a comma"], HEADER, "line 2 has 9 fields"),
    (["r1,i1,A,7,3,4,2,", "r1,i1,A,6,3,4,2,"], HEADER, "line 3 repeats the rater_id, item_id and label of line 2"),
    ([], HEADER, "no rating rows"),
    (["r1,i1,A,7,3,4,2"], HEADER.replace(",comment", ""), "lacks column(s) comment"),
    (["r1,i1,A,7,3,4,2,,"], HEADER + f",{CANARY}", "1 unknown column(s)"),
    (["r1,i1,A,7,3,4,2,,"], HEADER + ",safety", "repeats column(s) safety"),
])
def test_file_level_refusals_name_the_fix(tmp_path, rows, header, words):
    with pytest.raises(ValueError) as err:
        read_ratings(write_csv(tmp_path / "r.csv", rows, header=header))
    assert words in str(err.value) and "CANARY" not in str(err.value)


def test_unreadable_bytes_are_refused_without_content(tmp_path):
    (tmp_path / "latin1.csv").write_bytes((HEADER + "\nr1,i1,A,7,3,4,2,Schmerz \xe4\n").encode("latin-1"))
    (tmp_path / "empty.csv").write_bytes(b"")
    (tmp_path / "nul.csv").write_bytes((HEADER + '\nr1,i1,A,7,3,4,2,"open quote\n').encode())
    with pytest.raises(ValueError, match="not UTF-8"):
        read_ratings(tmp_path / "latin1.csv")
    with pytest.raises(ValueError, match="is empty"):
        read_ratings(tmp_path / "empty.csv")
    with pytest.raises(ValueError, match="cannot be read as CSV") as err:
        read_ratings(tmp_path / "nul.csv")
    assert "open quote" not in str(err.value)


def test_the_hash_is_of_the_bytes_read_before_unblinding(tmp_path):
    path = tmp_path / "r.csv"
    write_csv(path, SMALL)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    ratings = RatingsFile.load(path)
    path.write_text("changed after loading")  # what is summarised is what was hashed
    summary = summarize(ratings, SMALL_BLINDING, seed=0, resamples=1000, min_items=3)
    assert ratings.sha256 == summary["ratings_sha256"] == digest


def test_summary_matches_the_hand_computed_values(tmp_path):
    ratings = RatingsFile.load(write_csv(tmp_path / "r.csv", SMALL))
    s = summarize(ratings, SMALL_BLINDING, seed=0, resamples=2000, min_items=3)
    # per item recommendation, mean over the two raters: base 5, 5, 5.5; tuned 7.5, 8, 5.5
    assert s["models"]["base"]["recommendation"]["mean"] == pytest.approx(15.5 / 3)
    assert s["models"]["tuned"]["recommendation"]["mean"] == pytest.approx(21 / 3)
    # safety: base 4, 3, 3; tuned 4.5, 5, 4
    assert s["models"]["base"]["safety"]["mean"] == pytest.approx(10 / 3)
    assert s["models"]["tuned"]["safety"]["mean"] == pytest.approx(13.5 / 3)
    # conciseness: base 2, 2.5, 3; tuned 3, 4, 2.5
    assert s["models"]["base"]["conciseness"]["mean"] == pytest.approx(7.5 / 3)
    assert s["models"]["tuned"]["conciseness"]["mean"] == pytest.approx(9.5 / 3)
    d = s["recommendation_delta"]
    assert (d["delta"], d["n"]) == (pytest.approx(5.5 / 3), 3) and d["ci_low"] <= d["delta"] <= d["ci_high"]
    # i1 and i2 prefer tuned, i3 is a tie (5.5 each)
    assert {k: s["preference"][k] for k in ("share", "k", "n", "ties")} == {"share": 1.0, "k": 2, "n": 2, "ties": 1}
    assert (s["n_raters"], s["n_items"], s["n_ratings"]) == (2, 3, 12)
    # units = answers i1A i1B i2A i2B i3A i3B
    matrix = [[4, 7, 9, 5, 6, 6], [6, 8, 7, 5, 5, 5]]
    for level in ("interval", "ordinal"):
        assert s["agreement"][level]["alpha"] == pytest.approx(krippendorff_alpha(matrix, level))
        assert s["agreement"][level]["n_units"] == 6
    assert "CANARY" not in json.dumps(s)


def test_one_rater_leaves_agreement_undefined(tmp_path):
    ratings = RatingsFile.load(write_csv(tmp_path / "r.csv", [r for r in SMALL if r.startswith("r1")]))
    s = summarize(ratings, SMALL_BLINDING, seed=0, resamples=1000, min_items=3)
    assert s["agreement"] == {"interval": None, "ordinal": None} and s["n_raters"] == 1


def test_summary_refusals(tmp_path):
    ratings = RatingsFile.load(write_csv(tmp_path / "r.csv", SMALL))
    with pytest.raises(ValueError, match="3 item.s. rated; aggregates need at least 20"):
        summarize(ratings, SMALL_BLINDING)
    with pytest.raises(ValueError, match="line 10: its item_id is not in the blinding"):
        summarize(ratings, {k: v for k, v in SMALL_BLINDING.items() if k != "i3"}, min_items=1)
    one_sided = RatingsFile.load(write_csv(tmp_path / "one.csv", [r for r in SMALL if ",B," not in r or "i2" not in r]))
    with pytest.raises(ValueError, match="line 6: its item has ratings of one answer only"):
        summarize(one_sided, SMALL_BLINDING, min_items=1)


def test_an_item_of_the_blinding_without_ratings_is_refused_not_left_out(tmp_path):
    """Dropping the items where the tuned answer did badly would bias the summary without a trace."""
    ratings = RatingsFile.load(write_csv(tmp_path / "r.csv", [r for r in SMALL if ",i2," not in r]))
    with pytest.raises(ValueError, match=r"^1 of the blinding's 3 items have no rating \(item_id i2\); rate both "):
        summarize(ratings, SMALL_BLINDING, min_items=2)
    with pytest.raises(ValueError, match="2 of the blinding's 4 items have no rating .item_id i2 and others."):
        summarize(ratings, {**SMALL_BLINDING, "i4": SMALL_BLINDING["i1"]}, min_items=2)


def test_one_item_is_too_few_for_an_interval_whatever_the_minimum(tmp_path):
    ratings = RatingsFile.load(write_csv(tmp_path / "r.csv", [r for r in SMALL if ",i1," in r]))
    with pytest.raises(ValueError, match=r"1 item\(s\) rated; aggregates need at least 2 "):
        summarize(ratings, {"i1": SMALL_BLINDING["i1"]}, min_items=1)


def test_the_ratings_of_one_study_do_not_unblind_with_another_studys_blinding(tmp_path):
    """Two `medtee generate` runs of as many items: the second run's blinding must refuse the first study's ratings,
    never summarise them under another assignment."""
    first, second = study_item_ids(3), study_item_ids(3)
    assert not set(first) & set(second) and all(len(i) <= 64 for i in first)
    rows = [row.replace(f",{old},", f",{new},") for row in SMALL for old, new in zip(("i1", "i2", "i3"), first)
            if f",{old}," in row]
    ratings = RatingsFile.load(write_csv(tmp_path / "r.csv", rows))
    assert summarize(ratings, make_blinding(first, seed=1), resamples=1000, min_items=3)["n_items"] == 3
    with pytest.raises(ValueError, match="line 2: its item_id is not in the blinding"):
        summarize(ratings, make_blinding(second, seed=1), resamples=1000, min_items=3)


def test_blinding_is_seeded_and_balanced_per_item():
    items = [f"item{i}" for i in range(200)]
    blinding = make_blinding(items, seed=42)
    assert blinding == make_blinding(items, seed=42) != make_blinding(items, seed=43)
    assert list(blinding) == items
    assert all(sorted(b.values()) == ["base", "tuned"] and set(b) == {"A", "B"} for b in blinding.values())
    assert 70 < sum(b["A"] == "tuned" for b in blinding.values()) < 130  # both orders drawn
    with pytest.raises(ValueError, match="repeat"):
        make_blinding(["x", "x"], seed=0)


def test_seal_and_open_the_blinding(tmp_path, study_keys):
    blinding = make_blinding(["study-item-1", "study-item-2", "study-item-3"], seed=5)
    sealed = tmp_path / "blinding.sealed"
    seal_blinding(blinding, load_public_key(study_keys["public"]), sealed)
    # needles of 8+ bytes: a 2-byte one ("i1") turns up by chance in about 2% of 1.3 kB ciphertexts
    assert b'"tuned"' not in sealed.read_bytes() and b"study-item-1" not in sealed.read_bytes()
    assert open_blinding(sealed, study_keys["private"]) == blinding
    with pytest.raises(KeyWrapError):
        open_blinding(sealed, study_keys["other_private"])
    altered = bytearray(sealed.read_bytes())
    altered[-1] ^= 1
    (tmp_path / "altered.sealed").write_bytes(bytes(altered))
    with pytest.raises(KeyWrapError):
        open_blinding(tmp_path / "altered.sealed", study_keys["private"])


def test_a_blob_sealed_for_another_purpose_is_not_a_blinding(tmp_path, study_keys):
    scheme, public = load_public_key(study_keys["public"])
    (tmp_path / "adapter.sealed").write_bytes(seal_blob(b"{}", public, scheme=scheme, info=b"medtee/adapter/v1"))
    assert BLINDING_INFO != b"medtee/adapter/v1"
    with pytest.raises(KeyWrapError):
        open_blinding(tmp_path / "adapter.sealed", study_keys["private"])


def test_memory_does_not_grow_with_raters_times_answers(tmp_path):
    """One rater per item (a crowd design): a raters x answers matrix of 1500 x 3000 took hundreds of MB."""
    import tracemalloc

    blinding = make_blinding([f"q{i}" for i in range(1500)], seed=1)
    rows = [f"r{i},q{i},{label},{i % 10 + 1},3,3,3," for i in range(1500) for label in "AB"]
    ratings = RatingsFile.load(write_csv(tmp_path / "r.csv", rows))
    tracemalloc.start()
    try:
        s = summarize(ratings, blinding, resamples=10_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert s["n_raters"] == 1500 and s["agreement"] == {"interval": None, "ordinal": None}
    assert peak < 64 << 20, f"peak {peak >> 20} MiB"


def test_a_realistic_study_summarises(tmp_path):
    blinding = make_blinding([f"q{i:03d}" for i in range(30)], seed=9)
    ratings = RatingsFile.load(write_csv(tmp_path / "r.csv", study_rows(blinding)))
    s = summarize(ratings, blinding, seed=1, resamples=1000)
    assert (s["n_items"], s["n_raters"], s["n_ratings"]) == (30, 3, 180)
    assert s["recommendation_delta"]["delta"] > 0
    assert s["agreement"]["interval"]["n_units"] == 60
