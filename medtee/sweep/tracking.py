"""A study in MLflow: one parent run per study, one nested child run per finished trial.

The parent is the experiment's run tagged `medtee.sweep.study=<name>` and `medtee.sweep.role=parent`; a child is
tagged `medtee.sweep.trial=<number>` (and `mlflow.parentRunId`), with the trial's allow-listed overrides as
parameters, the objective as its metric and `medtee.sweep.state` (COMPLETE or FAIL, with `medtee.sweep.error`, the
exception type). The parent carries the best trial (`medtee.sweep.best_trial`, `medtee.sweep.best_value`).

Every run is written through `GuardedMLflowLogger`, so the privacy guard filters each tag, parameter and metric;
this module only reads runs (to find them) and deletes duplicates. It converges after kills and with several
workers (`reconcile`, at the start and end of a worker and after a stale trial is failed):

- a child is looked up by its trial number before one is created;
- a child a dead worker left without its trial's state (RUNNING, or closed by the runner) is closed with it: COMPLETE (a kill after `tell`) logs the
  objective and closes FINISHED; FAIL (a stale trial) closes FAILED with error `WorkerLost`. The trial's retry is
  a new trial with a new child tagged `medtee.sweep.retry_of`; a closed child is never reused;
- a finished trial without a child (its worker died before creating it) gets one, closed;
- two workers creating the same run at once both keep the oldest (start time, then run id) and delete the rest.
"""

from __future__ import annotations

from typing import Any, Mapping

from optuna.trial import TrialState

from medtee.sweep.config import to_overrides
from medtee.tracking.guard import Guard
from medtee.tracking.logger import GuardedMLflowLogger, store_uri

STUDY_TAG, ROLE_TAG, TRIAL_TAG = "medtee.sweep.study", "medtee.sweep.role", "medtee.sweep.trial"
STATE_TAG = "medtee.sweep.state"  # set when a child is closed for its trial: COMPLETE or FAIL
STATUS = {"COMPLETE": "FINISHED", "FAIL": "FAILED"}  # trial state -> MLflow run status


