"""The one place that knows the order: recipe -> environment -> evidence -> key release -> loader -> training ->
guarded tracking -> encrypted outputs -> summary.

`main(cfg)` returns an exit code: 0 done, 1 refused (environment or attestation), 2 bad configuration or input.
A run refused before training leaves nothing behind.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import time
import traceback
import uuid
from pathlib import Path

from medtee import config, hardware

log = logging.getLogger("medtee")

EXIT_OK, EXIT_REFUSED, EXIT_BAD_INPUT, EXIT_FAILED = 0, 1, 2, 3

#: Set before any heavy import: no hub access, no telemetry from the libraries medtee runs.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
               "HF_DATASETS_OFFLINE": "1", "DO_NOT_TRACK": "1", "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false",
               "TOKENIZERS_PARALLELISM": "false"}


class Refused(Exception):
    """The run may not proceed (environment or attestation); the message lists every reason."""


def say(message: str) -> None:
    print(f"medtee: {message}", file=sys.stderr, flush=True)


def main(cfg) -> int:
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir)
    recipe = hc.runtime.choices.get("recipe") or "custom"
    _contain()
    try:
        return train(cfg, recipe=recipe, out_dir=out_dir)
    except Exception as exc:  # report where, never what: a message or repr may quote a batch
        say(f"run failed: {type(exc).__name__} (message withheld: it may quote patient data)")
        for frame in traceback.extract_tb(exc.__traceback__)[-6:]:
            say(f"  at {frame.filename}:{frame.lineno} in {frame.name}")
        return EXIT_FAILED
    finally:
        _remove_if_empty(out_dir)


def _contain() -> None:
    """No core dumps (they would hold decrypted data) and no network egress from the ML libraries."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.environ.update(OFFLINE_ENV)


def _remove_if_empty(path: Path) -> None:
    """Hydra creates the run directory before medtee may refuse; take it (and empty parents) back."""
    stop = Path.cwd().resolve()
    path = path.resolve()
    while path != stop and stop in path.parents:
        try:
            path.rmdir()
        except OSError:
            return
        path = path.parent


def train(cfg, *, recipe: str, out_dir: Path) -> int:
    from medtee.sealing.manifest import SealedDataError

    try:
        config.check(cfg)
        config.check_runnable(cfg)
        digest = config.recipe_digest(cfg)
        preflight(cfg)
        return _train(cfg, recipe=recipe, digest=digest, out_dir=out_dir)
    except config.ConfigError as exc:
        say(f"configuration error: {exc}")
        return EXIT_BAD_INPUT
    except SealedDataError as exc:
        say(f"sealed dataset rejected: {exc}")
        return EXIT_BAD_INPUT
    except Refused as exc:
        say(f"refused: {exc}")
        return EXIT_REFUSED


def preflight(cfg) -> None:
    """Check the machine against the hardware profile and the evidence providers; raise Refused listing why."""
    from medtee import attestation

    problems = hardware.mismatches(cfg.hardware)
    problems += attestation.unavailable_reasons(cfg.attestation.provider, cfg.attestation.gpu_provider)
    if problems:
        raise Refused("; ".join(problems))


def release_data_key(cfg, dataset, *, broker, recipe_digest: str):
    """Challenge -> evidence bound to nonce, ephemeral key and recipe -> broker appraisal -> data key in memory.

    The run first appraises its own evidence against the recipe's policy (a clear local error); the broker then
    appraises it independently against the dataset's release policy, which is what decides.
    """
    from medtee import attestation
    from medtee.sealing.broker import KeyReleaseDenied, obtain_data_key

    att, manifest = cfg.attestation, dataset.manifest
    policy = attestation.policy_from_mapping(att, "the recipe's attestation group")
    verdicts = []

    def evidence_for(nonce: bytes, ephemeral_public_key: bytes):
        bound = dict(nonce=nonce, ephemeral_public_key=ephemeral_public_key, recipe_digest=recipe_digest)
        evidence = attestation.collect_evidence(att.provider, att.gpu_provider, **bound)
        expected = attestation.report_data(**bound, gpu_evidence_digests=evidence.gpu_evidence_digests())
        verdict = attestation.appraise(evidence, policy, expected_report_data=expected,
                                       expected_gpu_nonce=attestation.gpu_nonce(**bound))
        if not verdict.ok:
            raise Refused(f"evidence fails this recipe's attestation policy '{att.name}':\n{verdict.explain()}")
        verdicts.append(verdict)
        return evidence

    try:
        key = obtain_data_key(broker, dataset_id=manifest.dataset_id, manifest_digest=manifest.digest(),
                              recipe_digest=recipe_digest, evidence_for=evidence_for, scheme=cfg.encryption.scheme)
    except KeyReleaseDenied as exc:
        raise Refused(f"the key broker denied the data key: {exc}") from None
    return key, verdicts[-1]


def _dataset_path(cfg, out_dir: Path, broker) -> Path:
    """The sealed dataset: the recipe's, or (data=synthetic) synthetic dialogues sealed now into the run directory."""
    if cfg.data.source == "sealed":
        return Path(cfg.data.path)
    from medtee.data.synthetic import generate_dialogues
    from medtee.sealing.seal import seal_records

    path = out_dir / "synthetic-sealed"
    seed, n = cfg.data.synthetic_seed, cfg.data.n_synthetic
    seal_records(generate_dialogues(n, seed=seed), path, broker=broker, policy=cfg.attestation.name,
                 dataset_id=f"synthetic-{seed}-{n}-{uuid.uuid4().hex[:12]}")
    say(f"sealed {cfg.data.n_synthetic} synthetic dialogues into {path}")
    return path


