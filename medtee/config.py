"""Typed recipe schemas, Hydra composition, cross-group rules and the recipe digest.

Every config group is backed by a dataclass registered in Hydra's ConfigStore, so a typo'd key, a wrong type or an
unknown option fails at compose time. Nothing here imports torch or any other heavy library.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any, List, Optional

from medtee.attestation.policy import AttestationPolicy, policy_from_mapping
from medtee.data.config import DataConfig
from medtee import recipe_guard
from medtee.crypto.hpke import Scheme
from medtee.files import sha256_file
from medtee.paths import conf_dir, recipes_dir
from medtee.sealing.config import EncryptionConfig


class ConfigError(ValueError):
    """A recipe or override is invalid; the message names the key and what is valid."""


# ---------------------------------------------------------------------------------------------------------- schemas


class Accelerator(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


@dataclass
class HardwareConfig:
    name: str = "cpu_dev"  # profile name, recorded in the run's tags
    production: bool = False  # a production profile: real attestation only, sealed data only, remote key broker
    accelerator: Accelerator = Accelerator.cpu  # what the training runs on
    devices: int = 1  # accelerators per node
    num_nodes: int = 1  # nodes (multi-node runs go through Lightning's launchers)
    gpu_model: Optional[str] = None  # required GPU product name substring, e.g. "H200"; checked before key release
    require_sev_snp: bool = False  # the machine must be an SEV-SNP guest (configfs-tsm or /dev/sev-guest)
    require_gpu_cc: bool = False  # every GPU must be in CC mode: the attestation policy must demand it of GPU evidence
    supports_4bit: bool = True  # bitsandbytes 4-bit kernels run on this profile
    cpu_threads: Optional[int] = None  # torch intra-op threads; None leaves torch's default


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


class Attention(str, Enum):  # transformers attention backends (a fixed set: a hub kernel id would load code)
    sdpa = "sdpa"
    eager = "eager"
    flash_attention_2 = "flash_attention_2"


class ModelSource(str, Enum):
    tiny = "tiny"  # a small Gemma 3 built from `tiny` with random weights (tests, the demo)
    pretrained = "pretrained"  # weights loaded by Hugging Face id or local path


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
    resume_from: Optional[str] = None  # encrypted checkpoint to resume (validate_only: to evaluate); not in digest
    validate_only: bool = False  # evaluate the held-out split instead of training (val/* only, no adapter)


@dataclass
class TrackingConfig:
    # MLflow store: sqlite:///FILE (relative to the current directory) or http(s)://HOST of a tracking server;
    # None (tracking=mlflow_server) takes the server's URL from MLFLOW_TRACKING_URI when the run starts
    tracking_uri: Optional[str] = "sqlite:///mlflow.db"
    experiment: str = "medtee"  # MLflow experiment name
    run_name: Optional[str] = None  # MLflow run name; None uses the recipe name
    metrics: Optional[List[str]] = None  # narrows medtee's metric allow-list (None keeps all of it); cannot widen it
    min_aggregate: int = 20  # evaluation metrics over fewer examples than this are suppressed


@dataclass
class OutputConfig:
    recipient: str = "dev"  # public key file the adapter is encrypted to, or "dev": a development key in .medtee/keys


@dataclass
class MedteeConfig:
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    attestation: AttestationPolicy = field(default_factory=AttestationPolicy)
    encryption: EncryptionConfig = field(default_factory=EncryptionConfig)
    qlora: QLoRAConfig = field(default_factory=QLoRAConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


GROUP_SCHEMAS = {
    "hardware": HardwareConfig,
    "attestation": AttestationPolicy,
    "encryption": EncryptionConfig,
    "qlora": QLoRAConfig,
    "model": ModelConfig,
    "data": DataConfig,
    "trainer": TrainerConfig,
    "tracking": TrackingConfig,
}

#: Metrics medtee may ever send to MLflow. Recipes can only narrow this list (tracking.metrics).
METRIC_ALLOW_LIST = (
    "train/loss",
    "train/lr",
    "train/tokens_per_s",
    "train/grad_norm",
    "train/epoch",
    "val/loss",
    "val/perplexity",
)

#: Fields excluded from the recipe digest, and why they cannot change what runs: `data.path` is where this machine
#: keeps the sealed dataset, which the key release binds by dataset id and manifest digest; `tracking.run_name` is
#: a label on the MLflow run; `encryption.broker_dir` is the embedded (development) broker's store, and production
#: profiles require a remote broker, whose URL is in the digest.
NOT_IN_DIGEST = ("data.path", "tracking.run_name", "encryption.broker_dir")

#: Fields that name a file: the digest covers the file's content (sha256), not its path, so replacing the file
#: changes the digest. (The pretrained weights enter it through `digest_input(weights=...)`.)
FILES_IN_DIGEST = (("output", "recipient"), ("encryption", "broker_ca"), ("trainer", "resume_from"))

#: MLflow tracking URI schemes a recipe may name (any other scheme selects an MLflow store plugin: code).
TRACKING_SCHEMES = ("sqlite", "http", "https")

#: Smallest value of each numeric field that can run (checked at compose time).
MINIMUMS = {
    "hardware.devices": 1, "hardware.num_nodes": 1,
    "qlora.rank": 1, "qlora.alpha": 1,
    "data.batch_size": 1, "data.max_length": 32, "data.n_synthetic": 2,
    "trainer.max_steps": 1, "trainer.warmup_steps": 0, "trainer.weight_decay": 0, "trainer.accumulate_grad_batches": 1,
    "trainer.gradient_clip_val": 0, "trainer.val_check_interval": 1, "trainer.limit_val_batches": 0,
    "trainer.num_sanity_val_steps": 0, "trainer.log_every_n_steps": 1, "trainer.loss_chunk_tokens": 0,
    "trainer.checkpoint_every_n_steps": 0, "trainer.checkpoint_keep": -1,
    "model.checkpoint_every_n_layers": 1,
    "model.tiny.hidden_size": 1, "model.tiny.num_hidden_layers": 1, "model.tiny.num_attention_heads": 1,
    "model.tiny.num_key_value_heads": 1, "model.tiny.head_dim": 2, "model.tiny.intermediate_size": 1,
    "model.tiny.sliding_window": 1,
    "tracking.min_aggregate": 1,
    "encryption.broker_timeout_s": 0.1,
}

#: Accelerators Lightning's FSDP strategy shards across (it refuses any other).
FSDP_ACCELERATORS = ("cuda",)

# -------------------------------------------------------------------------------------------------------- composing


def recipe_names() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


_USER_RECIPES: dict[str, object] = {}  # recipe files named on this command line: stem -> checked node


def use_recipe_files(overrides: list[str]) -> list[str]:
    """Let `recipe=path/to/file.yaml` name a recipe outside the shipped ones: checked now, registered under its
    file stem."""
    out = []
    for arg in overrides:
        key, sep, value = arg.partition("=")
        if sep and key == "recipe" and value.endswith((".yaml", ".yml")):
            path = Path(value).expanduser()
            if not path.exists():
                raise ConfigError(f"recipe file {value} does not exist")
            if not recipe_guard.NAME.fullmatch(path.stem):
                raise ConfigError(f"recipe file {value}: name it with letters, digits, '_' and '-' only")
            if path.stem in recipe_names():
                raise ConfigError(f"recipe file {value} has the name of a shipped recipe ('{path.stem}'); rename it")
            _USER_RECIPES[path.stem] = _load_recipe(path.resolve())
            arg = f"recipe={path.stem}"
        out.append(arg)
    return out


def _load_recipe(path: Path):
    """A recipe file's node, refused unless it is plain data (`medtee.recipe_guard`)."""
    from omegaconf import OmegaConf

    try:
        node = OmegaConf.create(recipe_guard.read_recipe_text(path))
    except recipe_guard.RecipeRuleError as exc:
        raise ConfigError(str(exc)) from None
    except Exception as exc:  # a YAML syntax error or a tag that would construct an object
        raise ConfigError(f"recipe file {path} is not valid YAML: {exc}") from None
    try:
        recipe_guard.check_recipe_node(OmegaConf.to_container(node, resolve=False), f"recipe file {path}",
                                       groups=group_options(), fields=_top_fields())
    except recipe_guard.RecipeRuleError as exc:
        raise ConfigError(str(exc)) from None
    return node


