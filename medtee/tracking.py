"""The one door to MLflow: allow-listed metrics, parameters and tags, aggregates only.

Nothing else in medtee talks to MLflow. Keys outside the allow-lists are dropped with a warning that names the key,
never the value.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Iterable, Mapping

from lightning.pytorch.loggers.logger import Logger, rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from medtee.config import METRIC_ALLOW_LIST

log = logging.getLogger("medtee.tracking")

#: Recipe fields that may become MLflow parameters. Paths, URLs and anything data-derived are absent on purpose.
PARAM_ALLOW_LIST = (
    "hardware.name", "hardware.devices", "hardware.num_nodes",
    "attestation.name",
    "encryption.scheme",
    "qlora.quantization", "qlora.double_quant", "qlora.compute_dtype", "qlora.rank", "qlora.alpha", "qlora.dropout",
    "qlora.target_modules", "qlora.use_dora", "qlora.use_rslora",
    "model.name", "model.id", "model.revision", "model.dtype", "model.attn_implementation",
    "model.gradient_checkpointing",
    "data.source", "data.max_length", "data.batch_size", "data.val_fraction", "data.packing", "data.seed",
    "trainer.max_steps", "trainer.lr", "trainer.warmup_steps", "trainer.weight_decay", "trainer.optimizer",
    "trainer.precision", "trainer.accumulate_grad_batches", "trainer.gradient_clip_val", "trainer.seed",
)

#: Evaluation metrics: logged only when they aggregate at least `tracking.min_aggregate` examples.
EVAL_PREFIXES = ("val/",)

#: Lightning's own bookkeeping keys, renamed to medtee's `stage/metric` scheme.
RENAMES = {"epoch": "train/epoch"}


class Guard:
    """Decides what may leave: metric names, finite values, aggregate sizes, parameters, tags."""

    def __init__(self, allowed_metrics: Iterable[str] | None, min_aggregate: int):
        self.allowed = frozenset(allowed_metrics if allowed_metrics is not None else METRIC_ALLOW_LIST)
        self.allowed &= frozenset(METRIC_ALLOW_LIST)
        self.min_aggregate = min_aggregate
        self.eval_examples: int | None = None
        self._warned: set[str] = set()

    def _warn_once(self, key: str, why: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("tracking guard dropped metric %r: %s", key, why)

    def metrics(self, metrics: Mapping[str, Any]) -> dict[str, float]:
        out = {}
        for key, value in metrics.items():
            key = RENAMES.get(key, key)
            if key not in self.allowed:
                self._warn_once(key, "not in the metric allow-list")
                continue
            if key.startswith(EVAL_PREFIXES) and (self.eval_examples or 0) < self.min_aggregate:
                self._warn_once(key, f"evaluation covers {self.eval_examples or 0} examples, fewer than "
                                     f"tracking.min_aggregate={self.min_aggregate}")
                continue
            try:
                number = float(value)
            except (TypeError, ValueError):
                self._warn_once(key, "value is not a number")
                continue
            if math.isfinite(number):
                out[key] = number
        return out

    @staticmethod
    def params(resolved_recipe: Mapping[str, Any]) -> dict[str, str]:
        out = {}
        for dotted in PARAM_ALLOW_LIST:
            node: Any = resolved_recipe
            for part in dotted.split("."):
                node = node.get(part) if isinstance(node, Mapping) else None
            if node is not None:
                out[dotted] = ",".join(map(str, node)) if isinstance(node, list) else str(node)
        return out


class GuardedMLflowLogger(Logger):
    """A Lightning logger whose every write goes through the Guard into one MLflow run."""

    def __init__(self, *, tracking_uri: str, experiment: str, run_name: str, guard: Guard,
                 tags: Mapping[str, str], params: Mapping[str, str], parent_run_id: str | None = None):
        super().__init__()
        from mlflow.tracking import MlflowClient

        self.guard = guard
        self._client = MlflowClient(tracking_uri=tracking_uri)
        exp = self._client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else self._client.create_experiment(experiment)
        all_tags = dict(tags)
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        self._run = self._client.create_run(exp_id, run_name=run_name, tags=all_tags)
        self._client.log_batch(self.run_id, params=_params(params))

    @property
    def run_id(self) -> str:
        return self._run.info.run_id

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
        from mlflow.entities import Metric

        safe = self.guard.metrics(metrics)
        if safe:
            now = int(time.time() * 1000)
            self._client.log_batch(self.run_id, metrics=[Metric(k, v, now, step or 0) for k, v in safe.items()])

    @rank_zero_only
    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.close("FINISHED" if status == "success" else "FAILED")

    def close(self, status: str) -> None:
        if self._client.get_run(self.run_id).info.status == "RUNNING":
            self._client.set_terminated(self.run_id, status)


def _params(params: Mapping[str, str]):
    from mlflow.entities import Param

    return [Param(k, v) for k, v in params.items()]
