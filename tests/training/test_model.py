"""Model building: embeddings and output layer stay in bf16, pretrained loading from a local directory with weight
digests, and activation checkpointing (full, selective, none) that leaves gradients unchanged."""

from __future__ import annotations

import hashlib

import pytest
import torch

from medtee import config
from medtee.training.config import ModelConfig, ModelSource, QLoRAConfig, Quantization
from medtee.training import model as model_lib

GEMMA3_VOCAB = 262_208


def _tiny(**overrides):
    cfg = config.compose(["recipe=demo", "qlora.dropout=0.0", *[f"{k}={v}" for k, v in overrides.items()]])
    return cfg.model, cfg.qlora


@pytest.mark.parametrize("quantization", ["nf4", "none"])
def test_embedding_and_output_layer_keep_bf16_at_the_real_vocabulary(quantization):
    model_cfg, qlora_cfg = _tiny(**{"model.dtype": "bfloat16", "qlora.quantization": quantization})
    model = model_lib.build_model(model_cfg, qlora_cfg, vocab_size=GEMMA3_VOCAB, device="cpu")
    big = {n: p for n, p in model.named_parameters() if GEMMA3_VOCAB in p.shape}
    assert big, "no vocabulary-shaped parameter found"
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in big.values()), \
        {n: p.dtype for n, p in big.items()}
    assert model.get_base_model().lm_head.weight.dtype == torch.bfloat16


def _save_tiny_pretrained(path):
    model_cfg, _ = _tiny()
    base = model_lib.load_base_model(model_cfg, QLoRAConfig(quantization=Quantization.none), vocab_size=256,
                                     device="cpu")
    base.save_pretrained(path)
    from medtee.data.tokenizer import build_demo_tokenizer

    build_demo_tokenizer().save_pretrained(path)


def test_pretrained_from_a_local_directory_with_weight_digests(tmp_path):
    _save_tiny_pretrained(tmp_path)
    cfg = ModelConfig(name="local", source=ModelSource.pretrained, id=str(tmp_path), offline=True)
    [weights] = sorted(tmp_path.glob("*.safetensors"))
    digests = model_lib.weight_digests(cfg)
    assert digests == {weights.name: hashlib.sha256(weights.read_bytes()).hexdigest()}
    model = model_lib.build_model(cfg, QLoRAConfig(quantization=Quantization.nf4), vocab_size=256, device="cpu")
    assert model.training and any(p.requires_grad for p in model.parameters())
    assert model_lib.build_tokenizer(cfg).pad_token_id is not None

    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert model_lib.weight_digests(cfg)[weights.name] != digests[weights.name]


def test_a_directory_without_weights_and_an_uncached_hub_id_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no weight files"):
        model_lib.weight_digests(ModelConfig(source=ModelSource.pretrained, id=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="medtee-test/not-cached .* not in the local Hugging Face cache"):
        model_lib.weight_digests(ModelConfig(source=ModelSource.pretrained, id="medtee-test/not-cached",
                                             revision="0" * 40, offline=True))  # never the network


def test_tiny_random_weights_have_no_weight_files():
    assert model_lib.weight_digests(ModelConfig()) == {}


def _lora_grads(**model_overrides):
    model_cfg, qlora_cfg = _tiny(**{"qlora.quantization": "none", "model.tiny.num_hidden_layers": 4,
                                    **model_overrides})
    torch.manual_seed(0)
    model = model_lib.build_model(model_cfg, qlora_cfg, vocab_size=128, device="cpu")
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(hash(n) % 2**31))
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    return model, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(("every", "selective", "expected"), [
    (1, False, {"full": 4, "selective": 0, "none": 0}),
    (2, True, {"full": 2, "selective": 2, "none": 0}),
    (3, False, {"full": 2, "selective": 0, "none": 2}),
])
def test_activation_checkpointing_modes_leave_gradients_unchanged(every, selective, expected):
    _, reference = _lora_grads()
    model, grads = _lora_grads(**{"model.gradient_checkpointing": "true", "model.checkpoint_every_n_layers": every,
                                  "model.selective_checkpointing": selective})
    layers = model_lib.decoder_layers(model)
    modes = [("none" if not layer.gradient_checkpointing else
              "full" if "context_fn" not in layer._gradient_checkpointing_func.keywords else "selective")
             for layer in layers]
    assert {m: modes.count(m) for m in ("full", "selective", "none")} == expected
    for name in reference:
        torch.testing.assert_close(grads[name], reference[name], rtol=1e-5, atol=1e-7, msg=name)


def test_selective_policy_keeps_large_matmuls_and_recomputes_lora_products():
    from torch.utils.checkpoint import CheckpointPolicy

    policy = model_lib._save_matmul_and_attention_outputs
    mm = torch.ops.aten.mm.default
    assert policy(None, mm, torch.zeros(8, 512), torch.zeros(512, 64)) == CheckpointPolicy.MUST_SAVE
    assert policy(None, mm, torch.zeros(8, 16), torch.zeros(16, 512)) == CheckpointPolicy.PREFER_RECOMPUTE
    assert policy(None, torch.ops.aten.gelu.default, torch.zeros(2)) == CheckpointPolicy.PREFER_RECOMPUTE


def test_checkpoint_every_n_layers_must_be_positive():
    with pytest.raises(ValueError, match="checkpoint_every_n_layers"):  # refused when the recipe is composed
        _tiny(**{"qlora.quantization": "none", "model.gradient_checkpointing": "true",
                 "model.checkpoint_every_n_layers": 0})