def register() -> None:
    """Register the schemas, the shipped recipes and any recipe files in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="medtee_schema", node=MedteeConfig)
    for group, schema in GROUP_SCHEMAS.items():
        cs.store(group=f"schema/{group}", name=group, node=schema)
    recipes = {p.stem: _load_recipe(p) for p in sorted(recipes_dir().glob("*.yaml"))}
    for name, node in {**recipes, **_USER_RECIPES}.items():
        cs.store(group="recipe", name=name, node=node, package="_global_")


def group_options() -> dict[str, list[str]]:
    """Each medtee config group and its shipped options (`conf/GROUP/*.yaml`)."""
    return {group: sorted(p.stem for p in (conf_dir() / group).glob("*.yaml")) for group in GROUP_SCHEMAS}


def _top_fields() -> list[str]:
    return [f.name for f in fields(MedteeConfig)]


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(Hydra flags, recipe overrides) of a `medtee train` command line; refuses any flag medtee does not allow, and
    overrides that are not plain data (sweeps only with -m)."""
    try:
        flags, overrides = recipe_guard.split_argv(argv)
        recipe_guard.check_overrides(overrides, groups={**group_options(), "recipe": None}, fields=_top_fields(),
                                     multirun="-m" in flags or "--multirun" in flags)
    except recipe_guard.RecipeRuleError as exc:
        raise ConfigError(str(exc)) from None
    except Exception as exc:  # an override Hydra's parser cannot read
        raise ConfigError(f"cannot read the overrides: {str(exc).splitlines()[0]}") from None
    return flags, overrides


