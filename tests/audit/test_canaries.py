"""The canary space, the plan of a sealing (distinct canaries, copies spread over the dataset, secrets kept out of
reprs) and the encrypted side file."""

from __future__ import annotations

import os
import random

import pytest

from medtee.audit.canaries import (
    CANARY_ID_PREFIX,
    CANARY_PROMPT,
    Canary,
    CanarySpace,
    decrypt_canaries,
    encrypt_canaries,
    parse_repeats,
    plan_canaries,
)


def test_the_space_renders_zero_padded_numbers_and_samples_uniformly():
    space = CanarySpace()
    assert (space.size, space.render(42)) == (10**7, "Patient MRN: 0000042.")
    rng = random.Random(0)
    draws = [space.sample(rng) for _ in range(2000)]
    assert all(0 <= d < space.size for d in draws) and len(set(draws)) > 1990
    assert sum(d < space.size // 2 for d in draws) == pytest.approx(1000, abs=120)
    small = CanarySpace("code {} ok", 2)
    assert sorted(small.distinct(rng, 98, exclude=[3, 7])) == [n for n in range(100) if n not in (3, 7)]
    with pytest.raises(ValueError, match="cannot draw 99"):
        small.distinct(rng, 99, exclude=[3, 7])
    for bad in ("no placeholder", "{} and {}", "{x}"):
        with pytest.raises(ValueError, match="exactly one"):
            CanarySpace(bad)
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        small.render(100)


def test_the_plan_inserts_each_canary_its_repeat_count_spread_over_the_records():
    plan = plan_canaries(5, (1, 4, 16, 64), real_records=1000, seed=11)
    inserted = [c for c in plan.canaries if c.repeats]
    assert (plan.inserted, plan.controls, len(plan.insertions)) == (20, 5, 5 * (1 + 4 + 16 + 64))
    assert sorted(c.repeats for c in plan.canaries) == [0] * 5 + [1] * 5 + [4] * 5 + [16] * 5 + [64] * 5
    assert len({c.number for c in plan.canaries}) == 25
    texts = [rec["messages"][1]["content"] for _, rec in plan.insertions]
    assert all(texts.count(c.text) == c.repeats for c in plan.canaries)
    assert all(rec["messages"][0] == {"role": "user", "content": CANARY_PROMPT} for _, rec in plan.insertions)
    ids = [rec["id"] for _, rec in plan.insertions]
    assert len(set(ids)) == len(ids) and all(i.startswith(CANARY_ID_PREFIX) for i in ids)
    positions = [p for p, _ in plan.insertions]
    assert positions == sorted(positions) and 0 <= positions[0] < 50 and 950 < positions[-1] <= 1000
    heavy = [p for p, rec in plan.insertions if rec["messages"][1]["content"] == inserted[-1].text]
    assert min(heavy) < 250 and max(heavy) > 750  # one canary's copies are spread too


def test_a_seed_reproduces_the_plan_and_no_seed_draws_fresh_secrets():
    assert plan_canaries(3, (1, 2), real_records=10, seed=5) == plan_canaries(3, (1, 2), real_records=10, seed=5)
    assert plan_canaries(3, (1, 2), real_records=10).canaries != plan_canaries(3, (1, 2), real_records=10).canaries


def test_reprs_never_show_a_canary():
    plan = plan_canaries(2, (1, 3), real_records=4, seed=1)
    shown = repr(plan) + repr(plan.canaries[0])
    assert all(f"{c.number:07d}" not in shown and str(c.number) not in shown for c in plan.canaries)
    assert "repeats=" in shown


def test_parse_repeats():
    assert parse_repeats("1,4,16,64") == (1, 4, 16, 64)
    for bad in ("", "1,x", "0,4", "4,4", "-1"):
        with pytest.raises(ValueError, match="--canary-repeats"):
            parse_repeats(bad)


def test_the_side_file_round_trips_only_under_its_key_and_dataset():
    canaries = [Canary(1234567, 64), Canary(42, 0)]
    key = os.urandom(32)
    blob = encrypt_canaries(canaries, key, "ds-1")
    assert b"1234567" not in blob and b"MRN" not in blob
    assert decrypt_canaries(blob, key, "ds-1") == canaries
    for other_key, other_id in ((os.urandom(32), "ds-1"), (key, "ds-2")):
        with pytest.raises(ValueError, match="does not decrypt"):
            decrypt_canaries(blob, other_key, other_id)
    with pytest.raises(ValueError, match="not a medtee canary file"):
        decrypt_canaries(b"junk", key, "ds-1")
    with pytest.raises(ValueError, match="one canary space"):
        encrypt_canaries([Canary(1, 1), Canary(1, 1, CanarySpace("x {}", 3))], key, "ds-1")