class SweepTracker:
    """Mirrors one study into the MLflow experiment of `tracking` (the recipe's `tracking` group)."""

    def __init__(self, *, tracking_uri: str, experiment: str, guard: Guard, tags: Mapping[str, str] | None = None):
        from mlflow.tracking import MlflowClient

        self.guard = guard
        self._uri, self._experiment, self._tags = tracking_uri, experiment, dict(tags or {})
        self._client = MlflowClient(tracking_uri=store_uri(tracking_uri))
        self._study = self._objective = ""
        self._parent: GuardedMLflowLogger | None = None
        self._open: dict[int, GuardedMLflowLogger] = {}

    # ------------------------------------------------------------------------------------------- the engine's calls

    def begin(self, study) -> None:
        """Find or create the study's parent run (RUNNING again), then reconcile the children."""
        self._study, self._objective = study.study_name, study.user_attrs["objective"]
        self._parent = self._find_or_create_parent()
        self.reconcile(study)

    def start_trial(self, number: int, overrides: list[str], *, retry_of: int | None, worker: str) -> None:
        """The trial's child run: found by its number, else created with its allow-listed overrides as params."""
        found = self._keep_oldest(self._children().get(number, []))
        tags = {**self._tags, STUDY_TAG: self._study, ROLE_TAG: "trial", TRIAL_TAG: number,
                "medtee.sweep.worker": worker}
        if retry_of is not None:
            tags["medtee.sweep.retry_of"] = retry_of
        self._open[number] = (self._logger(resume_run_id=found.info.run_id, tags=tags) if found
                              else self._new_child(number, tags, overrides))

    def run_id_of(self, number: int) -> str | None:
        """The MLflow run of a trial this worker is running (for the runner to log its training into)."""
        child = self._open.get(number)
        return child.run_id if child else None

    def finish_trial(self, number: int, state: str, *, value: float | None = None, error: str | None = None,
                     best=None) -> None:
        """Close the trial's child with its state (and objective); tag the parent with the best trial so far."""
        child = self._open.pop(number)
        run = self._client.get_run(child.run_id)
        if STATE_TAG not in run.data.tags:  # else a reconcile elsewhere closed it already
            if run.info.status != "RUNNING":  # the runner's own logger closed it: reopen to record the trial's state
                child = self._logger(resume_run_id=child.run_id, tags={})
            self._close(child, state, value, error)
        if best is not None:
            self._tag_best(best)

    def reconcile(self, study) -> None:
        """Bring the children to the study's finished trials: one closed child each, none RUNNING."""
        children = self._children()
        for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
            child = self._keep_oldest(children.get(trial.number, []))
            state = trial.state.name
            error = trial.user_attrs.get("error", "WorkerLost") if state == "FAIL" else None
            value = trial.value if state == "COMPLETE" else None
            tags = {STUDY_TAG: self._study, ROLE_TAG: "trial", TRIAL_TAG: trial.number}
            if child is None:
                self._close(self._new_child(trial.number, {**self._tags, **tags}, to_overrides(trial.params)),
                            state, value, error)
            elif STATE_TAG not in child.data.tags and trial.number not in self._open:
                self._close(self._logger(resume_run_id=child.info.run_id, tags=tags), state, value, error)

    def end(self, study) -> None:
        """Reconcile, tag the best trial, and close the parent: FINISHED once the study is complete, FAILED when
        this worker stops short and no other is running a trial, else left RUNNING for the last one out."""
        self.reconcile(study)
        trials = study.get_trials(deepcopy=False)
        complete = sum(1 for t in trials if t.state == TrialState.COMPLETE)
        if complete:
            self._tag_best(study.best_trial)
        if complete >= int(study.user_attrs.get("n_trials", 0)):
            self._parent.close("FINISHED")
        elif not any(t.state == TrialState.RUNNING for t in trials):
            self._parent.close("FAILED")

    # ------------------------------------------------------------------------------------------------ helpers

    def _close(self, child: GuardedMLflowLogger, state: str, value: float | None, error: str | None) -> None:
        child.set_tags({STATE_TAG: state, **({"medtee.sweep.error": error} if error else {})})
        if value is not None:
            child.log_result({self._objective: value})
        child.close(STATUS[state])

    def _tag_best(self, best) -> None:
        self._parent.set_tags({"medtee.sweep.best_trial": best.number, "medtee.sweep.best_value": best.value})

    def _find_or_create_parent(self) -> GuardedMLflowLogger:
        found = self._keep_oldest(self._search(f"tags.`{STUDY_TAG}` = '{self._study}' and "
                                               f"tags.`{ROLE_TAG}` = 'parent'"))
        if found is not None:
            return self._logger(resume_run_id=found.info.run_id, tags={})
        note = f"Optuna study '{self._study}': one child run per finished trial."
        created = self._logger(run_name=f"{self._study} sweep", tags={
            **self._tags, STUDY_TAG: self._study, ROLE_TAG: "parent", "mlflow.note.content": note})
        kept = self._keep_oldest(self._search(f"tags.`{STUDY_TAG}` = '{self._study}' and "
                                              f"tags.`{ROLE_TAG}` = 'parent'"))
        return created if kept.info.run_id == created.run_id else self._logger(resume_run_id=kept.info.run_id,
                                                                                 tags={})

    def _new_child(self, number: int, tags: Mapping[str, Any], overrides: list[str]) -> GuardedMLflowLogger:
        params = dict(o.split("=", 1) for o in overrides)
        created = self._logger(run_name=f"{self._study} trial {number}", tags=tags, params=params,
                               parent_run_id=self._parent.run_id)
        kept = self._keep_oldest(self._children().get(number, []))
        return created if kept.info.run_id == created.run_id else self._logger(resume_run_id=kept.info.run_id,
                                                                                 tags={})

    def _logger(self, *, tags: Mapping[str, Any], params: Mapping[str, str] | None = None, run_name: str = "",
                resume_run_id: str | None = None, parent_run_id: str | None = None) -> GuardedMLflowLogger:
        return GuardedMLflowLogger(tracking_uri=self._uri, experiment=self._experiment, run_name=run_name,
                                   guard=self.guard, tags=tags, params=params or {}, resume_run_id=resume_run_id,
                                   parent_run_id=parent_run_id)

    def _children(self) -> dict[int, list]:
        out: dict[int, list] = {}
        for run in self._search(f"tags.`mlflow.parentRunId` = '{self._parent.run_id}'"):
            if TRIAL_TAG in run.data.tags:
                out.setdefault(int(run.data.tags[TRIAL_TAG]), []).append(run)
        return out

    def _search(self, filter_string: str) -> list:
        """Every active run of the experiment matching the filter (all pages)."""
        experiment = self._client.get_experiment_by_name(self._experiment)
        if experiment is None:
            return []
        runs, token = [], None
        while True:
            page = self._client.search_runs([experiment.experiment_id], filter_string, max_results=1000,
                                            page_token=token)
            runs += list(page)
            token = page.token
            if not token:
                return runs

    def _keep_oldest(self, runs: list):
        """The oldest of `runs` (start time, then id), the others deleted: what every worker racing keeps."""
        if not runs:
            return None
        keep, *extra = sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))
        for run in extra:
            self._client.delete_run(run.info.run_id)
        return keep