def expand_sweeps(overrides: list[str]) -> list[list[str]]:
    """One override list per value of every sweep (each sweep value checked once, the others at their first value)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    if not any(o.is_sweep_override() for o in parsed):
        return [overrides]
    first = [f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}" if o.is_sweep_override()
             else o.input_line for o in parsed]
    variants = [first]
    for i, o in enumerate(parsed):
        if o.is_sweep_override():
            for value in list(o.sweep_string_iterator())[1:]:
                variant = list(first)
                variant[i] = f"{o.get_key_element()}={value}"
                variants.append(variant)
    return variants


def compose(overrides: list[str] | None = None):
    """Compose and validate a recipe (no Hydra run directory, nothing written). Raises ConfigError."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    register()
    overrides = list(overrides or [])
    groups = {**group_options(), "recipe": sorted({*recipe_names(), *_USER_RECIPES})}
    try:
        recipe_guard.check_overrides(overrides, groups=groups, fields=_top_fields())
        with initialize_config_dir(str(conf_dir()), version_base="1.3"):
            cfg = hydra_compose("config", overrides=overrides, return_hydra_config=True)
            shipped = _shipped_hydra_settings()
        recipe_guard.check_hydra_settings(OmegaConf.to_container(cfg.hydra, resolve=False), shipped)
        with open_dict(cfg):
            del cfg["hydra"]
        recipe_guard.check_values(OmegaConf.to_container(cfg, resolve=False), "the composed recipe")
    except recipe_guard.RecipeRuleError as exc:
        raise ConfigError(str(exc)) from None
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(explain_compose_error(exc)) from None
    check(cfg)
    return cfg


_SHIPPED_HYDRA: list[dict] = []


def _shipped_hydra_settings() -> dict:
    """The Hydra section of the shipped root config with no overrides (inside an initialized Hydra context)."""
    if not _SHIPPED_HYDRA:
        from hydra import compose as hydra_compose
        from omegaconf import OmegaConf

        cfg = hydra_compose("config", overrides=[], return_hydra_config=True)
        _SHIPPED_HYDRA.append(OmegaConf.to_container(cfg.hydra, resolve=False))
    return _SHIPPED_HYDRA[0]


