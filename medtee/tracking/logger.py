"""The one door to MLflow: a Lightning logger whose every write goes through the privacy guard, and what a run
records (provenance tags, the sealed dataset as a dataset input). Nothing else in medtee talks to MLflow.

The runs of a Hydra sweep are nested under one parent run per sweep. The experiment is tagged as a fine-tuning
experiment, and a run's dataset input is the sealed dataset's id, manifest digest, columns and record count
(`dataset_input`), never anything read from its records.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

from lightning.pytorch.loggers.logger import Logger, rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from medtee.training.config import weights_label

from medtee import containment
from medtee.schema import ConfigError
from medtee.tracking.guard import PARAM_ALLOW_LIST, REPORT_ARTIFACT, WINDOWED_METRICS, Guard

log = logging.getLogger("medtee.tracking")

#: The experiment tag naming an experiment's kind, and medtee's: fine-tuning runs (MLflow's "finetuning" kind).
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "finetuning"

#: The experiment's runs table in MLflow's model-training view. MLflow 3.17's UI opens an experiment on the view of the
#: `workflowType` in its URL, else of the reader's last choice (GenAI by default), whatever the kind tag says; this
#: link names the training view, so it opens on the runs with their metrics and Dataset column.
RUNS_VIEW = "#/experiments/{experiment_id}/runs?workflowType=machine_learning"

#: Where `mlflow ui` serves by default: the dashboard of a local (sqlite) store.
LOCAL_UI = "http://127.0.0.1:5000"

#: The columns of a sealed dataset's records (the Parquet schema `medtee seal` writes), as an MLflow column spec.
DATASET_SCHEMA = {"mlflow_colspec": [
    {"type": "string", "name": "id", "required": True},
    {"type": "array", "name": "messages", "required": True, "items": {"type": "object", "properties": {
        "role": {"type": "string", "required": True}, "content": {"type": "string", "required": True}}}},
]}

#: Hex digits of the manifest digest that name a dataset input, as the runs table shows it (MLflow keeps at most 36
#: characters; the input's source and the run's `medtee.dataset_manifest_digest` tag have all 64).
DATASET_DIGEST_CHARS = 12

#: Artifact stores a run may write to: the tracking server's proxied store, or local files next to a sqlite store.
#: Any other (s3://, gs://, ...) would be a direct connection to a host the recipe does not name.
ARTIFACT_SCHEMES = ("", "file", "mlflow-artifacts")


def _experiment(client, name: str) -> str:
    """The id of the experiment called `name`, created and tagged as a fine-tuning experiment if need be. Workers of
    one sweep start together: one that loses a race to create or tag it (the store refuses the duplicate) looks again."""
    from mlflow.exceptions import MlflowException

    for attempt in (1, 2):
        try:
            exp = client.get_experiment_by_name(name)
            if exp is None:
                exp = client.get_experiment(client.create_experiment(name))
            if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
                client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            return exp.experiment_id
        except MlflowException:
            if attempt == 2:
                raise


class GuardedMLflowLogger(Logger):
    """A Lightning logger whose every write goes through the Guard into one MLflow run.

    `sweep_id` nests the run under that sweep's parent run (found or created); `parent_run_id` nests it under that
    run, whose state the caller keeps (`medtee.sweep.tracking`); `resume_run_id` continues an existing run (a resumed
    training) instead of creating one.
    """

    def __init__(self, *, tracking_uri: str, experiment: str, run_name: str, guard: Guard,
                 tags: Mapping[str, str], params: Mapping[str, str], sweep_id: str | None = None,
                 resume_run_id: str | None = None, parent_run_id: str | None = None):
        super().__init__()
        from mlflow.tracking import MlflowClient

        self.guard = guard
        self._client = MlflowClient(tracking_uri=store_uri(tracking_uri))
        self._tracking_uri = str(tracking_uri)
        try:
            self._experiment_id = _experiment(self._client, experiment)
            self._artifact_location = self._client.get_experiment(self._experiment_id).artifact_location
        except Exception as exc:  # connection refused, TLS, 401/403: the message names no data, but stay uniform
            raise containment.SafeError(
                f"the MLflow tracking store {display_uri(tracking_uri)} refused or did not answer "
                f"({type(exc).__name__}); check tracking.tracking_uri (tracking=mlflow_server: MLFLOW_TRACKING_URI) "
                f"and the credentials in MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME/PASSWORD") from None
        self.dashboard = dashboard_url(tracking_uri, self._experiment_id)
        self.where = f"{display_uri(tracking_uri)} (experiment '{experiment}'; runs: {self.dashboard})"
        safe_tags = guard.tags(tags)
        self._parent_id = self._sweep_parent(sweep_id, run_name, safe_tags) if sweep_id else None
        if self._parent_id or parent_run_id:
            safe_tags["mlflow.parentRunId"] = self._parent_id or parent_run_id
        if resume_run_id:
            from mlflow.exceptions import MlflowException

            try:
                self._run = self._client.get_run(resume_run_id)
            except MlflowException:
                raise ConfigError(
                    f"trainer.resume_from: the checkpoint continues MLflow run {resume_run_id}, which "
                    f"{display_uri(tracking_uri)} does not hold; resume with the tracking.tracking_uri of the run "
                    f"that wrote the checkpoint") from None
            self._client.update_run(resume_run_id, status="RUNNING")
            self.set_tags(safe_tags)
        else:
            self._run = self._client.create_run(self._experiment_id, run_name=run_name, tags=safe_tags)
            self._client.log_batch(self.run_id, params=_params(guard, params))

    def _sweep_parent(self, sweep_id: str, run_name: str, tags: Mapping[str, str]) -> str:
        """The parent run of this sweep: the one tagged with its id, or a new one carrying the shared tags."""
        found = self._client.search_runs([self._experiment_id], f"tags.`medtee.sweep_id` = '{sweep_id}'",
                                         max_results=1)
        if found:
            self._client.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id
        shared = {k: v for k, v in tags.items() if k in SWEEP_TAGS}
        note = f"Sweep of recipe '{tags.get('medtee.recipe', '?')}': one child run per job."
        if "medtee.SIMULATED" in tags:
            note += " SIMULATED attestation: development runs, no TEE, protects nothing."
        parent = self._client.create_run(self._experiment_id, run_name=f"{run_name} sweep",
                                         tags={**shared, "medtee.sweep_id": sweep_id, "mlflow.note.content": note})
        return parent.info.run_id

    @property
    def run_id(self) -> str:
        return self._run.info.run_id

    @property
    def parent_run_id(self) -> str | None:
        return self._parent_id

    @property
    def name(self) -> str:
        return "medtee"

    @property
    def version(self) -> str:
        return self.run_id[:8]

    @property
    @rank_zero_experiment
    def experiment(self):
        return self._client

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        """Ignored: medtee logs its own allow-listed recipe fields when the run is created."""

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Lightning's door. A training step's own values (WINDOWED_METRICS: as few as one dialogue's) never pass
        here, so a `self.log(..., logger=True)` of one cannot reach MLflow: they leave only as a window
        (`log_window`) or a finished trial's result (`log_result`)."""
        for key in metrics:
            if key in WINDOWED_METRICS:
                self.guard.dropped("metric", key, "a training step's value leaves only as a window of steps")
        self._log(self.guard.metrics({k: v for k, v in metrics.items() if k not in WINDOWED_METRICS}), step or 0)

    @rank_zero_only
    def log_window(self, metrics: Mapping[str, float], *, dialogues: int, step: int) -> None:
        """Log the metrics of a window of training steps over `dialogues` dialogues (`Guard.window`): the only way
        `train/loss` and `train/tokens_per_s` reach MLflow during training (the module logs them to Lightning for
        its progress bar only)."""
        self._log(self.guard.window(metrics, dialogues=dialogues), step)

    @rank_zero_only
    def log_result(self, metrics: Mapping[str, float]) -> None:
        """A finished run's values as its summary holds them (a sweep trial's objective): a final train/loss is the
        last window's, which closed only over at least `tracking.min_aggregate` dialogues."""
        self._log(self.guard.metrics(metrics), 0)

    def _log(self, safe: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        if safe:
            now = int(time.time() * 1000)
            self._client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in safe.items()])

    @rank_zero_only
    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        safe = self.guard.tags(tags)
        if safe:
            self._client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in safe.items()])

    @rank_zero_only
    def log_dataset(self, manifest, *, context: str) -> None:
        """Log a sealed dataset as the run's MLflow dataset input (`dataset_input`): the runs table's Dataset column."""
        self._client.log_inputs(self.run_id, [dataset_input(manifest, context=context)])

    @rank_zero_only
    def log_artifact(self, kind: str, payload: Mapping[str, Any]) -> None:
        """Log one of medtee's safe artifacts (SAFE_ARTIFACTS) as JSON; anything else is dropped by the guard."""
        item = self.guard.artifact(kind, payload)
        if item is not None and self._artifacts_allowed(item[0]):
            self._client.log_text(self.run_id, item[1], item[0])

    def _artifacts_allowed(self, name: str) -> bool:
        """Whether the experiment's artifact store is one this run may write to (else a warning naming `name`)."""
        location = urlsplit(self._artifact_location or "")
        if location.scheme not in ARTIFACT_SCHEMES:
            log.warning("artifact %s not logged: the experiment keeps artifacts in a '%s' store, which this run "
                        "would contact directly; serve them through the tracking server instead", name, location.scheme)
            return False
        if location.scheme == "mlflow-artifacts" and location.netloc not in ("", urlsplit(self._tracking_uri).netloc):
            # MLflow would send the tracking server's credentials to that host
            log.warning("artifact %s not logged: the experiment keeps artifacts on another server than the tracking "
                        "server; serve them through the tracking server instead", name)
            return False
        return True

    @rank_zero_only
    def finish(self, summary: Mapping[str, Any], *, recipe: Mapping[str, Any], verdict,
               weight_digests: Mapping[str, str] | None = None, evaluation: Mapping[str, float] | None = None,
               tags: Mapping[str, str] | None = None, receipt: Mapping[str, Any] | None = None) -> None:
        """The end of a successful run: final tags, the summary, the resolved recipe, the signed receipt, the
        evaluation report (when it covers at least `tracking.min_aggregate` examples), then the run (and its sweep
        parent) closed."""
        if tags:
            self.set_tags(tags)
        self.log_artifact("summary", {**summary, "attestation": verdict.to_json(),
                                      "model_weights_sha256": dict(weight_digests or {})})
        self.log_artifact("recipe", recipe)
        if receipt:
            self.log_artifact("receipt", receipt)
        if evaluation:
            self.log_artifact("evaluation", {"examples": self.guard.eval_examples or 0, "metrics": evaluation})
        self.close("FINISHED")

    @rank_zero_only
    def finish_evaluation(self, evaluation: Mapping[str, Any], *, report: bytes,
                          receipt: Mapping[str, Any] | None = None) -> None:
        """The end of `medtee eval run`: the evaluation aggregates, the HTML report, the receipt; the run closed."""
        self.log_artifact("evaluation", evaluation)
        if self.guard.report(report) and self._artifacts_allowed(REPORT_ARTIFACT):
            self._client.log_text(self.run_id, report.decode("utf-8"), REPORT_ARTIFACT)
        if receipt:
            self.log_artifact("receipt", receipt)
        self.close("FINISHED")

    @rank_zero_only
    def fail(self, receipt: Mapping[str, Any] | None = None) -> None:
        """The end of a failed run: the signed receipt (when one was written), then the run closed FAILED."""
        if receipt:
            self.log_artifact("receipt", receipt)
        self.close("FAILED")

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.close("FINISHED" if status == "success" else "FAILED")

    def close(self, status: str) -> None:
        """End the run (once) and bring the sweep's parent run to the state of its children."""
        if self._client.get_run(self.run_id).info.status == "RUNNING":
            self._client.set_terminated(self.run_id, status)
        if self._parent_id:
            children = self._client.search_runs([self._experiment_id],
                                                f"tags.`mlflow.parentRunId` = '{self._parent_id}'")
            states = {c.info.status for c in children}
            if "RUNNING" not in states:
                self._client.set_terminated(self._parent_id, "FAILED" if states - {"FINISHED"} else "FINISHED")


