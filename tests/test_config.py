"""Recipes compose against the typed schemas; typos, wrong types, unknown options and cross-group conflicts fail
at compose time, naming the key and what is valid."""

from __future__ import annotations

import dataclasses

import pytest

from medtee import config
from medtee.config import ConfigError


@pytest.mark.parametrize("name", config.recipe_names())
def test_every_shipped_recipe_composes_and_passes_the_rules(name):
    cfg = config.compose([f"recipe={name}"])
    assert len(config.recipe_digest(cfg)) == 64


def test_demo_and_production_recipes_are_shipped():
    assert {"demo", "medgemma27b_h200_sev_snp"} <= set(config.recipe_names())


def test_production_recipe_selects_the_real_target():
    cfg = config.compose(["recipe=medgemma27b_h200_sev_snp"])
    assert cfg.model.id == "google/medgemma-27b-text-it"
    assert cfg.qlora.quantization == "nf4" and cfg.qlora.double_quant
    assert cfg.hardware.name == "h200_sev_snp" and cfg.hardware.production
    assert cfg.attestation.production and not cfg.attestation.allow_simulated


def test_typo_in_key_names_the_key_and_the_valid_keys():
    with pytest.raises(ConfigError) as err:
        config.compose(["recipe=demo", "qlora.rnak=8"])
    message = str(err.value)
    assert "qlora.rnak" in message and "rank" in message and "alpha" in message
    assert "Did you mean 'qlora.rank'" in message


def test_unknown_option_lists_valid_options():
    with pytest.raises(ConfigError) as err:
        config.compose(["qlora=nf5"])
    assert "qlora=nf5" in str(err.value) and "nf4" in str(err.value) and "lora" in str(err.value)


def test_unknown_recipe_lists_recipes():
    with pytest.raises(ConfigError) as err:
        config.compose(["recipe=demoo"])
    assert "demoo" in str(err.value) and "demo" in str(err.value)


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError) as err:
        config.compose(["trainer.max_steps=many"])
    assert "trainer.max_steps" in str(err.value)


@pytest.mark.parametrize("override, key, named", [
    ("model.attn_implementation=${tracking.experiment}", "model.attn_implementation", "sdpa"),
    ("trainer.max_steps=${tracking.experiment}", "trainer.max_steps", "Integer"),
])
def test_an_interpolation_of_the_wrong_type_names_the_key_at_compose_time(override, key, named, tmp_path):
    """Used to pass composition and fail later: a traceback in `recipes digest`, a withheld error in a run."""
    with pytest.raises(ConfigError, match=f"invalid value for '{key}'.*{named}"):
        config.compose([override])
    path = tmp_path / "mine.yaml"
    section, field = key.split(".")
    path.write_text(f"# @package _global_\n{section}:\n  {field}: {override.split('=', 1)[1]}\n")
    with pytest.raises(ConfigError, match=f"invalid value for '{key}'"):
        config.compose(config.use_recipe_files([f"recipe={path}"]))
    assert config.compose(["trainer.max_steps=${trainer.warmup_steps}"]).trainer.max_steps == \
        config.compose([]).trainer.warmup_steps  # one of the right type still resolves


def test_enum_value_outside_its_choices_fails():
    with pytest.raises(ConfigError) as err:
        config.compose(["qlora.quantization=int3"])
    assert "qlora.quantization" in str(err.value) and "nf4" in str(err.value)


def test_production_hardware_with_simulated_attestation_is_refused():
    with pytest.raises(ConfigError) as err:
        config.compose(["recipe=demo", "hardware=h200_sev_snp"])
    assert "production" in str(err.value) and "simulated" in str(err.value)


def test_4bit_on_a_profile_without_4bit_kernels_is_refused_with_the_fix():
    with pytest.raises(ConfigError) as err:
        config.compose(["recipe=demo", "hardware.supports_4bit=false"])
    assert "qlora=unquantized" in str(err.value)
    config.compose(["recipe=demo", "hardware.supports_4bit=false", "qlora=unquantized"])


