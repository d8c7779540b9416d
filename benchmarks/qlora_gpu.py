"""QLoRA training step on the Gemma-3-27B shape: medtee against the hand-written peer baseline, one process.

Both sides build the same random-weight Gemma 3 (27B dimensions, seed 0), load it with NF4 double quantization
and put LoRA r=16 on every linear layer; both train on the same random batches (sequence x batch, every token
supervised). The baseline is `../shared/bench/peer_qlora_baseline.py` run as written (transformers + peft +
bitsandbytes by hand: fp32 upcast of the non-quantized weights, reentrant checkpointing, full logits, paged 8-bit
AdamW). medtee's side is its own training path: `training.model.build_model` and `training.module.CausalLMModule`
(loss, optimizer) under bf16 autocast with gradient clipping, as the Lightning trainer runs them, configured only by
recipe files, composed by medtee.config: `conf/model/<model conf>.yaml`, `conf/qlora/nf4_gpu.yaml`,
`conf/trainer/gpu.yaml` (`benchmarks/train_vs_module.py` checks that `medtee train` computes the same losses).

Like the baseline, each side runs two layer counts and extrapolates s/step and peak memory linearly to 62 layers
(or `--direct` runs 62 layers as is). Prints one JSON line per run and per extrapolation (a side that fails, e.g.
out of memory, prints its error and the others still run), a ratio per further model conf, and last
`ratio medtee/baseline: X` (tokens/s of the first model conf over the baseline's).

    python benchmarks/qlora_gpu.py                              # H100/H200: 4 and 8 layers, seq 2048 x batch 4
    python benchmarks/qlora_gpu.py --models medgemma_27b          # the speed profile only
    python benchmarks/qlora_gpu.py --models medgemma_27b medgemma_27b:checkpoint_every_n_layers=3,compile_layers=true
    python benchmarks/qlora_gpu.py --seq 8192 --batch 1
    python benchmarks/qlora_gpu.py --direct                     # 62 layers, no extrapolation (~55 GB of weights)
    python benchmarks/qlora_gpu.py --tiny --no-quant --seq 256 --batch 2 --steps 2  # CPU smoke run

Needs torch, transformers, peft, bitsandbytes, lightning, and for medtee.config hydra-core, omegaconf and
cryptography (`benchmarks/device/` carries them to a GPU machine).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def recipe_sections(model_conf: str, *, weights: str, no_quant: bool, max_steps: int):
    """(model, qlora, trainer) as medtee.config composes them from conf/ for `model_conf` (NAME or
    NAME:field=value,...) over the weights at `weights`, with qlora=nf4_gpu (or unquantized) and trainer=gpu."""
    from medtee import config

    name, _, settings = model_conf.partition(":")
    cfg = config.compose(["recipe=demo", f"model={name}", "model.source=pretrained", f"model.id={weights}",
                          f"qlora={'unquantized' if no_quant else 'nf4_gpu'}", "trainer=gpu",
                          f"trainer.max_steps={max_steps}", *(f"model.{item}" for item in settings.split(",") if item)])
    return cfg.model, cfg.qlora, cfg.trainer


def make_weights(dims: dict, layers: int, workdir: str, device: str) -> str:
    """The random Gemma 3 both sides load, created exactly as the baseline creates its own (seed 0, bf16)."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = Gemma3ForCausalLM(Gemma3TextConfig(num_hidden_layers=layers, **dims))
    torch.set_default_dtype(torch.float32)
    path = os.path.join(workdir, f"medtee_g27_{layers}")
    model.save_pretrained(path, safe_serialization=True)
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return path


def run_medtee(layers: int, args, dims: dict, workdir: str, model_conf: str, matmul_params) -> dict:
    import torch

    from medtee.training.model import build_model, decoder_layers
    from medtee.training.module import CausalLMModule

    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.time()
    path = make_weights(dims, layers, workdir, device)
    model_cfg, qlora_cfg, trainer_cfg = recipe_sections(model_conf, weights=path, no_quant=args.no_quant,
                                                        max_steps=args.warmup + args.steps)
    model = build_model(model_cfg, qlora_cfg, vocab_size=dims["vocab_size"], device=device)
    t_load = time.time() - t0
    module = CausalLMModule(model, trainer_cfg)
    optimizer = module.configure_optimizers()["optimizer"]
    params = [p for p in model.parameters() if p.requires_grad]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu",
                                                                                                     enabled=False)
    generator = torch.Generator(device="cpu").manual_seed(0)  # the baseline's batches, in the same order

    def step() -> float:
        ids = torch.randint(0, dims["vocab_size"], (args.batch, args.seq), generator=generator).to(device)
        with autocast:
            loss = module._loss({"input_ids": ids, "labels": ids})
        loss.backward()
        if trainer_cfg.gradient_clip_val:
            torch.nn.utils.clip_grad_norm_(params, trainer_cfg.gradient_clip_val)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    first_loss = step()
    for _ in range(args.warmup - 1):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    for _ in range(args.steps):
        loss = step()
    if device == "cuda":
        torch.cuda.synchronize()
    dt = (time.time() - t0) / args.steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    tokens = args.batch * args.seq
    n = matmul_params(dims, layers)
    modes = [("full" if not getattr(layer._gradient_checkpointing_func, "keywords", {}).get("context_fn")
              else "selective") if layer.gradient_checkpointing else "none" for layer in decoder_layers(model)]
    result = dict(side="medtee", model_conf=model_conf, layers=layers, quant=not args.no_quant, seq=args.seq,
                  batch=args.batch, s_per_step=round(dt, 4), tokens_per_s=round(tokens / dt, 1),
                  peak_gib=round(peak, 2), tflops_4N=round(4 * n * tokens / dt / 1e12, 1), load_s=round(t_load, 1),
                  first_loss=first_loss, loss=loss, checkpointing={m: modes.count(m) for m in set(modes)},
                  loss_chunk_tokens=trainer_cfg.loss_chunk_tokens, compile_layers=model_cfg.compile_layers)
    print(json.dumps(result), flush=True)
    del module, model, optimizer, params
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    shutil.rmtree(path, ignore_errors=True)
    return result