#: Tags a sweep's parent run shares with its children (what a dashboard reader filters on).
SWEEP_TAGS = ("medtee.recipe", "medtee.hardware", "medtee.model", "medtee.attestation.policy",
              "medtee.attestation.mode", "medtee.SIMULATED")


def _params(guard: Guard, params: Mapping[str, str]):
    from mlflow.entities import Param

    out = []
    for key, value in params.items():
        if key in PARAM_ALLOW_LIST:
            out.append(Param(key, str(value)))
        else:
            guard.dropped("parameter", key, "not in the parameter allow-list")
    return out


# ------------------------------------------------------------------------------------------- what a run records


def store_uri(uri: str) -> str:
    """The URI MLflow is given: a relative sqlite path made absolute. MLflow keeps one store per URI string for the
    process, so a relative one would write a second run started from another directory into the first one's file."""
    text = str(uri)
    if text.startswith("sqlite:///") and not text.startswith("sqlite:////"):
        return f"sqlite:///{Path.cwd() / text[len('sqlite:///'):]}"
    return text


def display_uri(uri: str) -> str:
    """A tracking URI fit to print: without user name, password or query."""
    parts = urlsplit(str(uri))
    text = str(uri).split("?", 1)[0]
    return text.replace(parts.netloc, parts.netloc.rpartition("@")[2], 1) if "@" in parts.netloc else text


