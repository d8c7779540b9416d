"""Probing a model: log-perplexities in the training's chat text, greedy extraction, aggregates, and an end-to-end
audit on CPU: canaries sealed with a dataset, read back in the TEE's view, a tiny Gemma 3 tuned on it; the canary
inserted 64 times is exposed (and extracted verbatim), the never-inserted control is not."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medtee.audit import probe
from medtee.audit.canaries import Canary, canary_dialogue, plan_canaries
from medtee.audit.summary import summarize
from medtee.data.chat import IGNORE_INDEX, encode_arrays
from medtee.data.tokenizer import load_tokenizer

from .conftest import dialogues

REFERENCES = 512


def _tiny_model(tokenizer):
    from medtee import config
    from medtee.training.model import build_model

    cfg = config.compose(["recipe=demo", "qlora.dropout=0.0", "qlora.quantization=none"])
    torch.manual_seed(0)
    return build_model(cfg.model, cfg.qlora, vocab_size=len(tokenizer), device="cpu")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("demo")


@pytest.fixture(scope="module")
def model(tokenizer):
    return _tiny_model(tokenizer)


def test_longest_common_token_run():
    assert probe.longest_common_token_run([1, 2, 3, 4, 5], [9, 2, 3, 4, 8]) == 3
    assert probe.longest_common_token_run([1, 2, 1, 2, 3], [1, 2, 3]) == 3
    assert probe.longest_common_token_run([1, 2], [3, 4]) == 0
    assert probe.longest_common_token_run([], [1]) == 0


def test_log_perplexity_is_the_doctor_turns_loss_in_bits_whatever_the_batch(model, tokenizer):
    texts = [Canary(n, 1).text for n in (5, 1234567, 9999999, 42)] + ["Patient MRN: a longer sentence than others."]
    one = probe.log_perplexities(model, tokenizer, texts, batch_size=1)
    np.testing.assert_allclose(probe.log_perplexities(model, tokenizer, texts, batch_size=3), one, rtol=1e-6)
    np.testing.assert_array_equal(probe.log_perplexities(model, tokenizer, texts, batch_size=1), one)
    [(ids, labels)] = encode_arrays(tokenizer, [canary_dialogue(texts[1])], max_length=512)
    with torch.no_grad():
        loss = model(input_ids=torch.tensor(ids[None], dtype=torch.long),
                     labels=torch.tensor(labels[None], dtype=torch.long)).loss  # mean nats over supervised tokens
    assert one[1] == pytest.approx(float(loss) * (labels != IGNORE_INDEX).sum() / math.log(2), rel=1e-4)
    assert model.training  # the mode it had


def test_greedy_continuation_with_the_cache_is_plain_argmax_decoding(model):
    prompt = [2, 7, 300, 41, 99, 12]
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            tokens.append(int(model(input_ids=torch.tensor([tokens])).logits[0, -1].argmax()))
    assert probe.greedy_continuation(model, prompt, 8) == tokens[len(prompt):]


def test_doctor_turn_examples_cut_at_the_first_long_enough_doctor_turn(tokenizer):
    dialogue = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Yes."},
                {"role": "user", "content": "My knee hurts since the match on Sunday."},
                {"role": "assistant", "content": "Let us look at the knee and take an X-ray of it today."}]
    [(prompt, truth)] = probe.doctor_turn_examples(tokenizer, [dialogue, dialogue[:2]], suffix_tokens=10)
    assert tokenizer.decode(prompt).endswith("<start_of_turn>model\n")
    assert "Yes." in tokenizer.decode(prompt) and tokenizer.decode(truth).startswith("Let us")
    assert len(truth) == 10


def test_extraction_refuses_a_truth_shorter_than_the_suffix(model):
    with pytest.raises(ValueError, match="example 1: .* at least suffix_tokens=5 tokens \\(it has 2\\)"):
        probe.extraction_rates(model, [([1, 2], [3] * 5), ([1, 2], [3, 4])], prefix_tokens=4, suffix_tokens=5)


def test_summarize_names_aggregates_per_repeat_count():
    out = summarize({64: [9.0, 8.0, 1.0], 0: [0.5, 0.1]},
                    [{"longest_common_run": 10, "exact": True}, {"longest_common_run": 4, "exact": False}])
    assert out == {"audit/exposure_max_0x": 0.5, "audit/exposure_median_0x": pytest.approx(0.3),
                   "audit/exposure_max_64x": 9.0, "audit/exposure_median_64x": 8.0,
                   "audit/extraction_exact_rate": 0.5, "audit/extraction_run_mean": 7.0,
                   "audit/extraction_examples": 2.0}
    assert summarize({}) == {}


def _train(model, tokenizer, records, *, epochs: int, batch_size: int = 8, lr: float = 1e-2) -> None:
    encoded = encode_arrays(tokenizer, [r["messages"] for r in records], max_length=96)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    order = np.random.default_rng(0)  # a fresh permutation per batch: about `epochs` passes over the records
    model.train()
    for _ in range(epochs):
        for start in range(0, len(encoded), batch_size):
            batch = [encoded[i] for i in order.permutation(len(encoded))[start:start + batch_size]]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
            for row, (i, l) in enumerate(batch):
                ids[row, :len(i)], labels[row, :len(l)] = torch.from_numpy(i), torch.from_numpy(l)
            mask = (torch.arange(width) < torch.tensor([len(i) for i, _ in batch])[:, None]).long()
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()


def test_a_canary_seen_64_times_is_exposed_and_a_control_is_not(tmp_path, broker, tokenizer):
    from medtee.sealing.reader import open_dataset
    from medtee.sealing.seal import seal_records

    real = dialogues(20)
    plan = plan_canaries(1, (1, 64), real_records=len(real), seed=2)
    manifest = seal_records(real, tmp_path / "sealed", broker=broker, policy="simulated", canaries=plan)
    dataset = open_dataset(tmp_path / "sealed")
    key = broker.unwrap_data_key(manifest)
    canaries, records = dataset.canaries(key), dataset.read_records(key)  # inside the TEE

    model = _tiny_model(tokenizer)
    base = probe.canary_exposures(model, tokenizer, canaries, references=REFERENCES, seed=1)
    _train(model, tokenizer, records, epochs=3)
    tuned = probe.canary_exposures(model, tokenizer, canaries, references=REFERENCES, seed=1)
    with model.disable_adapter():  # the base model again, from the tuned one
        again = probe.canary_exposures(model, tokenizer, canaries, references=REFERENCES, seed=1)
    assert all(again[r] == pytest.approx(base[r]) for r in base)

    ceiling = math.log2(REFERENCES)
    assert sorted(tuned) == [0, 1, 64]
    assert tuned[64][0] >= 0.95 * ceiling, tuned
    # a never-trained candidate ranks like a random one: at least 8 of the 512 ahead of it 98% of the time
    assert tuned[0][0] <= ceiling - 3, tuned
    assert max(v[0] for v in base.values()) <= ceiling - 3, base

    by_repeats = {c.repeats: c for c in canaries}
    examples = probe.doctor_turn_examples(tokenizer, [canary_dialogue(by_repeats[r].text) for r in (64, 0)],
                                          suffix_tokens=16)
    seen, control = probe.extraction_rates(model, examples, prefix_tokens=64, suffix_tokens=16)
    assert seen == {"longest_common_run": 16, "exact": True}
    assert not control["exact"] and control["longest_common_run"] < 16
    metrics = summarize(tuned, [seen, control])
    assert metrics["audit/exposure_max_64x"] == tuned[64][0] and metrics["audit/extraction_exact_rate"] == 0.5
