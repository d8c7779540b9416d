"""Hydra composition, error translation, the rules that span config groups, and the recipe digest.

Every config group is backed by a dataclass schema that lives beside its package (`medtee.hardware`,
`medtee.attestation.policy`, `medtee.crypto.config`, `medtee.broker.config`, `medtee.training.config`,
`medtee.data.config`, `medtee.tracking.config`) and checks its own values (`Schema.problems(section)`). The schemas
are registered in Hydra's ConfigStore, so a typo'd key, a wrong type or an unknown option fails at compose time.
Nothing here imports torch or any other heavy library.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

from medtee import recipe_guard
from medtee.audit.config import ReleaseConfig
from medtee.attestation.policy import AttestationPolicy, policy_from_mapping
from medtee.broker.config import BrokerConfig
from medtee.crypto.config import EncryptionConfig
from medtee.data.config import DataConfig, DataSource
from medtee.evaluation.config import EvalConfig
from medtee.files import not_a_file, sha256_file
from medtee.hardware import Accelerator, HardwareConfig
from medtee.paths import conf_dir, recipes_dir
from medtee.schema import FILES_IN_DIGEST, NOT_IN_DIGEST, ConfigError
from medtee.sweep.config import SweepConfig, check_parameters, from_section
from medtee.tracking.config import TrackingConfig
from medtee.training.config import ModelConfig, ModelSource, OutputConfig, PrivacyConfig, QLoRAConfig, Quantization
from medtee.training.config import TrainerConfig, dp_problems
from medtee.training.config import Precision, Strategy


# ---------------------------------------------------------------------------------------------------------- schemas


@dataclass
class MedteeConfig:
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    attestation: AttestationPolicy = field(default_factory=AttestationPolicy)
    encryption: EncryptionConfig = field(default_factory=EncryptionConfig)
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    qlora: QLoRAConfig = field(default_factory=QLoRAConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    release: ReleaseConfig = field(default_factory=ReleaseConfig)
    sweep: Optional[SweepConfig] = None  # `medtee sweep`: the search space, objective, sampler and study storage


GROUP_SCHEMAS = {
    "hardware": HardwareConfig,
    "attestation": AttestationPolicy,
    "encryption": EncryptionConfig,
    "broker": BrokerConfig,
    "qlora": QLoRAConfig,
    "model": ModelConfig,
    "data": DataConfig,
    "trainer": TrainerConfig,
    "tracking": TrackingConfig,
    "sweep": SweepConfig,
}

#: Keys that moved, old -> new. An override with the old key still works (with a deprecation message); a recipe
#: file with the old key is refused with a message naming the new one.
MOVED_KEYS = {"encryption.broker": "broker.url", "encryption.broker_dir": "broker.dir",
              "encryption.broker_ca": "broker.ca", "encryption.broker_timeout_s": "broker.timeout_s"}

#: Group options that were renamed, (group, old) -> new; handled as MOVED_KEYS are.
RENAMED_OPTIONS = {("qlora", "lora"): "unquantized"}

#: Accelerators Lightning's FSDP strategy shards across (it refuses any other).
FSDP_ACCELERATORS = (Accelerator.cuda,)

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
                                       groups=group_options(), fields=_top_fields(), unreferable=NOT_IN_DIGEST)
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
        overrides = modernize(overrides)
        recipe_guard.check_overrides(overrides, groups={**group_options(), "recipe": None}, fields=_top_fields(),
                                     multirun="-m" in flags or "--multirun" in flags, unreferable=NOT_IN_DIGEST)
    except recipe_guard.RecipeRuleError as exc:
        raise ConfigError(str(exc)) from None
    except Exception as exc:  # an override Hydra's parser cannot read
        raise ConfigError(f"cannot read the overrides: {str(exc).splitlines()[0]}") from None
    return flags, overrides


def modernize(overrides: list[str]) -> list[str]:
    """Overrides with the old spelling of a moved key or a renamed option rewritten to the new one, each with a
    deprecation message on stderr."""
    import sys

    out = []
    for arg in overrides:
        key, sep, value = arg.partition("=")
        new = arg
        if sep and key in MOVED_KEYS:
            new = f"{MOVED_KEYS[key]}={value}"
        elif sep and (key, value) in RENAMED_OPTIONS:
            new = f"{key}={RENAMED_OPTIONS[key, value]}"
        if new != arg:
            print(f"medtee: '{arg}' is deprecated; it now reads '{new}'", file=sys.stderr)
        out.append(new)
    return out


def expand_sweeps(overrides: list[str]) -> list[list[str]]:
    """One override list per job Hydra's multirun runs: every combination of the sweeps' values (a value harmless
    alone may not be in combination, e.g. two changes to a production option). Refused (ConfigError) over
    recipe_guard.MAX_MULTIRUN_JOBS, counted before any value is listed."""
    import itertools

    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    if not any(o.is_sweep_override() for o in parsed):
        return [overrides]
    try:
        recipe_guard.multirun_jobs(parsed)
    except recipe_guard.RecipeRuleError as exc:
        raise ConfigError(str(exc)) from None
    choices = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
               else [o.input_line] for o in parsed]
    return [list(job) for job in itertools.product(*choices)]


def compose(overrides: list[str] | None = None):
    """Compose and validate a recipe (no Hydra run directory, nothing written). Raises ConfigError."""
    from hydra import compose as hydra_compose
    from hydra.errors import HydraException
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    register()
    overrides = list(overrides or [])
    groups = {**group_options(), "recipe": sorted({*recipe_names(), *_USER_RECIPES})}
    try:
        recipe_guard.check_overrides(overrides, groups=groups, fields=_top_fields(), unreferable=NOT_IN_DIGEST)
        with _hydra_context():
            cfg = hydra_compose("config", overrides=overrides, return_hydra_config=True)
            shipped = _shipped_hydra_settings()
            changed = _changed_production_options(cfg, dict(cfg.hydra.runtime.choices))
        recipe_guard.check_hydra_settings(OmegaConf.to_container(cfg.hydra, resolve=False), shipped)
        with open_dict(cfg):
            del cfg["hydra"]
        recipe_guard.check_values(OmegaConf.to_container(cfg, resolve=False), "the composed recipe",
                                  unreferable=NOT_IN_DIGEST)
        OmegaConf.to_container(cfg, resolve=True)  # an interpolation of the wrong type fails here, naming its key
    except recipe_guard.RecipeRuleError as exc:
        raise ConfigError(str(exc)) from None
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(explain_compose_error(exc)) from None
    if changed:
        raise ConfigError("; ".join(changed))
    check(cfg)
    return cfg


def check_job(cfg, choices: dict) -> None:
    """`compose`'s checks of the composed recipe again, on one job's config as Hydra hands it to the run (`choices`:
    its hydra.runtime.choices). A multirun job composes a combination of sweep values that no single compose may
    have seen, so each job is checked itself: production options as shipped, values plain data. (Hydra's own
    settings cannot differ between jobs: no override or recipe may touch them.) Needs Hydra initialised, as it is
    inside the app. Raises ConfigError."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        recipe_guard.check_values(OmegaConf.to_container(cfg, resolve=False), "the job's recipe",
                                  unreferable=NOT_IN_DIGEST)
        OmegaConf.to_container(cfg, resolve=True)
    except recipe_guard.RecipeRuleError as exc:
        raise ConfigError(str(exc)) from None
    except OmegaConfBaseException as exc:
        raise ConfigError(explain_compose_error(exc)) from None
    changed = _changed_production_options(cfg, choices)
    if changed:
        raise ConfigError("; ".join(changed))
    check(cfg)