def dashboard_url(tracking_uri: str, experiment_id: str) -> str:
    """The experiment's runs in MLflow's model-training view: on the tracking server, or under `mlflow ui`."""
    base = display_uri(tracking_uri) if urlsplit(str(tracking_uri)).scheme in ("http", "https") else LOCAL_UI
    return f"{base.rstrip('/')}/{RUNS_VIEW.format(experiment_id=experiment_id)}"


def dataset_input(manifest, *, context: str):
    """A sealed dataset (its `Manifest`) as an MLflow dataset input: the dataset id, the manifest digest, the columns
    and the record count, with its use (`context`: training or evaluation). Nothing read from the records."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    digest = manifest.digest()
    dataset = Dataset(name=manifest.dataset_id, digest=digest[:DATASET_DIGEST_CHARS], source_type="medtee-sealed",
                      source=json.dumps({"dataset_id": manifest.dataset_id, "manifest_sha256": digest}),
                      schema=json.dumps(DATASET_SCHEMA), profile=json.dumps({"num_rows": manifest.record_count}))
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])


def device_verdicts(verdict) -> dict[str, str]:
    """The appraisal outcome per device: `cpu` (the SEV-SNP report and binding) and `gpu0`, `gpu1`, ..."""
    devices: dict[str, list] = {}
    for c in verdict.checks:
        head = c.name.split(".", 1)[0]
        device = head.replace("[", "").replace("]", "") if head.startswith("gpu[") else "cpu"
        devices.setdefault(device, []).append(c.ok)
    return {d: "pass" if all(oks) else f"fail ({oks.count(False)} of {len(oks)} checks failed)"
            for d, oks in devices.items()}


def combined_weights_digest(weight_digests: Mapping[str, str]) -> str:
    """One sha256 over a model's weight files: the sha256 of their `sha256sum` listing (sorted by name)."""
    listing = "".join(f"{digest}  {name}\n" for name, digest in sorted(weight_digests.items()))
    return hashlib.sha256(listing.encode()).hexdigest()


