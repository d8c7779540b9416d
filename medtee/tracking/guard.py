"""The privacy guard: what may leave a run for MLflow. Metric names from an allow-list, finite values, evaluation
metrics only over enough examples, training batches' metrics only over a window of enough dialogues, allow-listed
parameters, tags and artifact kinds. A key outside the lists is dropped with a warning that names the key, never the
value. Imports nothing heavy."""

from __future__ import annotations

import json
import logging
import math
from typing import Any, Iterable, Mapping

from medtee.tracking.config import METRIC_ALLOW_LIST

log = logging.getLogger("medtee.tracking")

#: Recipe fields that may become MLflow parameters. Paths, URLs and anything data-derived are absent on purpose.
PARAM_ALLOW_LIST = (
    "hardware.name", "hardware.devices", "hardware.num_nodes",
    "attestation.name",
    "encryption.scheme",
    "qlora.quantization", "qlora.double_quant", "qlora.compute_dtype", "qlora.rank", "qlora.alpha", "qlora.dropout",
    "qlora.target_modules", "qlora.use_dora", "qlora.use_rslora",
    "model.name", "model.id", "model.revision", "model.dtype", "model.attn_implementation",
    "model.gradient_checkpointing", "model.checkpoint_every_n_layers", "model.selective_checkpointing",
    "model.compile_layers",
    "data.source", "data.max_length", "data.batch_size", "data.val_fraction", "data.packing", "data.seed",
    "trainer.max_steps", "trainer.lr", "trainer.warmup_steps", "trainer.weight_decay", "trainer.optimizer",
    "trainer.precision", "trainer.accumulate_grad_batches", "trainer.gradient_clip_val", "trainer.seed",
    "trainer.strategy", "trainer.loss_chunk_tokens", "trainer.validate_only",
)

#: Evaluation metrics: logged only when they aggregate at least `tracking.min_aggregate` examples.
EVAL_PREFIXES = ("val/", "eval/")

#: What training batches say (their loss, their throughput, their gradient): one step's value may be one dialogue's
#: (`data.batch_size=1`), so these leave only as a window of steps covering at least `tracking.min_aggregate`
#: dialogues (`Guard.window`; `CausalLMModule` keeps the window). The other `train/*` metrics (`train/lr`,
#: `train/epoch`, `train/epsilon`) are functions of the step and the recipe, not of the data.
WINDOWED_METRICS = ("train/loss", "train/tokens_per_s", "train/grad_norm")

#: Lightning's own bookkeeping keys, renamed to medtee's `stage/metric` scheme.
RENAMES = {"epoch": "train/epoch"}

#: Tags a run may set: medtee's own (`medtee.*`), the run description and the parent of a sweep's child run.
TAG_ALLOW_LIST = ("medtee.", "mlflow.note.content", "mlflow.parentRunId")

#: Longest tag value: tags hold names, digests and verdicts, never text.
MAX_TAG_CHARS = 500

#: The only artifacts a run logs (kind -> file): JSON built by medtee from digests, verdicts, counts and aggregate
#: metrics (the receipt: those and the attestation evidence, signed); never text, samples, per-example values or
#: paths to data.
SAFE_ARTIFACTS = {"summary": "summary.json", "recipe": "recipe.json", "receipt": "receipt.dsse.json",
                  "evaluation": "evaluation.json"}

#: The evaluation's HTML report: aggregates only, self-contained (`Guard.report` checks it before it is logged).
REPORT_ARTIFACT = "evaluation_report.html"


class Guard:
    """Decides what may leave: metric names, finite values, aggregate sizes, parameters, tags."""

    def __init__(self, allowed_metrics: Iterable[str] | None, min_aggregate: int):
        self.allowed = frozenset(allowed_metrics if allowed_metrics is not None else METRIC_ALLOW_LIST)
        self.allowed &= frozenset(METRIC_ALLOW_LIST)
        self.min_aggregate = min_aggregate
        self.eval_examples: int | None = None
        self._warned: set[str] = set()

    def dropped(self, what: str, key: str, why: str) -> None:
        """Warn (once per key) that a key was dropped: names the key and why, never the value."""
        if (what, key) not in self._warned:
            self._warned.add((what, key))
            log.warning("tracking guard dropped %s %r: %s", what, key, why)

    def metrics(self, metrics: Mapping[str, Any]) -> dict[str, float]:
        out = {}
        for key, value in metrics.items():
            key = RENAMES.get(key, key)
            if key not in self.allowed:
                self.dropped("metric", key, "not in the metric allow-list")
                continue
            if key.startswith(EVAL_PREFIXES) and (self.eval_examples or 0) < self.min_aggregate:
                self.dropped("metric", key, f"evaluation covers {self.eval_examples or 0} examples, fewer than "
                                     f"tracking.min_aggregate={self.min_aggregate}")
                continue
            try:
                number = float(value)
            except (TypeError, ValueError):
                self.dropped("metric", key, "value is not a number")
                continue
            if math.isfinite(number):
                out[key] = number
        return out

    def window(self, metrics: Mapping[str, Any], *, dialogues: int) -> dict[str, float]:
        """`metrics` of a window of training steps over `dialogues` dialogues: the windowed ones (WINDOWED_METRICS)
        only when the window covers at least `tracking.min_aggregate` dialogues; the others as `metrics` decides."""
        if dialogues < self.min_aggregate:
            for key in metrics:
                if key in WINDOWED_METRICS:
                    self.dropped("metric", key, f"its window covers {dialogues} dialogues, fewer than "
                                                f"tracking.min_aggregate={self.min_aggregate}")
            metrics = {k: v for k, v in metrics.items() if k not in WINDOWED_METRICS}
        return self.metrics(metrics)

    def evaluation_covers(self, examples: int) -> bool:
        """Whether an evaluation over this many examples is an aggregate that may be logged."""
        return examples >= self.min_aggregate

    def tags(self, tags: Mapping[str, Any]) -> dict[str, str]:
        out = {}
        for key, value in tags.items():
            text = str(value)
            if not key.startswith(TAG_ALLOW_LIST):
                self.dropped("tag", key, "not in the tag allow-list")
            elif len(text) > MAX_TAG_CHARS:
                self.dropped("tag", key, f"value longer than {MAX_TAG_CHARS} characters")
            else:
                out[key] = text
        return out

    def artifact(self, kind: str, payload: Mapping[str, Any]) -> tuple[str, str] | None:
        """(file name, JSON text) for a safe artifact kind, or None (dropped with a warning)."""
        if kind not in SAFE_ARTIFACTS:
            self.dropped("artifact", kind, f"not one of medtee's safe artifacts ({', '.join(SAFE_ARTIFACTS)})")
            return None
        if kind == "evaluation":
            examples = int(payload.get("examples") or 0)
            if not self.evaluation_covers(examples):
                self.dropped("artifact", kind, f"evaluation covers {examples} examples, fewer than "
                                                  f"tracking.min_aggregate={self.min_aggregate}")
                return None
            payload = {"examples": examples, "metrics": self.metrics(payload.get("metrics") or {})}
        return SAFE_ARTIFACTS[kind], json.dumps(payload, indent=2, sort_keys=True, default=str)

    def report(self, html: bytes) -> bool:
        """Whether an evaluation report may be logged: one self-contained file that loads nothing from anywhere."""
        from medtee.evaluation.report import external_references

        found = external_references(html)
        if found:
            self.dropped("artifact", REPORT_ARTIFACT, f"it references {len(found)} external resources")
        return not found

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

