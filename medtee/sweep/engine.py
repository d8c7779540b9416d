"""The sweep engine: an Optuna study driven with ask and tell, one trial at a time per worker process.

`run_sweep` asks Optuna for a trial, turns its values into recipe overrides, hands them to a `TrialRunner` (the
training run, composed and guarded by the caller), and tells Optuna the objective. The study ends with exactly
`sweep.n_trials` COMPLETE trials however many workers share it and however often they die:

- a failed trial is told FAIL with the exception's type name only (user attr `error`) and the sweep goes on;
  failures do not count toward `n_trials`, and at most `sweep.attempt_cap()` trials finish in all;
- every running trial records a heartbeat; one silent for `sweep.grace()` seconds (its worker was killed) is failed
  by the next worker that looks, and Optuna's retry callback queues a WAITING copy with the same parameters
  (system attrs `failed_trial`, `retry_history`), which the next `ask` runs: a retry, never a second count;
- a worker starts a trial only while the COMPLETE trials and those running elsewhere fall short of `n_trials`, and
  gives back (to WAITING, unsampled) a trial that a concurrent worker made surplus; Optuna hands each trial to one
  worker only, so no trial runs twice.

- a worker killed between Optuna creating a trial and its first heartbeat leaves a RUNNING trial that Optuna's
  heartbeat cannot see and that no worker claimed (no `worker` user attr, set right after the first heartbeat):
  once it started `sweep.grace()` seconds ago it is failed and retried the same way.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
import warnings
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

import optuna
from optuna.trial import TrialState

from medtee.schema import ConfigError
from medtee.sweep.config import IDENTIFIER, ParamType, Sampler, SweepConfig, grid_values, in_space, to_overrides
from medtee.sweep.guard import STUDY_ATTRS, TRIAL_ATTRS, checked
from medtee.tracking.guard import Guard

log = logging.getLogger("medtee.sweep")

#: What a worker that loses its trial to the stale check (or dies) leaves as the trial's error.
WORKER_LOST = "WorkerLost"


class TrialRunner(Protocol):
    """Runs one trial: composes the recipe with `overrides`, trains, and returns allow-listed metrics (the
    objective among them). Raises on failure; the engine keeps only the exception's type name."""

    def run(self, overrides: list[str], trial_number: int) -> dict[str, float]: ...


class ObjectiveMissing(Exception):
    """The runner's metrics lack the objective, or the privacy guard dropped it (too few evaluation examples)."""


class OutsideSpace(Exception):
    """A trial's values lie outside `sweep.parameters`: a queued trial's come from the study's storage, not from the
    space the release was checked on."""


@dataclass(frozen=True)
class SweepResult:
    study: str
    complete: int  # COMPLETE trials in the study
    failed: int  # FAIL trials in the study (runner failures and lost workers)
    best_trial: int | None  # number of the best COMPLETE trial
    best_value: float | None
    best_overrides: list[str] = field(default_factory=list)
    stopped: str = "done"  # done | timeout | max_attempts

    @property
    def done(self) -> bool:
        return self.stopped == "done"


# ---------------------------------------------------------------------------------------------------------- storage


def storage_url(url: str) -> str:
    """The SQLAlchemy URL of a study storage: `postgresql://` means psycopg 3, the driver medtee ships."""
    return "postgresql+psycopg://" + url[len("postgresql://"):] if url.startswith("postgresql://") else url


def open_storage(space: SweepConfig, url: str) -> optuna.storages.RDBStorage:
    """The study's database with heartbeats on, and a stale trial re-queued with its parameters."""
    return optuna.storages.RDBStorage(
        storage_url(url), heartbeat_interval=space.heartbeat_s, grace_period=space.grace(),
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback())


