"""The causal LM with LoRA (optionally on 4-bit bitsandbytes base weights), and its tokenizer."""

from __future__ import annotations

import logging
import os
import tempfile
import warnings

import torch

# bitsandbytes reports a missing optional kernel package on every import; medtee never installs it (it downloads
# kernels from a model hub at run time).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def build_tokenizer(model_cfg):
    """The demo tokenizer for random-weight models (built offline, trained on synthetic text only); else the model's
    own."""
    from medtee.data.tokenizer import DEMO, load_tokenizer

    if model_cfg.source in ("tiny", "random"):
        return load_tokenizer(DEMO)
    try:
        return load_tokenizer(model_cfg.id, revision=model_cfg.revision, offline=model_cfg.offline)
    except ValueError as exc:
        raise FileNotFoundError(f"model.id={model_cfg.id}: {exc}") from None


def _tiny_config(model_cfg, vocab_size: int):
    from transformers import Gemma3TextConfig

    t = model_cfg.tiny
    return Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=t.hidden_size, num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads, head_dim=t.head_dim,
        intermediate_size=t.intermediate_size, sliding_window=t.sliding_window, query_pre_attn_scalar=t.head_dim,
        max_position_embeddings=8192, pad_token_id=0, bos_token_id=2, eos_token_id=1, initializer_range=t.init_std,
    )


def random_config(model_cfg, vocab_size: int):
    """Gemma3TextConfig of `model.architecture` cut to `model.num_layers` (source=random).

    `vocab_size` (the tokenizer's) must fit the architecture's own vocabulary, which the model keeps, so the
    embedding and output layer have their real shape."""
    from transformers import Gemma3TextConfig

    from medtee.training.config import ARCHITECTURES, Architecture

    dims = dict(ARCHITECTURES[Architecture(model_cfg.architecture)])
    if vocab_size > dims["vocab_size"]:
        raise ValueError(f"the tokenizer has {vocab_size} tokens, more than model.architecture="
                         f"{Architecture(model_cfg.architecture).value}'s {dims['vocab_size']}")
    if model_cfg.num_layers is not None:
        dims["num_hidden_layers"] = model_cfg.num_layers
    return Gemma3TextConfig(**dims)


def _random_model(config, *, seed: int, dtype: torch.dtype, device: str):
    """A model of `config` with weights drawn straight in `dtype` on `device`, as the peer baseline draws its own."""
    from transformers import Gemma3ForCausalLM

    if device == "cuda":
        device = f"cuda:{_local_gpu()}"
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return Gemma3ForCausalLM(config)
    finally:
        torch.set_default_dtype(default)


def _local_gpu() -> int:
    """This process's GPU: torchrun sets LOCAL_RANK, srun SLURM_LOCALID."""
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))


def _quantization_config(qlora_cfg, *, storage: torch.dtype):
    if qlora_cfg.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=qlora_cfg.quantization.value,
                              bnb_4bit_use_double_quant=qlora_cfg.double_quant,
                              bnb_4bit_compute_dtype=_DTYPES[qlora_cfg.compute_dtype.value],
                              bnb_4bit_quant_storage=storage)


