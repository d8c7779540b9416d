"""The chunked loss equals transformers' causal-LM loss (values and LoRA gradients) on a tiny Gemma 3, in fp32."""

from __future__ import annotations

import pytest
import torch

from medtee.data.chat import IGNORE_INDEX
from medtee.training.loss import chunked_causal_lm_loss


def _model(softcap):
    from peft import LoraConfig, get_peft_model
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
                           sliding_window=8, final_logit_softcapping=softcap, pad_token_id=0)
    model = Gemma3ForCausalLM(cfg).float()
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # non-zero B: gradients reach every LoRA matrix
            torch.nn.init.normal_(p, std=0.05)
    return model


def _batch(packed: bool):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 300, (3, 20), generator=g)
    labels = ids.clone()
    labels[:, :6] = IGNORE_INDEX  # the patient's turn
    labels[1, 12:] = IGNORE_INDEX
    labels[2, :] = IGNORE_INDEX  # a row with nothing supervised
    batch = {"input_ids": ids, "labels": labels}
    if packed:  # two documents per row: positions restart, transformers builds a block-diagonal mask
        batch["position_ids"] = torch.cat([torch.arange(11), torch.arange(9)]).expand(3, -1)
    else:
        batch["attention_mask"] = torch.ones_like(ids)
    return batch


def _grads(model):
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize(("softcap", "packed", "chunk"), [(None, False, 3), (0.1, True, 3), (0.1, False, 4096)])
def test_equals_transformers_loss_and_gradients(softcap, packed, chunk):
    model, batch = _model(softcap), _batch(packed)
    reference = model(**batch).loss
    reference.backward()
    expected = _grads(model)

    causal = model.get_base_model()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = causal.model(**inputs).last_hidden_state
    loss = chunked_causal_lm_loss(hidden, causal.lm_head, batch["labels"], chunk_tokens=chunk, softcap=softcap)
    loss.backward()
    got = _grads(model)

    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    assert expected.keys() == got.keys() and len(got) > 4
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_softcapping_changes_the_loss():
    """Guards the test above: soft-capping at 0.1 must make a difference it would catch."""
    batch = _batch(False)
    with torch.no_grad():
        assert abs(float(_model(None)(**batch).loss) - float(_model(0.1)(**batch).loss)) > 1e-3


def test_a_batch_without_supervised_tokens_gives_zero_and_backward_runs():
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    head = torch.nn.Linear(8, 11, bias=False)
    loss = chunked_causal_lm_loss(hidden, head, torch.full((2, 5), IGNORE_INDEX), chunk_tokens=4)
    loss.backward()
    assert float(loss) == 0.0 and hidden.grad is not None


def test_only_supervised_positions_reach_the_output_layer():
    seen = []

    class Head(torch.nn.Linear):
        def forward(self, x):
            seen.append(x.shape[0])
            return super().forward(x)

    labels = torch.full((2, 10), IGNORE_INDEX)
    labels[0, 4:7] = 1
    labels[1, 9] = 2
    loss = chunked_causal_lm_loss(torch.randn(2, 10, 8), Head(8, 5), labels, chunk_tokens=3)
    assert sum(seen) == 4 and max(seen) <= 3 and torch.isfinite(loss)


def test_rejects_a_chunk_size_below_one():
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_causal_lm_loss(torch.zeros(1, 2, 4), torch.nn.Linear(4, 3), torch.zeros(1, 2, dtype=torch.long),
                               chunk_tokens=0)