def test_fsdp_off_cuda_is_refused_with_the_fix():
    with pytest.raises(ConfigError) as err:
        config.compose(["recipe=demo", "trainer.strategy=fsdp"])
    assert "trainer.strategy=fsdp" in str(err.value) and "trainer.strategy=ddp" in str(err.value)
    config.compose(["recipe=medgemma27b_h200_sev_snp", "trainer.strategy=fsdp"])


def test_fsdp_with_4bit_weights_needs_the_model_dtype_fsdp_computes_in():
    with pytest.raises(ConfigError) as err:
        config.compose(["recipe=medgemma27b_h200_sev_snp", "trainer.strategy=fsdp", "model.dtype=float32"])
    assert "model.dtype=bfloat16" in str(err.value)
    config.compose(["recipe=medgemma27b_h200_sev_snp", "trainer.strategy=fsdp", "model.dtype=float32", "qlora=unquantized"])


def test_tracking_metrics_can_only_narrow_the_allow_list():
    config.compose(["tracking.metrics=[train/loss]"])
    with pytest.raises(ConfigError) as err:
        config.compose(["tracking.metrics=[train/loss,train/sample_text]"])
    assert "train/sample_text" in str(err.value)


def test_sealed_data_needs_a_path_at_run_time():
    cfg = config.compose(["data=sealed"])
    with pytest.raises(ConfigError) as err:
        config.check_runnable(cfg)
    assert "data.path" in str(err.value)


def test_a_missing_file_is_named_missing_and_a_directory_not_a_file(tmp_path):
    """A typo in a path said "is not a regular file", as of a FIFO: the message says which it is."""
    cfg = config.compose([f"broker.ca={tmp_path / 'typo.pem'}"])
    with pytest.raises(ConfigError, match=r"typo\.pem does not exist: name the PEM bundle"):
        config.check_runnable(cfg)
    cfg = config.compose([f"broker.ca={tmp_path}", "evaluation.adapter=nowhere/adapter.sealed"])
    with pytest.raises(ConfigError) as err:
        config.check_runnable(cfg, mode="eval")
    assert f"broker.ca={tmp_path} is not a regular file (a directory" in str(err.value)
    assert "evaluation.adapter=nowhere/adapter.sealed does not exist: name the adapter.sealed" in str(err.value)


def _leaves(node, prefix=""):
    from omegaconf import DictConfig

    for key in node:
        path = f"{prefix}{key}"
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            yield from _leaves(child, path + ".")
        else:
            yield path


