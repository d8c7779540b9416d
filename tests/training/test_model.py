"""Model building: embeddings and output layer stay in bf16, pretrained loading from a local directory with weight
digests, random weights of a real architecture's shape, and activation checkpointing (full, selective, none) that
leaves gradients unchanged."""

from __future__ import annotations

import hashlib

import pytest
import torch

from medtee import config
from medtee.training.config import ModelConfig, ModelSource, QLoRAConfig, Quantization
from medtee.training import model as model_lib

from .conftest import save_tiny_pretrained

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


def test_pretrained_from_a_local_directory_with_digests_of_every_file(tmp_path):
    save_tiny_pretrained(tmp_path, vocab_size=256)
    cfg = ModelConfig(name="local", source=ModelSource.pretrained, id=str(tmp_path), offline=True)
    digests = model_lib.weight_digests(cfg)
    files = sorted(p for p in tmp_path.iterdir() if p.is_file())
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= set(digests)
    assert digests == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    assert model_lib.pretrained_problems(cfg) == []
    model = model_lib.build_model(cfg, QLoRAConfig(quantization=Quantization.nf4), vocab_size=256, device="cpu")
    assert model.training and any(p.requires_grad for p in model.parameters())
    assert model_lib.build_tokenizer(cfg).pad_token_id is not None

    for name in ("model.safetensors", "tokenizer.json"):  # the weights, and what the tokenizer is read from
        data = bytearray((tmp_path / name).read_bytes())
        data[-2] ^= 1
        (tmp_path / name).write_bytes(bytes(data))
        assert model_lib.weight_digests(cfg)[name] != digests[name]


def test_a_directory_without_weights_and_an_uncached_hub_id_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no weight files"):
        model_lib.weight_digests(ModelConfig(source=ModelSource.pretrained, id=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="medtee-test/not-cached .* not in the local Hugging Face cache"):
        model_lib.weight_digests(ModelConfig(source=ModelSource.pretrained, id="medtee-test/not-cached",
                                             revision="0" * 40, offline=True))  # never the network


def test_tiny_random_weights_have_no_weight_files():
    assert model_lib.weight_digests(ModelConfig()) == {}


def _lora_grads(quantization="none", **model_overrides):
    model_cfg, qlora_cfg = _tiny(**{"qlora.quantization": quantization, "model.tiny.num_hidden_layers": 4,
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


class _OpCounter:
    """Counts the aten and custom ops that really execute (a selective-checkpointing cache hit does not)."""

    def __enter__(self):
        from collections import Counter

        from torch.utils._python_dispatch import TorchDispatchMode

        counts = self.counts = Counter()

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counts[func] += 1
                return func(*args, **(kwargs or {}))

        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)


@pytest.mark.parametrize(("every", "selective", "runs"), [
    (None, False, 28),  # no checkpointing: each of the 4 layers' 7 base-weight matmuls runs once
    (1, False, 56),  # every layer recomputes its forward: each 4-bit matmul runs twice
    (2, True, 42),  # layers 0 and 2 recompute everything; 1 and 3 keep their 4-bit matmul outputs
])
def test_selective_checkpointing_keeps_the_4bit_matmul_outputs(every, selective, runs):
    overrides = {} if every is None else {"model.gradient_checkpointing": "true",
                                          "model.checkpoint_every_n_layers": every,
                                          "model.selective_checkpointing": selective}
    with _OpCounter() as counted:
        _, grads = _lora_grads("nf4", **overrides)
    assert counted.counts[torch.ops.bitsandbytes.gemm_4bit.default] == runs
    _, reference = _lora_grads("nf4")
    for name in reference:
        torch.testing.assert_close(grads[name], reference[name], rtol=1e-5, atol=1e-7, msg=name)


def test_random_source_builds_gemma3_27b_at_its_real_shape():
    from transformers import Gemma3ForCausalLM

    from medtee.data.tokenizer import DEMO, load_tokenizer

    cfg = config.compose(["recipe=medgemma27b_random_gpu_dev"])
    assert cfg.model.source == ModelSource.random and cfg.model.num_layers == 4
    assert model_lib.build_tokenizer(cfg.model).get_vocab() == load_tokenizer(DEMO).get_vocab()
    hf = model_lib.random_config(cfg.model, vocab_size=len(load_tokenizer(DEMO)))
    assert (hf.vocab_size, hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers) == (GEMMA3_VOCAB, 5376, 21504, 4)
    with torch.device("meta"):
        model = Gemma3ForCausalLM(hf)
    shapes = {n.removeprefix("model.layers.0."): tuple(p.shape) for n, p in model.named_parameters()
              if n.startswith("model.layers.0.") and n.endswith("proj.weight")}
    assert shapes == {"self_attn.q_proj.weight": (4096, 5376), "self_attn.k_proj.weight": (2048, 5376),
                      "self_attn.v_proj.weight": (2048, 5376), "self_attn.o_proj.weight": (5376, 4096),
                      "mlp.gate_proj.weight": (21504, 5376), "mlp.up_proj.weight": (21504, 5376),
                      "mlp.down_proj.weight": (5376, 21504)}
    full = model_lib.random_config(config.compose(["recipe=medgemma27b_random_gpu_dev", "model.num_layers=null"]).model,
                                   vocab_size=256)
    assert full.num_hidden_layers == 62
    with pytest.raises(ValueError, match="more than model.architecture=gemma3_27b's 262208"):
        model_lib.random_config(cfg.model, vocab_size=GEMMA3_VOCAB + 1)


def test_random_source_shape_is_the_peer_baselines(shared):
    import importlib.util

    script = shared / "bench" / "peer_qlora_baseline.py"
    if not script.is_file():
        pytest.skip(f"{script} is absent")
    spec = importlib.util.spec_from_file_location("peer", script)
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)
    from medtee.training.config import ARCHITECTURES, Architecture

    ours = dict(ARCHITECTURES[Architecture.gemma3_27b])
    assert ours.pop("num_hidden_layers") == 62 and ours == peer.G27


@pytest.fixture
def small_architecture(monkeypatch):
    """gemma3_27b's entry scaled down to a 2-core CPU's size (the code path is the real one; the shape is tested
    above)."""
    from medtee.training.config import ARCHITECTURES, Architecture

    monkeypatch.setitem(ARCHITECTURES, Architecture.gemma3_27b, dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=64, max_position_embeddings=4096))
    return ARCHITECTURES[Architecture.gemma3_27b]


