"""The synthetic demo dialogues: deterministic, varied, in the chat schema; the JSONL writer is atomic."""

from __future__ import annotations

import json
import re

import pytest

from medtee.data import synthetic
from medtee.data.synthetic import generate_dialogues, write_jsonl


def test_deterministic_and_prefix_stable():
    first = generate_dialogues(40, seed=3)
    assert first == generate_dialogues(40, seed=3)
    assert generate_dialogues(10, seed=3) == first[:10]
    assert [d["messages"] for d in generate_dialogues(40, seed=4)] != [d["messages"] for d in first]
    assert [d["id"] for d in first[:3]] == ["synthetic:3:0", "synthetic:3:1", "synthetic:3:2"]


def test_schema_and_variety():
    dialogues = generate_dialogues(400, seed=0)
    for d in dialogues:
        assert re.fullmatch(r"synthetic:0:\d+", d["id"])
        for m in d["messages"]:
            assert set(m) == {"role", "content"} and m["role"] in {"user", "assistant", "system"}
            assert isinstance(m["content"], str) and m["content"].strip()
    text = "\n".join(m["content"] for d in dialogues for m in d["messages"])
    # >= 20 conditions, and every one of them is used
    assert len(synthetic._CONDITIONS) >= 20
    for condition, (_, _, _, assessment, _) in synthetic._CONDITIONS.items():
        assert assessment in text, condition
    turns = [len([m for m in d["messages"] if m["role"] != "system"]) for d in dialogues]
    assert min(turns) == 2 and 20 <= max(turns) <= 32
    spoken = [[m for m in d["messages"] if m["role"] != "system"] for d in dialogues]
    assert sum(s[0]["role"] == "assistant" for s in spoken) > 100  # opens with the doctor
    assert sum(s[0]["role"] == "user" for s in spoken) > 50  # opens with the patient
    assert sum(s[-1]["role"] == "user" for s in spoken) > 50  # ends with the patient
    assert any(d["messages"][0]["role"] == "system" for d in dialogues)
    assert any(a["role"] == b["role"] for s in spoken for a, b in zip(s, s[1:]))  # consecutive same-role turns


def test_write_jsonl_roundtrip(tmp_path):
    records = generate_dialogues(5, seed=1)
    target = tmp_path / "demo.jsonl"
    write_jsonl(records, target)
    assert [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines()] == records
    assert [p.name for p in tmp_path.iterdir()] == ["demo.jsonl"]


def test_write_jsonl_is_atomic(tmp_path):
    target = tmp_path / "demo.jsonl"
    target.write_text("previous\n")
    records = generate_dialogues(3) + [{"id": "bad", "messages": object()}]  # fails half-way
    with pytest.raises(TypeError):
        write_jsonl(records, target)
    assert target.read_text() == "previous\n"
    assert [p.name for p in tmp_path.iterdir()] == ["demo.jsonl"]
