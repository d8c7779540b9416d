"""The sweep engine on sqlite storage and a real MLflow sqlite store, with a fake runner: failures recorded by type
only, SIGKILLed workers resumed to exactly n_trials COMPLETE trials with one MLflow child each."""

from __future__ import annotations

import random
import signal
from pathlib import Path

import pytest
from conftest import run_python
from sweep import sweep_checks
from sweep import sweep_worker
from optuna.trial import TrialState

from medtee.schema import ConfigError
from medtee.sweep.engine import run_sweep
from medtee.sweep.tracking import SweepTracker

WORKER = Path(sweep_worker.__file__)


def _sweep(tmp_path, runner, worker="w0", **changes):
    storage, uri = f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    guard = sweep_worker.guard()
    tracker = SweepTracker(tracking_uri=uri, experiment=sweep_checks.EXPERIMENT, guard=guard)
    result = run_sweep(sweep_worker.space(**changes), runner, storage_url=storage, worker_id=worker, guard=guard,
                       tracker=tracker)
    return result, sweep_checks.load(storage), uri


def test_a_named_worker_samples_the_same_points_on_a_new_study_and_another_name_others(tmp_path):
    def points(name, worker):
        (tmp_path / name).mkdir()
        _, study, _ = _sweep(tmp_path / name, sweep_worker.FakeRunner(), worker=worker, n_trials=2)
        return [t.params for t in study.trials]

    first = points("a", "w0")
    assert points("b", "w0") == first and points("c", "w1") != first


def test_a_failing_trial_is_recorded_by_type_only_and_the_sweep_still_completes(tmp_path):
    runner = sweep_worker.FakeRunner(fail_on={1})
    result, study, uri = _sweep(tmp_path, runner)

    assert (result.complete, result.failed, result.stopped) == (5, 1, "done")
    trials = sweep_checks.check_study(study, 5)
    (failed,) = [t for t in trials if t.state == TrialState.FAIL]
    assert failed.number == 1 and failed.user_attrs == {"worker": "w0", "error": "RuntimeError"}
    assert study.user_attrs == {"objective": "val/loss", "direction": "minimize", "n_trials": 5}
    assert result.best_trial == study.best_trial.number
    assert result.best_overrides == [f"qlora.rank={study.best_params['qlora.rank']}",
                                     f"trainer.lr={study.best_params['trainer.lr']!r}"]
    children = sweep_checks.check_mlflow(uri, study)
    assert children[1].data.tags["medtee.sweep.error"] == "RuntimeError"
    for db in ("optuna.db", "mlflow.db"):
        assert b"PATIENT-CANARY" not in (tmp_path / db).read_bytes(), f"the exception message reached {db}"


def test_a_finished_sweep_resumed_runs_nothing_and_a_larger_one_only_the_missing_trials(tmp_path):
    _sweep(tmp_path, sweep_worker.FakeRunner(), n_trials=2)
    again = sweep_worker.FakeRunner()
    result, study, uri = _sweep(tmp_path, again, n_trials=2)
    assert again.calls == 0 and result.complete == 2

    more = sweep_worker.FakeRunner()
    result, study, uri = _sweep(tmp_path, more, n_trials=3)
    assert more.calls == 1 and result.complete == 3
    sweep_checks.check_study(study, 3)
    sweep_checks.check_mlflow(uri, study)


def test_the_attempt_cap_stops_a_sweep_whose_trials_all_fail(tmp_path):
    runner = sweep_worker.FakeRunner(fail_on=set(range(100)))
    result, study, _ = _sweep(tmp_path, runner, n_trials=2, max_attempts=3)
    assert (result.stopped, result.complete, result.failed, runner.calls) == ("max_attempts", 0, 3, 3)
    assert not result.done and result.best_trial is None


def test_an_objective_the_guard_drops_fails_the_trial(tmp_path):
    result, study, _ = _sweep(tmp_path, sweep_worker.FakeRunner(), n_trials=1, max_attempts=1,
                              objective="val/perplexity")
    assert result.stopped == "max_attempts"
    assert study.trials[0].user_attrs["error"] == "ObjectiveMissing"


def test_a_study_is_not_resumed_for_another_direction(tmp_path):
    _sweep(tmp_path, sweep_worker.FakeRunner(), n_trials=1)
    with pytest.raises(ConfigError, match="name a new study"):
        _sweep(tmp_path, sweep_worker.FakeRunner(), n_trials=1, direction="maximize")


def test_a_queued_trial_with_values_outside_the_space_fails_before_it_runs(tmp_path):
    """Whoever can write the study's storage can queue a trial (a retry's parameters are read from it); Optuna uses
    its values even out of range, so it would train with a setting the release's rules were never checked on."""
    from medtee.sweep.config import in_space
    from medtee.sweep.engine import open_storage, open_study

    space = sweep_worker.space(n_trials=1, max_attempts=2)
    planted = open_study(space, open_storage(space, f"sqlite:///{tmp_path / 'optuna.db'}"), "host")
    planted.enqueue_trial({"trainer.lr": 5.0, "qlora.rank": 16})
    planted.enqueue_trial({"trainer.lr": 1e-4, "qlora.rank": 16})
    runner = sweep_worker.FakeRunner(log=tmp_path / "calls.log")
    with pytest.warns(UserWarning, match="out of range"):
        result, study, _ = _sweep(tmp_path, runner, n_trials=1, max_attempts=2)
    assert result.complete == 1 and (tmp_path / "calls.log").read_text() == "1 qlora.rank=16 trainer.lr=0.0001\n"
    assert study.trials[0].user_attrs["error"] == "OutsideSpace"
    ints = sweep_worker.space(parameters={"qlora.rank": {"type": "int", "low": 4, "high": 16, "step": 4}})
    rank = ints.parameters["qlora.rank"]
    assert [in_space(rank, v) for v in (4, 16, 8.0, 6, 20, True, "8")] == [True, True, True, False, False, False, False]
    assert not in_space(space.parameters["qlora.rank"], 16.0) and in_space(space.parameters["trainer.lr"], 1e-3)