def _schema_keys(dotted_parent: str) -> list[str] | None:
    node: Any = MedteeConfig
    for part in [p for p in dotted_parent.split(".") if p]:
        if not is_dataclass(node):
            return None
        match = {f.name: f for f in fields(node)}.get(part)
        if match is None:
            return None
        node = match.type if is_dataclass(match.type) else _resolve_field_type(node, part)
    return [f.name for f in fields(node)] if is_dataclass(node) else None


def _resolve_field_type(owner: type, name: str):
    import typing

    return typing.get_type_hints(owner).get(name)


def explain_compose_error(exc: BaseException) -> str:
    """Turn Hydra/OmegaConf composition errors into one message naming the key and the valid keys or options."""
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, ConfigKeyError) or (cause is not None and "not in" in str(cause).split("\n")[0]):
        full_key = getattr(cause, "full_key", None) or ""
        parent, _, leaf = full_key.rpartition(".")
        valid = _schema_keys(parent)
        if valid is not None:
            where = f"'{parent}'" if parent else "the top level"
            hint = difflib.get_close_matches(leaf, valid, n=1)
            did_you_mean = f" Did you mean '{parent + '.' if parent else ''}{hint[0]}'?" if hint else ""
            return (f"unknown key '{full_key}'. Valid keys under {where}: {', '.join(valid)}.{did_you_mean}")
    if isinstance(cause, ValidationError):
        first = str(cause).split("\n")[0]
        full_key = getattr(cause, "full_key", "")
        return f"invalid value for '{full_key}': {first}"
    text = str(exc).strip()
    if "Could not find" in text:  # unknown group option: Hydra lists the available ones
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("provider=")]
        lines = [ln for ln in lines if ln != "Config search path:"]
        head = lines[0].replace("In 'config': ", "")
        options = [ln for ln in lines[2:]]
        return f"{head}. Valid options: {', '.join(options)}" if options else head
    return text.splitlines()[0] if text else type(exc).__name__


# ------------------------------------------------------------------------------------------------ cross-group rules