def load_base_model(model_cfg, qlora_cfg, *, vocab_size: int, device: str, sharded: bool = False):
    """The frozen base model: random weights (a tiny Gemma 3, or a real architecture's shape), or pretrained weights
    by id/path at a pinned revision."""
    from transformers import AutoModelForCausalLM, Gemma3ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    dtype = _DTYPES[model_cfg.dtype.value]
    # FSDP flattens each decoder layer into one tensor of one dtype: the packed 4-bit weights are then stored as
    # elements of the model's dtype, the dtype of the layer's norms.
    quant = _quantization_config(qlora_cfg, storage=dtype if sharded else torch.uint8)
    kwargs = dict(dtype=dtype, attn_implementation=model_cfg.attn_implementation.value)
    if quant is not None:
        kwargs["quantization_config"] = quant
        if device == "cuda":
            kwargs["device_map"] = {"": _local_gpu()}
    if model_cfg.source in ("tiny", "random"):
        if model_cfg.source == "tiny":
            torch.manual_seed(model_cfg.tiny.seed)
            model = Gemma3ForCausalLM(_tiny_config(model_cfg, vocab_size)).to(dtype)
        else:
            model = _random_model(random_config(model_cfg, vocab_size), seed=model_cfg.init_seed, dtype=dtype,
                                  device=device)
        if quant is None:
            return model.to(device)
        # bitsandbytes quantizes while loading: round-trip the random (non-patient) weights through a temp dir (in
        # a run, inside its private in-memory directory, removed at the run's end whatever happens)
        with tempfile.TemporaryDirectory(prefix="medtee-random-model-") as tmp:
            model.save_pretrained(tmp)
            del model
            if device == "cuda":
                torch.cuda.empty_cache()
            return AutoModelForCausalLM.from_pretrained(tmp, **kwargs)
    # recipes are data: no code from the model's repository, and no pickled weights (unpickling runs code)
    model = AutoModelForCausalLM.from_pretrained(model_cfg.id, revision=model_cfg.revision,
                                                 local_files_only=model_cfg.offline, trust_remote_code=False,
                                                 use_safetensors=True, **kwargs)
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


def _model_folder(model_cfg):
    """The folder of a pretrained model: `id` as a local directory, or its Hugging Face snapshot at `revision`
    (the local cache only when offline)."""
    from pathlib import Path

    folder = Path(model_cfg.id)
    if folder.is_dir():
        return folder
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(model_cfg.id, revision=model_cfg.revision, local_files_only=model_cfg.offline))
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"model.id={model_cfg.id} (revision {model_cfg.revision or 'default'}) is not in the local Hugging "
            f"Face cache and model.offline=true: download it beforehand (`hf download {model_cfg.id} "
            f"--revision REV`) or set model.id to a local directory") from None


def weight_digests(model_cfg) -> dict[str, str]:
    """sha256 of every file in a pretrained model's folder ({file name: hex}): the weights and what transformers
    reads beside them (config, tokenizer, chat template), so none of them changes under the digest; {} for
    random-weight models. FileNotFoundError for a folder without *.safetensors weights."""
    if model_cfg.source != "pretrained":
        return {}
    from concurrent.futures import ThreadPoolExecutor

    from medtee.files import sha256_file

    folder = _model_folder(model_cfg)
    files = sorted(p for p in folder.iterdir() if not p.name.startswith(".") and not p.is_dir())
    if not any(p.name.endswith(".safetensors") for p in files):
        raise FileNotFoundError(f"model.id={model_cfg.id}: no weight files (*.safetensors) in {folder}")
    with ThreadPoolExecutor(max_workers=min(8, len(files))) as pool:  # hashlib releases the GIL
        return dict(zip((p.name for p in files), pool.map(sha256_file, files)))


