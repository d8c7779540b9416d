"""What every finished sweep must look like, in its Optuna storage and in MLflow."""

from __future__ import annotations

import optuna
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from medtee.sweep.guard import plain
from medtee.tracking.guard import PARAM_ALLOW_LIST

EXPERIMENT = "sweeps"


def init_stores(storage: str, uri: str) -> None:
    """Create both databases' tables once: workers started together would race to migrate a new database."""
    optuna.storages.RDBStorage(storage)
    MlflowClient(uri).search_experiments()


def load(storage_url: str, name: str = "test_study") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage_url)


def check_study(study: optuna.Study, n_trials: int) -> list:
    """Exactly n COMPLETE trials, none RUNNING, retries with their original's parameters and never counted twice,
    and nothing stored but numbers and identifiers. Returns the trials."""
    trials = study.get_trials()
    states = [t.state for t in trials]
    assert states.count(TrialState.COMPLETE) == n_trials, states
    assert TrialState.RUNNING not in states, states
    by_number = {t.number: t for t in trials}
    roots = [t.system_attrs["retry_history"][0] for t in trials
             if t.state == TrialState.COMPLETE and "retry_history" in t.system_attrs]
    assert len(roots) == len(set(roots)), "a retried trial completed twice"
    for t in trials:
        if "failed_trial" in t.system_attrs:
            original = by_number[t.system_attrs["failed_trial"]]
            assert original.state == TrialState.FAIL
            assert t.params == original.params or not original.params  # died before sampling: sampled anew
    check_storage_is_plain(study)
    return trials


def check_storage_is_plain(study: optuna.Study) -> None:
    """Every attribute, parameter name and value the study holds is a number or a short identifier."""
    system = study._storage.get_study_system_attrs(study._study_id)  # Optuna 5 keeps no public accessor
    assert plain(study.user_attrs) and plain(system), (study.user_attrs, system)
    assert set(study.user_attrs) <= {"objective", "direction", "n_trials"}, study.user_attrs
    for t in study.get_trials():
        assert plain(t.user_attrs), (t.number, t.user_attrs)
        assert plain(t.system_attrs), (t.number, t.system_attrs)
        assert plain(t.params), (t.number, t.params)
        assert set(t.user_attrs) <= {"worker", "error"}, t.user_attrs


def check_mlflow(uri: str, study: optuna.Study) -> dict[int, object]:
    """One parent run for the study, FINISHED and tagged with the best trial; one closed child per finished trial,
    no other, its status, objective and allow-listed params matching the trial. Returns number -> child run."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    parents = client.search_runs([exp.experiment_id], f"tags.`medtee.sweep.study` = '{study.study_name}' and "
                                                      "tags.`medtee.sweep.role` = 'parent'")
    assert len(parents) == 1, [p.info.run_id for p in parents]
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["medtee.sweep.best_trial"] == str(study.best_trial.number)
    assert float(parent.data.tags["medtee.sweep.best_value"]) == study.best_value
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    numbers = [int(c.data.tags["medtee.sweep.trial"]) for c in children]
    assert len(numbers) == len(set(numbers)), f"duplicate children: {sorted(numbers)}"
    finished = {t.number: t for t in study.get_trials(states=(TrialState.COMPLETE, TrialState.FAIL))}
    assert set(numbers) == set(finished), (sorted(numbers), sorted(finished))
    all_runs = client.search_runs([exp.experiment_id], "")
    assert {r.info.run_id for r in all_runs} == {parent.info.run_id} | {c.info.run_id for c in children}, "orphans"
    out = {}
    for child in children:
        trial = finished[int(child.data.tags["medtee.sweep.trial"])]
        assert child.data.tags["medtee.sweep.state"] == trial.state.name
        if trial.state == TrialState.COMPLETE:
            assert child.info.status == "FINISHED"
            assert child.data.metrics == {"val/loss": trial.value}
        else:
            assert child.info.status == "FAILED"
            assert child.data.tags["medtee.sweep.error"] in ("RuntimeError", "WorkerLost")
        assert set(child.data.params) <= set(PARAM_ALLOW_LIST)
        assert child.data.params == {k: str(v) for k, v in trial.params.items() if k in PARAM_ALLOW_LIST}
        out[trial.number] = child
    return out
