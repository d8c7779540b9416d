"""The offline demo tokenizer: deterministic, Gemma 3's special tokens and template, lossless on any text."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from medtee.data import tokenizer as demo
from medtee.data.chat import GEMMA3_TRAINING_TEMPLATE
from medtee.data.tokenizer import build_demo_tokenizer

TOKENIZER = build_demo_tokenizer()


def test_same_ids_on_every_build():
    text = "Good morning. I have had a cough for two weeks, and my chest hurts when I breathe in."
    demo._trained_json.cache_clear()  # a real second training run, not the cached one
    again = build_demo_tokenizer()
    assert again.get_vocab() == TOKENIZER.get_vocab()
    assert again.encode(text) == TOKENIZER.encode(text)
    assert len(TOKENIZER) == 1024
    assert len(build_demo_tokenizer(vocab_size=512)) == 512


def test_special_tokens_and_template():
    t = TOKENIZER
    assert (t.pad_token_id, t.eos_token_id, t.bos_token_id, t.unk_token_id) == (0, 1, 2, 3)
    assert t.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"]) == [4, 5]
    assert t.encode("<start_of_turn>model\n", add_special_tokens=False)[0] == 4
    assert t.chat_template == GEMMA3_TRAINING_TEMPLATE
    assert t.padding_side == "right"


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_round_trips_any_text(text):
    ids = TOKENIZER.encode(text, add_special_tokens=False)
    assert TOKENIZER.decode(ids) == text
    if "<unk>" not in text:  # byte-level: nothing is unknown (the literal text "<unk>" is the token itself)
        assert TOKENIZER.unk_token_id not in ids


def test_real_dialogue_text_round_trips(shared):
    import json

    with open(shared / "data" / "demo.jsonl", encoding="utf-8") as f:
        contents = [m["content"] for line in f for m in json.loads(line)["messages"]]
    assert all(TOKENIZER.decode(TOKENIZER.encode(c, add_special_tokens=False)) == c for c in contents)
