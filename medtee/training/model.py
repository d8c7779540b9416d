"""The causal LM with LoRA (optionally on 4-bit bitsandbytes base weights), and its tokenizer."""

from __future__ import annotations

import logging
import tempfile
import warnings

import torch

# bitsandbytes reports a missing optional kernel package on every import; medtee never installs it (it downloads
# kernels from a model hub at run time).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def build_tokenizer(model_cfg):
    """The demo tokenizer for tiny models (built offline, trained on synthetic text only); else the model's own."""
    if model_cfg.source == "tiny":
        from medtee.data.tokenizer import build_demo_tokenizer

        return build_demo_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_cfg.id, revision=model_cfg.revision,
                                         local_files_only=model_cfg.offline)


def _tiny_config(model_cfg, vocab_size: int):
    from transformers import Gemma3TextConfig

    t = model_cfg.tiny
    return Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=t.hidden_size, num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads, head_dim=t.head_dim,
        intermediate_size=t.intermediate_size, sliding_window=t.sliding_window, query_pre_attn_scalar=t.head_dim,
        max_position_embeddings=8192, pad_token_id=0, bos_token_id=2, eos_token_id=1,
    )


def _quantization_config(qlora_cfg):
    if qlora_cfg.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=qlora_cfg.quantization.value,
                              bnb_4bit_use_double_quant=qlora_cfg.double_quant,
                              bnb_4bit_compute_dtype=_DTYPES[qlora_cfg.compute_dtype.value])


def load_base_model(model_cfg, qlora_cfg, *, vocab_size: int, device: str):
    """The frozen base model: a random tiny Gemma 3, or pretrained weights by id/path at a pinned revision."""
    from transformers import AutoModelForCausalLM, Gemma3ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    dtype = _DTYPES[model_cfg.dtype.value]
    quant = _quantization_config(qlora_cfg)
    kwargs = dict(dtype=dtype, attn_implementation=model_cfg.attn_implementation)
    if quant is not None:
        kwargs["quantization_config"] = quant
        if device == "cuda":
            kwargs["device_map"] = {"": torch.cuda.current_device()}
    if model_cfg.source == "tiny":
        torch.manual_seed(model_cfg.tiny.seed)
        model = Gemma3ForCausalLM(_tiny_config(model_cfg, vocab_size)).to(dtype)
        if quant is None:
            return model.to(device)
        # bitsandbytes quantizes while loading: round-trip the random (non-patient) weights through a temp dir.
        with tempfile.TemporaryDirectory(prefix="medtee-tiny-model-") as tmp:
            model.save_pretrained(tmp)
            return AutoModelForCausalLM.from_pretrained(tmp, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(model_cfg.id, revision=model_cfg.revision,
                                                 local_files_only=model_cfg.offline, **kwargs)
    return model if quant is not None else model.to(device)


def disable_cpu_4bit_inference_path(model) -> int:
    """Keep bitsandbytes' 4-bit layers on the autograd path on CPU.

    On CPUs with avx512_bf16, the first no-grad forward of a Linear4bit repacks its weight for `gemv_4bit`, which
    has no backward: LoRA gradients silently go wrong after Lightning's validation pass (see docs/architecture.md).
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def build_model(model_cfg, qlora_cfg, *, vocab_size: int, device: str):
    """Base model frozen, LoRA adapters trainable, in train mode."""
    from peft import LoraConfig, get_peft_model

    model = load_base_model(model_cfg, qlora_cfg, vocab_size=vocab_size, device=device)
    for p in model.parameters():
        p.requires_grad_(False)
    model.config.use_cache = False
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = LoraConfig(r=qlora_cfg.rank, lora_alpha=qlora_cfg.alpha, lora_dropout=qlora_cfg.dropout,
                      target_modules=_targets(qlora_cfg.target_modules), use_dora=qlora_cfg.use_dora,
                      use_rslora=qlora_cfg.use_rslora, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    if device == "cpu":
        disable_cpu_4bit_inference_path(model)
    model.train()
    return model


def _targets(target_modules):
    targets = list(target_modules)
    return targets[0] if targets == ["all-linear"] else targets