def _random_base(quantization: str, **model):
    cfg = config.compose(["recipe=demo", "model.source=random", "model.dtype=bfloat16",
                          f"qlora.quantization={quantization}", *[f"model.{k}={v}" for k, v in model.items()]])
    return model_lib.load_base_model(cfg.model, cfg.qlora, vocab_size=300, device="cpu")


def test_random_weights_are_drawn_as_the_peer_baseline_draws_them(small_architecture):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    ours = _random_base("none", num_layers=3).state_dict()
    torch.manual_seed(0)  # the peer baseline's procedure: seed 0, weights drawn straight in bf16
    torch.set_default_dtype(torch.bfloat16)
    try:
        peers = Gemma3ForCausalLM(Gemma3TextConfig(**{**small_architecture, "num_hidden_layers": 3})).state_dict()
    finally:
        torch.set_default_dtype(torch.float32)
    assert ours.keys() == peers.keys() and all(torch.equal(ours[k], peers[k]) for k in ours)
    assert torch.get_default_dtype() == torch.float32  # building restores the default dtype
    other = _random_base("none", num_layers=3, init_seed=1).state_dict()
    assert not torch.equal(other["model.embed_tokens.weight"], ours["model.embed_tokens.weight"])


def test_random_weights_load_in_4bit(small_architecture):
    import bitsandbytes as bnb

    model = _random_base("nf4", num_layers=2)
    assert len(model_lib.decoder_layers(model)) == 2
    assert model.get_input_embeddings().weight.shape == (512, 64)
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 2 * 7


def test_checkpoint_every_n_layers_must_be_positive():
    with pytest.raises(ValueError, match="checkpoint_every_n_layers"):  # refused when the recipe is composed
        _tiny(**{"qlora.quantization": "none", "model.gradient_checkpointing": "true",
                 "model.checkpoint_every_n_layers": 0})