def run_tags(*, recipe: str, recipe_digest: str, dataset_digest: str, verdict, hardware: str, model, mode: str,
             weight_digests: Mapping[str, str] | None = None) -> dict[str, str]:
    """The provenance a dashboard reader needs: recipe and digests, `model` (its group), `hardware` (the profile's
    name), attestation per device, and `mode` (train, validate or eval)."""
    tags = {
        "medtee.recipe": recipe,
        "medtee.recipe_digest": recipe_digest,
        "medtee.dataset_manifest_digest": dataset_digest,
        "medtee.hardware": hardware,
        "medtee.model": model.name,
        "medtee.model.id": weights_label(model),
        "medtee.model.revision": model.revision or "none",
        "medtee.model.weights_sha256": (combined_weights_digest(weight_digests) if weight_digests
                                        else "none: random weights"),
        "medtee.attestation.policy": verdict.policy,
        "medtee.attestation.mode": "SIMULATED" if verdict.simulated else "hardware",
        "medtee.attestation.verdict": "pass" if verdict.ok else "fail",
        "medtee.mode": mode,
    }
    tags.update({f"medtee.model.weights.{name}": sha for name, sha in (weight_digests or {}).items()})
    tags.update({f"medtee.attestation.verdict.{d}": v for d, v in device_verdicts(verdict).items()})
    if verdict.simulated:
        tags["medtee.SIMULATED"] = "true: development attestation, no TEE, protects nothing"
        tags["mlflow.note.content"] = "SIMULATED attestation: development run, no TEE, protects nothing."
    return tags


def sweep_id() -> str | None:
    """An id for the Hydra sweep this job belongs to (from its sweep directory), or None outside a sweep."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except ValueError:  # no Hydra run (a direct call)
        return None
    if hc.mode != RunMode.MULTIRUN:
        return None
    return hashlib.sha256(str(Path(hc.sweep.dir).resolve()).encode()).hexdigest()[:16]


def open_run(tracking, *, run_name: str, tags: Mapping[str, str], params: Mapping[str, str], eval_examples: int,
             run_id: str | None = None, manifest=None, context: str = "training") -> GuardedMLflowLogger:
    """The run's guarded logger on the store of `tracking` (its group): the parameters and tags the guard allows,
    nested under its sweep's parent run, and the sealed dataset's `manifest` (when given) as its dataset input in
    `context` (training or evaluation).

    `eval_examples` is how many held-out examples one evaluation pass covers; the guard counts no more than that.
    `run_id` continues that run (a resumed training).
    """
    containment.filter_handlers()  # the heavy libraries are imported by now: cover the handlers they added
    guard = Guard(tracking.metrics, tracking.min_aggregate)
    guard.eval_examples = eval_examples
    logger = GuardedMLflowLogger(tracking_uri=tracking.tracking_uri, experiment=tracking.experiment,
                                 run_name=tracking.run_name or run_name, guard=guard, tags=tags,
                                 params=Guard.params(params), sweep_id=sweep_id(), resume_run_id=run_id)
    if manifest is not None:
        logger.log_dataset(manifest, context=context)
    return logger