def _train(cfg, *, recipe: str, digest: str, out_dir: Path) -> int:
    from medtee.sealing.broker import connect
    from medtee.sealing.reader import open_dataset

    enc = cfg.encryption
    broker = connect(enc.broker, store_dir=Path(enc.broker_dir), ca=enc.broker_ca, timeout_s=enc.broker_timeout_s)
    dataset = open_dataset(_dataset_path(cfg, out_dir, broker))  # every shard checked against the manifest
    data_key, verdict = release_data_key(cfg, dataset, broker=broker, recipe_digest=digest)
    records = dataset.read_records(data_key)  # decrypted into this process's memory only
    del data_key
    say(f"attestation {verdict.policy}: {'PASS' if verdict.ok else 'FAIL'}"
        f"{' (SIMULATED)' if verdict.simulated else ''}; data key released; {len(records)} records in memory")
    return _fit(cfg, recipe=recipe, digest=digest, records=records, dataset=dataset, verdict=verdict,
                out_dir=out_dir)


def _fit(cfg, *, recipe, digest, records, dataset, verdict, out_dir: Path) -> int:
    import lightning as L
    import torch

    from medtee.data.module import DialogueDataModule
    from medtee.tracking import Guard, GuardedMLflowLogger
    from medtee.training.model import build_model, build_tokenizer
    from medtee.training.module import CausalLMModule
    from medtee.training.output import write_outputs

    t, hw = cfg.trainer, cfg.hardware
    if hw.cpu_threads:
        torch.set_num_threads(hw.cpu_threads)
    L.seed_everything(t.seed, verbose=False)
    device = "cuda" if hw.accelerator == "cuda" else "cpu"
    tokenizer = build_tokenizer(cfg.model)
    datamodule = DialogueDataModule(records, tokenizer, max_length=cfg.data.max_length,
                                    batch_size=cfg.data.batch_size, val_fraction=cfg.data.val_fraction,
                                    seed=cfg.data.seed, packing=cfg.data.packing)
    del records
    datamodule.setup("fit")
    stats = datamodule.stats()
    model = build_model(cfg.model, cfg.qlora, vocab_size=len(tokenizer), device=device)

    guard = Guard(cfg.tracking.metrics, cfg.tracking.min_aggregate)
    guard.eval_examples = stats.get("n_val", 0)
    resolved = config.resolved(cfg)
    tags = {
        "medtee.recipe": recipe,
        "medtee.recipe_digest": digest,
        "medtee.dataset_manifest_digest": dataset.manifest.digest(),
        "medtee.hardware": hw.name,
        "medtee.attestation.policy": verdict.policy,
        "medtee.attestation.mode": "SIMULATED" if verdict.simulated else "hardware",
        "medtee.attestation.verdict": "pass" if verdict.ok else "fail",
        "medtee.model": cfg.model.name,
    }
    if verdict.simulated:
        tags["medtee.SIMULATED"] = "true: development attestation, no TEE, protects nothing"
        tags["mlflow.note.content"] = "SIMULATED attestation: development run, no TEE, protects nothing."
    logger = GuardedMLflowLogger(tracking_uri=cfg.tracking.tracking_uri, experiment=cfg.tracking.experiment,
                                 run_name=cfg.tracking.run_name or recipe, guard=guard, tags=tags,
                                 params=Guard.params(resolved))
    say(f"MLflow run {logger.run_id} in {cfg.tracking.tracking_uri} (experiment '{cfg.tracking.experiment}')")

    trainer = L.Trainer(
        accelerator=hw.accelerator.value, devices=hw.devices, num_nodes=hw.num_nodes, max_steps=t.max_steps,
        precision=t.precision.value, accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val or None, val_check_interval=t.val_check_interval,
        check_val_every_n_epoch=None, limit_val_batches=t.limit_val_batches,
        num_sanity_val_steps=t.num_sanity_val_steps, log_every_n_steps=t.log_every_n_steps,
        deterministic=t.deterministic, enable_progress_bar=t.enable_progress_bar, enable_checkpointing=False,
        enable_model_summary=False, logger=logger, default_root_dir=str(out_dir),
    )
    module = CausalLMModule(model, t)
    started = time.time()
    try:
        trainer.fit(module, datamodule=datamodule)
    except BaseException:
        logger.close("FAILED")
        raise
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k in ("train/loss", "val/loss")}
    summary = {
        "recipe": recipe,
        "recipe_digest": digest,
        "dataset_manifest_digest": dataset.manifest.digest(),
        "attestation": {"policy": verdict.policy, "ok": verdict.ok, "simulated": verdict.simulated},
        "mlflow_run_id": logger.run_id,
        "steps": trainer.global_step,
        "seconds": round(time.time() - started, 1),
        "final_metrics": guard.metrics(metrics),
        "examples": {"train": stats.get("n_train"), "val": stats.get("n_val")},
    }
    written = write_outputs(module.model, cfg, summary=summary, resolved_recipe=resolved, out_dir=out_dir)
    logger.set_tags({"medtee.adapter_sha256": written["adapter_sha256"]})
    logger.close("FINISHED")
    say(f"done: {trainer.global_step} steps; encrypted adapter and summary in {out_dir}")
    return EXIT_OK
