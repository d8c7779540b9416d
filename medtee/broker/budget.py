"""A dataset's differential-privacy budget across its key releases, counted from the broker's audit log.

Every `release` entry records `dp_spend`, what the run the key went to may spend of the training split's privacy:
`{"epsilon": E, "delta": D}` for a `train` run under DP-SGD (its `privacy.dp.target_epsilon`/`target_delta`, which
its accountant keeps it within), zero for `eval`, `generate` and a `train` run with `trainer.validate_only` (they
train nothing: no adapter comes of them, and a checkpoint they read is a charged run's), and
"unbounded" for a run that trains without DP (a `train` run without it, a `sweep`: medtee sweeps only without DP)
or whose recipe the broker could not read (none sent, or not the one the digest covers). Entries written before
medtee recorded spends count as unbounded too.

By basic composition the releases of a dataset together are (sum of epsilons, sum of deltas)-DP with respect to one
dialogue record of its training split. A release policy's `recipe.dp_budget` bounds those sums: the broker refuses a
release that would take them over it, or whose spend, or an earlier release's, is unbounded. The count is
conservative: a run that fails before training is charged its whole target. A DP run resuming a checkpoint is
charged nothing only when it continues a run that ended without an adapter: the release's close reported (in its
teardown record, signed by the attested receipt key) that checkpoint as the newest it wrote and the step training
stopped at (a run that trained past it reports none: its later iterates may be disclosed), and no adapter, the
resume asks for the same target, and no other release continued that one yet (`continuation`); its entry records
`resumes` (the release it continues) and `dp_target`. The DP-SGD trajectory then goes on in one line, and only the
last run of it writes an adapter, so its accountant's target covers the line. Any other resume is charged its
whole target again.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

UNBOUNDED = "unbounded"
FREE = {"epsilon": 0.0, "delta": 0.0}
_TOLERANCE = 1e-9  # relative: sums of decimal epsilons (0.1 + 0.2) are not exact in binary


def spend(recipe: object, recipe_digest: str) -> dict | str:
    """What a release for `recipe` (verified against `recipe_digest`) may spend: `{"epsilon", "delta"}` or
    UNBOUNDED."""
    from medtee.attestation.appraise import canonical_digest

    if not isinstance(recipe, dict) or canonical_digest(recipe) != recipe_digest:
        return UNBOUNDED
    mode, trainer = recipe.get("mode"), recipe.get("trainer")
    if mode in ("eval", "generate") or (mode == "train" and isinstance(trainer, dict)
                                        and trainer.get("validate_only") is True):
        return {"epsilon": 0.0, "delta": 0.0}
    dp = (recipe.get("privacy") or {}).get("dp") if isinstance(recipe.get("privacy"), dict) else None
    if mode != "train" or not isinstance(dp, dict) or dp.get("enabled") is not True:
        return UNBOUNDED
    epsilon, delta = dp.get("target_epsilon"), dp.get("target_delta")
    if not (_amount(epsilon) and _amount(delta)):
        return UNBOUNDED
    return {"epsilon": float(epsilon), "delta": float(delta)}


def split(recipe: object) -> dict | None:
    """The train/held-out split a release's (verified) recipe asks for: `{"seed", "val_fraction"}` of its `data`
    section (what `medtee.data.module` draws the held-out dialogues by), None when it names none readably."""
    data = recipe.get("data") if isinstance(recipe, dict) else None
    seed, fraction = (data.get("seed"), data.get("val_fraction")) if isinstance(data, dict) else (None, None)
    if type(seed) is int and -2 ** 63 <= seed < 2 ** 63 and _amount(fraction):
        return {"seed": seed, "val_fraction": float(fraction)}
    return None


class Tally:
    """What the `release` entries of one dataset have spent, fed oldest first: how many, their summed epsilon and
    delta, the first whose spend is unbounded (its `seq`), if any, and the split of the first that recorded one."""

    def __init__(self) -> None:
        self.releases, self.unbounded_seq = 0, None
        self.split, self.split_seq = None, None
        self._epsilons: list[float] = []
        self._deltas: list[float] = []

    def add(self, entry: dict) -> None:
        self.releases += 1
        if self.split_seq is None and "split" in entry:
            self.split, self.split_seq = entry["split"], entry.get("seq")
        value = entry.get("dp_spend", UNBOUNDED)
        if isinstance(value, dict) and all(_amount(value.get(k)) for k in ("epsilon", "delta")):
            self._epsilons.append(value["epsilon"])
            self._deltas.append(value["delta"])
        elif self.unbounded_seq is None:
            self.unbounded_seq = entry.get("seq")

    @property
    def epsilon(self) -> float:
        return _sum(self._epsilons)

    @property
    def delta(self) -> float:
        return _sum(self._deltas)

    def describe(self) -> str:
        releases = f"{self.releases} release{'' if self.releases == 1 else 's'}"
        if self.unbounded_seq is not None:
            return f"unbounded since release seq {self.unbounded_seq} ({releases})"
        return f"epsilon {self.epsilon:.6g}, delta {self.delta:.3g} over {releases}"


def _amount(value: object) -> bool:
    try:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    except OverflowError:  # an int beyond any float
        return False


def _sum(values: list[float]) -> float:
    try:
        return math.fsum(values)
    except OverflowError:  # finite amounts summing past the largest float: more than any budget
        return math.inf


def spent(entries: Iterable[dict], dataset_id: str) -> Tally:
    """What the `release` entries of `dataset_id` among `entries` have spent."""
    tally = Tally()
    for entry in entries:
        if entry.get("event") == "release" and entry.get("dataset_id") == dataset_id:
            tally.add(entry)
    return tally


def close_outputs(outputs: object) -> dict | None:
    """A teardown record's `outputs` (`{"adapter": bool, "last_checkpoint": SHA-256 hex or None}`: what the run
    says it left) if well-formed, else None."""
    import re

    if not isinstance(outputs, dict) or set(outputs) != {"adapter", "last_checkpoint"}:
        return None
    adapter, checkpoint = outputs["adapter"], outputs["last_checkpoint"]
    if type(adapter) is not bool or not (checkpoint is None or (isinstance(checkpoint, str)
                                                                and re.fullmatch(r"[0-9a-f]{64}", checkpoint))):
        return None
    return {"adapter": adapter, "last_checkpoint": checkpoint}


def continuation(recipe: object, this: dict | str, dataset_id: str, *, releases: dict, newest: dict,
                 continued: set) -> str | None:
    """The release a release for `recipe` (verified; spending `this`) continues at no charge, or None: `recipe`
    trains (not validate-only) resuming a checkpoint that `newest` (checkpoint SHA-256 -> release id whose close
    reported it as its newest, and no adapter) names, a release of `dataset_id` at the target `this` (`releases`:
    id -> {"dataset_id", "target"}), which no release in `continued` took on already."""
    trainer = recipe.get("trainer") if isinstance(recipe, dict) else None
    if not isinstance(this, dict) or not resumes(recipe) or trainer.get("validate_only") is True:
        return None
    resumed = trainer["resume_from"]
    writer = newest.get(resumed[len("sha256:"):]) if resumed.startswith("sha256:") else None
    known = releases.get(writer)
    if known is None or writer in continued or known["dataset_id"] != dataset_id or known["target"] != this:
        return None
    return writer


def resumes(recipe: object) -> bool:
    """Whether `recipe` (a release's, as sent) resumes a checkpoint: its `trainer.resume_from` is a digest."""
    trainer = recipe.get("trainer") if isinstance(recipe, dict) else None
    return isinstance(trainer, dict) and isinstance(trainer.get("resume_from"), str)


def refusal(budget, so_far: Tally, this: dict | str, *, resuming: bool = False,
            this_split: dict | None = None) -> tuple[str, str] | None:
    """(expected, actual) of the `broker.dp_budget` check a release spending `this` with split `this_split` fails
    under `budget` (a policy's DpBudget) after `so_far`; None when the budget admits it. `resuming`: the release
    resumes a checkpoint (the refusal says what a resume is charged and how the owner admits it). The releases of a
    budgeted dataset keep one split: `eval`, `generate` and validate-only runs spend nothing because they read only
    held-out dialogues, which another split would make training ones (and two splits differing by one dialogue would
    single it out in their aggregates)."""
    bounds = [f"{name} <= {limit:g}" for name, limit in (("epsilon", budget.epsilon), ("delta", budget.delta))
              if limit is not None]
    expected = f"the dataset's releases together within {' and '.join(bounds)} (recipe.dp_budget)"
    if so_far.unbounded_seq is not None:
        return expected, (f"release seq {so_far.unbounded_seq} of this dataset trained without DP (or with a recipe "
                          f"the broker did not read), so its privacy loss is unbounded and no budget can admit more; "
                          f"seal the dialogues again as a new dataset")
    if so_far.split_seq is not None and this_split != so_far.split:
        def named(value):
            return " ".join(f"data.{k}={v}" for k, v in sorted(value.items())) if value else "no data section"
        return expected, (f"this release asks for the split {named(this_split)}, but the dataset's releases under a "
                          f"budget keep the one of release seq {so_far.split_seq}: {named(so_far.split)}; set them "
                          f"so (another split would make held-out dialogues training ones)")
    if this == UNBOUNDED:
        return expected, ("this release's loss is unbounded: a train run under DP-SGD (privacy.dp.enabled: true) or "
                          "eval/generate is needed, with the recipe its digest covers")
    over = [f"{name} {total:.6g} spent + {this[name]:.6g} = {total + this[name]:.6g} > {limit:g}"
            for name, total, limit in (("epsilon", so_far.epsilon, budget.epsilon),
                                       ("delta", so_far.delta, budget.delta))
            if limit is not None and total + this[name] > limit * (1 + _TOLERANCE)]
    if over and resuming:
        over.append("a resumed run is charged its whole target again unless it continues the newest checkpoint of a "
                    "run whose close the broker recorded without an adapter, at the same target, that no other run "
                    "continued; to admit it, the data owner raises recipe.dp_budget in the release policy")
    return (expected, "; ".join(over)) if over else None