def _worker(tmp_path, *args: str) -> tuple[int, str]:
    """sweep_worker.py ARGS run to its end: (exit status, its stdout and stderr)."""
    res = run_python(WORKER, "--storage", f"sqlite:///{tmp_path / 'optuna.db'}", "--mlflow",
                     f"sqlite:///{tmp_path / 'mlflow.db'}", "--n-trials", "4", *args, cwd=tmp_path, timeout=120)
    return res.returncode, res.stdout + res.stderr


def test_a_trial_no_worker_claimed_is_failed_after_the_grace_and_retried(tmp_path):
    """A worker killed between Optuna's ask and its first heartbeat: the trial never heartbeats, so Optuna's own
    stale check cannot see it; it used to keep the other workers waiting until their timeout."""
    import time

    from medtee.sweep.engine import open_storage, open_study

    space = sweep_worker.space(n_trials=2, timeout_s=30)
    orphan = open_study(space, open_storage(space, f"sqlite:///{tmp_path / 'optuna.db'}"), "dead").ask()
    time.sleep(space.grace() + 1)
    result, study, _ = _sweep(tmp_path, sweep_worker.FakeRunner(), n_trials=2, timeout_s=30)
    assert result.stopped == "done" and result.complete == 2
    trials = {t.number: t for t in study.get_trials()}
    assert trials[orphan.number].state == TrialState.FAIL
    [retry] = [t for t in trials.values() if t.system_attrs.get("failed_trial") == orphan.number]
    assert retry.state == TrialState.COMPLETE and trials[orphan.number].params == {}  # killed before sampling


@pytest.mark.slow
def test_workers_killed_mid_trial_before_the_child_and_after_tell_resume_to_exactly_n_trials(tmp_path):
    rng = random.Random(1234)
    sweep_checks.init_stores(f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}")
    # workers die inside the runner, after ask but before the MLflow child, and after tell; one after the other, so
    # each surely reaches its kill point (racing workers could finish the study before one got there)
    for worker, phase in (("w1", "mid"), ("w2", "asked"), ("w3", "told")):
        code, out = _worker(tmp_path, "--worker", worker, "--kill", phase, "--at", str(rng.randint(1, 2)))
        assert code == -signal.SIGKILL, out

    code, out = _worker(tmp_path, "--worker", "w4")
    assert code == 0 and "stopped=done complete=4" in out, out

    study = sweep_checks.load(f"sqlite:///{tmp_path / 'optuna.db'}")
    trials = sweep_checks.check_study(study, 4)
    lost = [t for t in trials if t.state == TrialState.FAIL]
    assert len(lost) == 2 and all("error" not in t.user_attrs for t in lost)  # the mid and asked kills
    retries = [t for t in trials if "failed_trial" in t.system_attrs]
    retried = {n for t in retries for n in t.system_attrs.get("retry_history", [t.system_attrs["failed_trial"]])}
    assert retried == {t.number for t in lost}  # every lost trial re-run (a retry that died is retried again)
    children = sweep_checks.check_mlflow(f"sqlite:///{tmp_path / 'mlflow.db'}", study)
    assert {children[t.number].data.tags["medtee.sweep.error"] for t in lost} == {"WorkerLost"}
    for t in retries:
        if t.state == TrialState.COMPLETE:  # a retry that was itself lost before its child existed has no tag
            assert children[t.number].data.tags["medtee.sweep.retry_of"] == str(t.system_attrs["failed_trial"])


def test_a_trial_stopped_by_its_worker_stopping_is_queued_again_with_its_parameters(tmp_path):
    """SIGTERM (or Ctrl-C) reaches the runner as a BaseException: the worker stops, and the trial is retried with the
    same parameters by the next worker, as a trial whose worker was killed is."""
    class Stopping(sweep_worker.FakeRunner):
        def run(self, overrides, trial_number):
            raise SystemExit(143)

    with pytest.raises(SystemExit):
        _sweep(tmp_path, Stopping(), n_trials=2)
    result, study, _ = _sweep(tmp_path, sweep_worker.FakeRunner(), n_trials=2)
    assert result.stopped == "done" and result.complete == 2
    trials = {t.number: t for t in study.get_trials()}
    stopped = trials[0]
    assert stopped.state == TrialState.FAIL and stopped.user_attrs["error"] == "SystemExit"
    [retry] = [t for t in trials.values() if t.system_attrs.get("failed_trial") == 0]
    assert retry.state == TrialState.COMPLETE and retry.params == stopped.params


def test_a_stopping_worker_does_not_queue_again_a_trial_already_failed_and_queued_as_stale(tmp_path):
    """Taken for stale (and queued) by another worker while this one stops: one retry, never two."""
    import copy

    from medtee.sweep.engine import open_storage

    space = sweep_worker.space(n_trials=2)

    class StaleThenStopping(sweep_worker.FakeRunner):
        def run(self, overrides, trial_number):
            storage = open_storage(space, f"sqlite:///{tmp_path / 'optuna.db'}")
            study = sweep_checks.load(f"sqlite:///{tmp_path / 'optuna.db'}")
            trial = study.trials[trial_number]
            storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)  # what another worker's check does
            storage.get_heartbeat_stale_trial_callback()(study, copy.deepcopy(storage.get_trial(trial._trial_id)))
            raise SystemExit(143)

    with pytest.raises(SystemExit):
        _sweep(tmp_path, StaleThenStopping(), n_trials=2)
    study = sweep_checks.load(f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.WAITING]