def extrapolate(runs: list[dict], args, dims: dict, matmul_params, label: str) -> dict:
    """62-layer s/step and peak memory, linear in the layer count from the two runs (as the baseline does)."""
    a, b = runs[0], runs[-1]
    if a["layers"] == b["layers"]:
        return {**a, "extrapolated_layers": a["layers"], "side": label}
    per_layer = (b["s_per_step"] - a["s_per_step"]) / (b["layers"] - a["layers"])
    s62 = a["s_per_step"] + per_layer * (62 - a["layers"])
    mem_per_layer = (b["peak_gib"] - a["peak_gib"]) / (b["layers"] - a["layers"])
    tokens = args.batch * args.seq
    return dict(side=label, extrapolated_layers=62, s_per_step=round(s62, 3), tokens_per_s=round(tokens / s62, 1),
                peak_gib=round(a["peak_gib"] + mem_per_layer * (62 - a["layers"]), 1),
                tflops_4N=round(4 * matmul_params(dims, 62) * tokens / s62 / 1e12, 1), loss=b["loss"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared", help="the ../shared directory")
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--direct", action="store_true", help="run 62 layers directly instead of extrapolating")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--models", nargs="+", default=["medgemma_27b", "medgemma_27b_lowmem"],
                    help="medtee model confs to measure: NAME (conf/model/NAME.yaml) or NAME:field=value,... "
                         "(e.g. medgemma_27b:checkpoint_every_n_layers=3); the first one gives the last line")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="tiny Gemma 3 dimensions (CPU smoke run)")
    ap.add_argument("--no-quant", action="store_true", help="unquantized base weights (CPU smoke run)")
    args = ap.parse_args()
    if args.warmup < 1:
        ap.error("--warmup must be at least 1 (the first step's loss is compared)")
    bench = args.shared / "bench"
    if not (bench / "peer_qlora_baseline.py").is_file():
        ap.error(f"{bench}/peer_qlora_baseline.py not found: pass --shared DIR (the ../shared directory)")
    sys.path.insert(0, str(bench))
    import peer_qlora_baseline as peer
    import torch

    dims = peer.TINY if args.tiny else peer.G27
    layers = [62] if args.direct else args.layers
    free = shutil.disk_usage("/dev/shm").free if os.path.isdir("/dev/shm") else 0
    workdir = tempfile.mkdtemp(dir="/dev/shm" if free > 60e9 else None)
    print(json.dumps(dict(device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                          torch=torch.__version__, seq=args.seq, batch=args.batch, layers=layers)), flush=True)
    try:
        summaries = {}

        def side(label: str, run_one) -> None:
            """Both layer counts of one side, then its extrapolation; a failure (e.g. out of memory) is reported
            and the other sides still run."""
            runs = []
            for n in layers:
                torch.manual_seed(0)  # the same random weights on every side
                try:
                    runs.append(run_one(n))
                except Exception as exc:
                    print(json.dumps(dict(side=label, layers=n, error=f"{type(exc).__name__}: {exc}"[:400])),
                          flush=True)
                    gc.collect()
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    return
            summaries[label] = extrapolate(runs, args, dims, peer.matmul_params, label)
            print(json.dumps(summaries[label]), flush=True)

        if not args.skip_baseline:
            side("baseline", lambda n: peer.run(n, args, dims, workdir))
        for conf in args.models:
            side(f"medtee:{conf}", lambda n, conf=conf: run_medtee(n, args, dims, workdir, conf, peer.matmul_params))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    base = summaries.get("baseline")
    if base:
        for conf in args.models[1:]:
            if f"medtee:{conf}" in summaries:
                ratio = summaries[f"medtee:{conf}"]["tokens_per_s"] / base["tokens_per_s"]
                print(f"ratio medtee:{conf}/baseline: {ratio:.2f}")
        first = summaries.get(f"medtee:{args.models[0]}")
        ratio = f"{first['tokens_per_s'] / base['tokens_per_s']:.2f}" if first else "n/a (medtee run failed)"
        print(f"ratio medtee/baseline: {ratio}")


if __name__ == "__main__":
    main()