def check(cfg) -> None:
    """Rules that span groups, checked before anything runs. Raises ConfigError listing every violated rule."""
    problems = []
    hw, att, q = cfg.hardware, cfg.attestation, cfg.qlora
    if hw.production:
        if att.allow_simulated or att.provider == "simulated" or not att.production:
            problems.append(f"hardware profile '{hw.name}' is a production profile but attestation policy "
                            f"'{att.name}' is not (it allows simulated evidence); choose a production policy, "
                            f"e.g. attestation=snp_h200")
        if cfg.data.source != "sealed":
            problems.append(f"production profile '{hw.name}' trains on sealed data only: set data=sealed "
                            f"data.path=DIR")
        if not str(cfg.encryption.broker).startswith(("http://", "https://")):
            problems.append(f"production profile '{hw.name}' needs the data owner's key broker: set "
                            f"encryption.broker=https://... (an embedded broker would hold the owner's key here)")
        if not cfg.model.offline:
            problems.append("production profiles allow no model-hub access: set model.offline=true")

    if cfg.trainer.strategy == "fsdp":
        if hw.accelerator not in FSDP_ACCELERATORS:
            problems.append(f"trainer.strategy=fsdp shards across CUDA GPUs only, but hardware profile '{hw.name}' "
                            f"runs on {hw.accelerator.value}: use trainer.strategy=ddp there, or a GPU hardware profile")
        param_dtype = "float32" if cfg.trainer.precision == "32-true" else "bfloat16"
        if q.quantization != "none" and cfg.model.dtype != param_dtype:
            # FSDP casts each flat parameter to the precision's dtype: packed 4-bit bytes cast as numbers are garbage
            problems.append(f"trainer.strategy=fsdp stores the 4-bit weights as model.dtype elements, which FSDP casts "
                            f"to trainer.precision={cfg.trainer.precision.name}'s {param_dtype}: set "
                            f"model.dtype={param_dtype}")
    if q.quantization != "none" and not hw.supports_4bit:
        problems.append(f"qlora.quantization={q.quantization} needs bitsandbytes 4-bit kernels, which hardware "
                        f"profile '{hw.name}' cannot run; use qlora=lora or another hardware profile")
    try:
        policy_from_mapping(cfg.attestation, "attestation")
    except ValueError as exc:
        problems.append(str(exc))
    try:
        Scheme.parse(cfg.encryption.scheme)
    except ValueError as exc:
        problems.append(f"encryption.scheme: {exc}")
    if cfg.encryption.broker != "embedded" and not str(cfg.encryption.broker).startswith(("http://", "https://")):
        problems.append(f"encryption.broker={cfg.encryption.broker!r}: use 'embedded' or an http(s):// URL")
    uri = cfg.tracking.tracking_uri
    if uri is not None and uri.partition(":")[0] not in TRACKING_SCHEMES:
        problems.append(f"tracking.tracking_uri={uri!r}: MLflow stores are named sqlite:///FILE or "
                        f"http(s)://HOST (tracking=mlflow_server reads MLFLOW_TRACKING_URI)")
    if hw.require_gpu_cc and not (att.gpu_provider and att.gpu.required and att.gpu.require_cc_mode):
        problems.append(f"hardware profile '{hw.name}' requires every GPU in confidential-computing mode, which only "
                        f"GPU evidence proves: attestation policy '{att.name}' must set gpu_provider=nvidia, "
                        f"gpu.required=true and gpu.require_cc_mode=true (e.g. attestation=snp_h200)")
    if cfg.tracking.metrics is not None:
        extra = sorted(set(cfg.tracking.metrics) - set(METRIC_ALLOW_LIST))
        if extra:
            problems.append(f"tracking.metrics may only narrow medtee's allow-list; not allowed: {', '.join(extra)}. "
                            f"Allowed: {', '.join(METRIC_ALLOW_LIST)}")
    for key, minimum in MINIMUMS.items():
        value = _get(cfg, key)
        if value is not None and value < minimum:
            problems.append(f"{key}={value} must be at least {minimum}")
    if cfg.trainer.checkpoint_keep == 0:
        problems.append("trainer.checkpoint_keep=0 would delete every checkpoint it writes: use -1 (keep all) or "
                        "the number of most recent checkpoints to keep")
    if not cfg.trainer.lr > 0 or cfg.trainer.lr == float("inf"):
        problems.append(f"trainer.lr={cfg.trainer.lr} must be a positive learning rate, e.g. trainer.lr=2e-4")
    if cfg.data.source != "sealed" and cfg.data.path:
        problems.append(f"data.path={cfg.data.path} is set but data={cfg.data.source.value} does not read it: add "
                        f"data=sealed to train on the sealed dataset at that path")
    problems += _tiny_model_problems(cfg.model)
    from medtee.broker.protocol import is_loopback_url

    broker = str(cfg.encryption.broker)
    if broker.startswith("http://") and not is_loopback_url(broker):
        problems.append(f"encryption.broker={broker}: plain http is allowed only on loopback (127.0.0.1, ::1, "
                        f"localhost); serve the broker with TLS and use https://")
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        problems.append(f"data.val_fraction={cfg.data.val_fraction} must be in [0, 1)")
    if not 0.0 <= q.dropout < 1.0:
        problems.append(f"qlora.dropout={q.dropout} must be in [0, 1)")
    if problems:
        raise ConfigError("; ".join(problems))


def _tiny_model_problems(model) -> list[str]:
    """Shapes a tiny Gemma 3 cannot be built with (checked whatever the source, so a recipe stays switchable)."""
    t, problems = model.tiny, []
    if t.num_key_value_heads >= 1 and t.num_attention_heads % t.num_key_value_heads:
        problems.append(f"model.tiny.num_attention_heads={t.num_attention_heads} must be a multiple of "
                        f"model.tiny.num_key_value_heads={t.num_key_value_heads} (grouped-query attention)")
    if not t.init_std > 0:
        problems.append(f"model.tiny.init_std={t.init_std} must be positive, e.g. 0.1")
    if t.head_dim % 2:
        problems.append(f"model.tiny.head_dim={t.head_dim} must be even (rotary position embeddings rotate pairs)")
    return problems