def pretrained_problems(model_cfg) -> list[str]:
    """What in a pretrained model's folder the run would otherwise find unusable only after its key release: the
    tokenizer, the model's config.json and each weight file's safetensors header, opened beforehand."""
    if model_cfg.source != "pretrained":
        return []
    from safetensors import SafetensorError, safe_open
    from transformers import AutoConfig

    from medtee.data.tokenizer import load_tokenizer

    folder, out, files = _model_folder(model_cfg), [], []
    try:
        load_tokenizer(model_cfg.id, revision=model_cfg.revision, offline=model_cfg.offline)
    except ValueError as exc:
        out.append(str(exc))
    try:
        AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        files.append(f"its config.json does not describe a model transformers knows ({type(exc).__name__})")
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(path, framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            files.append(f"{path.name} is not a safetensors file ({type(exc).__name__})")
    if files:
        out.append(f"{'; '.join(files)}: name a folder that save_pretrained wrote, or a model's snapshot")
    return [f"model.id={model_cfg.id}: {problem}" for problem in out]


def _save_matmul_and_attention_outputs(ctx, op, *args, four_bit: frozenset = frozenset(), **kwargs):
    """Selective-checkpointing policy: keep the outputs of the base-weight matmuls (bitsandbytes' fused 4-bit matmul,
    or a plain matmul over at least 256 inputs) and of attention; recompute the rest."""
    from torch.utils.checkpoint import CheckpointPolicy

    if op in _ATTENTION_OPS or op in four_bit:
        return CheckpointPolicy.MUST_SAVE
    if op in _MATMUL_OPS:
        a = args[1] if op is torch.ops.aten.addmm.default else args[0]
        if a.shape[-1] >= 256:  # base-weight matmuls; LoRA's rank-r products are cheaper to recompute than to keep
            return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def four_bit_matmul_ops() -> frozenset:
    """bitsandbytes' 4-bit matmul op (dequantize and matmul fused in one kernel), once bitsandbytes has registered
    it; empty before (an unquantized model)."""
    try:
        return frozenset({torch.ops.bitsandbytes.gemm_4bit.default})
    except AttributeError:
        return frozenset()


_MATMUL_OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}
_ATTENTION_OPS = {getattr(torch.ops.aten, name).default for name in (
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
) if hasattr(torch.ops.aten, name)}


def decoder_layers(model) -> list:
    """The repeated decoder blocks (transformers' GradientCheckpointingLayer), in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def enable_activation_checkpointing(model, *, every_n_layers: int, selective: bool) -> dict[str, int]:
    """Non-reentrant activation checkpointing, per decoder layer.

    Every `every_n_layers`-th layer recomputes its whole forward in the backward pass; the others either keep matmul
    and attention outputs and recompute only element-wise work (`selective`, torch selective activation
    checkpointing) or keep all their activations. Returns the count of layers per mode.
    """
    from functools import partial

    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    if every_n_layers < 1:
        raise ValueError(f"model.checkpoint_every_n_layers must be >= 1, got {every_n_layers}")
    full = partial(checkpoint, use_reentrant=False)
    policy = partial(_save_matmul_and_attention_outputs, four_bit=four_bit_matmul_ops())
    sac = partial(checkpoint, use_reentrant=False, context_fn=partial(create_selective_checkpoint_contexts, policy))
    counts = {"full": 0, "selective": 0, "none": 0}
    for index, layer in enumerate(decoder_layers(model)):
        mode = "full" if index % every_n_layers == 0 else "selective" if selective else "none"
        layer.gradient_checkpointing = mode != "none"
        layer._gradient_checkpointing_func = full if mode == "full" else sac
        counts[mode] += 1
    return counts


def build_model(model_cfg, qlora_cfg, *, vocab_size: int, device: str, sharded: bool = False):
    """Base model frozen (embeddings and output layer in model.dtype, never upcast), LoRA trainable, train mode.

    `sharded`: the model will be wrapped by FSDP (4-bit weights stored in the model's dtype).
    """
    from peft import LoraConfig, get_peft_model

    model = load_base_model(model_cfg, qlora_cfg, vocab_size=vocab_size, device=device, sharded=sharded)
    for p in model.parameters():
        p.requires_grad_(False)
    model.config.use_cache = False
    if model_cfg.gradient_checkpointing:
        enable_activation_checkpointing(model, every_n_layers=model_cfg.checkpoint_every_n_layers,
                                        selective=model_cfg.selective_checkpointing)
    lora = LoraConfig(r=qlora_cfg.rank, lora_alpha=qlora_cfg.alpha, lora_dropout=qlora_cfg.dropout,
                      target_modules=_targets(qlora_cfg.target_modules), use_dora=qlora_cfg.use_dora,
                      use_rslora=qlora_cfg.use_rslora, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    if device == "cpu":
        disable_cpu_4bit_inference_path(model)
    if model_cfg.compile_layers:
        for layer in decoder_layers(model):
            layer.compile()
    model.train()
    return model


def _targets(target_modules):
    targets = list(target_modules)
    return targets[0] if targets == ["all-linear"] else targets
