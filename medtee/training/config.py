"""Schemas of the `qlora`, `model`, `trainer` and `output` config groups, each with its own `problems()`.

`Schema.problems(section)` works on a dataclass instance and on a composed config group alike. Rules that span
groups live in medtee.config. Imports nothing heavy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import List, Optional

from medtee.schema import below_minimums


class Quantization(str, Enum):
    nf4 = "nf4"
    fp4 = "fp4"
    none = "none"


class DType(str, Enum):
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


@dataclass
class QLoRAConfig:
    quantization: Quantization = Quantization.nf4  # base weights: 4-bit NF4/FP4 (QLoRA) or unquantized (plain LoRA)
    double_quant: bool = True  # quantize the quantization constants too (QLoRA's double quantization)
    compute_dtype: DType = DType.bfloat16  # dtype of the 4-bit matmuls
    rank: int = 16  # LoRA rank r
    alpha: int = 32  # LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rslora)
    dropout: float = 0.05  # dropout on the LoRA input
    target_modules: List[str] = field(default_factory=lambda: ["all-linear"])  # peft target modules
    use_dora: bool = False  # weight-decomposed LoRA (DoRA)
    use_rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r)

    def problems(self) -> list[str]:
        out = below_minimums(self, "qlora", {"rank": 1, "alpha": 1})
        if not 0.0 <= self.dropout < 1.0:
            out.append(f"qlora.dropout={self.dropout} must be in [0, 1)")
        return out


class Attention(str, Enum):  # transformers attention backends (a fixed set: a hub kernel id would load code)
    sdpa = "sdpa"
    eager = "eager"
    flash_attention_2 = "flash_attention_2"


class ModelSource(str, Enum):
    tiny = "tiny"  # a small Gemma 3 built from `tiny` with random weights (tests, the demo)
    random = "random"  # the real shape of `architecture` with random weights: the real recipe, no download
    pretrained = "pretrained"  # weights loaded by Hugging Face id or local path


class Architecture(str, Enum):
    gemma3_27b = "gemma3_27b"  # Gemma 3 27B, the shape of MedGemma 27B text
    gemma3_4b = "gemma3_4b"  # Gemma 3 4B's language model, the shape of MedGemma 4B's


#: Gemma3TextConfig arguments of each architecture (source=random). Only the shape: the other settings keep
#: transformers' defaults, exactly as the peer baseline (`../shared/bench/peer_qlora_baseline.py`) builds its model,
#: so a benchmark and `medtee train` on the same batches compare loss for loss.
ARCHITECTURES = {
    Architecture.gemma3_27b: dict(vocab_size=262208, hidden_size=5376, intermediate_size=21504,
                                  num_hidden_layers=62, num_attention_heads=32, num_key_value_heads=16, head_dim=128,
                                  query_pre_attn_scalar=168, sliding_window=1024, max_position_embeddings=131072),
    Architecture.gemma3_4b: dict(vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                                 num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                                 sliding_window=1024, max_position_embeddings=131072),
}


@dataclass
class TinyGemma3:
    hidden_size: int = 64  # model width
    num_hidden_layers: int = 2  # decoder layers
    num_attention_heads: int = 4  # query heads
    num_key_value_heads: int = 2  # key/value heads (GQA)
    head_dim: int = 16  # per-head width
    intermediate_size: int = 128  # MLP width
    sliding_window: int = 64  # local-attention window (every 6th layer global, as in Gemma 3)
    # std of the random weights: 0.1 gives the logits a range LoRA can steer (Gemma's 0.02 keeps a random model's
    # output near uniform, so a demo's loss would barely move)
    init_std: float = 0.1
    seed: int = 0  # random-weight seed

    def problems(self) -> list[str]:
        """Shapes a tiny Gemma 3 cannot be built with (checked whatever the source, so a recipe stays switchable)."""
        out = below_minimums(self, "model.tiny", {
            "hidden_size": 1, "num_hidden_layers": 1, "num_attention_heads": 1, "num_key_value_heads": 1,
            "head_dim": 2, "intermediate_size": 1, "sliding_window": 1})
        if self.num_key_value_heads >= 1 and self.num_attention_heads % self.num_key_value_heads:
            out.append(f"model.tiny.num_attention_heads={self.num_attention_heads} must be a multiple of "
                       f"model.tiny.num_key_value_heads={self.num_key_value_heads} (grouped-query attention)")
        if not self.init_std > 0:
            out.append(f"model.tiny.init_std={self.init_std} must be positive, e.g. 0.1")
        if self.head_dim % 2:
            out.append(f"model.tiny.head_dim={self.head_dim} must be even (rotary position embeddings rotate pairs)")
        return out + seed_problems(self.seed, "model.tiny.seed")


#: torch.manual_seed takes 0 ... 2^64 - 1.
MAX_SEED = 2**64 - 1


def seed_problems(seed: int, key: str) -> list[str]:
    return [] if 0 <= seed <= MAX_SEED else [f"{key}={seed} must be in 0 ... 2^64 - 1 (what torch.manual_seed takes)"]


@dataclass
class ModelConfig:
    name: str = "tiny_gemma3"  # a label for tags and the summary
    source: ModelSource = ModelSource.tiny  # where the weights come from
    id: Optional[str] = None  # Hugging Face model id or local directory (source=pretrained)
    revision: Optional[str] = None  # pinned revision (commit) of `id`; required in production profiles
    dtype: DType = DType.bfloat16  # dtype of the non-quantized weights
    attn_implementation: Attention = Attention.sdpa  # transformers attention backend: sdpa | eager | flash_attention_2
    gradient_checkpointing: bool = False  # non-reentrant activation checkpointing
    checkpoint_every_n_layers: int = 1  # with gradient_checkpointing: every n-th decoder layer recomputes all
    selective_checkpointing: bool = False  # other layers: keep matmul/attention outputs, recompute the rest (SAC)
    compile_layers: bool = False  # torch.compile each decoder layer (fuses element-wise ops; slow first steps)
    offline: bool = True  # never contact the model hub (weights must be local or cached)
    tiny: TinyGemma3 = field(default_factory=TinyGemma3)  # architecture when source=tiny
    architecture: Architecture = Architecture.gemma3_27b  # shape built when source=random
    num_layers: Optional[int] = None  # source=random: decoder layers to build (None: all, 62 for gemma3_27b)
    init_seed: int = 0  # source=random: seed of the random weights (drawn on the training device)

    def problems(self) -> list[str]:
        out = below_minimums(self, "model", {"checkpoint_every_n_layers": 1, "num_layers": 1})
        out += seed_problems(self.init_seed, "model.init_seed")
        if self.revision and self.source != ModelSource.pretrained:
            out.append(f"model.revision={self.revision} pins pretrained weights, but model.source="
                       f"{ModelSource(self.source).value} draws random ones: drop it, or set model.source=pretrained")
        if self.num_layers is not None:
            depth = ARCHITECTURES[Architecture(self.architecture)]["num_hidden_layers"]
            if self.source != ModelSource.random:
                out.append(f"model.num_layers={self.num_layers} cuts the depth of a random-weight model only: add "
                           f"model.source=random (for source=tiny, set model.tiny.num_hidden_layers)")
            elif self.num_layers > depth:
                out.append(f"model.num_layers={self.num_layers} exceeds the {depth} decoder layers of "
                           f"model.architecture={Architecture(self.architecture).value}: use 1 to {depth}")
        return out + TinyGemma3.problems(self.tiny)


def random_parameter_count(model) -> int:
    """Parameters of the model `source=random` draws (decoder layers, norms, the tied embedding)."""
    dims = ARCHITECTURES[Architecture(model.architecture)]
    h, heads, kv, d = dims["hidden_size"], dims["num_attention_heads"], dims["num_key_value_heads"], dims["head_dim"]
    per_layer = h * (heads + 2 * kv) * d + heads * d * h + 3 * h * dims["intermediate_size"] + 4 * h + 2 * d
    return (model.num_layers or dims["num_hidden_layers"]) * per_layer + dims["vocab_size"] * h + h


def weights_label(model) -> str:
    """What a run's weights are, for tags and the adapter's base model: the pretrained id, or the random source."""
    if model.source == ModelSource.pretrained:
        return model.id
    if model.source == ModelSource.tiny:
        return f"random tiny Gemma 3 (model.tiny.seed={model.tiny.seed})"
    arch = Architecture(model.architecture)
    layers = model.num_layers or ARCHITECTURES[arch]["num_hidden_layers"]
    return f"random {arch.value} weights, {layers} layers (model.init_seed={model.init_seed})"


class Optimizer(str, Enum):
    adamw = "adamw"  # torch AdamW (fused on CUDA)
    adamw_8bit = "adamw_8bit"  # bitsandbytes 8-bit AdamW


class Precision(str, Enum):  # member names in YAML, Lightning's precision strings as values
    fp32 = "32-true"
    bf16_mixed = "bf16-mixed"
    bf16_true = "bf16-true"


class Strategy(str, Enum):
    auto = "auto"  # Lightning's choice: one device, or DDP across several
    ddp = "ddp"  # data parallel: a full (4-bit) model replica per device, gradients all-reduced
    fsdp = "fsdp"  # fully sharded across CUDA devices, a unit per decoder layer (4-bit weights stored in model.dtype)


@dataclass
class TrainerConfig:
    max_steps: int = 30  # optimizer steps
    lr: float = 2e-4  # peak learning rate
    warmup_steps: int = 0  # linear warm-up steps, then cosine decay to 10% of lr
    weight_decay: float = 0.0  # AdamW weight decay on the LoRA parameters
    optimizer: Optimizer = Optimizer.adamw  # optimizer of the LoRA parameters
    precision: Precision = Precision.fp32  # Lightning precision plugin
    accumulate_grad_batches: int = 1  # micro-batches per optimizer step
    gradient_clip_val: float = 1.0  # gradient-norm clipping; 0 disables
    val_check_interval: int = 10  # validate every N training batches
    limit_val_batches: int = 8  # validation batches per validation pass
    num_sanity_val_steps: int = 1  # validation batches before training (catches a broken val loop early)
    log_every_n_steps: int = 5  # metric logging cadence
    seed: int = 0  # global seed (weights of tiny models come from model.tiny.seed)
    deterministic: bool = True  # torch deterministic algorithms where available
    enable_progress_bar: bool = True  # progress bar on stderr (shows allow-listed metrics only)
    strategy: Strategy = Strategy.auto  # multi-device engine; launch multi-process runs with torchrun or SLURM
    loss_chunk_tokens: int = 0  # >0: chunked loss over supervised tokens, no full logits; 0: the model's own loss
    checkpoint_every_n_steps: int = 0  # write an encrypted checkpoint every N optimizer steps; 0: none
    checkpoint_keep: int = 2  # most recent encrypted checkpoints kept; -1 keeps all
    resume_from: Optional[str] = None  # encrypted checkpoint to resume (validate_only: to evaluate); digest: its sha256
    validate_only: bool = False  # evaluate the held-out split instead of training (val/* only, no adapter)

    def problems(self) -> list[str]:
        out = below_minimums(self, "trainer", {
            "max_steps": 1, "warmup_steps": 0, "weight_decay": 0, "accumulate_grad_batches": 1,
            "gradient_clip_val": 0, "val_check_interval": 1, "limit_val_batches": 0, "num_sanity_val_steps": 0,
            "log_every_n_steps": 1, "loss_chunk_tokens": 0, "checkpoint_every_n_steps": 0, "checkpoint_keep": -1})
        if self.checkpoint_keep == 0:
            out.append("trainer.checkpoint_keep=0 would delete every checkpoint it writes: use -1 (keep all) or "
                       "the number of most recent checkpoints to keep")
        if not self.lr > 0 or self.lr == float("inf"):
            out.append(f"trainer.lr={self.lr} must be a positive learning rate, e.g. trainer.lr=2e-4")
        return out


@dataclass
class OutputConfig:
    recipient: str = "dev"  # public key file the adapter is encrypted to, or "dev": a development key in .medtee/keys

    def problems(self) -> list[str]:
        return [] if self.recipient else ["output.recipient is empty: name the model owner's .pub key file, or dev"]


@dataclass
class DPConfig:
    enabled: bool = False  # DP-SGD on the LoRA parameters (Opacus): per-dialogue clipping, Gaussian noise
    target_epsilon: float = 8.0  # privacy budget epsilon for the whole run
    target_delta: float = 1e-5  # delta of (epsilon, delta)-DP; keep it below 1 / number of training dialogues
    max_grad_norm: float = 1.0  # per-sample gradient clipping norm

    def problems(self) -> list[str]:
        """Checked whether or not DP is on (a recipe stays switchable): an infinite clipping norm or budget would
        void the guarantee, and NaN passes every comparison."""
        out = []
        for key, example in (("target_epsilon", "8.0"), ("max_grad_norm", "1.0")):
            value = getattr(self, key)
            if not (math.isfinite(value) and value > 0):
                out.append(f"privacy.dp.{key}={value} must be a finite positive number, e.g. "
                           f"privacy.dp.{key}={example}")
        if not 0 < self.target_delta < 1:  # NaN and inf fail this too
            out.append(f"privacy.dp.target_delta={self.target_delta} must be in (0, 1), e.g. "
                       f"privacy.dp.target_delta=1e-5")
        return out


@dataclass
class PrivacyConfig:
    dp: DPConfig = field(default_factory=DPConfig)  # differentially private training

    def problems(self) -> list[str]:
        return DPConfig.problems(self.dp)


def dp_problems(privacy, data, trainer, hardware, *, model, qlora) -> list[str]:
    """What DP-SGD (privacy.dp.enabled) cannot honour in the other groups: clipping must be per dialogue, in one
    process, with per-sample gradient hooks that see each forward pass once."""
    if not privacy.dp.enabled:
        return []
    on = "privacy.dp.enabled=true"
    out = []
    if data.packing:
        out.append(f"{on} needs data.packing=false: per-sample clipping must be per dialogue, and a packed row "
                   f"holds several dialogues")
    if trainer.accumulate_grad_batches > 1:
        out.append(f"{on} needs trainer.accumulate_grad_batches=1 (got {trainer.accumulate_grad_batches}): raise "
                   f"data.batch_size instead")
    if trainer.strategy != Strategy.auto or hardware.devices * hardware.num_nodes > 1:
        out.append(f"{on} trains in one process on one device: set trainer.strategy=auto, hardware.devices=1 and "
                   f"hardware.num_nodes=1 (DDP and FSDP are not supported with DP)")
    if model.gradient_checkpointing:
        out.append(f"{on} needs model.gradient_checkpointing=false: recomputed forward passes break Opacus's "
                   f"per-sample gradients")
    if model.compile_layers:
        out.append(f"{on} needs model.compile_layers=false: compiled layers bypass Opacus's per-sample hooks")
    if qlora.use_dora:
        out.append(f"{on} needs qlora.use_dora=false: Opacus has no per-sample gradients for DoRA's magnitudes")
    return out