def make_sampler(space: SweepConfig, worker_id: str) -> optuna.samplers.BaseSampler:
    """The configured sampler, seeded from `sweep.seed` and the worker's name (workers explore different points)."""
    seed = zlib.crc32(f"{space.seed}/{worker_id}".encode())
    if space.sampler == Sampler.grid:
        return optuna.samplers.GridSampler({k: grid_values(d) for k, d in space.parameters.items()}, seed=seed)
    if space.sampler == Sampler.gp:
        return optuna.samplers.GPSampler(seed=seed)
    if space.sampler == Sampler.random:
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def open_study(space: SweepConfig, storage, worker_id: str) -> optuna.Study:
    """The study named `sweep.name` (created on first use); refuses one made for another objective or direction."""
    study = optuna.create_study(study_name=space.name, storage=storage, direction=space.direction.value,
                                sampler=make_sampler(space, worker_id), load_if_exists=True)
    stored = {"objective": study.user_attrs.get("objective", space.objective), "direction": study.direction.name}
    wanted = {"objective": space.objective, "direction": space.direction.name.upper()}
    if stored != wanted:
        raise ConfigError(f"sweep.name={space.name}: that study optimises {stored['objective']} "
                          f"({stored['direction'].lower()}), not {space.objective} ({space.direction.value}); "
                          f"name a new study")
    for key, value in {"objective": space.objective, "direction": space.direction.value,
                       "n_trials": space.n_trials}.items():
        study.set_user_attr(key, checked(key, value, STUDY_ATTRS))
    return study


# -------------------------------------------------------------------------------------------------------- the loop


def run_sweep(space: SweepConfig, runner: TrialRunner, *, storage_url: str, worker_id: str, guard: Guard,
              tracker=None) -> SweepResult:
    """Run trials of `space` until its study holds `n_trials` COMPLETE ones (or the timeout or the attempt cap).

    `guard` filters the runner's metrics before anything is stored (build it as `medtee.tracking.open_run` does, with
    `eval_examples`); `tracker` (a `medtee.sweep.tracking.SweepTracker`) mirrors the study into MLflow.
    """
    if not IDENTIFIER.fullmatch(worker_id):
        raise ConfigError(f"worker id {worker_id!r}: use letters, digits, '_', '.', '/' or '-'")
    if space.objective not in guard.allowed:
        raise ConfigError(f"sweep.objective={space.objective} is not among this recipe's metrics (tracking.metrics)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used with Study.optimize")
        storage = open_storage(space, storage_url)
        study = open_study(space, storage, worker_id)
        if tracker:
            tracker.begin(study)
        stopped = _loop(space, study, storage, runner, guard, tracker, worker_id)
        if tracker:
            tracker.end(study)
    return _result(space, study, stopped)


def _loop(space, study, storage, runner, guard, tracker, worker_id) -> str:
    deadline = time.monotonic() + space.timeout_s if space.timeout_s else None
    while True:
        if _fail_stale(study, space.grace()) and tracker:
            tracker.reconcile(study)
        trials = study.get_trials(deepcopy=False)
        complete = _count(trials, TrialState.COMPLETE)
        if complete >= space.n_trials:
            return "done"
        if complete + _count(trials, TrialState.FAIL) >= space.attempt_cap():
            return "max_attempts"
        if deadline is not None and time.monotonic() >= deadline:
            return "timeout"
        if complete + _count(trials, TrialState.RUNNING) >= space.n_trials or not _claim_and_run(
                space, study, storage, runner, guard, tracker, worker_id):
            time.sleep(space.heartbeat_s)  # the missing trials run elsewhere: wait for them to finish or go stale


def _claim_and_run(space, study, storage, runner, guard, tracker, worker_id) -> bool:
    """Ask for a trial and run it; False (the trial back in the queue) when a concurrent worker made it surplus."""
    trial = study.ask()
    with _Heartbeat(storage, trial._trial_id, space.heartbeat_s):
        if _surplus(study, trial.number, space.n_trials):
            storage.set_trial_state_values(trial._trial_id, TrialState.WAITING)
            return False
        retry_of = storage.get_trial_system_attrs(trial._trial_id).get("failed_trial")
        _run_trial(space, study, trial, runner, guard, tracker, worker_id, retry_of)
    return True


def _surplus(study, number: int, n_trials: int) -> bool:
    """Whether the COMPLETE trials and the ones asked before `number`, still running, already make `n_trials`."""
    trials = study.get_trials(deepcopy=False)
    ahead = sum(1 for t in trials if t.state == TrialState.RUNNING and t.number < number)
    return _count(trials, TrialState.COMPLETE) + ahead >= n_trials


