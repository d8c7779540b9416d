"""`medtee train` against the module path it runs, on the same batches: the loss step by step, and tokens/s.

Runs `medtee train OVERRIDES...` as a user does (its own process, a fresh directory) and reads the run's per-step
`train/loss` from its MLflow store. Then replays the same steps in this process through the module path that
`benchmarks/qlora_gpu.py` measures: the same recipe composed by `medtee.config`, the same synthetic dialogues, the
same `DialogueDataModule` batches, `training.model.build_model` and `training.module.CausalLMModule` (loss,
optimizer, schedule) under the recipe's precision, with gradient clipping, and no Lightning. Prints one JSON line
per step (both losses and their relative difference) and last the steady tokens/s of each side after `--skip`
steps and their ratio (medtee train's from the MLflow timestamps of its step logs, so everything Lightning, the
guard and MLflow add between steps is counted).

    python benchmarks/train_vs_module.py recipe=demo trainer.max_steps=6                         # CPU
    python benchmarks/train_vs_module.py recipe=medgemma27b_random_gpu_dev --skip 4              # a CUDA GPU

Synthetic data only (the replay needs the dialogues in the clear); LoRA dropout is set to 0 and validation and
checkpoints are moved past the last step unless the overrides say otherwise, so both sides draw no random numbers
the other does not.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def train_losses(overrides: list[str], workdir: Path) -> tuple[list[float], list[int]]:
    """(train/loss per step, MLflow timestamp in ms per step) of `medtee train OVERRIDES` run in `workdir`."""
    res = subprocess.run([sys.executable, "-m", "medtee", "train", *overrides], cwd=workdir, capture_output=True,
                         text=True)
    if res.returncode != 0:
        raise SystemExit(f"medtee train failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    con = sqlite3.connect(workdir / "mlflow.db")
    try:
        rows = con.execute("select step, value, timestamp from metrics where key='train/loss' order by step").fetchall()
    finally:
        con.close()
    return [value for _, value, _ in rows], [stamp for _, _, stamp in rows]


def replay(overrides: list[str], steps: int) -> tuple[list[float], list[int], list[float]]:
    """(loss, tokens, wall time after the step) of each of the first `steps` steps through the module path."""
    import lightning as L
    import torch

    from medtee import config
    from medtee.data.module import DialogueDataModule
    from medtee.data.synthetic import generate_dialogues
    from medtee.training.model import build_model, build_tokenizer
    from medtee.training.module import CausalLMModule

    cfg = config.compose(overrides)
    t, d = cfg.trainer, cfg.data
    device = "cuda" if cfg.hardware.accelerator == "cuda" else "cpu"
    L.seed_everything(t.seed, verbose=False)  # as medtee.run._fit: seed, tokenizer, data, model, in this order
    tokenizer = build_tokenizer(cfg.model)
    data = DialogueDataModule(generate_dialogues(d.n_synthetic, seed=d.synthetic_seed), tokenizer,
                              max_length=d.max_length, batch_size=d.batch_size, val_fraction=d.val_fraction,
                              seed=d.seed, packing=d.packing)
    data.setup("fit")
    model = build_model(cfg.model, cfg.qlora, vocab_size=len(tokenizer), device=device)
    module = CausalLMModule(model, t)
    optimizers = module.configure_optimizers()
    optimizer, schedule = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]
    params = [p for p in model.parameters() if p.requires_grad]
    autocast = (torch.autocast(device, dtype=torch.bfloat16) if t.precision.value.startswith("bf16-mixed")
                else torch.autocast(device, enabled=False))
    losses, tokens, stamps = [], [], []
    for batch in islice(data.train_dataloader(), steps):
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast:
            loss = module._loss(batch)
        loss.backward()
        if t.gradient_clip_val:
            torch.nn.utils.clip_grad_norm_(params, t.gradient_clip_val)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))  # synchronizes, as Lightning's per-step log does
        tokens.append(int(batch["input_ids"].numel()))
        stamps.append(time.perf_counter())
    return losses, tokens, stamps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("overrides", nargs="*", help="medtee train overrides, e.g. recipe=demo trainer.max_steps=6")
    ap.add_argument("--skip", type=int, default=2, help="steps left out of tokens/s (warm-up, compilation)")
    args = ap.parse_args()
    from medtee import config

    cfg = config.compose(args.overrides)
    if cfg.data.source != "synthetic" or cfg.trainer.accumulate_grad_batches != 1 or cfg.privacy.dp.enabled:
        ap.error("compares synthetic-data runs with one micro-batch per step and no DP only")
    steps = cfg.trainer.max_steps
    if not 0 <= args.skip < steps - 1:
        ap.error(f"--skip must leave at least two of trainer.max_steps={steps} steps")
    given = {o.split("=", 1)[0] for o in args.overrides}
    # every step logged as its own window (tracking.min_aggregate=1; medtee's default pools 20 dialogues per value)
    defaults = {"qlora.dropout": 0.0, "trainer.log_every_n_steps": 1, "tracking.min_aggregate": 1,
                "trainer.enable_progress_bar": "false",
                "trainer.val_check_interval": steps, "trainer.num_sanity_val_steps": 0,
                "trainer.checkpoint_every_n_steps": 0}
    overrides = [*args.overrides, *(f"{k}={v}" for k, v in defaults.items() if k not in given)]
    with tempfile.TemporaryDirectory(prefix="medtee-train-vs-module-") as tmp:
        trained, stamps_ms = train_losses(overrides, Path(tmp))
    replayed, tokens, stamps = replay(overrides, steps)
    if len(trained) != steps:
        raise SystemExit(f"medtee train logged {len(trained)} train/loss values for {steps} steps")
    worst = 0.0
    for step, (a, b) in enumerate(zip(trained, replayed)):
        rel = abs(a - b) / max(abs(b), 1e-12)
        worst = max(worst, rel)
        print(json.dumps(dict(step=step, train_loss=a, module_loss=b, rel_diff=rel)), flush=True)
    steady = sum(tokens[args.skip + 1:])
    train_tps = steady / ((stamps_ms[-1] - stamps_ms[args.skip]) / 1000)
    module_tps = steady / (stamps[-1] - stamps[args.skip])
    print(json.dumps(dict(steps=steps, skip=args.skip, max_rel_loss_diff=worst, train_tokens_per_s=round(train_tps, 1),
                          module_tokens_per_s=round(module_tps, 1), ratio_train_module=round(train_tps / module_tps, 3),
                          device=cfg.hardware.accelerator.value)), flush=True)


if __name__ == "__main__":
    main()
