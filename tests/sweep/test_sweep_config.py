"""The `sweep` group's schema: the shipped options, the search space's rules, storage URLs, recipe fields and the
overrides a trial becomes."""

from __future__ import annotations

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from medtee.config import compose
from medtee.paths import conf_dir
from medtee.schema import ConfigError
from medtee.sweep.config import SweepConfig, check_parameters, default_storage, from_section, grid_values
from medtee.sweep.config import storage_problems, to_overrides
from medtee.sweep.guard import STUDY_ATTRS, StudyGuardError, checked, plain


def _space(**changes) -> SweepConfig:
    base = {"name": "s", "parameters": {"trainer.lr": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True}}}
    return from_section({**base, **changes})


@pytest.mark.parametrize("option", sorted(p.stem for p in (conf_dir() / "sweep").glob("*.yaml")))
def test_the_shipped_sweeps_are_valid_against_the_schema_and_the_default_recipe(option):
    space = from_section(OmegaConf.load(conf_dir() / "sweep" / f"{option}.yaml"))
    assert SweepConfig.problems(space) == []
    assert check_parameters(space, compose([])) == []


def test_the_grid_option_visits_every_point_once():
    space = from_section(OmegaConf.load(conf_dir() / "sweep" / "grid_rank.yaml"))
    assert {k: grid_values(d) for k, d in space.parameters.items()} == {
        "qlora.rank": [8, 16, 24, 32], "qlora.dropout": [0.0, 0.1]}
    assert space.n_trials == 8


@pytest.mark.parametrize("changes, problem", [
    ({"objective": "val/secret"}, "not an allow-listed metric"),
    ({"name": "two words"}, "sweep.name"),
    ({"worker": "host 1"}, "sweep.worker='host 1': name the worker"),
    ({"n_trials": 0}, "sweep.n_trials=0 must be at least 1"),
    ({"max_attempts": 1, "n_trials": 3}, "max_attempts=1 must be at least"),
    ({"grace_s": 1, "heartbeat_s": 1}, "must exceed sweep.heartbeat_s"),
    ({"parameters": {}}, "sweep.parameters is empty"),
    ({"parameters": {"attestation.name": {"type": "categorical", "choices": ["a"]}}}, "one attestation"),
    ({"parameters": {"data.path": {"type": "categorical", "choices": ["a"]}}}, "chooses what is trained"),
    ({"parameters": {"trainer.log_every_n_steps": {"type": "categorical", "choices": [20, 21]}}},
     "or what the metrics cover"),
    ({"parameters": {"data.val_fraction": {"low": 0.1, "high": 0.2}}}, "or what the metrics cover"),
    ({"parameters": {"lr": {"low": 0, "high": 1}}}, "not a dotted recipe field"),
    ({"parameters": {"trainer.lr": {"low": 1, "high": 0}}}, "low=1.0 must be below high=0.0"),
    ({"parameters": {"trainer.lr": {"low": 0, "high": 1, "log": True}}}, "log scale needs low > 0"),
    ({"parameters": {"trainer.lr": {"low": 0.1, "high": 1, "log": True, "step": 0.1}}}, "log or step"),
    ({"parameters": {"trainer.lr": {"high": 1}}}, "needs low and high"),
    ({"parameters": {"qlora.rank": {"type": "int", "low": 1, "high": 8.5}}}, "whole-number"),
    ({"parameters": {"qlora.rank": {"type": "categorical"}}}, "list its `choices`"),
    ({"parameters": {"qlora.rank": {"type": "categorical", "choices": ["a b"]}}}, "choices must be numbers"),
    ({"parameters": {"qlora.rank": {"type": "categorical", "choices": [4, 4]}}}, "repeat"),
    ({"parameters": {"qlora.rank": {"type": "categorical", "choices": [4], "low": 1}}}, "takes only `choices`"),
    ({"sampler": "grid"}, "give trainer.lr a step or choices"),
    ({"sampler": "grid", "n_trials": 5, "parameters": {"qlora.rank": {"type": "categorical", "choices": [4, 8]}}},
     "exceeds the grid's 2 points"),
    ({"storage": "mysql://db/optuna"}, "studies live in sqlite"),
])
def test_each_rule_names_its_problem(changes, problem):
    problems = SweepConfig.problems(_space(**changes))
    assert any(problem in p for p in problems), problems


def test_a_typo_in_a_field_or_an_enum_is_a_configuration_error():
    with pytest.raises(ConfigError, match="sampler"):
        _space(sampler="annealing")
    with pytest.raises(ConfigError):
        _space(n_trails=3)


@pytest.mark.parametrize("url, problem", [
    ("postgresql://u:hunter2@db/optuna", "PGPASSWORD"),
    ("postgresql+psycopg://u@db/optuna?plugin=evil", "query options plugin are not allowed"),
    ("postgresql+psycopg://u@db/optuna?options=-c%20x", "query options options are not allowed"),
    ("sqlite:///optuna.db?mode=ro", "takes no query options"),
    ("redis://db", "studies live in sqlite"),
])
def test_storage_urls_that_could_load_code_or_carry_a_password_are_refused(url, problem):
    problems = storage_problems(url)
    assert any(problem in p for p in problems), problems
    assert all("hunter2" not in p for p in problems)