def _another_value(cfg, path):
    """A value of `path`'s type that differs from its current one (the digest must see the difference)."""
    from enum import Enum

    from omegaconf import OmegaConf, ValidationError

    value = OmegaConf.select(cfg, path)
    if isinstance(value, Enum):
        return next(m for m in type(value) if m != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if OmegaConf.is_list(value) and len(value):
        return [*value, "x"] if isinstance(value[0], str) else [*value, value[0]]
    if OmegaConf.is_list(value):  # empty: of strings, or of rules (attestation.recipe.fields)
        from medtee.attestation.policy import FieldRule

        for candidate in (["x"], [FieldRule(key="qlora.rank", max=1)]):
            try:
                OmegaConf.update(cfg.copy(), path, candidate, merge=False)
                return candidate
            except ValidationError:
                continue
    for candidate in ("x", 1, ["x"], "nvidia"):  # None: the first value of the field's type
        try:
            OmegaConf.update(cfg.copy(), path, candidate, merge=False)
            return candidate
        except ValidationError:
            continue
    raise AssertionError(f"no other value for {path}")


def test_every_field_medtee_reads_is_in_the_digest_but_the_documented_machine_local_ones():
    """Two recipes that differ in any field (every top-level section, every leaf) never share a digest."""
    from omegaconf import OmegaConf

    base = config.compose(["recipe=demo"])
    digest = config.recipe_digest(base)
    assert digest == config.recipe_digest(config.compose(["recipe=demo"]))
    sections = {f.name for f in dataclasses.fields(config.MedteeConfig) if base[f.name] is not None}
    assert sections == {f.name for f in dataclasses.fields(config.MedteeConfig)} - {"sweep"}  # empty without one
    swept = config.compose(["recipe=demo", "sweep=demo_lr_rank"])
    assert config.recipe_digest(swept) != digest  # a sweep's space is attested with the recipe
    assert config.recipe_digest(config.compose(["recipe=demo", "sweep=demo_lr_rank", "sweep.n_trials=9"])) != \
        config.recipe_digest(swept)
    covered, same = set(), []
    for path in _leaves(base):
        changed = base.copy()
        OmegaConf.update(changed, path, _another_value(base, path), merge=False)
        if config.recipe_digest(changed) == digest:
            same.append(path)
        covered.add(path.split(".")[0])
    assert covered == sections
    assert sorted(same) == sorted(config.NOT_IN_DIGEST)


def test_a_checkpoint_to_resume_enters_the_digest_by_content(tmp_path):
    from omegaconf import OmegaConf

    ckpt = tmp_path / "step.ckpt.enc"
    cfg = config.compose(["recipe=demo"])
    OmegaConf.update(cfg, "trainer.resume_from", str(ckpt))
    ckpt.write_bytes(b"one")
    first = config.recipe_digest(cfg)
    moved = tmp_path / "elsewhere.ckpt.enc"
    moved.write_bytes(b"one")
    OmegaConf.update(cfg, "trainer.resume_from", str(moved))
    assert config.recipe_digest(cfg) == first  # the same checkpoint anywhere
    moved.write_bytes(b"two")
    assert config.recipe_digest(cfg) != first  # another checkpoint at the same path


def test_sweep_expansion_checks_every_value():
    variants = config.expand_sweeps(["qlora.rank=4,8", "trainer.lr=0.1"])
    assert ["qlora.rank=4", "trainer.lr=0.1"] in variants and ["qlora.rank=8", "trainer.lr=0.1"] in variants


def test_every_schema_field_is_documented_next_to_its_definition():
    import inspect
    import typing
    from dataclasses import fields, is_dataclass

    seen, undocumented = set(), []

    def visit(cls):
        if cls in seen:
            return
        seen.add(cls)
        source = inspect.getsource(cls)
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            lines = source.splitlines()
            at = next((i for i, ln in enumerate(lines) if ln.strip().startswith(f"{f.name}:")), None)
            documented = at is not None and ("#" in lines[at] or lines[at - 1].strip().startswith("#"))
            if not documented:
                undocumented.append(f"{cls.__name__}.{f.name}")
            if is_dataclass(hints[f.name]):
                visit(hints[f.name])

    for schema in config.GROUP_SCHEMAS.values():
        visit(schema)
    visit(config.OutputConfig)
    assert not undocumented


def test_a_recipe_file_outside_the_package_can_be_named_by_path(tmp_path):
    path = tmp_path / "my_small.yaml"
    path.write_text("# @package _global_\ndefaults:\n  - override /qlora: unquantized\nqlora:\n  rank: 4\n")
    [override] = config.use_recipe_files([f"recipe={path}"])
    cfg = config.compose([override])
    assert override == "recipe=my_small" and cfg.qlora.rank == 4 and cfg.qlora.quantization == "none"
    with pytest.raises(ConfigError, match="does not exist"):
        config.use_recipe_files([f"recipe={tmp_path / 'nope.yaml'}"])


@pytest.mark.parametrize("override, named", [
    ("trainer.lr=-1", "trainer.lr"), ("trainer.lr=0", "trainer.lr"), ("hardware.devices=0", "hardware.devices"),
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches"),
    ("trainer.val_check_interval=0", "trainer.val_check_interval"),
    ("model.tiny.num_attention_heads=3", "model.tiny.num_attention_heads"), ("model.tiny.head_dim=7", "head_dim"),
    ("data.max_length=8", "data.max_length"), ("trainer.checkpoint_keep=0", "trainer.checkpoint_keep"),
    ("broker.url=http://10.1.2.3:8765", "plain http is allowed only on loopback"),
    ("data.path=/some/dir", "add data=sealed"), ("data.n_synthetic=1", "data.n_synthetic"),
])
def test_settings_that_cannot_run_are_refused_at_compose_time(override, named):
    """Each used to pass composition and fail only after the data key was released (exit 3)."""
    with pytest.raises(ConfigError) as err:
        config.compose(["recipe=demo", override])
    assert named in str(err.value)


def test_plain_http_broker_on_loopback_is_allowed():
    for url in ("http://127.0.0.1:8765", "http://[::1]:8765", "http://localhost:8765", "https://broker.example"):
        config.compose(["recipe=demo", f"broker.url='{url}'"])


@pytest.mark.parametrize("group, option", [(g, o) for g, options in config.group_options().items() for o in options])
def test_every_option_of_every_group_composes(group, option):
    """Each shipped option composes against its schema (over the demo, or over the production recipe for options
    that need a production counterpart) and yields a digest; the audit-only policy is refused by every run."""
    if (group, option) == ("attestation", "authenticity"):
        for base in ("demo", "medgemma27b_h200_sev_snp"):
            with pytest.raises(ConfigError, match="only appraises evidence for audits .* releases no key"):
                config.compose([f"recipe={base}", "attestation=authenticity"])
        return
    for base in ("demo", "medgemma27b_h200_sev_snp"):
        try:
            cfg = config.compose([f"recipe={base}", f"{group}={option}"])
        except ConfigError as exc:
            problem = str(exc)
            continue
        assert len(config.recipe_digest(cfg)) == 64
        return
    pytest.fail(f"{group}={option} composes with neither shipped recipe: {problem}")


def test_a_profile_that_requires_gpu_cc_needs_a_policy_that_proves_it():
    """No shipped pair breaks this rule, and a production policy cannot be changed by a recipe (below): the rule
    still holds for a composed config however it came about."""
    from omegaconf import OmegaConf

    cfg = config.compose(["recipe=medgemma27b_h200_sev_snp"])
    OmegaConf.update(cfg, "attestation.gpu.required", False)
    with pytest.raises(ConfigError) as err:
        config.check(cfg)
    assert "confidential-computing mode" in str(err.value) and "gpu.required=true" in str(err.value)


@pytest.mark.parametrize("overrides, changed", [
    (["hardware=h200_sev_snp", "hardware.production=false", "hardware.accelerator=cpu",
      "hardware.require_sev_snp=false", "hardware.require_gpu_cc=false"], "hardware.accelerator, hardware.production"),
    (["recipe=medgemma27b_h200_sev_snp", "attestation.gpu.required=false"], "attestation.gpu.required"),
    (["recipe=medgemma27b_h200_sev_snp", "attestation.amd_revocation=off"], "attestation.amd_revocation"),
    (["recipe=medgemma27b_h200_sev_snp", "attestation.gpu.revocation=off", "attestation.allow_debug=true"],
     "attestation.allow_debug, attestation.gpu.revocation"),
    (["recipe=medgemma27b_h200_sev_snp", "attestation.allow_simulated=true", "attestation.provider=simulated"],
     "attestation.allow_simulated, attestation.provider"),
])
def test_a_production_option_cannot_be_weakened_under_its_name(overrides, changed):
    """A CPU run labelled h200_sev_snp, or simulated evidence passing as "snp_h200", used to compose."""
    with pytest.raises(ConfigError) as err:
        config.compose(overrides)
    assert f"{changed}" in str(err.value) and "is a production option and the run is labelled with its name" in \
        str(err.value)
    assert config.compose(["recipe=medgemma27b_h200_sev_snp", "hardware.devices=2"]).hardware.devices == 2


def test_a_production_policy_takes_this_machines_paths_and_stricter_requirements():
    """Without its OCSP cache the shipped snp_h200 rejects every GPU (revocation fail_closed): it must stay settable."""
    pin = "ab" * 48
    cfg = config.compose(["recipe=medgemma27b_h200_sev_snp", "attestation.gpu.ocsp_cache=/var/cache/ocsp",
                          "attestation.cert_cache_dir=/var/cache/kds", f"attestation.measurements=[{pin}]",
                          "attestation.vmpl=0"])  # (not the RIM store: it holds RIM matching's trust anchor)
    assert cfg.attestation.gpu.ocsp_cache == "/var/cache/ocsp" and list(cfg.attestation.measurements) == [pin]


def test_merged_weights_are_not_an_option():
    """Dangerous options are absent, not flagged: only the encrypted adapter is ever written."""
    with pytest.raises(ConfigError, match="unknown key 'output.merge_weights'"):
        config.compose(["output.merge_weights=false"])


# ------------------------------------------------------------------------------------ schemas beside their packages


@pytest.mark.parametrize("schema, section, fragment", [
    ("medtee.hardware:HardwareConfig", {"devices": 0}, "hardware.devices=0 must be at least 1"),
    ("medtee.training.config:QLoRAConfig", {"dropout": 1.0}, "qlora.dropout=1.0 must be in [0, 1)"),
    ("medtee.training.config:TrainerConfig", {"checkpoint_keep": 0}, "trainer.checkpoint_keep=0 would delete"),
    ("medtee.training.config:ModelConfig", {"checkpoint_every_n_layers": 0}, "model.checkpoint_every_n_layers=0"),
    ("medtee.training.config:TinyGemma3", {"head_dim": 3}, "must be even"),
    ("medtee.data.config:DataConfig", {"val_fraction": 1.5}, "data.val_fraction=1.5 must be in [0, 1)"),
    ("medtee.tracking.config:TrackingConfig", {"tracking_uri": "s3://b"}, "MLflow stores are named"),
    ("medtee.broker.config:BrokerConfig", {"url": "ftp://x"}, "use 'embedded' or an http(s):// URL"),
    ("medtee.broker.config:BrokerConfig", {"url": "http://10.0.0.1:8765"}, "plain http is allowed only on loopback"),
])
def test_each_schema_checks_its_own_values(schema, section, fragment):
    """Every group's rules live beside its schema and read only its own section (a dataclass or a composed group)."""
    import importlib

    module, name = schema.split(":")
    cls = getattr(importlib.import_module(module), name)
    assert cls().problems() == []
    assert any(fragment in p for p in cls(**section).problems()), cls(**section).problems()


def test_enum_fields_fail_at_compose_time_naming_the_choices():
    for override, choices in (("encryption.scheme=hpke-p256", "hpke_x25519, hpke_mlkem768_x25519"),
                              ("attestation.provider=tdx", "simulated, sev_snp, file")):
        with pytest.raises(ConfigError) as err:
            config.compose(["recipe=demo", override])
        assert choices in str(err.value), str(err.value)


def test_policy_files_with_the_old_provider_spelling_still_load():
    from medtee.attestation.policy import Provider, policy_from_mapping

    policy = policy_from_mapping({"name": "mine", "provider": "sev-snp", "production": True}, "mine.yaml")
    assert policy.provider is Provider.sev_snp and policy.provider.value == "sev-snp"


def test_old_spellings_on_the_command_line_work_with_a_deprecation_message(capsys):
    flags, overrides = config.split_argv(["encryption.broker_dir=/tmp/b", "qlora=lora", "trainer.max_steps=2"])
    assert overrides == ["broker.dir=/tmp/b", "qlora=unquantized", "trainer.max_steps=2"] and flags == []
    err = capsys.readouterr().err
    assert "'encryption.broker_dir=/tmp/b' is deprecated; it now reads 'broker.dir=/tmp/b'" in err
    assert "'qlora=lora' is deprecated; it now reads 'qlora=unquantized'" in err
    assert config.compose(overrides).broker.dir == "/tmp/b"


def test_a_recipe_file_with_a_moved_key_names_the_new_one(tmp_path):
    path = tmp_path / "old_style.yaml"
    path.write_text("# @package _global_\nencryption:\n  broker: https://broker.example\n")
    with pytest.raises(ConfigError, match=r"key 'encryption.broker' has moved: write 'broker.url'"):
        config.compose(config.use_recipe_files([f"recipe={path}"]))


@pytest.mark.parametrize("hardware", ["cpu_dev", "gpu_dev"])
@pytest.mark.parametrize("policy", ["snp_h100", "snp_h200"])
def test_development_hardware_pairs_only_with_development_policies(hardware, policy):
    with pytest.raises(ConfigError) as err:
        config.compose(["recipe=demo", f"hardware={hardware}", f"attestation={policy}"])
    assert f"hardware profile '{hardware}' is a development profile" in str(err.value)
    assert "attestation=simulated" in str(err.value)


def test_gpu_dev_is_cpu_dev_on_cuda():
    cpu, gpu = (config.compose(["recipe=demo", f"hardware={h}"]).hardware for h in ("cpu_dev", "gpu_dev"))
    assert gpu.accelerator == "cuda" and cpu.accelerator == "cpu"
    assert not gpu.production and not gpu.require_sev_snp and not gpu.require_gpu_cc
    assert {k: v for k, v in gpu.items() if k not in ("name", "accelerator")} == \
        {k: v for k, v in cpu.items() if k not in ("name", "accelerator")}


def test_num_layers_cuts_random_models_only():
    with pytest.raises(ConfigError, match=r"model.num_layers=2 cuts the depth of a random-weight model only: add "
                                          r"model.source=random"):
        config.compose(["recipe=demo", "model.num_layers=2"])
    with pytest.raises(ConfigError, match="model.num_layers=63 exceeds the 62 decoder layers"):
        config.compose(["recipe=medgemma27b_random_gpu_dev", "model.num_layers=63"])
    with pytest.raises(ConfigError, match="model.architecture.*gemma3_27b"):
        config.compose(["recipe=medgemma27b_random_gpu_dev", "model.architecture=gemma3_1b"])
    with pytest.raises(ConfigError, match="model.num_layers=35 exceeds the 34 decoder layers of "
                                          "model.architecture=gemma3_4b"):
        config.compose(["recipe=medgemma27b_random_gpu_dev", "model.architecture=gemma3_4b", "model.num_layers=35"])


@pytest.mark.parametrize("override, key", [("model.init_seed=18446744073709551616", "model.init_seed"),
                                           ("model.init_seed=-1", "model.init_seed"),
                                           ("model.tiny.seed=18446744073709551616", "model.tiny.seed")])
def test_a_seed_torch_cannot_take_is_refused_at_compose_time(override, key):
    """It used to fail in torch.manual_seed, after the data key was released."""
    with pytest.raises(ConfigError, match=rf"{key}=.* must be in 0 \.\.\. 2\^64 - 1"):
        config.compose(["recipe=demo", "model.source=random", override])


def test_random_weights_take_no_revision_and_are_labelled_as_random():
    from medtee.training.config import weights_label

    with pytest.raises(ConfigError, match="model.revision=abc pins pretrained weights, but model.source=random"):
        config.compose(["recipe=medgemma27b_random_gpu_dev", "model.revision=abc"])
    cfg = config.compose(["recipe=medgemma27b_random_gpu_dev"])
    assert cfg.model.id is None
    assert weights_label(cfg.model) == "random gemma3_27b weights, 4 layers (model.init_seed=0)"
    assert weights_label(config.compose(["recipe=medgemma27b_h200_sev_snp"]).model) == "google/medgemma-27b-text-it"
