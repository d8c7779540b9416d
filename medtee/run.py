"""The one place that knows the order: recipe -> environment -> evidence -> key release -> loader -> training ->
guarded tracking -> encrypted outputs -> summary.

`main(cfg)` returns an exit code: 0 done, 1 refused (environment or attestation), 2 bad configuration or input,
3 the run failed (reported without the exception message).
A run refused before training leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import functools
import time
import uuid
from pathlib import Path

from medtee import config, exits, hardware

say = exits.say


class Refused(Exception):
    """The run may not proceed (environment or attestation); the message lists every reason."""


def main(cfg) -> int:
    from hydra.core.hydra_config import HydraConfig

    from medtee import privacy
    from medtee.broker.client import BrokerError
    from medtee.broker.protocol import ChallengeRefused
    from medtee.data import DataError
    from medtee.sealing.manifest import SealedDataError

    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir)
    recipe = hc.runtime.choices.get("recipe") or "custom"
    try:
        with _contain(cfg):
            return train(cfg, recipe=recipe, out_dir=out_dir)
    except config.ConfigError as exc:
        say(f"configuration error: {exc}")
        return exits.BAD_INPUT
    except SealedDataError as exc:
        say(f"sealed dataset rejected: {exc}")
        return exits.BAD_INPUT
    except DataError as exc:
        say(f"input rejected: {exc}")
        return exits.BAD_INPUT
    except (Refused, BrokerError, ChallengeRefused) as exc:  # the key broker is down or refuses to answer
        say(f"refused: {exc}")
        return exits.REFUSED
    except privacy.SafeError as exc:
        say(f"run failed: {exc}")
        return exits.FAILED
    except Exception as exc:  # report where, never what: a message or repr may quote a batch
        for i, line in enumerate(privacy.failure_report(exc)):
            say(f"run failed: {line}" if i == 0 else line)
        return exits.FAILED
    finally:
        _remove_if_empty(out_dir)


@contextlib.contextmanager
def _contain(cfg):
    """The run's containment (medtee.privacy): no core dumps, offline libraries, scrubbed logs, warnings and
    exceptions, temporary files in memory. A production profile that would reach any host but the tracking server
    and the key broker is refused first."""
    from medtee import privacy

    config.apply_environment(cfg)
    problems = privacy.egress_problems(cfg)
    if problems:
        raise Refused("; ".join(problems))
    with privacy.contained():
        yield


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
    """The checks that need no data, then the run. Raises ConfigError, SealedDataError, DataError or Refused."""
    from medtee.training.model import weight_digests
    from medtee.training.output import recipient_problem

    config.check(cfg)
    config.check_runnable(cfg)
    problem = recipient_problem(cfg.output.recipient)
    if problem:
        raise config.ConfigError(problem)
    preflight(cfg)
    try:  # pretrained weights enter the digest by content ({} for a tiny model)
        weights = weight_digests(cfg.model)
    except FileNotFoundError as exc:
        raise config.ConfigError(str(exc)) from None
    digest = config.recipe_digest(cfg, weights=weights or None)
    say(f"recipe {recipe}, digest {digest}")
    return _train(cfg, recipe=recipe, digest=digest, out_dir=out_dir, weights=weights)


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
    from medtee.broker.protocol import KeyReleaseDenied, obtain_data_key

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


def _train(cfg, *, recipe: str, digest: str, out_dir: Path, weights: dict) -> int:
    from medtee.broker.protocol import connect
    from medtee.crypto.stream import derive_key
    from medtee.sealing.reader import open_dataset

    enc = cfg.encryption
    broker = connect(enc.broker, store_dir=Path(enc.broker_dir), ca=enc.broker_ca, timeout_s=enc.broker_timeout_s)
    dataset = open_dataset(_dataset_path(cfg, out_dir, broker))  # every shard checked against the manifest
    data_key, verdict = release_data_key(cfg, dataset, broker=broker, recipe_digest=digest)
    dataset.check_key(data_key)
    checkpoint_key = derive_key(data_key, dataset.manifest.digest())  # checkpoints need this release again
    # decrypted one record batch at a time, straight into the data module's token arrays (memory only)
    records = functools.partial(_decrypted_records, dataset, data_key)
    del data_key
    say(f"attestation {verdict.policy}: {'PASS' if verdict.ok else 'FAIL'}"
        f"{' (SIMULATED)' if verdict.simulated else ''}; data key released; decrypting "
        f"{dataset.manifest.record_count} records into memory")
    return _fit(cfg, recipe=recipe, digest=digest, records=records, dataset=dataset, verdict=verdict,
                out_dir=out_dir, checkpoint_key=checkpoint_key, weights=weights)


def _decrypted_records(dataset, data_key: bytes):
    return (record for batch in dataset.iter_batches(data_key) for record in batch.to_pylist())


def _fit(cfg, *, recipe, digest, records, dataset, verdict, out_dir: Path, checkpoint_key: bytes,
         weights: dict) -> int:
    import lightning as L
    import torch
    from lightning.pytorch.utilities import rank_zero_only

    from medtee.data.module import DialogueDataModule
    from medtee.tracking import open_run
    from medtee.training.checkpoint import CheckpointError, EncryptedCheckpointIO, resume_info
    from medtee.training.model import build_model, build_tokenizer
    from medtee.training.module import CausalLMModule

    t, hw = cfg.trainer, cfg.hardware
    rank_zero = rank_zero_only.rank == 0  # torchrun / SLURM: every process runs this flow; rank 0 reports
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
    model = build_model(cfg.model, cfg.qlora, vocab_size=len(tokenizer), device=device,
                        sharded=t.strategy == "fsdp")
    module = CausalLMModule(model, t)
    checkpoint_io = EncryptedCheckpointIO(checkpoint_key)
    try:
        resumed = (resume_info(checkpoint_io, t.resume_from, module, datamodule,
                               world_size=hw.devices * hw.num_nodes) if t.resume_from else {})
    except CheckpointError as exc:
        raise config.ConfigError(str(exc)) from None

    dataset_record = {"id": dataset.manifest.dataset_id, "manifest_digest": dataset.manifest.digest()}
    # the recipe as its digest covers it: without data.path (a directory name can name a patient or a study)
    recorded = config.digest_input(config.resolved(cfg), weights=weights or None)
    digests = weights if rank_zero else {}
    logger = False
    try:
        if rank_zero:
            # a resumed training run continues its MLflow run; an evaluation run is a run of its own
            run_id = resumed.get("mlflow_run_id") if not t.validate_only else None
            logger = open_run(cfg, recipe=recipe, recipe_digest=digest, dataset_digest=dataset.manifest.digest(),
                              verdict=verdict, eval_examples=stats.get("n_val", 0), weight_digests=digests,
                              run_id=run_id, manifest=dataset.manifest)
            logger.set_tags({"medtee.mode": "validate" if t.validate_only else "train"})
            say(f"MLflow run {logger.run_id} in {logger.where}{' (continued)' if run_id else ''}")
        return _run_trainer(cfg, module=module, datamodule=datamodule, logger=logger, out_dir=out_dir,
                            checkpoint_io=checkpoint_io, rank_zero=rank_zero, recorded=recorded, digests=digests,
                            summary={"recipe": recipe, "recipe_digest": digest, "dataset": dataset_record,
                                     "attestation": {"policy": verdict.policy, "ok": verdict.ok,
                                                     "simulated": verdict.simulated},
                                     "examples": {"train": stats.get("n_train"), "val": stats.get("n_val")}},
                            verdict=verdict)
    except BaseException:
        if logger:
            logger.close("FAILED")  # a run that fails is never left RUNNING
        raise


def _run_trainer(cfg, *, module, datamodule, logger, out_dir: Path, checkpoint_io, rank_zero: bool,
                 recorded: dict, digests: dict, summary: dict, verdict) -> int:
    """Fit (or validate), then write the encrypted adapter, the recorded recipe and the summary."""
    from medtee.training.engine import build_trainer
    from medtee.training.output import write_outputs

    t = cfg.trainer
    trainer = build_trainer(t, cfg.hardware, metrics=cfg.tracking.metrics or config.METRIC_ALLOW_LIST,
                            model=module.model, logger=logger, out_dir=out_dir, checkpoint_io=checkpoint_io)
    module.run_info = {"mlflow_run_id": logger.run_id} if logger else {}
    started = time.time()
    if t.validate_only:  # an evaluation run: the held-out split only, no adapter
        trainer.validate(module, datamodule=datamodule, ckpt_path=t.resume_from, verbose=False)
    else:
        trainer.fit(module, datamodule=datamodule, ckpt_path=t.resume_from)
    # every process takes part: under FSDP this gathers the adapter's shards to rank 0 (the others get nothing)
    adapter = None if t.validate_only else module.adapter_state(trainer.strategy.lightning_module_state_dict())
    if not rank_zero:
        return exits.OK
    metrics = logger.guard.metrics({k: float(v) for k, v in trainer.callback_metrics.items()
                                    if k in ("train/loss", "val/loss", "val/perplexity")})
    summary = {
        **summary,
        "mlflow_run_id": logger.run_id,
        "mode": "validate" if t.validate_only else "train",
        "resumed": bool(t.resume_from),
        "world_size": trainer.world_size,
        "steps": trainer.global_step,
        "seconds": round(time.time() - started, 1),
        "final_metrics": metrics,
    }
    written = write_outputs(module.model, cfg, adapter=adapter, summary=summary, resolved_recipe=recorded,
                            out_dir=out_dir)
    logger.finish(summary, resolved=recorded, verdict=verdict, weight_digests=digests,
                  evaluation={k: v for k, v in metrics.items() if k.startswith("val/")},
                  tags={"medtee.adapter_sha256": written["adapter_sha256"]} if written else None)
    _report(summary, first_loss=module.first_loss, out_dir=out_dir, written=written, cfg=cfg)
    return exits.OK


def _report(summary: dict, *, first_loss: float | None, out_dir: Path, written: dict, cfg) -> None:
    """The run's last lines: what was learned, where the outputs are, how to look at the metrics."""
    from medtee.tracking import display_uri

    metrics = summary["final_metrics"]
    shown = [f"{k} {v:.3f}" for k, v in metrics.items() if k.startswith("val/")]
    if "train/loss" in metrics:
        shown.insert(0, f"train/loss {first_loss:.3f} -> {metrics['train/loss']:.3f}" if first_loss is not None
                     else f"train/loss {metrics['train/loss']:.3f}")
    what = "validation" if summary["mode"] == "validate" else f"{summary['steps']} steps"
    say(f"done: {what} in {summary['seconds']} s; {', '.join(shown) or 'no metric aggregated enough examples'}")
    if written:
        from medtee.training.output import ADAPTER_FILE, DEV_RECIPIENT_DIR, DEV_RECIPIENT_NAME

        key = (DEV_RECIPIENT_DIR / f"{DEV_RECIPIENT_NAME}.key" if cfg.output.recipient == "dev"
               else "<the recipient's .key>")
        say(f"encrypted adapter (to {written['adapter_recipient']}): open it with "
            f"`medtee adapter open {out_dir / ADAPTER_FILE} --key {key} --out adapter/`")
    uri = cfg.tracking.tracking_uri
    dashboard = (f"mlflow ui --backend-store-uri {uri}   (then browse http://127.0.0.1:5000)"
                 if uri.startswith("sqlite:") else display_uri(uri))
    say(f"summary: {out_dir / 'summary.json'}; dashboard: {dashboard}")
