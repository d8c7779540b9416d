"""QLoRA on CPU trains with correct gradients: a validation-style no-grad pass must not change LoRA gradients.

bitsandbytes repacks 4-bit weights for an inference kernel without backward on CPUs with avx512_bf16; medtee turns
that path off (medtee.training.model.disable_cpu_4bit_inference_path). The control case shows the trap is real here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medtee import config
from medtee.training import model as model_lib

AVX512_BF16 = "avx512_bf16" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False


def _grads(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _setup(apply_fix: bool):
    cfg = config.compose(["recipe=demo", "qlora.dropout=0.0"])
    torch.manual_seed(0)
    model = model_lib.build_model(cfg.model, cfg.qlora, vocab_size=256, device="cpu")
    if not apply_fix:
        import bitsandbytes as bnb

        for m in model.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                m.support_avx512bf16_for_cpu = True
    for n, p in model.named_parameters():  # non-zero B so gradients flow back through the frozen base
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    ids = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids, "labels": ids}


def _after_validation_pass(model, batch):
    fresh = _grads(model, batch)
    model.eval()
    with torch.no_grad():
        model(**batch)
    model.train()
    return fresh, _grads(model, batch)


def _max_rel_error(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).norm() / (a[k].norm() + 1e-12)) for k in a)


def test_model_is_4bit_with_trainable_lora_only():
    import bitsandbytes as bnb

    model, _ = _setup(apply_fix=True)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_lora_gradients_after_a_validation_pass_equal_fresh_ones():
    model, batch = _setup(apply_fix=True)
    fresh, after = _after_validation_pass(model, batch)
    assert _max_rel_error(fresh, after) < 1e-5
    first_a = next(v for k, v in fresh.items() if "layers.0" in k and "lora_A" in k)
    assert first_a.abs().sum() > 0  # gradients reach the first layer through the 4-bit base


@pytest.mark.skipif(not AVX512_BF16, reason="the bitsandbytes CPU trap needs a CPU with avx512_bf16")
def test_control_without_the_fix_gradients_go_wrong():
    model, batch = _setup(apply_fix=False)
    fresh, after = _after_validation_pass(model, batch)
    assert _max_rel_error(fresh, after) > 1e-2