def check_runnable(cfg) -> None:
    """Values a recipe may leave for the command line but a run needs. Raises ConfigError."""
    problems = []
    if cfg.data.source == "sealed" and not cfg.data.path:
        problems.append("data=sealed needs the sealed dataset: pass data.path=DIR (a directory made by `medtee seal`)")
    if cfg.hardware.production and cfg.model.source == "pretrained" and not cfg.model.revision:
        problems.append("production profiles load pinned weights: pass model.revision=COMMIT")
    ca = cfg.encryption.broker_ca
    if ca and not Path(ca).is_file():  # is_file: a regular file (a FIFO would hang the TLS setup)
        problems.append(f"encryption.broker_ca={ca} is not a regular file: name the PEM bundle that signed the "
                        f"broker's certificate, or leave it empty for the system trust store")
    if cfg.hardware.production and cfg.output.recipient == "dev":
        problems.append("production profiles encrypt the adapter to the model owner's key: pass "
                        "output.recipient=PATH/NAME.pub (`medtee keys new`); the development key's private half "
                        "sits beside it on this machine")
    if problems:
        raise ConfigError("; ".join(problems))


#: Environment variables MLflow sends as credentials to whatever tracking server a run names.
MLFLOW_CREDENTIALS = ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def apply_environment(cfg) -> None:
    """Fill what a recipe leaves to the environment (tracking=mlflow_server: MLFLOW_TRACKING_URI); then check it.

    The operator's MLflow credentials go only to the server the operator named in MLFLOW_TRACKING_URI: a recipe
    naming another server while they are set is refused (it would receive them)."""
    env_uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if cfg.tracking.tracking_uri is None:
        if not env_uri:
            raise ConfigError("tracking=mlflow_server reads the tracking server's URL from MLFLOW_TRACKING_URI, "
                              "which is empty; set it, e.g. MLFLOW_TRACKING_URI=https://mlflow.example.org")
        cfg.tracking.tracking_uri = env_uri
        check(cfg)
    credentials = [name for name in MLFLOW_CREDENTIALS if os.environ.get(name)]
    uri = cfg.tracking.tracking_uri
    if credentials and uri.startswith(("http://", "https://")) and uri.rstrip("/") != env_uri.rstrip("/"):
        raise ConfigError(f"tracking.tracking_uri names a server other than MLFLOW_TRACKING_URI while "
                          f"{', '.join(credentials)} is set: MLflow would send those credentials to it. Use "
                          f"tracking=mlflow_server (the server in MLFLOW_TRACKING_URI), or unset the credentials")


def _get(cfg, dotted: str):
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, dotted)


# ------------------------------------------------------------------------------------------------------ the digest


def resolved(cfg) -> dict:
    """The recipe as plain data, interpolations resolved."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def digest_input(resolved_recipe: dict, *, weights: dict | None = None) -> dict:
    """The resolved recipe as the digest covers it: without the fields in NOT_IN_DIGEST, the files in
    FILES_IN_DIGEST named by their sha256 rather than their path, and (`weights`: file -> sha256) the pretrained
    weights the run loads."""
    data = json.loads(json.dumps(resolved_recipe))
    for dotted in NOT_IN_DIGEST:
        *parents, leaf = dotted.split(".")
        node = data
        for p in parents:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    for section, key in FILES_IN_DIGEST:
        value = data.get(section, {}).get(key)
        if value and Path(value).is_file():
            data[section][key] = "sha256:" + sha256_file(value)
    if weights is not None:
        data["model"]["weights_sha256"] = dict(sorted(weights.items()))
    return data


def recipe_digest(cfg, *, weights: dict | None = None) -> str:
    """sha256 of the canonical JSON of `digest_input(resolved(cfg), weights=weights)`."""
    canonical = json.dumps(digest_input(resolved(cfg), weights=weights), sort_keys=True, separators=(",", ":"),
                           ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def recipe_file(name: str) -> Path:
    path = recipes_dir() / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no recipe named '{name}'. Valid recipes: {', '.join(recipe_names())}")
    return path