#: Fields of a production hardware profile a recipe may set: how many of the machines it names a run uses.
OPERATIONAL_HARDWARE = ("devices", "num_nodes", "cpu_threads")
#: Fields of a production attestation policy a recipe may set: where this machine keeps what appraisal reads.
#: (Not `gpu.rim_store`: it holds the RIM root that RIM matching trusts, so a recipe naming it would supply its own
#: trust anchor; a production policy's RIM matching is set by shipping a policy option that sets it.)
LOCAL_ATTESTATION = ("cert_cache_dir", "gpu.ocsp_cache")
#: ... and requirements a recipe may add where the shipped policy has none (each value at least as strict). Not
#: `gpu.require_rim_match`/`gpu.allowed_rim_ids`: they need `gpu.rim_store`, see above.
TIGHTENINGS = {"measurements": [], "products": [], "host_data": None, "vmpl": None, "require_single_socket": False,
               "allow_smt": True, "vlek_csp_ids": [], "require_platform": [], "gpu.boards": []}
_SHIPPED_OPTIONS: dict[tuple[str, str], dict] = {}  # (group, option) -> the option's content as shipped


def _flat(section: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in section.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _changed_production_options(cfg, choices: dict) -> list[str]:
    """A production hardware profile or attestation policy used as shipped, or why not: its name labels the run's
    tags and receipt, so it may not be changed into something else under that name (e.g. a CPU run labelled
    h200_sev_snp, or simulated evidence passing "snp_h200"). Allowed: a profile's OPERATIONAL_HARDWARE; a policy's
    LOCAL_ATTESTATION paths and TIGHTENINGS where the shipped policy sets none. Needs Hydra initialised."""
    from hydra import compose as hydra_compose
    from omegaconf import OmegaConf

    problems = []
    for group in ("hardware", "attestation"):
        option = choices.get(group)
        if (group, option) not in _SHIPPED_OPTIONS:
            _SHIPPED_OPTIONS[group, option] = OmegaConf.to_container(hydra_compose("config", [f"{group}={option}"])[group])
        shipped = _flat(_SHIPPED_OPTIONS[group, option])
        if not shipped.get("production"):
            continue
        ours = _flat(OmegaConf.to_container(cfg[group]))
        if group == "hardware":
            free, note = set(OPERATIONAL_HARDWARE), f"only {', '.join(f'hardware.{k}' for k in OPERATIONAL_HARDWARE)}"
        else:
            free = set(LOCAL_ATTESTATION) | {k for k, neutral in TIGHTENINGS.items() if shipped.get(k) == neutral}
            note = (f"only the local paths {', '.join(f'attestation.{k}' for k in LOCAL_ATTESTATION)} and requirements "
                    f"it leaves open ({', '.join(f'attestation.{k}' for k in TIGHTENINGS)})")
        keys = sorted(f"{group}.{k}" for k in shipped.keys() | ours.keys()  # ours: a recipe can add a map's keys
                      if k not in free and ours.get(k) != shipped.get(k))  # (e.g. min_tcb_by_product.Milan)
        if keys:
            problems.append(f"{group}={option} is a production option and the run is labelled with its name: "
                            f"{', '.join(keys)} cannot be changed from it ({note} may be set); use it as shipped, or "
                            f"choose a development option (hardware=gpu_dev, attestation=simulated)")
    return problems


def _hydra_context():
    """Hydra initialised on medtee's conf/ for a compose: its own, or the running app's (a sweep's trials compose
    inside `medtee sweep`, whose Hydra is initialised already on the same directory)."""
    import contextlib

    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return contextlib.nullcontext()
    return initialize_config_dir(str(conf_dir()), version_base="1.3")


_SHIPPED_HYDRA: dict[bool, dict] = {}  # inside a running Hydra app (a sweep's trials) or not -> its Hydra section


def _shipped_hydra_settings() -> dict:
    """The Hydra section of the shipped root config with no overrides, in the current Hydra context (a running app
    fills some of it, e.g. the job's name, so each context is compared with its own)."""
    from hydra.core.hydra_config import HydraConfig

    key = HydraConfig.initialized()
    if key not in _SHIPPED_HYDRA:
        from hydra import compose as hydra_compose
        from omegaconf import OmegaConf

        cfg = hydra_compose("config", overrides=[], return_hydra_config=True)
        _SHIPPED_HYDRA[key] = OmegaConf.to_container(cfg.hydra, resolve=False)
    return _SHIPPED_HYDRA[key]


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


def unknown_setting(dotted: str) -> str | None:
    """Why no recipe can have the setting `dotted` (a release policy's rule key), or None when one can: the key must
    follow the schema's sections down to a field (past a mapping field, such as sweep.parameters, any key goes)."""
    import typing

    node: Any = MedteeConfig
    walked: list[str] = []
    for part in dotted.split("."):
        if walked == ["model"] and part == "weights_sha256":
            return None  # added by the digest: weight file -> sha256
        if node is Any or typing.get_origin(node) is dict:
            return None
        if not is_dataclass(node):
            return f"{'.'.join(walked)} is a single setting, with nothing inside it named {part}"
        hints = typing.get_type_hints(node)
        names = [f.name for f in fields(node)] + (["weights_sha256"] if walked == ["model"] else [])
        if part not in names:
            close = difflib.get_close_matches(part, names, n=1)
            hint = f" (did you mean {'.'.join(walked + close)}?)" if close else ""
            return (f"{'.'.join(walked) or 'a recipe'} has no setting {part}{hint}; "
                    f"{'its settings' if walked else 'its sections'}: {', '.join(names)}")
        node = hints[part]
        if typing.get_origin(node) is typing.Union:  # Optional[X]
            node = next(a for a in typing.get_args(node) if a is not type(None))
        walked.append(part)
    return None


def rule_key_problems(policy: AttestationPolicy, source: str) -> list[str]:
    """The release policy's setting rules (`recipe.fields`) whose key no recipe can have: such a rule releases
    nothing, so the data owner's tools refuse it when they read the policy (the policy loader, below this schema,
    cannot see the recipe's sections)."""
    return [f"attestation policy {source}: recipe.fields[{i}].key={rule.key}: {why}. No recipe has it, so the rule "
            f"would release nothing; name the setting as `medtee recipes digest --json` shows it"
            for i, rule in enumerate(policy.recipe.fields) if (why := unknown_setting(rule.key))]


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
        if full_key in MOVED_KEYS:
            return f"key '{full_key}' has moved: write '{MOVED_KEYS[full_key]}' (see README, 'What changed')"
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
    """Each group's own rules (`Schema.problems`), then the rules that span groups, before anything runs. Raises
    ConfigError listing every violated rule."""
    problems = []
    for group, schema in GROUP_SCHEMAS.items():
        if group == "attestation":
            try:
                problems += rule_key_problems(policy_from_mapping(cfg.attestation, "attestation"), "attestation")
            except ValueError as exc:
                problems.append(str(exc))
        elif cfg[group] is not None:  # the sweep group is empty unless a sweep is chosen
            problems += schema.problems(cfg[group])
    problems += OutputConfig.problems(cfg.output) + EvalConfig.problems(cfg.evaluation)
    problems += PrivacyConfig.problems(cfg.privacy) + ReleaseConfig.problems(cfg.release)
    if cfg.sweep is not None and not problems:
        problems += check_parameters(from_section(cfg.sweep), cfg)
    if cfg.sweep is not None and cfg.privacy.dp.enabled:
        problems.append("a sweep with privacy.dp.enabled=true would spend the privacy budget once per trial on the "
                        "same records (and release every trial's adapter): sweep without DP, then train the chosen "
                        "recipe once with DP")

    problems += dp_problems(cfg.privacy, cfg.data, cfg.trainer, cfg.hardware, model=cfg.model, qlora=cfg.qlora)
    problems += _production_problems(cfg)
    problems += _engine_problems(cfg.trainer, cfg.hardware, cfg.qlora, cfg.model)
    hw, att = cfg.hardware, cfg.attestation
    if hw.require_gpu_cc and not (att.gpu_provider and att.gpu.required and att.gpu.require_cc_mode):
        problems.append(f"hardware profile '{hw.name}' requires every GPU in confidential-computing mode, which only "
                        f"GPU evidence proves: attestation policy '{att.name}' must set gpu_provider=nvidia, "
                        f"gpu.required=true and gpu.require_cc_mode=true (e.g. attestation=snp_h200)")
    if problems:
        raise ConfigError("; ".join(problems))


def _production_problems(cfg) -> list[str]:
    """What a production hardware profile demands of the other groups; a development profile, of the policy."""
    hw, att = cfg.hardware, cfg.attestation
    if att.authenticity_only:
        return [f"attestation policy '{att.name}' only appraises evidence for audits (`medtee attest verify "
                f"--policy {att.name}`) and releases no key: a run needs attestation=simulated on a development "
                f"profile, or a production policy such as attestation=snp_h200"]
    if not hw.production:
        if att.provider == "simulated" or att.allow_simulated:
            return []
        return [f"hardware profile '{hw.name}' is a development profile (no TEE: its evidence is SIMULATED), so it "
                f"pairs only with a development attestation policy such as attestation=simulated; policy "
                f"'{att.name}' accepts hardware evidence only: choose a production hardware profile for it, e.g. "
                f"hardware=h200_sev_snp"]
    problems = []
    if att.allow_simulated or att.provider == "simulated" or not att.production:
        problems.append(f"hardware profile '{hw.name}' is a production profile but attestation policy "
                        f"'{att.name}' is not (it allows simulated evidence); choose a production policy, "
                        f"e.g. attestation=snp_h200")
    if cfg.data.source != DataSource.sealed:
        problems.append(f"production profile '{hw.name}' trains on sealed data only: set data=sealed "
                        f"data.path=DIR")
    if not BrokerConfig.is_remote(cfg.broker):
        problems.append(f"production profile '{hw.name}' needs the data owner's key broker: set "
                        f"broker.url=https://... (an embedded broker would hold the owner's key here)")
    if not cfg.model.offline:
        problems.append("production profiles allow no model-hub access: set model.offline=true")
    return problems


def _engine_problems(t, hw, q, model) -> list[str]:
    """What the trainer's strategy and the quantization need of the hardware and the model."""
    problems = []
    if t.strategy == Strategy.fsdp:
        if hw.accelerator not in FSDP_ACCELERATORS:
            problems.append(f"trainer.strategy=fsdp shards across CUDA GPUs only, but hardware profile '{hw.name}' "
                            f"runs on {hw.accelerator.value}: use trainer.strategy=ddp there, or a GPU hardware profile")
        param_dtype = "float32" if t.precision == Precision.fp32 else "bfloat16"
        if q.quantization != Quantization.none and model.dtype != param_dtype:
            # FSDP casts each flat parameter to the precision's dtype: packed 4-bit bytes cast as numbers are garbage
            problems.append(f"trainer.strategy=fsdp stores the 4-bit weights as model.dtype elements, which FSDP casts "
                            f"to trainer.precision={t.precision.name}'s {param_dtype}: set "
                            f"model.dtype={param_dtype}")
    if q.quantization != Quantization.none and not hw.supports_4bit:
        problems.append(f"qlora.quantization={q.quantization.name} needs bitsandbytes 4-bit kernels, which hardware "
                        f"profile '{hw.name}' cannot run; use qlora=unquantized or another hardware profile")
    return problems


def check_runnable(cfg, *, mode: str = "train", digest: bool = False) -> None:
    """Values a recipe may leave for the command line but a run (`mode` train or eval) needs; with `digest`, only
    those its recipe digest covers (`data.path` is not among them). Raises ConfigError."""
    problems = []
    if mode == "sweep" and cfg.sweep is None:
        problems.append("medtee sweep runs the recipe's sweep: choose one, e.g. sweep=demo_lr_rank "
                        "(conf/sweep/*.yaml)")
    e = cfg.evaluation
    if mode == "eval" and e.generate and e.max_items < cfg.tracking.min_aggregate:
        problems.append(f"evaluation.max_items={e.max_items} is below tracking.min_aggregate="
                        f"{cfg.tracking.min_aggregate}: the generated replies' scores would be aggregates of too few "
                        f"dialogues; raise it, or set evaluation.generate=false")
    if mode == "generate" and not cfg.evaluation.study_recipient:
        problems.append("medtee generate encrypts the rating packet to the study owner: pass "
                        "evaluation.study_recipient=PATH/NAME.pub (`medtee keys new`)")
    if mode in ("eval", "generate"):
        adapter = cfg.evaluation.adapter
        if not adapter:
            problems.append("medtee eval run compares the base model with an adapter: pass "
                            "evaluation.adapter=outputs/<run>/adapter.sealed (from a training run on this dataset)")
        elif not Path(adapter).is_file():
            problems.append(f"evaluation.adapter={adapter} {not_a_file(adapter)}: name the adapter.sealed a "
                            f"training run on this dataset wrote")
    if cfg.data.source == DataSource.sealed and not cfg.data.path and not digest:
        problems.append("data=sealed needs the sealed dataset: pass data.path=DIR (a directory made by `medtee seal`)")
    if cfg.hardware.production and cfg.model.source == ModelSource.pretrained and not cfg.model.revision:
        problems.append("production profiles load pinned weights: pass model.revision=COMMIT")
    ca = cfg.broker.ca
    if ca and not Path(ca).is_file():  # is_file: a regular file (a FIFO would hang the TLS setup)
        problems.append(f"broker.ca={ca} {not_a_file(ca)}: name the PEM bundle that signed the "
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
    naming another server while they are set is refused (it would receive them). That covers every setting MLflow
    uses for a server's requests (`medtee.tracking.config.credential_sources`: the environment, ~/.mlflow/credentials,
    ~/.netrc). Likewise the operator's PostgreSQL credentials (PGPASSWORD, ~/.pgpass, ...) go only to the study
    storage the operator named in MEDTEE_SWEEP_STORAGE (`medtee.sweep.config.storage_credentials_problem`)."""
    from medtee.sweep.config import storage_credentials_problem
    from medtee.tracking.config import credential_sources

    env_uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if cfg.tracking.tracking_uri is None:
        if not env_uri:
            raise ConfigError("tracking=mlflow_server reads the tracking server's URL from MLFLOW_TRACKING_URI, "
                              "which is empty; set it, e.g. MLFLOW_TRACKING_URI=https://mlflow.example.org")
        cfg.tracking.tracking_uri = env_uri
        check(cfg)
    uri = cfg.tracking.tracking_uri
    if uri.startswith(("http://", "https://")) and uri.rstrip("/") != env_uri.rstrip("/"):
        credentials = [name for name in MLFLOW_CREDENTIALS if os.environ.get(name)] or credential_sources(uri)
        if credentials:
            raise ConfigError(f"tracking.tracking_uri names a server other than MLFLOW_TRACKING_URI while "
                              f"{', '.join(credentials)} is set: MLflow would send those credentials to it (or use "
                              f"those settings with it). Use tracking=mlflow_server (the server in "
                              f"MLFLOW_TRACKING_URI), or unset the credentials")
    problem = storage_credentials_problem(cfg.sweep.storage if cfg.sweep is not None else None)
    if problem:
        raise ConfigError(problem)


# ------------------------------------------------------------------------------------------------------ the digest


def resolved(cfg) -> dict:
    """The recipe as plain data, interpolations resolved."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def unhashable_files(cfg) -> list[tuple[str, str]]:
    """(`section.key`, value) of the FILES_IN_DIGEST settings that name no regular file: the digest covers a file's
    content, so each needs one (or no value)."""
    return [(f"{section}.{key}", cfg[section][key]) for section, key in FILES_IN_DIGEST
            if cfg[section][key] and not (section == "output" and cfg[section][key] == "dev")
            and not Path(cfg[section][key]).is_file()]


def digest_input(resolved_recipe: dict, *, weights: dict | None = None, mode: str | None = None,
                 files: dict[str, bytes] | None = None) -> dict:
    """The resolved recipe as the digest covers it: without the fields in NOT_IN_DIGEST, the files in
    FILES_IN_DIGEST named by their sha256 rather than their path (`files`: "section.key" -> the bytes the run read
    from that file, hashed instead of reading it again), (`weights`: file -> sha256) the pretrained weights the run
    loads and (`mode`: train, eval, sweep, generate) what the run does with the released key."""
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
        if files and f"{section}.{key}" in files:
            data[section][key] = "sha256:" + hashlib.sha256(files[f"{section}.{key}"]).hexdigest()
        elif (section, key) == ("output", "recipient") and value == "dev":
            continue  # the development key, recorded as such
        elif value and Path(value).is_file():
            data[section][key] = "sha256:" + sha256_file(value)
    if weights is not None:
        data["model"]["weights_sha256"] = dict(sorted(weights.items()))
    if mode is not None:
        data["mode"] = mode
    return data


def recipe_digest(cfg, *, weights: dict | None = None, mode: str | None = None,
                  files: dict[str, bytes] | None = None) -> str:
    """sha256 of the canonical JSON of `digest_input(resolved(cfg), weights=weights, mode=mode, files=files)`."""
    canonical = json.dumps(digest_input(resolved(cfg), weights=weights, mode=mode, files=files), sort_keys=True,
                           separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def recipe_file(name: str) -> Path:
    """The file of the shipped recipe `name` (only a name `recipe_names()` lists: no path is joined in)."""
    path = recipes_dir() / f"{name}.yaml"
    if name not in recipe_names() or not path.is_file():
        raise ConfigError(f"no recipe named '{name}'. Valid recipes: {', '.join(recipe_names())}")
    return path