def test_sqlite_and_postgres_storages_are_accepted_and_the_default_sits_beside_mlflow():
    assert storage_problems("sqlite:///optuna.db") == []
    assert storage_problems("postgresql+psycopg://medtee@/optuna?host=/run/pg&port=5432&sslmode=require") == []
    assert default_storage("sqlite:///runs/mlflow.db") == "sqlite:///runs/optuna.db"
    assert default_storage("sqlite:///mlflow.db") == "sqlite:///optuna.db"
    assert default_storage("https://mlflow.example") == "sqlite:///optuna.db"


def test_parameters_are_checked_against_the_composed_recipe():
    cfg = compose([])
    space = _space(parameters={
        "trainer.lr": {"low": 1e-5, "high": 1e-3},
        "trainer.nope": {"low": 0, "high": 1},
        "trainer.max_steps": {"low": 1, "high": 9},
        "qlora.target_modules": {"type": "categorical", "choices": ["q_proj"]},
        "trainer.optimizer": {"type": "int", "low": 0, "high": 1},
        "trainer": {"low": 0, "high": 1},
    })
    assert check_parameters(space, cfg) == [
        "sweep.parameters: trainer.nope is not a field of the recipe",
        "sweep.parameters: trainer.max_steps is an integer field; sweep it with type: int",
        "sweep.parameters: qlora.target_modules is a list; a sweep sets single values only",
        "sweep.parameters: trainer.optimizer is not numeric; sweep it with type: categorical",
        "sweep.parameters: trainer is not a field of the recipe",
    ]


def test_a_trials_values_become_overrides_the_recipe_composes():
    overrides = to_overrides({"trainer.lr": 1e-05, "qlora.rank": 8, "qlora.use_dora": True,
                              "trainer.optimizer": "adamw_8bit"})
    assert overrides == ["qlora.rank=8", "qlora.use_dora=true", "trainer.lr=1e-05", "trainer.optimizer=adamw_8bit"]
    cfg = compose(overrides)
    assert (cfg.trainer.lr, cfg.qlora.rank, cfg.qlora.use_dora) == (1e-05, 8, True)


def test_the_study_guard_keeps_only_allow_listed_numbers_and_identifiers():
    assert checked("objective", "val/loss", STUDY_ATTRS) == "val/loss"
    with pytest.raises(StudyGuardError, match="'notes' is not in the allow-list"):
        checked("notes", "x", STUDY_ATTRS)
    with pytest.raises(StudyGuardError) as err:
        checked("objective", "patient John Doe", STUDY_ATTRS)
    assert "John" not in str(err.value)
    assert plain({"a": [1, 2.5, None, True, "q_proj"]}) and not plain(float("nan")) and not plain({"a b": 1})


def test_the_schema_module_imports_nothing_heavy():
    code = ("import sys, medtee.sweep.config, medtee.sweep.guard; heavy = [m for m in ('optuna', 'mlflow', 'torch', "
            "'lightning', 'omegaconf', 'hydra') if m in sys.modules]; print(heavy); sys.exit(bool(heavy))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_a_fragment_cannot_smuggle_query_options_past_the_check():
    """urlsplit calls what follows '#' a fragment, SQLAlchemy reads query options from it."""
    assert storage_problems("postgresql+psycopg://u@h/db#?options=-csearch_path%3Devil&plugin=x") == [
        "sweep.storage may not contain '#': write the URL without a fragment"]


def test_a_dp_sweep_is_refused():
    with pytest.raises(ConfigError, match="spend the privacy budget once per trial"):
        compose(["sweep=demo_lr_rank", "privacy.dp.enabled=true", "data.packing=false"])


def test_a_setting_that_follows_a_swept_one_through_an_interpolation_is_refused():
    """The broker checks its rules on the sweep's recipe, resolved once: qlora.alpha=${qlora.rank} would read 16
    there and 32 in a trial at rank 32."""
    with pytest.raises(ConfigError, match=r"qlora.alpha: '\$\{qlora.rank\}' may follow a swept setting"):
        compose(["sweep=demo_lr_rank", "qlora.alpha=${qlora.rank}"])
    with pytest.raises(ConfigError, match=r"qlora.alpha: '\$\{.rank\}' may follow a swept setting"):
        compose(["sweep=demo_lr_rank", "qlora.alpha=${.rank}"])  # relative: refused, it cannot be told apart
    for spaced in ("${ qlora.rank }", "${ .rank}"):  # OmegaConf reads the same reference
        with pytest.raises(ConfigError, match="may follow a swept setting"):
            compose(["sweep=demo_lr_rank", f"qlora.alpha={spaced}"])
    assert compose(["sweep=demo_lr_rank", "tracking.experiment=${model.name}"]).tracking.experiment  # not swept