def _run_trial(space, study, trial, runner, guard, tracker, worker_id, retry_of) -> None:
    trial.set_user_attr("worker", checked("worker", worker_id, TRIAL_ATTRS))  # the claim `_fail_stale` reads
    params = {key: _suggest(trial, key, d) for key, d in space.parameters.items()}
    overrides = to_overrides(params)
    if tracker:
        tracker.start_trial(trial.number, overrides, retry_of=retry_of, worker=worker_id)
    try:
        outside = sorted(key for key, value in params.items() if not in_space(space.parameters[key], value))
        if outside:
            raise OutsideSpace(", ".join(outside))
        metrics = guard.metrics(runner.run(list(overrides), trial.number))
        if space.objective not in metrics:
            raise ObjectiveMissing()
    except BaseException as exc:
        failed = _tell_failure(study, trial, type(exc).__name__, tracker)
        if not isinstance(exc, Exception):  # the worker is stopping (SIGTERM, Ctrl-C): the trial runs again elsewhere
            retry = study._storage.get_heartbeat_stale_trial_callback()
            if retry is not None and failed:  # not when a stale check failed (and queued) it already
                retry(study, copy.deepcopy(study._storage.get_trial(trial._trial_id)))
            raise
        log.warning("sweep %s: trial %d failed (%s)", space.name, trial.number, type(exc).__name__)
        return
    value = metrics[space.objective]
    try:
        study.tell(trial, value)
    except optuna.exceptions.UpdateFinishedTrialError:  # taken for stale meanwhile: its retry runs elsewhere
        if tracker:
            tracker.finish_trial(trial.number, "FAIL", error=WORKER_LOST)
        return
    except RuntimeError:
        # GridSampler.after_trial calls study.stop() once the grid is done, which only an optimize loop accepts
        # (this worker asks and tells); optuna stores the trial before that, in a `finally`
        if not isinstance(study.sampler, optuna.samplers.GridSampler):
            raise
    if tracker:
        tracker.finish_trial(trial.number, "COMPLETE", value=value, best=_best(study))


def _tell_failure(study, trial, error: str, tracker) -> bool:
    """Tell the trial FAIL; False when it had been failed already (taken for stale meanwhile)."""
    failed = True
    try:
        trial.set_user_attr("error", checked("error", error, TRIAL_ATTRS))
        study.tell(trial, state=TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        error, failed = WORKER_LOST, False
    if tracker:
        tracker.finish_trial(trial.number, "FAIL", error=error)
    return failed


def _suggest(trial, key: str, d) -> Any:
    if d.type == ParamType.categorical:
        return trial.suggest_categorical(key, list(d.choices))
    if d.type == ParamType.int:
        return trial.suggest_int(key, int(d.low), int(d.high), step=int(d.step or 1), log=d.log)
    return trial.suggest_float(key, float(d.low), float(d.high), step=d.step, log=d.log)


def _fail_stale(study, grace_s: int) -> bool:
    """Fail the trials whose heartbeat stopped, and those no worker claimed within `grace_s` seconds of their start
    (killed before the first heartbeat); their retries are queued. Whether any was failed by this worker."""
    before = _count(study.get_trials(deepcopy=False), TrialState.FAIL)
    optuna.storages.fail_stale_trials(study)
    storage, cutoff = study._storage, datetime.now() - timedelta(seconds=grace_s)
    retry = storage.get_heartbeat_stale_trial_callback()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if "worker" in t.user_attrs or t.datetime_start is None or t.datetime_start > cutoff:
            continue
        try:
            if storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL) and retry is not None:
                retry(study, copy.deepcopy(storage.get_trial(t._trial_id)))
        except optuna.exceptions.UpdateFinishedTrialError:  # another worker failed it first
            pass
    return _count(study.get_trials(deepcopy=False), TrialState.FAIL) > before


def _count(trials, state: TrialState) -> int:
    return sum(1 for t in trials if t.state == state)


def _best(study):
    """The best COMPLETE trial, or None."""
    try:
        return study.best_trial
    except ValueError:
        return None


def _result(space: SweepConfig, study, stopped: str) -> SweepResult:
    trials = study.get_trials(deepcopy=False)
    best = _best(study)
    return SweepResult(study=space.name, complete=_count(trials, TrialState.COMPLETE),
                       failed=_count(trials, TrialState.FAIL), best_trial=best.number if best else None,
                       best_value=best.value if best else None,
                       best_overrides=to_overrides(best.params) if best else [], stopped=stopped)


class _Heartbeat:
    """Records a trial's heartbeat now and every `interval` seconds until the block ends."""

    def __init__(self, storage, trial_id: int, interval: int):
        self._storage, self._trial_id, self._interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="medtee-sweep-heartbeat")

    def __enter__(self):
        self._storage.record_heartbeat(self._trial_id)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(self._interval):
            self._storage.record_heartbeat(self._trial_id)
